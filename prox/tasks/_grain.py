"""The input pipeline on grain: the global example order as a ``grain.MapDataset`` and vectorised batches.

The order. Epoch ``e`` visits the ``N`` examples in the order of a seeded permutation, and the epochs
follow each other without a gap:

    pi_e = default_rng([seed, e]).permutation(N)       (numpy's PCG64 seeded by the pair (seed, e))
    sigma_k = pi_{k // N}[k mod N],   k = 0, 1, 2, ...  (the example at global position k)

:class:`EpochOrder` is this infinite sequence as a ``grain.MapDataset`` of example indices
(``order[k] = sigma_k``), so it composes with grain's transformations (``map``, ``batch``,
``to_iter_dataset``, ``mp_prefetch``). It is the order of ``prox.tasks.data.next_batch``, so a
grain-backed source serves exactly the batches of the hand-written loader.

Batches of any size. A step ``t`` with global batch size ``b_t`` takes the positions
``[P_t, P_t + b_t)``, ``P_t = b_0 + ... + b_{t-1}``; process ``p`` of ``n`` gets its ``l_t = b_t / n``
consecutive rows ``sigma[P_t + p l_t : P_t + (p + 1) l_t]``, so the shards of all processes concatenate
to the one-process batch, and ``b_t`` may change at every step (the adaptive batch-size controller).
:meth:`EpochOrder.take` returns those indices as one numpy slice of a cached epoch permutation, and the
rows are gathered with one fancy-indexing call per field (in-memory data) or one batched read
(``__getitems__`` of a ``tfds.data_source``): no Python work per example. Why not grain's own
per-example pipeline ``MapDataset.range(N).shuffle(seed).repeat().map(read).batch(b)``: its shuffle
draws each index with a scalar ``index_shuffle`` call (a Feistel network) and each example passes
through the map and the stacking alone: about 45 us of CPU per example on the 8x8 digits, about 100
times the hand-written loader's time per batch of 128, where this order took a quarter of it
(``benchmarks/input_pipeline.py``); and ``MapDataset.batch`` has one fixed size.

Worker processes. :class:`BatchReader` with ``worker_count > 0`` runs the reads (and the batch
transform) in grain ``mp_prefetch`` worker processes: a ``grain.MapDataset`` whose element ``i`` is this
process's batch ``i`` of a constant batch size from a start position (:func:`batch_dataset`), prefetched
in order. The batch size the loop will ask for next is not known in advance, so the prefetch is a guess
that the size stays: the pipeline starts when the same size is asked for twice in a row, serves while the
requests continue where it is, and is dropped (the request served in the main process) when the size or
the position changes. The batches are those of the main process in every case: only the time differs.
"""
from __future__ import annotations

import collections
import sys
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
from absl import flags
import numpy as np

Rows = dict[str, np.ndarray]
_CACHED_EPOCHS = 3   # permutations kept per order: the current epoch, the next one and one spare


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_seed(seed: Any) -> int:
  if not _is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  return int(seed)


class EpochOrder(grain.MapDataset):
  """Example indices in seeded epoch order, as an infinite ``grain.MapDataset``.

  ``order[k] = sigma_k = pi_{k // N}[k mod N]`` with ``pi_e = default_rng([seed, e]).permutation(N)``
  (see the module docstring). ``len(order)`` is ``sys.maxsize`` (grain's length of a repeated dataset).
  Reads are vectorised: :meth:`take` (a contiguous range) and ``_getitems`` (any indices, grain's
  batched read) return int64 numpy arrays computed from at most a few cached permutations.

  Args:
    num_examples: ``N``, the examples in one epoch.
    seed: the order's seed, an int in ``[0, 2**32)``.
  """

  def __init__(self, num_examples: int, seed: int):
    super().__init__()
    if not _is_int(num_examples) or num_examples < 1:
      raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    self._num = int(num_examples)
    self._seed = check_seed(seed)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  @property
  def num_examples(self) -> int:
    return self._num

  @property
  def seed(self) -> int:
    return self._seed

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochOrder(num_examples={self._num}, seed={self._seed})"

  def __getstate__(self) -> dict:   # worker processes get the order without its cached permutations
    state = self.__dict__.copy()
    state["_cache"] = collections.OrderedDict()
    return state

  def permutation(self, epoch: int) -> np.ndarray:
    """``pi_epoch`` (int64 [N], read-only; cached)."""
    perm = self._cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._num)
      perm.flags.writeable = False
      self._cache[epoch] = perm
      while len(self._cache) > _CACHED_EPOCHS:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(epoch)
    return perm

  def take(self, start: int, count: int) -> np.ndarray:
    """``sigma[start : start + count]`` as an int64 array (one slice per epoch it spans)."""
    epoch, index = divmod(int(start), self._num)
    if index + count <= self._num:
      return self.permutation(epoch)[index:index + count]
    parts = []
    while count > 0:
      size = min(count, self._num - index)
      parts.append(self.permutation(epoch)[index:index + size])
      count -= size
      epoch, index = epoch + 1, 0
    return np.concatenate(parts)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not _is_int(index) or index < 0:
      raise ValueError(f"EpochOrder index must be a non-negative int, got {index!r}")
    return int(self.take(index, 1)[0])

  def _getitems(self, indices: Sequence[int]) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    epochs, offsets = np.divmod(indices, self._num)
    out = np.empty_like(indices)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self.permutation(int(epoch))[offsets[where]]
    return out


