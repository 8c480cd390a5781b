"""Checkpoints of a whole ``TrainState`` plus a JSON ``meta`` dict, on orbax-checkpoint.

``Checkpointer`` wraps one ``orbax.checkpoint.CheckpointManager`` whose steps hold two items:
``state`` (the ``TrainState`` pytree, written with ``StandardSave``: tensorstore/OCDBT arrays) and
``meta`` (a JSON dict: loader position, batch size, config; written with ``JsonSave``)::

  workdir/checkpoints/
    100/state/...  100/meta  100/_CHECKPOINT_METADATA
    200/...

Crash safety (the orbax guarantee relied on): a step is written into ``<step>.orbax-checkpoint-tmp-*``
and made visible only when complete. On a local or POSIX file system the finished directory is
renamed atomically to ``<step>``; on object stores without atomic rename (``gs://``) orbax writes
``commit_success.txt`` last and lists only steps that have it. ``latest_step()`` of a new
``Checkpointer`` therefore never returns a step whose save was killed half-way; left-over tmp
directories are deleted when the next ``Checkpointer`` opens the directory (tested by SIGKILLing a
process in the middle of a save, ``tests/test_checkpoint.py``).

Damaged checkpoints. ``restore_latest`` tries the kept steps newest first. A step whose files are
damaged (an empty step directory, a missing item, a metadata file that is not the JSON orbax wrote, an
array file that is truncated or unreadable) is skipped with one warning line on stderr, and once an
older step restores, each skipped step directory is *moved aside* to ``<directory>/corrupt/<step>``
rather than deleted: the files stay available to inspect (a read error on network storage may even be
transient), while orbax no longer lists the step, so the run saves that step number again and
``max_to_keep`` counts only good checkpoints (left in place, the damaged step would make ``save`` skip
its step number and would take the place of a good checkpoint). Nothing is moved when no step restores
(``CheckpointError``): a failure of every step usually means the target does not match the checkpoints
(another model or optimizer), not damage. ``directory/corrupt`` is never read again; delete it by hand.

Every process of a multi-host job must create the ``Checkpointer`` and call ``save``/``restore``/
``restore_latest`` with the same arguments: orbax writes each process's shards and synchronises the
commit. ``restore_latest`` takes the same decision on every process: after each attempt the processes
all-gather whether it succeeded, a step counts as restored only when it restored on every process, and
only process 0 moves skipped steps aside (the others wait at a barrier) and prints the warnings. A
failure inside orbax's own collective reads that leaves other processes waiting surfaces as orbax's
barrier timeout instead.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from prox.step import TrainState

__all__ = ["CORRUPT", "CheckpointError", "Checkpointer"]

_ITEMS = ("state", "meta")
# Metadata files of one step (relative to the step directory) that must hold a JSON object.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")
CORRUPT = "corrupt"   # damaged steps are moved to <directory>/corrupt/<step>
_TENSORSTORE_STATUS = re.compile(r"[A-Z][A-Z_]+: ")   # e.g. "DATA_LOSS: Error reading ..."


class CheckpointError(ValueError):
  """Checkpoints exist but none restores; the message is one line naming each step and why."""


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _abstract(leaf: Any) -> Any:
  """A restore target for one leaf: jax arrays become ``ShapeDtypeStruct`` with their sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return _numpy_scalar_as_array(leaf)


def _numpy_scalar_as_array(leaf: Any) -> Any:
  """NumPy scalars (``np.int32(0)``, e.g. a host-side ``TrainState`` default) as 0-d arrays: orbax's
  ``StandardSave`` takes arrays but refuses ``np.generic``."""
  return np.asarray(leaf) if isinstance(leaf, np.generic) else leaf


