"""Prototype state machines for continual learning: OnPro's adaptive prototypical feedback (a replay sampler)
and ProtoCL's conjugate Bayesian class prototypes (a classification head).

Adaptive prototypical feedback (APF; Wei, Ye, Huang, Zhang & Shan 2023, "Online Prototype Learning for
Online Continual Learning"). After each step the class means ``mu_c`` of the replayed batch's projections
(``prox.losses.online_prototypes``, the two views averaged) say which seen classes the model confuses: the
closer two means, the likelier their samples are mixed up. A replay batch of ``n`` examples is drawn as

* ``n_base = floor(base_rate n)`` examples uniformly from the memory, each mixed with a random partner of
  the same draw, ``x = (1 - lam) x_i + lam x_partner``, with ``lam ~ U(lower, upper)`` with probability
  ``mixup_p`` and ``lam = 0`` otherwise;
* ``n - n_base`` mixed pairs ``(x_a, x_b)`` of two *different* classes ``(c, c')``: the class pair is drawn
  with probability ``P(c, c') = softmax_{c < c'}(1 / ||mu_c - mu_c'||_2)`` over the pairs of classes present in
  the means, then one stored example of each class uniformly, ``lam ~ Beta(alpha, alpha)`` with probability
  ``mixup_p`` and 0 otherwise.

The loss on a drawn row is ``prox.losses.mixup_cross_entropy(logits, y_a, y_b, lam)``. Defaults are the
reference code's (``base_rate = 0.75``, ``mixup_p = 0.6``, ``U(0, 0.6)``, ``alpha = 0.4``).

Departures: the reference allots the ``n - n_base`` rows to class pairs by rounding ``P n`` (then fixing the
sum at random) and draws one ``lam`` (and one mixup coin) per class pair; here each row draws its pair
i.i.d. from ``P`` (the same expected counts) and its own coin and ``lam``, so that the draw is one fixed-shape
jittable function. A class of the means that has no example left in the memory (the reservoir may have
dropped it) is replaced by a uniformly drawn stored example, as the reference replaces it by a random class.
With fewer than two classes in the means, the pair rows are uniform draws mixed like the base rows.

Bayesian prototypes (ProtoCL; Kessler, Cobb, Rudner, Zohren & Roberts 2023, "On Sequential Bayesian
Inference for Continual Learning", Sec. 7, after PCOC of Harrison et al. 2020). The encoder's embedding
``z`` (``D`` dims) of a class-``c`` example is Gaussian around a class prototype, with a conjugate prior, and
the class frequencies have a Dirichlet prior:

    y ~ Cat(pi),  pi ~ Dir(alpha_0);     z | y = c ~ N(mu_c, diag(sigma^2)),  mu_c ~ N(m_0, diag(s_0^2)).

After observing embeddings ``z_i`` of class ``c`` (``n_c`` of them, sum ``S_c``), per dimension,

    lambda_c = 1 / s_0^2 + n_c / sigma^2,     m_c = (m_0 / s_0^2 + S_c / sigma^2) / lambda_c,     alpha_c = alpha_0 + n_c,

and the posterior predictive is ``p(z | y = c, D) = N(z; m_c, diag(1 / lambda_c + sigma^2))``,
``p(y = c | D) = alpha_c / sum_c' alpha_c'``. Classification is by Bayes' rule,
``p(y | z, D) = softmax_c(log p(z | c, D) + log p(c | D))``, and the encoder is trained on the negative log of it
for each incoming batch *before* the batch is added to the posterior (the reference code's order). The
updates are exact and order-free: a batch update equals the one-by-one updates.

``likelihood="normal_inverse_gamma"`` also puts a prior on the noise precision, per class and dimension,
``mu | tau ~ N(m_0, 1 / (kappa_0 tau))``, ``tau ~ Gamma(a_0, b_0)``: with the class's ``n``, mean ``zbar`` and
``M2 = sum (z - zbar)^2``,

    kappa' = kappa + n,  m' = (kappa m + n zbar) / kappa',  a' = a + n / 2,
    b' = b + M2 / 2 + kappa n (zbar - m)^2 / (2 kappa'),

with the Student-t predictive ``t_{2a}(z; m, b (kappa + 1) / (a kappa))``. This is an option of prox's: the
paper uses the known-noise model above (its noise scale a hyperparameter).

Departures: the reference code keeps the prior's natural parameters as randomly initialised tensors (one
mean per class) and can learn the noise and the Dirichlet prior; here the prior is fixed and shared by the
classes (``m_0``, ``s_0^2``, ``sigma^2``, ``alpha_0`` given). Its replay memory is prox's reservoir.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from prox.tasks.replay import ReservoirState, reservoir_sample, reservoir_size

PyTree = Any


def _positive_int(name: str, value: Any, lo: int = 1) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
  return int(value)


def _in_range(name: str, value: float, lo: float, hi: float) -> float:
  if not np.isfinite(value) or not lo <= float(value) <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
  return float(value)


# --------------------------------------------------------------------------- adaptive prototypical feedback


class FeedbackState(NamedTuple):
  """State of :func:`prototype_feedback`.

  Attributes:
    class_means: float32 ``[C, D]``, the last replayed batch's class means (zero for absent classes).
    present: bool ``[C]``, the classes in those means.
  """
  class_means: jax.Array
  present: jax.Array


class FeedbackSample(NamedTuple):
  """A replay batch from :func:`prototype_feedback`: row ``i`` is ``(1 - lam_i) first_i + lam_i second_i``.

  Attributes:
    first, second: the two stored examples of each row (memory structure, leaves ``[n, ...]``).
    labels_first, labels_second: int32 ``[n]``.
    lam: float32 ``[n]``, the mixing weight of ``second`` (0: no mixup).
    valid: bool ``[n]``, False for rows that are not stored examples (a memory emptier than the draw).
    from_feedback: bool ``[n]``, True for the rows drawn by class-pair confusion (the last ``n - n_base``).
  """
  first: PyTree
  second: PyTree
  labels_first: jax.Array
  labels_second: jax.Array
  lam: jax.Array
  valid: jax.Array
  from_feedback: jax.Array


class PrototypeFeedback(NamedTuple):
  """OnPro's replay sampler as pure functions (see the module docstring).

  Attributes:
    init: ``init(dim) -> FeedbackState`` (no class present: all rows are base draws).
    update: ``update(state, class_means [C, D], present [C]) -> state``.
    pair_probabilities: ``pair_probabilities(state) -> [C, C]`` float32, ``P(c, c')`` on ``c < c'``, 0 elsewhere.
    sample: ``sample(state, memory, key, n) -> FeedbackSample`` (``n`` a Python int, ``1 <= n <= capacity``).
  """
  init: Callable[[int], FeedbackState]
  update: Callable[[FeedbackState, jax.Array, jax.Array], FeedbackState]
  pair_probabilities: Callable[[FeedbackState], jax.Array]
  sample: Callable[[FeedbackState, ReservoirState, jax.Array, int], FeedbackSample]


def _default_label(data: PyTree) -> jax.Array:
  return data["label"]


def prototype_feedback(
    num_classes: int,
    *,
    base_rate: float = 0.75,
    mixup_p: float = 0.6,
    mixup_lower: float = 0.0,
    mixup_upper: float = 0.6,
    mixup_alpha: float = 0.4,
    label_of: Callable[[PyTree], jax.Array] = _default_label,
    min_distance: float = 1e-6,
) -> PrototypeFeedback:
  """OnPro's adaptive prototypical feedback: replay biased to the classes whose prototypes are closest.

  Args:
    num_classes: ``C``.
    base_rate: fraction of each replay batch drawn uniformly (the rest by class-pair confusion).
    mixup_p: probability that a row is mixed (otherwise ``lam = 0``).
    mixup_lower, mixup_upper: ``lam ~ U(lower, upper)`` for the base rows.
    mixup_alpha: ``lam ~ Beta(alpha, alpha)`` for the feedback rows.
    label_of: the int label array of the memory's data, ``label_of(memory.data) -> [capacity]`` (default
      ``data["label"]``).
    min_distance: distances below this count as this (two identical means: a large but finite logit).
  """
  c = _positive_int("num_classes", num_classes)
  base_rate = _in_range("base_rate", base_rate, 0.0, 1.0)
  mixup_p = _in_range("mixup_p", mixup_p, 0.0, 1.0)
  lower = _in_range("mixup_lower", mixup_lower, 0.0, 1.0)
  upper = _in_range("mixup_upper", mixup_upper, lower, 1.0)
  if not np.isfinite(mixup_alpha) or mixup_alpha <= 0:
    raise ValueError(f"mixup_alpha must be a finite number > 0, got {mixup_alpha!r}")
  if not np.isfinite(min_distance) or min_distance <= 0:
    raise ValueError(f"min_distance must be a finite number > 0, got {min_distance!r}")
  upper_tri = np.triu(np.ones((c, c), bool), k=1)

  def init(dim: int) -> FeedbackState:
    d = _positive_int("dim", dim)
    return FeedbackState(class_means=jnp.zeros((c, d), jnp.float32), present=jnp.zeros((c,), bool))

  def update(state: FeedbackState, class_means: jax.Array, present: jax.Array) -> FeedbackState:
    class_means = jnp.asarray(class_means, jnp.float32)
    if class_means.shape != state.class_means.shape:
      raise ValueError(f"class_means must have shape {state.class_means.shape}, got {class_means.shape}")
    return FeedbackState(class_means=jax.lax.stop_gradient(class_means), present=jnp.asarray(present, bool))

  def pair_logits(state: FeedbackState) -> tuple[jax.Array, jax.Array]:
    mu = state.class_means
    sq = jnp.sum(jnp.square(mu[:, None, :] - mu[None, :, :]), axis=-1)
    dist = jnp.sqrt(jnp.maximum(sq, min_distance ** 2))
    ok = upper_tri & state.present[:, None] & state.present[None, :]
    return jnp.where(ok, 1.0 / dist, -jnp.inf), ok

  def pair_probabilities(state: FeedbackState) -> jax.Array:
    logits, ok = pair_logits(state)
    finite = jnp.where(ok, logits, 0.0)             # the logits 1 / distance are > 0
    e = jnp.where(ok, jnp.exp(finite - jnp.max(finite)), 0.0)
    return e / jnp.maximum(jnp.sum(e), 1e-30)

  def sample(state: FeedbackState, memory: ReservoirState, key: jax.Array, n: int) -> FeedbackSample:
    cap = int(jax.tree.leaves(memory.data)[0].shape[0])
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= cap:
      raise ValueError(f"n must be an int in [1, capacity={cap}], got {n!r}")
    n_base = int(n * base_rate)
    n_pair = n - n_base
    labels = jnp.asarray(label_of(memory.data)).astype(jnp.int32)
    size = reservoir_size(memory)
    filled = jnp.arange(cap) < size
    # one uniform draw feeds every choice but the reservoir draw and Beta's rejection loop (each separate
    # jax.random call compiles its own hash: one draw keeps the compile short)
    k_base, k_uniform, k_lam2 = jax.random.split(key, 3)
    sizes = (n_base, n_base, n_base, n_pair * c * c, n_pair * 2 * cap, n_pair)
    u = jax.random.uniform(k_uniform, (sum(sizes),), minval=jnp.finfo(jnp.float32).tiny)
    u_perm, u_coin1, u_lam1, u_pair, u_slot, u_coin2 = jnp.split(u, np.cumsum(sizes)[:-1])
    gumbel = lambda v: -jnp.log(-jnp.log(v))
    parts = []
    if n_base:
      rows, valid = reservoir_sample(memory, k_base, n_base)
      perm = jnp.argsort(u_perm)
      coin = u_coin1 < mixup_p
      lam = jnp.where(coin & valid[perm], lower + (upper - lower) * u_lam1, 0.0)
      second = jax.tree.map(lambda x: x[perm], rows)
      parts.append((rows, second, label_of(rows), label_of(second), lam, valid, jnp.zeros((n_base,), bool)))
    if n_pair:
      logits, ok = pair_logits(state)
      has_pairs = jnp.any(ok)
      flat = jnp.where(has_pairs, logits, 0.0).reshape(-1)
      pair = jnp.argmax(flat[None, :] + gumbel(u_pair.reshape(n_pair, c * c)), axis=-1)   # ~ softmax(flat)
      cls = jnp.stack([pair // c, pair % c], axis=1)                                    # [n_pair, 2]
      g_slot = gumbel(u_slot.reshape(n_pair, 2, cap))
      of_class = (labels[None, None, :] == cls[:, :, None]) & filled[None, None, :] & has_pairs
      by_class = jnp.argmax(jnp.where(of_class, g_slot, -jnp.inf), axis=-1)
      anywhere = jnp.argmax(jnp.where(filled[None, None, :], g_slot, -jnp.inf), axis=-1)
      slots = jnp.where(jnp.any(of_class, axis=-1), by_class, anywhere)               # [n_pair, 2]
      first = jax.tree.map(lambda x: x[slots[:, 0]], memory.data)
      second = jax.tree.map(lambda x: x[slots[:, 1]], memory.data)
      valid = jnp.broadcast_to(size > 0, (n_pair,))
      coin = u_coin2 < mixup_p
      lam = jnp.where(coin & valid, _beta(k_lam2, mixup_alpha, mixup_alpha, (n_pair,)), 0.0)
      parts.append((first, second, label_of(first), label_of(second), lam, valid,
                    jnp.broadcast_to(has_pairs, (n_pair,))))
    cat = lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
    first = jax.tree.map(cat, *[p[0] for p in parts])
    second = jax.tree.map(cat, *[p[1] for p in parts])
    return FeedbackSample(
        first=first, second=second,
        labels_first=cat(*[jnp.asarray(p[2]).astype(jnp.int32) for p in parts]),
        labels_second=cat(*[jnp.asarray(p[3]).astype(jnp.int32) for p in parts]),
        lam=cat(*[p[4].astype(jnp.float32) for p in parts]),
        valid=cat(*[p[5] for p in parts]),
        from_feedback=cat(*[p[6] for p in parts]))

  return PrototypeFeedback(init=init, update=update, pair_probabilities=jax.jit(pair_probabilities),
                           sample=jax.jit(sample, static_argnums=3))


def _beta(key: jax.Array, a: float, b: float, shape: tuple[int, ...]) -> jax.Array:
  """Exact ``Beta(a, b)`` draws by Johnk's rejection method (in log space, so small ``a, b`` do not underflow).

  ``U, V ~ U(0, 1)``, ``log X = log U / a``, ``log Y = log V / b``; accept when ``X + Y <= 1`` and return
  ``X / (X + Y)``. A ``while_loop`` redraws the rejected entries; the acceptance probability is
  ``Gamma(a+1) Gamma(b+1) / Gamma(a+b+1)`` (0.85 at ``a = b = 0.4``, 0.5 at ``a = b = 1``), falling fast for large
  ``a, b``, where ``jax.random.beta`` is used instead. Compiles in a fraction of ``jax.random.beta``'s
  (gamma-based) time, which matters for mixup's small ``alpha``.
  """
  if a + b > 4:
    return jax.random.beta(key, a, b, shape, jnp.float32)

  def body(carry):
    k, out, done = carry
    k, ku, kv = jax.random.split(k, 3)
    log_x = jnp.log(jax.random.uniform(ku, shape, minval=jnp.finfo(jnp.float32).tiny)) / a
    log_y = jnp.log(jax.random.uniform(kv, shape, minval=jnp.finfo(jnp.float32).tiny)) / b
    log_s = jnp.logaddexp(log_x, log_y)
    accept = (log_s <= 0) & ~done
    return k, jnp.where(accept, jnp.exp(log_x - log_s), out), done | accept

  init = (key, jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool))
  return jax.lax.while_loop(lambda c: ~jnp.all(c[2]), body, init)[1]


def mixup_inputs(first: PyTree, second: PyTree, lam: jax.Array) -> PyTree:
  """``(1 - lam) first + lam second`` on floating leaves (``lam`` ``[n]`` broadcast over the example axes);
  other leaves (labels, ids) are ``first``'s."""
  lam = jnp.asarray(lam)

  def mix(a, b):
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    w = lam.astype(a.dtype).reshape(lam.shape + (1,) * (a.ndim - 1))
    return (1 - w) * a + w * jnp.asarray(b, a.dtype)

  return jax.tree.map(mix, first, second)


