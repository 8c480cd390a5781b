"""Gradient transformations: sparsity masks, unfreezing, continual-learning penalties."""
