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
from prox.losses._grpo import LENGTH_SHAPES, budget_reward, group_advantages, grpo_loss, length_reward
from prox.losses._noprop import (
    NoPropSchedule,
    NoPropTerms,
    denoising_loss,
    noisy_embedding,
    noprop_infer,
    noprop_loss,
    noprop_schedule,
    prior_kl,
)
from prox.losses._reasoning import (
    halting_log_probs,
    interval_mask,
    interval_step_loss,
    per_step_cross_entropy,
    progressive_temperature_loss,
    progressive_temperatures,
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
    # continual learning: OnPro's prototype losses, the hypernetwork output regulariser, fixed class targets
    "mixup_cross_entropy",
    "online_prototypes",
    "onpro_equilibrium_loss",
    "prototype_contrastive_loss",
    "hypernet_output_regularizer",
    "cosine_target_logits",
    "language_target_loss",
    "target_head_init",
    # GRPO and compute budgets, per-step losses of iterative models, NoProp-DT
    "LENGTH_SHAPES",
    "budget_reward",
    "group_advantages",
    "grpo_loss",
    "length_reward",
    "NoPropSchedule",
    "NoPropTerms",
    "denoising_loss",
    "noisy_embedding",
    "noprop_infer",
    "noprop_loss",
    "noprop_schedule",
    "prior_kl",
    "halting_log_probs",
    "interval_mask",
    "interval_step_loss",
    "per_step_cross_entropy",
    "progressive_temperature_loss",
    "progressive_temperatures",
]
