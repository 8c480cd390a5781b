"""N:M structured sparsity with progressive gradient flow (SR-STE, MdGf, SdGf) as an optax wrapper.

Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers"
(reference: abhibambhaniya/progressive_gradient_flow_nm_sparsity); SR-STE from Zhou et al. 2021,
"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch".

In every group of ``M`` consecutive weights along one axis (default: the input dimension, ``-2`` for
flax's ``[in, out]`` and ``[h, w, in, out]`` kernels) the ``N`` of largest ``|w|`` are kept. The mask is
recomputed every step from the dense weights. The forward pass uses

    w_fwd = w * (m + (1 - m) * beta_t)

and the dense weights receive the straight-through gradient ``dL/dw = dL/dw_fwd`` (plus
``lambda * (1 - m) * w`` for SR-STE). The wrapper :func:`nm_sparsity` keeps ``count``, ``beta`` and the
masks of the *current* parameters in its state, so that ``forward_params(params, state)`` is a pure
function of the parameters and the optimizer state::

    tx = nm_sparsity(optax.adam(1e-3), 1, 8, method="mdgf", decay="linear", total_steps=T)
    state = tx.init(params)
    grads = jax.grad(lambda p: loss(forward_params(p, state), batch))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

In an epoch loop, ``total_steps=training_steps(num_epochs=E, num_examples=N, batch_size=B)``, and the
warm-up / fine-tune phases may be given as fractions of it (``warmup_steps=0.1``). A run budgeted in
examples (a growing batch) counts the schedule in samples instead: ``clock="samples"`` with
``total_samples`` (and ``warmup_samples`` / ``finetune_samples``) reads the ``samples`` extra argument of
``update`` (examples consumed before the step; ``prox.step`` passes it). By default every leaf with
``ndim >= 2`` that can be grouped along ``axis`` is sparse (:func:`nm_filter`); the others, such as a first
convolution with one input channel, stay dense and ``init`` warns naming them.

Only jax/optax/numpy and the sibling helper files are imported, so these files can be copied into other
optax code.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from prox.transforms import filters as filters_lib

PyTree = Any
Stages = tuple[tuple[int, int], ...]

__all__ = [
    "CLOCKS",
    "METHODS",
    "DECAYS",
    "STATIC_ARGS",
    "NMSchedule",
    "NMSparsityState",
    "nm_mask",
    "nm_masks",
    "nm_schedule",
    "nm_filter",
    "nm_skipped",
    "nm_sparsity",
    "structure_stages",
    "training_steps",
]

METHODS = ("dense", "srste", "mdgf", "sdgf")
# Arguments that fix shapes or the schedule and must stay Python values under optax.inject_hyperparams:
# ``optax.inject_hyperparams(nm_sparsity, static_args=STATIC_ARGS)(...)``; srste_lambda and decay_coef
# may be injected.
STATIC_ARGS = ("n", "m", "total_steps", "warmup_steps", "finetune_steps", "axis", "decay_end", "floor",
               "total_samples", "warmup_samples", "finetune_samples")
DECAYS = ("linear", "exp", "step")
# What the schedule counts: optimizer updates, or training examples (the ``samples`` extra argument).
CLOCKS = ("steps", "samples")
_MAX_SAMPLES = 2**31 - 1   # the sample clock is int32, like ``prox.step.TrainState.samples``
_IMPLS = ("auto", "count", "select", "sort")


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def _grouped(a: jax.Array, m: int, axis: int) -> jax.Array:
  """Reshapes ``a`` so that axis ``axis + 1`` indexes the position inside each group of ``m`` (no transpose)."""
  shape = a.shape
  return a.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])


def _iota(m: int, ndim: int, dim: int) -> jax.Array:
  return jnp.arange(m, dtype=jnp.int32).reshape([m if d == dim else 1 for d in range(ndim)])


def _mask_count(g: jax.Array, n: int, m: int, k: int) -> jax.Array:
  """Keep i iff rank_i < n, rank_i = #{j: a_j > a_i} + #{j < i: a_j == a_i} (O(m^2) compares, no sort)."""
  ai = jnp.expand_dims(g, k + 1)
  aj = jnp.expand_dims(g, k)
  ii = _iota(m, ai.ndim, k)
  jj = _iota(m, ai.ndim, k + 1)
  before = (aj > ai) | ((aj == ai) & (jj < ii))
  return jnp.sum(before, axis=k + 1, dtype=jnp.int32) < n


