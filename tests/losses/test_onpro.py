"""Tests for prox.losses._onpro: online prototypes, L_pro / L_OPE against a float64 reference, mixup CE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.losses._onpro import (mixup_cross_entropy, online_prototypes, onpro_equilibrium_loss,
                                prototype_contrastive_loss)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_l_pro(za, zb, y, tau, weights=None):
  """The reference code's OPE loss in numpy: prototypes of the present classes only, SimCLR over 2K."""
  w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
  classes = [c for c in sorted(set(y.tolist())) if w[y == c].sum() > 0]
  if not classes:
    return 0.0
  za, zb = _unit(za), _unit(zb)
  pa = np.stack([np.sum(w[y == c, None] * za[y == c], 0) / w[y == c].sum() for c in classes])
  pb = np.stack([np.sum(w[y == c, None] * zb[y == c], 0) / w[y == c].sum() for c in classes])
  p = np.concatenate([_unit(pa), _unit(pb)])
  k = len(classes)
  logits = p @ p.T / tau
  total = 0.0
  for r in range(2 * k):
    others = [j for j in range(2 * k) if j != r]
    lse = np.log(np.sum(np.exp(logits[r, others])))
    total += lse - logits[r, (r + k) % (2 * k)]
  return total / (2 * k)


def test_l_pro_matches_the_reference_with_absent_classes_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    y = np.asarray([0, 2, 2, 5, 0, 5, 5, 2])                     # classes 1, 3, 4, 6 absent
    za, zb = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
    got = prototype_contrastive_loss(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(y), num_classes=7,
                                     temperature=0.5)
    np.testing.assert_allclose(got, _reference_l_pro(za, zb, y, 0.5), rtol=1e-5)
    # weights: class 0's rows at weight 0 drop the class; the other weights enter the class means
    w = np.asarray([0, 1, 0.5, 1, 0, 2, 1, 1])
    got = prototype_contrastive_loss(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(y), num_classes=7,
                                     temperature=0.2, weights=jnp.asarray(w))
    np.testing.assert_allclose(got, _reference_l_pro(za, zb, y, 0.2, w), rtol=1e-5)
    assert abs(_reference_l_pro(za, zb, y, 0.2, w) - _reference_l_pro(za, zb, y, 0.2)) > 1e-3


def test_degenerate_batches_give_zero_with_finite_gradients():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  one_class = jnp.zeros((4,), jnp.int32)
  f = lambda z: prototype_contrastive_loss(z, z + 0.1, one_class, num_classes=3)
  value, grad = jax.jit(jax.value_and_grad(f))(z)
  assert float(value) == pytest.approx(0.0, abs=1e-6)
  assert bool(jnp.all(jnp.isfinite(grad)))
  none = lambda z: prototype_contrastive_loss(z, z, jnp.asarray([0, 1, 1, 2]), num_classes=3,
                                              weights=jnp.zeros((4,)))
  value, grad = jax.jit(jax.value_and_grad(none))(z)
  assert float(value) == 0.0
  assert bool(jnp.all(grad == 0))


def test_online_prototypes_and_equilibrium():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(6, 3))
  y = np.asarray([1, 1, 0, 1, 0, 0])
  means, present = online_prototypes(jnp.asarray(z), jnp.asarray(y), num_classes=3)
  np.testing.assert_allclose(means[1], _unit(z)[y == 1].mean(0), rtol=1e-5)
  assert present.tolist() == [True, True, False] and bool(jnp.all(means[2] == 0))
  za, zb, zma, zmb = (jnp.asarray(rng.normal(size=(6, 3))) for _ in range(4))
  ym = jnp.asarray([2, 2, 0, 0, 1, 1])
  valid = jnp.asarray([1, 1, 1, 1, 0, 0])
  ope = onpro_equilibrium_loss(za, zb, jnp.asarray(y), zma, zmb, ym, num_classes=3, seen_weights=valid)
  expect = (prototype_contrastive_loss(za, zb, jnp.asarray(y), num_classes=3)
            + prototype_contrastive_loss(zma, zmb, ym, num_classes=3, weights=valid))
  np.testing.assert_allclose(ope, expect, rtol=1e-6)
  # the invalid replay rows (class 1) must not enter the seen classes' loss: with them it differs
  with_invalid = prototype_contrastive_loss(zma, zmb, ym, num_classes=3)
  assert abs(float(with_invalid) - float(ope - prototype_contrastive_loss(za, zb, jnp.asarray(y), num_classes=3))) > 1e-4


def test_mixup_cross_entropy_and_errors():
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
  lsm = np.asarray(jax.nn.log_softmax(logits))
  got = mixup_cross_entropy(logits, jnp.asarray([0, 2]), jnp.asarray([1, 1]), jnp.asarray([0.25, 0.0]))
  np.testing.assert_allclose(got, [-(0.75 * lsm[0, 0] + 0.25 * lsm[0, 1]), -lsm[1, 2]], rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    prototype_contrastive_loss(logits, logits, jnp.asarray([0, 1]), num_classes=3, temperature=0.0)
  with pytest.raises(ValueError, match="num_classes"):
    online_prototypes(logits, jnp.asarray([0, 1]), num_classes=0)
