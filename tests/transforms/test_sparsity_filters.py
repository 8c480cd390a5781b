"""Path filters and per-layer sparsity summaries (prox.transforms.filters)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from prox.transforms import filters


def _params():
  return {
      "embed": {"embedding": jnp.zeros((10, 4))},
      "layers": [
          {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
          {"kernel": jnp.ones((3, 3, 8, 16)), "bias": jnp.ones(16)},
      ],
      "head": {"kernel": jnp.ones((16, 2)), "scale": jnp.ones(())},
  }


def _selected(tree, f):
  return sorted(filters.selected_paths(tree, f))


def test_path_str_and_named_filters():
  p = _params()
  assert _selected(p, filters.dense_kernels()) == ["head/kernel", "layers/0/kernel"]
  assert _selected(p, filters.conv_kernels()) == ["layers/1/kernel"]
  assert _selected(p, filters.kernels()) == ["head/kernel", "layers/0/kernel", "layers/1/kernel"]
  assert _selected(p, None) == ["embed/embedding", "head/kernel", "layers/0/kernel", "layers/1/kernel"]
  assert _selected(p, r"^layers/") == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
  assert _selected(p, filters.all_of(r"^layers/", filters.by_ndim(1, 1))) == ["layers/0/bias", "layers/1/bias"]
  assert _selected(p, filters.any_of("head", "embed")) == ["embed/embedding", "head/kernel", "head/scale"]
  assert _selected(p, filters.negate(filters.by_ndim(1))) == ["head/scale"]
  assert _selected(p, filters.by_name("bias", "scale")) == ["head/scale", "layers/0/bias", "layers/1/bias"]


def test_nnx_state_paths_drop_value():
  class Net(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.fc = nnx.Linear(4, 8, rngs=rngs)
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)

  _, state = nnx.split(Net(), nnx.Param)
  assert _selected(state, filters.dense_kernels()) == ["fc/kernel"]
  assert _selected(state, filters.conv_kernels()) == ["conv/kernel"]
  assert _selected(state, "bias$") == ["conv/bias", "fc/bias"]


def test_filter_must_not_read_values():
  with pytest.raises(TypeError, match="traced value"):
    jax.jit(lambda p: filters.select(p, lambda path, x: x.sum() > 0))({"w": jnp.ones((2, 2))})
  with pytest.raises(TypeError, match="filter must be"):
    filters.as_filter(3)


_NAMES = st.sampled_from(["kernel", "bias", "scale", "embedding"])
_LEAF = st.tuples(_NAMES, st.integers(0, 4))


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), st.lists(_LEAF, min_size=1, max_size=3),
                       min_size=1, max_size=4),
       st.sampled_from(["kernel", "bias"]), st.integers(0, 3))
def test_filters_select_what_they_say(layout, name, min_ndim):
  tree = {mod: {f"{leaf}{j}" if j else leaf: jnp.zeros((2,) * nd) for j, (leaf, nd) in enumerate(leaves)}
          for mod, leaves in layout.items()}
  flat = [(filters.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  expect = sorted(s for s, x in flat if s.split("/")[-1] == name and x.ndim >= min_ndim)
  assert _selected(tree, filters.all_of(filters.by_name(name), filters.by_ndim(min_ndim))) == expect
  mod = next(iter(layout))
  expect_re = sorted(s for s, _ in flat if re.search(f"^{mod}/", s))
  assert _selected(tree, f"^{mod}/") == expect_re
  sel = jax.tree.leaves(filters.select(tree, filters.by_name(name)))
  assert sum(sel) == sum(1 for s, _ in flat if s.split("/")[-1] == name)


def test_sparsity_summary_counts_zeros_and_false():
  w = jnp.array([[0.0, 1.0], [0.0, 0.0]])
  m = jnp.array([[True, False, False, False]])
  out = filters.sparsity_summary({"a": {"kernel": w}, "b": {"kernel": m}, "c": jnp.zeros(3), "d": None})
  assert set(out) == {"a/kernel", "b/kernel", "total"}
  np.testing.assert_allclose(out["a/kernel"], 0.75)
  np.testing.assert_allclose(out["b/kernel"], 0.75)
  np.testing.assert_allclose(out["total"], 6 / 8)
  jitted = jax.jit(filters.sparsity_summary)({"a": {"kernel": w}})
  np.testing.assert_allclose(jitted["a/kernel"], 0.75)
  everything = filters.sparsity_summary({"c": jnp.array([0.0, 2.0])}, lambda p, x: True)
  np.testing.assert_allclose(everything["total"], 0.5)