class ArrayReader:
  """Rows of in-memory arrays (equal leading dimension): ``rows -> {name: array[rows]}``."""

  def __init__(self, fields: Mapping[str, np.ndarray]):
    lengths = {name: len(value) for name, value in fields.items()}
    if not fields or len(set(lengths.values())) != 1 or 0 in lengths.values():
      raise ValueError(f"the data must be arrays with one positive leading dimension N, got lengths "
                       f"{lengths}")
    self.fields = dict(fields)
    self.num_examples = next(iter(lengths.values()))

  def __call__(self, rows: np.ndarray) -> Rows:
    return {name: value[rows] for name, value in self.fields.items()}


class RecordReader:
  """Rows of a random-access source of records (``tfds.data_source``, a grain source or ``MapDataset``):
  one batched read (``__getitems__``, else grain's ``_getitems``, else one read per record), then the
  records stacked field by field."""

  def __init__(self, source: Any):
    try:
      self.num_examples = len(source)
    except TypeError:
      raise ValueError(f"the data must be arrays, a prox ArrayDataset or a random-access source with "
                       f"len() and [] (e.g. tfds.data_source), got {type(source).__name__}") from None
    if not hasattr(source, "__getitem__") or self.num_examples < 1:
      raise ValueError(f"the source must hold N > 0 records readable with [], got "
                       f"{type(source).__name__} of length {self.num_examples}")
    if isinstance(source, grain.MapDataset) and self.num_examples >= sys.maxsize:
      raise ValueError("the source must be finite (one epoch); the order repeats it")
    self.source = source

  def _read(self, keys: list[int]) -> Sequence[Any]:
    getitems = getattr(self.source, "__getitems__", None)
    if getitems is not None:
      try:
        return getitems(keys)
      except TypeError:   # tfds.testing.mock_data (4.9.10) installs an unbound __getitems__
        pass
    if isinstance(self.source, grain.MapDataset):
      return self.source._getitems(keys)  # pylint: disable=protected-access
    return [self.source[k] for k in keys]

  def __call__(self, rows: np.ndarray) -> Rows:
    records = self._read(rows.tolist())
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *records)


def reader_for(data: Any) -> ArrayReader | RecordReader:
  """The reader of ``data``: a prox ``ArrayDataset`` (fields ``image``, ``label``), a mapping of arrays,
  or a random-access source of records."""
  images, labels = getattr(data, "images", None), getattr(data, "labels", None)
  if isinstance(images, np.ndarray) and isinstance(labels, np.ndarray):
    if len(images) != len(labels) or images.ndim < 2:
      raise ValueError(f"dataset {getattr(data, 'name', '')!r} must hold N > 0 inputs [N, ...] and N "
                       f"labels, got images {images.shape} and labels {labels.shape}")
    return ArrayReader({"image": images, "label": labels})
  if isinstance(data, Mapping):
    return ArrayReader({k: np.asarray(v) for k, v in data.items()})
  return RecordReader(data)


