"""Distillation losses and the pure data rules of progressive distillation.

Every function here is pure and jittable (shapes and options static, values may be traced) and imports
only jax, optax and numpy. Losses return one value per example (``[B]``), as optax's losses do; average
them (or weight them) yourself. Computation runs in at least float32 (bfloat16 inputs are upcast,
float64 stays float64).

* Logit distillation (Hinton, Vinyals, Dean 2015): :func:`kd_loss`, :func:`distillation_loss`.
* Hidden-state distillation through a learned projection (Romero et al. 2015; Jiao et al. 2020):
  :func:`hidden_projection_init`, :func:`project_hidden`, :func:`hidden_distillation_loss`.
* Loss-mix schedules (e.g. the source-to-target curriculum of Samarasinghe et al. 2023):
  :func:`loss_mix`.
* Weak-to-strong learning (Yang, Ma, Liu 2024) with DPO (Rafailov et al. 2023): :func:`dpo_loss`,
  :func:`sequence_log_prob`, :func:`agreement_mask`, :func:`weak_to_strong_mask`,
  :func:`preference_pairs`.
* Progressive students as a boosted ensemble (Medina, Hadachi, Honeine, Bensrhair 2025):
  :func:`residual_target`, :func:`residual_loss`, :func:`ensemble_logits`,
  :func:`boosted_distillation_loss`, :func:`dense_conv_flops`, :func:`ensemble_flops`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
ArrayLike = jax.Array | np.ndarray | float | int


# ----------------------------------------------------------------------------------------------
# helpers


def _float(x: ArrayLike) -> jax.Array:
  """``x`` as an array of at least float32 (bfloat16/float16 -> float32, float64 kept)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x.astype(jnp.float32)


