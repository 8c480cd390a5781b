"""Progressive shrinking (OFA) phase machine, sandwich sampling and the robust-gap (ProARD) student sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox.tasks import Subnet, progressive_shrinking, robust_gap_sampler, stack_subnets, take_subnet

PS = progressive_shrinking(num_kernels=3, max_depths=(2, 4), num_widths=3, phase_steps=(2, 3, 1, 1, 1, 2, 2))


def state_at(count):
  return PS.init()._replace(count=jnp.asarray(count, jnp.int32))


def test_phase_table_follows_ofa_order():
  # full -> kernel -> depth {4,3} -> {4,3,2} -> {4,...,1} -> width top-2 -> all.
  assert PS.names == ("full", "kernel", "depth1", "depth2", "depth3", "width1", "width2")
  assert PS.boundaries == (2, 5, 6, 7, 8, 10)
  phases = [int(PS.phase(state_at(t))) for t in range(14)]
  assert phases == [0, 0, 1, 1, 1, 2, 3, 4, 5, 5, 6, 6, 6, 6]
  s = PS.init()
  for _ in range(5):
    s = PS.update(s)
  assert int(s.count) == 5 and int(PS.phase(s)) == 2


@pytest.mark.parametrize("count,kernel,depth,width", [
    (0, 2, (2, 4), 2),   # full
    (2, 0, (2, 4), 2),   # elastic kernel
    (5, 0, (1, 3), 2),   # depth1: one block fewer
    (6, 0, (1, 2), 2),   # depth2 (a stage never goes below min_depth = 1)
    (7, 0, (1, 1), 2),   # depth3
    (8, 0, (1, 1), 1),   # width1
    (10, 0, (1, 1), 0),  # width2
])
def test_smallest_per_phase(count, kernel, depth, width):
  s = PS.smallest(state_at(count))
  np.testing.assert_array_equal(s.kernel, np.full(6, kernel))
  np.testing.assert_array_equal(s.depth, depth)
  np.testing.assert_array_equal(s.width, np.full(6, width))
  big = PS.largest()
  np.testing.assert_array_equal(big.kernel, np.full(6, 2))
  np.testing.assert_array_equal(big.depth, (2, 4))


@settings(max_examples=30)
@given(count=st.integers(0, 20), seed=st.integers(0, 2**31 - 1))
def test_samples_stay_within_the_phases_options(count, seed):
  state = state_at(count)
  s = jax.jit(PS.sample)(state, jax.random.PRNGKey(seed))
  lo, hi = PS.smallest(state), PS.largest()
  for field in Subnet._fields:
    a, l, h = (np.asarray(getattr(x, field)) for x in (s, lo, hi))
    assert np.all(a >= l) and np.all(a <= h), (field, a, l, h)


def test_samples_cover_the_options_uniformly():
  state = state_at(12)  # last phase: everything allowed
  keys = jax.random.split(jax.random.PRNGKey(0), 3000)
  s = jax.jit(jax.vmap(PS.sample, in_axes=(None, 0)))(state, keys)
  counts = np.bincount(np.asarray(s.kernel).ravel(), minlength=3) / s.kernel.size
  np.testing.assert_allclose(counts, 1 / 3, atol=0.02)
  d2 = np.bincount(np.asarray(s.depth[:, 1]), minlength=5)[1:] / 3000
  np.testing.assert_allclose(d2, 0.25, atol=0.03)
  large, small, rand = PS.sandwich(state, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(small.depth, (1, 1))


def test_bad_phase_steps_name_the_phases():
  with pytest.raises(ValueError, match="depth1"):
    progressive_shrinking(num_kernels=3, max_depths=(2, 4), num_widths=3, phase_steps=(1, 2))
  with pytest.raises(ValueError, match="max_depths"):
    progressive_shrinking(num_kernels=3, max_depths=(0,), num_widths=1, phase_steps=(1,))


def test_stack_and_take_subnets():
  a = Subnet(np.zeros(3), np.ones(3), np.array([1, 2]))
  b = Subnet(np.ones(3), np.zeros(3), np.array([2, 2]))
  table = stack_subnets([a, b])
  assert table.kernel.shape == (2, 3) and table.kernel.dtype == jnp.int32
  got = jax.jit(take_subnet)(table, jnp.asarray(1))
  np.testing.assert_array_equal(got.depth, (2, 2))


def test_robust_gap_update_rule_by_hand():
  smp = robust_gap_sampler(3, temperature=0.1, momentum=0.5, initial_gap=1.0)
  s = smp.init()
  np.testing.assert_allclose(s.gaps, [1, 1, 1])
  s = smp.update(s, jnp.asarray([0, 2]), 0.6, jnp.asarray([0.5, 0.2]))  # first visits replace the prior
  np.testing.assert_allclose(s.gaps, [0.1, 1.0, 0.4], rtol=1e-6)
  s = smp.update(s, 0, 0.6, 0.3)  # 0.5 * 0.1 + 0.5 * 0.3
  np.testing.assert_allclose(s.gaps, [0.2, 1.0, 0.4], rtol=1e-6)
  np.testing.assert_array_equal(s.visits, [2, 0, 1])
  p = np.exp(np.array([0.2, 1.0, 0.4]) / 0.1)
  np.testing.assert_allclose(smp.probabilities(s), p / p.sum(), rtol=1e-5)
  # A repeated index gets both measurements, in order.
  s2 = smp.update(smp.init(), jnp.asarray([1, 1]), 1.0, jnp.asarray([0.2, 0.6]))
  np.testing.assert_allclose(s2.gaps[1], 0.5 * 0.8 + 0.5 * 0.4, rtol=1e-6)


def test_robust_gap_sampler_favours_the_largest_gap():
  smp = robust_gap_sampler(3, temperature=0.05)
  s = smp.update(smp.init(), jnp.arange(3), 0.5, jnp.asarray([0.45, 0.40, 0.30]))  # gaps .05 .10 .20
  draws = np.asarray(jax.jit(smp.sample, static_argnums=2)(s, jax.random.PRNGKey(0), 20000))
  freq = np.bincount(draws, minlength=3) / draws.size
  p = np.exp(np.array([0.05, 0.10, 0.20]) / 0.05)
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)
  assert freq[2] > freq[1] > freq[0]
  with pytest.raises(ValueError, match="temperature"):
    robust_gap_sampler(3, temperature=0.0)
