"""Gradient projection memory (GPM; Saha, Garg & Roy 2021, "Gradient Projection Memory for Continual Learning").

For each selected dense kernel ``W`` (flax layout ``[d_in, d_out]``, ``y = x @ W``), GPM keeps an orthonormal
basis ``M`` (``[d_in, k]``) of the space spanned by the layer's *inputs* on old tasks. A gradient of this
layer is ``G = X^T delta`` (``X``: inputs ``[n, d_in]``), so its columns live in the input space; removing
the component inside ``span(M)``

    G <- G - M (M^T G)

leaves ``x_old @ W`` unchanged to first order for every old input ``x_old`` in ``span(M)``. (PyTorch stores
``W`` as ``[d_out, d_in]`` and writes the same rule as ``g - g M M^T``.)

Bases have a fixed maximum size: ``M`` is stored as ``[d_in, max_rank]`` with the valid orthonormal
columns first and zeros after them, plus an int32 count, so neither ``update`` nor ``gpm_update_bases``
ever changes shape or recompiles.

Basis update after task ``t`` (the paper's Eq. 8-10), from ``R = X^T`` (``[d_in, n]``, columns = inputs):
``R_hat = R - M M^T R``; ``U, sigma = svd(R_hat)``; add the smallest number ``k`` of leading columns of ``U``
with ``||M M^T R||_F^2 + sum_{i<k} sigma_i^2 >= eps * ||R||_F^2``. For the first task (``M`` empty) this is the
plain rank-k energy criterion. Directions with ``sigma_i <= ||R||_F * max(d_in, n) * eps_float32`` (rounding
noise, the ``numpy.linalg.matrix_rank`` tolerance) are never added, so ``eps = 1`` keeps the numerical rank.
The reference code takes one column fewer on the first task (``sum(cumsum <
eps)``); here both cases use the paper's ">= eps" rule. ``eps`` schedule of the reference code:
``gpm_threshold(t) = 0.97 + 0.003 t``.

Placement: put ``gpm`` *after* the optimizer's scaling in a chain (``optax.chain(optax.sgd(lr), gpm())`` or
``optax.chain(optax.adam(lr), gpm())``) so the final update is orthogonal to the stored subspace; with plain
SGD it may equally go first, as in the paper. Biases (and any parameter not projected) keep changing and can
cause forgetting: GPM's reference networks have no biases; freeze them after the first task
(``optax.masked(optax.set_to_zero(), bias_mask)``) or use bias-free layers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
_MASKED = optax.MaskedNode()


class GPMState(NamedTuple):
  """State of ``gpm``.

  Attributes:
    bases: per projected leaf, float32 ``[d_in, max_rank]``: orthonormal columns ``0..rank-1``, zeros after;
      ``optax.MaskedNode()`` for leaves that are not projected.
    ranks: per projected leaf, int32 scalar: the number of valid columns; ``MaskedNode()`` elsewhere.
  """
  bases: PyTree
  ranks: PyTree


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def gpm_threshold(task_index: int, base: float = 0.97, increment: float = 0.003) -> float:
  """Energy threshold of the reference code for task ``task_index`` (0-based): ``min(base + increment t, 1)``."""
  return min(base + increment * task_index, 1.0)


def _resolve_mask(mask, params) -> PyTree:
  if mask is None:
    return jax.tree.map(lambda p: jnp.ndim(p) == 2, params)
  if callable(mask):
    return mask(params)
  return mask


def gpm(
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    max_rank: int | None = None,
) -> optax.GradientTransformation:
  """Project the updates of selected 2-D kernels off the stored input subspaces: ``G <- G - M (M^T G)``.

  Args:
    mask: a pytree of bools like ``params`` (or a function ``params -> mask``) selecting the kernels to
      project; default: every 2-D leaf. Selected leaves must be 2-D ``[d_in, d_out]``.
    max_rank: the most basis columns kept per layer (default ``d_in``, the full input space).

  Returns:
    A ``GradientTransformation`` (``params`` not needed). Bases start empty (identity transform); fill them
    with ``gpm_update_bases`` / ``gpm_update_opt_state`` at each task boundary.
  """
  if max_rank is not None and (not isinstance(max_rank, (int, np.integer)) or max_rank < 1):
    raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")

  def init_fn(params: PyTree) -> GPMState:
    sel = _resolve_mask(mask, params)

    def basis(p, s):
      if not s:
        return _MASKED
      if jnp.ndim(p) != 2:
        raise ValueError(f"gpm projects 2-D kernels [d_in, d_out]; a selected leaf has shape {jnp.shape(p)}")
      d_in = jnp.shape(p)[0]
      return jnp.zeros((d_in, min(max_rank or d_in, d_in)), jnp.float32)

    try:
      bases = jax.tree.map(basis, params, sel)
    except ValueError as e:
      if "2-D kernels" in str(e):
        raise
      raise ValueError(f"gpm: mask does not match the params tree: {e}") from None
    ranks = jax.tree.map(lambda b: jnp.zeros((), jnp.int32), bases)
    return GPMState(bases=bases, ranks=ranks)

  def update_fn(updates, state: GPMState, params=None):
    del params

    def project(g, m):
      if _is_masked(m):
        return g
      g32 = g.astype(jnp.float32)
      return (g32 - m @ (m.T @ g32)).astype(g.dtype)

    updates = jax.tree.map(project, updates, state.bases, is_leaf=_is_masked)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


@jax.jit
def _update_basis(m: jax.Array, rank: jax.Array, activations: jax.Array, threshold: jax.Array):
  """One layer's basis update: ``activations`` ``[n, d_in]``; returns the new ``(M, rank)``."""
  max_rank = m.shape[1]
  r = activations.astype(jnp.float32).T  # [d_in, n], columns are inputs
  total = jnp.sum(jnp.square(r))
  r_hat = r - m @ (m.T @ r)
  u, sigma, _ = jnp.linalg.svd(r_hat, full_matrices=False)  # u [d_in, min(d_in, n)]
  captured = total - jnp.sum(jnp.square(r_hat))
  energy_before = captured + jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(jnp.square(sigma))[:-1]])
  # numerical-rank floor (as numpy.linalg.matrix_rank): never add directions that are rounding noise
  tol = jnp.sqrt(total) * max(r.shape) * jnp.finfo(jnp.float32).eps
  k_add = jnp.sum((energy_before < threshold * total) & (sigma > tol)).astype(jnp.int32)
  k_add = jnp.minimum(k_add, max_rank - rank)
  cols = jnp.arange(max_rank)
  src = jnp.clip(cols - rank, 0, u.shape[1] - 1)
  take = (cols >= rank) & (cols < rank + k_add)
  new_m = jnp.where(take[None, :], u[:, src], m)
  return new_m, rank + k_add


