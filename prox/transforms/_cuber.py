"""Continual learning with backward knowledge transfer (CUBER; Lin, Yang, Fan & Zhang 2022, "Beyond
Not-Forgetting: Continual Learning with Backward Knowledge Transfer"), on top of gradient projection memory.

GPM (:mod:`prox.transforms.gpm`) removes from every update of a kernel ``W`` (``[d_in, d_out]``) its part in
the input subspace of the old tasks, so the old tasks cannot change -- and cannot improve either. CUBER
lets the new task ``t`` update a layer inside old task ``j``'s subspace ``S_j`` when the two tasks are
positively correlated there, and projects as GPM elsewhere. With ``B_j`` an orthonormal basis of ``S_j``
(columns), ``g`` the new task's gradient ``dL_t/dW`` of the layer and ``r_j`` old task ``j``'s gradient
direction ``dL_j/dW`` at that layer:

* sufficient projection: ``||B_j^T g||_F >= eps ||g||_F`` (the new gradient has a real component in ``S_j``);
* positive correlation: ``<B_j B_j^T g, r_j> = <B_j^T g, B_j^T r_j> > 0``: a step ``-alpha B_j B_j^T g`` inside
  ``S_j`` then lowers ``L_j`` to first order, ``L_j(W - alpha B_j B_j^T g) ~ L_j(W) - alpha <B_j^T g, B_j^T r_j>``.

The layer's update keeps its components in the subspaces of the tasks that pass both tests and drops the
rest, as GPM:

    G' = G - sum_{j not allowed} B_j B_j^T G - (1 - beta) sum_{j allowed} B_j B_j^T G

(``beta = backward_scale``: 1 keeps the in-subspace update whole, 0 is GPM). The tests are made with
:func:`cuber_correlation` on the new task's gradient at the start of the task (at the weights the old tasks
left, where the paper's analysis evaluates it) and held for the task; call it again whenever wanted (e.g.
every few steps from a step transition's ``info.grads``).

State. :class:`CUBERState` holds a :class:`prox.transforms.gpm.GPMState` (the merged bases, updated by GPM's
own rule) and, per projected kernel, the column ranges of each task: GPM appends task ``j``'s new directions
(orthogonal to the earlier ones) as a block of columns, so ``B_j`` here is that block. It also holds the
reference coordinates ``B_j^T r_j`` (``[max_rank, d_out]`` per kernel, one row per basis column), never
``r_j`` itself, so the state is the size of GPM's plus one ``[max_rank, d_out]`` array and a few flags per
kernel.

Departures. The old task's gradient ``r_j`` at the current weights needs its data, which continual learning
without replay does not keep; ``cuber_update_bases`` takes a stored direction instead, given when task ``j``
ends (its gradient on its last batches, or minus its total weight change ``W_{j-1} - W_j``, which points up
its loss on average). ``S_j`` is task ``j``'s block of GPM's merged basis, i.e. the directions it added, not
its full input subspace (directions it shares with an earlier task belong to the earlier block). Any
further scaling or regularisation of the in-subspace step in the paper is replaced here by the single scale
``beta``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.transforms import gpm as _gpm

PyTree = Any
_MASKED = optax.MaskedNode()


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


class CUBERState(NamedTuple):
  """State of :func:`cuber`.

  Attributes:
    gpm: the merged orthonormal bases (``GPMState``: ``bases`` ``[d_in, max_rank]``, ``ranks``).
    task_ranks: per projected kernel int32 ``[max_tasks + 1]``: task ``j`` owns basis columns
      ``[task_ranks[j], task_ranks[j + 1])``; ``MaskedNode()`` elsewhere.
    reference: per projected kernel float32 ``[max_rank, d_out]``: row ``c`` is ``b_c^T r_j`` for the task ``j``
      owning column ``c`` (0 for unused columns).
    allowed: per projected kernel bool ``[max_tasks]``: task ``j``'s subspace is open to the update.
    num_tasks: int32, tasks consolidated so far.
  """
  gpm: _gpm.GPMState
  task_ranks: PyTree
  reference: PyTree
  allowed: PyTree
  num_tasks: jax.Array


def cuber(
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    max_tasks: int,
    max_rank: int | None = None,
    backward_scale: float = 1.0,
) -> optax.GradientTransformation:
  """GPM's projection, opened inside the subspaces of positively correlated old tasks (see the module doc).

  Args:
    mask: the kernels to project (as ``gpm``'s: a bool pytree or ``params -> mask``; default every 2-D leaf).
    max_tasks: the most tasks whose subspaces are told apart; later tasks' directions join the last one.
    max_rank: the most basis columns per kernel (default ``d_in``).
    backward_scale: ``beta`` in ``[0, 1]``, the fraction of the in-subspace update kept for allowed tasks.

  Returns:
    A ``GradientTransformation``; place it like ``gpm`` (after the optimizer's scaling). Until
    :func:`cuber_correlation` allows a task, it is exactly ``gpm``.
  """
  if not isinstance(max_tasks, (int, np.integer)) or isinstance(max_tasks, bool) or max_tasks < 1:
    raise ValueError(f"max_tasks must be a positive int, got {max_tasks!r}")
  if not np.isfinite(backward_scale) or not 0.0 <= backward_scale <= 1.0:
    raise ValueError(f"backward_scale must be in [0, 1], got {backward_scale!r}")
  inner = _gpm.gpm(mask, max_rank=max_rank)
  keep = float(backward_scale)

  def init_fn(params: PyTree) -> CUBERState:
    g = inner.init(params)
    leaf = lambda fn: jax.tree.map(lambda m: m if _is_masked(m) else fn(m), g.bases, is_leaf=_is_masked)
    d_outs = jax.tree.map(lambda p: jnp.shape(p)[-1] if jnp.ndim(p) == 2 else 0, params)
    reference = jax.tree.map(
        lambda m, d: m if _is_masked(m) else jnp.zeros((m.shape[1], d), jnp.float32),
        g.bases, d_outs, is_leaf=_is_masked)
    return CUBERState(gpm=g, task_ranks=leaf(lambda m: jnp.zeros((max_tasks + 1,), jnp.int32)),
                      reference=reference, allowed=leaf(lambda m: jnp.zeros((max_tasks,), bool)),
                      num_tasks=jnp.zeros((), jnp.int32))

  def update_fn(updates, state: CUBERState, params=None):
    del params

    def project(g, m, tr, allowed):
      if _is_masked(m):
        return g
      g32 = g.astype(jnp.float32)
      coords = m.T @ g32                                                     # [max_rank, d_out]
      open_rows = _row_owner(tr, m.shape[1]) @ allowed.astype(jnp.float32)   # [max_rank]
      weight = 1.0 - keep * open_rows
      return (g32 - m @ (weight[:, None] * coords)).astype(g.dtype)

    updates = jax.tree.map(project, updates, state.gpm.bases, state.task_ranks, state.allowed,
                           is_leaf=_is_masked)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _row_owner(task_ranks: jax.Array, max_rank: int) -> jax.Array:
  """float32 ``[max_rank, max_tasks]``: 1 where basis column ``c`` belongs to task ``j``."""
  rows = jnp.arange(max_rank)[:, None]
  return ((rows >= task_ranks[None, :-1]) & (rows < task_ranks[None, 1:])).astype(jnp.float32)


class CUBERScores(NamedTuple):
  """Per projected kernel, float32 ``[max_tasks]`` (``MaskedNode()`` elsewhere).

  Attributes:
    projection: ``||B_j^T g||_F / ||g||_F`` (0 for tasks not consolidated).
    alignment: ``<B_j^T g, B_j^T r_j>``.
  """
  projection: PyTree
  alignment: PyTree


@jax.jit
def cuber_scores(state: CUBERState, grads: PyTree) -> CUBERScores:
  """The two correlation statistics of the module docstring for the gradient ``grads`` (``dL_t/dW``)."""

  def one(g, m, tr, ref):
    if _is_masked(m):
      return _MASKED, _MASKED
    coords = m.T @ g.astype(jnp.float32)                                   # [max_rank, d_out]
    owner = _row_owner(tr, m.shape[1])                                     # [max_rank, T]
    energy = owner.T @ jnp.sum(jnp.square(coords), axis=1)                 # [T]
    align = owner.T @ jnp.sum(coords * ref, axis=1)
    total = jnp.sum(jnp.square(g.astype(jnp.float32)))
    ratio = jnp.sqrt(energy / jnp.where(total > 0, total, 1.0))
    return ratio, align

  pairs = jax.tree.map(one, grads, state.gpm.bases, state.task_ranks, state.reference, is_leaf=_is_masked)
  treedef = jax.tree.structure(state.gpm.bases, is_leaf=_is_masked)
  parts = treedef.flatten_up_to(pairs)
  return CUBERScores(projection=treedef.unflatten([p[0] for p in parts]),
                     alignment=treedef.unflatten([p[1] for p in parts]))


def cuber_correlation(state: CUBERState, grads: PyTree, *, projection_threshold: float | jax.Array = 0.5
                      ) -> CUBERState:
  """Sets which old tasks' subspaces the updates may enter, layer by layer, from the gradient ``grads``.

  Task ``j`` is allowed at a kernel when ``||B_j^T g|| >= eps ||g||`` (``eps = projection_threshold``) and
  ``<B_j^T g, B_j^T r_j> > 0``. ``grads`` is the loss gradient (not an optimizer update: the sign matters).
  Jittable.
  """
  if not isinstance(projection_threshold, jax.core.Tracer) and not 0.0 <= float(projection_threshold) <= 1.0:
    raise ValueError(f"projection_threshold must be in [0, 1], got {projection_threshold!r}")
  scores = cuber_scores(state, grads)
  eps = jnp.asarray(projection_threshold, jnp.float32)

  def decide(ratio, align, tr):
    if _is_masked(ratio):
      return ratio
    done = jnp.arange(tr.shape[0] - 1) < state.num_tasks
    return done & (ratio >= eps) & (ratio > 0) & (align > 0)

  allowed = jax.tree.map(decide, scores.projection, scores.alignment, state.task_ranks, is_leaf=_is_masked)
  return state._replace(allowed=allowed)


def cuber_update_bases(
    state: CUBERState,
    activations: PyTree,
    threshold: float | jax.Array,
    reference: PyTree | None = None,
) -> CUBERState:
  """Task boundary: extend the bases with GPM's rule and record the finished task's block and direction.

  Args:
    state: the ``CUBERState``.
    activations: per projected kernel, its inputs on the finished task, ``[n, d_in]`` (as ``gpm_update_bases``).
    threshold: GPM's energy threshold (e.g. ``prox.transforms.gpm.gpm_threshold(t)``).
    reference: per projected kernel, ``r_j`` ``[d_in, d_out]``: the finished task's loss-gradient direction
      (see the module docstring); ``None`` stores zeros, so the task is never positively correlated and
      stays protected as in GPM.

  Returns:
    The new state; ``allowed`` is reset (no old subspace open) until the next ``cuber_correlation``.
  """
  new_gpm = _gpm.gpm_update_bases(state.gpm, activations, threshold)
  treedef = jax.tree.structure(state.gpm.bases, is_leaf=_is_masked)
  if reference is None:
    refs = [None] * treedef.num_leaves
  else:
    try:
      refs = treedef.flatten_up_to(reference)
    except (ValueError, TypeError) as e:
      raise ValueError(f"cuber_update_bases: reference does not match the state's tree: {e}") from None
  return _record(state, new_gpm, refs)


def _record(state: CUBERState, new_gpm: _gpm.GPMState, refs: list) -> CUBERState:
  treedef = jax.tree.structure(state.gpm.bases, is_leaf=_is_masked)
  old_r = treedef.flatten_up_to(state.gpm.ranks)
  new_r = treedef.flatten_up_to(new_gpm.ranks)
  bases = treedef.flatten_up_to(new_gpm.bases)
  task_ranks = treedef.flatten_up_to(state.task_ranks)
  old_ref = treedef.flatten_up_to(state.reference)
  out_tr, out_ref = [], []
  for m, r0, r1, tr, ref_old, r in zip(bases, old_r, new_r, task_ranks, old_ref, refs):
    if _is_masked(m):
      out_tr.append(tr)
      out_ref.append(ref_old)
      continue
    max_tasks = tr.shape[0] - 1
    slot = jnp.minimum(state.num_tasks, max_tasks - 1)
    tr = tr.at[slot + 1].set(r1)
    tr = jnp.where(jnp.arange(max_tasks + 1) > slot + 1, r1, tr)   # later boundaries: empty ranges
    if r is not None:
      r = jnp.asarray(r, jnp.float32)
      if r.shape != (m.shape[0], ref_old.shape[1]):
        raise ValueError(f"reference for a [{m.shape[0]}, {ref_old.shape[1]}] kernel has shape {r.shape}")
      rows = jnp.arange(m.shape[1])
      new_rows = (rows >= r0) & (rows < r1)
      ref_old = jnp.where(new_rows[:, None], m.T @ r, ref_old)
    out_tr.append(tr)
    out_ref.append(ref_old)
  allowed = jax.tree.map(lambda a: a if _is_masked(a) else jnp.zeros_like(a), state.allowed, is_leaf=_is_masked)
  return CUBERState(gpm=new_gpm, task_ranks=treedef.unflatten(out_tr), reference=treedef.unflatten(out_ref),
                    allowed=allowed, num_tasks=state.num_tasks + 1)


def find_cuber_state(opt_state: PyTree) -> CUBERState:
  """The (first) ``CUBERState`` inside an optimizer state."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, CUBERState)):
    if isinstance(leaf, CUBERState):
      return leaf
  raise ValueError("no CUBERState found in opt_state: is cuber(...) part of the optimizer?")


def replace_cuber_state(opt_state: PyTree, fn: Callable[[CUBERState], CUBERState]) -> PyTree:
  """``opt_state`` with ``fn`` applied to every ``CUBERState`` in it (e.g. ``lambda s: cuber_correlation(s, g)``)."""
  find_cuber_state(opt_state)
  return jax.tree.map(lambda s: fn(s) if isinstance(s, CUBERState) else s, opt_state,
                      is_leaf=lambda x: isinstance(x, CUBERState))
