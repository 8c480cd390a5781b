"""AdaGradNorm: AdaGrad with one scalar accumulator (Ward, Wu, Bottou 2019), or one per output row.

``layout="scalar"`` (default), AdaGradNorm as Ward et al. define it:

    b_k^2 = b_{k-1}^2 + ||g_k||^2          (global l2 norm over all leaves)
    w_{k+1} = w_k - lr * g_k / (b_k + eps)

``layout="row"``, the layout of the AdAdaGrad reference code (Lau, Liu, Kolar 2024, "AdAdaGrad:
Adaptive Batch Size Schemes for Adaptive Gradient Methods"; timlautk/AdAdaGrad): AdaGradNorm applied
separately to each output unit of each leaf. For a leaf ``W`` whose last axis indexes the ``n`` output
units (Flax/optax layout: ``[in, out]`` dense kernels, ``[h, w, in, out]`` conv kernels, ``[out]``
biases), with ``j`` over that last axis and the sum over all other axes,

    (b_k^W)_j^2 = (b_{k-1}^W)_j^2 + sum_{i} (g_k^W)_{i, j}^2
    W_{k+1}[..., j] = W_k[..., j] - lr * g_k^W[..., j] / ((b_k^W)_j + eps)

This is the reference's ``Adagradnorm`` optimizer in JAX's layout: PyTorch stores a dense weight as
``[out, in]`` and a conv weight as ``[out, in, h, w]`` and its accumulator sums the squares over every
axis but the first (``grad.view(out, -1).norm(dim=1)**2``); the output axis is the last one here. A 1-D
leaf (a bias, a norm scale) gets one accumulator per entry and a 0-D leaf one in all, as the reference's
per-entry fall-back does. Departures from the reference: (a) it also adds the preceding weight's row sums
to a bias's accumulator (through a variable left over from the previous parameter of its loop, so it
depends on the order of the parameter list); prox keeps each leaf to itself, so a bias follows plain
per-entry AdaGrad; (b) it has no row layout for 3-D weights (1-D convolutions fall back to per-entry
AdaGrad there); prox treats every leaf of rank >= 2 alike, by its last axis.

``b_0 = 0.1`` (so ``b_0^2 = 1e-2``) in both layouts, as in the reference code. Accumulators are
``float32`` (``float64`` for ``float64`` gradients), whatever the dtype of the gradients; the updates
keep the dtype of the gradients.

This file imports only jax, numpy and optax, so it can be copied into any optax code.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


LAYOUTS = ("scalar", "row")


class ScaleByAdaGradNormState(NamedTuple):
  """State of :func:`scale_by_adagrad_norm`.

  Attributes:
    sum_of_squares: ``b_k^2`` (``b_0^2`` after ``init``): one scalar (``layout="scalar"``), or a pytree
      like the parameters holding a vector ``[n]`` per leaf with ``n`` output units along its last axis
      (a scalar per 0-D leaf) (``layout="row"``).
  """
  sum_of_squares: Any


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


def _row_sum_of_squares(g: jax.Array, dtype: Any) -> jax.Array:
  """``sum_i g[i, j]^2`` over every axis but the last (the output units); ``g^2`` for 0-D/1-D leaves."""
  g = jnp.asarray(g, dtype)
  return jnp.sum(jnp.square(g), axis=tuple(range(g.ndim - 1)))


def scale_by_adagrad_norm(b0: float = 0.1, eps: float = 1e-10, *,
                          layout: str = "scalar") -> optax.GradientTransformation:
  """Divides the updates by the root of the running sum of squared gradient norms.

  ``layout="scalar"``: ``b_k^2 = b_{k-1}^2 + ||g_k||^2``, ``u_k = g_k / (b_k + eps)`` (Ward, Wu, Bottou
  2019, "AdaGrad stepsizes: sharp convergence over nonconvex landscapes"; AdaGradNorm in Lau, Liu,
  Kolar 2024). ``layout="row"``: the same per output unit ``j`` (last axis) of each leaf ``W``:
  ``(b_k^W)_j^2 = (b_{k-1}^W)_j^2 + sum_i (g_k^W)_{i,j}^2``, ``u_k^W[..., j] = g_k^W[..., j] /
  ((b_k^W)_j + eps)``, the AdAdaGrad reference code's layout (see the module docstring). The current
  gradient enters the accumulator before it is used, as in AdaGrad.

  Args:
    b0: initial value ``b_0 >= 0`` of each accumulator's root (``b_0^2`` is stored).
    eps: ``>= 0``, added to ``b_k`` in the denominator; ``b0`` and ``eps`` may not both be 0.
    layout: ``"scalar"`` (one accumulator) or ``"row"`` (one per output unit of each leaf).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdaGradNormState`.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"scale_by_adagrad_norm: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
  b0_value, eps_value = _concrete_float(b0), _concrete_float(eps)
  if b0_value is not None and not b0_value >= 0:
    raise ValueError(f"scale_by_adagrad_norm: b0 must be >= 0, got {b0!r}")
  if eps_value is not None and not eps_value >= 0:
    raise ValueError(f"scale_by_adagrad_norm: eps must be >= 0, got {eps!r}")
  if b0_value == 0 and eps_value == 0:
    raise ValueError("scale_by_adagrad_norm: b0 and eps are both 0, the first step would divide by 0")

  def init_fn(params):
    if layout == "row":
      def row_init(p):
        dtype = _accumulator_dtype(p)
        return jnp.full(jnp.shape(p)[-1:], jnp.square(jnp.asarray(b0, dtype)), dtype)
      return ScaleByAdaGradNormState(sum_of_squares=jax.tree.map(row_init, params))
    dtype = _accumulator_dtype(params)
    return ScaleByAdaGradNormState(sum_of_squares=jnp.square(jnp.asarray(b0, dtype)))

  def row_update(updates, state):
    sum_of_squares = jax.tree.map(lambda g, acc: acc + _row_sum_of_squares(g, acc.dtype),
                                  updates, state.sum_of_squares)

    def scale(g, acc):  # acc [n] broadcasts along g's last axis
      inv = 1.0 / (jnp.sqrt(acc) + jnp.asarray(eps, acc.dtype))
      return (g * inv).astype(jnp.asarray(g).dtype)

    return (jax.tree.map(scale, updates, sum_of_squares),
            ScaleByAdaGradNormState(sum_of_squares=sum_of_squares))

  def update_fn(updates, state, params=None):
    del params
    if layout == "row":
      return row_update(updates, state)
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
    *,
    layout: str = "scalar",
) -> optax.GradientTransformation:
  """AdaGradNorm: ``w_{k+1} = w_k - lr_k * g_k / (b_k + eps)``, ``b_k^2 = b_{k-1}^2 + ||g_k||^2``.

  Ward, Wu, Bottou 2019; the base optimizer of AdAdaGrad (Lau, Liu, Kolar 2024). The reference
  code uses ``lr = 1.0``-scale learning rates, ``b_0^2 = 1e-2`` and one accumulator per output row
  (``layout="row"``; see :func:`scale_by_adagrad_norm`).

  Args:
    learning_rate: a float or an ``optax`` schedule ``step -> lr``.
    b0: initial ``b_0`` (``b_0^2 = b0**2``).
    eps: added to ``b_k`` in the denominator.
    layout: ``"scalar"`` (one accumulator, Ward et al.) or ``"row"`` (one per output unit of each leaf,
      the reference code's layout).

  Returns:
    ``optax.chain(scale_by_adagrad_norm(b0, eps, layout=layout),
    optax.scale_by_learning_rate(learning_rate))``.
  """
  lr_value = None if callable(learning_rate) else _concrete_float(learning_rate)
  if lr_value is not None and not np.isfinite(lr_value):
    raise ValueError(f"adagrad_norm: learning_rate must be finite, got {learning_rate!r}")
  return optax.chain(
      scale_by_adagrad_norm(b0=b0, eps=eps, layout=layout),
      optax.scale_by_learning_rate(learning_rate),
  )
