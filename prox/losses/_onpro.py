"""Online prototype equilibrium (OnPro; Wei, Ye, Huang, Zhang & Shan 2023, "Online Prototype Learning for
Online Continual Learning"), and the mixup cross-entropy of its replayed samples.

Online prototypes. Given the L2-normalised projections ``z_i`` of a mini-batch and labels ``y_i``, the online
prototype of a class ``c`` present in the batch is the mean of its projections, normalised:

    p_c = normalize(1/n_c sum_{i: y_i = c} z_i).

With two augmented views ``a`` and ``b`` of the batch, the prototypes ``P^a = {p^a_c}`` and ``P^b = {p^b_c}``
over the ``K`` present classes form ``2K`` anchors. The prototype contrastive loss (the paper's Eq. for
``L_pro``) pulls each prototype to the same class's prototype of the other view and pushes it from every
other prototype of both views:

    L_pro = -1/(2K) sum_{u in P^a u P^b} log( exp(<u, u+> / tau) / sum_{v in P^a u P^b, v != u} exp(<u, v> / tau) )

(``u+`` the other view's prototype of ``u``'s class; ``tau = 0.5`` in the reference code). Online prototype
equilibrium contrasts the new classes (prototypes of the incoming batch) and the seen classes (prototypes
of the replayed batch) separately and adds the two:

    L_OPE = L_pro(incoming batch) + L_pro(replayed batch).

OnPro's full objective adds a cross-entropy on the replayed (mixup) batch and OCM's instance-wise contrastive
loss on rotated views; the mixup cross-entropy is :func:`mixup_cross_entropy`, the instance loss is not part
of this module. The replay sampler (adaptive prototypical feedback) is ``prox.tasks.prototype_feedback``; feed it
``(means_a + means_b) / 2`` of the replayed batch's :func:`online_prototypes`, as the reference code does.

Unlike the per-example losses of this package, the prototype losses are one value per batch (a prototype
involves every example of its class). Shapes are static: a class absent from the batch (or with zero
weight) simply drops out of the sums (the reference code's ``nonZeroRows``); a batch with no class gives 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

_EPS = 1e-12


def _normalize(x: jax.Array) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis (torch's ``F.normalize``), with a finite gradient at 0."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


def _check_classes(num_classes: int) -> int:
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return int(num_classes)


def _check_temperature(temperature: float) -> None:
  if isinstance(temperature, jax.core.Tracer):
    return
  if not np.isfinite(float(temperature)) or float(temperature) <= 0:
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def online_prototypes(
    z: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Class means of the L2-normalised projections of one batch (not normalised again).

  Args:
    z: ``[B, D]`` projections (normalised here; normalising twice changes nothing).
    labels: int ``[B]``.
    num_classes: ``C``.
    weights: ``[B]`` example weights (e.g. a replay validity mask); default 1.

  Returns:
    ``(means [C, D] float32, present bool [C])``: ``means[c] = sum_i w_i [y_i = c] z_i / sum_i w_i [y_i = c]``,
    zero for classes without weight in the batch.
  """
  c = _check_classes(num_classes)
  z = _normalize(jnp.asarray(z, jnp.float32))
  w = jnp.ones(z.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  onehot = jax.nn.one_hot(jnp.asarray(labels), c, dtype=jnp.float32) * w[:, None]
  counts = jnp.sum(onehot, axis=0)
  means = (onehot.T @ z) / jnp.maximum(counts, _EPS)[:, None]
  return means, counts > 0


def prototype_contrastive_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    temperature: float = 0.5,
    weights: jax.Array | None = None,
) -> jax.Array:
  """OnPro's ``L_pro`` between the online prototypes of two views of one batch (see the module docstring).

  Args:
    z_a, z_b: ``[B, D]`` projections of the two views (row ``i`` of both is example ``i``).
    labels: int ``[B]``; num_classes: ``C``.
    temperature: ``tau > 0``.
    weights: ``[B]``, e.g. 0 for invalid replay rows.

  Returns:
    float32 scalar; 0 when no class is present, and 0 with one class (its two prototypes are each other's
    only candidates).
  """
  c = _check_classes(num_classes)
  _check_temperature(temperature)
  means_a, present = online_prototypes(z_a, labels, num_classes=c, weights=weights)
  means_b, _ = online_prototypes(z_b, labels, num_classes=c, weights=weights)
  protos = jnp.concatenate([_normalize(means_a), _normalize(means_b)])          # [2C, D]
  live = jnp.concatenate([present, present])
  logits = protos @ protos.T / jnp.asarray(temperature, jnp.float32)
  rows = jnp.arange(2 * c)
  candidates = live[:, None] & live[None, :] & (rows[:, None] != rows[None, :])
  lse = jax.nn.logsumexp(jnp.where(candidates, logits, -1e30), axis=1)
  positive = logits[rows, (rows + c) % (2 * c)]
  per_anchor = jnp.where(live, lse - positive, 0.0)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(live.astype(jnp.float32)), 1.0)


def onpro_equilibrium_loss(
    z_new_a: jax.Array,
    z_new_b: jax.Array,
    labels_new: jax.Array,
    z_seen_a: jax.Array,
    z_seen_b: jax.Array,
    labels_seen: jax.Array,
    *,
    num_classes: int,
    temperature: float = 0.5,
    seen_weights: jax.Array | None = None,
) -> jax.Array:
  """Online prototype equilibrium ``L_OPE = L_pro(incoming batch) + L_pro(replayed batch)``.

  ``z_new_*``: the two views' projections of the incoming batch; ``z_seen_*``: of the replayed batch
  (``seen_weights`` its validity, e.g. ``reservoir_sample``'s mask). Float32 scalar.
  """
  new = prototype_contrastive_loss(z_new_a, z_new_b, labels_new, num_classes=num_classes,
                                   temperature=temperature)
  seen = prototype_contrastive_loss(z_seen_a, z_seen_b, labels_seen, num_classes=num_classes,
                                    temperature=temperature, weights=seen_weights)
  return new + seen


def mixup_cross_entropy(
    logits: jax.Array,
    labels_a: jax.Array,
    labels_b: jax.Array,
    lam: jax.Array,
) -> jax.Array:
  """Per-example ``(1 - lam) CE(logits, y_a) + lam CE(logits, y_b)`` for inputs ``(1 - lam) x_a + lam x_b``."""
  logits = jnp.asarray(logits, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  ce_a = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels_a))
  ce_b = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels_b))
  return (1.0 - lam) * ce_a + lam * ce_b
