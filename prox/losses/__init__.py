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
from prox.losses._onpro import mixup_cross_entropy, online_prototypes, onpro_equilibrium_loss
from prox.losses._onpro import prototype_contrastive_loss
from prox.losses._hypernet import hypernet_output_regularizer
from prox.losses._targets import cosine_target_logits, language_target_loss, target_head_init

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
    # continual learning: OnPro's prototype losses, the hypernetwork output regulariser, fixed class targets
    "mixup_cross_entropy",
    "online_prototypes",
    "onpro_equilibrium_loss",
    "prototype_contrastive_loss",
    "hypernet_output_regularizer",
    "cosine_target_logits",
    "language_target_loss",
    "target_head_init",
]
