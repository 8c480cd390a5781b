"""Fixed class-target embeddings as the classifier (language-guided supervision; Ni, Zhao, Zhang, Hu, Meng,
Zhang & Xiang 2024, "Enhancing Visual Continual Learning with Language-Guided Supervision").

Instead of a randomly initialised linear head, every class ``c`` gets a fixed target vector ``t_c`` (in the
paper the embedding of the class name by a pretrained language model; here any given ``[C, E]`` array), the
head is frozen, and the features learn to point at their class's target. With features ``f(x)`` (optionally
projected, ``f(x) P`` with a learnable ``P`` ``[D, E]``) the logits are cosine similarities with a temperature:

    z_c(x) = cos(f(x) P, t_c) / tau,        loss = CE(z(x), y).

Because the targets of all classes -- also the classes of future tasks -- are fixed from the start and share
a semantic geometry, the head never drifts between tasks. These functions are the head and the loss; the
targets themselves (a language model's embeddings) come from outside prox. The targets get no gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

_EPS = 1e-12


def _normalize(x: jax.Array) -> jax.Array:
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


def target_head_init(key: jax.Array, feature_dim: int, target_dim: int) -> dict[str, jax.Array]:
  """``{"kernel": P}``, ``P`` ``[feature_dim, target_dim]`` LeCun-normal: the learnable projection into the
  targets' space (skip it when the features already have the targets' dimension)."""
  for name, value in (("feature_dim", feature_dim), ("target_dim", target_dim)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  kernel = jax.random.normal(key, (feature_dim, target_dim), jnp.float32) / np.sqrt(feature_dim)
  return {"kernel": kernel}


def cosine_target_logits(
    features: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array,
    projection: jax.Array | None = None,
) -> jax.Array:
  """``[B, C]`` logits ``cos(features @ projection, targets_c) / temperature``.

  Args:
    features: ``[B, D]``.
    targets: ``[C, E]``, the fixed class targets (no gradient).
    temperature: ``tau > 0``.
    projection: ``[D, E]`` (e.g. ``target_head_init(...)["kernel"]``); ``None`` needs ``D == E``.
  """
  if not isinstance(temperature, jax.core.Tracer) and not (np.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
  f = jnp.asarray(features, jnp.float32)
  if projection is not None:
    f = f @ jnp.asarray(projection, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(targets, jnp.float32))
  if t.ndim != 2 or f.shape[-1] != t.shape[-1]:
    raise ValueError(f"features{'' if projection is None else ' @ projection'} must end in the targets' "
                     f"dimension {t.shape[-1] if t.ndim == 2 else '?'}; got features {f.shape}, targets {t.shape}")
  return _normalize(f) @ _normalize(t).T / jnp.asarray(temperature, jnp.float32)


def language_target_loss(
    features: jax.Array,
    labels: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array,
    projection: jax.Array | None = None,
    logit_mask: jax.Array | None = None,
) -> jax.Array:
  """Per-example cross-entropy of :func:`cosine_target_logits` (``logit_mask`` bool ``[C]``: the classes in
  the softmax, e.g. those seen so far; default all)."""
  logits = cosine_target_logits(features, targets, temperature=temperature, projection=projection)
  if logit_mask is not None:
    logits = jnp.where(jnp.asarray(logit_mask, bool), logits, -1e30)
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels))
