"""prox's transforms inside a Flax NNX training loop: masked modules, Fisher of a module, optimizer-state writes.

prox's transforms are plain optax code: they see the parameters and optimizer state as pytrees of arrays.
``nnx.Optimizer`` keeps the state as ``OptState`` variables and hands ``tx.update`` ``nnx.State`` trees of
arrays (``nnx.as_pure``). The helpers here do that conversion at the three places an NNX user meets it:

* the forward pass with the masks of a sparsity state (N:M, pruning, RigL): :func:`masked_module` returns a
  view of the module whose weights are ``forward_params(params, opt_state)`` (or the hard masks), sharing
  every other variable (BatchNorm statistics, RNG streams) with the module::

    (loss, logits), grads = grad_fn(masked_module(model, optimizer), batch, rngs)
    optimizer.update(model, grads)     # the gradient w.r.t. the masked weights is the dense gradient

* the diagonal Fisher of a module for EWC (:func:`module_fisher`), with the module in evaluation mode
  (BatchNorm cannot normalise a single example with batch statistics, and Dropout must be off);
* writing a state transition (EWC ``consolidate``, GPM bases, resets of SaRA or unfreezing schedules) back
  into the ``nnx.Optimizer`` (:func:`update_opt_state`)::

    update_opt_state(optimizer, consolidate_opt_state, params_of(model), fisher)

The transforms themselves stay free of Flax; only this module imports it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prox.transforms import ewc as ewc_lib
from prox.transforms import masking

PyTree = Any
Filter = Any

__all__ = [
    "classifier_logprob",
    "masked_module",
    "module_fisher",
    "module_logprob",
    "opt_state_of",
    "params_of",
    "set_opt_state",
    "update_opt_state",
]


def opt_state_of(optimizer: nnx.Optimizer | PyTree) -> PyTree:
  """The optimizer state as plain arrays: what ``tx.update`` sees inside ``nnx.Optimizer.update``.

  ``optimizer`` is an ``nnx.Optimizer``, its ``opt_state`` (``OptState`` variables) or an already pure
  state. Under ``nnx.jit`` the arrays are the traced values, so the result may be used inside the step.
  """
  state = optimizer.opt_state if isinstance(optimizer, nnx.Optimizer) else optimizer
  return nnx.as_pure(state)


def params_of(model: nnx.Module, wrt: Filter = nnx.Param) -> nnx.State:
  """The ``wrt`` variables of ``model`` as an ``nnx.State`` of arrays: the tree ``nnx.Optimizer`` passes to ``tx``.

  This is the ``params`` that the state transitions of :mod:`prox.transforms` expect
  (``consolidate_opt_state(opt_state, params, fisher)``); it matches the Fisher of :func:`module_fisher`.
  """
  return nnx.as_pure(nnx.state(model, wrt))


def _wrt(optimizer: Any, wrt: Filter | None) -> Filter:
  if wrt is not None:
    return wrt
  return optimizer.wrt if isinstance(optimizer, nnx.Optimizer) else nnx.Param


def masked_module(model: nnx.Module, optimizer: nnx.Optimizer | PyTree, *, hard: bool = False,
                  wrt: Filter | None = None) -> nnx.Module:
  """A view of ``model`` whose weights carry the masks of the sparsity state(s) in ``optimizer``.

  The view's ``wrt`` variables (default: the optimizer's ``wrt``, else ``nnx.Param``) hold

  * ``hard=False``: ``forward_params(w, opt_state)``, i.e. ``w * (m + (1 - m) * beta)`` on masked leaves
    (N:M with a decaying ``beta``, or ``w * m`` for pruning masks), with the straight-through derivative
    ``d w_fwd / d w = I`` (Bengio et al. 2013; SR-STE, Zhou et al. 2021; MdGf, Bambhaniya et al. 2024);
  * ``hard=True``: ``hard_masked_params(w, opt_state)``, ``w * m`` (evaluation with the final sparsity).

  Every other variable (BatchNorm statistics, RNG state, ...) is the module's own object, so updates made
  through the view (batch statistics in training mode) land in ``model``. Because of the straight-through
  derivative, the gradient w.r.t. the view's masked weights *is* the dense gradient that the transforms
  expect, so the view can be differentiated in place of the model::

    @nnx.jit
    def train_step(model, optimizer, metrics, batch, rngs):
      grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
      (loss, logits), grads = grad_fn(masked_module(model, optimizer), batch, rngs)
      optimizer.update(model, grads)

  and evaluated with the hard masks: ``eval_step(masked_module(model, optimizer, hard=True), ...)``. Leaves
  without a mask are passed through unchanged (the view then holds the same values as ``model``).

  Args:
    model: the module.
    optimizer: an ``nnx.Optimizer`` whose transform contains a sparsity state (a ``NamedTuple`` with a
      ``masks`` field, e.g. ``nm_sparsity``, ``gradual_pruning``, ``rigl``), its ``opt_state``, or a pure
      optimizer state.
    hard: hard masks (``beta = 0``) instead of the training forward pass.
    wrt: the variables the masks are shaped like (the optimizer's ``wrt``).

  Returns:
    An ``nnx.Module`` of the same type; ``model`` is not modified. Raises ``ValueError`` if the optimizer
    state holds no sparsity state.
  """
  wrt = _wrt(optimizer, wrt)
  opt_state = opt_state_of(optimizer)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  apply = masking.hard_masked_params if hard else masking.forward_params
  try:
    new_params = apply(nnx.as_pure(params), opt_state)
  except ValueError as e:
    if "no sparsity state" in str(e):
      raise ValueError(f"masked_module: the optimizer state holds no sparsity state (a NamedTuple with a "
                       f"'masks' field, e.g. from nm_sparsity, gradual_pruning or rigl): {e}") from None
    raise
  return nnx.merge(graphdef, new_params, rest)


def _eval_view(model: nnx.Module) -> nnx.Module:
  """``model`` in evaluation mode (``Module.eval()``'s attributes) without changing ``model``."""
  return nnx.with_attributes(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


@functools.lru_cache(maxsize=None)
def classifier_logprob(call: Callable[[nnx.Module, jax.Array], jax.Array] | None = None, *,
                       inputs: str = "image", labels: str = "label",
                       classes: str | None = None) -> Callable[[nnx.Module, Any], jax.Array]:
  """``log p(y | x)`` of ONE example for a classifier: ``log_softmax(call(model, x[None]))[0, y]``.

  An example is a mapping with keys ``inputs`` and ``labels`` (``{"image": x, "label": y}``) or a pair
  ``(x, y)``. ``call(model, images) -> logits`` runs the model on a batch (default ``model(images)``; for a
  model called as ``model(x, rngs)`` pass ``lambda model, x: model(x, None)``). ``classes``: the key of a
  boolean mask over the classes in each example (task-incremental learning: only the task's classes
  compete), ``log p(y | x) = z_y - log sum_{c in mask} exp z_c``. The same arguments return the same
  function object, so :func:`module_fisher` compiles once.
  """

  def logprob(model: nnx.Module, example: Any) -> jax.Array:
    if isinstance(example, Mapping):
      x, y = example[inputs], example[labels]
    else:
      if classes is not None:
        raise ValueError(f"classifier_logprob: classes={classes!r} needs examples that are mappings")
      x, y = example
    logits = model(x[None]) if call is None else call(model, x[None])
    logits = logits[0].astype(jnp.promote_types(logits.dtype, jnp.float32))
    if classes is not None:
      logits = jnp.where(example[classes], logits, -jnp.inf)
    return jax.nn.log_softmax(logits)[y]

  return logprob


def module_logprob(model: nnx.Module, logprob_fn: Callable[[nnx.Module, Any], jax.Array] | None = None, *,
                   wrt: Filter = nnx.Param) -> tuple[Callable[[PyTree, Any], jax.Array], nnx.State]:
  """A pure per-example log-probability of ``model`` in evaluation mode, and the parameters it takes.

  Returns ``(fn, params)`` with ``fn(params, example) = logprob_fn(model_eval(params), example)``, where
  ``model_eval`` is ``model`` in evaluation mode (Dropout off, BatchNorm with its running statistics: a
  single example has no batch statistics) with its ``wrt`` variables replaced by ``params``. ``fn`` is the
  ``logprob_fn`` that :func:`prox.transforms.ewc.diagonal_fisher` takes. ``logprob_fn`` defaults to
  :func:`classifier_logprob` ``()``.

  ``fn`` closes over the module's current non-``wrt`` state; build a new one after training further.
  :func:`module_fisher` compiles once per model structure instead.
  """
  logprob_fn = classifier_logprob() if logprob_fn is None else logprob_fn
  graphdef, params, rest = nnx.split(_eval_view(model), wrt, ...)
  rest = nnx.as_pure(rest)

  def fn(p: PyTree, example: Any) -> jax.Array:
    return logprob_fn(nnx.merge(graphdef, p, rest), example)

  return fn, nnx.as_pure(params)


@functools.partial(jax.jit, static_argnames=("graphdef", "logprob_fn", "minibatch_size", "chunk_size"))
def _module_fisher(graphdef: Any, params: PyTree, rest: PyTree, batch: PyTree, *, logprob_fn: Callable,
                   minibatch_size: int | None, chunk_size: int | None) -> PyTree:

  def fn(p: PyTree, example: Any) -> jax.Array:
    return logprob_fn(nnx.merge(graphdef, p, rest), example)

  return ewc_lib.diagonal_fisher(fn, params, batch, minibatch_size=minibatch_size, chunk_size=chunk_size)


def module_fisher(model: nnx.Module, batch: PyTree, *,
                  logprob_fn: Callable[[nnx.Module, Any], jax.Array] | None = None, wrt: Filter = nnx.Param,
                  minibatch_size: int | None = None, chunk_size: int | None = None) -> nnx.State:
  """The diagonal empirical Fisher of ``model`` in evaluation mode over ``batch`` (Kirkpatrick et al. 2017).

  ``F = 1/N sum_n (d log p(y_n | x_n) / d w)^2`` with per-example gradients, where ``log p`` is
  ``logprob_fn(model, example)`` (default :func:`classifier_logprob` ``()``) on the module in evaluation mode
  (Dropout off, BatchNorm on its running statistics), differentiated w.r.t. its ``wrt`` variables; ``batch``
  leaves have a leading axis of ``N`` examples (e.g. ``{"image": [N, H, W, C], "label": [N]}``). See
  :func:`prox.transforms.ewc.diagonal_fisher` for ``minibatch_size`` (Avalanche's mini-batch Fisher) and
  ``chunk_size`` (memory).

  Returns an ``nnx.State`` of arrays shaped like :func:`params_of` ``(model, wrt)``, which is what
  ``consolidate_opt_state`` and :func:`prox.transforms.ewc.ewc_lambda_range` take. Jitted once per model
  structure and ``logprob_fn`` (pass the same function object each time). ``model`` is not modified.
  """
  logprob_fn = classifier_logprob() if logprob_fn is None else logprob_fn
  graphdef, params, rest = nnx.split(_eval_view(model), wrt, ...)
  return _module_fisher(graphdef, nnx.as_pure(params), nnx.as_pure(rest), batch, logprob_fn=logprob_fn,
                        minibatch_size=minibatch_size, chunk_size=chunk_size)


def _first_difference(old: PyTree, new: PyTree) -> str | None:
  """The first path at which ``new`` differs from ``old`` in structure, shape or dtype (one line)."""
  old_leaves = jax.tree_util.tree_flatten_with_path(old)[0]
  new_leaves = jax.tree_util.tree_flatten_with_path(new)[0]
  for (po, lo), (pn, ln) in zip(old_leaves, new_leaves):
    if po != pn:
      return f"expected leaf {jax.tree_util.keystr(po)} but found {jax.tree_util.keystr(pn)}"
    if np.shape(lo) != np.shape(ln):
      return f"{jax.tree_util.keystr(po)}: shape {np.shape(ln)} != {np.shape(lo)}"
    if jnp.result_type(lo) != jnp.result_type(ln):
      return f"{jax.tree_util.keystr(po)}: dtype {jnp.result_type(ln)} != {jnp.result_type(lo)}"
  if len(old_leaves) != len(new_leaves):
    return f"{len(new_leaves)} leaves != {len(old_leaves)}"
  if jax.tree.structure(old) != jax.tree.structure(new):
    return f"tree structure {jax.tree.structure(new)} != {jax.tree.structure(old)}"
  return None


def set_opt_state(optimizer: nnx.Optimizer, opt_state: PyTree) -> None:
  """Writes ``opt_state`` (plain arrays) into ``optimizer.opt_state``, in place.

  The new state must have the structure, shapes and dtypes of the old one (every prox state transition
  keeps them, so the jitted train step does not recompile); the values are written into the optimizer's
  existing ``OptState`` variables, so this works eagerly and inside ``nnx.jit``. Raises ``ValueError``
  naming the first differing leaf otherwise.
  """
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(f"set_opt_state: expected an nnx.Optimizer, got {type(optimizer).__name__}")
  opt_state = nnx.as_pure(opt_state)
  bad = _first_difference(opt_state_of(optimizer), opt_state)
  if bad is not None:
    raise ValueError(f"set_opt_state: the new optimizer state does not match the optimizer's: {bad}")
  nnx.update(optimizer.opt_state, nnx.state(opt_state))


def update_opt_state(optimizer: nnx.Optimizer, fn: Callable[..., PyTree], *args: Any, **kwargs: Any) -> PyTree:
  """Applies a state transition to an ``nnx.Optimizer``: ``opt_state <- fn(opt_state, *args, **kwargs)``.

  ``fn`` receives and returns the pure optimizer state (:func:`opt_state_of`); the result is written back
  with :func:`set_opt_state` and returned. The transitions of :mod:`prox.transforms` fit as they are::

    update_opt_state(optimizer, consolidate_opt_state, params_of(model), fisher, learning_rate=lr)  # EWC
    update_opt_state(optimizer, gpm_update_opt_state, activations, threshold)                      # GPM
  """
  new_state = fn(opt_state_of(optimizer), *args, **kwargs)
  set_opt_state(optimizer, new_state)
  return new_state
