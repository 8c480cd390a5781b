"""AdaGradNorm: AdaGrad with one scalar accumulator (Ward, Wu, Bottou 2019).

    b_k^2 = b_{k-1}^2 + ||g_k||^2          (global l2 norm over all leaves)
    w_{k+1} = w_k - lr * g_k / (b_k + eps)

``b_0 = 0.1`` (so ``b_0^2 = 1e-2``) as in the AdAdaGrad reference code (Lau, Liu, Kolar 2024,
timlautk/AdAdaGrad). The accumulator is one scalar in ``float32`` (``float64`` when the gradients
are ``float64``), whatever the dtype of the gradients; the updates keep the dtype of the gradients.

Departure from the reference code: its ``Adagradnorm`` class keeps one accumulator per output row
of each 2-D / 4-D tensor (a row-wise AdaGrad). prox follows METHODS.md section 1 and Ward et al.:
one scalar for the whole parameter vector. Row-wise variants can be built from
``optax.scale_by_rss`` on reshaped leaves if needed.

This file imports only jax, numpy and optax, so it can be copied into any optax code.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ScaleByAdaGradNormState(NamedTuple):
  """State of :func:`scale_by_adagrad_norm`.

  Attributes:
    sum_of_squares: the scalar accumulator ``b_k^2`` (``b_0^2`` after ``init``).
  """
  sum_of_squares: jax.Array


def _concrete_float(value: Any) -> float | None:
  """``float(value)`` for Python / numpy / concrete jax scalars; ``None`` for tracers."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _accumulator_dtype(tree: Any) -> jnp.dtype:
  dtypes = [jnp.asarray(x).dtype for x in jax.tree.leaves(tree)]
  return jnp.result_type(jnp.float32, *dtypes) if dtypes else jnp.dtype(jnp.float32)


def scale_by_adagrad_norm(b0: float = 0.1, eps: float = 1e-10) -> optax.GradientTransformation:
  """Divides the updates by the root of the running sum of squared global gradient norms.

  ``b_k^2 = b_{k-1}^2 + ||g_k||^2``, ``u_k = g_k / (b_k + eps)`` (Ward, Wu, Bottou 2019,
  "AdaGrad stepsizes: sharp convergence over nonconvex landscapes"; AdaGradNorm in Lau, Liu,
  Kolar 2024). The current gradient enters the accumulator before it is used, as in AdaGrad.

  Args:
    b0: initial value ``b_0 >= 0`` of the accumulator's root (``b_0^2`` is stored).
    eps: ``>= 0``, added to ``b_k`` in the denominator; ``b0`` and ``eps`` may not both be 0.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdaGradNormState`.
  """
  b0_value, eps_value = _concrete_float(b0), _concrete_float(eps)
  if b0_value is not None and not b0_value >= 0:
    raise ValueError(f"scale_by_adagrad_norm: b0 must be >= 0, got {b0!r}")
  if eps_value is not None and not eps_value >= 0:
    raise ValueError(f"scale_by_adagrad_norm: eps must be >= 0, got {eps!r}")
  if b0_value == 0 and eps_value == 0:
    raise ValueError("scale_by_adagrad_norm: b0 and eps are both 0, the first step would divide by 0")

  def init_fn(params):
    dtype = _accumulator_dtype(params)
    return ScaleByAdaGradNormState(sum_of_squares=jnp.square(jnp.asarray(b0, dtype)))

  def update_fn(updates, state, params=None):
    del params
    dtype = state.sum_of_squares.dtype
    sq_norm = sum(
        (jnp.sum(jnp.square(jnp.asarray(g, dtype))) for g in jax.tree.leaves(updates)),
        jnp.zeros([], dtype),
    )
    sum_of_squares = state.sum_of_squares + sq_norm
    inv = 1.0 / (jnp.sqrt(sum_of_squares) + jnp.asarray(eps, dtype))
    updates = jax.tree.map(lambda g: (g * inv).astype(jnp.asarray(g).dtype), updates)
    return updates, ScaleByAdaGradNormState(sum_of_squares=sum_of_squares)

  return optax.GradientTransformation(init_fn, update_fn)


def adagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    b0: float = 0.1,
    eps: float = 1e-10,
) -> optax.GradientTransformation:
  """AdaGradNorm: ``w_{k+1} = w_k - lr_k * g_k / (b_k + eps)``, ``b_k^2 = b_{k-1}^2 + ||g_k||^2``.

  Ward, Wu, Bottou 2019; the base optimizer of AdAdaGrad (Lau, Liu, Kolar 2024). The reference
  code uses ``lr = 1.0``-scale learning rates and ``b_0^2 = 1e-2``.

  Args:
    learning_rate: a float or an ``optax`` schedule ``step -> lr``.
    b0: initial ``b_0`` (``b_0^2 = b0**2``).
    eps: added to ``b_k`` in the denominator.

  Returns:
    ``optax.chain(scale_by_adagrad_norm(b0, eps), optax.scale_by_learning_rate(learning_rate))``.
  """
  lr_value = None if callable(learning_rate) else _concrete_float(learning_rate)
  if lr_value is not None and not np.isfinite(lr_value):
    raise ValueError(f"adagrad_norm: learning_rate must be finite, got {learning_rate!r}")
  return optax.chain(
      scale_by_adagrad_norm(b0=b0, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )
