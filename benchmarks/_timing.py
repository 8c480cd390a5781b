"""Timing helper shared by the benchmark scripts (run them as `python benchmarks/<name>.py`)."""
import time

import jax


def timed(fn, steps: int) -> float:
  """Mean seconds per call of ``fn()`` over ``steps`` calls, waiting for the last result."""
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps
