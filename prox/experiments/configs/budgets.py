"""Budget curricula, NoProp, private training and unlearning on digits, MNIST-1D and 2-D data.

  prox --config=prox/experiments/configs/budgets.py --workdir=runs/budgets
  prox --config=prox/experiments/configs/budgets.py --workdir=runs/quick --config.quick=True
  prox --config=prox/experiments/configs/budgets.py --workdir=runs/b --config.parts=noprop,privacy

``parts`` (comma-separated) selects any of budget, interval, staged, noprop, privacy.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default experiment (``--config.quick=True``: the experiment's ``QUICK`` fields, a small run)."""
  c = ml_collections.ConfigDict()
  c.experiment = "budgets"
  c.parts = "budget,interval,staged,noprop,privacy"
  c.seed = 0
  c.num_seeds = 3                      # seeds seed, seed + 1, ...: every comparison is paired by seed
  c.data_dir = ""
  # Compute-budget curricula: an iterative weight-tied classifier, accuracy at the final (tight) budget.
  c.budget = ml_collections.ConfigDict({
      "datasets": "digits,mnist1d",
      "arms": "fixed,decay,entropy,grpo",
      "num_steps": 1500,
      "batch_size": 64,
      "learning_rate": 1e-3,           # Adam
      "max_steps": 8,                  # K, the refinement steps the model can run
      "width": 64,
      "hidden": 128,
      "start": 8,                      # B_0, the generous budget of the decaying arms
      "end": 2,                        # B_min, the final (tight) budget every arm is evaluated at
      "kind": "exponential",           # the budget schedule (linear, exponential)
      "decay_fraction": 0.6,           # the budget reaches B_min after this fraction of the steps
      "decay_interval": 0.05,          # exponential: the budget shrinks every this fraction of the steps
      "beta_start": 4.0,               # entropy arm: easy-to-hard tilt, annealed over decay_fraction
      "beta_end": 0.0,
      "group_size": 8,                 # grpo arm: samples (halting step, class) per input
      "length_weight": 0.5,            # grpo arm: reward 1[correct] + w 1[length <= budget] 1[correct]
      "eval_every": 250,
  })
  # Backward interval (B^2-DiffuRL): RL fine-tuning of a small 2-D denoising chain with a sparse reward.
  c.interval = ml_collections.ConfigDict({
      "chain_steps": 10,               # T denoising steps
      "beta_min": 0.01,                # DDPM noise schedule beta_1..beta_T, linear
      "beta_max": 0.6,
      "hidden": (128, 128),
      "pretrain_steps": 3000,
      "pretrain_learning_rate": 1e-3,
      "rl_steps": 200,
      "rl_learning_rate": 3e-4,
      "batch_size": 256,               # trajectories per RL step (one group)
      "grow_fraction": 0.6,            # the interval reaches the whole chain after this fraction of RL steps
      "reward_radius": 0.3,
      "eval_samples": 4000,
      "eval_every": 20,
  })
  # Staged difficulty sampler with IRT difficulties from an artificial crowd.
  c.staged = ml_collections.ConfigDict({
      "dataset": "digits",
      "schedules": "blocked,interleaved,mixed,random",
      "epochs": 10,
      "batch_size": 32,
      "learning_rate": 1e-3,           # Adam
      "hidden": (128, 128),
      "num_levels": 4,                 # equal-count difficulty levels from the 1PL difficulties
      "crowd_size": 10,
      "crowd_hidden": (16,),
      "crowd_steps": 150,              # member j trains crowd_steps (j + 1) / crowd_size Adam steps (>= 1)
  })
  # NoProp-DT against backprop training of an MLP of about the same parameter count.
  c.noprop = ml_collections.ConfigDict({
      "datasets": "digits,mnist1d",
      "num_blocks": 10,
      "hidden": 128,
      "num_steps": 3000,
      "batch_size": 64,
      "learning_rate": 1e-3,           # AdamW for both
      "weight_decay": 1e-3,
      "baseline_depth": 2,             # hidden layers of the MLP; their width matches the parameter count
  })
  # DP-SGD (ghost clipping, Poisson sampling), then unlearning by fine-tuning vs retraining.
  c.privacy = ml_collections.ConfigDict({
      "dataset": "digits",
      "hidden": (256, 256),
      "batch_size": 64,                # expected batch: the Poisson sampling rate is batch_size / N
      "base_steps": 800,
      "learning_rate": 1e-3,           # Adam (DP-Adam for the private base: post-processing of DP-SGD's gradient)
      "clip": 1.0,
      "noise_multiplier": 1.5,
      "delta": 1e-5,
      "forget_fraction": 0.1,          # the forgotten set: this fraction of the train split, drawn per seed
      "finetune_steps": 100,
      "retrain_steps": 800,
  })
  c.eval_batch_size = 1000
  c.progress = True                    # one line per finished run on stdout
  c.quick = False                      # the experiment's QUICK fields: a small run of every part (tests)
  return c
