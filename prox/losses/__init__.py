"""Losses as pure functions on arrays: classification (weighted, masked heads, soft targets), distillation (logit, hidden-state), loss-mix schedules,
weak-to-strong preference learning and progressive (boosted) students.

Each loss returns one value per example, like optax's losses; imports only jax, optax and numpy.
"""
from prox.losses._classification import classification_eval, classification_loss, mask_logits
from prox.losses._distillation import (
    PreferencePairs,
    agreement_mask,
    boosted_distillation_loss,
    dense_conv_flops,
    distillation_loss,
    dpo_loss,
    ensemble_flops,
    ensemble_logits,
    hidden_distillation_loss,
    hidden_projection_init,
    kd_loss,
    loss_mix,
    preference_pairs,
    project_hidden,
    residual_loss,
    residual_target,
    sequence_log_prob,
    weak_to_strong_mask,
)

__all__ = [
    "classification_eval",
    "classification_loss",
    "mask_logits",
    "PreferencePairs",
    "agreement_mask",
    "boosted_distillation_loss",
    "dense_conv_flops",
    "distillation_loss",
    "dpo_loss",
    "ensemble_flops",
    "ensemble_logits",
    "hidden_distillation_loss",
    "hidden_projection_init",
    "kd_loss",
    "loss_mix",
    "preference_pairs",
    "project_hidden",
    "residual_loss",
    "residual_target",
    "sequence_log_prob",
    "weak_to_strong_mask",
]
