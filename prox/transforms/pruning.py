"""Unstructured sparsity as optax wrappers: gradual pruning (Zhu & Gupta), RigL and SET drop-and-regrow.

The counterparts of jaxpruner's ``MagnitudePruning`` / ``SaliencyPruning`` / ``RandomPruning`` / ``RigL``
/ ``SET``, written as pure optax transforms. Each wrapper keeps boolean ``masks`` in its state and returns
updates that leave the parameters exactly ``m * (w + u)`` after ``optax.apply_updates`` (pruned weights
become 0 and stay 0), and feeds ``g * m`` to the inner optimizer. ``forward_params(params, state)`` (from
:mod:`prox.transforms.masking`) gives ``w * m`` with a straight-through gradient, which is what RigL needs
to see the dense gradient of pruned weights.

Clocks. Gradual pruning's schedule counts updates (``clock="steps"``) or, for a run budgeted in examples
(a growing batch), training examples (``clock="samples"``): ``update`` then reads the extra argument
``samples`` (int32, examples consumed before the step, as ``prox.step`` passes it) where the step clock
reads ``count``, so on a constant batch ``B`` the sample clock with every length times ``B`` prunes at the
same updates to the same sparsities.

Only jax/optax/numpy and the sibling helper files are imported.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from prox.transforms import filters as filters_lib
from prox.transforms import masking

PyTree = Any

__all__ = [
    "CLOCKS",
    "DISTRIBUTIONS",
    "SCORES",
    "PruningState",
    "erk_sparsities",
    "gradual_pruning",
    "layer_sparsities",
    "polynomial_sparsity",
    "rigl",
    "sparse_evolutionary_training",
]

SCORES = ("magnitude", "saliency", "random")
CLOCKS = ("steps", "samples")
DISTRIBUTIONS = ("uniform", "erk")
_SCOPES = ("layer", "global")


class PruningState(NamedTuple):
  """State of :func:`gradual_pruning`, :func:`rigl` and :func:`sparse_evolutionary_training`.

  Attributes:
    count: int32, number of updates so far.
    masks: like the parameters: bool masks at the selected leaves (``True`` = kept), ``None`` elsewhere.
    rng: uint32[2] PRNG key (random scores, random regrowth), folded with ``count`` at each use.
    inner_state: the state of the wrapped transform.
    clock: int32, the schedule's time at the latest update (``count - 1``, or the ``samples`` it was given
      with ``clock="samples"``); ``-1`` before the first.
  """
  count: jax.Array
  masks: PyTree
  rng: jax.Array
  inner_state: optax.OptState
  clock: jax.Array


# ----------------------------------------------------------------------------------------------------
# Schedules and per-layer targets
# ----------------------------------------------------------------------------------------------------


def polynomial_sparsity(target: float, *, start_step: int, end_step: int, power: float = 3.0,
                        initial: float = 0.0) -> optax.Schedule:
  """Zhu & Gupta 2017: ``s_t = s_f + (s_i - s_f) (1 - p_t)^power``, ``p_t = clip((t - start)/(end - start), 0, 1)``.

  With ``s_i = 0`` and ``power = 3`` this is ``s_f (1 - (1 - p)^3)`` (Zhu and Gupta 2017, "To prune, or not to prune").
  Built on ``optax.polynomial_schedule``.
  """
  _check_fraction("polynomial_sparsity", "target", target)
  _check_fraction("polynomial_sparsity", "initial", initial)
  if not (isinstance(start_step, numbers.Integral) and isinstance(end_step, numbers.Integral)
          and 0 <= start_step < end_step):
    raise ValueError(f"polynomial_sparsity: need ints 0 <= start_step < end_step, got {start_step!r}, {end_step!r}")
  if not power > 0:
    raise ValueError(f"polynomial_sparsity: power must be > 0, got {power!r}")
  return optax.polynomial_schedule(init_value=initial, end_value=target, power=power,
                                   transition_steps=end_step - start_step, transition_begin=start_step)


def _check_fraction(where: str, name: str, v: Any, upper_open: bool = True) -> None:
  if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
    raise ValueError(f"{where}: {name} must be a fraction in [0, 1), got {v!r}")


def erk_sparsities(shapes: Sequence[Sequence[int]], sparsity: float, power_scale: float = 1.0) -> list[float]:
  """Erdős–Rényi-Kernel per-layer sparsities (Evci et al. 2020, RigL) with overall density ``1 - sparsity``.

  ``density_l = min(1, eps * (sum(shape_l) / prod(shape_l))^power_scale)`` with ``eps`` solved so that
  ``sum_l density_l size_l = (1 - sparsity) sum_l size_l``; layers that would exceed density 1 are made
  dense and ``eps`` is solved again for the rest.
  """
  _check_fraction("erk_sparsities", "sparsity", sparsity)
  sizes = np.array([float(np.prod(s)) for s in shapes])
  raw = np.array([(float(np.sum(s)) / float(np.prod(s))) ** power_scale for s in shapes])
  dense = np.zeros(len(shapes), bool)
  budget = (1.0 - sparsity) * sizes.sum()
  while True:
    rest = budget - sizes[dense].sum()
    eps = rest / float((raw * sizes)[~dense].sum())
    density = eps * raw
    over = (density > 1.0) & ~dense
    if not over.any():
      break
    dense |= over
  density = np.where(dense, 1.0, density)
  return [float(1.0 - d) for d in density]


def layer_sparsities(params: PyTree, sparsity: float, *, distribution: str = "uniform",
                     filter: filters_lib.FilterLike = None, erk_power_scale: float = 1.0) -> PyTree:
  """Target sparsity of each selected leaf (Python floats; ``None`` at unselected leaves)."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"layer_sparsities: unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
  f = filters_lib.as_filter(filter)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  chosen = [i for i, (p, x) in enumerate(leaves) if f(p, x)]
  if distribution == "uniform":
    values = [float(sparsity)] * len(chosen)
  else:
    values = erk_sparsities([leaves[i][1].shape for i in chosen], sparsity, erk_power_scale)
  out: list[Any] = [None] * len(leaves)
  for i, v in zip(chosen, values):
    out[i] = v
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------
# Ranking helpers
# ----------------------------------------------------------------------------------------------------


