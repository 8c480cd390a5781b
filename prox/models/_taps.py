"""Tapped ``nnx.Linear`` and ``nnx.Conv``: the layers report their inputs to ``prox.taps``.

``tap_layers(model)`` returns a copy of any NNX model whose ``nnx.Linear`` and ``nnx.Conv`` layers
(same parameters, same outputs) also call ``prox.taps.dense`` / ``prox.taps.conv`` with their parameter
paths, so that a step with ``example_stats`` gets per-example gradient moments of the model without
per-example gradients (see ``prox.taps``). Outside a recording the tapped layers are the plain ones.
"""
from __future__ import annotations

from typing import Any

from flax import nnx
from jax import lax
from flax.nnx.nn.linear import canonicalize_padding

from prox import taps


def _tuple(value: Any, n: int) -> tuple[int, ...]:
  if value is None:
    value = 1
  return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


class TappedLinear(nnx.Linear):
  """``nnx.Linear`` that reports ``(inputs, outputs)`` to an active ``prox.taps`` recorder."""

  def __call__(self, inputs, out_sharding=None):
    outputs = super().__call__(inputs, out_sharding=out_sharding)
    if not taps.active():
      return outputs
    path = tuple(self._prox_path)
    return taps.dense(inputs, outputs, kernel_path=path + ("kernel",),
                      bias_path=path + ("bias",) if self.bias is not None else None,
                      kernel_shape=tuple(self.kernel.shape))


class TappedConv(nnx.Conv):
  """``nnx.Conv`` that reports ``(inputs, outputs)`` to an active ``prox.taps`` recorder."""

  def __call__(self, inputs, out_sharding=None):
    outputs = super().__call__(inputs, out_sharding=out_sharding)
    if not taps.active():
      return outputs
    n = len(self.kernel_size)
    padding = canonicalize_padding(self.padding, n)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL") or inputs.ndim != n + 2:
      raise NotImplementedError(f"taps of a convolution with padding {self.padding!r} on inputs of "
                                f"shape {inputs.shape}")
    path = tuple(self._prox_path)
    # The values the layer computed with, so that prox.taps may recompute the outputs with a backward
    # pass that forms per-example kernel gradients (not for custom convolution functions or output types).
    kernel = bias = None
    if (getattr(self, "conv_general_dilated", None) is lax.conv_general_dilated
        and getattr(self, "preferred_element_type", None) is None and out_sharding is None):
      kernel = self.kernel[...]
      if self.mask is not None:
        kernel = kernel * self.mask
      bias = self.bias[...] if self.bias is not None else None
      inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return taps.conv(inputs, outputs, kernel_path=path + ("kernel",),
                     bias_path=path + ("bias",) if self.bias is not None else None,
                     kernel_shape=tuple(self.kernel.shape), window_strides=_tuple(self.strides, n),
                     padding=padding, lhs_dilation=_tuple(self.input_dilation, n),
                     rhs_dilation=_tuple(self.kernel_dilation, n), groups=self.feature_group_count,
                     kernel=kernel, bias=bias, precision=self.precision)


_TAPPED = {nnx.Linear: TappedLinear, nnx.Conv: TappedConv}


def tap_layers(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` whose ``nnx.Linear``/``nnx.Conv`` layers are tapped (``model`` is unchanged)."""
  model = nnx.clone(model)
  for path, module in nnx.iter_modules(model):
    tapped = _TAPPED.get(type(module))
    if tapped is not None:
      module.__class__ = tapped
      module._prox_path = tuple(str(p) if not isinstance(p, int) else p for p in path)
  return model
