"""Tests for prox.transforms.ewc: Fisher, penalty, consolidation modes, optax composition, stability guard."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms import ewc as E


def _logreg_logprob(params, example):
  x, y = example
  z = x @ params["w"] + params["b"]
  return y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)


def _logreg_data(n=10, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = (rng.uniform(size=n) < 0.5).astype(np.float64)
  params = {"w": rng.normal(size=d), "b": np.asarray(rng.normal())}
  return params, x, y


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def test_fisher_logistic_regression_closed_form_float64():
  with jax.enable_x64(True):
    params, x, y = _logreg_data()
    params = jax.tree.map(jnp.asarray, params)
    s = _sigmoid(x @ np.asarray(params["w"]) + float(params["b"]))
    r = y - s  # d log p / d z
    # per-example empirical Fisher: mean (y - s)^2 x^2
    f = E.diagonal_fisher(_logreg_logprob, params, (jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(f["w"], np.mean(r[:, None] ** 2 * x ** 2, 0), rtol=1e-12)
    np.testing.assert_allclose(f["b"], np.mean(r ** 2), rtol=1e-12)
    assert f["w"].dtype == jnp.float64
    # chunked per-example gives the same (chunks of 4 over 10 examples: padding must not count)
    fc = E.diagonal_fisher(_logreg_logprob, params, (jnp.asarray(x), jnp.asarray(y)), chunk_size=4)
    np.testing.assert_allclose(fc["w"], f["w"], rtol=1e-12)
    # Avalanche's mini-batch Fisher: mean over batches [0:4], [4:8], [8:10] of (mean grad)^2
    fm = E.diagonal_fisher(_logreg_logprob, params, (jnp.asarray(x), jnp.asarray(y)), minibatch_size=4)
    gw = [np.mean(r[a:b, None] * x[a:b], 0) for a, b in ((0, 4), (4, 8), (8, 10))]
    gb = [np.mean(r[a:b]) for a, b in ((0, 4), (4, 8), (8, 10))]
    np.testing.assert_allclose(fm["w"], np.mean(np.square(gw), 0), rtol=1e-12)
    np.testing.assert_allclose(fm["b"], np.mean(np.square(gb)), rtol=1e-12)
    # the model's (true) Fisher E_{y ~ p(y|x)}[g^2] is mean s(1-s) x^2: each example appears with both labels,
    # its log-prob scaled by sqrt(2 p(y|x)) so that the squared gradients carry the model's probabilities
    def weighted_logprob(p, ex):
      xx, yy, sw = ex
      return sw * _logreg_logprob(p, (xx, yy))

    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(10), np.zeros(10)])
    sw = np.sqrt(2 * np.concatenate([s, 1 - s]))
    ft = E.diagonal_fisher(weighted_logprob, params, tuple(map(jnp.asarray, (xx, yy, sw))))
    np.testing.assert_allclose(ft["w"], np.mean((s * (1 - s))[:, None] * x ** 2, 0), rtol=1e-12)
    np.testing.assert_allclose(ft["b"], np.mean(s * (1 - s)), rtol=1e-12)


def test_minibatch_fisher_is_smaller_by_about_the_batch_size_at_zero_mean_gradient():
  # per-example gradients with zero mean: E[F_B] = sigma^2 / B, E[F] = sigma^2
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4096, 5)).astype(np.float32)

  def logprob(p, ex):  # gradient w.r.t. p is ex: zero mean, unit variance
    return jnp.dot(p, ex)

  p = jnp.zeros((5,), jnp.float32)
  f = E.diagonal_fisher(logprob, p, jnp.asarray(x))
  fb = E.diagonal_fisher(logprob, p, jnp.asarray(x), minibatch_size=16)
  ratio = float(jnp.sum(f) / jnp.sum(fb))
  assert 12 < ratio < 21, ratio


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), dtype)},
          "bias": jnp.asarray(rng.normal(size=(2,)), dtype)}


def _rand_like(tree, seed, positive=False):
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(tree)
  out = [rng.uniform(0.1, 2.0, size=l.shape) if positive else rng.normal(size=l.shape) for l in leaves]
  return treedef.unflatten([jnp.asarray(o, l.dtype) for o, l in zip(out, leaves)])


def test_penalty_zero_at_anchor_and_gradient_matches_reference():
  params = _params()
  fisher = _rand_like(params, 1, positive=True)
  tx = E.ewc(ewc_lambda=3.0)
  state = E.consolidate(tx.init(params), params, fisher)
  assert float(E.ewc_penalty(state, params)) == 0.0
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(upd))
  # away from the anchor: hand-written lambda F (w - w*) plus the incoming gradient
  w = _rand_like(params, 2)
  g = _rand_like(params, 3)
  upd, _ = tx.update(g, state, w)
  ref = jax.tree.map(lambda gi, f, wi, a: gi + 3.0 * f * (wi - a), g, fisher, w, params)
  for u, r in zip(jax.tree.leaves(upd), jax.tree.leaves(ref)):
    np.testing.assert_allclose(u, r, rtol=1e-6)
  # and the update is the gradient of the logged penalty
  grad_pen = jax.grad(lambda p: E.ewc_penalty(state, p))(w)
  for u, gi, gp in zip(jax.tree.leaves(upd), jax.tree.leaves(g), jax.tree.leaves(grad_pen)):
    np.testing.assert_allclose(u - gi, gp, rtol=1e-5)


def test_separate_mode_running_sums_equal_explicit_sum_over_tasks_float64():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())
    lam = 7.5
    tx = E.ewc(lam)
    state = tx.init(params)
    anchors, fishers = [], []
    for t in range(5):
      a = _rand_like(params, 10 + t)
      f = _rand_like(params, 20 + t, positive=True)
      if t == 2:  # a task with zero Fisher on some coordinates
        f = jax.tree.map(lambda x: x.at[0].set(0.0), f)
      anchors.append(a)
      fishers.append(f)
      state = E.consolidate(state, a, f)
    assert int(state.num_tasks) == 5
    w = _rand_like(params, 99)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, w)
    explicit = jax.tree.map(lambda wi, *fa: sum(lam * fa[j] * (wi - fa[5 + j]) for j in range(5)),
                            w, *fishers, *anchors)
    for u, r in zip(jax.tree.leaves(upd), jax.tree.leaves(explicit)):
      np.testing.assert_allclose(u, r, rtol=1e-11, atol=1e-12)
    pen = sum(0.5 * lam * float(jnp.sum(f * (wi - a) ** 2))
              for fs, an in zip(fishers, anchors)
              for f, wi, a in zip(jax.tree.leaves(fs), jax.tree.leaves(w), jax.tree.leaves(an)))
    np.testing.assert_allclose(float(E.ewc_penalty(state, w)), pen, rtol=1e-10)
    # state size does not grow with the number of tasks
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


def test_online_mode_decay_rule():
  params = _params()
  gamma = 0.6
  tx = E.ewc(2.0, mode="online", gamma=gamma)
  state = tx.init(params)
  f1, f2, f3 = (_rand_like(params, s, positive=True) for s in (1, 2, 3))
  a1, a2, a3 = (_rand_like(params, s) for s in (4, 5, 6))
  state = E.consolidate(state, a1, f1)
  state = E.consolidate(state, a2, f2)
  state = E.consolidate(state, a3, f3)
  want = jax.tree.map(lambda x, y, z: gamma * (gamma * x + y) + z, f1, f2, f3)
  for s, r in zip(jax.tree.leaves(state.fisher), jax.tree.leaves(want)):
    np.testing.assert_allclose(s, r, rtol=1e-6)
  for s, r in zip(jax.tree.leaves(state.anchor), jax.tree.leaves(a3)):
    np.testing.assert_array_equal(s, r)
  assert float(state.offset) == 0.0
  w = _rand_like(params, 7)
  pen = sum(float(jnp.sum(f * (wi - a) ** 2)) for f, wi, a in
            zip(jax.tree.leaves(want), jax.tree.leaves(w), jax.tree.leaves(a3)))
  np.testing.assert_allclose(float(E.ewc_penalty(state, w)), 0.5 * 2.0 * pen, rtol=1e-5)


def test_jit_no_recompile_and_chain_with_sgd():
  params = _params()
  tx = optax.chain(E.ewc(5.0), optax.sgd(0.1))
  opt_state = tx.init(params)
  fisher = _rand_like(params, 1, positive=True)
  consolidate = jax.jit(E.consolidate)
  opt_state = (consolidate(opt_state[0], params, fisher),) + tuple(opt_state[1:])

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  w = params
  for seed in range(3):
    w, opt_state = step(w, opt_state, _rand_like(params, 30 + seed))
  assert step._cache_size() == 1
  opt_state = E.consolidate_opt_state(opt_state, w, fisher)
  w, opt_state = step(w, opt_state, _rand_like(params, 40))
  assert step._cache_size() == 1
  consolidate(opt_state[0], w, fisher)
  assert consolidate._cache_size() == 1
  assert int(E.find_ewc_state(opt_state).num_tasks) == 2


def test_pure_penalty_sgd_converges_to_anchor():
  # with zero loss gradient, chain(ewc, sgd) contracts w towards the anchor by (1 - lr lambda F) per step
  params = _params()
  fisher = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = optax.chain(E.ewc(1.0), optax.sgd(0.5))
  s = tx.init(params)
  s = E.consolidate_opt_state(s, params, fisher)
  w = _rand_like(params, 3)
  d0 = jax.tree.map(lambda a, b: a - b, w, params)
  for _ in range(4):
    u, s = tx.update(jax.tree.map(jnp.zeros_like, w), s, w)
    w = optax.apply_updates(w, u)
  for wi, a, d in zip(jax.tree.leaves(w), jax.tree.leaves(params), jax.tree.leaves(d0)):
    np.testing.assert_allclose(wi - a, d * (1 - 0.25) ** 4, rtol=1e-4, atol=1e-6)


def test_inject_hyperparams_and_penalty_follows_lambda():
  params = _params()
  tx = optax.inject_hyperparams(E.ewc)(ewc_lambda=1.0)
  s = tx.init(params)
  fisher = _rand_like(params, 1, positive=True)
  s = E.consolidate_opt_state(s, params, fisher)
  w = _rand_like(params, 2)
  p1 = float(E.ewc_penalty(E.find_ewc_state(s), w))
  s.hyperparams["ewc_lambda"] = jnp.asarray(4.0)
  u, s = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, w), s, w)
  np.testing.assert_allclose(float(E.ewc_penalty(E.find_ewc_state(s), w)), 4.0 * p1, rtol=1e-5)
  ref = jax.tree.map(lambda f, wi, a: 4.0 * f * (wi - a), fisher, w, params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_apply_if_finite_skips_nan_steps():
  params = _params()
  tx = optax.apply_if_finite(optax.chain(E.ewc(1.0), optax.sgd(0.1)), max_consecutive_errors=3)
  s = tx.init(params)
  s = E.consolidate_opt_state(s, params, _rand_like(params, 1, positive=True))
  w = _rand_like(params, 2)
  nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), w)
  u, s = jax.jit(tx.update)(nan_g, s, w)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))
  assert int(s.notfinite_count) == 1
  u, s = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, w), s, w)
  assert int(s.notfinite_count) == 0
  assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
  params = _params(dtype=dtype)
  tx = E.ewc(2.0)
  s = tx.init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s.fisher))
  s = E.consolidate(s, params, _rand_like(params, 1, positive=True))
  for a, p in zip(jax.tree.leaves(s.anchor), jax.tree.leaves(params)):  # anchor stores w exactly
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(p, np.float32))
  g = _rand_like(params, 3)
  u, s2 = jax.jit(tx.update)(g, s, _rand_like(params, 4))
  assert all(x.dtype == dtype for x in jax.tree.leaves(u))
  assert jax.tree.map(lambda x: x.dtype, s2) == jax.tree.map(lambda x: x.dtype, s)


def test_stability_warning():
  params = _params()
  fisher = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  s = E.ewc(1000.0).init(params)
  with pytest.warns(RuntimeWarning, match=r"lambda \* max\(F\) \* learning_rate = 20 exceeds the stability"):
    E.consolidate(s, params, fisher, learning_rate=0.01)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    E.consolidate(s, params, fisher, learning_rate=1e-4)  # 0.2 < 2: quiet
    E.consolidate(s, params, fisher)  # no learning rate given: no check
    jax.jit(lambda s, p, f: E.consolidate(s, p, f, learning_rate=0.01))(s, params, fisher)  # traced: no check
  np.testing.assert_allclose(float(E.ewc_stability(E.consolidate(s, params, fisher), 0.01)), 20.0)
  # the bound is real: plain SGD on the penalty alone diverges just above it and converges just below
  for lr, diverges in ((0.00101, True), (0.00099, False)):
    tx = optax.chain(E.ewc(1000.0), optax.sgd(lr))
    st = E.consolidate_opt_state(tx.init(params), params, fisher)
    w = jax.tree.map(lambda p: p + 1.0, params)
    for _ in range(200):
      u, st = tx.update(jax.tree.map(jnp.zeros_like, w), st, w)
      w = optax.apply_updates(w, u)
    dist = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(params)))
    assert (dist > 1.0) == diverges, (lr, dist)


def test_bad_input():
  with pytest.raises(ValueError, match="ewc_lambda must be a finite number >= 0, got -1.0"):
    E.ewc(-1.0)
  with pytest.raises(ValueError, match="gamma must be in"):
    E.ewc(1.0, mode="online", gamma=1.5)
  with pytest.raises(ValueError, match="gamma must be in"):
    E.ewc(1.0, mode="online", gamma=-0.1)
  with pytest.raises(ValueError, match="only applies to mode='online'"):
    E.ewc(1.0, gamma=0.5)
  with pytest.raises(ValueError, match="mode must be"):
    E.ewc(1.0, mode="sum")
  params = _params()
  tx = E.ewc(1.0)
  s = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, s)
  bad = {"dense": {"kernel": params["dense"]["kernel"]}, "bias2": params["bias"]}
  with pytest.raises(ValueError, match=r"params does not match .*\['bias'\].*\['bias2'\]"):
    E.consolidate(s, bad, params)
  bad_shape = {"dense": {"kernel": params["dense"]["kernel"][:2]}, "bias": params["bias"]}
  with pytest.raises(ValueError, match=r"fisher does not match .*\['dense'\]\['kernel'\]: shape \(2, 2\)"):
    E.consolidate(s, params, bad_shape)
  with pytest.raises(ValueError, match="missing leaf"):
    E.consolidate(s, params, {"bias": params["bias"]})
  with pytest.raises(ValueError, match="no EWCState"):
    E.consolidate_opt_state(optax.sgd(0.1).init(params), params, params)
  with pytest.raises(ValueError, match="minibatch_size"):
    E.diagonal_fisher(_logreg_logprob, params, (jnp.ones((3, 2)), jnp.ones(3)), minibatch_size=0)


def test_checkpoint_round_trip(orbax_round_trip):
  params = _params()
  tx = optax.chain(E.ewc(3.0, mode="online", gamma=0.9), optax.sgd(0.1, momentum=0.9))
  s = tx.init(params)
  s = E.consolidate_opt_state(s, params, _rand_like(params, 1, positive=True))
  restored = orbax_round_trip(s)
  assert jax.tree.structure(restored) == jax.tree.structure(s)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  # resuming from the restored state continues exactly
  w, g = _rand_like(params, 2), _rand_like(params, 3)
  u1, _ = tx.update(g, s, w)
  u2, _ = tx.update(g, restored, w)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Lambda guidance
# ---------------------------------------------------------------------------------------------------


def test_lambda_range_hand_computed():
  fisher = {"a": np.array([1e-4, 3e-4]), "b": np.array([[2e-4]])}
  h = {"a": np.array([0.02, 0.01]), "b": np.array([[0.05]])}
  r = E.ewc_lambda_range(fisher, curvature=h, learning_rate=0.1, momentum=0.9)
  f, hh = np.array([1e-4, 3e-4, 2e-4]), np.array([0.02, 0.01, 0.05])
  np.testing.assert_allclose(r.low, np.sum(f * hh) / np.sum(f * f), rtol=1e-12)
  np.testing.assert_allclose(r.high, 2 * 1.9 / (0.1 * 3e-4), rtol=1e-12)
  np.testing.assert_allclose(r.fisher_scale, np.sum(f * f) / np.sum(f), rtol=1e-12)
  np.testing.assert_allclose(r.curvature_scale, np.sum(f * hh) / np.sum(f), rtol=1e-12)
  assert r.max_fisher == 3e-4
  np.testing.assert_allclose(r.geometric_mean, np.sqrt(r.low * r.high))
  # scalar curvature, retention 0.8 (factor 4), Nesterov limit, no learning rate
  r2 = E.ewc_lambda_range(fisher, curvature=0.03, retention=0.8)
  np.testing.assert_allclose(r2.low, 4 * 0.03 * np.sum(f) / np.sum(f * f), rtol=1e-12)
  assert r2.high == float("inf")
  assert E.sgd_stability_limit(0.5, nesterov=True) == pytest.approx(2 * 1.5 / 2.0)
  # an EWCState is accepted for its accumulated Fisher
  params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 1))}
  state = E.consolidate(E.ewc(1.0).init(params), params, jax.tree.map(jnp.asarray, fisher))
  np.testing.assert_allclose(E.ewc_lambda_range(state, curvature=h).low, r.low, rtol=1e-6)


@pytest.mark.parametrize("retention", [0.5, 0.9])
def test_lambda_low_keeps_the_retention_fraction_at_the_penalised_minimum_float64(retention):
  # New task: L_B = sum h/2 (w - a)^2 with h = c F; old anchor m. At lambda = low, every coordinate of the
  # penalised minimum (found by gradient descent, not by the closed form) lies the fraction `retention` of the
  # way from a back to m.
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    fisher = {"w": jnp.asarray(rng.uniform(1e-5, 1e-3, size=6))}
    h = {"w": 40.0 * fisher["w"]}
    m, a = jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.normal(size=6))
    lam = E.ewc_lambda_range(fisher, curvature=h, retention=retention).low
    tx = optax.chain(E.ewc(lam), optax.sgd(1.0 / (float(jnp.max(h["w"])) * (1 + lam / 40.0))))
    state = E.consolidate_opt_state(tx.init({"w": m}), {"w": m}, fisher)
    grad = jax.grad(lambda p: 0.5 * jnp.sum(h["w"] * (p["w"] - a) ** 2))

    def step(_, ws):
      w, state = ws
      u, state = tx.update(grad(w), state, w)
      return optax.apply_updates(w, u), state

    w, _ = jax.lax.fori_loop(0, 3000, step, ({"w": a}, state))
    kept = (w["w"] - a) / (m - a)
    np.testing.assert_allclose(kept, retention, rtol=1e-6)


def test_lambda_high_is_the_sgd_momentum_stability_bound():
  # The pure penalty with heavy-ball momentum 0.9 converges at 0.98 * high and diverges at 1.02 * high.
  params = _params()
  fisher = _rand_like(params, 1, positive=True)
  lr = 0.01
  r = E.ewc_lambda_range(fisher, curvature=1.0, learning_rate=lr, momentum=0.9)
  for factor, diverges in ((0.98, False), (1.02, True)):
    tx = optax.chain(E.ewc(factor * r.high), optax.sgd(lr, momentum=0.9))
    st = E.consolidate_opt_state(tx.init(params), params, fisher)
    w = jax.tree.map(lambda p: p + 1.0, params)

    def step(_, ws, tx=tx):
      w, st = ws
      u, st = tx.update(jax.tree.map(jnp.zeros_like, w), st, w)
      return optax.apply_updates(w, u), st

    w, _ = jax.lax.fori_loop(0, 300, step, (w, st))
    dist = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(params)))
    assert (not dist < 1e-3) == diverges, (factor, dist)


def test_lambda_range_bad_input():
  f = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"retention must lie in \(0, 1\), got 1.0"):
    E.ewc_lambda_range(f, curvature=1.0, retention=1.0)
  with pytest.raises(ValueError, match="learning_rate must be > 0 or None, got 0"):
    E.ewc_lambda_range(f, curvature=1.0, learning_rate=0)
  with pytest.raises(ValueError, match="momentum must lie in"):
    E.ewc_lambda_range(f, curvature=1.0, learning_rate=0.1, momentum=1.0)
  with pytest.raises(ValueError, match="curvature must be > 0, got -1"):
    E.ewc_lambda_range(f, curvature=-1.0)
  with pytest.raises(ValueError, match=r"curvature does not match the Fisher's tree: .*\['v'\]"):
    E.ewc_lambda_range(f, curvature={"v": jnp.ones(3)})
  with pytest.raises(ValueError, match="the Fisher is zero everywhere"):
    E.ewc_lambda_range({"w": jnp.zeros(3)}, curvature=1.0)
