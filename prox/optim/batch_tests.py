r"""Adaptive batch-size tests of AdAdaGrad (Lau, Liu, Kolar 2024), as pure functions.

Each test returns the batch size ``b'`` it asks for (a float scalar; the controller in
``prox.optim.batch_size`` rounds, caps and never decreases it). Notation: ``G_i`` per-sample
gradients (``i = 1..b``), ``gbar`` their mean, ``S = ||gbar||^2``, ``Var_i`` the unbiased
(``b - 1``) sample variance over the batch, ``j`` the coordinates of all leaves together.

* norm test:              ``b' = sum_j Var_i(G_ij) / (eta^2 S)``
* inner-product test:     ``b' = Var_i(<G_i, gbar>) / (theta^2 S^2)``
* orthogonality test:     ``b' = sum_j Var_i(G_i - <G_i, gbar> gbar / S)_j / (nu^2 S)``
* augmented inner-product test: ``max(inner-product, orthogonality)``
* coordinate-wise test (AdaGrad): ``b' = sum_j s_j Var_i(G_ij) / (eta^2 sum_j s_j gbar_j^2)``
  with ``s_j`` AdaGrad's per-coordinate step ``1 / sqrt(a_j + eps)``
  (``prox.optim.adagrad_step_size``). This is the norm test in the geometry AdaGrad descends in
  (its descent lemma pairs the gradient with ``diag(s)``): coordinates with small accumulated
  gradients take large steps and weigh more, so their noise asks for larger batches. With
  uniform ``s`` it is the norm test. The reference code has no coordinate-wise test; this is
  prox's reading of AdAdaGrad's "norm test per coordinate, weighted by AdaGrad's step".

The inner-product and orthogonality tests use the whole parameter vector by default.
``per_tensor=True`` gives the reference code's variant, which sums ``Var_i(<G_i^l, gbar^l>)`` and
the per-tensor orthogonal variances over tensors ``l`` (it drops the cross-tensor covariances;
the denominators keep the whole ``S``).

Two estimators of each test:

* exact: from per-sample gradients, a pytree whose leaves carry a leading sample axis ``[b, ...]``
  (as ``jax.vmap(jax.grad(loss), in_dims=(None, 0))`` returns), as the reference code does;
* cheap (``*_from_stats``): from the step's gradient statistics over ``G`` groups (micro-batches x
  devices) of ``n = group_size`` examples each, with group mean gradients ``g_k`` and
  ``m = mean_k g_k = gbar``. Since ``Var(g_k) = Var_i(G_i) / n``,

      Var_i(G_ij)          ~= n * G/(G-1) * (mean_k g_kj^2 - m_j^2)        (GradStats)
      Var_i(<G_i, m>)      ~= n * Var_k(<g_k, m>)                          (GroupInnerStats)
      sum_j Var_i(orth)_j  ~= n * (sum_j Var_k(g_kj) - Var_k(<g_k, m>) / S)

  The first needs only the first and second moments the step accumulates (``GradStats``:
  ``mean``, ``second_moment``, ``num_groups``, ``group_size``; any object with those attributes
  works). The inner-product and orthogonality tests also need per-group inner products with
  the final mean, which moments cannot give: :class:`GroupInnerStats` holds the three sums
  ``sum_k <g_k, m>``, ``sum_k <g_k, m>^2``, ``sum_k ||g_k||^2``, computed by
  :func:`group_inner_stats` from the ``[G, ...]``-stacked group gradients once ``m`` is known.
  They are sums over groups, so per-device partial statistics add up with ``psum``.

  With fewer than 2 groups the cheap estimators return ``nan`` (no estimate; the controller
  keeps its batch size). With ``group_size = 1`` they equal the exact estimators.

If ``S = 0`` a test returns ``inf`` (or ``nan`` when the variance is 0 too). All functions jit
and take the constants ``eta``/``theta``/``nu`` as floats or traced scalars; a concrete constant
``<= 0`` raises ``ValueError``. Computation is in float32 (float64 for float64 inputs).

This file imports only jax and numpy.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class GradStatsLike(Protocol):
  """What the cheap estimators read from the step's ``GradStats`` (see prox/step.py)."""
  mean: PyTree
  second_moment: PyTree
  num_groups: Any
  group_size: Any


