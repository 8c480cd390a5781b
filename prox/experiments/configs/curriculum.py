"""Curriculum and self-distillation: ALP-GMM vs random on the toy env, PUDF vs random order vs plain
training on digits, PS-KD vs cross-entropy on digits, learning-curve forecasting of a ``classify`` run.

  prox --config=prox/experiments/configs/curriculum.py --workdir=runs/curriculum
  prox --config=prox/experiments/configs/curriculum.py --workdir=runs/quick --config.quick=True
  prox --config=prox/experiments/configs/curriculum.py --workdir=runs/c --config.parts=alp_gmm,pskd

``parts`` (comma-separated) selects any of alp_gmm, pudf, pskd, forecast.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default experiment (``--config.quick=True``: the experiment's ``QUICK`` fields, a tiny run)."""
  c = ml_collections.ConfigDict()
  c.experiment = "curriculum"
  c.parts = "alp_gmm,pudf,pskd,forecast"
  c.seed = 0
  c.num_seeds = 3                      # seeds of the digits parts (pudf, pskd): seed, seed + 1, ...
  # Digits training shared by pudf and pskd (and the classify run forecast reads).
  c.dataset = "digits"
  c.data_dir = ""
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (128, 128)})
  c.learning_rate = 1e-3               # Adam, constant
  c.batch_size = 32
  c.eval_batch_size = 512
  # ALP-GMM vs random on the toy env (Portelas et al. 2019): all seeds of a teacher in one jitted call.
  c.alp_gmm = ml_collections.ConfigDict({
      "episodes": 20_000,
      "seeds": 5,
      "score_every": 1_000,
      "fit_rate": 250,
      "random_task_ratio": 0.2,
      "bounds": ((0.0, 0.0), (1.0, 1.0)),   # the teacher's task box (low, high); the env is [0, 1]^2
  })
  # PUDF: IRT difficulties from an artificial crowd, ability-based selection each epoch.
  c.pudf = ml_collections.ConfigDict({
      "epochs": 20,
      "crowd_size": 10,                # crowd members: small MLPs on bootstrap resamples
      "crowd_hidden": (16,),
      "crowd_steps": 300,              # member j trains crowd_steps * (j + 1) / crowd_size Adam steps (>= 1)
      "num_probe": 1000,               # items probed for the ability estimate each epoch
      "patience": 2,
      "bump": 0.1,
  })
  # PS-KD (Kim et al. 2021) vs plain cross-entropy.
  c.pskd = ml_collections.ConfigDict({"epochs": 30, "alpha_T": 0.8, "ece_bins": 15})
  # Learning-curve forecasting of the classify run's test accuracy.
  c.forecast = ml_collections.ConfigDict({
      "num_steps": 1500,               # the classify run (classify config, this model and data)
      "eval_every": 50,
      "fractions": (0.2, 0.4, 0.6, 0.8),   # forecast after this fraction of the run
      "min_gain": 0.005,               # stop when even the interval's top gains less than this
      "min_points": 5,                 # evaluations needed before the stopping rule is tried
      "num_bootstrap": 100,
      "level": 0.9,
  })
  c.progress = True                    # one line per finished run on stdout
  c.quick = False                      # the experiment's QUICK fields: a tiny run of every part (tests)
  return c
