"""Tests for prox.tasks.irt: 1PL fit, MAP ability, PUDF schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from prox.tasks import irt


def _simulate(seed, num_resp=300, num_items=80):
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=num_resp)
  b = rng.normal(size=num_items)
  p = 1 / (1 + np.exp(-(theta[:, None] - b[None, :])))
  return (rng.random(p.shape) < p).astype(np.int32), theta, b


def test_fit_1pl_recovers_difficulties_and_abilities():
  y, theta, b = _simulate(0)
  fit = irt.fit_1pl(y, np.ones(y.shape, bool))
  assert fit.difficulties.shape == b.shape and fit.abilities.shape == theta.shape
  assert np.corrcoef(np.asarray(fit.difficulties), b)[0, 1] > 0.98
  assert np.mean(np.abs(np.asarray(fit.difficulties) - b)) < 0.2
  assert np.corrcoef(np.asarray(fit.abilities), theta)[0, 1] > 0.95


def test_fit_1pl_is_the_map_estimate():
  # the same objective minimised by scipy in float64 (hand-written reference), with missing answers
  y, _, _ = _simulate(1)
  mask = np.random.default_rng(2).random(y.shape) < 0.8
  num_items = y.shape[1]

  def f(v):
    b, th = v[:num_items], v[num_items:]
    z = th[:, None] - b[None, :]
    nll = np.sum(mask * (np.logaddexp(0, z) - y * z))
    g = mask * (1 / (1 + np.exp(-z)) - y)
    val = (nll + 0.5 * np.sum(th ** 2) + 0.5 * np.sum(b ** 2) / 4.0) / mask.sum()
    grad = np.concatenate([-g.sum(0) + b / 4.0, g.sum(1) + th]) / mask.sum()
    return val, grad

  ref = scipy.optimize.minimize(f, np.zeros(sum(y.shape)), jac=True, method="L-BFGS-B",
                                options=dict(gtol=1e-12, ftol=1e-15, maxiter=2000)).x
  fit = irt.fit_1pl(y, mask, prior_std_difficulty=2.0)
  np.testing.assert_allclose(np.asarray(fit.difficulties), ref[:num_items], atol=2e-3)
  np.testing.assert_allclose(np.asarray(fit.abilities), ref[num_items:], atol=2e-3)


def test_map_ability_matches_grid_search_and_recovers_truth():
  rng = np.random.default_rng(3)
  b = rng.normal(size=1000)
  for true in (-1.2, 0.0, 0.7):
    y = rng.random(1000) < 1 / (1 + np.exp(-(true - b)))
    est = float(irt.estimate_ability(b.astype(np.float32), y))
    grid = np.linspace(-4, 4, 80001)
    logpost = [np.sum(y * -np.logaddexp(0, -(t - b)) + (1 - y) * -np.logaddexp(0, t - b)) - t * t / 2
               for t in grid[::100]]
    coarse = grid[::100][int(np.argmax(logpost))]
    fine = grid[np.abs(grid - coarse) <= 0.01]
    lp = [np.sum(y * -np.logaddexp(0, -(t - b)) + (1 - y) * -np.logaddexp(0, t - b)) - t * t / 2 for t in fine]
    assert est == pytest.approx(fine[int(np.argmax(lp))], abs=2e-4)
    assert abs(est - true) < 0.2
  # prior dominates with no data
  assert float(irt.estimate_ability(b[:3], np.ones(3), np.zeros(3, bool))) == pytest.approx(0.0, abs=1e-6)


def test_pudf_selection_and_stall_bump():
  b = jnp.asarray([-1.0, -0.5, 0.0, 0.3, 1.0, 2.0])
  state = irt.pudf_init()
  state, sel = irt.pudf_update(state, -0.6, b)
  assert float(state.theta) == pytest.approx(-0.6) and int(sel.count) == 1
  np.testing.assert_array_equal(np.asarray(sel.mask), [True, False, False, False, False, False])
  np.testing.assert_array_equal(np.asarray(sel.indices), [0, -1, -1, -1, -1, -1])
  state, sel = irt.pudf_update(state, 0.05, b)            # progress: theta follows the estimate
  assert float(state.theta) == pytest.approx(0.05) and int(sel.count) == 3 and int(state.stall) == 0
  state, sel = irt.pudf_update(state, 0.0, b)             # stall 1: keep theta (never shrink)
  assert float(state.theta) == pytest.approx(0.05) and int(state.stall) == 1 and int(sel.count) == 3
  state, sel = irt.pudf_update(state, -0.2, b)            # stall 2: bump by 0.1
  assert float(state.theta) == pytest.approx(0.15) and int(state.stall) == 0 and int(sel.count) == 3
  state, sel = irt.pudf_update(state, 0.4, b)
  assert float(state.theta) == pytest.approx(0.4) and int(sel.count) == 4 and int(state.epoch) == 5
  np.testing.assert_array_equal(np.asarray(sel.indices)[:4], [0, 1, 2, 3])
  # min_items: never an empty epoch
  _, sel = irt.pudf_update(irt.pudf_init(min_items=2), -5.0, b)
  np.testing.assert_array_equal(np.asarray(sel.mask), [True, True, False, False, False, False])


def test_pudf_step_jits_and_selects_easy_items():
  rng = np.random.default_rng(4)
  b = jnp.asarray(rng.normal(size=5000), jnp.float32)
  probe = irt.probe_indices(jax.random.key(0), 5000)
  assert probe.shape == (1000,) and len(np.unique(np.asarray(probe))) == 1000
  correct = rng.random(1000) < 1 / (1 + np.exp(-(0.5 - np.asarray(b)[np.asarray(probe)])))
  step = jax.jit(irt.pudf_step)
  state, sel, theta_hat = step(irt.pudf_init(), b, probe, correct)
  assert abs(float(theta_hat) - 0.5) < 0.2
  assert int(sel.count) == int(jnp.sum(b <= state.theta))
  step(state, b, probe, ~correct)
  assert step._cache_size() == 1


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: irt.fit_1pl(np.array([[0, 1], [2, 1]])), "0 \\(wrong\\) or 1"),
      (lambda: irt.fit_1pl(np.zeros(3)), "2-D"),
      (lambda: irt.fit_1pl(np.zeros((2, 2)), prior_std_ability=0.0), "prior"),
      (lambda: irt.estimate_ability(np.zeros(3), np.zeros(4)), "equal-length"),
      (lambda: irt.pudf_init(patience=0), "patience"),
      (lambda: irt.pudf_init(bump=-0.1), "bump"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)
