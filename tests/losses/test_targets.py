"""Tests for prox.losses._targets: cosine logits against fixed class targets, the loss, and training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.losses._targets import cosine_target_logits, language_target_loss, target_head_init


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_logits_and_loss_by_hand():
  rng = np.random.default_rng(0)
  f, p, t = rng.normal(size=(4, 5)), rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
  logits = cosine_target_logits(jnp.asarray(f), jnp.asarray(t), temperature=0.2, projection=jnp.asarray(p))
  ref = _unit(f @ p) @ _unit(t).T / 0.2
  np.testing.assert_allclose(logits, ref, rtol=1e-5)
  y = np.asarray([0, 5, 2, 2])
  mask = np.asarray([1, 0, 1, 0, 0, 1], bool)
  loss = language_target_loss(jnp.asarray(f), jnp.asarray(y), jnp.asarray(t), temperature=0.2,
                              projection=jnp.asarray(p), logit_mask=jnp.asarray(mask))
  z = ref[:, mask]
  lse = np.log(np.exp(z).sum(1))
  cols = {0: 0, 2: 1, 5: 2}
  np.testing.assert_allclose(loss, lse - z[np.arange(4), [cols[c] for c in y]], rtol=1e-5, atol=1e-5)


def test_targets_stay_fixed_and_the_projection_learns_them():
  rng = np.random.default_rng(1)
  targets = jnp.asarray(np.eye(3)[:, :3] + 0.1, jnp.float32)        # three fixed class targets in R^3
  x = jnp.asarray(rng.normal(size=(90, 4)), jnp.float32)
  y = jnp.asarray(np.argmax(np.asarray(x)[:, :3], 1))                # class = largest of the first 3 features
  head = target_head_init(jax.random.key(0), 4, 3)
  g_t = jax.grad(lambda t: jnp.mean(language_target_loss(x, y, t, temperature=0.1, projection=head["kernel"])))(
      targets)
  assert float(jnp.sum(jnp.abs(g_t))) == 0
  tx = optax.adam(0.05)

  @jax.jit
  def train(head):
    def step(_, carry):
      h, opt = carry
      g = jax.grad(lambda h: jnp.mean(language_target_loss(x, y, targets, temperature=0.1,
                                                           projection=h["kernel"])))(h)
      u, opt = tx.update(g, opt, h)
      return optax.apply_updates(h, u), opt
    return jax.lax.fori_loop(0, 200, step, (head, tx.init(head)))[0]

  head = train(head)
  pred = jnp.argmax(cosine_target_logits(x, targets, temperature=0.1, projection=head["kernel"]), axis=1)
  assert float(jnp.mean(pred == y)) > 0.9


def test_errors():
  with pytest.raises(ValueError, match="temperature"):
    cosine_target_logits(jnp.ones((2, 3)), jnp.ones((4, 3)), temperature=0.0)
  with pytest.raises(ValueError, match="dimension"):
    cosine_target_logits(jnp.ones((2, 5)), jnp.ones((4, 3)), temperature=0.1)
  with pytest.raises(ValueError, match="feature_dim"):
    target_head_init(jax.random.key(0), 0, 3)
