"""What the experiments share: config checks, builders, the standard actions, sweeps and summaries.

An experiment module is short and reads like a flax example's ``train.py``: it checks its config with the
helpers here (one set of checks, each raising :class:`ConfigError` with one line naming the bad value),
builds data, model, optimizer and step from the library, and trains on ``prox.loop.run`` with the
standard actions (``train_actions``: log, evaluate). Sweeps run one directory per run
(:func:`run_once`), so a restarted sweep skips finished runs and refuses changed configs.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
import optax

from prox import loop as loop_lib
from prox import models
from prox import step as step_lib
from prox.losses import classification_eval
from prox.tasks import data as data_lib

PyTree = Any


from prox.experiments import _runs
from prox.experiments._runs import ConfigError  # the one definition (JAX-free, for --help)


# --- checks -----------------------------------------------------------------------------------------

def require(ok: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``ok``."""
  if not ok:
    raise ConfigError(message)


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def positive_ints(config: ml_collections.ConfigDict, *names: str, zero_ok: bool = False) -> None:
  """Each dotted field is an int > 0 (``>= 0`` with ``zero_ok``)."""
  for name in names:
    value = get(config, name)
    low = 0 if zero_ok else 1
    require(is_int(value) and value >= low,
            f"{name} must be an integer >= {low}, got {value!r}")


