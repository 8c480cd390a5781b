"""SLCA: slow learner with classifier alignment (Zhang et al. 2023, "SLCA: Slow Learner with Classifier
Alignment for Continual Learning on a Pre-trained Model"), as pure functions.

1. Slow learner: the backbone's learning rate is ``0.01 x`` the head's:
   ``prox.optim.slow_learner.slow_learner(optax.sgd(lr, momentum=0.9), 0.01, backbone_mask)``.
2. After each task ``t``, class-wise feature statistics of the task's classes: mean ``mu_c`` and covariance
   ``Sigma_c + 1e-4 I`` of the backbone features (``class_stats_update``), with ``t_c`` the task in which they
   were computed.
3. Classifier alignment: sample 256 features per seen class from ``N(s_c mu_c, Sigma_c)`` with
   ``s_c = 0.9 + 0.1 (t_c + 1) / (t + 1)`` (``sample_class_features``) and retrain the head for 5 epochs on them
   with the logit-normalised cross-entropy (``alignment_loss``, ``tau = 0.1``): ``align_classifier``, the
   whole retraining as one jitted function (epochs of shuffled mini-batches, its own optax optimizer).

The reference code recomputes the statistics only for the current task's classes; here ``classes`` says
which classes to (re)compute, so classes that reoccur (SCoLe) get fresh statistics and a fresh ``t_c``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClassStats(NamedTuple):
  """Per-class Gaussian feature statistics.

  Attributes:
    mean: float32 ``[C, D]``.
    cov: float32 ``[C, D, D]``, the unbiased covariance plus ``ridge * I`` (``ridge * I`` for unseen classes).
    count: int32 ``[C]``, number of features the statistics come from (0: unseen).
    task: int32 ``[C]``, ``t_c``, the task index in which they were computed (-1: unseen).
  """
  mean: jax.Array
  cov: jax.Array
  count: jax.Array
  task: jax.Array


def class_stats_init(num_classes: int, feature_dim: int, *, ridge: float = 1e-4) -> ClassStats:
  """Empty statistics for ``num_classes`` classes of ``feature_dim``-dimensional features."""
  for name, v in (("num_classes", num_classes), ("feature_dim", feature_dim)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  eye = jnp.eye(feature_dim, dtype=jnp.float32)
  return ClassStats(mean=jnp.zeros((num_classes, feature_dim), jnp.float32),
                    cov=jnp.broadcast_to(ridge * eye, (num_classes, feature_dim, feature_dim)),
                    count=jnp.zeros((num_classes,), jnp.int32),
                    task=jnp.full((num_classes,), -1, jnp.int32))


def class_stats_update(
    stats: ClassStats,
    features: jax.Array,
    labels: jax.Array,
    classes: jax.Array | np.ndarray,
    task_index: int | jax.Array,
    *,
    valid: jax.Array | None = None,
    ridge: float = 1e-4,
) -> ClassStats:
  """Recompute the statistics of ``classes`` from ``features`` ``[N, D]`` / ``labels`` ``[N]``.

  For each ``c`` in ``classes`` with ``n_c >= 1`` examples: ``mu_c = mean(f)``,
  ``Sigma_c = sum (f - mu_c)(f - mu_c)^T / max(n_c - 1, 1) + ridge I``, ``t_c = task_index``; classes with no
  example here keep their old statistics. ``valid`` (bool ``[N]``) excludes padding rows. Cost
  ``O(len(classes) N D^2)``; jitted, so a fixed-length ``classes`` compiles once.
  """
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2 or features.shape[1] != stats.mean.shape[1]:
    raise ValueError(f"features must be [N, {stats.mean.shape[1]}], got shape {features.shape}")
  labels = jnp.asarray(labels)
  if labels.shape != features.shape[:1]:
    raise ValueError(f"labels must be [{features.shape[0]}], got shape {labels.shape}")
  classes = jnp.asarray(classes, jnp.int32).reshape(-1)
  w_valid = jnp.ones(labels.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  return _stats_update(stats, features, labels, classes, jnp.asarray(task_index, jnp.int32), w_valid,
                       jnp.asarray(ridge, jnp.float32))


@jax.jit
def _stats_update(stats, features, labels, classes, task_index, w_valid, ridge) -> ClassStats:
  eye = jnp.eye(features.shape[1], dtype=jnp.float32)

  def one_class(c):
    w = (labels == c).astype(jnp.float32) * w_valid
    n = jnp.sum(w)
    mu = (w @ features) / jnp.maximum(n, 1.0)
    centred = (features - mu) * jnp.sqrt(w)[:, None]
    cov = centred.T @ centred / jnp.maximum(n - 1.0, 1.0) + ridge * eye
    return mu, cov, n

  mu, cov, n = jax.lax.map(one_class, classes)
  has = n > 0
  old_mu, old_cov = stats.mean[classes], stats.cov[classes]
  return ClassStats(
      mean=stats.mean.at[classes].set(jnp.where(has[:, None], mu, old_mu)),
      cov=stats.cov.at[classes].set(jnp.where(has[:, None, None], cov, old_cov)),
      count=stats.count.at[classes].set(jnp.where(has, n.astype(jnp.int32), stats.count[classes])),
      task=stats.task.at[classes].set(jnp.where(has, task_index, stats.task[classes])),
  )


def mean_scale(stats: ClassStats, task_index: int | jax.Array) -> jax.Array:
  """``s_c = 0.9 + 0.1 (t_c + 1) / (t + 1)`` per class (float32 ``[C]``; unseen classes get 0.9)."""
  t_c = jnp.maximum(stats.task, -1).astype(jnp.float32)
  return 0.9 + 0.1 * (t_c + 1.0) / (jnp.asarray(task_index, jnp.float32) + 1.0)


def sample_class_features(
    stats: ClassStats, key: jax.Array, task_index: int | jax.Array, num_per_class: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draw ``num_per_class`` features per class from ``N(s_c mu_c, Sigma_c)`` (SLCA's classifier alignment).

  Returns ``(features [C * n, D], labels [C * n], weights [C * n])`` grouped by class (shuffle before
  batching); ``weights`` is 1 for seen classes (``count > 0``) and 0 for the rows of unseen ones.
  """
  if not isinstance(num_per_class, (int, np.integer)) or num_per_class < 1:
    raise ValueError(f"num_per_class must be a positive int, got {num_per_class!r}")
  return _sample(stats, key, jnp.asarray(task_index, jnp.float32), num_per_class)


