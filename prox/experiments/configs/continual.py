"""Continual learning on digits: permuted, split (task- and class-incremental) streams, 14 methods, SCoLe.

  prox --config=prox/experiments/configs/continual.py --workdir=runs/continual
  prox --config=prox/experiments/configs/continual.py --workdir=runs/quick --config.quick=True

Streams (``streams``, comma-separated): ``permuted`` (10 tasks of all ten classes under a seeded pixel
permutation; domain-incremental, one 10-way head), ``split`` (5 tasks of 2 classes, task-incremental: the
logits are masked to the task's classes in training and test; the accuracy over all classes is reported
beside it) and ``split_class`` (the same tasks, class-incremental: one shared head, no mask anywhere).
Methods (``methods``): naive, replay, ewc (separate quadratics), ewc_online, gpm, slca, ewc_detect (EWC
consolidated inside the step when the shift detector flags a switch; the task boundaries are not used).
``ewc`` and ``ewc_online`` run once per value of the stream's ``ewc_lambdas``. Further methods, not in the
default list (``--config.methods=naive,replay,gpm,mas,mir,cuber,protocl,onpro,wsn,tame``): mas, mir (replay's
memory), cuber (GPM's bases), protocl (replay's memory), onpro (replay's memory), wsn (split only), tame
(replay's memory for its selector; the shift detector's windows).
SCoLe (``scole.*``): naive SGD over ``num_tasks`` tasks of 2 random classes each, absent logits masked,
accuracy over all classes after every task.

Avalanche's setting (inputs in [0, 1], PyTorch's initialisation): ``--config.scaling=unit
--config.model_kwargs.init=torch``.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """The default experiment; ``variant="quick"`` sets ``quick`` (the experiment's ``QUICK`` fields)."""
  if variant not in ("", "quick"):
    raise ValueError(f"unknown config variant {variant!r}; known: '' (default), 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "continual"
  c.quick = variant == "quick"         # a tiny run of every method and stream (continual.QUICK)
  c.seed = 0
  c.num_seeds = 3                      # seeds seed, seed + 1, ...: model init, data order, permutations
  # Data and model (MLP only for gpm and slca, which read the dense layers' inputs).
  c.dataset = "digits"
  c.data_dir = ""
  c.scaling = "standard"               # standard: (x - mean) / std; unit: x / 16 (Avalanche's [0, 1])
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (256, 256)})   # init=torch: PyTorch's init
  c.streams = "permuted,split,split_class"
  c.methods = "naive,replay,ewc,ewc_online,gpm,slca,ewc_detect"
  # Optimiser of every method: SGD (the EWC stability bound lr * lambda * max(F) < 2 is stated for it).
  # prox.transforms.ewc.ewc_lambda_range of the accumulated Fisher (results/continual/results.md): at lr
  # 0.1 the shared head caps a stable permuted lambda near 50-75 after nine tasks (lambda = 100
  # diverges); at lr 0.01 the permuted range is [~0.9, ~870] after task 1 and [~0.4, ~170] after task 9,
  # task-incremental split [~1.4, ~2e4] -> [~0.4, ~5e3], class-incremental [~130, ~2e4] -> [~3, ~2e3].
  # The sweeps below span these ranges, up to and past their stability ends.
  c.learning_rate = 0.01
  c.momentum = 0.0
  c.batch_size = 32
  c.eval_batch_size = 512
  c.permuted = ml_collections.ConfigDict({
      "num_tasks": 10,
      "epochs_per_task": 3,
      "ewc_lambdas": (10.0, 30.0, 100.0),
      "ewc_detect_lambda": 30.0,
      "mas_lambda": 1.0,
  })
  c.split = ml_collections.ConfigDict({     # task-incremental
      "classes_per_task": 2,
      "epochs_per_task": 10,
      "ewc_lambdas": (100.0, 1000.0, 10000.0),
      "ewc_detect_lambda": 1000.0,
      "mas_lambda": 1.0,
  })
  c.split_class = ml_collections.ConfigDict({     # class-incremental
      "classes_per_task": 2,
      "epochs_per_task": 10,
      "ewc_lambdas": (100.0, 1000.0, 10000.0),
      "ewc_detect_lambda": 1000.0,
      "mas_lambda": 1.0,
  })
  c.ewc = ml_collections.ConfigDict({
      "gamma": 0.9,                    # online mode: F <- gamma F + F_new
      "fisher_examples": 200,          # per-example Fisher over this many training examples of the task
  })
  # Reservoir memory updated with every training batch inside the step; replay.batch_size memory
  # examples join every batch of batch_size.
  c.replay = ml_collections.ConfigDict({"capacity": 200, "batch_size": 32})
  c.gpm = ml_collections.ConfigDict({"examples": 125, "threshold_base": 0.97, "threshold_increment": 0.003})
  # MAS: <stream>.mas_lambda sum_i Omega_i (w_i - w*_i)^2, Omega summed over the tasks, each task's from
  # mas.examples of its inputs.
  c.mas = ml_collections.ConfigDict({"examples": 200})
  # MIR: replay's memory and replay.batch_size rows, the most interfered of mir.candidates draws.
  c.mir = ml_collections.ConfigDict({"candidates": 100})
  # CUBER on gpm's bases: an old task's subspace opens at a layer when the next task's gradient has
  # >= projection_threshold of its norm there and is aligned with the old task's stored gradient.
  c.cuber = ml_collections.ConfigDict({"projection_threshold": 0.5, "backward_scale": 1.0, "examples": 125})
  # ProtoCL: Gaussian class prototypes on the last hidden layer (known noise), replay's memory and draws.
  c.protocl = ml_collections.ConfigDict({"noise_variance": 1.0, "prior_variance": 1.0, "dirichlet": 1.0})
  # OnPro: a projection head on the last hidden layer, pixel dropout as the second view, the feedback
  # sampler's defaults (base_rate, mixup_p), replay's memory and draws.
  c.onpro = ml_collections.ConfigDict({"projection_dim": 128, "temperature": 0.5, "drop": 0.1,
                                       "base_rate": 0.75, "mixup_p": 0.6})
  # WSN (split only): each task trains and is scored with the top `density` of its scores per kernel.
  c.wsn = ml_collections.ConfigDict({"density": 0.5})
  # TAME: a bank of max_experts experts (a switch of the detector.* test spawns one), a selector MLP with
  # one hidden layer trained on replay's memory routes test inputs.
  c.tame = ml_collections.ConfigDict({"max_experts": 10, "selector_hidden": 128})
  c.slca = ml_collections.ConfigDict({
      "backbone_scale": 0.01, "samples_per_class": 256, "align_epochs": 5, "align_learning_rate": 0.01,
      "align_momentum": 0.9, "align_batch_size": 256, "tau": 0.1,
  })
  c.detector = ml_collections.ConfigDict({
      "reference_window": 50, "test_window": 10, "threshold": 5.0,
      "fisher_batches": 8,             # Fisher at a detected switch: the 8 batches before the test window
  })
  c.scole = ml_collections.ConfigDict({
      "enabled": True, "num_tasks": 250, "classes_per_task": 2, "epochs_per_task": 1, "skew": 0.0,
  })
  c.progress = True                    # one line per finished run on stdout
  return c
