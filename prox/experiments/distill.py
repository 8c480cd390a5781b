"""Experiment ``distill``: progressive distillation (ERNIE-Tiny stages, progressive students, staged
teachers, weak-to-strong) on the one loop, on digits and MNIST-1D.

Expected effect, fixed before running and reported either way (a paired comparison over seeds): each
method does better than plain KD of the same student at equal steps. ERNIE-Tiny's four stages beat
one-stage task-specific KD and plain KD; an ensemble of k progressive students beats plain KD of one
student of equal FLOPs at equal total steps; Orca's weaker-then-strong teachers beat the strong teacher
alone; in weak-to-strong learning the agreement-filtered strong model beats the naively trained one
(filtered > naive) and the strong model beats its weak supervisor (strong > weak).

  prox --config=prox/experiments/configs/distill.py --workdir=runs/distill

Data, per dataset (``config.datasets``): the *general* source is an unlimited stream of all classes
(digits: the augmented stream of the train split, ``StreamSource(train, seed)``; MNIST-1D: freshly
generated sequences, ``StreamSource(None, seed)``); the *task* is the train split itself (digits:
un-augmented images; MNIST-1D: the standard 4,000-sequence split), seen in epochs, and every accuracy
is on the test split. Models: the teacher and the student (~1/20 of the teacher's parameters) of the
dataset's config section.

Teachers, trained once per seed (one ``prox.loop`` run each, cached with ``common.run_once``): the
*pretrained* teacher on the general stream, its checkpoint after ``weak_teacher_steps`` as Orca's
*weaker* teacher, and the *fine-tuned* teacher (the pretrained one trained further on the task split).
Every student run is one loop run whose step holds the teachers in ``TrainState.extra`` (an argument of
the compiled step: one compile serves every seed) as a ``prox.tasks.switched_teacher_bank``, and
computes the teacher's logits inside the step. Every run decays its learning rate with a cosine over the
run, a staged run over each of its stages (as if each stage were its own run).

Runs (students: ``student_steps`` steps each, the same initialisation and data order per seed):

* ``plain``: cross-entropy on the task split. ``kd``: Hinton's loss ``alpha T^2 KL + (1 - alpha) CE``
  (Hinton, Vinyals, Dean 2015) with the fine-tuned teacher on the task split.
* ERNIE-Tiny (Su et al. 2021), ``ernie``: four stages (``prox.tasks.ernie_tiny_stages``) that change
  teacher, data and objective one at a time: general distillation (pretrained teacher, general data,
  latent loss) -> general-enhanced (fine-tuned teacher) -> task-adaptive (task data) -> task-specific
  (latent + soft + hard). The latent loss is ``MSE(h_S W + b, h_T)`` on the inputs of the heads
  (``prox.losses.hidden_distillation_loss``; ``W, b`` trained with the student and dropped after). The
  stage machine lives in ``extra`` and steps inside the compiled step (a transition); the loss reads
  the teacher index and the loss weights from it through ``ctx.extra``; before each step the host reads
  the stage and draws the batch from that stage's data source, whose index travels as the batch's
  metadata (the transition counts the samples per source and any batch from another source than the
  stage's). ``task_specific``: the last stage alone for all steps.
* Progressive students (Mamba PKD; Medina et al. 2025), ``pkd``: students ``k = 1..K`` of decreasing
  width (``pkd_widths``), student ``k`` trained with ``prox.losses.boosted_distillation_loss`` on what
  the teacher knows and the frozen ensemble ``F_{k-1}`` (earlier students, in ``extra``) does not;
  student 1 is the ``kd`` run. The ensemble of ``k`` students (summed logits, ``k * student_steps`` steps
  in all) is compared with one student of equal FLOPs (the width whose dense/conv FLOPs come closest)
  trained with plain KD for the same ``k * student_steps`` steps.
* Staged teachers (Orca; Mukherjee et al. 2023), ``orca``: KD from the weaker teacher for
  ``orca.first_fraction`` of the steps, then from the fine-tuned teacher (``prox.tasks.orca_stages``);
  the strong teacher alone is ``kd``.
* Weak-to-strong (Yang, Ma, Liu 2024; small analogue), ``w2s``: weak = logistic regression trained on
  the task split; strong = the student model, trained on the general stream with the weak model's
  labels, computed inside the step: (i) ``w2s_naive`` on every example; (ii) ``w2s_filtered_r``: only
  on examples where the weak label equals a reference strong model's answer
  (``prox.losses.weak_to_strong_mask``), the reference being the strong model trained on ``few_shot``
  labelled examples per class (the analogue of in-context answers) in round 1 and the previous round's
  model after (each round from the same initialisation); (iii) ``w2s_dpo``: from the last round, DPO
  (``prox.losses.dpo_loss``, the last round frozen as the reference) on pairs from the strong model's own
  samples (``prox.losses.preference_pairs``: its confident majority preferred to its minority or to a
  disagreeing weak label). ``w2s_ceiling``: the strong model on the stream with true labels.

Outputs in ``workdir``: ``results.md`` (tables, paired comparisons with the expected effects),
``results.json``, ``accuracy.png`` (every run), ``pkd_flops.png`` (ensemble accuracy against FLOPs),
``ernie_curves.png`` (test accuracy during the stages) and ``runs/<dataset>/<run>/seed<k>/``. A run
that finished is reused when the command is run again; runs whose parameters later runs read (teachers,
``kd``, progressive students, weak-to-strong rounds) keep their final checkpoint.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prox import loop
from prox import losses
from prox import models
from prox import step as step_lib
from prox import taps
from prox import tasks
from prox.checkpoint import Checkpointer
from prox.experiments import common
from prox.experiments import report
from prox.experiments.configs import distill as distill_config
from prox.tasks import data as data_lib

METHODS = ("ernie", "pkd", "orca", "w2s")
DATASETS = ("digits", "mnist1d")
QUICK = {"num_seeds": 1, "datasets": "digits", "eval_every": 1000,
         "digits.teacher_steps": 120, "digits.weak_teacher_steps": 20, "digits.finetune_steps": 20,
         "digits.student_steps": 40, "digits.pkd_widths": (90, 45), "digits.weak_steps": 40,
         "w2s.few_shot_steps": 20, "w2s.rounds": 1, "w2s.dpo_steps": 20}
RESUMABLE = ("num_seeds", "datasets", "methods", "eval_every", "eval_batch_size", "keep_run_checkpoints")
LOSS_TERMS = ("latent", "soft", "hard", "imitation")


# --- config --------------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the selected methods use; raises ``ConfigError`` naming the first bad one."""
  c = config
  common.positive_ints(c, "seed", zero_ok=True)
  common.positive_ints(c, "num_seeds", "eval_every", "eval_batch_size")
  common.names(c, "methods", METHODS)
  datasets = common.names(c, "datasets", DATASETS)
  common.choice(c, "optimizer", sorted(common.OPTIMIZERS))
  common.check_batch("batch_size", c.batch_size)
  common.check_batch("eval_batch_size", c.eval_batch_size)
  common.numbers(c, "temperature", low=0, low_open=True)
  common.numbers(c, "alpha", low=0, high=1)
  common.require(len(tuple(c.ernie.fractions)) == 3 and all(common.is_number(f) and f > 0 for f in c.ernie.fractions)
                 and sum(c.ernie.fractions) < 1,
                 f"ernie.fractions must be 3 numbers > 0 with a sum < 1 (the last stage takes the rest), got "
                 f"{tuple(c.ernie.fractions)!r}")
  common.numbers(c, "ernie.latent_weight", low=0)
  common.numbers(c, "orca.first_fraction", low=0, high=1, low_open=True, high_open=True)
  common.positive_ints(c, "w2s.few_shot", "w2s.few_shot_steps", "w2s.rounds", "w2s.dpo_steps", "w2s.dpo_samples")
  common.numbers(c, "w2s.weak_learning_rate", "w2s.dpo_learning_rate", "w2s.dpo_beta", low=0, low_open=True)
  common.library_check("w2s", losses.preference_pairs, np.zeros(1, np.int32), np.zeros((1, 2), np.int32),
                       min_confidence=c.w2s.min_confidence, weak_negative_confidence=c.w2s.weak_negative_confidence)
  for name in datasets:
    _validate_dataset(c, name)
  if workdir is not None:
    common.check_workdir(workdir)


