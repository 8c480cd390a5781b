"""Batch sources for ``prox.loop``: host-side iterators with a checkpointable position.

A source has ``next(batch_size, context=None) -> Batch | None``, ``get_state() -> dict`` and
``set_state(dict)``, like a grain ``DatasetIterator`` (``context`` is the loop's ``Context``: a source may
read the train state, e.g. the task a teacher in ``state.extra`` chose); it returns this process's rows of each global batch (``jax.process_index()``
of ``jax.process_count()`` by default) and keeps only plain ints as its position, so a checkpoint stores
it as JSON and a resumed run sees exactly the batches an uninterrupted one would.

* :class:`GrainSource` (also named :class:`EpochSource`): epochs of seeded permutations of a dataset (in
  memory, or records read from a ``tfds.data_source``) on grain: the order is a ``grain.MapDataset`` of
  example indices, the order of ``data.next_batch``; any batch size, changing from step to step, gathered
  in one vectorised read; optional grain worker processes; ``boundary="epoch"`` on the batch that ends an
  epoch.
* :class:`StreamSource`: an unlimited stream of fresh samples: augmented images
  (``data.next_stream_batch``) or newly generated MNIST-1D sequences (``data.next_mnist1d_stream_batch``).
* :class:`TaskSource`: a sequence of tasks, each a dataset trained for a number of steps; the batch that
  ends a task carries ``boundary="task"`` and every batch the task index as metadata.
* :class:`SubsetSource`: epochs over the items a curriculum selects between epochs (PUDF), with example
  indices in the batch.
* :class:`ParametricTaskSource`: a continuous family of tasks over one dataset: each batch is drawn from
  epochs of the dataset and transformed by the task vector the train state names (a teacher's choice).

:class:`TaskSource` and :class:`ParametricTaskSource` read their epochs through :class:`GrainSource`.
:class:`StreamSource` and :class:`SubsetSource` do not: a stream sample is a pure function of
``(seed, position)`` computed for a whole batch at once (a jitted warp, a vectorised generator), with no
dataset to index; a curriculum's epochs run over items it changes between epochs and pad their last
batch to the full size, and already read with one gather from one cached permutation per epoch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from prox.tasks import _grain
from prox.tasks import data as data_lib


class Batch(NamedTuple):
  """One step's input (the same fields as ``prox.loop.Batch``, which accepts any such tuple)."""
  data: Any
  meta: Any = None
  boundary: str | None = None


def _process(process_index: int | None, process_count: int | None) -> dict[str, int]:
  return {"process_index": jax.process_index() if process_index is None else process_index,
          "process_count": jax.process_count() if process_count is None else process_count}


