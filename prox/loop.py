"""The one host loop: batches in, the compiled step, periodic actions, checkpoints, one resume path.

Every prox training run, from a laptop to a pod, is this loop::

    while the budget (steps or samples) allows the next batch:
      b     = batch_size(state)                      # fixed, or read from a controller in the state
      batch = source.next(b, ctx)                         # this process's rows, step metadata, boundary
      state, out = step(state, shard(pack(batch)))   # the compiled step (compiled once per bucket)
      run the actions that are due (boundaries first, then by steps / samples): log, evaluate, rare
        jitted transitions (a teacher's refit), checkpoint, profile, ...

Actions are plain host functions of a :class:`Context`; one that returns a ``TrainState`` replaces the
state (a consolidation at the end of a task, an ALP-GMM refit run as its own jitted function instead of
being compiled into every batch-size bucket). When an action runs is an :class:`Every`: every N steps,
every N samples, at a source's boundary (``"task"``, ``"epoch"``), at the start or at the end.

Resume. Checkpoints hold the ``TrainState`` and a JSON ``meta``: the source's position
(``source.get_state()``), the loop's counters and timers and the run's ``record`` (a JSON dict actions
may extend, e.g. an accuracy matrix). A new ``run`` on the same directory restores the newest checkpoint
that restores (falling back past damaged ones), so a killed run started again continues exactly where an
uninterrupted one would. A checkpoint is only written for a finite state.

Divergence. The step reports whether it was finite (``StepOutput.finite``). With
``on_nonfinite="stop"`` (default) the loop raises :class:`Diverged` (one line: the step and what is not
finite) after its last (finite) checkpoint is committed; with ``"skip"`` (for a step built with
``skip_nonfinite=True``) it counts the skipped steps in ``LoopResult.nonfinite_steps``. Finiteness is read
one step late (no host sync in the hot loop) and always before a checkpoint or an action.

The loop knows no method, experiment or config, and writes nothing but checkpoints: logging and
evaluation are actions the caller passes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Protocol

import jax
import numpy as np

from prox import checkpoint as ckpt_lib
from prox import step as step_lib
from prox.tasks._sources import Batch  # the one definition; re-exported here

__all__ = ["Source", "Batch", "Action", "Every", "Context", "Diverged", "LoopResult", "CompileCache", "run"]

PyTree = Any


class Source(Protocol):
  """A host-side batch source with a checkpointable position (like a grain iterator)."""

  def next(self, batch_size: int, context: Context | None = None) -> Batch | None:
    """The next batch of ``batch_size`` global examples (this process's rows); ``None`` ends the run.
    ``context`` is the loop's :class:`Context` (the state after the previous step)."""

  def get_state(self) -> dict:
    """The position as a JSON dict."""

  def set_state(self, state: dict) -> None:
    """Restores a position from ``get_state``."""


@dataclasses.dataclass(frozen=True)
class Every:
  """When an action runs. Any condition that holds triggers it (once per step).

  Attributes:
    steps: after every step that is a multiple of ``steps``.
    samples: after a step whose samples seen cross a multiple of ``samples``.
    boundary: after a step whose batch ends this boundary (a name, or a tuple of names).
    at: after the steps in this collection (e.g. step 1, or a geometric grid).
    start: once before the first step of a fresh run (not on resume).
    end: after the last step (also when a resumed run had nothing left to do).
  """
  steps: int | None = None
  samples: int | None = None
  boundary: str | tuple[str, ...] | None = None
  at: frozenset[int] = frozenset()
  start: bool = False
  end: bool = False

  def __post_init__(self):
    object.__setattr__(self, "at", frozenset(int(s) for s in self.at))
    for name in ("steps", "samples"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                or value < 1):
        raise ValueError(f"Every({name}=...) must be a positive int or None, got {value!r}")

  def due(self, step: int, samples: int, prev_samples: int, boundary: str | None) -> bool:
    """Whether the action runs after a step (``end`` and ``start`` are handled by the loop)."""
    if self.steps and step % self.steps == 0:
      return True
    if step in self.at:
      return True
    if self.samples and samples // self.samples > prev_samples // self.samples:
      return True
    if boundary is not None and self.boundary is not None:
      names = (self.boundary,) if isinstance(self.boundary, str) else self.boundary
      if boundary in names:
        return True
    return False


@dataclasses.dataclass
class Context:
  """What an action sees. ``state`` is the current state (after the step); ``out`` the step's output
  (``None`` at the start, or at the end of a resumed run that had nothing left to do)."""
  state: step_lib.TrainState
  out: step_lib.StepOutput | None
  step: int
  samples: int
  batch_size: int
  boundary: str | None
  record: dict                   # JSON, checkpointed: what the run accumulates for its results
  train_seconds: float           # training time over all segments of the run, compiles excluded
  stop_requested: bool = False

  def stop(self) -> None:
    """Ends the run after this step's actions (e.g. an early-stopping rule)."""
    self.stop_requested = True


Action = Callable[[Context], "step_lib.TrainState | None"]


class Diverged(RuntimeError):
  """The run produced a non-finite loss, gradient or parameters; the message is one line."""


class LoopResult(NamedTuple):
  state: step_lib.TrainState
  record: dict
  steps_this_run: int
  train_seconds: float           # all segments, compiles excluded
  train_seconds_this_run: float
  compile_seconds: float         # this segment
  compiles: int                  # this segment: executables built (one per batch-buffer shape)
  nonfinite_steps: int           # all segments (``on_nonfinite="skip"``)
  resumed_from: int | None


@dataclasses.dataclass
class CompileCache:
  """Compiled executables of one jitted step by batch-buffer shape; sweeps pass one to several runs."""
  executables: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0
  count: int = 0

  def get(self, step: Callable, state, batch, num_micro, meta):
    key = (id(step), jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)),
           num_micro is None, jax.tree.structure(meta))
    exe = self.executables.get(key)
    if exe is None:
      t0 = time.perf_counter()
      exe = step.lower(state, batch, num_micro, meta).compile()
      self.seconds += time.perf_counter() - t0
      self.count += 1
      self.executables[key] = exe
    return exe