def _damage(step_dir: epath.Path) -> str | None:
  """What is visibly wrong with a step directory's files, in a few words; ``None`` if nothing is.

  Checked before orbax reads the step, so that its usual failures get a precise reason (orbax's own
  errors for them, e.g. a ``JSONDecodeError``, do not name the file) and orbax logs nothing about them.
  """
  if not step_dir.is_dir() or not any(step_dir.iterdir()):
    return "empty step directory"
  for item in _ITEMS:
    if not (step_dir / item).is_dir():
      return f"no {item}/ directory"
  for name in _JSON_FILES:
    path = step_dir / name
    if not path.exists():
      continue   # orbax reports what it needs and is missing
    try:
      value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
      return f"damaged {name}: not JSON"
    if not isinstance(value, dict):
      return f"damaged {name}: not a JSON object"
  return None


def _one_line(text: str, limit: int = 160) -> str:
  line = " ".join(text.split())
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _reason(error: Exception, step_dir: epath.Path) -> str:
  """A few words on why orbax could not restore a step (tensorstore errors name the file)."""
  message = str(error)
  files = re.findall(r'file "([^"]+)"', message)
  where = ""
  if files:
    where = files[-1]
    prefix = os.fspath(step_dir).rstrip("/") + "/"
    where = " " + (where[len(prefix):] if where.startswith(prefix) else where)
  status = _TENSORSTORE_STATUS.match(message)
  if "byte range" in message and "not valid for value of size" in message:
    return f"truncated array file{where}"
  if status:   # a tensorstore status such as DATA_LOSS: <what it was doing>
    code = status.group(0)[:-2].lower().replace("_", " ")
    return f"{code} reading{where}" if where else _one_line(f"{code}: {message[status.end():]}", 120)
  if isinstance(error, KeyError) and "was not found in the checkpoint" in message:
    return _one_line(message.strip("'\""))
  return _one_line(f"{type(error).__name__}: {message.splitlines()[0] if message else ''}")


