"""Structured channel masks, the FLOPs model, hard slicing and budgeted channel pruning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox import transforms as T
from prox.models import functional, make_model, sliced_functional, structure_of

SHAPES = {"mlp": (4, 4, 1), "cnn": (9, 7, 2), "resnet20": (8, 8, 3)}
KWARGS = {"mlp": dict(hidden=(7, 5)), "cnn": dict(width=3, hidden=6), "resnet20": dict(width=4)}


def build(name, seed=0):
  m = make_model(name, input_shape=SHAPES[name], num_classes=3, seed=seed, **KWARGS[name])
  f = functional(m)
  return m, f, structure_of(name, f.params, input_shape=SHAPES[name], model_state=f.model_state)


MODELS = {name: build(name) for name in SHAPES}
MASK_FNS = {name: jax.jit(lambda m, p, s=s: T.apply_channel_masks(s, m, p)) for name, (_, _, s) in MODELS.items()}


def expected_zeros(name, params, group, c):
  """Hand-written: the entries that channel ``c`` of ``group`` owns, as a tree of bool arrays."""
  z = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
  if name == "mlp":
    i = int(group[-1])
    z["hidden"][group]["kernel"][:, c] = True
    z["hidden"][group]["bias"][c] = True
    nxt = z["hidden"][f"dense{i + 1}"]["kernel"] if i + 1 < len(params["hidden"]) else z["head"]["kernel"]
    nxt[c, :] = True
  elif name == "cnn":
    if group == "conv1":
      z["conv1"]["kernel"][..., c] = True
      z["conv1"]["bias"][c] = True
      z["conv2"]["kernel"][:, :, c, :] = True
    elif group == "conv2":
      z["conv2"]["kernel"][..., c] = True
      z["conv2"]["bias"][c] = True
      channels = params["conv2"]["kernel"].shape[-1]
      rows = np.arange(params["dense"]["kernel"].shape[0]) % channels == c  # NHWC flatten
      z["dense"]["kernel"][rows, :] = True
    else:
      z["dense"]["kernel"][:, c] = True
      z["dense"]["bias"][c] = True
      z["head"]["kernel"][c, :] = True
  else:
    if group == "stream":
      if c < params["conv"]["kernel"].shape[-1]:
        z["conv"]["kernel"][..., c] = True
        z["bn"]["scale"][c] = z["bn"]["bias"][c] = True
      for blk, zb in zip(params["blocks"].values(), z["blocks"].values()):
        if c < blk["conv2"]["kernel"].shape[-1]:
          zb["conv2"]["kernel"][..., c] = True
          zb["bn2"]["scale"][c] = zb["bn2"]["bias"][c] = True
        if c < blk["conv1"]["kernel"].shape[2]:
          zb["conv1"]["kernel"][:, :, c, :] = True
      z["head"]["kernel"][c, :] = True
    else:
      zb = z["blocks"][group.split("/")[0]]
      zb["conv1"]["kernel"][..., c] = True
      zb["bn1"]["scale"][c] = zb["bn1"]["bias"][c] = True
      zb["conv2"]["kernel"][:, :, c, :] = True
  return z


@settings(max_examples=40)
@given(data=st.data())
def test_a_channel_mask_removes_exactly_the_channels_entries(data):
  name = data.draw(st.sampled_from(sorted(SHAPES)))
  _, f, s = MODELS[name]
  g = data.draw(st.sampled_from(s.names))
  c = data.draw(st.integers(0, s.group(g).size - 1))
  masks = T.full_channel_masks(s)
  masks[g] = masks[g].at[c].set(False)
  ones = jax.tree.map(jnp.ones_like, f.params)
  masked = MASK_FNS[name](masks, ones)
  expected = expected_zeros(name, f.params, g, c)
  for path, got in jax.tree_util.tree_flatten_with_path(masked)[0]:
    want = expected
    for k in path:
      want = want[k.key]
    np.testing.assert_array_equal(np.asarray(got) == 0, want, err_msg=f"{name} {g}[{c}] at {path}")


def masked_and_sliced(name, mask_seed, train, x64=True):
  m, f, s = MODELS[name]
  cast = (lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)) if x64 else (lambda t: t)
  rng = np.random.default_rng(mask_seed)
  params = cast(jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), f.params))
  state = cast(jax.tree.map(lambda a: a + rng.uniform(0.1, 1.0, size=a.shape), f.model_state))
  masks = {g.name: jnp.asarray(rng.random(g.size) < 0.5).at[rng.integers(g.size)].set(True) for g in s.groups}
  x = jnp.asarray(rng.normal(size=(4, *SHAPES[name])), params["head"]["kernel"].dtype)
  masked = jax.jit(lambda m, p: T.apply_channel_masks(s, m, p))(masks, params)
  out_m, state_m = jax.jit(f.apply, static_argnames="train")(masked, state, x, train=train)
  sp, ss = T.slice_params(s, masks, params, state)
  sf = sliced_functional(m, sp, ss)
  out_s, state_s = jax.jit(sf.apply, static_argnames="train")(sp, ss, x, train=train)
  return s, masks, params, state, (out_m, state_m), (out_s, state_s), sp


@settings(max_examples=6)
@given(name=st.sampled_from(["mlp", "cnn"]), seed=st.integers(0, 2**31 - 1), train=st.booleans())
def test_sliced_network_equals_masked_network_property(name, seed, train):
  with jax.enable_x64(True):
    _, _, _, _, (out_m, _), (out_s, _), _ = masked_and_sliced(name, seed, train)
  np.testing.assert_allclose(out_s, out_m, rtol=1e-6, atol=1e-6)


def test_sliced_resnet20_equals_masked_in_eval_and_train_mode():
  """The residual stream is one group across stages: the sliced option-A ResNet computes the masked one."""
  m, f, s = MODELS["resnet20"]
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    params = cast(jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), f.params))
    state = cast(jax.tree.map(lambda a: a + rng.uniform(0.1, 1.0, size=a.shape), f.model_state))
    masks = {g.name: jnp.asarray(rng.random(g.size) < 0.5).at[rng.integers(g.size)].set(True) for g in s.groups}
    x = jnp.asarray(rng.normal(size=(4, *SHAPES["resnet20"])), jnp.float64)
    both = lambda apply: jax.jit(lambda p, st: (apply(p, st, x, train=False)[0], apply(p, st, x, train=True)))
    masked = jax.jit(lambda m, p: T.apply_channel_masks(s, m, p))(masks, params)
    eval_m, (train_m, state_m) = both(f.apply)(masked, state)
    sp, ss = T.slice_params(s, masks, params, state)
    eval_s, (train_s, state_s) = both(sliced_functional(m, sp, ss).apply)(sp, ss)
    np.testing.assert_allclose(eval_s, eval_m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(train_s, train_m, rtol=1e-6, atol=1e-6)
    # The updated running statistics of the kept channels agree too.
    _, kept_m = T.slice_params(s, masks, {}, state_m)
    for a, b in zip(jax.tree.leaves(kept_m), jax.tree.leaves(state_s)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_sliced_equals_masked_catches_a_wrong_flatten_order():
  # Guard: with the flatten consumer declared channel-major (inner = H*W) instead of NHWC, outputs differ.
  import dataclasses
  m, f, s = MODELS["cnn"]
  bad_groups = []
  for g in s.groups:
    if g.name == "conv2":
      hw = f.params["dense"]["kernel"].shape[0] // g.size
      g = dataclasses.replace(g, consumers=(T.ChannelAxis(("dense", "kernel"), 0, g.size, hw),))
    bad_groups.append(g)
  bad = T.Structure(tuple(bad_groups), s.ops)
  masks = T.full_channel_masks(s)
  masks["conv2"] = masks["conv2"].at[0].set(False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *SHAPES["cnn"])), jnp.float32)
  sp, ss = T.slice_params(bad, masks, f.params, f.model_state)
  out_s, _ = sliced_functional(m, sp, ss).apply(sp, ss, x, train=False)
  out_m, _ = f.apply(T.apply_channel_masks(s, masks, f.params), f.model_state, x, train=False)
  assert not np.allclose(out_s, out_m, atol=1e-4)


def test_flops_and_params_of_a_two_layer_mlp_by_hand():
  name = "mlp"
  m = make_model(name, input_shape=(4, 4, 1), num_classes=3, hidden=(5,))
  f = functional(m)
  s = structure_of(name, f.params, input_shape=(4, 4, 1))
  assert T.full_flops(s) == 16 * 5 + 5 * 3
  masks = {"dense0": jnp.asarray([True, False, True, False, False])}
  assert float(T.masked_flops(s, masks)) == 16 * 2 + 2 * 3
  assert float(T.masked_param_count(s, masks, f.params)) == (16 * 2 + 2) + (2 * 3 + 3)
  sp, _ = T.slice_params(s, masks, f.params)
  assert sum(np.size(a) for a in jax.tree.leaves(sp)) == (16 * 2 + 2) + (2 * 3 + 3)


def test_flops_of_the_conv_net_by_hand():
  # CNN on 9x7x2, width 3: conv1 3x3 2->3 at 9*7, pool -> 5x4, conv2 3x3 3->6 at 5*4, pool -> 3x2,
  # dense (3*2*6)->6, head 6->3.
  _, f, s = MODELS["cnn"]
  full = 63 * 9 * 2 * 3 + 20 * 9 * 3 * 6 + 6 * 6 * 6 + 6 * 3
  assert T.full_flops(s) == full
  masks = T.full_channel_masks(s)
  masks["conv1"] = jnp.asarray([True, False, True])
  masks["conv2"] = jnp.asarray([True, True, False, False, True, False])
  masks["dense"] = masks["dense"].at[0].set(False)
  want = 63 * 9 * 2 * 2 + 20 * 9 * 2 * 3 + 6 * 3 * 5 + 5 * 3
  assert float(T.masked_flops(s, masks)) == want
  sp, _ = T.slice_params(s, masks, f.params)
  assert float(T.masked_param_count(s, masks, f.params)) == sum(np.size(a) for a in jax.tree.leaves(sp))


def test_resnet20_flops_match_the_usual_count():
  # CIFAR ResNet-20 (width 16, 32x32x3), by hand: stem 1024*9*3*16 + stage 1: 6 * 1024*9*16*16
  # + stage 2: 256*9*16*32 + 5 * 256*9*32*32 + stage 3: 64*9*32*64 + 5 * 64*9*64*64 + head 64*10.
  p = jax.eval_shape(lambda: functional(make_model("resnet20", input_shape=(32, 32, 3), num_classes=10)).params)
  s = structure_of("resnet20", p, input_shape=(32, 32, 3))
  want = (1024 * 9 * 3 * 16 + 6 * 1024 * 9 * 16 * 16 + 256 * 9 * 16 * 32 + 5 * 256 * 9 * 32 * 32
          + 64 * 9 * 32 * 64 + 5 * 64 * 9 * 64 * 64 + 64 * 10)
  assert T.full_flops(s) == want == 40_551_040
  count = float(T.masked_param_count(s, T.full_channel_masks(s), p))
  assert count == sum(np.prod(a.shape) for a in jax.tree.leaves(p)) == 269_722


def test_soft_masks_make_flops_differentiable():
  _, f, s = MODELS["cnn"]
  masks = {k: jnp.full(v.shape, 0.5) for k, v in T.full_channel_masks(s).items()}
  g = jax.grad(lambda m: T.masked_flops(s, m))(masks)
  # d/dm_c of sum_ops P*W*n_in*n_out: conv1 channel -> 63*9*2 + 20*9*n_conv2.
  np.testing.assert_allclose(g["conv1"], 63 * 9 * 2 + 20 * 9 * 3.0, rtol=1e-6)


def test_channel_importance_is_the_l1_norm_of_producers():
  _, f, s = MODELS["cnn"]
  imp = T.channel_importance(s, f.params)
  want = np.abs(f.params["conv1"]["kernel"]).sum(axis=(0, 1, 2)) + np.abs(f.params["conv1"]["bias"])
  np.testing.assert_allclose(imp["conv1"], want, rtol=1e-6)


def test_check_structure_names_the_bad_axis():
  _, f, s = MODELS["mlp"]
  bad = T.Structure((T.ChannelGroup("x", 7, (T.ChannelAxis(("hidden", "dense0", "kernel"), 1, 6),)),))
  with pytest.raises(ValueError, match="dense0/kernel"):
    T.check_structure(bad, f.params)
  with pytest.raises(ValueError, match="nope"):
    T.check_structure(T.Structure((T.ChannelGroup("x", 2, (T.ChannelAxis(("nope",), 0, 2),)),)), f.params)
  with pytest.raises(ValueError, match="unknown model"):
    structure_of("vgg", f.params, input_shape=(4, 4, 1))
  with pytest.raises(ValueError, match="keeps no channel"):
    T.slice_params(s, {g.name: jnp.zeros(g.size, bool) for g in s.groups}, f.params)


def test_flops_budget_schedule():
  sched = T.flops_budget_schedule(0.4, start_step=10, end_step=20, power=3.0)
  assert float(sched(0)) == 1.0 and float(sched(10)) == 1.0
  np.testing.assert_allclose(float(sched(15)), 1 - 0.6 * (1 - 0.5 ** 3), rtol=1e-6)
  np.testing.assert_allclose(float(sched(25)), 0.4, rtol=1e-6)
  with pytest.raises(ValueError, match="target"):
    T.flops_budget_schedule(0.0, start_step=0, end_step=1)


def brute_force_masks(s, scores, masks, budget, min_channels):
  """The fewest lowest-scored removals that fit the budget, by trying every count (numpy)."""
  flat, names = [], []
  for g in s.groups:
    sc = np.asarray(scores[g.name], np.float64)
    m = np.asarray(masks[g.name])
    sc = np.where(m, sc / (sc[m].mean() if m.any() else 1.0), -np.inf)
    top = np.argsort(-sc, kind="stable")[:min_channels]
    sc[top] = np.inf
    flat += list(sc)
    names += [g.name] * g.size
  order = np.argsort(np.asarray(flat), kind="stable")
  flops = jax.jit(lambda m: T.masked_flops(s, m))
  for k in range(int(sum((~np.asarray(masks[n])).sum() for n in s.names)), len(flat) + 1):
    keep = np.ones(len(flat), bool)
    keep[order[:k]] = False
    out, o = {}, 0
    for g in s.groups:
      out[g.name] = jnp.asarray(keep[o:o + g.size])
      o += g.size
    if float(flops(out)) <= budget or k == len(flat) - min_channels * len(s.groups):
      return out
  raise AssertionError


@settings(max_examples=6)
@given(seed=st.integers(0, 1000), frac=st.floats(0.05, 1.0))
def test_prune_to_budget_is_the_fewest_removals(seed, frac):
  from prox.transforms._structured import _prune_to_budget
  _, f, s = MODELS["cnn"]
  rng = np.random.default_rng(seed)
  scores = {g.name: jnp.asarray(rng.random(g.size) + 0.01, jnp.float32) for g in s.groups}
  masks = {g.name: jnp.asarray(rng.random(g.size) < 0.9).at[0].set(True) for g in s.groups}
  budget = frac * float(T.masked_flops(s, masks))
  got = jax.jit(lambda sc, m, b: _prune_to_budget(s, sc, m, b, 1))(scores, masks, budget)
  want = brute_force_masks(s, scores, masks, budget, 1)
  for n in s.names:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    assert not np.any(np.asarray(got[n]) & ~np.asarray(masks[n]))  # masks only shrink


def cnn_loss(apply, state):
  def loss(p, batch):
    x, y = batch
    logits, _ = apply(p, state, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def test_channel_pruning_reaches_the_budget_and_keeps_pruned_weights_at_zero():
  m, f, s = MODELS["cnn"]
  tx = T.channel_pruning(optax.adam(1e-2), structure=s, flops_target=0.3, start_step=0, end_step=8, frequency=2)
  loss = cnn_loss(f.apply, f.model_state)
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.normal(size=(8, *SHAPES["cnn"])), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)))

  @jax.jit
  def step(p, opt):
    g = jax.grad(loss)(p, batch)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt

  p, opt = f.params, tx.init(f.params)
  previous = T.full_channel_masks(s)
  budgets = T.flops_budget_schedule(0.3, start_step=0, end_step=8)
  for t in range(12):
    p, opt = step(p, opt)
    for n in s.names:  # monotone
      assert not np.any(np.asarray(opt.channel_masks[n]) & ~np.asarray(previous[n]))
    previous = opt.channel_masks
    last_update = min(t - t % 2, 8)  # masks change at counts 0, 2, ..., 8
    assert float(T.masked_flops(s, opt.channel_masks)) <= float(budgets(last_update)) * T.full_flops(s) + 1e-3
    # Every masked entry is exactly zero.
    zeroed = jax.tree.map(lambda w, mk: mk is None or bool(np.all(np.asarray(w)[~np.asarray(mk)] == 0)), p,
                          T.expand_channel_masks(s, opt.channel_masks, p))
    assert all(jax.tree.leaves(zeroed))
  assert float(T.masked_flops(s, opt.channel_masks)) <= 0.3 * T.full_flops(s)
  # The exported small network computes the same logits.
  sp, ss = T.slice_params(s, opt.channel_masks, p, f.model_state)
  x = batch[0]
  np.testing.assert_allclose(sliced_functional(m, sp, ss).apply(sp, ss, x, train=False)[0],
                             f.apply(p, f.model_state, x, train=False)[0], rtol=1e-5, atol=1e-5)
  assert sum(np.size(a) for a in jax.tree.leaves(sp)) < sum(np.size(a) for a in jax.tree.leaves(f.params))


def test_channel_pruning_state_works_with_hard_masked_params_and_rejects_bad_options():
  _, f, s = MODELS["mlp"]
  tx = T.channel_pruning(optax.sgd(0.1), structure=s, flops_target=0.5, end_step=2, frequency=1)
  opt = tx.init(f.params)
  hm = T.hard_masked_params(f.params, opt)
  assert jax.tree.structure(hm) == jax.tree.structure(f.params)
  with pytest.raises(ValueError, match="frequency"):
    T.channel_pruning(optax.sgd(0.1), structure=s, flops_target=0.5, frequency=0)
  with pytest.raises(ValueError, match="target"):
    T.channel_pruning(optax.sgd(0.1), structure=s, flops_target=1.5)


def test_channel_pruning_state_round_trips_and_resume_is_identical(orbax_round_trip):
  _, f, s = MODELS["mlp"]
  tx = T.channel_pruning(optax.adam(1e-2), structure=s, flops_target=0.4, end_step=6, frequency=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, *SHAPES["mlp"])), jnp.float32)
  y = jnp.asarray(np.arange(8) % 3)
  loss = cnn_loss(f.apply, f.model_state)

  @jax.jit
  def step(p, opt):
    u, opt = tx.update(jax.grad(loss)(p, (x, y)), opt, p)
    return optax.apply_updates(p, u), opt

  p, opt = f.params, tx.init(f.params)
  for _ in range(3):
    p, opt = step(p, opt)
  got = orbax_round_trip({"p": p, "s": opt})
  rp, rs = got["p"], got["s"]
  assert isinstance(rs, T.ChannelPruningState)
  for _ in range(4):
    p, opt = step(p, opt)
    rp, rs = step(rp, rs)
  jax.tree.map(np.testing.assert_array_equal, (p, opt), (rp, rs))
