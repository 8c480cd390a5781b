"""Tests for prox.tasks._curricula: the backward interval and the staged difficulty sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.tasks import irt
from prox.tasks._curricula import backward_interval, difficulty_levels, staged_sampler


def test_backward_interval_grows_from_the_end_by_equal_stages():
  sched = backward_interval(10, total_steps=100, initial=2, final=8)
  states = jax.jit(jax.vmap(lambda s: sched.update(sched.init(), step=s)))(jnp.arange(0, 130))
  got = np.asarray(sched.t_start(states))
  ref = [10 - min(8, 2 + (s * 7) // 100) + 1 for s in range(130)]
  np.testing.assert_array_equal(got, ref)
  assert got[0] == 9 and got[-1] == 3
  assert int(sched.t_start(sched.init())) == 9
  mask = np.asarray(sched.mask(sched.update(sched.init(), step=50)))
  np.testing.assert_array_equal(mask, np.arange(1, 11) >= ref[50])


def test_backward_interval_update_counts_and_flags_changes():
  sched = backward_interval(4, total_steps=4)
  state, seen = sched.init(), []
  for _ in range(5):
    state = sched.update(state)
    seen.append((int(state.t_start), bool(state.changed)))
  # L(s) = min(4, 1 + s): stage s of the 4 stages trains the last s + 1 steps
  assert seen == [(3, True), (2, True), (1, True), (1, False), (1, False)]


@pytest.mark.parametrize("kwargs", [dict(num_steps=4, total_steps=0), dict(num_steps=4, total_steps=5, initial=5),
                                    dict(num_steps=4, total_steps=5, initial=3, final=2)])
def test_backward_interval_rejects_bad_options(kwargs):
  with pytest.raises(ValueError):
    backward_interval(**kwargs)


LEVELS = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])
GROUPS = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 1, 0])


def _order(schedule, seed=0, epoch=0):
  sampler = staged_sampler(LEVELS, GROUPS, schedule=schedule)
  state = sampler.init(seed)
  return np.asarray(sampler.epoch_order(state.key, epoch))


def test_blocked_order_is_group_by_group_easy_to_hard():
  order = _order("blocked")
  assert sorted(order.tolist()) == list(range(12))
  g, l = GROUPS[order], LEVELS[order]
  assert np.all(np.diff(g) >= 0)                                    # one group after another
  for grp in range(3):
    assert np.all(np.diff(l[g == grp]) >= 0)                        # inside a group, easy to hard


def test_interleaved_order_rises_in_level_and_rotates_groups():
  order = _order("interleaved")
  assert sorted(order.tolist()) == list(range(12))
  l, g = LEVELS[order], GROUPS[order]
  assert np.all(np.diff(l) >= 0)
  for level in range(3):
    seq = g[l == level].tolist()
    counts = {grp: seq.count(grp) for grp in set(seq)}
    # round r holds one example of every group with more than r examples, in group order
    expected = [grp for r in range(max(counts.values())) for grp in sorted(counts) if counts[grp] > r]
    assert seq == expected


def test_mixed_order_is_a_fresh_permutation_each_epoch_and_seeded():
  a, b = _order("mixed", epoch=0), _order("mixed", epoch=1)
  assert sorted(a.tolist()) == list(range(12)) and not np.array_equal(a, b)
  np.testing.assert_array_equal(a, _order("mixed", epoch=0))
  assert not np.array_equal(a, _order("mixed", seed=1))


def test_without_groups_blocked_and_interleaved_are_easy_to_hard():
  for schedule in ("blocked", "interleaved"):
    s = staged_sampler(LEVELS, schedule=schedule)
    order = np.asarray(s.epoch_order(s.init(3).key, 0))
    assert np.all(np.diff(LEVELS[order]) >= 0)


def test_next_visits_each_example_once_per_epoch_across_batch_boundaries():
  sampler = staged_sampler(LEVELS, GROUPS, schedule="interleaved")
  state = sampler.init(7)
  step = jax.jit(sampler.next, static_argnums=1)
  drawn = []
  for _ in range(9):                           # 9 x 4 = 36 = 3 epochs
    idx, state = step(state, 4)
    drawn += np.asarray(idx).tolist()
  for e in range(3):
    np.testing.assert_array_equal(drawn[12 * e:12 * (e + 1)], sampler.epoch_order(state.key, e))
  assert int(state.epoch) == 3 and int(state.position) == 0
  state = sampler.init(7)
  drawn = []
  for _ in range(5):                           # batches of 5 cross the epoch inside a batch
    idx, state = step(state, 5)
    drawn += np.asarray(idx).tolist()
  np.testing.assert_array_equal(drawn[:12], sampler.epoch_order(state.key, 0))
  np.testing.assert_array_equal(drawn[12:24], sampler.epoch_order(state.key, 1))
  assert int(state.epoch) == 2 and int(state.position) == 1


def test_staged_sampler_rejects_bad_tags():
  with pytest.raises(ValueError, match="levels"):
    staged_sampler(np.array([0.5, 1.0]))
  with pytest.raises(ValueError, match="groups"):
    staged_sampler(LEVELS, GROUPS[:3])
  with pytest.raises(ValueError, match="schedule"):
    staged_sampler(LEVELS, schedule="spiral")
  with pytest.raises(ValueError, match="batch_size"):
    s = staged_sampler(LEVELS)
    s.next(s.init(0), 13)


def test_difficulty_levels_from_irt_difficulties():
  rng = np.random.default_rng(0)
  b_true = np.linspace(-2, 2, 30)
  theta = rng.normal(size=40)
  responses = rng.random((40, 30)) < 1 / (1 + np.exp(-(theta[:, None] - b_true[None, :])))
  fit = irt.fit_1pl(responses.astype(np.int32))
  levels = np.asarray(difficulty_levels(fit.difficulties, 3))
  assert np.bincount(levels).tolist() == [10, 10, 10]            # equal-count bins, ties split by index
  b = np.asarray(fit.difficulties)
  assert b[levels == 0].max() <= b[levels == 1].min() and b[levels == 1].max() <= b[levels == 2].min()
  assert np.corrcoef(b, b_true)[0, 1] > 0.9
  order = np.asarray(staged_sampler(levels, schedule="blocked").epoch_order(jax.random.key_data(jax.random.key(0)), 0))
  assert np.all(np.diff(levels[order]) >= 0)
  np.testing.assert_array_equal(np.asarray(difficulty_levels(jnp.arange(10.0), 3)), [0] * 4 + [1] * 3 + [2] * 3)
  np.testing.assert_array_equal(np.asarray(difficulty_levels(jnp.array([3.0, 1.0, 2.0, 1.0]), 2)), [1, 0, 1, 0])
