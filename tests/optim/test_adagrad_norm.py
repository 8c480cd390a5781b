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


# --------------------------------------------------------------------------------- layout="row"


def _row_params_and_grads(steps=5, seed=1):
  """A dense kernel [in, out], its bias, a conv kernel [h, w, in, out] and a scalar, in JAX layout."""
  rng = np.random.default_rng(seed)
  shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "conv": {"kernel": (3, 3, 2, 5)}, "scale": ()}
  params = jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=lambda s: isinstance(s, tuple))
  grads = [jax.tree.map(lambda p, t=t: rng.normal(size=np.shape(p)) * 10.0 ** -t, params)
           for t in range(steps)]
  return params, grads


def _torch_layout_accumulator(g):
  """The reference code's per-row sum of squares, computed in PyTorch's layout: the output axis first
  (dense [out, in], conv [out, in, h, w]), then ``view(out, -1).norm(dim=1) ** 2``; per entry for 1-D
  and 0-D tensors."""
  g = np.asarray(g)
  if g.ndim < 2:
    return g ** 2
  torch_layout = np.moveaxis(g, -1, 0)                  # [out, ...]
  if g.ndim == 4:                                       # HWIO -> OIHW, as PyTorch stores convs
    torch_layout = np.transpose(g, (3, 2, 0, 1))
  return np.linalg.norm(torch_layout.reshape(torch_layout.shape[0], -1), axis=1) ** 2


@pytest.mark.parametrize("b0,eps", [(0.1, 1e-10), (0.0, 1e-3)])
def test_adagrad_norm_row_layout_float64_matches_hand_loop(b0, eps):
  params, grads = _row_params_and_grads()
  lr = lambda t: 0.5 / (1.0 + t)
  with jax.enable_x64(True):
    tx = optim.adagrad_norm(lr, b0=b0, eps=eps, layout="row")
    got = jax.tree.map(jnp.asarray, params)
    state = tx.init(got)
    update = jax.jit(tx.update)
    acc = jax.tree.map(lambda p: np.full(np.shape(p)[-1:], b0 ** 2), params)
    want = params
    for t, g in enumerate(grads):
      acc = jax.tree.map(lambda a, x: a + _torch_layout_accumulator(x), acc, g)
      # Each output unit j (the last axis) divides by its own root; 1-D/0-D leaves entry by entry.
      want = jax.tree.map(lambda w, x, a: w - lr(t) * x / (np.sqrt(a) + eps), want, g, acc)
      updates, state = update(jax.tree.map(jnp.asarray, g), state, got)
      got = optax.apply_updates(got, updates)
      stored = state[0].sum_of_squares
      assert jax.tree.structure(stored) == jax.tree.structure(acc)
      for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(acc)):
        assert a.dtype == jnp.float64 and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-14)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-13, atol=1e-15)
  assert jax.tree.map(np.shape, stored) == {"conv": {"kernel": (5,)},
                                           "dense": {"bias": (4,), "kernel": (4,)}, "scale": ()}


def test_adagrad_norm_row_layout_with_one_output_unit_is_the_scalar_layout():
  rng = np.random.default_rng(2)
  grads = [{"w": jnp.asarray(rng.normal(size=(6, 1)))} for _ in range(3)]
  with jax.enable_x64(True):
    row, scalar = optim.scale_by_adagrad_norm(layout="row"), optim.scale_by_adagrad_norm()
    params = {"w": jnp.zeros((6, 1))}
    row_state, scalar_state = row.init(params), scalar.init(params)
    for g in grads:
      row_updates, row_state = row.update(g, row_state)
      scalar_updates, scalar_state = scalar.update(g, scalar_state)
      np.testing.assert_array_equal(np.asarray(row_updates["w"]), np.asarray(scalar_updates["w"]))
    np.testing.assert_array_equal(np.asarray(row_state.sum_of_squares["w"]),
                                  [np.asarray(scalar_state.sum_of_squares)])


def test_adagrad_norm_row_layout_dtypes_jit_and_inject_hyperparams():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
  scale = optim.scale_by_adagrad_norm(layout="row")
  state = scale.init(params)
  assert state.sum_of_squares["w"].dtype == jnp.float32 and state.sum_of_squares["w"].shape == (3,)
  np.testing.assert_allclose(np.asarray(state.sum_of_squares["b"]), 0.01, rtol=1e-6)
  scaled, _ = scale.update(params, state)
  assert scaled["w"].dtype == jnp.bfloat16 and scaled["b"].dtype == jnp.float32  # the gradients' dtypes
  tx = optax.inject_hyperparams(optim.adagrad_norm)(learning_rate=0.1, layout="row")  # layout: static
  state = tx.init(params)
  update = jax.jit(tx.update)
  for seed in range(3):
    g = jax.tree.map(lambda p, s=seed: jnp.full(p.shape, s + 1.0, p.dtype), params)
    updates, state = update(g, state, params)
  assert update._cache_size() == 1  # pylint: disable=protected-access
  # Column j of w: b^2 = 0.01 + 4 (1 + 4 + 9) = 56.01 after three steps of all-(s+1) gradients.
  np.testing.assert_allclose(np.asarray(state.inner_state[0].sum_of_squares["w"]), 56.01, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32), -0.1 * 3 / np.sqrt(56.01), rtol=1e-2)


def test_adagrad_norm_bad_layout():
  with pytest.raises(ValueError, match="layout must be one of scalar, row, got 'column'"):
    optim.scale_by_adagrad_norm(layout="column")
  with pytest.raises(ValueError, match="layout must be one of scalar, row"):
    optim.adagrad_norm(0.1, layout="per-row")
