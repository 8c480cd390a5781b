"""Per-example gradient moments from layer taps, without per-example gradients.

For a dense layer ``y_i = W^T x_i + b`` (``x_i`` of example ``i``, possibly over positions ``t``), the
gradient of example ``i``'s loss ``l_i`` is ``dl_i/dW = sum_t x_it d_it^T`` and ``dl_i/db = sum_t d_it``
with ``d_it = dl_i/dy_it``. So (Goodfellow 2015, "Efficient per-example gradient computations"; Li et
al. 2022, "ghost norms")

    ||dl_i/dW||^2 = sum_{t,s} <x_it, x_is> <d_it, d_is>            (= ||x_i||^2 ||d_i||^2 without t),
    <dl_i/dW, G> = sum_t x_it^T G d_it,                              sum_i (dl_i/dW)^2 = sum_i (sum_t x_it d_it^T)^2,

all from the layer's inputs ``x`` and output cotangents ``d``, which one ordinary backward pass already
has. A convolution is a dense layer over patches: ``x_it`` = the input patch of output position ``t``.

How the cotangents are obtained: a tapped layer adds a zero *perturbation* ``e`` to its output,
``y + e``; the gradient of the batch's mean loss with respect to ``e`` is ``d / m`` (``m`` examples). The
step (``prox.step``, ``example_stats=...``) differentiates with respect to the parameters and the
perturbations together, so the statistics cost one pass plus O(m (in + out)) per layer for the norms.

Layers report themselves by calling :func:`dense` or :func:`conv` while a :class:`Recorder` is active;
``prox.models`` does this for ``nnx.Linear`` and ``nnx.Conv`` of any NNX model (``functional(model,
taps=True)``). With no recorder active the calls are the identity, so a tapped model runs unchanged.

Assumptions (documented, checked where possible): the loss is the unweighted mean of per-example losses
over the micro-batch (rows with weight 0, e.g. padding, contribute nothing and must be excluded from the
count); examples do not interact (no batch-norm in train mode); every parameter belongs to a tapped layer
(the step reports the fraction of parameters covered).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Tap", "Tapped", "Recorder", "ExampleStats", "recording", "active", "dense", "conv",
    "value_and_grad", "example_stats", "sq_norms", "inner_products", "diagonal", "tree_from_paths",
    "covered_size"]

PyTree = Any
Path = tuple[str, ...]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inputs"],
                   meta_fields=["kind", "kernel_path", "bias_path", "kernel_shape", "conv"])
@dataclasses.dataclass(frozen=True)
class Tap:
  """One tapped layer call (a pytree whose only array is ``inputs``).

  Attributes:
    kind: ``"dense"`` or ``"conv"``.
    inputs: ``[m, ..., in]`` (dense) or the convolution's input ``[m, *spatial, cin]``.
    kernel_path, bias_path: the parameters' paths in the model's parameter tree (``None`` for no bias).
    kernel_shape: shape of the kernel.
    conv: for convolutions, ``(window_strides, padding, lhs_dilation, rhs_dilation, groups)`` as
      ``lax.conv_general_dilated_patches`` takes them.
  """
  kind: str
  inputs: Any
  kernel_path: Path
  bias_path: Path | None
  kernel_shape: tuple[int, ...]
  conv: tuple | None = None

  def _replace(self, **changes: Any) -> Tap:
    return dataclasses.replace(self, **changes)


class Recorder:
  """Collects the taps of one forward pass. ``perturbations`` (by call order) are added to the layers'
  outputs; ``None`` records output shapes only (discovery)."""

  def __init__(self, perturbations: Sequence[jax.Array] | None = None):
    self.perturbations = perturbations
    self.taps: list[Tap] = []
    self.output_shapes: list[tuple[tuple[int, ...], Any]] = []

  def add(self, tap: Tap, outputs: jax.Array) -> jax.Array:
    i = len(self.taps)
    self.taps.append(tap)
    self.output_shapes.append((outputs.shape, outputs.dtype))
    if self.perturbations is None:
      return outputs
    if i >= len(self.perturbations):
      raise ValueError("a tapped forward pass called more layers than its discovery pass")
    return outputs + self.perturbations[i].astype(outputs.dtype)


_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("prox_taps", default=None)


@contextlib.contextmanager
def recording(recorder: Recorder):
  """Makes ``recorder`` receive the taps of the layers called inside the block (while tracing)."""
  token = _ACTIVE.set(recorder)
  try:
    yield recorder
  finally:
    _ACTIVE.reset(token)


def active() -> bool:
  return _ACTIVE.get() is not None


def dense(inputs: jax.Array, outputs: jax.Array, *, kernel_path: Path, bias_path: Path | None,
          kernel_shape: tuple[int, ...]) -> jax.Array:
  """Reports a dense layer ``outputs = inputs @ kernel + bias`` (over the last axis); returns the
  outputs (plus the recorder's perturbation)."""
  rec = _ACTIVE.get()
  if rec is None:
    return outputs
  return rec.add(Tap("dense", inputs, tuple(kernel_path), bias_path and tuple(bias_path),
                     tuple(kernel_shape)), outputs)


def conv(inputs: jax.Array, outputs: jax.Array, *, kernel_path: Path, bias_path: Path | None,
         kernel_shape: tuple[int, ...], window_strides: Sequence[int], padding: Any,
         lhs_dilation: Sequence[int], rhs_dilation: Sequence[int], groups: int = 1) -> jax.Array:
  """Reports a convolution (channels last, kernel ``(*window, cin, cout)``) as a dense layer over its
  input patches; arguments as ``lax.conv_general_dilated`` takes them."""
  rec = _ACTIVE.get()
  if rec is None:
    return outputs
  if groups != 1:
    raise NotImplementedError("taps of grouped convolutions")
  spec = (tuple(window_strides), padding, tuple(lhs_dilation), tuple(rhs_dilation), groups)
  return rec.add(Tap("conv", inputs, tuple(kernel_path), bias_path and tuple(bias_path),
                     tuple(kernel_shape), spec), outputs)


# --- per-example statistics ---------------------------------------------------------------------------

def _features(tap: Tap) -> jax.Array:
  """The layer's inputs as ``[m, T, fan_in]`` with ``fan_in`` in the kernel's row order."""
  x = tap.inputs
  if tap.kind == "dense":
    return x.reshape(x.shape[0], -1, x.shape[-1])
  strides, padding, lhs_dil, rhs_dil, _ = tap.conv
  window = tap.kernel_shape[:-2]
  nd = len(window)
  if all(d == 1 for d in tuple(lhs_dil) + tuple(rhs_dil)):
    return _patches_by_slicing(x, window, strides, padding)
  spatial = "".join("DHW"[3 - nd:])
  dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  patches = lax.conv_general_dilated_patches(
      x, window, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, dimension_numbers=dn)
  # Patch features come channel-major (cin, *window); the kernel's rows are (*window, cin).
  cin = x.shape[-1]
  m = patches.shape[0]
  p = patches.reshape(m, -1, cin, math.prod(window))
  return jnp.swapaxes(p, -1, -2).reshape(m, p.shape[1], -1)


def _patches_by_slicing(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Any) -> jax.Array:
  """Input patches of an undilated convolution from ``prod(window)`` strided slices: memory traffic
  only (``conv_general_dilated_patches`` is a convolution with an identity kernel, fan_in times the
  layer's own multiply-adds)."""
  spatial = x.shape[1:-1]
  pads = lax.padtype_to_pads(spatial, window, strides, padding) if isinstance(padding, str) else padding
  x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
  out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(spatial, pads, window, strides)]
  slices = []
  for offset in np.ndindex(*window):
    index = (slice(None),) + tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides))
    slices.append(x[index])          # [m, *out, cin] for this kernel offset
  patches = jnp.stack(slices, axis=-2)  # [m, *out, prod(window), cin]: the kernel's (*window, cin) order
  return patches.reshape(x.shape[0], math.prod(out), -1)