class GroupInnerStats(NamedTuple):
  """Per-group inner-product sums the cheap inner-product / orthogonality tests need.

  With group mean gradients ``g_k`` (``k = 1..G``) and the step's mean gradient ``m``; each field
  is a scalar (whole-vector), or, from ``group_inner_stats(..., per_tensor=True)``, a pytree
  like the parameters with one scalar per leaf.

  Attributes:
    sum_inner: ``sum_k <g_k, m>``.
    sum_inner_sq: ``sum_k <g_k, m>^2``.
    sum_sq_norm: ``sum_k ||g_k||^2``.
  """
  sum_inner: PyTree
  sum_inner_sq: PyTree
  sum_sq_norm: PyTree


# ----------------------------------------------------------------------------------------------
# helpers


def _check_constant(name: str, value: Any) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number, got {value!r}") from None
  if not (np.isfinite(v) and v > 0):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _dtype(tree: PyTree) -> jnp.dtype:
  return jnp.result_type(jnp.float32, *[jnp.asarray(x).dtype for x in jax.tree.leaves(tree)])


def _total(values) -> jax.Array:
  values = list(values)
  return sum(values[1:], values[0])


def _sq_norm(tree: PyTree, dtype) -> jax.Array:
  return _total(jnp.sum(jnp.square(x.astype(dtype))) for x in jax.tree.leaves(tree))


def _check_leading_axis(tree: PyTree, what: str, minimum: int) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError(f"{what}: the pytree has no leaves")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for _, x in leaves}
  if len(sizes) != 1 or None in sizes:
    shapes = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}
    raise ValueError(f"{what} need one common leading axis on every leaf, got shapes {shapes}")
  size = sizes.pop()
  if size < minimum:
    raise ValueError(f"{what}: need a leading axis of at least {minimum}, got {size}")
  return size


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, 0 where ``den == 0`` (a tensor whose mean gradient is 0 has no direction)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def _per_leaf_inner(per_sample: PyTree, mean: PyTree) -> list[jax.Array]:
  """``<G_i^l, gbar^l>`` for each leaf ``l``: a list of ``[b]`` arrays."""
  return [jnp.sum(g * m[None], axis=tuple(range(1, g.ndim)))
          for g, m in zip(jax.tree.leaves(per_sample), jax.tree.leaves(mean))]


def _moments(per_sample_grads: PyTree):
  _check_leading_axis(per_sample_grads, "per-sample gradients [b, ...]", 2)
  dtype = _dtype(per_sample_grads)
  grads = jax.tree.map(lambda g: jnp.asarray(g).astype(dtype), per_sample_grads)
  mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
  return grads, mean, _sq_norm(mean, dtype)


def _var(x: jax.Array) -> jax.Array:
  return jnp.var(x, axis=0, ddof=1)


# ----------------------------------------------------------------------------------------------
# exact estimators, from per-sample gradients


def norm_test(per_sample_grads: PyTree, eta: float = 0.1) -> jax.Array:
  """Norm test from per-sample gradients: ``b' = sum_j Var_i(G_ij) / (eta^2 ||gbar||^2)``.

  Byrd et al. 2012; AdAdaGrad (Lau, Liu, Kolar 2024) eq. of the norm test, reference
  ``tests.norm_test``.

  Args:
    per_sample_grads: pytree of ``[b, ...]`` leaves, ``b >= 2``.
    eta: ``> 0`` (default 0.1).
  """
  _check_constant("eta", eta)
  grads, _, s = _moments(per_sample_grads)
  var_l1 = _total(jnp.sum(_var(g)) for g in jax.tree.leaves(grads))
  return var_l1 / (jnp.square(eta) * s)


