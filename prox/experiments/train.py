"""The training loop every experiment shares: config checks, data, model, optimizer, step, checkpoints.

``train(config, workdir)`` trains ``config.model`` on ``config.dataset`` with the optimizer chain the
config names, evaluates on the test split, and writes ``metrics.jsonl``, TensorBoard events,
``curves.png`` (unless ``config.plot_curves`` is False) and ``metrics.json`` into ``workdir``. It
resumes from the newest checkpoint in ``workdir/checkpoints`` (parameters, optimizer state, rng and the
data loader's position), so a killed run that is started again ends exactly where an uninterrupted one
would.

Experiments customise it through ``Hooks`` (a different optimizer, an ``extra`` state machine,
a forward-pass weight function) instead of copying the loop.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prox import checkpoint as ckpt_lib
from prox import models
from prox import step as step_lib
from prox.experiments import writers
from prox.tasks import data as data_lib

PyTree = Any


from prox.experiments.common import ConfigError  # noqa: E402  (one definition; this module is going away)


# --- optimizers named in configs ------------------------------------------------------------------

def _optax_alias(name: str) -> Callable[..., optax.GradientTransformation]:
  return getattr(optax, name)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    name: _optax_alias(name)
    for name in ("sgd", "adam", "adamw", "adagrad", "rmsprop", "lamb", "lion", "nadam", "adafactor")
}


def _prox_optimizers() -> None:
  """Adds prox's own optimizers (``prox.optim``) to the registry."""
  from prox import optim  # pylint: disable=g-import-not-at-top
  for name in ("adagrad_norm", "sinkgd"):
    if hasattr(optim, name):
      OPTIMIZERS.setdefault(name, getattr(optim, name))


_prox_optimizers()

SCHEDULES = ("constant", "cosine", "warmup_cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, config.num_steps)
  return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, config.num_steps)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``[clip_by_global_norm] -> <optimizer>(schedule, **optimizer_kwargs)`` as the config names it."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(OPTIMIZERS[config.optimizer](learning_rate_schedule(config),
                                            **dict(config.optimizer_kwargs)))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


# --- checks before anything compiles -------------------------------------------------------------

def require(ok: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``ok``."""
  if not ok:
    raise ConfigError(message)


def check_workdir(workdir: str) -> None:
  if "://" in workdir:
    return  # remote storage: checked by its first write
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".prox_write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks every value the training loop uses; raises ``ConfigError`` naming the first bad one."""
  require(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
  require(config.dataset in data_lib.DATASETS,
           f"unknown dataset {config.dataset!r}; known: {', '.join(data_lib.DATASETS)}")
  require(config.model in models.MODELS,
           f"unknown model {config.model!r}; known: {', '.join(models.MODELS)}")
  try:  # the options alone (the image shape only matters once the data is loaded)
    models.check_options(config.model, input_shape=(8, 8, 1), num_classes=10,
                         **dict(config.model_kwargs))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model {config.model!r} rejects model_kwargs {dict(config.model_kwargs)}: {e} "
                      f"(a config file may offer the model's defaults, e.g. "
                      f"--config=prox/experiments/configs/classify.py:{config.model})") from None
  require(config.optimizer in OPTIMIZERS,
           f"unknown optimizer {config.optimizer!r}; known: {', '.join(sorted(OPTIMIZERS))}")
  require(config.schedule in SCHEDULES,
           f"unknown schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}")
  require(config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}")
  for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
               "keep_checkpoints", "eval_batch_size"):
    value = config[name]
    require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
  require(config.micro_batch_size >= 0,
           f"micro_batch_size must be >= 0 (0: whole per-device batch), got {config.micro_batch_size}")
  require(config.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0, got {config.grad_clip_norm}")
  devices = jax.device_count()
  require(config.batch_size % devices == 0,
           f"batch_size {config.batch_size} is not divisible by the device count {devices}")
  require(config.eval_batch_size % devices == 0,
           f"eval_batch_size {config.eval_batch_size} is not divisible by the device count {devices}")
  per_device = config.batch_size // devices
  if config.micro_batch_size:
    require(per_device % config.micro_batch_size == 0,
             f"micro_batch_size {config.micro_batch_size} does not divide the per-device batch "
             f"{per_device} (batch_size {config.batch_size} / {devices} devices)")
  try:
    build_optimizer(config)
  except TypeError as e:
    raise ConfigError(f"optimizer {config.optimizer!r} rejects optimizer_kwargs "
                      f"{dict(config.optimizer_kwargs)}: {e}") from None
  check_workdir(workdir)


def load_splits(config: ml_collections.ConfigDict) -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
  """The train and test splits; a dataset that is not prepared is a ``ConfigError``."""
  try:
    return tuple(data_lib.load(config.dataset, split, data_dir=config.data_dir or None)
                 for split in ("train", "test"))
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


# --- classification loss and evaluation ----------------------------------------------------------

def classification_loss(apply: Callable) -> step_lib.LossFn:
  """Mean softmax cross-entropy and accuracy of ``apply(params, model_state, images, train=True)``."""

  def loss_fn(params, model_state, batch, rng):
    logits, model_state = apply(params, model_state, batch["image"], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"accuracy": accuracy}, model_state)

  return loss_fn


