"""Batch sources for ``prox.loop``: host-side iterators with a checkpointable position.

A source has ``next(batch_size) -> Batch | None``, ``get_state() -> dict`` and ``set_state(dict)``, like
a grain ``DatasetIterator``; it returns this process's rows of each global batch (``jax.process_index()``
of ``jax.process_count()`` by default) and keeps only plain ints as its position, so a checkpoint stores
it as JSON and a resumed run sees exactly the batches an uninterrupted one would.

* :class:`EpochSource`: epochs of seeded permutations of an in-memory dataset (``data.next_batch``); any
  batch size, changing from step to step; ``boundary="epoch"`` on the batch that ends an epoch.
* :class:`StreamSource`: an unlimited stream of fresh samples: augmented images
  (``data.next_stream_batch``) or newly generated MNIST-1D sequences (``data.next_mnist1d_stream_batch``).
* :class:`TaskSource`: a sequence of tasks, each a dataset trained for a number of steps; the batch that
  ends a task carries ``boundary="task"`` and every batch the task index as metadata.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from prox.tasks import data as data_lib


class Batch(NamedTuple):
  """One step's input (the same fields as ``prox.loop.Batch``, which accepts any such tuple)."""
  data: Any
  meta: Any = None
  boundary: str | None = None


def _process(process_index: int | None, process_count: int | None) -> dict[str, int]:
  return {"process_index": jax.process_index() if process_index is None else process_index,
          "process_count": jax.process_count() if process_count is None else process_count}


class EpochSource:
  """Epochs of ``ds`` in seeded random order (see ``data.next_batch``); the batch size may vary.

  Args:
    ds: the dataset.
    seed: the order's seed.
    transform: optional ``batch -> batch`` applied to each host batch (e.g. adding a logit mask).
    process_index, process_count: this process's shard (default: from JAX).
  """

  def __init__(self, ds: data_lib.ArrayDataset, seed: int, *,
               transform: Callable[[dict], dict] | None = None,
               process_index: int | None = None, process_count: int | None = None):
    self.ds = ds
    self.transform = transform
    self._process = _process(process_index, process_count)
    self._state = data_lib.loader_init(seed)

  def next(self, batch_size: int) -> Batch:
    epoch = self._state.epoch
    rows, self._state = data_lib.next_batch(self.ds, self._state, batch_size, **self._process)
    if self.transform is not None:
      rows = self.transform(rows)
    return Batch(rows, None, "epoch" if self._state.epoch > epoch else None)

  def get_state(self) -> dict:
    return data_lib.loader_state_to_dict(self._state)

  def set_state(self, state: dict) -> None:
    self._state = data_lib.loader_state_from_dict(state)

  @property
  def epoch(self) -> int:
    return self._state.epoch


_MATERIALIZED: dict[tuple[int, int], dict[str, np.ndarray]] = {}   # (seed, n) -> the first n samples


class StreamSource:
  """Fresh samples without end: warped images of ``ds`` (``augment`` options of
  ``data.next_stream_batch``), or, for ``ds=None``, newly generated MNIST-1D sequences.

  ``materialize=n`` generates the first ``n`` samples of the stream once (per seed, shared by every
  source in the process) and serves them from memory, exactly the batches the stream would generate:
  for sweeps whose runs read the same stream. Only for MNIST-1D (``ds=None``).
  """

  def __init__(self, ds: data_lib.ArrayDataset | None, seed: int, *, materialize: int = 0,
               process_index: int | None = None, process_count: int | None = None, **augment: Any):
    if ds is None and augment:
      raise ValueError(f"augmentation options {sorted(augment)} apply to image datasets, not MNIST-1D")
    if materialize and ds is not None:
      raise ValueError("materialize is for the MNIST-1D stream (ds=None)")
    self.ds = ds
    self.augment = augment
    self._process = _process(process_index, process_count)
    self._state = data_lib.stream_init(seed)
    self._memory = _materialized(int(seed), int(materialize)) if materialize else None

  def next(self, batch_size: int) -> Batch:
    count, index = self._process["process_count"], self._process["process_index"]
    if self._memory is not None and self._state.position + batch_size <= len(self._memory["label"]):
      local = batch_size // count
      lo = self._state.position + index * local
      rows = {k: v[lo:lo + local] for k, v in self._memory.items()}
      self._state = self._state._replace(position=self._state.position + batch_size)
      return Batch(rows)
    if self.ds is None:
      rows, self._state = data_lib.next_mnist1d_stream_batch(self._state, batch_size, **self._process)
    else:
      rows, self._state = data_lib.next_stream_batch(self.ds, self._state, batch_size, **self._process,
                                                     **self.augment)
    return Batch(rows)

  def get_state(self) -> dict:
    return data_lib.stream_state_to_dict(self._state)

  def set_state(self, state: dict) -> None:
    self._state = data_lib.stream_state_from_dict(state)


class TaskSource:
  """Tasks in order: task ``t`` draws epochs of ``datasets[t]`` for ``steps[t]`` steps.

  Every batch carries ``meta={"task": int32 t}``; the last batch of a task has ``boundary="task"``. The
  order within a task is seeded by ``(seed, t)``. ``transform(batch, t)`` may add fields (a task's logit
  mask, say). ``next`` returns ``None`` after the last task.
  """

  def __init__(self, datasets: Sequence[data_lib.ArrayDataset], steps: Sequence[int], seed: int, *,
               transform: Callable[[dict, int], dict] | None = None,
               process_index: int | None = None, process_count: int | None = None):
    if len(datasets) != len(steps) or not datasets:
      raise ValueError(f"need one step count per task, got {len(datasets)} datasets, {len(steps)} counts")
    if any(int(s) < 1 for s in steps):
      raise ValueError(f"every task needs at least one step, got {list(steps)}")
    self.datasets, self.steps, self.seed = list(datasets), [int(s) for s in steps], int(seed)
    self.transform = transform
    self._process = _process(process_index, process_count)
    self._task, self._done = 0, 0
    self._loader = data_lib.loader_init(self._task_seed(0))

  def _task_seed(self, t: int) -> int:
    return int(np.random.SeedSequence((self.seed, t)).generate_state(1)[0])

  @property
  def task(self) -> int:
    """The task the next batch comes from (``len(datasets)`` when all are done)."""
    return self._task

  def next(self, batch_size: int) -> Batch | None:
    t = self._task
    if t >= len(self.datasets):
      return None
    rows, self._loader = data_lib.next_batch(self.datasets[t], self._loader, batch_size, **self._process)
    if self.transform is not None:
      rows = self.transform(rows, t)
    self._done += 1
    boundary = None
    if self._done == self.steps[t]:
      boundary = "task"
      self._task, self._done = t + 1, 0
      self._loader = data_lib.loader_init(self._task_seed(t + 1))
    return Batch(rows, {"task": np.int32(t)}, boundary)

  def get_state(self) -> dict:
    return {"task": self._task, "done": self._done, "loader": data_lib.loader_state_to_dict(self._loader)}

  def set_state(self, state: dict) -> None:
    self._task, self._done = int(state["task"]), int(state["done"])
    self._loader = data_lib.loader_state_from_dict(state["loader"])


def _materialized(seed: int, n: int) -> dict[str, np.ndarray]:
  if (seed, n) not in _MATERIALIZED:
    parts, state = [], data_lib.stream_init(seed)
    for start in range(0, n, 65536):
      rows, state = data_lib.next_mnist1d_stream_batch(state, min(65536, n - start))
      parts.append(rows)
    _MATERIALIZED[(seed, n)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return _MATERIALIZED[(seed, n)]