def _concrete(value: Any) -> float | None:
  """The Python float of a concrete scalar, ``None`` for a traced value."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check_temperature(temperature: Any, where: str) -> None:
  t = _concrete(temperature)
  if t is not None and not (t > 0.0 and math.isfinite(t)):
    raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")


def _check_unit(name: str, value: Any, where: str) -> None:
  v = _concrete(value)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f"{where}: {name} must be in [0, 1], got {value!r}")


def _check_logits(student: jax.Array, teacher: jax.Array, where: str) -> None:
  if student.shape != teacher.shape or student.ndim < 1:
    raise ValueError(f"{where}: student logits {student.shape} and teacher logits {teacher.shape} "
                     "must have the same shape [..., classes]")


# ----------------------------------------------------------------------------------------------
# logit distillation


def kd_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
            temperature: ArrayLike = 1.0) -> jax.Array:
  """Soft-target loss of Hinton, Vinyals, Dean 2015 ("Distilling the Knowledge in a Neural Network").

  With ``p^T = softmax(t / T)`` and ``p^S = softmax(s / T)`` over the last axis::

      kd(s, t) = T^2 KL(p^T || p^S) = T^2 sum_c p^T_c (log p^T_c - log p^S_c)

  whose gradient is ``d kd / d s = T (p^S - p^T)``: the ``T^2`` factor keeps the soft-target
  gradients on the scale of the hard-label ones when ``T`` changes (the paper's prescription). The KL
  form differs from the paper's cross-entropy with the soft targets by the teacher's entropy, a constant
  in ``s`` (same gradient), and is 0 when the student matches the teacher.

  No gradient is stopped here: differentiate with respect to the student only, or compute the teacher
  logits with a frozen teacher (``prox.tasks.stacked_teacher_bank`` stops gradients).

  Args:
    student_logits: ``[..., C]``.
    teacher_logits: ``[..., C]``, same shape.
    temperature: ``T > 0`` (a Python number or a traced scalar).

  Returns:
    ``[...]``: the loss per example (the class axis reduced).
  """
  s, t = _float(student_logits), _float(teacher_logits)
  _check_logits(s, t, "kd_loss")
  _check_temperature(temperature, "kd_loss")
  temp = jnp.asarray(temperature, s.dtype)
  log_ps = jax.nn.log_softmax(s / temp, axis=-1)
  log_pt = jax.nn.log_softmax(t / temp, axis=-1)
  pt = jnp.exp(log_pt)
  kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)
  return temp * temp * kl


def distillation_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, labels: ArrayLike, *,
                      temperature: ArrayLike = 1.0, alpha: ArrayLike = 0.5) -> jax.Array:
  """Soft targets mixed with hard labels (Hinton, Vinyals, Dean 2015)::

      L = alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(y, softmax(s))

  The hard-label term uses the same student logits at temperature 1, as in the paper; ``alpha`` is the
  weight of the soft (teacher) term (the paper reports best results with a considerably lower weight on
  the hard term). ``alpha = 1`` is pure distillation, ``alpha = 0`` plain cross-entropy.

  Args:
    student_logits: ``[..., C]``.
    teacher_logits: ``[..., C]``.
    labels: integer labels ``[...]`` or label distributions ``[..., C]``.
    temperature: ``T > 0``.
    alpha: weight of the soft term in ``[0, 1]`` (may be traced, e.g. from a stage machine).

  Returns:
    ``[...]``: the loss per example.
  """
  s = _float(student_logits)
  _check_unit("alpha", alpha, "distillation_loss")
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != s.shape[:-1]:
      raise ValueError(f"distillation_loss: integer labels {labels.shape} must have shape {s.shape[:-1]}")
    hard = optax.softmax_cross_entropy_with_integer_labels(s, labels)
  else:
    if labels.shape != s.shape:
      raise ValueError(f"distillation_loss: label distributions {labels.shape} must have shape {s.shape}")
    hard = optax.softmax_cross_entropy(s, labels.astype(s.dtype))
  a = jnp.asarray(alpha, s.dtype)
  return a * kd_loss(s, teacher_logits, temperature=temperature) + (1.0 - a) * hard


# ----------------------------------------------------------------------------------------------
# hidden-state distillation


def hidden_projection_init(key: jax.Array, student_width: int, teacher_width: int, *,
                           dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Parameters of the learned projection ``W in R^{d_S x d_T}``, ``b in R^{d_T}`` of
  :func:`hidden_distillation_loss`: ``W ~ N(0, 1/d_S)`` (LeCun normal), ``b = 0``.

  The projection is trained with the student: put the returned dict into the student's parameter tree
  (e.g. ``params = {"model": student_params, "proj": hidden_projection_init(...)}``) so that the
  optimizer updates it; it is used in training only and dropped afterwards.
  """
  for name, width in (("student_width", student_width), ("teacher_width", teacher_width)):
    if not isinstance(width, numbers.Integral) or isinstance(width, bool) or width < 1:
      raise ValueError(f"hidden_projection_init: {name} must be a positive integer, got {width!r}")
  kernel = jax.random.normal(key, (int(student_width), int(teacher_width)), jnp.float32)
  kernel = kernel / np.sqrt(student_width)
  return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((int(teacher_width),), dtype)}


def project_hidden(projection: Mapping[str, jax.Array] | None, hidden: ArrayLike) -> jax.Array:
  """``h W + b`` over the last axis (``projection=None``: ``h`` unchanged)."""
  h = _float(hidden)
  if projection is None:
    return h
  kernel, bias = projection["kernel"], projection["bias"]
  if kernel.ndim != 2 or h.shape[-1] != kernel.shape[0] or bias.shape != kernel.shape[1:]:
    raise ValueError(f"project_hidden: hidden width {h.shape[-1]} does not match the projection "
                     f"kernel {kernel.shape} / bias {bias.shape}")
  return h @ _float(kernel) + _float(bias)


