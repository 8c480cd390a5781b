"""The adaptive-batch training loop: one run whose batch size grows as the gradient noise asks.

A run trains ``config.model`` with ``config.optimizer`` on a stream of samples until
``config.budget_samples`` samples are used; each step draws exactly the batch size the run's policy
names (AdAdaGrad, Lau, Liu, Kolar 2024):

* tests (``norm``, ``inner_product``, ``orthogonality``, ``augmented``, ``coordinate``): the controller
  state (``prox.optim.BatchSizeState``) lives in ``TrainState.extra`` and is updated inside the
  compiled step, from the step's gradient statistics, by the cheap micro-batch estimators of
  ``prox.optim.batch_tests``::

      b'_k = test(GradStats_k [, GroupInnerStats_k] [, AdaGrad step sizes]),
      b_{k+1} = min(max(b_k, round_up(ceil(b'_k), r)), b_max),     r = micro-batch x devices;

  the host reads ``b_{k+1}`` once per step;
* baselines (``constant``, ``stagewise``, ``ramp``): a schedule of the step, evaluated on the host.

The host draws ``b`` samples (``next_stream_batch`` for the augmented stream, ``next_batch`` for
epochs of a plain split), packs them into the buffer of ``bucket(b, r)`` micro-batches per device
(``pack_micro_batches``) and passes ``num_micro_batches = b / r``: the step compiles once per
power-of-two bucket. Compiled steps are kept in a ``StepCache`` that several runs of a sweep may share
(the test constants ``eta``/``theta``/``nu`` are traced, in ``extra``, so an eta sweep shares them);
compile time is measured apart from the training time.

Everything is checkpointed (``TrainState`` with the controller, the data position, samples seen,
timers) and a resumed run continues exactly where an uninterrupted one would.

Outputs in the run's workdir: ``metrics.jsonl`` (train records at every batch-size change and every
``log_every`` steps, test records at every evaluation), ``metrics.json`` (the summary returned by
:func:`train_run`) and ``checkpoints/``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prox import checkpoint as ckpt_lib
from prox import models
from prox import optim
from prox import step as step_lib
from prox.experiments import train
from prox.experiments import writers
from prox.tasks import data as data_lib

PyTree = Any

SCHEDULES = ("constant", "stagewise", "ramp")
TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")
METHODS = SCHEDULES + TESTS
_GROUP_TESTS = ("inner_product", "orthogonality", "augmented")

# Fields that define a run's trajectory: a checkpoint made under other values is not resumed.
# (budget_samples is not one of them: a finished run can be extended.)
_TRAJECTORY_FIELDS = (
    "seed", "dataset", "augment", "max_shift", "max_rotation", "scale_low", "scale_high", "noise_std",
    "model", "model_kwargs", "optimizer", "learning_rate", "optimizer_kwargs", "method", "b0", "b_max",
    "micro_batch_size", "eta", "theta", "nu", "per_tensor", "stage_samples", "ramp_increment")


def run_config() -> ml_collections.ConfigDict:
  """The defaults of one adaptive-batch run (the ``adadagrad`` sweep overrides them per run)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = "digits"
  c.data_dir = ""
  # The augmented stream (seeded shifts, rotations, scaling, pixel noise; data_lib.next_stream_batch)
  # or, with augment=False, epochs of the plain training split (data_lib.next_batch).
  c.augment = True
  c.max_shift = 1.0
  c.max_rotation = 10.0
  c.scale_low = 0.9
  c.scale_high = 1.1
  c.noise_std = 0.1
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": ()})   # hidden=(): logistic regression
  c.optimizer = "adagrad_norm"
  c.learning_rate = 1.0
  c.optimizer_kwargs = ml_collections.ConfigDict()
  # Batch size: method in METHODS; b0 is the initial (constant: the only) batch size.
  c.method = "norm"
  c.b0 = 32
  c.b_max = 4096
  c.micro_batch_size = 4            # per device; the test's groups: b / (micro_batch_size x devices)
  c.eta = 0.1                       # norm and coordinate-wise tests
  c.theta = 0.1                     # inner-product test
  c.nu = 0.1                        # orthogonality test
  c.per_tensor = False              # reference code's per-tensor inner products
  c.stage_samples = 7_500           # stagewise: double the batch size every this many samples
  c.ramp_increment = 280            # ramp: b_k = b0 + ramp_increment * k
  c.budget_samples = 60_000         # the run stops before a step would exceed this many samples
  c.eval_every_samples = 2048       # evaluate when samples seen cross a multiple of this,
  c.evals_per_decade = 20           # at a geometric grid of steps (1, 2, ..., ~12% apart), and last
  c.eval_batch_size = 512
  c.log_every = 100
  c.checkpoint_every = 200
  c.keep_checkpoints = 1
  c.tensorboard = False
  return c


