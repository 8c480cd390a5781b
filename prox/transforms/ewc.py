"""Elastic weight consolidation (EWC) as an optax transform (Kirkpatrick et al. 2017; Schwarz et al. 2018).

Chain it *before* the optimizer so the penalty gradient is treated like the loss gradient::

  tx = optax.chain(ewc(ewc_lambda=100.0), optax.sgd(1e-2))
  ...                                        # train task 0
  fisher = diagonal_fisher(logprob_fn, params, task0_batch)
  opt_state = consolidate_opt_state(opt_state, params, fisher, learning_rate=1e-2)
  ...                                        # train task 1 (the penalty now pulls towards task 0's weights)

Update rule (``updates`` are gradients here): ``u <- u + lambda * F * (w - m)`` where, after tasks
``1..t`` with Fishers ``F_j`` and anchors ``w*_j``,

* ``mode="separate"`` (Kirkpatrick et al.: one quadratic per task, summed):
  ``sum_j lambda F_j (w - w*_j) = lambda S (w - m)`` with ``S = sum_j F_j`` and ``m = sum_j F_j w*_j / S``
  (the Fisher-weighted mean anchor). The state keeps ``S`` and ``m`` (folded incrementally at each
  ``consolidate``), so a step costs the same after 1 or 1000 tasks; Avalanche instead loops over every old
  task in Python at each step. The penalty value also needs the constant
  ``offset = sum_j sum_i F_j,i (w*_j,i - m_i)**2``, kept as a scalar.
* ``mode="online"`` (Schwarz et al., online EWC): ``F <- gamma F + F_new``, ``m <- w*_t`` (one anchor).

Penalty (for logging; its gradient is the update above): ``lambda/2 * (sum_i S_i (w_i - m_i)**2 + offset)``.

Stability: the penalty is a quadratic of curvature ``lambda * F_i`` per coordinate; plain SGD with learning
rate ``lr`` diverges along coordinate ``i`` once ``lr * lambda * F_i > 2`` (heavy-ball momentum ``beta``:
``2 (1 + beta)``; Nesterov: ``2 (1 + beta) / (1 + 2 beta)``). ``consolidate(..., learning_rate=lr)`` warns
when ``lambda * max(F) * lr`` exceeds ``stability_limit`` (default 2, plain SGD): beyond it the weights
oscillate with growing amplitude and turn to NaN (Avalanche's EWC with ``lambda = 1000`` on split digits does
this). Adam-type optimizers normalise the step, so the bound does not apply to them (pass
``learning_rate=None``). ``optax.apply_if_finite`` around the chain skips non-finite steps.

Choosing lambda: :func:`ewc_lambda_range` computes the interval from the Fisher of the old task, the
curvature of the new task's loss and the learning rate (the derivation is in its docstring): below ``low``
the new task's loss pulls the important weights more than half-way away from their anchors, above ``high``
SGD diverges. Lambda has no scale of its own: a well-fitted task has small per-example gradients, hence a
small Fisher, and needs a large lambda. Measured on the digits CNN of ``examples/flax_mnist`` (SGD 0.05,
momentum 0.9; digits 0-4 then 5-9): max F = 2.2e-3, range [57, 35,273]; forgetting of task 0 6.6 points
without EWC, 6.2 at ``low``, 2.2 at ``sqrt(low * high) = 1,416``, 0.9 at ``0.9 high``; at ``2.8 high`` SGD
diverged (NaN).

The hyperparameters live in the state (``ewc_lambda`` written by every ``update``, so
``optax.inject_hyperparams`` schedules reach ``ewc_penalty``; ``gamma`` and the mode are fixed at ``init``),
so ``consolidate(state, params, fisher)`` and ``ewc_penalty(state, params)`` need nothing else.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class EWCState(NamedTuple):
  """State of ``ewc``.

  Attributes:
    fisher: ``S = sum_j F_j`` (separate) or the decayed running Fisher (online); params-shaped, at least f32.
    anchor: ``m``, the Fisher-weighted mean of the anchors (separate) or the last anchor (online).
    offset: f32 (f64 for f64 params) scalar, ``sum_j sum_i F_j,i (w*_j,i - m_i)**2`` (0 in online mode).
    num_tasks: int32 scalar, number of ``consolidate`` calls.
    ewc_lambda: f32 scalar, the lambda of the last ``init``/``update``.
    gamma: f32 scalar, online decay (1 in separate mode).
    online: bool scalar, True for ``mode="online"``.
  """
  fisher: PyTree
  anchor: PyTree
  offset: jax.Array
  num_tasks: jax.Array
  ewc_lambda: jax.Array
  gamma: jax.Array
  online: jax.Array


def _concrete(x) -> float | None:
  """``float(x)`` if ``x`` is a concrete number, ``None`` for tracers (inside jit / inject_hyperparams)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(x)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None


