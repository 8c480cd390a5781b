"""ALP-GMM curriculum teacher (Portelas, Colas, Hofmann, Oudeyer 2019, "Teacher algorithms for curriculum
learning of Deep RL in continuously parameterized environments"; ref flowersteam/teachDeepRL) as pure
state transitions on a pytree, so that sampling and updating run inside jitted code.

    state = init(bounds, key=key)                  # bounds = (low [D], high [D])
    tasks, state = sample(state, key)              # [D]  (or sample(state, key, num_tasks=B) -> [B, D])
    state = update(state, tasks, rewards)          # rewards in [0, 1]; one task or a batch [B, D]

Convention: ``teacher("alp_gmm", bounds, **options)`` returns the state machine as a NamedTuple of pure
functions (``init(key)``, ``sample``, ``update``, ...), like an optax transform; the module functions
below are its parts.

Rule (the paper and its reference code). After each episode on task p with reward r:
    alp = |r - r_nn|, r_nn = reward of the nearest previous task (Euclidean), alp = 0 while the history
    holds <= 5 tasks; append (p, alp).
Every ``fit_rate`` episodes (from episode ``fit_rate`` on) refit, from scratch, full-covariance GMMs with
k = 2..10 on the last ``fit_rate`` points (p, alp) and keep the lowest AIC (EM: k-means init, reg_covar
1e-6, max_iter 100, tol 1e-3; see ``prox.tasks.gmm``). Sample: uniform in the box with probability
``random_task_ratio`` = 0.2 and always before the first fit; otherwise pick a Gaussian j with probability
mu_j[alp] / sum_l mu_l[alp] (uniform if all are 0), draw from it, drop the alp coordinate, clip to the
bounds.

Everything the teacher needs lives in ``ALPGMMState``: fixed-size history buffers, the current GMM padded
to max(ks) components, the PRNG key used by the refits and the hyperparameters (as arrays), so the state
jits, vmaps over seeds and checkpoints as one pytree. Departures from the reference: the nearest-neighbour
history is a ring buffer of ``history_size`` tasks (the reference keeps all of them; ``history_size`` >=
the number of episodes reproduces it), and the GMM's random numbers come from JAX, not numpy.

A batch [B, D] given to ``update`` is processed in order, exactly as B consecutive single updates
(including any refit that falls inside the batch). Under ``jax.vmap`` over independent teachers,
``lax.cond`` with a batched predicate becomes a select and every update would pay for a refit; to vmap,
call ``observe`` per episode and then ``maybe_refit(state, due)`` with ``due`` unbatched (teachers in
lockstep: ``refit_due`` of any one of them), as ``prox.tasks.toy_env.run`` does.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prox.tasks import gmm as gmm_lib


class ALPGMMHyperparams(NamedTuple):
  """Hyperparameters carried in the state (arrays, so they vmap and checkpoint with it)."""
  random_task_ratio: jax.Array   # float scalar, probability of a uniform task after the first fit
  ks: jax.Array                  # int32 [num_ks], candidate numbers of Gaussians
  reg_covar: jax.Array           # float scalar
  max_iter: jax.Array            # int32 scalar, EM steps per fit
  tol: jax.Array                 # float scalar, EM convergence threshold
  nn_warmup: jax.Array           # int32 scalar, alp = 0 while the history holds <= nn_warmup tasks


class ALPGMMState(NamedTuple):
  """The whole ALP-GMM teacher.

  Attributes:
    low, high: [D] task-space bounds.
    history_tasks: [D, H + 1] ring buffer of past tasks, coordinate-major (the nearest-neighbour search
      then reads contiguous rows); slot count % (H + 1) receives the newest task, so the search always
      covers the last min(count, H) previous tasks, H = history_size.
    history_rewards: [H + 1] their rewards.
    recent: [F, D + 1] ring buffer of the last F = fit_rate points (task, alp), the GMM's data.
    count: int32, episodes observed so far.
    gmm: the current mixture over (task, alp), padded to max(ks) components.
    fitted: bool, whether a GMM has been fitted yet (uniform sampling until then).
    num_fits: int32, refits so far.
    key: uint32 key data, consumed by the refits (k-means++ initialisation).
    hyper: ALPGMMHyperparams.
  """
  low: jax.Array
  high: jax.Array
  history_tasks: jax.Array
  history_rewards: jax.Array
  recent: jax.Array
  count: jax.Array
  gmm: gmm_lib.GMMParams
  fitted: jax.Array
  num_fits: jax.Array
  key: jax.Array
  hyper: ALPGMMHyperparams


class RandomState(NamedTuple):
  """The random teacher: the bounds and an episode count."""
  low: jax.Array
  high: jax.Array
  count: jax.Array


class Teacher(NamedTuple):
  """A teacher's pure functions (``init(bounds, *, key, **hyperparams)``, ``sample(state, key,
  num_tasks=None)``, ``update(state, task_params, reward)``), plus ``update`` split into its per-episode
  part ``observe`` and its periodic part ``maybe_refit(state, due)`` with ``due = refit_due(state)``, for
  drivers that vmap teachers over seeds (``update = maybe_refit(s, refit_due(s))`` after ``observe``)."""
  init: Callable[..., Any]
  sample: Callable[..., Any]
  update: Callable[..., Any]
  observe: Callable[..., Any]
  refit_due: Callable[[Any], jax.Array]
  maybe_refit: Callable[[Any, jax.Array], Any]


# ---------------------------------------------------------------------------------------------------
# Validation (eager, one clear line, before anything compiles)

def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_bounds(bounds) -> tuple[np.ndarray, np.ndarray]:
  try:
    low, high = bounds
  except (TypeError, ValueError):
    raise ValueError(f"bounds must be a pair (low, high) of equal-length vectors, got {bounds!r}") from None
  low = np.atleast_1d(np.asarray(low, dtype=np.float64))
  high = np.atleast_1d(np.asarray(high, dtype=np.float64))
  if low.ndim != 1 or low.shape != high.shape or low.size == 0:
    raise ValueError(f"bounds low {low.tolist()} and high {high.tolist()} must be 1-D of equal length")
  if not np.all(np.isfinite(low)) or not np.all(np.isfinite(high)):
    raise ValueError(f"bounds must be finite, got low={low.tolist()} high={high.tolist()}")
  if np.any(low >= high):
    raise ValueError(f"bounds need low < high in every dimension, got low={low.tolist()} high={high.tolist()}")
  return low, high


def _key_data(key) -> jax.Array:
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.dtype != jnp.uint32:
    raise TypeError(f"key must be a PRNG key or uint32 key data, got dtype {key.dtype}")
  return key


def _as_key(key) -> jax.Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _check_observation(state, task_params, reward) -> tuple[jax.Array, jax.Array]:
  dim = state.low.shape[-1]
  task_params = jnp.asarray(task_params)
  reward = jnp.asarray(reward)
  if task_params.ndim not in (1, 2) or task_params.shape[-1] != dim:
    raise ValueError(f"task_params must have shape [{dim}] or [batch, {dim}], got {task_params.shape}")
  batch_shape = task_params.shape[:-1]
  if reward.shape != batch_shape:
    raise ValueError(f"reward must have shape {batch_shape} to match task_params {task_params.shape}, "
                     f"got {reward.shape}")
  if not _is_traced(reward):
    r = np.asarray(reward, dtype=np.float64)
    if not np.all((r >= 0.0) & (r <= 1.0)):
      raise ValueError(f"rewards must lie in [0, 1], got {r[~((r >= 0.0) & (r <= 1.0))].tolist()[:5]}")
  return task_params.astype(state.low.dtype), reward.astype(state.low.dtype)


# ---------------------------------------------------------------------------------------------------
# ALP-GMM

def init(bounds, *, key, fit_rate: int = 250, random_task_ratio: float = 0.2,
         ks: Sequence[int] = tuple(range(2, 11)), reg_covar: float = 1e-6, max_iter: int = 100,
         tol: float = 1e-3, history_size: int = 20_000, nn_warmup: int = 5,
         dtype=jnp.float32) -> ALPGMMState:
  """Creates the ALP-GMM teacher state (defaults: the reference's).

  Args:
    bounds: (low, high), each a [D] vector with low < high.
    key: PRNG key (typed or uint32 key data) for the GMM refits.
    fit_rate: episodes between refits; also the number of recent points each refit uses.
    random_task_ratio: probability of a uniform task once a GMM exists.
    ks: candidate numbers of Gaussians (the lowest AIC wins).
    reg_covar, max_iter, tol: EM settings (scikit-learn's defaults).
    history_size: H, tasks kept for the nearest-neighbour ALP (ring buffer; the reference keeps all).
    nn_warmup: alp = 0 while the history holds <= nn_warmup tasks (reference: 5).
    dtype: floating dtype of tasks, rewards and the GMM.
  """
  low, high = _check_bounds(bounds)
  if isinstance(fit_rate, bool) or not isinstance(fit_rate, (int, np.integer)) or fit_rate <= 0:
    raise ValueError(f"fit_rate must be a positive int, got {fit_rate!r}")
  ks_np = np.asarray(ks)
  if ks_np.ndim != 1 or ks_np.size == 0 or not np.issubdtype(ks_np.dtype, np.integer):
    raise ValueError(f"ks must be a non-empty sequence of ints, got {ks!r}")
  if ks_np.min() < 1 or ks_np.max() > fit_rate:
    raise ValueError(f"ks must lie in 1..fit_rate={fit_rate}, got {ks_np.tolist()}")
  if not 0.0 <= float(random_task_ratio) <= 1.0:
    raise ValueError(f"random_task_ratio must be in [0, 1], got {random_task_ratio}")
  if reg_covar < 0:
    raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
  if int(max_iter) < 1:
    raise ValueError(f"max_iter must be >= 1, got {max_iter}")
  if tol < 0:
    raise ValueError(f"tol must be >= 0, got {tol}")
  if int(nn_warmup) < 0:
    raise ValueError(f"nn_warmup must be >= 0, got {nn_warmup}")
  if int(history_size) <= int(nn_warmup):
    raise ValueError(f"history_size must be > nn_warmup={nn_warmup}, got {history_size}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating, got {dtype}")
  dim = low.size
  k_max = int(ks_np.max())
  eye = jnp.broadcast_to(jnp.eye(dim + 1, dtype=dtype), (k_max, dim + 1, dim + 1))
  empty_gmm = gmm_lib.GMMParams(
      weights=jnp.zeros((k_max,), dtype), means=jnp.zeros((k_max, dim + 1), dtype),
      covariances=eye, cholesky=eye, active=jnp.zeros((k_max,), bool))
  hyper = ALPGMMHyperparams(
      random_task_ratio=jnp.asarray(random_task_ratio, dtype), ks=jnp.asarray(ks_np, jnp.int32),
      reg_covar=jnp.asarray(reg_covar, dtype), max_iter=jnp.asarray(max_iter, jnp.int32),
      tol=jnp.asarray(tol, dtype), nn_warmup=jnp.asarray(nn_warmup, jnp.int32))
  return ALPGMMState(
      low=jnp.asarray(low, dtype), high=jnp.asarray(high, dtype),
      history_tasks=jnp.zeros((dim, int(history_size) + 1), dtype),
      history_rewards=jnp.zeros((int(history_size) + 1,), dtype),
      recent=jnp.zeros((fit_rate, dim + 1), dtype),
      count=jnp.asarray(0, jnp.int32), gmm=empty_gmm, fitted=jnp.asarray(False),
      num_fits=jnp.asarray(0, jnp.int32), key=_key_data(key), hyper=hyper)


def _nn_alp_and_write(state: ALPGMMState, task: jax.Array, reward: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes the task into its ring slot first and then searches every other filled slot, so that XLA
  updates the buffer in place (reading the old buffer after the write would force a copy)."""
  slots = state.history_tasks.shape[1]
  pos = state.count % slots
  hist = lax.dynamic_update_slice(state.history_tasks, task[:, None], (jnp.zeros_like(pos), pos))
  d2 = sum(((hist[i] - task[i]) ** 2 for i in range(1, task.shape[0])), (hist[0] - task[0]) ** 2)
  idx = jnp.arange(slots)
  previous = jnp.minimum(state.count, slots - 1)            # tasks before this one still stored
  valid = (idx != pos) & (idx < jnp.minimum(state.count + 1, slots))
  d2 = jnp.where(valid, d2, jnp.inf)
  # min + first index attaining it: two plain reductions, much faster on CPU than argmin's
  # (value, index) reduction.
  nearest = jnp.min(jnp.where(d2 == jnp.min(d2), idx, slots))
  r_nn = state.history_rewards[jnp.minimum(nearest, slots - 1)]
  alp = jnp.where(previous > state.hyper.nn_warmup, jnp.abs(reward - r_nn), jnp.zeros_like(reward))
  return alp, hist, state.history_rewards.at[pos].set(reward)


def nearest_neighbour_alp(state: ALPGMMState, task: jax.Array, reward: jax.Array) -> jax.Array:
  """alp = |r - r_nn| with r_nn the reward of the nearest stored previous task (Euclidean distance,
  lowest buffer slot on ties); 0 while the history holds <= nn_warmup tasks (reference: 5)."""
  task, reward = _check_observation(state, task, reward)
  return _nn_alp_and_write(state, task, reward)[0]


def _observe_one(state: ALPGMMState, task: jax.Array, reward: jax.Array) -> ALPGMMState:
  alp, hist, hist_rewards = _nn_alp_and_write(state, task, reward)
  fit_rate = state.recent.shape[0]
  return state._replace(
      history_tasks=hist, history_rewards=hist_rewards,
      recent=state.recent.at[state.count % fit_rate].set(jnp.concatenate([task, alp[None]])),
      count=state.count + 1)


def observe(state: ALPGMMState, task_params, reward) -> ALPGMMState:
  """Records episodes (task, reward) without refitting: computes each alp against the history (in
  order for a batch [B, D]) and appends (task, alp). ``update`` = ``observe`` + refits when due."""
  task_params, reward = _check_observation(state, task_params, reward)
  if task_params.ndim == 1:
    return _observe_one(state, task_params, reward)
  return lax.scan(lambda s, tr: (_observe_one(s, *tr), None), state, (task_params, reward))[0]


def refit_due(state: ALPGMMState) -> jax.Array:
  """True when the episode count is a positive multiple of fit_rate (the reference's schedule)."""
  fit_rate = state.recent.shape[0]
  return (state.count >= fit_rate) & (state.count % fit_rate == 0)


def refit(state: ALPGMMState) -> ALPGMMState:
  """Fits GMMs with k in ks on the last fit_rate points (task, alp) from scratch, keeps the lowest AIC."""
  key, sub = jax.random.split(_as_key(state.key))
  h = state.hyper
  fits = gmm_lib.fit_many(state.recent, sub, h.ks, max_components=state.gmm.means.shape[0],
                          init="kmeans", reg_covar=h.reg_covar, max_iter=h.max_iter, tol=h.tol)
  best = gmm_lib.select(fits, "aic")
  return state._replace(gmm=best.params, fitted=jnp.asarray(True), num_fits=state.num_fits + 1,
                        key=jax.random.key_data(key))


def maybe_refit(state: ALPGMMState, due) -> ALPGMMState:
  """``refit(state)`` if ``due`` else ``state``, as a ``lax.cond`` whose operands exclude the large
  nearest-neighbour buffers (passing them through the branches would copy them every episode).
  Under ``jax.vmap`` over teachers pass an unbatched ``due`` (``in_axes=(0, None)``) so that the cond
  stays a branch instead of becoming a select that pays for a refit every episode."""
  small = state._replace(history_tasks=None, history_rewards=None)
  small = lax.cond(due, refit, lambda s: s, small)
  return small._replace(history_tasks=state.history_tasks, history_rewards=state.history_rewards)


def _update_one(state: ALPGMMState, task: jax.Array, reward: jax.Array) -> ALPGMMState:
  state = _observe_one(state, task, reward)
  return maybe_refit(state, refit_due(state))


def update(state: ALPGMMState, task_params, reward) -> ALPGMMState:
  """Records episodes and refits every fit_rate episodes (see module docstring).

  Args:
    state: the teacher.
    task_params: [D] or a batch [B, D] of tasks that were played, in order.
    reward: scalar or [B] rewards in [0, 1] (checked when concrete; not checked under jit).
  """
  task_params, reward = _check_observation(state, task_params, reward)
  if task_params.ndim == 1:
    return _update_one(state, task_params, reward)
  return lax.scan(lambda s, tr: (_update_one(s, *tr), None), state, (task_params, reward))[0]


def component_probabilities(state: ALPGMMState) -> jax.Array:
  """P(pick Gaussian j) = mu_j[alp] / sum_l mu_l[alp] over active components (uniform if the sum is 0)."""
  g = state.gmm
  alp_means = jnp.where(g.active, jnp.maximum(g.means[:, -1], 0.0), 0.0)
  total = jnp.sum(alp_means)
  uniform = g.active / jnp.maximum(jnp.sum(g.active), 1)
  return jnp.where(total > 0, alp_means / jnp.where(total > 0, total, 1.0), uniform)


def sample(state: ALPGMMState, key, num_tasks: int | None = None) -> tuple[jax.Array, ALPGMMState]:
  """Draws tasks: uniform in [low, high] with probability random_task_ratio (always before the first
  fit), else from Gaussian j ~ component_probabilities(state), alp coordinate dropped, clipped to the
  bounds. Returns ([D] or [num_tasks, D] tasks, state); the state is returned unchanged."""
  if num_tasks is not None and (not isinstance(num_tasks, (int, np.integer)) or num_tasks <= 0):
    raise ValueError(f"num_tasks must be a positive int or None, got {num_tasks!r}")
  key = _as_key(_key_data(key))
  n = 1 if num_tasks is None else int(num_tasks)
  dim = state.low.shape[-1]
  dtype = state.low.dtype
  k_unif, k_norm = jax.random.split(key)
  # one uniform draw per task for: the uniform task (dim), the random-task coin, the component choice
  u = jax.random.uniform(k_unif, (n, dim + 2), dtype)
  uniform = state.low + u[:, :dim] * (state.high - state.low)
  use_random = (u[:, dim] < state.hyper.random_task_ratio) | ~state.fitted
  cdf = jnp.cumsum(component_probabilities(state))
  comp = jnp.sum(u[:, dim + 1, None] * cdf[-1] >= cdf[None, :], axis=1)     # inverse CDF
  comp = jnp.minimum(comp, cdf.shape[0] - 1)
  eps = jax.random.normal(k_norm, (n, dim + 1), dtype)
  draws = state.gmm.means[comp] + jnp.einsum("nij,nj->ni", state.gmm.cholesky[comp], eps)
  tasks = jnp.clip(draws[:, :dim], state.low, state.high)
  tasks = jnp.where(use_random[:, None], uniform, tasks)
  return (tasks[0] if num_tasks is None else tasks), state


# ---------------------------------------------------------------------------------------------------
# Random teacher (same interface)

def random_init(bounds, *, key=None, dtype=jnp.float32) -> RandomState:
  """The baseline teacher: tasks uniform in the box; ``key`` is accepted for interface parity."""
  del key
  low, high = _check_bounds(bounds)
  return RandomState(jnp.asarray(low, dtype), jnp.asarray(high, dtype), jnp.asarray(0, jnp.int32))


def random_sample(state: RandomState, key, num_tasks: int | None = None) -> tuple[jax.Array, RandomState]:
  """Tasks ~ Uniform([low, high]); returns ([D] or [num_tasks, D], state)."""
  if num_tasks is not None and (not isinstance(num_tasks, (int, np.integer)) or num_tasks <= 0):
    raise ValueError(f"num_tasks must be a positive int or None, got {num_tasks!r}")
  key = _as_key(_key_data(key))
  shape = (state.low.shape[-1],) if num_tasks is None else (int(num_tasks), state.low.shape[-1])
  return jax.random.uniform(key, shape, state.low.dtype, state.low, state.high), state


def random_update(state: RandomState, task_params, reward) -> RandomState:
  """Counts the episodes (validating them like ALP-GMM's ``update``)."""
  task_params, _ = _check_observation(state, task_params, reward)
  n = 1 if task_params.ndim == 1 else task_params.shape[0]
  return state._replace(count=state.count + n)


ALP_GMM = Teacher(init=init, sample=sample, update=update, observe=observe, refit_due=refit_due,
                  maybe_refit=maybe_refit)
RANDOM = Teacher(init=random_init, sample=random_sample, update=random_update, observe=random_update,
                 refit_due=lambda state: jnp.asarray(False), maybe_refit=lambda state, due: state)
TEACHERS = {"alp_gmm": ALP_GMM, "random": RANDOM}


def get_teacher(name: str | Teacher) -> Teacher:
  """Looks up a teacher by name ('alp_gmm' or 'random'); a ``Teacher`` is returned as is."""
  if isinstance(name, Teacher):
    return name
  if name not in TEACHERS:
    raise ValueError(f"unknown teacher {name!r}; expected one of {sorted(TEACHERS)}")
  return TEACHERS[name]


class BoundTeacher(NamedTuple):
  """A teacher for one task box, in prox's state-machine convention: ``init(key)``, ``sample(state, key,
  num_tasks=None) -> (tasks, state)``, ``update(state, tasks, rewards)``, and ``update`` split into
  ``observe`` and ``maybe_refit(state, due)`` with ``due = refit_due(state)`` (see :class:`Teacher`)."""
  init: Callable[[Any], Any]
  sample: Callable[..., Any]
  update: Callable[..., Any]
  observe: Callable[..., Any]
  refit_due: Callable[[Any], jax.Array]
  maybe_refit: Callable[[Any, jax.Array], Any]


def teacher(name: str, bounds, **options: Any) -> BoundTeacher:
  """The teacher ``name`` (``"alp_gmm"`` or ``"random"``) over the task box ``bounds = (low, high)``, with
  ``options`` for ALP-GMM (``fit_rate``, ``random_task_ratio``, ``ks``, ``history_size``, ... as
  :func:`init` takes them; checked now)::

      t = teacher("alp_gmm", ([0., 0.], [1., 1.]), fit_rate=100)
      s = t.init(key); task, s = t.sample(s, key); s = t.update(s, task, reward)
  """
  base = get_teacher(name)
  base.init(bounds, key=jax.random.key(0), **options)     # argument checks, before anything compiles
  return BoundTeacher(init=lambda key: base.init(bounds, key=key, **options), sample=base.sample,
                      update=base.update, observe=base.observe, refit_due=base.refit_due,
                      maybe_refit=base.maybe_refit)