def _validate_dataset(c: ml_collections.ConfigDict, name: str) -> None:
  shape = (8, 8, 1) if name == "digits" else (40, 1)
  s = c[name]
  for role in ("teacher", "student"):
    model = common.choice(c, f"{name}.{role}_model", models.MODELS)
    common.library_check(f"{name}.{role}_kwargs", models.check_options, model, input_shape=shape, num_classes=10,
                         **dict(s[f"{role}_kwargs"]))
  common.require(s.student_model in ("mlp", "cnn", "cnn1d"),
                 f"{name}.student_model must have a width (mlp, cnn or cnn1d), got {s.student_model!r}")
  common.numbers(c, f"{name}.teacher_learning_rate", f"{name}.finetune_learning_rate", f"{name}.learning_rate",
                 low=0, low_open=True)
  common.positive_ints(c, f"{name}.teacher_steps", f"{name}.weak_teacher_steps", f"{name}.finetune_steps",
                       f"{name}.student_steps", f"{name}.weak_steps")
  common.require(s.weak_teacher_steps < s.teacher_steps,
                 f"{name}.weak_teacher_steps ({s.weak_teacher_steps}) must be below {name}.teacher_steps "
                 f"({s.teacher_steps}): the weaker teacher is an earlier checkpoint")
  widths = tuple(s.pkd_widths)
  common.require(len(widths) >= 2 and all(common.is_int(w) and w > 0 for w in widths)
                 and widths[0] == student_width(s) and list(widths) == sorted(widths, reverse=True),
                 f"{name}.pkd_widths must be >= 2 non-increasing positive widths starting with the student's "
                 f"({student_width(s)}), got {widths!r}")
  steps = s.student_steps
  lengths = [int(f * steps) for f in c.ernie.fractions]
  common.require(min(lengths) >= 1 and sum(lengths) < steps and 1 <= int(c.orca.first_fraction * steps) < steps,
                 f"{name}.student_steps ({steps}) is too short for the ERNIE-Tiny and Orca stages")


# --- models ------------------------------------------------------------------------------------------

class Setting(NamedTuple):
  """One dataset: its config section and splits."""
  name: str
  c: ml_collections.ConfigDict
  train: data_lib.ArrayDataset
  test: data_lib.ArrayDataset

  def general(self, seed: int) -> tasks.StreamSource:
    """The general data: an unlimited stream of all classes (augmented digits, fresh MNIST-1D)."""
    return tasks.StreamSource(None if self.name == "mnist1d" else self.train, seed)

  def task(self, seed: int) -> tasks.EpochSource:
    """The task data: epochs of the train split."""
    return tasks.EpochSource(self.train, seed)


def student_width(s: ml_collections.ConfigDict) -> int:
  kwargs = dict(s.student_kwargs)
  if s.student_model == "mlp":
    return int(tuple(kwargs.get("hidden", (1024, 1024)))[0])
  return int(kwargs.get("width", 25 if s.student_model == "cnn1d" else 32))


def width_kwargs(s: ml_collections.ConfigDict, width: int) -> dict:
  """The student's options at another width (every hidden layer of an MLP, the channels of a CNN)."""
  kwargs = dict(s.student_kwargs)
  if s.student_model == "mlp":
    kwargs["hidden"] = (int(width),) * len(tuple(kwargs.get("hidden", (1024, 1024))))
  else:
    kwargs["width"] = int(width)
  return kwargs


def make_net(s: Setting, model: str, kwargs: dict, seed: int, *, abstract: bool = False) -> models.Functional:
  """The network; ``abstract``: its parameters as ``jax.ShapeDtypeStruct`` (no initialisation, for counting
  parameters and FLOPs)."""
  build = lambda: models.make_model(model, input_shape=s.train.images.shape[1:], num_classes=s.train.num_classes,
                                    seed=seed, **dict(kwargs))
  return models.functional(nnx.eval_shape(build) if abstract else build())


def with_features(apply: Callable) -> Callable:
  """``forward(params, model_state, x, *, train) -> (logits, features, model_state)``: ``features`` is the
  input of the model's ``head`` layer, ``[B, d]`` (read from the layer taps of ``prox.models.functional``:
  the tapped layers report their inputs to an active ``prox.taps`` recorder). Not for a step with
  ``example_stats`` (this recorder would hide the layers from the step's)."""

  def forward(params, model_state, x, *, train: bool):
    recorder = taps.Recorder()
    with taps.recording(recorder):
      logits, model_state = apply(params, model_state, x, train=train)
    heads = [t.inputs for t in recorder.taps if t.kernel_path[:1] == ("head",)]
    if not heads:
      raise ValueError("with_features: the model has no tapped layer named 'head'")
    return logits, heads[-1].reshape(x.shape[0], -1), model_state

  return forward


def forward_flops(net: models.Functional, input_shape: Sequence[int]) -> int:
  """FLOPs of one example's forward pass through the dense and conv layers
  (``prox.losses.dense_conv_flops``, the conv output positions read from the layer taps)."""
  recorder = taps.Recorder()
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with taps.recording(recorder):
    jax.eval_shape(lambda p, x: net.apply(p, net.model_state, x, train=False)[0], net.params, x)
  positions = {"".join(f"[{p!r}]" for p in tap.kernel_path): int(np.prod(shape[1:-1]))
               for tap, (shape, _) in zip(recorder.taps, recorder.output_shapes) if tap.kind == "conv"}
  return losses.dense_conv_flops(net.params, conv_positions=positions)


def feature_width(net: models.Functional, input_shape: Sequence[int]) -> int:
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return int(jax.eval_shape(lambda p, x: with_features(net.apply)(p, net.model_state, x, train=False)[1],
                            net.params, x).shape[-1])


# --- losses and the stage transition -------------------------------------------------------------------

def distill_loss(student_apply: Callable, bank: tasks.TeacherBank | None, machine: tasks.StageMachine, *,
                 temperature: float, alpha: float) -> Callable:
  """A ``prox.step`` loss: ``L = sum_n w_n(stage) mean_i l_n(i)`` over the machine's loss names.

  Terms (per example ``i``; ``z`` student logits, ``t`` teacher logits, ``h`` the heads' inputs):
  ``latent`` = ``||h_S W + b - h_T||^2 / d_T``, ``soft`` = ``T^2 KL(softmax(t/T) || softmax(z/T))``,
  ``hard`` = ``CE(y, z)``, ``imitation`` = ``alpha soft + (1 - alpha) hard``. The stage (its teacher
  index and weights ``w``) is ``ctx.extra["stage"]``; the teachers are ``ctx.extra["teachers"]`` (the
  state of ``bank``, teachers ``{"params", "model_state"}``). Parameters: ``{"student": ..., "proj": {W, b}}`` (the
  projection only with a latent term).
  """
  names = tuple(machine.loss_names)
  unknown = sorted(set(names) - set(LOSS_TERMS))
  if unknown:
    raise ValueError(f"distill_loss: unknown loss terms {unknown}; known: {LOSS_TERMS}")
  needs_teacher = bool(set(names) & {"latent", "soft", "imitation"})
  if needs_teacher and bank is None:
    raise ValueError(f"distill_loss: the terms {names} need a teacher bank")
  forward = with_features(student_apply)

  def loss_fn(params, model_state, batch, ctx):
    stage = ctx.extra["stage"]
    x, y = batch["image"], batch["label"]
    z, h, model_state = forward(params["student"], model_state, x, train=True)
    if needs_teacher:
      t, t_h = bank.apply(ctx.extra["teachers"], machine.teacher(stage), x)
    terms = {}
    if "latent" in names:
      terms["latent"] = losses.hidden_distillation_loss(h, t_h, params["proj"])
    if "soft" in names:
      terms["soft"] = losses.kd_loss(z, t, temperature=temperature)
    if "hard" in names:
      terms["hard"] = optax.softmax_cross_entropy_with_integer_labels(z, y)
    if "imitation" in names:
      terms["imitation"] = losses.distillation_loss(z, t, y, temperature=temperature, alpha=alpha)
    means = {n: jnp.mean(v) for n, v in terms.items()}
    weights = machine.weight_dict(stage)
    loss = sum(weights[n] * means[n] for n in names)
    accuracy = jnp.mean((jnp.argmax(z, -1) == y).astype(jnp.float32))
    return loss, ({"accuracy": accuracy, **{f"loss_{n}": v for n, v in means.items()}}, model_state)

  return loss_fn


