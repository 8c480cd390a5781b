"""Structured (channel) masks, a FLOPs model of the masked network, hard slicing, and budgeted pruning.

A *structure* describes which parameter entries belong to which channel. It is a list of channel groups:
a group is a set of channels that live or die together, with

* producers: leaf axes indexed by the group's output channels (a Dense / Conv kernel's last axis, its
  bias, a BatchNorm scale and bias),
* consumers: leaf axes indexed by the group's channels as *inputs* (the next kernel's input axis; after a
  flatten, a Dense kernel's input axis holds ``H * W * C`` entries of which entry ``i`` belongs to channel
  ``i mod C``),
* state: model-state axes (BatchNorm running statistics) that are sliced with the group but never masked.

Each :class:`ChannelAxis` covers the first ``channels`` channels of its group, so that layers of
different widths can share one group (the residual stream of a ResNet, whose channel ``c`` of stage 1 is
added into channel ``c`` of stages 2 and 3 by the zero-padded shortcut). Its axis is laid out as
``(outer, channels, inner)``: entry ``i`` belongs to channel ``(i // inner) mod channels``.

Channel masks are a dict ``{group name: [size] mask}`` (bool, or float for soft masks), a plain pytree
that jits, shards and lives in an optimizer state. Masking channel ``c`` multiplies every producer and
consumer entry of ``c`` by ``m_c`` and nothing else, so (with a ReLU-type nonlinearity and ``f(0) = 0``
normalisation) the channel's activation is exactly zero and the network computes what the network with
the channel physically removed (:func:`slice_params`) computes.

FLOPs are counted as multiply-accumulates of the Dense / Conv layers (the convention of the pruning
literature's tables): a layer with ``n_in`` active input channels, ``n_out`` active output channels, a
``window`` of ``kh * kw`` (conv) or of the flattened spatial size (dense after a flatten) and ``P``
output positions costs ``P * window * n_in * n_out``. With soft masks, ``n = sum_c m_c`` makes the count
differentiable (:func:`masked_flops`).

:func:`channel_pruning` prunes channels gradually under a FLOPs budget that tightens as
``b_t = 1 - (1 - b) (1 - (1 - p_t)^power)`` (Zhu & Gupta 2017's cubic schedule applied to the FLOPs
fraction), ranking channels by the L1 norm of their producer weights (Li, Kadav, Durdanovic, Samet, Graf
2017, "Pruning Filters for Efficient ConvNets"), normalised by the mean over the group so that groups of
different fan-in compare. At each update it removes the lowest-ranked channels (already pruned ones
first, so masks only shrink) until the masked FLOPs fit ``b_t`` times the dense FLOPs.

Only jax/optax/numpy and the sibling helper files are imported.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from prox.transforms import masking

PyTree = Any
Path = tuple[str, ...]
ChannelMasks = dict[str, jax.Array]

__all__ = [
    "ChannelAxis",
    "ChannelGroup",
    "ChannelPruningState",
    "LinearOp",
    "Structure",
    "apply_channel_masks",
    "channel_importance",
    "channel_pruning",
    "check_structure",
    "expand_channel_masks",
    "flops_budget_schedule",
    "full_channel_masks",
    "full_flops",
    "masked_flops",
    "masked_param_count",
    "slice_params",
]


@dataclasses.dataclass(frozen=True)
class ChannelAxis:
  """One leaf axis indexed by a group's channels.

  Attributes:
    path: the leaf's keys in the (nested dict) tree, e.g. ``("conv1", "kernel")``.
    axis: the axis of the leaf.
    channels: how many of the group's first channels this axis covers.
    inner: the axis is laid out as ``(outer, channels, inner)``; entry ``i`` is channel
      ``(i // inner) % channels``. ``1`` for a kernel axis and for the NHWC flatten.
  """
  path: Path
  axis: int
  channels: int
  inner: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Channels that are kept or removed together (see the module docstring)."""
  name: str
  size: int
  producers: tuple[ChannelAxis, ...]
  consumers: tuple[ChannelAxis, ...] = ()
  state: tuple[ChannelAxis, ...] = ()


@dataclasses.dataclass(frozen=True)
class LinearOp:
  """A Dense or Conv layer for the FLOPs count: ``positions * window * n_in * n_out`` MACs per example.

  ``in_group`` / ``out_group`` name the channel groups of its input / output (``None``: not prunable,
  e.g. the image channels or the logits); ``in_channels`` / ``out_channels`` how many channels of the
  group (or in all) it sees.
  """
  name: str
  in_group: str | None
  out_group: str | None
  in_channels: int
  out_channels: int
  window: int
  positions: int


@dataclasses.dataclass(frozen=True)
class Structure:
  """The channel groups of a parameter tree and its layers (for FLOPs). Static: close over it in jit."""
  groups: tuple[ChannelGroup, ...]
  ops: tuple[LinearOp, ...] = ()

  def group(self, name: str) -> ChannelGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise ValueError(f"unknown channel group {name!r}; groups: {', '.join(self.names)}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)


# ----------------------------------------------------------------------------------------------------
# Tree helpers
# ----------------------------------------------------------------------------------------------------


def _key(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _get(tree: PyTree, path: Path) -> Any:
  node = tree
  for k in path:
    if not isinstance(node, Mapping) or k not in node:
      raise ValueError(f"structure refers to {'/'.join(path)!r}, which the tree does not have")
    node = node[k]
  return node


def _entries(structure: Structure, kind: str) -> dict[Path, list[tuple[ChannelAxis, str]]]:
  """``{leaf path: [(axis spec, group name), ...]}`` for producers+consumers (``"params"``) or state."""
  out: dict[Path, list[tuple[ChannelAxis, str]]] = {}
  for g in structure.groups:
    axes = g.producers + g.consumers if kind == "params" else g.state
    for a in axes:
      out.setdefault(tuple(a.path), []).append((a, g.name))
  return out


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _channel_index(length: int, a: ChannelAxis) -> np.ndarray:
  return (np.arange(length) // a.inner) % a.channels


def check_structure(structure: Structure, params: PyTree, model_state: PyTree | None = None) -> None:
  """Raises ``ValueError`` naming the first axis of ``structure`` that does not fit ``params``/``model_state``."""
  names = structure.names
  if len(set(names)) != len(names):
    raise ValueError(f"channel group names must be unique, got {names}")
  for g in structure.groups:
    if not isinstance(g.size, numbers.Integral) or g.size < 1:
      raise ValueError(f"group {g.name!r}: size must be a positive int, got {g.size!r}")
    if not g.producers:
      raise ValueError(f"group {g.name!r} has no producers")
    trees = [("params", g.producers + g.consumers, params)]
    if model_state is not None:
      trees.append(("model_state", g.state, model_state))
    for where, axes, tree in trees:
      for a in axes:
        leaf = _get(tree, tuple(a.path))
        shape = _shape(leaf)
        name = "/".join(a.path)
        if not -len(shape) <= a.axis < len(shape):
          raise ValueError(f"group {g.name!r}: {where} leaf {name!r} of shape {shape} has no axis {a.axis}")
        if not 1 <= a.channels <= g.size or a.inner < 1:
          raise ValueError(f"group {g.name!r}: leaf {name!r} covers {a.channels} channels (inner {a.inner}); "
                           f"need 1 <= channels <= {g.size} and inner >= 1")
        if shape[a.axis] % (a.channels * a.inner):
          raise ValueError(f"group {g.name!r}: axis {a.axis} of {name!r} has length {shape[a.axis]}, not a "
                           f"multiple of channels * inner = {a.channels * a.inner}")
  for op in structure.ops:
    for grp, n in ((op.in_group, op.in_channels), (op.out_group, op.out_channels)):
      if grp is not None and not 1 <= n <= structure.group(grp).size:
        raise ValueError(f"op {op.name!r}: {n} channels of group {grp!r} (size {structure.group(grp).size})")


def full_channel_masks(structure: Structure, dtype: Any = jnp.bool_) -> ChannelMasks:
  """All-ones channel masks (every channel kept)."""
  return {g.name: jnp.ones([g.size], dtype) for g in structure.groups}


def _axis_mask(m: jax.Array, a: ChannelAxis, shape: tuple[int, ...]) -> jax.Array:
  axis = a.axis % len(shape)
  v = m[:a.channels][_channel_index(shape[axis], a)]
  return v.reshape([shape[axis] if d == axis else 1 for d in range(len(shape))])


def _leaf_masks(structure: Structure, masks: ChannelMasks, tree: PyTree, kind: str) -> PyTree:
  entries = _entries(structure, kind)

  def one(path, leaf):
    found = entries.get(tuple(_key(k) for k in path))
    if not found:
      return None
    shape = _shape(leaf)
    out = None
    for a, name in found:
      m = _axis_mask(masks[name], a, shape)
      out = m if out is None else (out & m if m.dtype == jnp.bool_ else out * m)
    return jnp.broadcast_to(out, shape)

  return jax.tree_util.tree_map_with_path(one, tree)


def expand_channel_masks(structure: Structure, masks: ChannelMasks, params: PyTree) -> PyTree:
  """A mask tree shaped like ``params``: at each producer/consumer leaf the product of its group masks
  along their axes, ``None`` at leaves no group touches (the layout :mod:`prox.transforms.masking` uses)."""
  return _leaf_masks(structure, masks, params, "params")


def apply_channel_masks(structure: Structure, masks: ChannelMasks, params: PyTree) -> PyTree:
  """``w * m`` at every entry of a masked channel, ``w`` elsewhere (bool or soft float masks).

  Differentiable in both ``params`` and float ``masks`` (used by soft-mask methods such as LAPP).
  """
  leaf_masks = expand_channel_masks(structure, masks, params)

  def one(w, m):
    if m is None:
      return w
    if m.dtype == jnp.bool_:
      return jnp.where(m, w, jnp.zeros_like(w))
    return w * m.astype(w.dtype)

  return jax.tree.map(one, params, leaf_masks, is_leaf=lambda x: x is None)


def _active(structure: Structure, masks: ChannelMasks, group: str | None, channels: int) -> jax.Array:
  if group is None:
    return jnp.asarray(channels, jnp.float32)
  return jnp.sum(masks[group][:channels].astype(jnp.float32))


def masked_flops(structure: Structure, masks: ChannelMasks) -> jax.Array:
  """MACs per example of the masked network: ``sum_ops positions * window * n_in * n_out`` (float32).

  ``n = sum_c m_c`` over the op's channels of its group, so soft masks give a differentiable count.
  """
  total = jnp.zeros([], jnp.float32)
  for op in structure.ops:
    n_in = _active(structure, masks, op.in_group, op.in_channels)
    n_out = _active(structure, masks, op.out_group, op.out_channels)
    total = total + float(op.positions * op.window) * n_in * n_out
  return total


def full_flops(structure: Structure) -> int:
  """MACs per example of the unmasked network (a Python int)."""
  return int(sum(op.positions * op.window * op.in_channels * op.out_channels for op in structure.ops))


def masked_param_count(structure: Structure, masks: ChannelMasks, params: PyTree) -> jax.Array:
  """Number of parameters the sliced network has (float32; differentiable with soft masks).

  A leaf keeps ``prod_axes (kept entries along the axis)``; an axis of a group keeps
  ``(length / channels) * sum_c m_c``.
  """
  entries = _entries(structure, "params")
  total = jnp.zeros([], jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = _shape(leaf)
    found = entries.get(tuple(_key(k) for k in path), [])
    kept = [jnp.asarray(float(d), jnp.float32) for d in shape]
    for a, name in found:
      axis = a.axis % len(shape)
      kept[axis] = (shape[axis] / a.channels) * _active(structure, masks, name, a.channels)
    size = jnp.ones([], jnp.float32)
    for k in kept:
      size = size * k
    total = total + size
  return total


def slice_params(structure: Structure, masks: Mapping[str, Any], params: PyTree,
                 model_state: PyTree | None = None) -> tuple[PyTree, PyTree | None]:
  """The hard-mask export: physically removes the masked channels' entries (host side, concrete masks).

  Returns ``(params, model_state)`` with every producer, consumer and state axis restricted to the kept
  channels (in their original order). The sliced network computes what the masked one computes.
  Raises ``ValueError`` if a group keeps no channel.
  """
  concrete = {k: np.asarray(v).astype(bool) for k, v in masks.items()}
  for g in structure.groups:
    if g.name not in concrete or concrete[g.name].shape != (g.size,):
      raise ValueError(f"slice_params: need a [{g.size}] mask for group {g.name!r}")
    if not concrete[g.name].any():
      raise ValueError(f"slice_params: group {g.name!r} keeps no channel")

  def slicer(kind):
    entries = _entries(structure, kind)

    def one(path, leaf):
      found = entries.get(tuple(_key(k) for k in path), [])
      if not found:
        return leaf
      out = np.asarray(leaf)
      for a, name in found:
        axis = a.axis % out.ndim
        keep = concrete[name][:a.channels][_channel_index(out.shape[axis], a)]
        out = np.take(out, np.flatnonzero(keep), axis=axis)
      return jnp.asarray(out)

    return one

  new_params = jax.tree_util.tree_map_with_path(slicer("params"), params)
  new_state = None if model_state is None else jax.tree_util.tree_map_with_path(slicer("state"), model_state)
  return new_params, new_state


def channel_importance(structure: Structure, params: PyTree, *, norm: str = "l1") -> ChannelMasks:
  """Per-channel importance: the ``norm`` (``"l1"`` or ``"l2"``) of all producer entries of the channel.

  Li et al. 2017 ("Pruning Filters for Efficient ConvNets"): ``s_c = sum_{producers} ||W[..., c]||_1``.
  Channels beyond a producer's ``channels`` get no contribution from it.
  """
  if norm not in ("l1", "l2"):
    raise ValueError(f"channel_importance: norm must be 'l1' or 'l2', got {norm!r}")
  out = {}
  for g in structure.groups:
    total = jnp.zeros([g.size], jnp.float32)
    for a in g.producers:
      w = jnp.asarray(_get(params, tuple(a.path)), jnp.float32)
      w = jnp.moveaxis(w, a.axis, 0)
      length = w.shape[0]
      w = w.reshape(length // (a.channels * a.inner), a.channels, a.inner, -1)
      v = jnp.abs(w) if norm == "l1" else w * w
      total = total.at[:a.channels].add(jnp.sum(v, axis=(0, 2, 3)))
    out[g.name] = total if norm == "l1" else jnp.sqrt(total)
  return out


# ----------------------------------------------------------------------------------------------------
# Budgeted gradual channel pruning
# ----------------------------------------------------------------------------------------------------


def flops_budget_schedule(target: float, *, start_step: int, end_step: int, power: float = 3.0) -> optax.Schedule:
  """The kept-FLOPs fraction ``b_t = 1 - (1 - b) (1 - (1 - p_t)^power)``, ``p_t = clip((t - start)/(end - start), 0, 1)``.

  Zhu & Gupta 2017's gradual schedule applied to the FLOPs fraction: 1 until ``start_step``, then
  tightening fast and levelling off at ``target`` from ``end_step`` on.
  """
  if not isinstance(target, numbers.Real) or isinstance(target, bool) or not 0.0 < target <= 1.0:
    raise ValueError(f"flops_budget_schedule: target must be a fraction in (0, 1], got {target!r}")
  if not (isinstance(start_step, numbers.Integral) and isinstance(end_step, numbers.Integral)
          and 0 <= start_step < end_step):
    raise ValueError(f"flops_budget_schedule: need ints 0 <= start_step < end_step, got {start_step!r}, {end_step!r}")
  if not (isinstance(power, numbers.Real) and power > 0):
    raise ValueError(f"flops_budget_schedule: power must be > 0, got {power!r}")
  inner = optax.polynomial_schedule(init_value=0.0, end_value=1.0 - float(target), power=power,
                                    transition_steps=end_step - start_step, transition_begin=start_step)
  return lambda count: 1.0 - inner(count)


class ChannelPruningState(NamedTuple):
  """State of :func:`channel_pruning`.

  Attributes:
    count: int32, number of updates so far.
    channel_masks: ``{group: bool[size]}``, ``True`` = kept.
    masks: the same masks expanded to the parameter leaves (``None`` at untouched leaves), so that
      :func:`prox.transforms.forward_params` / ``hard_masked_params`` apply them.
    inner_state: the state of the wrapped transform.
  """
  count: jax.Array
  channel_masks: ChannelMasks
  masks: PyTree
  inner_state: optax.OptState


def _prune_to_budget(structure: Structure, scores: ChannelMasks, masks: ChannelMasks, budget: jax.Array,
                     min_channels: int) -> ChannelMasks:
  """Removes the lowest-scored channels (pruned ones first) until ``masked_flops <= budget``."""
  names = structure.names
  flat, protected = [], []
  for g in structure.groups:
    s = scores[g.name].astype(jnp.float32)
    m = masks[g.name]
    # Mean over the still-kept channels; the group's own scale is divided out.
    mean = jnp.sum(jnp.where(m, s, 0.0)) / jnp.maximum(jnp.sum(m), 1)
    s = jnp.where(m, s / jnp.maximum(mean, 1e-12), -jnp.inf)
    # Protect the min_channels best kept channels of every group.
    order = jnp.argsort(-s, stable=True)
    top = jnp.zeros([g.size], bool).at[order[:min(min_channels, g.size)]].set(True)
    flat.append(jnp.where(top, jnp.inf, s))
    protected.append(min(min_channels, g.size))
  flat_scores = jnp.concatenate(flat)
  order = jnp.argsort(flat_scores, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  sizes = [g.size for g in structure.groups]
  offsets = np.cumsum([0] + sizes)

  def masks_for(k):
    keep = ranks >= k
    return {n: keep[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}

  n_pruned = sum(jnp.sum(~masks[n]) for n in names)
  lo = n_pruned.astype(order.dtype)
  hi = jnp.asarray(order.size - sum(protected), order.dtype)
  hi = jnp.maximum(hi, lo)

  def body(carry):
    lo, hi = carry
    mid = (lo + hi) // 2
    ok = masked_flops(structure, masks_for(mid)) <= budget
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, _ = lax.while_loop(lambda c: c[0] < c[1], body, (lo, hi))
  return masks_for(lo)


def channel_pruning(
    inner: optax.GradientTransformation,
    *,
    structure: Structure,
    flops_target: float,
    start_step: int = 0,
    end_step: int = 1000,
    frequency: int = 100,
    power: float = 3.0,
    min_channels: int = 1,
    norm: str = "l1",
) -> optax.GradientTransformationExtraArgs:
  """Gradual structured (channel) pruning to a FLOPs budget around ``inner``.

  At steps ``t = start_step + k * frequency <= end_step`` (and at ``end_step``) the channel masks are
  recomputed: channels are scored by :func:`channel_importance` divided by the group's mean over its
  kept channels; already pruned channels score ``-inf`` and each group's ``min_channels`` best score
  ``+inf``; the lowest-scored channels are removed, the fewest such that
  ``masked_flops(m) <= b_t * full_flops`` with ``b_t`` from :func:`flops_budget_schedule` (binary search
  over the count, the FLOPs being non-increasing in it). Masks only shrink.

  Updates: the inner transform receives ``g * m``; the returned updates leave exactly ``m * (w + u)``
  after ``optax.apply_updates``, so pruned entries are 0 and stay 0. Use
  ``forward_params(params, state)`` or the parameters themselves in the loss; :func:`slice_params` with
  ``state.channel_masks`` exports the small network.

  Args:
    inner: the optimizer to wrap.
    structure: the channel groups and layers of ``params`` (e.g. from ``prox.models.structure_of``).
    flops_target: the kept-FLOPs fraction ``b`` in (0, 1] reached at ``end_step``.
    start_step, end_step, frequency, power: the schedule (see :func:`flops_budget_schedule`).
    min_channels: channels every group keeps at least.
    norm: ``"l1"`` or ``"l2"`` importance.
  """
  where = "channel_pruning"
  schedule = flops_budget_schedule(flops_target, start_step=start_step, end_step=end_step, power=power)
  if not isinstance(frequency, numbers.Integral) or frequency < 1:
    raise ValueError(f"{where}: frequency must be an int >= 1, got {frequency!r}")
  if not isinstance(min_channels, numbers.Integral) or min_channels < 1:
    raise ValueError(f"{where}: min_channels must be an int >= 1, got {min_channels!r}")
  if norm not in ("l1", "l2"):
    raise ValueError(f"{where}: norm must be 'l1' or 'l2', got {norm!r}")
  if not structure.ops:
    raise ValueError(f"{where}: the structure has no ops, so there are no FLOPs to budget")
  inner = optax.with_extra_args_support(inner)
  dense = float(full_flops(structure))

  def init_fn(params: PyTree) -> ChannelPruningState:
    check_structure(structure, params)
    cm = full_channel_masks(structure)
    return ChannelPruningState(jnp.zeros([], jnp.int32), cm, expand_channel_masks(structure, cm, params),
                               inner.init(params))

  def update_fn(updates: PyTree, state: ChannelPruningState, params: PyTree | None = None,
                **extra_args: Any) -> tuple[PyTree, ChannelPruningState]:
    if params is None:
      raise ValueError(f"{where}: update needs params (call tx.update(grads, state, params))")
    count = state.count
    in_range = (count >= start_step) & (count <= end_step)
    is_update = in_range & (((count - start_step) % frequency == 0) | (count == end_step))

    def new_masks():
      scores = channel_importance(structure, params, norm=norm)
      return _prune_to_budget(structure, scores, state.channel_masks, schedule(count) * dense, min_channels)

    cm = lax.cond(is_update, new_masks, lambda: state.channel_masks)
    masks = expand_channel_masks(structure, cm, params)
    grads = jax.tree.map(lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros_like(g)), updates, masks,
                         is_leaf=lambda x: x is None)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    new_updates = masking.masked_updates(new_updates, params, masks)
    return new_updates, ChannelPruningState(optax.safe_increment(count), cm, masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