class GrainSource:
  """Epochs of ``data`` in seeded random order on grain; the batch size may change at every call.

  The global order is ``sigma_k = pi_{k // N}[k mod N]``, ``pi_e = default_rng([seed, e]).permutation(N)``
  (:class:`prox.tasks.EpochOrder`, a ``grain.MapDataset`` of example indices; the order of
  ``data.next_batch``, whose batches this source serves exactly). ``next(b)`` takes the next ``b``
  positions: process ``p`` of ``n`` gets ``sigma[P + p b/n : P + (p+1) b/n]`` (``P``: positions taken
  before), read in one vectorised gather; a batch that crosses the end of an epoch takes the rest of it
  and continues into the next one, and carries ``boundary="epoch"``. The position is ``{"seed",
  "epoch", "index"}`` (plain ints: ``P = epoch N + index``), so a checkpoint stores it as JSON and a
  resumed run sees exactly the batches an uninterrupted one would.

  Args:
    data: a ``prox.tasks.data.ArrayDataset`` (batches ``{"image", "label"}``), a mapping of arrays with
      one leading dimension ``N`` (batches with the same keys), or a random-access source of records
      such as ``tfds.data_source(name, split=...)`` (ArrayRecord) or a finite ``grain.MapDataset``
      (batches: the records stacked field by field).
    seed: the order's seed, an int in ``[0, 2**32)``.
    transform: optional ``batch -> batch`` applied to each host batch (e.g. normalising images read from
      TFDS, or adding a logit mask); it runs in the worker processes when they are on (then it must be
      picklable by cloudpickle).
    worker_count: grain ``mp_prefetch`` worker processes reading ahead (0: read in the calling process).
      For records decoded one by one they take the work off the calling process (an ArrayRecord file of
      digits, 2 workers: 0.4x the in-process wall time per batch of 128, 0.3x at 1024); for arrays in
      memory the hand-over costs more than the gather (3x to 13x), so leave them off there. Each change
      of the batch size restarts them (see ``prox.tasks._grain``): for a size that changes at every step
      leave them off too.
    worker_buffer_size: batches each worker keeps ready.
    process_index, process_count: this process's shard (default: from JAX).
  """

  def __init__(self, data: Any, seed: int, *, transform: Callable[[dict], dict] | None = None,
               worker_count: int = 0, worker_buffer_size: int = 2,
               process_index: int | None = None, process_count: int | None = None):
    self.data = data
    self.transform = transform
    self._process = _process(process_index, process_count)
    count, index = self._process["process_count"], self._process["process_index"]
    if not _is_int(count) or count < 1 or not _is_int(index) or not 0 <= index < count:
      raise ValueError(f"process_index must be an int in [0, process_count), process_count a positive "
                       f"int; got {index!r} of {count!r}")
    self._reader = _grain.reader_for(data)
    self._num = self._reader.num_examples
    self._worker_count, self._worker_buffer_size = worker_count, worker_buffer_size
    self._position = 0
    self._batches = self._make_batches(_grain.check_seed(seed))

  def _make_batches(self, seed: int) -> _grain.BatchReader:
    return _grain.BatchReader(self._reader, _grain.EpochOrder(self._num, seed),
                              transform=self.transform, worker_count=self._worker_count,
                              worker_buffer_size=self._worker_buffer_size, **self._process)

  @property
  def order(self) -> _grain.EpochOrder:
    """The global order (a ``grain.MapDataset`` of example indices)."""
    return self._batches.order

  @property
  def epoch(self) -> int:
    """The epoch the next batch starts in."""
    return self._position // self._num

  @property
  def position(self) -> int:
    """Positions taken so far (global examples served, over all processes)."""
    return self._position

  def next(self, batch_size: int, context: Any = None) -> Batch:
    if not _is_int(batch_size) or batch_size < 1 or batch_size % self._process["process_count"]:
      raise ValueError(f"batch_size must be a positive int divisible by the process count "
                       f"{self._process['process_count']}, got {batch_size!r}")
    start = self._position
    rows = self._batches.read(start, int(batch_size))
    self._position = start + int(batch_size)
    return Batch(rows, None, "epoch" if self._position // self._num > start // self._num else None)

  def get_state(self) -> dict:
    epoch, index = divmod(self._position, self._num)
    return {"seed": self.order.seed, "epoch": epoch, "index": index}

  def set_state(self, state: dict) -> None:
    loader = data_lib.loader_state_from_dict(state)
    if loader.index >= self._num:
      raise ValueError(f"source state index {loader.index} is outside an epoch of {self._num} examples")
    if loader.seed != self.order.seed:
      self._batches.close()
      self._batches = self._make_batches(_grain.check_seed(loader.seed))
    self._position = loader.epoch * self._num + loader.index

  def close(self) -> None:
    """Stops the worker processes, if any (they also stop when the source is collected)."""
    self._batches.close()


# The name the experiments use: epochs of an in-memory dataset (formerly read with ``data.next_batch``,
# now on grain; the same batches and the same checkpointed position).
EpochSource = GrainSource


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

  def next(self, batch_size: int, context: Any = None) -> Batch:
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
    self._loader = self._task_loader(0)

  def _task_loader(self, t: int) -> GrainSource | None:
    if t >= len(self.datasets):
      return None
    return GrainSource(self.datasets[t], self._task_seed(t), **self._process)

  def _task_seed(self, t: int) -> int:
    return int(np.random.SeedSequence((self.seed, t)).generate_state(1)[0])

  @property
  def task(self) -> int:
    """The task the next batch comes from (``len(datasets)`` when all are done)."""
    return self._task

  def next(self, batch_size: int, context: Any = None) -> Batch | None:
    t = self._task
    if t >= len(self.datasets):
      return None
    rows = self._loader.next(batch_size).data
    if self.transform is not None:
      rows = self.transform(rows, t)
    self._done += 1
    boundary = None
    if self._done == self.steps[t]:
      boundary = "task"
      self._task, self._done = t + 1, 0
      self._loader = self._task_loader(t + 1)
    return Batch(rows, {"task": np.int32(t)}, boundary)

  def get_state(self) -> dict:
    loader = (self._loader.get_state() if self._loader is not None
              else {"seed": self._task_seed(self._task), "epoch": 0, "index": 0})
    return {"task": self._task, "done": self._done, "loader": loader}

  def set_state(self, state: dict) -> None:
    self._task, self._done = int(state["task"]), int(state["done"])
    self._loader = self._task_loader(self._task)
    if self._loader is not None:
      self._loader.set_state(state["loader"])


def _materialized(seed: int, n: int) -> dict[str, np.ndarray]:
  if (seed, n) not in _MATERIALIZED:
    parts, state = [], data_lib.stream_init(seed)
    for start in range(0, n, 65536):
      rows, state = data_lib.next_mnist1d_stream_batch(state, min(65536, n - start))
      parts.append(rows)
    _MATERIALIZED[(seed, n)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return _MATERIALIZED[(seed, n)]


class ParametricTaskSource:
  """Batches of a continuous task family: epochs of ``ds`` (seeded order), each batch transformed by the
  task vector ``task_of(context)`` (e.g. ``context.state.extra["teacher"].task``, read on the host).

  ``transform(batch, task, rng) -> batch`` is a host function (numpy); ``rng`` is a
  ``numpy.random.Generator`` seeded by ``(seed, samples drawn so far)``, so a batch depends only on the
  position and the task: a resumed run draws the same batches. Every batch carries ``meta={"task":
  float32 task}``.
  """

  def __init__(self, ds: data_lib.ArrayDataset, seed: int, *, task_of: Callable[[Any], np.ndarray],
               transform: Callable[[dict, np.ndarray, np.random.Generator], dict],
               process_index: int | None = None, process_count: int | None = None):
    self.ds, self.seed = ds, int(seed)
    self.task_of, self.transform = task_of, transform
    self._process = _process(process_index, process_count)
    self._loader = GrainSource(ds, seed, **self._process)
    self._drawn = 0

  def next(self, batch_size: int, context: Any = None) -> Batch:
    task = np.asarray(jax.device_get(self.task_of(context)), np.float32)
    rows = self._loader.next(batch_size).data
    rng = np.random.default_rng((self.seed, self._drawn, self._process["process_index"]))
    self._drawn += batch_size
    return Batch(self.transform(rows, task, rng), {"task": task})

  def get_state(self) -> dict:
    return {"loader": self._loader.get_state(), "drawn": self._drawn}

  def set_state(self, state: dict) -> None:
    self._loader.set_state(state["loader"])
    self._drawn = int(state["drawn"])


class SubsetSource:
  """Epochs over the items a curriculum selects, for ``prox.loop.run``; batches carry example indices.

  Epoch ``e`` visits its items ``I_e`` (every example unless :meth:`select` chose others) once, in the
  order ``I_e[default_rng([seed, e]).permutation(|I_e|)]``, in ``ceil(|I_e| / B)`` batches of ``B``
  examples. The last batch of an epoch is completed with the epoch's first examples (as PyTorch's
  ``DistributedSampler`` pads), so every row is a real example, the batch size never changes and the
  step needs no padding weights; that batch carries ``boundary="epoch"``.

  Batches: ``{"image", "label", "index"}`` (``index``: int32 row of the example in ``ds``, e.g. for a
  per-example store) and ``meta={"epoch": int32 e}``. After ``num_epochs`` epochs ``next`` returns
  ``None`` (the run ends). The position (seed, epoch, index within the epoch, the epoch's items) is a
  JSON dict, so a resumed run sees exactly the batches an uninterrupted one would.

  Args:
    ds: the dataset.
    seed: the order's seed.
    num_epochs: epochs before the source ends (``None``: no end).
    items: the items of the first epoch (default: all).
    process_index, process_count: this process's shard of each global batch (default: from JAX).
  """

  def __init__(self, ds: data_lib.ArrayDataset, seed: int, *, num_epochs: int | None = None,
               items: Sequence[int] | None = None, process_index: int | None = None,
               process_count: int | None = None):
    num = len(ds.labels)
    if num < 1 or len(ds.images) != num:
      raise ValueError(f"dataset {ds.name!r} must hold N > 0 inputs and N labels, got images "
                       f"{np.shape(ds.images)} and labels {np.shape(ds.labels)}")
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not _is_int(num_epochs) or num_epochs < 1):
      raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    self.ds = ds
    self.num_epochs = None if num_epochs is None else int(num_epochs)
    self._process_index = jax.process_index() if process_index is None else int(process_index)
    self._process_count = jax.process_count() if process_count is None else int(process_count)
    self._seed, self._epoch, self._index = int(seed), 0, 0
    self._items = self._check_items(items)
    self._cached: tuple[int, np.ndarray] | None = None   # (epoch, its order)

  def _check_items(self, items: Sequence[int] | None) -> np.ndarray | None:
    if items is None:
      return None
    items = np.asarray(items)
    num = len(self.ds.labels)
    if (items.ndim != 1 or items.size == 0 or not np.issubdtype(items.dtype, np.integer)
        or items.min() < 0 or items.max() >= num):
      raise ValueError(f"items must be a non-empty vector of indices in [0, {num}), got "
                       f"{items.size} values of dtype {items.dtype}"
                       + (f" in [{items.min()}, {items.max()}]" if items.size and items.ndim == 1 else ""))
    if np.unique(items).size != items.size:
      raise ValueError("items must be distinct (an epoch visits each selected item once)")
    return items.astype(np.int64)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from."""
    return self._epoch

  @property
  def items(self) -> np.ndarray:
    """The current epoch's items."""
    return np.arange(len(self.ds.labels)) if self._items is None else self._items.copy()

  def select(self, items: Sequence[int] | None) -> None:
    """Sets the items of the epoch about to start (and the following ones); ``None``: all examples.

    Only between epochs (an epoch-boundary or start action): a ``ValueError`` otherwise.
    """
    if self._index:
      raise ValueError(f"select is only possible between epochs; epoch {self._epoch} is at item "
                       f"{self._index} of {len(self.items)}")
    self._items = self._check_items(items)
    self._cached = None

  def _order(self) -> np.ndarray:
    if self._cached is None or self._cached[0] != self._epoch:
      items = self.items
      order = items[np.random.default_rng([self._seed, self._epoch]).permutation(items.size)]
      self._cached = (self._epoch, order)
    return self._cached[1]

  def next(self, batch_size: int, context: Any = None) -> Batch | None:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      return None
    if not _is_int(batch_size) or batch_size < 1 or batch_size % self._process_count:
      raise ValueError(f"batch_size must be a positive int divisible by the process count "
                       f"{self._process_count}, got {batch_size!r}")
    order = self._order()
    count = order.size
    rows = order[(self._index + np.arange(batch_size)) % count]   # wraps into the epoch's start
    local = batch_size // self._process_count
    rows = rows[self._process_index * local:(self._process_index + 1) * local]
    meta = {"epoch": np.int32(self._epoch)}
    self._index += batch_size
    boundary = None
    if self._index >= count:
      self._epoch, self._index, boundary = self._epoch + 1, 0, "epoch"
    data = {"image": self.ds.images[rows], "label": self.ds.labels[rows], "index": rows.astype(np.int32)}
    return Batch(data, meta, boundary)

  def get_state(self) -> dict:
    return {"seed": self._seed, "epoch": self._epoch, "index": self._index,
            "items": None if self._items is None else self._items.tolist()}

  def set_state(self, state: dict) -> None:
    self._seed, self._epoch, self._index = int(state["seed"]), int(state["epoch"]), int(state["index"])
    self._items = self._check_items(state["items"])
    self._cached = None


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
