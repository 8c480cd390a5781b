"""N:M sparsity with progressive gradient flow on digits: dense, SR-STE, MdGf (linear, exp), SdGf.

  prox --config=prox/experiments/configs/nm_sparsity.py --workdir=runs/nm_sparsity
  prox --config=prox/experiments/configs/nm_sparsity.py --workdir=runs/nm_quick --config.quick=True

Every setting (``settings``: names in ``models``) is trained with every method at every N:M
(``sparsities``) for ``num_seeds`` seeds on the one training loop; evaluation always uses hard masks
(beta = 0). Methods: ``dense``, ``srste``, ``mdgf_<decay>`` (decay: linear | exp | step) and
``sdgf_<structure>`` (structure: stepwise | geometric). Phases, as fractions of ``num_steps``: a dense
warm-up (``warmup_fraction``), the sparse phase, and a hard-mask fine-tune (``finetune_fraction``); beta
reaches 0 (linear) or ``floor`` (exp) at the fraction ``decay_end`` of the sparse phase, and SdGf's stages
are spread evenly over it. ``mlp_narrow`` is the harder setting, where 1:16 and 1:32 clearly cost accuracy.
A sweep started again in the same workdir skips its finished runs; ``settings``, ``sparsities``,
``methods`` and ``num_seeds`` may change then (each run's own config is checked).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "nm_sparsity"
  c.seed = 0
  c.num_seeds = 5                      # seeds seed, seed + 1, ...: model init and data order
  c.quick = False                      # a tiny run (tests, smoke checks): see nm_sparsity.QUICK
  c.dataset = "digits"
  c.data_dir = ""
  # Settings to run (comma-separated names of ``models``): a model with its training length. The CNN
  # trains on fewer, smaller batches: on CPU its step costs ~25x the MLP's.
  c.settings = "mlp,cnn,mlp_narrow"
  c.models = ml_collections.ConfigDict({
      "mlp": {"model": "mlp", "model_kwargs": {"hidden": (256, 256)}, "num_steps": 600, "batch_size": 128},
      "cnn": {"model": "cnn", "model_kwargs": {"width": 32, "hidden": 128}, "num_steps": 300,
              "batch_size": 32},
      "mlp_narrow": {"model": "mlp", "model_kwargs": {"hidden": (64, 64)}, "num_steps": 600,
                     "batch_size": 128},
  })
  c.sparsities = "2:4,1:8,1:16,1:32"    # comma-separated N:M
  c.methods = "dense,srste,mdgf_linear,mdgf_exp,sdgf_stepwise"
  # Sparse leaves: a regex on parameter paths. Default: every kernel (grouped along its input dimension)
  # except the CNN's first conv, whose single input channel cannot be grouped.
  c.sparse_filter = r"^(?!conv1/)(.*/)?kernel$"
  c.srste_lambda = 2e-4
  c.decay_end = 1.0                    # fraction of the sparse phase where beta reaches 0 / floor
  c.floor = 1e-3                       # exp decay: beta is set to 0 below this
  c.warmup_fraction = 0.0              # dense warm-up, fraction of num_steps
  c.finetune_fraction = 0.2            # hard-mask fine-tune at the end, fraction of num_steps
  c.schedule_plot = "1:16"             # N:M whose beta / density curves are plotted ("last" of sparsities, "" none)
  # Training: the fields of the one loop (prox/experiments/configs/classify.py); num_steps and
  # batch_size are per setting (models.<setting>).
  c.optimizer = "adam"
  c.optimizer_kwargs = ml_collections.ConfigDict()
  c.learning_rate = 1e-3
  c.schedule = "cosine"
  c.warmup_steps = 0                   # learning-rate warm-up (warmup_cosine), not the dense phase
  c.grad_clip_norm = 0.0
  c.micro_batch_size = 0
  c.eval_batch_size = 512
  c.log_every = 25
  c.eval_every = 250
  c.checkpoint_every = 0               # 0: only at the end of each run
  c.keep_run_checkpoints = False       # delete a run's checkpoints once its result is recorded
  c.progress = True                    # one line per finished run on stdout
  return c
