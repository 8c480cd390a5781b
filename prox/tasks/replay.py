"""Experience replay with a fixed-size reservoir memory, as a pure state machine (Vitter 1985; Chaudhry et al.
2019, "On tiny episodic memories in continual learning").

Algorithm R: the ``n``-th example of the stream (0-based) is stored in slot ``n`` while the memory is not
full; afterwards it replaces slot ``j ~ U{0, ..., n}`` if ``j < capacity`` and is dropped otherwise, so at any
time the memory is a uniform sample (without replacement) of everything seen. ``reservoir_add`` processes a
whole batch at once and gives exactly the result of adding its examples one by one (draws are independent
of the memory's content; when two examples of a batch pick the same slot the later one wins).

Usage in a training step (shapes never change, nothing recompiles)::

  memory = reservoir_init({"image": x[0], "label": y[0]}, capacity=500)
  ...
  mem_batch, mem_valid = reservoir_sample(memory, k1, n=32)
  mixed, weights = mix_batches({"image": x, "label": y}, mem_batch, mem_valid)
  loss = sum(weights * per_example_loss(mixed)) / sum(weights)
  memory = reservoir_add(memory, {"image": x, "label": y}, k2)

In a data-parallel step (``prox.step``) the loss of each micro-batch on each device is averaged, so a
memory sample drawn per micro-batch would depend on the layout. :func:`replay_mix` draws ONE sample for
the whole global batch (the same key in every group) and gives each micro-batch its share and loss
weights whose mean over the groups is the weighted mean over the global mixed batch: 1 device and 4
devices train alike. The memory is updated after the step (a ``transition``) with ``reservoir_add`` on
the global batch.

:class:`RecentBatches` is a ring of the last ``size`` batches (``recent_init`` / ``recent_push`` /
``recent_oldest``), e.g. the data of a Fisher computed when a task switch is detected: the newest batches
may already belong to the new task, the oldest ones not.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class ReservoirState(NamedTuple):
  """Reservoir memory.

  Attributes:
    data: a pytree like one example, each leaf with a leading ``capacity`` axis.
    seen: int32 scalar, number of examples offered so far (stored or not).
  """
  data: PyTree
  seen: jax.Array


def reservoir_init(example: PyTree, capacity: int) -> ReservoirState:
  """Empty memory for examples shaped like ``example`` (one example, no batch axis; arrays or
  ``jax.ShapeDtypeStruct``)."""
  if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}")
  data = jax.tree.map(lambda x: jnp.zeros((capacity,) + tuple(jnp.shape(x)), x.dtype), example)
  return ReservoirState(data=data, seen=jnp.zeros((), jnp.int32))


def _capacity(state: ReservoirState) -> int:
  return int(jax.tree.leaves(state.data)[0].shape[0])


def reservoir_size(state: ReservoirState) -> jax.Array:
  """int32: number of filled slots, ``min(seen, capacity)``."""
  return jnp.minimum(state.seen, _capacity(state))


@jax.jit
def reservoir_add(
    state: ReservoirState, batch: PyTree, key: jax.Array, valid: jax.Array | None = None
) -> ReservoirState:
  """Offer a batch (leaves ``[B, ...]``) to the memory (Algorithm R, vectorised).

  ``valid`` (bool ``[B]``, optional) marks padding examples that must not be offered.
  """
  cap = _capacity(state)
  b_leaves = jax.tree.leaves(batch)
  b = int(b_leaves[0].shape[0])
  structure_ok = jax.tree.structure(batch) == jax.tree.structure(state.data)
  if not structure_ok or any(x.shape[1:] != m.shape[1:] for x, m in zip(b_leaves, jax.tree.leaves(state.data))):
    raise ValueError("reservoir_add: batch does not match the memory's example structure/shapes")
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  # stream index of each offered example (invalid ones are not counted)
  n = state.seen + jnp.cumsum(valid.astype(jnp.int32)) - 1
  j = jax.random.randint(key, (b,), 0, n + 1)  # U{0..n}
  slot = jnp.where(n < cap, n, j)
  keep = valid & (slot < cap)
  # last writer wins: drop an example if a later kept example of the batch targets the same slot
  later = jnp.triu(jnp.ones((b, b), bool), k=1)
  overwritten = jnp.any(later & (slot[:, None] == slot[None, :]) & keep[None, :], axis=1)
  slot = jnp.where(keep & ~overwritten, slot, cap)  # index ``cap`` is out of bounds -> dropped
  data = jax.tree.map(lambda m, x: m.at[slot].set(x.astype(m.dtype), mode="drop"), state.data, batch)
  return ReservoirState(data=data, seen=state.seen + jnp.sum(valid.astype(jnp.int32)))


@functools.partial(jax.jit, static_argnums=2)
def reservoir_sample(state: ReservoirState, key: jax.Array, n: int) -> tuple[PyTree, jax.Array]:
  """``n`` distinct stored examples drawn uniformly (without replacement) and a bool ``[n]`` validity mask.

  While fewer than ``n`` examples are stored, the extra rows are arbitrary memory slots marked invalid
  (``valid[i] = False``); with an empty memory every row is invalid.
  """
  cap = _capacity(state)
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= cap:
    raise ValueError(f"n must be an int in [1, capacity={cap}], got {n!r}")
  size = reservoir_size(state)
  scores = jax.random.uniform(key, (cap,))
  scores = jnp.where(jnp.arange(cap) < size, scores, 2.0)  # empty slots sort last
  _, idx = jax.lax.top_k(-scores, n)
  valid = jnp.arange(n) < size
  return jax.tree.map(lambda m: m[idx], state.data), valid


class Reservoir(NamedTuple):
  """The reservoir memory as a state machine (the convention of prox's other machines): pure functions
  ``init(example) -> state``, ``add(state, batch, key, valid=None) -> state``,
  ``sample(state, key, n) -> (examples, valid)`` and ``size(state) -> int32``."""
  init: Any
  add: Any
  sample: Any
  size: Any


def reservoir(capacity: int) -> Reservoir:
  """A reservoir memory of ``capacity`` examples (Algorithm R; module docstring)::

    memory = reservoir(500)
    state = memory.init({"image": x[0], "label": y[0]})
    state = memory.add(state, {"image": x, "label": y}, key)
    examples, valid = memory.sample(state, key, 32)
  """
  reservoir_init(jnp.zeros(()), capacity)          # checks capacity now, not at the first init
  return Reservoir(init=lambda example: reservoir_init(example, capacity), add=reservoir_add,
                   sample=reservoir_sample, size=reservoir_size)


@jax.jit
def mix_batches(batch: PyTree, memory_batch: PyTree, memory_valid: jax.Array) -> tuple[PyTree, jax.Array]:
  """Concatenate the current batch and a memory batch; float32 weights ``[B + n]`` (1 for the current
  examples, ``memory_valid`` for the memory ones) for a weighted mean loss ``sum(w l) / sum(w)``."""
  b = int(jax.tree.leaves(batch)[0].shape[0])
  mixed = jax.tree.map(lambda x, m: jnp.concatenate([x, m.astype(x.dtype)]), batch, memory_batch)
  weights = jnp.concatenate([jnp.ones((b,), jnp.float32), jnp.asarray(memory_valid, jnp.float32)])
  return mixed, weights


def replay_mix(
    memory: ReservoirState,
    key: jax.Array,
    batch: PyTree,
    *,
    num: int,
    first_row: jax.Array | int,
    global_rows: int,
) -> tuple[PyTree, jax.Array]:
  """One micro-batch's part of a replay-mixed global batch, and its loss weights.

  The global batch is the ``B = global_rows`` current examples and ``num`` memory examples drawn with
  ``reservoir_sample(memory, key, num)`` (``v_j`` = 1 for a drawn stored example, 0 while the memory holds
  fewer); the loss is the weighted mean ``L = (sum_i l_i + sum_j v_j l_j) / (B + n)``, ``n = sum_j v_j``.
  A micro-batch holding the ``b`` current rows ``[r, r + b)`` (``b`` from ``batch``'s leading axis,
  ``r = first_row``) takes the draws ``[r num / B, (r + b) num / B)`` and weights scaled by ``B / b``,

      w_i = (B / b) / (B + n),    w_j = (B / b) v_j / (B + n),

  so that ``sum(w * l)`` over its rows, averaged over the ``B / b`` micro-batches (as the step does),
  is ``L``. Pass the same ``key`` to every micro-batch (e.g. derived from the step, not from the
  micro-batch's own key): the draw, hence the update, is then independent of the device layout.

  Args:
    memory: the reservoir (``data`` with the same leaves as ``batch``).
    key: the draw's key, the same for every micro-batch of the step.
    batch: this micro-batch's current examples, leaves ``[b, ...]``.
    num: memory examples per global batch, ``1 <= num <= capacity``; ``num * b`` must divide by ``B``.
    first_row: the global row index of ``batch``'s first row (a multiple of ``b``).
    global_rows: ``B``, current examples in the global batch.

  Returns:
    ``(mixed, weights)``: ``batch`` followed by its ``num b / B`` memory examples, and float32 weights
    ``[b + num b / B]``; the loss is ``sum(weights * per_example_loss(mixed))`` (not normalised again).
  """
  b = int(jax.tree.leaves(batch)[0].shape[0])
  if not isinstance(global_rows, (int, np.integer)) or global_rows < b or global_rows % b:
    raise ValueError(f"global_rows must be a multiple of the micro-batch's {b} rows, got {global_rows!r}")
  if not isinstance(num, (int, np.integer)) or (num * b) % global_rows:
    raise ValueError(f"num * rows per micro-batch must divide by global_rows: {num!r} * {b} % "
                     f"{global_rows} != 0")
  share = num * b // global_rows
  drawn, valid = reservoir_sample(memory, key, num)
  start = jnp.asarray(first_row, jnp.int32) * num // global_rows
  part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, share), drawn)
  valid_part = jax.lax.dynamic_slice_in_dim(valid, start, share).astype(jnp.float32)
  scale = (global_rows / b) / (global_rows + jnp.sum(valid.astype(jnp.float32)))
  mixed = jax.tree.map(lambda x, m: jnp.concatenate([x, m.astype(x.dtype)]), batch, part)
  weights = jnp.concatenate([jnp.ones((b,), jnp.float32), valid_part]) * scale
  return mixed, weights


class RecentBatches(NamedTuple):
  """A ring of the last ``size`` batches.

  Attributes:
    data: leaves ``[size, B, ...]``; batch ``k`` (0-based, in push order) is in slot ``k % size``.
    pushes: int32 scalar, number of batches pushed so far.
  """
  data: PyTree
  pushes: jax.Array


def recent_init(batch: PyTree, size: int) -> RecentBatches:
  """An empty ring for ``size`` batches shaped like ``batch`` (leaves ``[B, ...]``; arrays or
  ``jax.ShapeDtypeStruct``)."""
  if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  data = jax.tree.map(lambda x: jnp.zeros((size,) + tuple(jnp.shape(x)), x.dtype), batch)
  return RecentBatches(data=data, pushes=jnp.zeros((), jnp.int32))


def recent_push(state: RecentBatches, batch: PyTree) -> RecentBatches:
  """Stores ``batch`` in place of the oldest one (jittable; shapes never change)."""
  size = int(jax.tree.leaves(state.data)[0].shape[0])
  slot = state.pushes % size
  data = jax.tree.map(
      lambda r, x: jax.lax.dynamic_update_index_in_dim(r, jnp.asarray(x).astype(r.dtype), slot, 0),
      state.data, batch)
  return RecentBatches(data=data, pushes=state.pushes + 1)


def recent_oldest(state: RecentBatches, k: int) -> tuple[PyTree, jax.Array]:
  """The ``k`` oldest of the ``size`` stored batches, concatenated (leaves ``[k B, ...]``, oldest first),
  and whether they exist (bool scalar: at least ``size`` batches were pushed)."""
  size = int(jax.tree.leaves(state.data)[0].shape[0])
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= size:
    raise ValueError(f"k must be an int in [1, size={size}], got {k!r}")
  slots = (state.pushes + jnp.arange(k)) % size
  out = jax.tree.map(lambda r: r[slots].reshape((-1,) + r.shape[2:]), state.data)
  return out, state.pushes >= size