def _ranks(score: jax.Array) -> jax.Array:
  """Ascending rank of each entry of the flat ``score`` (stable: ties ranked by position)."""
  order = jnp.argsort(score, stable=True)
  return jnp.zeros_like(order).at[order].set(jnp.arange(score.size, dtype=order.dtype))


def _keep_all_but_lowest(score: jax.Array, k: jax.Array) -> jax.Array:
  """Mask that drops the ``k`` lowest scores (ties: the lower position goes first)."""
  return (_ranks(score.reshape(-1)) >= k).reshape(score.shape)


def _n_of(fraction: jax.Array, size: Any) -> jax.Array:
  return jnp.round(jnp.asarray(fraction, jnp.float32) * jnp.asarray(size, jnp.float32)).astype(jnp.int32)


def _selected(params: PyTree, masks: PyTree) -> tuple[list[Any], list[Any], list[int]]:
  """Flat lists of the parameter leaves, the mask at each leaf (``None`` if unselected), and the masked indices."""
  leaves, treedef = jax.tree.flatten(params)
  mleaves = [m if filters_lib.is_selected(m) else None for m in treedef.flatten_up_to(masks)]
  idx = [i for i, m in enumerate(mleaves) if m is not None]
  return leaves, mleaves, idx


def _masks_like(params: PyTree, flat_masks: list[Any]) -> PyTree:
  return jax.tree.unflatten(jax.tree.structure(params), flat_masks)


def _clock_time(where: str, clock: str, count: jax.Array, extra_args: dict[str, Any]) -> jax.Array:
  """The schedule's time of an update: ``count`` (updates before it) or the ``samples`` extra argument."""
  if clock == "steps":
    return count
  samples = extra_args.get("samples")
  if samples is None:
    raise ValueError(f"{where}(clock='samples'): update needs the examples consumed before the step, "
                     "tx.update(grads, state, params, samples=n) (prox.step passes it)")
  return jnp.asarray(samples, jnp.int32)