def stage_transition(machine: tasks.StageMachine) -> step_lib.Transition:
  """Steps the stage machine in ``extra["stage"]`` after the update (counters after this step, the step's
  loss as its metric), adds the batch to ``extra["source_samples"][meta["source"]]`` and counts in
  ``extra["wrong_source"]`` a batch that came from another source than its stage's."""

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    extra = state.extra
    stage = extra["stage"]
    source = jnp.asarray(info.meta["source"], jnp.int32)
    size = jnp.asarray(info.batch_size, jnp.int32)
    counts = extra["source_samples"].at[source].add(size)
    wrong = extra["wrong_source"] + (source != machine.source(stage)).astype(jnp.int32)
    stage = machine.update(stage, step=info.step + 1, samples=info.samples + size, metric=info.loss)
    return state._replace(extra={**extra, "stage": stage, "source_samples": counts, "wrong_source": wrong})

  return transition


def pkd_loss(student_apply: Callable, previous_applies: Sequence[Callable], bank: tasks.TeacherBank, *,
             temperature: float, alpha: float) -> Callable:
  """Student ``k`` of the progressive ensemble: ``boosted_distillation_loss(z_k, F_{k-1}, t, y)`` with
  ``F_{k-1}`` the summed logits of the frozen earlier students ``ctx.extra["previous"]``."""

  def loss_fn(params, model_state, batch, ctx):
    x, y = batch["image"], batch["label"]
    t, _ = bank.apply(ctx.extra["teachers"], 0, x)
    previous = [jax.lax.stop_gradient(a(p["student"], {}, x, train=False)[0])
                for a, p in zip(previous_applies, ctx.extra["previous"])]
    f = sum(previous[1:], previous[0])
    z, model_state = student_apply(params["student"], model_state, x, train=True)
    loss = jnp.mean(losses.boosted_distillation_loss(z, f, t, y, temperature=temperature, alpha=alpha))
    hit = lambda logits: jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return loss, ({"accuracy": hit(z), "ensemble_accuracy": hit(f + z)}, model_state)

  return loss_fn


def w2s_loss(strong_apply: Callable, weak_apply: Callable) -> Callable:
  """Weak-to-strong stage I: cross-entropy against the weak model's answers ``a^w = argmax weak(x)``,
  over the examples ``weak_to_strong_mask`` keeps: all of them (``extra["filtered"]`` False) or those
  where ``a^w`` equals the reference strong model's answer (``extra["reference"]``). The batch's true
  labels only enter the metrics (the weak labels' accuracy on the kept examples)."""

  def loss_fn(params, model_state, batch, ctx):
    x = batch["image"]
    weak = jnp.argmax(weak_apply(ctx.extra["weak"]["student"], {}, x, train=False)[0], -1)
    reference = strong_apply(ctx.extra["reference"]["student"], {}, x, train=False)[0]
    keep = jnp.where(ctx.extra["filtered"], losses.weak_to_strong_mask(weak, reference, mode="filtered"), True)
    w = keep.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    z, model_state = strong_apply(params["student"], model_state, x, train=True)
    loss = jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(z, weak)) / count
    right = (weak == batch["label"]).astype(jnp.float32)
    return loss, ({"kept": jnp.mean(w), "kept_label_accuracy": jnp.sum(w * right) / count,
                   "accuracy": jnp.mean((jnp.argmax(z, -1) == batch["label"]).astype(jnp.float32))}, model_state)

  return loss_fn


def w2s_dpo_loss(strong_apply: Callable, weak_apply: Callable, *, samples: int, beta: float,
                 min_confidence: float, weak_negative_confidence: float) -> Callable:
  """Weak-to-strong stage II: DPO against the frozen reference ``extra["reference"]`` on preference pairs
  from the reference's own ``samples`` answers (categorical draws from its softmax) and the weak answer
  (``prox.losses.preference_pairs``); the mean over the examples that yield a pair."""

  def loss_fn(params, model_state, batch, ctx):
    x = batch["image"]
    weak = jnp.argmax(weak_apply(ctx.extra["weak"]["student"], {}, x, train=False)[0], -1).astype(jnp.int32)
    ref_logits = strong_apply(ctx.extra["reference"]["student"], {}, x, train=False)[0]
    key_draw, key_pair = jax.random.split(ctx.rng)
    draws = jax.random.categorical(key_draw, ref_logits, axis=-1, shape=(samples, x.shape[0])).T.astype(jnp.int32)
    pairs = losses.preference_pairs(weak, draws, key=key_pair, min_confidence=min_confidence,
                                    weak_negative_confidence=weak_negative_confidence)
    candidates = jnp.concatenate([draws, weak[:, None]], axis=1)
    chosen = jnp.take_along_axis(candidates, pairs.chosen[:, None], axis=1)[:, 0]
    rejected = jnp.take_along_axis(candidates, pairs.rejected[:, None], axis=1)[:, 0]
    z, model_state = strong_apply(params["student"], model_state, x, train=True)
    logp, ref_logp = jax.nn.log_softmax(z), jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits))
    at = lambda lp, a: jnp.take_along_axis(lp, a[:, None], axis=1)[:, 0]
    per_pair = losses.dpo_loss(at(logp, chosen), at(logp, rejected), at(ref_logp, chosen), at(ref_logp, rejected),
                               beta=beta)
    valid = pairs.valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid), 1.0)
    right = (chosen == batch["label"]).astype(jnp.float32)
    return jnp.sum(valid * per_pair) / count, (
        {"pairs": jnp.mean(valid), "chosen_accuracy": jnp.sum(valid * right) / count,
         "accuracy": jnp.mean((jnp.argmax(z, -1) == batch["label"]).astype(jnp.float32))}, model_state)

  return loss_fn


# --- the data source of a stage -------------------------------------------------------------------------

class SwitchedSource:
  """Batches from ``sources[index_of(context)]`` (default: source 0), each with ``meta={"source": int32
  index}``; the position is every source's position. With a stage machine in ``extra["stage"]``,
  ``index_of = stage_source(machine)`` reads the stage on the host before each step (one scalar from
  the device) and picks that stage's data source."""

  def __init__(self, sources: Sequence[Any], index_of: Callable[[Any], int] | None = None):
    self.sources = list(sources)
    self.index_of = index_of

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch | None:
    k = 0 if self.index_of is None else int(self.index_of(context))
    batch = self.sources[k].next(batch_size, context)
    return None if batch is None else tasks.Batch(batch.data, {"source": np.int32(k)}, batch.boundary)

  def get_state(self) -> dict:
    return {"sources": [s.get_state() for s in self.sources]}

  def set_state(self, state: dict) -> None:
    for source, position in zip(self.sources, state["sources"]):
      source.set_state(position)


def stage_source(machine: tasks.StageMachine) -> Callable[[Any], int]:
  """``context -> the data source of the current stage`` (a one-stage machine: its source, no read)."""
  if len(machine.stages) == 1:
    return lambda context: machine.stages[0].source

  def index_of(context: Any) -> int:
    stage = 0 if context is None else int(jax.device_get(context.state.extra["stage"].stage))
    return machine.stages[stage].source

  return index_of


# --- runs on the loop ------------------------------------------------------------------------------------

def optimizer(c: ml_collections.ConfigDict, learning_rate: float, steps: int,
              machine: tasks.StageMachine | None = None) -> optax.GradientTransformation:
  """``c.optimizer`` with a cosine decay over the run, or over each stage of ``machine`` (restarting
  at every stage boundary, as if each stage were its own run)."""
  return common.OPTIMIZERS[c.optimizer](stage_schedule(learning_rate, steps, machine))


def stage_schedule(learning_rate: float, steps: int, machine: tasks.StageMachine | None = None) -> optax.Schedule:
  """Cosine decay from ``learning_rate`` to 0 over each stage (stages end by step counts; the last takes
  the rest of the ``steps``)."""
  if machine is None or len(machine.stages) == 1:
    return optax.cosine_decay_schedule(learning_rate, steps)
  lengths = [st.steps for st in machine.stages[:-1]]
  if any(n is None for n in lengths) or sum(lengths) >= steps:
    raise ValueError(f"stage_schedule: stages must end by step counts within {steps} steps, got {lengths}")
  lengths.append(steps - sum(lengths))
  return optax.join_schedules([optax.cosine_decay_schedule(learning_rate, n) for n in lengths],
                              [int(b) for b in np.cumsum(lengths)[:-1]])


