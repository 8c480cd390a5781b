"""Tests for prox.tasks.toy_env: the ALP-GMM paper's toy curriculum environment and the teacher driver."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.tasks import toy_env

_step = jax.jit(toy_env.step)


def _centre(i, j):
  return jnp.array([(i + 0.5) / 10, (j + 0.5) / 10], jnp.float32)


def _play(state, cell, times):
  reward = None
  for _ in range(times):
    reward, state = _step(state, _centre(*cell))
  return reward, state


class _NumpyToyEnv:
  """The rule by hand (Portelas et al. 2019), for comparison."""

  def __init__(self):
    self.c = np.zeros((10, 10), int)

  def step(self, p):
    i, j = (min(int(np.floor(v * 10)), 9) for v in p)
    neighbours = {(max(i - a, 0), max(j - b, 0)) for a in (0, 1) for b in (0, 1)} - {(i, j)}
    if (i, j) == (0, 0) or any(self.c[n] >= 75 for n in neighbours):
      self.c[i, j] = min(self.c[i, j] + 1, 100)
    return self.c[i, j] / 100


def test_competence_rules_by_hand():
  state = toy_env.init()
  reward, state = _play(state, (1, 0), 5)          # locked: no neighbour has competence >= 75
  assert float(reward) == 0.0
  reward, state = _play(state, (0, 0), 1)          # the origin always learns
  assert float(reward) == pytest.approx(0.01)
  _, state = _play(state, (0, 0), 74)              # competence 75: unlocks, but not mastered (> 75)
  assert int(toy_env.num_mastered(state)) == 0
  reward, state = _play(state, (1, 1), 1)          # diagonal neighbour (0, 0) unlocks (1, 1)
  assert float(reward) == pytest.approx(0.01)
  reward, state = _play(state, (0, 2), 1)          # edge cell: only (0, 1) gates it, still 0
  assert float(reward) == 0.0
  reward, state = _play(state, (1, 0), 1)
  assert float(reward) == pytest.approx(0.01)
  _, state = _play(state, (0, 0), 40)              # capped at 100
  assert int(state.competence[0, 0]) == 100 and int(toy_env.num_mastered(state)) == 1
  # p = 1.0 falls in the last cell; tasks with extra coordinates use the first two
  r, s = toy_env.step(toy_env.init(), jnp.array([1.0, 0.0, 0.7]))
  assert float(r) == 0.0 and int(jnp.sum(s.competence)) == 0


def test_matches_a_hand_written_reference_on_a_long_sequence():
  rng = np.random.default_rng(0)
  # tasks biased towards the origin so that many cells unlock
  tasks = (rng.random((6000, 2)) ** 2).astype(np.float32)
  ref = _NumpyToyEnv()
  expected = np.array([ref.step(t) for t in tasks])
  state = toy_env.init()
  step = jax.jit(lambda s, ts: jax.lax.scan(lambda s, t: tuple(reversed(toy_env.step(s, t))), s, ts))
  state, rewards = step(state, tasks)
  np.testing.assert_array_equal(np.asarray(state.competence), ref.c)
  np.testing.assert_allclose(np.asarray(rewards), expected, rtol=1e-6)
  assert int(toy_env.num_mastered(state)) == int(np.sum(ref.c > 75)) > 3


def test_driver_scores_and_shapes_random_teacher():
  out = toy_env.run("random", jax.random.split(jax.random.key(0), 2), num_episodes=2000, score_every=500)
  assert out.scores.shape == (2, 5) and out.tasks.shape == (2, 2000, 2) and out.rewards.shape == (2, 2000)
  scores = np.asarray(out.scores)
  assert np.all(scores[:, 0] == 0) and np.all(np.diff(scores, axis=1) >= 0)
  np.testing.assert_array_equal(scores[:, -1], np.asarray(jax.vmap(toy_env.num_mastered)(out.env_state)))
  assert np.all((np.asarray(out.tasks) >= 0) & (np.asarray(out.tasks) <= 1))
  assert not np.array_equal(np.asarray(out.tasks[0]), np.asarray(out.tasks[1]))   # independent seeds


def test_driver_env_matches_its_tasks():
  out = toy_env.run("random", jax.random.split(jax.random.key(1), 2), num_episodes=2000, score_every=500)
  env, rewards = jax.lax.scan(lambda s, t: tuple(reversed(toy_env.step(s, t))), toy_env.init(), out.tasks[1])
  np.testing.assert_array_equal(np.asarray(rewards), np.asarray(out.rewards[1]))
  np.testing.assert_array_equal(np.asarray(env.competence), np.asarray(out.env_state.competence[1]))


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: toy_env.run("nope", jax.random.split(jax.random.key(0), 1)), "unknown teacher"),
      (lambda: toy_env.run("random", jax.random.split(jax.random.key(0), 1), num_episodes=1500), "multiple"),
      (lambda: toy_env.run("alp_gmm", jax.random.split(jax.random.key(0), 1), fit_rate=0), "fit_rate"),
      (lambda: toy_env.step(toy_env.init(), jnp.zeros(1)), "task"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_alp_gmm_masters_more_cells_than_random():
  keys = jax.random.split(jax.random.key(0), 5)
  alp = np.asarray(toy_env.run("alp_gmm", keys).scores)
  rnd = np.asarray(toy_env.run("random", keys).scores)
  assert alp.shape == (5, 21)
  assert alp[:, -1].min() > rnd[:, -1].max()
  assert alp[:, -1].mean() > 3 * rnd[:, -1].mean()