def numbers(config: ml_collections.ConfigDict, *names: str, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
  """Each dotted field is a finite number in the given range."""
  for name in names:
    value = get(config, name)
    ok = is_number(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    bounds = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
              f"{'inf' if high is None else high}{')' if high_open else ']'}")
    require(ok, f"{name} must be a finite number in {bounds}, got {value!r}")


def choice(config: ml_collections.ConfigDict, name: str, options: Iterable[str]) -> str:
  options = tuple(options)
  value = get(config, name)
  require(value in options, f"unknown {name} {value!r}; known: {', '.join(map(str, options))}")
  return value


def names(config: ml_collections.ConfigDict, name: str, options: Iterable[str] | None = None) -> list[str]:
  """A comma-separated string field as a list (each checked against ``options``)."""
  value = get(config, name)
  require(isinstance(value, str), f"{name} must be a comma-separated string, got {value!r}")
  out = [v.strip() for v in value.split(",") if v.strip()]
  require(bool(out), f"{name} is empty")
  if options is not None:
    options = tuple(options)
    for v in out:
      require(v in options, f"{name}: unknown {v!r}; known: {', '.join(options)}")
  return out


def library_check(field: str, factory: Callable, *args: Any, **kwargs: Any) -> Any:
  """Runs a library factory for its argument checks; its ``ValueError``/``TypeError`` becomes one line."""
  try:
    return factory(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{field}: {e}") from None


def check_workdir(workdir: str) -> None:
  require(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
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


def check_batch(name: str, batch_size: int, micro_batch_size: int = 0) -> None:
  """``batch_size`` splits over the devices, and into micro-batches of ``micro_batch_size`` per device."""
  devices = jax.device_count()
  require(is_int(batch_size) and batch_size > 0, f"{name} must be a positive integer, got {batch_size!r}")
  require(batch_size % devices == 0, f"{name} {batch_size} is not divisible by the device count {devices}")
  if micro_batch_size:
    require((batch_size // devices) % micro_batch_size == 0,
            f"micro_batch_size {micro_batch_size} does not divide the per-device batch "
            f"{batch_size // devices} ({name} {batch_size} / {devices} devices)")


# --- data, model, optimizer -------------------------------------------------------------------------

def check_data(config: ml_collections.ConfigDict) -> None:
  choice(config, "dataset", data_lib.DATASETS)
  if "scaling" in config:
    choice(config, "scaling", data_lib.SCALINGS)


def load_splits(config: ml_collections.ConfigDict) -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
  """The train and test splits; a dataset that is not prepared is a ``ConfigError``."""
  kwargs = {"scaling": config.scaling} if "scaling" in config else {}
  try:
    return tuple(data_lib.load(config.dataset, split, data_dir=config.get("data_dir") or None, **kwargs)
                 for split in ("train", "test"))
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


def check_model(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """``model`` and ``model_kwargs`` (under ``prefix``) name a model that accepts them."""
  model = choice(config, prefix + "model", models.MODELS)
  kwargs = dict(get(config, prefix + "model_kwargs"))
  shape = (40, 1) if config.get("dataset") == "mnist1d" else (8, 8, 1)
  try:
    models.check_options(model, input_shape=shape, num_classes=10, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model {model!r} rejects {prefix}model_kwargs {kwargs}: {e} (a config file may "
                      f"offer the model's defaults, e.g. --config=prox/experiments/configs/classify.py:"
                      f"{model})") from None


def build_model(config: ml_collections.ConfigDict, ds: data_lib.ArrayDataset, *, seed: int | None = None,
                prefix: str = "") -> models.Functional:
  model = models.make_model(get(config, prefix + "model"), input_shape=ds.images.shape[1:],
                            num_classes=ds.num_classes, seed=config.seed if seed is None else seed,
                            **dict(get(config, prefix + "model_kwargs")))
  return models.functional(model)


def _optax_alias(name: str) -> Callable[..., optax.GradientTransformation]:
  return getattr(optax, name)


def _optimizers() -> dict[str, Callable[..., optax.GradientTransformation]]:
  from prox import optim  # pylint: disable=g-import-not-at-top
  out = {name: _optax_alias(name) for name in ("sgd", "adam", "adamw", "adagrad", "rmsprop", "lamb",
                                                "lion", "nadam", "adafactor")}
  out.update(adagrad_norm=optim.adagrad_norm, sinkgd=optim.sinkgd)
  return out


OPTIMIZERS = _optimizers()
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  lr = config.learning_rate
  schedule = config.get("schedule", "constant")
  if schedule == "constant":
    return optax.constant_schedule(lr)
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, config.num_steps)
  return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, config.num_steps)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``[clip_by_global_norm] -> <optimizer>(schedule, **optimizer_kwargs)`` as the config names it."""
  parts = []
  if config.get("grad_clip_norm", 0) > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(OPTIMIZERS[config.optimizer](learning_rate_schedule(config),
                                            **dict(config.get("optimizer_kwargs", {}))))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def check_optimizer(config: ml_collections.ConfigDict) -> None:
  choice(config, "optimizer", sorted(OPTIMIZERS))
  if "schedule" in config:
    choice(config, "schedule", SCHEDULES)
  numbers(config, "learning_rate", low=0, low_open=True)
  if "grad_clip_norm" in config:
    numbers(config, "grad_clip_norm", low=0)
  try:
    build_optimizer(config)
  except TypeError as e:
    raise ConfigError(f"optimizer {config.optimizer!r} rejects optimizer_kwargs "
                      f"{dict(config.get('optimizer_kwargs', {}))}: {e}") from None


# --- evaluation and the standard actions ------------------------------------------------------------

def evaluator(apply: Callable, mesh: jax.sharding.Mesh, *, per_class: bool = False) -> Callable:
  """``evaluate(state_or_params, ds, batch_size, **fields) -> {"accuracy", "loss", ...}`` over a whole
  split (``fields``: constant batch fields such as a ``logit_mask``); compiled once per batch size."""
  eval_step = step_lib.make_eval_step(classification_eval(apply, per_class=per_class), mesh=mesh)

  def evaluate(state: step_lib.TrainState, ds: data_lib.ArrayDataset, batch_size: int,
               **fields: np.ndarray) -> dict[str, Any]:
    parts = []
    for batch in data_lib.epoch_batches(ds, batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count()):
      for k, v in fields.items():
        batch[k] = np.broadcast_to(v, (len(batch["label"]),) + np.shape(v))
      parts.append(eval_step(state, step_lib.shard_batch(batch, mesh)))
    sums = {k: np.sum([np.asarray(p[k], np.float64) for p in jax.device_get(parts)], axis=0)
            for k in parts[0]}
    out = {"accuracy": float(sums["correct"] / sums["count"]), "loss": float(sums["loss"] / sums["count"])}
    if "correct_masked" in sums:
      out["accuracy_masked"] = float(sums["correct_masked"] / sums["count"])
    if per_class:
      out["class_correct"], out["class_count"] = sums["class_correct"], sums["class_count"]
    return out

  return evaluate


def scalars(tree: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train_actions(writer: Any, evaluate_test: Callable[[step_lib.TrainState], dict], *, log_every: int,
                  eval_every: int, state_metrics: Callable | None = None,
                  log_extra: Callable[[loop_lib.Context], dict] | None = None,
                  max_loss_ratio: float | None = 1e3) -> tuple:
  """The standard actions: train metrics after step 1 and every ``log_every`` steps (kept in the record as ``last_train``,
  so a run resumed after its last step still reports them), test metrics every ``eval_every`` steps and
  at the end (the record's ``test``).

  ``state_metrics``: jitted ``state -> {name: scalar}`` logged with the train metrics (e.g. a sparsity
  schedule's beta); ``log_extra``: ``ctx -> dict`` more train fields (batch size, samples).
  ``max_loss_ratio``: a logged training loss above this many times the first logged one means the run
  diverged without becoming non-finite (Adam at a huge learning rate: finite weights, chance accuracy):
  ``prox.loop.Diverged`` (one line; the last checkpoint is kept). ``None`` turns the check off.
  """
  state_metrics = None if state_metrics is None else jax.jit(state_metrics)

  def log(ctx: loop_lib.Context) -> None:
    if ctx.out is None:
      return
    record = scalars(ctx.out.metrics)
    if max_loss_ratio is not None and "loss" in record:
      first = ctx.record.setdefault("first_loss", {"step": ctx.step, "loss": record["loss"]})
      if record["loss"] > max_loss_ratio * max(first["loss"], 1e-12):
        writer.write(ctx.step, record)
        raise loop_lib.Diverged(
            f"the training loss {record['loss']:.4g} at step {ctx.step} is over {max_loss_ratio:g} times "
            f"the first logged loss ({first['loss']:.4g} at step {first['step']}): the run diverged "
            f"(lower the learning rate); it stops")
    if state_metrics is not None:
      record.update(scalars(state_metrics(ctx.state)))
    if log_extra is not None:
      record.update(log_extra(ctx))
    ctx.record["last_train"] = record
    writer.write(ctx.step, record)

  def test(ctx: loop_lib.Context) -> None:
    result = evaluate_test(ctx.state)
    ctx.record["test"] = {"step": ctx.step, **result}
    writer.write(ctx.step, result, split="test")

  return ((loop_lib.Every(steps=log_every, at=(1,), end=True), log),
          (loop_lib.Every(steps=eval_every, end=True), test))


def summary(result: loop_lib.LoopResult, **more: Any) -> dict[str, Any]:
  """The final metrics of a run: test metrics, the last train metrics, times over all segments."""
  rec = result.record
  out: dict[str, Any] = {"step": int(jax.device_get(result.state.step)),
                         "samples": int(jax.device_get(result.state.samples))}
  test = rec.get("test", {})
  out.update({f"test_{k}": v for k, v in test.items() if k != "step"})
  out.update({f"train_{k}": v for k, v in rec.get("last_train", {}).items()})
  out.update(train_seconds=result.train_seconds, train_seconds_this_run=result.train_seconds_this_run,
             compile_seconds_this_run=result.compile_seconds, compiles_this_run=result.compiles)
  if result.nonfinite_steps:
    out["nonfinite_steps"] = result.nonfinite_steps
  out.update(more)
  return out


def replicated_state(params: PyTree, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                     seed: int, model_state: PyTree = None, extra: PyTree = ()) -> step_lib.TrainState:
  """``prox.step.init_state`` placed on ``mesh`` (replicated on a data mesh; fully sharded over fsdp)."""
  return step_lib.place(step_lib.init_state(params, tx, model_state=model_state, extra=extra, seed=seed), mesh)


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh the config names: ``fsdp`` (default 1) devices per parameter shard, the rest data parallel."""
  fsdp = int(config.get("fsdp", 1))
  if fsdp == 1:
    return step_lib.data_mesh()
  return step_lib.fsdp_mesh(jax.device_count() // fsdp, fsdp)


def check_mesh(config: ml_collections.ConfigDict) -> None:
  """``fsdp`` divides the device count."""
  fsdp = config.get("fsdp", 1)
  require(is_int(fsdp) and fsdp >= 1 and jax.device_count() % fsdp == 0,
          f"fsdp={fsdp!r} must be a positive integer dividing the device count {jax.device_count()}")


def seeds(config: ml_collections.ConfigDict) -> Sequence[int]:
  return [config.seed + i for i in range(config.num_seeds)]


# --- sweeps -------------------------------------------------------------------------------------------

def run_once(directory: str, experiment: str, run_config: Any, fn: Callable[[], dict], *,
             resumable: Iterable[str] = ()) -> dict:
  """One run of a sweep in its own ``directory``: its ``result.json`` when it finished before; otherwise
  records (or checks) its config there and returns ``fn()``, saved as ``result.json``.

  A restarted sweep so skips finished runs, resumes unfinished ones from their checkpoints, and refuses a
  run directory made with another config (one line naming the changed fields).
  """
  from prox.experiments import report  # pylint: disable=g-import-not-at-top
  _runs.check_config(directory, _runs.record(experiment, run_config),
                     tuple(_runs.RESUMABLE) + tuple(resumable))
  path = os.path.join(directory, "result.json")
  if os.path.exists(path):
    return report.read_json(path)
  result = fn()
  report.write_json(path, result)
  return result



def distinct_names(config: ml_collections.ConfigDict, field: str, options: tuple[str, ...]) -> list[str]:
  """``names(config, field, options)``, refusing a name given twice."""
  chosen = names(config, field, options)
  require(len(set(chosen)) == len(chosen), f"{field} names an entry twice: {get(config, field)!r}")
  return chosen


def say(config: ml_collections.ConfigDict, text: str) -> None:
  """Prints ``text`` on process 0 when ``config.progress``."""
  if config.progress and jax.process_index() == 0:
    print(text, flush=True)


def finished_runs(workdir: str, part: str) -> int:
  """The finished runs (``result.json`` files) under ``workdir/part``."""
  return sum("result.json" in files for _, _, files in os.walk(os.path.join(workdir, part)))


def run_seconds(tree: Any) -> float:
  """The sum of every ``wall_seconds`` in ``tree`` (each finished run records its own)."""
  if isinstance(tree, dict):
    return sum(float(v) if k == "wall_seconds" else run_seconds(v) for k, v in tree.items())
  return 0.0


def run_parts(workdir: str, parts: Sequence[str], run_part: Callable[[str], dict]) -> tuple[dict, dict, int, int]:
  """``run_part(part)`` for each part in order: ``(results, seconds per part, runs trained, runs read back)``,
  counting the finished runs (``finished_runs``) under ``workdir/part`` before and after each part."""
  results, seconds, trained, read_back = {}, {}, 0, 0
  for part in parts:
    before = finished_runs(workdir, part)
    started = time.perf_counter()
    results[part] = run_part(part)
    seconds[part] = time.perf_counter() - started
    trained += finished_runs(workdir, part) - before
    read_back += before
  return results, seconds, trained, read_back
