"""Tests of the grain input pipeline: prox.tasks._grain (EpochOrder, readers, worker prefetch) and the
grain-backed sources (GrainSource / EpochSource, TaskSource, ParametricTaskSource).

The hand reference of the order is written out here: epoch e visits default_rng([seed, e]).permutation(N),
epochs back to back; a batch of b takes the next b positions and process p of n its p-th block of b / n.
"""
from __future__ import annotations

import json

import grain
import jax
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prox import loop as L
from prox import step as S
from prox.tasks import EpochOrder, EpochSource, GrainSource, ParametricTaskSource, TaskSource
from prox.tasks import data as data_lib


def _hand_order(seed: int, num: int, epochs: int) -> np.ndarray:
  return np.concatenate([np.random.default_rng([seed, e]).permutation(num) for e in range(epochs)])


def _indexed(num: int) -> data_lib.ArrayDataset:
  """A dataset whose image i holds the number i (so a batch shows which examples it holds)."""
  images = np.broadcast_to(np.arange(num, dtype=np.float32)[:, None, None, None], (num, 2, 1, 1)).copy()
  return data_lib.ArrayDataset(images, (np.arange(num) % 3).astype(np.int32), 3, "indexed")


def _rows(batch) -> np.ndarray:
  return batch.data["image"][:, 0, 0, 0].astype(np.int64)


# ------------------------------------------------------------------------------------- the order


def test_order_is_the_seeded_epoch_permutations():
  num, seed = 10, 7
  order = EpochOrder(num, seed)
  hand = _hand_order(seed, num, 6)
  assert isinstance(order, grain.MapDataset) and len(order) > 10**15
  np.testing.assert_array_equal([order[k] for k in range(40)], hand[:40])
  np.testing.assert_array_equal(order.take(0, 60), hand)              # six epochs in one read
  np.testing.assert_array_equal(order.take(7, 16), hand[7:23])        # across an epoch boundary
  np.testing.assert_array_equal(order.take(23, 4), hand[23:27])       # inside one epoch
  picks = [55, 3, 31, 3, 10, 9]
  np.testing.assert_array_equal(order._getitems(picks), hand[picks])  # pylint: disable=protected-access
  # grain's own transformations see the same elements (slice, map, batch, iteration).
  ds = order[5:25].map(lambda i: 2 * i).batch(4)
  np.testing.assert_array_equal(np.concatenate(list(ds)), 2 * hand[5:25])
  assert EpochOrder(num, seed + 1).take(0, num).tolist() != hand[:num].tolist()


@pytest.mark.parametrize("bad", [dict(num_examples=0, seed=0), dict(num_examples=3, seed=-1),
                                 dict(num_examples=3, seed=2**32), dict(num_examples=2.0, seed=0)])
def test_order_rejects_bad_arguments(bad):
  with pytest.raises(ValueError, match="num_examples|seed"):
    EpochOrder(**bad)


# ------------------------------------------------------------------------------------- batches


