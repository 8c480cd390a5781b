"""Tests for prox.tasks._mir: ER-MIR retrieval against a float64 hand computation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks import replay
from prox.tasks._mir import mir_retrieve


def _loss(params, ex):
  """Per-example squared error of a linear model."""
  return jnp.square(ex["x"] @ params["w"] + params["b"] - ex["y"])


def _setup(n_mem=20, cap=20, d=3, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=d)), "b": jnp.asarray(rng.normal())}
  mem = {"x": jnp.asarray(rng.normal(size=(n_mem, d))), "y": jnp.asarray(rng.normal(size=n_mem))}
  batch = {"x": jnp.asarray(rng.normal(size=(6, d))), "y": jnp.asarray(rng.normal(size=6) + 2.0)}
  memory = replay.reservoir_init({"x": mem["x"][0], "y": mem["y"][0]}, cap)
  memory = replay.reservoir_add(memory, mem, jax.random.key(1))
  return params, batch, memory


def _np_loss(w, b, x, y):
  return (x @ w + b - y) ** 2


def test_retrieves_the_largest_loss_increases_float64():
  with jax.enable_x64(True):
    params, batch, memory = _setup()
    key, lr, c, k = jax.random.key(7), 0.3, 12, 4
    fn = jax.jit(lambda p, b, m, kk: mir_retrieve(_loss, p, b, m, kk, num_candidates=c, k=k, learning_rate=lr))
    out = fn(params, batch, memory, key)
    # by hand: gradient of the incoming batch's mean loss, the virtual step, the scores
    w, b0 = np.asarray(params["w"]), float(params["b"])
    bx, by = np.asarray(batch["x"]), np.asarray(batch["y"])
    r = bx @ w + b0 - by
    gw, gb = np.mean(2 * r[:, None] * bx, 0), np.mean(2 * r)
    np.testing.assert_allclose(out.grads["w"], gw, rtol=1e-12)
    cand, valid = replay.reservoir_sample(memory, key, c)
    assert bool(np.all(valid))
    cx, cy = np.asarray(cand["x"]), np.asarray(cand["y"])
    pre = _np_loss(w, b0, cx, cy)
    post = _np_loss(w - lr * gw, b0 - lr * gb, cx, cy)
    order = np.argsort(-(post - pre))[:k]
    np.testing.assert_allclose(out.batch["x"], cx[order], rtol=1e-12)
    np.testing.assert_allclose(out.scores, (post - pre)[order], rtol=1e-5)
    assert bool(np.all(out.valid))
    # the rule is the increase, not the loss after the step (these differ on this draw)
    assert set(np.argsort(-post)[:k]) != set(order)
    # passing the gradient gives the same retrieval without the batch
    again = mir_retrieve(_loss, params, None, memory, key, num_candidates=c, k=k, learning_rate=lr,
                         grads=out.grads)
    np.testing.assert_allclose(again.batch["x"], out.batch["x"])


def test_partial_memory_marks_missing_rows_invalid():
  params, batch, memory = _setup(n_mem=5, cap=20)
  out = jax.jit(lambda p, b, m, k: mir_retrieve(_loss, p, b, m, k, num_candidates=8, k=6, learning_rate=0.1))(
      params, batch, memory, jax.random.key(0))
  assert out.valid.tolist() == [True] * 5 + [False]
  assert bool(np.all(np.isfinite(out.scores[:5]))) and out.scores[5] == -np.inf
  stored = {tuple(np.round(np.asarray(x), 6)) for x in np.asarray(memory.data["x"][:5])}
  assert {tuple(np.round(x, 6)) for x in np.asarray(out.batch["x"][:5])} == stored


def test_no_gradient_flows_through_the_retrieval():
  params, batch, memory = _setup()

  def f(p):
    out = mir_retrieve(_loss, p, batch, memory, jax.random.key(0), num_candidates=5, k=2, learning_rate=0.1)
    return jnp.sum(_loss(p, out.batch))

  g = jax.jit(jax.grad(f))(params)
  out = jax.jit(lambda p: mir_retrieve(_loss, p, batch, memory, jax.random.key(0), num_candidates=5, k=2,
                                       learning_rate=0.1))(params)
  expected = jax.jit(jax.grad(lambda p: jnp.sum(_loss(p, out.batch))))(params)
  np.testing.assert_allclose(g["w"], expected["w"], rtol=1e-6)


def test_bad_sizes_are_clear_errors():
  params, batch, memory = _setup()
  with pytest.raises(ValueError, match="num_candidates"):
    mir_retrieve(_loss, params, batch, memory, jax.random.key(0), num_candidates=21, k=2, learning_rate=0.1)
  with pytest.raises(ValueError, match="k must"):
    mir_retrieve(_loss, params, batch, memory, jax.random.key(0), num_candidates=5, k=6, learning_rate=0.1)
  with pytest.raises(ValueError, match="one loss per example"):
    mir_retrieve(lambda p, e: jnp.mean(_loss(p, e)), params, batch, memory, jax.random.key(0),
                 num_candidates=5, k=2, learning_rate=0.1)


def test_mir_in_a_loss_of_the_one_step_with_the_memory_in_extra():
  """The loss reads the memory from ctx.extra and adds the retrieved examples' mean loss to the incoming one
  (the reference's g_in + g_mem); a transition adds the global batch to the reservoir."""
  from prox import step as S
  tx = optax.sgd(0.1)

  def loss_fn(params, model_state, batch, ctx):
    got = mir_retrieve(_loss, params, batch, ctx.extra["memory"], ctx.rng, num_candidates=8, k=4,
                       learning_rate=0.1)
    w = got.valid.astype(jnp.float32)
    replayed = jnp.sum(w * _loss(params, got.batch)) / jnp.maximum(jnp.sum(w), 1.0)
    return jnp.mean(_loss(params, batch)) + replayed, ({"replayed": jnp.sum(w)}, model_state)

  def transition(state, info):
    memory = replay.reservoir_add(state.extra["memory"], info.batch, info.rng)
    return state._replace(extra={"memory": memory})

  params, batch, memory = _setup(n_mem=2, cap=20)
  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state={},
                       extra={"memory": memory}, rng=jax.random.key_data(jax.random.key(0)))
  mesh = S.data_mesh()
  state = S.replicate(state, mesh)
  step = S.make_train_step(loss_fn, tx, transition=transition)
  sharded = S.shard_batch(batch, mesh)
  replayed = []
  for _ in range(3):
    state, out = step(state, sharded)
    replayed.append(float(out.metrics["replayed"]))
  assert replayed == [2.0, 4.0, 4.0]                            # 2 stored, then 2 + 6 >= 4
  assert int(state.extra["memory"].seen) == 2 + 3 * 6
  assert step._cache_size() == 1 and bool(out.finite)