class Env(NamedTuple):
  """What every run of the sweep shares: config, mesh, compiled steps and evaluators, the workdir."""
  c: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  cache: loop.CompileCache
  memo: dict                     # built once: networks (per architecture), steps, evaluators


def memo(env: Env, key: Any, build: Callable[[], Any]) -> Any:
  if key not in env.memo:
    env.memo[key] = build()
  return env.memo[key]


def arch(env: Env, s: Setting, model: str, kwargs: dict) -> models.Functional:
  """The network of an architecture, built once, so its ``apply`` (and every step and evaluator that
  closes over it) is shared by all seeds; ``params(...)`` gives a seed's initialisation."""
  return memo(env, ("net", s.name, model, repr(sorted(dict(kwargs).items()))),
              lambda: make_net(s, model, kwargs, 0, abstract=True))


_PARAMS: dict = {}


def params(s: Setting, model: str, kwargs: dict, seed: int) -> Any:
  """A seed's initial parameters (host arrays), built once in one jitted call: one compile per
  architecture and seed, where building the model eagerly compiles every initialiser for every shape."""
  key = (s.name, model, repr(sorted(dict(kwargs).items())), tuple(s.train.images.shape[1:]), int(seed))
  if key not in _PARAMS:
    _PARAMS[key] = jax.device_get(jax.jit(lambda: make_net(s, model, kwargs, seed).params)())
  return _PARAMS[key]


def evaluate(env: Env, s: Setting, apply: Callable, params_tree: Any) -> float:
  """Test accuracy of ``apply`` (``apply(params, model_state, x, train)``) with ``params_tree``."""
  fn = memo(env, ("eval", id(apply)), lambda: common.evaluator(apply, env.mesh))
  state = common.replicated_state(params_tree, optax.identity(), env.mesh, seed=0)
  return fn(state, s.test, env.c.eval_batch_size)["accuracy"]


def fit(env: Env, run_dir: str, step: Callable, state: step_lib.TrainState, source: Any, num_steps: int,
        accuracy: Callable[[step_lib.TrainState], float], *, checkpoint_at: Sequence[int] = (),
        summary: Callable[[step_lib.TrainState], dict] | None = None) -> dict:
  """One run on ``prox.loop``: test accuracy every ``eval_every`` steps and at the end, checkpoints at
  ``checkpoint_at`` and at the end (a killed run resumes)."""

  def test(ctx: loop.Context) -> None:
    ctx.record.setdefault("curve", []).append([ctx.step, accuracy(ctx.state)])
    if ctx.out is not None:
      ctx.record.setdefault("train", []).append({"step": ctx.step, **common.scalars(ctx.out.metrics)})

  result = loop.run(step, state, source, mesh=env.mesh, batch_size=env.c.batch_size, num_steps=num_steps,
                    actions=((loop.Every(steps=env.c.eval_every, end=True), test),),
                    checkpoint_dir=os.path.join(run_dir, "checkpoints"),
                    checkpoint=loop.Every(at=frozenset(checkpoint_at)), keep_checkpoints=1 + len(checkpoint_at),
                    compile_cache=env.cache)
  curve = result.record["curve"]
  out = {"accuracy": curve[-1][1], "curve": curve, "train": result.record.get("train", []),
         "steps": int(jax.device_get(result.state.step)),
         "train_seconds": result.train_seconds, "compile_seconds": result.compile_seconds,
         "compiles": result.compiles}
  if summary is not None:
    out.update(summary(jax.device_get(result.state)))
  return out


def cached(env: Env, s: Setting, seed: int, name: str, fn: Callable[[str], dict], *, keep: bool = False
           ) -> tuple[str, dict]:
  """``fn(run_dir)`` once (``common.run_once``); its checkpoints are deleted afterwards unless ``keep``
  (later runs restore its parameters) or ``keep_run_checkpoints``."""
  run_dir = os.path.join(env.workdir, "runs", s.name, name, f"seed{seed}")
  record = {"dataset": s.name, "run": name, "seed": seed,
            "config": {k: v for k, v in env.c.to_dict().items() if k not in RESUMABLE}}
  out = common.run_once(run_dir, "distill", record, lambda: fn(run_dir))
  if not keep and not env.c.keep_run_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return run_dir, out


def restore(run_dir: str, target: step_lib.TrainState, step: int | None = None) -> step_lib.TrainState:
  """The run's state at ``step`` (default: its last checkpoint)."""
  with Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=10) as ckpt:
    return jax.device_get(ckpt.restore(target, step)[0])


class Teachers(NamedTuple):
  pretrained: Any
  weak: Any
  finetuned: Any
  accuracy: dict


def teachers(env: Env, s: Setting, seed: int) -> Teachers:
  """The pretrained (general stream), weaker (its early checkpoint) and fine-tuned (task split) teachers."""
  c, sc = env.c, s.c
  net = arch(env, s, sc.teacher_model, sc.teacher_kwargs)
  tx = optimizer(c, sc.teacher_learning_rate, sc.teacher_steps)
  step = memo(env, ("teacher", s.name), lambda: step_lib.make_train_step(
      losses.classification_loss(net.apply), tx, mesh=env.mesh))
  init = lambda: common.replicated_state(params(s, sc.teacher_model, sc.teacher_kwargs, seed), tx, env.mesh,
                                         seed=seed)
  acc = lambda state: evaluate(env, s, net.apply, state.params)
  run_dir, pre = cached(env, s, seed, "teacher", lambda d: fit(
      env, d, step, init(), s.general(seed), sc.teacher_steps, acc, checkpoint_at=(sc.weak_teacher_steps,)),
      keep=True)
  pretrained = restore(run_dir, init()).params
  weak = restore(run_dir, init(), sc.weak_teacher_steps).params
  tx_ft = optimizer(c, sc.finetune_learning_rate, sc.finetune_steps)
  step_ft = memo(env, ("finetune", s.name), lambda: step_lib.make_train_step(
      losses.classification_loss(net.apply), tx_ft, mesh=env.mesh))
  init_ft = lambda: common.replicated_state(pretrained, tx_ft, env.mesh, seed=seed)
  run_dir, ft = cached(env, s, seed, "teacher_finetuned", lambda d: fit(
      env, d, step_ft, init_ft(), s.task(seed), sc.finetune_steps, acc), keep=True)
  finetuned = restore(run_dir, init_ft()).params
  accuracy = {"pretrained": pre["accuracy"], "weak": evaluate(env, s, net.apply, weak),
              "finetuned": ft["accuracy"]}
  return Teachers(pretrained, weak, finetuned, accuracy)


def teacher_bank(env: Env, s: Setting, size: int) -> tasks.TeacherBank:
  """A bank of ``size`` teachers (``{"params", "model_state"}`` trees): a ``switched_teacher_bank`` over
  the tuple of teachers, whose ``lax.switch`` runs the selected teacher's forward on its parameters in
  place. (A ``stacked_teacher_bank`` slices the selected teacher out of the stacked parameters, a copy
  of all of its parameters in every step: 1.2 MB for the digits teacher, measured 6-10% of the step in
  ``benchmarks/distill_step.py``.) With one teacher the switch is a plain call."""
  net = arch(env, s, s.c.teacher_model, s.c.teacher_kwargs)
  forward = with_features(net.apply)
  apply = memo(env, ("teacher_forward", s.name), lambda: (
      lambda v, x: forward(v["params"], v["model_state"], x, train=False)[:2]))
  return memo(env, ("bank", s.name, size), lambda: tasks.switched_teacher_bank([apply] * size))


class Student(NamedTuple):
  """A student architecture: its network (built once), options and the apply function of the
  ``{"student": params}`` tree the runs train."""
  net: models.Functional
  model: str
  kwargs: dict
  apply: Callable


def student(env: Env, s: Setting, width: int | None = None, *, model: str | None = None,
            kwargs: dict | None = None) -> Student:
  """The student at ``width`` (default: its own), or another ``model`` with ``kwargs``."""
  if model is None:
    model, kwargs = s.c.student_model, width_kwargs(s.c, student_width(s.c) if width is None else width)
  net = arch(env, s, model, kwargs)
  wrapped = memo(env, ("student_apply", id(net.apply)), lambda: (
      lambda p, ms, x, *, train: net.apply(p["student"], ms, x, train=train)))
  return Student(net, model, dict(kwargs), wrapped)


