"""Experiment ``compose``: norm-test batch growth + decaying N:M masks + EWC consolidated in the step when a
shift detector fires + an ALP-GMM teacher choosing tasks, against each method alone and plain training.

  prox --config=prox/experiments/configs/compose.py --workdir=runs/compose
  prox --config=prox/experiments/configs/compose.py --workdir=runs/compose_quick --config.quick=True
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "compose"
  c.seed = 0
  c.num_seeds = 3
  c.runs = "plain,norm_test,nm,ewc_detector,alp_gmm,composed"   # see compose.RUNS
  c.dataset = "digits"
  c.data_dir = ""
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (256, 256)})
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.optimizer_kwargs = ml_collections.ConfigDict({"momentum": 0.9})
  c.schedule = "constant"
  c.budget_samples = 300_000           # every run: this many samples
  # Batch size: b0 (also the constant batch of runs without the norm test) up to b_max, norm test eta.
  c.b0 = 64
  c.b_max = 2048
  c.eta = 0.5
  # N:M sparsity: MdGf towards n:m; beta reaches 0 at decay_end (a fraction of the samples).
  c.n = 2
  c.m = 4
  c.decay_end = 0.8
  # EWC (online) consolidated when the shift detector fires.
  c.ewc_lambda = 10.0
  c.ewc_gamma = 0.9
  c.detector = ml_collections.ConfigDict({"reference_window": 40, "test_window": 8, "threshold": 5.0})
  # Teacher: ALP-GMM over tasks (p, s) in [0, 1]^2; an episode is episode_steps steps.
  c.episode_steps = 20
  c.fit_rate = 25                      # ALP-GMM refits every fit_rate episodes
  c.eval_every_samples = 20_000
  c.eval_batch_size = 512
  c.log_every = 20
  c.checkpoint_every = 500
  c.fsdp = 1                           # devices per parameter shard (fully sharded data parallel)
  c.quick = False                      # a small run (compose.QUICK), for tests
  return c
