"""Data, task streams, teachers and other pure state machines."""
from prox.tasks._stages import Stage, StageMachine, StageState, ernie_tiny_stages, orca_stages, stage_machine
from prox.tasks._teachers import TeacherBank, stacked_teacher_bank, switched_teacher_bank

__all__ = [
    "Stage",
    "StageMachine",
    "StageState",
    "TeacherBank",
    "ernie_tiny_stages",
    "orca_stages",
    "stacked_teacher_bank",
    "stage_machine",
    "switched_teacher_bank",
]
