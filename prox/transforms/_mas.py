"""Memory Aware Synapses (MAS; Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware
Synapses: Learning what (not) to forget"): unsupervised parameter importance, penalised like EWC.

Importance. For a network ``F(x; theta)`` (its output, e.g. the logits) and unlabelled inputs
``x_1 .. x_N`` of the finished task, the importance of parameter ``i`` is the mean absolute sensitivity of
the squared L2 norm of the output (the paper's global MAS, Eq. 4 with the l2^2 trick of Sec. 4):

    Omega_i = 1/N sum_n | d ||F(x_n; theta)||_2^2 / d theta_i |.

No labels are needed, so Omega can be computed on whatever data the model sees at test time.

Penalty. Learning the next task minimises ``L_new(theta) + lambda_MAS sum_i Omega_i (theta_i - theta*_i)^2``
with ``theta*`` the weights after the previous task and ``Omega`` accumulated over the tasks seen so far
(``Omega <- Omega + Omega_t``). That is EWC's quadratic with ``Omega`` in place of the Fisher, in EWC's
``online`` form (one anchor, the latest weights; ``gamma = 1`` sums the importances), so prox reuses
:mod:`prox.transforms.ewc` as it is::

  tx = optax.chain(mas(mas_lambda=1.0), optax.sgd(1e-2))   # = ewc(2 * mas_lambda, mode="online")
  ...                                                       # train task 0
  omega = mas_importance(apply_fn, params, task0_inputs)
  opt_state = consolidate_opt_state(opt_state, params, omega)   # prox.transforms.ewc
  ...                                                       # train task 1

``ewc_penalty(state, params)`` then returns ``lambda_MAS sum_i Omega_i (theta_i - theta*_i)^2`` (EWC writes its
penalty with a factor 1/2, hence ``ewc_lambda = 2 lambda_MAS``). ``ewc(..., mode="separate")`` with the same
``Omega`` keeps one quadratic per task instead (each task anchored at its own weights), and
``mas(..., gamma=g)`` decays the accumulated importance (``Omega <- g Omega + Omega_t``, Avalanche's variant
uses a convex average).

Departures: the reference code averages ``|gradient of the mini-batch mean of ||F||^2|`` over mini-batches
(``minibatch_size=B`` here gives exactly that); the default is the per-example rule of the paper's equation.
The paper's local (Hebbian) variant is not implemented.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.transforms import ewc as _ewc

PyTree = Any


def mas(mas_lambda: float | jax.Array, *, gamma: float | jax.Array = 1.0) -> optax.GradientTransformationExtraArgs:
  """The MAS penalty gradient ``2 lambda_MAS Omega (theta - theta*)``: ``ewc(2 * mas_lambda, mode="online")``.

  Args:
    mas_lambda: the paper's ``lambda`` (penalty ``lambda sum_i Omega_i (theta_i - theta*_i)^2``), ``>= 0``.
    gamma: decay of the accumulated importance at each consolidation, ``Omega <- gamma Omega + Omega_t``
      (1: the paper's sum).

  Returns:
    The EWC transform (state :class:`prox.transforms.ewc.EWCState`); consolidate it with
    ``prox.transforms.ewc.consolidate`` / ``consolidate_opt_state`` passing :func:`mas_importance`'s
    ``Omega`` where EWC passes the Fisher.
  """
  lam = _ewc._concrete(mas_lambda)  # pylint: disable=protected-access
  if lam is not None and not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f"mas_lambda must be a finite number >= 0, got {mas_lambda!r}")
  return _ewc.ewc(2.0 * jnp.asarray(mas_lambda, jnp.float32) if lam is None else 2.0 * lam,
                  mode="online", gamma=gamma)


def mas_importance(
    apply_fn: Callable[[PyTree, PyTree], PyTree],
    params: PyTree,
    batch: PyTree,
    *,
    minibatch_size: int | None = None,
    chunk_size: int | None = None,
) -> PyTree:
  """MAS importance ``Omega = 1/N sum_n |grad_theta ||F(x_n; theta)||_2^2|`` (Aljundi et al. 2018).

  Args:
    apply_fn: ``apply_fn(params, example) -> output`` for ONE example (no batch axis; the output may be an
      array or a pytree of arrays, whose squares are all summed). For a batched model write
      ``lambda p, x: model_apply(p, x[None])[0]``.
    params: the parameters after the task.
    batch: unlabelled inputs, leaves with a leading axis of ``N`` examples.
    minibatch_size: ``None`` (default): the per-example rule above, from ``vmap(grad)``. ``B``: the
      reference code's approximation ``1/K sum_k |grad 1/|b_k| sum_{n in b_k} ||F(x_n)||^2|`` over the
      ``K = ceil(N / B)`` consecutive mini-batches (the last one may be shorter).
    chunk_size: per-example gradients computed this many examples at a time (bounds memory).

  Returns:
    ``Omega``, a pytree like ``params`` (at least float32; float64 for float64 parameters). Jitted with
    ``apply_fn`` static: pass the same function object at every task boundary so it compiles once.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("mas_importance: batch is empty")
  n = int(jnp.shape(leaves[0])[0])
  if n < 1 or any(int(jnp.shape(x)[0]) != n for x in leaves):
    raise ValueError(f"mas_importance: batch leaves must share a non-empty leading axis, got "
                     f"{[jnp.shape(x) for x in leaves]}")
  for name, value in (("minibatch_size", minibatch_size), ("chunk_size", chunk_size)):
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
      raise ValueError(f"mas_importance: {name} must be a positive int or None, got {value!r}")
  group = min(minibatch_size if minibatch_size is not None else (chunk_size or n), n)
  return _importance(apply_fn, params, batch, group=group, minibatch=minibatch_size is not None)


def _sq_norm(apply_fn, params, example) -> jax.Array:
  out = apply_fn(params, example)
  return sum(jnp.sum(jnp.square(jnp.asarray(o))) for o in jax.tree.leaves(out))


@functools.partial(jax.jit, static_argnames=("apply_fn", "group", "minibatch"))
def _importance(apply_fn, params, batch, *, group: int, minibatch: bool):
  return _ewc.gradient_moment(functools.partial(_sq_norm, apply_fn), params, batch, group=group,
                              minibatch=minibatch, op="abs")
