"""The output regulariser of continual learning with hypernetworks (von Oswald, Henning, Grewe & Sacramento
2020, "Continual learning with hypernetworks"), used by Chandra et al. 2023's recurrent hypernetworks.

Learning task ``T`` with a hypernetwork ``h(e; Theta)`` (``prox.models.RecurrentHypernet``) minimises

    L_T(h(e_T; Theta)) + beta / (T - 1) sum_{t < T} || h(e_t; Theta) - h(e_t; Theta*) ||_2^2

with ``Theta*`` the hypernetwork's parameters before task ``T`` and the old embeddings ``e_t`` held fixed:
the generated weights of the old tasks stay where they were, whatever ``Theta`` learns for the new one. The
targets ``h(e_t; Theta*)`` are computed once at the task boundary (``[T, P]``, ``stop_gradient``) and kept,
e.g. in ``TrainState.extra``. von Oswald et al.'s look-ahead variant (evaluating the first term after a
candidate step ``Theta + Delta Theta``) is not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def hypernet_output_regularizer(
    outputs: jax.Array,
    targets: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
  """``sum_t w_t ||outputs_t - targets_t||^2 / sum_t w_t`` (0 when no weight); multiply by ``beta``.

  Args:
    outputs: ``[T, P]``, the hypernetwork's current outputs for the tasks' embeddings (e.g.
      ``hypernet_functional(model).flat(params, jnp.arange(T), stop_embedding=True)``).
    targets: ``[T, P]``, the outputs stored at the start of the current task (no gradient flows to them).
    weights: ``[T]``, 1 for the old tasks to protect (``t < current``), 0 for the others; default all 1.

  Returns:
    A float32 scalar.
  """
  outputs = jnp.asarray(outputs, jnp.float32)
  targets = jax.lax.stop_gradient(jnp.asarray(targets, jnp.float32))
  if outputs.shape != targets.shape or outputs.ndim != 2:
    raise ValueError(f"outputs and targets must both be [T, P], got {outputs.shape} and {targets.shape}")
  w = jnp.ones(outputs.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  sq = jnp.sum(jnp.square(outputs - targets), axis=1)
  total = jnp.sum(w)
  return jnp.sum(w * sq) / jnp.where(total > 0, total, 1.0)
