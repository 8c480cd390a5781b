"""prox: progressive training methods as pure optax transforms and state transitions.

Library parts (``prox.optim``, ``prox.transforms``, ``prox.tasks``) are pure functions on pytrees.
``prox.step`` composes them into one jitted, data-parallel training step.
"""

__version__ = "0.1.0"
