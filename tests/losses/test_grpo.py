"""Tests for prox.losses._grpo: group advantages, the budget reward and the GRPO surrogate, by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from prox.losses._grpo import budget_reward, group_advantages, grpo_loss, length_reward


def test_group_advantages_match_the_formula_in_float64():
  rewards = np.array([[1.0, 0.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0]])
  with jax.enable_x64(True):
    got = np.asarray(group_advantages(jnp.asarray(rewards), eps=1e-6))
    got1 = np.asarray(group_advantages(jnp.asarray(rewards), eps=1e-6, ddof=1))
  for row, a, a1 in zip(rewards, got, got1):
    np.testing.assert_allclose(a, (row - row.mean()) / (row.std() + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(a1, (row - row.mean()) / (row.std(ddof=1) + 1e-6), rtol=1e-12)
  assert np.all(got[1] == 0.0)          # a group of equal rewards teaches nothing


def test_group_advantages_mask_leaves_padded_samples_out():
  r = jnp.array([[1.0, 0.0, 100.0]])
  a = group_advantages(r, mask=jnp.array([[True, True, False]]))
  np.testing.assert_allclose(np.asarray(a), [[1.0, -1.0, 0.0]], atol=1e-5)


@given(st.lists(st.floats(-10, 10), min_size=6, max_size=6))
def test_group_advantages_are_centred_and_scale_free(values):
  r = jnp.asarray(values, jnp.float32)
  a = group_advantages(r)
  assert abs(float(jnp.mean(a))) < 1e-4
  np.testing.assert_allclose(np.asarray(group_advantages(3.0 * r + 7.0, eps=0.0)),
                             np.asarray(group_advantages(r, eps=0.0)), atol=2e-3)


@pytest.mark.parametrize("shape,expected", [
    ("within", [1.0, 1.0, 1.0, 0.0, 0.0]),
    ("triangular", [0.25, 0.5, 1.0, 0.5, 0.0]),
    ("linear", [0.75, 0.5, 0.0, 0.0, 0.0]),
])
def test_length_reward_shapes(shape, expected):
  lengths = jnp.array([1, 2, 4, 6, 9])
  np.testing.assert_allclose(np.asarray(length_reward(lengths, 4, shape=shape)), expected, atol=1e-6)


def test_budget_reward_adds_weighted_terms_and_gates():
  correct = jnp.array([True, False, True, False])
  length = jnp.array([2, 2, 6, 6])
  r = budget_reward(correct, length, 4, correct_weight=1.0, length_weight=0.5)
  np.testing.assert_allclose(np.asarray(r), [1.5, 0.5, 1.0, 0.0])
  g = budget_reward(correct, length, 4, length_weight=0.5, gate=True)
  np.testing.assert_allclose(np.asarray(g), [1.5, 0.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="shape"):
    budget_reward(correct, length, 4, shape="square")


def test_grpo_loss_value_and_gradient_match_the_clipped_surrogate():
  logp = jnp.array([-1.0, -2.0, -0.5, -3.0])
  old = jnp.array([-1.2, -1.0, -0.5, -3.5])
  adv = jnp.array([1.0, -1.0, 2.0, 1.0])
  eps = 0.2

  def reference(lp):
    out = []
    for l, o, a in zip(lp, old.tolist(), adv.tolist()):
      rho = math.exp(l - o)
      out.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
    return out

  np.testing.assert_allclose(np.asarray(grpo_loss(logp, old, adv, clip_eps=eps)), reference(logp.tolist()),
                             rtol=1e-6)
  g = jax.grad(lambda lp: jnp.sum(grpo_loss(lp, old, adv, clip_eps=eps)))(logp)
  # sample 0: rho = e^0.2 > 1.2 with A > 0 -> clipped, no gradient; sample 1: rho = e^-1 < 0.8 with A < 0
  # -> clipped; sample 2: rho = 1 -> -A rho; sample 3: rho = e^0.5 > 1.2, A > 0 -> clipped
  np.testing.assert_allclose(np.asarray(g), [0.0, 0.0, -2.0, 0.0], atol=1e-6)


def test_grpo_kl_penalty_is_the_k3_estimator():
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  zero = jnp.zeros(2)
  loss = grpo_loss(logp, logp, zero, ref_logp=ref, kl_coef=0.1)
  d = np.asarray(ref - logp)
  np.testing.assert_allclose(np.asarray(loss), 0.1 * (np.exp(d) - d - 1.0), rtol=1e-6)
  assert np.all(np.asarray(grpo_loss(ref, ref, zero, ref_logp=ref, kl_coef=1.0)) == 0.0)
