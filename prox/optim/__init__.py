"""Optimizers as pure optax transformations and batch-size controllers."""