def hidden_distillation_loss(student_hidden: ArrayLike, teacher_hidden: ArrayLike,
                             projection: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """Hidden-state distillation through a learned linear map (the "hint" regressor of Romero et al. 2015,
  "FitNets: Hints for Thin Deep Nets"; the hidden-state loss of Jiao et al. 2020, "TinyBERT: Distilling
  BERT for Natural Language Understanding", used as the latent loss of ERNIE-Tiny)::

      L = MSE(H^S W + b, H^T)

  averaged over every axis but the first (tokens and features), so ``H^S`` is ``[B, ..., d_S]`` and
  ``H^T`` is ``[B, ..., d_T]``. Initialise ``W, b`` with :func:`hidden_projection_init` and train them
  with the student; ``projection=None`` compares the states directly (``d_S = d_T``). TinyBERT has no
  bias in ``W_h``; a zero-initialised bias only adds a per-feature offset.

  Returns:
    ``[B]``: the loss per example.
  """
  hs = project_hidden(projection, student_hidden)
  ht = _float(teacher_hidden)
  if hs.shape != ht.shape or hs.ndim < 2:
    raise ValueError(f"hidden_distillation_loss: projected student states {hs.shape} and teacher states "
                     f"{ht.shape} must have the same shape [B, ..., d]")
  return jnp.mean(jnp.square(hs - ht.astype(hs.dtype)), axis=tuple(range(1, hs.ndim)))


# ----------------------------------------------------------------------------------------------
# loss-mix schedules

_SHAPES = ("linear", "cosine", "step")


def loss_mix(weights: Sequence[Sequence[float]], *, positions: Sequence[float] | None = None,
             shape: Literal["linear", "cosine", "step"] = "linear",
             total: int | None = None) -> Callable[[ArrayLike], jax.Array]:
  """A schedule of the weights of ``K`` loss terms over training: ``count -> w in R^K`` (float32).

  ``weights`` holds ``S`` anchor vectors ``w_0..w_{S-1}`` at progress ``x_0 < ... < x_{S-1}`` in
  ``[0, 1]``; progress is ``p = clip(count / total, 0, 1)`` (``count`` a step or sample counter), or
  ``p = clip(count, 0, 1)`` when ``total`` is None. Between anchors ``i`` and ``i + 1``, with
  ``u = (p - x_i) / (x_{i+1} - x_i)``::

      linear:  w(p) = w_i + u (w_{i+1} - w_i)
      cosine:  w(p) = w_i + (1 - cos(pi u)) / 2 (w_{i+1} - w_i)
      step:    w(p) = w_i                      (a hard shift at each x_{i+1})

  and ``w(p) = w_0`` before ``x_0``, ``w_{S-1}`` after ``x_{S-1}``. Default positions: evenly spaced,
  ``x_i = i / (S - 1)`` for linear/cosine, ``x_i = i / S`` (``S`` equal stages) for step.

  A progressive curriculum such as CDFSL-V's (Samarasinghe, Rizve, Kardan, Shah 2023, "CDFSL-V:
  Cross-Domain Few-Shot Learning for Videos"), which starts from the supervised loss on the labelled
  source domain and moves the emphasis to the target-domain loss as training progresses, is
  ``loss_mix([[1.0, 0.0], [0.0, 1.0]], shape="cosine", total=num_steps)`` with the terms
  ``(source CE, target loss)``. (The exact curve of that paper was not available to us: pick the shape
  and anchors to match your reading.)

  Args:
    weights: ``S >= 1`` anchor weight vectors of equal length ``K >= 1``.
    positions: the anchors' progress ``x_i``, strictly increasing in ``[0, 1]``.
    shape: ``"linear"``, ``"cosine"`` or ``"step"``.
    total: the count at which progress reaches 1 (steps or samples); ``None``: the schedule takes the
      progress itself.

  Returns:
    A pure function ``schedule(count) -> [K]`` float32 array (``count`` may be traced).
  """
  try:
    w = np.asarray(weights, np.float64)
  except (TypeError, ValueError):
    w = np.zeros((0,))
  if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1 or not np.all(np.isfinite(w)):
    raise ValueError(f"loss_mix: weights must be S >= 1 finite vectors of equal length K >= 1, got {weights!r}")
  if shape not in _SHAPES:
    raise ValueError(f"loss_mix: shape must be one of {_SHAPES}, got {shape!r}")
  num = w.shape[0]
  if positions is None:
    x = np.arange(num) / num if shape == "step" else np.linspace(0.0, 1.0, num) if num > 1 else np.zeros(1)
  else:
    x = np.asarray(positions, np.float64)
    if x.shape != (num,) or np.any(x < 0) or np.any(x > 1) or np.any(np.diff(x) <= 0):
      raise ValueError(f"loss_mix: positions must be {num} strictly increasing values in [0, 1], got {positions!r}")
  if total is not None and (not isinstance(total, numbers.Number) or not total > 0):
    raise ValueError(f"loss_mix: total must be a positive number of steps or samples, got {total!r}")
  w_table = jnp.asarray(w, jnp.float32)
  x_table = jnp.asarray(x, jnp.float32)

  def schedule(count: ArrayLike) -> jax.Array:
    p = jnp.asarray(count, jnp.float32)
    if total is not None:
      p = p / jnp.float32(total)
    p = jnp.clip(p, 0.0, 1.0)
    if num == 1:
      return w_table[0]
    i = jnp.clip(jnp.searchsorted(x_table, p, side="right") - 1, 0, num - 1)
    if shape == "step":
      return w_table[i]
    i = jnp.minimum(i, num - 2)
    u = jnp.clip((p - x_table[i]) / (x_table[i + 1] - x_table[i]), 0.0, 1.0)
    if shape == "cosine":
      u = 0.5 * (1.0 - jnp.cos(jnp.pi * u))
    return w_table[i] + u * (w_table[i + 1] - w_table[i])

  return schedule


# ----------------------------------------------------------------------------------------------
# weak-to-strong: DPO, agreement filter, training subset, preference pairs


def dpo_loss(chosen_logps: ArrayLike, rejected_logps: ArrayLike, reference_chosen_logps: ArrayLike,
             reference_rejected_logps: ArrayLike, *, beta: ArrayLike = 0.1) -> jax.Array:
  """Direct preference optimisation (Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct
  Preference Optimization: Your Language Model is Secretly a Reward Model"), the stage-II objective of
  Yang, Ma, Liu 2024 ("Weak-to-Strong Reasoning")::

      L = -log sigmoid(beta [(log p(y_w|x) - log p_ref(y_w|x)) - (log p(y_l|x) - log p_ref(y_l|x))])

  with ``y_w`` the chosen and ``y_l`` the rejected answer. The reference model is frozen: its
  log-probabilities pass through ``stop_gradient``. The gradient with respect to ``log p(y_w|x)`` is
  ``-beta sigmoid(-m)`` and with respect to ``log p(y_l|x)`` is ``+beta sigmoid(-m)``, ``m`` the
  bracket times ``beta``.

  Args:
    chosen_logps, rejected_logps: ``[B]`` log-probabilities of the answers under the trained model
      (:func:`sequence_log_prob`).
    reference_chosen_logps, reference_rejected_logps: ``[B]``, under the frozen reference model.
    beta: ``beta > 0``, the strength of the implicit KL constraint.

  Returns:
    ``[B]``: the loss per pair.
  """
  b = _concrete(beta)
  if b is not None and not b > 0:
    raise ValueError(f"dpo_loss: beta must be > 0, got {beta!r}")
  logps = [_float(v) for v in (chosen_logps, rejected_logps, reference_chosen_logps, reference_rejected_logps)]
  if len({v.shape for v in logps}) != 1:
    raise ValueError(f"dpo_loss: the four log-probability arrays must have the same shape, got "
                     f"{[v.shape for v in logps]}")
  chosen, rejected, ref_chosen, ref_rejected = logps
  ref_chosen, ref_rejected = jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)
  margin = jnp.asarray(beta, chosen.dtype) * ((chosen - ref_chosen) - (rejected - ref_rejected))
  return -jax.nn.log_sigmoid(margin)