def inner_product_test(per_sample_grads: PyTree, theta: float = 0.1, *, per_tensor: bool = False) -> jax.Array:
  """Inner-product test: ``b' = Var_i(<G_i, gbar>) / (theta^2 ||gbar||^4)`` (Bollapragada et al. 2018).

  Args:
    per_sample_grads: pytree of ``[b, ...]`` leaves.
    theta: ``> 0`` (default 0.1).
    per_tensor: sum ``Var_i(<G_i^l, gbar^l>)`` over tensors ``l`` (the reference code's variant).
  """
  _check_constant("theta", theta)
  grads, mean, s = _moments(per_sample_grads)
  inner = _per_leaf_inner(grads, mean)
  var_ip = _total(_var(x) for x in inner) if per_tensor else _var(_total(inner))
  return var_ip / (jnp.square(theta) * jnp.square(s))


def _orth_variance(grads: PyTree, mean: PyTree, s: jax.Array, per_tensor: bool) -> jax.Array:
  inner = _per_leaf_inner(grads, mean)
  g_leaves, m_leaves = jax.tree.leaves(grads), jax.tree.leaves(mean)
  if per_tensor:
    coefs = [_safe_div(ip, jnp.sum(jnp.square(m))) for ip, m in zip(inner, m_leaves)]
  else:
    coefs = [_safe_div(_total(inner), s)] * len(g_leaves)
  return _total(
      jnp.sum(_var(g - c.reshape((-1,) + (1,) * m.ndim) * m[None]))
      for g, m, c in zip(g_leaves, m_leaves, coefs))


def orthogonality_test(per_sample_grads: PyTree, nu: float = 0.1, *, per_tensor: bool = False) -> jax.Array:
  """Orthogonality test: ``b' = sum_j Var_i(G_i - <G_i,gbar> gbar / S)_j / (nu^2 S)``.

  Bollapragada et al. 2018; AdAdaGrad (Lau, Liu, Kolar 2024).

  Args:
    per_sample_grads: pytree of ``[b, ...]`` leaves.
    nu: ``> 0`` (default 0.1).
    per_tensor: project each tensor on its own mean gradient (the reference code's variant).
  """
  _check_constant("nu", nu)
  grads, mean, s = _moments(per_sample_grads)
  return _orth_variance(grads, mean, s, per_tensor) / (jnp.square(nu) * s)


def augmented_inner_product_test(
    per_sample_grads: PyTree, theta: float = 0.1, nu: float = 0.1, *, per_tensor: bool = False,
) -> jax.Array:
  """Augmented inner-product test: ``max(inner-product test, orthogonality test)``."""
  return jnp.maximum(inner_product_test(per_sample_grads, theta, per_tensor=per_tensor),
                     orthogonality_test(per_sample_grads, nu, per_tensor=per_tensor))


def coordinate_wise_test(per_sample_grads: PyTree, step_size: PyTree, eta: float = 0.1) -> jax.Array:
  """Coordinate-wise test for AdaGrad: ``b' = sum_j s_j Var_i(G_ij) / (eta^2 sum_j s_j gbar_j^2)``.

  ``s_j`` is AdaGrad's per-coordinate step (``prox.optim.adagrad_step_size(opt_state)``); see the
  module docstring for why this weighting. Uniform ``s`` gives the norm test.

  Args:
    per_sample_grads: pytree of ``[b, ...]`` leaves.
    step_size: pytree like one gradient (``s_j >= 0``).
    eta: ``> 0`` (default 0.1).
  """
  _check_constant("eta", eta)
  grads, mean, _ = _moments(per_sample_grads)
  dtype = _dtype(grads)
  steps = [jnp.asarray(w).astype(dtype) for w in jax.tree.leaves(step_size)]
  num = _total(jnp.sum(w * _var(g)) for w, g in zip(steps, jax.tree.leaves(grads)))
  den = _total(jnp.sum(w * jnp.square(m)) for w, m in zip(steps, jax.tree.leaves(mean)))
  return num / (jnp.square(eta) * den)


# ----------------------------------------------------------------------------------------------
# cheap estimators, from group (micro-batch x device) statistics