@given(num=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       sizes=st.lists(st.integers(1, 90), min_size=1, max_size=12))
def test_variable_batch_sizes_follow_the_hand_order(num, seed, sizes):
  source = GrainSource(_indexed(num), seed, process_index=0, process_count=1)
  hand = _hand_order(seed, num, sum(sizes) // num + 1)
  position = 0
  for size in sizes:
    batch = source.next(size)
    np.testing.assert_array_equal(_rows(batch), hand[position:position + size])
    np.testing.assert_array_equal(batch.data["label"], hand[position:position + size] % 3)
    crosses = (position + size) // num > position // num
    assert batch.boundary == ("epoch" if crosses else None) and batch.meta is None
    position += size
    assert source.get_state() == {"seed": seed, "epoch": position // num, "index": position % num}
    assert source.position == position and source.epoch == position // num


def test_epoch_source_serves_the_hand_written_loaders_batches():
  """EpochSource (the experiments' source) is the grain source and serves data.next_batch's batches."""
  assert EpochSource is GrainSource
  ds = data_lib.load("digits", "train")
  source, state = EpochSource(ds, 3, process_index=0, process_count=1), data_lib.loader_init(3)
  for size in (128, 5, 1000, 3000, 64, 128):
    ref, state = data_lib.next_batch(ds, state, size)
    batch = source.next(size)
    assert batch.data.keys() == ref.keys()
    for key in ref:
      assert batch.data[key].dtype == ref[key].dtype
      np.testing.assert_array_equal(batch.data[key], ref[key])
    assert source.get_state() == data_lib.loader_state_to_dict(state)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_process_shards_concatenate_to_the_one_process_batch(count):
  num, seed, sizes = 23, 5, [count * k for k in (1, 4, 7, 2, 12, 3, 30)]
  whole = GrainSource(_indexed(num), seed, process_index=0, process_count=1)
  shards = [GrainSource(_indexed(num), seed, process_index=p, process_count=count) for p in range(count)]
  for size in sizes:
    one = whole.next(size)
    parts = [s.next(size) for s in shards]
    assert all(len(_rows(p)) == size // count for p in parts)
    np.testing.assert_array_equal(np.concatenate([_rows(p) for p in parts]), _rows(one))
    assert {p.boundary for p in parts} == {one.boundary}
    assert all(s.get_state() == whole.get_state() for s in shards)


def test_mapping_data_and_transform():
  num = 9
  data = {"x": np.arange(num * 2, dtype=np.float32).reshape(num, 2), "y": np.arange(num, dtype=np.int32)}
  source = GrainSource(data, 1, transform=lambda b: {**b, "x2": 2 * b["x"]}, process_index=0,
                       process_count=1)
  hand = _hand_order(1, num, 3)
  batch = source.next(13).data
  np.testing.assert_array_equal(batch["y"], hand[:13])
  np.testing.assert_array_equal(batch["x"], data["x"][hand[:13]])
  np.testing.assert_array_equal(batch["x2"], 2 * data["x"][hand[:13]])


def test_set_state_restores_the_position_and_the_seed():
  ds = _indexed(11)
  first = GrainSource(ds, 4, process_index=0, process_count=1)
  for size in (3, 8, 20):
    first.next(size)
  saved = json.loads(json.dumps(first.get_state()))
  expected = [_rows(first.next(size)) for size in (6, 1, 17)]
  other = GrainSource(ds, 99, process_index=0, process_count=1)   # the seed comes from the state
  other.set_state(saved)
  for size, rows in zip((6, 1, 17), expected):
    np.testing.assert_array_equal(_rows(other.next(size)), rows)


@pytest.mark.parametrize("call, match", [
    (lambda: GrainSource(_indexed(4), 0, process_index=0, process_count=2).next(3), "batch_size"),
    (lambda: GrainSource(_indexed(4), 0, process_index=0, process_count=1).next(0), "batch_size"),
    (lambda: GrainSource(_indexed(4), 0, process_index=0, process_count=1).next(2.0), "batch_size"),
    (lambda: GrainSource(_indexed(4), 2**32), "seed"),
    (lambda: GrainSource(_indexed(4), 0, process_index=2, process_count=2), "process_index"),
    (lambda: GrainSource(_indexed(4), 0, worker_count=-1), "worker_count"),
    (lambda: GrainSource({"x": np.zeros(3), "y": np.zeros(4)}, 0), "leading dimension"),
    (lambda: GrainSource(data_lib.ArrayDataset(np.zeros((3, 2)), np.zeros(4), 2, "bad"), 0), "labels"),
    (lambda: GrainSource(42, 0), "random-access"),
    (lambda: GrainSource(_indexed(4), 0).set_state({"seed": 0, "epoch": 0, "index": 4}), "index 4"),
    (lambda: GrainSource(_indexed(4), 0).set_state({"seed": 0, "epoch": 0}), "loader state"),
])
def test_bad_input_is_a_value_error_naming_it(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------------------------- record sources


def test_tfds_array_record_source_through_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  num, seed = 12, 2
  with tfds.testing.mock_data(num_examples=num, policy=tfds.testing.MockPolicy.USE_CODE):
    records = tfds.data_source("mnist", split="train", data_dir=str(tmp_path))
    images = np.stack([records[i]["image"] for i in range(num)])
    labels = np.array([records[i]["label"] for i in range(num)])
    normalise = lambda b: {"image": b["image"].astype(np.float32) / 255.0, "label": b["label"].astype(np.int32)}
    whole = GrainSource(records, seed, transform=normalise, process_index=0, process_count=1)
    halves = [GrainSource(records, seed, transform=normalise, process_index=p, process_count=2)
              for p in range(2)]
    hand, position = _hand_order(seed, num, 4), 0
    for size in (4, 10, 2, 16):
      batch = whole.next(size)
      rows = hand[position:position + size]
      assert batch.data["image"].shape == (size, 28, 28, 1) and batch.data["image"].dtype == np.float32
      np.testing.assert_array_equal(batch.data["image"], images[rows].astype(np.float32) / 255.0)
      np.testing.assert_array_equal(batch.data["label"], labels[rows])
      parts = [h.next(size).data for h in halves]
      np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), labels[rows])
      position += size
    assert whole.get_state() == {"seed": seed, "epoch": 2, "index": 8}


def test_array_record_file_through_a_grain_map_dataset(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  num, path = 15, str(tmp_path / "toy.array_record")
  values = np.random.default_rng(0).normal(size=(num, 3)).astype(np.float32)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for row in values:
    writer.write(row.tobytes())
  writer.close()
  decoded = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map(
      lambda raw: {"x": np.frombuffer(raw, np.float32)})
  source = GrainSource(decoded, 8, process_index=0, process_count=1)
  hand = _hand_order(8, num, 3)
  np.testing.assert_array_equal(source.next(9).data["x"], values[hand[:9]])
  np.testing.assert_array_equal(source.next(20).data["x"], values[hand[9:29]])


# ------------------------------------------------------------------------------------- resume in the loop


class _Recording:
  """A source wrapper that records the example rows of every batch it serves."""

  def __init__(self, source):
    self.source, self.served = source, []

  def next(self, batch_size, context=None):
    batch = self.source.next(batch_size, context)
    self.served.append(batch.data["index"].tolist())
    return batch

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state):
    self.source.set_state(state)


class _Crash(Exception):
  pass


def _loss(params, batch, rng):
  logits = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def test_a_killed_run_resumes_with_exactly_the_batches_of_an_uninterrupted_one(tmp_path):
  num = 37
  rng = np.random.default_rng(0)
  data = {"image": rng.normal(size=(num, 4, 1, 1)).astype(np.float32),
          "label": rng.integers(0, 2, num).astype(np.int32), "index": np.arange(num, dtype=np.int32)}
  tx = optax.sgd(0.3, momentum=0.9)
  mesh = S.data_mesh()
  params = {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}
  state = S.replicate(S.init_state(params, tx, seed=0), mesh)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh, donate=False)
  devices = len(jax.devices())
  sizes = [4, 12, 8, 20, 4, 16, 28, 8, 12, 24, 4, 8, 40, 16]   # what a controller might ask for
  cache = L.CompileCache()   # one compile per batch size over the three runs

  def go(directory, crash_at=None):
    source = _Recording(GrainSource(data, 11))

    def crash(ctx):
      if ctx.step == crash_at:
        raise _Crash

    result = L.run(step, state, source, mesh=mesh, batch_size=lambda ctx: sizes[min(ctx.step, len(sizes) - 1)] * devices,
                   num_steps=len(sizes), checkpoint_dir=str(directory), checkpoint=L.Every(steps=3),
                   actions=((L.Every(steps=1), crash),), compile_cache=cache)
    return result, source.served

  whole, served = go(tmp_path / "whole")
  with pytest.raises(_Crash):
    go(tmp_path / "parts", crash_at=8)   # killed after step 8; its last checkpoint is step 6
  resumed, served_after = go(tmp_path / "parts")
  assert resumed.resumed_from == 6 and resumed.steps_this_run == len(sizes) - 6
  hand, position, expected = _hand_order(11, num, 10), 0, []
  for size in sizes:
    expected.append(hand[position:position + size * devices].tolist())
    position += size * devices
  assert served == expected
  assert served_after == expected[6:]
  jax.tree.map(np.testing.assert_array_equal, resumed.state.params, whole.state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.state.opt_state, whole.state.opt_state)


# ------------------------------------------------------------------------------------- other sources


def test_task_and_parametric_sources_draw_the_hand_order():
  ds, seed = _indexed(13), 6
  tasks = TaskSource([ds, ds], [3, 2], seed, process_index=0, process_count=1)
  for t, count in enumerate((3, 2)):
    task_seed = int(np.random.SeedSequence((seed, t)).generate_state(1)[0])
    hand, position = _hand_order(task_seed, 13, 4), 0
    for _ in range(count):
      batch = tasks.next(9)
      np.testing.assert_array_equal(_rows(batch), hand[position:position + 9])
      position += 9
  assert tasks.next(9) is None
  json.dumps(tasks.get_state())

  parametric = ParametricTaskSource(ds, seed, task_of=lambda ctx: np.float32(1.0),
                                    transform=lambda b, task, rng: b, process_index=0, process_count=1)
  hand = _hand_order(seed, 13, 3)
  np.testing.assert_array_equal(_rows(parametric.next(10)), hand[:10])
  saved = parametric.get_state()
  after = _rows(parametric.next(11))
  np.testing.assert_array_equal(after, hand[10:21])
  parametric.set_state(saved)
  np.testing.assert_array_equal(_rows(parametric.next(11)), after)


def test_task_source_resumes_mid_task():
  ds = _indexed(13)
  first = TaskSource([ds, ds], [3, 2], 1, process_index=0, process_count=1)
  first.next(5)
  saved = json.loads(json.dumps(first.get_state()))
  rest = [_rows(first.next(5)) for _ in range(4)]
  second = TaskSource([ds, ds], [3, 2], 1, process_index=0, process_count=1)
  second.set_state(saved)
  for rows in rest:
    np.testing.assert_array_equal(_rows(second.next(5)), rows)
  assert second.next(5) is None


# ------------------------------------------------------------------------------------- worker processes


def test_worker_processes_serve_the_same_batches():
  """grain mp_prefetch workers (two, taking turns): the prefetched batches are the in-process ones,
  through a size change and a rewind (set_state); ``close`` stops the workers."""
  ds = _indexed(29)
  twice = lambda b: {**b, "twice": 2 * b["image"]}
  plain = GrainSource(ds, 3, transform=twice, process_index=0, process_count=1)
  workers = GrainSource(ds, 3, transform=twice, worker_count=2, process_index=0, process_count=1)
  pipeline = lambda: workers._batches._pipeline   # pylint: disable=protected-access
  try:
    def check(size, prefetched):
      want, got = plain.next(size).data, workers.next(size).data
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert type(got[key]) is np.ndarray   # pylint: disable=unidiomatic-typecheck
      assert (pipeline() is not None) == prefetched

    for size, prefetched in [(8, False), (8, True), (8, True), (8, True)]:
      check(size, prefetched)      # the pipeline starts at the second 8 and serves from the third
    saved = plain.get_state()
    check(12, False)               # another size: the pipeline stops, the batch is read in-process
    workers.set_state(saved)       # a rewind
    plain.set_state(saved)
    for size, prefetched in [(8, False), (8, True), (8, True), (8, True)]:
      check(size, prefetched)      # the pipeline restarts where the rewind put it
  finally:
    workers.close()
  assert pipeline() is None