def _bucket(n: int) -> int:
  return 1 << (n - 1).bit_length()


def run(
    step: Callable,
    state: step_lib.TrainState,
    source: Source,
    *,
    mesh: jax.sharding.Mesh,
    batch_size: int | Callable[[Context], int],
    num_steps: int | None = None,
    num_samples: int | None = None,
    micro_batch_size: int | None = None,
    actions: tuple[tuple[Every, Action], ...] = (),
    checkpoint_dir: str | None = None,
    checkpoint: Every | None = None,
    keep_checkpoints: int = 2,
    record: dict | None = None,
    on_nonfinite: str = "stop",
    compile_cache: CompileCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoopResult:
  """Trains ``state`` with ``step`` on batches of ``source`` until the budget is used.

  Args:
    step: a step from ``prox.step.make_train_step`` (jitted; called as ``step(state, batch, n, meta)``).
    state: the initial ``TrainState``, placed on ``mesh`` (also the restore target on resume).
    source: the batch source (see :class:`Source`).
    mesh: the step's mesh; batches are built with ``prox.step.shard_batch``.
    batch_size: the global batch size, or ``context -> int`` asked once per step: a schedule of
      ``context.step`` / ``context.samples``, or a controller in ``context.state.extra`` (read on the
      host: one device-to-host transfer per step).
    num_steps, num_samples: the budget; the run stops before a step would exceed either (at least one
      is required). Both count from the start of the run, over all resumed segments.
    micro_batch_size: with a variable ``batch_size``: examples per micro-batch per device; each batch is
      packed into a buffer of the next power of two of micro-batches (``pack_micro_batches``) and the
      real count passed to the step, so the step compiles once per power of two. The step must be built
      with the same ``micro_batch_size`` (checked). ``None``: batches go to
      the step as they are (one compile per distinct batch size).
    actions: ``(Every, action)`` pairs, run in order after each step they are due at.
    checkpoint_dir: where checkpoints go (``None``: no checkpoints, no resume).
    checkpoint: when to checkpoint (default: only at the end); the end is always checkpointed.
    keep_checkpoints: newest checkpoints kept.
    record: the initial record (a JSON dict) of a fresh run; a resumed run gets its checkpointed one.
    on_nonfinite: ``"stop"`` (raise :class:`Diverged`) or ``"skip"`` (count; for a step with
      ``skip_nonfinite=True``).
    compile_cache: executables shared with other runs of the same step (default: a fresh cache).
    progress: ``(step, batch_size) -> None`` called after every step (a progress bar); it sees no
      state, so it never waits for the device.

  Returns:
    A :class:`LoopResult`.
  """
  built = getattr(step, "micro_batch_size", micro_batch_size)
  if micro_batch_size is not None and built != micro_batch_size:
    raise ValueError(f"loop.run(micro_batch_size={micro_batch_size}) packs micro-batches of "
                     f"{micro_batch_size} examples per device, but the step was built with "
                     f"micro_batch_size={built}: pass the same value to make_train_step")
  if num_steps is None and num_samples is None:
    raise ValueError("run needs a budget: num_steps or num_samples")
  if on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
  cache = compile_cache if compile_cache is not None else CompileCache()
  compiles0, compile_seconds0 = cache.count, cache.seconds
  num_devices = mesh.size                   # the batch is split over every device of the mesh
  local_devices = num_devices // jax.process_count()
  checkpoint = checkpoint or Every(end=True)
  ckpt = (ckpt_lib.Checkpointer(checkpoint_dir, max_to_keep=keep_checkpoints)
          if checkpoint_dir is not None else None)
  record = {} if record is None else record
  train_seconds, nonfinite, resumed_from = 0.0, 0, None
  if ckpt is not None:
    try:
      restored = ckpt.restore_latest(state)
    except BaseException:
      ckpt.close()
      raise
    if restored is not None:
      state, meta, resumed_from = restored
      source.set_state(meta["source"])
      record = meta["record"]
      train_seconds, nonfinite = float(meta["train_seconds"]), int(meta["nonfinite_steps"])
  step_count = int(jax.device_get(state.step))
  samples = int(jax.device_get(state.samples))
  started_seconds = train_seconds
  ctx = Context(state=state, out=None, step=step_count, samples=samples, batch_size=0, boundary=None,
                record=record, train_seconds=train_seconds)
  fired_at = [-1] * len(actions)
  saved_at = resumed_from

  def next_size() -> int:
    return int(batch_size(ctx)) if callable(batch_size) else int(batch_size)

  def check(out: step_lib.StepOutput | None, at_step: int) -> None:
    """Raises Diverged (or counts) for a non-finite step; reads ``out.finite`` (a host sync)."""
    nonlocal nonfinite
    if out is None or bool(jax.device_get(out.finite)):
      return
    if on_nonfinite == "skip":
      nonfinite += 1
      return
    loss = float(jax.device_get(out.metrics["loss"]))
    last = ckpt.latest_step() if ckpt is not None else None
    raise Diverged(f"step {at_step} is not finite (loss {loss:g}); the run stops"
                   + (f"; its last finite checkpoint is step {last} in {ckpt.directory}"
                      if last is not None else "; no checkpoint was written"))

  def fire(index: int, action: Action) -> None:
    fired_at[index] = ctx.step
    new = action(ctx)
    if new is not None:
      ctx.state = new

  def save() -> None:
    nonlocal saved_at
    meta = {"source": source.get_state(), "record": ctx.record, "train_seconds": ctx.train_seconds,
            "nonfinite_steps": nonfinite}
    ckpt.save(ctx.step, ctx.state, meta, force=True)
    saved_at = ctx.step

  steps_this_run = 0
  try:
    if resumed_from is None and step_count == 0:
      for i, (when, action) in enumerate(actions):
        if when.start:
          fire(i, action)
    pending = None                 # (output, step) whose finiteness is not read yet
    while not ctx.stop_requested:
      b = next_size()
      if b < 1:
        raise ValueError(f"batch size {b} at step {ctx.step}: it must be positive")
      if (num_steps is not None and ctx.step >= num_steps) or (
          num_samples is not None and ctx.samples + b > num_samples):
        break
      started = time.perf_counter()
      batch = source.next(b, ctx)
      if batch is None:
        break
      data, num_micro = batch.data, None
      if micro_batch_size is not None:
        per_round = micro_batch_size * num_devices
        if b % per_round:
          raise ValueError(f"batch size {b} is not a multiple of micro_batch_size x devices = {per_round}")
        data = step_lib.pack_micro_batches(data, num_devices=local_devices, micro_batch_size=micro_batch_size,
                                           max_micro_batches=_bucket(b // per_round))
        num_micro = np.int32(b // per_round)
      global_batch = step_lib.shard_batch(data, mesh)
      compile_before = cache.seconds
      exe = cache.get(step, ctx.state, global_batch, num_micro, batch.meta)
      new_state, out = exe(ctx.state, global_batch, num_micro, batch.meta)
      if pending is not None:
        check(*pending)            # the previous step's finiteness, read while this one runs
      prev_samples = ctx.samples
      ctx.state, ctx.out, ctx.step, ctx.samples = new_state, out, ctx.step + 1, ctx.samples + b
      ctx.batch_size, ctx.boundary = b, batch.boundary
      steps_this_run += 1
      pending = (out, ctx.step)
      due = [when.due(ctx.step, ctx.samples, prev_samples, batch.boundary) for when, _ in actions]
      save_now = ckpt is not None and checkpoint.due(ctx.step, ctx.samples, prev_samples, batch.boundary)
      if any(due) or save_now:
        check(out, ctx.step)       # actions and checkpoints only ever see finite states
        pending = None
      train_seconds += time.perf_counter() - started - (cache.seconds - compile_before)
      ctx.train_seconds = train_seconds
      if progress is not None:
        progress(ctx.step, b)
      for i, ((_, action), now) in enumerate(zip(actions, due)):
        if now:
          fire(i, action)
      if save_now:
        save()
    if pending is not None:
      check(*pending)
    ctx.boundary = None
    for i, (when, action) in enumerate(actions):
      if when.end and fired_at[i] != ctx.step:
        fire(i, action)
    if ckpt is not None and saved_at != ctx.step:
      save()
  finally:
    if ckpt is not None:
      ckpt.close()
  return LoopResult(state=ctx.state, record=ctx.record, steps_this_run=steps_this_run,
                    train_seconds=train_seconds, train_seconds_this_run=train_seconds - started_seconds,
                    compile_seconds=cache.seconds - compile_seconds0, compiles=cache.count - compiles0,
                    nonfinite_steps=nonfinite, resumed_from=resumed_from)