def group_inner_stats(
    group_grads: PyTree, mean: PyTree, *, valid: jax.Array | None = None, per_tensor: bool = False,
) -> GroupInnerStats:
  """Sums over groups of ``<g_k, m>``, ``<g_k, m>^2`` and ``||g_k||^2`` (see :class:`GroupInnerStats`).

  Fits the step's ``group_stats_fn(group_grads, valid, mean)`` hook as
  ``lambda g, v, m: group_inner_stats(g, m, valid=v)``; the sums add up across devices.

  Args:
    group_grads: pytree of ``[G, ...]`` leaves, the mean gradient of each group.
    mean: the step's mean gradient ``m`` (a pytree like one gradient).
    valid: optional bool ``[G]``; groups marked ``False`` (padding) are left out of the sums.
    per_tensor: one scalar per leaf instead of whole-vector scalars (for ``per_tensor`` tests).
  """
  num = _check_leading_axis(group_grads, "group gradients [G, ...]", 1)
  dtype = _dtype(group_grads)
  keep = jnp.ones([num], bool) if valid is None else jnp.asarray(valid).astype(bool).reshape(num)
  grads = [jnp.asarray(g).astype(dtype) for g in jax.tree.leaves(group_grads)]
  means = [jnp.asarray(m).astype(dtype) for m in jax.tree.leaves(mean)]
  inner = [jnp.sum(g * m[None], axis=tuple(range(1, g.ndim))) for g, m in zip(grads, means)]
  sq = [jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in grads]
  wsum = lambda x: jnp.sum(jnp.where(keep, x, 0))
  if per_tensor:
    treedef = jax.tree.structure(mean)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)
    return GroupInnerStats(sum_inner=unflat([wsum(x) for x in inner]),
                           sum_inner_sq=unflat([wsum(jnp.square(x)) for x in inner]),
                           sum_sq_norm=unflat([wsum(x) for x in sq]))
  total_inner = _total(inner)
  return GroupInnerStats(sum_inner=wsum(total_inner), sum_inner_sq=wsum(jnp.square(total_inner)),
                         sum_sq_norm=wsum(_total(sq)))


def _group_factor(stats: GradStatsLike, dtype) -> tuple[jax.Array, jax.Array]:
  """Returns ``(G, n / (G - 1))`` with ``nan`` for ``G < 2``."""
  g = jnp.asarray(stats.num_groups).astype(dtype)
  n = jnp.asarray(stats.group_size).astype(dtype)
  return g, jnp.where(g > 1, n / jnp.maximum(g - 1, 1), jnp.nan)


def per_sample_variance(stats: GradStatsLike) -> PyTree:
  """``Var_i(G_ij) ~= n * G/(G-1) * (second_moment_j - mean_j^2)`` per coordinate (clipped at 0).

  Var of a mean of ``n`` i.i.d. samples is ``Var_i / n``, estimated without bias from the ``G``
  group means. ``nan`` for ``G < 2``.
  """
  dtype = _dtype((stats.mean, stats.second_moment))
  g, factor = _group_factor(stats, dtype)
  return jax.tree.map(
      lambda m, q: factor * g * jnp.maximum(q.astype(dtype) - jnp.square(m.astype(dtype)), 0),
      stats.mean, stats.second_moment)


def norm_test_from_stats(stats: GradStatsLike, eta: float = 0.1) -> jax.Array:
  """Cheap norm test: ``b' = sum_j n G/(G-1) (q_j - m_j^2) / (eta^2 ||m||^2)`` from ``GradStats``."""
  _check_constant("eta", eta)
  dtype = _dtype((stats.mean, stats.second_moment))
  var_l1 = _total(jnp.sum(v) for v in jax.tree.leaves(per_sample_variance(stats)))
  return var_l1 / (jnp.square(eta) * _sq_norm(stats.mean, dtype))


