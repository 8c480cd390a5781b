"""Stage machines: progressive training schedules that switch teacher, data source and loss weights.

A stage table (a Python sequence of :class:`Stage`) becomes constant arrays inside
:func:`stage_machine`; the state (:class:`StageState`) holds only the current stage and its counters,
so the jitted step compiles once for every stage and ``jax.vmap`` runs a batch of machines.

Stage ``i`` ends (and stage ``i + 1`` begins) at the first ``update`` where any of its conditions holds::

    steps_in_stage   >= steps_i                     (after steps_i optimizer steps in the stage)
    samples_in_stage >= samples_i                   (after samples_i training examples in the stage)
    steps_in_stage   >= min_steps_i  and  m_hat < metric_below_i   (or  m_hat > metric_above_i)

with ``m_hat`` the bias-corrected exponential moving average of the metric observed in the stage::

    m_n = d m_{n-1} + (1 - d) x_n,   m_0 = 0,   m_hat = m_n / (1 - d^n),   d = metric_decay

``update`` takes the cumulative step and sample counters after the training step (the step that was
just taken is counted), so with ``steps_0 = 100`` the steps numbered 0..99 run in stage 0 and step 100
runs in stage 1. Counters are int32; in-stage differences are taken modulo 2^32, so a wrapping
cumulative counter is harmless while a stage stays under 2^31 steps or samples. A metric value of
``nan`` is "no observation" (a step without evaluation). At a switch the new stage's counters and
moving average restart from zero. The last stage never ends.

Ready tables: :func:`ernie_tiny_stages` (Su et al. 2021) and :func:`orca_stages` (Mukherjee et al. 2023).

    machine = stage_machine(ernie_tiny_stages(general_steps=..., general_enhanced_steps=...,
                                              task_adaptive_steps=...))
    stage = machine.init()
    # inside the jitted step (one compile for every stage):
    t = bank.apply(teachers, machine.teacher(stage), batch["x"])   # prox.tasks.stacked_teacher_bank
    w = machine.weight_dict(stage)                                 # {"latent": w0, "soft": w1, "hard": w2}
    loss = w["latent"] * latent + w["soft"] * soft + w["hard"] * hard
    stage = machine.update(stage, step=step + 1, samples=samples_seen, metric=loss)
    # on the host, the loop draws the next batch from data source int(machine.source(stage))
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEVER = 2**31 - 1  # an int32 limit that no in-stage counter reaches


class Stage(NamedTuple):
  """One stage of a progressive schedule (static Python values).

  Attributes:
    teacher: index of the stage's teacher in a teacher bank.
    source: index of the stage's data source.
    weights: the loss weights, a sequence (in the machine's ``loss_names`` order) or a mapping
      ``{loss name: weight}`` (names left out weigh 0).
    steps: the stage ends after this many steps in it (``None``: no step limit).
    samples: the stage ends after this many training examples in it (``None``: no sample limit).
    metric_below: the stage ends once the smoothed metric is below this value (``None``: no trigger).
    metric_above: the stage ends once the smoothed metric is above this value (``None``: no trigger).
    min_steps: the metric triggers fire only after this many steps in the stage.
    name: a label for logs.
  """
  teacher: int = 0
  source: int = 0
  weights: Sequence[float] | Mapping[str, float] = (1.0,)
  steps: int | None = None
  samples: int | None = None
  metric_below: float | None = None
  metric_above: float | None = None
  min_steps: int = 0
  name: str = ""


class StageState(NamedTuple):
  """State of a stage machine (scalars; leading axes under ``vmap``).

  Attributes:
    stage: int32, the current stage index.
    start_step: int32, the cumulative step count when the stage began.
    start_samples: int32, the cumulative sample count when the stage began.
    steps_in_stage: int32, steps taken in the stage (as of the last update).
    samples_in_stage: int32, samples seen in the stage (as of the last update).
    metric_ema: float32, the uncorrected moving average ``m_n`` of the metric in the stage.
    metric_count: int32, ``n``, the number of metric observations in the stage.
    switched: bool, whether the last update began a new stage.
  """
  stage: jax.Array
  start_step: jax.Array
  start_samples: jax.Array
  steps_in_stage: jax.Array
  samples_in_stage: jax.Array
  metric_ema: jax.Array
  metric_count: jax.Array
  switched: jax.Array


class StageMachine(NamedTuple):
  """A stage machine as pure functions over :class:`StageState` (built by :func:`stage_machine`).

  Attributes:
    init: ``init(step=0, samples=0) -> state``, stage 0 beginning at the given cumulative counters.
    update: ``update(state, *, step, samples=None, metric=None) -> state``.
    stage: ``stage(state) -> int32``, the current stage index.
    teacher: ``teacher(state) -> int32``, the current stage's teacher index.
    source: ``source(state) -> int32``, the current stage's data source index.
    weights: ``weights(state) -> float32 [K]``, the current stage's loss weights.
    weight_dict: ``weight_dict(state) -> {name: float32 scalar}``.
    smoothed_metric: ``smoothed_metric(state) -> float32``, ``m_hat`` (``nan`` before any observation).
    stages: the stage table.
    loss_names: the names of the ``K`` loss weights.
  """
  init: Callable[..., StageState]
  update: Callable[..., StageState]
  stage: Callable[[StageState], jax.Array]
  teacher: Callable[[StageState], jax.Array]
  source: Callable[[StageState], jax.Array]
  weights: Callable[[StageState], jax.Array]
  weight_dict: Callable[[StageState], dict[str, jax.Array]]
  smoothed_metric: Callable[[StageState], jax.Array]
  stages: tuple[Stage, ...]
  loss_names: tuple[str, ...]


def _count(value: Any, name: str, where: str, minimum: int) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not minimum <= value < _NEVER:
    raise ValueError(f"{where}: {name} must be an integer in [{minimum}, 2**31 - 1), got {value!r}")
  return int(value)


def _threshold(value: Any, name: str, where: str) -> float:
  if value is None:
    return math.nan
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f"{where}: {name} must be a finite number or None, got {value!r}")
  return float(value)


def _loss_names(stages: Sequence[Stage], loss_names: Sequence[str] | None) -> tuple[str, ...]:
  mappings = [s.weights for s in stages if isinstance(s.weights, Mapping)]
  if loss_names is not None:
    names = tuple(str(n) for n in loss_names)
    if len(set(names)) != len(names) or not names:
      raise ValueError(f"stage_machine: loss_names must be distinct and non-empty, got {loss_names!r}")
    return names
  if mappings and len(mappings) != len(stages):
    raise ValueError("stage_machine: give every stage's weights as a mapping, or all as sequences")
  if mappings:
    names: list[str] = []
    for m in mappings:
      names += [str(k) for k in m if str(k) not in names]
    return tuple(names)
  widths = {len(s.weights) for s in stages}
  if len(widths) != 1:
    raise ValueError(f"stage_machine: every stage needs the same number of loss weights, got {sorted(widths)}")
  return tuple(f"loss{i}" for i in range(widths.pop()))


def stage_machine(stages: Sequence[Stage], *, loss_names: Sequence[str] | None = None,
                  metric_decay: float = 0.9) -> StageMachine:
  """A pure stage machine over a stage table (see the module docstring for the rule).

  Args:
    stages: the :class:`Stage` table, at least one stage; every stage but the last needs an end
      condition (``steps``, ``samples``, ``metric_below`` or ``metric_above``).
    loss_names: the names of the loss weights, in the order of ``weights(state)``; default: the keys of
      the stages' weight mappings in order of appearance, or ``loss0, loss1, ...`` for sequences.
    metric_decay: ``d`` in ``[0, 1)`` of the metric's moving average (0: the last value).

  Returns:
    A :class:`StageMachine`.

  Raises:
    ValueError: an empty table, a non-last stage that never ends, a negative index, a limit < 1,
      non-finite weights or thresholds, or a decay outside ``[0, 1)``.
  """
  where = "stage_machine"
  stages = tuple(Stage(*s) if not isinstance(s, Stage) else s for s in stages)
  if not stages:
    raise ValueError(f"{where}: need at least one stage")
  if not isinstance(metric_decay, numbers.Real) or not 0.0 <= metric_decay < 1.0:
    raise ValueError(f"{where}: metric_decay must be in [0, 1), got {metric_decay!r}")
  names = _loss_names(stages, loss_names)
  teacher, source, weights, steps, samples, below, above, min_steps = ([] for _ in range(8))
  for i, s in enumerate(stages):
    at = f"{where}: stage {i}{f' ({s.name})' if s.name else ''}"
    teacher.append(_count(s.teacher, "teacher", at, 0))
    source.append(_count(s.source, "source", at, 0))
    if isinstance(s.weights, Mapping):
      unknown = [k for k in s.weights if str(k) not in names]
      if unknown:
        raise ValueError(f"{at}: weights name losses {unknown} that are not in loss_names {names}")
      w = [float(s.weights.get(n, 0.0)) for n in names]
    else:
      w = [float(v) for v in s.weights]
      if len(w) != len(names):
        raise ValueError(f"{at}: {len(w)} weights for {len(names)} losses {names}")
    if not all(math.isfinite(v) for v in w):
      raise ValueError(f"{at}: weights must be finite, got {s.weights!r}")
    weights.append(w)
    steps.append(_NEVER if s.steps is None else _count(s.steps, "steps", at, 1))
    samples.append(_NEVER if s.samples is None else _count(s.samples, "samples", at, 1))
    below.append(_threshold(s.metric_below, "metric_below", at))
    above.append(_threshold(s.metric_above, "metric_above", at))
    min_steps.append(_count(s.min_steps, "min_steps", at, 0))
    ends = s.steps is not None or s.samples is not None or s.metric_below is not None or s.metric_above is not None
    if i < len(stages) - 1 and not ends:
      raise ValueError(f"{at} never ends: give it steps, samples, metric_below or metric_above")
  uses_samples = any(s.samples is not None for s in stages)
  last = len(stages) - 1
  t_teacher = jnp.asarray(teacher, jnp.int32)
  t_source = jnp.asarray(source, jnp.int32)
  t_weights = jnp.asarray(weights, jnp.float32)
  t_steps = jnp.asarray(steps, jnp.int32)
  t_samples = jnp.asarray(samples, jnp.int32)
  t_below = jnp.asarray(below, jnp.float32)
  t_above = jnp.asarray(above, jnp.float32)
  t_min_steps = jnp.asarray(min_steps, jnp.int32)
  decay = jnp.float32(metric_decay)

  def init(step: Any = 0, samples: Any = 0) -> StageState:
    zero = lambda dtype=jnp.int32: jnp.zeros((), dtype)   # one buffer per field: the state can be donated
    return StageState(stage=zero(), start_step=jnp.array(step, jnp.int32),
                      start_samples=jnp.array(samples, jnp.int32), steps_in_stage=zero(),
                      samples_in_stage=zero(), metric_ema=zero(jnp.float32), metric_count=zero(),
                      switched=zero(bool))

  def smoothed_metric(state: StageState) -> jax.Array:
    n = state.metric_count
    corrected = state.metric_ema / (1.0 - decay ** n.astype(jnp.float32))
    return jnp.where(n > 0, corrected, jnp.nan)

  def update(state: StageState, *, step: Any, samples: Any = None, metric: Any = None) -> StageState:
    if samples is None and uses_samples:
      raise ValueError(f"{where}.update: the stage table has sample limits, so pass samples= "
                       "(the cumulative number of training examples)")
    step = jnp.asarray(step, jnp.int32)
    samples = state.start_samples if samples is None else jnp.asarray(samples, jnp.int32)
    steps_in = step - state.start_step          # int32: wraps modulo 2^32, as the counters do
    samples_in = samples - state.start_samples
    x = jnp.asarray(jnp.nan if metric is None else metric, jnp.float32)
    observed = ~jnp.isnan(x)
    ema = jnp.where(observed, decay * state.metric_ema + (1.0 - decay) * x, state.metric_ema)
    count = state.metric_count + observed.astype(jnp.int32)
    stage = state.stage
    smoothed = smoothed_metric(state._replace(metric_ema=ema, metric_count=count))
    triggered = (count > 0) & (steps_in >= t_min_steps[stage]) & (
        (smoothed < t_below[stage]) | (smoothed > t_above[stage]))   # nan thresholds compare False
    done = (steps_in >= t_steps[stage]) | (samples_in >= t_samples[stage]) | triggered
    advance = done & (stage < last)
    zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return StageState(
        stage=jnp.where(advance, stage + 1, stage).astype(jnp.int32),
        start_step=jnp.where(advance, step, state.start_step),
        start_samples=jnp.where(advance, samples, state.start_samples),
        steps_in_stage=jnp.where(advance, zero_i, steps_in),
        samples_in_stage=jnp.where(advance, zero_i, samples_in),
        metric_ema=jnp.where(advance, zero_f, ema),
        metric_count=jnp.where(advance, zero_i, count),
        switched=advance)

  def weight_dict(state: StageState) -> dict[str, jax.Array]:
    w = t_weights[state.stage]
    return {n: w[..., i] for i, n in enumerate(names)}

  return StageMachine(
      init=init, update=update,
      stage=lambda state: state.stage,
      teacher=lambda state: t_teacher[state.stage],
      source=lambda state: t_source[state.stage],
      weights=lambda state: t_weights[state.stage],
      weight_dict=weight_dict,
      smoothed_metric=smoothed_metric,
      stages=stages, loss_names=names)


def ernie_tiny_stages(*, general_steps: int, general_enhanced_steps: int, task_adaptive_steps: int,
                      task_specific_weights: Mapping[str, float] | None = None) -> tuple[Stage, ...]:
  """The four stages of ERNIE-Tiny (Su, Chen, Feng, Liu, Liu, Sun, Tian, Wu, Wang 2021, "ERNIE-Tiny: A
  Progressive Distillation Framework for Pretrained Transformer Compression"), which change the
  teacher, the data and the objective one at a time:

  ====================== ======================= ============== ===========================
  stage                  teacher                 data (source)  losses
  ====================== ======================= ============== ===========================
  general distillation   0: pretrained           0: general     latent
  general-enhanced       1: fine-tuned           0: general     latent
  task-adaptive          1: fine-tuned           1: task        latent
  task-specific          1: fine-tuned           1: task        latent + soft + hard
  ====================== ======================= ============== ===========================

  Loss names ``("latent", "soft", "hard")``: the latent (hidden-state) loss, the soft-label loss
  against the teacher and the hard-label loss against the labels (``prox.losses`` has
  ``hidden_distillation_loss``, ``kd_loss`` and cross-entropy). The task-specific stage weighs the three
  equally unless ``task_specific_weights`` says otherwise (the paper adds the two losses; their
  relative weights are a choice here). The last stage runs until training ends.

  Args:
    general_steps, general_enhanced_steps, task_adaptive_steps: lengths of the first three stages, in
      optimizer steps.
    task_specific_weights: optional ``{"latent": ..., "soft": ..., "hard": ...}`` of the last stage.
  """
  last = {"latent": 1.0, "soft": 1.0, "hard": 1.0}
  if task_specific_weights is not None:
    unknown = set(task_specific_weights) - set(last)
    if unknown:
      raise ValueError(f"ernie_tiny_stages: unknown losses {sorted(unknown)} in task_specific_weights; "
                       "use 'latent', 'soft', 'hard'")
    last = {k: float(task_specific_weights.get(k, 0.0)) for k in last}
  latent = {"latent": 1.0, "soft": 0.0, "hard": 0.0}
  return (
      Stage(teacher=0, source=0, weights=latent, steps=general_steps, name="general distillation"),
      Stage(teacher=1, source=0, weights=latent, steps=general_enhanced_steps, name="general-enhanced distillation"),
      Stage(teacher=1, source=1, weights=latent, steps=task_adaptive_steps, name="task-adaptive distillation"),
      Stage(teacher=1, source=1, weights=last, name="task-specific distillation"),
  )


def orca_stages(*, first_steps: int | None = None, first_samples: int | None = None) -> tuple[Stage, ...]:
  """The staged teachers of Orca (Mukherjee, Mitra, Jawahar, Agarwal, Palangi, Awadallah 2023, "Orca:
  Progressive Learning from Complex Explanation Traces of GPT-4"): the student first imitates the
  weaker teacher's responses (ChatGPT, teacher 0, data source 0) and then the strong teacher's (GPT-4,
  teacher 1, data source 1): first FLAN-5M with ChatGPT's responses, then FLAN-1M with GPT-4's. Give the
  first stage's length in steps or samples (e.g. its epochs times the size of source 0); the second
  runs until training ends. One loss, ``"imitation"`` (the next-token cross-entropy on the teacher's
  response).
  """
  if (first_steps is None) == (first_samples is None):
    raise ValueError(f"orca_stages: give exactly one of first_steps and first_samples, got {first_steps!r} and "
                     f"{first_samples!r}")
  one = {"imitation": 1.0}
  return (Stage(teacher=0, source=0, weights=one, steps=first_steps, samples=first_samples, name="weaker teacher"),
          Stage(teacher=1, source=1, weights=one, name="strong teacher"))
