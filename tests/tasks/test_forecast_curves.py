"""Tests for prox.tasks.forecast: learning-curve fits, forecasts with intervals, stopping."""
import numpy as np
import pytest

from prox.tasks import forecast


@pytest.mark.parametrize("family, curve, limit", [
    ("pow3", lambda x: 0.95 - 0.6 * x ** -0.5, 0.95),
    ("exp3", lambda x: 0.90 - 0.5 * np.exp(-x / 15.0), 0.90),
])
def test_recovers_known_curves(family, curve, limit):
  x = np.arange(1, 61, dtype=float)
  fit = forecast.fit_curve(x, curve(x), family)
  assert fit.params[0] == pytest.approx(limit, abs=1e-4)
  assert fit.rss < 1e-8


@pytest.mark.parametrize("curve, x_final", [
    (lambda x: 0.95 - 0.6 * x ** -0.5, 300.0),
    (lambda x: 0.90 - 0.5 * np.exp(-x / 15.0), 200.0),
])
def test_forecast_of_noisy_synthetic_curves(curve, x_final):
  rng = np.random.default_rng(0)
  x = np.arange(1, 51, dtype=float)
  y = curve(x) + rng.normal(0, 0.003, x.size)
  fc = forecast.forecast(x, y, x_final, num_bootstrap=60)
  truth = curve(x_final)
  assert abs(fc.predicted - truth) < 0.01
  assert fc.lower <= truth <= fc.upper
  assert fc.lower <= fc.predicted <= fc.upper and fc.upper - fc.lower < 0.05


def test_stopping_criterion():
  x = np.arange(1, 41, dtype=float)
  rising = 0.9 - 0.5 * np.exp(-x / 40.0)         # far from its limit: keep going
  flat = 0.9 - 0.5 * np.exp(-x / 4.0)            # saturated: stop
  fc_r = forecast.forecast(x, rising, 200.0, num_bootstrap=0)
  fc_f = forecast.forecast(x, flat, 200.0, num_bootstrap=0)
  assert forecast.predicted_gain(fc_r, rising.max()) > 0.1
  assert not forecast.should_stop(fc_r, rising.max(), min_gain=0.01)
  assert forecast.should_stop(fc_f, flat.max(), min_gain=0.01)


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: forecast.fit_curve([1, 2, 3], [0.1, 0.2, 0.3]), "at least 4"),
      (lambda: forecast.fit_curve([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]), "positive"),
      (lambda: forecast.fit_curve([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], "cubic"), "unknown curve"),
      (lambda: forecast.forecast([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], 10, level=1.5), "level"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)