def _masked_wrapper(inner: optax.GradientTransformation, where: str, seed: int, init_masks: Any, new_masks: Any,
                    is_update_step: Any, clock: str = "steps") -> optax.GradientTransformationExtraArgs:
  """The transform shared by the pruning methods.

  ``init_masks(params, key)`` gives the first masks; at updates where ``is_update_step(previous_t, t)``
  (``t``: this update's time on ``clock``, ``previous_t``: the last update's, ``-1`` before the first),
  ``new_masks(params, grads, state, t)`` replaces them. The inner transform sees ``g * m``; the returned
  updates leave exactly ``m * (w + u)`` after ``optax.apply_updates``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: PyTree) -> PruningState:
    key = jax.random.PRNGKey(seed)
    return PruningState(jnp.zeros([], jnp.int32), init_masks(params, key), key, inner.init(params),
                        jnp.full([], -1, jnp.int32))

  def update_fn(updates: PyTree, state: PruningState, params: PyTree | None = None,
                **extra_args: Any) -> tuple[PyTree, PruningState]:
    if params is None:
      raise ValueError(f"{where}: update needs params (call tx.update(grads, state, params))")
    t = _clock_time(where, clock, state.count, extra_args)
    masks = lax.cond(is_update_step(state.clock, t), lambda: new_masks(params, updates, state, t),
                     lambda: state.masks)
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)) if filters_lib.is_selected(m) else g,
                         updates, masks)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    new_updates = masking.masked_updates(new_updates, params, masks)
    return new_updates, PruningState(optax.safe_increment(state.count), masks, state.rng, inner_state, t)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_common(where: str, filter_: Any, seed: Any) -> filters_lib.Filter:
  if not isinstance(seed, numbers.Integral):
    raise ValueError(f"{where}: seed must be an int, got {seed!r}")
  return filters_lib.as_filter(filter_)


def _ones_masks(params: PyTree, f: filters_lib.Filter) -> PyTree:
  return filters_lib.map_selected(lambda p, w: jnp.ones(w.shape, jnp.bool_), params, f)


# ----------------------------------------------------------------------------------------------------
# Gradual pruning
# ----------------------------------------------------------------------------------------------------


def _clock_lengths(where: str, clock: str, steps: dict[str, Any], samples: dict[str, Any],
                   defaults: dict[str, Any]) -> dict[str, int]:
  """The schedule lengths of the chosen clock by step-clock name (``start_step``...); the other clock's
  arguments must be left unset."""
  if clock not in CLOCKS:
    raise ValueError(f"{where}: unknown clock {clock!r}; expected one of {CLOCKS}")
  ours, theirs = (steps, samples) if clock == "steps" else (samples, steps)
  for name, v in theirs.items():
    if v is not None:
      hint = "pass clock='samples'" if clock == "steps" else "clock='samples' counts examples"
      raise ValueError(f"{where}: {name}={v!r} belongs to the {'samples' if clock == 'steps' else 'steps'} "
                       f"clock; {hint}")
  out = {}
  for (name, v), key in zip(ours.items(), defaults):
    if v is None:
      if defaults[key] is None:
        raise ValueError(f"{where}: clock={clock!r} needs {name}")
      v = defaults[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 2**31 - 1:
      raise ValueError(f"{where}: {name} must be an int in [0, 2**31 - 1], got {v!r}")
    out[key] = int(v)
  return out


def gradual_pruning(
    inner: optax.GradientTransformation,
    *,
    sparsity: float = 0.9,
    start_step: int | None = None,
    end_step: int | None = None,
    frequency: int | None = None,
    power: float = 3.0,
    initial_sparsity: float = 0.0,
    score: str = "magnitude",
    distribution: str = "uniform",
    scope: str = "layer",
    erk_power_scale: float = 1.0,
    filter: filters_lib.FilterLike = None,
    seed: int = 0,
    clock: str = "steps",
    start_samples: int | None = None,
    end_samples: int | None = None,
    frequency_samples: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Gradual pruning (Zhu & Gupta 2017; jaxpruner's magnitude / saliency / random pruning) around ``inner``.

  At the pruning times ``t = start + k * frequency < end`` and ``t = end`` the mask is recomputed so that
  each selected leaf has sparsity ``s_l(t) = s_l * P(t) / s``, with ``P`` the :func:`polynomial_sparsity`
  schedule towards ``s = sparsity`` and ``s_l`` the leaf's target from ``distribution`` (``"uniform"``:
  ``s_l = s``; ``"erk"``: :func:`erk_sparsities`). The weights with the lowest score are pruned:
  ``"magnitude"`` ``|w|``, ``"saliency"`` ``|w * g|`` (first-order Taylor), ``"random"``. Pruned weights
  keep the lowest score, so masks only shrink. ``scope="global"`` ranks all selected leaves together
  against one threshold (then ``distribution`` must be ``"uniform"``).

  Clocks: with ``clock="steps"`` (default) ``t`` is the update count and the lengths are ``start_step``
  (default 0), ``end_step`` (default 1000) and ``frequency`` (default 100); the masks are recomputed at
  the updates ``t`` that are pruning times. With ``clock="samples"`` ``t`` is the ``samples`` extra argument
  of ``update`` (examples consumed before the step) and the lengths are ``start_samples`` (default 0),
  ``end_samples`` and ``frequency_samples``; the masks are recomputed, with the sparsity ``P(t)``, at each
  update whose ``t`` reaches a pruning time the previous update had not reached (with a growing batch an
  update may pass several at once). On a constant batch ``B`` with every length times ``B`` both clocks
  prune at the same updates to the same sparsities.

  Updates: the inner transform receives ``g * m``; the returned updates leave ``m * (w + u)``.
  """
  where = "gradual_pruning"
  _check_fraction(where, "sparsity", sparsity)
  _check_fraction(where, "initial_sparsity", initial_sparsity)
  if initial_sparsity > sparsity:
    raise ValueError(f"{where}: initial_sparsity={initial_sparsity} exceeds sparsity={sparsity}")
  if score not in SCORES:
    raise ValueError(f"{where}: unknown score {score!r}; expected one of {SCORES}")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"{where}: unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
  if scope not in _SCOPES:
    raise ValueError(f"{where}: unknown scope {scope!r}; expected one of {_SCOPES}")
  if scope == "global" and distribution != "uniform":
    raise ValueError(f"{where}: scope='global' sets one threshold for all layers; distribution must be 'uniform', "
                     f"got {distribution!r}")
  lengths = _clock_lengths(
      where, clock, {"start_step": start_step, "end_step": end_step, "frequency": frequency},
      {"start_samples": start_samples, "end_samples": end_samples, "frequency_samples": frequency_samples},
      {"start": 0, "end": 1000 if clock == "steps" else None, "frequency": 100 if clock == "steps" else None})
  start, end, every = lengths["start"], lengths["end"], lengths["frequency"]
  names = ("start_step", "end_step", "frequency") if clock == "steps" else (
      "start_samples", "end_samples", "frequency_samples")
  if every < 1:
    raise ValueError(f"{where}: {names[2]} must be an int >= 1, got {every!r}")
  if not start < end:
    raise ValueError(f"{where}: need ints 0 <= {names[0]} < {names[1]}, got {start!r}, {end!r}")
  schedule = polynomial_sparsity(sparsity, start_step=start, end_step=end, power=power, initial=initial_sparsity)
  f = _check_common(where, filter, seed)
  num_regular = -(-(end - start) // every)   # pruning times start + k * every < end

  def passed(t: jax.Array) -> jax.Array:
    """The number of pruning times <= t."""
    regular = jnp.clip((t - start) // every + 1, 0, num_regular)
    return regular + (t >= end).astype(regular.dtype)

  def is_update_step(previous_t: jax.Array, t: jax.Array) -> jax.Array:
    return passed(t) > passed(previous_t)

  def init_masks(params: PyTree, key: jax.Array) -> PyTree:
    # Validates the distribution now (shapes are static) so that bad input fails before compiling.
    layer_sparsities(params, sparsity, distribution=distribution, filter=f, erk_power_scale=erk_power_scale)
    return _ones_masks(params, f)

  def new_masks(params: PyTree, grads: PyTree, state: PruningState, t: jax.Array) -> PyTree:
    targets = jax.tree.leaves(layer_sparsities(params, sparsity, distribution=distribution, filter=f,
                                               erk_power_scale=erk_power_scale))
    s_t = schedule(t)
    leaves, mleaves, idx = _selected(params, state.masks)
    gleaves = jax.tree.leaves(grads)
    key = jax.random.fold_in(state.rng, state.count)
    scores = []
    for j, i in enumerate(idx):
      w = leaves[i].astype(jnp.float32)
      if score == "magnitude":
        sc = jnp.abs(w)
      elif score == "saliency":
        sc = jnp.abs(w * gleaves[i].astype(jnp.float32))
      else:
        sc = jax.random.uniform(jax.random.fold_in(key, j), w.shape)
      scores.append(jnp.where(mleaves[i], sc, -jnp.inf))
    out = list(mleaves)
    if scope == "global":
      flat = jnp.concatenate([s.reshape(-1) for s in scores])
      keep = _keep_all_but_lowest(flat, _n_of(s_t, flat.size))
      offset = 0
      for i, sc in zip(idx, scores):
        out[i] = keep[offset:offset + sc.size].reshape(sc.shape)
        offset += sc.size
    else:
      for i, sc, target in zip(idx, scores, targets):
        frac = s_t * (target / sparsity) if sparsity > 0 else s_t * 0.0
        out[i] = _keep_all_but_lowest(sc, _n_of(frac, sc.size))
    return _masks_like(params, out)

  return _masked_wrapper(inner, where, seed, init_masks, new_masks, is_update_step, clock)


# ----------------------------------------------------------------------------------------------------
# Drop and regrow: RigL and SET
# ----------------------------------------------------------------------------------------------------


def _drop_and_regrow(
    inner: optax.GradientTransformation,
    *,
    where: str,
    grow: str,
    sparsity: float,
    drop_fraction: float,
    drop_schedule: str,
    update_frequency: int,
    end_step: int | None,
    distribution: str,
    erk_power_scale: float,
    filter: filters_lib.FilterLike,
    seed: int,
) -> optax.GradientTransformationExtraArgs:
  _check_fraction(where, "sparsity", sparsity)
  if not isinstance(drop_fraction, numbers.Real) or not 0.0 <= drop_fraction <= 1.0:
    raise ValueError(f"{where}: drop_fraction must lie in [0, 1], got {drop_fraction!r}")
  if drop_schedule not in ("cosine", "constant"):
    raise ValueError(f"{where}: unknown drop_schedule {drop_schedule!r}; expected 'cosine' or 'constant'")
  if not isinstance(update_frequency, numbers.Integral) or update_frequency < 1:
    raise ValueError(f"{where}: update_frequency must be an int >= 1, got {update_frequency!r}")
  if end_step is not None and (not isinstance(end_step, numbers.Integral) or end_step < 1):
    raise ValueError(f"{where}: end_step must be a positive int or None, got {end_step!r}")
  if drop_schedule == "cosine" and end_step is None:
    raise ValueError(f"{where}: drop_schedule='cosine' decays to 0 at end_step; give end_step")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"{where}: unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
  f = _check_common(where, filter, seed)
  fraction = (optax.cosine_decay_schedule(drop_fraction, end_step) if drop_schedule == "cosine"
              else optax.constant_schedule(drop_fraction))

  def init_masks(params: PyTree, key: jax.Array) -> PyTree:
    targets = layer_sparsities(params, sparsity, distribution=distribution, filter=f, erk_power_scale=erk_power_scale)
    leaves, treedef = jax.tree.flatten(params)
    tleaves = treedef.flatten_up_to(targets)
    masks = []
    for i, (w, s) in enumerate(zip(leaves, tleaves)):
      if s is None:
        masks.append(None)
        continue
      sc = jax.random.uniform(jax.random.fold_in(key, i), w.shape)
      masks.append(_keep_all_but_lowest(sc, _n_of(s, w.size)))
    return _masks_like(params, masks)

  def is_update_step(previous_count: jax.Array, count: jax.Array) -> jax.Array:
    ok = (count > 0) & (count % update_frequency == 0)
    if end_step is not None:
      ok = ok & (count < end_step)
    return ok

  def new_masks(params: PyTree, grads: PyTree, state: PruningState, count: jax.Array) -> PyTree:
    leaves, mleaves, idx = _selected(params, state.masks)
    gleaves = jax.tree.leaves(grads)
    key = jax.random.fold_in(state.rng, state.count)
    frac = fraction(state.count)
    out = list(mleaves)
    for j, i in enumerate(idx):
      m = mleaves[i]
      w = jnp.abs(leaves[i].astype(jnp.float32))
      k = _n_of(frac, jnp.sum(m, dtype=jnp.float32))
      # Drop the k active weights of smallest |w|.
      after_drop = m & _keep_all_but_lowest(jnp.where(m, w, jnp.inf), k)
      # Regrow k inactive weights: largest |g| (RigL) or random (SET).
      if grow == "gradient":
        gs = jnp.abs(gleaves[i].astype(jnp.float32))
      else:
        gs = jax.random.uniform(jax.random.fold_in(key, j), w.shape)
      grown = ~_keep_all_but_lowest(-jnp.where(after_drop, -jnp.inf, gs), k)
      out[i] = after_drop | grown
    return _masks_like(params, out)

  return _masked_wrapper(inner, where, seed, init_masks, new_masks, is_update_step)


def rigl(
    inner: optax.GradientTransformation,
    *,
    sparsity: float = 0.9,
    drop_fraction: float = 0.3,
    drop_schedule: str = "cosine",
    update_frequency: int = 100,
    end_step: int | None = None,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
    filter: filters_lib.FilterLike = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020, "Rigging the Lottery") around ``inner``.

  Starts from a random mask with per-layer sparsity from ``distribution`` (default ERK). Every
  ``update_frequency`` steps before ``end_step``, in each layer: drop the ``k = round(f_t * #active)``
  active weights of smallest ``|w|`` and regrow the ``k`` inactive ones of largest dense ``|g|``
  (``f_t = drop_fraction / 2 * (1 + cos(pi t / end_step))``, or constant). Regrown weights start at 0.
  The gradient must be the dense one: use ``forward_params(params, state)`` (straight-through) or the
  parameters themselves (pruned entries are exactly 0) in the loss.
  """
  return _drop_and_regrow(inner, where="rigl", grow="gradient", sparsity=sparsity, drop_fraction=drop_fraction,
                          drop_schedule=drop_schedule, update_frequency=update_frequency, end_step=end_step,
                          distribution=distribution, erk_power_scale=erk_power_scale, filter=filter, seed=seed)


def sparse_evolutionary_training(
    inner: optax.GradientTransformation,
    *,
    sparsity: float = 0.9,
    drop_fraction: float = 0.3,
    drop_schedule: str = "constant",
    update_frequency: int = 100,
    end_step: int | None = None,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
    filter: filters_lib.FilterLike = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018, "Sparse Evolutionary Training") around ``inner``.

  As :func:`rigl`, but the ``k`` regrown weights are chosen uniformly at random among the inactive ones
  and the drop fraction is constant by default (``zeta = 0.3``).
  """
  return _drop_and_regrow(inner, where="sparse_evolutionary_training", grow="random", sparsity=sparsity,
                          drop_fraction=drop_fraction, drop_schedule=drop_schedule,
                          update_frequency=update_frequency, end_step=end_step, distribution=distribution,
                          erk_power_scale=erk_power_scale, filter=filter, seed=seed)