def student_run(env: Env, s: Setting, seed: int, name: str, *, machine: tasks.StageMachine,
                sources: Sequence[Any], bank_params: Sequence[Any] = (), arch_: Student | None = None,
                steps: int | None = None, learning_rate: float | None = None, kind: str | None = None,
                keep: bool = False) -> tuple[dict, Callable[[], dict]]:
  """A student trained with ``distill_loss`` under ``machine`` (teachers ``bank_params`` in the state,
  data ``sources`` switched by the stage). Returns its result and a function that restores its final
  ``{"student": params}`` (for a run with ``keep``). ``kind`` names the compiled step (default ``name``):
  runs of one kind, architecture and length share it."""
  c, sc = env.c, s.c
  steps = sc.student_steps if steps is None else steps
  st = arch_ or student(env, s)
  tx = optimizer(c, learning_rate or sc.learning_rate, steps, machine)
  bank = teacher_bank(env, s, len(bank_params)) if bank_params else None
  latent = "latent" in machine.loss_names
  shape = s.train.images.shape[1:]
  step = memo(env, ("student", s.name, kind or name, st.model, repr(sorted(st.kwargs.items())), steps, learning_rate),
              lambda: step_lib.make_train_step(
                  distill_loss(st.net.apply, bank, machine, temperature=c.temperature, alpha=c.alpha), tx,
                  mesh=env.mesh, transition=stage_transition(machine)))

  def init() -> step_lib.TrainState:
    tree = {"student": params(s, st.model, st.kwargs, seed)}
    if latent:
      teacher_net = arch(env, s, sc.teacher_model, sc.teacher_kwargs)
      tree["proj"] = losses.hidden_projection_init(jax.random.key(seed), feature_width(st.net, shape),
                                                   feature_width(teacher_net, shape))
    extra = {"stage": machine.init(), "source_samples": np.zeros(len(sources), np.int32),
             "wrong_source": np.int32(0)}
    if bank is not None:
      extra["teachers"] = bank.init([{"params": p, "model_state": {}} for p in bank_params])
    return common.replicated_state(tree, tx, env.mesh, seed=seed, extra=extra)

  def summary(state: step_lib.TrainState) -> dict:
    return {"source_samples": np.asarray(state.extra["source_samples"]).tolist(),
            "wrong_source": int(state.extra["wrong_source"]), "final_stage": int(state.extra["stage"].stage)}

  source = SwitchedSource(sources, stage_source(machine))
  acc = lambda state: evaluate(env, s, st.apply, {"student": state.params["student"]})
  run_dir, out = cached(env, s, seed, name, lambda d: fit(env, d, step, init(), source, steps, acc,
                                                          summary=summary), keep=keep)
  return out, lambda: {"student": restore(run_dir, init()).params["student"]}


def machines(c: ml_collections.ConfigDict, s: Setting) -> dict[str, tasks.StageMachine]:
  """The stage machines of the student runs (loss names from ``LOSS_TERMS``). Teacher and source indices
  refer to each run's bank and source list (see :func:`method_runs`)."""
  steps = s.c.student_steps
  general, enhanced, adaptive = (int(f * steps) for f in c.ernie.fractions)
  last = {"latent": c.ernie.latent_weight, "soft": c.alpha, "hard": 1.0 - c.alpha}
  ernie = tasks.ernie_tiny_stages(general_steps=general, general_enhanced_steps=enhanced,
                                  task_adaptive_steps=adaptive, task_specific_weights=last)
  return {
      "plain": tasks.stage_machine([tasks.Stage(weights={"hard": 1.0})]),
      "kd": tasks.stage_machine([tasks.Stage(weights={"imitation": 1.0})]),
      "ernie": tasks.stage_machine(ernie),
      "task_specific": tasks.stage_machine([ernie[-1]]),
      "orca": tasks.stage_machine(tasks.orca_stages(first_steps=int(c.orca.first_fraction * steps))),
  }


# --- progressive students ---------------------------------------------------------------------------------

def ensemble_apply(applies: Sequence[Callable]) -> Callable:
  """``apply`` of the ensemble: the summed logits of the students' ``applies(params_k, ...)``."""

  def apply(params_tuple, model_state, x, *, train: bool):
    del train
    logits = [a(p, {}, x, train=False)[0] for a, p in zip(applies, params_tuple)]
    return sum(logits[1:], logits[0]), model_state

  return apply


def width_of_flops(env: Env, s: Setting, target: float) -> int:
  """The student width whose forward FLOPs come closest to ``target`` (FLOPs grow with the width)."""
  shape = s.train.images.shape[1:]
  flops = lambda w: memo(env, ("flops", s.name, w), lambda: forward_flops(
      make_net(s, s.c.student_model, width_kwargs(s.c, w), 0, abstract=True), shape))
  low, high = 1, max(2, student_width(s.c))
  while flops(high) < target:
    low, high = high, 2 * high
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if flops(mid) < target else (low, mid)
  return min((low, high), key=lambda w: abs(flops(w) - target))


def pkd_student_run(env: Env, s: Setting, seed: int, k: int, previous: Sequence[tuple[Student, dict]],
                    teacher_params: Any) -> tuple[dict, Callable[[], dict]]:
  """Progressive student ``k >= 2`` (width ``pkd_widths[k - 1]``) on the earlier students' ensemble."""
  c, sc = env.c, s.c
  st = student(env, s, sc.pkd_widths[k - 1])
  tx = optimizer(c, sc.learning_rate, sc.student_steps)
  bank = teacher_bank(env, s, 1)
  applies = [p.net.apply for p, _ in previous]
  step = memo(env, ("pkd", s.name, k), lambda: step_lib.make_train_step(
      pkd_loss(st.net.apply, applies, bank, temperature=c.temperature, alpha=c.alpha), tx, mesh=env.mesh))
  ens = memo(env, ("ensemble", s.name, k), lambda: ensemble_apply([p.apply for p, _ in previous] + [st.apply]))

  def init() -> step_lib.TrainState:
    extra = {"teachers": bank.init([{"params": teacher_params, "model_state": {}}]),
             "previous": tuple(p for _, p in previous)}
    return common.replicated_state({"student": params(s, st.model, st.kwargs, seed)}, tx, env.mesh, seed=seed,
                                   extra=extra)

  def summary(state: step_lib.TrainState) -> dict:
    members = tuple(p for _, p in previous) + ({"student": state.params["student"]},)
    return {"ensemble_accuracy": evaluate(env, s, ens, members)}

  acc = lambda state: evaluate(env, s, st.apply, {"student": state.params["student"]})
  run_dir, out = cached(env, s, seed, f"pkd_student{k}", lambda d: fit(
      env, d, step, init(), SwitchedSource([s.task(seed)]), sc.student_steps, acc, summary=summary),
      keep=k < len(sc.pkd_widths))
  return out, lambda: {"student": restore(run_dir, init()).params["student"]}


def pkd(env: Env, s: Setting, seed: int, t: Teachers, kd_out: dict, kd_params: Callable[[], dict],
        ms: dict) -> dict:
  """Ensembles of 1..K progressive students and single KD students of equal FLOPs (equal total steps)."""
  sc = s.c
  shape = s.train.images.shape[1:]
  widths = tuple(sc.pkd_widths)
  teacher_flops = forward_flops(make_net(s, sc.teacher_model, sc.teacher_kwargs, 0, abstract=True), shape)
  flops = [forward_flops(make_net(s, sc.student_model, width_kwargs(sc, w), 0, abstract=True), shape)
           for w in widths]
  previous = [(student(env, s, widths[0]), kd_params())]
  rows = [{"k": 1, "flops": flops[0], "ensemble_accuracy": kd_out["accuracy"], "single_width": widths[0],
           "single_flops": flops[0], "single_accuracy": kd_out["accuracy"], "student_accuracy": kd_out["accuracy"]}]
  for k in range(2, len(widths) + 1):
    out, final = pkd_student_run(env, s, seed, k, previous, t.finetuned)
    if k < len(widths):
      previous.append((student(env, s, widths[k - 1]), final()))
    total = float(sum(flops[:k]))
    width = width_of_flops(env, s, total)
    single, _ = student_run(env, s, seed, f"pkd_single{k}", machine=ms["kd"], bank_params=[t.finetuned],
                            sources=[s.task(seed)], arch_=student(env, s, width), steps=k * sc.student_steps,
                            kind="kd")
    rows.append({"k": k, "flops": total, "ensemble_accuracy": out["ensemble_accuracy"], "single_width": width,
                 "single_flops": forward_flops(make_net(s, sc.student_model, width_kwargs(sc, width), 0,
                                                        abstract=True), shape),
                 "single_accuracy": single["accuracy"], "student_accuracy": out["accuracy"]})
  return {"teacher_flops": teacher_flops, "rows": rows}