def _cotangents(delta: jax.Array) -> jax.Array:
  return delta.reshape(delta.shape[0], -1, delta.shape[-1])


def _layers(taps: Sequence[Tap], deltas: Sequence[jax.Array]) -> list[tuple[Tap, jax.Array, jax.Array]]:
  """``(tap, x [m, T, fan_in], d [m, T, fan_out])`` per parameter: the calls of a layer used several times
  (weight tying, an iterative model) are one layer whose positions are all its calls' positions, since
  its per-example gradient sums over them. Computation in float32 (float64 for float64 inputs)."""
  groups: dict[Path, list[tuple[Tap, jax.Array]]] = {}
  for tap, delta in zip(taps, deltas):
    groups.setdefault(tap.kernel_path, []).append((tap, delta))
  out = []
  for calls in groups.values():
    dtype = jnp.promote_types(calls[0][0].inputs.dtype, jnp.float32)
    x = jnp.concatenate([_features(t).astype(dtype) for t, _ in calls], axis=1)
    d = jnp.concatenate([_cotangents(delta).astype(dtype) for _, delta in calls], axis=1)
    out.append((calls[0][0], x, d))
  return out


def sq_norms(taps: Sequence[Tap], deltas: Sequence[jax.Array]) -> jax.Array:
  """``[m]``: ``||dL/dtheta restricted to example i||^2`` summed over the tapped layers, where
  ``deltas[k]`` is the cotangent of tap ``k``'s output (for the loss that was differentiated)."""
  total = 0.0
  for tap, x, d in _layers(taps, deltas):
    if x.shape[1] == 1:
      kernel = jnp.sum(x[:, 0] ** 2, -1) * jnp.sum(d[:, 0] ** 2, -1)
    else:
      # sum_{t,s} <x_t, x_s> <d_t, d_s>, or the per-example gradient itself when that is smaller.
      t, fan_in, fan_out = x.shape[1], x.shape[2], d.shape[2]
      if t * t * (fan_in + fan_out) <= 2 * t * fan_in * fan_out:
        kernel = jnp.sum(jnp.einsum("mti,msi->mts", x, x) * jnp.einsum("mto,mso->mts", d, d), (1, 2))
      else:
        kernel = jnp.sum(jnp.einsum("mti,mto->mio", x, d) ** 2, (1, 2))
    bias = jnp.sum(jnp.sum(d, 1) ** 2, -1) if tap.bias_path is not None else 0.0
    total = total + kernel + bias
  return total