def _mask_select(g: jax.Array, n: int, m: int, k: int) -> jax.Array:
  """n rounds of argmax over the not-yet-kept entries (argmax returns the lowest index among equals)."""
  pos = _iota(m, g.ndim, k)
  keep = jnp.zeros(g.shape, jnp.bool_)
  lowest = jnp.array(-jnp.inf, g.dtype)
  for _ in range(n):
    idx = jnp.argmax(jnp.where(keep, lowest, g), axis=k, keepdims=True)
    keep = keep | (idx == pos)
  return keep


def _mask_sort(g: jax.Array, n: int, m: int, k: int) -> jax.Array:
  order = jnp.argsort(g, axis=k, descending=True, stable=True)
  ranks = jnp.argsort(order, axis=k)
  return ranks < n


def _auto_impl(n: int, m: int) -> str:
  # Measured with benchmarks/nm_step_overhead.py --masks (784-1024-1024 kernels): on CPU the rank count
  # wins for m <= 8 and n rounds of argmax for n == 1 or n <= 4 with larger m, sorting small groups is
  # 10-100x slower; on an H200 count and select are within 0.1 ms of each other and sort is 2-7x slower.
  if n == 1:
    return "select"
  if m <= 8:
    return "count"
  if n <= 4:
    return "select"
  return "count"


def _static_int(where: str, name: str, v: Any, minimum: int = 0) -> int:
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise TypeError(f"{where}: {name} must be a static Python int (with optax.inject_hyperparams pass "
                    f"static_args=prox.transforms.nm.STATIC_ARGS); got {v!r}")
  if v < minimum:
    raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {v!r}")
  return int(v)


def _check_nm(n: Any, m: Any, what: str = "nm") -> tuple[int, int]:
  n, m = _static_int(what, "n", n), _static_int(what, "m", m)
  if not 1 <= n < m:
    raise ValueError(f"{what}: need 1 <= N < M, got N={n}, M={m}")
  return n, m


def _norm_axis(axis: int, ndim: int, where: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{where}: axis {axis} is out of range for a {ndim}-D leaf")
  return axis % ndim


def nm_mask(w: jax.Array, n: int, m: int, *, axis: int = -2, impl: str = "auto",
            name: str | None = None) -> jax.Array:
  """The N:M mask of ``w``: in each group of ``m`` consecutive entries along ``axis`` keep the ``n`` largest ``|w|``.

  ``mask[g, i] = rank_g(|w_i|) < n`` where ties are broken by position (the lower index is kept), so the
  mask is deterministic and every group keeps exactly ``n``. Returns a bool array shaped like ``w``.
  ``impl`` chooses the algorithm ("count": pairwise rank count, "select": ``n`` rounds of argmax,
  "sort": stable argsort; "auto" picks the fastest measured one). Raises ``ValueError`` if
  ``w.shape[axis]`` is not divisible by ``m``.
  """
  n, m = _check_nm(n, m, "nm_mask")
  if impl not in _IMPLS:
    raise ValueError(f"nm_mask: unknown impl {impl!r}; expected one of {_IMPLS}")
  where = f"nm_mask: leaf {name!r}" if name else "nm_mask"
  ax = _norm_axis(axis, w.ndim, where)
  if w.shape[ax] % m:
    raise ValueError(f"{where} with shape {tuple(w.shape)} has {w.shape[ax]} entries along axis {ax}, not "
                     f"divisible by M={m}")
  impl = _auto_impl(n, m) if impl == "auto" else impl
  g = _grouped(jnp.abs(w), m, ax)
  fn = {"count": _mask_count, "select": _mask_select, "sort": _mask_sort}[impl]
  return fn(g, n, m, ax + 1).reshape(w.shape)


def nm_masks(params: PyTree, n: int, m: int, *, axis: int = -2, filter: filters_lib.FilterLike = None,
             impl: str = "auto") -> PyTree:
  """:func:`nm_mask` of every selected leaf; ``None`` at the leaves ``filter`` does not select."""
  return filters_lib.map_selected(
      lambda path, w: nm_mask(w, n, m, axis=axis, impl=impl, name=filters_lib.path_str(path)), params, filter)


def nm_filter(m: Union[int, Sequence[int]], *, axis: int = -2) -> filters_lib.Filter:
  """The default selection of :func:`nm_sparsity`: leaves with ``ndim >= 2`` that can be split into groups of ``m``.

  Selects a leaf iff ``ndim >= 2`` and ``shape[axis]`` is divisible by every ``M`` in ``m`` (an int or the
  ``M`` of each structure stage), i.e. by their least common multiple. A leaf for which ``axis`` is out of
  range is selected, so that :func:`nm_mask` reports the bad axis instead of the leaf silently staying dense.
  The first convolution of an image model (``[3, 3, 1 or 3, C]``: 1 or 3 input channels) is the usual
  leaf this leaves dense.
  """
  ms = (m,) if isinstance(m, numbers.Integral) else tuple(m)
  if not ms:
    raise ValueError("nm_filter: m is empty")
  lcm = math.lcm(*(_static_int("nm_filter", "m", mi, 2) for mi in ms))
  axis = _static_int("nm_filter", "axis", axis, -(2**31))

  def f(path: Any, leaf: Any) -> bool:
    shape = getattr(leaf, "shape", None)
    if shape is None or len(shape) < 2:
      return False
    if not -len(shape) <= axis < len(shape):
      return True
    return shape[axis] % lcm == 0

  return f


def nm_skipped(params: PyTree, m: Union[int, Sequence[int]], *, axis: int = -2) -> list[str]:
  """The leaves :func:`nm_filter` leaves dense, one line each: ``"conv1/kernel (3, 3, 1, 32): 1 entry along axis 2"``.

  These are the leaves with ``ndim >= 2`` whose ``axis`` length is not divisible by ``M`` (the least common
  multiple of ``m``). :func:`nm_sparsity` with the default ``filter`` warns with this list at ``init``.
  """
  ms = (m,) if isinstance(m, numbers.Integral) else tuple(m)
  keep = nm_filter(ms, axis=axis)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) >= 2 and not keep(path, leaf):
      ax = axis % len(shape)
      entries = "entry" if shape[ax] == 1 else "entries"
      out.append(f"{filters_lib.path_str(path)} {shape}: {shape[ax]} {entries} along axis {ax}")
  return out