def classification_eval(apply: Callable) -> Callable:
  """Per-device sums of loss, correct predictions and real examples (padding rows masked out)."""

  def eval_fn(params, model_state, batch):
    logits, _ = apply(params, model_state, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return eval_fn


def evaluate(eval_step: Callable, state: step_lib.TrainState, ds: data_lib.ArrayDataset,
             batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Accuracy and mean loss over the whole split."""
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in data_lib.epoch_batches(ds, batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    sums = jax.device_get(eval_step(state, step_lib.shard_batch(batch, mesh)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss"] / totals["count"]}


# --- the loop --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Hooks:
  """What an experiment changes in the shared loop (all optional).

  tx: the optax transform (default: ``build_optimizer(config)``).
  extra_init: ``params -> extra``: the initial ``TrainState.extra``.
  extra_update / forward_fn / group_stats_fn / grad_stats: passed to ``make_train_step``.
  eval_params: ``state -> params`` used for evaluation (e.g. hard-masked weights).
  state_metrics: ``state -> {name: scalar}``, jitted: scalars of the train state (e.g. a sparsity
    schedule's beta and mask density), logged with the train metrics every ``log_every`` steps and
    added to the final metrics (names must not clash with theirs).
  """
  tx: optax.GradientTransformation | None = None
  extra_init: Callable[[PyTree], PyTree] | None = None
  extra_update: Callable | None = None
  forward_fn: Callable | None = None
  group_stats_fn: Callable | None = None
  grad_stats: bool = False
  eval_params: Callable[[step_lib.TrainState], PyTree] | None = None
  state_metrics: Callable[[step_lib.TrainState], dict[str, Any]] | None = None


def train(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks | None = None) -> dict:
  """Trains and evaluates as ``config`` says; returns the final metrics (also in metrics.json)."""
  hooks = hooks or Hooks()
  validate(config, workdir)
  train_ds, test_ds = load_splits(config)

  mesh = step_lib.data_mesh()
  model = models.make_model(config.model, input_shape=train_ds.images.shape[1:],
                            num_classes=train_ds.num_classes, seed=config.seed,
                            **dict(config.model_kwargs))
  net = models.functional(model)
  tx = hooks.tx if hooks.tx is not None else build_optimizer(config)
  params = jax.device_get(net.params)
  extra = hooks.extra_init(params) if hooks.extra_init else ()
  state = step_lib.TrainState(
      step=np.int32(0), params=params, opt_state=jax.device_get(tx.init(params)),
      model_state=jax.device_get(net.model_state), extra=jax.device_get(extra),
      rng=np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  state = step_lib.replicate(state, mesh)

  micro = config.micro_batch_size or None
  train_step = step_lib.make_train_step(
      classification_loss(net.apply), tx, mesh=mesh, micro_batch_size=micro,
      grad_stats=hooks.grad_stats, group_stats_fn=hooks.group_stats_fn, forward_fn=hooks.forward_fn,
      extra_update=hooks.extra_update)
  eval_step = step_lib.make_eval_step(classification_eval(net.apply), mesh=mesh)
  state_metrics = None if hooks.state_metrics is None else jax.jit(hooks.state_metrics)

  def train_metrics(s: step_lib.TrainState, out: step_lib.StepOutput | None) -> dict[str, Any]:
    logged = {} if out is None else dict(jax.device_get(out.metrics))
    if state_metrics is not None:
      logged.update(jax.device_get(state_metrics(s)))
    return logged

  def eval_state(s: step_lib.TrainState) -> step_lib.TrainState:
    return s if hooks.eval_params is None else s._replace(params=hooks.eval_params(s))

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints,
                                       save_interval_steps=config.checkpoint_every)
  loader = data_lib.loader_init(config.seed)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    loader = data_lib.loader_state_from_dict(meta["loader"])
  start = int(state.step)

  writer = writers.MetricWriter(workdir, total_steps=config.num_steps, tensorboard=config.tensorboard,
                                progress=config.progress)
  writer.update(start, 0)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  test = {}
  started = time.perf_counter()
  out = None
  for step in range(start + 1, config.num_steps + 1):
    local, loader = data_lib.next_batch(train_ds, loader, config.batch_size, **process)
    state, out = train_step(state, step_lib.shard_batch(local, mesh))
    writer.update(step, config.batch_size)
    if step % config.log_every == 0 or step == config.num_steps:
      writer.write(step, train_metrics(state, out))
    if step % config.eval_every == 0 or step == config.num_steps:
      test = evaluate(eval_step, eval_state(state), test_ds, config.eval_batch_size, mesh)
      writer.write(step, test, split="test")
    checkpointer.save(step, state, {"loader": data_lib.loader_state_to_dict(loader)},
                      force=step == config.num_steps)
  checkpointer.close()
  writer.close()

  if not test:  # resumed after the last step: evaluate the restored state
    test = evaluate(eval_step, eval_state(state), test_ds, config.eval_batch_size, mesh)
  final = {"step": int(state.step), "test_accuracy": test["accuracy"], "test_loss": test["loss"],
           "train_seconds_this_run": time.perf_counter() - started}
  if out is not None:
    final.update({f"train_{k}": float(v) for k, v in jax.device_get(out.metrics).items()})
  if state_metrics is not None:
    extra = {k: float(v) for k, v in train_metrics(state, None).items()}
    clash = sorted(set(extra) & set(final))
    if clash:
      raise ValueError(f"state_metrics names {clash} clash with the final metrics' names")
    final.update(extra)
  if jax.process_index() == 0:
    writers.write_summary(workdir, final)
    if config.get("plot_curves", True):   # sweeps of many short runs skip the per-run plot
      writers.plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
  return final