def inner_products(taps: Sequence[Tap], deltas: Sequence[jax.Array], direction: PyTree) -> jax.Array:
  """``[m]``: ``<dL/dtheta restricted to example i, v>`` for ``v = direction`` (a tree like the params)."""
  total = 0.0
  for tap, x, d in _layers(taps, deltas):
    w = _at(direction, tap.kernel_path).astype(x.dtype).reshape(x.shape[-1], d.shape[-1])
    total = total + jnp.einsum("mti,io,mto->m", x, w, d)
    if tap.bias_path is not None:
      total = total + jnp.einsum("mto,o->m", d, _at(direction, tap.bias_path).astype(x.dtype))
  return total


def diagonal(taps: Sequence[Tap], deltas: Sequence[jax.Array], weights: jax.Array) -> dict[Path, jax.Array]:
  """``sum_i w_i (dL/dtheta restricted to example i)^2`` per tapped parameter, by path."""
  out: dict[Path, jax.Array] = {}
  for tap, x, d in _layers(taps, deltas):
    w = weights.astype(x.dtype)
    if x.shape[1] == 1:
      g2 = jnp.einsum("m,mi,mo->io", w, x[:, 0] ** 2, d[:, 0] ** 2)
    else:
      g2 = jnp.einsum("m,mio->io", w, jnp.einsum("mti,mto->mio", x, d) ** 2)
    out[tap.kernel_path] = g2.reshape(tap.kernel_shape)
    if tap.bias_path is not None:
      out[tap.bias_path] = jnp.einsum("m,mo->o", w, jnp.sum(d, 1) ** 2)
  return out


class ExampleStats(NamedTuple):
  """Per-example gradient moments of a batch, without per-example gradients. ``G_i`` is the gradient of
  example ``i``'s loss ``l_i`` (the batch loss being their mean), ``N = count``.

  Attributes:
    count: N.
    sq_norm_sum: ``sum_i ||G_i||^2`` (``"norm"``), else ``None``.
    inner_sum, inner_sq_sum: ``sum_i <G_i, v>``, ``sum_i <G_i, v>^2`` for a direction ``v`` (the mean
      gradient in ``prox.step``; ``"inner"``), else ``None``.
    diag_sum: ``sum_i G_i**2`` elementwise, a tree like the params (``"diag"``; parameters no tap covers
      hold zeros), else ``None``.
    covered: the fraction of the parameters the taps cover.
  """
  count: jax.Array
  sq_norm_sum: jax.Array | None = None
  inner_sum: jax.Array | None = None
  inner_sq_sum: jax.Array | None = None
  diag_sum: PyTree | None = None
  covered: jax.Array | float = 1.0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["taps", "deltas"], meta_fields=["count"])
@dataclasses.dataclass(frozen=True)
class Tapped:
  """What a tapped backward pass leaves (a pytree): the taps (with inputs) and their output cotangents,
  for a loss that is the mean over ``count`` examples."""
  taps: list[Tap]
  deltas: list[jax.Array]
  count: int


STATS = ("norm", "inner", "diag")


def value_and_grad(fun: Callable, *, has_aux: bool = False, axis_name: str | None = None) -> Callable:
  """Like ``jax.value_and_grad(fun, has_aux=has_aux)`` (first argument), also returning :class:`Tapped`.

  ``fun(params, *args)`` must run a tapped model (``prox.models.functional`` taps ``nnx.Linear`` and
  ``nnx.Conv``) and return the mean loss over the batch. The returned function gives
  ``(value_or_(value, aux), grads, tapped)``; pass ``tapped`` to :func:`example_stats`. Inside a
  ``shard_map`` give the mesh axis name(s) the batch is split over (``axis_name``): the zero
  perturbations are then per-device values, so their cotangents are this device's (see ``prox.step``).
  """

  def wrapped(params, *args):
    discovery = Recorder()
    with recording(discovery):   # a new function object: eval_shape caches traces by function
      jax.eval_shape(lambda *a: fun(*a), params, *args)
    if not discovery.taps:
      raise ValueError("per-example statistics need a model whose layers are tapped "
                       "(prox.models.functional taps nnx.Linear and nnx.Conv); the loss called none")
    meta = [t._replace(inputs=None) for t in discovery.taps]
    count = int(discovery.taps[0].inputs.shape[0])

    def tapped_fun(p, perturbations, *a):
      rec = Recorder(perturbations)
      with recording(rec):
        out = fun(p, *a)
      value, aux = out if has_aux else (out, None)
      return value, (aux, [t.inputs for t in rec.taps])

    zeros = [jnp.zeros(shape, dtype) for shape, dtype in discovery.output_shapes]
    if axis_name is not None:
      names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
      zeros = [lax.pcast(z, names, to="varying") for z in zeros]
    (value, (aux, inputs)), (grads, deltas) = jax.value_and_grad(
        tapped_fun, argnums=(0, 1), has_aux=True)(params, zeros, *args)
    tapped = Tapped([t._replace(inputs=x) for t, x in zip(meta, inputs)], deltas, count)
    return ((value, aux) if has_aux else value), grads, tapped

  return wrapped


def example_stats(tapped: Tapped, params: PyTree, which: Sequence[str] = ("norm",), *,
                  direction: PyTree | None = None) -> ExampleStats:
  """The per-example moments ``which`` (of :data:`STATS`) of a tapped pass over ``tapped.count``
  examples; ``"inner"`` needs ``direction`` (a tree like ``params``, e.g. the mean gradient)."""
  unknown = sorted(set(which) - set(STATS))
  if unknown:
    raise ValueError(f"unknown statistics {unknown}; known: {', '.join(STATS)}")
  m = tapped.count
  out = {}
  if "norm" in which:
    out["sq_norm_sum"] = jnp.sum(sq_norms(tapped.taps, tapped.deltas)) * (m * m)
  if "diag" in which:
    diag = diagonal(tapped.taps, tapped.deltas, jnp.full((m,), float(m * m), jnp.float32))
    out["diag_sum"] = tree_from_paths(params, diag)
  if "inner" in which:
    if direction is None:
      raise ValueError("the 'inner' statistics need a direction (e.g. the mean gradient)")
    products = inner_products(tapped.taps, tapped.deltas, direction) * m
    out["inner_sum"], out["inner_sq_sum"] = jnp.sum(products), jnp.sum(products * products)
  total = sum(x.size for x in jax.tree.leaves(params))
  return ExampleStats(count=m, covered=covered_size(tapped.taps) / max(total, 1), **out)


def tree_from_paths(like: PyTree, values: dict) -> PyTree:
  """A float32 tree like ``like`` holding ``values[path]`` at those paths and zeros elsewhere."""
  def leaf(path, x):
    key = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path)
    v = values.get(key)
    return jnp.zeros(x.shape, jnp.float32) if v is None else v.astype(jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, like)


def _at(tree: PyTree, path: Path) -> jax.Array:
  node = tree
  for key in path:
    node = node[key]
  return node


def covered_size(taps: Sequence[Tap]) -> int:
  """Number of parameters the taps cover (each parameter once)."""
  seen: dict[Path, int] = {}
  for tap in taps:
    seen[tap.kernel_path] = math.prod(tap.kernel_shape)
    if tap.bias_path is not None:
      seen[tap.bias_path] = tap.kernel_shape[-1]
  return sum(seen.values())
