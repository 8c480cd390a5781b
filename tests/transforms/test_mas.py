"""Tests for prox.transforms._mas: MAS importance against a closed form (float64), and the penalty as EWC's
online quadratic with Omega in place of the Fisher."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms import ewc as E
from prox.transforms._mas import mas, mas_importance


def _linear(params, x):
  """One example: F(x) = x W + b (flax layout)."""
  return x @ params["w"] + params["b"]


def _data(n=9, d=3, o=2, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(d, o)), "b": rng.normal(size=(o,))}
  return params, rng.normal(size=(n, d))


def test_importance_matches_closed_form_float64():
  # ||F||^2 = sum_j (x W + b)_j^2: d/dW_ij = 2 x_i F_j, d/db_j = 2 F_j.
  with jax.enable_x64(True):
    params, x = _data()
    f = x @ params["w"] + params["b"]                               # [n, o]
    omega = mas_importance(_linear, jax.tree.map(jnp.asarray, params), jnp.asarray(x))
    np.testing.assert_allclose(omega["w"], np.mean(np.abs(2 * x[:, :, None] * f[:, None, :]), 0), rtol=1e-12)
    np.testing.assert_allclose(omega["b"], np.mean(np.abs(2 * f), 0), rtol=1e-12)
    assert omega["w"].dtype == jnp.float64
    # the absolute value is per example: |mean of gradients| would be smaller where signs differ
    assert np.any(np.abs(np.mean(2 * x[:, :, None] * f[:, None, :], 0)) < np.asarray(omega["w"]) - 1e-6)
    # chunks of 4 over 9 examples (padding must not count)
    chunked = mas_importance(_linear, jax.tree.map(jnp.asarray, params), jnp.asarray(x), chunk_size=4)
    np.testing.assert_allclose(chunked["w"], omega["w"], rtol=1e-12)
    # the reference code's mini-batch rule: mean over batches [0:4], [4:8], [8:9] of |grad of the batch mean|
    mb = mas_importance(_linear, jax.tree.map(jnp.asarray, params), jnp.asarray(x), minibatch_size=4)
    gw = [np.abs(np.mean(2 * x[a:b, :, None] * f[a:b, None, :], 0)) for a, b in ((0, 4), (4, 8), (8, 9))]
    np.testing.assert_allclose(mb["w"], np.mean(gw, 0), rtol=1e-12)


def test_importance_of_a_pytree_output_sums_all_squares():
  with jax.enable_x64(True):
    params, x = _data(n=5)
    two = lambda p, ex: {"a": _linear(p, ex), "b": 3.0 * _linear(p, ex)}   # ||.||^2 = 10 ||F||^2
    one = mas_importance(_linear, jax.tree.map(jnp.asarray, params), jnp.asarray(x))
    both = mas_importance(two, jax.tree.map(jnp.asarray, params), jnp.asarray(x))
    np.testing.assert_allclose(both["w"], 10 * one["w"], rtol=1e-12)


def test_penalty_is_the_papers_accumulated_quadratic():
  # After tasks 1 and 2: penalty = lambda sum (Omega_1 + Omega_2) (theta - theta*_2)^2, gradient 2 lambda Omega (.)
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    p0 = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    om1 = {"w": jnp.asarray(rng.uniform(size=(3, 2)))}
    om2 = {"w": jnp.asarray(rng.uniform(size=(3, 2)))}
    star1 = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    star2 = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    lam = 0.75  # exact in float32 (EWC keeps lambda as float32)
    tx = mas(lam)
    state = tx.init(p0)
    state = E.consolidate(state, star1, om1)
    state = E.consolidate(state, star2, om2)
    omega = np.asarray(om1["w"]) + np.asarray(om2["w"])
    diff = np.asarray(p0["w"]) - np.asarray(star2["w"])
    np.testing.assert_allclose(E.ewc_penalty(state, p0), lam * np.sum(omega * diff ** 2), rtol=1e-12)
    g = {"w": jnp.zeros((3, 2))}
    u, _ = tx.update(g, state, p0)
    np.testing.assert_allclose(u["w"], 2 * lam * omega * diff, rtol=1e-12)


def test_mas_with_decay_and_in_a_chain():
  p = {"w": jnp.ones((2,))}
  tx = optax.chain(mas(1.0, gamma=0.5), optax.sgd(0.1))
  state = tx.init(p)
  state = E.consolidate_opt_state(state, {"w": jnp.zeros((2,))}, {"w": jnp.asarray([1.0, 2.0])})
  state = E.consolidate_opt_state(state, {"w": jnp.zeros((2,))}, {"w": jnp.asarray([1.0, 0.0])})
  np.testing.assert_allclose(E.find_ewc_state(state).fisher["w"], [1.5, 1.0])   # 0.5 * [1, 2] + [1, 0]
  u, _ = jax.jit(tx.update)({"w": jnp.zeros((2,))}, state, p)
  np.testing.assert_allclose(u["w"], -0.1 * 2 * np.asarray([1.5, 1.0]), rtol=1e-6)


def test_bad_input_is_a_clear_error():
  params, x = _data()
  with pytest.raises(ValueError, match="mas_lambda"):
    mas(-1.0)
  with pytest.raises(ValueError, match="chunk_size"):
    mas_importance(_linear, params, jnp.asarray(x), chunk_size=0)
  with pytest.raises(ValueError, match="leading axis"):
    mas_importance(_linear, params, {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))})
