"""Sub-network choices of an elastic network, the progressive-shrinking phase machine and student samplers.

A :class:`Subnet` is a traced choice inside an elastic network (``prox.models.elastic_apply``): an option
index per block for the kernel size and the width (indices into the network's ascending
``kernel_sizes`` / ``width_fractions``) and a depth per stage (number of leading blocks kept).

Progressive shrinking (Cai, Gan, Wang, Zhang, Han 2020, "Once-for-All: Train One Network and Specialize
it for Efficient Deployment", Sec. 3.2): train the full network, then support smaller sub-networks in
order -- elastic kernel, then elastic depth, then elastic width -- each dimension enlarging its option set
one step at a time (depth ``{D} -> {D, D-1} -> ... -> {D, ..., d_min}``, width likewise), always keeping
the options already supported. :func:`progressive_shrinking` is that schedule as a pure state machine:
phase ``p`` allows kernel indices ``>= k_lo[p]``, depths ``>= max(D_s - j[p], d_min)`` and width indices
``>= w_lo[p]``. Per step it gives the sandwich (Yu & Huang 2019, "Universally Slimmable Networks and
Improved Training Techniques"): the largest sub-network (the full network, the in-place KD teacher), the
smallest allowed one, and one drawn uniformly from the allowed options (each block's kernel and width and
each stage's depth independently, as OFA's ``sample_active_subnet``).

Student sampling by robustness gap (after Mousavi, Mousavi, Daneshtalab 2025, "ProARD: Progressive
Adversarial Robustness Distillation: Provide Wide Range of Robust Students"): the largest sub-network is the
robust teacher; instead of drawing students uniformly, :func:`robust_gap_sampler` keeps a running estimate
of each candidate student's robust-accuracy gap to the teacher,
``g_i <- mu g_i + (1 - mu) (a_teacher - a_i)`` (robust accuracies under attack, measured when ``i`` is
trained), and draws students with ``P(i) = softmax(g / tau)_i``, so students that lag the teacher most
are trained most; unseen candidates start at ``g_0`` (optimistic: they are tried early).

Only jax/numpy are imported.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GapSamplerState",
    "ProgressiveShrinking",
    "RobustGapSampler",
    "ShrinkingState",
    "Subnet",
    "progressive_shrinking",
    "robust_gap_sampler",
    "stack_subnets",
    "take_subnet",
]


class Subnet(NamedTuple):
  """A sub-network of an elastic network (int32 arrays; traced or concrete).

  Attributes:
    kernel: ``[num_blocks]`` index into the ascending kernel sizes, per block.
    width: ``[num_blocks]`` index into the ascending width fractions, per block.
    depth: ``[num_stages]`` number of leading blocks kept in each stage (``>= 1``).
  """
  kernel: jax.Array
  width: jax.Array
  depth: jax.Array


def stack_subnets(subnets: Sequence[Subnet]) -> Subnet:
  """Stacks sub-networks along a new leading axis (a candidate table for :func:`robust_gap_sampler`)."""
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.int32) for x in xs]), *subnets)


def take_subnet(table: Subnet, index: jax.Array) -> Subnet:
  """Row ``index`` of a stacked table (jittable with a traced index)."""
  return jax.tree.map(lambda t: t[index], table)


# ----------------------------------------------------------------------------------------------------
# Progressive shrinking (OFA)
# ----------------------------------------------------------------------------------------------------


class ShrinkingState(NamedTuple):
  """State of :func:`progressive_shrinking`: ``count`` (int32), the number of steps taken."""
  count: jax.Array


class ProgressiveShrinking(NamedTuple):
  """The pure functions of :func:`progressive_shrinking` and its static phase table.

  Attributes:
    init: ``() -> ShrinkingState``.
    update: ``(state) -> state`` (one training step).
    phase: ``(state) -> int32`` index into ``names``.
    largest: ``() -> Subnet`` the full network.
    smallest: ``(state) -> Subnet`` the smallest sub-network the current phase allows.
    sample: ``(state, key) -> Subnet`` uniform over the current phase's options.
    sandwich: ``(state, key) -> (largest, smallest, sample)``.
    names: the phases' names, e.g. ``("full", "kernel", "depth1", "depth2", "width1", "width2")``.
    boundaries: the step at which each phase after the first starts.
  """
  init: Callable[[], ShrinkingState]
  update: Callable[[ShrinkingState], ShrinkingState]
  phase: Callable[[ShrinkingState], jax.Array]
  largest: Callable[[], Subnet]
  smallest: Callable[[ShrinkingState], Subnet]
  sample: Callable[[ShrinkingState, jax.Array], Subnet]
  sandwich: Callable[[ShrinkingState, jax.Array], tuple[Subnet, Subnet, Subnet]]
  names: tuple[str, ...]
  boundaries: tuple[int, ...]


def _phase_table(num_kernels: int, max_depths: Sequence[int], min_depth: int, num_widths: int):
  """Rows ``(name, kernel_lo, depth_reduction, width_lo)`` in OFA's order."""
  k_full, w_full = num_kernels - 1, num_widths - 1
  rows = [("full", k_full, 0, w_full)]
  if num_kernels > 1:
    rows.append(("kernel", 0, 0, w_full))
  depth_steps = max(max_depths) - min_depth
  for j in range(1, depth_steps + 1):
    rows.append((f"depth{j}", 0, j, w_full))
  for j in range(1, num_widths):
    rows.append((f"width{j}", 0, depth_steps, w_full - j))
  return rows


