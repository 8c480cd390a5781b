"""Losses over the steps of an iterative (latent-reasoning) model: interval masks, progressive
temperatures and budget-truncated halting.

The inputs are per-step logits ``z_{ik}``, ``[m, K, C]`` (``prox.models.IterativeClassifier``), step
``k = 1..K``.

Backward interval (Hu et al. 2025, "Towards Better Alignment: Training Diffusion Models with Reinforcement
Learning Against Sparse Rewards", B^2-DiffuRL). Only the steps of the active interval ``[t_s, K]`` are
trained; the interval starts at the end of the chain and grows backwards
(``prox.tasks.backward_interval``)::

    L_i = sum_k 1[k >= t_s] l_ik / sum_k 1[k >= t_s]                       (:func:`interval_step_loss`)

(with the model's ``train_from=t_s`` the state entering step ``t_s`` is also cut from the gradient).

Progressive temperature (Tang et al. 2025, "Think Before Recommend: Unleashing the Latent Reasoning Power
for Sequential Recommendation", ReaRec's progressive reasoning learning). Each step's prediction is
trained at its own temperature, high early and falling to the base temperature at the last step, so the
distribution sharpens as reasoning proceeds::

    tau_k = tau alpha^(K - k)        (alpha >= 1)
    L_i = sum_k CE(softmax(z_ik / tau_k), y_i)                              (:func:`progressive_temperature_loss`)

Budget-truncated halting (Banino et al. 2021, "PonderNet: Learning to Ponder"). With halting logits
``q_ik`` and ``lambda_ik = sigmoid(q_ik)`` the probability that example ``i`` stops after step ``k`` under a
budget ``n_i`` is::

    p_ik = lambda_ik prod_{j<k} (1 - lambda_ij)   for k < n_i,   p_in = prod_{j<n_i} (1 - lambda_ij),   0 beyond

(the mass left at the budget halts there), the policy over lengths that a budget reward trains
(``prox.losses.budget_reward``, :func:`halting_log_probs`).

Departures. ReaRec computes item scores by inner products with item embeddings over a sequence encoder's
reasoning positions and adds a contrastive term on noised states; here the helper only applies the
temperature schedule to any per-step logits (the primitive; the recommender itself needs a sequence
model and data prox does not have). B^2-DiffuRL trains a diffusion model's denoising steps with a policy
gradient; the helper masks any per-step loss.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def interval_mask(num_steps: int, t_start: Any) -> jax.Array:
  """bool ``[K]`` (or ``[..., K]`` for an array ``t_start``): True for the steps ``k >= t_start`` (1-based)."""
  k = jnp.arange(1, num_steps + 1, dtype=jnp.int32)
  return k >= jnp.asarray(t_start, jnp.int32)[..., None]


def interval_step_loss(per_step_loss: jax.Array, t_start: Any) -> jax.Array:
  """The mean of ``per_step_loss`` ``[..., K]`` over the active steps ``k >= t_start`` (``[...]``)."""
  loss = jnp.asarray(per_step_loss)
  w = interval_mask(loss.shape[-1], t_start).astype(loss.dtype)
  return jnp.sum(w * loss, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)


def per_step_cross_entropy(per_step_logits: jax.Array, labels: jax.Array, *,
                           temperatures: jax.Array | None = None) -> jax.Array:
  """``[m, K]``: ``CE(softmax(z_ik / tau_k), y_i)`` (``tau_k = 1`` by default)."""
  z = jnp.asarray(per_step_logits, jnp.float32)
  if temperatures is not None:
    z = z / jnp.asarray(temperatures, jnp.float32)[:, None]
  labels = jnp.broadcast_to(jnp.asarray(labels)[:, None], z.shape[:2])
  return optax.softmax_cross_entropy_with_integer_labels(z, labels)


def progressive_temperatures(num_steps: int, *, tau: float = 1.0, alpha: float = 1.5) -> jax.Array:
  """float32 ``[K]``: ``tau_k = tau alpha^(K - k)`` for ``k = 1..K``."""
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau!r}")
  if not alpha >= 1.0:
    raise ValueError(f"alpha must be >= 1 (temperatures fall towards the last step), got {alpha!r}")
  k = jnp.arange(1, num_steps + 1, dtype=jnp.float32)
  return jnp.float32(tau) * jnp.float32(alpha) ** (num_steps - k)


def progressive_temperature_loss(per_step_logits: jax.Array, labels: jax.Array, *, tau: float = 1.0,
                                 alpha: float = 1.5, t_start: Any = None,
                                 reduce: str = "sum") -> jax.Array:
  """ReaRec's per-step loss at progressive temperatures (module docstring), per example ``[m]``.

  Args:
    per_step_logits: ``[m, K, C]``.
    labels: ``[m]`` int labels.
    tau, alpha: the base temperature and the per-step factor.
    t_start: optional active interval start (steps before it are left out).
    reduce: ``"sum"`` over steps (the paper) or ``"mean"``.
  """
  if reduce not in ("sum", "mean"):
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
  K = per_step_logits.shape[1]
  ce = per_step_cross_entropy(per_step_logits, labels, temperatures=progressive_temperatures(K, tau=tau,
                                                                                             alpha=alpha))
  w = jnp.ones((K,), ce.dtype) if t_start is None else interval_mask(K, t_start).astype(ce.dtype)
  total = jnp.sum(w * ce, -1)
  return total if reduce == "sum" else total / jnp.maximum(jnp.sum(w, -1), 1.0)


def halting_log_probs(halt_logits: jax.Array, budget: Any) -> jax.Array:
  """``[m, K]``: ``log p_ik``, the budget-truncated halting distribution of the module docstring
  (``-inf`` past each example's budget ``n_i``, clipped to ``[1, K]``)."""
  q = jnp.asarray(halt_logits, jnp.float32)
  m, K = q.shape
  n = jnp.broadcast_to(jnp.clip(jnp.asarray(budget, jnp.int32), 1, K), (m,))
  log_halt = jax.nn.log_sigmoid(q)
  log_go = jax.nn.log_sigmoid(-q)
  survive = jnp.cumsum(log_go, 1) - log_go                 # sum_{j<k} log(1 - lambda_j)
  k = jnp.arange(1, K + 1)[None, :]
  out = jnp.where(k < n[:, None], survive + log_halt, survive)
  return jnp.where(k <= n[:, None], out, -jnp.inf)
