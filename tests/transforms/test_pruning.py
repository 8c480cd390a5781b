"""Gradual pruning, ERK, RigL and SET (prox.transforms.pruning)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox.transforms import filters, forward_params, pruning


def params_fixture(seed=0):
  rng = np.random.default_rng(seed)
  return {"l1": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "bias": jnp.zeros(6)},
          "l2": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}


def loss(p, batch):
  x, y = batch
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return jnp.mean((h @ p["l2"]["kernel"] - y) ** 2)


BATCH = (jnp.asarray(np.random.default_rng(9).normal(size=(16, 8)), jnp.float32),
         jnp.asarray(np.random.default_rng(10).normal(size=(16, 4)), jnp.float32))


def make_step(tx):
  @jax.jit
  def step(p, s):
    g = jax.grad(lambda q: loss(forward_params(q, s), BATCH))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


def ref_keep_all_but_lowest(score, k):
  flat = np.asarray(score, np.float64).reshape(-1)
  order = sorted(range(flat.size), key=lambda i: (flat[i], i))
  keep = np.ones(flat.size, bool)
  keep[order[:k]] = False
  return keep.reshape(np.shape(score))


@settings(max_examples=25, deadline=None)
@given(target=st.floats(0.0, 0.99), initial=st.floats(0.0, 0.5), start=st.integers(0, 50), span=st.integers(1, 100),
       power=st.sampled_from([1.0, 2.0, 3.0]), count=st.integers(0, 200))
def test_polynomial_sparsity_formula(target, initial, start, span, power, count):
  sched = pruning.polynomial_sparsity(target, start_step=start, end_step=start + span, power=power, initial=initial)
  p = min(max((count - start) / span, 0.0), 1.0)
  np.testing.assert_allclose(float(sched(count)), target + (initial - target) * (1 - p) ** power, rtol=1e-5,
                             atol=1e-6)


def test_erk_sparsities_hit_budget_and_scale():
  shapes = [(3, 3, 2, 4), (64, 32), (32, 10), (4, 4)]
  s = 0.8
  sp = pruning.erk_sparsities(shapes, s)
  sizes = np.array([np.prod(x) for x in shapes], float)
  dens = 1 - np.array(sp)
  np.testing.assert_allclose((dens * sizes).sum(), (1 - s) * sizes.sum(), rtol=1e-9)
  assert (dens <= 1.0 + 1e-12).all() and (dens > 0).all()
  raw = np.array([sum(x) / np.prod(x) for x in shapes])
  free = dens < 1.0
  ratio = dens[free] / raw[free]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)  # density proportional to ERK score
  assert np.isclose(dens[3], 1.0)  # the tiny layer saturates and becomes dense


@settings(max_examples=8, deadline=None)
@given(target=st.sampled_from([0.3, 0.5, 0.8, 0.95]), start=st.integers(0, 3), span=st.integers(1, 8),
       freq=st.integers(1, 4), score=st.sampled_from(pruning.SCORES),
       layout=st.sampled_from([("layer", "uniform"), ("layer", "erk"), ("global", "uniform")]))
def test_gradual_pruning_hits_target_and_masks_shrink(target, start, span, freq, score, layout):
  scope, dist = layout
  params = params_fixture(1)
  tx = pruning.gradual_pruning(optax.adam(1e-2), sparsity=target, start_step=start, end_step=start + span,
                               frequency=freq, score=score, scope=scope, distribution=dist,
                               filter=filters.kernels())
  step = make_step(tx)
  state = tx.init(params)
  prev = state.masks
  sched = pruning.polynomial_sparsity(target, start_step=start, end_step=start + span)
  for c in range(start + span + 3):
    params, state = step(params, state)
    for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(state.masks)):
      assert not np.any(np.asarray(b) & ~np.asarray(a))  # masks only shrink
    updated = start <= c <= start + span and ((c - start) % freq == 0 or c == start + span)
    if not updated:
      jax.tree.map(np.testing.assert_array_equal, prev, state.masks)
    elif scope == "global":
      total = sum(int(np.asarray(m).size) for m in jax.tree.leaves(state.masks))
      pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(state.masks))
      assert pruned == round(float(sched(c)) * total)
    prev = state.masks
    for w, m in ((params["l1"]["kernel"], state.masks["l1"]["kernel"]), (params["l2"]["kernel"], state.masks["l2"]["kernel"])):
      assert (np.asarray(w)[~np.asarray(m)] == 0).all()  # pruned weights are exactly 0
  targets = jax.tree.leaves(pruning.layer_sparsities(params, target, distribution=dist, filter=filters.kernels()))
  summary = filters.sparsity_summary(state.masks)
  if scope == "global":
    assert abs(float(summary["total"]) - target) <= 1.0 / 72
  else:
    for name, s_l, size in zip(["l1/kernel", "l2/kernel"], targets, [48, 24]):
      assert float(summary[name]) == pytest.approx(round(s_l * size) / size)
  assert state.masks["l1"]["bias"] is None


@pytest.mark.parametrize("score", ["magnitude", "saliency"])
def test_one_shot_prunes_lowest_scores(score):
  params = params_fixture(2)
  params["l1"]["kernel"] = params["l1"]["kernel"].at[0, :3].set(0.25).at[1, :3].set(-0.25)  # ties
  grads = jax.tree.map(lambda w: jnp.asarray(np.random.default_rng(3).normal(size=w.shape), w.dtype), params)
  tx = pruning.gradual_pruning(optax.set_to_zero(), sparsity=0.5, start_step=0, end_step=1, frequency=1, score=score,
                               filter=filters.kernels())
  state = tx.init(params)
  u, state = tx.update(grads, state, params)  # count 0: sparsity 0
  assert all(bool(m.all()) for m in jax.tree.leaves(state.masks))
  u, state = tx.update(grads, state, params)  # count 1 = end_step: sparsity 0.5
  for name in ("l1", "l2"):
    w, g = np.asarray(params[name]["kernel"]), np.asarray(grads[name]["kernel"])
    sc = np.abs(w) if score == "magnitude" else np.abs(np.float32(w) * np.float32(g))
    expect = ref_keep_all_but_lowest(sc, w.size // 2)
    np.testing.assert_array_equal(np.asarray(state.masks[name]["kernel"]), expect)
    np.testing.assert_array_equal(np.asarray(u[name]["kernel"]), np.where(expect, 0.0, -w))


def test_inner_sees_masked_grads_and_forward_is_straight_through():
  params = params_fixture(3)
  tx = pruning.gradual_pruning(optax.identity(), sparsity=0.5, start_step=0, end_step=1, frequency=1,
                               filter=filters.kernels())
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(grads, state, params)
  _, state = tx.update(grads, state, params)
  u, _ = tx.update(grads, state, params)
  m = np.asarray(state.masks["l1"]["kernel"])
  w = np.asarray(params["l1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(u["l1"]["kernel"]), np.where(m, 1.0, -w))
  np.testing.assert_array_equal(np.asarray(u["l1"]["bias"]), 1.0)
  fwd = forward_params(params, state)
  np.testing.assert_array_equal(np.asarray(fwd["l1"]["kernel"]), w * m)
  g = jax.grad(lambda p: jnp.sum(forward_params(p, state)["l1"]["kernel"] * 3.0))(params)
  np.testing.assert_array_equal(np.asarray(g["l1"]["kernel"]), 3.0)


def _reference_rigl_update(w, g, m, frac, grow_scores=None):
  k = round(frac * m.sum())
  drop_score = np.where(m, np.abs(w), np.inf)
  after = m & ref_keep_all_but_lowest(drop_score, k)
  gs = np.abs(g) if grow_scores is None else grow_scores
  grow = ~ref_keep_all_but_lowest(-np.where(after, -np.inf, gs), k)
  return after | grow


def test_rigl_drop_and_regrow_matches_reference():
  params = params_fixture(4)
  tx = pruning.rigl(optax.sgd(0.1), sparsity=0.5, drop_fraction=0.3, update_frequency=2, end_step=10,
                    distribution="uniform", filter=filters.kernels(), seed=3)
  state = tx.init(params)
  for m in jax.tree.leaves(state.masks):
    assert int((~np.asarray(m)).sum()) == np.asarray(m).size // 2
  step = make_step(tx)
  params, state = step(params, state)  # count 0: no mask update, prunes the params
  params, state = step(params, state)  # count 1: none
  before = state.masks
  grads = jax.jit(jax.grad(lambda q, s: loss(forward_params(q, s), BATCH)))(params, state)
  new_params, state2 = step(params, state)  # count 2: drop and regrow
  frac = 0.3 / 2 * (1 + math.cos(math.pi * 2 / 10))
  for name in ("l1", "l2"):
    expect = _reference_rigl_update(np.asarray(params[name]["kernel"]), np.asarray(grads[name]["kernel"]),
                                    np.asarray(before[name]["kernel"]), frac)
    np.testing.assert_array_equal(np.asarray(state2.masks[name]["kernel"]), expect)
    assert expect.sum() == np.asarray(before[name]["kernel"]).sum()
    assert (np.asarray(new_params[name]["kernel"])[~expect] == 0).all()
  params, state3 = step(new_params, state2)  # count 3: no update
  jax.tree.map(np.testing.assert_array_equal, state2.masks, state3.masks)


def test_set_keeps_density_and_regrows_inactive_only():
  params = params_fixture(5)
  tx = pruning.sparse_evolutionary_training(optax.adam(1e-2), sparsity=0.75, update_frequency=1, distribution="erk",
                                            filter=filters.kernels())
  step = make_step(tx)
  state = tx.init(params)
  counts = [int(np.asarray(m).sum()) for m in jax.tree.leaves(state.masks)]
  changed = False
  for _ in range(4):
    old = state.masks
    params, state = step(params, state)
    assert [int(np.asarray(m).sum()) for m in jax.tree.leaves(state.masks)] == counts
    changed |= any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(state.masks)))
  assert changed
  assert step._cache_size() == 1


def test_pruning_state_checkpoint_round_trip(orbax_round_trip):
  params = params_fixture(6)
  tx = pruning.rigl(optax.adam(1e-2), sparsity=0.6, update_frequency=2, end_step=20, filter=filters.kernels())
  step = make_step(tx)
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  got = orbax_round_trip({"p": params, "s": state})
  rp, rs = got["p"], got["s"]
  assert isinstance(rs, pruning.PruningState)
  for _ in range(3):
    params, state = step(params, state)
    rp, rs = step(rp, rs)
  jax.tree.map(np.testing.assert_array_equal, (params, state), (rp, rs))


@pytest.mark.parametrize("factory,kwargs,match", [
    (pruning.gradual_pruning, dict(sparsity=1.0), r"sparsity must be a fraction in \[0, 1\), got 1.0"),
    (pruning.gradual_pruning, dict(score="fisher"), r"unknown score 'fisher'"),
    (pruning.gradual_pruning, dict(distribution="er"), r"unknown distribution 'er'"),
    (pruning.gradual_pruning, dict(scope="block"), r"unknown scope 'block'"),
    (pruning.gradual_pruning, dict(scope="global", distribution="erk"), r"distribution must be 'uniform'"),
    (pruning.gradual_pruning, dict(frequency=0), r"frequency must be an int >= 1"),
    (pruning.gradual_pruning, dict(start_step=5, end_step=5), r"0 <= start_step < end_step"),
    (pruning.gradual_pruning, dict(sparsity=0.2, initial_sparsity=0.5), r"initial_sparsity=0.5 exceeds"),
    (pruning.rigl, dict(), r"give end_step"),
    (pruning.rigl, dict(end_step=10, drop_fraction=1.5), r"drop_fraction must lie in \[0, 1\]"),
    (pruning.rigl, dict(end_step=10, drop_schedule="linear"), r"unknown drop_schedule 'linear'"),
    (pruning.sparse_evolutionary_training, dict(update_frequency=0), r"update_frequency must be an int >= 1"),
])
def test_bad_input(factory, kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    factory(optax.sgd(0.1), **kwargs)
  assert "\n" not in str(info.value)


def test_bfloat16_params_keep_dtype():
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params_fixture(7))
  tx = pruning.gradual_pruning(optax.sgd(0.1), sparsity=0.5, start_step=0, end_step=1, frequency=1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((u, params)))
  k = np.asarray(params["l1"]["kernel"].astype(jnp.float32))
  assert (k == 0).sum() == k.size // 2


# --- the sample clock: gradual pruning budgeted in training examples ----------------------------------


def make_sample_step(tx):
  @jax.jit
  def step(p, s, samples):
    g = jax.grad(lambda q: loss(forward_params(q, s), BATCH))(p)
    u, s = tx.update(g, s, p, samples=samples)
    return optax.apply_updates(p, u), s
  return step


@pytest.mark.parametrize("batch,start,span,freq,score,scope", [
    (3, 1, 7, 3, "magnitude", "layer"),     # end 8 is not a multiple of the frequency after start
    (16, 0, 5, 2, "random", "global"),
    (1000, 2, 6, 4, "saliency", "layer"),
])
def test_sample_clock_prunes_at_the_same_updates_as_the_step_clock(batch, start, span, freq, score, scope):
  common = dict(sparsity=0.8, score=score, scope=scope, filter=filters.kernels(), seed=3)
  by_steps = pruning.gradual_pruning(optax.adam(1e-2), start_step=start, end_step=start + span, frequency=freq,
                                     **common)
  by_samples = pruning.gradual_pruning(optax.adam(1e-2), clock="samples", start_samples=start * batch,
                                       end_samples=(start + span) * batch, frequency_samples=freq * batch, **common)
  p1 = p2 = params_fixture(4)
  s1, s2 = by_steps.init(p1), by_samples.init(p2)
  step1, step2 = make_step(by_steps), make_sample_step(by_samples)
  for k in range(start + span + 2):
    p1, s1 = step1(p1, s1)
    p2, s2 = step2(p2, s2, jnp.int32(k * batch))
    jax.tree.map(np.testing.assert_array_equal, (p1, s1.masks), (p2, s2.masks))
    assert int(s1.clock) == k and int(s2.clock) == k * batch
  assert filters.sparsity_summary(s2.masks)["total"] > 0.75


def test_sample_clock_with_a_growing_batch_in_prox_step():
  from prox import step as step_lib  # pylint: disable=g-import-not-at-top
  micro, sizes = 4, [4, 4, 8, 4, 12, 16, 16, 16, 4, 16]
  start, end, every, target = 6, 60, 16, 0.75    # pruning times 6, 22, 38, 54 and 60 (in samples)
  tx = pruning.gradual_pruning(optax.sgd(0.05), sparsity=target, clock="samples", start_samples=start,
                               end_samples=end, frequency_samples=every, filter=filters.kernels())
  sched = pruning.polynomial_sparsity(target, start_step=start, end_step=end)
  mesh = step_lib.data_mesh(jax.devices()[:1])
  x, y = (np.asarray(a) for a in BATCH)

  def loss_fn(params, model_state, batch, ctx):
    return loss(params, (batch["x"], batch["y"])), ({}, model_state)

  step = step_lib.make_train_step(loss_fn, tx, mesh=mesh, micro_batch_size=micro,
                                  forward_fn=lambda p, s: forward_params(p, s.opt_state), donate=False)
  state = step_lib.replicate(step_lib.init_state(params_fixture(5), tx), mesh)
  previous, masks = -1, state.opt_state.masks
  times = [6, 22, 38, 54, 60]
  for size in sizes:
    rows = np.arange(size) % len(x)
    batch = step_lib.pack_micro_batches({"x": x[rows], "y": y[rows]}, num_devices=1, micro_batch_size=micro,
                                        max_micro_batches=4)
    s = int(state.samples)
    state, _ = step(state, step_lib.shard_batch(batch, mesh), np.int32(size // micro))
    new = state.opt_state
    assert int(new.clock) == s
    if any(previous < p <= s for p in times):      # a pruning time reached since the last update
      for name, size_l in (("l1", 48), ("l2", 24)):
        pruned = int((~np.asarray(new.masks[name]["kernel"])).sum())
        assert pruned == round(float(sched(s)) * size_l), (s, name)
    else:
      jax.tree.map(np.testing.assert_array_equal, masks, new.masks)
    previous, masks = s, new.masks
  assert previous >= end and filters.sparsity_summary(masks)["total"] == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs,match", [
    (dict(clock="epochs"), r"unknown clock 'epochs'; expected one of \('steps', 'samples'\)"),
    (dict(clock="samples", frequency_samples=10), r"clock='samples' needs end_samples"),
    (dict(clock="samples", end_samples=100), r"clock='samples' needs frequency_samples"),
    (dict(clock="samples", end_samples=100, frequency_samples=10, end_step=5),
     r"end_step=5 belongs to the steps clock; clock='samples' counts examples"),
    (dict(end_samples=100), r"end_samples=100 belongs to the samples clock; pass clock='samples'"),
    (dict(clock="samples", start_samples=100, end_samples=100, frequency_samples=1),
     r"need ints 0 <= start_samples < end_samples, got 100, 100"),
    (dict(clock="samples", end_samples=2**31, frequency_samples=1),
     r"end_samples must be an int in \[0, 2\*\*31 - 1\]"),
])
def test_sample_clock_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    pruning.gradual_pruning(optax.sgd(0.1), **kwargs)
  assert "\n" not in str(info.value)


def test_sample_clock_update_without_samples_names_the_argument():
  tx = pruning.gradual_pruning(optax.sgd(0.1), clock="samples", end_samples=100, frequency_samples=10)
  params = params_fixture(6)
  with pytest.raises(ValueError, match=r"gradual_pruning\(clock='samples'\): update needs the examples consumed"):
    tx.update(params, tx.init(params), params)
