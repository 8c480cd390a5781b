"""A curriculum teacher playing episodes of a fixed number of training steps, inside the step.

``episodic_teacher(teacher, bounds, episode_steps=K)`` turns a task-space teacher (``prox.tasks.alp_gmm``:
ALP-GMM or random) into a state machine a training step can run:

* ``init(key) -> EpisodeState``: the teacher's state and a first task drawn from it;
* ``update(state, reward, key) -> state`` (every step, in the jitted step): adds the step's reward (e.g.
  the accuracy on the batch before the update: fresh samples of the task, so an unbiased estimate of the
  task's accuracy); after ``K`` steps the episode ends: the teacher observes ``(task, mean reward)``
  (ALP-GMM: absolute learning progress against the nearest earlier task) and the next task is drawn;
* ``refit(state, key) -> state`` (the heavy, rare part: ALP-GMM's EM over k = 2..10 Gaussians): refits
  when due and draws the episode's task from the new mixture, as the reference does (Portelas et al.
  2019: update, then sample). Run it as its own jitted function after each episode (an action of
  ``prox.loop`` every ``K`` steps), so the EM is not compiled into every batch-size bucket of the step.

``task`` is what a batch source reads to generate the next batch (a host read per step).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prox.tasks import alp_gmm


class EpisodeState(NamedTuple):
  """``teacher``: the teacher's state; ``task``: [D] the task being played; ``reward_sum`` and ``steps``
  of the current episode; ``episodes``: episodes finished."""
  teacher: Any
  task: jax.Array
  reward_sum: jax.Array
  steps: jax.Array
  episodes: jax.Array


class EpisodicTeacher(NamedTuple):
  init: Callable[[jax.Array], EpisodeState]
  update: Callable[[EpisodeState, jax.Array, jax.Array], EpisodeState]
  refit: Callable[[EpisodeState, jax.Array], EpisodeState]


def episodic_teacher(teacher: str, bounds, *, episode_steps: int,
                     **teacher_options: Any) -> EpisodicTeacher:
  """See the module docstring. ``teacher_options`` go to the teacher's ``init`` (e.g. ``fit_rate``)."""
  if isinstance(episode_steps, bool) or not isinstance(episode_steps, int) or episode_steps < 1:
    raise ValueError(f"episode_steps must be a positive int, got {episode_steps!r}")
  t = alp_gmm.teacher(teacher, bounds, **teacher_options)     # checks bounds and options now

  def init(key: jax.Array) -> EpisodeState:
    k_init, k_task = jax.random.split(key)
    state = t.init(k_init)
    task, state = t.sample(state, k_task)
    return EpisodeState(state, task, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                        jnp.zeros((), jnp.int32))

  def end_episode(s: EpisodeState, key: jax.Array) -> EpisodeState:
    reward = jnp.clip(s.reward_sum / episode_steps, 0.0, 1.0)
    teacher_state = t.observe(s.teacher, s.task, reward)
    task, teacher_state = t.sample(teacher_state, key)
    return EpisodeState(teacher_state, task, jnp.zeros_like(s.reward_sum), jnp.zeros_like(s.steps),
                        s.episodes + 1)

  def update(s: EpisodeState, reward: jax.Array, key: jax.Array) -> EpisodeState:
    s = s._replace(reward_sum=s.reward_sum + jnp.asarray(reward, jnp.float32), steps=s.steps + 1)
    return lax.cond(s.steps >= episode_steps, end_episode, lambda s, k: s, s, key)

  def refit(s: EpisodeState, key: jax.Array) -> EpisodeState:
    due = t.refit_due(s.teacher)

    def go(s):
      teacher_state = t.maybe_refit(s.teacher, True)
      task, teacher_state = t.sample(teacher_state, key)
      return s._replace(teacher=teacher_state, task=task)

    return lax.cond(due & (s.steps == 0), go, lambda s: s, s)

  return EpisodicTeacher(init, update, refit)
