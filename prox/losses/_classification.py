"""Classification losses and evaluation sums for ``prox.step`` (one place for every experiment).

The training loss reads optional batch fields, so one function serves plain, weighted and masked-head
training:

    L = sum_i w_i CE(mask(z_i), t_i) / max(sum_i w_i, 1)

with logits ``z_i = apply(params, model_state, x_i)``, weights ``w_i = batch["weight"]`` (default 1; 0 for
padding rows), ``mask(z)`` keeping the classes of ``batch["logit_mask"]`` (absent classes get the most
negative finite logit, so their probability is exactly 0 and gradients stay finite; task-incremental
continual learning), and targets ``t_i`` the one-hot labels, or soft targets given by ``targets_fn``
(PS-KD, distillation).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Apply = Callable[..., tuple[jax.Array, PyTree]]


def mask_logits(logits: jax.Array, logit_mask: jax.Array) -> jax.Array:
  """``logits`` where ``logit_mask`` else the most negative finite value of the dtype (a finite fill keeps
  ``softmax`` and its gradient NaN-free; masked classes get probability exactly 0)."""
  logits = jnp.asarray(logits)
  return jnp.where(jnp.asarray(logit_mask, bool), logits, jnp.finfo(logits.dtype).min)


def _weights(batch: dict, n: int) -> jax.Array:
  w = batch.get("weight")
  return jnp.ones((n,), jnp.float32) if w is None else jnp.asarray(w, jnp.float32)


def classification_loss(
    apply: Apply,
    *,
    targets_fn: Callable[[jax.Array, dict, Any], jax.Array] | None = None,
) -> Callable:
  """A ``prox.step`` loss: weighted mean softmax cross-entropy and accuracy of ``apply``.

  Args:
    apply: ``apply(params, model_state, images, train=True) -> (logits, new_model_state)``
      (``prox.models.functional(model).apply``).
    targets_fn: optional ``(logits, batch, ctx) -> [b, classes]`` soft targets (e.g. PS-KD's
      ``(1 - a) onehot + a p_prev`` read from ``ctx.extra``); default: one-hot labels.

  Returns:
    ``loss_fn(params, model_state, batch, ctx) -> (loss, ({"accuracy"}, model_state))``; the batch has
    ``image`` and ``label`` and optionally ``weight`` and ``logit_mask`` (see the module docstring).
  """

  def loss_fn(params, model_state, batch, ctx):
    logits, model_state = apply(params, model_state, batch["image"], train=True)
    if "logit_mask" in batch:
      logits = mask_logits(logits, batch["logit_mask"])
    w = _weights(batch, logits.shape[0])
    total = jnp.maximum(jnp.sum(w), 1.0)
    if targets_fn is None:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    else:
      ce = optax.softmax_cross_entropy(logits, jax.lax.stop_gradient(targets_fn(logits, batch, ctx)))
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(w * ce) / total, ({"accuracy": jnp.sum(w * correct) / total}, model_state)

  return loss_fn


def classification_eval(apply: Apply, *, per_class: bool = False) -> Callable:
  """Per-device sums for ``prox.step.make_eval_step`` over real rows (``batch["mask"]``).

  Returns ``loss`` (summed cross-entropy), ``correct`` and ``count``; with ``batch["logit_mask"]`` also
  ``correct_masked`` (accuracy with the task's head mask); with ``per_class`` also ``class_correct`` and
  ``class_count`` (``[classes]``, unmasked predictions).
  """

  def eval_fn(params, model_state, batch):
    logits, _ = apply(params, model_state, batch["image"], train=False)
    real = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    hit = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
    out = {"loss": jnp.sum(real * optax.softmax_cross_entropy_with_integer_labels(logits, label)),
           "correct": jnp.sum(real * hit), "count": jnp.sum(real)}
    if "logit_mask" in batch:
      masked = jnp.argmax(mask_logits(logits, batch["logit_mask"]), -1) == label
      out["correct_masked"] = jnp.sum(real * masked)
    if per_class:
      onehot = jax.nn.one_hot(label, logits.shape[-1]) * real[:, None]
      out["class_correct"] = jnp.sum(onehot * hit[:, None], 0)
      out["class_count"] = jnp.sum(onehot, 0)
    return out

  return eval_fn
