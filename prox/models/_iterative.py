"""A small iterative, weight-tied classifier whose number of refinement steps is a traced argument.

The model refines a latent state with one shared cell and reads a prediction after every step::

    e   = tanh(E flatten(x) + b_E)                              input encoding (computed once)
    h_0 = e
    h_k = h_{k-1} + W_2 tanh(W_1 h_{k-1} + U e + b_1) + b_2     k = 1..K   (the same W_1, U, W_2 each step)
    z_k = W_o h_k + b_o                                          per-step logits
    q_k = w_q^T h_k + b_q                                        per-step halting logit (``halting=True``)

Example ``i`` may use ``n_i <= K`` steps (``steps``, a traced int or ``[m]`` ints): beyond ``n_i`` its
state is frozen, ``h_k = h_{n_i}`` for ``k > n_i``, so ``z_K`` is its prediction at its budget and the
per-step logits past the budget repeat it. A compute budget is thus applied per example without
recompiling (the compiled program always runs ``K = max_steps`` steps; the budget is what the
prediction may use). ``train_from = t`` (traced) trains only the steps ``t..K`` of the chain: the state
entering step ``t`` is a ``stop_gradient``, so the steps before it get no gradient through the state
(the backward interval of ``prox.tasks.backward_interval``; the input encoding ``e`` still reaches
every step through ``U e``, and ``train_from <= 1`` trains the whole chain).

The loop over steps is unrolled in Python (``K`` is small), so every call of the shared layers is a
``prox.taps`` tap: per-example gradient norms of the weight-tied cell are exact when the taps of one
kernel are summed before squaring (``prox.optim.per_example_grad_norms`` does this).

Works on any input shape (flattened): digits ``[8, 8, 1]``, MNIST-1D ``[40, 1]``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class IterativeOutput(NamedTuple):
  """What :meth:`IterativeClassifier.run` returns.

  Attributes:
    logits: float32 ``[m, K, C]``, the logits after each step ``k = 1..K`` (frozen past the budget).
    halt_logits: float32 ``[m, K]`` halting logits ``q_k`` (``None`` without a halting head).
    steps: int32 ``[m]``, the steps each example used.
  """
  logits: jax.Array
  halt_logits: jax.Array | None
  steps: jax.Array


class IterativeClassifier(nnx.Module):
  """A weight-tied refinement classifier (see the module docstring).

  Args:
    input_shape: the shape of one input (flattened).
    num_classes: ``C``.
    width: the state size.
    hidden: the cell's hidden size.
    max_steps: ``K``, the most steps a call can run.
    halting: add the halting head ``q_k``.
    rngs: ``nnx.Rngs``.
  """

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, hidden: int = 128,
               max_steps: int = 8, halting: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    for name, v in (("num_classes", num_classes), ("width", width), ("hidden", hidden),
                    ("max_steps", max_steps)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"IterativeClassifier: {name} must be a positive int, got {v!r}")
    n_in = int(np.prod(input_shape))
    self.max_steps = int(max_steps)
    self.encoder = nnx.Linear(n_in, width, dtype=dtype, rngs=rngs)
    self.cell_in = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
    self.cell_inject = nnx.Linear(width, hidden, use_bias=False, dtype=dtype, rngs=rngs)
    self.cell_out = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs,
                               kernel_init=nnx.initializers.variance_scaling(
                                   0.5 / max_steps, "fan_in", "truncated_normal"))
    self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)
    self.halt = nnx.Linear(width, 1, dtype=dtype, rngs=rngs) if halting else None

  def run(self, images: jax.Array, steps: Any = None, *, train_from: Any = None) -> IterativeOutput:
    """Runs ``K`` steps with per-example budgets ``steps`` (default ``K``; clipped to ``[1, K]``)."""
    m = images.shape[0]
    K = self.max_steps
    n = jnp.full((m,), K, jnp.int32) if steps is None else jnp.broadcast_to(
        jnp.clip(jnp.asarray(steps, jnp.int32), 1, K), (m,))
    start = None if train_from is None else jnp.asarray(train_from, jnp.int32)
    e = jnp.tanh(self.encoder(images.reshape(m, -1)))
    inject = self.cell_inject(e)
    h = e
    logits, halts = [], []
    for k in range(1, K + 1):
      if start is not None and k > 1:   # the state entering step train_from carries no gradient back
        h = jnp.where(k == start, jax.lax.stop_gradient(h), h)
      update = self.cell_out(jnp.tanh(self.cell_in(h) + inject))
      h = jnp.where((k <= n)[:, None], h + update, h)
      logits.append(self.head(h).astype(jnp.float32))
      if self.halt is not None:
        halts.append(self.halt(h)[:, 0].astype(jnp.float32))
    return IterativeOutput(logits=jnp.stack(logits, 1),
                           halt_logits=jnp.stack(halts, 1) if halts else None, steps=n)

  def __call__(self, images: jax.Array, steps: Any = None, *, train: bool = False,
               train_from: Any = None) -> jax.Array:
    """The per-step logits ``[m, K, C]`` (``prox.models.functional`` calls this with ``train``)."""
    del train  # no train/eval difference
    return self.run(images, steps, train_from=train_from).logits


def logits_at(per_step_logits: jax.Array, steps: jax.Array) -> jax.Array:
  """``[m, C]``: each example's logits after ``steps[i]`` steps (1-based) from ``[m, K, C]``."""
  K = per_step_logits.shape[1]
  idx = jnp.clip(jnp.asarray(steps, jnp.int32), 1, K) - 1
  idx = jnp.broadcast_to(idx, per_step_logits.shape[:1])
  return jnp.take_along_axis(per_step_logits, idx[:, None, None], 1)[:, 0]
