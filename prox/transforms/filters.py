"""Path filters: choose which parameter leaves a sparsity transform acts on, and per-layer summaries.

A *filter* is a callable ``(path, leaf) -> bool`` where ``path`` is a JAX key path (as given by
``jax.tree_util.tree_map_with_path``) and ``leaf`` an array (or ``jax.ShapeDtypeStruct``). Filters must
depend only on the path, shape and dtype of a leaf, never on its values: they are evaluated once, at trace
time, to build a static selection.

Paths are turned into strings such as ``"layers/0/kernel"`` by :func:`path_str`; the trailing ``.value``
attribute of flax NNX variables is dropped, so the same regexes work on NNX states and on plain dicts.

Only jax/numpy are imported, so this file can be copied into other optax code.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]
Filter = Callable[[KeyPath, Any], bool]
FilterLike = Union[None, str, Filter]

__all__ = [
    "Filter",
    "FilterLike",
    "all_of",
    "any_of",
    "as_filter",
    "by_name",
    "by_ndim",
    "by_regex",
    "conv_kernels",
    "default_filter",
    "dense_kernels",
    "is_selected",
    "kernels",
    "map_selected",
    "negate",
    "path_str",
    "select",
    "selected_paths",
    "sparsity_summary",
]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _strip_value(path: KeyPath) -> KeyPath:
  """Drops a trailing ``.value`` attribute key (flax NNX variable state)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    return path[:-1]
  return path


def path_str(path: KeyPath, separator: str = "/") -> str:
  """Returns ``"a/b/0/kernel"`` for a JAX key path (a trailing NNX ``.value`` is dropped)."""
  return separator.join(_key_name(k) for k in _strip_value(tuple(path)))


def _leaf_name(path: KeyPath) -> str:
  path = _strip_value(tuple(path))
  return _key_name(path[-1]) if path else ""


def by_regex(pattern: str) -> Filter:
  """Selects leaves whose :func:`path_str` matches ``pattern`` (``re.search``)."""
  compiled = re.compile(pattern)
  return lambda path, leaf: compiled.search(path_str(path)) is not None


def by_name(*names: str) -> Filter:
  """Selects leaves whose last path key (e.g. ``"kernel"``) is one of ``names``."""
  wanted = frozenset(names)
  return lambda path, leaf: _leaf_name(path) in wanted


def by_ndim(min_ndim: int = 2, max_ndim: int | None = None) -> Filter:
  """Selects array leaves with ``min_ndim <= ndim <= max_ndim``."""

  def f(path: KeyPath, leaf: Any) -> bool:
    ndim = getattr(leaf, "ndim", None)
    if ndim is None:
      return False
    return ndim >= min_ndim and (max_ndim is None or ndim <= max_ndim)

  return f


def all_of(*filters: FilterLike) -> Filter:
  """Selects leaves selected by every filter."""
  fs = [as_filter(f) for f in filters]
  return lambda path, leaf: all(f(path, leaf) for f in fs)


def any_of(*filters: FilterLike) -> Filter:
  """Selects leaves selected by at least one filter."""
  fs = [as_filter(f) for f in filters]
  return lambda path, leaf: any(f(path, leaf) for f in fs)


def negate(filter_: FilterLike) -> Filter:
  """Selects the leaves ``filter_`` does not select."""
  f = as_filter(filter_)
  return lambda path, leaf: not f(path, leaf)


def kernels() -> Filter:
  """Leaves named ``kernel`` with at least 2 dimensions (flax Dense and Conv kernels)."""
  return all_of(by_name("kernel"), by_ndim(2))


def dense_kernels() -> Filter:
  """2-D leaves named ``kernel`` (flax ``Linear``/``Dense``, layout ``[in, out]``)."""
  return all_of(by_name("kernel"), by_ndim(2, 2))


def conv_kernels() -> Filter:
  """Leaves named ``kernel`` with at least 3 dimensions (flax ``Conv``, layout ``[*window, in, out]``)."""
  return all_of(by_name("kernel"), by_ndim(3))


def default_filter() -> Filter:
  """The default selection of the sparsity transforms: every leaf with at least 2 dimensions."""
  return by_ndim(2)


def as_filter(spec: FilterLike) -> Filter:
  """Normalises a filter spec: ``None`` -> :func:`default_filter`, a string -> :func:`by_regex`."""
  if spec is None:
    return default_filter()
  if isinstance(spec, str):
    return by_regex(spec)
  if callable(spec):
    return spec
  raise TypeError(f"filter must be None, a regex string or a callable (path, leaf) -> bool; got {spec!r}")


def select(tree: PyTree, filter_: FilterLike = None) -> PyTree:
  """Returns a pytree of Python bools, ``True`` where ``filter_`` selects the leaf."""
  f = as_filter(filter_)

  def one(path: KeyPath, leaf: Any) -> bool:
    out = f(path, leaf)
    if isinstance(out, jax.core.Tracer):
      raise TypeError(f"filter returned a traced value for {path_str(path)!r}: filters may use only the "
                      "path, shape and dtype of a leaf, not its values")
    return bool(out)

  return jax.tree_util.tree_map_with_path(one, tree)


def map_selected(fn: Callable[[KeyPath, Any], Any], tree: PyTree, filter_: FilterLike = None) -> PyTree:
  """``fn(path, leaf)`` at the leaves ``filter_`` selects and ``None`` elsewhere (the layout of mask trees)."""
  f = as_filter(filter_)
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(p, x) if f(p, x) else None, tree)


def selected_paths(tree: PyTree, filter_: FilterLike = None) -> list[str]:
  """The :func:`path_str` of every selected leaf, in flattening order."""
  f = as_filter(filter_)
  return [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if f(p, x)]


def is_selected(mask: Any) -> bool:
  """Whether a node of a mask tree is a real mask (an array) rather than a placeholder (``None``, ``MaskedNode``)."""
  return hasattr(mask, "shape") and hasattr(mask, "dtype")


def sparsity_summary(tree: PyTree, filter_: FilterLike = None) -> dict[str, jax.Array]:
  """Per-layer sparsity: the fraction of zero entries of each selected leaf, and ``"total"``.

  Works on parameters (zeros count as pruned) and on boolean masks (``False`` counts as pruned); ``None``
  placeholders in mask trees are skipped. Jittable (the keys are static); values are float32 scalars.

  ``summary[path] = #{x == 0} / size``; ``summary["total"] = sum #{x == 0} / sum size`` over the selected
  leaves.
  """
  f = as_filter(filter_)
  out: dict[str, jax.Array] = {}
  zeros = []
  sizes = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not is_selected(leaf) or not f(path, leaf):
      continue
    leaf = jnp.asarray(leaf)
    nz = jnp.sum(jnp.logical_not(leaf) if leaf.dtype == jnp.bool_ else (leaf == 0), dtype=jnp.float32)
    size = float(np.prod(leaf.shape, dtype=np.int64))
    out[path_str(path)] = nz / max(size, 1.0)
    zeros.append(nz)
    sizes.append(size)
  out["total"] = (sum(zeros) / max(sum(sizes), 1.0)) if zeros else jnp.zeros([], jnp.float32)
  return out

