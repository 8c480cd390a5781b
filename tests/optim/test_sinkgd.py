"""SinkGD against a numpy reference of the paper's rule; fixed point; partition recipe; errors; lr scale."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import optim
from prox.optim.sinkgd import matching_learning_rate, update_rms


def _sinkhorn_np(g, num_iters):
  """Scetbon et al. 2025: L times rows <- sqrt(n) row / ||row||, then columns <- sqrt(m) col / ||col||."""
  x = np.array(g, np.float64)
  m, n = x.shape
  for _ in range(num_iters):
    for i in range(m):
      x[i, :] = np.sqrt(n) * x[i, :] / np.linalg.norm(x[i, :])
    for j in range(n):
      x[:, j] = np.sqrt(m) * x[:, j] / np.linalg.norm(x[:, j])
  return x


@pytest.mark.parametrize("shape,num_iters", [((4, 7), 5), ((9, 3), 1), ((5, 5), 2)])
def test_sinkgd_matches_numpy_reference_float64(shape, num_iters):
  rng = np.random.default_rng(1)
  g = rng.normal(size=shape) * rng.uniform(0.1, 10, size=(shape[0], 1))
  with jax.enable_x64(True):
    tx = optim.sinkgd(learning_rate=0.3, num_iters=num_iters)
    state = tx.init({"w": jnp.zeros(shape)})
    updates, _ = jax.jit(tx.update)({"w": jnp.asarray(g)}, state)
    assert updates["w"].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.3 * _sinkhorn_np(g, num_iters), rtol=1e-12)


def test_sinkhorn_output_columns_exact_and_fixed_point():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(6, 10)) * rng.uniform(0.01, 100, size=(1, 10))
  with jax.enable_x64(True):
    x = np.asarray(optim.sinkhorn_normalize(jnp.asarray(g), 5))
    # after each pass the columns have norm sqrt(m) exactly
    np.testing.assert_allclose(np.linalg.norm(x, axis=0), np.sqrt(6), rtol=1e-12)
    # iterating converges to a matrix whose rows have norm sqrt(n) and columns norm sqrt(m) ...
    y = np.asarray(optim.sinkhorn_normalize(jnp.asarray(g), jnp.int32(200)))  # traced count: fori_loop
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.sqrt(10), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(y, axis=0), np.sqrt(6), rtol=1e-9)
    # ... which is a fixed point of the map, and the map is scale invariant
    np.testing.assert_allclose(np.asarray(optim.sinkhorn_normalize(jnp.asarray(y), 3)), y, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(optim.sinkhorn_normalize(jnp.asarray(7.0 * g), 5)), x, rtol=1e-12)
    # a +-1 matrix is already a fixed point
    s = np.sign(rng.normal(size=(4, 9)))
    np.testing.assert_allclose(np.asarray(optim.sinkhorn_normalize(jnp.asarray(s), 5)), s, rtol=1e-12)


def test_sinkgd_is_stateless_and_zero_rows_stay_zero():
  g = np.ones((3, 4), np.float32)
  g[1] = 0.0
  tx = optim.scale_by_sinkhorn()
  state = tx.init({"w": jnp.zeros((3, 4))})
  assert jax.tree.leaves(state) == []
  u, _ = tx.update({"w": jnp.asarray(g)}, state)
  assert np.all(np.isfinite(np.asarray(u["w"])))
  assert np.all(np.asarray(u["w"])[1] == 0)


def test_sinkgd_rejects_non_matrix_leaves_naming_path_and_shape():
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\] has shape \(4,\)"):
    optim.sinkgd(0.1).init(params)
  tx = optim.scale_by_sinkhorn()
  state = tx.init({"k": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match=r"\['k'\] has shape \(2, 2, 1, 1\)"):
    tx.update({"k": jnp.zeros((2, 2, 1, 1))}, state)


@pytest.mark.parametrize("num_iters", [0, -1, 2.5, "5", True])
def test_sinkgd_bad_num_iters(num_iters):
  with pytest.raises(ValueError, match="num_iters"):
    optim.scale_by_sinkhorn(num_iters)


def test_sinkgd_for_matrices_routes_2d_to_sinkgd_and_rest_to_other():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3),
            "conv": jnp.zeros((2, 2, 1, 3))}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = optim.sinkgd_for_matrices(0.1, num_iters=5, other=optax.adam(0.01))
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * _sinkhorn_np(np.asarray(grads["w"]), 5), rtol=1e-5)
  adam = optax.adam(0.01)
  ref, _ = adam.update({"b": grads["b"], "conv": grads["conv"]}, adam.init({"b": params["b"], "conv": params["conv"]}))
  for k in ("b", "conv"):
    np.testing.assert_allclose(np.asarray(updates[k]), np.asarray(ref[k]), rtol=1e-6)
  # only the non-matrix leaves carry optimizer state
  state_size = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert state_size == 2 * (3 + 12)
  assert optim.matrix_labels(params) == {"w": "sinkgd", "b": "other", "conv": "other"}


# ---------------------------------------------------------------------------------------------------
# Learning-rate scale
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,num_iters,scale", [((4, 7), 1, 1e-6), ((9, 3), 5, 1.0), ((16, 16), 2, 1e4)])
def test_sinkhorn_direction_has_unit_rms_whatever_the_gradient_scale_float64(shape, num_iters, scale):
  rng = np.random.default_rng(3)
  g = scale * rng.normal(size=shape) * rng.uniform(0.01, 100, size=(shape[0], 1))
  with jax.enable_x64(True):
    d = optim.sinkhorn_normalize(jnp.asarray(g), num_iters)
    np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(d ** 2))), 1.0, rtol=1e-12)
    # a zero column (a dead ReLU unit) stays zero: RMS^2 = #non-zero columns / n
    g[:, 0] = 0.0
    d = optim.sinkhorn_normalize(jnp.asarray(g), num_iters)
    np.testing.assert_allclose(float(jnp.mean(d ** 2)), (shape[1] - 1) / shape[1], rtol=1e-12)
    # so SinkGD's step, hence matching_learning_rate of it, is exactly lr
    # (the bias goes to SGD with a step of 5 per entry: matching_learning_rate looks at the 2-D leaves only)
    tx = optim.sinkgd_for_matrices(0.03, num_iters, other=optax.sgd(5.0))
    g[:, 0] = 1.0
    params = {"w": jnp.zeros(shape), "b": jnp.zeros(3)}
    u, _ = tx.update({"w": jnp.asarray(g), "b": jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(float(matching_learning_rate(u)), 0.03, rtol=1e-6)


def test_update_rms_by_hand():
  u = {"w": jnp.asarray([[3.0, 4.0]]), "b": jnp.asarray([12.0]), "v": jnp.zeros((1, 3))}
  np.testing.assert_allclose(float(update_rms(u)), np.sqrt(25.0 / 5))
  np.testing.assert_allclose(float(update_rms(u, matrices_only=False)), np.sqrt(169.0 / 6))
  assert float(update_rms({"b": jnp.ones(3)})) == 0.0


def test_adam_step_rms_is_lr_at_first_step_and_0_23_lr_on_pure_noise():
  # The derivation behind SinkGD's learning-rate guidance: Adam's normalised step has RMS 1 at step 1 and
  # sqrt((1 - b1) / (1 + b1)) = 0.229 on stationary zero-mean noise; SinkGD's is 1 at every step.
  lr, shape = 1e-3, (64, 32)
  adam = optax.adam(lr)
  params = {"w": jnp.zeros(shape)}

  def step(carry, key):
    state = carry
    g = {"w": jax.random.normal(key, shape)}
    u, state = adam.update(g, state, params)
    return state, matching_learning_rate(u) / lr

  _, rho = jax.lax.scan(step, adam.init(params), jax.random.split(jax.random.key(0), 3000))
  np.testing.assert_allclose(float(rho[0]), 1.0, rtol=1e-4)
  np.testing.assert_allclose(float(jnp.mean(rho[2000:])), np.sqrt(0.1 / 1.9), rtol=0.05)