# --------------------------------------------------------------------------- Bayesian prototypes (ProtoCL)


class BayesianPrototypesState(NamedTuple):
  """State of :func:`bayesian_prototypes` (the posterior; float32, or float64 under x64 defaults).

  Attributes:
    mean: ``[C, D]``, the posterior mean ``m_c`` of each class prototype.
    precision: ``[C, D]``; ``likelihood="normal"``: the posterior precision ``lambda_c`` of the prototype;
      ``"normal_inverse_gamma"``: ``kappa_c``.
    shape: ``[C]``, the Gamma shape ``a_c`` (normal-inverse-gamma; unused, 0, for ``"normal"``).
    rate: ``[C, D]``, the Gamma rate ``b_c`` (normal-inverse-gamma; unused, 0, for ``"normal"``).
    concentration: ``[C]``, the Dirichlet posterior ``alpha_c``.
    count: ``[C]``, observations (weights) absorbed per class.
  """
  mean: jax.Array
  precision: jax.Array
  shape: jax.Array
  rate: jax.Array
  concentration: jax.Array
  count: jax.Array


class BayesianPrototypes(NamedTuple):
  """ProtoCL's head as pure functions (see the module docstring).

  Attributes:
    init: ``init() -> state``, the prior.
    update: ``update(state, z [B, D], labels [B], weights=None) -> state``, conjugate update (``z`` gets no
      gradient).
    log_joint: ``log_joint(state, z) -> [B, C]``, ``log p(z | c, D) + log p(c | D)``.
    log_posterior: ``log_posterior(state, z) -> [B, C]``, ``log p(c | z, D)`` (log-softmax of ``log_joint``).
    loss: ``loss(state, z, labels) -> [B]``, ``-log p(y | z, D)`` (gradient to ``z``, not to the state).
    predict: ``predict(state, z) -> int32 [B]``, the class of largest posterior probability.
  """
  init: Callable[[], BayesianPrototypesState]
  update: Callable[..., BayesianPrototypesState]
  log_joint: Callable[[BayesianPrototypesState, jax.Array], jax.Array]
  log_posterior: Callable[[BayesianPrototypesState, jax.Array], jax.Array]
  loss: Callable[[BayesianPrototypesState, jax.Array, jax.Array], jax.Array]
  predict: Callable[[BayesianPrototypesState, jax.Array], jax.Array]


