"""Experiment ``distill``: progressive distillation (ERNIE-Tiny stages, progressive students, staged
teachers, weak-to-strong) on the one loop, on digits and MNIST-1D.

Expected effect, fixed before running and reported either way (a paired comparison over seeds): each
method does better than plain KD of the same student at equal steps. ERNIE-Tiny's four stages beat
one-stage task-specific KD and plain KD; an ensemble of k progressive students beats plain KD of one
student of equal FLOPs at equal total steps; Orca's weaker-then-strong teachers beat the strong teacher
alone; in weak-to-strong learning the agreement-filtered strong model beats the naively trained one
(filtered > naive) and the strong model beats its weak supervisor (strong > weak).
"""
