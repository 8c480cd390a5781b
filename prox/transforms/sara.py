"""SaRA: fine-tune only the small-magnitude weights of a pretrained model, with progressive re-selection.

Hu et al. 2024, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
Adaptation": weights with ``|w| < threshold`` are (nearly) ineffective in a pretrained model, so only they
are trained; at ``progressive_iter`` the trainable set is re-selected on the current values and the
optimizer state is reset; an optional nuclear-norm penalty keeps the sparse update low-rank.

Only jax/optax and the sibling filters file are imported.
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from prox.transforms import filters as filters_lib

PyTree = Any

__all__ = ["SaRAState", "nuclear_norm_subgradient", "sara"]


class SaRAState(NamedTuple):
  """State of :func:`sara`.

  Attributes:
    count: int32, number of updates so far.
    trainable: like the parameters: bool, ``True`` where the weight is trained (``|w| < threshold`` at the
      last selection), at the selected leaves; ``None`` elsewhere.
    delta: the accumulated (masked) updates since the last selection at the selected leaves when the
      nuclear-norm penalty is on, else ``None`` everywhere.
    inner_state: the state of the wrapped transform.
  """
  count: jax.Array
  trainable: PyTree
  delta: PyTree
  inner_state: optax.OptState


def nuclear_norm_subgradient(x: jax.Array) -> jax.Array:
  """A subgradient of ``||X||_*``: ``U diag(1[s_i > tol]) V^T`` (0 at ``X = 0``), X viewed as ``[-1, last]``.

  ``tol = max(rows, cols) * eps * s_max`` (the rank tolerance of ``numpy.linalg.matrix_rank``).
  """
  shape = x.shape
  x2 = x.reshape(-1, shape[-1]).astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(x2, full_matrices=False)
  tol = max(x2.shape) * jnp.finfo(jnp.float32).eps * jnp.max(s, initial=0.0)
  keep = (s > tol).astype(jnp.float32)
  return ((u * keep) @ vt).reshape(shape).astype(x.dtype)


def sara(
    inner: optax.GradientTransformation,
    *,
    threshold: float = 2e-3,
    progressive_iter: int | None = 2500,
    rank_lambda: Any = 0.0,
    filter: filters_lib.FilterLike = None,
) -> optax.GradientTransformationExtraArgs:
  """SaRA (Hu et al. 2024) around ``inner``: train only the weights with ``|w| < threshold``.

  On the selected leaves (``filter``, default every leaf with ``ndim >= 2``), with ``T`` the trainable
  mask and ``D`` the accumulated update since the last selection:

      g' = T * (g + rank_lambda * d||D||_* / dD),   u = T * inner(g'),   D <- D + u

  At step ``progressive_iter`` (before that step's update) ``T`` is re-selected on the current values,
  the inner state is reset to ``inner.init(params)`` and ``D`` to 0. Leaves not selected by ``filter``
  pass through to ``inner`` unchanged (freeze them with ``optax.partition`` / ``optax.set_to_zero`` if
  wanted). The nuclear norm applies to ``D`` viewed as a matrix ``[-1, last dim]``; the SaRA paper's
  reference code uses ``rank_lambda = 5e-4`` (off by default: it costs one SVD per selected leaf per step).
  """
  where = "sara"
  if not isinstance(threshold, numbers.Real) or not threshold > 0:
    raise ValueError(f"{where}: threshold must be > 0, got {threshold!r}")
  if progressive_iter is not None and (not isinstance(progressive_iter, numbers.Integral) or progressive_iter < 1):
    raise ValueError(f"{where}: progressive_iter must be a positive int or None, got {progressive_iter!r}")
  if isinstance(rank_lambda, numbers.Real) and rank_lambda < 0:
    raise ValueError(f"{where}: rank_lambda must be >= 0, got {rank_lambda!r}")
  use_rank = not (isinstance(rank_lambda, numbers.Real) and rank_lambda == 0)
  f = filters_lib.as_filter(filter)
  inner = optax.with_extra_args_support(inner)

  def select(params: PyTree) -> PyTree:
    return filters_lib.map_selected(lambda p, w: jnp.abs(w) < threshold, params, f)

  def zero_delta(params: PyTree) -> PyTree:
    if not use_rank:
      return jax.tree.map(lambda w: None, params)
    return filters_lib.map_selected(lambda p, w: jnp.zeros(w.shape, w.dtype), params, f)

  def init_fn(params: PyTree) -> SaRAState:
    return SaRAState(jnp.zeros([], jnp.int32), select(params), zero_delta(params), inner.init(params))

  def update_fn(updates: PyTree, state: SaRAState, params: PyTree | None = None,
                **extra_args: Any) -> tuple[PyTree, SaRAState]:
    if params is None:
      raise ValueError(f"{where}: update needs params (call tx.update(grads, state, params))")
    trainable, delta, inner_state = state.trainable, state.delta, state.inner_state
    if progressive_iter is not None:
      trainable, delta, inner_state = lax.cond(
          state.count == progressive_iter,
          lambda: (select(params), zero_delta(params), inner.init(params)),
          lambda: (trainable, delta, inner_state))

    def grad_one(g, t, d):
      if not filters_lib.is_selected(t):
        return g
      if use_rank and filters_lib.is_selected(d):
        g = g + (rank_lambda * nuclear_norm_subgradient(d)).astype(g.dtype)
      return jnp.where(t, g, jnp.zeros_like(g))

    grads = jax.tree.map(grad_one, updates, trainable, delta)
    new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
    new_updates = jax.tree.map(
        lambda u, t: jnp.where(t, u, jnp.zeros_like(u)) if filters_lib.is_selected(t) else u, new_updates, trainable)
    if use_rank:
      delta = jax.tree.map(lambda d, u: d + u.astype(d.dtype) if filters_lib.is_selected(d) else d, delta,
                           new_updates, is_leaf=lambda x: x is None)
    return new_updates, SaRAState(optax.safe_increment(state.count), trainable, delta, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
