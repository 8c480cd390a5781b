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

Every process of a multi-host job must create the ``Checkpointer`` and call ``save``/``restore``
with the same arguments: orbax writes each process's shards and synchronises the commit.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from prox.step import TrainState

_ITEMS = ("state", "meta")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _abstract(leaf: Any) -> Any:
  """A restore target for one leaf: jax arrays become ``ShapeDtypeStruct`` with their sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


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
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(state)          # `state` gives structure, dtypes and shardings
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
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)

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
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
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