@functools.partial(jax.jit, static_argnums=3)
def _sample(stats: ClassStats, key, task_index, num_per_class: int):
  c, d = stats.mean.shape
  chol = jnp.linalg.cholesky(stats.cov)  # [C, D, D]
  z = jax.random.normal(key, (c, num_per_class, d), jnp.float32)
  loc = mean_scale(stats, task_index)[:, None] * stats.mean  # [C, D]
  feats = loc[:, None, :] + jnp.einsum("cij,cnj->cni", chol, z)
  labels = jnp.repeat(jnp.arange(c, dtype=jnp.int32), num_per_class)
  weights = jnp.repeat((stats.count > 0).astype(jnp.float32), num_per_class)
  return feats.reshape(c * num_per_class, d), labels, weights


def normalize_logits(
    logits: jax.Array,
    *,
    tau: float = 0.1,
    logit_groups: np.ndarray | None = None,
    logit_mask: jax.Array | np.ndarray | None = None,
    eps: float = 1e-7,
) -> jax.Array:
  """SLCA's logit normalisation: ``logits / (mean_g ||logits_g||_2 + eps) / tau``.

  ``logit_groups`` (int ``[C]``, static) assigns each class to its task ``g``; the norm is the mean over the
  groups of each group's L2 norm (the reference code's per-task norm). ``None``: one group, i.e. LogitNorm
  ``logits / ||logits|| / tau`` (Wei et al. 2022). Classes with ``logit_mask`` False (unseen) are left out
  of the norms.
  """
  groups, live = _groups_and_live(logits, tau, logit_groups, logit_mask)
  return _normalize(jnp.asarray(logits), groups, live, jnp.float32(tau), jnp.float32(eps))


