"""Tests for prox.transforms._task_masks: top-c masks with the straight-through estimator, frozen weights,
bit-packed masks and forget-free inference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms._task_masks import find_task_mask_state, mask_bytes, task_masks


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}


def test_forward_masks_the_top_scores_and_gradients_go_straight_through():
  tm = task_masks(optax.sgd(0.1), density=0.25, max_tasks=3)
  params = tm.init_params(_weights(), jax.random.key(0))
  assert params["scores"]["dense"]["bias"] is None
  s = np.asarray(params["scores"]["dense"]["kernel"])
  w = np.asarray(params["weights"]["dense"]["kernel"])
  k = 5                                                        # round(0.25 * 20)
  top = np.zeros(20, bool)
  top[np.argsort(-np.abs(s).ravel())[:k]] = True
  top = top.reshape(5, 4)
  eff = tm.forward(params)
  np.testing.assert_allclose(eff["dense"]["kernel"], w * top)
  np.testing.assert_allclose(eff["dense"]["bias"], params["weights"]["dense"]["bias"])
  assert np.asarray(tm.current_masks(params)["dense"]["kernel"]).tolist() == top.tolist()
  # L = sum(c * w_eff): dL/dw = c * m, dL/ds = sign(s) * w * c (straight through the indicator)
  c = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  g = jax.grad(lambda p: jnp.sum(jnp.asarray(c) * tm.forward(p)["dense"]["kernel"]))(params)
  np.testing.assert_allclose(g["weights"]["dense"]["kernel"], c * top, rtol=1e-6)
  np.testing.assert_allclose(g["scores"]["dense"]["kernel"], np.sign(s) * w * c, rtol=1e-6)


def test_weights_of_stored_masks_are_frozen_and_masks_are_bit_packed():
  tm = task_masks(optax.adam(0.1), density=0.5, max_tasks=2)
  params = tm.init_params(_weights(), jax.random.key(0))
  state = tm.tx.init(params)
  st = find_task_mask_state(state)
  assert st.packed["dense"]["kernel"].shape == (2, 3) and st.packed["dense"]["kernel"].dtype == jnp.uint8
  assert mask_bytes(st) == 6
  m0 = np.asarray(tm.current_masks(params)["dense"]["kernel"])
  state = tm.consolidate_opt_state(state, params)
  grads = jax.tree.map(lambda x: None if x is None else jnp.ones_like(x), params, is_leaf=lambda x: x is None)
  updates, state = jax.jit(tm.tx.update)(grads, state, params)
  u = np.asarray(updates["weights"]["dense"]["kernel"])
  assert np.all(u[m0] == 0) and np.all(u[~m0] != 0)
  assert np.all(np.asarray(updates["scores"]["dense"]["kernel"]) != 0)    # scores keep learning
  assert np.all(np.asarray(updates["weights"]["dense"]["bias"]) != 0)     # unselected leaves: the inner update
  st = find_task_mask_state(state)
  np.testing.assert_array_equal(np.asarray(st.used["dense"]["kernel"]), m0)
  np.testing.assert_array_equal(
      np.unpackbits(np.asarray(st.packed["dense"]["kernel"][0]), count=20).reshape(5, 4).astype(bool), m0)
  # beyond max_tasks nothing is stored (but the mask still freezes its weights)
  st3 = tm.consolidate(tm.consolidate(st, params), params)
  assert int(st3.num_tasks) == 3
  np.testing.assert_array_equal(np.asarray(st3.packed["dense"]["kernel"]), np.asarray(
      tm.consolidate(st, params).packed["dense"]["kernel"]))


def test_two_tasks_are_forget_free():
  """Task A's outputs through its stored mask are unchanged, bit for bit, after training task B."""
  rng = np.random.default_rng(0)
  xa, xb = (jnp.asarray(rng.normal(size=(32, 5)), jnp.float32) for _ in range(2))
  ya, yb = (jnp.asarray(rng.normal(size=(32, 4)), jnp.float32) for _ in range(2))
  weights = {"kernel": jnp.asarray(rng.normal(size=(5, 4)) * 0.3, jnp.float32)}
  tm = task_masks(optax.sgd(0.05), density=0.4, max_tasks=2)
  params = tm.init_params(weights, jax.random.key(1))
  state = tm.tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    g = jax.grad(lambda p: jnp.mean(jnp.square(x @ tm.forward(p)["kernel"] - y)))(params)
    u, state = tm.tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(30):
    params, state = step(params, state, xa, ya)
  state = tm.consolidate_opt_state(state, params)
  out_a = xa @ tm.task_weights(find_task_mask_state(state), params, 0)["kernel"]
  np.testing.assert_array_equal(out_a, xa @ tm.forward(params)["kernel"])
  before = np.asarray(params["weights"]["kernel"])
  # new scores for task B, so that its subnetwork takes free weights too (with task A's scores the two
  # masks start equal and every weight B could train is frozen)
  params = {**params, "scores": tm.init_params(weights, jax.random.key(2))["scores"]}
  for _ in range(30):
    params, state = step(params, state, xb, yb)
  after = np.asarray(params["weights"]["kernel"])
  assert not np.allclose(before, after)                       # task B did train some weights
  out_a2 = xa @ tm.task_weights(find_task_mask_state(state), params, 0)["kernel"]
  np.testing.assert_array_equal(np.asarray(out_a2), np.asarray(out_a))


