"""Task-agnostic continual learning with a bank of experts (TAME; Zhu, Majzoubi, Jain & Choromanska 2024,
"TAME: Task Agnostic Continual Learning using Multiple Experts"), as a pure state machine.

Training. One expert network is trained at a time (it lives in the step's ``params``). The training loss
goes through prox's shift detector (:mod:`prox.tasks.shift_detector`); when it flags a switch, the active
expert's weights are written back to its slot of the bank and

* if some live expert fits the new data (its loss on the current batch, ``expert_losses[e]``, is at most
  ``reuse_threshold``), training moves to the best such expert (a task seen before);
* otherwise a new expert is spawned in the next free slot: a copy of the active expert (``spawn="copy"``)
  or the fresh initialisation stored in that slot at ``init`` (``spawn="fresh"``);
* with the bank full (``max_experts``), training moves to the live expert of least loss (or stays on the
  active one when no ``expert_losses`` are given).

The bank is a tree of ``[E, ...]`` leaves (``E = max_experts``) plus the active index, so spawning is a
dynamic-slice write under ``lax.cond``: nothing changes shape or recompiles.

Inference. A selector network routes each input to an expert: it is trained on the replay memory, whose
examples carry the index of the expert that was active when they were stored, with
:func:`selector_loss` (cross-entropy over the live experts); at test time ``route`` takes the argmax over the
live experts and ``routed_apply`` runs the chosen expert per example.

Pruning (an option of prox's). ``prune(state, params, val_losses)`` drops every expert that another live expert
dominates on validation data: ``val_losses[e, v]`` is expert ``e``'s loss on validation set ``v`` (e.g. one
per expert, drawn from the memory), and ``e'`` dominates ``e`` when ``val_losses[e', v] <= val_losses[e, v]``
for all ``v``, strictly for one. A pruned expert's slot stays (no shape change) but it is no longer routed
to: ``route_to[e]`` names the dominating expert of least total loss, which the selector learns in its place.
The paper controls model size with online *weight* pruning of each expert and of the selector; that is not
this function (prox's magnitude pruning transforms do it).

Departures: whether an old expert fits the new data is decided here by one ``reuse_threshold`` on the batch
loss (``None``: never reuse, always spawn), a simple reading of the paper's switch back to a known task's
expert. The detector is prox's two-window z-test (the paper gives no exact test). Spawned slots are used in order and never
recycled after pruning, so memory labels stay meaningful.

After a step where ``update`` reports ``changed``, the optimizer state belongs to the previous expert:
reset it (``opt_state = tx.init(params)``, selected with ``jnp.where`` on ``changed`` inside a step).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.tasks.shift_detector import ShiftDetector, ShiftDetectorState, shift_detector

PyTree = Any


class TAMEState(NamedTuple):
  """State of :func:`tame`.

  Attributes:
    experts: the bank, leaves ``[E, ...]``. The active expert's slot is stale while it trains (its weights
      are the step's ``params``); ``bank(state, params)`` gives the up-to-date bank.
    active: int32, the expert being trained.
    num_experts: int32, slots used so far (``0 .. num_experts - 1``).
    alive: bool ``[E]``, used slots that were not pruned.
    route_to: int32 ``[E]``, the expert that serves a slot's data (itself unless pruned).
    detector: the shift detector's state.
  """
  experts: PyTree
  active: jax.Array
  num_experts: jax.Array
  alive: jax.Array
  route_to: jax.Array
  detector: ShiftDetectorState


class TAMEUpdate(NamedTuple):
  """What ``update`` returns beside the state: the parameters to train next and what happened."""
  params: PyTree
  switched: jax.Array   # bool: the detector flagged a task switch
  changed: jax.Array    # bool: params now hold another expert (reset the optimizer state)
  spawned: jax.Array    # bool: a new expert was created


class TAME(NamedTuple):
  """TAME's expert bank as pure functions (see the module docstring).

  Attributes:
    init: ``init(params, fresh=None) -> state``; ``fresh``: one tree like ``params`` or a list of ``E - 1``
      trees, the initialisations of slots ``1 ..`` (default: copies of ``params``).
    update: ``update(state, params, loss, expert_losses=None) -> (state, TAMEUpdate)``, once per step.
    bank: ``bank(state, params) -> experts`` with the active slot set to ``params``.
    expert: ``expert(state, params, index) -> params`` of one expert.
    route: ``route(state, selector_logits [B, E]) -> int32 [B]``, the live expert of largest logit.
    selector_loss: ``selector_loss(state, selector_logits, expert_labels, weights=None) -> [B]``.
    prune: ``prune(state, val_losses [E, V]) -> state``.
  """
  init: Callable[..., TAMEState]
  update: Callable[..., tuple[TAMEState, TAMEUpdate]]
  bank: Callable[[TAMEState, PyTree], PyTree]
  expert: Callable[[TAMEState, PyTree, jax.Array], PyTree]
  route: Callable[[TAMEState, jax.Array], jax.Array]
  selector_loss: Callable[..., jax.Array]
  prune: Callable[[TAMEState, jax.Array], TAMEState]


def _write(bank: PyTree, index: jax.Array, params: PyTree) -> PyTree:
  return jax.tree.map(lambda b, p: jax.lax.dynamic_update_index_in_dim(b, jnp.asarray(p, b.dtype), index, 0),
                      bank, params)


def _read(bank: PyTree, index: jax.Array) -> PyTree:
  return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, index, 0, keepdims=False), bank)


def tame(
    max_experts: int,
    *,
    detector: ShiftDetector | None = None,
    reuse_threshold: float | None = None,
    spawn: Literal["copy", "fresh"] = "copy",
) -> TAME:
  """TAME's expert bank, switch logic, selector loss and routing (see the module docstring).

  Args:
    max_experts: ``E``, the bank's size (>= 1).
    detector: the task-switch detector (default ``prox.tasks.shift_detector.shift_detector()``).
    reuse_threshold: on a switch, move to a live expert whose loss on the batch is at most this; ``None``
      never reuses (always spawns while there is room).
    spawn: ``"copy"``: a new expert starts from the active expert's weights; ``"fresh"``: from the slot's
      initialisation given to ``init``.
  """
  if not isinstance(max_experts, (int, np.integer)) or isinstance(max_experts, bool) or max_experts < 1:
    raise ValueError(f"max_experts must be a positive int, got {max_experts!r}")
  if spawn not in ("copy", "fresh"):
    raise ValueError(f"spawn must be 'copy' or 'fresh', got {spawn!r}")
  if reuse_threshold is not None and not np.isfinite(reuse_threshold):
    raise ValueError(f"reuse_threshold must be a finite number or None, got {reuse_threshold!r}")
  e_max = int(max_experts)
  det = shift_detector() if detector is None else detector
  slots = jnp.arange(e_max)

  def init(params: PyTree, fresh: PyTree | list[PyTree] | None = None) -> TAMEState:
    if fresh is None:
      rest = [params] * (e_max - 1)
    elif isinstance(fresh, (list, tuple)) and len(fresh) and jax.tree.structure(fresh[0]) == jax.tree.structure(params):
      if len(fresh) != e_max - 1:
        raise ValueError(f"fresh: need {e_max - 1} initialisations (slots 1..{e_max - 1}), got {len(fresh)}")
      rest = list(fresh)
    else:
      rest = [fresh] * (e_max - 1)
    trees = [params] + rest
    for t in trees[1:]:
      if jax.tree.structure(t) != jax.tree.structure(params) or any(
          jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(params))):
        raise ValueError("fresh initialisations must have the structure and shapes of params")
    experts = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)
    return TAMEState(experts=experts, active=jnp.zeros((), jnp.int32), num_experts=jnp.ones((), jnp.int32),
                     alive=slots == 0, route_to=slots.astype(jnp.int32), detector=det.init())

  def bank(state: TAMEState, params: PyTree) -> PyTree:
    return _write(state.experts, state.active, params)

  def expert(state: TAMEState, params: PyTree, index: jax.Array) -> PyTree:
    return _read(bank(state, params), jnp.asarray(index, jnp.int32))

  def update(state: TAMEState, params: PyTree, loss: jax.Array,
             expert_losses: jax.Array | None = None) -> tuple[TAMEState, TAMEUpdate]:
    detector_state, switched = det.update(state.detector, loss)
    state = state._replace(detector=detector_state)
    losses = None if expert_losses is None else jnp.asarray(expert_losses, jnp.float32)
    if losses is not None and losses.shape != (e_max,):
      raise ValueError(f"expert_losses must be [max_experts={e_max}], got shape {losses.shape}")

    def on_switch(operand):
      state, params = operand
      experts = _write(state.experts, state.active, params)
      if losses is None:
        best, fits = state.active, jnp.asarray(False)
      else:
        masked = jnp.where(state.alive, losses, jnp.inf)
        best = jnp.argmin(masked).astype(jnp.int32)
        fits = (masked[best] <= reuse_threshold) if reuse_threshold is not None else jnp.asarray(False)
      room = state.num_experts < e_max
      spawned = room & ~fits
      target = jnp.where(spawned, state.num_experts, best).astype(jnp.int32)
      if spawn == "copy":
        experts = jax.lax.cond(spawned, lambda e: _write(e, target, params), lambda e: e, experts)
      new = state._replace(experts=experts, active=target,
                           num_experts=state.num_experts + spawned.astype(jnp.int32),
                           alive=state.alive | (spawned & (slots == target)))
      return new, _read(experts, target), spawned

    def stay(operand):
      state, params = operand
      return state, params, jnp.asarray(False)

    before = state.active
    state, params_out, spawned = jax.lax.cond(switched, on_switch, stay, (state, params))
    changed = spawned | (state.active != before)
    return state, TAMEUpdate(params=params_out, switched=switched, changed=changed, spawned=spawned)

  def route(state: TAMEState, selector_logits: jax.Array) -> jax.Array:
    logits = jnp.asarray(selector_logits)
    return jnp.argmax(jnp.where(state.alive, logits, -jnp.inf), axis=-1).astype(jnp.int32)

  def selector_loss(state: TAMEState, selector_logits: jax.Array, expert_labels: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
    logits = jnp.where(state.alive, jnp.asarray(selector_logits, jnp.float32), -1e30)
    labels = state.route_to[jnp.asarray(expert_labels, jnp.int32)]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce if weights is None else ce * jnp.asarray(weights, jnp.float32)

  def prune(state: TAMEState, val_losses: jax.Array) -> TAMEState:
    val = jnp.asarray(val_losses, jnp.float32)
    if val.ndim != 2 or val.shape[0] != e_max:
      raise ValueError(f"val_losses must be [max_experts={e_max}, V], got shape {val.shape}")
    le = jnp.all(val[:, None, :] <= val[None, :, :], axis=-1)        # le[d, e]: d <= e everywhere
    lt = jnp.any(val[:, None, :] < val[None, :, :], axis=-1)
    pair = state.alive[:, None] & state.alive[None, :] & ~jnp.eye(e_max, dtype=bool)
    dominates = pair & le & lt                                         # dominates[d, e]
    dominated = jnp.any(dominates, axis=0) & (slots != state.active)
    total = jnp.sum(val, axis=1)
    best = jnp.argmin(jnp.where(dominates, total[:, None], jnp.inf), axis=0).astype(jnp.int32)
    new_target = jnp.where(dominated, best, slots).astype(jnp.int32)
    return state._replace(alive=state.alive & ~dominated, route_to=new_target[state.route_to])

  return TAME(init=init, update=jax.jit(update), bank=bank, expert=expert, route=route,
              selector_loss=selector_loss, prune=prune)


def expert_losses(loss_fn: Callable[[PyTree, PyTree], jax.Array], experts: PyTree, batch: PyTree) -> jax.Array:
  """``[E]``: ``loss_fn(expert_params, batch)`` (a scalar mean loss) of every expert of a bank, vmapped."""
  return jax.vmap(loss_fn, in_axes=(0, None))(experts, batch)


def routed_apply(apply_fn: Callable[[PyTree, jax.Array], jax.Array], experts: PyTree, indices: jax.Array,
                 inputs: jax.Array) -> jax.Array:
  """Each example through its expert: ``out[b] = apply_fn(experts[indices[b]], inputs[b:b+1])[0]``.

  Runs every expert on the whole batch (``vmap`` over the bank: ``E`` forward passes, no per-example
  parameter copies) and selects; ``apply_fn(params, inputs [B, ...]) -> [B, ...]``.
  """
  outs = jax.vmap(apply_fn, in_axes=(0, None))(experts, inputs)                  # [E, B, ...]
  idx = jnp.asarray(indices, jnp.int32)
  return jnp.take_along_axis(outs, idx.reshape((1, -1) + (1,) * (outs.ndim - 2)), axis=0)[0]
