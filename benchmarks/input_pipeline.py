"""The grain input pipeline (prox.tasks.GrainSource) vs the hand-written loader (data.next_batch).

Host time per batch of the next global batch of an in-memory training split, one process:

  hand        prox.tasks.data.next_batch: the hand-written epoch loader (a seeded permutation per call,
              one gather), the baseline.
  grain       GrainSource(ds, seed).next(b): the order as a grain MapDataset of example indices
              (EpochOrder, cached epoch permutations), one vectorised gather per call; the same batches.
  workers     GrainSource(ds, seed, worker_count=W).next(b): the same batches read ahead by W grain
              mp_prefetch worker processes (warm-up, including the workers' start, excluded); the
              main process only takes finished batches from the workers. Before each timed block the
              batches they prefetched meanwhile are taken untimed: the block times their steady
              production, as when the step takes no time (a slow step hides more of it).
  per-record  grain's textbook pipeline MapDataset.range(N).shuffle(seed).repeat().map(row).batch(b),
              iterated in the calling process: per-example index_shuffle, reads and stacking (another
              order; for reference: why the order is a vectorised MapDataset of indices).

Rows ``digits`` (1,347 8x8 images) and ``mnist1d`` (MNIST-1D's standard 4,000-sample split) at batches
128 and 1024, and ``varying``: a batch size that changes at every call (64, 96, ..., 1024, as a growing
batch-size controller asks), timed per call over the sequence (workers are off there: each change of
size would restart them).

Row ``records``: the digits written to an ArrayRecord file (one record per example: 64 float32 pixels
and the label as bytes), read back through ``grain.sources.ArrayRecordDataSource`` and a decoding
``map`` (one batched read and a decode per example per call): ``grain`` in the calling process vs
``workers``; there is no hand-written loader for records, so its ratios are to ``grain``.

Calls alternate within each repeat (``--calls`` calls of each variant per repeat), so machine noise hits
all alike; each figure is the median over repeats of wall time per batch, and of process CPU time (the
calling process only: the workers' CPU is not in it). ratio = variant / hand (<= 1: no slower).

  python benchmarks/input_pipeline.py [--repeats 15] [--calls 50] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import grain
import numpy as np

from prox.tasks import GrainSource
from prox.tasks import data


def _hand(ds: data.ArrayDataset, seed: int):
  state = data.loader_init(seed)

  def call(size: int):
    nonlocal state
    batch, state = data.next_batch(ds, state, size)
    return batch

  return call


def _grain(ds: data.ArrayDataset, seed: int, **kw):
  source = GrainSource(ds, seed, process_index=0, process_count=1, **kw)
  return (lambda size: source.next(size).data), source


def _per_record(ds: data.ArrayDataset, seed: int, size: int):
  images, labels = ds.images, ds.labels
  pipeline = (grain.MapDataset.range(len(labels)).shuffle(seed=seed).repeat()
              .map(lambda i: {"image": images[i], "label": labels[i]}).batch(size))
  iterator = iter(pipeline.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1)))
  return lambda size: next(iterator)


def _decode(raw: bytes) -> dict[str, np.ndarray]:
  values = np.frombuffer(raw, np.float32)
  return {"image": values[:-1].reshape(8, 8, 1), "label": values[-1:].astype(np.int32)[0]}


def _records(ds: data.ArrayDataset, directory: str) -> grain.MapDataset:
  """``ds`` as an ArrayRecord file, read back as a grain MapDataset of decoded examples."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, "digits.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for image, label in zip(ds.images, ds.labels):
    writer.write(np.append(image.ravel(), np.float32(label)).astype(np.float32).tobytes())
  writer.close()
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map(_decode)


def _time(fn, sizes) -> tuple[float, float]:
  """Wall and CPU seconds per call of ``fn(size)`` over ``sizes``."""
  wall, cpu = time.perf_counter(), time.process_time()
  for size in sizes:
    fn(size)
  return (time.perf_counter() - wall) / len(sizes), (time.process_time() - cpu) / len(sizes)


def _measure(fns: dict, sizes_of, repeats: int, drain: dict[str, int] | None = None,
             ) -> dict[str, tuple[float, float]]:
  """Medians over repeats; ``drain[name]`` untimed calls before each timed block of ``name`` (the
  batches its workers prefetched while the other variants ran), so a block times steady production."""
  times = {name: ([], []) for name in fns}
  for rep in range(repeats):
    for name, fn in fns.items():
      sizes = sizes_of(name, rep)
      for _ in range((drain or {}).get(name, 0)):
        fn(sizes[0])
      wall, cpu = _time(fn, sizes)
      times[name][0].append(wall)
      times[name][1].append(cpu)
  return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def _report(label: str, size: str, med: dict[str, tuple[float, float]], reference: str = "hand") -> None:
  hand_wall, hand_cpu = med[reference]
  for name, (wall, cpu) in med.items():
    print(f"{label:>8} {size:>8} {name:>10} {wall * 1e6:>11.1f} {cpu * 1e6:>10.1f} "
          f"{wall / hand_wall:>10.2f} {cpu / hand_cpu:>9.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--calls", type=int, default=50)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  buffered = args.workers * (2 + 2)   # batches the workers may hold ready (buffer of 2 each, and more)
  print(f"{'data':>8} {'batch':>8} {'variant':>10} {'wall us':>11} {'cpu us':>10} {'wall ratio':>10} "
        f"{'cpu ratio':>9}")
  for name in ("digits", "mnist1d"):
    ds = data.load(name, "train")
    for size in (128, 1024):
      fns = {"hand": _hand(ds, 0)}
      fns["grain"], _ = _grain(ds, 0)
      fns["workers"], workers = _grain(ds, 0, worker_count=args.workers)
      record_calls = max(1, args.calls // 10)   # about 30 us per example: fewer calls
      fns["per-record"] = _per_record(ds, 0, size)
      for fn in fns.values():                   # warm-up: caches, and the workers' start
        _time(fn, [size] * 20)
      med = _measure(fns, lambda n, rep, size=size: [size] * (record_calls if n == "per-record"
                                                               else args.calls), args.repeats,
                     drain={"workers": buffered})
      workers.close()
      _report(name, str(size), med)
    sizes = list(range(64, 1025, 32))
    fns = {"hand": _hand(ds, 0)}
    fns["grain"], _ = _grain(ds, 0)
    for fn in fns.values():
      _time(fn, sizes)
    _report(name, "varying", _measure(fns, lambda n, rep: sizes, args.repeats))
  with tempfile.TemporaryDirectory() as directory:
    records = _records(data.load("digits", "train"), directory)
    for size in (128, 1024):
      fns = {}
      fns["hand"], _ = _grain(records, 0)   # the reference of this row: grain in the calling process
      fns["workers"], workers = _grain(records, 0, worker_count=args.workers)
      for fn in fns.values():
        _time(fn, [size] * 20)
      med = _measure(fns, lambda n, rep, size=size: [size] * max(1, args.calls // 5), args.repeats,
                     drain={"workers": buffered})
      workers.close()
      med = {"grain" if n == "hand" else n: v for n, v in med.items()}
      _report("records", str(size), med, reference="grain")


if __name__ == "__main__":
  main()
