"""The toy curriculum environment of the ALP-GMM paper (Portelas et al. 2019, section 5.1; ref
flowersteam/teachDeepRL ``toy_env.py``) in JAX, and a jitted driver that runs a teacher against it.

Task space [0, 1]^d cut into ``num_cells`` bins per dimension (edges 0, 0.1, ..., 1.0 for 10 cells; the
value 1.0 falls in the last bin). Each cell has a competence c in 0..100. An episode on task p (only the
first d coordinates are used) in cell i:

    unlocked(i) = (i == 0) or any_{j in N(i)} c_j >= 75,
    N(i) = {max(i - o, 0) : o in {0, 1}^d, o != 0} minus {i}   (lower / left neighbours, diagonals too)
    c_i <- min(c_i + 1, 100) if unlocked(i);     reward = c_i / 100 (after the update).

A cell is mastered when c > 75; the score is the number of mastered cells (= % for 10 x 10).

``run`` plays a teacher against independent copies of the environment, one per key, for ``num_episodes``
episodes in one ``lax.scan`` (jitted; the seeds are vmapped inside each step and the teachers' periodic
refit is decided on one seed and passed unbatched, so it stays a real ``lax.cond``), and reports the mastered cells
before the first episode and after every ``score_every`` episodes.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prox.tasks import alp_gmm

MAX_COMPETENCE = 100
UNLOCK_THRESHOLD = 75   # a neighbour with competence >= 75 unlocks a cell
MASTERED_THRESHOLD = 75  # a cell with competence > 75 is mastered


class ToyEnvState(NamedTuple):
  """competence: int32 [num_cells] * num_dims, each in 0..100."""
  competence: jax.Array


class ToyEnvRun(NamedTuple):
  """Output of ``run`` (leading axis: seeds).

  Attributes:
    scores: int32 [S, num_episodes // score_every + 1], mastered cells before the first episode and
      after every ``score_every`` episodes.
    tasks: [S, num_episodes, D] tasks the teacher sampled.
    rewards: [S, num_episodes].
    env_state: final ToyEnvState per seed.
    teacher_state: final teacher state per seed.
  """
  scores: jax.Array
  tasks: jax.Array
  rewards: jax.Array
  env_state: ToyEnvState
  teacher_state: Any


def init(num_cells: int = 10, num_dims: int = 2) -> ToyEnvState:
  """All competences 0."""
  if int(num_cells) < 1 or int(num_dims) < 1:
    raise ValueError(f"num_cells and num_dims must be >= 1, got {num_cells}, {num_dims}")
  return ToyEnvState(jnp.zeros((int(num_cells),) * int(num_dims), jnp.int32))


def cell_index(task: jax.Array, num_cells: int) -> jax.Array:
  """int32 [d] bin of each coordinate: floor(p * num_cells), clipped to 0..num_cells - 1."""
  return jnp.clip(jnp.floor(task * num_cells).astype(jnp.int32), 0, num_cells - 1)


def _neighbour_offsets(num_dims: int) -> np.ndarray:
  return np.array([o for o in itertools.product((0, 1), repeat=num_dims) if any(o)], np.int32)


def step(state: ToyEnvState, task: jax.Array) -> tuple[jax.Array, ToyEnvState]:
  """One episode on task [D >= d] (see module docstring). Returns (reward = competence / 100, state)."""
  comp = state.competence
  num_dims, num_cells = comp.ndim, comp.shape[0]
  task = jnp.asarray(task)
  if task.ndim != 1 or task.shape[0] < num_dims:
    raise ValueError(f"task must be a vector with at least {num_dims} entries, got shape {task.shape}")
  idx = cell_index(task[:num_dims], num_cells)
  neigh = jnp.maximum(idx[None, :] - jnp.asarray(_neighbour_offsets(num_dims)), 0)   # [M, d]
  is_self = jnp.all(neigh == idx[None, :], axis=-1)
  neigh_comp = comp[tuple(neigh[:, i] for i in range(num_dims))]
  unlocked = jnp.all(idx == 0) | jnp.any(~is_self & (neigh_comp >= UNLOCK_THRESHOLD))
  cell = tuple(idx[i] for i in range(num_dims))
  new = jnp.where(unlocked, jnp.minimum(comp[cell] + 1, MAX_COMPETENCE), comp[cell])
  reward = new.astype(task.dtype if jnp.issubdtype(task.dtype, jnp.floating) else jnp.float32)
  return reward / MAX_COMPETENCE, ToyEnvState(comp.at[cell].set(new))


def num_mastered(state: ToyEnvState) -> jax.Array:
  """Number of cells with competence > 75."""
  return jnp.sum(state.competence > MASTERED_THRESHOLD).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("teacher", "num_episodes", "score_every", "num_cells",
                                             "num_dims", "teacher_kwargs"))
def _run(keys, *, teacher: alp_gmm.Teacher, num_episodes: int, score_every: int, num_cells: int,
         num_dims: int, teacher_kwargs: tuple) -> ToyEnvRun:
  bounds = ([0.0] * num_dims, [1.0] * num_dims)
  kwargs = dict(teacher_kwargs)
  init_keys, run_keys = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
  t_state = jax.vmap(lambda k: teacher.init(bounds, key=k, **kwargs))(init_keys)
  e_state = jax.vmap(lambda _: init(num_cells, num_dims))(jnp.arange(keys.shape[0]))

  def body(carry, episode):
    t_state, e_state = carry
    ep_keys = jax.vmap(lambda k: jax.random.fold_in(k, episode))(run_keys)
    tasks, t_state = jax.vmap(teacher.sample)(t_state, ep_keys)
    rewards, e_state = jax.vmap(step)(e_state, tasks)
    t_state = jax.vmap(teacher.observe)(t_state, tasks, rewards)
    # Seeds run in lockstep, so the periodic refit is due for all or none: decide it on seed 0 and pass
    # it unbatched, so the refit stays a real branch instead of a select paid every episode.
    due = teacher.refit_due(jax.tree.map(lambda a: a[0], t_state))
    t_state = jax.vmap(teacher.maybe_refit, in_axes=(0, None))(t_state, due)
    return (t_state, e_state), (tasks, rewards, jax.vmap(num_mastered)(e_state))

  (t_state, e_state), (tasks, rewards, mastered) = lax.scan(
      body, (t_state, e_state), jnp.arange(num_episodes, dtype=jnp.int32))
  mastered = mastered.T                                                  # [S, E]
  scores = jnp.concatenate(
      [jnp.zeros((keys.shape[0], 1), jnp.int32), mastered[:, score_every - 1::score_every]], axis=1)
  return ToyEnvRun(scores, jnp.swapaxes(tasks, 0, 1), rewards.T, e_state, t_state)


def run(teacher: str | alp_gmm.Teacher, keys: jax.Array, *, num_episodes: int = 20_000,
        score_every: int = 1_000, num_cells: int = 10, num_dims: int = 2,
        **teacher_kwargs) -> ToyEnvRun:
  """Plays ``teacher`` ('alp_gmm', 'random' or a ``Teacher``) against the toy env, one independent
  teacher + environment per key (keys: [S] typed keys or [S, 2] uint32 key data), for num_episodes
  episodes in one jitted scan. ``teacher_kwargs`` go to ``teacher.init`` (e.g. fit_rate=250); for
  ALP-GMM ``history_size`` defaults to num_episodes so the nearest neighbour sees every past task, as in
  the reference. Returns a ``ToyEnvRun`` (scores every score_every episodes, tasks, rewards, states).
  """
  teacher = alp_gmm.get_teacher(teacher)
  if int(num_episodes) < 1 or int(score_every) < 1 or num_episodes % score_every:
    raise ValueError(f"num_episodes ({num_episodes}) must be a positive multiple of score_every "
                     f"({score_every})")
  keys = jnp.asarray(keys) if not hasattr(keys, "dtype") else keys
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)
  if keys.ndim != 1:
    raise ValueError(f"keys must be a 1-D batch of keys (one per seed), got shape {keys.shape}")
  if teacher is alp_gmm.ALP_GMM:
    teacher_kwargs.setdefault("history_size", int(num_episodes))
    # validate the hyperparameters eagerly, before compiling (one clear error line)
    jax.eval_shape(lambda: teacher.init(([0.0] * num_dims, [1.0] * num_dims), key=jax.random.key(0),
                                        **teacher_kwargs))
  return _run(keys, teacher=teacher, num_episodes=int(num_episodes), score_every=int(score_every),
              num_cells=int(num_cells), num_dims=int(num_dims),
              teacher_kwargs=tuple(sorted(teacher_kwargs.items())))
