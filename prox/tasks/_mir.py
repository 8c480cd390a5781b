"""Maximally interfered retrieval (MIR; Aljundi, Caccia, Belilovsky, Caccia, Lin, Charlin & Tuytelaars 2019,
"Online Continual Learning with Maximally Interfered Retrieval"), experience-replay form (ER-MIR).

Instead of replaying random memories, replay those that the coming update would hurt most. With the
incoming batch ``B_in``, the loss ``l(theta; x, y)`` and a learning rate ``alpha``:

1. virtual step: ``theta_v = theta - alpha grad_theta L(theta; B_in)``, ``L`` the mean loss over ``B_in``;
2. draw ``C`` candidates ``(x_c, y_c)`` uniformly from the replay memory;
3. interference score ``s_c = l(theta_v; x_c, y_c) - l(theta; x_c, y_c)`` (the loss increase);
4. retrieve the ``k`` candidates of largest ``s_c``; the real update then trains on ``B_in`` and them.

The reference implementation's real update is ``grad L(theta; B_in) + grad L(theta; B_mem)`` (two means
added, one SGD step), and its virtual step reuses the first gradient: :func:`mir_retrieve` returns it
(``MIRResult.grads``) so a step can do the same without a second backward pass over ``B_in``.

Everything is one pure, jittable function (the memory is prox's reservoir, :mod:`prox.tasks.replay`):
shapes are fixed by ``num_candidates`` and ``k``. While the memory holds fewer than ``C`` examples the
extra candidates are invalid (score ``-inf``); when fewer than ``k`` are valid the rest of the retrieved
rows come back marked invalid (``MIRResult.valid``), to be weighted 0 in the loss.

Departures: the reference code draws candidates only from earlier tasks (its buffer stores task ids);
the reservoir here holds no task ids, so candidates may come from the current task too (pass a memory of
earlier tasks only to match). The paper's virtual step is plain SGD with the real learning rate; for
another optimizer pass its step direction as ``grads`` with ``learning_rate=1`` (``theta_v = theta -
grads``), e.g. ``grads = -updates``. The generative-replay form (GEN-MIR) is not implemented.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prox.tasks.replay import ReservoirState, reservoir_sample

PyTree = Any


class MIRResult(NamedTuple):
  """What :func:`mir_retrieve` returns.

  Attributes:
    batch: the ``k`` retrieved memory examples (leaves ``[k, ...]``), most interfered first.
    valid: bool ``[k]``, False for rows that are not stored examples (memory holding fewer than ``k``).
    scores: float32 ``[k]``, their loss increases ``l(theta_v) - l(theta)`` (``-inf`` for invalid rows).
    grads: the gradient of the incoming batch's mean loss used for the virtual step (``grads`` as passed,
      or computed), for reuse in the real update.
  """
  batch: PyTree
  valid: jax.Array
  scores: jax.Array
  grads: PyTree


def mir_retrieve(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    memory: ReservoirState,
    key: jax.Array,
    *,
    num_candidates: int,
    k: int,
    learning_rate: float | jax.Array,
    grads: PyTree | None = None,
) -> MIRResult:
  """Retrieves the ``k`` of ``num_candidates`` random memories whose loss the virtual step raises most.

  Args:
    loss_fn: ``loss_fn(params, examples) -> [n]`` per-example losses (``examples`` leaves ``[n, ...]``,
      structured like the memory's examples).
    params: the current parameters ``theta``.
    batch: the incoming examples ``B_in`` (ignored when ``grads`` is given).
    memory: the replay memory (``prox.tasks.replay.reservoir_init`` / ``reservoir_add``).
    key: the candidates' draw.
    num_candidates: ``C``, ``1 <= C <= capacity`` (the reference code's ``subsample``, 50).
    k: memories retrieved, ``1 <= k <= C`` (its ``buffer_batch_size``, 10).
    learning_rate: ``alpha`` of the virtual step (the reference uses the real SGD learning rate).
    grads: ``grad_theta L(theta; B_in)`` if already computed; ``None`` computes it from ``batch``.

  Returns:
    A :class:`MIRResult`. Nothing in it carries gradients (``stop_gradient``); jittable with ``loss_fn``
    closed over or static.
  """
  cap = int(jax.tree.leaves(memory.data)[0].shape[0])
  for name, value, hi in (("num_candidates", num_candidates, cap), ("k", k, num_candidates)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= value <= hi:
      raise ValueError(f"mir_retrieve: {name} must be an int in [1, {hi}], got {value!r}")
  if grads is None:
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
  params = jax.lax.stop_gradient(params)
  grads = jax.lax.stop_gradient(grads)
  lr = jnp.asarray(learning_rate)
  virtual = jax.tree.map(lambda p, g: (p - lr.astype(p.dtype) * g.astype(p.dtype)).astype(p.dtype), params, grads)
  candidates, valid = reservoir_sample(memory, key, int(num_candidates))
  pre = jnp.asarray(loss_fn(params, candidates), jnp.float32)
  post = jnp.asarray(loss_fn(virtual, candidates), jnp.float32)
  if pre.shape != (num_candidates,):
    raise ValueError(f"mir_retrieve: loss_fn must return one loss per example, shape ({num_candidates},); "
                     f"got {pre.shape}")
  scores = jnp.where(valid, post - pre, -jnp.inf)
  top, idx = jax.lax.top_k(scores, int(k))
  retrieved = jax.tree.map(lambda x: x[idx], candidates)
  return MIRResult(batch=jax.lax.stop_gradient(retrieved), valid=valid[idx], scores=top, grads=grads)
