"""Per-task binary subnetworks with frozen shared weights (WSN; Kang, Mina, Madjid, Yoon, Hasegawa-Johnson, Hwang
& Yoo 2022, "Forget-free Continual Learning with Winning Subnetworks").

Every selected weight ``w`` has a learnable score ``s``. While task ``t`` trains, the forward pass uses

    w_eff = w * m_t,     m_t = 1[|s| among the top c of its layer]      (c = ``density``, per layer)

and the scores learn through the straight-through estimator (the top-c indicator's derivative taken as the
identity, as in edge-popup): ``dL/ds = sign(s) * w * dL/dw_eff``, ``dL/dw = m_t * dL/dw_eff``. The weights that
earlier tasks' masks use are frozen (``M_{t-1} = m_1 | ... | m_{t-1}``): the update of ``w`` is zeroed where
``M_{t-1}`` is set, so the weights of earlier subnetworks never change, while task ``t`` may still *reuse*
them (they can be in ``m_t``; that is the forward transfer). At the end of task ``t``, ``consolidate``
stores ``m_t`` and sets ``M_t = M_{t-1} | m_t``. Inference on task ``t`` uses ``w * m_t`` -- exactly the weights
it was trained with, hence forget-free.

Masks are stored bit-packed (``jnp.packbits``: one uint8 per 8 weights, ``[max_tasks, ceil(n / 8)]`` per
layer): a task costs ``n / 8`` bytes per layer, 1/32 of a float32 copy. WSN compresses the bit stream further
with Huffman coding (an offline, variable-length step that does not fit a fixed-shape state).

Parameters are ``{"weights": W, "scores": S}`` (``S`` has an array for each selected leaf of ``W`` and
``None`` elsewhere; ``TaskMasks.init_params`` builds it). The step's forward hook is ``TaskMasks.forward``::

  tm = task_masks(optax.adam(1e-3), density=0.5, max_tasks=10)
  params = tm.init_params(weights, key)
  opt_state = tm.tx.init(params)
  loss = loss_fn(tm.forward(params), batch)                 # gradients reach W and S
  ...                                                        # end of task t:
  opt_state = tm.consolidate_opt_state(opt_state, params)
  logits_t = model(tm.task_weights(find_task_mask_state(opt_state), params, t), x)   # inference on task t

Departures: leaves the filter does not select (biases, normalisation scales; WSN's networks have no biases)
are trained by the inner transform without masks and can cause forgetting; freeze them after the first
task or use bias-free layers. Scores are not reset between tasks: a new task starts from the last task's
scores, hence from its mask, whose weights are all frozen, and reaches free weights as its scores move;
give it fresh scores (``init_params(weights, key)["scores"]``) to start from a random subnetwork instead.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.transforms.filters import FilterLike, select

PyTree = Any


class TaskMaskState(NamedTuple):
  """State of ``TaskMasks.tx``.

  Attributes:
    packed: per selected leaf uint8 ``[max_tasks, ceil(n / 8)]``, task ``t``'s mask bit-packed in row ``t``;
      ``None`` elsewhere.
    used: per selected leaf bool (the leaf's shape), the union of the stored masks (frozen weights).
    num_tasks: int32, masks stored so far.
    inner: the inner transform's state.
  """
  packed: PyTree
  used: PyTree
  num_tasks: jax.Array
  inner: PyTree


class TaskMasks(NamedTuple):
  """WSN's pieces, sharing one ``density`` and selection (see the module docstring).

  Attributes:
    tx: ``GradientTransformationExtraArgs`` on ``{"weights", "scores"}`` params: the inner transform, then the
      updates of frozen weights zeroed.
    init_params: ``init_params(weights, key) -> {"weights", "scores"}`` (scores ``U(-b, b)``,
      ``b = sqrt(6 / fan_in)``, Kaiming-uniform as WSN).
    forward: ``forward(params) -> weights`` for the training forward pass (top-c masks, straight-through).
    current_masks: ``current_masks(params) -> bool masks`` (``None`` at unselected leaves).
    consolidate: ``consolidate(state, params) -> state``, end of a task (jittable; beyond ``max_tasks`` the
      mask is not stored but still frozen).
    consolidate_opt_state: the same on every ``TaskMaskState`` inside an optimizer state.
    task_weights: ``task_weights(state, params, task) -> weights`` with task ``task``'s stored mask.
  """
  tx: optax.GradientTransformationExtraArgs
  init_params: Callable[[PyTree, jax.Array], PyTree]
  forward: Callable[[PyTree], PyTree]
  current_masks: Callable[[PyTree], PyTree]
  consolidate: Callable[[TaskMaskState, PyTree], TaskMaskState]
  consolidate_opt_state: Callable[[PyTree, PyTree], PyTree]
  task_weights: Callable[[TaskMaskState, PyTree, jax.Array], PyTree]


def _topk_mask(abs_scores: jax.Array, k: int) -> jax.Array:
  """bool: the ``k`` largest entries of the non-negative ``abs_scores`` (ties broken by position, as
  ``lax.top_k``).

  No sort: the ``k``-th largest value ``v`` is found by bisection on the float's bit pattern (monotone for
  non-negative floats), one ``count(bits >= mid)`` per bit, then ``mask = (x > v) | (x == v and among the
  first k - #(x > v) such entries)``. Identical to ``lax.top_k``'s selection and, on CPU, several times
  faster for the large ``k`` of a subnetwork (half a layer at density 0.5): ``top_k`` is a partial sort."""
  flat = abs_scores.reshape(-1)
  wide = flat.dtype == jnp.float64
  bits = jax.lax.bitcast_convert_type(flat if wide else flat.astype(jnp.float32), jnp.int64 if wide else jnp.int32)
  int_t, width = (jnp.int64, 64) if wide else (jnp.int32, 32)
  hi = 0x7FF0000000000001 if wide else 0x7F800001      # one past +inf's bits: every finite value is below

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  zero = bits[0] & 0       # typed like ``bits`` (varying inside a shard_map, as the loop's updates are)
  v, _ = jax.lax.fori_loop(0, width, body, (zero, zero + jnp.asarray(hi, int_t)))
  greater = bits > v
  tied = bits == v
  take = tied & (jnp.cumsum(tied.astype(jnp.int32)) <= k - jnp.sum(greater, dtype=jnp.int32))
  return (greater | take).reshape(abs_scores.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _ste_indicator(abs_scores: jax.Array, k: int) -> jax.Array:
  """The top-``k`` indicator of ``abs_scores`` (as floats), with the identity as its derivative."""
  return _topk_mask(abs_scores, k).astype(abs_scores.dtype)


@_ste_indicator.defjvp
def _ste_indicator_jvp(k, primals, tangents):
  (abs_scores,), (dot,) = primals, tangents
  return _ste_indicator(abs_scores, k), dot


def _split(params: PyTree) -> tuple[PyTree, PyTree]:
  if not isinstance(params, dict) or set(params) != {"weights", "scores"}:
    raise ValueError("task_masks: params must be {'weights': ..., 'scores': ...} (see TaskMasks.init_params), "
                     f"got {type(params).__name__}{' with keys ' + str(sorted(params)) if isinstance(params, dict) else ''}")
  return params["weights"], params["scores"]


def task_masks(
    inner: optax.GradientTransformation,
    *,
    density: float,
    max_tasks: int,
    filter: FilterLike = None,  # pylint: disable=redefined-builtin
) -> TaskMasks:
  """WSN's task subnetworks around an inner optax transform (see the module docstring).

  Args:
    inner: the optimizer (e.g. ``optax.adam(1e-3)``), applied to weights and scores alike.
    density: ``c`` in ``(0, 1]``, the fraction of each selected layer's weights in a task's subnetwork
      (WSN: 0.03 to 0.5); ``k = max(1, round(c n))`` per layer.
    max_tasks: the most masks stored.
    filter: the leaves of ``weights`` that get scores and masks (a ``prox.transforms.filters`` spec;
      default every leaf with at least 2 dimensions).
  """
  if not np.isfinite(density) or not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density!r}")
  if not isinstance(max_tasks, (int, np.integer)) or isinstance(max_tasks, bool) or max_tasks < 1:
    raise ValueError(f"max_tasks must be a positive int, got {max_tasks!r}")
  inner = optax.with_extra_args_support(inner)
  k_of = lambda leaf: max(1, int(round(float(density) * int(np.prod(jnp.shape(leaf))))))

  def selection(weights: PyTree) -> PyTree:
    return select(weights, filter)

  def init_params(weights: PyTree, key: jax.Array) -> PyTree:
    sel = selection(weights)
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, max(len(leaves), 1))
    flags = treedef.flatten_up_to(sel)

    def score(w, k, on):
      if not on:
        return None
      fan_in = int(np.prod(jnp.shape(w)[:-1])) if jnp.ndim(w) > 1 else 1
      bound = float(np.sqrt(6.0 / max(fan_in, 1)))
      return jax.random.uniform(k, jnp.shape(w), jnp.float32, -bound, bound)

    scores = treedef.unflatten([score(w, k, on) for w, k, on in zip(leaves, keys, flags)])
    return {"weights": weights, "scores": scores}

  def current_masks(params: PyTree) -> PyTree:
    weights, scores = _split(params)
    return jax.tree.map(lambda w, s: None if s is None else _topk_mask(jnp.abs(s), k_of(w)),
                        weights, scores, is_leaf=lambda x: x is None)

  def forward(params: PyTree) -> PyTree:
    weights, scores = _split(params)

    def eff(w, s):
      if s is None:
        return w
      return w * _ste_indicator(jnp.abs(s), k_of(w)).astype(w.dtype)

    return jax.tree.map(eff, weights, scores, is_leaf=lambda x: x is None)

  def init_fn(params: PyTree) -> TaskMaskState:
    weights, scores = _split(params)

    def packed(w, s):
      return None if s is None else jnp.zeros((max_tasks, -(-int(np.prod(jnp.shape(w))) // 8)), jnp.uint8)

    def used(w, s):
      return None if s is None else jnp.zeros(jnp.shape(w), bool)

    none = lambda x: x is None
    return TaskMaskState(packed=jax.tree.map(packed, weights, scores, is_leaf=none),
                         used=jax.tree.map(used, weights, scores, is_leaf=none),
                         num_tasks=jnp.zeros((), jnp.int32), inner=inner.init(params))

  def update_fn(updates, state: TaskMaskState, params=None, **extra_args):
    if params is None:
      raise ValueError("task_masks needs params: call tx.update(grads, opt_state, params)")
    updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    u_w, u_s = _split(updates)
    u_w = jax.tree.map(lambda u, f: u if f is None else jnp.where(f, jnp.zeros_like(u), u),
                       u_w, state.used, is_leaf=lambda x: x is None)
    return {"weights": u_w, "scores": u_s}, state._replace(inner=inner_state)

  def consolidate(state: TaskMaskState, params: PyTree) -> TaskMaskState:
    masks = current_masks(params)
    slot = state.num_tasks

    def store(p, m):
      if m is None:
        return None
      bits = jnp.packbits(m.reshape(-1))
      return p.at[slot].set(bits, mode="drop")           # beyond max_tasks: not stored

    none = lambda x: x is None
    return state._replace(
        packed=jax.tree.map(store, state.packed, masks, is_leaf=none),
        used=jax.tree.map(lambda u, m: None if m is None else u | m, state.used, masks, is_leaf=none),
        num_tasks=state.num_tasks + 1)

  def consolidate_opt_state(opt_state: PyTree, params: PyTree) -> PyTree:
    find_task_mask_state(opt_state)
    return jax.tree.map(lambda s: consolidate(s, params) if isinstance(s, TaskMaskState) else s, opt_state,
                        is_leaf=lambda x: isinstance(x, TaskMaskState))

  def task_weights(state: TaskMaskState, params: PyTree, task: jax.Array) -> PyTree:
    weights, _ = _split(params)
    t = jnp.asarray(task, jnp.int32)

    def apply(w, p):
      if p is None:
        return w
      n = int(np.prod(jnp.shape(w)))
      bits = jax.lax.dynamic_index_in_dim(p, t, 0, keepdims=False)
      m = jnp.unpackbits(bits, count=n).reshape(jnp.shape(w)).astype(w.dtype)
      return w * m

    return jax.tree.map(apply, weights, state.packed, is_leaf=lambda x: x is None)

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return TaskMasks(tx=tx, init_params=init_params, forward=forward, current_masks=jax.jit(current_masks),
                   consolidate=jax.jit(consolidate), consolidate_opt_state=consolidate_opt_state,
                   task_weights=jax.jit(task_weights))


def find_task_mask_state(opt_state: PyTree) -> TaskMaskState:
  """The (first) ``TaskMaskState`` inside an optimizer state."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TaskMaskState)):
    if isinstance(leaf, TaskMaskState):
      return leaf
  raise ValueError("no TaskMaskState found in opt_state: is task_masks(...).tx part of the optimizer?")


def mask_bytes(state: TaskMaskState) -> int:
  """Bytes of the stored (bit-packed) masks: ``max_tasks * ceil(n / 8)`` summed over the layers."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.packed)))
