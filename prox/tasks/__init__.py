"""Data, task streams, teachers and other pure state machines."""
from prox.tasks._episodes import EpisodeState, EpisodicTeacher, episodic_teacher
from prox.tasks._grain import EpochOrder
from prox.tasks._sources import Batch, EpochSource, GrainSource, ParametricTaskSource, StreamSource, SubsetSource
from prox.tasks._sources import TaskSource
from prox.tasks._stages import Stage, StageMachine, StageState, ernie_tiny_stages, orca_stages, stage_machine
from prox.tasks._teachers import TeacherBank, stacked_teacher_bank, switched_teacher_bank
from prox.tasks._elastic_sampling import GapSamplerState, ProgressiveShrinking, RobustGapSampler, ShrinkingState
from prox.tasks._elastic_sampling import Subnet, progressive_shrinking, robust_gap_sampler, stack_subnets, take_subnet
from prox.tasks._mir import MIRResult, mir_retrieve
from prox.tasks._prototypes import BayesianPrototypes, BayesianPrototypesState, FeedbackSample, FeedbackState
from prox.tasks._prototypes import PrototypeFeedback, bayesian_prototypes, mixup_inputs, prototype_feedback
from prox.tasks._experts import TAME, TAMEState, TAMEUpdate, expert_losses, routed_apply, tame
from prox.tasks._budgets import BudgetSchedule, BudgetState, EntropyCurriculum, EntropyCurriculumState
from prox.tasks._budgets import budget_schedule, entropy_curriculum, predictive_entropy
from prox.tasks._curricula import BackwardInterval, IntervalState, StagedSampler, StagedSamplerState
from prox.tasks._curricula import backward_interval, difficulty_levels, staged_sampler
from prox.tasks._privacy import Unlearning, UnlearningState, dp_epsilon, dp_noise_multiplier
from prox.tasks._privacy import membership_advantage, membership_auc, unlearning

__all__ = [
    "Batch",
    "EpisodeState",
    "EpisodicTeacher",
    "EpochOrder",
    "EpochSource",
    "GrainSource",
    "ParametricTaskSource",
    "StreamSource",
    "SubsetSource",
    "TaskSource",
    "episodic_teacher",
    "GapSamplerState",
    "ProgressiveShrinking",
    "RobustGapSampler",
    "ShrinkingState",
    "Stage",
    "StageMachine",
    "StageState",
    "Subnet",
    "TeacherBank",
    "ernie_tiny_stages",
    "orca_stages",
    "progressive_shrinking",
    "robust_gap_sampler",
    "stack_subnets",
    "stacked_teacher_bank",
    "stage_machine",
    "switched_teacher_bank",
    "take_subnet",
    # continual learning: MIR retrieval, OnPro's feedback sampler, ProtoCL's prototypes, TAME's experts
    "MIRResult",
    "mir_retrieve",
    "BayesianPrototypes",
    "BayesianPrototypesState",
    "FeedbackSample",
    "FeedbackState",
    "PrototypeFeedback",
    "bayesian_prototypes",
    "mixup_inputs",
    "prototype_feedback",
    "TAME",
    "TAMEState",
    "TAMEUpdate",
    "expert_losses",
    "routed_apply",
    "tame",
    # compute budgets, backward intervals, staged difficulty sampling, privacy and unlearning
    "BudgetSchedule",
    "BudgetState",
    "EntropyCurriculum",
    "EntropyCurriculumState",
    "budget_schedule",
    "entropy_curriculum",
    "predictive_entropy",
    "BackwardInterval",
    "IntervalState",
    "StagedSampler",
    "StagedSamplerState",
    "backward_interval",
    "difficulty_levels",
    "staged_sampler",
    "Unlearning",
    "UnlearningState",
    "dp_epsilon",
    "dp_noise_multiplier",
    "membership_advantage",
    "membership_auc",
    "unlearning",
]
