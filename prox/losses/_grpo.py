"""Group-relative policy optimisation: group advantages, a budget-aware reward and the clipped surrogate.

GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models"). For one input ``q`` the policy draws a group of ``G`` samples ``o_1..o_G`` with rewards
``r_1..r_G``; each sample's advantage is its reward normalised within its group (no value network)::

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

and the policy maximises the clipped surrogate of PPO (Schulman et al. 2017) with a KL penalty towards a
reference policy, i.e. it minimises per sample::

    l_i = -min(rho_i A_i, clip(rho_i, 1 - e, 1 + e) A_i) + beta KL_i,    rho_i = pi(o_i|q) / pi_old(o_i|q)
    KL_i = pi_ref(o_i|q) / pi(o_i|q) - log(pi_ref(o_i|q) / pi(o_i|q)) - 1       (GRPO's "k3" estimator, >= 0)

Budget reward (Hammoud et al. 2025, "Train Long, Think Short: Curriculum Learning for Efficient
Reasoning"; Tian et al. 2025, "Reinforcement Mid-Training"): the reward of a sample of length ``l`` (the
reasoning steps it used) under the current budget ``B`` is correctness plus a length term::

    r = w_c 1[correct] + w_l r_len(l; B)
    r_len = 1[l <= B]                                   shape="within"
          = l / B if l <= B else max(0, 2 - l / B)      shape="triangular"  (peaks at the budget)
          = max(0, 1 - l / B)                           shape="linear"      (shorter is better)

optionally gated (``gate=True``: the length term only counts for correct samples, so a short wrong
answer earns nothing).

Departures. GRPO on language models averages the surrogate over the tokens of each sample; here a sample
has one log-probability (``logp``: the sum over its decisions, e.g. the halting step and the class of an
iterative classifier), so the surrogate is per sample. The papers' formatting reward (structural tags)
has no counterpart outside text. Both papers describe the length term as a function of the length and
the budget; Reinforcement Mid-Training calls its length reward triangular, which ``"triangular"`` reads as
a triangle peaking at the budget (the exact shape was not available to us); ``"within"`` and ``"linear"``
are the two simplest alternatives, offered for ablations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LENGTH_SHAPES = ("within", "triangular", "linear")


def group_advantages(rewards: jax.Array, *, eps: float = 1e-6, ddof: int = 0,
                     mask: jax.Array | None = None) -> jax.Array:
  """Group-relative advantages ``(r - mean) / (std + eps)`` over the last axis (one group per row).

  Args:
    rewards: ``[..., G]`` rewards, the last axis a group of samples of one input.
    eps: added to the standard deviation (a group of equal rewards gets advantages 0).
    ddof: the standard deviation's delta degrees of freedom (0: population, 1: unbiased).
    mask: optional bool ``[..., G]``: samples that count (others get advantage 0 and are left out of
      the mean and std).

  Returns:
    Advantages, the shape and float dtype of ``rewards``.
  """
  r = jnp.asarray(rewards)
  r = r.astype(jnp.result_type(r.dtype, jnp.float32))
  if r.ndim < 1:
    raise ValueError(f"group_advantages needs rewards with a group axis, got shape {r.shape}")
  m = jnp.ones(r.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), r.shape)
  w = m.astype(r.dtype)
  n = jnp.sum(w, -1, keepdims=True)
  mean = jnp.sum(w * r, -1, keepdims=True) / jnp.maximum(n, 1)
  var = jnp.sum(w * (r - mean) ** 2, -1, keepdims=True) / jnp.maximum(n - ddof, 1)
  return jnp.where(m, (r - mean) / (jnp.sqrt(var) + eps), 0.0)


def length_reward(length: jax.Array, budget: jax.Array, *, shape: str = "within") -> jax.Array:
  """The length term ``r_len(l; B)`` of the module docstring (float32, the broadcast shape)."""
  if shape not in LENGTH_SHAPES:
    raise ValueError(f"shape must be one of {LENGTH_SHAPES}, got {shape!r}")
  length = jnp.asarray(length, jnp.float32)
  budget = jnp.asarray(budget, jnp.float32)
  ratio = length / jnp.maximum(budget, 1e-12)
  if shape == "within":
    return (length <= budget).astype(jnp.float32)
  if shape == "triangular":
    return jnp.where(ratio <= 1.0, ratio, jnp.maximum(0.0, 2.0 - ratio))
  return jnp.maximum(0.0, 1.0 - ratio)


def budget_reward(correct: jax.Array, length: jax.Array, budget: jax.Array, *, correct_weight: float = 1.0,
                  length_weight: float = 1.0, shape: str = "within", gate: bool = False) -> jax.Array:
  """``w_c 1[correct] + w_l r_len(length; budget)`` (see the module docstring).

  Args:
    correct: bool (or 0/1) per sample.
    length: reasoning steps (tokens) each sample used.
    budget: the budget ``B`` (scalar or per sample), e.g. ``BudgetSchedule.budget(state)``.
    correct_weight, length_weight: ``w_c`` and ``w_l``.
    shape: ``"within"``, ``"triangular"`` or ``"linear"``.
    gate: the length term only for correct samples.

  Returns:
    float32 rewards, the broadcast shape of the inputs.
  """
  c = jnp.asarray(correct).astype(jnp.float32)
  r_len = length_reward(length, budget, shape=shape)
  if gate:
    r_len = r_len * c
  return correct_weight * c + length_weight * r_len


def grpo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *, clip_eps: float = 0.2,
              ref_logp: jax.Array | None = None, kl_coef: float = 0.0) -> jax.Array:
  """Per-sample GRPO loss ``-min(rho A, clip(rho, 1-e, 1+e) A) + beta KL`` (module docstring).

  Args:
    logp: ``log pi(o_i|q)`` under the parameters being trained (differentiated).
    old_logp: ``log pi_old(o_i|q)`` of the policy that drew the samples (held constant).
    advantages: ``A_i`` (e.g. :func:`group_advantages`; held constant).
    clip_eps: ``e``.
    ref_logp: ``log pi_ref(o_i|q)`` for the KL penalty (``None``: no penalty).
    kl_coef: ``beta``.

  Returns:
    The loss per sample (average it over the batch).
  """
  if clip_eps < 0:
    raise ValueError(f"clip_eps must be >= 0, got {clip_eps!r}")
  logp = jnp.asarray(logp)
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, logp.dtype))
  ratio = jnp.exp(logp - jax.lax.stop_gradient(jnp.asarray(old_logp, logp.dtype)))
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
  loss = -surrogate
  if ref_logp is not None and kl_coef:
    delta = jax.lax.stop_gradient(jnp.asarray(ref_logp, logp.dtype)) - logp
    loss = loss + kl_coef * (jnp.exp(delta) - delta - 1.0)
  return loss