def _inner_and_trace(stats: GradStatsLike, inner: GroupInnerStats, per_tensor: bool, dtype):
  """Per-sample ``Var_i(<G_i, m>)`` and ``sum_j Var_i(G_ij)`` estimates, as lists (one per tensor)."""
  g, factor = _group_factor(stats, dtype)
  fields = [jax.tree.leaves(x) for x in inner]
  mean_leaves = jax.tree.leaves(stats.mean)
  if per_tensor:
    if not all(len(f) == len(mean_leaves) for f in fields):
      raise ValueError("per_tensor=True needs GroupInnerStats from group_inner_stats(..., per_tensor=True) "
                       f"(one scalar per leaf: {len(mean_leaves)} leaves, got {[len(f) for f in fields]})")
    s_list = [jnp.sum(jnp.square(m.astype(dtype))) for m in mean_leaves]
  else:
    if not all(len(f) == 1 and np.ndim(f[0]) == 0 for f in fields):
      raise ValueError("per_tensor=False needs whole-vector GroupInnerStats (scalar fields) from "
                       "group_inner_stats(..., per_tensor=False)")
    s_list = [_sq_norm(stats.mean, dtype)]
  var_ip, trace = [], []
  for a, a2, q, s in zip(*fields, s_list):
    a, a2, q = (jnp.asarray(x).astype(dtype) for x in (a, a2, q))
    var_ip.append(factor * jnp.maximum(a2 - jnp.square(a) / g, 0))
    trace.append(factor * jnp.maximum(q - 2 * a + g * s, 0))
  return var_ip, trace, s_list


def inner_product_test_from_stats(
    stats: GradStatsLike, inner: GroupInnerStats, theta: float = 0.1, *, per_tensor: bool = False,
) -> jax.Array:
  """Cheap inner-product test: ``b' = n Var_k(<g_k, m>) / (theta^2 ||m||^4)``.

  Args:
    stats: the step's ``GradStats`` (``mean``, ``num_groups``, ``group_size`` are used).
    inner: ``group_inner_stats(group_grads, stats.mean, per_tensor=per_tensor)``.
    theta: ``> 0``.
    per_tensor: the reference code's per-tensor variant.
  """
  _check_constant("theta", theta)
  dtype = _dtype(stats.mean)
  var_ip, _, _ = _inner_and_trace(stats, inner, per_tensor, dtype)
  return _total(var_ip) / (jnp.square(theta) * jnp.square(_sq_norm(stats.mean, dtype)))


def orthogonality_test_from_stats(
    stats: GradStatsLike, inner: GroupInnerStats, nu: float = 0.1, *, per_tensor: bool = False,
) -> jax.Array:
  """Cheap orthogonality test: ``b' = n (sum_j Var_k(g_kj) - Var_k(<g_k, m>) / S) / (nu^2 S)``.

  Uses ``tr(P Sigma P) = tr(Sigma) - m^T Sigma m / S`` for the projection ``P`` orthogonal to
  ``m`` (per tensor with ``per_tensor=True``); ``sum_j Var_k(g_kj)`` comes from
  ``GroupInnerStats.sum_sq_norm``.
  """
  _check_constant("nu", nu)
  dtype = _dtype(stats.mean)
  var_ip, trace, s_list = _inner_and_trace(stats, inner, per_tensor, dtype)
  orth = _total(jnp.maximum(t - _safe_div(v, s), 0) for v, t, s in zip(var_ip, trace, s_list))
  return orth / (jnp.square(nu) * _sq_norm(stats.mean, dtype))


def augmented_inner_product_test_from_stats(
    stats: GradStatsLike, inner: GroupInnerStats, theta: float = 0.1, nu: float = 0.1, *,
    per_tensor: bool = False,
) -> jax.Array:
  """Cheap augmented inner-product test: the max of the two cheap tests."""
  return jnp.maximum(inner_product_test_from_stats(stats, inner, theta, per_tensor=per_tensor),
                     orthogonality_test_from_stats(stats, inner, nu, per_tensor=per_tensor))


def coordinate_wise_test_from_stats(stats: GradStatsLike, step_size: PyTree, eta: float = 0.1) -> jax.Array:
  """Cheap coordinate-wise test: :func:`coordinate_wise_test` with ``Var_i`` from ``GradStats``."""
  _check_constant("eta", eta)
  dtype = _dtype((stats.mean, stats.second_moment))
  steps = [jnp.asarray(w).astype(dtype) for w in jax.tree.leaves(step_size)]
  var = jax.tree.leaves(per_sample_variance(stats))
  num = _total(jnp.sum(w * v) for w, v in zip(steps, var))
  den = _total(jnp.sum(w * jnp.square(m.astype(dtype))) for w, m in zip(steps, jax.tree.leaves(stats.mean)))
  return num / (jnp.square(eta) * den)