def _groups_and_live(logits, tau, logit_groups, logit_mask) -> tuple[jax.Array, jax.Array]:
  """Validate; ``(onehot [C, G] class-to-group matrix, live float [C])``."""
  if not np.isfinite(tau) or tau <= 0:
    raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
  num_classes = jnp.shape(logits)[-1]
  if logit_groups is None:
    groups = np.zeros((num_classes,), np.int32)
  else:
    groups = np.asarray(logit_groups)
    if groups.shape != (num_classes,) or groups.min() < 0:
      raise ValueError(f"logit_groups must be {num_classes} non-negative ints, got {groups}")
  onehot = np.eye(int(groups.max()) + 1, dtype=np.float32)[groups]
  live = jnp.ones((num_classes,), jnp.float32) if logit_mask is None else jnp.asarray(logit_mask, jnp.float32)
  return jnp.asarray(onehot), live


@jax.jit
def _normalize(logits, onehot, live, tau, eps):
  onehot = onehot * live[:, None]  # [C, G]
  sq = jnp.square(logits.astype(jnp.float32)) @ onehot  # [..., G]
  present = jnp.sum(onehot, axis=0) > 0
  positive = sq > 0  # a safe sqrt: gradient 0 (not NaN) at a zero norm, like torch.norm
  norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0) + eps
  norm = jnp.sum(jnp.where(present, norms, 0.0), axis=-1, keepdims=True) / jnp.maximum(jnp.sum(present), 1)
  return (logits.astype(jnp.float32) / norm / tau).astype(logits.dtype)


