"""Read AdaGrad's per-coordinate accumulator and step out of an optax state.

AdaGrad itself is ``optax.adagrad`` / ``optax.scale_by_rss`` (Duchi, Hazan, Singer 2011):

    a_k = a_{k-1} + g_k^2,   w_{k+1} = w_k - lr * g_k / sqrt(a_k + eps)   (0 where a_k = 0)

prox does not re-implement it; these helpers find the ``optax.ScaleByRssState`` inside any
composed optax state (``chain``, ``inject_hyperparams``, ``apply_if_finite``, ...) so that the
coordinate-wise batch-size test (``prox.optim.batch_tests``) can weight coordinates by
AdaGrad's per-coordinate step ``1 / sqrt(a_j + eps)``.

This file imports only jax and optax, so it can be copied into any optax code.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def adagrad_accumulator(opt_state: Any) -> Any:
  """Returns ``a_k``, the per-coordinate sum of squared gradients of the AdaGrad in ``opt_state``.

  Args:
    opt_state: an optax state that contains exactly one ``optax.ScaleByRssState`` (the state of
      ``optax.adagrad`` or ``optax.scale_by_rss``), at any depth.

  Returns:
    The pytree ``sum_of_squares`` (same structure as the parameters).

  Raises:
    ValueError: if ``opt_state`` holds no ``ScaleByRssState`` or more than one.
  """
  is_rss = lambda x: isinstance(x, optax.ScaleByRssState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_rss) if is_rss(x)]
  if len(found) != 1:
    raise ValueError(
        f"adagrad_accumulator: expected exactly one optax.ScaleByRssState in opt_state, found {len(found)}")
  return found[0].sum_of_squares


def adagrad_step_size(opt_state: Any, *, eps: float = 1e-7) -> Any:
  """AdaGrad's per-coordinate step ``s_j = 1 / sqrt(a_j + eps)`` (0 where ``a_j = 0``), as optax.

  This is exactly the factor ``optax.scale_by_rss(eps=eps)`` multiplies the gradient by (before
  the learning rate). Pass the state after the update to get the step AdaGrad just used.

  Args:
    opt_state: an optax state holding one ``optax.ScaleByRssState`` (see
      :func:`adagrad_accumulator`).
    eps: the ``eps`` the AdaGrad was built with (``optax.adagrad`` default ``1e-7``).

  Returns:
    A pytree like the parameters.
  """
  acc = adagrad_accumulator(opt_state)
  return jax.tree.map(lambda a: jnp.where(a > 0, jax.lax.rsqrt(a + eps), 0.0).astype(a.dtype), acc)
