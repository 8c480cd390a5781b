"""Tests for prox.tasks.replay: reservoir memory as a pure, jittable state machine."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.tasks import replay as RP


def _example():
  return {"image": jnp.zeros((2, 2), jnp.float32), "label": jnp.zeros((), jnp.int32)}


def _batch(start, b):
  ids = np.arange(start, start + b)
  return {"image": jnp.asarray(np.broadcast_to(ids[:, None, None], (b, 2, 2)), jnp.float32),
          "label": jnp.asarray(ids, jnp.int32)}


def test_vectorised_add_equals_sequential_algorithm_r():
  cap = 3
  state = RP.reservoir_init(_example(), cap)
  ref = [0] * cap  # empty slots hold zeros
  seen = 0
  add = jax.jit(RP.reservoir_add)
  for step, b in enumerate([2, 5, 20, 20]):  # many slot collisions inside one batch
    key = jax.random.key(step)
    batch = _batch(seen, b)
    # the same draws the implementation makes: j ~ U{0..n} for the n-th example of the stream
    n = seen + np.arange(b)
    j = np.asarray(jax.random.randint(key, (b,), 0, jnp.asarray(n) + 1))
    for i in range(b):  # Algorithm R, one example at a time
      if n[i] < cap:
        ref[n[i]] = n[i]
      elif j[i] < cap:
        ref[j[i]] = n[i]
    seen += b
    state = add(state, batch, key)
    assert int(state.seen) == seen
    np.testing.assert_array_equal(np.asarray(state.data["label"]), ref)
    np.testing.assert_array_equal(np.asarray(state.data["image"])[:, 0, 0], ref)
  assert add._cache_size() == 3  # one per distinct batch size (2, 5, 20)


def test_memory_is_a_uniform_sample_of_the_stream():
  cap, total, b, runs = 5, 40, 8, 4000

  def run(key):
    state = RP.reservoir_init({"id": jnp.zeros((), jnp.int32)}, cap)
    for s in range(total // b):
      state = RP.reservoir_add(state, {"id": jnp.arange(s * b, (s + 1) * b, dtype=jnp.int32)},
                               jax.random.fold_in(key, s))
    return state.data["id"]

  ids = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), runs)))
  assert all(len(set(r)) == cap for r in ids[:50])  # distinct examples
  freq = np.bincount(ids.ravel(), minlength=total) / runs
  # inclusion probability cap / total = 0.125 for every example; binomial std ~0.0052
  np.testing.assert_allclose(freq, cap / total, atol=0.025)


def test_valid_mask_and_sampling():
  state = RP.reservoir_init(_example(), 8)
  mem, valid = RP.reservoir_sample(state, jax.random.key(0), 4)
  assert not bool(valid.any())
  valid_in = jnp.array([True, False, True, True, False])
  state = RP.reservoir_add(state, _batch(100, 5), jax.random.key(1), valid=valid_in)
  assert int(state.seen) == 3 and int(RP.reservoir_size(state)) == 3
  np.testing.assert_array_equal(np.asarray(state.data["label"][:3]), [100, 102, 103])
  mem, valid = jax.jit(RP.reservoir_sample, static_argnums=2)(state, jax.random.key(2), 5)
  assert valid.tolist() == [True, True, True, False, False]
  assert sorted(np.asarray(mem["label"][:3]).tolist()) == [100, 102, 103]
  state = RP.reservoir_add(state, _batch(200, 5), jax.random.key(3))
  labels = np.asarray(RP.reservoir_sample(state, jax.random.key(4), 8)[0]["label"])
  assert sorted(labels.tolist()) == [100, 102, 103, 200, 201, 202, 203, 204]  # without replacement
  mixed, w = RP.mix_batches(_batch(0, 4), mem, valid)
  assert mixed["image"].shape == (9, 2, 2) and w.tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_checkpoint_round_trip(orbax_round_trip):
  state = RP.reservoir_add(RP.reservoir_init(_example(), 6), _batch(0, 9), jax.random.key(0))
  restored = orbax_round_trip(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  key = jax.random.key(5)
  a = RP.reservoir_add(state, _batch(9, 4), key)
  b = RP.reservoir_add(restored, _batch(9, 4), key)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bad_input():
  with pytest.raises(ValueError, match="capacity must be a positive int, got 0"):
    RP.reservoir_init(_example(), 0)
  state = RP.reservoir_init(_example(), 4)
  with pytest.raises(ValueError, match=r"n must be an int in \[1, capacity=4\], got 5"):
    RP.reservoir_sample(state, jax.random.key(0), 5)
  with pytest.raises(ValueError, match="does not match the memory"):
    RP.reservoir_add(state, {"image": jnp.zeros((3, 3, 2))}, jax.random.key(0))


def test_reservoir_factory_is_the_same_machine():
  from prox.tasks.replay import reservoir
  memory = reservoir(5)
  x = {"x": jnp.arange(12, dtype=jnp.float32).reshape(12, 1)}
  state = memory.init({"x": jnp.zeros((1,), jnp.float32)})
  ref = RP.reservoir_init({"x": jnp.zeros((1,), jnp.float32)}, 5)
  key = jax.random.key(3)
  state, ref = memory.add(state, x, key), RP.reservoir_add(ref, x, key)
  np.testing.assert_array_equal(state.data["x"], ref.data["x"])
  assert int(memory.size(state)) == 5
  got, valid = jax.jit(memory.sample, static_argnums=2)(state, key, 3)
  want, want_valid = RP.reservoir_sample(ref, key, 3)
  np.testing.assert_array_equal(got["x"], want["x"])
  np.testing.assert_array_equal(valid, want_valid)
  with pytest.raises(ValueError, match="capacity"):
    reservoir(0)