def gpm_update_bases(
    state: GPMState, activations: PyTree, threshold: float | jax.Array
) -> GPMState:
  """State transition at a task boundary: extend each layer's basis with the new task's input subspace.

  Args:
    state: the ``GPMState``.
    activations: a pytree like ``state.bases`` (``MaskedNode()``, ``None`` or anything at unprojected leaves)
      holding, per projected kernel, the layer's inputs on the finished task, ``[n, d_in]`` (the reference
      code uses ``n = 125`` examples for MLPs).
    threshold: energy threshold ``eps`` in ``(0, 1]`` (e.g. ``gpm_threshold(t)``).

  Returns:
    The new state (same shapes). Jittable; a layer whose basis is full (``max_rank``) stays unchanged.
  """
  th = None if isinstance(threshold, jax.core.Tracer) else float(threshold)
  if th is not None and not 0.0 < th <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
  threshold = jnp.asarray(threshold, jnp.float32)
  leaves_b, treedef = jax.tree.flatten(state.bases, is_leaf=_is_masked)
  leaves_r = treedef.flatten_up_to(state.ranks) if leaves_b else []
  try:
    leaves_a = treedef.flatten_up_to(activations)
  except (ValueError, TypeError) as e:
    raise ValueError(f"gpm_update_bases: activations do not match the GPM state's tree: {e}") from None
  new_b, new_r = [], []
  for m, k, a in zip(leaves_b, leaves_r, leaves_a):
    if _is_masked(m):
      new_b.append(m)
      new_r.append(k)
      continue
    if jnp.ndim(a) != 2 or jnp.shape(a)[1] != m.shape[0]:
      raise ValueError(f"activations for a [{m.shape[0]}, ...] kernel must be [n, {m.shape[0]}], "
                       f"got shape {jnp.shape(a)}")
    m2, k2 = _update_basis(m, k, jnp.asarray(a), threshold)
    new_b.append(m2)
    new_r.append(k2)
  return GPMState(bases=treedef.unflatten(new_b), ranks=treedef.unflatten(new_r))


def find_gpm_state(opt_state: PyTree) -> GPMState:
  """The (first) ``GPMState`` inside an optimizer state."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GPMState)):
    if isinstance(leaf, GPMState):
      return leaf
  raise ValueError("no GPMState found in opt_state: is gpm(...) part of the optimizer?")


def gpm_update_opt_state(opt_state: PyTree, activations: PyTree, threshold: float | jax.Array) -> PyTree:
  """Apply ``gpm_update_bases`` to every ``GPMState`` inside ``opt_state``."""
  find_gpm_state(opt_state)
  return jax.tree.map(
      lambda s: gpm_update_bases(s, activations, threshold) if isinstance(s, GPMState) else s,
      opt_state, is_leaf=lambda x: isinstance(x, GPMState))
