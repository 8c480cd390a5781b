"""Slow learner: the selected group is scaled, 0 freezes it exactly and keeps no optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import optim


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"backbone": {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
          "head": {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}


PREFIX_MASK = {"backbone": True, "head": False}
FN_MASK = lambda tree: {"backbone": jax.tree.map(lambda _: True, tree["backbone"]),
                        "head": jax.tree.map(lambda _: False, tree["head"])}


@pytest.mark.parametrize("mask", [PREFIX_MASK, FN_MASK], ids=["prefix", "fn"])
def test_slow_learner_scales_only_the_group(mask):
  params, inner = _tree(), optax.adam(1e-2)
  tx = optim.slow_learner(inner, 0.01, mask)
  state, ref_state = tx.init(params), inner.init(params)
  for t in range(3):
    g = _tree(t + 1)
    updates, state = tx.update(g, state, params)
    ref, ref_state = inner.update(g, ref_state, params)
    np.testing.assert_allclose(np.asarray(updates["head"]["w"]), np.asarray(ref["head"]["w"]), rtol=1e-6)
    for k in ("w", "b"):
      np.testing.assert_allclose(np.asarray(updates["backbone"][k]), 0.01 * np.asarray(ref["backbone"][k]),
                                 rtol=1e-6)


@pytest.mark.parametrize("mask", [PREFIX_MASK, FN_MASK], ids=["prefix", "fn"])
def test_frozen_group_exactly_zero_and_stateless(mask):
  params, inner = _tree(), optax.adam(1e-2)
  tx = optim.slow_learner(inner, 0, mask)
  state = tx.init(params)
  adam_floats = sum(np.size(x) for x in jax.tree.leaves(inner.init(params)) if np.ndim(x))
  frozen_floats = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x))
  assert frozen_floats == adam_floats - 2 * (64 + 8)  # no moments for the frozen backbone
  g = _tree(1)
  g["backbone"]["w"] = g["backbone"]["w"].at[0, 0].set(jnp.inf)  # even inf gradients give 0 updates
  updates, _ = jax.jit(tx.update)(g, state, params)
  assert np.all(np.asarray(updates["backbone"]["w"]) == 0) and np.all(np.asarray(updates["backbone"]["b"]) == 0)
  ref, _ = inner.update({"head": g["head"]}, inner.init({"head": params["head"]}))
  np.testing.assert_allclose(np.asarray(updates["head"]["w"]), np.asarray(ref["head"]["w"]), rtol=1e-6)


def test_scale_group_injected_zero_freezes_too():
  tx = optax.inject_hyperparams(optim.scale_group, static_args=("mask",))(scale=0.5, mask=PREFIX_MASK)
  state = tx.init(_tree())
  state.hyperparams["scale"] = jnp.asarray(0.0)
  g = _tree(1)
  g["backbone"]["b"] = g["backbone"]["b"].at[0].set(jnp.nan)
  updates, _ = jax.jit(tx.update)(g, state, _tree())
  assert np.all(np.asarray(updates["backbone"]["b"]) == 0)
  np.testing.assert_array_equal(np.asarray(updates["head"]["w"]), np.asarray(g["head"]["w"]))


@pytest.mark.parametrize("scale,err", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                       ("fast", TypeError)])
def test_bad_scale(scale, err):
  with pytest.raises(err, match="scale"):
    optim.scale_group(scale, PREFIX_MASK)
  with pytest.raises(err, match="scale"):
    optim.slow_learner(optax.sgd(0.1), scale, PREFIX_MASK)
