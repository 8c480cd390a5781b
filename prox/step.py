"""The data-parallel training step: ``TrainState`` and ``make_train_step``.

(Interface stub committed first so that other modules can be written against it; the implementation follows.)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any


class TrainState(NamedTuple):
  """Everything a training run carries from step to step; a pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: the trainable parameters (a plain pytree, e.g. from ``nnx.split``).
    opt_state: the optax state of the composed transform.
    model_state: non-trainable model variables (batch-norm statistics); ``{}`` if none.
    extra: the slot for state machines outside the gradient (batch-size controllers, teachers,
      penalties); any pytree, ``()`` if none.
    rng: a ``jax.random.key_data`` uint32 key array, split once per step.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  extra: PyTree
  rng: jax.Array
