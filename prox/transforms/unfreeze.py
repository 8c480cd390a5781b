"""Progressive unfreezing: parameter groups start training one at a time on a schedule.

Howard & Ruder 2018 (ULMFiT, "gradual unfreezing"): the last layer (the head) trains first, then each
step of the schedule unfreezes the next group down. Built from optax pieces: ``optax.partition`` gives
each group its own copy of the inner optimizer and ``optax.transforms.conditionally_mask`` holds it (zero
updates, state untouched) until its step, so a group's optimizer starts fresh (e.g. Adam's bias
correction counts from the group's own first step) when it is unfrozen.

Only jax/optax and the sibling filters file are imported.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import optax

from prox.transforms import filters as filters_lib

PyTree = Any

__all__ = ["progressive_unfreezing", "unfreeze_labels"]

ALWAYS = "always"


def _label(i: int) -> str:
  return f"group_{i}"


def unfreeze_labels(params: PyTree, groups: Sequence[filters_lib.FilterLike]) -> PyTree:
  """The group label of each leaf: ``"group_i"`` for the first group whose filter selects it, else ``"always"``."""
  fs = [filters_lib.as_filter(g) for g in groups]

  def one(path, leaf):
    for i, f in enumerate(fs):
      if f(path, leaf):
        return _label(i)
    return ALWAYS

  return jax.tree_util.tree_map_with_path(one, params)


def progressive_unfreezing(
    inner: optax.GradientTransformation,
    groups: Sequence[filters_lib.FilterLike],
    *,
    boundaries: Sequence[int] | None = None,
    interval: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Trains group ``i`` (``groups[i]``, a filter or path regex) only from step ``boundaries[i]`` on.

  ``updates_t = inner(g)`` on leaves of groups with ``boundaries[i] <= t`` and ``0`` on the others;
  give the groups head first (``groups[0]`` is usually the output layer, unfrozen at step 0). A leaf
  belongs to the first group that selects it; leaves in no group train from the start. Either
  ``boundaries`` (non-decreasing ints, one per group) or ``interval`` (group ``i`` at ``i * interval``).
  Each group has its own inner state, which stays at its initial value while the group is frozen.
  """
  if not groups:
    raise ValueError("progressive_unfreezing: groups must not be empty")
  if (boundaries is None) == (interval is None):
    raise ValueError("progressive_unfreezing: give exactly one of boundaries or interval")
  if interval is not None:
    if not isinstance(interval, numbers.Integral) or interval < 1:
      raise ValueError(f"progressive_unfreezing: interval must be an int >= 1, got {interval!r}")
    boundaries = [i * int(interval) for i in range(len(groups))]
  boundaries = list(boundaries)
  if len(boundaries) != len(groups):
    raise ValueError(f"progressive_unfreezing: {len(boundaries)} boundaries for {len(groups)} groups")
  if any(not isinstance(b, numbers.Integral) or b < 0 for b in boundaries) or boundaries != sorted(boundaries):
    raise ValueError(f"progressive_unfreezing: boundaries must be non-decreasing ints >= 0, got {boundaries}")
  for g in groups:
    filters_lib.as_filter(g)

  transforms: dict[str, optax.GradientTransformation] = {ALWAYS: inner}
  for i, b in enumerate(boundaries):
    transforms[_label(i)] = optax.transforms.conditionally_mask(inner, lambda step, b=int(b): step >= b)
  return optax.partition(transforms, lambda params: unfreeze_labels(params, groups))
