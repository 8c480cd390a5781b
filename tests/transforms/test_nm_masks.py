"""N:M masks and structure schedules (prox.transforms.nm.nm_mask / structure_stages)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox.transforms import nm


def reference_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
  """Loops over groups; keeps the n largest |w|, ties to the lower position (stable sort of -|w|)."""
  a = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
  out = np.zeros(a.shape, bool)
  for idx in np.ndindex(*a.shape[:-1]):
    for g0 in range(0, a.shape[-1], m):
      group = a[idx][g0:g0 + m]
      order = sorted(range(m), key=lambda i: (-group[i], i))
      for i in order[:n]:
        out[idx + (g0 + i,)] = True
  return np.moveaxis(out, -1, axis)


@st.composite
def nm_case(draw):
  m = draw(st.integers(2, 9))
  n = draw(st.integers(1, m - 1))
  ndim = draw(st.integers(1, 4))
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
  shape[axis] = m * draw(st.integers(1, 3))
  # Few distinct values so that ties are common.
  values = draw(st.lists(st.integers(-3, 3), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
  return n, m, axis, np.array(values, np.float32).reshape(shape)


@settings(max_examples=12, deadline=None)
@given(nm_case())
def test_every_group_keeps_exactly_n_largest(case):
  n, m, axis, w = case
  ref = reference_mask(w, n, m, axis)
  impls = ("count", "select", "sort")
  masks = jax.jit(lambda x: [nm.nm_mask(x, n, m, axis=axis, impl=i) for i in impls])(jnp.asarray(w))
  for mask in masks:
    mask = np.asarray(mask)
    assert mask.dtype == bool and mask.shape == w.shape
    groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
    assert (groups.sum(-1) == n).all()
    np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (3, 8), (1, 32), (4, 32), (8, 32)])
def test_auto_matches_reference_and_other_impls(n, m):
  rng = np.random.default_rng(n * 100 + m)
  w = rng.normal(size=(2 * m, 6)).astype(np.float32)
  w[1::3] = w[::3][: len(w[1::3])]  # repeated rows: ties across positions
  ref = reference_mask(w, n, m, 0)
  impls = ("auto", "count", "select", "sort")
  masks = jax.jit(lambda x: [nm.nm_mask(x, n, m, axis=0, impl=i) for i in impls])(jnp.asarray(w))
  for mask in masks:
    np.testing.assert_array_equal(np.asarray(mask), ref)


def test_default_axis_is_input_dim_of_dense_and_conv_kernels():
  w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # [in, out]: groups run along "in"
  mask = np.asarray(nm.nm_mask(jnp.asarray(w), 1, 4))
  np.testing.assert_array_equal(mask[:, 0], [0, 0, 0, 1, 0, 0, 0, 1])
  conv = np.random.default_rng(0).normal(size=(3, 3, 8, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(nm.nm_mask(jnp.asarray(conv), 2, 4)), reference_mask(conv, 2, 4, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_dtype_independent(dtype):
  w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)), dtype)
  mask = nm.nm_mask(w, 2, 4)
  assert mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask), reference_mask(np.asarray(w.astype(jnp.float32)), 2, 4, 0))


def test_bad_nm_and_axis_errors():
  w = jnp.ones((10, 4))
  with pytest.raises(ValueError, match=r"N < M, got N=4, M=4"):
    nm.nm_mask(w, 4, 4)
  with pytest.raises(ValueError, match=r"N=0"):
    nm.nm_mask(w, 0, 4)
  with pytest.raises(ValueError, match=r"shape \(10, 4\) has 10 entries along axis 0, not divisible by M=4"):
    nm.nm_mask(w, 2, 4)
  with pytest.raises(ValueError, match=r"leaf 'a/kernel'"):
    nm.nm_masks({"a": {"kernel": w}}, 1, 4)
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    nm.nm_mask(w, 1, 2, axis=2)
  with pytest.raises(TypeError, match="static Python int"):
    nm.nm_mask(w, 1.5, 4)
  with pytest.raises(ValueError, match="unknown impl"):
    nm.nm_mask(w, 1, 2, impl="bogus")


def test_structure_stages():
  assert nm.structure_stages(1, 8) == ((7, 8), (4, 8), (2, 8), (1, 8))
  assert nm.structure_stages(1, 16) == ((15, 16), (8, 16), (4, 16), (2, 16), (1, 16))
  assert nm.structure_stages(1, 8, "geometric") == ((8, 64), (4, 32), (2, 16), (1, 8))
  assert nm.structure_stages(2, 4) == ((3, 4), (2, 4))
  assert nm.structure_stages(3, 8) == ((7, 8), (4, 8), (3, 8))
  assert nm.structure_stages(1, 2) == ((1, 2),)
  assert nm.structure_stages(1, 4, [(3, 4), (1, 4)]) == ((3, 4), (1, 4))
  with pytest.raises(ValueError, match="unknown structure 'cubic'"):
    nm.structure_stages(1, 8, "cubic")
  with pytest.raises(ValueError, match="N < M"):
    nm.structure_stages(1, 4, [(4, 4), (1, 4)])