# ----------------------------------------------------------------------------------------------
# exact estimators from per-example moments (prox.taps.ExampleStats: the step's ``example_stats``)


class ExampleStatsLike(Protocol):
  count: Any
  sq_norm_sum: Any
  inner_sum: Any
  inner_sq_sum: Any
  diag_sum: Any


def _example_parts(ex: ExampleStatsLike, mean: PyTree, need: str):
  value = getattr(ex, need)
  if value is None:
    raise ValueError(f"these statistics have no {need}: ask the step for the right example_stats "
                     f"('norm' -> sq_norm_sum, 'inner' -> inner_sum/inner_sq_sum, 'diag' -> diag_sum)")
  dtype = _dtype(mean)
  n = jnp.asarray(ex.count).astype(dtype)
  return dtype, n, _sq_norm(mean, dtype)


def gradient_variance_from_examples(ex: ExampleStatsLike, mean: PyTree) -> jax.Array:
  """``sum_j Var_i(G_ij) = (sum_i ||G_i||^2 - N ||gbar||^2) / (N - 1)``, exactly (``nan`` for N < 2)."""
  dtype, n, s = _example_parts(ex, mean, "sq_norm_sum")
  var = (jnp.asarray(ex.sq_norm_sum).astype(dtype) - n * s) / (n - 1)
  return jnp.where(n > 1, jnp.maximum(var, 0), jnp.nan)


def norm_test_from_examples(ex: ExampleStatsLike, mean: PyTree, eta: float = 0.1) -> jax.Array:
  """The norm test from per-example moments (equal to :func:`norm_test` on the same batch)."""
  _check_constant("eta", eta)
  _, _, s = _example_parts(ex, mean, "sq_norm_sum")
  return gradient_variance_from_examples(ex, mean) / (jnp.square(eta) * s)


def _inner_variance(ex: ExampleStatsLike, mean: PyTree):
  dtype, n, s = _example_parts(ex, mean, "inner_sum")
  a = jnp.asarray(ex.inner_sum).astype(dtype)
  a2 = jnp.asarray(ex.inner_sq_sum).astype(dtype)
  return dtype, n, s, a, jnp.where(n > 1, jnp.maximum((a2 - a * a / n) / (n - 1), 0), jnp.nan)


def inner_product_test_from_examples(ex: ExampleStatsLike, mean: PyTree, theta: float = 0.1) -> jax.Array:
  """The inner-product test from per-example moments: ``Var_i(<G_i, gbar>) / (theta^2 S^2)``."""
  _check_constant("theta", theta)
  _, _, s, _, var = _inner_variance(ex, mean)
  return var / (jnp.square(theta) * jnp.square(s))


def orthogonality_test_from_examples(ex: ExampleStatsLike, mean: PyTree, nu: float = 0.1) -> jax.Array:
  """The orthogonality test from per-example moments.

  With ``h_i = G_i - c_i gbar``, ``c_i = <G_i, gbar> / S``: ``||h_i||^2 = ||G_i||^2 - <G_i, gbar>^2 / S``
  and ``mean_i h_i = (1 - cbar) gbar``, so ``sum_j Var_i(h_ij) = (sum_i ||G_i||^2 - sum_i <G_i, gbar>^2 / S
  - N S (1 - cbar)^2) / (N - 1)``.
  """
  _check_constant("nu", nu)
  dtype, n, s, a, _ = _inner_variance(ex, mean)
  _example_parts(ex, mean, "sq_norm_sum")
  a2 = jnp.asarray(ex.inner_sq_sum).astype(dtype)
  q = jnp.asarray(ex.sq_norm_sum).astype(dtype)
  cbar = _safe_div(a, n * s)
  var = (q - _safe_div(a2, s) - n * s * jnp.square(1 - cbar)) / (n - 1)
  return jnp.where(n > 1, jnp.maximum(var, 0), jnp.nan) / (jnp.square(nu) * s)


def augmented_inner_product_test_from_examples(ex: ExampleStatsLike, mean: PyTree, theta: float = 0.1,
                                               nu: float = 0.1) -> jax.Array:
  """The max of the inner-product and orthogonality tests from per-example moments."""
  return jnp.maximum(inner_product_test_from_examples(ex, mean, theta),
                     orthogonality_test_from_examples(ex, mean, nu))


