"""Compute-budget curricula: a tightening budget of reasoning steps and an entropy easy-to-hard sampler.

Budget schedule (Hammoud et al. 2025, "Train Long, Think Short: Curriculum Learning for Efficient
Reasoning"; Tian et al. 2025, "Reinforcement Mid-Training"). Training starts with a generous budget
``B_0`` of reasoning steps (tokens for a language model, refinement steps for ``prox.models``'
iterative classifier) and tightens it towards ``B_min``, so that a model first finds solutions and then
compresses them. After ``s`` updates the budget is::

    linear:       B(s) = B_0 + (B_min - B_0) min(s / S, 1)
    exponential:  B(s) = max(B_min, B_0 gamma^floor(s / I))          (Train Long, Think Short)
                  (gamma = (B_min / B_0)^(I / S) when only the horizon S is given)
    accuracy:     B <- max(B_min, B - delta)   at the first update where the bias-corrected moving average
                  m_hat of the observed accuracy is >= the threshold and the budget has been held for at
                  least ``min_steps`` updates (then the average restarts)

with ``m_n = d m_{n-1} + (1 - d) x_n``, ``m_hat = m_n / (1 - d^n)``. The integer budget a model uses is
``ceil(B(s))`` (generous: it reaches ``B_min`` exactly at ``S``).

Entropy curriculum (Reinforcement Mid-Training's curriculum-based adaptive sampling, easy to hard by
predictive entropy). A store keeps each training example's latest predictive entropy
``H_i = -sum_c p_ic log p_ic`` (normalised ``h_i = H_i / log C`` in [0, 1]); examples are drawn with
probabilities::

    p_i(s) = exp(-beta(s) h_i) / sum_j exp(-beta(s) h_j),   beta(s) = beta_0 + (beta_1 - beta_0) min(s / S, 1)

so ``beta > 0`` favours confident (easy) examples, ``beta = 0`` is uniform and ``beta < 0`` favours
uncertain (hard) ones; annealing ``beta`` from positive to zero or negative moves the data from easy to
hard. Examples never scored count with the mean of the scored ones.

Departures. Reinforcement Mid-Training scores tokens of a language model; here the unit is a training
example of a classifier. Its curriculum moves a sampling distribution over entropy levels from low to
high; the exponential tilt above is one smooth form of that idea (one temperature instead of a table of
per-level probabilities). The accuracy-triggered budget is not in either paper (they tighten on a
clock); it is the natural adaptive variant and is offered as such.

Both are pure state machines (a factory returning a NamedTuple of pure functions over a NamedTuple
state), so they live in ``TrainState.extra`` and update inside the jitted step::

    schedule = budget_schedule(start=8, end=2, kind="exponential", total_steps=1000, interval=100)
    transition = prox.step.in_extra("budget", lambda s, info: schedule.update(s, step=info.step + 1))
    # the loss reads ctx.extra["budget"] -> schedule.budget(...) and runs the model for that many steps
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

BUDGET_KINDS = ("linear", "exponential", "accuracy")


class BudgetState(NamedTuple):
  """State of a :func:`budget_schedule` (scalars).

  Attributes:
    step: int32, updates taken.
    value: float32, the real-valued budget ``B(s)``.
    metric_ema: float32, the uncorrected moving average ``m_n`` (``"accuracy"``).
    metric_count: int32, ``n``, observations since the budget last changed (``"accuracy"``).
    held: int32, updates since the integer budget last changed (``"accuracy"``: since it last fired).
    changed: bool, whether the last update tightened the (integer) budget.
  """
  step: jax.Array
  value: jax.Array
  metric_ema: jax.Array
  metric_count: jax.Array
  held: jax.Array
  changed: jax.Array


class BudgetSchedule(NamedTuple):
  """A budget schedule as pure functions (built by :func:`budget_schedule`).

  Attributes:
    init: ``init() -> BudgetState`` at ``B_0``.
    update: ``update(state, *, step=None, metric=None) -> state``; ``step`` is the number of updates
      taken so far including this one (default ``state.step + 1``), ``metric`` the accuracy observed
      (``nan``/``None``: no observation; needed by ``"accuracy"``).
    budget: ``budget(state) -> int32``, ``ceil(B)``.
    value: ``value(state) -> float32``, ``B``.
    kind, start, end: the schedule's options.
  """
  init: Callable[[], BudgetState]
  update: Callable[..., BudgetState]
  budget: Callable[[BudgetState], jax.Array]
  value: Callable[[BudgetState], jax.Array]
  kind: str
  start: float
  end: float


def _positive(value: Any, name: str, *, integer: bool = False, allow_none: bool = False) -> Any:
  if value is None and allow_none:
    return None
  kind = numbers.Integral if integer else numbers.Real
  if (not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value <= 0):
    raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")
  return int(value) if integer else float(value)


def budget_schedule(*, start: float, end: float, kind: str = "linear", total_steps: int | None = None,
                    interval: int = 1, decay: float | None = None, threshold: float | None = None,
                    min_steps: int = 1, delta: float = 1.0, metric_decay: float = 0.9) -> BudgetSchedule:
  """A generous-to-tight budget schedule (rules in the module docstring).

  Args:
    start: ``B_0`` (>= ``end``).
    end: ``B_min`` (> 0).
    kind: ``"linear"``, ``"exponential"`` or ``"accuracy"``.
    total_steps: ``S``, the horizon of ``"linear"`` (required) and of ``"exponential"`` without ``decay``.
    interval: ``I``, updates between two exponential decays.
    decay: ``gamma`` in (0, 1] of ``"exponential"`` (default: reach ``end`` at ``total_steps``).
    threshold: the accuracy that tightens the budget (``"accuracy"``; required).
    min_steps: updates a budget is held at least (``"accuracy"``).
    delta: the decrement of ``"accuracy"``.
    metric_decay: ``d`` in [0, 1) of the accuracy's moving average.

  Returns:
    A :class:`BudgetSchedule`.

  Raises:
    ValueError: an unknown kind, a missing or out-of-range option.
  """
  if kind not in BUDGET_KINDS:
    raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {kind!r}")
  start = _positive(start, "start")
  end = _positive(end, "end")
  if end > start:
    raise ValueError(f"a budget schedule tightens: end={end!r} must be <= start={start!r}")
  interval = _positive(interval, "interval", integer=True)
  total_steps = _positive(total_steps, "total_steps", integer=True, allow_none=True)
  if not 0.0 <= metric_decay < 1.0:
    raise ValueError(f"metric_decay must be in [0, 1), got {metric_decay!r}")
  if kind == "linear" and total_steps is None:
    raise ValueError("kind='linear' needs total_steps")
  if kind == "exponential":
    if decay is None:
      if total_steps is None:
        raise ValueError("kind='exponential' needs decay or total_steps")
      decay = (end / start) ** (interval / total_steps)
    elif not (isinstance(decay, numbers.Real) and 0.0 < decay <= 1.0):
      raise ValueError(f"decay must be in (0, 1], got {decay!r}")
  if kind == "accuracy":
    if threshold is None or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
      raise ValueError(f"kind='accuracy' needs a finite threshold, got {threshold!r}")
    min_steps = _positive(min_steps, "min_steps", integer=True)
    delta = _positive(delta, "delta")
  b0, b1 = jnp.float32(start), jnp.float32(end)
  d = jnp.float32(metric_decay)

  def init() -> BudgetState:
    return BudgetState(step=jnp.zeros((), jnp.int32), value=jnp.array(start, jnp.float32),
                       metric_ema=jnp.zeros((), jnp.float32), metric_count=jnp.zeros((), jnp.int32),
                       held=jnp.zeros((), jnp.int32), changed=jnp.zeros((), bool))

  def budget(state: BudgetState) -> jax.Array:
    # the 1e-4 slack keeps float error (8 * 0.25 ** 0.5 = 4.0000005) from rounding a budget up
    return jnp.ceil(state.value - 1e-4).astype(jnp.int32)

  def update(state: BudgetState, *, step: Any = None, metric: Any = None) -> BudgetState:
    s = state.step + 1 if step is None else jnp.asarray(step, jnp.int32)
    x = jnp.asarray(jnp.nan if metric is None else metric, jnp.float32)
    observed = ~jnp.isnan(x)
    ema = jnp.where(observed, d * state.metric_ema + (1.0 - d) * x, state.metric_ema)
    count = state.metric_count + observed.astype(jnp.int32)
    held = state.held + 1
    fire = jnp.zeros((), bool)
    if kind == "linear":
      frac = jnp.minimum(s.astype(jnp.float32) / total_steps, 1.0)
      value = b0 + (b1 - b0) * frac
    elif kind == "exponential":
      k = (s // interval).astype(jnp.float32)
      value = jnp.maximum(b1, b0 * jnp.float32(decay) ** k)
    else:
      smoothed = ema / (1.0 - d ** count.astype(jnp.float32))
      fire = (count > 0) & (held >= min_steps) & (smoothed >= threshold) & (state.value > b1)
      value = jnp.where(fire, jnp.maximum(b1, state.value - delta), state.value)
      ema = jnp.where(fire, 0.0, ema)
      count = jnp.where(fire, 0, count)
    new = state._replace(step=s, value=value.astype(jnp.float32), metric_ema=ema, metric_count=count)
    changed = budget(new) != budget(state)
    return new._replace(held=jnp.where(changed | fire, 0, held), changed=changed)

  return BudgetSchedule(init=init, update=update, budget=budget, value=lambda s: s.value, kind=kind,
                        start=start, end=end)


# --- entropy curriculum -------------------------------------------------------------------------------

def predictive_entropy(logits: jax.Array, *, normalize: bool = False) -> jax.Array:
  """``H = -sum_c p_c log p_c`` of ``softmax(logits)`` over the last axis (float32; ``/ log C`` if
  ``normalize``)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
  h = -jnp.sum(jnp.exp(logp) * logp, -1)
  return h / math.log(logits.shape[-1]) if normalize else h