class _DropLeftoverReadErrors(logging.Filter):
  """Drops asyncio's "Future exception was never retrieved" records of tensorstore read errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in record.getMessage()
                and isinstance(exc, ValueError) and _TENSORSTORE_STATUS.match(str(exc)))


def _quiet_leftovers_of_failed_reads() -> None:
  """Keeps the leftovers of a failed restore off stderr.

  When one array read fails, orbax ends the restore and closes its asyncio loop while tensorstore is
  still completing the step's other reads. Their completion callbacks find the loop closed (Python
  prints each ``RuntimeError('Event loop is closed')`` as an "Exception ignored" traceback), their
  errors are never retrieved (asyncio logs "Future exception was never retrieved" with the traceback)
  and coroutines orbax had created but not started are never awaited (a ``RuntimeWarning``), each
  printed whenever the garbage collector gets to it. None of them has anything left to report once
  the step is skipped, so this drops exactly those three kinds of message (through
  ``sys.unraisablehook``, a filter on the ``asyncio`` logger and a warnings filter on orbax's
  ``Store`` coroutines) and passes everything else on.
  """
  warnings.filterwarnings("ignore", message=r"coroutine 'Store\.\w+' was never awaited",
                          category=RuntimeWarning)   # idempotent; ``catch_warnings`` may undo it
  previous = sys.unraisablehook
  if getattr(previous, "prox_closed_loop_filter", False):
    return

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook.prox_closed_loop_filter = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropLeftoverReadErrors())


def _all_processes(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Saves and restores ``(TrainState, meta)`` pairs, keeping the newest ``max_to_keep`` steps.

  Args:
    directory: where the step directories go (local path or a URL such as ``gs://bucket/run/ckpt``);
      created if missing.
    max_to_keep: number of newest checkpoints kept; older ones are deleted after each save.
    save_interval_steps: ``save`` writes only when ``step % save_interval_steps == 0`` (or when a
      preemption notice reached the JAX preemption sync point), unless ``force=True``.
    async_save: write in a background thread (orbax's async checkpointing): ``save`` returns once the
      arrays are copied off the device; call ``wait_until_finished`` (or ``close``) before reading
      the files from another process.

  Example::

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3, save_interval_steps=1000)
    restored = ckpt.restore_latest(state)        # `state` gives structure, dtypes and shardings
    if restored is not None:
      state, meta, _ = restored
    for ...:
      state, metrics = train_step(state, batch)
      ckpt.save(int(state.step), state, {"examples_seen": n})
    ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    _check_positive_int("max_to_keep", max_to_keep)
    _check_positive_int("save_interval_steps", save_interval_steps)
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)   # tensorstore wants absolute local paths
    self._options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
        # Lists the steps without reading each one's _CHECKPOINT_METADATA (only its commit time,
        # which nothing here uses): a damaged one would make the constructor raise.
        lightweight_initialize=True,
    )
    self.directory = directory
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    """The newest step that was saved (or is being saved by this object); ``None`` if none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps currently kept, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
    """Saves ``state`` and the JSON-able ``meta`` as ``step``; returns whether a save was started.

    Skipped (returns False) when ``step`` is already saved, or, unless ``force``, when ``step`` is
    not a multiple of ``save_interval_steps`` or not newer than ``latest_step()``; so a final
    ``save(last_step, state, meta, force=True)`` is safe after a regular save of the same step.
    """
    if not isinstance(meta, dict):
      raise TypeError(f"meta must be a JSON-able dict, got {type(meta).__name__}")
    step = int(step)
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(jax.tree.map(_numpy_scalar_as_array, state)),
                                meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores ``(state, meta)`` of ``step`` (default: the latest step).

    ``target`` is a ``TrainState`` whose leaves are arrays or ``jax.ShapeDtypeStruct`` (with
    ``sharding``); the restored state has exactly ``target``'s pytree structure (optax ``NamedTuple``
    states included), dtypes and shardings, so a run may resume on a different device count.
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(_abstract, target)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def restore_latest(self, target: TrainState) -> tuple[TrainState, dict, int] | None:
    """Restores ``(state, meta, step)`` of the newest step that restores; ``None`` if there is none.

    Tries the kept steps newest first. A step that does not restore is skipped with one line on
    stderr, ``prox: warning: checkpoint <step> in <directory> does not restore (<why>); using
    <older step>; moved to <directory>/corrupt/<step>``, and (once an older step restored) moved aside
    so that later saves and ``max_to_keep`` ignore it (see the module docstring). ``target`` is as
    for ``restore``.

    Raises:
      CheckpointError: checkpoints exist but none restores (nothing is moved).
    """
    self._manager.wait_until_finished()
    _quiet_leftovers_of_failed_reads()   # before the first read: leftovers come from other threads
    root = epath.Path(self.directory)
    skipped: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = root / str(step)
      reason = _damage(step_dir)
      if reason is None:
        try:
          state, meta = self.restore(target, step)
        except Exception as e:  # pylint: disable=broad-exception-caught (any failure: try older)
          reason = _reason(e, step_dir)
          gc.collect()   # the failed read's leftovers go now, while the filters are in place
      if not _all_processes(reason is None):
        skipped.append((step, reason or "failed on another process"))
        continue
      if skipped:
        self._move_aside(skipped, step)
      return state, meta, step
    if not skipped:
      return None
    listed = "; ".join(f"{step} ({reason})" for step, reason in skipped[:4])
    more = f"; and {len(skipped) - 4} more" if len(skipped) > 4 else ""
    raise CheckpointError(f"no checkpoint in {self.directory} restores: {listed}{more}")

  def _move_aside(self, skipped: list[tuple[int, str]], used: int) -> None:
    """Moves the skipped steps to ``<directory>/corrupt/`` (process 0) and re-lists the steps."""
    root = epath.Path(self.directory)
    if jax.process_index() == 0:
      for step, reason in skipped:
        dest = root / CORRUPT / str(step)
        n = 0
        while dest.exists():   # the same step number was moved aside before
          n += 1
          dest = root / CORRUPT / f"{step}.{n}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        (root / str(step)).rename(dest)
        print(f"prox: warning: checkpoint {step} in {self.directory} does not restore ({reason}); "
              f"using {used}; moved to {dest}", file=sys.stderr, flush=True)
    _barrier("prox_checkpoint_move_aside")
    self._manager.close()
    self._manager = self._new_manager()

  def wait_until_finished(self) -> None:
    """Blocks until every started save is written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
