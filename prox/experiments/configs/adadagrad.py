"""Experiment ``adadagrad``: adaptive batch sizes for AdaGradNorm and AdaGrad (Lau, Liu, Kolar 2024).

MNIST-1D (default): an MLP and the 1-D CNN, each with AdaGradNorm and AdaGrad, on a stream of freshly
generated samples (10^6 per run, far more than b_max), budgets in samples and in steps, 3 seeds:
  prox --config=prox/experiments/configs/adadagrad.py --workdir=runs/adadagrad
The earlier digits setting (logistic regression and the small CNN on the augmented digits stream,
60,000 samples, micro-batch groups of 4 as the tests' estimator):
  prox --config=prox/experiments/configs/adadagrad.py:digits --workdir=runs/adadagrad_digits
A small run for tests: --config.quick=True. Writes results.md, results.json and one PNG per
model/optimizer/budget; runs/<name>/ holds each run (a rerun resumes and skips finished runs).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The MNIST-1D sweep; ``variant="digits"`` gives the digits sweep."""
  if variant not in ("", "mnist1d", "digits"):
    raise ValueError(f"unknown config variant {variant!r}; known: '' (MNIST-1D), 'digits'")
  c = ml_collections.ConfigDict()
  c.experiment = "adadagrad"
  c.seed = 0
  c.num_seeds = 3
  # Data: a stream of fresh samples (MNIST-1D: newly generated; images: augmented), or with
  # augment=False epochs of the plain training split.
  c.dataset = "mnist1d"
  c.data_dir = ""
  c.augment = True
  c.max_shift = 1.0                    # pixels (image datasets)
  c.max_rotation = 10.0                # degrees
  c.scale_low = 0.9
  c.scale_high = 1.1
  c.noise_std = 0.1
  # Models (names in model_settings) and optimizers (names in learning_rates), comma-separated.
  c.models = "mlp,cnn1d"
  c.model_settings = ml_collections.ConfigDict({
      "mlp": {"model": "mlp", "model_kwargs": {"hidden": (100, 100)}},
      "cnn1d": {"model": "cnn1d", "model_kwargs": {"width": 25}},
      "logreg": {"model": "mlp", "model_kwargs": {"hidden": ()}},    # softmax regression
  })
  c.optimizers = "adagrad_norm,adagrad"
  c.learning_rates = ml_collections.ConfigDict({"adagrad_norm": 1.0, "adagrad": 0.1})
  c.optimizer_kwargs = ml_collections.ConfigDict({"adagrad_norm": {}, "adagrad": {}})
  # Methods: constant_small (b0), constant_large (large_batch), stagewise, ramp, and the tests norm (one
  # run per eta in etas), inner_product, orthogonality, augmented, coordinate (AdaGrad only).
  c.methods = "constant_small,constant_large,stagewise,ramp,norm,augmented,coordinate"
  c.etas = (0.1, 0.5)                  # norm-test sweep
  c.eta = 0.1                          # coordinate-wise test
  c.theta = 0.1                        # inner-product test
  c.nu = 0.1                           # orthogonality test
  c.estimator = "examples"             # exact per-example moments (layer taps) | groups (micro-batches)
  c.b0 = 64
  c.large_batch = 1024
  c.b_max = 8192
  c.micro_batch_size = 0               # per device; 0: b0 / devices (the loop's unit; buckets of it)
  c.stage_samples = 100_000            # stagewise: double every this many samples
  c.ramp_increment = 64                # ramp: b_k = b0 + 64 k
  c.budgets = "samples,steps"          # samples: budget_samples each; steps: budget_steps each
  c.budget_samples = 1_000_000
  c.budget_steps = 1_500
  # Evaluation on the test split: when samples cross a multiple of eval_every_samples, at a geometric
  # grid of steps (evals_per_decade per factor 10), and after the last step.
  c.eval_every_samples = 50_000
  c.evals_per_decade = 12
  c.eval_batch_size = 1000
  c.targets = (0.8, 0.9)               # steps and samples to reach these test accuracies
  c.other_devices_results = ""         # results.json of the same sweep on another device count
  c.quick = False                      # a small run (prox.experiments.adadagrad.QUICK) for tests
  c.log_every = 100
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.fsdp = 1                           # devices per parameter shard (fully sharded data parallel)
  if variant == "digits":
    c.dataset = "digits"
    c.num_seeds = 1
    c.models = "logreg,cnn"
    c.model_settings.cnn = {"model": "cnn", "model_kwargs": {"width": 16, "hidden": 64}}
    c.etas = (0.1, 0.25, 0.5, 1.0)
    c.estimator = "groups"
    c.b0 = 32
    c.b_max = 4096
    c.micro_batch_size = 4             # the tests' groups: b / (4 x devices)
    c.stage_samples = 7_500
    c.ramp_increment = 280
    c.budgets = "samples"
    c.budget_samples = 60_000
    c.eval_every_samples = 2048
    c.evals_per_decade = 20
    c.eval_batch_size = 512
    c.targets = (0.95, 0.97)
    c.checkpoint_every = 200
  return c
