"""Batch-size controller of AdAdaGrad (Lau, Liu, Kolar 2024) as a pure state transition.

    b_{k+1} = min(max(b_k, round_up(ceil(b'_k), r)), b_max)

``b'_k`` is the batch size a test of ``prox.optim.batch_tests`` asks for, ``r`` = micro-batch x
devices (``multiple_of``), ``round_up(x, r)`` the smallest multiple of ``r`` that is ``>= x``. The
batch size never decreases, is always a multiple of ``r`` and never exceeds ``b_max``.
The baseline schedules of the paper (constant, stagewise doubling, linear ramp-up) are pure
functions of the step, and :func:`bucket` gives the power-of-two number of micro-batches a step
pads to, so that a growing batch compiles at most once per power-of-two bucket.

Everything in the state is an array, so it checkpoints and resumes exactly. This file imports
only jax and numpy.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_INT_LIMIT = 2**30  # keeps all int32 arithmetic below overflow


class BatchSizeState(NamedTuple):
  """State of the controller (all int32 / float32 scalars).

  Attributes:
    batch_size: the current batch size ``b_k`` (a multiple of ``multiple_of``).
    max_batch_size: the cap: the largest multiple of ``multiple_of`` that is ``<= b_max``.
    multiple_of: ``r``, micro-batch size x devices.
    requested: the last ``b'`` passed to :func:`batch_size_update` (``nan`` before the first).
  """
  batch_size: jax.Array
  max_batch_size: jax.Array
  multiple_of: jax.Array
  requested: jax.Array


def _positive_int(name: str, value: Any, where: str) -> int:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{where}: {name} must be a concrete integer, got a traced value")
  try:
    as_int = operator.index(value)
  except TypeError:
    as_int = None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
      as_int = int(value)
  if as_int is None or isinstance(value, bool):
    raise TypeError(f"{where}: {name} must be an integer, got {value!r}")
  if not 1 <= as_int <= _INT_LIMIT:
    raise ValueError(f"{where}: {name} must be in [1, 2**30], got {value!r}")
  return as_int


def _cap(b0: int, b_max: int, multiple_of: int, where: str) -> int:
  if b0 % multiple_of:
    raise ValueError(f"{where}: b0={b0} is not a multiple of multiple_of={multiple_of} (micro-batch x devices)")
  if b0 > b_max:
    raise ValueError(f"{where}: b0={b0} is larger than b_max={b_max}")
  return b_max // multiple_of * multiple_of


def batch_size_init(b0: int, b_max: int, *, multiple_of: int = 1) -> BatchSizeState:
  """Initial controller state with batch size ``b0``.

  Args:
    b0: initial batch size, a multiple of ``multiple_of`` (the AdAdaGrad paper's default: 64).
    b_max: maximum batch size (the AdAdaGrad paper's default: 50,000). If it is not a multiple of
      ``multiple_of``, the cap is the largest multiple below it.
    multiple_of: ``r`` = micro-batch size x number of devices.

  Raises:
    ValueError: ``b0 > b_max``, ``b0`` not a multiple of ``multiple_of``, or a value outside
      ``[1, 2**30]``; TypeError for non-integers.
  """
  where = "batch_size_init"
  b0 = _positive_int("b0", b0, where)
  b_max = _positive_int("b_max", b_max, where)
  multiple_of = _positive_int("multiple_of", multiple_of, where)
  cap = _cap(b0, b_max, multiple_of, where)
  return BatchSizeState(
      batch_size=jnp.asarray(b0, jnp.int32),
      max_batch_size=jnp.asarray(cap, jnp.int32),
      multiple_of=jnp.asarray(multiple_of, jnp.int32),
      requested=jnp.asarray(jnp.nan, jnp.float32),
  )


def batch_size_update(state: BatchSizeState, requested: jax.Array | float) -> BatchSizeState:
  """``b <- min(max(b, round_up(ceil(b'), r)), b_max)``; jittable, ``requested`` may be traced.

  A ``nan`` request (no estimate, e.g. fewer than 2 groups) keeps the batch size; ``inf`` (zero
  gradient) goes to the cap.

  Args:
    state: the controller state.
    requested: ``b'``, the batch size a test asks for (any real scalar).

  Returns:
    The new state.
  """
  r = jnp.asarray(requested, jnp.float32)
  cap = state.max_batch_size
  clipped = jnp.clip(jnp.where(jnp.isnan(r), 0.0, r), 0.0, cap.astype(jnp.float32))
  wanted = jnp.ceil(clipped).astype(jnp.int32)
  multiple = state.multiple_of
  wanted = (wanted + multiple - 1) // multiple * multiple
  new = jnp.minimum(jnp.maximum(state.batch_size, wanted), cap)
  return state._replace(batch_size=new.astype(jnp.int32), requested=r)


# ----------------------------------------------------------------------------------------------
# baseline schedules: functions step -> batch size


def constant_batch_size(b0: int) -> Callable[[jax.Array | int], jax.Array]:
  """Constant baseline: ``b_k = b0``."""
  b0 = _positive_int("b0", b0, "constant_batch_size")
  return lambda step: jnp.full(jnp.shape(step), b0, jnp.int32)


def stagewise_doubling(
    b0: int, b_max: int, *, every: int | None = None, milestones: Sequence[int] | None = None,
    multiple_of: int = 1,
) -> Callable[[jax.Array | int], jax.Array]:
  """Stagewise doubling baseline: ``b_k = min(b0 * 2^stage(k), cap)``.

  ``stage(k) = k // every``, or the number of ``milestones`` that are ``<= k``. (The reference
  code counts stages in samples seen; a step-based schedule is a pure function of the step.)

  Args:
    b0: initial batch size, a multiple of ``multiple_of``.
    b_max: maximum batch size (the cap is the largest multiple of ``multiple_of`` below it).
    every: double every ``every`` steps; or
    milestones: increasing steps at which the batch size doubles.
    multiple_of: micro-batch x devices.
  """
  where = "stagewise_doubling"
  b0 = _positive_int("b0", b0, where)
  b_max = _positive_int("b_max", b_max, where)
  multiple_of = _positive_int("multiple_of", multiple_of, where)
  cap = _cap(b0, b_max, multiple_of, where)
  if (every is None) == (milestones is None):
    raise ValueError(f"{where}: give exactly one of every= and milestones=")
  max_stage = int(np.ceil(np.log2(cap / b0))) if cap > b0 else 0
  if every is not None:
    every = _positive_int("every", every, where)
    stage_fn = lambda step: step // every
  else:
    ms = np.asarray([_positive_int("milestones", m, where) for m in milestones], np.int32)
    if np.any(np.diff(ms) <= 0):
      raise ValueError(f"{where}: milestones must be strictly increasing, got {list(milestones)}")
    stage_fn = lambda step: jnp.searchsorted(jnp.asarray(ms), step, side="right")

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    stage = jnp.clip(stage_fn(step), 0, max_stage).astype(jnp.int32)
    return jnp.minimum(b0 * jnp.left_shift(jnp.int32(1), stage), cap).astype(jnp.int32)

  return schedule


def linear_ramp_up(
    b0: int, b_max: int, *, increment: int, multiple_of: int = 1,
) -> Callable[[jax.Array | int], jax.Array]:
  """Linear ramp-up baseline: ``b_k = min(b0 + increment * k, cap)`` (the reference's ramp-up).

  Args:
    b0: initial batch size, a multiple of ``multiple_of``.
    b_max: maximum batch size (the cap is the largest multiple of ``multiple_of`` below it).
    increment: added every step; a multiple of ``multiple_of``.
    multiple_of: micro-batch x devices.
  """
  where = "linear_ramp_up"
  b0 = _positive_int("b0", b0, where)
  b_max = _positive_int("b_max", b_max, where)
  multiple_of = _positive_int("multiple_of", multiple_of, where)
  increment = _positive_int("increment", increment, where)
  cap = _cap(b0, b_max, multiple_of, where)
  if increment % multiple_of:
    raise ValueError(f"{where}: increment={increment} is not a multiple of multiple_of={multiple_of}")
  max_steps = -(-(cap - b0) // increment)

  def schedule(step):
    step = jnp.clip(jnp.asarray(step, jnp.int32), 0, max_steps)
    return jnp.minimum(b0 + increment * step, cap).astype(jnp.int32)

  return schedule


# ----------------------------------------------------------------------------------------------
# compile buckets


def num_micro_batches(batch_size: Any, multiple_of: int) -> int:
  """``ceil(batch_size / multiple_of)``: how many real micro-batch rounds a step needs (a Python int)."""
  b = _positive_int("batch_size", batch_size, "num_micro_batches")
  r = _positive_int("multiple_of", multiple_of, "num_micro_batches")
  return -(-b // r)


def bucket(batch_size: Any, multiple_of: int) -> int:
  """The power of two ``>= ceil(batch_size / multiple_of)``: micro-batches the compiled step pads to.

  The step compiled for ``bucket`` micro-batches serves every batch size in that bucket (the
  extra micro-batches masked out), so a growing batch compiles at most once per power of two.

  Args:
    batch_size: a concrete integer (e.g. ``int(state.batch_size)``); not traced: the result is a
      static shape.
    multiple_of: micro-batch size x devices.

  Returns:
    A Python int ``2^ceil(log2(ceil(batch_size / multiple_of)))``.
  """
  n = num_micro_batches(batch_size, multiple_of)
  return 1 << (n - 1).bit_length()
