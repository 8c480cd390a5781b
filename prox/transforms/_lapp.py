"""LAPP: layer-adaptive progressive pruning with learnable per-layer thresholds under a FLOPs budget.

Zhai, Guo, Liu, Xing, Xu 2023, "LAPP: Layer Adaptive Progressive Pruning for Compressing CNNs from
Scratch". Channels (filters) are scored by importance; each layer (channel group ``l``) has a learnable
threshold ``t_l``; a channel is kept when its score exceeds its layer's threshold. The thresholds are
trained with the weights by the task loss plus a FLOPs penalty against a budget that tightens during the
first epochs, so each layer finds its own pruning rate; a lightweight bypass keeps information flowing
through layers that end up very narrow. Written here as:

* score: ``s_c = ||W_c||_1 / mean_{c'} ||W_{c'}||_1`` over the group's producers (scale-free, so one
  threshold scale fits all layers), held fixed in the mask (``stop_gradient``): the thresholds, not the
  weights, move the masks;
* soft-to-hard mask: ``m_c = sigmoid(T_t (s_c - t_l))`` with a temperature rising geometrically from
  ``T_0`` to ``T_1`` over ``[start_step, end_step]`` (``T_t = T_0 (T_1/T_0)^{p_t}``), so the mask is
  smooth (gradients reach ``t_l``) early and a step function at the end; :func:`lapp_hard_masks` gives
  ``s_c > t_l`` (each group keeps at least its best channel);
* budget: the kept-FLOPs fraction ``b_t = 1 - (1 - b)(1 - (1 - p_t)^3)`` (``flops_budget_schedule``);
* penalty: ``lambda max(0, F(m)/F_full - b_t)^2`` with ``F`` the differentiable masked FLOPs
  (``masked_flops``: active channels counted as ``sum_c m_c``);
* bypass: for a pruned group between a producer layer (input ``x``) and its consumer layer (output
  ``y``), ``y <- y + x W_b`` with ``W_b`` a 1x1 conv / dense map from the producer's input channels to
  the consumer's output channels (``bypass_init`` zero-initialises it; ``bypass_apply`` applies it,
  striding like the producer); its MACs are counted by ``bypass_flops``.

Departures from the paper (whose exact formulas were not available to us): the score normalisation, the
hinge-squared penalty, the geometric temperature schedule and the bypass's placement (around the
producer-consumer pair) are our choices; the paper prunes only during the first few epochs -- set
``end_step`` accordingly and fine-tune with :func:`lapp_hard_masks` fixed (e.g. in ``channel_pruning``'s
state or via ``slice_params``).

Only jax/numpy and the sibling helper files are imported.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prox.transforms import _structured as st

PyTree = Any

__all__ = [
    "LAPP",
    "bypass_apply",
    "bypass_flops",
    "bypass_init",
    "lapp",
    "lapp_hard_masks",
    "lapp_scores",
    "lapp_soft_masks",
]


def lapp_scores(structure: st.Structure, params: PyTree, *, norm: str = "l1") -> st.ChannelMasks:
  """``s_c = imp_c / mean(imp)`` per group, ``imp`` from ``channel_importance``; no gradient."""
  imp = st.channel_importance(structure, jax.lax.stop_gradient(params), norm=norm)
  return {k: v / jnp.maximum(jnp.mean(v), 1e-12) for k, v in imp.items()}


def lapp_soft_masks(scores: st.ChannelMasks, thresholds: PyTree, temperature: jax.Array) -> st.ChannelMasks:
  """``m_c = sigmoid(T (s_c - t_l))`` for every group ``l`` (float32)."""
  return {k: jax.nn.sigmoid(temperature * (s - jnp.asarray(thresholds[k], jnp.float32))) for k, s in scores.items()}


def lapp_hard_masks(scores: st.ChannelMasks, thresholds: PyTree) -> st.ChannelMasks:
  """``s_c > t_l``, and each group keeps its highest-scored channel (bool)."""
  out = {}
  for k, s in scores.items():
    keep = s > jnp.asarray(thresholds[k], s.dtype)
    out[k] = keep.at[jnp.argmax(s)].set(True)
  return out


class LAPP(NamedTuple):
  """Pure functions of :func:`lapp` (``step`` may be traced).

  Attributes:
    init_thresholds: ``() -> {group: float32 scalar}`` (learnable; put them in the trained parameters).
    temperature: ``step -> T_t``.
    budget: ``step -> b_t`` (kept-FLOPs fraction).
    masks: ``(model_params, thresholds, step) -> soft masks`` (apply with ``apply_channel_masks``).
    penalty: ``(masks, step) -> lambda max(0, F(m)/F_full - b_t)^2``.
    hard_masks: ``(model_params, thresholds) -> bool masks`` for export / fine-tuning.
  """
  init_thresholds: Callable[[], dict[str, jax.Array]]
  temperature: Callable[[Any], jax.Array]
  budget: Callable[[Any], jax.Array]
  masks: Callable[..., st.ChannelMasks]
  penalty: Callable[..., jax.Array]
  hard_masks: Callable[..., st.ChannelMasks]


def lapp(structure: st.Structure, *, flops_target: float, start_step: int = 0, end_step: int = 1000,
         power: float = 3.0, temperature: tuple[float, float] = (1.0, 100.0), penalty_weight: float = 10.0,
         initial_threshold: float = 0.0, norm: str = "l1") -> LAPP:
  """LAPP's masks, schedules and FLOPs penalty for ``structure`` (see the module docstring).

  Usage inside the loss (``params = {"model": ..., "thresholds": lp.init_thresholds()}``)::

    m = lp.masks(params["model"], params["thresholds"], step)
    logits = apply(apply_channel_masks(structure, m, params["model"]), x)
    loss = cross_entropy(logits, y) + lp.penalty(m, step)
  """
  budget = st.flops_budget_schedule(flops_target, start_step=start_step, end_step=end_step, power=power)
  if (not isinstance(temperature, (tuple, list)) or len(temperature) != 2
      or not all(isinstance(t, numbers.Real) and t > 0 for t in temperature)):
    raise ValueError(f"lapp: temperature must be (T_0, T_1) with both > 0, got {temperature!r}")
  if not isinstance(penalty_weight, numbers.Real) or penalty_weight < 0:
    raise ValueError(f"lapp: penalty_weight must be >= 0, got {penalty_weight!r}")
  if not structure.ops:
    raise ValueError("lapp: the structure has no ops, so there are no FLOPs to budget")
  t0, t1 = float(temperature[0]), float(temperature[1])
  span = float(end_step - start_step)
  dense = float(st.full_flops(structure))

  def temp(step):
    p = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
    return t0 * (t1 / t0) ** p

  def init_thresholds():
    return {g.name: jnp.asarray(initial_threshold, jnp.float32) for g in structure.groups}

  def masks(model_params, thresholds, step):
    return lapp_soft_masks(lapp_scores(structure, model_params, norm=norm), thresholds, temp(step))

  def penalty(m, step):
    excess = st.masked_flops(structure, m) / dense - budget(step)
    return penalty_weight * jnp.square(jnp.maximum(excess, 0.0))

  def hard_masks(model_params, thresholds):
    return lapp_hard_masks(lapp_scores(structure, model_params, norm=norm), thresholds)

  return LAPP(init_thresholds, temp, lambda step: jnp.asarray(budget(step), jnp.float32), masks, penalty, hard_masks)


def bypass_init(in_channels: int, out_channels: int, *, dtype: Any = jnp.float32) -> jax.Array:
  """A zero ``[in_channels, out_channels]`` bypass kernel (the network starts as without it)."""
  return jnp.zeros([in_channels, out_channels], dtype)


def bypass_apply(kernel: jax.Array, x: jax.Array, *, stride: int = 1) -> jax.Array:
  """``x W_b`` over the channel axis, ``x`` NHWC (subsampled by ``stride`` like the producer) or ``[B, C]``."""
  if x.ndim == 4 and stride > 1:
    x = x[:, ::stride, ::stride, :]
  return x @ kernel.astype(x.dtype)


def bypass_flops(in_channels: int, out_channels: int, positions: int) -> int:
  """MACs per example of a bypass: ``positions * in_channels * out_channels``."""
  return int(positions * in_channels * out_channels)