def progressive_shrinking(*, num_kernels: int, max_depths: Sequence[int], num_widths: int,
                          phase_steps: Sequence[int], min_depth: int = 1) -> ProgressiveShrinking:
  """OFA's progressive-shrinking schedule and sandwich sampling as a pure state machine.

  Args:
    num_kernels: number of kernel-size options (indices ``0..num_kernels-1``, ascending size).
    max_depths: the number of blocks of each stage (its largest depth).
    num_widths: number of width options (ascending fraction).
    phase_steps: steps spent in each phase, one per phase of the table: ``full``, ``kernel`` (if
      ``num_kernels > 1``), ``depth1..depthJ`` (``J = max(max_depths) - min_depth``), ``width1..``
      (``num_widths - 1``). The last phase lasts for ever after its steps.
    min_depth: the smallest depth any stage may take (``>= 1``).

  Example::

    ps = progressive_shrinking(num_kernels=3, max_depths=(2, 3), num_widths=3,
                               phase_steps=(1000, 1000, 500, 500, 500, 500))
    large, small, rand = ps.sandwich(state, key)   # inside the jitted step
    state = ps.update(state)
  """
  for name, v in (("num_kernels", num_kernels), ("num_widths", num_widths), ("min_depth", min_depth)):
    if not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f"progressive_shrinking: {name} must be an int >= 1, got {v!r}")
  depths = tuple(max_depths) if isinstance(max_depths, (tuple, list)) else ()
  if not depths or not all(isinstance(d, numbers.Integral) and d >= min_depth for d in depths):
    raise ValueError(f"progressive_shrinking: max_depths must be a non-empty tuple of ints >= min_depth="
                     f"{min_depth}, got {max_depths!r}")
  table = _phase_table(num_kernels, depths, min_depth, num_widths)
  steps = tuple(phase_steps) if isinstance(phase_steps, (tuple, list)) else ()
  if len(steps) != len(table) or not all(isinstance(s, numbers.Integral) and s >= 1 for s in steps):
    raise ValueError(f"progressive_shrinking: phase_steps must give {len(table)} positive ints for the phases "
                     f"{tuple(r[0] for r in table)}, got {phase_steps!r}")
  boundaries = tuple(int(b) for b in np.cumsum(steps)[:-1])
  k_lo = jnp.asarray([r[1] for r in table], jnp.int32)
  d_red = jnp.asarray([r[2] for r in table], jnp.int32)
  w_lo = jnp.asarray([r[3] for r in table], jnp.int32)
  d_max = jnp.asarray(depths, jnp.int32)
  num_blocks = int(sum(depths))

  def init() -> ShrinkingState:
    return ShrinkingState(jnp.zeros([], jnp.int32))

  def update(state: ShrinkingState) -> ShrinkingState:
    return ShrinkingState(state.count + 1)

  def phase(state: ShrinkingState) -> jax.Array:
    return jnp.searchsorted(jnp.asarray(boundaries, jnp.int32), state.count, side="right").astype(jnp.int32)

  def largest() -> Subnet:
    return Subnet(jnp.full([num_blocks], num_kernels - 1, jnp.int32), jnp.full([num_blocks], num_widths - 1, jnp.int32),
                  d_max)

  def _depth_lo(p):
    return jnp.maximum(d_max - d_red[p], min_depth)

  def smallest(state: ShrinkingState) -> Subnet:
    p = phase(state)
    return Subnet(jnp.full([num_blocks], k_lo[p], jnp.int32), jnp.full([num_blocks], w_lo[p], jnp.int32),
                  _depth_lo(p))

  def sample(state: ShrinkingState, key: jax.Array) -> Subnet:
    p = phase(state)
    kk, kw, kd = jax.random.split(key, 3)
    kernel = jax.random.randint(kk, [num_blocks], k_lo[p], num_kernels, jnp.int32)
    width = jax.random.randint(kw, [num_blocks], w_lo[p], num_widths, jnp.int32)
    depth = jax.random.randint(kd, [len(depths)], _depth_lo(p), d_max + 1, jnp.int32)
    return Subnet(kernel, width, depth)

  def sandwich(state: ShrinkingState, key: jax.Array) -> tuple[Subnet, Subnet, Subnet]:
    return largest(), smallest(state), sample(state, key)

  return ProgressiveShrinking(init, update, phase, largest, smallest, sample, sandwich,
                              tuple(r[0] for r in table), boundaries)


