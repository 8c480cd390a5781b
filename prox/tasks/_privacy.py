"""Private training and unlearning: a privacy accountant, unlearning by fine-tuning on the retained data,
and a loss-threshold membership-inference score.

Accountant. DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") with noise multiplier
``sigma``, Poisson sampling rate ``q = B / N`` and ``S`` steps is the ``S``-fold composition of the
subsampled Gaussian mechanism; :func:`dp_epsilon` returns its ``epsilon`` at ``delta`` from Google's
``dp_accounting`` library, by Renyi DP (``"rdp"``; Mironov 2017, "Renyi Differential Privacy") or by
privacy-loss distributions (``"pld"``, tight up to discretisation; Koskela et al. 2020, Doroshenko et al.
2022). :func:`dp_noise_multiplier` inverts it.

Unlearning (Al Mahmud, Jebreel, Domingo-Ferrer and Sanchez 2025, "DP2Unlearning: An Efficient and
Guaranteed Unlearning Framework for LLMs"). Train a base model ``w_DP`` on all data ``D`` with
``epsilon``-DP; to forget a set ``F``, start again from ``w_DP`` and fine-tune without noise on the retained
data ``D \\ F`` only. The result depends on ``F`` only through ``w_DP`` (post-processing), so the disclosure
about ``F`` stays bounded by ``epsilon``, at a fraction of the cost of retraining on ``D \\ F`` from scratch.
:func:`unlearning` is the small state machine of the fine-tuning phase: which examples are forgotten,
retained-only sampling and loss weights, the fine-tuning clock. The caller restarts the parameters
from ``w_DP`` when :attr:`Unlearning.request` is called (``state.requests`` changes).

Membership inference (Yeom, Giacomelli, Fredrikson and Jha 2018, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting"): the loss-threshold attack calls an example a member when its
loss is below a threshold. Over all thresholds its ROC AUC is the probability that a random member has a
lower loss than a random non-member (ties count one half)::

    AUC = P(l_member < l_non) + P(l_member = l_non) / 2

(0.5: no leak; the Mann-Whitney statistic), and its best advantage is ``max_tau TPR(tau) - FPR(tau)``.

Departures. DP2Unlearning studies language models with DP-SGD or DP masked-language-model pre-training
and compares forgetting metrics of the TOFU benchmark; here the same procedure serves any classifier,
and forgetting is scored by the loss-threshold attack (members: the forgotten set; non-members: held-out
data).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ACCOUNTANTS = ("rdp", "pld")


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dp_epsilon needs Google's dp-accounting library: pip install dp-accounting") from e
  return dp_accounting


def _check_accounting(noise_multiplier: Any, sampling_rate: Any, steps: Any, delta: Any) -> None:
  if not isinstance(noise_multiplier, numbers.Real) or not noise_multiplier > 0 or not math.isfinite(
      noise_multiplier):
    raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
  if not isinstance(sampling_rate, numbers.Real) or not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"steps must be a positive integer, got {steps!r}")
  if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _event(dp, noise_multiplier: float, sampling_rate: float, steps: int):
  gaussian = dp.GaussianDpEvent(float(noise_multiplier))
  one = gaussian if sampling_rate == 1 else dp.PoissonSampledDpEvent(float(sampling_rate), gaussian)
  return dp.SelfComposedDpEvent(one, int(steps))


def _accountant(dp, accountant: str):
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
  return dp.rdp.RdpAccountant() if accountant == "rdp" else dp.pld.PLDAccountant()


def dp_epsilon(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
               accountant: str = "rdp") -> float:
  """``epsilon`` of DP-SGD after ``steps`` steps (module docstring; add-or-remove-one neighbours).

  Args:
    noise_multiplier: ``sigma`` (noise std / clipping norm).
    sampling_rate: ``q``, the Poisson sampling probability of an example (``batch / dataset``; 1: the
      full batch every step).
    steps: ``S``.
    delta: ``delta``.
    accountant: ``"rdp"`` (fast, an upper bound) or ``"pld"`` (tight, slower for many steps).
  """
  _check_accounting(noise_multiplier, sampling_rate, steps, delta)
  dp = _dp_accounting()
  acc = _accountant(dp, accountant)
  acc.compose(_event(dp, noise_multiplier, sampling_rate, steps))
  return float(acc.get_epsilon(delta))


def dp_noise_multiplier(*, target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                        accountant: str = "rdp", tolerance: float = 1e-3) -> float:
  """The smallest ``sigma`` (within ``tolerance``) whose :func:`dp_epsilon` is at most ``target_epsilon``."""
  _check_accounting(1.0, sampling_rate, steps, delta)
  if not isinstance(target_epsilon, numbers.Real) or not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
  dp = _dp_accounting()
  _accountant(dp, accountant)          # validates the name

  def make_event(sigma: float):
    return _event(dp, sigma, sampling_rate, steps)

  make_acc = (lambda: dp.rdp.RdpAccountant()) if accountant == "rdp" else (lambda: dp.pld.PLDAccountant())
  return float(dp.calibrate_dp_mechanism(make_acc, make_event, target_epsilon, delta,
                                         dp.LowerEndpointAndGuess(1e-3, 1.0), tol=tolerance))


# --- membership inference -----------------------------------------------------------------------------

def _ranks(values: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each value: #reference strictly below it and #reference equal to it."""
  ref = jnp.sort(reference)
  below = jnp.searchsorted(ref, values, side="left")
  equal = jnp.searchsorted(ref, values, side="right") - below
  return below, equal


