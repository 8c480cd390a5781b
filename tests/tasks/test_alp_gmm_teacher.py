"""Tests for prox.tasks.alp_gmm: the ALP-GMM teacher as pure state transitions, and the random teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from prox.tasks import alp_gmm, gmm, toy_env

BOUNDS = ([0.0, 0.0], [1.0, 1.0])
HP = dict(fit_rate=20, ks=(2, 3, 4), history_size=64)   # small, shared by the compiled programs below
EPISODES = 40


def _state(seed=0, **kw):
  return alp_gmm.init(BOUNDS, key=jax.random.key(seed), **{**HP, **kw})


def _ref_alps(tasks, rewards, history=None, warmup=5):
  """The reference rule by hand: alp = |r - r_nn| over the last `history` previous tasks, 0 while
  at most `warmup` previous tasks exist."""
  alps = []
  for i in range(len(tasks)):
    prev = list(range(max(0, i - history) if history else 0, i))
    if len(prev) > warmup:
      d2 = [float(np.sum((tasks[j] - tasks[i]) ** 2)) for j in prev]
      alps.append(abs(rewards[i] - rewards[prev[int(np.argmin(d2))]]))
    else:
      alps.append(0.0)
  return np.array(alps)


def _reward(task):
  # a fixed landscape with structure: high on the right half, graded along x
  return jnp.clip(task[..., 0], 0.0, 1.0) * (task[..., 1] > 0.5)


def _episodes(seed):
  tasks = jax.random.uniform(jax.random.key(seed), (EPISODES, 2)) ** 2
  return tasks, _reward(tasks)


# The compiled programs are shared by the tests (XLA compiles of the GMM refit dominate the runtime).
_observe = jax.jit(alp_gmm.observe)
_update = jax.jit(alp_gmm.update)       # used with one batch shape [EPISODES, 2] only
_sample = jax.jit(alp_gmm.sample, static_argnums=2)
NUM_SAMPLES = 4000


def _with_gmm(state, weights, means, covs, *, ratio=0.0, fitted=True):
  weights, means, covs = (np.asarray(a, np.float32) for a in (weights, means, covs))
  kmax, k, d = state.gmm.means.shape[0], means.shape[0], means.shape[1]
  pad = kmax - k
  p = gmm.GMMParams(
      jnp.asarray(np.concatenate([weights, np.zeros(pad, np.float32)])),
      jnp.asarray(np.concatenate([means, np.zeros((pad, d), np.float32)])),
      jnp.asarray(np.concatenate([covs, np.broadcast_to(np.eye(d, dtype=np.float32), (pad, d, d))])),
      jnp.asarray(np.linalg.cholesky(np.concatenate([covs, np.broadcast_to(np.eye(d), (pad, d, d))]))
                  .astype(np.float32)),
      jnp.arange(kmax) < k)
  return state._replace(gmm=p, fitted=jnp.asarray(fitted),
                        hyper=state.hyper._replace(random_task_ratio=jnp.asarray(ratio, jnp.float32)))


def test_nearest_neighbour_alp_and_warmup():
  rng = np.random.default_rng(0)
  tasks = rng.random((30, 2)).astype(np.float32)
  rewards = rng.random(30).astype(np.float32)
  state = _observe(_state(fit_rate=50), tasks, rewards)        # one batched call
  alps = np.asarray(state.recent[:30, -1])
  expected = _ref_alps(tasks, rewards)
  assert np.all(alps[:6] == 0.0)                                # history <= 5: alp = 0
  assert np.all(expected[6:] > 0)
  np.testing.assert_allclose(alps, expected, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.recent[:30, :2]), tasks)
  # the batch is processed exactly like consecutive single updates
  seq = _state(fit_rate=50)
  for t, r in zip(tasks, rewards):
    seq = _observe(seq, t, r)
  jax.tree.map(np.testing.assert_array_equal, seq, state)
  assert float(alp_gmm.nearest_neighbour_alp(state, tasks[3] + 1e-3, 0.25)) == pytest.approx(
      abs(0.25 - rewards[3]), rel=1e-6)


def test_nearest_neighbour_over_a_ring_buffer_history():
  rng = np.random.default_rng(1)
  tasks = rng.random((40, 2)).astype(np.float32)
  rewards = rng.random(40).astype(np.float32)
  state = _observe(_state(history_size=8, fit_rate=50), tasks, rewards)
  np.testing.assert_allclose(np.asarray(state.recent[:40, -1]), _ref_alps(tasks, rewards, history=8),
                             rtol=1e-6)


def test_sampling_is_proportional_to_mean_alp():
  covs = [np.diag([1e-4, 1e-4, 1e-6])] * 3
  means = [[0.2, 0.2, 0.1], [0.8, 0.8, 0.3], [0.2, 0.8, 0.0]]
  state = _with_gmm(_state(), [0.6, 0.2, 0.2], means, covs)
  np.testing.assert_allclose(np.asarray(alp_gmm.component_probabilities(state))[:3], [0.25, 0.75, 0.0],
                             rtol=1e-6)
  tasks, _ = _sample(state, jax.random.key(0), NUM_SAMPLES)
  near = lambda c: np.mean(np.linalg.norm(np.asarray(tasks) - c, axis=1) < 0.05)
  assert abs(near([0.8, 0.8]) - 0.75) < 0.025                   # weights are ignored, only mean alp
  assert abs(near([0.2, 0.2]) - 0.25) < 0.025
  assert near([0.2, 0.8]) == 0.0
  # all mean alps 0: uniform over the active Gaussians
  flat = _with_gmm(_state(), [0.9, 0.1], [[0.2, 0.2, 0.0], [0.8, 0.8, 0.0]], covs[:2])
  tasks, _ = _sample(flat, jax.random.key(1), NUM_SAMPLES)
  assert abs(np.mean(np.asarray(tasks)[:, 0] > 0.5) - 0.5) < 0.03


def test_uniform_before_first_fit_and_random_task_ratio():
  covs = [np.diag([1e-4, 1e-4, 1e-6])]
  unfitted = _with_gmm(_state(), [1.0], [[0.8, 0.8, 0.3]], covs, ratio=0.0, fitted=False)
  tasks = np.asarray(_sample(unfitted, jax.random.key(0), NUM_SAMPLES)[0])
  for d in range(2):
    assert scipy.stats.kstest(tasks[:, d], "uniform").pvalue > 1e-3
  fitted = _with_gmm(_state(), [1.0], [[0.8, 0.8, 0.3]], covs, ratio=0.2)
  tasks = np.asarray(_sample(fitted, jax.random.key(1), NUM_SAMPLES)[0])
  far = np.mean(np.linalg.norm(tasks - 0.8, axis=1) > 0.05)
  assert abs(far - 0.2 * (1 - np.pi * 0.05 ** 2)) < 0.02


def test_bounds_are_respected():
  bounds = ([-1.0, 2.0], [0.0, 5.0])
  state = alp_gmm.init(bounds, key=jax.random.key(0), **HP)
  wide = np.diag([4.0, 9.0, 1e-6])
  state = _with_gmm(state, [0.5, 0.5], [[-1.5, 6.0, 0.1], [0.0, 3.0, 0.1]], [wide, wide], ratio=0.2)
  tasks = np.asarray(_sample(state, jax.random.key(0), NUM_SAMPLES)[0])
  assert np.all(tasks >= np.array(bounds[0])) and np.all(tasks <= np.array(bounds[1]))
  assert np.any(tasks[:, 0] == -1.0) and np.any(tasks[:, 1] == 5.0)   # clipping happened
  single, same = alp_gmm.sample(state, jax.random.key(1))
  assert single.shape == (2,) and same is state


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_refit_schedule():
  tasks, rewards = _episodes(0)
  state = _state()
  for i in range(EPISODES):
    assert bool(alp_gmm.refit_due(state)) == (i > 0 and i % HP["fit_rate"] == 0)
    state = _observe(state, tasks[i], rewards[i])
  state = _update(_state(), tasks, rewards)
  assert int(state.count) == EPISODES and int(state.num_fits) == EPISODES // HP["fit_rate"]
  assert bool(state.fitted) and 2 <= int(jnp.sum(state.gmm.active)) <= 4
  np.testing.assert_allclose(float(jnp.sum(state.gmm.weights)), 1.0, rtol=1e-5)
  assert bool(jnp.all(state.gmm.cholesky[state.gmm.active].diagonal(axis1=1, axis2=2) > 0))
  init_dtypes = [a.dtype for a in jax.tree.leaves(_state())]
  assert [a.dtype for a in jax.tree.leaves(state)] == init_dtypes     # dtype-stable


def test_float64_teacher_stays_float64():
  with jax.enable_x64(True):
    state = alp_gmm.init(BOUNDS, key=jax.random.key(0), dtype=jnp.float64, **HP)
    state = alp_gmm.observe(state, jnp.full((7, 2), 0.3), jnp.linspace(0.0, 1.0, 7))
    floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float64 for a in floats)
    assert float(state.recent[6, -1]) == 1.0      # all tasks tie at distance 0: the first slot (r=0) wins
    tasks, _ = alp_gmm.sample(state, jax.random.key(1), 3)
    assert tasks.dtype == jnp.float64


def test_toy_env_driver_vmaps_seeds_like_batched_update():
  # toy_env.run vmaps sample / observe / refit (when due) over the seeds inside one jitted scan;
  # replaying a seed's tasks through the batched update() (a scan of single updates, no vmap) must
  # give the same teacher state: vmap works and update == observe + refit-when-due
  keys = jax.random.split(jax.random.key(7), 3)
  out = toy_env.run("alp_gmm", keys, num_episodes=EPISODES, score_every=EPISODES // 2, **HP)
  assert np.all(np.asarray(out.teacher_state.num_fits) == EPISODES // HP["fit_rate"])
  for i in range(3):
    init_key, _ = jax.random.split(keys[i])
    replay = _update(alp_gmm.init(BOUNDS, key=init_key, **HP), out.tasks[i], out.rewards[i])
    _assert_close(replay, jax.tree.map(lambda x: x[i], out.teacher_state))
  assert not np.allclose(np.asarray(out.tasks[0]), np.asarray(out.tasks[1]))


def test_checkpoint_round_trip_resumes_exactly(orbax_round_trip):
  tasks, rewards = _episodes(3)
  state = _update(_state(3), tasks, rewards)
  restored = orbax_round_trip(state)
  assert type(restored) is type(state) and type(restored.gmm) is type(state.gmm)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  # restored arrays are committed to a device, which would make jit compile a second program for the
  # same shapes; hand them over as plain (uncommitted) arrays to reuse the compiled one
  restored = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), restored)
  more_tasks, more_rewards = _episodes(4)
  a = _update(state, more_tasks, more_rewards)
  b = _update(restored, more_tasks, more_rewards)
  assert int(a.num_fits) == 4
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ta, _ = _sample(a, jax.random.key(5), NUM_SAMPLES)
  tb, _ = _sample(b, jax.random.key(5), NUM_SAMPLES)
  np.testing.assert_array_equal(np.asarray(ta), np.asarray(tb))


def test_no_recompilation_on_new_values():
  tasks, rewards = _episodes(8)
  _update(_state(), tasks, rewards)
  n = _update._cache_size()
  _update(_state(5), 1.0 - tasks, 1.0 - rewards)
  _update(_state(6), tasks * 0.5, rewards * 0.5)
  assert _update._cache_size() == n


def test_random_teacher_has_the_same_interface():
  teacher = alp_gmm.get_teacher("random")
  state = teacher.init(([-2.0, 0.0], [2.0, 0.5]), key=jax.random.key(0))
  tasks, state = teacher.sample(state, jax.random.key(1), 5000)
  tasks = np.asarray(tasks)
  assert tasks.shape == (5000, 2)
  assert np.all(tasks >= [-2.0, 0.0]) and np.all(tasks <= [2.0, 0.5])
  assert scipy.stats.kstest((tasks[:, 0] + 2.0) / 4.0, "uniform").pvalue > 1e-3
  state = teacher.update(state, tasks[:3], jnp.array([0.0, 0.5, 1.0]))
  state = teacher.update(state, tasks[0], 0.3)
  assert int(state.count) == 4
  assert alp_gmm.get_teacher("alp_gmm") is alp_gmm.ALP_GMM


@pytest.mark.parametrize("call, match", [
    (lambda: alp_gmm.init(([0.0, 1.0], [1.0, 1.0]), key=jax.random.key(0)), "low < high"),
    (lambda: alp_gmm.init(([0.0], [1.0, 2.0]), key=jax.random.key(0)), "equal length"),
    (lambda: alp_gmm.random_init(([2.0], [1.0])), "low < high"),
    (lambda: alp_gmm.init(BOUNDS, key=jax.random.key(0), fit_rate=0), "fit_rate"),
    (lambda: alp_gmm.init(BOUNDS, key=jax.random.key(0), fit_rate=-3), "fit_rate"),
    (lambda: alp_gmm.init(BOUNDS, key=jax.random.key(0), fit_rate=2.5), "fit_rate"),
    (lambda: alp_gmm.init(BOUNDS, key=jax.random.key(0), random_task_ratio=1.5), "random_task_ratio"),
    (lambda: alp_gmm.init(BOUNDS, key=jax.random.key(0), ks=(1, 300)), "ks"),
    (lambda: alp_gmm.update(_state(), jnp.array([0.1, 0.2]), 1.5), r"\[0, 1\]"),
    (lambda: alp_gmm.update(_state(), jnp.zeros((3, 2)), jnp.array([0.1, -0.2, 0.3])), r"\[0, 1\]"),
    (lambda: alp_gmm.observe(_state(), jnp.array([0.1, 0.2]), -0.01), r"\[0, 1\]"),
    (lambda: alp_gmm.random_update(alp_gmm.random_init(BOUNDS), jnp.array([0.1, 0.2]), 2.0), r"\[0, 1\]"),
    (lambda: alp_gmm.update(_state(), jnp.zeros(3), 0.5), "task_params"),
    (lambda: alp_gmm.update(_state(), jnp.zeros((4, 2)), jnp.zeros(3)), "reward"),
])
def test_bad_input_is_one_line_error(call, match):
  with pytest.raises(ValueError, match=match) as e:
    call()
  assert "\n" not in str(e.value)


def test_bound_teacher_is_the_module_functions_with_bounds_and_options():
  bounds = ([0.0, 0.0], [1.0, 1.0])
  t = alp_gmm.teacher("alp_gmm", bounds, fit_rate=12, random_task_ratio=0.3)
  key = jax.random.key(3)
  a, b = t.init(key), alp_gmm.init(bounds, key=key, fit_rate=12, random_task_ratio=0.3)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  task, _ = t.sample(a, jax.random.key(4))
  np.testing.assert_array_equal(task, alp_gmm.sample(b, jax.random.key(4))[0])
  with pytest.raises(ValueError):
    alp_gmm.teacher("alp_gmm", ([1.0], [0.0]))
  with pytest.raises(ValueError, match="unknown teacher"):
    alp_gmm.teacher("curious", bounds)