def test_errors():
  with pytest.raises(ValueError, match="density"):
    task_masks(optax.sgd(0.1), density=0.0, max_tasks=2)
  with pytest.raises(ValueError, match="max_tasks"):
    task_masks(optax.sgd(0.1), density=0.5, max_tasks=0)
  tm = task_masks(optax.sgd(0.1), density=0.5, max_tasks=2)
  with pytest.raises(ValueError, match="weights"):
    tm.tx.init(_weights())
  with pytest.raises(ValueError, match="TaskMaskState"):
    find_task_mask_state(optax.sgd(0.1).init(_weights()))


def test_in_the_one_step_with_the_forward_hook():
  from prox import step as S
  tm = task_masks(optax.sgd(0.05), density=0.5, max_tasks=2)
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(16, 5)).astype(np.float32), "y": rng.normal(size=(16, 4)).astype(np.float32)}
  params = tm.init_params({"kernel": jnp.asarray(rng.normal(size=(5, 4)) * 0.3, jnp.float32)}, jax.random.key(0))

  def loss(weights, batch, rng):
    del rng
    return jnp.mean(jnp.square(batch["x"] @ weights["kernel"] - batch["y"])), {}

  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tm.tx.init(params), model_state={}, extra=(),
                       rng=jax.random.key_data(jax.random.key(0)))
  mesh = S.data_mesh()
  state = S.replicate(state, mesh)
  state = state._replace(opt_state=tm.consolidate_opt_state(state.opt_state, state.params))
  used = np.asarray(find_task_mask_state(state.opt_state).used["kernel"])
  before = np.asarray(state.params["weights"]["kernel"])
  step = S.make_train_step(S.stateless(loss), tm.tx, forward_fn=lambda p, s: tm.forward(p))
  for _ in range(5):
    state, out = step(state, S.shard_batch(data, mesh))
  after = np.asarray(state.params["weights"]["kernel"])
  np.testing.assert_array_equal(after[used], before[used])      # task 0's weights frozen inside the step
  assert bool(out.finite) and step._cache_size() == 1


@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_topk_mask_selects_exactly_what_lax_top_k_selects_ties_by_position(k):
  """The sort-free selection (bisection on the float bits) against ``lax.top_k``: distinct values, heavy ties,
  all-equal, and float64."""
  from prox.transforms._task_masks import _topk_mask
  rng = np.random.default_rng(k)
  base = np.abs(rng.normal(size=(40, 25))).astype(np.float32)
  for x in (base, np.round(base * 3), np.zeros_like(base), np.round(base * 1000) / 1000):
    _, idx = jax.lax.top_k(jnp.asarray(x).reshape(-1), k)
    expected = np.zeros(x.size, bool)
    expected[np.asarray(idx)] = True
    got = np.asarray(_topk_mask(jnp.asarray(x), k))
    np.testing.assert_array_equal(got.reshape(-1), expected)
    assert got.sum() == k
  with jax.enable_x64(True):
    x = jnp.asarray(np.abs(rng.normal(size=(1000,))) * 1e-300)      # only float64 tells these apart
    _, idx = jax.lax.top_k(x, k)
    expected = np.zeros(1000, bool)
    expected[np.asarray(idx)] = True
    np.testing.assert_array_equal(np.asarray(_topk_mask(x, k)), expected)
