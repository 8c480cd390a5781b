"""Tests for prox.transforms.gpm: basis construction, projection, fixed-shape state, optax composition."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms import gpm as G


def _params(d_in=8, d_hidden=6, d_out=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"l1": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_hidden)), jnp.float32),
                 "bias": jnp.zeros((d_hidden,), jnp.float32)},
          "l2": {"kernel": jnp.asarray(rng.normal(size=(d_hidden, d_out)), jnp.float32),
                 "bias": jnp.zeros((d_out,), jnp.float32)}}


def _low_rank(n, d, rank, seed, noise=0.0):
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(d, rank)))[0]
  x = rng.normal(size=(n, rank)) * np.linspace(3, 1, rank) @ basis.T
  return (x + noise * rng.normal(size=(n, d))).astype(np.float32), basis


def _acts(params, a1, a2=None):
  """Activations tree matching the GPM state: inputs of both kernels, nothing for the biases."""
  return {"l1": {"kernel": a1, "bias": None},
          "l2": {"kernel": a2 if a2 is not None else jnp.tanh(a1 @ params["l1"]["kernel"]), "bias": None}}


def _ref_update(m, acts, eps):
  """numpy reference of the paper's rule: add the fewest new directions with captured energy >= eps."""
  r = acts.T.astype(np.float64)
  total = np.sum(r ** 2)
  r_hat = r - m @ (m.T @ r) if m.shape[1] else r
  u, s, _ = np.linalg.svd(r_hat, full_matrices=False)
  captured = total - np.sum(r_hat ** 2)
  k = 0
  while k < len(s) and captured + np.sum(s[:k] ** 2) < eps * total:
    k += 1
  return np.concatenate([m, u[:, :k]], axis=1)


def test_basis_spans_low_rank_inputs_and_projection_is_orthogonal():
  params = _params()
  tx = G.gpm()
  state = tx.init(params)
  assert isinstance(state.bases["l1"]["bias"], optax.MaskedNode)
  assert state.bases["l1"]["kernel"].shape == (8, 8) and state.bases["l2"]["kernel"].shape == (6, 6)
  a1, basis = _low_rank(64, 8, 3, seed=1)
  state = G.gpm_update_bases(state, _acts(params, jnp.asarray(a1)), 0.9999)
  m = np.asarray(state.bases["l1"]["kernel"])
  assert int(state.ranks["l1"]["kernel"]) == 3
  np.testing.assert_allclose(m[:, :3].T @ m[:, :3], np.eye(3), atol=1e-5)
  assert np.all(m[:, 3:] == 0)
  np.testing.assert_allclose(m[:, :3] @ (m[:, :3].T @ basis), basis, atol=1e-5)  # same subspace
  # gradients: arbitrary [d_in, d_out] matrices; after projection M^T g = 0 and the rest is untouched
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(5).normal(size=p.shape), p.dtype), params)
  pg, _ = tx.update(g, state)
  np.testing.assert_allclose(m.T @ np.asarray(pg["l1"]["kernel"]), 0, atol=1e-5)
  m2 = np.asarray(state.bases["l2"]["kernel"])
  np.testing.assert_allclose(m2.T @ np.asarray(pg["l2"]["kernel"]), 0, atol=1e-4)
  np.testing.assert_array_equal(pg["l1"]["bias"], g["l1"]["bias"])
  # a gradient already orthogonal to the basis passes unchanged
  perp = np.asarray(g["l1"]["kernel"]) - m @ (m.T @ np.asarray(g["l1"]["kernel"]))
  q, _ = tx.update({**g, "l1": {**g["l1"], "kernel": jnp.asarray(perp)}}, state)
  np.testing.assert_allclose(q["l1"]["kernel"], perp, atol=1e-5)


def test_old_task_outputs_unchanged_by_projected_sgd():
  params = _params()
  a_old, _ = _low_rank(32, 8, 3, seed=2)
  tx = optax.chain(optax.sgd(0.1), G.gpm())
  state = tx.init(params)
  state = G.gpm_update_opt_state(state, _acts(params, jnp.asarray(a_old)), 1.0)
  assert int(G.find_gpm_state(state).ranks["l1"]["kernel"]) == 3  # eps = 1 keeps the numerical rank
  x_new = jnp.asarray(np.random.default_rng(3).normal(size=(16, 8)), jnp.float32)
  y_new = jnp.ones((16, 6))

  def loss(p):
    return jnp.mean((x_new @ p["l1"]["kernel"] - y_new) ** 2)

  p = params
  for _ in range(5):
    u, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, u)
  assert float(loss(p)) < float(loss(params))  # it still learns the new task ...
  np.testing.assert_allclose(a_old @ p["l1"]["kernel"], a_old @ params["l1"]["kernel"], atol=1e-4)  # ... not the old


