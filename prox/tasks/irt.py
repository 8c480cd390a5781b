"""Item response theory for curriculum learning: 1PL difficulties, MAP abilities and the PUDF schedule.

PUDF (Meng, Lalor et al., "A Psychology-based Unified Dynamic Framework for Curriculum Learning", 2024;
successor of DDaCLAE, Lalor & Yu 2020):

1. An "artificial crowd" of models answers every training item; a 1PL (Rasch) IRT model
       P(y_ji = 1) = sigmoid(theta_j - b_i)
   is fitted to the crowd's right/wrong matrix, giving each item a difficulty b_i (``fit_1pl``).
2. Each epoch the model's ability theta is estimated by MAP (prior N(0, 1)) from its answers on 1,000
   random training items with known b_i (``estimate_ability``).
3. The epoch trains on the items with b_i <= theta; if theta stalls for 2 epochs it is raised by 0.1
   (``pudf_update``; ``pudf_step`` does 2 and 3 together).

:class:`SubsetSource` feeds ``prox.loop.run`` with such epochs: each epoch visits the items selected for
it, and an action at the epoch boundary (the model's answers on the probe items -> ``pudf_step``)
selects the next epoch's items with ``source.select``.

Departure: the reference fits the 1PL model by variational inference (py-irt, hierarchical priors);
``fit_1pl`` computes the MAP estimate with Gaussian priors on abilities and difficulties (L-BFGS, optax),
which gives the same ordering of items and, with a crowd of reasonable size, nearly the same values.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from prox.tasks import data as data_lib
from prox.tasks._sources import SubsetSource  # noqa: F401  (was defined here; the curriculum reads it here)


class IRTFit(NamedTuple):
  """A fitted 1PL model.

  Attributes:
    difficulties: [I] item difficulties b_i.
    abilities: [J] respondent (crowd member) abilities theta_j.
    loss: final negative log posterior per observed response.
    num_steps: L-BFGS iterations run.
  """
  difficulties: jax.Array
  abilities: jax.Array
  loss: jax.Array
  num_steps: jax.Array


class PUDFState(NamedTuple):
  """The PUDF schedule.

  Attributes:
    theta: current training threshold (items with b_i <= theta are used); -inf before the first epoch.
    stall: consecutive epochs in which the estimated ability did not exceed theta.
    epoch: epochs scheduled so far.
    patience: int32, stalled epochs before the bump (2).
    bump: float, amount theta is raised after ``patience`` stalled epochs (0.1).
    min_items: int32, the easiest ``min_items`` items are always selected (never an empty epoch).
  """
  theta: jax.Array
  stall: jax.Array
  epoch: jax.Array
  patience: jax.Array
  bump: jax.Array
  min_items: jax.Array


class PUDFSelection(NamedTuple):
  """Items for one epoch.

  Attributes:
    mask: bool [I], selected items.
    indices: int32 [I], the selected item indices in increasing order, then -1 padding.
    count: int32, number of selected items (the valid prefix of ``indices``).
  """
  mask: jax.Array
  indices: jax.Array
  count: jax.Array


def _check_responses(responses, mask):
  responses = jnp.asarray(responses)
  if responses.ndim != 2:
    raise ValueError(f"responses must be a 2-D [respondents, items] matrix, got shape {responses.shape}")
  if not isinstance(responses, jax.core.Tracer):
    r = np.asarray(responses)
    m = np.ones_like(r, bool) if mask is None else np.asarray(mask, bool)
    if np.any((r[m] != 0) & (r[m] != 1)):
      raise ValueError("responses must be 0 (wrong) or 1 (right) where observed")
  if mask is not None and jnp.shape(mask) != responses.shape:
    raise ValueError(f"mask shape {jnp.shape(mask)} must match responses shape {responses.shape}")
  return responses


def neg_log_posterior(difficulties, abilities, responses, mask=None, *, prior_std_ability=1.0,
                      prior_std_difficulty=1.0):
  """1PL negative log posterior per observed response:
  [sum_{ji observed} BCE(y_ji, sigmoid(theta_j - b_i)) + sum_j theta_j^2 / (2 s_theta^2)
   + sum_i b_i^2 / (2 s_b^2)] / #observed."""
  logits = abilities[:, None] - difficulties[None, :]
  y = responses.astype(logits.dtype)
  m = jnp.ones_like(logits) if mask is None else jnp.asarray(mask, logits.dtype)
  nll = jnp.sum(m * optax.sigmoid_binary_cross_entropy(logits, y))
  prior = 0.5 * jnp.sum(abilities ** 2) / prior_std_ability ** 2
  prior += 0.5 * jnp.sum(difficulties ** 2) / prior_std_difficulty ** 2
  return (nll + prior) / jnp.maximum(jnp.sum(m), 1.0)


