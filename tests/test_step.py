"""Tests of prox.step: the jit(shard_map) data-parallel step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import step as S


def _loss(params, batch, rng):
  pred = batch["x"] @ params["w"] + params["b"]
  value = jnp.mean((pred - batch["y"]) ** 2)
  return value, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


def _data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1 * rng.normal(size=n)).astype(np.float32)
  return {"x": x, "y": y}


def _state(tx, params=None, extra=()):
  params = {"w": jnp.full((3,), 0.1), "b": jnp.zeros(())} if params is None else params
  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state={},
                       extra=extra, rng=jax.random.key_data(jax.random.key(0)))
  return S.replicate(state, S.data_mesh())


def _grad(params, batch):
  return jax.grad(lambda p: _loss(p, batch, None)[0])(params)


def test_matches_hand_written_optax_step():
  tx = optax.adam(0.05)
  data = _data()
  step = S.make_train_step(S.stateless(_loss), tx, donate=False)
  state = _state(tx)
  params, opt_state = state.params, state.opt_state

  @jax.jit
  def reference(params, opt_state, batch):
    value, g = jax.value_and_grad(lambda p: _loss(p, batch, None)[0])(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  batch = S.shard_batch(data, S.data_mesh())
  for _ in range(4):
    state, out = step(state, batch)
    params, opt_state, value = reference(params, opt_state, data)
    np.testing.assert_allclose(out.metrics["loss"], value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.params, params)
  assert int(state.step) == 4
  assert set(out.metrics) == {"loss", "mae"}


def test_micro_batches_accumulate_the_full_batch_gradient():
  data = _data(32)
  tx = optax.sgd(0.1)
  full = S.make_train_step(S.stateless(_loss), tx, donate=False)
  micro = S.make_train_step(S.stateless(_loss), tx, micro_batch_size=8, donate=False)
  batch = S.shard_batch(data, S.data_mesh())
  a, out_a = full(_state(tx), batch)
  b, out_b = micro(_state(tx), batch)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a.params, b.params)
  np.testing.assert_allclose(out_a.metrics["loss"], out_b.metrics["loss"], rtol=1e-6)


def test_dynamic_micro_batch_count_uses_the_first_n_and_never_recompiles():
  data = _data(32)
  tx = optax.sgd(0.1)
  step = S.make_train_step(S.stateless(_loss), tx, micro_batch_size=8, grad_stats=True, donate=False)
  batch = S.shard_batch(data, S.data_mesh())
  for n in (1, 2, 3, 4, 2):
    _, out = step(_state(tx), batch, jnp.int32(n))
    rows = {k: v[: 8 * n] for k, v in data.items()}
    expected = _grad({"w": jnp.full((3,), 0.1), "b": jnp.zeros(())}, rows)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 out.grad_stats.mean, expected)
    assert int(out.grad_stats.num_groups) == n
  assert step._cache_size() == 1


def test_no_recompilation_after_warm_up():
  tx = optax.adam(1e-2)
  step = S.make_train_step(S.stateless(_loss), tx)
  state = _state(tx)
  for seed in range(5):
    state, _ = step(state, S.shard_batch(_data(32, seed), S.data_mesh()))
  assert step._cache_size() == 1


def test_grad_stats_and_group_stats_match_micro_batch_gradients():
  data = _data(32)
  tx = optax.sgd(0.1)

  def group_fn(groups, valid, mean):
    w = valid.astype(jnp.float32)
    inner = sum(jnp.tensordot(g, m, axes=g.ndim - 1)
                for g, m in zip(jax.tree.leaves(groups), jax.tree.leaves(mean)))
    return {"inner": jnp.sum(w * inner), "inner_sq": jnp.sum(w * inner ** 2)}

  step = S.make_train_step(S.stateless(_loss), tx, micro_batch_size=8, grad_stats=True,
                           group_stats_fn=group_fn, donate=False)
  _, out = step(_state(tx), S.shard_batch(data, S.data_mesh()))
  params = {"w": jnp.full((3,), 0.1), "b": jnp.zeros(())}
  groups = [_grad(params, {k: v[8 * i: 8 * i + 8] for k, v in data.items()}) for i in range(4)]
  mean = jax.tree.map(lambda *g: sum(g) / 4, *groups)
  second = jax.tree.map(lambda *g: sum(x * x for x in g) / 4, *groups)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), out.grad_stats.mean, mean)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5),
               out.grad_stats.second_moment, second)
  assert out.grad_stats.group_size == 8 and int(out.grad_stats.num_groups) == 4
  inner = [sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(mean))) for g in groups]
  np.testing.assert_allclose(out.group_stats["inner"], sum(inner), rtol=1e-5)
  np.testing.assert_allclose(out.group_stats["inner_sq"], sum(i ** 2 for i in inner), rtol=1e-5)


def test_transform_receives_value_and_params():
  seen = {}

  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, *, value=None, **extra):
    seen["value"], seen["params"] = value, params
    return jax.tree.map(lambda g, p: -0.1 * g + 0 * p, updates, params), state

  tx = optax.GradientTransformationExtraArgs(init, update)
  step = S.make_train_step(S.stateless(_loss), tx, donate=False)
  state = _state(tx)
  new_state, out = step(state, S.shard_batch(_data(), S.data_mesh()))
  assert "value" in seen and seen["value"] is not None and seen["params"] is not None
  np.testing.assert_allclose(new_state.params["b"], state.params["b"] - 0.1 * _grad(
      jax.device_get(state.params), _data())["b"], rtol=1e-5)


def test_transition_and_forward_fn():
  tx = optax.sgd(1.0)
  mask = {"w": jnp.array([1.0, 0.0, 1.0]), "b": jnp.ones(())}

  def count(extra, info):
    return {"count": extra["count"] + 1, "last_loss": info.loss, "batch_size": info.batch_size}

  def forward_fn(params, state):
    return jax.tree.map(jnp.multiply, params, state.extra["mask"])

  step = S.make_train_step(S.stateless(_loss), tx, transition=S.in_extra("stats", count),
                           forward_fn=forward_fn, donate=False)
  stats = {"count": jnp.int32(0), "last_loss": jnp.float32(0), "batch_size": jnp.int32(0)}
  state = _state(tx, extra={"stats": stats, "mask": mask})
  data = _data()
  new_state, out = step(state, S.shard_batch(data, S.data_mesh()))
  assert int(new_state.extra["stats"]["count"]) == 1
  assert int(new_state.extra["stats"]["batch_size"]) == 32 and int(new_state.samples) == 32
  np.testing.assert_allclose(new_state.extra["stats"]["last_loss"], out.metrics["loss"])
  # Gradient through the masked forward: d/dw (w*m) = m, so the masked coordinate gets no gradient.
  masked = jax.tree.map(jnp.multiply, jax.device_get(state.params), mask)
  g = jax.tree.map(jnp.multiply, _grad(masked, data), mask)
  jax.tree.map(lambda new, old, gg: np.testing.assert_allclose(new, old - gg, rtol=1e-5, atol=1e-7),
               new_state.params, jax.device_get(state.params), g)


def test_transition_may_change_opt_state_and_sees_the_batch():
  """A transition can rewrite the optimizer state in the step (e.g. a consolidation under lax.cond)."""
  tx = optax.sgd(0.1, momentum=0.9)
  data = _data(32)

  def reset_momentum_when_loss_is_high(state, info):
    fire = info.loss > 0.0
    trace = jax.tree.map(lambda t: jnp.where(fire, jnp.zeros_like(t), t), state.opt_state[0].trace)
    rows = jnp.sum(info.valid)
    y_sum = jnp.sum(jnp.where(info.valid, info.batch["y"], 0.0))
    return state._replace(opt_state=(state.opt_state[0]._replace(trace=trace),) + state.opt_state[1:],
                          extra={"rows": rows, "y_sum": y_sum})

  step = S.make_train_step(S.stateless(_loss), tx, micro_batch_size=8,
                           transition=reset_momentum_when_loss_is_high, donate=False)
  state = _state(tx, extra={"rows": jnp.int32(0), "y_sum": jnp.float32(0)})
  new_state, _ = step(state, S.shard_batch(data, S.data_mesh()), jnp.int32(3))
  jax.tree.map(lambda t: np.testing.assert_array_equal(t, 0.0), new_state.opt_state[0].trace)
  assert int(new_state.extra["rows"]) == 24
  np.testing.assert_allclose(new_state.extra["y_sum"], data["y"][:24].sum(), rtol=1e-5)


def test_loss_reads_extra_and_meta():
  def loss_fn(params, model_state, batch, ctx):
    value, metrics = _loss(params, batch, ctx.rng)
    return ctx.extra["scale"] * value + ctx.meta["shift"], (metrics, model_state)

  tx = optax.sgd(0.1)
  step = S.make_train_step(loss_fn, tx, donate=False)
  state = _state(tx, extra={"scale": jnp.float32(2.0)})
  batch = S.shard_batch(_data(), S.data_mesh())
  _, out = step(state, batch, None, {"shift": jnp.float32(1.0)})
  _, plain = S.make_train_step(S.stateless(_loss), tx, donate=False)(state, batch)
  np.testing.assert_allclose(out.metrics["loss"], 2 * plain.metrics["loss"] + 1, rtol=1e-6)
  _, out3 = step(state, batch, None, {"shift": jnp.float32(3.0)})
  np.testing.assert_allclose(out3.metrics["loss"], 2 * plain.metrics["loss"] + 3, rtol=1e-6)
  assert step._cache_size() == 1   # meta values are traced


def test_model_state_is_the_mean_of_the_groups_updates():
  """Each micro-batch updates batch statistics from the step's model_state; the step averages them, so
  the layout (devices x micro-batches) does not change the result."""
  def loss_fn(params, model_state, batch, ctx):
    value, metrics = _loss(params, batch, ctx.rng)
    seen = model_state["seen"] + batch["x"].shape[0]
    return value, (metrics, {"seen": seen, "mean": 0.5 * model_state["mean"] + 0.5 * batch["y"].mean()})

  tx = optax.sgd(0.1)
  step = S.make_train_step(loss_fn, tx, micro_batch_size=8, donate=False)
  state = _state(tx)._replace(model_state=S.replicate({"seen": jnp.int32(0), "mean": jnp.float32(1)},
                                                      S.data_mesh()))
  data = _data(32)
  new_state, _ = step(state, S.shard_batch(data, S.data_mesh()), jnp.int32(3))
  assert int(new_state.model_state["seen"]) == 8
  expected = np.mean([0.5 * 1.0 + 0.5 * data["y"][8 * i: 8 * i + 8].mean() for i in range(3)])
  np.testing.assert_allclose(new_state.model_state["mean"], expected, rtol=1e-6)


def test_nonfinite_steps_are_reported_and_optionally_skipped():
  tx = optax.sgd(1e37)            # step 1: finite; step 2: the loss of weights ~1e37 overflows
  batch = S.shard_batch(_data(), S.data_mesh())
  step = S.make_train_step(S.stateless(_loss), tx, donate=False)
  one, out = step(_state(tx), batch)
  assert bool(out.finite)
  _, out = step(one, batch)
  assert not bool(out.finite)
  kept, out = S.make_train_step(S.stateless(_loss), tx, skip_nonfinite=True, donate=False)(one, batch)
  assert not bool(out.finite) and int(kept.step) == 2
  jax.tree.map(np.testing.assert_array_equal, kept.params, one.params)
  jax.tree.map(np.testing.assert_array_equal, kept.opt_state, one.opt_state)
  _, ok = S.make_train_step(S.stateless(_loss), optax.sgd(0.1), donate=False)(_state(tx), batch)
  assert bool(ok.finite)
  nan = dict(_data(), y=np.full(32, np.nan, np.float32))
  _, bad = S.make_train_step(S.stateless(_loss), optax.sgd(0.1), donate=False)(
      _state(tx), S.shard_batch(nan, S.data_mesh()))
  assert not bool(bad.finite)


def test_state_buffers_are_donated_and_rng_advances():
  tx = optax.adam(1e-2)
  step = S.make_train_step(S.stateless(_loss), tx)
  state = _state(tx)
  old_w, old_rng = state.params["w"], np.asarray(state.rng)
  new_state, _ = step(state, S.shard_batch(_data(), S.data_mesh()))
  assert old_w.is_deleted()
  assert not np.array_equal(np.asarray(new_state.rng), old_rng)


def test_pack_micro_batches_layout_and_errors():
  x = np.arange(12)
  packed = S.pack_micro_batches({"x": x}, num_devices=2, micro_batch_size=2, max_micro_batches=4)["x"]
  np.testing.assert_array_equal(packed, [0, 1, 2, 3, 4, 5, 0, 0, 6, 7, 8, 9, 10, 11, 0, 0])
  with pytest.raises(ValueError, match="multiple of devices x micro-batch = 4"):
    S.pack_micro_batches({"x": np.arange(10)}, num_devices=2, micro_batch_size=2, max_micro_batches=4)
  with pytest.raises(ValueError, match="max_micro_batches=1"):
    S.pack_micro_batches({"x": x}, num_devices=2, micro_batch_size=2, max_micro_batches=1)
  with pytest.raises(ValueError, match="micro_batch_size must be positive, got 0"):
    S.make_train_step(S.stateless(_loss), optax.sgd(0.1), micro_batch_size=0)


def test_eval_step_sums_over_devices():
  def eval_fn(params, model_state, batch):
    return {"n": jnp.sum(batch["mask"]), "y": jnp.sum(batch["y"] * batch["mask"])}

  tx = optax.sgd(0.1)
  data = _data(32)
  data["mask"] = (np.arange(32) < 30).astype(np.float32)
  out = S.make_eval_step(eval_fn)(_state(tx), S.shard_batch(data, S.data_mesh()))
  assert float(out["n"]) == 30
  np.testing.assert_allclose(out["y"], data["y"][:30].sum(), rtol=1e-5)


def _mlp_problem(n=32, seed=0):
  from prox import models
  net = models.functional(models.make_model("mlp", input_shape=(6,), num_classes=3, hidden=(16,), seed=seed))
  rng = np.random.default_rng(seed)
  data = {"image": rng.normal(size=(n, 6)).astype(np.float32), "label": rng.integers(0, 3, n).astype(np.int32)}

  def loss(params, batch, rng):
    logits, _ = net.apply(params, {}, batch["image"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

  def per_example(params, x, y):
    return loss(params, {"image": x[None], "label": y[None]}, None)[0]

  grads = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(net.params, data["image"], data["label"])
  return net, data, loss, grads


def _flat(tree):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


@pytest.mark.parametrize("micro", [None, 8])
def test_example_stats_equal_the_per_example_gradients(micro):
  net, data, loss, grads = _mlp_problem()
  tx = optax.sgd(0.1)
  stats = ("norm", "inner", "diag")
  step = S.make_train_step(S.stateless(loss), tx, micro_batch_size=micro, example_stats=stats, donate=False)
  state = S.replicate(S.init_state(net.params, tx), S.data_mesh())
  _, out = step(state, S.shard_batch(data, S.data_mesh()))
  ex = out.example_stats
  g = _flat(grads).astype(np.float64)
  mean = g.mean(0)
  assert int(ex.count) == 32 and float(ex.covered) == 1.0
  np.testing.assert_allclose(ex.sq_norm_sum, np.sum(g ** 2), rtol=1e-5)
  np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], ex.diag_sum))[0], np.sum(g ** 2, 0),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(ex.inner_sum, np.sum(g @ mean), rtol=1e-5)
  np.testing.assert_allclose(ex.inner_sq_sum, np.sum((g @ mean) ** 2), rtol=1e-5)
  if micro:     # 3 of 4 micro-batches: the statistics of the first 24 examples
    _, part = step(state, S.shard_batch(data, S.data_mesh()), jnp.int32(3))
    g3 = g[:24]
    np.testing.assert_allclose(part.example_stats.inner_sq_sum, np.sum((g3 @ g3.mean(0)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(part.example_stats.sq_norm_sum, np.sum(g3 ** 2), rtol=1e-5)
    assert int(part.example_stats.count) == 24


def test_example_stats_refuse_untapped_models_and_unknown_names():
  tx = optax.sgd(0.1)
  state = _state(tx)
  step = S.make_train_step(S.stateless(_loss), tx, example_stats=("norm",))
  with pytest.raises(ValueError, match="tapped"):
    step(state, S.shard_batch(_data(), S.data_mesh()))
  with pytest.raises(ValueError, match="unknown"):
    S.make_train_step(S.stateless(_loss), tx, example_stats=("nrom",))


def test_group_moments_average_over_partitions_is_the_sample_moment():
  """The group estimate of sum_i a_i b_i is unbiased: its mean over every ordering of the examples (hence
  every partition into groups) is the exact sum."""
  import itertools
  from prox.taps import _group_moments
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=6), rng.normal(size=6)
  est = [float(_group_moments(jnp.asarray(a[list(p)].reshape(3, 2).mean(1)),
                              jnp.asarray(b[list(p)].reshape(3, 2).mean(1)), 6))
         for p in itertools.permutations(range(6))]
  np.testing.assert_allclose(np.mean(est), np.sum(a * b), rtol=1e-5)
  assert np.std(est) > 0.01      # single estimates do vary


def _cnn1d_problem(m, seed):
  """The 1-D CNN (width 4, length 12, 3 classes), ``m`` random examples and its mean loss."""
  from prox import models
  net = models.functional(models.make_model("cnn1d", input_shape=(12, 1), num_classes=3, seed=seed, width=4))
  rng = np.random.default_rng(seed)
  data = {"image": rng.normal(size=(m, 12, 1)).astype(np.float32), "label": rng.integers(0, 3, m).astype(np.int32)}

  def loss(params, batch, rng_):
    logits, _ = net.apply(params, {}, batch["image"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

  return net, data, loss, rng


def test_example_groups_estimate_conv_moments_from_group_means():
  """With example_groups=n the step's statistics are: exact for dense layers and biases, and for the
  convolution kernels the group estimate from the means of n groups of consecutive examples - checked
  against that formula applied to vmap(grad)'s per-example gradients; the update is the plain one."""
  m, n = 32, 4
  net, data, loss, _ = _cnn1d_problem(m, 2)
  tx = optax.sgd(0.5)
  mesh = S.data_mesh()
  state = S.replicate(S.init_state(net.params, tx), mesh)
  batch = S.shard_batch(data, mesh)
  plain, _ = S.make_train_step(S.stateless(loss), tx, donate=False)(state, batch)
  new, out = S.make_train_step(S.stateless(loss), tx, example_stats=("norm", "inner", "diag"),
                               example_groups=n, donate=False)(state, batch)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(new.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  per = jax.vmap(jax.grad(lambda p, x, y: loss(p, {"image": x[None], "label": y[None]}, None)[0]),
                 in_axes=(None, 0, 0))(net.params, data["image"], data["label"])
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(per)[0]]
  leaves = [np.asarray(v, np.float64).reshape(m, -1) for v in jax.tree.leaves(per)]
  grouped = [("conv" in p and "kernel" in p) for p in paths]
  assert any(grouped) and not all(grouped)

  def est(a, b):      # sum_i a_i b_i from group means (per coordinate)
    ga, gb = a.reshape(n, m // n, -1).mean(1), b.reshape(n, m // n, -1).mean(1)
    cov = (m // n) / (n - 1) * np.sum((ga - ga.mean(0)) * (gb - gb.mean(0)), 0)
    return (m - 1) * cov + m * ga.mean(0) * gb.mean(0)

  want_diag = [est(g, g) if gr else np.sum(g * g, 0) for g, gr in zip(leaves, grouped)]
  got_diag = [np.asarray(v).reshape(-1) for v in jax.tree.leaves(out.example_stats.diag_sum)]
  for got, want in zip(got_diag, want_diag):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.example_stats.sq_norm_sum, sum(np.sum(w) for w in want_diag), rtol=1e-5)
  mean = [g.mean(0) for g in leaves]
  a = sum(g @ v for g, v, gr in zip(leaves, mean, grouped) if not gr)
  b = sum(g @ v for g, v, gr in zip(leaves, mean, grouped) if gr)
  np.testing.assert_allclose(out.example_stats.inner_sum, np.sum(a + b), rtol=1e-5)
  want_sq = np.sum(a * a) + 2 * est(a[:, None], b[:, None])[0] + est(b[:, None], b[:, None])[0]
  np.testing.assert_allclose(out.example_stats.inner_sq_sum, want_sq, rtol=1e-4)


def test_example_groups_through_forward_fn_give_the_plain_masked_update():
  """Through a forward_fn (masked kernels), the grouped kernel gradients of the masked weights flow back
  through its vector-Jacobian product: the update equals the plain masked step's."""
  net, data, loss, rng = _cnn1d_problem(16, 3)
  masks = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5, x.dtype), net.params)
  forward_fn = lambda p, state: jax.tree.map(jnp.multiply, p, masks)

  tx = optax.sgd(0.5)
  mesh = S.data_mesh()
  state = S.replicate(S.init_state(net.params, tx), mesh)
  batch = S.shard_batch(data, mesh)
  plain, _ = S.make_train_step(S.stateless(loss), tx, forward_fn=forward_fn, donate=False)(state, batch)
  grouped, out = S.make_train_step(S.stateless(loss), tx, forward_fn=forward_fn, example_stats=("norm",),
                                   example_groups=4, donate=False)(state, batch)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(grouped.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(plain.params)[0], jax.tree.leaves(net.params)[0])
  assert float(out.example_stats.sq_norm_sum) > 0
