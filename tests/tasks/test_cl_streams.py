"""Tests for prox.tasks.streams: split, permuted and SCoLe task streams."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks import streams as S


class DS(NamedTuple):  # same fields as prox.tasks.data.ArrayDataset
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str


def _ds(n=200, c=10, hw=4, ch=1, seed=0, name="toy"):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, hw, hw, ch)).astype(np.float32)
  labels = (np.arange(n) % c).astype(np.int32)
  rng.shuffle(labels)
  return DS(images, labels, c, name)


def test_split_tasks_partition_classes_and_examples():
  train, test = _ds(), _ds(n=50, seed=1)
  tasks = S.split_tasks(train, test, 2)
  assert len(tasks) == 5
  assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  assert [t.index for t in tasks] == list(range(5))
  all_idx = np.concatenate([t.train.indices for t in tasks])
  assert sorted(all_idx.tolist()) == list(range(200))  # a partition: nothing lost or duplicated
  for t in tasks:
    assert set(np.unique(t.train.labels)) == set(t.classes)
    assert set(np.unique(t.test.labels)) == set(t.classes)
    assert t.logit_mask.dtype == bool and t.logit_mask.sum() == 2 and t.logit_mask[list(t.classes)].all()
    ds = t.train.materialize()
    assert type(ds) is DS and ds.images.shape == (len(t.train), 4, 4, 1)
    np.testing.assert_array_equal(ds.images, train.images[t.train.indices])
    assert ds.name == f"toy/split{t.index}"
  custom = S.split_tasks(train, test, 5, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
  assert [t.classes for t in custom] == [(5, 6, 7, 8, 9), (0, 1, 2, 3, 4)]


def test_tasks_share_the_base_dataset():
  train, test = _ds(), _ds(n=50, seed=1)
  for task in S.permuted_tasks(train, test, 3, seed=0) + S.scole_tasks(train, test, 20, 2, 0):
    assert task.train.base is train and task.test.base is test


def test_permuted_tasks():
  train, test = _ds(hw=5, ch=3), _ds(n=30, hw=5, ch=3, seed=1)
  tasks = S.permuted_tasks(train, test, 4, seed=3)
  perms = [t.train.permutation for t in tasks]
  assert all(sorted(p.tolist()) == list(range(25)) for p in perms)
  assert len({p.tobytes() for p in perms}) == 4
  for t in tasks:
    assert t.logit_mask.all() and t.classes == tuple(range(10))
    np.testing.assert_array_equal(t.test.permutation, t.train.permutation)
    images, labels = t.train.take(np.array([3, 7]))
    np.testing.assert_array_equal(labels, train.labels[[3, 7]])
    # out[n, k] = in[n, perm[k]] per pixel position, the same for every channel
    flat_in = train.images[[3, 7]].reshape(2, 25, 3)
    np.testing.assert_array_equal(images.reshape(2, 25, 3), flat_in[:, t.train.permutation])
  first = S.permuted_tasks(train, test, 2, seed=3, first_identity=True)
  assert first[0].train.permutation is None
  np.testing.assert_array_equal(first[1].train.permutation, tasks[1].train.permutation)
  # deterministic from the seed; a task can be rebuilt on its own from (seed, index)
  again = S.permuted_tasks(train, test, 4, seed=3)
  for a, b in zip(tasks, again):
    np.testing.assert_array_equal(a.train.permutation, b.train.permutation)
  np.testing.assert_array_equal(S.pixel_permutation(25, 3, 2), tasks[2].train.permutation)
  assert not np.array_equal(S.permuted_tasks(train, test, 1, seed=4)[0].train.permutation, perms[0])


def test_scole_stream_reoccurrence_determinism_and_resume():
  train, test = _ds(n=400), _ds(n=100, seed=1)
  tasks = S.scole_tasks(train, test, 250, classes_per_task=2, seed=7)
  assert len(tasks) == 250
  occ = S.class_occurrences(tasks, 10)
  assert occ.sum() == 500 and (occ > 20).all()  # every class reoccurs many times
  for t in tasks[:20]:
    assert len(set(t.classes)) == 2
    assert set(np.unique(t.train.labels)) == set(t.classes)
    assert set(np.unique(t.test.labels)) == set(t.classes)
    assert t.logit_mask.sum() == 2
  # deterministic, and the stream position is a plain int: rebuilding task 123 alone gives the same task
  again = S.scole_task(train, test, 123, classes_per_task=2, seed=7)
  assert again.classes == tasks[123].classes and again.index == 123
  np.testing.assert_array_equal(again.train.indices, tasks[123].train.indices)
  other = S.scole_tasks(train, test, 250, classes_per_task=2, seed=8)
  assert [t.classes for t in other] != [t.classes for t in tasks]
  # a sub-sample per class, fresh on each reoccurrence
  sub = S.scole_tasks(train, test, 30, 2, seed=1, examples_per_class=5)
  assert all(len(t.train) == 10 for t in sub)
  by_class = {}
  for t in sub:
    by_class.setdefault(t.classes, []).append(t.train.indices.tobytes())
  assert any(len(set(v)) > 1 for v in by_class.values() if len(v) > 1)


def test_scole_skewed_class_frequencies():
  train, test = _ds(n=400), _ds(n=100, seed=1)
  p = S.scole_class_probs(10, skew=1.5)
  np.testing.assert_allclose(p.sum(), 1.0)
  assert np.all(np.diff(p) < 0)
  occ = S.class_occurrences(S.scole_tasks(train, test, 400, 2, seed=0, skew=1.5), 10)
  assert occ[0] > 3 * occ[9], occ
  uniform = S.class_occurrences(S.scole_tasks(train, test, 400, 2, seed=0), 10)
  assert uniform.max() < 2 * uniform.min(), uniform
  only = S.scole_tasks(train, test, 10, 2, seed=0, class_probs=np.array([1, 1, 1] + [0] * 7))
  assert all(set(t.classes) <= {0, 1, 2} for t in only)


def test_mask_logits_jits_and_trains_only_present_classes():
  mask = np.zeros(10, bool)
  mask[[2, 5]] = True
  logits = jnp.arange(20.0).reshape(2, 10)
  for dtype in (jnp.float32, jnp.bfloat16):
    z = jax.jit(S.mask_logits)(logits.astype(dtype), mask)
    assert z.dtype == dtype
    p = jax.nn.softmax(z.astype(jnp.float32))
    assert float(jnp.sum(p[:, ~mask])) == 0.0
  labels = jnp.array([2, 5])
  g = jax.grad(lambda l: optax.softmax_cross_entropy_with_integer_labels(S.mask_logits(l, mask), labels).sum())(
      logits)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[:, ~mask]).max()) == 0.0


def test_works_on_the_data_layer_digits():
  data = pytest.importorskip("prox.tasks.data")
  train, test = data.load("digits", "train"), data.load("digits", "test")
  split = S.split_tasks(train, test, 2)
  assert len(split) == 5 and sum(len(t.train) for t in split) == 1347
  perm = S.permuted_tasks(train, test, 10, seed=0)
  ds = perm[3].train.materialize()
  assert isinstance(ds, data.ArrayDataset) and ds.images.shape == (1347, 8, 8, 1)
  batch, _ = data.next_batch(ds, data.loader_init(0), 32)
  assert batch["image"].shape == (32, 8, 8, 1)


def test_bad_input():
  train, test = _ds(), _ds(n=50, seed=1)
  with pytest.raises(ValueError, match="not divisible by classes_per_task=3"):
    S.split_tasks(train, test, 3)
  with pytest.raises(ValueError, match="classes_per_task must be an int in"):
    S.split_tasks(train, test, 0)
  with pytest.raises(ValueError, match="class_order must be a permutation"):
    S.split_tasks(train, test, 2, class_order=[0] * 10)
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):
    S.permuted_tasks(train, test, 0, seed=0)
  with pytest.raises(ValueError, match="skew must be"):
    S.scole_tasks(train, test, 5, 2, 0, skew=-1.0)
  with pytest.raises(ValueError, match="fewer than classes_per_task"):
    S.scole_tasks(train, test, 5, 3, 0, class_probs=np.array([1, 1] + [0] * 8))
  with pytest.raises(ValueError, match="image shapes differ"):
    S.split_tasks(train, _ds(n=20, hw=5), 2)
  with pytest.raises(TypeError, match="test must be an ArrayDataset.*missing 'images'"):
    S.split_tasks(train, object(), 2)