def coordinate_wise_test_from_examples(ex: ExampleStatsLike, mean: PyTree, step_size: PyTree,
                                       eta: float = 0.1) -> jax.Array:
  """The coordinate-wise test from per-example moments: ``Var_i(G_ij) = (sum_i G_ij^2 - N gbar_j^2)/(N-1)``."""
  _check_constant("eta", eta)
  dtype, n, _ = _example_parts(ex, mean, "diag_sum")
  steps = [jnp.asarray(w).astype(dtype) for w in jax.tree.leaves(step_size)]
  means = [jnp.asarray(m).astype(dtype) for m in jax.tree.leaves(mean)]
  diag = [jnp.asarray(d).astype(dtype) for d in jax.tree.leaves(ex.diag_sum)]
  num = _total(jnp.sum(w * jnp.maximum(d - n * m * m, 0)) for w, d, m in zip(steps, diag, means)) / (n - 1)
  den = _total(jnp.sum(w * jnp.square(m)) for w, m in zip(steps, means))
  return jnp.where(n > 1, num, jnp.nan) / (jnp.square(eta) * den)


def gradient_noise_scale(ex: ExampleStatsLike, mean: PyTree) -> jax.Array:
  """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish, Kaplan, Amodei et al.
  2018, "An Empirical Model of Large-Batch Training"), with ``tr(Sigma) = sum_j Var_i(G_ij)`` the
  per-example gradient variance and ``G`` estimated by the batch mean ``gbar``: the batch size around
  which doubling it stops halving the steps. Noisy from one batch: smooth it (``noise_scale_ema``).

  ``|gbar|^2`` overestimates ``|G|^2`` by ``tr(Sigma) / N``; this uses the unbiased
  ``|G|^2 ~= |gbar|^2 - tr(Sigma) / N`` (clipped at a tiny positive value).
  """
  dtype, n, s = _example_parts(ex, mean, "sq_norm_sum")
  trace = gradient_variance_from_examples(ex, mean)
  g2 = jnp.maximum(s - trace / n, jnp.finfo(dtype).tiny)
  return trace / g2


class NoiseScaleState(NamedTuple):
  """Exponential moving averages of ``tr(Sigma)`` and ``|G|^2`` (bias-corrected by ``weight``)."""
  trace: jax.Array
  sq_norm: jax.Array
  weight: jax.Array


class NoiseScaleEMA(NamedTuple):
  """A state machine: ``init() -> state``, ``update(state, ex, mean) -> state``, ``value(state)``."""
  init: Any
  update: Any
  value: Any


def noise_scale_ema(decay: float = 0.95) -> NoiseScaleEMA:
  """``B_simple`` as the ratio of exponential moving averages of ``tr(Sigma)`` and ``|G|^2``.

  McCandlish et al. 2018 average numerator and denominator separately (the ratio of averages is far less
  noisy than the average of ratios). ``value(state)`` is ``EMA(tr Sigma) / EMA(|G|^2)``.
  """
  if not 0 <= decay < 1:
    raise ValueError(f"decay must be in [0, 1), got {decay!r}")

  def init() -> NoiseScaleState:
    zero = jnp.zeros((), jnp.float32)
    return NoiseScaleState(zero, zero, zero)

  def update(state: NoiseScaleState, ex: ExampleStatsLike, mean: PyTree) -> NoiseScaleState:
    _, n, s = _example_parts(ex, mean, "sq_norm_sum")
    trace = gradient_variance_from_examples(ex, mean).astype(jnp.float32)
    g2 = (s - trace / n).astype(jnp.float32)
    return NoiseScaleState(decay * state.trace + (1 - decay) * trace,
                           decay * state.sq_norm + (1 - decay) * g2,
                           decay * state.weight + (1 - decay))

  def value(state: NoiseScaleState) -> jax.Array:
    return state.trace / jnp.maximum(state.sq_norm, jnp.finfo(jnp.float32).tiny)

  return NoiseScaleEMA(init, update, value)