def sequence_log_prob(logits: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
  """``log p(y|x) = sum_l mask_l log softmax(logits_l)[y_l]`` per example.

  ``logits [B, ..., V]`` and integer ``targets [B, ...]`` (a classifier: ``[B, C]`` and ``[B]``; a
  language model: ``[B, L, V]`` and ``[B, L]`` with ``mask`` selecting the answer tokens).

  Returns:
    ``[B]``.
  """
  z = _float(logits)
  y = jnp.asarray(targets)
  if y.shape != z.shape[:-1] or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"sequence_log_prob: targets must be integers of shape {z.shape[:-1]}, got "
                     f"{y.dtype} {y.shape}")
  token = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[..., None], axis=-1)[..., 0]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != y.shape:
      raise ValueError(f"sequence_log_prob: mask {mask.shape} must have the targets' shape {y.shape}")
    token = jnp.where(mask, token, 0.0)
  return jnp.sum(token, axis=tuple(range(1, token.ndim)))


def _answers(x: ArrayLike, name: str, where: str) -> jax.Array:
  """Integer answers: integer arrays as they are, float scores ``[..., C]`` by their argmax."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x
  if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  raise ValueError(f"{where}: {name} must be integer answers or float scores [..., C], got {x.dtype} {x.shape}")


def agreement_mask(weak: ArrayLike, strong: ArrayLike, *, valid: ArrayLike | None = None) -> jax.Array:
  """The final-answer agreement filter of Yang, Ma, Liu 2024 ("Weak-to-Strong Reasoning", stage I):
  keep example ``i`` when the weak model's answer equals the strong model's,
  ``keep_i = valid_i and (a^weak_i == a^strong_i)``.

  ``weak`` and ``strong`` are integer answers ``[N]`` or scores ``[N, C]`` (compared by argmax);
  ``valid [N]`` drops examples whose weak answer could not be read (the paper drops empty answers).

  Returns:
    bool ``[N]``.
  """
  a_w = _answers(weak, "weak", "agreement_mask")
  a_s = _answers(strong, "strong", "agreement_mask")
  if a_w.shape != a_s.shape:
    raise ValueError(f"agreement_mask: weak answers {a_w.shape} and strong answers {a_s.shape} differ in shape")
  keep = a_w == a_s
  if valid is not None:
    keep = keep & jnp.asarray(valid, bool)
  return keep


def weak_to_strong_mask(weak: ArrayLike, strong: ArrayLike | None = None, *,
                        mode: Literal["naive", "filtered"] = "filtered",
                        valid: ArrayLike | None = None) -> jax.Array:
  """The examples the strong model is fine-tuned on, labelled with the weak model's answers (Yang, Ma,
  Liu 2024, "Weak-to-Strong Reasoning", stage I):

  * ``"naive"`` (full weak fine-tuning): every example, ``keep_i = valid_i``;
  * ``"filtered"``: the agreement subset of :func:`agreement_mask`, ``keep_i = valid_i and
    a^weak_i == a^strong_i``, where ``a^strong`` comes from the strong model itself (in-context
    answers in the first round, the fine-tuned strong model's answers in the next).

  One round of the paper's iteration is ``mask = weak_to_strong_mask(weak, strong)``, fine-tune on the
  kept examples with their weak labels, then recompute ``strong`` with the new model and repeat.

  Returns:
    bool ``[N]``.
  """
  if mode not in ("naive", "filtered"):
    raise ValueError(f"weak_to_strong_mask: mode must be 'naive' or 'filtered', got {mode!r}")
  a_w = _answers(weak, "weak", "weak_to_strong_mask")
  if mode == "naive":
    keep = jnp.ones(a_w.shape, bool)
    return keep if valid is None else keep & jnp.asarray(valid, bool)
  if strong is None:
    raise ValueError("weak_to_strong_mask: mode='filtered' needs the strong model's answers")
  return agreement_mask(a_w, strong, valid=valid)


class PreferencePairs(NamedTuple):
  """Preference pairs for DPO from :func:`preference_pairs`.

  Candidates of question ``i``: its ``S`` sampled strong-model answers (indices ``0..S-1``) and the weak
  model's answer (index ``S``).

  Attributes:
    chosen: int32 ``[N]``, the candidate index of the preferred answer ``y_w``.
    rejected: int32 ``[N]``, the candidate index of the dispreferred answer ``y_l``.
    valid: bool ``[N]``, whether question ``i`` yields a pair (else ``chosen``/``rejected`` are 0).
    majority: int32 ``[N]``, the most frequent sampled answer.
    confidence: float32 ``[N]``, its frequency among the ``S`` samples.
  """
  chosen: jax.Array
  rejected: jax.Array
  valid: jax.Array
  majority: jax.Array
  confidence: jax.Array


def _pick(mask: jax.Array, key: jax.Array | None) -> jax.Array:
  """Per row, a column where ``mask`` is True: the first one, or a uniform draw with ``key``."""
  if key is None:
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)
  noise = jax.random.uniform(key, mask.shape)
  return jnp.argmax(jnp.where(mask, noise, -1.0), axis=-1).astype(jnp.int32)


def preference_pairs(weak_answers: ArrayLike, sample_answers: ArrayLike, *, key: jax.Array | None = None,
                     min_confidence: float = 0.6, weak_negative_confidence: float = 0.8,
                     invalid_answer: int | None = None) -> PreferencePairs:
  """Contrastive pairs identified by the strong model itself (Yang, Ma, Liu 2024, "Weak-to-Strong
  Reasoning", stage II).

  For question ``i`` the strong model samples ``S`` answers ``a_{i,1..S}`` (temperature 1); their
  majority answer is ``a*_i`` with confidence ``c_i = #{s: a_{i,s} = a*_i} / S`` (ties: the answer
  sampled first). With the weak answer ``a^weak_i``:

  * ``c_i < min_confidence`` (0.6): no pair;
  * ``a^weak_i = a*_i``: ``y_w`` = the weak answer, ``y_l`` = a sample with ``a_{i,s} != a*_i``
    (no pair if every sample agrees);
  * otherwise, if ``c_i >= weak_negative_confidence`` (0.8): ``y_w`` = a sample with ``a_{i,s} = a*_i``,
    ``y_l`` = the weak answer; else no pair.

  The model's own "correct" answers are thus its confident majority, its "incorrect" ones the
  minority. Among several candidates the paper draws one at random: pass ``key`` for a uniform draw,
  or leave it ``None`` for the first (deterministic). One pair per question (the paper draws up to 3 per
  question on MATH: call again with other keys). ``invalid_answer`` marks unreadable answers: a
  question whose majority is unreadable gives no pair.

  Args:
    weak_answers: int ``[N]``.
    sample_answers: int ``[N, S]``.
    key: optional PRNG key for the random choice.
    min_confidence, weak_negative_confidence: the two thresholds in ``[0, 1]``.
    invalid_answer: optional integer code of an unreadable answer.

  Returns:
    :class:`PreferencePairs`; the ``S + 1`` candidates of question ``i`` are
    ``(sample_0, ..., sample_{S-1}, weak)``.
  """
  for name, value in (("min_confidence", min_confidence), ("weak_negative_confidence", weak_negative_confidence)):
    _check_unit(name, value, "preference_pairs")
  weak = jnp.asarray(weak_answers)
  samples = jnp.asarray(sample_answers)
  if (samples.ndim != 2 or weak.shape != samples.shape[:1] or not jnp.issubdtype(weak.dtype, jnp.integer)
      or not jnp.issubdtype(samples.dtype, jnp.integer)):
    raise ValueError(f"preference_pairs: need integer weak answers [N] and sample answers [N, S], got "
                     f"{weak.dtype} {weak.shape} and {samples.dtype} {samples.shape}")
  num_samples = samples.shape[1]
  same = samples[:, :, None] == samples[:, None, :]                  # [N, S, S]
  counts = jnp.sum(same, axis=-1)                                    # [N, S]
  first = jnp.argmax(counts, axis=-1)                                # first sample of the majority
  majority = jnp.take_along_axis(samples, first[:, None], axis=-1)[:, 0]
  confidence = jnp.max(counts, axis=-1).astype(jnp.float32) / num_samples
  agrees = samples == majority[:, None]                              # [N, S]
  usable = confidence >= min_confidence
  if invalid_answer is not None:
    usable = usable & (majority != invalid_answer)
  weak_right = weak == majority
  key_neg = key_pos = None
  if key is not None:
    key_neg, key_pos = jax.random.split(key)
  negative = _pick(~agrees, key_neg)
  positive = _pick(agrees, key_pos)
  weak_index = jnp.int32(num_samples)
  case_pos = usable & weak_right & jnp.any(~agrees, axis=-1)
  case_neg = usable & ~weak_right & (confidence >= weak_negative_confidence)
  chosen = jnp.where(case_pos, weak_index, jnp.where(case_neg, positive, 0)).astype(jnp.int32)
  rejected = jnp.where(case_pos, negative, jnp.where(case_neg, weak_index, 0)).astype(jnp.int32)
  return PreferencePairs(chosen=chosen, rejected=rejected, valid=case_pos | case_neg,
                         majority=majority.astype(jnp.int32), confidence=confidence)


# ----------------------------------------------------------------------------------------------
# progressive students: a boosted ensemble of small students


def _stack(logits: ArrayLike | Sequence[ArrayLike]) -> jax.Array:
  if isinstance(logits, (list, tuple)):
    return jnp.stack([_float(z) for z in logits])
  return _float(logits)


def ensemble_logits(student_logits: ArrayLike | Sequence[ArrayLike], *,
                    count: ArrayLike | None = None) -> jax.Array:
  """``F_k = sum_{j < k} z_j``: the ensemble's logits from the first ``k = count`` students.

  ``student_logits`` is ``[K, ..., C]`` (or a list of ``K`` arrays); ``count`` may be traced (students
  past it are masked out, so one compiled function serves every ensemble size); ``None``: all ``K``.
  """
  z = _stack(student_logits)
  if z.ndim < 2:
    raise ValueError(f"ensemble_logits: need stacked logits [K, ..., C], got {z.shape}")
  if count is None:
    return jnp.sum(z, axis=0)
  use = jnp.arange(z.shape[0]) < jnp.asarray(count)
  return jnp.sum(jnp.where(use.reshape((-1,) + (1,) * (z.ndim - 1)), z, 0.0), axis=0)


def residual_target(teacher_logits: ArrayLike, previous_logits: ArrayLike | Sequence[ArrayLike] | None = None,
                    *, count: ArrayLike | None = None) -> jax.Array:
  """What the teacher knows and students ``1..k-1`` do not, as a logit residual (functional gradient
  boosting with the squared loss, Friedman 2001, "Greedy Function Approximation: A Gradient Boosting
  Machine")::

      r_k = z^T - F_{k-1},    F_{k-1} = sum_{j < k} z_j

  Student ``k`` fits ``r_k`` (:func:`residual_loss`); the ensemble's logits are then
  ``F_k = F_{k-1} + z_k`` (:func:`ensemble_logits`). Gradients are stopped (the target is constant).

  Args:
    teacher_logits: ``[..., C]``.
    previous_logits: the earlier students' logits ``[k-1, ..., C]`` (or a list), ``None`` for ``k = 1``.
    count: optional (traced) number of earlier students to use, see :func:`ensemble_logits`.
  """
  t = _float(teacher_logits)
  if previous_logits is None:
    return jax.lax.stop_gradient(t)
  f = ensemble_logits(previous_logits, count=count)
  if f.shape != t.shape:
    raise ValueError(f"residual_target: teacher logits {t.shape} and student logits {f.shape} differ in shape")
  return jax.lax.stop_gradient(t - f)


def residual_loss(student_logits: ArrayLike, target: ArrayLike) -> jax.Array:
  """``L = 1/2 ||z_k - r_k||^2`` over the class axis (gradient ``z_k - r_k``): the squared-loss fit of
  student ``k`` to the residual :func:`residual_target`. Returns ``[...]`` per example."""
  z, r = _float(student_logits), _float(target)
  _check_logits(z, r, "residual_loss")
  return 0.5 * jnp.sum(jnp.square(z - jax.lax.stop_gradient(r)), axis=-1)


def boosted_distillation_loss(student_logits: ArrayLike, previous_sum: ArrayLike, teacher_logits: ArrayLike,
                              labels: ArrayLike, *, temperature: ArrayLike = 1.0,
                              alpha: ArrayLike = 0.5) -> jax.Array:
  """Progressive knowledge distillation of student ``k`` (Medina, Hadachi, Honeine, Bensrhair 2025,
  "Mamba base PKD for efficient knowledge compression"): each student is a weak learner trained with
  hard labels and the teacher's soft labels on what its predecessors left; here the soft/hard loss of
  :func:`distillation_loss` is applied to the running ensemble::

      L_k = alpha T^2 KL(softmax(z^T/T) || softmax((F_{k-1} + z_k)/T)) + (1 - alpha) CE(y, F_{k-1} + z_k)

  with ``F_{k-1} = sum_{j<k} z_j`` frozen (``stop_gradient``), so the gradient reaching ``z_k`` is the
  functional gradient of the ensemble's loss: student ``k`` learns what the teacher knows and the
  ensemble of ``1..k-1`` does not. (The paper writes ``L = alpha L_hard + (1 - alpha) L_soft``: its
  ``alpha`` is our ``1 - alpha``.) For the plain logit residual use :func:`residual_target` with
  :func:`residual_loss`.

  Args:
    student_logits: ``z_k``, ``[..., C]``.
    previous_sum: ``F_{k-1}`` (zeros for the first student), ``[..., C]``.
    teacher_logits, labels, temperature, alpha: as in :func:`distillation_loss`.
  """
  z = _float(student_logits)
  f = jax.lax.stop_gradient(_float(previous_sum))
  _check_logits(z, f, "boosted_distillation_loss")
  return distillation_loss(f + z, teacher_logits, labels, temperature=temperature, alpha=alpha)


def dense_conv_flops(params: PyTree, *, conv_positions: int | Mapping[str, int] = 1) -> int:
  """Forward FLOPs per example of the dense and convolution layers in a parameter tree.

  A multiply-add counts as 2 FLOPs. A 2-D leaf ``[d_in, d_out]`` (dense kernel) costs
  ``2 d_in d_out``; a leaf of rank >= 3 ``[k_1, ..., k_n, c_in, c_out]`` (convolution kernel) costs
  ``2 k_1...k_n c_in c_out P`` with ``P`` its number of output positions (``H_out x W_out``):
  ``conv_positions`` is one ``P`` for every convolution, or a mapping from the leaf's path
  (``jax.tree_util.keystr``, e.g. ``"['conv1']['kernel']"``) to its ``P``. Biases, norms and
  activations (rank <= 1 leaves) are not counted. For other layers, take FLOPs from XLA instead:
  ``jax.jit(apply).lower(params, x).compile().cost_analysis()["flops"]``.

  Returns:
    An ``int`` (host-side helper, not traced).
  """
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = np.shape(leaf)
    if len(shape) < 2:
      continue
    size = int(np.prod(shape))
    if len(shape) == 2:
      total += 2 * size
      continue
    name = jax.tree_util.keystr(path)
    if isinstance(conv_positions, Mapping):
      if name not in conv_positions:
        raise ValueError(f"dense_conv_flops: no output positions given for the convolution kernel {name} "
                         f"{shape}; conv_positions has {sorted(conv_positions)}")
      positions = conv_positions[name]
    else:
      positions = conv_positions
    if not isinstance(positions, numbers.Integral) or positions < 1:
      raise ValueError(f"dense_conv_flops: output positions of {name} must be a positive integer, got {positions!r}")
    total += 2 * size * int(positions)
  return total


def ensemble_flops(student_flops: Sequence[float], teacher_flops: float | None = None) -> np.ndarray:
  """Cumulative cost of the ensembles ``1..k``: ``C_k = sum_{j <= k} c_j``, divided by the teacher's
  FLOPs when given (the fraction of the teacher's cost that an ensemble of ``k`` students uses)."""
  c = np.cumsum(np.asarray(student_flops, np.float64))
  if teacher_flops is None:
    return c
  if not teacher_flops > 0:
    raise ValueError(f"ensemble_flops: teacher_flops must be > 0, got {teacher_flops!r}")
  return c / float(teacher_flops)
