"""FedTiny pieces: coarse candidates, adaptive BN selection, top-K gradient buffers, grow-and-prune."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox import transforms as T


def test_random_layer_densities_meet_the_global_density():
  sizes = [100, 2000, 50, 10]
  d = T.random_layer_densities(jax.random.PRNGKey(0), sizes, 0.2, 6, spread=0.8)
  assert d.shape == (6, 4)
  np.testing.assert_allclose(d[0], 0.2)  # row 0: uniform
  np.testing.assert_allclose(d @ np.asarray(sizes) / sum(sizes), 0.2, rtol=1e-3)
  assert np.all(d <= 1.0) and np.all(d >= 1.0 / np.asarray(sizes))
  assert np.ptp(d[1:], axis=0).max() > 0.01  # the candidates differ


def test_magnitude_masks_keep_the_largest_entries():
  p = {"a": jnp.asarray([[3.0, -1.0], [0.5, -4.0]]), "b": jnp.asarray([1.0, 2.0, -3.0])}
  m = T.magnitude_masks(p, jnp.asarray([0.5, 1 / 3]))
  np.testing.assert_array_equal(m["a"], [[True, False], [False, True]])
  np.testing.assert_array_equal(m["b"], [False, False, True])
  stacked = jax.vmap(T.magnitude_masks, in_axes=(None, 0))(p, jnp.asarray([[0.5, 1 / 3], [1.0, 0.0]]))
  assert stacked["a"].shape == (2, 2, 2) and bool(stacked["a"][1].all()) and not bool(stacked["b"][1].any())


# A tiny model with batch norm: h = x W (masked), BN(h) with given statistics, logits = BN(h) V.
def stats_fn(p, x):
  h = x @ p["w"]
  return {"mean": h.mean(0), "sq": (h * h).mean(0)}


def loss_fn(p, stats, x, y):
  h = x @ p["w"]
  var = stats["sq"] - stats["mean"] ** 2
  z = (h - stats["mean"]) / jnp.sqrt(var + 1e-5)
  logits = z @ p["v"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def test_adaptive_bn_selection_matches_a_hand_loop():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "v": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  xs = jnp.asarray(rng.normal(size=(3, 16, 5)) + np.arange(3)[:, None, None], jnp.float32)  # heterogeneous clients
  ys = jnp.asarray(rng.integers(0, 3, (3, 16)))
  dens = jnp.asarray([[0.5, 1.0], [0.25, 1.0], [0.75, 0.5]])
  cands = jax.vmap(T.magnitude_masks, in_axes=(None, 0))(params, dens)
  cw = jnp.asarray([16.0, 32.0, 16.0])
  best, losses, stats = jax.jit(lambda c: T.adaptive_bn_selection(params, c, xs, ys, stats_fn=stats_fn,
                                                                  loss_fn=loss_fn, client_weights=cw))(cands)
  w = np.asarray(cw) / float(cw.sum())
  want = []
  for k in range(3):
    mp = {n: np.where(np.asarray(cands[n][k]), np.asarray(params[n]), 0.0) for n in params}
    per = [stats_fn(mp, xs[i]) for i in range(3)]
    agg = {s: sum(w[i] * np.asarray(per[i][s]) for i in range(3)) for s in ("mean", "sq")}
    np.testing.assert_allclose(stats["mean"][k], agg["mean"], rtol=1e-5, atol=1e-6)
    want.append(sum(w[i] * float(loss_fn(mp, agg, xs[i], ys[i])) for i in range(3)))
  np.testing.assert_allclose(losses, want, rtol=1e-4)
  assert int(best) == int(np.argmin(want))


def test_adaptive_bn_selection_prefers_the_candidate_that_keeps_the_signal():
  rng = np.random.default_rng(1)
  w = np.zeros((5, 3), np.float32)
  w[0, 0], w[1, 1], w[2, 2] = 3.0, 3.0, 3.0  # the label lives in features 0..2
  w += 0.01 * rng.normal(size=w.shape).astype(np.float32)
  params = {"w": jnp.asarray(w), "v": jnp.eye(3, dtype=jnp.float32) * 4.0}
  xs = jnp.asarray(rng.normal(size=(4, 32, 5)), jnp.float32)
  ys = jnp.argmax(xs[..., :3], axis=-1)
  good = {"w": jnp.asarray(np.abs(w) > 1.0), "v": jnp.ones((3, 3), bool)}
  bad = {"w": jnp.asarray(np.abs(w) <= 1.0) & (jnp.arange(15).reshape(5, 3) < 3), "v": jnp.ones((3, 3), bool)}
  cands = jax.tree.map(lambda a, b: jnp.stack([b, a]), good, bad)
  best, losses, _ = T.adaptive_bn_selection(params, cands, xs, ys, stats_fn=stats_fn, loss_fn=loss_fn)
  assert int(best) == 1 and float(losses[1]) < float(losses[0])


TOPK = jax.jit(T.topk_accumulate)


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 3, 12]), steps=st.integers(1, 4))
def test_topk_buffer_is_exact_when_it_holds_every_pruned_weight(seed, k, steps):
  rng = np.random.default_rng(seed)
  mask = jnp.asarray(rng.random((3, 4)) < 0.5)
  grads = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(steps)]
  buf = T.topk_init(k)
  for g in grads:
    buf = TOPK(buf, g, mask)
  idx, val = np.asarray(buf.index), np.asarray(buf.value)
  assert np.all(~np.asarray(mask).ravel()[idx[idx >= 0]])  # only pruned positions
  assert len(set(idx[idx >= 0].tolist())) == int((idx >= 0).sum())  # no duplicates
  pruned = np.flatnonzero(~np.asarray(mask).ravel())
  total = sum(np.asarray(g).ravel() for g in grads)
  if k >= pruned.size:  # the buffer is a full accumulator
    got = dict(zip(idx[idx >= 0].tolist(), val[idx >= 0].tolist()))
    assert set(got) == set(pruned.tolist())
    for i in pruned:
      np.testing.assert_allclose(got[i], total[i], rtol=1e-5, atol=1e-6)
  if steps == 1:  # one step: the k largest |g| of the pruned positions
    top = pruned[np.argsort(-np.abs(total[pruned]), kind="stable")[:k]]
    assert set(idx[idx >= 0].tolist()) == set(top.tolist())


def test_topk_buffers_vmap_over_clients():
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random(20) < 0.5)
  grads = jnp.asarray(rng.normal(size=(3, 20)), jnp.float32)  # three clients, one step each
  bufs = jax.vmap(T.topk_accumulate, in_axes=(None, 0, None))(T.topk_init(4), grads, mask)
  assert bufs.index.shape == (3, 4)
  for c in range(3):
    one = T.topk_accumulate(T.topk_init(4), grads[c], mask)
    np.testing.assert_array_equal(bufs.index[c], one.index)


def test_grow_and_prune_by_hand():
  w = jnp.asarray([0.9, 0.0, 0.1, 0.0, 0.5, 0.0, 0.3, 0.0])
  mask = w != 0  # active: 0, 2, 4, 6
  bufs = T.TopKBuffer(index=jnp.asarray([[1, 3, -1], [5, 3, 7]]), value=jnp.asarray([[2.0, -1.0, 0.0], [0.5, -1.5, 0.1]]))
  # Weighted sum (weights 1:1 -> 0.5 each): G_1 = 1.0, G_3 = -1.25, G_5 = 0.25, G_7 = 0.05.
  new = T.grow_and_prune(w, mask, bufs, 2)
  # Grow 3 and 1 (largest |G|); prune 2 and 6 (smallest |w| among the previously active).
  np.testing.assert_array_equal(new, [True, True, False, True, True, False, False, False])
  assert int(new.sum()) == int(mask.sum())
  # With no aggregated gradient nothing is grown and nothing pruned.
  empty = T.TopKBuffer(jnp.full((2, 3), -1), jnp.zeros((2, 3)))
  np.testing.assert_array_equal(T.grow_and_prune(w, mask, empty, 2), mask)


def test_adjust_count_cosine_decay():
  n = T.adjust_count(0, alpha=0.3, end_round=10, num_active=100)
  assert int(n) == 30
  assert int(T.adjust_count(5, alpha=0.3, end_round=10, num_active=100)) == 15  # 0.15 (1 + cos(pi/2)) 100
  assert int(T.adjust_count(3, alpha=0.3, end_round=10, num_active=100)) == math.floor(15 * (1 + math.cos(0.3 * math.pi)))
  assert int(T.adjust_count(10, alpha=0.3, end_round=10, num_active=100)) == 0
  with pytest.raises(ValueError, match="alpha"):
    T.adjust_count(0, alpha=1.5, end_round=10, num_active=1)
