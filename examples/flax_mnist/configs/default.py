"""Default hyperparameter configuration of the Flax NNX digits example.

``--config=configs/default.py:<transform>`` picks the prox transform (``none`` is plain optax); every field
can be overridden with ``--config.<field>=<value>``.
"""
from __future__ import annotations

import ml_collections


def get_config(transform: str = "none") -> ml_collections.ConfigDict:
  """Get the default hyperparameter configuration."""
  config = ml_collections.ConfigDict()
  # One of train.TRANSFORMS; "none" is plain optax.sgd (flax's examples/mnist).
  config.transform = transform
  # "single" (all ten digits), "continual" (digits 0-4 then 5-9, one optimizer throughout, a state
  # transition at the boundary) or "finetune" (pre-train on 0-4 with plain SGD, fine-tune on 5-9 with the
  # transform); "" picks the protocol of the transform (ewc, gpm: continual; sara, unfreezing: finetune).
  config.protocol = ""
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.batch_size = 32
  config.num_epochs = 10          # per task in the two-task protocols
  config.seed = 0
  # The CNN: conv(width) -> conv(2 width) -> dense(hidden) -> 10 logits, BatchNorm and Dropout.
  config.width = 16
  config.hidden = 64
  config.dropout = 0.05
  # Transform options.
  config.adagrad_norm_learning_rate = 1.0
  # SinkGD's step has RMS lr per entry; 6e-4 is the RMS of optax.sgd(learning_rate, momentum)'s step on the
  # dense kernels here (prox.optim.sinkgd.matching_learning_rate, mean over 10 epochs; README.md).
  config.sinkgd_learning_rate = 6e-4
  config.nm_n = 2
  config.nm_m = 4
  config.sparsity = 0.8           # gradual_pruning and rigl
  # EWC's lambda; None: sqrt(low * high) of the range ewc_lambda_range proposes at the task boundary.
  config.ewc_lambda = ml_collections.config_dict.placeholder(float)
  config.gpm_examples = 125       # examples whose layer inputs span GPM's bases
  config.sara_threshold = 0.05    # SaRA trains the weights with |w| below this (about a third here)
  config.unfreeze_interval = 1    # epochs between unfreezing the next group, head first
  return config


def metrics():
  return []
