"""Slow learner: scale the updates of one parameter group (e.g. a pretrained backbone).

    u_j <- scale * u_j   for the leaves j selected by the mask,   u_j unchanged otherwise

SLCA (Zhang et al. 2023, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on
a Pre-trained Model") trains the backbone with ``scale = 0.01`` times the head's learning rate;
``scale = 0`` freezes the group. This file imports only jax, numpy and optax.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Mask = Union[Any, Callable[[Any], Any]]


class ScaleGroupState(NamedTuple):
  """``scale_group`` keeps no state."""


def _check_scale(scale: Any, where: str) -> None:
  if isinstance(scale, jax.core.Tracer):
    return
  try:
    value = float(scale)
  except (TypeError, ValueError):
    raise TypeError(f"{where}: scale must be a number, got {scale!r}") from None
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"{where}: scale must be finite and >= 0, got {scale!r}")


def _is_python_zero(scale: Any) -> bool:
  return isinstance(scale, (int, float, np.number)) and not isinstance(scale, bool) and scale == 0


def _resolve(mask: Mask, tree: Any) -> Any:
  return mask(tree) if callable(mask) else mask


def scale_group(scale: float | jax.Array, mask: Mask) -> optax.GradientTransformation:
  """Multiplies the updates of the leaves selected by ``mask`` by ``scale``; stateless.

  ``u_j <- scale * u_j`` if ``mask_j`` else ``u_j``. With ``scale == 0`` the selected updates are
  exactly zero (even if they were ``inf`` or ``nan``). Slow learner of SLCA (Zhang et al. 2023).

  Args:
    scale: factor ``>= 0`` for the selected group (SLCA: 0.01; 0 freezes). May be injected with
      ``optax.inject_hyperparams`` (then pass ``static_args=("mask",)`` if ``mask`` is callable).
    mask: a pytree of Python bools with the structure of the updates (or a prefix of it), or a
      function ``updates -> mask``, as for ``optax.masked``.

  Returns:
    An ``optax.GradientTransformation``; updates keep their dtype.
  """
  _check_scale(scale, "scale_group")

  def scale_leaf(u):
    if _is_python_zero(scale):
      return jnp.zeros_like(u)
    s = jnp.asarray(scale)
    return jnp.where(s == 0, jnp.zeros_like(u), u * s).astype(u.dtype)

  def init_fn(params):
    del params
    return ScaleGroupState()

  def update_fn(updates, state, params=None):
    del params
    selected = _resolve(mask, updates)
    updates = jax.tree.map(
        lambda sel, sub: jax.tree.map(scale_leaf, sub) if sel else sub,
        selected, updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def slow_learner(
    inner: optax.GradientTransformation,
    scale: float | jax.Array,
    mask: Mask,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` and multiplies the updates of the ``mask`` group by ``scale`` (SLCA: 0.01).

  ``u = inner(g)``; ``u_j <- scale * u_j`` for masked leaves (Zhang et al. 2023). For an adaptive
  ``inner`` (Adam) this equals giving the group the learning rate ``scale * lr``.

  With a Python ``scale == 0`` (frozen group) the inner optimizer only sees the other leaves
  (``optax.masked``), so the frozen group costs no optimizer state, and its updates are exactly
  zero. A ``jax.Array`` scale (e.g. injected) always takes the general path, so that the state
  structure does not depend on its value.

  Args:
    inner: the optimizer of all parameters.
    scale: ``>= 0``, the factor for the selected group.
    mask: pytree of bools (or a prefix of it) or a function ``params -> mask``; ``True`` marks the
      slow group.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  _check_scale(scale, "slow_learner")
  if _is_python_zero(scale):
    if callable(mask):
      trainable = lambda tree: jax.tree.map(lambda m: not m, mask(tree))
    else:
      trainable = jax.tree.map(lambda m: not m, mask)
    return optax.chain(optax.masked(inner, trainable), scale_group(0.0, mask))
  return optax.chain(inner, scale_group(scale, mask))
