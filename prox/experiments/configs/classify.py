"""The base experiment: train a classifier and evaluate it on the test split.

Defaults: an MLP (256-256) on the embedded `digits` dataset with Adam; reaches >= 97% test accuracy.
  prox --config=prox/experiments/configs/classify.py --workdir=runs/classify
Another model with its own default options: --config=prox/experiments/configs/classify.py:cnn (or :resnet20).
Override any field: --config.model=cnn --config.optimizer=sgd --config.optimizer_kwargs.momentum=0.9
"""
import ml_collections


MODEL_KWARGS = {
    "mlp": {"hidden": (256, 256)},
    "cnn": {"width": 32, "hidden": 128},
    "resnet20": {"width": 16},
    "cnn1d": {"width": 25},
}


def get_config(model: str = "mlp") -> ml_collections.ConfigDict:
  """The config for ``model`` (``mlp``, ``cnn`` or ``resnet20``) with that model's default options."""
  c = ml_collections.ConfigDict()
  c.experiment = "classify"
  c.seed = 0
  # Data: digits (embedded, offline) | mnist | fashion_mnist | cifar10 | cifar100 (TFDS, prepared).
  c.dataset = "digits"
  c.data_dir = ""                      # TFDS data_dir ("" = TFDS default)
  # Model: mlp | cnn | resnet20, with model_kwargs passed to prox.models.make_model.
  c.model = model or "mlp"
  c.model_kwargs = ml_collections.ConfigDict(MODEL_KWARGS.get(c.model, {}))
  # Optimizer: any name in prox.experiments.common.OPTIMIZERS (optax aliases and prox.optim).
  c.optimizer = "adam"
  c.optimizer_kwargs = ml_collections.ConfigDict()
  c.learning_rate = 1e-3
  c.schedule = "cosine"                # constant | cosine | warmup_cosine
  c.warmup_steps = 0
  c.grad_clip_norm = 0.0               # 0 disables clipping
  # Batches: global batch split over all devices; micro-batches are accumulated inside the step.
  c.batch_size = 128
  c.micro_batch_size = 0               # per device; 0 = the whole per-device batch
  # Mesh: fsdp devices share each parameter shard (fully sharded data parallel); 1 = pure data parallel.
  c.fsdp = 1
  c.eval_batch_size = 512
  c.num_steps = 1500
  # Output.
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.noise_scale = False                # log the gradient noise scale B_simple (per-example norms, EMA)
  c.noise_scale_decay = 0.95
  c.progress = True
  c.tensorboard = True
  return c