class EntropyCurriculumState(NamedTuple):
  """State of an :func:`entropy_curriculum`.

  Attributes:
    entropy: float32 ``[N]``, each example's normalised entropy ``h_i`` (``nan``: never scored).
    step: int32, the clock of the temperature (updates taken).
  """
  entropy: jax.Array
  step: jax.Array


class EntropyCurriculum(NamedTuple):
  """An entropy curriculum as pure functions (built by :func:`entropy_curriculum`).

  Attributes:
    init: ``init() -> state`` (no example scored).
    update: ``update(state, indices, logits=None, *, entropy=None, step=None) -> state``: stores the
      entropies of the examples ``indices`` (from their ``logits``, or given normalised ``entropy``);
      ``step`` (default ``state.step + 1``) sets the clock. Rows with a negative index are ignored.
    beta: ``beta(state) -> float32``, the current tilt.
    probabilities: ``probabilities(state) -> float32 [N]``.
    sample: ``sample(state, key, n) -> int32 [n]``, ``n`` distinct examples drawn with
      ``probabilities`` (Gumbel top-k: successive sampling without replacement).
  """
  init: Callable[[], EntropyCurriculumState]
  update: Callable[..., EntropyCurriculumState]
  beta: Callable[[EntropyCurriculumState], jax.Array]
  probabilities: Callable[[EntropyCurriculumState], jax.Array]
  sample: Callable[[EntropyCurriculumState, jax.Array, int], jax.Array]