def _positive_array(name: str, value: Any) -> np.ndarray:
  arr = np.asarray(value, np.float64)
  if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  return arr


def bayesian_prototypes(
    num_classes: int,
    dim: int,
    *,
    likelihood: Literal["normal", "normal_inverse_gamma"] = "normal",
    noise_variance: float | np.ndarray = 1.0,
    prior_mean: float | np.ndarray = 0.0,
    prior_variance: float | np.ndarray = 1.0,
    prior_kappa: float = 1.0,
    prior_shape: float = 1.0,
    prior_rate: float | np.ndarray = 1.0,
    dirichlet: float | np.ndarray = 1.0,
) -> BayesianPrototypes:
  """ProtoCL's conjugate Gaussian class prototypes with a Dirichlet class prior (see the module docstring).

  Args:
    num_classes, dim: ``C`` classes, ``D``-dimensional embeddings.
    likelihood: ``"normal"`` (the paper: known noise ``sigma^2``) or ``"normal_inverse_gamma"`` (unknown
      noise precision with a Gamma prior).
    noise_variance: ``sigma^2`` (scalar or ``[D]``), ``"normal"`` only.
    prior_mean: ``m_0`` (scalar, ``[D]`` or ``[C, D]``).
    prior_variance: ``s_0^2`` (scalar, ``[D]`` or ``[C, D]``), ``"normal"`` only.
    prior_kappa, prior_shape, prior_rate: ``kappa_0``, ``a_0``, ``b_0`` (``b_0`` scalar, ``[D]`` or ``[C, D]``),
      ``"normal_inverse_gamma"`` only.
    dirichlet: ``alpha_0`` (scalar or ``[C]``).
  """
  c = _positive_int("num_classes", num_classes)
  d = _positive_int("dim", dim)
  if likelihood not in ("normal", "normal_inverse_gamma"):
    raise ValueError(f"likelihood must be 'normal' or 'normal_inverse_gamma', got {likelihood!r}")
  nig = likelihood == "normal_inverse_gamma"
  sigma2 = _positive_array("noise_variance", noise_variance)
  s02 = _positive_array("prior_variance", prior_variance)
  kappa0 = _positive_array("prior_kappa", prior_kappa)
  a0 = _positive_array("prior_shape", prior_shape)
  b0 = _positive_array("prior_rate", prior_rate)
  alpha0 = _positive_array("dirichlet", dirichlet)
  m0 = np.asarray(prior_mean, np.float64)
  try:
    m0 = np.broadcast_to(m0, (c, d))
    s02 = np.broadcast_to(s02, (c, d))
    b0 = np.broadcast_to(b0, (c, d))
    sigma2 = np.broadcast_to(sigma2, (d,))
    alpha0 = np.broadcast_to(alpha0, (c,))
  except ValueError as e:
    raise ValueError(f"bayesian_prototypes: a prior does not broadcast to [C={c}, D={d}]: {e}") from None
  if not np.all(np.isfinite(m0)):
    raise ValueError("prior_mean must be finite")
  if nig and (kappa0.ndim or a0.ndim):
    raise ValueError("prior_kappa and prior_shape must be scalars")

  def init() -> BayesianPrototypesState:
    dt = jnp.result_type(float)
    return BayesianPrototypesState(
        mean=jnp.asarray(m0, dt),
        precision=jnp.asarray(np.broadcast_to(kappa0, (c, d)) if nig else 1.0 / s02, dt),
        shape=jnp.full((c,), float(a0) if nig else 0.0, dt),
        rate=jnp.asarray(b0 if nig else np.zeros((c, d)), dt),
        concentration=jnp.asarray(alpha0, dt),
        count=jnp.zeros((c,), dt))

  def update(state: BayesianPrototypesState, z: jax.Array, labels: jax.Array,
             weights: jax.Array | None = None) -> BayesianPrototypesState:
    dt = state.mean.dtype
    z = jax.lax.stop_gradient(jnp.asarray(z, dt))
    if z.ndim != 2 or z.shape[1] != d:
      raise ValueError(f"z must be [B, {d}], got shape {z.shape}")
    labels = jnp.asarray(labels)
    w = jnp.ones(z.shape[:1], dt) if weights is None else jnp.asarray(weights, dt)
    onehot = jax.nn.one_hot(labels, c, dtype=dt) * w[:, None]                      # [B, C]
    n = jnp.sum(onehot, axis=0)                                                      # [C]
    total = onehot.T @ z                                                             # [C, D]
    concentration = state.concentration + n
    count = state.count + n
    if not nig:
      inv_s2 = jnp.asarray(1.0 / sigma2, dt)
      precision = state.precision + n[:, None] * inv_s2
      mean = (state.precision * state.mean + total * inv_s2) / precision
      return state._replace(mean=mean, precision=precision, concentration=concentration, count=count)
    has = n > 0
    zbar = total / jnp.where(has, n, 1.0)[:, None]
    m2 = onehot.T @ jnp.square(z - zbar[labels])                                     # [C, D]
    kappa = state.precision + n[:, None]
    mean = (state.precision * state.mean + total) / kappa
    shape = state.shape + n / 2
    rate = state.rate + 0.5 * m2 + state.precision * n[:, None] * jnp.square(zbar - state.mean) / (2 * kappa)
    rate = jnp.where(has[:, None], rate, state.rate)
    return BayesianPrototypesState(mean=mean, precision=kappa, shape=shape, rate=rate,
                                   concentration=concentration, count=count)

  def log_joint(state: BayesianPrototypesState, z: jax.Array) -> jax.Array:
    dt = state.mean.dtype
    z = jnp.asarray(z, dt)[:, None, :]                                               # [B, 1, D]
    err2 = jnp.square(z - state.mean[None])                                          # [B, C, D]
    if not nig:
      var = 1.0 / state.precision + jnp.asarray(sigma2, dt)                          # [C, D]
      log_like = -0.5 * jnp.sum(err2 / var + jnp.log(2 * math.pi * var), axis=-1)
    else:
      nu = 2 * state.shape[:, None]                                                   # [C, 1]
      scale2 = state.rate * (state.precision + 1) / (state.shape[:, None] * state.precision)
      log_like = jnp.sum(
          gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * jnp.log(nu * math.pi * scale2)
          - (nu + 1) / 2 * jnp.log1p(err2 / (nu * scale2)), axis=-1)
    log_prior = jnp.log(state.concentration) - jnp.log(jnp.sum(state.concentration))
    return log_like + log_prior[None]

  def log_posterior(state: BayesianPrototypesState, z: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(log_joint(jax.lax.stop_gradient(state), z), axis=-1)

  def loss(state: BayesianPrototypesState, z: jax.Array, labels: jax.Array) -> jax.Array:
    logp = log_posterior(state, z)
    return -jnp.take_along_axis(logp, jnp.asarray(labels)[:, None].astype(jnp.int32), axis=-1)[:, 0]

  def predict(state: BayesianPrototypesState, z: jax.Array) -> jax.Array:
    return jnp.argmax(log_joint(state, z), axis=-1).astype(jnp.int32)

  return BayesianPrototypes(init=init, update=jax.jit(update), log_joint=jax.jit(log_joint),
                            log_posterior=jax.jit(log_posterior), loss=jax.jit(loss), predict=jax.jit(predict))