def test_energy_threshold_matches_numpy_reference_over_tasks():
  params = _params(d_in=10)
  state = G.gpm().init(params)
  rng = np.random.default_rng(4)
  m_ref = np.zeros((10, 0))
  for t, eps in enumerate([G.gpm_threshold(0), G.gpm_threshold(1), G.gpm_threshold(2)]):
    a = (rng.normal(size=(40, 10)) * np.linspace(4, 0.2, 10)).astype(np.float32)
    a[:, t] *= 5  # a new dominant direction per task
    state = G.gpm_update_bases(state, _acts(params, jnp.asarray(a)), eps)
    m_ref = _ref_update(m_ref, a, eps)
    k = int(state.ranks["l1"]["kernel"])
    assert k == m_ref.shape[1], (t, k, m_ref.shape)
    m = np.asarray(state.bases["l1"]["kernel"])[:, :k]
    np.testing.assert_allclose(m @ m.T, m_ref @ m_ref.T, atol=2e-4)  # same subspace (signs may differ)
    np.testing.assert_allclose(m.T @ m, np.eye(k), atol=1e-4)
  assert G.gpm_threshold(0) == 0.97 and G.gpm_threshold(2) == pytest.approx(0.976)
  assert 0 < int(state.ranks["l1"]["kernel"]) < 10


def test_fixed_shapes_no_recompile_and_max_rank():
  params = _params()
  tx = G.gpm(max_rank=2)
  state = tx.init(params)
  assert state.bases["l1"]["kernel"].shape == (8, 2)
  update_bases = jax.jit(G.gpm_update_bases)
  step = jax.jit(tx.update)
  shapes = jax.tree.map(jnp.shape, state)
  for t in range(3):
    a, _ = _low_rank(32, 8, 3, seed=10 + t)
    state = update_bases(state, _acts(params, jnp.asarray(a)), 0.999)
    step(params, state)
    assert jax.tree.map(jnp.shape, state) == shapes
  assert update_bases._cache_size() == 1 and step._cache_size() == 1
  assert int(state.ranks["l1"]["kernel"]) == 2  # capped; a full basis stays unchanged


def test_mask_dtypes_and_composition():
  params = _params()
  only_l2 = {"l1": {"kernel": False, "bias": False}, "l2": {"kernel": True, "bias": False}}
  tx = G.gpm(mask=only_l2)
  state = tx.init(params)
  assert isinstance(state.bases["l1"]["kernel"], optax.MaskedNode)
  state_callable = G.gpm(mask=lambda p: jax.tree.map(lambda x: x.shape == (6, 3), p)).init(params)
  assert jax.tree.structure(state_callable) == jax.tree.structure(state)
  acts = {"l1": {"kernel": None, "bias": None}, "l2": {"kernel": jnp.ones((4, 6)), "bias": None}}
  state = G.gpm_update_bases(state, acts, 0.99)
  assert int(state.ranks["l2"]["kernel"]) == 1
  g16 = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bfloat16), params)
  out, _ = jax.jit(tx.update)(g16, state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  np.testing.assert_allclose(np.asarray(out["l2"]["kernel"], np.float32), 0, atol=1e-2)  # ones ∈ span
  # inside apply_if_finite and inject_hyperparams(sgd)
  full = optax.apply_if_finite(optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), tx), 2)
  s = full.init(params)
  s = G.gpm_update_opt_state(s, acts, 0.99)
  u, s = jax.jit(full.update)(jax.tree.map(jnp.ones_like, params), s, params)
  np.testing.assert_allclose(u["l2"]["kernel"], 0, atol=1e-6)
  assert float(jnp.abs(u["l1"]["kernel"]).min()) > 0


def test_checkpoint_round_trip(orbax_round_trip):
  params = _params()
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), G.gpm())
  s = tx.init(params)
  a, _ = _low_rank(32, 8, 3, seed=1)
  s = G.gpm_update_opt_state(s, _acts(params, jnp.asarray(a)), 0.99)
  restored = orbax_round_trip(s)
  assert jax.tree.structure(restored) == jax.tree.structure(s)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(s)):
    np.testing.assert_array_equal(x, y)
  g = jax.tree.map(jnp.ones_like, params)
  for x, y in zip(jax.tree.leaves(tx.update(g, s, params)[0]), jax.tree.leaves(tx.update(g, restored, params)[0])):
    np.testing.assert_array_equal(x, y)


def test_bad_input():
  params = _params()
  with pytest.raises(ValueError, match="max_rank must be a positive int"):
    G.gpm(max_rank=0)
  with pytest.raises(ValueError, match=r"a selected leaf has shape \(6,\)"):
    G.gpm(mask=jax.tree.map(lambda _: True, params)).init(params)
  state = G.gpm().init(params)
  a, _ = _low_rank(8, 8, 2, seed=0)
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
    G.gpm_update_bases(state, _acts(params, jnp.asarray(a)), 1.5)
  with pytest.raises(ValueError, match=r"must be \[n, 6\], got shape \(8, 5\)"):
    G.gpm_update_bases(state, _acts(params, jnp.asarray(a), jnp.ones((8, 5))), 0.9)
  with pytest.raises(ValueError, match="activations do not match"):
    G.gpm_update_bases(state, {"l1": jnp.asarray(a)}, 0.9)
  with pytest.raises(ValueError, match="no GPMState"):
    G.gpm_update_opt_state(optax.sgd(0.1).init(params), {}, 0.9)