# ----------------------------------------------------------------------------------------------------
# Robust-gap student sampling (ProARD)
# ----------------------------------------------------------------------------------------------------


class GapSamplerState(NamedTuple):
  """State of :func:`robust_gap_sampler`.

  Attributes:
    gaps: ``[num_candidates]`` float32 running robust-accuracy gaps to the teacher.
    visits: ``[num_candidates]`` int32, how many measurements each candidate has had.
  """
  gaps: jax.Array
  visits: jax.Array


class RobustGapSampler(NamedTuple):
  """Pure functions of :func:`robust_gap_sampler`.

  Attributes:
    init: ``() -> GapSamplerState``.
    update: ``(state, index, teacher_accuracy, student_accuracy) -> state``; ``index`` and
      ``student_accuracy`` may be ``[k]`` arrays (several students measured in one step).
    probabilities: ``(state) -> [num_candidates]`` the sampling distribution ``softmax(g / tau)``.
    sample: ``(state, key, num) -> int32[num]`` candidate indices drawn i.i.d. from ``probabilities``.
  """
  init: Callable[[], GapSamplerState]
  update: Callable[..., GapSamplerState]
  probabilities: Callable[[GapSamplerState], jax.Array]
  sample: Callable[..., jax.Array]


def robust_gap_sampler(num_candidates: int, *, temperature: float = 0.05, momentum: float = 0.9,
                       initial_gap: float = 1.0) -> RobustGapSampler:
  """Draws students with probability ``softmax(g / temperature)`` of their running robust-accuracy gaps.

  ``update`` applies ``g_i <- m g_i + (1 - m) (a_T - a_i)`` to the measured candidates; a candidate's
  first measurement replaces ``initial_gap`` outright (``g_i <- a_T - a_i``), so the optimistic start
  does not linger. Accuracies are fractions in [0, 1]; with ``temperature`` ``0.05`` a 5-point gap
  difference is a factor ``e`` in probability.
  """
  if not isinstance(num_candidates, numbers.Integral) or num_candidates < 1:
    raise ValueError(f"robust_gap_sampler: num_candidates must be an int >= 1, got {num_candidates!r}")
  if not isinstance(temperature, numbers.Real) or not temperature > 0:
    raise ValueError(f"robust_gap_sampler: temperature must be > 0, got {temperature!r}")
  if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
    raise ValueError(f"robust_gap_sampler: momentum must lie in [0, 1), got {momentum!r}")

  def init() -> GapSamplerState:
    return GapSamplerState(jnp.full([num_candidates], initial_gap, jnp.float32),
                           jnp.zeros([num_candidates], jnp.int32))

  def update(state: GapSamplerState, index: jax.Array, teacher_accuracy: jax.Array,
             student_accuracy: jax.Array) -> GapSamplerState:
    index = jnp.atleast_1d(jnp.asarray(index, jnp.int32))
    gap = jnp.broadcast_to(jnp.asarray(teacher_accuracy, jnp.float32) - jnp.asarray(student_accuracy, jnp.float32),
                           index.shape)
    gaps, visits = state
    # Sequential over the k measurements so that a repeated index gets both.
    def one(carry, ig):
      gaps, visits = carry
      i, g = ig
      old = gaps[i]
      new = jnp.where(visits[i] > 0, momentum * old + (1.0 - momentum) * g, g)
      return (gaps.at[i].set(new), visits.at[i].add(1)), None

    (gaps, visits), _ = jax.lax.scan(one, (gaps, visits), (index, gap))
    return GapSamplerState(gaps, visits)

  def probabilities(state: GapSamplerState) -> jax.Array:
    return jax.nn.softmax(state.gaps / temperature)

  def sample(state: GapSamplerState, key: jax.Array, num: int = 1) -> jax.Array:
    return jax.random.categorical(key, state.gaps / temperature, shape=(num,)).astype(jnp.int32)

  return RobustGapSampler(init, update, probabilities, sample)
