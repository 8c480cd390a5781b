"""Batch-size controller: monotone, multiple, capped (hypothesis); baselines; buckets; bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox import optim

update = jax.jit(optim.batch_size_update)


@st.composite
def controller_and_requests(draw):
  multiple = draw(st.sampled_from([1, 3, 8, 64]))
  b0 = multiple * draw(st.integers(1, 20))
  b_max = b0 + draw(st.integers(0, 5000))
  requests = draw(st.lists(
      st.one_of(st.floats(-10.0, 1e6, allow_nan=False), st.sampled_from([float("nan"), float("inf"), 0.0])),
      min_size=1, max_size=12))
  return b0, b_max, multiple, requests


@settings(max_examples=25, deadline=None)
@given(controller_and_requests())
def test_controller_monotone_multiple_capped(case):
  b0, b_max, multiple, requests = case
  state = optim.batch_size_init(b0, b_max, multiple_of=multiple)
  cap = b_max // multiple * multiple
  assert int(state.max_batch_size) == cap
  prev = b0
  for r in requests:
    state = update(state, r)
    b = int(state.batch_size)
    assert b >= prev and b % multiple == 0 and b <= min(cap, b_max)
    if not math.isnan(r):
      # the smallest admissible value: max(prev, ceil(r) rounded up to a multiple), capped
      want = min(max(prev, -(-max(math.ceil(min(r, cap)), 0) // multiple) * multiple), cap)
      assert b == want, (prev, r, b, want)
    else:
      assert b == prev
    prev = b
  assert update._cache_size() == 1  # one compilation for every request value


def test_controller_examples_and_traced_request():
  state = optim.batch_size_init(64, 50_000, multiple_of=64)
  assert int(update(state, 100.2).batch_size) == 128
  assert int(update(state, 128.0).batch_size) == 128
  assert int(update(state, 3.0).batch_size) == 64  # never decreases
  assert int(update(state, 1e12).batch_size) == 49_984  # capped at the largest multiple <= b_max
  assert int(update(state, jnp.inf).batch_size) == 49_984
  assert int(update(state, jnp.nan).batch_size) == 64  # no estimate: keep
  np.testing.assert_allclose(float(update(state, 100.2).requested), 100.2, rtol=1e-6)
  # in a vmapped / scanned loop
  final, sizes = jax.lax.scan(lambda s, r: (optim.batch_size_update(s, r), s.batch_size), state,
                              jnp.array([10.0, 200.0, 150.0, 700.0]))
  assert sizes.tolist() == [64, 64, 256, 256] and int(final.batch_size) == 704


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((128, 64), {}, ValueError, "b0=128 is larger than b_max=64"),
    ((100, 1000), dict(multiple_of=64), ValueError, "b0=100 is not a multiple of multiple_of=64"),
    ((0, 10), {}, ValueError, "b0 must be in"),
    ((8, 2**31), {}, ValueError, "b_max must be in"),
    ((8.5, 10), {}, TypeError, "b0 must be an integer"),
    ((8, 10), dict(multiple_of=0), ValueError, "multiple_of must be in"),
])
def test_controller_bad_input(args, kwargs, err, match):
  with pytest.raises(err, match=match):
    optim.batch_size_init(*args, **kwargs)


def test_baselines():
  steps = jnp.arange(0, 40)
  const = optim.constant_batch_size(32)
  assert jax.jit(const)(steps).tolist() == [32] * 40
  double = optim.stagewise_doubling(32, 1000, every=10, multiple_of=32)
  assert [int(double(k)) for k in (0, 9, 10, 19, 20, 30, 40, 10**9)] == [32, 32, 64, 64, 128, 256, 512, 992]
  milestones = optim.stagewise_doubling(8, 100, milestones=[3, 5])
  assert jax.jit(milestones)(jnp.arange(7)).tolist() == [8, 8, 8, 16, 16, 32, 32]
  ramp = optim.linear_ramp_up(64, 500, increment=64, multiple_of=64)
  assert [int(ramp(k)) for k in (0, 1, 2, 5, 6, 7, 10**9)] == [64, 128, 192, 384, 448, 448, 448]


@pytest.mark.parametrize("factory,kwargs,match", [
    (optim.stagewise_doubling, dict(b0=8, b_max=100), "exactly one of every= and milestones="),
    (optim.stagewise_doubling, dict(b0=8, b_max=100, milestones=[5, 3]), "strictly increasing"),
    (optim.stagewise_doubling, dict(b0=200, b_max=100, every=5), "larger than b_max"),
    (optim.linear_ramp_up, dict(b0=64, b_max=500, increment=10, multiple_of=64), "increment=10 is not a multiple"),
    (optim.constant_batch_size, dict(b0=-4), "b0 must be in"),
])
def test_baselines_bad_input(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_bucket_power_of_two():
  assert [optim.bucket(b, 64) for b in (64, 128, 192, 256, 320, 512, 576)] == [1, 2, 4, 4, 8, 8, 16]
  assert optim.bucket(jnp.int32(300), 100) == 4 and optim.num_micro_batches(300, 100) == 3
  # along any growing sequence the number of distinct buckets is at most log2(max) + 1
  sizes = range(8, 8 * 1000 + 1, 8)
  assert len({optim.bucket(b, 8) for b in sizes}) == math.ceil(math.log2(1000)) + 1
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda b: optim.bucket(b, 8))(jnp.int32(16))
