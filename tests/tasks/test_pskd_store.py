"""Tests for prox.tasks.pskd: the PS-KD prediction store, target transition and ECE."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks import pskd


def test_alpha_schedule():
  for t in range(10):
    assert float(pskd.alpha(t, num_epochs=10)) == pytest.approx(0.8 * (t + 1) / 10)
  assert float(pskd.alpha(4, num_epochs=5, alpha_T=0.5)) == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_targets_follow_the_formula(dtype):
  rng = np.random.default_rng(0)
  n, c, T = 12, 5, 10
  state = pskd.init(n, c, dtype)
  idx = np.array([3, 7, 0, 11])
  labels = np.array([1, 4, 0, 2])
  onehot = np.eye(c)[labels]
  # epoch 0: nothing stored yet -> P = onehot -> target = onehot
  np.testing.assert_allclose(np.asarray(pskd.targets(state, idx, labels, epoch=0, num_epochs=T), np.float32),
                             onehot, atol=1e-6)
  logits = rng.normal(size=(4, c)).astype(np.float32)
  state = pskd.store(state, idx, logits)
  assert state.predictions.dtype == dtype
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  for epoch in (1, 6):
    a = 0.8 * (epoch + 1) / T
    got = np.asarray(pskd.targets(state, idx, labels, epoch=epoch, num_epochs=T), np.float32)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(got, (1 - a) * onehot + a * probs, atol=tol)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=tol * c)
  # unseen examples still get their one-hot labels
  got = np.asarray(pskd.targets(state, np.array([5]), np.array([3]), epoch=6, num_epochs=T), np.float32)
  np.testing.assert_allclose(got[0], np.eye(c)[3], atol=1e-6)


def test_store_overwrites_and_drops_padding_and_jits():
  state = pskd.init(6, 3)
  store = jax.jit(pskd.store)
  state = store(state, jnp.array([0, 1, 2]), jnp.zeros((3, 3)), jnp.array([True, True, False]))
  np.testing.assert_array_equal(np.asarray(state.seen), [True, True, False, False, False, False])
  np.testing.assert_allclose(np.asarray(state.predictions[:2]), 1 / 3, rtol=1e-6)
  assert float(jnp.sum(state.predictions[2:])) == 0.0
  state = store(state, jnp.array([1, 4, 5]), jnp.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]]),
                jnp.array([True, True, True]))
  assert float(state.predictions[1, 0]) > 0.99 and store._cache_size() == 1
  # gradients do not flow into the stored predictions
  g = jax.grad(lambda z: jnp.sum(pskd.store(pskd.init(2, 3), jnp.array([0, 1]), z).predictions))(jnp.ones((2, 3)))
  assert float(jnp.sum(jnp.abs(g))) == 0.0


def test_pskd_loss_with_optax():
  state = pskd.init(4, 3)
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  state = pskd.store(state, jnp.array([0, 1]), logits)
  t = pskd.targets(state, jnp.array([0, 1]), jnp.array([0, 2]), epoch=9, num_epochs=10)
  loss = optax.softmax_cross_entropy(logits, t)
  assert loss.shape == (2,) and bool(jnp.all(jnp.isfinite(loss)))


def test_ece_by_hand():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
  labels = np.array([0, 1, 0, 0, 1])
  # 15 bins of width 1/15: conf 0.9 -> bin 13, 0.8 -> 11, 0.6 -> 8, 0.55 -> 8, 0.7 -> 10
  expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(2 - 1.15) + abs(1 - 0.7)) / 5
  assert float(pskd.ece(probs, labels)) == pytest.approx(expected, rel=1e-6)
  # one bin: |accuracy - mean confidence|
  assert float(pskd.ece(probs, labels, num_bins=1)) == pytest.approx(abs(4 / 5 - np.mean(probs.max(1))), rel=1e-6)
  perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert float(pskd.ece(perfect, np.array([0, 1]))) == 0.0


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: pskd.init(0, 3), "num_examples"),
      (lambda: pskd.alpha(0, num_epochs=0), "num_epochs"),
      (lambda: pskd.alpha(0, num_epochs=3, alpha_T=1.5), "alpha_T"),
      (lambda: pskd.store(pskd.init(3, 2), jnp.array([0]), jnp.zeros((1, 3))), "logits"),
      (lambda: pskd.ece(np.zeros(3), np.zeros(3)), "probs"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)
