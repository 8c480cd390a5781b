"""Tests for prox.tasks.data: datasets, the epoch loader and the augmented digits stream."""
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from prox.tasks import data


def _index_dataset(num: int, shape=(2, 3, 1)) -> data.ArrayDataset:
  """A dataset whose label is the row index and whose image holds it too, so batches reveal the order."""
  images = np.broadcast_to(np.arange(num, dtype=np.float32)[:, None, None, None], (num, *shape)).copy()
  return data.ArrayDataset(images=images, labels=np.arange(num, dtype=np.int32), num_classes=num,
                           name="index")


def _through_json(state, to_dict, from_dict):
  return from_dict(json.loads(json.dumps(to_dict(state))))


@pytest.fixture(scope="module")
def digits_train():
  return data.load("digits", "train")


# --------------------------------------------------------------------------------- datasets


def test_digits_split_sizes_dtypes_and_class_balance(digits_train):
  test = data.load("digits", "test")
  assert digits_train.images.shape == (1347, 8, 8, 1) and test.images.shape == (450, 8, 8, 1)
  assert digits_train.images.dtype == np.float32 and digits_train.labels.dtype == np.int32
  assert digits_train.num_classes == 10 and digits_train.name == "digits"
  total = np.bincount(load_digits().target, minlength=10)
  train_counts = np.bincount(digits_train.labels, minlength=10)
  test_counts = np.bincount(test.labels, minlength=10)
  np.testing.assert_array_equal(train_counts + test_counts, total)
  # Stratified: each class is split 3:1 up to rounding.
  assert np.all(np.abs(test_counts - 0.25 * total) <= 1), test_counts