def alignment_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    tau: float = 0.1,
    logit_groups: np.ndarray | None = None,
    logit_mask: jax.Array | np.ndarray | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Head-alignment loss: weighted mean cross-entropy of ``normalize_logits(logits)`` over the live classes.

  ``loss = sum_n w_n CE(normalize_logits(logits_n), y_n) / sum_n w_n``; classes with ``logit_mask`` False
  (not yet seen) are excluded from the softmax, as the reference code slices ``logits[:, :seen]``.
  """
  groups, live = _groups_and_live(logits, tau, logit_groups, logit_mask)
  labels = jnp.asarray(labels)
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  return _alignment(jnp.asarray(logits), labels, groups, live, w, jnp.float32(tau))


@jax.jit
def _alignment(logits, labels, onehot, live, w, tau):
  z = _normalize(logits, onehot, live, tau, jnp.float32(1e-7)).astype(jnp.float32)
  z = jnp.where(live > 0, z, jnp.finfo(jnp.float32).min)
  ce = optax.softmax_cross_entropy_with_integer_labels(z, labels)
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


def align_classifier(
    head: dict[str, jax.Array],
    features: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    key: jax.Array,
    *,
    tx: optax.GradientTransformation,
    epochs: int = 5,
    batch_size: int = 256,
    tau: float = 0.1,
    logit_groups: np.ndarray | None = None,
    logit_mask: jax.Array | np.ndarray | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """SLCA's classifier alignment: retrains a linear head on sampled features with ``alignment_loss``.

  The rows with ``weights > 0`` (``n`` of them; ``sample_class_features`` gives weight 0 to the rows of
  unseen classes) are the training set. Each epoch ``e`` visits them in the random order of
  ``fold_in(key, e)`` in ``ceil(n / batch_size)`` mini-batches (the last one shorter: padded with weight-0
  rows), and each mini-batch takes one step of ``tx`` on

      sum_m w_m CE(normalize_logits(f_m W + b), y_m) / sum_m w_m

  over the classes of ``logit_mask`` (default: the classes with at least one row of positive weight, i.e.
  the seen ones). The optimizer state starts fresh (``tx.init(head)``). One jitted function (a scan over
  epochs, a loop over the mini-batches); it compiles once per ``tx`` object, options and shapes, so pass
  the same ``tx`` object at every task boundary.

  Args:
    head: ``{"kernel": [D, C], "bias": [C]}``, the linear head (``logits = features @ kernel + bias``).
    features: ``[N, D]`` sampled features; labels: int ``[N]``; weights: ``[N]`` (0: not a sample).
    key: the order's key.
    tx: the alignment optimizer (SLCA: ``optax.sgd(0.01, momentum=0.9)``).
    epochs, batch_size: passes over the samples (SLCA: 5) and the mini-batch size.
    tau, logit_groups: as in ``alignment_loss``.
    logit_mask: bool ``[C]``, the classes in the softmax (default: see above).

  Returns:
    ``(head, losses)``: the aligned head and the mean mini-batch loss of each epoch (float32 ``[epochs]``).
  """
  for name, value in (("epochs", epochs), ("batch_size", batch_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  features = jnp.asarray(features, jnp.float32)
  num_classes = int(jnp.shape(head["bias"])[-1])
  if features.ndim != 2 or features.shape[1] != jnp.shape(head["kernel"])[0]:
    raise ValueError(f"features must be [N, {jnp.shape(head['kernel'])[0]}], got shape {features.shape}")
  groups, _ = _groups_and_live(jnp.zeros((num_classes,)), tau, logit_groups, None)
  if logit_mask is None:
    live = jnp.zeros((num_classes,), bool).at[jnp.asarray(labels)].max(jnp.asarray(weights) > 0)
  else:
    live = jnp.asarray(logit_mask, bool)
  return _align(head, features, jnp.asarray(labels, jnp.int32), jnp.asarray(weights, jnp.float32), key,
                live, groups, jnp.float32(tau), tx=tx, epochs=int(epochs), batch_size=int(batch_size))


@functools.partial(jax.jit, static_argnames=("tx", "epochs", "batch_size"))
def _align(head, features, labels, weights, key, live, onehot, tau, *, tx, epochs: int, batch_size: int):
  n_rows = features.shape[0]
  padded = -(-n_rows // batch_size) * batch_size
  valid = weights > 0
  num_valid = jnp.sum(valid.astype(jnp.int32))
  num_batches = (num_valid + batch_size - 1) // batch_size
  live_f = live.astype(jnp.float32)

  def loss_fn(h, f, y, w):
    z = _normalize(f @ h["kernel"] + h["bias"], onehot, live_f, tau, jnp.float32(1e-7)).astype(jnp.float32)
    z = jnp.where(live, z, jnp.finfo(jnp.float32).min)
    ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)

  grad_fn = jax.value_and_grad(loss_fn)

  def epoch(carry, e):
    h, opt_state = carry
    scores = jnp.where(valid, jax.random.uniform(jax.random.fold_in(key, e), (n_rows,)), 2.0)
    order = jnp.argsort(scores)                       # the samples in random order, then the rest
    order = jnp.concatenate([order, jnp.zeros((padded - n_rows,), order.dtype)])

    def batch(i, c):
      h, opt_state, total = c
      idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
      real = (i * batch_size + jnp.arange(batch_size)) < num_valid   # padding: other rows, weight 0
      f = jnp.where(real[:, None], features[idx], 0.0)
      loss, g = grad_fn(h, f, labels[idx], jnp.where(real, weights[idx], 0.0))
      updates, opt_state = tx.update(g, opt_state, h)
      return optax.apply_updates(h, updates), opt_state, total + loss

    h, opt_state, total = jax.lax.fori_loop(0, num_batches, batch, (h, opt_state, jnp.zeros((), jnp.float32)))
    return (h, opt_state), total / jnp.maximum(num_batches, 1).astype(jnp.float32)

  (head, _), losses = jax.lax.scan(epoch, (head, tx.init(head)), jnp.arange(epochs))
  return head, losses
