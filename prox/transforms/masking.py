"""Applying sparsity masks kept in an optimizer state: forward-pass weights, hard masks, masked updates.

The sparsity transforms of :mod:`prox.transforms` keep their masks in their optimizer state (a
``NamedTuple`` with a ``masks`` field: a pytree shaped like the parameters with boolean arrays at the
selected leaves and ``None`` elsewhere, and for decaying masks a scalar ``beta``). The user's loss stays
theirs: they call it on :func:`forward_params` of their dense parameters::

    loss = loss_fn(forward_params(params, opt_state), batch)

Only jax and the sibling ``filters`` file are imported, so these files can be copied into other optax code.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prox.transforms.filters import is_selected

PyTree = Any

__all__ = [
    "find_mask_states",
    "forward_params",
    "hard_masked_params",
    "is_mask_state",
    "masked_updates",
    "straight_through_scale",
]


@jax.custom_jvp
def straight_through_scale(w: jax.Array, scale: jax.Array) -> jax.Array:
  """Returns ``w * scale`` whose derivative w.r.t. ``w`` is the identity (straight-through estimator).

  Forward: ``y = w * s``. Backward: ``dL/dw = dL/dy`` (no factor ``s``), ``dL/ds = 0``: the dense
  weights receive the gradient of the masked weights unchanged (Bengio et al. 2013; used by SR-STE,
  Zhou et al. 2021, and MdGf, Bambhaniya et al. 2024). Defined with ``custom_jvp`` so that both
  forward- and reverse-mode differentiation work.
  """
  return w * scale.astype(w.dtype)


@straight_through_scale.defjvp
def _straight_through_scale_jvp(primals, tangents):
  w, scale = primals
  w_dot, _ = tangents
  return w * scale.astype(w.dtype), w_dot


def is_mask_state(node: Any) -> bool:
  """Whether ``node`` is a sparsity state: a ``NamedTuple`` with a ``masks`` field."""
  return isinstance(node, tuple) and "masks" in getattr(node, "_fields", ())


def find_mask_states(opt_state: Any) -> list[Any]:
  """All sparsity states inside ``opt_state`` (itself, or nested in chain / inject_hyperparams / ...)."""
  found = []
  for node in jax.tree.leaves(opt_state, is_leaf=is_mask_state):
    if is_mask_state(node):
      found.append(node)
      found.extend(find_mask_states([v for k, v in zip(node._fields, node) if k != "masks"]))
  return found


def _states(state: Any) -> list[Any]:
  states = find_mask_states(state)
  if not states:
    raise ValueError(f"no sparsity state (a NamedTuple with a 'masks' field) found in {type(state).__name__}")
  return states


def forward_params(params: PyTree, state: Any) -> PyTree:
  """The weights of the forward pass: ``w * (m + (1 - m) * beta)`` on masked leaves, others unchanged.

  ``state`` is a sparsity state or any optimizer state containing one (several are applied in turn).
  ``beta`` is the state's decay factor (``0`` for states without one, i.e. a hard mask ``w * m``). The
  derivative w.r.t. the dense ``params`` is straight-through (:func:`straight_through_scale`), so
  ``jax.grad(lambda p: loss(forward_params(p, state)))`` gives the dense gradient of MdGf / SR-STE
  (Bambhaniya et al. 2024).
  """
  for s in _states(state):
    beta = getattr(s, "beta", None)
    beta = jnp.zeros([], jnp.float32) if beta is None else beta

    def one(w, m, beta=beta):
      if not is_selected(m):
        return w
      return straight_through_scale(w, jnp.where(m, jnp.ones([], beta.dtype), beta))

    params = jax.tree.map(one, params, s.masks)
  return params


def hard_masked_params(params: PyTree, state: Any) -> PyTree:
  """Evaluation weights with hard masks (``beta = 0``): ``w * m`` on masked leaves, others unchanged."""
  for s in _states(state):
    params = jax.tree.map(lambda w, m: w * m.astype(w.dtype) if is_selected(m) else w, params, s.masks)
  return params


def masked_updates(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
  """Updates that leave ``optax.apply_updates(params, .)`` exactly ``m * (w + u)``.

  ``u' = u`` where ``m`` and ``u' = -w`` where not (so pruned weights become exactly 0 and stay 0).
  """

  def one(u, w, m):
    if not is_selected(m):
      return u
    return jnp.where(m, u, -w.astype(u.dtype))

  return jax.tree.map(one, updates, params, masks)
