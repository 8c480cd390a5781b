"""Tests for prox.losses._hypernet: the output regulariser, and that it keeps an old task's generated
weights while a recurrent hypernetwork learns a new task."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prox.losses._hypernet import hypernet_output_regularizer
from prox.models._hypernet import RecurrentHypernet, hypernet_functional


def test_regulariser_value_weights_and_gradient():
  rng = np.random.default_rng(0)
  out, tgt = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  w = np.asarray([1.0, 1.0, 0.0])
  got = hypernet_output_regularizer(jnp.asarray(out), jnp.asarray(tgt), weights=jnp.asarray(w))
  np.testing.assert_allclose(got, np.sum(w * np.sum((out - tgt) ** 2, 1)) / 2, rtol=1e-6)
  assert float(hypernet_output_regularizer(jnp.asarray(out), jnp.asarray(tgt), weights=jnp.zeros(3))) == 0.0
  g_out, g_tgt = jax.grad(lambda o, t: hypernet_output_regularizer(o, t, weights=jnp.asarray(w)), argnums=(0, 1))(
      jnp.asarray(out, jnp.float32), jnp.asarray(tgt, jnp.float32))
  np.testing.assert_allclose(g_out, w[:, None] * (out - tgt), rtol=1e-5)   # d/do of sum(.)/2 with 2 tasks
  assert float(jnp.sum(jnp.abs(g_tgt))) == 0
  with pytest.raises(ValueError, match="T, P"):
    hypernet_output_regularizer(jnp.zeros((3, 5)), jnp.zeros((3, 4)))


def test_regulariser_keeps_the_old_tasks_weights():
  """Two linear-regression tasks: with beta > 0 task 0's generated weights move far less during task 1."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  ys = [x @ jnp.asarray(rng.normal(size=(4,)), jnp.float32) for _ in range(2)]
  target = {"w": jnp.zeros((4,))}
  hnet = RecurrentHypernet(target, num_tasks=2, embedding_dim=4, hidden_dim=16, chunk_size=4, rngs=nnx.Rngs(0))
  fn = hypernet_functional(hnet)
  tx = optax.adam(3e-2)

  @jax.jit
  def train(params, task, targets, beta):
    """150 Adam steps on task ``task`` with the regulariser on the tasks before it."""
    def loss(p):
      task_loss = jnp.mean(jnp.square(x @ fn.apply(p, task)["w"] - jnp.stack(ys)[task]))
      old = fn.flat(p, jnp.arange(2), stop_embedding=True)
      reg = hypernet_output_regularizer(old, targets, weights=(jnp.arange(2) < task).astype(jnp.float32))
      return task_loss + beta * reg

    def step(_, carry):
      params, opt = carry
      u, opt = tx.update(jax.grad(loss)(params), opt, params)
      return optax.apply_updates(params, u), opt

    return jax.lax.fori_loop(0, 150, step, (params, tx.init(params)))[0]

  p0 = train(fn.params, 0, jnp.zeros((2, 4)), 0.0)
  w0 = fn.apply(p0, 0)["w"]
  targets = jax.lax.stop_gradient(fn.flat(p0, jnp.arange(2)))
  moved = {}
  for beta in (0.0, 10.0):
    p1 = train(p0, 1, targets, beta)
    moved[beta] = float(jnp.linalg.norm(fn.apply(p1, 0)["w"] - w0))
    assert float(jnp.mean(jnp.square(x @ fn.apply(p1, 1)["w"] - ys[1]))) < 0.1   # task 1 is learned
  assert moved[10.0] < 0.2 * moved[0.0], moved