def _check_default_selection(params: PyTree, ms: tuple[int, ...], axis: int) -> None:
  """Warns about the leaves the default filter leaves dense; raises if it leaves every candidate dense."""
  skipped = nm_skipped(params, ms, axis=axis)
  if not skipped:
    return
  lcm = math.lcm(*ms)
  what = f"not divisible by M={lcm}"
  if not filters_lib.selected_paths(params, nm_filter(ms, axis=axis)):
    raise ValueError(f"nm_sparsity: no leaf can be made N:M sparse along axis {axis}: "
                     f"{'; '.join(skipped)}, {what}; choose another axis or pad the layers")
  warnings.warn(
      f"nm_sparsity: the default filter keeps {len(skipped)} leaf/leaves dense, {what}: {'; '.join(skipped)}. "
      "Pass filter= (e.g. prox.transforms.dense_kernels()) to choose the sparse leaves yourself.",
      UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------


def structure_stages(n: int, m: int, kind: Union[str, Sequence[tuple[int, int]]] = "stepwise") -> Stages:
  """The N:M stages of structure decay (SdGf), ending at ``n:m``.

  - ``"stepwise"``: ``(m-1):m``, then ``m/2:m``, ``m/4:m``, ... while larger than ``n``, then ``n:m``
    (1:8 -> 7:8, 4:8, 2:8, 1:8; 1:16 -> 15:16, 8:16, 4:16, 2:16, 1:16 as in the reference).
  - ``"geometric"``: ``(n 2^k):(m 2^k)`` for ``k = K..0`` with ``K + 1`` the number of stepwise stages
    (1:8 -> 8:64, 4:32, 2:16, 1:8): the density is fixed and the groups shrink.
  - a sequence of ``(n, m)`` pairs, used as given.
  """
  n, m = _check_nm(n, m, "structure_stages")
  if isinstance(kind, str):
    ns = [m - 1]
    k = 1
    while m >> k > n:
      ns.append(m >> k)
      k += 1
    ns.append(n)
    stepwise = tuple(dict.fromkeys(ns))  # keeps order, drops repeats (e.g. 1:2 -> (1,))
    if kind == "stepwise":
      return tuple((ni, m) for ni in stepwise)
    if kind == "geometric":
      big_k = len(stepwise) - 1
      return tuple((n << j, m << j) for j in range(big_k, -1, -1))
    raise ValueError(f"structure_stages: unknown structure {kind!r}; expected 'stepwise', 'geometric' or a list "
                     "of (n, m) pairs")
  stages = tuple((int(a), int(b)) for a, b in kind)
  if not stages:
    raise ValueError("structure_stages: the list of (n, m) stages is empty")
  for a, b in stages:
    _check_nm(a, b, "structure_stages")
  return stages


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _length_or_fraction(name: str, v: Any, total: int | None, unit: str) -> int:
  """A phase length in ``unit`` (steps or samples): an int, or a float ``f`` in ``[0, 1)``: ``round(f * total)``."""
  if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
    if not 0.0 <= v < 1.0:
      raise ValueError(f"nm_sparsity: {name}={v!r} is a float, i.e. a fraction of total_{unit}, and must lie in "
                       "[0, 1); give an int for a number of " + unit)
    if total is None:
      raise ValueError(f"nm_sparsity: {name}={v!r} is a fraction of training and needs total_{unit}")
    return int(round(float(v) * total))
  return _static_int("nm_sparsity", name, v)


def _is_zero(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == 0


def _clock_phases(clock: str, total_steps: Any, warmup_steps: Any, finetune_steps: Any, total_samples: Any,
                  warmup_samples: Any, finetune_samples: Any) -> tuple[Any, Any, Any]:
  """``(total, warmup, finetune)`` of the chosen clock; the other clock's arguments must be left unset."""
  if clock not in CLOCKS:
    raise ValueError(f"nm_sparsity: unknown clock {clock!r}; expected one of {CLOCKS}")
  ours = (total_steps, warmup_steps, finetune_steps) if clock == "steps" else (
      total_samples, warmup_samples, finetune_samples)
  other = "samples" if clock == "steps" else "steps"
  theirs = (total_samples, warmup_samples, finetune_samples) if clock == "steps" else (
      total_steps, warmup_steps, finetune_steps)
  for name, v in zip(("total", "warmup", "finetune"), theirs):
    if not (v is None if name == "total" else _is_zero(v)):
      hint = (f"give {name}_{clock} (clock={clock!r} counts {clock})" if clock == "samples"
              else "pass clock='samples'")
      raise ValueError(f"nm_sparsity: {name}_{other}={v!r} belongs to the {other} clock; {hint}")
  return ours


def training_steps(*, num_epochs: int, steps_per_epoch: int | None = None, num_examples: int | None = None,
                   batch_size: int | None = None, drop_remainder: bool = True) -> int:
  """The number of optimizer steps of an epoch loop: ``num_epochs * steps_per_epoch``.

  Give ``steps_per_epoch``, or ``num_examples`` and ``batch_size``: then ``steps_per_epoch =
  floor(num_examples / batch_size)`` with ``drop_remainder`` (the last, partial batch is skipped, as in
  ``tf.data``'s ``batch(..., drop_remainder=True)``) and ``ceil(num_examples / batch_size)`` without. The
  result is what ``total_steps`` of :func:`nm_sparsity` (and the ``end_step`` of other schedules) expects::

    total = training_steps(num_epochs=10, num_examples=len(train), batch_size=128)
    tx = nm_sparsity(optax.adam(1e-3), 2, 4, total_steps=total, warmup_steps=0.1, finetune_steps=0.2)
  """
  where = "training_steps"
  num_epochs = _static_int(where, "num_epochs", num_epochs, 1)
  if steps_per_epoch is not None:
    if num_examples is not None or batch_size is not None:
      raise ValueError(f"{where}: give steps_per_epoch or num_examples and batch_size, not both")
    per_epoch = _static_int(where, "steps_per_epoch", steps_per_epoch, 1)
  else:
    if num_examples is None or batch_size is None:
      raise ValueError(f"{where}: give steps_per_epoch, or num_examples and batch_size")
    num_examples = _static_int(where, "num_examples", num_examples, 1)
    batch_size = _static_int(where, "batch_size", batch_size, 1)
    per_epoch = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
    if per_epoch == 0:
      raise ValueError(f"{where}: batch_size={batch_size} exceeds num_examples={num_examples}, so with "
                       "drop_remainder=True an epoch has no step")
  return num_epochs * per_epoch


class NMSchedule(NamedTuple):
  """The schedule of :func:`nm_sparsity`: phases, N:M stages and the decay of beta, a pure function of the clock.

  The clock ``t`` counts updates (``clock="steps"``) or training examples (``clock="samples"``); every
  length below is in its unit. Times ``t < warmup`` are dense (masks all ones, beta = 1). The sparse phase
  lasts ``sparse`` (``None``: unbounded) and is split evenly into ``K = len(stages)`` stages: stage
  ``k = min(floor(K (t - warmup) / sparse), K - 1)``. Then a hard-mask fine-tune phase (final stage,
  beta = 0). With ``u = t - warmup``:

  - ``linear``: ``beta = max(0, 1 - coef * u)``
  - ``exp``: ``beta = exp(-coef * u)``, set to 0 once below ``floor`` (if ``floor`` is not None)
  - ``step``: ``beta = 0``
  """
  warmup: int
  sparse: int | None
  stages: Stages
  decay: str
  coef: Any
  floor: float | None
  clock: str = "steps"

  def stage(self, t: jax.Array) -> jax.Array:
    """Index into ``stages`` at time ``t`` (int32; ``-1`` during the dense warm-up)."""
    u = jnp.asarray(t, jnp.int32) - self.warmup
    k = len(self.stages)
    idx = jnp.zeros(u.shape, jnp.int32)
    # floor(k u / sparse) >= i  <=>  u >= ceil(i sparse / k): exact integer boundaries, and no k * u
    # product that could overflow int32 on a sample clock.
    for i in range(1, k):
      idx = idx + (u >= -(-i * self.sparse // k)).astype(jnp.int32)
    return jnp.where(u < 0, -1, idx)

  def beta(self, t: jax.Array) -> jax.Array:
    """beta at time ``t`` (float32 scalar): 1 in the warm-up, the decay in the sparse phase, 0 after it."""
    t = jnp.asarray(t, jnp.int32)
    u = (t - self.warmup).astype(jnp.float32)
    if self.decay == "linear":
      b = jnp.maximum(0.0, 1.0 - self.coef * u)
    elif self.decay == "exp":
      b = jnp.exp(-self.coef * u)
      if self.floor is not None:
        b = jnp.where(b < self.floor, 0.0, b)
    else:
      b = jnp.zeros([])
    b = jnp.where(u < 0, 1.0, b)
    if self.sparse is not None:
      b = jnp.where(t >= self.warmup + self.sparse, 0.0, b)
    return b.astype(jnp.float32)

  def in_finetune(self, t: jax.Array) -> jax.Array:
    """Whether time ``t`` lies after the sparse phase (bool scalar)."""
    if self.sparse is None:
      return jnp.zeros([], jnp.bool_)
    return jnp.asarray(t, jnp.int32) >= self.warmup + self.sparse


def nm_schedule(
    n: int,
    m: int,
    *,
    method: str = "mdgf",
    decay: str | None = None,
    decay_coef: Any = None,
    decay_end: float | None = None,
    floor: float | None = None,
    structure: Union[None, str, Sequence[tuple[int, int]]] = None,
    total_steps: int | None = None,
    warmup_steps: int | float = 0,
    finetune_steps: int | float = 0,
    clock: str = "steps",
    total_samples: int | None = None,
    warmup_samples: int | float = 0,
    finetune_samples: int | float = 0,
) -> NMSchedule:
  """Builds and validates the :class:`NMSchedule` of :func:`nm_sparsity` (see there for the arguments)."""
  if method not in METHODS:
    raise ValueError(f"nm_sparsity: unknown method {method!r}; expected one of {METHODS}")
  n, m = _check_nm(n, m, "nm_sparsity")
  total, warmup, finetune = _clock_phases(clock, total_steps, warmup_steps, finetune_steps, total_samples,
                                          warmup_samples, finetune_samples)
  unit = clock   # "steps" or "samples": the unit of every length below, and of the argument names
  if total is not None:
    total = _static_int("nm_sparsity", f"total_{unit}", total, 1)
    if total > _MAX_SAMPLES:
      raise ValueError(f"nm_sparsity: total_{unit}={total} exceeds the int32 clock (at most {_MAX_SAMPLES})")
  warmup = _length_or_fraction(f"warmup_{unit}", warmup, total, unit)
  finetune = _length_or_fraction(f"finetune_{unit}", finetune, total, unit)
  for name, v in (("decay_end", decay_end), ("floor", floor)):
    if v is not None and not _is_number(v):
      raise TypeError(f"nm_sparsity: {name} must be a static Python float (with optax.inject_hyperparams pass "
                      f"static_args=prox.transforms.nm.STATIC_ARGS); got {v!r}")
  if total is not None:
    sparse = total - warmup - finetune
    if sparse <= 0:
      raise ValueError(f"nm_sparsity: total_{unit}={total} leaves no sparse phase after warmup_{unit}="
                       f"{warmup} and finetune_{unit}={finetune}")
  else:
    sparse = None
    if finetune:
      raise ValueError(f"nm_sparsity: finetune_{unit} needs total_{unit}")
    if warmup > _MAX_SAMPLES:
      raise ValueError(f"nm_sparsity: warmup_{unit}={warmup} exceeds the int32 clock (at most {_MAX_SAMPLES})")

  if method == "sdgf":
    stages = structure_stages(n, m, "stepwise" if structure is None else structure)
    if stages[-1] != (n, m):
      raise ValueError(f"nm_sparsity: the structure stages {stages} must end at {n}:{m}")
    if len(stages) > 1 and sparse is None:
      raise ValueError(f"nm_sparsity: method='sdgf' spreads its stages over the sparse phase and needs "
                       f"total_{unit}")
    if sparse is not None and sparse < len(stages):
      raise ValueError(f"nm_sparsity: the sparse phase of {sparse} {unit} (total_{unit}={total} - "
                       f"warmup_{unit}={warmup} - finetune_{unit}={finetune}) is shorter than the "
                       f"{len(stages)} structure stages {stages}; the final {n}:{m} would never be reached")
  else:
    if structure is not None:
      raise ValueError(f"nm_sparsity: structure applies to method='sdgf' only, got method={method!r}")
    stages = ((n, m),)

  if decay is None:
    decay = "linear" if method == "mdgf" else "step"
  if decay not in DECAYS:
    raise ValueError(f"nm_sparsity: unknown decay type {decay!r}; expected one of {DECAYS}")
  if method in ("srste", "dense") and decay != "step":
    raise ValueError(f"nm_sparsity: method={method!r} has no decay of beta; got decay={decay!r}")

  coef: Any = 0.0
  if decay in ("linear", "exp"):
    if decay_coef is not None and decay_end is not None:
      raise ValueError("nm_sparsity: give decay_coef or decay_end, not both")
    if decay_coef is None and decay_end is None:
      if sparse is None:
        raise ValueError(f"nm_sparsity: decay={decay!r} needs decay_coef (reference default 2e-4 per step) or "
                         f"total_{unit} (then beta reaches 0 at the end of the sparse phase)")
      decay_end = 1.0
    if decay_end is not None:
      if not _is_number(decay_end) or not 0.0 < decay_end <= 1.0:
        raise ValueError(f"nm_sparsity: decay_end must be a fraction in (0, 1] of the sparse phase, got {decay_end!r}")
      if sparse is None:
        raise ValueError(f"nm_sparsity: decay_end is a fraction of the sparse phase and needs total_{unit}")
      t_end = decay_end * sparse
      if decay == "linear":
        coef = 1.0 / t_end
      else:
        floor = 1e-3 if floor is None else floor
        coef = -math.log(floor) / t_end
    else:
      if _is_number(decay_coef) and decay_coef < 0:
        raise ValueError(f"nm_sparsity: decay_coef must be >= 0, got {decay_coef!r}")
      coef = decay_coef
  if floor is not None:
    if decay != "exp":
      raise ValueError(f"nm_sparsity: floor applies to decay='exp' only, got decay={decay!r}")
    if not _is_number(floor) or not 0.0 < floor < 1.0:
      raise ValueError(f"nm_sparsity: floor must lie in (0, 1), got {floor!r}")
  return NMSchedule(int(warmup), sparse, stages, decay, coef, floor, clock)


# ----------------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------------


class NMSparsityState(NamedTuple):
  """State of :func:`nm_sparsity`.

  Attributes:
    count: int32, number of updates so far.
    beta: float32, the decay factor of the forward pass for the current parameters.
    masks: like the parameters: bool N:M masks of the *current* parameters at the selected leaves (all
      ones in the warm-up and for ``method="dense"``), ``None`` elsewhere.
    inner_state: the state of the wrapped transform.
    clock: int32, the schedule's time of ``beta`` and ``masks``: ``count`` with ``clock="steps"``, the
      samples of the last update with ``clock="samples"`` (see :func:`nm_sparsity`).
  """
  count: jax.Array
  beta: jax.Array
  masks: PyTree
  inner_state: optax.OptState
  clock: jax.Array = np.int32(0)


def nm_sparsity(
    inner: optax.GradientTransformation,
    n: int,
    m: int,
    *,
    method: str = "mdgf",
    decay: str | None = None,
    decay_coef: Any = None,
    decay_end: float | None = None,
    floor: float | None = None,
    structure: Union[None, str, Sequence[tuple[int, int]]] = None,
    srste_lambda: Any = 2e-4,
    total_steps: int | None = None,
    warmup_steps: int | float = 0,
    finetune_steps: int | float = 0,
    finetune_fixed_mask: bool = False,
    axis: int = -2,
    filter: filters_lib.FilterLike = None,
    impl: str = "auto",
    clock: str = "steps",
    total_samples: int | None = None,
    warmup_samples: int | float = 0,
    finetune_samples: int | float = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with N:M sparsity and progressive gradient flow (Bambhaniya et al. 2024).

  Forward weights (:func:`prox.transforms.forward_params`): ``w * (m_t + (1 - m_t) * beta_t)`` with
  ``m_t`` the N:M mask of the current dense ``w``; gradient to the dense ``w``: straight through,
  ``g = dL/dw_fwd``; methods:

  - ``"dense"``: ``m = 1`` (baseline with the same API).
  - ``"srste"``: ``beta = 0`` and ``g <- g + srste_lambda * (1 - m) * w`` (Zhou et al. 2021; 2e-4).
  - ``"mdgf"``: mask decay, ``beta_t`` linear ``max(0, 1 - c t)``, ``exp(-c t)`` or ``step`` (0).
  - ``"sdgf"``: structure decay, binary masks whose N:M follows :func:`structure_stages` (``structure``,
    default ``"stepwise"``) evenly over the sparse phase (``decay`` defaults to ``"step"``; a linear/exp
    decay may be combined with it).

  The decay is given either as ``decay_coef`` (the reference's ``c``; its default 2e-4 leaves beta near
  0.75 after 1,250 steps) or as ``decay_end``, the fraction of the sparse phase at which beta reaches 0
  (linear) or ``floor`` (exp, default 1e-3, below which beta is set to 0). Without either, and with
  ``total_steps``, ``decay_end = 1``. ``t`` counts steps since the end of the dense warm-up.

  Phases: ``warmup_steps`` dense steps; the sparse phase; ``finetune_steps`` hard-mask steps (beta = 0;
  the mask is still recomputed each step as in the reference, unless ``finetune_fixed_mask``, which
  freezes it at the start of the phase and trains only the kept weights).

  Clocks. With ``clock="steps"`` the schedule's time is the number of updates: the state an update
  returns holds ``beta_t`` and the masks of the new parameters at ``t = count + 1``, the time of the forward
  pass that uses them. With ``clock="samples"`` (a run budgeted in examples, e.g. with a growing batch)
  ``t`` counts training examples and every length is in examples: ``total_samples``, ``warmup_samples``,
  ``finetune_samples`` (ints, or fractions of ``total_samples``), ``decay_coef`` per example; ``update``
  reads the extra arguments ``samples`` (int32: examples consumed *before* the step, as ``prox.step``
  passes them) and, if given, ``batch_size`` (examples of this step), and evaluates the schedule at
  ``t = samples + batch_size``: the examples the new parameters have seen, the counterpart of
  ``count + 1``. On a constant batch ``B``, ``total_samples = T B`` (phases times ``B``) then gives the
  step clock's schedule exactly. Without ``batch_size`` (``prox.step`` passes only ``samples``) ``t =
  samples``: the schedule runs one batch behind, i.e. on a constant batch it is the step clock's delayed
  by one update.

  Departures from the reference code: ``t`` restarts at the end of the warm-up (the reference uses the
  global step); SdGf stages are spread over the whole sparse phase so that the final ``n:m`` is reached
  before fine-tuning (the reference reaches it only when fine-tuning starts).

  ``update`` needs ``params`` and assumes its updates are applied unchanged
  (``optax.apply_updates``): it stores the masks of the *new* parameters. Put it outermost (it wraps the
  optimizer; ``apply_if_finite`` / ``MultiSteps`` / ``inject_hyperparams`` around it are fine). Numeric
  hyperparameters that may be injected: ``srste_lambda``, ``decay_coef``; pass
  ``static_args=STATIC_ARGS`` to ``optax.inject_hyperparams`` for the others.

  Args:
    inner: the optimizer to wrap (it receives the straight-through / SR-STE gradient).
    n, m: keep ``n`` of every ``m`` (``1 <= n < m``).
    method, decay, decay_coef, decay_end, floor, structure, srste_lambda: see above.
    total_steps, warmup_steps, finetune_steps, finetune_fixed_mask: the phases (see above). ``warmup_steps``
      and ``finetune_steps`` are ints (steps) or floats in ``[0, 1)``: fractions of ``total_steps``, rounded
      to the nearest step. For an epoch loop, :func:`training_steps` gives ``total_steps``.
    clock: ``"steps"`` (default) or ``"samples"``: what the schedule counts (see Clocks above).
    total_samples, warmup_samples, finetune_samples: the phases in examples, with ``clock="samples"``
      (ints, or fractions of ``total_samples`` for the warm-up and fine-tune; at most ``2**31 - 1``).
    axis: the grouping axis of each selected leaf (default ``-2``: the input dimension of flax kernels).
    filter: which leaves are sparse; see :mod:`filters`. Default :func:`nm_filter`: every leaf with
      ``ndim >= 2`` whose ``axis`` length is divisible by ``M`` (of every stage); ``init`` warns naming the
      leaves it leaves dense (typically the first convolution, ``[3, 3, 1, C]``) and raises if none is left.
      An explicit filter that selects a leaf that cannot be grouped raises at ``init``.
    impl: the mask algorithm of :func:`nm_mask`.
  """
  schedule = nm_schedule(n, m, method=method, decay=decay, decay_coef=decay_coef, decay_end=decay_end,
                         floor=floor, structure=structure, total_steps=total_steps, warmup_steps=warmup_steps,
                         finetune_steps=finetune_steps, clock=clock, total_samples=total_samples,
                         warmup_samples=warmup_samples, finetune_samples=finetune_samples)
  if impl not in _IMPLS:
    raise ValueError(f"nm_sparsity: unknown impl {impl!r}; expected one of {_IMPLS}")
  if _is_number(srste_lambda) and srste_lambda < 0:
    raise ValueError(f"nm_sparsity: srste_lambda must be >= 0, got {srste_lambda!r}")
  total = total_steps if clock == "steps" else total_samples
  if finetune_fixed_mask and (total is None or schedule.warmup + schedule.sparse >= total):
    raise ValueError(f"nm_sparsity: finetune_fixed_mask needs finetune_{clock} > 0")
  axis = _static_int("nm_sparsity", "axis", axis, -(2**31))
  stage_ms = tuple(sorted({mi for _, mi in schedule.stages}))
  default_filter = filter is None
  filt = nm_filter(stage_ms, axis=axis) if default_filter else filters_lib.as_filter(filter)
  inner = optax.with_extra_args_support(inner)
  fixed_start = None if not finetune_fixed_mask else schedule.warmup + schedule.sparse

  def ones(params: PyTree) -> PyTree:
    return filters_lib.map_selected(lambda p, w: jnp.ones(w.shape, jnp.bool_), params, filt)

  def stage_masks(params: PyTree, stage: int) -> PyTree:
    ni, mi = schedule.stages[stage]
    return nm_masks(params, ni, mi, axis=axis, filter=filt, impl=impl)

  def masks_at(params: PyTree, t: jax.Array, previous: PyTree | None = None,
               previous_t: jax.Array | None = None) -> PyTree:
    """Masks of ``params`` for the forward pass at time ``t`` (``previous``: the masks at ``previous_t``)."""
    if method == "dense":
      return ones(params)
    branches = [ones] + [lambda p, i=i: stage_masks(p, i) for i in range(len(schedule.stages))]
    index = schedule.stage(t) + 1
    if previous is not None and fixed_start is not None:
      # The fine-tune's masks are those made at its start: kept once the previous ones were made there.
      branches = [lambda p: previous] + branches
      index = jnp.where(previous_t >= fixed_start, 0, index + 1)
    if schedule.warmup == 0 and len(branches) == 2:
      return branches[1](params)
    return lax.switch(index, branches, params)

  def time_of(count: jax.Array, extra_args: dict[str, Any]) -> jax.Array:
    """The clock of the state an update returns: ``count`` (updates) or ``samples [+ batch_size]``."""
    if clock == "steps":
      return count
    samples = extra_args.get("samples")
    if samples is None:
      raise ValueError("nm_sparsity(clock='samples'): update needs the examples consumed before the step, "
                       "tx.update(grads, state, params, samples=n) (prox.step passes it)")
    t = jnp.asarray(samples, jnp.int32)
    batch_size = extra_args.get("batch_size")
    return t if batch_size is None else t + jnp.asarray(batch_size, jnp.int32)

  def init_fn(params: PyTree) -> NMSparsityState:
    # Tracing every stage's mask here (lax.switch traces all branches) checks each leaf's axis against
    # each stage's M, so a bad shape fails at init, before anything compiles.
    if default_filter:
      _check_default_selection(params, stage_ms, axis)
    t = jnp.zeros([], jnp.int32)
    return NMSparsityState(
        count=t,
        beta=jnp.ones([], jnp.float32) if method == "dense" else schedule.beta(t),
        masks=masks_at(params, t),
        inner_state=inner.init(params),
        clock=t,
    )

  def update_fn(updates: PyTree, state: NMSparsityState, params: PyTree | None = None,
                **extra_args: Any) -> tuple[PyTree, NMSparsityState]:
    if params is None:
      raise ValueError("nm_sparsity: update needs params (call tx.update(grads, state, params))")
    count = optax.safe_increment(state.count)
    t = time_of(count, extra_args)
    if method == "srste":
      lam = srste_lambda

      def reg(g, w, mk):
        if not filters_lib.is_selected(mk):
          return g
        return g + (lam * jnp.logical_not(mk) * w).astype(g.dtype)

      updates = jax.tree.map(reg, updates, params, state.masks)
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    if fixed_start is not None:
      frozen = state.clock >= fixed_start
      new_updates = jax.tree.map(
          lambda u, mk: jnp.where(frozen & jnp.logical_not(mk), jnp.zeros_like(u), u)
          if filters_lib.is_selected(mk) else u, new_updates, state.masks)
    new_params = optax.apply_updates(params, new_updates)
    return new_updates, NMSparsityState(
        count=count,
        beta=jnp.ones([], jnp.float32) if method == "dense" else schedule.beta(t),
        masks=masks_at(new_params, t, state.masks, state.clock),
        inner_state=inner_state,
        clock=t,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
