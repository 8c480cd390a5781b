"""Tests for prox.tasks._privacy: the accountant against the analytic Gaussian mechanism, the membership
scores against their definitions, and the unlearning machine (with a small forget-and-fine-tune run)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from prox.tasks._privacy import dp_epsilon, dp_noise_multiplier, membership_advantage, membership_auc, unlearning


def _gaussian_epsilon(sigma, steps, delta):
  """Exact epsilon of ``steps`` full-batch Gaussian mechanisms (sensitivity 1, noise sigma): a Gaussian with
  mu = sqrt(steps) / sigma, delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang
  2018; Dong, Roth and Su 2019)."""
  mu = math.sqrt(steps) / sigma
  f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta
  return brentq(f, 0.0, 100.0)


def test_pld_epsilon_is_the_exact_gaussian_value_and_rdp_bounds_it():
  pytest.importorskip("dp_accounting")
  exact = _gaussian_epsilon(2.0, 10, 1e-5)
  assert abs(exact - 7.5113) < 1e-3
  pld = dp_epsilon(noise_multiplier=2.0, sampling_rate=1.0, steps=10, delta=1e-5, accountant="pld")
  rdp = dp_epsilon(noise_multiplier=2.0, sampling_rate=1.0, steps=10, delta=1e-5)
  np.testing.assert_allclose(pld, exact, rtol=1e-4)
  assert exact <= rdp < 1.2 * exact


def test_subsampled_epsilon_grows_with_steps_and_shrinks_with_noise():
  pytest.importorskip("dp_accounting")
  kw = dict(sampling_rate=256 / 60000, delta=1e-5)
  e1 = dp_epsilon(noise_multiplier=1.1, steps=1000, **kw)
  e2 = dp_epsilon(noise_multiplier=1.1, steps=4000, **kw)
  e3 = dp_epsilon(noise_multiplier=2.0, steps=4000, **kw)
  assert e1 < e2 and e3 < e2
  pld = dp_epsilon(noise_multiplier=1.1, steps=1000, accountant="pld", **kw)
  assert pld <= e1                                     # RDP is an upper bound
  sigma = dp_noise_multiplier(target_epsilon=e2, steps=4000, **kw)
  assert abs(sigma - 1.1) < 0.01


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=0.0, sampling_rate=0.1, steps=10, delta=1e-5), "noise_multiplier"),
    (dict(noise_multiplier=1.0, sampling_rate=1.5, steps=10, delta=1e-5), "sampling_rate"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, steps=0, delta=1e-5), "steps"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1.0), "delta"),
    (dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5, accountant="moments"), "accountant"),
])
def test_dp_epsilon_rejects_bad_arguments(kwargs, match):
  pytest.importorskip("dp_accounting")
  with pytest.raises(ValueError, match=match):
    dp_epsilon(**kwargs)


def test_membership_auc_and_advantage_match_their_definitions():
  rng = np.random.default_rng(0)
  members = np.round(rng.exponential(0.5, 200), 1)           # rounded: ties between the groups
  non = np.round(rng.exponential(1.0, 150), 1)
  wins = (members[:, None] < non[None, :]).mean() + 0.5 * (members[:, None] == non[None, :]).mean()
  np.testing.assert_allclose(float(membership_auc(members, non)), wins, rtol=1e-6)
  from sklearn.metrics import roc_auc_score
  labels = np.r_[np.ones(200), np.zeros(150)]
  np.testing.assert_allclose(float(membership_auc(members, non)), roc_auc_score(labels, -np.r_[members, non]),
                             rtol=1e-6)
  taus = np.r_[members, non]
  adv = max(0.0, max((members <= t).mean() - (non <= t).mean() for t in taus))
  np.testing.assert_allclose(float(membership_advantage(members, non)), adv, rtol=1e-6)
  same = rng.normal(size=500)
  assert float(membership_auc(same[:250], same[:250])) == 0.5
  assert float(membership_auc(np.zeros(3), np.ones(4))) == 1.0
  with pytest.raises(ValueError, match="at least one"):
    membership_auc(np.zeros(0), np.ones(3))


def test_unlearning_machine_forgets_samples_retained_and_counts():
  machine = unlearning(10, finetune_steps=3)
  state = machine.init()
  assert int(machine.retained(state)) == 10
  state = machine.request(state, jnp.array([2, 5, -1]))
  assert int(state.requests) == 1 and int(machine.retained(state)) == 8
  np.testing.assert_array_equal(np.asarray(machine.weights(state, jnp.array([0, 2, 5, 9, -1]))), [1, 0, 0, 1, 0])
  draws = jax.vmap(lambda k: machine.sample(state, k, 8))(jax.random.split(jax.random.key(0), 50))
  assert all(sorted(d) == [0, 1, 3, 4, 6, 7, 8, 9] for d in np.asarray(draws).tolist())
  short = np.asarray(machine.sample(state, jax.random.key(1), 10))
  assert sorted(short.tolist()) == [-1, -1, 0, 1, 3, 4, 6, 7, 8, 9]
  for _ in range(3):
    assert not bool(machine.done(state))
    state = machine.update(state)
  assert bool(machine.done(state))
  state = machine.request(state, jnp.array([0]))
  assert int(state.steps) == 0 and int(state.requests) == 2 and int(machine.retained(state)) == 7


def test_fine_tuning_on_the_retained_data_lowers_the_forget_sets_membership_score():
  # a tiny linear model memorises 20 random-label examples (members); restarting from a model trained
  # without them and fine-tuning on the retained data only brings their membership AUC back towards 0.5
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(120, 30)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 120))
  forget, held_out = np.arange(20), np.arange(100, 120)
  machine = unlearning(100, finetune_steps=300)

  def losses(w, idx):
    return optax.softmax_cross_entropy_with_integer_labels(x[idx] @ w, y[idx])

  def train(w, state, steps, key):
    tx = optax.adam(0.05)
    opt = tx.init(w)

    @jax.jit
    def step(w, opt, key):
      idx = machine.sample(state, key, 32)
      g = jax.grad(lambda w: jnp.sum(machine.weights(state, idx) * losses(w, jnp.maximum(idx, 0))) / 32)(w)
      u, opt = tx.update(g, opt, w)
      return optax.apply_updates(w, u), opt

    for k in jax.random.split(key, steps):
      w, opt = step(w, opt, k)
    return w

  base = jnp.zeros((30, 4))
  state = machine.init()
  memorised = train(base, state, 400, jax.random.key(0))
  auc_before = float(membership_auc(losses(memorised, forget), losses(memorised, held_out)))
  state = machine.request(state, jnp.asarray(forget))
  unlearned = train(base, state, 300, jax.random.key(1))      # restart from the base, retained data only
  auc_after = float(membership_auc(losses(unlearned, forget), losses(unlearned, held_out)))
  assert auc_before > 0.75 and abs(auc_after - 0.5) < 0.15, (auc_before, auc_after)
