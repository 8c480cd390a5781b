"""Gradient transformations: sparsity masks, unfreezing, continual-learning penalties."""
from prox.transforms.filters import all_of, any_of, by_name, by_ndim, by_regex, conv_kernels, dense_kernels
from prox.transforms.filters import kernels, negate, path_str, select, sparsity_summary
from prox.transforms.masking import find_mask_states, forward_params, hard_masked_params
from prox.transforms.masking import straight_through_scale
from prox.transforms.nm import NMSchedule, NMSparsityState, nm_mask, nm_masks, nm_schedule, nm_sparsity
from prox.transforms.nm import nm_filter, nm_skipped, structure_stages, training_steps
from prox.transforms.pruning import PruningState, erk_sparsities, gradual_pruning, layer_sparsities
from prox.transforms.pruning import polynomial_sparsity, rigl, sparse_evolutionary_training
from prox.transforms.sara import SaRAState
from prox.transforms.unfreeze import progressive_unfreezing
from prox.transforms.ewc import EWCState, consolidate, consolidate_opt_state, diagonal_fisher
from prox.transforms.ewc import EWCLambdaRange, ewc_lambda_range, ewc_penalty, find_ewc_state, sgd_stability_limit
from prox.transforms.gpm import GPMState, gpm_threshold, gpm_update_bases, gpm_update_opt_state
from prox.transforms._structured import ChannelAxis, ChannelGroup, ChannelPruningState, LinearOp, Structure
from prox.transforms._structured import apply_channel_masks, channel_importance, channel_pruning, check_structure
from prox.transforms._structured import expand_channel_masks, flops_budget_schedule, full_channel_masks, full_flops
from prox.transforms._structured import masked_flops, masked_param_count, slice_params
from prox.transforms._lapp import LAPP, bypass_apply, bypass_flops, bypass_init, lapp, lapp_hard_masks
from prox.transforms._lapp import lapp_scores, lapp_soft_masks
from prox.transforms._fedtiny import TopKBuffer, adaptive_bn_selection, adjust_count, grow_and_prune
from prox.transforms._fedtiny import magnitude_masks, random_layer_densities, topk_accumulate, topk_init
from prox.transforms._mas import mas, mas_importance
from prox.transforms._cuber import CUBERScores, CUBERState, cuber, cuber_correlation, cuber_scores
from prox.transforms._cuber import cuber_update_bases, find_cuber_state, replace_cuber_state
from prox.transforms._task_masks import TaskMasks, TaskMaskState, find_task_mask_state, mask_bytes, task_masks

# The factories `sara`, `ewc` and `gpm` share their modules' names; they are not re-exported here, so
# that `prox.transforms.sara` etc. stay the modules: `from prox.transforms.ewc import ewc`.

__all__ = [
    "adaptive_bn_selection",
    "adjust_count",
    "all_of",
    "any_of",
    "apply_channel_masks",
    "by_name",
    "by_ndim",
    "by_regex",
    "bypass_apply",
    "bypass_flops",
    "bypass_init",
    "channel_importance",
    "channel_pruning",
    "ChannelAxis",
    "ChannelGroup",
    "ChannelPruningState",
    "check_structure",
    "consolidate",
    "consolidate_opt_state",
    "conv_kernels",
    "cuber",
    "cuber_correlation",
    "cuber_scores",
    "cuber_update_bases",
    "CUBERScores",
    "CUBERState",
    "dense_kernels",
    "diagonal_fisher",
    "erk_sparsities",
    "ewc_lambda_range",
    "ewc_penalty",
    "EWCLambdaRange",
    "EWCState",
    "expand_channel_masks",
    "find_cuber_state",
    "find_ewc_state",
    "find_mask_states",
    "find_task_mask_state",
    "flops_budget_schedule",
    "forward_params",
    "full_channel_masks",
    "full_flops",
    "gpm_threshold",
    "gpm_update_bases",
    "gpm_update_opt_state",
    "GPMState",
    "gradual_pruning",
    "grow_and_prune",
    "hard_masked_params",
    "kernels",
    "LAPP",
    "lapp",
    "lapp_hard_masks",
    "lapp_scores",
    "lapp_soft_masks",
    "layer_sparsities",
    "LinearOp",
    "magnitude_masks",
    "mas",
    "mas_importance",
    "mask_bytes",
    "masked_flops",
    "masked_param_count",
    "negate",
    "nm_filter",
    "nm_mask",
    "nm_masks",
    "nm_schedule",
    "nm_skipped",
    "nm_sparsity",
    "NMSchedule",
    "NMSparsityState",
    "path_str",
    "polynomial_sparsity",
    "progressive_unfreezing",
    "PruningState",
    "random_layer_densities",
    "replace_cuber_state",
    "rigl",
    "SaRAState",
    "select",
    "sgd_stability_limit",
    "slice_params",
    "sparse_evolutionary_training",
    "sparsity_summary",
    "straight_through_scale",
    "Structure",
    "structure_stages",
    "task_masks",
    "TaskMasks",
    "TaskMaskState",
    "topk_accumulate",
    "topk_init",
    "TopKBuffer",
    "training_steps",
]
