"""Tests for prox.losses._noprop: the schedule, the posterior coefficients, the objective's terms and the chain."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.losses._noprop import (denoising_loss, noisy_embedding, noprop_infer, noprop_loss, noprop_schedule,
                                 prior_kl)


def test_cosine_schedule_by_hand():
  T, s = 3, 0.008
  g = lambda u: math.cos(0.5 * math.pi * (u + s) / (1 + s)) ** 2
  ref = [0.0] + [g((T + 1 - t) / (T + 1)) / g(0.0) for t in range(1, T + 1)]
  sched = noprop_schedule(T)
  np.testing.assert_allclose(np.asarray(sched.alpha_bar), ref, rtol=1e-6)
  snr = [a / (1 - a) for a in ref]
  np.testing.assert_allclose(np.asarray(sched.snr), snr, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sched.weight), np.diff(snr), rtol=1e-6)
  assert np.all(np.asarray(sched.weight) > 0) and float(sched.alpha_bar[-1]) < 1.0


@pytest.mark.parametrize("alpha_bar", [None, [0.05, 0.2, 0.5, 0.7, 0.95]])
def test_inference_step_maps_q_z_prev_onto_q_z_t(alpha_bar):
  # if z_{t-1} ~ N(sqrt(ab_{t-1}) u, (1 - ab_{t-1}) I) then a_t u + b_t z_{t-1} + sqrt(c_t) eps ~ q(z_t | y):
  # a_t + b_t sqrt(ab_{t-1}) = sqrt(ab_t) and b_t^2 (1 - ab_{t-1}) + c_t = 1 - ab_t (the posterior's marginal)
  sched = noprop_schedule(4, alpha_bar=alpha_bar)
  ab = np.asarray(sched.alpha_bar, np.float64)
  a, b, c = (np.asarray(v, np.float64) for v in (sched.a, sched.b, sched.c))
  np.testing.assert_allclose(a + b * np.sqrt(ab[:-1]), np.sqrt(ab[1:]), rtol=1e-5)
  np.testing.assert_allclose(b ** 2 * (1 - ab[:-1]) + c, 1 - ab[1:], rtol=1e-5)


@pytest.mark.parametrize("bad", [[0.1, 0.2], [0.3, 0.2, 0.5, 0.6, 0.7], [0.1, 0.2, 0.3, 0.4, 1.0]])
def test_schedule_rejects_bad_alpha_bar(bad):
  with pytest.raises(ValueError, match="alpha_bar"):
    noprop_schedule(4, alpha_bar=bad)


def test_prior_kl_closed_form_and_noisy_embedding_moments():
  u = jnp.array([[1.0, -2.0, 0.5]])
  ab = 0.3
  d = 3
  ref = 0.5 * (ab * 5.25 + d * (1 - ab) - d - d * math.log(1 - ab))
  np.testing.assert_allclose(float(prior_kl(u, ab)[0]), ref, rtol=1e-6)
  assert float(prior_kl(u, 0.0)[0]) == 0.0
  z = noisy_embedding(jax.random.key(0), jnp.tile(u, (20000, 1)), ab)
  np.testing.assert_allclose(np.asarray(z.mean(0)), math.sqrt(ab) * np.asarray(u[0]), atol=0.02)
  np.testing.assert_allclose(np.asarray(z.var(0)), 1 - ab, rtol=0.03)


EMB = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])


def _oracle(labels):
  return lambda t, z, x: EMB[labels]


def test_noprop_loss_terms_by_hand():
  sched = noprop_schedule(5)
  labels = jnp.array([0, 2, 1])
  x = jnp.zeros((3, 4))
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
  classify = lambda z: logits
  zero = lambda t, z, x: jnp.zeros((3, 2))
  for block in range(5):
    terms = noprop_loss(zero, classify, EMB, x, labels, jax.random.key(block), sched, block=block, eta=0.5)
    w = float(sched.weight[block])
    np.testing.assert_allclose(np.asarray(terms.denoising), 0.5 * 5 * 0.5 * w * np.ones(3), rtol=1e-6)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    np.testing.assert_allclose(np.asarray(terms.classifier), ce, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(terms.kl), 0.0, atol=1e-7)         # abar_0 = 0: z_0 is the prior
    np.testing.assert_allclose(np.asarray(terms.total), ce + np.asarray(terms.denoising), rtol=1e-6)
  oracle = noprop_loss(_oracle(labels), classify, EMB, x, labels, jax.random.key(0), sched, block=3)
  np.testing.assert_allclose(np.asarray(oracle.denoising), 0.0, atol=1e-7)


def test_all_blocks_is_the_expectation_of_the_one_block_estimate():
  sched = noprop_schedule(4)
  labels = jnp.array([0, 1, 2, 2])
  x = jnp.arange(8.0).reshape(4, 2)
  denoise = lambda t, z, x: 0.1 * (t + 1) * x           # depends on the block, not on z
  classify = lambda z: jnp.zeros((4, 3))
  exact = noprop_loss(denoise, classify, EMB, x, labels, jax.random.key(0), sched).denoising
  per_block = [noprop_loss(denoise, classify, EMB, x, labels, jax.random.key(0), sched, block=t).denoising
               for t in range(4)]
  np.testing.assert_allclose(np.mean(np.stack(per_block), 0), np.asarray(exact), rtol=1e-5)
  u = np.asarray(EMB)[np.asarray(labels)]
  ref = sum(0.5 * float(sched.weight[t]) * np.sum((0.1 * (t + 1) * np.asarray(x) - u) ** 2, -1) for t in range(4))
  np.testing.assert_allclose(np.asarray(exact), ref, rtol=1e-5)
  np.testing.assert_allclose(float(denoising_loss(jnp.ones((1, 2)), jnp.zeros((1, 2)), 2.0, num_blocks=3)[0]),
                             0.5 * 3 * 2.0 * 2.0)


def test_noise_free_chain_with_the_oracle_reaches_sqrt_abar_T_u():
  sched = noprop_schedule(6)
  labels = jnp.array([2, 0])
  x = jnp.zeros((2, 1))
  z_T = noprop_infer(_oracle(labels), lambda z: z, x, sched, dim=2, return_latent=True)
  np.testing.assert_allclose(np.asarray(z_T), math.sqrt(float(sched.alpha_bar[-1])) * np.asarray(EMB[labels]),
                             rtol=1e-5)
  noisy = noprop_infer(_oracle(labels), lambda z: z @ EMB.T, x, sched, dim=2, key=jax.random.key(1))
  assert noisy.shape == (2, 3)
