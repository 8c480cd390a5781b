"""Task-switch detection on the training loss (TAME, "task-agnostic continual learning with multiple experts",
Zhu et al. 2024), as a pure state machine.

The paper declares a switch when the loss deviates significantly from its recent history and gives no exact
test; this module uses a one-sided two-window z-test. With the last ``R + W`` losses
in chronological order, the *reference* window is the older ``R`` and the *test* window the newest ``W``:

    z = (mean(test) - mean(ref)) / (max(std(ref), min_std) * sqrt(1/W + 1/R))

(``std`` with Bessel's correction). A switch is flagged when ``z > threshold`` -- only increases count, since
a new task raises the loss while learning lowers it. Under i.i.d. Gaussian losses ``z`` is roughly standard
normal (nominal one-sided tail at 5: 3e-7 per step); the measured per-step false-alarm rates with the defaults
(``R = 50, W = 10, threshold = 5``; ``tests/tasks/test_shift_detector.py``) are about 1e-5 on Gaussian noise and
3e-4 on exponential (skewed, like mini-batch losses) noise, higher than nominal because ``std(ref)`` is
estimated from ``R`` samples; autocorrelated losses raise it further (AR(1) with rho = 0.5: ~1e-3), and a
falling training loss lowers it. A real task switch (the loss jumps from its trained level towards chance) gives
``z`` in the hundreds and is flagged within a step or two. After a flag the history is cleared: the next test
happens once ``R + W`` new losses have arrived (the new task's reference forms from its own losses, and a flag
cannot repeat at once), so ``R + W`` must be well below the number of steps per task.

Usage (e.g. to trigger ``prox.transforms.ewc.consolidate`` when task boundaries are unknown)::

  det = shift_detector(reference_window=50, test_window=10, threshold=5.0)
  ds = det.init()
  ds, switched = det.update(ds, loss)   # inside the jitted step; switched is a bool scalar
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ShiftDetectorState(NamedTuple):
  """State of ``shift_detector``.

  Attributes:
    history: float32 ``[R + W]``, the last losses, oldest first (only the newest ``count`` are valid).
    count: int32, number of losses since the last reset (saturates at ``R + W``).
    last_z: float32, the last test statistic (0 while the history is filling), for logging.
    num_switches: int32, number of switches flagged so far.
  """
  history: jax.Array
  count: jax.Array
  last_z: jax.Array
  num_switches: jax.Array


class ShiftDetector(NamedTuple):
  """``init() -> state`` and ``update(state, loss) -> (state, switched)``; both jittable and vmappable."""
  init: Callable[[], ShiftDetectorState]
  update: Callable[[ShiftDetectorState, jax.Array], tuple[ShiftDetectorState, jax.Array]]


def shift_detector(
    reference_window: int = 50,
    test_window: int = 10,
    threshold: float = 5.0,
    min_std: float = 1e-4,
) -> ShiftDetector:
  """A windowed one-sided z-test on a scalar loss stream (see the module docstring for the statistic).

  Args:
    reference_window: ``R``, number of older losses that form the reference (>= 2).
    test_window: ``W``, number of newest losses tested against it (>= 1).
    threshold: flag a switch when ``z > threshold`` (> 0).
    min_std: floor on the reference standard deviation, so a flat loss does not make every wiggle a switch.
  """
  for name, value, lo in (("reference_window", reference_window, 2), ("test_window", test_window, 1)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
      raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
  if not np.isfinite(threshold) or threshold <= 0:
    raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
  if not np.isfinite(min_std) or min_std < 0:
    raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}")
  r, w = int(reference_window), int(test_window)
  size = r + w

  def init() -> ShiftDetectorState:
    return ShiftDetectorState(history=jnp.zeros((size,), jnp.float32), count=jnp.zeros((), jnp.int32),
                              last_z=jnp.zeros((), jnp.float32), num_switches=jnp.zeros((), jnp.int32))

  def update(state: ShiftDetectorState, loss: jax.Array) -> tuple[ShiftDetectorState, jax.Array]:
    loss = jnp.asarray(loss, jnp.float32)
    finite = jnp.isfinite(loss)
    history = jnp.where(finite, jnp.concatenate([state.history[1:], loss[None]]), state.history)
    count = jnp.where(finite, jnp.minimum(state.count + 1, size), state.count)
    ref, test = history[:r], history[r:]
    std = jnp.maximum(jnp.std(ref, ddof=1), min_std)
    z = (jnp.mean(test) - jnp.mean(ref)) / (std * np.sqrt(1.0 / w + 1.0 / r))
    full = count >= size
    z = jnp.where(full, z, 0.0)
    switched = full & (z > threshold) & finite
    new = ShiftDetectorState(history=history, count=jnp.where(switched, 0, count), last_z=z,
                             num_switches=state.num_switches + switched.astype(jnp.int32))
    return new, switched

  return ShiftDetector(init, jax.jit(update))