def test_digits_normalised_with_train_statistics(digits_train):
  test = data.load("digits", "test")
  raw = load_digits()
  x_train, x_test, _, y_test = train_test_split(
      raw.images, raw.target, test_size=0.25, random_state=0, stratify=raw.target)
  mean, std = x_train.mean(), x_train.std()
  np.testing.assert_allclose(digits_train.images[..., 0], (x_train - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test.images[..., 0], (x_test - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(test.labels, y_test)
  assert abs(float(digits_train.images.mean())) < 1e-5
  assert abs(float(digits_train.images.std()) - 1.0) < 1e-5
  assert abs(float(test.images.mean())) > 1e-4  # test uses the train statistics, not its own


def test_unknown_name_and_split():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known datasets: digits, mnist1d, "
                     "mnist, fashion_mnist, cifar10, cifar100"):
    data.load("imagenet")
  with pytest.raises(ValueError, match="digits has splits"):
    data.load("digits", "validation")
  with pytest.raises(ValueError, match="unknown scaling 'x/16'; known scalings: standard, unit"):
    data.load("digits", "train", scaling="x/16")


def test_digits_unit_scaling_is_raw_pixels_over_16(digits_train):
  raw = load_digits()
  x_train, x_test, y_train, _ = train_test_split(
      raw.images, raw.target, test_size=0.25, random_state=0, stratify=raw.target)
  for split, expected in (("train", x_train), ("test", x_test)):
    ds = data.load("digits", split, scaling="unit")
    assert ds.images.dtype == np.float32 and ds.images.shape == (len(expected), 8, 8, 1)
    np.testing.assert_array_equal(ds.images[..., 0], (expected / 16.0).astype(np.float32))
  unit = data.load("digits", "train", scaling="unit")
  assert unit.images.min() == 0.0 and unit.images.max() == 1.0
  np.testing.assert_array_equal(unit.labels, y_train)
  # Same images as the default scaling, only an affine map apart: (x/16 - mean/16) / (std/16).
  standardised = (unit.images - unit.images.mean(dtype=np.float64)) / unit.images.std(dtype=np.float64)
  np.testing.assert_allclose(standardised, digits_train.images, atol=1e-5)


def test_missing_tfds_dataset_is_one_clear_line(tmp_path):
  with pytest.raises(ValueError) as info:
    data.load("mnist", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert f"TFDS dataset 'mnist' is not prepared in {tmp_path}" in message
  assert f"tfds build mnist --data_dir={tmp_path}" in message and "'digits'" in message


@pytest.mark.parametrize("name, shape, mean, std", [
    ("mnist", (28, 28, 1), (0.1307,), (0.3081,)),
    ("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
])
def test_tfds_via_mock_data(tmp_path, name, shape, mean, std):  # pylint: disable=too-many-locals
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  num = 12
  # USE_CODE: the mock takes features from the builder class, needs no metadata files, and mocks
  # tfds.data_source (AUTO falls back to it too when no metadata is found).
  with tfds.testing.mock_data(num_examples=num, policy=tfds.testing.MockPolicy.USE_CODE):
    for split in ("train", "test"):
      ds = data.load(name, split, data_dir=str(tmp_path))
      source = tfds.data_source(name, split=split, data_dir=str(tmp_path))
      raw = np.stack([source[i]["image"] for i in range(num)])
      raw_labels = np.array([source[i]["label"] for i in range(num)])
      assert ds.images.shape == (num, *shape) and ds.images.dtype == np.float32
      assert ds.labels.shape == (num,) and ds.labels.dtype == np.int32 and ds.num_classes == 10
      assert ds.name == name
      expected = (raw.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
      np.testing.assert_allclose(ds.images, expected, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(ds.labels, raw_labels)
      assert ds.labels.min() >= 0 and ds.labels.max() < 10
      unit = data.load(name, split, data_dir=str(tmp_path), scaling="unit")
      np.testing.assert_array_equal(unit.images, raw.astype(np.float32) / np.float32(255))


# --------------------------------------------------------------------------------- epoch loader


def _epoch_sequence(seed: int, num: int, epochs: int) -> np.ndarray:
  return np.concatenate([np.random.default_rng([seed, e]).permutation(num) for e in range(epochs)])


def test_batches_follow_seeded_epoch_permutations_and_cross_epochs():
  ds = _index_dataset(10)
  state = data.loader_init(7)
  seen = []
  for _ in range(5):  # 5 x 4 = 20 = two epochs exactly; batches 3 and 5 cross epoch ends
    batch, state = data.next_batch(ds, state, 4)
    assert batch["image"].shape == (4, 2, 3, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])
    seen.append(batch["label"])
  seen = np.concatenate(seen)
  np.testing.assert_array_equal(seen, _epoch_sequence(7, 10, 2))
  for epoch in range(2):  # every sample once per epoch
    np.testing.assert_array_equal(np.sort(seen[10 * epoch:10 * (epoch + 1)]), np.arange(10))
  assert state == data.LoaderState(seed=7, epoch=2, index=0)
  assert not np.array_equal(seen[:10], seen[10:])  # a new permutation each epoch


def test_batch_larger_than_dataset_spans_epochs():
  ds = _index_dataset(5)
  batch, state = data.next_batch(ds, data.loader_init(1), 12)
  np.testing.assert_array_equal(batch["label"], _epoch_sequence(1, 5, 3)[:12])
  assert state == data.LoaderState(seed=1, epoch=2, index=2)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.sampled_from([2, 4, 6, 10, 14]), min_size=1, max_size=8),
       split=st.integers(0, 8), seed=st.integers(0, 2**32 - 1))
@example(sizes=[10, 14, 14, 14, 14, 14, 14, 14], split=0, seed=0)  # 108 samples: more than 8 epochs of 13
def test_changing_batch_sizes_and_resume_through_json(sizes, split, seed):
  ds = _index_dataset(13)
  state = data.loader_init(seed)
  straight = []
  for size in sizes:
    batch, state = data.next_batch(ds, state, size)
    straight.append(batch["label"])
  # The concatenation of batches of any sizes is the epoch sequence.
  np.testing.assert_array_equal(np.concatenate(straight), _epoch_sequence(seed, 13, -(-sum(sizes) // 13))[:sum(sizes)])
  # Stop after `split` batches, store the state as JSON, continue: identical batches.
  split = min(split, len(sizes))
  state = data.loader_init(seed)
  for size in sizes[:split]:
    _, state = data.next_batch(ds, state, size)
  state = _through_json(state, data.loader_state_to_dict, data.loader_state_from_dict)
  assert all(type(v) is int for v in state)  # pylint: disable=unidiomatic-typecheck
  for size, expected in zip(sizes[split:], straight[split:]):
    batch, state = data.next_batch(ds, state, size)
    np.testing.assert_array_equal(batch["label"], expected)


def test_process_shards_concatenate_to_the_global_batch():
  ds = _index_dataset(11)
  one, two = data.loader_init(3), [data.loader_init(3), data.loader_init(3)]
  for size in (4, 6, 8, 2):
    full, one = data.next_batch(ds, one, size)
    shards = []
    for p in range(2):
      shard, two[p] = data.next_batch(ds, two[p], size, process_index=p, process_count=2)
      assert shard["label"].shape == (size // 2,)
      shards.append(shard)
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]), full["label"])
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), full["image"])
    assert two[0] == two[1] == one


def test_loader_rejects_bad_arguments():
  ds = _index_dataset(6)
  state = data.loader_init(0)
  with pytest.raises(ValueError, match="global_batch_size 5 is not divisible by process_count 2"):
    data.next_batch(ds, state, 5, process_count=2)
  with pytest.raises(ValueError, match="global_batch_size must be a positive int, got 0"):
    data.next_batch(ds, state, 0)
  with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 2\), got 2"):
    data.next_batch(ds, state, 4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed must be an int"):
    data.loader_init(-1)
  with pytest.raises(ValueError, match="loader state must be a dict with keys"):
    data.loader_state_from_dict({"seed": 0, "epoch": 0})
  with pytest.raises(ValueError, match="invalid loader state"):
    data.next_batch(ds, data.LoaderState(0, 0, 6), 2)


def test_loader_and_eval_batches_take_sequences():
  images = np.broadcast_to(np.arange(7, dtype=np.float32)[:, None, None], (7, 5, 1)).copy()
  ds = data.ArrayDataset(images=images, labels=np.arange(7, dtype=np.int32), num_classes=7,
                         name="sequences")  # [N, L, C] inputs, as MNIST-1D's
  batch, _ = data.next_batch(ds, data.loader_init(0), 4)
  assert batch["image"].shape == (4, 5, 1)
  np.testing.assert_array_equal(batch["image"][:, 0, 0], batch["label"])
  batches = list(data.epoch_batches(ds, 4))
  assert [b["image"].shape for b in batches] == [(4, 5, 1)] * 2
  np.testing.assert_array_equal(batches[1]["image"][:, 0, 0], [4, 5, 6, 0])
  with pytest.raises(ValueError, match=r"next_stream_batch warps images \[N, H, W, C\]"):
    data.next_stream_batch(ds, data.stream_init(0), 4)


@pytest.mark.parametrize("process_count", [1, 2])
def test_epoch_batches_cover_the_dataset_once_with_mask(process_count):
  ds = _index_dataset(11)
  shards = [list(data.epoch_batches(ds, 4, process_index=p, process_count=process_count))
            for p in range(process_count)]
  assert all(len(s) == 3 for s in shards)
  batches = [{k: np.concatenate([s[i][k] for s in shards]) for k in ("image", "label", "mask")}
             for i in range(3)]
  for batch in batches:
    assert batch["image"].shape == (4, 2, 3, 1) and batch["mask"].dtype == np.bool_
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(12) < 11)
  np.testing.assert_array_equal(labels[mask], np.arange(11))
  np.testing.assert_array_equal(labels[~mask], [0])
  assert np.all(batches[-1]["image"][~batches[-1]["mask"]] == 0)
  unpadded = list(data.epoch_batches(ds, 4, pad=False))
  assert [len(b["label"]) for b in unpadded] == [4, 4, 3] and unpadded[-1]["mask"].all()
  if process_count == 2:
    with pytest.raises(ValueError, match="last batch of 3 examples cannot be split evenly"):
      list(data.epoch_batches(ds, 4, process_count=2, pad=False))


# --------------------------------------------------------------------------------- augmented stream

_IDENTITY = dict(max_shift=0.0, max_rotation=0.0, scale_range=(1.0, 1.0), noise_std=0.0)


def test_stream_is_deterministic_per_sample_and_resumes(digits_train):
  state = data.stream_init(5)
  first, state1 = data.next_stream_batch(digits_train, state, 16)
  again, _ = data.next_stream_batch(digits_train, state, 16)
  np.testing.assert_array_equal(first["image"], again["image"])
  assert first["image"].shape == (16, 8, 8, 1) and first["image"].dtype == np.float32
  assert first["label"].dtype == np.int32 and state1 == data.StreamState(seed=5, position=16)
  # Batch sizes and resumption do not change the samples: 2 x 8 (through JSON) == 16.
  half, mid = data.next_stream_batch(digits_train, state, 8)
  mid = _through_json(mid, data.stream_state_to_dict, data.stream_state_from_dict)
  rest, _ = data.next_stream_batch(digits_train, mid, 8)
  np.testing.assert_array_equal(np.concatenate([half["image"], rest["image"]]), first["image"])
  np.testing.assert_array_equal(np.concatenate([half["label"], rest["label"]]), first["label"])
  # Two processes' shards concatenate to the one-process batch.
  shards = [data.next_stream_batch(digits_train, state, 16, process_index=p, process_count=2)[0]
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), first["image"])
  # Another seed gives other samples.
  other, _ = data.next_stream_batch(digits_train, data.stream_init(6), 16)
  assert not np.allclose(other["image"], first["image"])