# --- checks before anything compiles ---------------------------------------------------------------

def _positive_int(config: ml_collections.ConfigDict, name: str) -> int:
  value = config[name]
  train.require(isinstance(value, int) and not isinstance(value, bool) and value > 0,  # pylint: disable=protected-access
                 f"{name} must be a positive integer, got {value!r}")
  return value


def has_adagrad_accumulator(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.optimizer`` keeps AdaGrad's per-coordinate accumulator (for ``coordinate``)."""
  tx = train.build_optimizer(_optimizer_config(config))
  try:
    optim.adagrad_accumulator(jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}))
  except ValueError:
    return False
  return True


def validate_run(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Checks every value of one run; raises ``train.ConfigError`` naming the first bad one."""
  req = train.require
  req(config.dataset in data_lib.DATASETS,
      f"unknown dataset {config.dataset!r}; known: {', '.join(data_lib.DATASETS)}")
  req(config.model in models.MODELS, f"unknown model {config.model!r}; known: {', '.join(models.MODELS)}")
  req(config.optimizer in train.OPTIMIZERS,
      f"unknown optimizer {config.optimizer!r}; known: {', '.join(sorted(train.OPTIMIZERS))}")
  req(config.method in METHODS, f"unknown method {config.method!r}; known: {', '.join(METHODS)}")
  req(np.isfinite(config.learning_rate) and config.learning_rate > 0,
      f"learning_rate must be positive, got {config.learning_rate}")
  for name in ("eta", "theta", "nu"):
    value = config[name]
    req(isinstance(value, (int, float)) and np.isfinite(value) and value > 0,
        f"{name} must be > 0, got {value!r}")
  for name in ("b0", "b_max", "micro_batch_size", "stage_samples", "ramp_increment", "budget_samples",
               "eval_every_samples", "evals_per_decade", "eval_batch_size", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    _positive_int(config, name)
  devices = jax.device_count()
  multiple = config.micro_batch_size * devices
  req(config.b0 <= config.b_max, f"b0={config.b0} is larger than b_max={config.b_max}")
  req(config.b0 % multiple == 0,
      f"micro_batch_size {config.micro_batch_size} x {devices} device(s) does not divide b0={config.b0}")
  req(config.b_max >= multiple, f"b_max={config.b_max} is smaller than micro_batch_size x devices = {multiple}")
  if config.method == "ramp":
    req(config.ramp_increment % multiple == 0,
        f"ramp_increment {config.ramp_increment} is not a multiple of micro_batch_size x devices = {multiple}")
  req(config.budget_samples >= config.b0,
      f"budget_samples={config.budget_samples} is smaller than b0={config.b0}: not one step")
  req(config.eval_batch_size % devices == 0,
      f"eval_batch_size {config.eval_batch_size} is not divisible by the device count {devices}")
  if config.augment:
    for name in ("max_shift", "max_rotation", "noise_std"):
      req(np.isfinite(config[name]) and config[name] >= 0, f"{name} must be >= 0, got {config[name]!r}")
    req(0 < config.scale_low <= config.scale_high,
        f"scale_low, scale_high must satisfy 0 < low <= high, got {config.scale_low}, {config.scale_high}")
  try:
    optim.batch_size_init(config.b0, config.b_max, multiple_of=multiple)
    _baseline_schedule(config, multiple)
  except (TypeError, ValueError) as e:
    raise train.ConfigError(str(e)) from None
  try:
    train.build_optimizer(_optimizer_config(config))
  except TypeError as e:
    raise train.ConfigError(f"optimizer {config.optimizer!r} rejects optimizer_kwargs "
                            f"{dict(config.optimizer_kwargs)}: {e}") from None
  try:
    models.make_model(config.model, input_shape=(8, 8, 1), num_classes=10, **dict(config.model_kwargs))
  except (TypeError, ValueError) as e:
    raise train.ConfigError(f"model {config.model!r}: {e}") from None
  if config.method == "coordinate":
    req(has_adagrad_accumulator(config),
        f"method 'coordinate' needs an optimizer with AdaGrad's per-coordinate accumulator "
        f"(optax.scale_by_rss, e.g. 'adagrad'); {config.optimizer!r} has none")
  if workdir is not None:
    train.check_workdir(workdir)


def _optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields ``train.build_optimizer`` reads: a constant learning rate, no clipping."""
  return ml_collections.ConfigDict(dict(
      optimizer=config.optimizer, learning_rate=config.learning_rate, schedule="constant",
      grad_clip_norm=0.0, optimizer_kwargs=dict(config.optimizer_kwargs), num_steps=1, warmup_steps=0))


# --- batch-size policies ---------------------------------------------------------------------------

class AdaptiveBatchState(NamedTuple):
  """``TrainState.extra`` of a run with a test.

  Attributes:
    controller: the controller state (``prox.optim.BatchSizeState``).
    hyperparams: the test constants ``{"eta", "theta", "nu"}`` as float32 scalars; traced, like
      ``optax.inject_hyperparams``, so runs that differ only in them share compiled steps.
  """
  controller: optim.BatchSizeState
  hyperparams: dict[str, jax.Array]


def requested_batch_size(method: str, info: step_lib.StepInfo, hyperparams: dict[str, jax.Array], *,
                         per_tensor: bool = False, adagrad_eps: float = 1e-7) -> jax.Array:
  """``b'``: the batch size a test asks for, from the step's statistics (cheap estimators).

  ``coordinate`` weighs coordinates by AdaGrad's step ``1 / sqrt(a_j + eps)`` with the accumulator
  ``a`` of the optimizer state the step started from (``info.opt_state``).
  """
  stats, inner = info.grad_stats, info.group_stats
  eta, theta, nu = hyperparams["eta"], hyperparams["theta"], hyperparams["nu"]
  if method == "norm":
    return optim.norm_test_from_stats(stats, eta)
  if method == "inner_product":
    return optim.inner_product_test_from_stats(stats, inner, theta, per_tensor=per_tensor)
  if method == "orthogonality":
    return optim.orthogonality_test_from_stats(stats, inner, nu, per_tensor=per_tensor)
  if method == "augmented":
    return optim.augmented_inner_product_test_from_stats(stats, inner, theta, nu, per_tensor=per_tensor)
  if method == "coordinate":
    step_size = optim.adagrad_step_size(info.opt_state, eps=adagrad_eps)
    return optim.coordinate_wise_test_from_stats(stats, step_size, eta)
  raise ValueError(f"{method!r} is not a test; tests: {', '.join(TESTS)}")


@dataclasses.dataclass(frozen=True)
class Policy:
  """How a run picks its batch sizes.

  method: one of ``METHODS``.
  multiple_of: ``r`` = micro-batch x devices; every batch size is a multiple of it.
  schedule: baselines: ``step -> batch size`` on the host; ``None`` for tests.
  extra_init / extra_update / grad_stats / group_stats_fn: what ``make_train_step`` composes.
  structure: what decides the compiled step (a key for sharing compiled steps between runs).
  """
  method: str
  multiple_of: int
  schedule: Callable[[int], int] | None
  extra_init: Callable[[], PyTree]
  extra_update: Callable[[PyTree, step_lib.StepInfo], PyTree] | None
  grad_stats: bool
  group_stats_fn: Callable | None
  structure: tuple

  def batch_size(self, state: step_lib.TrainState, step: int) -> int:
    """The batch size of step ``step`` (0-based): the baseline's schedule, or read from the controller."""
    if self.schedule is not None:
      return self.schedule(step)
    return int(jax.device_get(state.extra.controller.batch_size))


def _baseline_schedule(config: ml_collections.ConfigDict, multiple: int) -> Callable[[int], int] | None:
  """The host-side schedule ``step -> batch size`` of a baseline (``None`` for tests)."""
  if config.method == "constant":
    schedule = optim.constant_batch_size(config.b0)
  elif config.method == "ramp":
    schedule = optim.linear_ramp_up(config.b0, config.b_max, increment=config.ramp_increment,
                                    multiple_of=multiple)
  elif config.method == "stagewise":
    schedule = optim.stagewise_doubling(config.b0, config.b_max, multiple_of=multiple,
                                        milestones=_stage_milestones(config, multiple))
  else:
    return None
  return lambda step: int(schedule(step))


def _stage_milestones(config: ml_collections.ConfigDict, multiple: int) -> list[int]:
  """Steps at which the batch size doubles so that it doubles every ``stage_samples`` samples.

  The reference code counts stages in samples seen; ``optim.stagewise_doubling`` takes steps, so the
  sample milestones ``s * stage_samples`` are converted with the schedule's own batch sizes.
  """
  cap = config.b_max // multiple * multiple
  milestones, b, samples, step = [], config.b0, 0, 0
  while b < cap:
    target = (len(milestones) + 1) * config.stage_samples
    num = max(1, -(-(target - samples) // b))
    step, samples = step + num, samples + num * b
    milestones.append(step)
    b = min(2 * b, cap)
  return milestones or [1]


def make_policy(config: ml_collections.ConfigDict) -> Policy:
  """The batch-size policy of ``config.method`` (see :data:`METHODS`)."""
  multiple = config.micro_batch_size * jax.device_count()
  schedule = _baseline_schedule(config, multiple)
  if schedule is not None:
    return Policy(config.method, multiple, schedule, extra_init=lambda: (), extra_update=None,
                  grad_stats=False, group_stats_fn=None, structure=("plain",))
  method, per_tensor = config.method, bool(config.per_tensor)
  adagrad_eps = float(dict(config.optimizer_kwargs).get("eps", 1e-7))

  def extra_init():
    return AdaptiveBatchState(
        controller=optim.batch_size_init(config.b0, config.b_max, multiple_of=multiple),
        hyperparams={k: jnp.asarray(config[k], jnp.float32) for k in ("eta", "theta", "nu")})

  def extra_update(extra: AdaptiveBatchState, info: step_lib.StepInfo) -> AdaptiveBatchState:
    wanted = requested_batch_size(method, info, extra.hyperparams, per_tensor=per_tensor,
                                  adagrad_eps=adagrad_eps)
    return extra._replace(controller=optim.batch_size_update(extra.controller, wanted))

  group_stats_fn = None
  if method in _GROUP_TESTS:
    group_stats_fn = lambda g, v, m: optim.group_inner_stats(g, m, valid=v, per_tensor=per_tensor)
  return Policy(method, multiple, None, extra_init=extra_init, extra_update=extra_update,
                grad_stats=True, group_stats_fn=group_stats_fn,
                structure=(method, per_tensor, adagrad_eps if method == "coordinate" else None))


# --- compiled steps, shared between runs -----------------------------------------------------------

@dataclasses.dataclass
class CompiledSteps:
  """A jitted train step, its executables per bucket (micro-batches per device), and the eval step."""
  train_step: Callable
  eval_step: Callable
  executables: dict[int, Any] = dataclasses.field(default_factory=dict)


StepCache = dict[str, CompiledSteps]


def _structure_key(config: ml_collections.ConfigDict, policy: Policy, input_shape, num_classes) -> str:
  fields = {k: _plain(config[k]) for k in ("model", "model_kwargs", "optimizer", "learning_rate",
                                             "optimizer_kwargs", "micro_batch_size")}
  return json.dumps([fields, list(map(str, policy.structure)), list(input_shape), num_classes,
                     jax.device_count()], sort_keys=True)


def _plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


# --- data -------------------------------------------------------------------------------------------

def _data_init(config: ml_collections.ConfigDict) -> Any:
  return data_lib.stream_init(config.seed) if config.augment else data_lib.loader_init(config.seed)


def _data_to_dict(config, state) -> dict:
  return data_lib.stream_state_to_dict(state) if config.augment else data_lib.loader_state_to_dict(state)


def _data_from_dict(config, data: dict) -> Any:
  return (data_lib.stream_state_from_dict(data) if config.augment
          else data_lib.loader_state_from_dict(data))


def draw(config: ml_collections.ConfigDict, ds: data_lib.ArrayDataset, state: Any,
         batch_size: int) -> tuple[dict[str, np.ndarray], Any]:
  """Exactly ``batch_size`` samples (this process's shard) from the stream or the epoch loader."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if config.augment:
    return data_lib.next_stream_batch(
        ds, state, batch_size, max_shift=config.max_shift, max_rotation=config.max_rotation,
        scale_range=(config.scale_low, config.scale_high), noise_std=config.noise_std, **process)
  return data_lib.next_batch(ds, state, batch_size, **process)


def warm_up_stream(config: ml_collections.ConfigDict, ds: data_lib.ArrayDataset) -> None:
  """Compiles the stream's augmentation for every power-of-two bucket up to ``b_max`` (from a
  scratch stream), so that no run's training time includes it."""
  if not config.augment:
    return
  local_max = -(-config.b_max // jax.process_count())
  size = 16
  while True:
    draw(config, ds, data_lib.stream_init(config.seed), min(size, local_max) * jax.process_count())
    if size >= local_max:
      return
    size *= 2


# --- one run ----------------------------------------------------------------------------------------

class Setup(NamedTuple):
  """Everything a run builds before its first step."""
  mesh: jax.sharding.Mesh
  policy: Policy
  steps: CompiledSteps
  state: step_lib.TrainState        # the initial state, replicated over the mesh


def build(config: ml_collections.ConfigDict, train_ds: data_lib.ArrayDataset,
          cache: StepCache | None = None) -> Setup:
  """Model, optimizer, policy, initial ``TrainState`` and the (possibly shared) compiled steps."""
  mesh = step_lib.data_mesh()
  input_shape, num_classes = train_ds.images.shape[1:], train_ds.num_classes
  model = models.make_model(config.model, input_shape=input_shape, num_classes=num_classes,
                            seed=config.seed, **dict(config.model_kwargs))
  net = models.functional(model)
  tx = train.build_optimizer(_optimizer_config(config))
  policy = make_policy(config)
  params = jax.device_get(net.params)
  state = step_lib.TrainState(
      step=np.int32(0), params=params, opt_state=jax.device_get(tx.init(params)),
      model_state=jax.device_get(net.model_state), extra=jax.device_get(policy.extra_init()),
      rng=np.asarray(jax.random.key_data(jax.random.key(config.seed))))
  state = step_lib.replicate(state, mesh)
  key = _structure_key(config, policy, input_shape, num_classes)
  cache = {} if cache is None else cache
  if key not in cache:
    cache[key] = CompiledSteps(
        train_step=step_lib.make_train_step(
            train.classification_loss(net.apply), tx, mesh=mesh,
            micro_batch_size=config.micro_batch_size, grad_stats=policy.grad_stats,
            group_stats_fn=policy.group_stats_fn, extra_update=policy.extra_update),
        eval_step=step_lib.make_eval_step(train.classification_eval(net.apply), mesh=mesh))
  return Setup(mesh=mesh, policy=policy, steps=cache[key], state=state)


def _fingerprint(config: ml_collections.ConfigDict) -> dict:
  return {k: _plain(config[k]) for k in _TRAJECTORY_FIELDS}


def train_run(config: ml_collections.ConfigDict, workdir: str, *, cache: StepCache | None = None,
              datasets: tuple[data_lib.ArrayDataset, data_lib.ArrayDataset] | None = None) -> dict:
  """Trains one run (resuming from ``workdir/checkpoints``) and returns its summary (:func:`summarize`).

  Args:
    config: a :func:`run_config`-shaped config.
    workdir: the run's directory.
    cache: compiled steps shared with other runs (filled as buckets are compiled).
    datasets: the ``(train, test)`` splits, if already loaded.
  """
  validate_run(config, workdir)
  train_ds, test_ds = datasets if datasets is not None else train.load_splits(config)
  setup = build(config, train_ds, cache)
  mesh, policy, steps = setup.mesh, setup.policy, setup.steps
  state = setup.state
  local_devices = len(mesh.local_devices)
  micro = config.micro_batch_size

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints,
                                       save_interval_steps=config.checkpoint_every)
  data_state, samples, train_seconds, compile_seconds = _data_init(config), 0, 0.0, 0.0
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    if meta["config"] != _fingerprint(config):
      changed = sorted(k for k in meta["config"] if meta["config"][k] != _fingerprint(config).get(k))
      checkpointer.close()
      raise train.ConfigError(f"{workdir} holds a run with other {', '.join(changed)}; "
                              f"use a new --workdir")
    data_state = _data_from_dict(config, meta["data"])
    samples, train_seconds = int(meta["samples"]), float(meta["train_seconds"])
    compile_seconds = float(meta["compile_seconds"])

  warm_up_stream(config, train_ds)
  writer = writers.MetricWriter(workdir, total_steps=0, tensorboard=config.tensorboard, progress=False)
  step = int(jax.device_get(state.step))
  batch_size = policy.batch_size(state, step)
  prev_batch_size = None
  while samples + batch_size <= config.budget_samples:
    started = time.perf_counter()
    local, data_state = draw(config, train_ds, data_state, batch_size)
    buckets = optim.bucket(batch_size, policy.multiple_of)
    packed = step_lib.pack_micro_batches(local, num_devices=local_devices, micro_batch_size=micro,
                                         max_micro_batches=buckets)
    batch = step_lib.shard_batch(packed, mesh)
    num_micro = np.int32(batch_size // policy.multiple_of)
    compiled_now = 0.0
    if buckets not in steps.executables:
      t0 = time.perf_counter()
      steps.executables[buckets] = steps.train_step.lower(state, batch, num_micro).compile()
      compiled_now = time.perf_counter() - t0
    state, out = steps.executables[buckets](state, batch, num_micro)
    step, samples = step + 1, samples + batch_size
    next_batch_size = policy.batch_size(state, step)   # the one host read of the step
    train_seconds += time.perf_counter() - started - compiled_now
    compile_seconds += compiled_now
    last = samples + next_batch_size > config.budget_samples

    if batch_size != prev_batch_size or step % config.log_every == 0 or last:
      record = {k: float(v) for k, v in jax.device_get(out.metrics).items()}
      record.update(batch_size=batch_size, samples=samples)
      if policy.schedule is None:
        record["requested"] = float(jax.device_get(state.extra.controller.requested))
      writer.write(step, record)
    if last or _eval_due(step, samples, batch_size, config):
      test = train.evaluate(steps.eval_step, state, test_ds, config.eval_batch_size, mesh)
      writer.write(step, {**test, "samples": samples, "train_seconds": train_seconds,
                          "batch_size": batch_size}, split="test")
    meta = {"data": _data_to_dict(config, data_state), "samples": samples,
            "train_seconds": train_seconds, "compile_seconds": compile_seconds,
            "config": _fingerprint(config)}
    checkpointer.save(step, state, meta, force=last)
    prev_batch_size, batch_size = batch_size, next_batch_size
  checkpointer.close()
  writer.close()
  summary = summarize(os.path.join(workdir, "metrics.jsonl"), targets=(0.95, 0.97))
  summary.update(step=step, samples=samples, train_seconds=train_seconds,
                 compile_seconds=compile_seconds, next_batch_size=batch_size,
                 params_checksum=_checksum(state.params))
  if jax.process_index() == 0:
    writers.write_summary(workdir, summary)
  return summary


def _eval_due(step: int, samples: int, batch_size: int, config: ml_collections.ConfigDict) -> bool:
  """Evaluate when samples seen cross a multiple of ``eval_every_samples`` or ``step`` is on the
  geometric grid ``{k : floor(P log10 k) > floor(P log10 (k - 1))}``, ``P = evals_per_decade``."""
  every = config.eval_every_samples
  if samples // every > (samples - batch_size) // every:
    return True
  grid = lambda k: np.floor(config.evals_per_decade * np.log10(k) + 1e-9) if k > 0 else -np.inf
  return bool(grid(step) > grid(step - 1))


def _checksum(params: PyTree) -> float:
  """A float64 sum of |params| (to compare runs at a glance; tests compare the arrays themselves)."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(jax.device_get(params))))


# --- summaries ---------------------------------------------------------------------------------------

def _latest_by_step(records: list[dict], split: str) -> list[dict]:
  """The records of one split, one per step (a resumed run rewrites steps: the later record wins)."""
  by_step = {}
  for r in records:
    if r["split"] == split:
      by_step[r["step"]] = r
  return [by_step[s] for s in sorted(by_step)]


def first_reaching(evals: list[dict], accuracy: float) -> dict | None:
  """The first evaluation with test accuracy ``>= accuracy`` (``None`` if none)."""
  for r in evals:
    if r["accuracy"] >= accuracy - 1e-12:
      return r
  return None


def summarize(jsonl_path: str, targets: tuple[float, ...] = (0.95, 0.97)) -> dict:
  """A run's summary from its ``metrics.jsonl``: final test accuracy, curves, steps to targets."""
  records = writers.read_metrics(jsonl_path)
  evals = _latest_by_step(records, "test")
  trains = []   # the batch size's change points (a resumed run logs its first step again)
  for r in _latest_by_step(records, "train"):
    if not trains or r["batch_size"] != trains[-1]["batch_size"]:
      trains.append(r)
  summary = {
      "final_accuracy": evals[-1]["accuracy"] if evals else float("nan"),
      "evals": {k: [r[k] for r in evals] for k in ("step", "samples", "accuracy", "train_seconds")},
      "batch_sizes": {k: [r[k] for r in trains] for k in ("step", "batch_size")},   # change points
  }
  for target in targets:
    hit = first_reaching(evals, target)
    name = f"{round(100 * target)}"
    summary[f"steps_to_{name}"] = hit["step"] if hit else None
    summary[f"samples_to_{name}"] = hit["samples"] if hit else None
  return summary
