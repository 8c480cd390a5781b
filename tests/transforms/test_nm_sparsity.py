"""nm_sparsity: SR-STE / MdGf / SdGf schedules, straight-through gradients, optax compatibility, checkpoints."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prox.transforms import filters, forward_params, hard_masked_params, nm

# ---------------------------------------------------------------------------------------------------
# Hand-written references
# ---------------------------------------------------------------------------------------------------


def ref_mask(w, n, m):
  """N:M along axis 0 by explicit loops; ties to the lower index."""
  w = np.abs(np.asarray(w, np.float64))
  out = np.zeros(w.shape, bool)
  for col in range(w.shape[1]):
    for g0 in range(0, w.shape[0], m):
      order = sorted(range(m), key=lambda i: (-w[g0 + i, col], i))
      for i in order[:n]:
        out[g0 + i, col] = True
  return out


def ref_beta(count, decay, c, warmup, sparse, floor=None):
  if count < warmup:
    return 1.0
  if sparse is not None and count >= warmup + sparse:
    return 0.0
  t = count - warmup
  if decay == "linear":
    return max(0.0, 1.0 - c * t)
  if decay == "exp":
    b = math.exp(-c * t)
    return 0.0 if floor is not None and b < floor else b
  return 0.0


def data(seed=0, d_in=8, d_out=3, batch=16):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(d_in, d_out)), rng.normal(size=(batch, d_in)), rng.normal(size=(batch, d_out)))


def lsq(w, x, t):
  return jnp.mean(jnp.sum((x @ w - t) ** 2, axis=-1))


def ref_grad(w_fwd, x, t):
  return 2.0 * x.T @ (x @ w_fwd - t) / len(x)


def run(tx, params, x, t, steps, jit=True):
  """Trains ``{"w": ...}`` on the least-squares loss through forward_params; returns params, state."""
  state = tx.init(params)

  def step(p, s):
    g = jax.grad(lambda p: lsq(forward_params(p, s)["w"], x, t))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, step


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(decay=st.sampled_from(["linear", "exp", "step"]), coef=st.floats(1e-4, 0.5),
       warmup=st.integers(0, 5), total=st.integers(11, 60), finetune=st.integers(0, 5),
       count=st.integers(0, 80), use_total=st.booleans())
@example(decay="linear", coef=0.5, warmup=5, total=11, finetune=5, count=5, use_total=True)  # 1 sparse step
def test_beta_follows_formula_raw_coef(decay, coef, warmup, total, finetune, count, use_total):
  total_steps = total if use_total else None
  finetune = finetune if use_total else 0
  sched = nm.nm_schedule(2, 4, method="mdgf", decay=decay, decay_coef=None if decay == "step" else coef,
                         total_steps=total_steps, warmup_steps=warmup, finetune_steps=finetune)
  sparse = total - warmup - finetune if use_total else None
  expect = ref_beta(count, decay, coef, warmup, sparse)
  np.testing.assert_allclose(float(sched.beta(count)), expect, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(decay=st.sampled_from(["linear", "exp"]), end=st.floats(0.1, 1.0), total=st.integers(20, 400),
       warmup=st.integers(0, 10), floor=st.sampled_from([None, 1e-2, 1e-3]))
def test_decay_end_puts_beta_at_zero_or_floor(decay, end, total, warmup, floor):
  floor = floor if decay == "exp" else None
  sched = nm.nm_schedule(1, 4, method="mdgf", decay=decay, decay_end=end, floor=floor, total_steps=total,
                         warmup_steps=warmup)
  sparse = total - warmup
  t_end = end * sparse
  if decay == "linear":
    assert sched.coef == pytest.approx(1.0 / t_end)
  else:
    assert sched.coef == pytest.approx(-math.log(floor or 1e-3) / t_end)
  counts = np.arange(512)  # one fixed shape: the schedule runs eagerly without recompiling per example
  betas = np.asarray(sched.beta(jnp.asarray(counts)))[:total + 5]
  t = counts[:total + 5] - warmup
  assert (betas[t < 0] == 1.0).all()
  assert (betas[t >= math.ceil(t_end) + 1] == 0.0).all()  # binary masks at the end of the schedule
  early = (t >= 0) & (t < math.floor(t_end) - 1)
  assert (betas[early] > 0).all()
  np.testing.assert_allclose(betas[early], [ref_beta(c, decay, sched.coef, warmup, sparse, sched.floor)
                                            for c in np.arange(total + 5)[early]], rtol=2e-5, atol=1e-6)


def test_reference_default_coef_leaves_beta_high():
  # The observation: c = 2e-4 leaves beta = 0.75 after 1,250 steps (linear).
  sched = nm.nm_schedule(1, 8, method="mdgf", decay="linear", decay_coef=2e-4)
  np.testing.assert_allclose(float(sched.beta(1250)), 0.75, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([1, 2, 3]), m=st.sampled_from([4, 8, 16]), total=st.integers(8, 200),
       warmup=st.integers(0, 7), finetune=st.integers(0, 7), kind=st.sampled_from(["stepwise", "geometric"]))
@example(n=1, m=4, total=8, warmup=6, finetune=0, kind="stepwise")  # 2 sparse steps, 3 stages (found by CI)
@example(n=1, m=4, total=9, warmup=6, finetune=0, kind="stepwise")  # exactly one step per stage
def test_sdgf_stages_spread_evenly_over_sparse_phase(n, m, total, warmup, finetune, kind):
  if n >= m or total - warmup - finetune <= 0:
    return
  stages = nm.structure_stages(n, m, kind)
  if total - warmup - finetune < len(stages):  # too short to visit every stage: refused, not truncated
    with pytest.raises(ValueError, match=r"sparse phase of \d+ steps .* shorter than the \d+ structure stages"):
      nm.nm_schedule(n, m, method="sdgf", structure=kind, total_steps=total, warmup_steps=warmup,
                     finetune_steps=finetune)
    return
  sched = nm.nm_schedule(n, m, method="sdgf", structure=kind, total_steps=total, warmup_steps=warmup,
                         finetune_steps=finetune)
  assert sched.stages == stages
  sparse = total - warmup - finetune
  got = np.asarray(sched.stage(jnp.arange(256)))[:total]
  for c in range(total):
    t = c - warmup
    expect = -1 if t < 0 else min(t * len(stages) // sparse, len(stages) - 1)
    assert got[c] == expect
  assert got[-1] == len(stages) - 1  # the final n:m is reached before the end
  assert float(sched.beta(total - 1)) == (0.0 if total - 1 >= warmup else 1.0)


# ---------------------------------------------------------------------------------------------------
# Gradients and trajectories against references (float64)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_straight_through_gradient_float64(beta):
  with jax.enable_x64(True):
    w, x, t = data()
    mask = ref_mask(w, 1, 4)
    state = nm.NMSparsityState(jnp.int32(0), jnp.float64(beta), {"w": jnp.asarray(mask)}, ())
    w_fwd = w * (mask + (1 - mask) * beta)
    fwd = forward_params({"w": jnp.asarray(w)}, state)["w"]
    np.testing.assert_allclose(np.asarray(fwd), w_fwd, rtol=0, atol=0)
    g = jax.grad(lambda p: lsq(forward_params(p, state)["w"], x, t))({"w": jnp.asarray(w)})["w"]
    # Straight through: the dense weights get dL/dw_fwd, not multiplied by the mask.
    np.testing.assert_allclose(np.asarray(g), ref_grad(w_fwd, x, t), rtol=1e-12, atol=1e-12)
    # Forward mode agrees (custom_jvp).
    v = np.ones_like(w)
    _, jvp = jax.jvp(lambda p: lsq(forward_params({"w": p}, state)["w"], x, t), (jnp.asarray(w),), (jnp.asarray(v),))
    np.testing.assert_allclose(float(jvp), float(np.sum(ref_grad(w_fwd, x, t) * v)), rtol=1e-12)


@pytest.mark.parametrize("method,decay", [("mdgf", "linear"), ("mdgf", "exp"), ("srste", None), ("sdgf", None)])
def test_trajectory_matches_reference_float64(method, decay):
  with jax.enable_x64(True):
    w0, x, t = data(1, d_in=8)
    n, m, lr, steps, total, lam = 1, 4, 0.05, 7, 8, 0.1
    kwargs = dict(method=method, total_steps=total)
    if method == "mdgf":
      kwargs.update(decay=decay, decay_coef=0.2)
    if method == "srste":
      kwargs = dict(method=method, srste_lambda=lam)
    tx = nm.nm_sparsity(optax.sgd(lr), n, m, **kwargs)
    params, state, _ = run(tx, {"w": jnp.asarray(w0)}, x, t, steps)

    stages = nm.structure_stages(n, m) if method == "sdgf" else ((n, m),)
    w = w0.copy()
    for k in range(steps):
      ni, mi = stages[min(k * len(stages) // total, len(stages) - 1)]
      mk = ref_mask(w, ni, mi)
      # beta is kept in float32 in the state: round the reference the same way.
      b = float(np.float32(ref_beta(k, decay, 0.2, 0, total))) if method == "mdgf" else 0.0
      g = ref_grad(w * (mk + (1 - mk) * b), x, t)
      if method == "srste":
        g = g + lam * (1 - mk) * w
      w = w - lr * g
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-7 if method == "mdgf" else 1e-10,
                               atol=1e-9 if method == "mdgf" else 1e-12)
    ni, mi = stages[min(steps * len(stages) // total, len(stages) - 1)]
    np.testing.assert_array_equal(np.asarray(state.masks["w"]), ref_mask(w, ni, mi))
    assert int(state.count) == steps
    b = ref_beta(steps, decay, 0.2, 0, total) if method == "mdgf" else 0.0
    np.testing.assert_allclose(float(state.beta), b, rtol=1e-6)


def test_srste_update_is_grad_plus_lambda_pruned_weights():
  w, x, t = data(2)
  mask = ref_mask(w, 2, 4)
  tx = nm.nm_sparsity(optax.identity(), 2, 4, method="srste", srste_lambda=0.3)
  params = {"w": jnp.asarray(w, jnp.float32)}
  state = tx.init(params)
  np.testing.assert_array_equal(np.asarray(state.masks["w"]), mask)
  g = jax.grad(lambda p: lsq(forward_params(p, state)["w"], x, t))(params)
  u, _ = tx.update(g, state, params)
  expect = ref_grad(w * mask, x, t) + 0.3 * (1 - mask) * w
  np.testing.assert_allclose(np.asarray(u["w"]), expect, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method,kwargs", [
    ("mdgf", dict(decay="linear", decay_end=0.5)),
    ("mdgf", dict(decay="exp", decay_end=0.8, floor=1e-2)),
    ("sdgf", dict(structure="geometric")),
    ("mdgf", dict(decay="linear", warmup_steps=3, finetune_steps=4)),
])
def test_masks_binary_and_final_nm_at_end_of_schedule(method, kwargs):
  w0, x, t = data(3, d_in=16)
  tx = nm.nm_sparsity(optax.adam(0.05), 1, 4, method=method, total_steps=20, **kwargs)
  params, state, _ = run(tx, {"w": jnp.asarray(w0, jnp.float32)}, x, t, 20)
  assert float(state.beta) == 0.0
  np.testing.assert_array_equal(np.asarray(state.masks["w"]), ref_mask(params["w"], 1, 4))
  fwd = np.asarray(forward_params(params, state)["w"])
  np.testing.assert_array_equal(fwd, np.asarray(hard_masked_params(params, state)["w"]))
  groups = (fwd != 0).reshape(4, 4, 3).sum(1)
  assert (groups <= 1).all()
  np.testing.assert_allclose(filters.sparsity_summary(state.masks)["total"], 0.75)


def test_warmup_is_dense_and_fixed_mask_finetune_freezes():
  w0, x, t = data(4, d_in=8)
  tx = nm.nm_sparsity(optax.sgd(0.05), 1, 4, method="mdgf", decay="step", total_steps=12, warmup_steps=3,
                      finetune_steps=4, finetune_fixed_mask=True)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda g: (lambda us: (optax.apply_updates(p, us[0]), us[1]))(tx.update(g, s, p)))(
      jax.grad(lambda q: lsq(forward_params(q, s)["w"], x, t))(p)))
  history = []
  for k in range(12):
    history.append((params, state))
    params, state = step(params, state)
  for k in range(3):
    assert bool(history[k][1].masks["w"].all()) and float(history[k][1].beta) == 1.0
  assert float(history[3][1].beta) == 0.0 and not bool(history[3][1].masks["w"].all())
  frozen = np.asarray(history[8][1].masks["w"])  # the fine-tune phase starts at count 3 + 5 = 8
  np.testing.assert_array_equal(frozen, ref_mask(history[8][0]["w"], 1, 4))
  for k in range(9, 12):
    np.testing.assert_array_equal(np.asarray(history[k][1].masks["w"]), frozen)
  pruned = ~frozen
  np.testing.assert_array_equal(np.asarray(params["w"])[pruned], np.asarray(history[8][0]["w"])[pruned])
  assert not np.allclose(np.asarray(params["w"])[frozen], np.asarray(history[8][0]["w"])[frozen])


# ---------------------------------------------------------------------------------------------------
# Composition, jit, dtypes, checkpoints
# ---------------------------------------------------------------------------------------------------


def test_jit_no_recompile_chain_and_filter():
  w0, x, t = data(5, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.zeros(3)}
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  tx = optax.chain(optax.identity(), nm.nm_sparsity(inner, 2, 4, method="mdgf", total_steps=10,
                                                    filter=filters.by_regex("^w$")))
  state = tx.init(params)
  assert state[1].masks["b"] is None
  step = jax.jit(lambda p, s: (lambda g: (lambda us: (optax.apply_updates(p, us[0]), us[1]))(tx.update(g, s, p)))(
      jax.grad(lambda q: lsq(forward_params(q, s)["w"], x, t) + jnp.sum(forward_params(q, s)["b"]))(p)))
  params, state = step(params, state)
  params, state = step(params, state)
  assert step._cache_size() == 1
  assert int(state[1].count) == 2


def test_inject_hyperparams_and_apply_if_finite():
  w0, x, t = data(6, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  tx = optax.inject_hyperparams(nm.nm_sparsity, static_args=nm.STATIC_ARGS)(
      optax.sgd(0.1), 2, 4, method="mdgf", decay="linear", decay_coef=0.1)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda q: lsq(forward_params(q, s)["w"], x, t))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  params, state = step(params, state)
  np.testing.assert_allclose(float(state.inner_state.beta), 0.9, rtol=1e-6)
  state.hyperparams["decay_coef"] = jnp.asarray(0.25, jnp.float32)
  params, state = step(params, state)
  np.testing.assert_allclose(float(state.inner_state.beta), 0.5, rtol=1e-6)
  assert step._cache_size() == 1

  srste = optax.inject_hyperparams(nm.nm_sparsity, static_args=nm.STATIC_ARGS)(
      optax.identity(), 2, 4, method="srste", srste_lambda=0.0)
  s = srste.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  u0, _ = srste.update(zero, s, params)
  s.hyperparams["srste_lambda"] = jnp.asarray(2.0, jnp.float32)
  u1, _ = srste.update(zero, s, params)
  mask = np.asarray(s.inner_state.masks["w"])
  np.testing.assert_allclose(np.asarray(u0["w"]), 0.0)
  np.testing.assert_allclose(np.asarray(u1["w"]), 2.0 * (~mask) * np.asarray(params["w"]), rtol=1e-6)

  guarded = optax.apply_if_finite(nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste"), 3)
  gs = guarded.init(params)
  bad = {"w": jnp.full_like(params["w"], jnp.nan)}
  u, gs2 = guarded.update(bad, gs, params)
  np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
  np.testing.assert_array_equal(np.asarray(gs2.inner_state.masks["w"]), np.asarray(gs.inner_state.masks["w"]))


def test_bfloat16_params_keep_dtype():
  w0, x, t = data(7, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.bfloat16)}
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="mdgf", total_steps=10)
  state = tx.init(params)
  fwd = forward_params(params, state)
  assert fwd["w"].dtype == jnp.bfloat16
  g = jax.grad(lambda p: lsq(forward_params(p, state)["w"].astype(jnp.float32), x, t))(params)
  assert g["w"].dtype == jnp.bfloat16
  u, state = tx.update(g, state, params)
  assert u["w"].dtype == jnp.bfloat16 and state.masks["w"].dtype == jnp.bool_
  assert state.beta.dtype == jnp.float32


def test_state_round_trips_and_resume_is_identical(orbax_round_trip):
  w0, x, t = data(8, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.zeros(3)}
  tx = nm.nm_sparsity(optax.adam(1e-2), 1, 4, method="sdgf", total_steps=12)
  p3, s3, step = run(tx, params, x, t, 3)
  leaves, treedef = jax.tree.flatten(s3)
  assert all(isinstance(l, jax.Array) for l in leaves)
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again, nm.NMSparsityState) and again.masks["b"] is None

  restored = orbax_round_trip({"params": p3, "opt_state": s3})
  rp, rs = restored["params"], restored["opt_state"]
  assert isinstance(rs, nm.NMSparsityState)
  np.testing.assert_array_equal(np.asarray(rs.masks["w"]), np.asarray(s3.masks["w"]))
  for _ in range(5):
    p3, s3 = step(p3, s3)
    rp, rs = step(rp, rs)
  jax.tree.map(np.testing.assert_array_equal, (p3, s3), (rp, rs))


def test_dense_method_is_identity_on_forward():
  w0, x, t = data(9, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="dense")
  p_sparse, state, _ = run(tx, params, x, t, 3)
  ref = params
  sgd = optax.sgd(0.1)
  s = sgd.init(ref)
  for _ in range(3):
    g = jax.grad(lambda p: lsq(p["w"], x, t))(ref)
    u, s = sgd.update(g, s)
    ref = optax.apply_updates(ref, u)
  np.testing.assert_allclose(np.asarray(p_sparse["w"]), np.asarray(ref["w"]), rtol=1e-6)
  assert bool(state.masks["w"].all()) and float(state.beta) == 1.0


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=4, m=4), r"need 1 <= N < M, got N=4, M=4"),
    (dict(n=5, m=4), r"N=5, M=4"),
    (dict(decay="cosine", total_steps=10), r"unknown decay type 'cosine'"),
    (dict(method="magic"), r"unknown method 'magic'"),
    (dict(method="srste", decay="linear"), r"method='srste' has no decay"),
    (dict(method="mdgf"), r"needs decay_coef"),
    (dict(method="mdgf", decay_end=0.5), r"needs total_steps"),
    (dict(method="mdgf", decay_end=1.5, total_steps=10), r"decay_end must be a fraction"),
    (dict(method="mdgf", decay_coef=1e-3, decay_end=0.5, total_steps=10), r"not both"),
    (dict(method="mdgf", decay_coef=-1.0), r"decay_coef must be >= 0"),
    (dict(method="mdgf", structure="stepwise", total_steps=10), r"structure applies to method='sdgf' only"),
    (dict(method="sdgf"), r"needs total_steps"),
    (dict(method="srste", finetune_steps=3), r"finetune_steps needs total_steps"),
    (dict(method="srste", total_steps=5, warmup_steps=5), r"leaves no sparse phase"),
    (dict(method="mdgf", decay="linear", floor=1e-3, total_steps=10), r"floor applies to decay='exp' only"),
    (dict(method="srste", srste_lambda=-1.0), r"srste_lambda must be >= 0"),
])
def test_bad_input_is_one_line_value_error(kwargs, match):
  kw = dict(n=2, m=4)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match) as info:
    nm.nm_sparsity(optax.sgd(0.1), **kw)
  assert "\n" not in str(info.value)


def test_axis_not_divisible_names_leaf_at_init():
  tx = nm.nm_sparsity(optax.sgd(0.1), 1, 4, method="srste", filter=filters.dense_kernels())
  params = {"enc": {"kernel": jnp.ones((6, 8)), "bias": jnp.ones(6)}}
  with pytest.raises(ValueError, match=r"leaf 'enc/kernel' with shape \(6, 8\) has 6 entries along axis 0, "
                                       r"not divisible by M=4"):
    tx.init(params)
  geo = nm.nm_sparsity(optax.sgd(0.1), 1, 4, method="sdgf", structure="geometric", total_steps=10)
  with pytest.raises(ValueError, match=r"not divisible by M=16"):  # 1:4 geometric: 4:16, 2:8, 1:4
    geo.init({"w": jnp.ones((12, 2))})
  with pytest.raises(TypeError, match="static_args=prox.transforms.nm.STATIC_ARGS"):
    nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste", warmup_steps=jnp.asarray(3))
  with pytest.raises(ValueError, match="update needs params"):
    tx.update({"enc": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(6)}},
              tx.init({"enc": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(6)}}))


def test_inside_optax_partition_only_labelled_leaves_are_sparse():
  w0, x, t = data(10, d_in=8)
  params = {"w": jnp.asarray(w0, jnp.float32), "v": jnp.asarray(w0[:, :2], jnp.float32)}
  tx = optax.partition({"sparse": nm.nm_sparsity(optax.sgd(0.1), 1, 4, method="srste"), "dense": optax.sgd(0.1)},
                       {"w": "sparse", "v": "dense"})
  state = tx.init(params)

  def loss(p):
    return lsq(p["w"], x, t) + jnp.sum(p["v"] ** 2)

  for _ in range(3):
    g = jax.grad(lambda p: loss(forward_params(p, state)))(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  fwd = forward_params(params, state)
  np.testing.assert_array_equal(np.asarray(fwd["v"]), np.asarray(params["v"]))
  np.testing.assert_array_equal(np.asarray(fwd["w"]) != 0, ref_mask(params["w"], 1, 4))


# ---------------------------------------------------------------------------------------------------
# Default filter and schedule helpers
# ---------------------------------------------------------------------------------------------------


def cnn_params():
  """A flax-like CNN on 1-channel images: the first conv has 1 input channel (axis -2), not divisible by 4."""
  return {"conv1": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
          "conv2": {"kernel": jnp.ones((3, 3, 8, 16)), "bias": jnp.ones(16)},
          "linear": {"kernel": jnp.ones((64, 6)), "bias": jnp.ones(6)}}


def test_default_filter_skips_leaves_that_cannot_be_grouped_and_warns_naming_them():
  params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32),
                        cnn_params())
  assert nm.nm_skipped(params, 4) == ["conv1/kernel (3, 3, 1, 8): 1 entry along axis 2"]
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste")
  with pytest.warns(UserWarning, match=r"keeps 1 leaf/leaves dense, not divisible by M=4: conv1/kernel "
                                       r"\(3, 3, 1, 8\): 1 entry along axis 2\. Pass filter="):
    state = tx.init(params)
  assert state.masks["conv1"]["kernel"] is None and state.masks["conv1"]["bias"] is None
  for name in ("conv2", "linear"):
    mask = np.asarray(state.masks[name]["kernel"])
    w = np.asarray(params[name]["kernel"]).reshape(-1, params[name]["kernel"].shape[-2],
                                                    params[name]["kernel"].shape[-1])
    np.testing.assert_array_equal(mask.reshape(w.shape), np.stack([ref_mask(wi, 2, 4) for wi in w]))
  # The skipped leaf trains densely and is unchanged by forward_params.
  fwd = forward_params(params, state)
  np.testing.assert_array_equal(np.asarray(fwd["conv1"]["kernel"]), np.asarray(params["conv1"]["kernel"]))


def test_default_filter_uses_every_stage_m_and_explicit_filter_still_raises():
  # SdGf geometric 1:4 -> 4:16, 2:8, 1:4: a leaf must divide by 16 to be sparse in every stage.
  params = {"a": jnp.ones((8, 3)), "b": jnp.ones((32, 3))}
  geo = nm.nm_sparsity(optax.sgd(0.1), 1, 4, method="sdgf", structure="geometric", total_steps=10)
  with pytest.warns(UserWarning, match=r"not divisible by M=16: a \(8, 3\): 8 entries along axis 0"):
    state = geo.init(params)
  assert state.masks["a"] is None and state.masks["b"] is not None
  # An explicit selection is the user's choice: a leaf that cannot be grouped is an error, not skipped.
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste", filter=filters.kernels())
  with pytest.raises(ValueError, match=r"leaf 'conv1/kernel' with shape \(3, 3, 1, 8\) has 1 entries along axis 2"):
    tx.init(cnn_params())


def test_default_filter_raises_when_nothing_can_be_sparse_and_is_silent_when_all_fit(recwarn):
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste")
  with pytest.raises(ValueError, match=r"no leaf can be made N:M sparse along axis -2: w \(6, 3\): 6 entries"):
    tx.init({"w": jnp.ones((6, 3)), "b": jnp.ones(3)})
  tx.init({"w": jnp.ones((8, 3)), "b": jnp.ones(3)})
  assert not [w for w in recwarn if "nm_sparsity" in str(w.message)]
  # An out-of-range axis is reported, not silently skipped.
  with pytest.raises(ValueError, match=r"axis 5 is out of range"):
    nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste", axis=5).init({"w": jnp.ones((8, 4))})


@pytest.mark.parametrize("kwargs, steps", [
    (dict(num_epochs=3, steps_per_epoch=7), 21),
    (dict(num_epochs=2, num_examples=1347, batch_size=128), 20),
    (dict(num_epochs=2, num_examples=1347, batch_size=128, drop_remainder=False), 22),
    (dict(num_epochs=1, num_examples=256, batch_size=128), 2),
])
def test_training_steps(kwargs, steps):
  assert nm.training_steps(**kwargs) == steps


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_epochs=0, steps_per_epoch=3), r"num_epochs must be an int >= 1, got 0"),
    (dict(num_epochs=2), r"give steps_per_epoch, or num_examples and batch_size"),
    (dict(num_epochs=2, steps_per_epoch=3, batch_size=4), r"not both"),
    (dict(num_epochs=2, num_examples=10, batch_size=16), r"batch_size=16 exceeds num_examples=10"),
])
def test_training_steps_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nm.training_steps(**kwargs)


@settings(max_examples=20, deadline=None)
@given(total=st.integers(20, 400), warm=st.floats(0.0, 0.4), fine=st.floats(0.0, 0.4))
def test_phase_fractions_equal_the_rounded_step_counts(total, warm, fine):
  frac = nm.nm_schedule(2, 4, method="mdgf", total_steps=total, warmup_steps=warm, finetune_steps=fine)
  steps = nm.nm_schedule(2, 4, method="mdgf", total_steps=total, warmup_steps=round(warm * total),
                         finetune_steps=round(fine * total))
  assert frac == steps
  assert frac.warmup == round(warm * total)
  assert frac.sparse == total - round(warm * total) - round(fine * total)


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=0.2), r"warmup_steps=0.2 is a fraction of training and needs total_steps"),
    (dict(total_steps=10, warmup_steps=1.5), r"warmup_steps=1.5 is a float, i.e. a fraction of total_steps, "
                                             r"and must lie in \[0, 1\)"),
    (dict(total_steps=10, finetune_steps=-0.1), r"finetune_steps=-0.1 is a float"),
    (dict(total_steps=10, warmup_steps=0.5, finetune_steps=0.5), r"leaves no sparse phase"),
])
def test_phase_fraction_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste", **kwargs)


# ---------------------------------------------------------------------------------------------------
# The sample clock: schedules in training examples (a run budgeted in samples, a growing batch)
# ---------------------------------------------------------------------------------------------------


def _schedules(batch, method, warm, fine, total, **kwargs):
  """The same schedule on the step clock and on the sample clock with every length times ``batch``."""
  steps = nm.nm_schedule(1, 8, method=method, total_steps=total, warmup_steps=warm, finetune_steps=fine, **kwargs)
  samples = nm.nm_schedule(1, 8, method=method, clock="samples", total_samples=total * batch,
                           warmup_samples=warm * batch, finetune_samples=fine * batch, **kwargs)
  return steps, samples


@settings(max_examples=20, deadline=None)
@given(batch=st.sampled_from([1, 3, 8, 100, 128, 4096]), total=st.integers(12, 120), warm=st.integers(0, 5),
       fine=st.integers(0, 5), kind=st.sampled_from([("mdgf", "linear"), ("mdgf", "exp"), ("sdgf", None),
                                                     ("srste", None)]))
@example(batch=4096, total=120, warm=5, fine=5, kind=("sdgf", None))   # 491,520 samples, 4 stages
def test_sample_clock_schedule_equals_step_clock_at_samples_equal_step_times_batch(batch, total, warm, fine, kind):
  method, decay = kind
  steps, samples = _schedules(batch, method, warm, fine, total, decay=decay)
  assert (samples.warmup, samples.sparse, samples.clock) == (warm * batch, steps.sparse * batch, "samples")
  k = np.arange(128)   # one shape for every example (past the end of training too): no recompiles
  t = jnp.asarray(k * batch, jnp.int32)
  np.testing.assert_array_equal(np.asarray(samples.stage(t)), np.asarray(steps.stage(jnp.asarray(k))))
  np.testing.assert_array_equal(np.asarray(samples.in_finetune(t)), np.asarray(steps.in_finetune(jnp.asarray(k))))
  b_samples, b_steps = np.asarray(samples.beta(t)), np.asarray(steps.beta(jnp.asarray(k)))
  if batch & (batch - 1) == 0:   # a power of two: coef / B and t * B are exact, so beta is bit for bit equal
    np.testing.assert_array_equal(b_samples, b_steps)
  np.testing.assert_allclose(b_samples, b_steps, rtol=2e-6, atol=1e-7)
  # Between two updates of B examples the stage and the phase follow the clock, not the update count.
  mid = jnp.asarray(k * batch + batch // 2, jnp.int32)
  expect = [-1 if s < warm * batch else min((s - warm * batch) * len(steps.stages) // (steps.sparse * batch),
                                            len(steps.stages) - 1) for s in np.asarray(mid)]
  np.testing.assert_array_equal(np.asarray(samples.stage(mid)), expect)


def test_sample_clock_stage_boundaries_do_not_overflow_int32():
  # 6 stages over 2**31 - 2 samples: k * t would overflow int32; the boundaries are exact integers.
  sched = nm.nm_schedule(1, 32, method="sdgf", clock="samples", total_samples=2**31 - 1, finetune_samples=1)
  sparse = 2**31 - 2
  for i in range(1, 6):
    edge = -(-i * sparse // 6)
    got = np.asarray(sched.stage(jnp.asarray([edge - 1, edge], jnp.int32)))
    np.testing.assert_array_equal(got, [i - 1, i])
  assert int(sched.stage(jnp.int32(2**31 - 1))) == 5


def _train(tx, params, x, t, steps, extra):
  """``steps`` updates of the least-squares model through forward_params; ``extra(k)``: update k's extra
  arguments. Returns the state after every update."""

  @jax.jit
  def step(p, s, kw):
    g = jax.grad(lambda q: lsq(forward_params(q, s)["w"], x, t))(p)
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s

  states = [tx.init(params)]
  for k in range(steps):
    params, state = step(params, states[-1], extra(k))
    states.append(state)
  return params, states


@pytest.mark.parametrize("method,kwargs", [
    ("mdgf", dict(decay="linear")),
    ("mdgf", dict(decay="exp", floor=1e-2)),
    ("srste", dict(srste_lambda=0.1)),
    ("sdgf", dict(structure="stepwise", finetune_fixed_mask=True)),
])
def test_sample_clock_with_batch_size_is_the_step_clock_on_a_constant_batch(method, kwargs):
  w0, x, t = data(11, d_in=16)
  batch, total, warm, fine = 8, 24, 3, 5
  params = {"w": jnp.asarray(w0, jnp.float32)}
  by_steps = nm.nm_sparsity(optax.adam(0.05), 1, 4, method=method, total_steps=total, warmup_steps=warm,
                            finetune_steps=fine, **kwargs)
  by_samples = nm.nm_sparsity(optax.adam(0.05), 1, 4, method=method, clock="samples", total_samples=total * batch,
                              warmup_samples=warm * batch, finetune_samples=fine * batch, **kwargs)
  p1, s1 = _train(by_steps, params, x, t, total + 2, lambda k: {})
  p2, s2 = _train(by_samples, params, x, t, total + 2,
                  lambda k: {"samples": jnp.int32(k * batch), "batch_size": jnp.int32(batch)})
  np.testing.assert_array_equal(np.asarray(p1["w"]), np.asarray(p2["w"]))
  for k, (a, b) in enumerate(zip(s1, s2)):
    np.testing.assert_array_equal(np.asarray(a.masks["w"]), np.asarray(b.masks["w"]))
    assert float(a.beta) == float(b.beta), k
    assert int(a.clock) == k and int(b.clock) == k * batch and int(a.count) == int(b.count) == k
  assert bool(s2[warm - 1].masks["w"].all()) and not bool(s2[warm].masks["w"].all())   # the warm-up ends
  assert float(s2[-1].beta) == 0.0


def test_sample_clock_without_batch_size_runs_one_update_behind():
  # prox.step passes only ``samples`` (before the step): the state of update k is the schedule at k B.
  w0, x, t = data(12, d_in=16)
  batch, total = 4, 16
  params = {"w": jnp.asarray(w0, jnp.float32)}
  kw = dict(method="mdgf", decay="linear", warmup_steps=2, finetune_steps=4, total_steps=total)
  by_steps = nm.nm_sparsity(optax.sgd(0.05), 1, 4, **kw)
  by_samples = nm.nm_sparsity(optax.sgd(0.05), 1, 4, method="mdgf", decay="linear", clock="samples",
                              total_samples=total * batch, warmup_samples=2 * batch, finetune_samples=4 * batch)
  _, s1 = _train(by_steps, params, x, t, total, lambda k: {})
  _, s2 = _train(by_samples, params, x, t, total, lambda k: {"samples": jnp.int32(k * batch)})
  betas_steps = [float(s.beta) for s in s1]
  betas_samples = [float(s.beta) for s in s2]
  assert betas_samples == [betas_steps[0]] + betas_steps[:-1]
  assert [int(s.clock) for s in s2] == [0] + [k * batch for k in range(total)]


@pytest.mark.parametrize("method,kwargs", [
    ("mdgf", dict(decay="linear", warmup_samples=8, finetune_samples=0.25)),
    ("sdgf", dict(structure="stepwise")),
])
def test_sample_clock_in_prox_step_with_a_growing_batch(method, kwargs):
  from prox import step as step_lib  # pylint: disable=g-import-not-at-top
  w0, xs, ts = data(13, d_in=16, batch=32)
  micro, sizes = 4, [4, 4, 8, 8, 12, 16, 16, 16, 16, 16, 16]    # 132 examples in 11 steps
  total = 96
  tx = nm.nm_sparsity(optax.sgd(0.02), 1, 8, method=method, clock="samples", total_samples=total, **kwargs)
  sched = nm.nm_schedule(1, 8, method=method, clock="samples", total_samples=total, **kwargs)
  mesh = step_lib.data_mesh(jax.devices()[:1])

  def loss_fn(params, model_state, batch, ctx):
    return lsq(params["w"], batch["x"], batch["t"]), ({}, model_state)

  step = step_lib.make_train_step(loss_fn, tx, mesh=mesh, micro_batch_size=micro,
                                  forward_fn=lambda p, s: forward_params(p, s.opt_state), donate=False)
  params = {"w": jnp.asarray(w0, jnp.float32)}
  state = step_lib.replicate(step_lib.init_state(params, tx), mesh)
  seen = 0
  for size in sizes:
    rows = np.arange(seen, seen + size) % len(xs)
    batch = step_lib.pack_micro_batches({"x": xs[rows].astype(np.float32), "t": ts[rows].astype(np.float32)},
                                        num_devices=1, micro_batch_size=micro, max_micro_batches=4)
    before = int(state.samples)
    state, _ = step(state, step_lib.shard_batch(batch, mesh), np.int32(size // micro))
    s = state.opt_state
    # prox.step passes samples= (before the step) and batch_size=: the clock includes this step's batch.
    after = before + size
    assert int(state.samples) == after and int(s.clock) == after
    assert float(s.beta) == float(sched.beta(after))
    stage = int(sched.stage(after))
    w = np.asarray(state.params["w"])
    expect = np.ones(w.shape, bool) if stage < 0 else ref_mask(w, *sched.stages[stage])
    np.testing.assert_array_equal(np.asarray(s.masks["w"]), expect)
    seen += size
  assert float(state.opt_state.beta) == 0.0     # 116 >= 96 samples: the final 1:8 with hard masks
  np.testing.assert_array_equal(np.asarray(state.opt_state.masks["w"]), ref_mask(np.asarray(state.params["w"]), 1, 8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(clock="epochs"), r"unknown clock 'epochs'; expected one of \('steps', 'samples'\)"),
    (dict(clock="samples", total_steps=10), r"total_steps=10 belongs to the steps clock; give total_samples"),
    (dict(clock="samples", total_samples=100, warmup_steps=3), r"warmup_steps=3 belongs to the steps clock"),
    (dict(total_samples=100), r"total_samples=100 belongs to the samples clock; pass clock='samples'"),
    (dict(total_steps=10, finetune_samples=0.2), r"finetune_samples=0.2 belongs to the samples clock"),
    (dict(clock="samples", total_samples=2**31), r"total_samples=2147483648 exceeds the int32 clock"),
    (dict(clock="samples", warmup_samples=0.1), r"warmup_samples=0.1 is a fraction of training and needs "
                                                r"total_samples"),
    (dict(clock="samples", total_samples=64, warmup_samples=32, finetune_samples=32), r"total_samples=64 leaves "
                                                                                      r"no sparse phase"),
    (dict(method="sdgf", clock="samples", total_samples=4), r"sparse phase of 4 samples .* shorter than the 5"),
    (dict(clock="samples", total_samples=64, finetune_fixed_mask=True), r"finetune_fixed_mask needs "
                                                                        r"finetune_samples > 0"),
])
def test_sample_clock_bad_input(kwargs, match):
  kw = dict(method="mdgf") | kwargs
  with pytest.raises(ValueError, match=match) as info:
    nm.nm_sparsity(optax.sgd(0.1), 1, 16, **kw)
  assert "\n" not in str(info.value)


def test_sample_clock_update_without_samples_names_the_argument():
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="mdgf", clock="samples", total_samples=1000)
  params = {"w": jnp.ones((8, 3))}
  with pytest.raises(ValueError, match=r"update needs the examples consumed before the step, "
                                       r"tx.update\(grads, state, params, samples=n\)"):
    tx.update(params, tx.init(params), params)