def _state_dtype(x: jax.Array) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _scalar_dtype(tree: PyTree) -> jnp.dtype:
  """float32, or float64 when the parameters are float64 (x64 mode)."""
  return jnp.result_type(jnp.float32, *[_state_dtype(x) for x in jax.tree.leaves(tree)])


def ewc(
    ewc_lambda: float | jax.Array,
    *,
    mode: Literal["separate", "online"] = "separate",
    gamma: float | jax.Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """EWC penalty gradient: ``updates + lambda * F * (params - anchor)`` (Kirkpatrick et al. 2017).

  Args:
    ewc_lambda: penalty strength ``lambda >= 0``.
    mode: ``"separate"`` (one quadratic per task, summed) or ``"online"`` (``F <- gamma F + F_new``, one
      anchor; Schwarz et al. 2018). Used by ``consolidate``.
    gamma: online decay in ``[0, 1]``; must be 1 in separate mode.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` requires ``params``. Until the first
    ``consolidate`` the Fisher is zero and the transform is the identity.
  """
  lam = _concrete(ewc_lambda)
  if lam is not None and not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda!r}")
  if mode not in ("separate", "online"):
    raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
  g = _concrete(gamma)
  if g is not None and not 0.0 <= g <= 1.0:
    raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
  if mode == "separate" and g is not None and g != 1.0:
    raise ValueError(f"gamma={gamma!r} only applies to mode='online'; separate mode keeps every task")

  def init_fn(params: PyTree) -> EWCState:
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _state_dtype(p)), params)
    return EWCState(
        fisher=zeros,
        anchor=jax.tree.map(jnp.copy, zeros),
        offset=jnp.zeros((), _scalar_dtype(params)),
        num_tasks=jnp.zeros((), jnp.int32),
        ewc_lambda=jnp.asarray(ewc_lambda, jnp.float32),
        gamma=jnp.asarray(gamma, jnp.float32),
        online=jnp.asarray(mode == "online"),
    )

  def update_fn(updates, state: EWCState, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("ewc needs params: call tx.update(grads, opt_state, params)")
    lam_ = jnp.asarray(ewc_lambda, jnp.float32)

    def add_penalty(u, f, m, p):
      return (u + lam_ * f * (p.astype(f.dtype) - m)).astype(u.dtype)

    updates = jax.tree.map(add_penalty, updates, state.fisher, state.anchor, params)
    return updates, state._replace(ewc_lambda=lam_)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _first_mismatch(expected: PyTree, got: PyTree) -> str | None:
  """The first path at which two trees differ in structure or leaf shape, as one readable line."""
  ke = jax.tree_util.tree_flatten_with_path(expected)[0]
  kg = jax.tree_util.tree_flatten_with_path(got)[0]
  for (pe, le), (pg, lg) in zip(ke, kg):
    if pe != pg:
      return f"expected leaf {jax.tree_util.keystr(pe)} but found {jax.tree_util.keystr(pg)}"
    if jnp.shape(le) != jnp.shape(lg):
      return f"{jax.tree_util.keystr(pe)}: shape {jnp.shape(lg)} != expected {jnp.shape(le)}"
  if len(ke) > len(kg):
    return f"missing leaf {jax.tree_util.keystr(ke[len(kg)][0])}"
  if len(kg) > len(ke):
    return f"unexpected leaf {jax.tree_util.keystr(kg[len(ke)][0])}"
  if jax.tree.structure(expected) != jax.tree.structure(got):
    return f"tree structure {jax.tree.structure(got)} != expected {jax.tree.structure(expected)}"
  return None


@jax.jit
def ewc_stability(state: EWCState, learning_rate: float | jax.Array) -> jax.Array:
  """``lambda * max_i F_i * learning_rate``: plain SGD on the penalty diverges when this exceeds 2."""
  leaves = jax.tree.leaves(state.fisher)
  max_f = jnp.max(jnp.stack([jnp.max(f) for f in leaves])) if leaves else jnp.zeros(())
  return state.ewc_lambda * max_f * learning_rate


def check_stability(
    state: EWCState, learning_rate: float, stability_limit: float = 2.0
) -> float | None:
  """Warn (``warnings.warn``, ``RuntimeWarning``) if ``lambda * max F * lr > stability_limit``.

  Returns the product, or ``None`` inside jit (nothing concrete to check). ``stability_limit`` is 2 for plain
  SGD, ``2 (1 + beta)`` for heavy-ball momentum ``beta``.
  """
  value = _concrete(ewc_stability(state, learning_rate))
  if value is not None and value > stability_limit:
    warnings.warn(
        f"EWC: lambda * max(F) * learning_rate = {value:.4g} exceeds the stability limit {stability_limit:g} "
        f"of the inner optimizer: the penalty will make SGD diverge (NaN weights); lower ewc_lambda or the "
        f"learning rate, or wrap the optimizer in optax.apply_if_finite.",
        RuntimeWarning, stacklevel=3)
  return value


@jax.jit
def _consolidate(state: EWCState, params: PyTree, fisher: PyTree) -> EWCState:
  """The numerical part of ``consolidate`` (jitted: at a task boundary it runs once, outside the step)."""
  def fold(s, m, f_new, p):
    f_new = f_new.astype(s.dtype)
    w = p.astype(s.dtype)
    s_sep = s + f_new
    ratio = jnp.where(s_sep > 0, f_new / jnp.where(s_sep > 0, s_sep, 1), 0)
    m_sep = jnp.where(s > 0, m + ratio * (w - m), jnp.where(f_new > 0, w, m))
    off = jnp.sum(jnp.where(s > 0, s * ratio * jnp.square(w - m), 0)).astype(state.offset.dtype)
    s_onl = state.gamma.astype(s.dtype) * s + f_new
    return (jnp.where(state.online, s_onl, s_sep), jnp.where(state.online, w, m_sep), off)

  folded = jax.tree.map(fold, state.fisher, state.anchor, fisher, params)
  treedef = jax.tree.structure(state.fisher)
  parts = treedef.flatten_up_to(folded)
  new_fisher = treedef.unflatten([x[0] for x in parts])
  new_anchor = treedef.unflatten([x[1] for x in parts])
  added = sum((x[2] for x in parts), jnp.zeros((), state.offset.dtype))
  offset = jnp.where(state.online, jnp.zeros((), state.offset.dtype), state.offset + added)
  return state._replace(fisher=new_fisher, anchor=new_anchor, offset=offset, num_tasks=state.num_tasks + 1)


def consolidate(
    state: EWCState,
    params: PyTree,
    fisher: PyTree,
    *,
    learning_rate: float | None = None,
    stability_limit: float = 2.0,
) -> EWCState:
  """State transition at a task boundary: add task ``t``'s quadratic ``(F_t, w*_t = params)``.

  separate: ``S' = S + F_t``; ``m' = m + (F_t / S') (w*_t - m)`` (``m' = w*_t`` where ``S = 0``);
  ``offset' = offset + sum_i S_i F_t,i / S'_i (w*_t,i - m_i)**2`` (West's weighted-variance update),
  so that ``sum_j F_j (w - w*_j)**2 = S' (w - m')**2 + offset'`` exactly.
  online: ``S' = gamma S + F_t``; ``m' = w*_t``; ``offset' = 0``.

  Jittable; called outside jit with ``learning_rate`` it also runs ``check_stability`` on the new state.
  Raises ``ValueError`` naming the first differing path if ``params`` or ``fisher`` does not match the
  state's parameter tree.
  """
  for name, tree in (("params", params), ("fisher", fisher)):
    bad = _first_mismatch(state.fisher, tree)
    if bad is not None:
      raise ValueError(f"consolidate: {name} does not match the EWC state's parameter tree: {bad}")

  new_state = _consolidate(state, params, fisher)
  if learning_rate is not None:
    check_stability(new_state, learning_rate, stability_limit)
  return new_state


@jax.jit
def ewc_penalty(state: EWCState, params: PyTree) -> jax.Array:
  """Penalty value ``lambda/2 * (sum_i S_i (w_i - m_i)**2 + offset)``, i.e. ``lambda/2 sum_j F_j (w - w*_j)**2``
  (separate) or ``lambda/2 F (w - w*)**2`` (online); its gradient is what ``ewc`` adds to the updates."""
  dtype = state.offset.dtype

  def quad(s, m, p):
    return jnp.sum(s * jnp.square(p.astype(s.dtype) - m)).astype(dtype)

  total = sum(jax.tree.leaves(jax.tree.map(quad, state.fisher, state.anchor, params)), jnp.zeros((), dtype))
  return 0.5 * state.ewc_lambda.astype(dtype) * (total + state.offset)


def sgd_stability_limit(momentum: float = 0.0, *, nesterov: bool = False) -> float:
  """The largest stable ``lr * c`` of ``optax.sgd(lr, momentum, nesterov)`` on a quadratic of curvature ``c``.

  Plain SGD: ``e <- (1 - lr c) e`` is stable iff ``lr c < 2``. Heavy ball (``v <- beta v + g``, ``w <- w - lr v``):
  the error obeys ``z^2 - (1 + beta - lr c) z + beta = 0``, stable iff ``lr c < 2 (1 + beta)``. Nesterov
  (``w <- w - lr (beta v' + g)``): ``lr c < 2 (1 + beta) / (1 + 2 beta)``.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"sgd_stability_limit: momentum must lie in [0, 1), got {momentum!r}")
  if nesterov:
    return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
  return 2.0 * (1.0 + momentum)


class EWCLambdaRange(NamedTuple):
  """What :func:`ewc_lambda_range` proposes.

  Attributes:
    low: the smallest useful lambda: the penalty holds the important weights ``retention`` of the way to
      their anchors against the new task's loss.
    high: the largest stable lambda for SGD, ``stability_limit / (lr * max_fisher)`` (``inf`` without a
      learning rate, e.g. for Adam).
    max_fisher: ``max_i F_i``.
    fisher_scale: the Fisher-weighted mean Fisher ``sum F^2 / sum F`` (the Fisher of the weights that matter).
    curvature_scale: the Fisher-weighted mean curvature of the new loss ``sum F h / sum F``.
  """
  low: float
  high: float
  max_fisher: float
  fisher_scale: float
  curvature_scale: float

  @property
  def geometric_mean(self) -> float:
    """``sqrt(low * high)``: the middle of the range on a log scale (``inf`` when ``high`` is)."""
    return float(np.sqrt(self.low * self.high))


def ewc_lambda_range(
    fisher: PyTree | EWCState,
    *,
    curvature: PyTree | float,
    learning_rate: float | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    retention: float = 0.5,
) -> EWCLambdaRange:
  """Proposes the range of EWC lambdas that both matter and keep SGD stable.

  Near the anchor ``m`` of the old task, with the old task's diagonal Fisher ``F`` and a diagonal model of the
  new task's loss ``L_B(w) ~ sum_i h_i / 2 (w_i - a_i)^2`` (curvature ``h_i``, minimiser ``a_i``), training
  minimises ``L_B(w) + lambda/2 sum_i F_i (w_i - m_i)^2``.

  Upper end (stability). The objective's curvature along coordinate ``i`` is at least ``lambda F_i``;
  gradient descent with learning rate ``lr`` diverges along it once ``lr * lambda * F_i`` exceeds ``2``
  (``2 (1 + beta)`` with heavy-ball momentum ``beta``, ``2 (1 + beta) / (1 + 2 beta)`` with Nesterov; see
  :func:`sgd_stability_limit`). Hence ``high = limit / (lr * max_i F_i)``.

  Lower end (the penalty matters). The penalised minimum is
  ``w_i = (h_i a_i + lambda F_i m_i) / (h_i + lambda F_i)``: the penalty keeps the fraction
  ``r_i = lambda F_i / (h_i + lambda F_i)`` of the way back to the old anchor, so ``r_i >= rho`` needs
  ``lambda F_i >= rho / (1 - rho) h_i``. One lambda for all coordinates: the least-squares fit of
  ``lambda F`` to ``rho / (1 - rho) h``, which weights coordinates by ``F_i^2`` (the important ones),

      low = rho / (1 - rho) * sum_i F_i h_i / sum_i F_i^2 = rho / (1 - rho) * curvature_scale / fisher_scale.

  When ``h`` is proportional to ``F`` every coordinate keeps exactly ``rho`` at ``lambda = low``.

  The curvature of a log-likelihood loss is its Fisher (Gauss-Newton), so ``curvature`` is best the new
  task's :func:`diagonal_fisher` *at the old anchor*, computed on a batch of new-task examples before
  training on it, in the same units as ``fisher`` (both means over examples; the loss a mean over the
  batch). A scalar ``curvature`` is the same ``h`` for every coordinate. If ``low >= high`` no lambda works
  with this learning rate: lower it, or use an optimizer that normalises the step (Adam).

  Args:
    fisher: the old task's diagonal Fisher (a pytree), or an ``EWCState`` (its accumulated Fisher).
    curvature: ``h``, a pytree like ``fisher`` or a float ``> 0``.
    learning_rate: SGD's learning rate; ``None`` (e.g. Adam): ``high = inf``.
    momentum, nesterov: the SGD variant, for the stability limit.
    retention: ``rho`` in ``(0, 1)``.

  Returns:
    An :class:`EWCLambdaRange` of Python floats (computed on the host in float64).
  """
  if not 0.0 < retention < 1.0:
    raise ValueError(f"ewc_lambda_range: retention must lie in (0, 1), got {retention!r}")
  if learning_rate is not None and not learning_rate > 0:
    raise ValueError(f"ewc_lambda_range: learning_rate must be > 0 or None, got {learning_rate!r}")
  limit = sgd_stability_limit(momentum, nesterov=nesterov)
  if isinstance(fisher, EWCState):
    fisher = fisher.fisher
  f_leaves = [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(fisher)]
  if not f_leaves:
    raise ValueError("ewc_lambda_range: fisher has no leaves")
  if any(np.any(~np.isfinite(x)) or np.any(x < 0) for x in f_leaves):
    raise ValueError("ewc_lambda_range: fisher must be finite and >= 0")
  if isinstance(curvature, (int, float, np.number)) and not isinstance(curvature, bool):
    if not (np.isfinite(curvature) and curvature > 0):
      raise ValueError(f"ewc_lambda_range: curvature must be > 0, got {curvature!r}")
    h_leaves = [np.full(x.shape, float(curvature)) for x in f_leaves]
  else:
    bad = _first_mismatch(fisher, curvature)
    if bad is not None:
      raise ValueError(f"ewc_lambda_range: curvature does not match the Fisher's tree: {bad}")
    h_leaves = [np.asarray(jax.device_get(x), np.float64) for x in jax.tree.leaves(curvature)]
    if any(np.any(~np.isfinite(x)) or np.any(x < 0) for x in h_leaves):
      raise ValueError("ewc_lambda_range: curvature must be finite and >= 0")
  sum_f = sum(float(np.sum(x)) for x in f_leaves)
  if sum_f <= 0:
    raise ValueError("ewc_lambda_range: the Fisher is zero everywhere, so no lambda has any effect")
  sum_f2 = sum(float(np.sum(x * x)) for x in f_leaves)
  sum_fh = sum(float(np.sum(x * h)) for x, h in zip(f_leaves, h_leaves))
  max_f = max(float(np.max(x, initial=0.0)) for x in f_leaves)
  fisher_scale, curvature_scale = sum_f2 / sum_f, sum_fh / sum_f
  low = retention / (1.0 - retention) * sum_fh / sum_f2
  high = float("inf") if learning_rate is None else limit / (float(learning_rate) * max_f)
  return EWCLambdaRange(low=low, high=high, max_fisher=max_f, fisher_scale=fisher_scale,
                        curvature_scale=curvature_scale)


def _is_ewc_state(x) -> bool:
  return isinstance(x, EWCState)


def find_ewc_state(opt_state: PyTree) -> EWCState:
  """The (first) ``EWCState`` inside an optimizer state (``optax.chain``, ``inject_hyperparams``, ...)."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=_is_ewc_state):
    if isinstance(leaf, EWCState):
      return leaf
  raise ValueError("no EWCState found in opt_state: is ewc(...) part of the optimizer?")


def consolidate_opt_state(opt_state: PyTree, params: PyTree, fisher: PyTree, **kwargs) -> PyTree:
  """Apply ``consolidate`` to every ``EWCState`` inside ``opt_state``; other parts are returned unchanged."""
  find_ewc_state(opt_state)  # raises if there is none
  return jax.tree.map(lambda s: consolidate(s, params, fisher, **kwargs) if isinstance(s, EWCState) else s,
                      opt_state, is_leaf=_is_ewc_state)


def diagonal_fisher(
    logprob_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    minibatch_size: int | None = None,
    chunk_size: int | None = None,
) -> PyTree:
  """Diagonal empirical Fisher of ``logprob_fn`` over ``batch`` (Kirkpatrick et al. 2017).

  ``logprob_fn(params, example) -> scalar`` is ``log p(y | x, params)`` of ONE example (``batch`` leaves have
  a leading axis of ``N`` examples; ``example`` is one slice).

  * ``minibatch_size=None`` (default, the correct empirical Fisher): ``F = 1/N sum_n g_n**2`` with per-example
    gradients ``g_n = grad logprob_fn(params, x_n)`` from ``vmap(grad)``, in chunks of ``chunk_size``
    examples (default: all at once) to bound memory.
  * ``minibatch_size=B`` (Avalanche's approximation): ``F_B = 1/K sum_k (mean_{n in batch k} g_n)**2`` over the
    ``K = ceil(N / B)`` consecutive mini-batches (the last one may be smaller, as in a PyTorch DataLoader).

  How lambda scales between them: if per-example gradients have mean ``mu`` and variance ``sigma**2`` per
  coordinate, ``E[F] = mu**2 + sigma**2`` while ``E[F_B] = mu**2 + sigma**2 / B``. After training
  ``mu ~ 0``, so ``F / F_B`` lies between 1 and ``B`` (close to ``B`` at a minimum): a lambda tuned for
  Avalanche's mini-batch Fisher corresponds to a lambda ``F_B / F`` times smaller with the per-example Fisher.
  Measured by ``benchmarks/ewc_fisher.py`` (MLP 64-64-10 trained with SGD
  on digits), ``sum(F) / sum(F_B)``: split-digits task 0 (269 examples) 10.1 / 7.4 / 4.4 / 2.7 for
  ``B = 10 / 32 / 64 / 128`` (a short last mini-batch pulls the ratio below ``B``); all 1347 training examples
  9.8 / 30.5 / 60.1 / 108.8.

  The computation is jitted with ``logprob_fn`` as a static argument: pass the same function object at every
  task boundary (not a new lambda) so it compiles once.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch is empty")
  n = int(jnp.shape(leaves[0])[0])
  if any(int(jnp.shape(x)[0]) != n for x in leaves):
    raise ValueError(f"batch leaves must share the leading axis, got {[jnp.shape(x) for x in leaves]}")
  if minibatch_size is not None and (not isinstance(minibatch_size, (int, np.integer)) or minibatch_size < 1):
    raise ValueError(f"minibatch_size must be a positive int or None, got {minibatch_size!r}")
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  group = minibatch_size if minibatch_size is not None else (chunk_size or n)
  group = min(group, n)
  return _fisher(logprob_fn, params, batch, group=group, minibatch=minibatch_size is not None)


@functools.partial(jax.jit, static_argnames=("logprob_fn", "group", "minibatch"))
def _fisher(logprob_fn, params, batch, *, group: int, minibatch: bool):
  return gradient_moment(logprob_fn, params, batch, group=group, minibatch=minibatch, op="square")


def gradient_moment(fn, params, batch, *, group: int, minibatch: bool, op: str):
  """``1/n sum_i op(grad fn(params, x_i))`` over the examples of ``batch`` (``minibatch=False``), or the
  mean over groups of ``group`` examples of ``op(grad mean_{i in group} fn(params, x_i))``
  (``minibatch=True``), with ``op`` ``"square"`` (EWC's diagonal Fisher) or ``"abs"`` (MAS's importance).
  Examples are processed ``group`` at a time (a ``lax.scan``); the last group is padded with weight 0.
  Traceable (call it under ``jax.jit`` with ``fn``, ``group``, ``minibatch`` and ``op`` static)."""
  elementwise = {"square": jnp.square, "abs": jnp.abs}[op]
  n = int(jnp.shape(jax.tree.leaves(batch)[0])[0])
  num_groups = -(-n // group)
  pad = num_groups * group - n
  weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
  weights = weights.reshape(num_groups, group)

  def grouped(x):
    x = jnp.asarray(x)
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    return x.reshape((num_groups, group) + x.shape[1:])

  groups = jax.tree.map(grouped, batch)
  acc0 = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _state_dtype(p)), params)

  if not minibatch:
    per_example = jax.vmap(jax.grad(fn), in_axes=(None, 0))

    def body(acc, xs):
      xb, wb = xs
      g = per_example(params, xb)
      return jax.tree.map(
          lambda a, gi: a + jnp.tensordot(wb.astype(a.dtype), elementwise(gi.astype(a.dtype)), axes=1),
          acc, g), None

    total, _ = jax.lax.scan(body, acc0, (groups, weights))
    return jax.tree.map(lambda a: a / n, total)

  def weighted_mean(p, xb, wb):
    values = jax.vmap(fn, in_axes=(None, 0))(p, xb)
    return jnp.sum(wb * values) / jnp.sum(wb)

  def body_mb(acc, xs):
    xb, wb = xs
    g = jax.grad(weighted_mean)(params, xb, wb)
    return jax.tree.map(lambda a, gi: a + elementwise(gi.astype(a.dtype)), acc, g), None

  total, _ = jax.lax.scan(body_mb, acc0, (groups, weights))
  return jax.tree.map(lambda a: a / num_groups, total)
