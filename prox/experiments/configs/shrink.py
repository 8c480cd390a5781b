"""Elastic networks (Once-for-All progressive shrinking) and budgeted structured pruning (LAPP) on digits.

  prox --config=prox/experiments/configs/shrink.py --workdir=runs/shrink
  prox --config=prox/experiments/configs/shrink.py --workdir=runs/quick --config.quick=True
  prox --config=prox/experiments/configs/shrink.py --workdir=runs/s --config.parts=lapp

``parts`` (comma-separated) selects any of ofa, lapp, proard, lightweight, fedtiny (the default runs ofa and lapp).

  prox --config=prox/experiments/configs/shrink.py --workdir=runs/shrink --config.parts=lightweight
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default experiment (``--config.quick=True``: the experiment's ``QUICK`` fields, a small run)."""
  c = ml_collections.ConfigDict()
  c.experiment = "shrink"
  c.parts = "ofa,lapp"
  c.seed = 0
  c.num_seeds = 3                      # seeds seed, seed + 1, ...: every comparison is paired by seed
  c.dataset = "digits"
  c.data_dir = ""
  c.batch_size = 64
  c.eval_batch_size = 450
  c.progress = True                    # one line per finished run on stdout
  c.quick = False                      # the experiment's QUICK fields: a small run of every part (tests)
  # Once-for-All: the elastic CNN, progressive shrinking with sandwich sampling and in-place KD.
  c.ofa = ml_collections.ConfigDict({
      "stem_channels": 8,
      "stages": ((8, 1, 1), (16, 2, 2), (24, 2, 2)),   # (channels, max depth, stride) per stage
      "kernel_sizes": (3, 5),
      "width_fractions": (0.5, 1.0),
      "expand_ratio": 3,
      "min_depth": 1,
      # steps of the phases full, kernel, depth1, width1 (the table of prox.tasks.progressive_shrinking);
      # about OFA's split of its epochs (full 180, kernel 120, depth 25 + 120, width 25 + 120): 30/20/25/25 %
      "phase_steps": (240, 160, 200, 200),
      "learning_rate": 2e-3,           # Adam; cosine decay restarted in every phase (OFA); alone: over the run
      "kd_weight": 1.0,
      "temperature": 1.0,
      # sub-networks evaluated, "kernel:depth:width" uniform over blocks (depth capped at each stage's max)
      "grid": "3:1:0.5,3:2:0.5,3:2:1.0,5:2:1.0",
  })
  # LAPP (learnable thresholds + FLOPs penalty) vs magnitude channel pruning at the same FLOPs budget.
  c.lapp = ml_collections.ConfigDict({
      "width": 16,                     # the zoo cnn: conv widths 16, 32, dense 64
      "hidden": 64,
      "removed": (0.4, 0.6),           # fractions of the dense MACs removed
      "num_steps": 1500,
      "prune_steps": 750,              # the budget tightens over [0, prune_steps]; then fine-tuning, masks fixed
      "learning_rate": 1e-3,           # Adam
      # LAPP's thresholds (Adam): they must cross the scores' range (mean 1) within the pruning window; at the
      # weights' 1e-3 they moved too little (the first full run: LAPP's own masks kept 96-100% of the MACs)
      "threshold_learning_rate": 1e-2,
      "frequency": 50,                 # magnitude pruning: masks recomputed every this many steps
      "temperature": (1.0, 100.0),     # LAPP's soft-mask temperature, rising geometrically
      "penalty_weight": 10.0,
      "eval_every": 250,
      "arms": "lapp,magnitude,lapp_bypass",   # beside the dense network
      # lapp_bypass: LAPP with a bypass around these groups, its MACs counted in the budget. conv1: the layer
      # LAPP pruned hardest in the runs without bypass (about half of its 16 channels at both budgets)
      "bypass": "conv1",
  })
  # ProARD: the ofa elastic network trained adversarially, robust-gap vs uniform student sampling.
  c.proard = ml_collections.ConfigDict({
      "arms": "gap,uniform",
      "num_steps": 800,                # the OFA run's total (at 300, every sub-network but the largest stayed near chance)
      "learning_rate": 2e-3,           # Adam, cosine over the run
      "eps": 0.2,                      # L-inf radius in standardised pixel units (pixels span about 2.7)
      "kd_weight": 1.0,
      "kd_temperature": 1.0,
      "temperature": 0.05,             # the gap sampler's tau
      "momentum": 0.9,                 # the gap sampler's running-gap momentum
      "eval_pgd_steps": 5,
  })
  # Lightweight CNN (dual-input/dual-output sub-models, unified, fine-tuned with progressive unfreezing) vs
  # the same cnn trained on the augmented stream alone for the same total number of steps.
  c.lightweight = ml_collections.ConfigDict({
      "width": 16,                     # the zoo cnn: conv widths 16, 32, dense 64 (as lapp's)
      "hidden": 64,
      "dual_steps": 1000,              # both sub-models, original + augmented digits
      "finetune_steps": 500,           # the unified model, progressive unfreezing; single: 1500 steps
      "learning_rate": 1e-3,           # Adam: the dual phase and the single model
      "finetune_learning_rate": 3e-4,  # Adam per unfrozen group (each group's moments start when it unfreezes)
      "unfreeze": "head,dense,conv2,conv1",   # groups, output first, one every finetune_steps / 4 steps
      "weight": 0.5,                   # unified = weight * original + (1 - weight) * augmented
      "eval_every": 250,
  })
  # FedTiny (adaptive candidate selection + progressive layer-wise grow-and-prune with per-client top-K
  # gradient buffers) vs magnitude pruning once at the server, then FedAvg, at the same density and rounds.
  c.fedtiny = ml_collections.ConfigDict({
      "arms": "fedtiny,server,select",  # select: FedTiny's chosen candidate, masks fixed (a diagnostic)
      "num_clients": 8,
      "shards_per_client": 2,          # label-sorted shards per client (non-IID: about 2 digits per client)
      "width": 16,                     # the zoo cnn (as lapp's)
      "hidden": 64,
      "density": 0.1,                  # fraction of the kernels' weights kept (biases stay dense)
      "rounds": 60,                    # FedAvg rounds
      "local_steps": 5,                # local SGD steps per round
      "client_batch": 16,
      "learning_rate": 0.05,           # local SGD
      "candidates": 8,                 # coarse candidates (per-layer densities; row 0 uniform: the server arm's)
      "spread": 0.5,                   # log-normal spread of the candidates' per-layer densities
      "select_batch": 64,              # rows per client for the candidate selection
      "prune_rounds": 30,              # grow-and-prune in rounds [0, prune_rounds), one layer per round
      "alpha": 0.3,                    # adjusted fraction of a layer's active weights, cosine decay over the rounds
      "topk": 256,                     # entries of each client's per-layer gradient buffer
      "eval_every": 10,                # rounds
  })
  return c
