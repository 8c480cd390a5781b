"""An elastic CNN (Once-for-All) as pure functions over a parameter tree, with a traced sub-network choice.

Cai, Gan, Wang, Zhang, Han 2020, "Once-for-All: Train One Network and Specialize it for Efficient
Deployment". The network: a 3x3 conv stem (ReLU), stages of inverted-residual blocks, global average
pooling and a linear head. A block with input ``x`` (``C_in`` channels) and ``E = expand_ratio * C_in``
middle channels computes

    h = relu(x W_e + b_e)                      1x1 expand,        C_in -> E
    h = relu(dwconv_K(h) + b_d)                K x K depthwise,   stride s (2 opens stages 2, 3, ...)
    y = h W_p + b_p (+ x if s = 1 and C_in = C_out)               1x1 project, E -> C_out

A sub-network (:class:`prox.tasks.Subnet`) chooses, per block, a kernel size ``k`` and a width fraction
``r`` (keep the first ``ceil(r E)`` middle channels), and per stage a depth ``d`` (keep the first ``d``
blocks; the first block of a stage is always kept, the rest are residual). Elastic kernel (OFA Sec.
3.2): the ``k x k`` kernel is the centre of the next larger one passed through a learned ``k^2 x k^2``
kernel transformation matrix shared by the block's channels,
``W_k = reshape(M_k vec(centre_k(W_{k'})))`` for consecutive sizes ``k < k'``, starting from the stored
largest kernel; the matrices start at the identity. Elastic width: :func:`reorder_channels` sorts each
block's middle channels by importance ``||W_p[c, :]||_1`` (descending; OFA's channel re-organisation),
so that the first channels are the important ones; it leaves the full network's function unchanged.

:func:`elastic_apply` takes the choice as traced int arrays and runs, per block, ``lax.switch`` over the
(kernel, width) options and ``lax.cond`` over depth, so a step computes only the chosen sub-network
(its cost, not the full network's) and never recompiles when the choice changes. Concrete (numpy or
Python) choices are resolved at trace time. :func:`sandwich_loss` runs its sub-networks through one
``lax.map`` body. The depthwise convolution is :func:`depthwise_conv`, whose kernel gradient avoids a slow
XLA:CPU path inside conditionals. :func:`extract_subnet` materialises a static choice as a
plain small network (transformed kernels, sliced channels, dropped blocks).

:func:`sandwich_loss` is the sandwich rule (largest, smallest, random sub-network per step; Yu & Huang
2019) with in-place knowledge distillation from the full network (BigNAS-style; OFA distils from the
full network): ``L = CE(f_L) + sum_{s in (S, R)} [CE(f_s) + kd * T^2 KL(softmax(f_L/T) || softmax(f_s/T))]``
with ``f_L`` held fixed (``stop_gradient``) in the KD term.

Departures from OFA: no BatchNorm (so no per-sub-network statistics recalibration), ReLU instead of
h-swish, no squeeze-excitation, no elastic resolution, and width is elastic in every block's middle
channels (OFA's "expand ratio"), not in the stage outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

if TYPE_CHECKING:  # only for annotations: importing prox.tasks here would pull in its data loaders
  from prox.tasks._elastic_sampling import Subnet

PyTree = Any

__all__ = [
    "BlockSpec",
    "ElasticConfig",
    "depthwise_conv",
    "elastic_apply",
    "elastic_flops",
    "extract_subnet",
    "init_elastic",
    "reorder_channels",
    "sandwich_loss",
    "transformed_kernel",
]


class BlockSpec(NamedTuple):
  """Static description of one block: name, stage, index in stage, in/out/max-middle channels, stride."""
  name: str
  stage: int
  index: int
  in_channels: int
  out_channels: int
  mid_channels: int
  stride: int

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
  """The elastic network's static shape.

  Attributes:
    input_shape: ``(H, W, C)`` of one image.
    num_classes: number of logits.
    stem_channels: output channels of the 3x3 stem conv.
    stages: ``(channels, blocks, stride)`` per stage; ``blocks`` is the stage's largest depth and the
      first block of each stage has the stride.
    kernel_sizes: the elastic kernel sizes, odd and ascending (the largest is stored).
    width_fractions: the elastic width fractions of the middle channels, ascending in (0, 1], last 1.
    expand_ratio: middle channels ``E = expand_ratio * C_in`` of each block.
  """
  input_shape: tuple[int, int, int]
  num_classes: int
  stem_channels: int = 16
  stages: tuple[tuple[int, int, int], ...] = ((16, 2, 1), (24, 3, 2), (32, 3, 2))
  kernel_sizes: tuple[int, ...] = (3, 5, 7)
  width_fractions: tuple[float, ...] = (0.5, 0.75, 1.0)
  expand_ratio: int = 3

  def __post_init__(self):
    shape = self.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)):
      raise ValueError(f"ElasticConfig: input_shape must be (H, W, C) of positive ints, got {shape!r}")
    for name in ("num_classes", "stem_channels", "expand_ratio"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        raise ValueError(f"ElasticConfig: {name} must be a positive int, got {v!r}")
    if not self.stages or not all(isinstance(s, tuple) and len(s) == 3 and all(_is_int(v) and v >= 1 for v in s)
                                  for s in self.stages):
      raise ValueError(f"ElasticConfig: stages must be (channels, blocks, stride) tuples of positive ints, "
                       f"got {self.stages!r}")
    ks = self.kernel_sizes
    if not ks or not all(_is_int(k) and k >= 1 and k % 2 == 1 for k in ks) or list(ks) != sorted(set(ks)):
      raise ValueError(f"ElasticConfig: kernel_sizes must be distinct odd ints in ascending order, got {ks!r}")
    ws = self.width_fractions
    if (not ws or not all(isinstance(w, numbers.Real) and 0.0 < w <= 1.0 for w in ws)
        or list(ws) != sorted(set(ws)) or ws[-1] != 1.0):
      raise ValueError(f"ElasticConfig: width_fractions must be distinct, ascending, in (0, 1] and end at "
                       f"1.0, got {ws!r}")

  @property
  def blocks(self) -> tuple[BlockSpec, ...]:
    out, cin = [], self.stem_channels
    for s, (cout, depth, stride) in enumerate(self.stages):
      for b in range(depth):
        out.append(BlockSpec(f"stage{s + 1}_block{b + 1}", s, b, cin, cout, self.expand_ratio * cin,
                             stride if b == 0 else 1))
        cin = cout
    return tuple(out)

  @property
  def max_depths(self) -> tuple[int, ...]:
    return tuple(d for _, d, _ in self.stages)

  def mid_width(self, block: BlockSpec, width_index: int) -> int:
    """Middle channels kept at width option ``width_index``: ``max(1, ceil(r E))``."""
    r = self.width_fractions[width_index]
    return max(1, int(math.ceil(r * block.mid_channels - 1e-9)))


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _transform_key(k: int) -> str:
  return f"{k}x{k}"


def init_elastic(config: ElasticConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> PyTree:
  """He-normal kernels, zero biases, identity kernel transformation matrices."""
  kmax = config.kernel_sizes[-1]
  keys = iter(jax.random.split(key, 3 * len(config.blocks) + 2))

  def he(k, shape, fan_in):
    return (jax.random.normal(k, shape, jnp.float32) * math.sqrt(2.0 / fan_in)).astype(dtype)

  c = config.input_shape[-1]
  params = {"stem": {"kernel": he(next(keys), (3, 3, c, config.stem_channels), 9 * c),
                     "bias": jnp.zeros([config.stem_channels], dtype)}}
  blocks = {}
  for b in config.blocks:
    e = b.mid_channels
    blocks[b.name] = {
        "expand": {"kernel": he(next(keys), (b.in_channels, e), b.in_channels), "bias": jnp.zeros([e], dtype)},
        "depthwise": {"kernel": he(next(keys), (kmax, kmax, e), kmax * kmax), "bias": jnp.zeros([e], dtype),
                      "transform": {_transform_key(k): jnp.eye(k * k, dtype=dtype) for k in config.kernel_sizes[:-1]}},
        "project": {"kernel": he(next(keys), (e, b.out_channels), e), "bias": jnp.zeros([b.out_channels], dtype)},
    }
  params["blocks"] = blocks
  last = config.stages[-1][0]
  params["head"] = {"kernel": (jax.random.normal(next(keys), (last, config.num_classes)) / math.sqrt(last)).astype(dtype),
                    "bias": jnp.zeros([config.num_classes], dtype)}
  return params


def _centre(w: jax.Array, k: int) -> jax.Array:
  start = (w.shape[0] - k) // 2
  return w[start:start + k, start:start + k]


def transformed_kernel(depthwise: PyTree, kernel_index: int, config: ElasticConfig) -> jax.Array:
  """The ``k x k`` depthwise kernel of option ``kernel_index``: centre crops and transformation matrices.

  ``W <- reshape(M_k (vec centre_k(W)))`` for each size ``k`` from the largest-but-one down to the chosen
  one (``M_k`` is ``k^2 x k^2``, shared by the channels).
  """
  w = depthwise["kernel"]
  sizes = config.kernel_sizes
  for j in range(len(sizes) - 2, kernel_index - 1, -1):
    k = sizes[j]
    w = _centre(w, k)
    flat = w.reshape(k * k, -1)
    w = (depthwise["transform"][_transform_key(k)] @ flat).reshape(k, k, -1)
  return w


def _depthwise_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  return lax.conv_general_dilated(x, w[:, :, None, :].astype(x.dtype), (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """``k x k`` depthwise conv, SAME padding: ``y[b, p, q, c] = sum_ij xpad[b, s p + i, s q + j, c] w[i, j, c]``.

  ``x`` is NHWC, ``w`` is ``[k, k, C]``. The same values and gradients as ``lax.conv_general_dilated`` with
  ``feature_group_count = C``, but the kernel gradient is computed as ``k^2`` shifted multiply-reductions
  (``dW[i, j, c] = sum_{b,p,q} xpad[b, s p + i, s q + j, c] g[b, p, q, c]``): XLA:CPU runs the grouped
  weight-gradient convolution JAX emits 100x slower inside ``lax.cond`` / ``lax.switch`` branches (measured
  5.8 s vs 36 ms for the input gradient on an 8x32x32x48 batch), which the elastic forward needs.
  """
  return _depthwise_conv(x, w, stride)


def _depthwise_fwd(x, w, stride):
  return _depthwise_conv(x, w, stride), (x, w)


def _depthwise_bwd(stride, res, g):
  x, w = res
  k = w.shape[0]
  b, h, wd, c = x.shape
  oh, ow = g.shape[1:3]
  _, vjp_x = jax.vjp(lambda x: _depthwise_conv(x, w, stride), x)
  (dx,) = vjp_x(g)
  th, tw = max((oh - 1) * stride + k - h, 0), max((ow - 1) * stride + k - wd, 0)
  xp = jnp.pad(x, ((0, 0), (th // 2, th - th // 2), (tw // 2, tw - tw // 2), (0, 0)))
  sh, sw = (oh - 1) * stride + 1, (ow - 1) * stride + 1
  gf = g.astype(jnp.float32)

  def one(ij):
    win = lax.dynamic_slice(xp, (0, ij // k, ij % k, 0), (b, sh, sw, c))[:, ::stride, ::stride, :]
    return jnp.sum(win.astype(jnp.float32) * gf, axis=(0, 1, 2))

  dw = lax.map(one, jnp.arange(k * k)).reshape(k, k, c).astype(w.dtype)
  return dx, dw


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _block_forward(bp: PyTree, x: jax.Array, b: BlockSpec, kernel_index: int, e: int,
                   config: ElasticConfig) -> jax.Array:
  h = jax.nn.relu(x @ bp["expand"]["kernel"][:, :e] + bp["expand"]["bias"][:e])
  dw = {"kernel": bp["depthwise"]["kernel"][:, :, :e], "transform": bp["depthwise"]["transform"]}
  kern = transformed_kernel(dw, kernel_index, config)
  h = depthwise_conv(h, kern, b.stride)
  h = jax.nn.relu(h + bp["depthwise"]["bias"][:e])
  y = h @ bp["project"]["kernel"][:e] + bp["project"]["bias"]
  return y + x if b.residual else y


def _concrete(v: Any) -> int | None:
  if isinstance(v, jax.core.Tracer):
    return None
  return int(np.asarray(v))


def elastic_apply(params: PyTree, images: jax.Array, subnet: Subnet, *, config: ElasticConfig) -> jax.Array:
  """Logits ``[B, num_classes]`` of the sub-network ``subnet`` (traced or concrete int arrays).

  Per block, ``lax.switch`` over the ``len(kernel_sizes) * len(width_fractions)`` static variants runs
  only the chosen one; blocks past a stage's depth are skipped with ``lax.cond``. Pure and jittable;
  differentiable in ``params``.
  """
  nw = len(config.width_fractions)
  x = lax.conv_general_dilated(images, params["stem"]["kernel"].astype(images.dtype), (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jax.nn.relu(x + params["stem"]["bias"])
  for i, b in enumerate(config.blocks):
    bp = params["blocks"][b.name]
    branches = [
        (lambda bp, x, k=k, w=w, b=b: _block_forward(bp, x, b, k, config.mid_width(b, w), config))
        for k in range(len(config.kernel_sizes)) for w in range(nw)
    ]
    k_i, w_i = _concrete(subnet.kernel[i]), _concrete(subnet.width[i])
    if k_i is not None and w_i is not None:
      run = lambda bp, x, f=branches[k_i * nw + w_i]: f(bp, x)
    else:
      index = jnp.asarray(subnet.kernel[i], jnp.int32) * nw + jnp.asarray(subnet.width[i], jnp.int32)
      run = lambda bp, x, index=index, branches=branches: lax.switch(index, branches, bp, x)
    if b.index == 0:
      x = run(bp, x)
      continue
    d = _concrete(subnet.depth[b.stage])
    if d is not None:
      if b.index < d:
        x = run(bp, x)
    else:
      x = lax.cond(b.index < subnet.depth[b.stage], run, lambda bp, x: x, bp, x)
  pooled = x.mean(axis=(1, 2))
  return (pooled @ params["head"]["kernel"] + params["head"]["bias"]).astype(jnp.float32)


def reorder_channels(params: PyTree, *, config: ElasticConfig) -> PyTree:
  """Sorts each block's middle channels by ``||W_p[c, :]||_1``, descending (OFA's re-organisation).

  Permutes the expand kernel's columns and bias, the depthwise kernel's channels and bias and the
  project kernel's rows together, so the full network computes the same function. Jittable.
  """
  blocks = dict(params["blocks"])
  for b in config.blocks:
    bp = blocks[b.name]
    order = jnp.argsort(-jnp.sum(jnp.abs(bp["project"]["kernel"]), axis=1), stable=True)
    blocks[b.name] = {
        "expand": {"kernel": bp["expand"]["kernel"][:, order], "bias": bp["expand"]["bias"][order]},
        "depthwise": {"kernel": bp["depthwise"]["kernel"][:, :, order], "bias": bp["depthwise"]["bias"][order],
                      "transform": bp["depthwise"]["transform"]},
        "project": {"kernel": bp["project"]["kernel"][order], "bias": bp["project"]["bias"]},
    }
  return {**params, "blocks": blocks}


def extract_subnet(params: PyTree, subnet: Subnet, *, config: ElasticConfig) -> PyTree:
  """The plain small network of a concrete ``subnet``: kept blocks only, each with its transformed
  ``k x k`` depthwise kernel and its first ``ceil(r E)`` middle channels.

  Returns ``{"stem", "blocks": {name: {"expand", "depthwise": {"kernel": [k, k, e], "bias"}, "project"}},
  "head"}``; a block's stride and residual follow from its name and shapes as in ``config.blocks``.
  """
  blocks = {}
  for i, b in enumerate(config.blocks):
    d = int(np.asarray(subnet.depth[b.stage]))
    if b.index >= max(d, 1):
      continue
    k_i, w_i = int(np.asarray(subnet.kernel[i])), int(np.asarray(subnet.width[i]))
    e = config.mid_width(b, w_i)
    bp = params["blocks"][b.name]
    dw = {"kernel": bp["depthwise"]["kernel"][:, :, :e], "transform": bp["depthwise"]["transform"]}
    blocks[b.name] = {
        "expand": {"kernel": bp["expand"]["kernel"][:, :e], "bias": bp["expand"]["bias"][:e]},
        "depthwise": {"kernel": transformed_kernel(dw, k_i, config), "bias": bp["depthwise"]["bias"][:e]},
        "project": {"kernel": bp["project"]["kernel"][:e], "bias": bp["project"]["bias"]},
    }
  return {"stem": params["stem"], "blocks": blocks, "head": params["head"]}


def elastic_flops(subnet: Subnet, *, config: ElasticConfig) -> jax.Array:
  """MACs per example of the sub-network's convs and dense layers (float32; jittable in ``subnet``)."""
  h, w, c = config.input_shape
  total = jnp.asarray(float(h * w * 9 * c * config.stem_channels), jnp.float32)
  sizes = jnp.asarray(config.kernel_sizes, jnp.float32)
  for i, b in enumerate(config.blocks):
    in_pos = h * w
    h, w = -(-h // b.stride), -(-w // b.stride)
    mids = jnp.asarray([config.mid_width(b, j) for j in range(len(config.width_fractions))], jnp.float32)
    e = mids[jnp.asarray(subnet.width[i])]
    k = sizes[jnp.asarray(subnet.kernel[i])]
    cost = in_pos * b.in_channels * e + h * w * k * k * e + h * w * e * b.out_channels
    kept = (b.index == 0) | (b.index < jnp.asarray(subnet.depth[b.stage]))
    total = total + jnp.where(kept, cost, 0.0)
  return total + float(config.stages[-1][0] * config.num_classes)


def _soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  """``-sum_c p_c log softmax(z)_c`` per example (a small private KD helper)."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits), axis=-1)


def sandwich_loss(params: PyTree, images: jax.Array, labels: jax.Array, subnets: Sequence[Subnet], *,
                  config: ElasticConfig, kd_weight: float = 1.0, temperature: float = 1.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sandwich loss with in-place distillation: ``subnets[0]`` is the teacher (the full network).

  ``L = CE(f_0, y) + sum_{i >= 1} [CE(f_i, y) + kd_weight T^2 KL(softmax(sg(f_0)/T) || softmax(f_i/T))]``,
  means over the batch. Returns ``(L, {"loss_<i>": CE_i, "kd_<i>": KL_i})``.
  """
  if len(subnets) < 1:
    raise ValueError("sandwich_loss: need at least the teacher sub-network")
  # One traced body for all sub-networks (lax.map): a third of the compilation of three unrolled calls.
  table = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.int32) for x in xs]), *subnets)
  logits = lax.map(lambda s: elastic_apply(params, images, s, config=config), table)
  ce = jax.vmap(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits)
  target = jax.nn.softmax(lax.stop_gradient(logits[0]) / temperature)
  # KL = soft CE - entropy of the target; the entropy is constant in params.
  neg_entropy = jnp.sum(target * jnp.log(target + 1e-20), -1)
  kl = jax.vmap(lambda z: (_soft_cross_entropy(z / temperature, target) + neg_entropy).mean())(logits[1:])
  total = jnp.sum(ce) + kd_weight * temperature ** 2 * jnp.sum(kl)
  aux = {"loss_0": ce[0]}
  for i in range(1, len(subnets)):
    aux[f"loss_{i}"], aux[f"kd_{i}"] = ce[i], kl[i - 1]
  return total, aux
