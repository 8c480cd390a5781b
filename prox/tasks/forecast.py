"""Learning-curve forecasting (after Vilares et al.): fit a saturating curve family to the
accuracy observed so far (against epochs, steps or training-set size x), predict the value at a final x
with an interval, and stop when the predicted remaining gain falls under a threshold.

Curve families (3 parameters each, a = the limit as x -> infinity):

    pow3:  y = a - b x^(-c)          (inverse power law, the usual learning-curve model)
    exp3:  y = a - b exp(-c x)       (exponential saturation)
    log3:  y = a - b / (1 + c log(1 + x))   (a very slow approach, for curves that keep creeping up)

Each family is fitted by bounded non-linear least squares (``scipy.optimize.least_squares``, trust-region
reflective, from several starts); the family with the lowest AIC n log(RSS/n) + 2p is used. The interval
is a residual bootstrap: refit on yhat + resampled residuals ``num_bootstrap`` times and take the
(1 - level)/2 and (1 + level)/2 quantiles of the bootstrap predictions (plus a resampled residual, so the
interval covers the observed value, not only the mean curve).

This runs on the host between epochs (numpy/scipy), not inside jitted code.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.optimize


class Curve(NamedTuple):
  """A curve family: y = fn(x, params), initial guesses and parameter bounds for least squares."""
  fn: Callable[[np.ndarray, np.ndarray], np.ndarray]   # fn(x, params) -> y
  starts: Callable[[np.ndarray, np.ndarray], list]     # initial guesses from (x, y)
  lower: tuple
  upper: tuple


def _pow3(x, p):
  a, b, c = p
  return a - b * np.power(x, -c)


def _exp3(x, p):
  a, b, c = p
  return a - b * np.exp(-c * x)


def _log3(x, p):
  a, b, c = p
  return a - b / (1.0 + c * np.log1p(x))


def _starts(x, y):
  top = float(np.max(y))
  span = max(float(np.max(y) - np.min(y)), 1e-3)
  return [(top + 0.1 * span, span, 0.5), (top + span, 2 * span, 0.2), (top + 0.01, span, 1.5)]


def _exp_starts(x, y):
  top = float(np.max(y))
  span = max(float(np.max(y) - np.min(y)), 1e-3)
  scale = 1.0 / max(float(np.median(x)), 1e-9)
  return [(top + 0.1 * span, span, scale), (top + span, span, 0.2 * scale), (top, span, 5 * scale)]


CURVES: dict[str, Curve] = {
    "pow3": Curve(_pow3, _starts, (-np.inf, -np.inf, 1e-4), (np.inf, np.inf, 10.0)),
    "exp3": Curve(_exp3, _exp_starts, (-np.inf, -np.inf, 1e-9), (np.inf, np.inf, np.inf)),
    "log3": Curve(_log3, _starts, (-np.inf, -np.inf, 1e-6), (np.inf, np.inf, 1e3)),
}


class CurveFit(NamedTuple):
  """A least-squares fit: family, params (a, b, c; a = the limit), residual sum of squares, AIC."""
  family: str
  params: np.ndarray     # (a, b, c); a is the limit
  rss: float
  aic: float


class Forecast(NamedTuple):
  """A forecast of the curve at ``x_final``.

  Attributes:
    family: the selected curve family.
    params: its fitted parameters (a, b, c).
    x_final: where the curve is predicted.
    predicted: the fitted curve at x_final.
    lower, upper: the bootstrap interval at ``level``.
    limit: the fitted asymptote a (x -> infinity).
    level: the interval's nominal coverage.
  """
  family: str
  params: np.ndarray
  x_final: float
  predicted: float
  lower: float
  upper: float
  limit: float
  level: float


def _check_xy(x, y):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be equal-length vectors, got shapes {x.shape} and {y.shape}")
  if x.size < 4:
    raise ValueError(f"need at least 4 points to fit a 3-parameter curve, got {x.size}")
  if np.any(x <= 0) or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
    raise ValueError("x must be positive and x, y finite")
  return x, y


def fit_curve(x, y, family: str = "pow3") -> CurveFit:
  """Least-squares fit of one family (best of several starts): argmin_p sum_n (y_n - f(x_n; p))^2."""
  if family not in CURVES:
    raise ValueError(f"unknown curve family {family!r}; expected one of {sorted(CURVES)}")
  x, y = _check_xy(x, y)
  return _fit(x, y, family)


def _fit(x, y, family, starts=None):
  curve = CURVES[family]
  best = None
  for p0 in (starts if starts is not None else curve.starts(x, y)):
    p0 = np.clip(np.asarray(p0, np.float64), np.add(curve.lower, 1e-12), np.subtract(curve.upper, 1e-12))
    try:
      res = scipy.optimize.least_squares(lambda p: curve.fn(x, p) - y, p0, bounds=(curve.lower, curve.upper),
                                         method="trf", max_nfev=200)
    except (ValueError, FloatingPointError):
      continue
    rss = float(np.sum(res.fun ** 2))
    if np.isfinite(rss) and (best is None or rss < best[1]):
      best = (res.x, rss)
  if best is None:
    raise RuntimeError(f"curve family {family!r} could not be fitted")
  n = x.size
  aic = n * np.log(max(best[1], 1e-300) / n) + 2 * 3
  return CurveFit(family, best[0], best[1], float(aic))


def forecast(x, y, x_final: float, *, families: Sequence[str] = ("pow3", "exp3", "log3"),
             num_bootstrap: int = 100, level: float = 0.9, seed: int = 0) -> Forecast:
  """Predicts the curve at ``x_final`` with a residual-bootstrap interval (see module docstring).

  Args:
    x: [n] positive abscissae (epochs, steps or data sizes) observed so far.
    y: [n] the metric (e.g. accuracy) at those x.
    x_final: where to predict (e.g. the last epoch of the budget).
    families: candidate curve families; the lowest AIC is used.
    num_bootstrap: bootstrap refits for the interval (0: the interval collapses to the prediction).
    level: nominal coverage of the interval.
    seed: numpy seed of the bootstrap.
  """
  x, y = _check_xy(x, y)
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if int(num_bootstrap) < 0:
    raise ValueError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
  for f in families:
    if f not in CURVES:
      raise ValueError(f"unknown curve family {f!r}; expected one of {sorted(CURVES)}")
  fits = [_fit(x, y, f) for f in families]
  best = min(fits, key=lambda f: f.aic)
  curve = CURVES[best.family]
  pred = float(curve.fn(np.asarray([x_final], np.float64), best.params)[0])
  lower = upper = pred
  if num_bootstrap > 0:
    rng = np.random.default_rng(seed)
    fitted = curve.fn(x, best.params)
    resid = y - fitted
    resid = resid - resid.mean()
    preds = []
    for _ in range(int(num_bootstrap)):
      y_star = fitted + rng.choice(resid, size=resid.size, replace=True)
      try:
        p = _fit(x, y_star, best.family, starts=[best.params]).params
      except RuntimeError:
        continue
      preds.append(float(curve.fn(np.asarray([x_final]), p)[0]) + float(rng.choice(resid)))
    if preds:
      lower, upper = (float(v) for v in np.quantile(preds, [(1 - level) / 2, (1 + level) / 2]))
  return Forecast(best.family, best.params, float(x_final), pred, lower, upper, float(best.params[0]),
                  float(level))


def predicted_gain(fc: Forecast, current: float, *, optimistic: bool = True) -> float:
  """Predicted improvement over ``current`` (the best value so far): upper - current (optimistic) or
  predicted - current."""
  return (fc.upper if optimistic else fc.predicted) - float(current)


def should_stop(fc: Forecast, current: float, *, min_gain: float, optimistic: bool = True) -> bool:
  """Stop when the predicted remaining gain is below ``min_gain``: by default even the upper end of the
  interval would not improve on ``current`` by ``min_gain``."""
  if min_gain < 0:
    raise ValueError(f"min_gain must be >= 0, got {min_gain}")
  return predicted_gain(fc, current, optimistic=optimistic) < min_gain