def fit_1pl(responses, mask=None, *, prior_std_ability: float = 1.0, prior_std_difficulty: float = 1.0,
            max_steps: int = 200, tol: float = 1e-6, dtype=jnp.float32) -> IRTFit:
  """Fits a 1PL IRT model to an artificial crowd's answers by MAP (L-BFGS from optax; the problem is
  strictly convex, so the optimum is unique).

      P(y_ji = 1) = sigmoid(theta_j - b_i),  theta_j ~ N(0, s_theta^2),  b_i ~ N(0, s_b^2).

  Args:
    responses: [J, I] 0/1 answers of J respondents on I items.
    mask: optional bool [J, I], True where a response was observed.
    prior_std_ability, prior_std_difficulty: prior scales s_theta, s_b.
    max_steps: L-BFGS iteration cap; stops earlier when the gradient norm is below ``tol``.
    tol: gradient-norm tolerance.
    dtype: floating dtype of the parameters.
  """
  responses = _check_responses(responses, mask)
  if prior_std_ability <= 0 or prior_std_difficulty <= 0:
    raise ValueError(f"prior scales must be > 0, got {prior_std_ability}, {prior_std_difficulty}")
  if int(max_steps) < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  return _fit_1pl(responses, mask, float(prior_std_ability), float(prior_std_difficulty),
                  int(max_steps), float(tol), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(4, 6))