def entropy_curriculum(num_examples: int, *, beta_start: float = 4.0, beta_end: float = 0.0,
                       total_steps: int = 1, ema: float = 0.0) -> EntropyCurriculum:
  """An easy-to-hard sampler over ``num_examples`` examples by predictive entropy (module docstring).

  Args:
    num_examples: ``N``.
    beta_start, beta_end: ``beta_0`` and ``beta_1`` of the annealed tilt.
    total_steps: ``S``, updates over which ``beta`` anneals.
    ema: ``e`` in [0, 1): a new entropy is blended as ``e h_old + (1 - e) h_new`` (0: replaced).

  Returns:
    An :class:`EntropyCurriculum`.
  """
  num_examples = _positive(num_examples, "num_examples", integer=True)
  total_steps = _positive(total_steps, "total_steps", integer=True)
  for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
    if not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise ValueError(f"{name} must be a finite number, got {v!r}")
  if not 0.0 <= ema < 1.0:
    raise ValueError(f"ema must be in [0, 1), got {ema!r}")

  def init() -> EntropyCurriculumState:
    return EntropyCurriculumState(entropy=jnp.full((num_examples,), jnp.nan, jnp.float32),
                                  step=jnp.zeros((), jnp.int32))

  def beta(state: EntropyCurriculumState) -> jax.Array:
    frac = jnp.minimum(state.step.astype(jnp.float32) / total_steps, 1.0)
    return jnp.float32(beta_start) + jnp.float32(beta_end - beta_start) * frac

  def update(state: EntropyCurriculumState, indices: jax.Array, logits: jax.Array | None = None, *,
             entropy: jax.Array | None = None, step: Any = None) -> EntropyCurriculumState:
    if (logits is None) == (entropy is None):
      raise ValueError("entropy_curriculum.update needs exactly one of logits and entropy")
    h = predictive_entropy(logits, normalize=True) if entropy is None else jnp.asarray(entropy, jnp.float32)
    idx = jnp.asarray(indices, jnp.int32)
    valid = idx >= 0
    safe = jnp.where(valid, idx, num_examples)          # out of range: dropped by the scatter
    old = state.entropy.at[safe].get(mode="fill", fill_value=jnp.nan)
    new = jnp.where(jnp.isnan(old), h, ema * old + (1.0 - ema) * h)
    store = state.entropy.at[safe].set(new, mode="drop")
    s = state.step + 1 if step is None else jnp.asarray(step, jnp.int32)
    return EntropyCurriculumState(entropy=store, step=s)

  def logits_of(state: EntropyCurriculumState) -> jax.Array:
    h = state.entropy
    seen = ~jnp.isnan(h)
    fill = jnp.where(jnp.any(seen), jnp.sum(jnp.where(seen, h, 0.0)) / jnp.maximum(jnp.sum(seen), 1), 0.5)
    return -beta(state) * jnp.where(seen, h, fill)

  def probabilities(state: EntropyCurriculumState) -> jax.Array:
    return jax.nn.softmax(logits_of(state))

  def sample(state: EntropyCurriculumState, key: jax.Array, n: int) -> jax.Array:
    if not 0 < n <= num_examples:
      raise ValueError(f"sample size must be in [1, {num_examples}], got {n!r}")
    g = jax.random.gumbel(key, (num_examples,), jnp.float32)
    return jax.lax.top_k(logits_of(state) + g, n)[1].astype(jnp.int32)

  return EntropyCurriculum(init=init, update=update, beta=beta, probabilities=probabilities, sample=sample)
