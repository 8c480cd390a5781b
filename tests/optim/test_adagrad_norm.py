"""AdaGradNorm against a hand-written float64 loop; AdaGrad accessors against optax; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import optim


def _grad_sequence(steps=6, seed=0):
  rng = np.random.default_rng(seed)
  return [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,)) * 10.0 ** -t} for t in range(steps)]


@pytest.mark.parametrize("b0,eps", [(0.1, 1e-10), (1.5, 0.0), (0.0, 1e-3)])
def test_adagrad_norm_float64_matches_hand_loop(b0, eps):
  grads = _grad_sequence()
  lr = lambda t: 0.5 / (1.0 + t)  # a schedule, to check the learning-rate path too
  with jax.enable_x64(True):
    params = {"w": np.zeros((3, 2)), "b": np.zeros(2)}
    tx = optim.adagrad_norm(lr, b0=b0, eps=eps)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(tx.update)
    w = {k: v.copy() for k, v in params.items()}
    b_sq = b0 ** 2
    got = jax.tree.map(jnp.asarray, params)
    for t, g in enumerate(grads):
      b_sq = b_sq + sum(float(np.sum(x ** 2)) for x in g.values())
      w = {k: w[k] - lr(t) * g[k] / (np.sqrt(b_sq) + eps) for k in w}
      updates, state = update(jax.tree.map(jnp.asarray, g), state, got)
      got = optax.apply_updates(got, updates)
      assert state[0].sum_of_squares.dtype == jnp.float64
      np.testing.assert_allclose(float(state[0].sum_of_squares), b_sq, rtol=1e-14)
      for k in w:
        assert got[k].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got[k]), w[k], rtol=1e-13, atol=1e-15)


def test_adagrad_norm_accumulator_is_one_float32_scalar_for_bf16():
  params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
  state = optim.scale_by_adagrad_norm().init(params)
  assert state.sum_of_squares.shape == () and state.sum_of_squares.dtype == jnp.float32
  np.testing.assert_allclose(float(state.sum_of_squares), 0.01, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(b0=-0.1), "b0 must be >= 0"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(b0=0.0, eps=0.0), "both 0"),
    (dict(b0=float("nan")), "b0 must be >= 0"),
])
def test_adagrad_norm_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.scale_by_adagrad_norm(**kwargs)


def test_adagrad_norm_bad_learning_rate():
  with pytest.raises(ValueError, match="learning_rate"):
    optim.adagrad_norm(float("inf"))


def test_adagrad_step_size_is_the_factor_optax_adagrad_applies():
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = optax.inject_hyperparams(optax.adagrad)(learning_rate=1.0, eps=1e-7)
  tx = optax.apply_if_finite(tx, 3)  # the helper finds the state at any depth
  state = tx.init(params)
  for g in _grad_sequence(4):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    updates, state = tx.update(g, state, params)
  acc = optim.adagrad_accumulator(state)
  ref_acc = jax.tree.map(lambda *gs: 0.1 + sum(np.asarray(x, np.float32) ** 2 for x in gs),
                         *[jax.tree.map(lambda x: np.asarray(x, np.float32), g) for g in _grad_sequence(4)])
  for k in acc:
    np.testing.assert_allclose(np.asarray(acc[k]), ref_acc[k], rtol=1e-6)
  step = optim.adagrad_step_size(state, eps=1e-7)
  for k in step:  # the last update is -lr * s * g
    np.testing.assert_allclose(np.asarray(updates[k]), -np.asarray(step[k]) * np.asarray(g[k]), rtol=1e-6)


def test_adagrad_step_size_zero_where_accumulator_is_zero():
  tx = optax.adagrad(1.0, initial_accumulator_value=0.0)
  state = tx.init({"w": jnp.zeros(3)})
  _, state = tx.update({"w": jnp.array([0.0, 2.0, 0.0])}, state)
  np.testing.assert_allclose(np.asarray(optim.adagrad_step_size(state)["w"]), [0.0, 1 / np.sqrt(4 + 1e-7), 0.0],
                             rtol=1e-6)


def test_adagrad_accumulator_needs_exactly_one_adagrad():
  with pytest.raises(ValueError, match="found 0"):
    optim.adagrad_accumulator(optax.adam(0.1).init({"w": jnp.zeros(2)}))
  two = optax.chain(optax.adagrad(0.1), optax.adagrad(0.1)).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="found 2"):
    optim.adagrad_accumulator(two)
