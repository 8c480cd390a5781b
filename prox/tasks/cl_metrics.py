"""Continual-learning metrics on the accuracy matrix (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018; Avalanche).

The accuracy matrix ``R`` has shape ``[T, T]``: ``R[i, j]`` is the accuracy on task ``j``'s test set measured
after training on tasks ``0..i``. The metrics below are the definitions Avalanche reports (and GEM introduced);
where Avalanche and Chaudhry et al. 2018 differ (forgetting), Chaudhry et al.'s rule is the default and
the Avalanche variant is an option. All functions are pure ``jax.numpy`` functions: they accept numpy or jax
arrays, are jitted, and return jax scalars / vectors (``float(...)`` them for a table).

Usage::

  R = np.zeros((T, T))
  for i, task in enumerate(tasks):
    train(task)
    for j, other in enumerate(tasks):
      R[i, j] = evaluate(other.test)
  average_accuracy(R), forgetting(R), backward_transfer(R), forward_transfer(R, b)
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = np.ndarray | jnp.ndarray


def _check_square(r: ArrayLike) -> jnp.ndarray:
  r = jnp.asarray(r)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise ValueError(f"accuracy matrix must be square [T, T], got shape {r.shape}")
  return r


@functools.partial(jax.jit, static_argnames="after_task")
def average_accuracy(r: ArrayLike, after_task: int | None = None) -> jnp.ndarray:
  """Average accuracy over the tasks seen so far.

  ``ACC_i = 1/(i+1) * sum_{j<=i} R[i, j]``; with ``after_task=None`` it is ``i = T-1`` (Avalanche's
  ``StreamAccuracy`` after the last experience, GEM's ACC).
  """
  r = _check_square(r)
  t = r.shape[0]
  i = t - 1 if after_task is None else after_task
  if not 0 <= i < t:
    raise ValueError(f"after_task must be in [0, {t}), got {after_task}")
  return jnp.mean(r[i, : i + 1])


@jax.jit
def average_accuracy_curve(r: ArrayLike) -> jnp.ndarray:
  """``[ACC_0, ..., ACC_{T-1}]`` with ``ACC_i = mean_{j<=i} R[i, j]`` (accuracy over seen tasks over time)."""
  r = _check_square(r)
  t = r.shape[0]
  seen = jnp.tril(jnp.ones((t, t), r.dtype))
  return jnp.sum(r * seen, axis=1) / jnp.arange(1, t + 1, dtype=r.dtype)


@functools.partial(jax.jit, static_argnames="reference")
def forgetting_per_task(
    r: ArrayLike, reference: Literal["max", "initial"] = "max"
) -> jnp.ndarray:
  """Forgetting of each task ``j < T-1`` after the last task, a vector of length ``T-1``.

  ``reference="max"`` (Chaudhry et al. 2018): ``f_j = max_{l in [j, T-2]} R[l, j] - R[T-1, j]``.
  ``reference="initial"`` (Avalanche's ``ExperienceForgetting``): ``f_j = R[j, j] - R[T-1, j]``, the accuracy
  right after learning task ``j`` minus the accuracy now.
  """
  r = _check_square(r)
  t = r.shape[0]
  if t < 2:
    return jnp.zeros((0,), r.dtype)
  last = r[t - 1, : t - 1]
  if reference == "initial":
    best = jnp.diagonal(r)[: t - 1]
  elif reference == "max":
    rows = jnp.arange(t)[:, None]
    cols = jnp.arange(t)[None, :]
    valid = (rows >= cols) & (rows <= t - 2)  # l in [j, T-2]
    best = jnp.max(jnp.where(valid, r, -jnp.inf), axis=0)[: t - 1]
  else:
    raise ValueError(f"reference must be 'max' or 'initial', got {reference!r}")
  return best - last


@functools.partial(jax.jit, static_argnames="reference")
def forgetting(r: ArrayLike, reference: Literal["max", "initial"] = "max") -> jnp.ndarray:
  """Average forgetting ``F = 1/(T-1) * sum_{j<T-1} f_j`` (see ``forgetting_per_task``); 0 for ``T = 1``."""
  f = forgetting_per_task(r, reference)
  return jnp.mean(f) if f.shape[0] else jnp.zeros((), f.dtype)


@jax.jit
def backward_transfer(r: ArrayLike) -> jnp.ndarray:
  """Backward transfer (GEM; Avalanche's ``StreamBWT``): ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])``.

  Negative BWT is forgetting; equals ``-forgetting(r, "initial")``. 0 for ``T = 1``.
  """
  r = _check_square(r)
  t = r.shape[0]
  if t < 2:
    return jnp.zeros((), r.dtype)
  return jnp.mean(r[t - 1, : t - 1] - jnp.diagonal(r)[: t - 1])


@jax.jit
def forward_transfer(r: ArrayLike, initial_accuracy: ArrayLike) -> jnp.ndarray:
  """Forward transfer (GEM; Avalanche's ``StreamForwardTransfer``).

  ``FWT = 1/(T-1) sum_{j>0} (R[j-1, j] - b_j)`` where ``b_j`` is the accuracy on task ``j`` of the model at
  initialisation (before any training), ``initial_accuracy[j]``. 0 for ``T = 1``.
  """
  r = _check_square(r)
  t = r.shape[0]
  b = jnp.asarray(initial_accuracy, r.dtype)
  if b.shape != (t,):
    raise ValueError(f"initial_accuracy must have shape ({t},), got {b.shape}")
  if t < 2:
    return jnp.zeros((), r.dtype)
  before = r[jnp.arange(t - 1), jnp.arange(1, t)]  # R[j-1, j]
  return jnp.mean(before - b[1:])
