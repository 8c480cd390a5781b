"""Continual learning on digits: permuted (10 tasks) and split (5 tasks) streams, seven methods, SCoLe.

  prox --config=prox/experiments/configs/continual.py --workdir=runs/continual
  prox --config=prox/experiments/configs/continual.py:quick --workdir=runs/quick

Methods (``methods``, comma-separated): naive, replay, ewc (separate quadratics), ewc_online, gpm, slca,
ewc_detect (EWC consolidated when the shift detector flags a switch instead of at the known boundaries).
``ewc`` and ``ewc_online`` run once per value of the stream's ``ewc_lambdas``. Split digits is evaluated
task-incrementally (logits masked to the task's classes in training and test; the class-incremental
accuracy is reported next to it); permuted digits is domain-incremental (one 10-way head).
SCoLe (``scole.*``): naive SGD over ``num_tasks`` tasks of 2 random classes each, absent logits masked,
accuracy over all classes after every task.
"""
import ml_collections


# ``--config=prox/experiments/configs/continual.py:quick``: a tiny run of every method and stream (tests,
# smoke checks); fields set on the command line still override these.
QUICK = {
    "num_seeds": 1,
    "model_kwargs.hidden": (32, 32),
    "permuted.num_tasks": 3,
    "permuted.epochs_per_task": 1,
    "permuted.ewc_lambdas": (10.0,),
    "split.epochs_per_task": 2,
    "split.ewc_lambdas": (100.0,),
    "split.ewc_detect_lambda": 100.0,
    "ewc.fisher_examples": 64,
    "gpm.examples": 32,
    "slca.samples_per_class": 32,
    "slca.align_epochs": 1,
    "detector.reference_window": 8,
    "detector.test_window": 2,
    "detector.fisher_batches": 2,
    "scole.num_tasks": 6,
    "scole.checkpoint_every_tasks": 2,
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The default experiment; ``variant="quick"`` applies ``QUICK``."""
  if variant not in ("", "quick"):
    raise ValueError(f"unknown config variant {variant!r}; known: '' (default), 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "continual"
  c.seed = 0
  c.num_seeds = 3                      # seeds seed, seed + 1, ...: model init, data order, permutations
  # Data and model (MLP only for gpm and slca, which read the dense layers' inputs).
  c.dataset = "digits"
  c.data_dir = ""
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (256, 256)})
  c.streams = "permuted,split"         # comma-separated: permuted, split
  c.methods = "naive,replay,ewc,ewc_online,gpm,slca,ewc_detect"
  # Optimiser of every method: SGD (the EWC stability bound is stated for it).
  c.learning_rate = 0.1
  c.momentum = 0.0
  c.batch_size = 32
  c.eval_batch_size = 512
  c.permuted = ml_collections.ConfigDict({
      "num_tasks": 10,
      "epochs_per_task": 3,
      "ewc_lambdas": (1.0, 10.0, 100.0),
      "ewc_detect_lambda": 10.0,
  })
  c.split = ml_collections.ConfigDict({
      "classes_per_task": 2,
      "epochs_per_task": 10,
      "ewc_lambdas": (100.0, 1000.0, 10000.0),
      "ewc_detect_lambda": 1000.0,
  })
  c.ewc = ml_collections.ConfigDict({
      "gamma": 0.9,                    # online mode: F <- gamma F + F_new
      "fisher_examples": 200,          # per-example Fisher over this many training examples of the task
  })
  c.replay = ml_collections.ConfigDict({"capacity": 200, "batch_size": 32})
  c.gpm = ml_collections.ConfigDict({"examples": 125, "threshold_base": 0.97, "threshold_increment": 0.003})
  c.slca = ml_collections.ConfigDict({
      "backbone_scale": 0.01, "samples_per_class": 256, "align_epochs": 5, "align_learning_rate": 0.01,
      "align_momentum": 0.9, "align_batch_size": 256, "tau": 0.1,
  })
  c.detector = ml_collections.ConfigDict({
      "reference_window": 50, "test_window": 10, "threshold": 5.0,
      "fisher_batches": 8,             # Fisher of the detector variant: the 8 batches before the test window
  })
  c.scole = ml_collections.ConfigDict({
      "enabled": True, "num_tasks": 250, "classes_per_task": 2, "epochs_per_task": 1, "skew": 0.0,
      "checkpoint_every_tasks": 25,
  })
  c.progress = True                    # one line per finished run on stdout
  if variant == "quick":
    c.update_from_flattened_dict(QUICK)
  return c