# --- weak-to-strong ---------------------------------------------------------------------------------------

WEAK = {"hidden": ()}   # logistic regression: the MLP without hidden layers


def few_shot_split(ds: data_lib.ArrayDataset, per_class: int, seed: int) -> data_lib.ArrayDataset:
  """``per_class`` random examples of every class (seeded)."""
  rng = np.random.default_rng((seed, 17))
  rows = np.concatenate([rng.permutation(np.flatnonzero(ds.labels == k))[:per_class] for k in range(ds.num_classes)])
  return ds._replace(images=ds.images[rows], labels=ds.labels[rows])


def w2s_run(env: Env, s: Setting, seed: int, name: str, *, weak: dict, reference: dict, filtered: bool,
            start: dict | None = None, dpo: bool = False, keep: bool = False) -> tuple[dict, Callable[[], dict]]:
  """The strong model on the general stream with the weak model's labels (stage I) or DPO (stage II)."""
  c, sc, w = env.c, s.c, env.c.w2s
  st = student(env, s)
  weak_net = arch(env, s, "mlp", WEAK)
  steps, lr = (w.dpo_steps, w.dpo_learning_rate) if dpo else (sc.student_steps, sc.learning_rate)
  tx = optimizer(c, lr, steps)

  def build():
    if dpo:
      loss = w2s_dpo_loss(st.net.apply, weak_net.apply, samples=w.dpo_samples, beta=w.dpo_beta,
                          min_confidence=w.min_confidence, weak_negative_confidence=w.weak_negative_confidence)
    else:
      loss = w2s_loss(st.net.apply, weak_net.apply)
    return step_lib.make_train_step(loss, tx, mesh=env.mesh)

  step = memo(env, ("w2s", s.name, dpo), build)

  def init() -> step_lib.TrainState:
    tree = start if start is not None else {"student": params(s, st.model, st.kwargs, seed)}
    extra = {"weak": weak, "reference": reference, "filtered": np.bool_(filtered)}
    return common.replicated_state(tree, tx, env.mesh, seed=seed, extra=extra)

  acc = lambda state: evaluate(env, s, st.apply, state.params)
  run_dir, out = cached(env, s, seed, name, lambda d: fit(env, d, step, init(), s.general(seed), steps, acc),
                        keep=keep)
  return out, lambda: restore(run_dir, init()).params


def w2s(env: Env, s: Setting, seed: int, ms: dict) -> dict:
  """Weak model, few-shot strong model, naive / filtered rounds / DPO, and the strong ceiling."""
  sc, w = s.c, env.c.w2s
  weak_arch = student(env, s, model="mlp", kwargs=WEAK)
  weak_out, weak_params = student_run(env, s, seed, "w2s_weak", machine=ms["plain"], sources=[s.task(seed)],
                                      arch_=weak_arch, steps=sc.weak_steps, learning_rate=w.weak_learning_rate,
                                      kind="plain", keep=True)
  shot_out, shot_params = student_run(
      env, s, seed, "w2s_few_shot", machine=ms["plain"], keep=True, steps=w.few_shot_steps, kind="plain",
      sources=[tasks.EpochSource(few_shot_split(s.train, w.few_shot, seed), seed)])
  ceiling, _ = student_run(env, s, seed, "w2s_ceiling", machine=ms["plain"], sources=[s.general(seed)],
                           kind="plain")
  weak = weak_params()
  out = {"weak": weak_out, "few_shot": shot_out, "ceiling": ceiling}
  out["naive"], _ = w2s_run(env, s, seed, "w2s_naive", weak=weak, reference=shot_params(), filtered=False)
  reference = shot_params()
  for r in range(1, w.rounds + 1):
    out[f"filtered{r}"], final = w2s_run(env, s, seed, f"w2s_filtered{r}", weak=weak, reference=reference,
                                         filtered=True, keep=True)
    reference = final()
  out["dpo"], _ = w2s_run(env, s, seed, "w2s_dpo", weak=weak, reference=reference, filtered=False,
                          start=reference, dpo=True)
  return out


# --- the sweep --------------------------------------------------------------------------------------------

def method_runs(env: Env, s: Setting, seed: int, methods: Sequence[str]) -> dict:
  """Every run of one dataset and seed. Banks and sources, in the machines' index order: ``kd`` and the
  progressive students [fine-tuned], ERNIE-Tiny [pretrained, fine-tuned] x [general, task], Orca
  [weaker, fine-tuned] x [task, task]."""
  t = teachers(env, s, seed)
  ms = machines(env.c, s)
  out: dict[str, Any] = {"teacher": t.accuracy}
  out["plain"], _ = student_run(env, s, seed, "plain", machine=ms["plain"], sources=[s.task(seed)])
  out["kd"], kd_params = student_run(env, s, seed, "kd", machine=ms["kd"], bank_params=[t.finetuned],
                                     sources=[s.task(seed)], keep=True)
  if "ernie" in methods:
    for name in ("task_specific", "ernie"):
      out[name], _ = student_run(env, s, seed, name, machine=ms[name], bank_params=[t.pretrained, t.finetuned],
                                 sources=[s.general(seed), s.task(seed)])
  if "orca" in methods:
    task = s.task(seed)
    out["orca"], _ = student_run(env, s, seed, "orca", machine=ms["orca"], bank_params=[t.weak, t.finetuned],
                                 sources=[task, task])
  if "pkd" in methods:
    out["pkd"] = pkd(env, s, seed, t, out["kd"], kd_params, ms)
  if "w2s" in methods:
    out["w2s"] = w2s(env, s, seed, ms)
  return out


def load(config: ml_collections.ConfigDict, name: str) -> Setting:
  try:
    train, test = (data_lib.load(name, split, data_dir=config.get("data_dir") or None) for split in ("train", "test"))
  except (ValueError, FileNotFoundError) as e:
    raise common.ConfigError(str(e)) from None
  return Setting(name, config[name], train, test)


