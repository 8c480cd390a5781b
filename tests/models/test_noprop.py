"""Tests for prox.models._noprop: block-local gradients, inference shapes and a tiny fit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prox.models import functional
from prox.models._noprop import NoPropDT
from prox.tasks import data


def _split(model):
  return nnx.split(model, nnx.Param, ...)


def test_gradient_of_block_t_touches_only_block_t():
  T = 4
  model = NoPropDT((8, 8, 1), 10, num_blocks=T, hidden=16, rngs=nnx.Rngs(0))
  graphdef, params, rest = _split(model)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
  y = jnp.arange(6)

  @jax.jit
  def grad(params, t):
    return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest).loss(x, y, jax.random.key(1), block=t).total))(params)

  for t in range(T):
    g = grad(params, jnp.int32(t))
    blocks = jax.tree.leaves(g["blocks"])
    assert blocks and all(leaf.shape[0] == T for leaf in blocks)
    per_slice = np.array([[float(jnp.sum(jnp.abs(leaf[s]))) for s in range(T)] for leaf in blocks])
    others = np.delete(per_slice, t, axis=1)
    assert np.all(others == 0.0), (t, others)
    assert np.all(per_slice[:, t].sum() > 0)
    assert float(jnp.sum(jnp.abs(g["head"]["kernel"]))) > 0 and float(jnp.sum(jnp.abs(g["embeddings"]))) > 0


def test_inference_shapes_and_functional():
  model = NoPropDT((40, 1), 10, num_blocks=3, dim=6, hidden=16, output="direct", rngs=nnx.Rngs(1))
  x = jnp.ones((5, 40, 1))
  run = nnx.jit(lambda m, x, k: m(x, k))
  assert run(model, x, None).shape == (5, 10)
  assert run(model, x, jax.random.key(0)).shape == (5, 10)
  f = functional(model)
  logits, _ = jax.jit(lambda p: f.apply(p, f.model_state, x, train=False))(f.params)
  assert logits.shape == (5, 10)
  assert model.embeddings[...].shape == (10, 6)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="output"):
    NoPropDT((8, 8, 1), 10, output="logits", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_blocks"):
    NoPropDT((8, 8, 1), 10, num_blocks=0, rngs=nnx.Rngs(0))


def test_a_tiny_noprop_fit_learns_digits_one_block_per_step():
  train, test = data.load("digits", "train"), data.load("digits", "test")
  T = 4
  model = NoPropDT((8, 8, 1), 10, num_blocks=T, hidden=64, rngs=nnx.Rngs(0))
  graphdef, params, rest = _split(model)
  tx = optax.adamw(1e-3, weight_decay=1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    kb, kl = jax.random.split(key)
    t = jax.random.randint(kb, (), 0, T)
    g = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest).loss(x, y, kl, block=t).total))(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  predict = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))
  before = np.mean(np.argmax(np.asarray(predict(params, test.images)), -1) == test.labels)
  rng, key = np.random.default_rng(0), jax.random.key(0)
  for _ in range(600):
    idx = rng.integers(0, len(train.labels), 64)
    key, k = jax.random.split(key)
    params, opt = step(params, opt, train.images[idx], train.labels[idx], k)
  after = np.mean(np.argmax(np.asarray(predict(params, test.images)), -1) == test.labels)
  assert before < 0.3 and after > 0.85, (before, after)
