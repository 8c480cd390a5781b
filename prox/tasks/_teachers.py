"""A bank of frozen teachers, selected inside a jitted step by a traced index.

Progressive distillation switches teachers during training: a pretrained then a fine-tuned teacher
(ERNIE-Tiny; Su et al. 2021), a weaker then a stronger one (Orca; Mukherjee et al. 2023). A teacher
bank keeps every teacher's parameters in one pytree and picks one with a traced integer (e.g. from
``prox.tasks.stage_machine``), so switching teachers never recompiles the step:

* :func:`stacked_teacher_bank`: teachers of one architecture, their parameters stacked leaf-wise into
  ``[K, ...]`` arrays (one pytree, one checkpoint entry). By default the step slices out teacher ``k``
  with ``lax.dynamic_index_in_dim`` and runs the one apply function: one teacher's forward pass plus a
  copy of its parameters, one copy of the forward in the compiled program, and under ``vmap`` over the
  index a gather of per-example teachers. ``selection="switch"`` instead runs a ``lax.switch`` whose
  branch ``k`` applies the function to the static slice ``leaf[k]`` (``K`` copies of the forward in
  the program; under ``vmap`` over the index every branch runs). With the bank passed to the jitted
  step as an argument, the two ran a distillation step within 6% of each other on CPU.
* :func:`switched_teacher_bank`: teachers of different architectures (each its own apply function and
  parameter tree); ``lax.switch`` runs only the selected branch. Every branch must return outputs of
  the same shapes and dtypes (e.g. logits ``[B, C]``). Under ``jax.vmap`` with a batched index,
  ``lax.switch`` becomes a select and runs every branch.

Teachers never receive gradients: the parameters and the outputs pass through ``lax.stop_gradient``.
An index outside ``[0, K)`` is clamped to it (as ``lax.switch`` does).

    bank = stacked_teacher_bank(teacher_apply)
    teachers = bank.init([pretrained_params, finetuned_params])       # a pytree: carry it in the state
    teacher_logits = bank.apply(teachers, machine.teacher(stage), x)   # inside the jitted step

The bank's state is a plain pytree of arrays (``[K, ...]`` leaves or a tuple of trees): it checkpoints
with orbax and shards like any parameter tree. This module lives in ``prox.tasks`` (beside the stage
machines that index it) rather than ``prox.losses``: it holds parameters and runs models, while
``prox.losses`` holds pure functions of arrays.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class TeacherBank(NamedTuple):
  """A bank of frozen teachers as a pair of pure functions.

  Attributes:
    init: ``init(teacher_params: Sequence[PyTree]) -> bank`` builds the bank's pytree.
    apply: ``apply(bank, index, *args, **kwargs) -> outputs`` runs teacher ``index`` (a traced int)
      on ``args``; keyword arguments are static (e.g. ``train=False``). Gradients are stopped.
    select: ``select(bank, index) -> params`` the (gradient-stopped) parameters of teacher ``index``.
  """
  init: Callable[[Sequence[PyTree]], PyTree]
  apply: Callable[..., Any]
  select: Callable[[PyTree, Any], PyTree]


def _index(index: Any, num: int) -> jax.Array:
  index = jnp.asarray(index)
  if index.ndim != 0 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"teacher index must be an integer scalar, got {index.dtype} {index.shape}")
  return jnp.clip(index.astype(jnp.int32), 0, num - 1)


def _check_params(teacher_params: Sequence[PyTree], where: str) -> list[PyTree]:
  if isinstance(teacher_params, dict) or not isinstance(teacher_params, Sequence) or not teacher_params:
    raise ValueError(f"{where}: need a non-empty sequence (list or tuple) of teacher parameter trees, "
                     f"got {type(teacher_params).__name__}")
  return list(teacher_params)


def stacked_teacher_bank(apply_fn: Callable[..., Any], *, selection: str = "slice") -> TeacherBank:
  """A bank of same-architecture teachers, stacked leaf-wise and selected by a traced index.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs`` for one teacher (e.g.
      ``lambda v, x: model.apply(v["params"], v["model_state"], x, train=False)[0]`` for a
      ``prox.models.functional`` model).
    selection: ``"slice"`` (``lax.dynamic_index_in_dim``, the default) or ``"switch"`` (``lax.switch``
      over static slices); see the module docstring.

  Returns:
    A :class:`TeacherBank`. ``init`` checks that every teacher has the same tree structure, shapes and
    dtypes and returns the tree of ``[K, ...]`` arrays.
  """
  if selection not in ("switch", "slice"):
    raise ValueError(f"stacked_teacher_bank: selection must be 'switch' or 'slice', got {selection!r}")

  def init(teacher_params: Sequence[PyTree]) -> PyTree:
    params = _check_params(teacher_params, "stacked_teacher_bank.init")
    structure = jax.tree.structure(params[0])
    specs = [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(params[0])]
    for k, p in enumerate(params[1:], start=1):
      if jax.tree.structure(p) != structure:
        raise ValueError(f"stacked_teacher_bank.init: teacher {k} has tree structure {jax.tree.structure(p)}, "
                         f"teacher 0 has {structure}; use switched_teacher_bank for different architectures")
      other = [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(p)]
      if other != specs:
        bad = next(i for i, (a, b) in enumerate(zip(specs, other)) if a != b)
        raise ValueError(f"stacked_teacher_bank.init: teacher {k} leaf {bad} has shape/dtype {other[bad]}, "
                         f"teacher 0 has {specs[bad]}")
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(x) for x in leaves]), *params)

  def select(bank: PyTree, index: Any) -> PyTree:
    k = _index(index, _num_stacked(bank))
    bank = jax.lax.stop_gradient(bank)
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, k, axis=0, keepdims=False), bank)

  def apply(bank: PyTree, index: Any, *args: Any, **kwargs: Any) -> Any:
    if selection == "slice":
      return jax.lax.stop_gradient(apply_fn(select(bank, index), *args, **kwargs))
    num = _num_stacked(bank)
    k = _index(index, num)
    bank = jax.lax.stop_gradient(bank)
    branches = [functools.partial(_static_branch, apply_fn, i, kwargs) for i in range(num)]
    return jax.lax.stop_gradient(jax.lax.switch(k, branches, bank, *args))

  return TeacherBank(init=init, apply=apply, select=select)


def _num_stacked(bank: PyTree) -> int:
  leaves = jax.tree.leaves(bank)
  if not leaves:
    raise ValueError("stacked_teacher_bank: the bank has no arrays")
  return leaves[0].shape[0]


def _static_branch(fn: Callable[..., Any], k: int, kwargs: dict[str, Any], bank: PyTree, *args: Any) -> Any:
  return fn(jax.tree.map(lambda leaf: leaf[k], bank), *args, **kwargs)


def _branch(fn: Callable[..., Any], k: int, kwargs: dict[str, Any], bank: tuple, *args: Any) -> Any:
  return fn(bank[k], *args, **kwargs)


def switched_teacher_bank(apply_fns: Sequence[Callable[..., Any]]) -> TeacherBank:
  """A bank of teachers with different architectures, selected with ``lax.switch``.

  Args:
    apply_fns: one ``apply_fn(params, *args, **kwargs) -> outputs`` per teacher; all must return the
      same output shapes and dtypes.

  Returns:
    A :class:`TeacherBank` whose state is the tuple of the ``K`` parameter trees. ``select`` needs a
    concrete index here (the trees differ), ``apply`` takes a traced one.
  """
  fns = tuple(apply_fns)
  if not fns or not all(callable(f) for f in fns):
    raise ValueError(f"switched_teacher_bank: need a non-empty sequence of apply functions, got {apply_fns!r}")

  def init(teacher_params: Sequence[PyTree]) -> tuple:
    params = _check_params(teacher_params, "switched_teacher_bank.init")
    if len(params) != len(fns):
      raise ValueError(f"switched_teacher_bank.init: got {len(params)} parameter trees for {len(fns)} apply "
                       "functions")
    return tuple(jax.tree.map(jnp.asarray, p) for p in params)

  def select(bank: tuple, index: Any) -> PyTree:
    if isinstance(index, jax.core.Tracer):
      raise ValueError("switched_teacher_bank.select: the teachers' trees differ, so the index must be concrete; "
                       "use apply with a traced index")
    return jax.lax.stop_gradient(bank[int(np.clip(int(index), 0, len(fns) - 1))])

  def apply(bank: tuple, index: Any, *args: Any, **kwargs: Any) -> Any:
    if len(bank) != len(fns):
      raise ValueError(f"switched_teacher_bank.apply: the bank holds {len(bank)} teachers, expected {len(fns)}")
    k = _index(index, len(fns))
    bank = jax.lax.stop_gradient(bank)
    branches = [functools.partial(_branch, fn, i, kwargs) for i, fn in enumerate(fns)]
    return jax.lax.stop_gradient(jax.lax.switch(k, branches, bank, *args))

  return TeacherBank(init=init, apply=apply, select=select)
