"""Tests for prox.transforms._cuber: per-task blocks of GPM's bases, the correlation tests and the opened
projection, against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms import gpm as G
from prox.transforms._cuber import (CUBERState, cuber, cuber_correlation, cuber_scores, cuber_update_bases,
                                    find_cuber_state, replace_cuber_state)

D_IN, D_OUT = 6, 3


def _acts(dirs, n=10, seed=0):
  """n inputs spanning the given coordinate directions exactly."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, len(dirs))) @ np.eye(D_IN)[dirs], jnp.float32)


def _two_tasks(ref0, ref1, max_tasks=4, backward_scale=1.0):
  params = {"w": jnp.zeros((D_IN, D_OUT)), "b": jnp.zeros((D_OUT,))}
  tx = cuber(max_tasks=max_tasks, backward_scale=backward_scale)
  state = tx.init(params)
  state = cuber_update_bases(state, {"w": _acts([0, 1]), "b": None}, 1.0, {"w": ref0, "b": None})
  state = cuber_update_bases(state, {"w": _acts([2, 3], seed=1), "b": None}, 1.0, {"w": ref1, "b": None})
  return tx, state, params


def test_blocks_and_scores_against_numpy():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  r0, r1 = rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(D_IN, D_OUT))
  tx, state, _ = _two_tasks(jnp.asarray(r0, jnp.float32), jnp.asarray(r1, jnp.float32))
  assert state.task_ranks["w"].tolist() == [0, 2, 4, 4, 4] and int(state.num_tasks) == 2
  m = np.asarray(state.gpm.bases["w"])
  b0, b1 = m[:, 0:2], m[:, 2:4]
  np.testing.assert_allclose(b0 @ b0.T, np.diag([1, 1, 0, 0, 0, 0]), atol=1e-5)   # span(e0, e1)
  np.testing.assert_allclose(b1 @ b1.T, np.diag([0, 0, 1, 1, 0, 0]), atol=1e-5)
  np.testing.assert_allclose(state.reference["w"][:2], b0.T @ r0, atol=1e-5)
  np.testing.assert_allclose(state.reference["w"][2:4], b1.T @ r1, atol=1e-5)
  s = cuber_scores(state, {"w": jnp.asarray(g), "b": jnp.zeros((D_OUT,))})
  ng = np.linalg.norm(g)
  np.testing.assert_allclose(s.projection["w"][:2], [np.linalg.norm(b0.T @ g) / ng, np.linalg.norm(b1.T @ g) / ng],
                             rtol=1e-5)
  np.testing.assert_allclose(s.alignment["w"][:2], [np.sum((b0.T @ g) * (b0.T @ r0)),
                                                    np.sum((b1.T @ g) * (b1.T @ r1))], rtol=1e-4)
  assert s.projection["w"][2:].tolist() == [0, 0]
  assert isinstance(s.projection["b"], optax.MaskedNode)


def test_opens_only_positively_correlated_sufficient_subspaces():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  # task 0 correlates positively with g, task 1 negatively
  tx, state, params = _two_tasks(jnp.asarray(g), jnp.asarray(-g))
  grads = {"w": jnp.asarray(g), "b": jnp.ones((D_OUT,))}
  state = cuber_correlation(state, grads, projection_threshold=0.1)
  assert state.allowed["w"].tolist() == [True, False, False, False]
  out, _ = jax.jit(tx.update)(grads, state)
  m = np.asarray(state.gpm.bases["w"])
  b1 = m[:, 2:4]
  np.testing.assert_allclose(out["w"], g - b1 @ (b1.T @ g), atol=1e-5)      # only task 1 projected out
  np.testing.assert_allclose(out["b"], np.ones(D_OUT))                       # unprojected leaves untouched
  # beta = 1/2 keeps half of the update inside task 0's subspace
  tx_half, st_half, _ = _two_tasks(jnp.asarray(g), jnp.asarray(-g), backward_scale=0.5)
  st_half = cuber_correlation(st_half, grads, projection_threshold=0.1)
  b0 = m[:, 0:2]
  out_half, _ = tx_half.update(grads, st_half)
  np.testing.assert_allclose(out_half["w"], g - b1 @ (b1.T @ g) - 0.5 * b0 @ (b0.T @ g), atol=1e-5)
  # a threshold above task 0's projection ratio closes it again: GPM exactly
  ratio0 = float(cuber_scores(state, grads).projection["w"][0])
  closed = cuber_correlation(state, grads, projection_threshold=min(1.0, ratio0 + 0.05))
  assert closed.allowed["w"].tolist() == [False] * 4
  gpm_tx = G.gpm()
  gpm_state = G.gpm_update_bases(G.gpm_update_bases(gpm_tx.init(params), {"w": _acts([0, 1]), "b": None}, 1.0),
                                 {"w": _acts([2, 3], seed=1), "b": None}, 1.0)
  np.testing.assert_allclose(tx.update(grads, closed)[0]["w"], gpm_tx.update(grads, gpm_state)[0]["w"], atol=1e-5)


def test_without_reference_the_task_stays_protected_and_overflow_merges():
  rng = np.random.default_rng(2)
  g = jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32)
  params = {"w": jnp.zeros((D_IN, D_OUT))}
  tx = cuber(max_tasks=1)
  state = tx.init(params)
  state = cuber_update_bases(state, {"w": _acts([0, 1])}, 1.0)
  state = cuber_update_bases(state, {"w": _acts([2], seed=1)}, 1.0, {"w": g})
  assert state.task_ranks["w"].tolist() == [0, 3]           # the second task joined the only slot
  state = cuber_correlation(state, {"w": g}, projection_threshold=0.0)
  assert state.allowed["w"].tolist() == [True]              # g is aligned with the block's stored rows
  fresh = cuber_update_bases(tx.init(params), {"w": _acts([0, 1])}, 1.0)
  assert not bool(cuber_correlation(fresh, {"w": g}, projection_threshold=0.0).allowed["w"][0])


def test_in_a_chain_and_errors():
  params = {"w": jnp.zeros((D_IN, D_OUT))}
  tx = optax.chain(optax.sgd(0.1), cuber(max_tasks=2))
  opt = tx.init(params)
  assert isinstance(find_cuber_state(opt), CUBERState)
  opt = replace_cuber_state(opt, lambda s: cuber_update_bases(s, {"w": _acts([0])}, 1.0))
  assert int(find_cuber_state(opt).num_tasks) == 1
  with pytest.raises(ValueError, match="backward_scale"):
    cuber(max_tasks=2, backward_scale=2.0)
  with pytest.raises(ValueError, match="max_tasks"):
    cuber(max_tasks=0)
  with pytest.raises(ValueError, match="reference"):
    cuber_update_bases(find_cuber_state(opt), {"w": _acts([1])}, 1.0, {"w": jnp.zeros((D_IN, 2))})
  with pytest.raises(ValueError, match="projection_threshold"):
    cuber_correlation(find_cuber_state(opt), {"w": jnp.zeros((D_IN, D_OUT))}, projection_threshold=1.5)