def test_stream_augments_images_and_keeps_labels(digits_train):
  state = data.StreamState(seed=2, position=1340)  # crosses the end of the first pass over 1,347 images
  plain, _ = data.next_stream_batch(digits_train, state, 16, **_IDENTITY)
  order = _epoch_sequence(2, 1347, 2)[1340:1356]
  # With the identity warp and no noise the stream is the loader's epoch order, pixel for pixel.
  np.testing.assert_allclose(plain["image"], digits_train.images[order], atol=1e-5)
  np.testing.assert_array_equal(plain["label"], digits_train.labels[order])
  augmented, _ = data.next_stream_batch(digits_train, state, 16)
  np.testing.assert_array_equal(augmented["label"], digits_train.labels[order])
  diff = np.abs(augmented["image"] - digits_train.images[order]).mean(axis=(1, 2, 3))
  assert np.all(diff > 0.05), diff  # every sample is changed
  # ... but stays close to its source: nearer its own source image than to the other images of the batch.
  dist = ((augmented["image"][:, None] - digits_train.images[order][None]) ** 2).sum(axis=(2, 3, 4))
  assert np.mean(np.argmin(dist, axis=1) == np.arange(16)) >= 0.75
  # The noise alone has the requested standard deviation.
  noisy, _ = data.next_stream_batch(digits_train, state, 16, **{**_IDENTITY, "noise_std": 0.5})
  assert abs(float(np.std(noisy["image"] - digits_train.images[order])) - 0.5) < 0.05


def test_stream_rejects_bad_arguments(digits_train):
  state = data.stream_init(0)
  with pytest.raises(ValueError, match="scale_range must satisfy 0 < low <= high"):
    data.next_stream_batch(digits_train, state, 8, scale_range=(1.1, 0.9))
  with pytest.raises(ValueError, match="max_rotation must be a finite number >= 0, got -1"):
    data.next_stream_batch(digits_train, state, 8, max_rotation=-1.0)
  with pytest.raises(ValueError, match="global_batch_size 9 is not divisible by process_count 2"):
    data.next_stream_batch(digits_train, state, 9, process_count=2)
  with pytest.raises(ValueError, match="stream position must be a non-negative int"):
    data.stream_state_from_dict({"seed": 0, "position": -3})