def _fit_1pl(responses, mask, s_theta, s_b, max_steps, tol, dtype):
  num_resp, num_items = responses.shape

  def loss(p):
    return neg_log_posterior(p[0], p[1], responses, mask, prior_std_ability=s_theta,
                             prior_std_difficulty=s_b)

  params = (jnp.zeros((num_items,), dtype), jnp.zeros((num_resp,), dtype))
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def cond(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad = optax.tree.get(state, "grad")
    return (count == 0) | ((count < max_steps) & (optax.tree.norm(grad) >= tol))

  params, state = lax.while_loop(cond, body, (params, opt.init(params)))
  return IRTFit(params[0], params[1], loss(params), optax.tree.get(state, "count"))


def estimate_ability(difficulties, correct, mask=None, *, prior_mean: float = 0.0, prior_std: float = 1.0,
                     num_iters: int = 25) -> jax.Array:
  """MAP ability from answers to items of known difficulty (Newton's method on a concave objective):

      theta* = argmax_theta sum_i m_i [y_i log s(theta - b_i) + (1 - y_i) log(1 - s(theta - b_i))]
               - (theta - mu)^2 / (2 sigma^2),
      theta <- theta + (sum_i m_i (y_i - p_i) - (theta - mu) / sigma^2)
                       / (sum_i m_i p_i (1 - p_i) + 1 / sigma^2).

  Args:
    difficulties: [I] item difficulties b_i of the probed items.
    correct: [I] 0/1 (or bool) answers of the model being trained.
    mask: optional bool [I], probed items (others ignored).
    prior_mean, prior_std: the N(mu, sigma^2) prior (PUDF: N(0, 1)).
    num_iters: Newton steps (the objective is smooth and strongly concave; 25 is ample).
  """
  b = jnp.asarray(difficulties)
  if b.ndim != 1 or jnp.shape(correct) != b.shape:
    raise ValueError(f"difficulties {b.shape} and correct {jnp.shape(correct)} must be equal-length vectors")
  if prior_std <= 0:
    raise ValueError(f"prior_std must be > 0, got {prior_std}")
  dtype = b.dtype if jnp.issubdtype(b.dtype, jnp.floating) else jnp.float32
  b = b.astype(dtype)
  y = jnp.asarray(correct).astype(dtype)
  m = jnp.ones_like(b) if mask is None else jnp.asarray(mask).astype(dtype)
  prec = 1.0 / prior_std ** 2

  def newton(_, theta):
    p = jax.nn.sigmoid(theta - b)
    grad = jnp.sum(m * (y - p)) - (theta - prior_mean) * prec
    hess = jnp.sum(m * p * (1 - p)) + prec
    return theta + grad / hess

  return lax.fori_loop(0, num_iters, newton, jnp.asarray(prior_mean, dtype))


def probe_indices(key, num_items: int, num_probe: int = 1000) -> jax.Array:
  """PUDF's probe set: ``min(num_probe, num_items)`` distinct random item indices."""
  return jax.random.choice(key, num_items, (min(int(num_probe), int(num_items)),), replace=False)


def pudf_init(*, patience: int = 2, bump: float = 0.1, min_items: int = 1) -> PUDFState:
  """Creates the PUDF schedule (the paper's defaults: patience 2, bump 0.1)."""
  if int(patience) < 1:
    raise ValueError(f"patience must be >= 1, got {patience}")
  if bump <= 0:
    raise ValueError(f"bump must be > 0, got {bump}")
  if int(min_items) < 0:
    raise ValueError(f"min_items must be >= 0, got {min_items}")
  return PUDFState(theta=jnp.asarray(-jnp.inf, jnp.float32), stall=jnp.asarray(0, jnp.int32),
                   epoch=jnp.asarray(0, jnp.int32), patience=jnp.asarray(patience, jnp.int32),
                   bump=jnp.asarray(bump, jnp.float32), min_items=jnp.asarray(min_items, jnp.int32))


def select(theta, difficulties, min_items=0) -> PUDFSelection:
  """Items with b_i <= theta, plus the ``min_items`` easiest items (ties broken by index)."""
  b = jnp.asarray(difficulties)
  n = b.shape[0]
  rank = jnp.zeros((n,), jnp.int32).at[jnp.argsort(b, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
  mask = (b <= theta) | (rank < min_items)
  count = jnp.sum(mask).astype(jnp.int32)
  indices = jnp.nonzero(mask, size=n, fill_value=-1)[0].astype(jnp.int32)
  return PUDFSelection(mask, indices, count)


def pudf_update(state: PUDFState, theta_hat, difficulties) -> tuple[PUDFState, PUDFSelection]:
  """One PUDF epoch given the estimated ability theta_hat:

      stalled = theta_hat <= theta_{t-1};   s_t = s_{t-1} + 1 if stalled else 0
      theta_t = theta_{t-1} + bump, s_t = 0      if s_t >= patience
              = theta_{t-1}                      elif stalled (the data set never shrinks)
              = theta_hat                        otherwise
      train on {i : b_i <= theta_t} (plus the min_items easiest items).

  Returns (new state, the epoch's ``PUDFSelection``)."""
  theta_hat = jnp.asarray(theta_hat, state.theta.dtype)
  stalled = theta_hat <= state.theta
  stall = jnp.where(stalled, state.stall + 1, 0)
  bumped = stall >= state.patience
  theta = jnp.where(bumped, state.theta + state.bump, jnp.where(stalled, state.theta, theta_hat))
  stall = jnp.where(bumped, 0, stall)
  new = state._replace(theta=theta, stall=stall.astype(jnp.int32), epoch=state.epoch + 1)
  return new, select(theta, difficulties, state.min_items)


def pudf_step(state: PUDFState, difficulties, probe, probe_correct, *, prior_mean: float = 0.0,
              prior_std: float = 1.0) -> tuple[PUDFState, PUDFSelection, jax.Array]:
  """``estimate_ability`` on the probe items then ``pudf_update``.

  Args:
    state: the schedule.
    difficulties: [I] difficulties of all training items.
    probe: [P] indices of the probed items (e.g. ``probe_indices(key, I)``).
    probe_correct: [P] 0/1 answers of the current model on them.
  Returns (state, selection, theta_hat)."""
  b = jnp.asarray(difficulties)
  theta_hat = estimate_ability(b[jnp.asarray(probe)], probe_correct, prior_mean=prior_mean,
                               prior_std=prior_std)
  state, selection = pudf_update(state, theta_hat, b)
  return state, selection, theta_hat


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class PUDF(NamedTuple):
  """The PUDF schedule in prox's state-machine convention: ``init()``, ``update(state, theta_hat,
  difficulties) -> (state, selection)`` and ``step(state, difficulties, probe, probe_correct) -> (state,
  selection, theta_hat)`` (ability estimated on the probe items, then ``update``)."""
  init: Callable[[], PUDFState]
  update: Callable[..., tuple[PUDFState, PUDFSelection]]
  step: Callable[..., tuple[PUDFState, PUDFSelection, jax.Array]]


def pudf(*, patience: int = 2, bump: float = 0.1, min_items: int = 1, prior_mean: float = 0.0,
         prior_std: float = 1.0) -> PUDF:
  """PUDF (Meng et al. 2024; see :func:`pudf_update` for the rule), options checked now."""
  pudf_init(patience=patience, bump=bump, min_items=min_items)
  return PUDF(init=lambda: pudf_init(patience=patience, bump=bump, min_items=min_items), update=pudf_update,
              step=functools.partial(pudf_step, prior_mean=prior_mean, prior_std=prior_std))