def membership_auc(member_losses: jax.Array, nonmember_losses: jax.Array) -> jax.Array:
  """ROC AUC of the loss-threshold attack, ``P(l_m < l_n) + P(l_m = l_n) / 2`` (float32 scalar; sort-based,
  ``O((M + N) log N)``)."""
  lm = jnp.asarray(member_losses, jnp.float32).reshape(-1)
  ln = jnp.asarray(nonmember_losses, jnp.float32).reshape(-1)
  if lm.size == 0 or ln.size == 0:
    raise ValueError("membership_auc needs at least one member and one non-member loss")
  below, equal = _ranks(lm, ln)                    # non-members with a lower / equal loss than each member
  above = ln.size - below - equal                  # non-members with a higher loss: the member wins
  return (jnp.sum(above) + 0.5 * jnp.sum(equal)) / (lm.size * ln.size)


def membership_advantage(member_losses: jax.Array, nonmember_losses: jax.Array) -> jax.Array:
  """``max_tau TPR(tau) - FPR(tau)`` of the attack "member iff loss <= tau" over all thresholds."""
  lm = jnp.asarray(member_losses, jnp.float32).reshape(-1)
  ln = jnp.asarray(nonmember_losses, jnp.float32).reshape(-1)
  taus = jnp.concatenate([lm, ln])
  tpr = jnp.searchsorted(jnp.sort(lm), taus, side="right") / lm.size
  fpr = jnp.searchsorted(jnp.sort(ln), taus, side="right") / ln.size
  return jnp.maximum(jnp.max(tpr - fpr), 0.0)


# --- unlearning by fine-tuning on the retained data ----------------------------------------------------

class UnlearningState(NamedTuple):
  """State of an :func:`unlearning` machine.

  Attributes:
    forget: bool ``[N]``, the examples to forget (all requests so far).
    requests: int32, requests so far (a change tells the caller to restart from the DP base model).
    steps: int32, fine-tuning steps since the last request.
  """
  forget: jax.Array
  requests: jax.Array
  steps: jax.Array


class Unlearning(NamedTuple):
  """Unlearning by fine-tuning on the retained data, as pure functions (built by :func:`unlearning`).

  Attributes:
    init: ``init() -> state`` (nothing forgotten).
    request: ``request(state, indices) -> state``: forget ``indices`` (negative entries ignored); the
      fine-tuning clock restarts.
    update: ``update(state) -> state``: one fine-tuning step taken.
    done: ``done(state) -> bool``: ``finetune_steps`` steps since the last request.
    weights: ``weights(state, indices) -> float32``: 0 for forgotten examples (and index -1), else 1 (loss
      weights of a batch of example indices).
    sample: ``sample(state, key, n) -> int32 [n]``: ``n`` distinct retained examples, uniformly (-1 in
      the slots beyond the number retained).
    retained: ``retained(state) -> int32``, the number of retained examples.
  """
  init: Callable[[], UnlearningState]
  request: Callable[[UnlearningState, jax.Array], UnlearningState]
  update: Callable[[UnlearningState], UnlearningState]
  done: Callable[[UnlearningState], jax.Array]
  weights: Callable[[UnlearningState, jax.Array], jax.Array]
  sample: Callable[[UnlearningState, jax.Array, int], jax.Array]
  retained: Callable[[UnlearningState], jax.Array]


def unlearning(num_examples: int, *, finetune_steps: int) -> Unlearning:
  """The fine-tuning phase of DP2Unlearning over ``num_examples`` training examples (module docstring).

  Usage: train ``w_DP`` with ``prox.optim.dp_gradient`` (or ``ghost_clipped_loss`` + ``dp_noise``); on a
  request, ``state = machine.request(state, forget_ids)`` and ``params = w_DP``; then train without noise
  on ``machine.sample(state, key, B)`` until ``machine.done(state)``.
  """
  if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples < 1:
    raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
  if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, numbers.Integral) or finetune_steps < 0:
    raise ValueError(f"finetune_steps must be an integer >= 0, got {finetune_steps!r}")
  n = int(num_examples)

  def init() -> UnlearningState:
    return UnlearningState(forget=jnp.zeros((n,), bool), requests=jnp.zeros((), jnp.int32),
                           steps=jnp.zeros((), jnp.int32))

  def request(state: UnlearningState, indices: jax.Array) -> UnlearningState:
    idx = jnp.asarray(indices, jnp.int32).reshape(-1)
    safe = jnp.where(idx >= 0, idx, n)
    return UnlearningState(forget=state.forget.at[safe].set(True, mode="drop"), requests=state.requests + 1,
                           steps=jnp.zeros((), jnp.int32))

  def weights(state: UnlearningState, indices: jax.Array) -> jax.Array:
    idx = jnp.asarray(indices, jnp.int32)
    keep = (idx >= 0) & ~state.forget[jnp.clip(idx, 0, n - 1)]
    return keep.astype(jnp.float32)

  def sample(state: UnlearningState, key: jax.Array, size: int) -> jax.Array:
    if not 0 < size <= n:
      raise ValueError(f"sample size must be in [1, {n}], got {size!r}")
    scores = jnp.where(state.forget, -jnp.inf, jax.random.gumbel(key, (n,)))
    values, idx = jax.lax.top_k(scores, size)
    return jnp.where(jnp.isfinite(values), idx, -1).astype(jnp.int32)   # -1: fewer retained than size

  return Unlearning(init=init, request=request, update=lambda s: s._replace(steps=s.steps + 1),
                    done=lambda s: s.steps >= finetune_steps, weights=weights, sample=sample,
                    retained=lambda s: jnp.sum(~s.forget).astype(jnp.int32))