class _ReadBatch:
  """Batch ``i`` of a constant batch size for one process: ``transform(read(sigma[first + i b :][:l]))``
  (a picklable callable for grain's ``map``)."""

  def __init__(self, reader: Callable[[np.ndarray], Rows], order: EpochOrder, first: int, stride: int,
               local: int, transform: Callable[[Rows], Rows] | None):
    self.reader, self.order, self.first, self.stride, self.local = reader, order, first, stride, local
    self.transform = transform

  def __call__(self, i: int) -> Rows:
    rows = self.reader(self.order.take(self.first + int(i) * self.stride, self.local))
    return rows if self.transform is None else self.transform(rows)


def batch_dataset(reader: Callable[[np.ndarray], Rows], order: EpochOrder, *, start: int, batch_size: int,
                  process_index: int = 0, process_count: int = 1,
                  transform: Callable[[Rows], Rows] | None = None) -> grain.MapDataset:
  """This process's batches of a constant global batch size from position ``start``, as a
  ``grain.MapDataset``: element ``i`` holds the rows
  ``sigma[start + i b + p l : start + i b + (p + 1) l]``, ``l = b / n``, read by ``reader``."""
  local = batch_size // process_count
  return grain.MapDataset.range(0, sys.maxsize).map(
      _ReadBatch(reader, order, start + process_index * local, batch_size, local, transform))


def _default_unparsed_grain_flags() -> None:
  """Lets ``mp_prefetch`` run where absl flags were never parsed (a script or test without ``absl.app``).

  grain 0.2.x reads its worker-profiling flag's value when JAX is imported, and absl refuses to read an
  unparsed flag; marking that one flag present keeps its default (False), as grain does for the flags it
  forwards to its workers. Parsed flags are left alone.
  """
  if not flags.FLAGS.is_parsed():
    name = "grain_enable_multiprocess_worker_profiling"
    if name in flags.FLAGS and not flags.FLAGS[name].present:
      flags.FLAGS[name].present = True


class BatchReader:
  """Reads this process's rows of the global batch at any position, in the main process or, with
  ``worker_count > 0``, from a grain ``mp_prefetch`` pipeline that guesses the next request (see the
  module docstring). Call :meth:`close` to stop the workers (they also stop when it is collected)."""

  def __init__(self, reader: Callable[[np.ndarray], Rows], order: EpochOrder, *, process_index: int,
               process_count: int, transform: Callable[[Rows], Rows] | None = None,
               worker_count: int = 0, worker_buffer_size: int = 2):
    if not _is_int(worker_count) or worker_count < 0:
      raise ValueError(f"worker_count must be an int >= 0, got {worker_count!r}")
    if not _is_int(worker_buffer_size) or worker_buffer_size < 1:
      raise ValueError(f"worker_buffer_size must be a positive int, got {worker_buffer_size!r}")
    self.reader, self.order, self.transform = reader, order, transform
    self.process_index, self.process_count = process_index, process_count
    self.worker_count, self.worker_buffer_size = int(worker_count), int(worker_buffer_size)
    self._pipeline: Any = None
    self._expected: tuple[int, int] | None = None   # the (position, batch size) the pipeline serves next
    self._last_size: int | None = None

  def read(self, position: int, batch_size: int) -> Rows:
    """This process's rows of the global batch ``sigma[position : position + batch_size]``."""
    if self.worker_count and self._pipeline is not None and self._expected == (position, batch_size):
      # Plain arrays: grain hands over shared-memory arrays that are unlinked when collected.
      rows = jax.tree.map(np.array, next(self._pipeline))
      self._expected = (position + batch_size, batch_size)
    else:
      self.close()
      local = batch_size // self.process_count
      rows = self.reader(self.order.take(position + self.process_index * local, local))
      if self.transform is not None:
        rows = self.transform(rows)
      if self.worker_count and self._last_size == batch_size:
        self._start(position + batch_size, batch_size)
    self._last_size = batch_size
    return rows

  def _start(self, position: int, batch_size: int) -> None:
    _default_unparsed_grain_flags()
    ds = batch_dataset(self.reader, self.order, start=position, batch_size=batch_size,
                       process_index=self.process_index, process_count=self.process_count,
                       transform=self.transform)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                     per_worker_buffer_size=self.worker_buffer_size))
    self._pipeline = iter(ds)
    self._expected = (position, batch_size)

  def close(self) -> None:
    """Stops the worker processes, if any run."""
    if self._pipeline is not None:
      self._pipeline.close()
    self._pipeline, self._expected = None, None
