"""Tests for prox.losses._reasoning: interval masks, progressive temperatures and budget halting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.losses._reasoning import (halting_log_probs, interval_mask, interval_step_loss, per_step_cross_entropy,
                                    progressive_temperature_loss, progressive_temperatures)


def test_interval_mask_and_loss_average_only_the_active_steps():
  np.testing.assert_array_equal(np.asarray(interval_mask(5, 3)), [False, False, True, True, True])
  np.testing.assert_array_equal(np.asarray(interval_mask(3, jnp.array([1, 3]))),
                                [[True, True, True], [False, False, True]])
  loss = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
  np.testing.assert_allclose(np.asarray(interval_step_loss(loss, 3)), [3.5, 35.0])
  np.testing.assert_allclose(np.asarray(interval_step_loss(loss, jnp.array([1, 4]))), [2.5, 40.0])
  g = jax.grad(lambda l: jnp.sum(interval_step_loss(l, 3)))(loss)
  np.testing.assert_array_equal(np.asarray(g) != 0, [[False, False, True, True]] * 2)


def test_progressive_temperatures_fall_to_tau_at_the_last_step():
  np.testing.assert_allclose(np.asarray(progressive_temperatures(4, tau=0.5, alpha=2.0)), [4.0, 2.0, 1.0, 0.5])
  with pytest.raises(ValueError, match="alpha"):
    progressive_temperatures(3, alpha=0.5)


def test_progressive_temperature_loss_by_hand():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 4, 5))
  y = np.array([0, 3, 4])
  tau, alpha = 0.7, 1.3
  ref = np.zeros(3)
  for i in range(3):
    for k in range(1, 5):
      t = tau * alpha ** (4 - k)
      logits = z[i, k - 1] / t
      ref[i] += -(logits[y[i]] - np.log(np.sum(np.exp(logits))))
  got = np.asarray(progressive_temperature_loss(jnp.asarray(z), jnp.asarray(y), tau=tau, alpha=alpha))
  np.testing.assert_allclose(got, ref, rtol=1e-5)    # float64 reference; the helper computes in float32
  mean = progressive_temperature_loss(jnp.asarray(z), jnp.asarray(y), tau=tau, alpha=alpha, reduce="mean")
  np.testing.assert_allclose(np.asarray(mean), ref / 4, rtol=1e-5)
  plain = per_step_cross_entropy(jnp.asarray(z), jnp.asarray(y))
  assert plain.shape == (3, 4)


def test_halting_distribution_truncated_at_the_budget():
  q = jnp.array([[0.0, 1.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
  lam = 1 / (1 + np.exp(-np.asarray(q)))
  logp = halting_log_probs(q, jnp.array([3, 4]))
  p = np.exp(np.asarray(logp))
  # row 0 (budget 3): lambda_1, (1-lambda_1) lambda_2, (1-lambda_1)(1-lambda_2), 0
  expected0 = [lam[0, 0], (1 - lam[0, 0]) * lam[0, 1], (1 - lam[0, 0]) * (1 - lam[0, 1]), 0.0]
  np.testing.assert_allclose(p[0], expected0, rtol=1e-6)
  np.testing.assert_allclose(p.sum(1), [1.0, 1.0], rtol=1e-6)
  assert np.isneginf(np.asarray(logp)[0, 3])
  one = np.exp(np.asarray(halting_log_probs(q, 1)))
  np.testing.assert_allclose(one[:, 0], [1.0, 1.0])
