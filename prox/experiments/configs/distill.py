"""Experiment ``distill``: progressive distillation on digits and MNIST-1D: ERNIE-Tiny's four stages,
progressive students (a boosted ensemble), Orca's staged teachers and weak-to-strong learning, each
against plain training and plain KD of the same student at equal steps.

  prox --config=prox/experiments/configs/distill.py --workdir=runs/distill
  prox --config=prox/experiments/configs/distill.py --workdir=runs/distill_quick --config.quick=True
"""
import ml_collections


def _setting(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "distill"
  c.seed = 0
  c.num_seeds = 3
  c.datasets = "digits,mnist1d"        # comma-separated: digits, mnist1d
  c.methods = "ernie,pkd,orca,w2s"     # see distill.METHODS
  c.data_dir = ""
  # Per dataset: teacher and student models (the student has ~1/20 of the teacher's parameters), the
  # learning rates of the teacher, its fine-tuning and every student (cosine decay over the run, or over
  # each stage of a staged run), steps of each kind of run, and the widths of the progressive students
  # (the first is the student's own width).
  c.digits = _setting(
      teacher_model="mlp", teacher_kwargs=ml_collections.ConfigDict({"hidden": (512, 512)}),
      student_model="mlp", student_kwargs=ml_collections.ConfigDict({"hidden": (90, 90)}),
      teacher_learning_rate=1e-3, finetune_learning_rate=1e-4, learning_rate=1e-3,
      teacher_steps=1500,              # pretrained teacher: the augmented digits stream (all classes)
      weak_teacher_steps=100,          # Orca's weaker teacher: the pretrained teacher's checkpoint here
      finetune_steps=300,              # fine-tuned teacher: the task split, from the pretrained one
      student_steps=600,               # every student run (plain, KD, ERNIE-Tiny, Orca, one PKD student)
      pkd_widths=(90, 64, 45, 32),
      weak_steps=300)                  # weak-to-strong: the logistic-regression weak model
  c.mnist1d = _setting(
      teacher_model="cnn1d", teacher_kwargs=ml_collections.ConfigDict({"width": 48}),
      student_model="cnn1d", student_kwargs=ml_collections.ConfigDict({"width": 8}),
      teacher_learning_rate=3e-3, finetune_learning_rate=3e-4, learning_rate=1e-2,
      teacher_steps=2000, weak_teacher_steps=150, finetune_steps=300, student_steps=1000,
      pkd_widths=(8, 6, 5, 4),
      weak_steps=300)
  c.optimizer = "adam"
  c.batch_size = 128
  # Distillation loss: alpha T^2 KL(teacher || student at T) + (1 - alpha) CE (Hinton et al. 2015).
  c.temperature = 4.0
  c.alpha = 0.9
  # ERNIE-Tiny: fractions of the student's steps in general, general-enhanced and task-adaptive
  # distillation (task-specific takes the rest); weight of the latent loss in the last stage.
  c.ernie = ml_collections.ConfigDict({"fractions": (0.25, 0.25, 0.25), "latent_weight": 1.0})
  # Orca: fraction of the steps distilled from the weaker teacher before the strong one.
  c.orca = ml_collections.ConfigDict({"first_fraction": 0.5})
  # Weak-to-strong: the weak model's learning rate, few-shot examples per class for the strong model's
  # first answers, agreement rounds, then DPO on the strong model's own preference pairs.
  c.w2s = ml_collections.ConfigDict({
      "weak_learning_rate": 1e-2, "few_shot": 10, "few_shot_steps": 200, "rounds": 2, "dpo_steps": 200,
      "dpo_learning_rate": 1e-4,
      "dpo_beta": 0.1, "dpo_samples": 8, "min_confidence": 0.6, "weak_negative_confidence": 0.8})
  c.eval_every = 100                   # test accuracy curve of every run
  c.eval_batch_size = 500
  c.keep_run_checkpoints = False       # delete a finished run's checkpoints unless later runs read them
  c.quick = False                      # a small run (distill.QUICK), for tests
  return c
