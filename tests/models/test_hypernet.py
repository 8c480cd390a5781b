"""Tests for prox.models._hypernet: the recurrent hypernetwork against a numpy LSTM (float64), shapes,
and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prox.models._hypernet import RecurrentHypernet, hypernet_functional

TARGET = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}, "head": jnp.zeros((4, 2))}  # P = 24


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_generate(p, task, hidden, chunk, n_out, scale):
  e = np.asarray(p["task_embeddings"])[task]
  k = -(-n_out // chunk)
  inputs = np.broadcast_to(e, (k, e.shape[0]))
  if p.get("chunk_embeddings") is not None:
    inputs = np.concatenate([inputs, np.asarray(p["chunk_embeddings"])], 1)
  wx, wh, b = (np.asarray(p[n]) for n in ("w_x", "w_h", "b_gates"))
  h, c = np.zeros(hidden), np.zeros(hidden)
  out = []
  for x in inputs:
    gates = x @ wx + h @ wh + b
    i, f, g, o = (gates[j * hidden:(j + 1) * hidden] for j in range(4))
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    out.append(scale * (h @ np.asarray(p["w_out"]) + np.asarray(p["b_out"])))
  return np.concatenate(out)[:n_out]


@pytest.mark.parametrize("chunk_embedding_dim", [0, 3])
def test_generation_matches_a_numpy_lstm_float64(chunk_embedding_dim):
  with jax.enable_x64(True):
    target = jax.tree.map(lambda x: x.astype(jnp.float64), TARGET)
    hnet = RecurrentHypernet(target, num_tasks=3, embedding_dim=4, hidden_dim=5, chunk_size=8,
                             chunk_embedding_dim=chunk_embedding_dim, output_scale=0.5, rngs=nnx.Rngs(0))
    fn = hypernet_functional(hnet)
    assert hnet.num_chunks == 3                                   # ceil(24 / 8)
    for task in (0, 2):
      flat = np.asarray(fn.flat(fn.params, jnp.asarray([task]))[0])
      np.testing.assert_allclose(flat, _numpy_generate(fn.params, task, 5, 8, 24, 0.5), rtol=1e-10)
    out = fn.apply(fn.params, 1)
    assert jax.tree.structure(out) == jax.tree.structure(target)
    assert out["dense"]["kernel"].shape == (3, 4) and out["head"].shape == (4, 2)
    flat1 = np.asarray(fn.flat(fn.params, jnp.asarray([1]))[0])
    np.testing.assert_allclose(out["dense"]["bias"], flat1[:4])   # leaf order: dense/bias, dense/kernel, head
    np.testing.assert_allclose(out["dense"]["kernel"], flat1[4:16].reshape(3, 4))
    assert not np.allclose(fn.apply(fn.params, 0)["head"], out["head"])


def test_later_chunks_depend_on_earlier_ones_through_the_recurrence():
  hnet = RecurrentHypernet(TARGET, num_tasks=2, embedding_dim=4, hidden_dim=6, chunk_size=7, rngs=nnx.Rngs(1))
  fn = hypernet_functional(hnet)
  # without chunk embeddings every step sees the same input: only the carried state distinguishes chunks
  flat = np.asarray(fn.flat(fn.params, jnp.asarray([0]))[0])
  assert not np.allclose(flat[:7], flat[7:14])
  # the recurrent weights reach the third chunk only through the carried state
  jac = jax.jit(jax.jacobian(lambda p: fn.flat(p, jnp.asarray([0]))[0]))(fn.params)
  assert float(jnp.sum(jnp.abs(jac["w_h"][14:21]))) > 0


def test_embedding_gradient_can_be_stopped():
  hnet = RecurrentHypernet(TARGET, num_tasks=3, embedding_dim=4, hidden_dim=5, chunk_size=16, rngs=nnx.Rngs(2))
  fn = hypernet_functional(hnet)
  loss = lambda p, stop: jnp.sum(jnp.square(fn.flat(p, jnp.asarray([0, 1]), stop_embedding=stop)))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_free, g_stop = grad(fn.params, False), grad(fn.params, True)
  assert float(jnp.sum(jnp.abs(g_free["task_embeddings"][:2]))) > 0
  assert float(jnp.sum(jnp.abs(g_stop["task_embeddings"]))) == 0
  np.testing.assert_allclose(g_stop["w_out"], g_free["w_out"], rtol=1e-5)


def test_bad_options():
  with pytest.raises(ValueError, match="chunk_size"):
    RecurrentHypernet(TARGET, num_tasks=2, chunk_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="empty"):
    RecurrentHypernet({}, num_tasks=2, rngs=nnx.Rngs(0))
