"""Experiment ``adadagrad``: adaptive batch sizes for AdaGradNorm and AdaGrad (Lau, Liu, Kolar 2024).

Logistic regression and the small CNN, each with AdaGradNorm and AdaGrad, on the augmented `digits`
stream (tested on the real digits test split); every run uses the same budget of samples:
  prox --config=prox/experiments/configs/adadagrad.py --workdir=runs/adadagrad
  prox --config=prox/experiments/configs/adadagrad.py --workdir=runs/quick --config.quick=true
Writes results.md, results.json and one PNG per model/optimizer into the workdir (runs/<name>/ holds
each run's metrics and checkpoints; a rerun resumes where it stopped).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "adadagrad"
  c.seed = 0
  # Data: the augmented stream of a dataset's training split (seeded shifts, rotations, scaling and
  # pixel noise; prox.tasks.data.next_stream_batch), or epochs of the plain split with augment=False.
  c.dataset = "digits"
  c.data_dir = ""
  c.augment = True
  c.max_shift = 1.0                    # pixels
  c.max_rotation = 10.0                # degrees
  c.scale_low = 0.9
  c.scale_high = 1.1
  c.noise_std = 0.1                    # in normalised pixel units
  # Models (names in model_settings) and optimizers (names in learning_rates), comma-separated.
  c.models = "logreg,cnn"
  c.model_settings = ml_collections.ConfigDict({
      "logreg": {"model": "mlp", "model_kwargs": {"hidden": ()}},    # no hidden layer: softmax regression
      "cnn": {"model": "cnn", "model_kwargs": {"width": 16, "hidden": 64}},
  })
  c.optimizers = "adagrad_norm,adagrad"
  c.learning_rates = ml_collections.ConfigDict({"adagrad_norm": 1.0, "adagrad": 0.1})
  c.optimizer_kwargs = ml_collections.ConfigDict({"adagrad_norm": {}, "adagrad": {}})
  # Batch-size methods: constant_small (b0), constant_large (large_batch), stagewise, ramp, and the
  # tests norm (one run per eta in etas), inner_product, orthogonality, augmented, coordinate (AdaGrad).
  c.methods = "constant_small,constant_large,stagewise,ramp,norm,augmented,coordinate"
  c.etas = (0.1, 0.25, 0.5, 1.0)       # norm-test sweep
  c.eta = 0.1                          # coordinate-wise test
  c.theta = 0.1                        # inner-product test
  c.nu = 0.1                           # orthogonality test
  c.per_tensor = False                 # the reference code's per-tensor inner products
  c.b0 = 32
  c.large_batch = 1024
  c.b_max = 4096
  c.micro_batch_size = 4               # per device: the tests' groups are b / (4 x devices)
  c.stage_samples = 7_500              # stagewise: double every this many samples (8 stages)
  c.ramp_increment = 280               # ramp: b_k = b0 + 280 k (b_max after about half the budget)
  c.budget_samples = 60_000            # every run: the same number of samples
  # Evaluation on the test split: when samples cross a multiple of eval_every_samples, at a
  # geometric grid of steps (evals_per_decade per factor 10), and after the last step.
  c.eval_every_samples = 2048
  c.evals_per_decade = 20
  c.eval_batch_size = 512
  c.targets = (0.95, 0.97)             # steps and samples to reach these test accuracies
  c.quick = False                      # a small subset (logreg, eta 0.1, 3,072 samples) for tests
  c.log_every = 100
  c.checkpoint_every = 200
  c.keep_checkpoints = 1
  c.tensorboard = False
  return c