def model_sizes(s: Setting) -> dict:
  shape = s.train.images.shape[1:]
  teacher = make_net(s, s.c.teacher_model, s.c.teacher_kwargs, 0, abstract=True)
  st = make_net(s, s.c.student_model, s.c.student_kwargs, 0, abstract=True)
  return {"teacher_params": models.param_count(teacher.params), "student_params": models.param_count(st.params),
          "teacher_flops": forward_flops(teacher, shape), "student_flops": forward_flops(st, shape),
          "weak_params": models.param_count(make_net(s, "mlp", WEAK, 0, abstract=True).params)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validate(config, workdir)
  methods = common.names(config, "methods", METHODS)
  env = Env(config, workdir, step_lib.data_mesh(), loop.CompileCache(), {})
  started = time.perf_counter()
  results: dict[str, Any] = {}
  sizes: dict[str, Any] = {}
  for name in common.names(config, "datasets", DATASETS):
    s = load(config, name)
    sizes[name] = model_sizes(s)
    results[name] = {}
    for seed in common.seeds(config):
      t0 = time.perf_counter()
      out = method_runs(env, s, seed, methods)
      results[name][str(seed)] = out
      shown = " ".join(f"{k}={out[k]['accuracy']:.4f}" for k in ("plain", "kd", "task_specific", "ernie", "orca")
                       if k in out)
      print(f"distill: {name} seed {seed}: teacher {out['teacher']['finetuned']:.4f} {shown} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  seconds = time.perf_counter() - started
  md = markdown(config, results, sizes, methods, seconds, command=command(config, workdir))
  figures = {"accuracy.png": lambda p: plot_accuracy(results, methods, p),
             "ernie_curves.png": lambda p: plot_curves(config, results, p)}
  if "pkd" in methods:
    figures["pkd_flops.png"] = lambda p: plot_pkd(results, p)
  report.write_results(workdir, {"config": config, "seconds": seconds, "model_sizes": sizes,
                                 "compiles": env.cache.count, "compile_seconds": env.cache.seconds,
                                 "results": results}, md, figures)
  headline = {"seconds": seconds, "compiles": env.cache.count}
  for name, by_seed in results.items():
    for run_name in ("plain", "kd", "task_specific", "ernie", "orca"):
      values = [r[run_name]["accuracy"] for r in by_seed.values() if run_name in r]
      if values:
        headline[f"{name}_{run_name}"] = float(np.mean(values))
  return headline


# --- report -----------------------------------------------------------------------------------------------

def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def command(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The command line that gives ``config``: ``prox`` with the config file, ``workdir`` and every field
  that differs from the file's defaults (the fields ``--config.quick=True`` sets, as that flag)."""
  default, given = _flat(distill_config.get_config().to_dict()), _flat(config.to_dict())
  quick = _flat(dict(QUICK)) if config.quick else {}
  changed = lambda k, v: quick[k] != v if k in quick else default.get(k, not v) != v
  args = ["prox", "--config=prox/experiments/configs/distill.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v!r}".replace(" ", "") for k, v in given.items() if k != "quick" and changed(k, v)]
  if config.quick:
    args.append("--config.quick=True")
  return " ".join(shlex.quote(a) for a in args)


def _per_seed(by_seed: dict, get: Callable[[dict], float | None]) -> dict[str, float]:
  out = {}
  for seed, r in by_seed.items():
    try:
      value = get(r)
    except (KeyError, IndexError, TypeError):
      value = None
    if value is not None:
      out[seed] = float(value)
  return out


def _runs(methods: Sequence[str], w2s_rounds: int) -> dict[str, Callable[[dict], float]]:
  """Named accuracies per seed result (the rows of the tables)."""
  get = {"plain": lambda r: r["plain"]["accuracy"], "kd": lambda r: r["kd"]["accuracy"]}
  if "ernie" in methods:
    get.update(task_specific=lambda r: r["task_specific"]["accuracy"], ernie=lambda r: r["ernie"]["accuracy"])
  if "orca" in methods:
    get["orca"] = lambda r: r["orca"]["accuracy"]
  if "pkd" in methods:
    get["pkd_ensemble"] = lambda r: r["pkd"]["rows"][-1]["ensemble_accuracy"]
    get["pkd_single"] = lambda r: r["pkd"]["rows"][-1]["single_accuracy"]
  if "w2s" in methods:
    get["w2s_weak"] = lambda r: r["w2s"]["weak"]["accuracy"]
    get["w2s_few_shot"] = lambda r: r["w2s"]["few_shot"]["accuracy"]
    get["w2s_naive"] = lambda r: r["w2s"]["naive"]["accuracy"]
    for k in range(1, w2s_rounds + 1):
      get[f"w2s_filtered{k}"] = lambda r, k=k: r["w2s"][f"filtered{k}"]["accuracy"]
    get["w2s_dpo"] = lambda r: r["w2s"]["dpo"]["accuracy"]
    get["w2s_ceiling"] = lambda r: r["w2s"]["ceiling"]["accuracy"]
  return get


def _comparisons(methods: Sequence[str], rounds: int, widths: int) -> list[tuple[str, str, str, bool]]:
  """``(ours, baseline, what, expected)``: ``expected`` marks the effects fixed before running."""
  out = [("kd", "plain", "plain KD vs plain training", False)]
  if "ernie" in methods:
    out += [("ernie", "kd", "ERNIE-Tiny 4 stages vs plain KD", True),
            ("ernie", "task_specific", "ERNIE-Tiny 4 stages vs one-stage task-specific KD", True),
            ("ernie", "plain", "ERNIE-Tiny 4 stages vs plain training", False),
            ("task_specific", "kd", "task-specific KD (latent + soft + hard) vs plain KD", False)]
  if "pkd" in methods:
    out += [(f"pkd_ensemble{k}", f"pkd_single{k}", f"ensemble of {k} progressive students vs one KD student of "
             f"equal FLOPs ({k}x steps)", True) for k in range(2, widths + 1)]
    out += [(f"pkd_ensemble{widths}", "kd", f"ensemble of {widths} progressive students vs plain KD of student 1",
             False), (f"pkd_ensemble{widths}", "plain", f"ensemble of {widths} vs plain training of student 1", False)]
  if "orca" in methods:
    out += [("orca", "kd", "Orca weaker-then-strong teacher vs the strong teacher only", True),
            ("orca", "plain", "Orca vs plain training", False)]
  if "w2s" in methods:
    last = f"w2s_filtered{rounds}"
    out += [(last, "w2s_naive", f"weak-to-strong: filtered ({rounds} rounds) vs naive", True),
            ("w2s_naive", "w2s_weak", "weak-to-strong: naive strong vs weak", True),
            (last, "w2s_weak", "weak-to-strong: filtered strong vs weak", True),
            ("w2s_dpo", last, "weak-to-strong: + DPO vs filtered", False),
            ("w2s_dpo", "w2s_weak", "weak-to-strong: + DPO vs weak", False)]
  return out


def _values(by_seed: dict, name: str, getters: dict) -> dict[str, float]:
  """Accuracies per seed of a named run; ``pkd_ensemble<k>`` / ``pkd_single<k>``: row ``k`` of the
  progressive-students table."""
  match = re.fullmatch(r"pkd_(ensemble|single)(\d+)", name)
  if match:
    field, k = f"{match.group(1)}_accuracy", int(match.group(2))
    return _per_seed(by_seed, lambda r: r["pkd"]["rows"][k - 1][field])
  return _per_seed(by_seed, getters[name])


def _pct(values: dict | Sequence[float]) -> str:
  values = list(values.values()) if isinstance(values, dict) else list(values)
  return report.fmt_mean_std(values, percent=True, digits=1) if values else "n/a"


def markdown(c: ml_collections.ConfigDict, results: dict, sizes: dict, methods: Sequence[str], seconds: float,
             *, command: str = "") -> str:
  names = list(results)
  rounds = c.w2s.rounds
  getters = _runs(methods, rounds)
  lines = ["# distill: progressive distillation on the one loop", "",
           "Expected effect, fixed before running (module docstring): each method beats plain KD of the same "
           "student at equal steps (ERNIE-Tiny vs one-stage task-specific KD and plain KD; k progressive "
           "students vs one KD student of equal FLOPs at equal total steps; Orca vs the strong teacher "
           "alone); weak-to-strong: filtered > naive and strong > weak.", "",
           *([f"Command: `{command}`", ""] if command else []),
           f"{c.num_seeds} seed(s) per dataset, mean ± std of the test accuracy (%); paired comparisons by seed "
           f"(same initialisation and data order): mean difference in points, Student-t 95% interval, verdict "
           f"(`better`/`worse` when the interval excludes 0). Adam, cosine decay, batch {c.batch_size}; "
           f"T = {c.temperature:g}, alpha = {c.alpha:g}. Sweep {seconds:.0f} s.", "", "## Models and teachers", ""]
  rows = []
  for n in names:
    z, sc = sizes[n], c[n]
    by_seed = results[n]
    rows.append([n, f"{sc.teacher_model} {dict(sc.teacher_kwargs)}", f"{z['teacher_params']:,}",
                 f"{sc.student_model} {dict(sc.student_kwargs)}", f"{z['student_params']:,}",
                 f"1/{z['teacher_params'] / z['student_params']:.1f}",
                 _pct(_per_seed(by_seed, lambda r: r["teacher"]["pretrained"])),
                 _pct(_per_seed(by_seed, lambda r: r["teacher"]["weak"])),
                 _pct(_per_seed(by_seed, lambda r: r["teacher"]["finetuned"]))])
  lines += [report.markdown_table(["dataset", "teacher", "params", "student", "params", "ratio",
                                   "pretrained teacher", f"weaker teacher (early)", "fine-tuned teacher"], rows), ""]
  steps = ", ".join(f"{n}: teacher {c[n].teacher_steps} (weaker at {c[n].weak_teacher_steps}), fine-tuning "
                    f"{c[n].finetune_steps}, every student {c[n].student_steps}" for n in names)
  lines += [f"Steps: {steps}.", "", "## Test accuracy (%)", ""]
  header = ["run"] + names
  lines += [report.markdown_table(header, [[r] + [_pct(_per_seed(results[n], getters[r])) for n in names]
                                           for r in getters]), ""]
  lines += ["## Paired comparisons", ""]
  rows = []
  for ours, base, what, expected in _comparisons(methods, rounds, max(len(c[n].pkd_widths) for n in names)):
    for n in names:
      a, b = _values(results[n], ours, getters), _values(results[n], base, getters)
      if not a or not b:
        continue
      comp = report.paired_comparison(a, b)
      held = ("yes" if comp["verdict"] == "better" else "no") if expected else ""
      rows.append([what, n, f"{100 * comp['diff_mean']:+.2f}", f"{100 * comp['ci95'][0]:+.2f} to "
                   f"{100 * comp['ci95'][1]:+.2f}", f"{comp['wins']}/{comp['num_pairs']}", comp["verdict"], held])
  lines += [report.markdown_table(["comparison", "dataset", "diff (points)", "95% CI", "wins", "verdict",
                                   "expected effect held"], rows), ""]
  if "ernie" in methods:
    lines += _ernie_md(c, results, names)
  if "pkd" in methods:
    lines += _pkd_md(results, names)
  if "w2s" in methods:
    lines += _w2s_md(c, results, names)
  return "\n".join(lines) + "\n"


def _ernie_md(c, results: dict, names: list[str]) -> list[str]:
  lines = ["## ERNIE-Tiny: the stages in the step", ""]
  for n in names:
    steps = c[n].student_steps
    lengths = [int(f * steps) for f in c.ernie.fractions]
    samples = [r["ernie"]["source_samples"] for r in results[n].values() if "ernie" in r]
    wrong = sum(r["ernie"]["wrong_source"] for r in results[n].values() if "ernie" in r)
    lines.append(f"- {n}: stages of {lengths + [steps - sum(lengths)]} steps; samples per source "
                 f"(general, task) {samples[0] if samples else 'n/a'}, batches from another source than their "
                 f"stage: {wrong}.")
  return lines + [""]


def _pkd_md(results: dict, names: list[str]) -> list[str]:
  lines = ["## Progressive students: ensemble accuracy against FLOPs", ""]
  for n in names:
    by_seed = list(results[n].values())
    first = by_seed[0]["pkd"]
    rows = []
    for i, row in enumerate(first["rows"]):
      get = lambda field: [r["pkd"]["rows"][i][field] for r in by_seed]
      rows.append([row["k"], f"{row['flops']:,.0f}", f"{100 * row['flops'] / first['teacher_flops']:.1f}",
                   _pct(get("ensemble_accuracy")), _pct(get("student_accuracy")), row["single_width"],
                   f"{row['single_flops']:,.0f}", _pct(get("single_accuracy"))])
    lines += [f"{n} (teacher {first['teacher_flops']:,} FLOPs per example):", "",
              report.markdown_table(["k", "ensemble FLOPs", "% of teacher", "ensemble of k (%)",
                                     "student k alone (%)", "single width", "single FLOPs", "single KD (%)"], rows), ""]
  return lines


def _w2s_md(c, results: dict, names: list[str]) -> list[str]:
  lines = ["## Weak-to-strong", ""]
  rows = []
  for n in names:
    by_seed = list(results[n].values())
    for k in range(1, c.w2s.rounds + 1):
      kept = [np.mean([t["kept"] for t in r["w2s"][f"filtered{k}"]["train"]]) for r in by_seed]
      right = [np.mean([t["kept_label_accuracy"] for t in r["w2s"][f"filtered{k}"]["train"]]) for r in by_seed]
      rows.append([n, f"filtered round {k}", _pct(kept), _pct(right)])
    naive = [np.mean([t["kept_label_accuracy"] for t in r["w2s"]["naive"]["train"]]) for r in by_seed]
    rows.append([n, "naive (all)", "100.0", _pct(naive)])
    pairs = [np.mean([t["pairs"] for t in r["w2s"]["dpo"]["train"]]) for r in by_seed]
    chosen = [np.mean([t["chosen_accuracy"] for t in r["w2s"]["dpo"]["train"]]) for r in by_seed]
    rows.append([n, "DPO pairs", _pct(pairs), f"{_pct(chosen)} (chosen answer right)"])
  lines += ["Training examples kept and the accuracy of their weak labels (true labels used only for this "
            "diagnostic; mean over the logged steps):", "",
            report.markdown_table(["dataset", "stage", "kept (%)", "weak labels right (%)"], rows), ""]
  rows = []
  for n in names:
    by_seed = list(results[n].values())
    spans = [r["w2s"]["ceiling"]["accuracy"] - r["w2s"]["weak"]["accuracy"] for r in by_seed]
    gap = lambda key: [(r["w2s"][key]["accuracy"] - r["w2s"]["weak"]["accuracy"]) / span
                       for r, span in zip(by_seed, spans)]
    undefined = sum(span <= 0 for span in spans)
    rows.append([n] + [f"undefined (ceiling <= weak in {undefined}/{len(spans)} seeds)" if undefined
                       else report.fmt_mean_std(gap(k), digits=2) for k in ("naive", f"filtered{c.w2s.rounds}", "dpo")])
  lines += ["Performance gap recovered, (strong - weak) / (ceiling - weak), where the ceiling beats the weak "
            "model in every seed:", "",
            report.markdown_table(["dataset", "naive", f"filtered (round {c.w2s.rounds})", "+ DPO"], rows), ""]
  return lines


def plot_accuracy(results: dict, methods: Sequence[str], path: str) -> None:
  names = list(results)
  fig, axes = report.figure(6.5 * len(names), 4.2, ncols=len(names), squeeze=False)
  for ax, n in zip(axes[0], names):
    rounds = max((int(k[len("filtered"):]) for r in results[n].values() for k in r.get("w2s", {})
                  if k.startswith("filtered")), default=0)
    getters = _runs(methods, rounds)
    labels = list(getters)
    means = [100 * np.mean(list(_per_seed(results[n], getters[k]).values())) for k in labels]
    stds = [100 * np.std(list(_per_seed(results[n], getters[k]).values())) for k in labels]
    ax.bar(range(len(labels)), means, yerr=stds, color=[f"C{0 if not k.startswith('w2s') else 1}" for k in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    low = min(means) - 5
    ax.set_ylim(max(0, low), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(n)
    ax.grid(axis="y", alpha=0.3)
  report.save_figure(fig, path)


def plot_curves(c: ml_collections.ConfigDict, results: dict, path: str) -> None:
  names = list(results)
  fig, axes = report.figure(6 * len(names), 4, ncols=len(names), squeeze=False)
  for ax, n in zip(axes[0], names):
    for i, run_name in enumerate(("plain", "kd", "task_specific", "ernie", "orca")):
      curves = [r[run_name]["curve"] for r in results[n].values() if run_name in r]
      if not curves:
        continue
      steps = [p[0] for p in curves[0]]
      acc = np.mean([[p[1] for p in curve] for curve in curves], 0)
      ax.plot(steps, 100 * acc, label=run_name, color=f"C{i}", marker=".")
    edges = np.cumsum([int(f * c[n].student_steps) for f in c.ernie.fractions])
    for e in edges:
      ax.axvline(e, color="grey", ls=":", lw=1)
    ax.set_xlabel("step (dotted: ERNIE-Tiny stage boundaries)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(n)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)


def plot_pkd(results: dict, path: str) -> None:
  names = list(results)
  fig, axes = report.figure(5.5 * len(names), 4, ncols=len(names), squeeze=False)
  for ax, n in zip(axes[0], names):
    by_seed = list(results[n].values())
    teacher = by_seed[0]["pkd"]["teacher_flops"]
    rows = by_seed[0]["pkd"]["rows"]
    for field, flops_field, label, color in (("ensemble_accuracy", "flops", "ensemble of k progressive students", "C0"),
                                             ("single_accuracy", "single_flops", "one KD student of equal FLOPs", "C1")):
      x = [100 * row[flops_field] / teacher for row in rows]
      acc = np.asarray([[r["pkd"]["rows"][i][field] for i in range(len(rows))] for r in by_seed]) * 100
      ax.errorbar(x, acc.mean(0), yerr=acc.std(0), marker="o", label=label, color=color, capsize=3)
    for i, row in enumerate(rows):
      ax.annotate(f"k={row['k']}", (100 * row["flops"] / teacher, 100 * np.mean([r["pkd"]["rows"][i]["ensemble_accuracy"]
                                                                               for r in by_seed])), fontsize=7)
    ax.set_xlabel("forward FLOPs (% of the teacher's)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(n)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)
