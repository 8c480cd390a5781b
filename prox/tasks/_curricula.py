"""Curricula over a chain's steps and over tagged data: a backward interval and a staged difficulty sampler.

Backward interval (Hu et al. 2025, "Towards Better Alignment: Training Diffusion Models with Reinforcement
Learning Against Sparse Rewards", B^2-DiffuRL's backward progressive training). A chain of ``T`` steps
(denoising steps, refinement steps of an iterative model) is trained from its end: first the last
``L_0`` steps, then an interval that grows backwards until it holds ``L_1`` steps. After ``s`` updates
the active interval is ``[t_s, T]`` (1-based) with::

    L(s) = min(L_1, L_0 + floor(s (L_1 - L_0 + 1) / S)),     t_s = T - L(s) + 1

i.e. ``L_1 - L_0 + 1`` equally long stages over ``S`` updates (the reference schedule grows the interval
by one step per stage this way). Use the mask with ``prox.losses.interval_step_loss`` and the model's
``train_from=t_s``.

Staged difficulty sampler (Lee, Cho and Yoo 2023, "Instruction Tuning with Human Curriculum"). Each
example has a difficulty level ``l_i`` (0 = easiest; e.g. IRT difficulties binned by
:func:`difficulty_levels`) and optionally a group ``g_i`` (a subject; e.g. the class). An epoch visits
every example once, in the order of the schedule:

* ``"blocked"``: group by group; inside a group from the easiest level to the hardest (order by
  ``(g, l, u)``) -- the paper's *blocking*, one subject learnt after another;
* ``"interleaved"``: from the easiest level to the hardest; inside a level the groups take turns, one
  example of each group in a round (order by ``(l, r, g)`` with ``r`` the example's rank, by ``u``, among
  the examples of its level and group) -- the paper's *(global) interleaving*;
* ``"mixed"``: a uniformly random order (by ``u``) -- the random-shuffling baseline;

with ``u`` i.i.d. uniform per epoch (ties broken at random, a new draw each epoch from the state's key).
Without groups, ``"blocked"`` and ``"interleaved"`` are the same easy-to-hard order.

Departures. B^2-DiffuRL runs its stages as separate sampling-and-training rounds of a text-to-image model
with branch-based sampling inside each interval; here the schedule is a pure function of the update
counter. Lee et al. tag generated instructions with educational stages and Bloom's levels; any integer
levels and groups serve here (``difficulty_levels`` turns continuous difficulties, e.g. from
``prox.tasks.irt.fit_1pl``, into levels).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("blocked", "interleaved", "mixed")


def _int(value: Any, name: str, minimum: int) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


# --- backward interval ---------------------------------------------------------------------------------

class IntervalState(NamedTuple):
  """State of a :func:`backward_interval`.

  Attributes:
    step: int32, updates taken.
    t_start: int32, ``t_s``, the first trained step (1-based).
    changed: bool, whether the last update extended the interval.
  """
  step: jax.Array
  t_start: jax.Array
  changed: jax.Array


class BackwardInterval(NamedTuple):
  """A backward interval schedule as pure functions (built by :func:`backward_interval`).

  Attributes:
    init: ``init() -> IntervalState`` (the last ``L_0`` steps).
    update: ``update(state, *, step=None) -> state`` (``step``: updates taken including this one,
      default ``state.step + 1``).
    t_start: ``t_start(state) -> int32``.
    mask: ``mask(state) -> bool [T]``, True on the active steps.
    num_steps: ``T``.
  """
  init: Callable[[], IntervalState]
  update: Callable[..., IntervalState]
  t_start: Callable[[IntervalState], jax.Array]
  mask: Callable[[IntervalState], jax.Array]
  num_steps: int


def backward_interval(num_steps: int, *, total_steps: int, initial: int = 1,
                      final: int | None = None) -> BackwardInterval:
  """The backward interval ``[t_s, T]`` of the module docstring.

  Args:
    num_steps: ``T``, the chain's length.
    total_steps: ``S``, updates over which the interval grows from ``L_0`` to ``L_1`` steps.
    initial: ``L_0``, steps trained at first (the last ones).
    final: ``L_1`` (default ``T``: the whole chain at the end).
  """
  T = _int(num_steps, "num_steps", 1)
  S = _int(total_steps, "total_steps", 1)
  L0 = _int(initial, "initial", 1)
  L1 = T if final is None else _int(final, "final", 1)
  if not L0 <= L1 <= T:
    raise ValueError(f"need 1 <= initial <= final <= num_steps, got initial={L0}, final={L1}, num_steps={T}")

  if S * (L1 - L0 + 1) >= 2**31:
    raise ValueError(f"total_steps x (final - initial + 1) must stay below 2**31, got {S} x {L1 - L0 + 1}")

  def t_start_at(s: jax.Array) -> jax.Array:
    s = jnp.clip(s, 0, S)                 # at s = S the interval is complete; no int32 overflow
    length = jnp.minimum(L1, L0 + (s * (L1 - L0 + 1)) // S)
    return (T - length + 1).astype(jnp.int32)

  def init() -> IntervalState:
    return IntervalState(step=jnp.zeros((), jnp.int32), t_start=jnp.array(T - L0 + 1, jnp.int32),
                         changed=jnp.zeros((), bool))

  def update(state: IntervalState, *, step: Any = None) -> IntervalState:
    s = state.step + 1 if step is None else jnp.asarray(step, jnp.int32)
    t = t_start_at(s)
    return IntervalState(step=s, t_start=t, changed=t != state.t_start)

  def mask(state: IntervalState) -> jax.Array:
    return jnp.arange(1, T + 1, dtype=jnp.int32) >= state.t_start

  return BackwardInterval(init=init, update=update, t_start=lambda s: s.t_start, mask=mask, num_steps=T)


# --- staged difficulty sampler -------------------------------------------------------------------------

def difficulty_levels(difficulties: Any, num_levels: int) -> jax.Array:
  """int32 levels ``0..L-1`` from continuous ``difficulties`` (e.g. IRT item difficulties ``b_i``) in
  equal-count bins by rank: ``l_i = floor(L rank_i / N)``, ``rank_i`` the position of ``b_i`` in the
  stable ascending order (equal difficulties, common in a 1PL fit, are split by index)."""
  L = _int(num_levels, "num_levels", 1)
  b = jnp.asarray(difficulties, jnp.float32)
  if b.ndim != 1 or b.shape[0] == 0:
    raise ValueError(f"difficulties must be a non-empty vector, got shape {b.shape}")
  n = b.shape[0]
  rank = jnp.zeros((n,), jnp.int32).at[jnp.argsort(b, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
  if n * L >= 2**31:
    raise ValueError(f"{n} difficulties x {L} levels must stay below 2**31")
  return (rank * L) // n


class StagedSamplerState(NamedTuple):
  """State of a :func:`staged_sampler`.

  Attributes:
    order: int32 ``[N]``, this epoch's visiting order.
    position: int32, examples of this epoch already drawn.
    epoch: int32.
    key: uint32 key data (``jax.random.key_data``) of the run's tie-breaking draws.
  """
  order: jax.Array
  position: jax.Array
  epoch: jax.Array
  key: jax.Array


class StagedSampler(NamedTuple):
  """A staged sampler as pure functions (built by :func:`staged_sampler`).

  Attributes:
    init: ``init(seed_or_key) -> StagedSamplerState`` (epoch 0, position 0).
    next: ``next(state, batch_size) -> (indices int32 [batch_size], state)``: the next examples of the
      schedule; an epoch that ends inside a batch continues with the next epoch's order.
    epoch_order: ``epoch_order(key_data, epoch) -> int32 [N]``, the order of one epoch.
    schedule: the schedule's name.
    num_examples: ``N``.
  """
  init: Callable[..., StagedSamplerState]
  next: Callable[[StagedSamplerState, int], tuple[jax.Array, StagedSamplerState]]
  epoch_order: Callable[[jax.Array, Any], jax.Array]
  schedule: str
  num_examples: int


def staged_sampler(levels: Any, groups: Any = None, *, schedule: str = "interleaved") -> StagedSampler:
  """A seeded, pure sampler visiting examples in a blocked, interleaved or mixed order (module docstring).

  Args:
    levels: int ``[N]`` difficulty levels (>= 0; 0 easiest).
    groups: optional int ``[N]`` groups (>= 0), e.g. subjects or classes.
    schedule: ``"blocked"``, ``"interleaved"`` or ``"mixed"``.

  Returns:
    A :class:`StagedSampler`.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  lv = np.asarray(levels)
  if lv.ndim != 1 or lv.shape[0] == 0 or not np.issubdtype(lv.dtype, np.integer) or lv.min() < 0:
    raise ValueError(f"levels must be a non-empty vector of integers >= 0, got {levels!r:.80}")
  n = int(lv.shape[0])
  gr = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
  if gr.shape != lv.shape or not np.issubdtype(gr.dtype, np.integer) or gr.min() < 0:
    raise ValueError(f"groups must be integers >= 0 of the shape of levels {lv.shape}, got {groups!r:.80}")
  t_level = jnp.asarray(lv, jnp.int32)
  t_group = jnp.asarray(gr, jnp.int32)
  pair = lv.astype(np.int64) * (int(gr.max()) + 1) + gr.astype(np.int64)   # (level, group), on the host
  cell = jnp.asarray(np.unique(pair, return_inverse=True)[1].reshape(-1), jnp.int32)
  arange = jnp.arange(n, dtype=jnp.int32)

  def epoch_order(key_data: jax.Array, epoch: Any) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32)), epoch)
    u = jax.random.uniform(key, (n,))
    if schedule == "mixed":
      return jnp.argsort(u).astype(jnp.int32)
    if schedule == "blocked":
      return jnp.lexsort((u, t_level, t_group)).astype(jnp.int32)
    by_cell = jnp.lexsort((u, cell))                       # examples sorted by (cell, u)
    sorted_cell = cell[by_cell]
    first = jnp.searchsorted(sorted_cell, sorted_cell, side="left").astype(jnp.int32)
    rank = jnp.zeros((n,), jnp.int32).at[by_cell].set(arange - first)
    return jnp.lexsort((t_group, rank, t_level)).astype(jnp.int32)

  def init(seed: Any = 0) -> StagedSamplerState:
    key = seed if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) \
        else jax.random.key(seed)
    data = jax.random.key_data(key)
    return StagedSamplerState(order=epoch_order(data, 0), position=jnp.zeros((), jnp.int32),
                              epoch=jnp.zeros((), jnp.int32), key=data)

  def next_(state: StagedSamplerState, batch_size: int) -> tuple[jax.Array, StagedSamplerState]:
    b = _int(batch_size, "batch_size", 1)
    if b > n:
      raise ValueError(f"batch_size {b} is larger than the {n} examples of an epoch")
    p = state.position + jnp.arange(b, dtype=jnp.int32)
    crosses = state.position + b >= n
    following = jax.lax.cond(crosses, lambda: epoch_order(state.key, state.epoch + 1), lambda: state.order)
    idx = jnp.where(p < n, state.order[jnp.minimum(p, n - 1)], following[jnp.maximum(p - n, 0)])
    new = StagedSamplerState(order=jnp.where(crosses, following, state.order),
                             position=jnp.where(crosses, state.position + b - n, state.position + b),
                             epoch=state.epoch + crosses.astype(jnp.int32), key=state.key)
    return idx, new

  return StagedSampler(init=init, next=next_, epoch_order=epoch_order, schedule=schedule, num_examples=n)
