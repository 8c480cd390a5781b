"""prox.models._nnx: masked modules, the Fisher of a module, optimizer-state write-back into nnx.Optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prox import models
from prox.transforms import ewc as ewc_lib
from prox.transforms import forward_params, gpm as gpm_lib, hard_masked_params, nm, pruning, unfreeze


class Net(nnx.Module):
  """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: the layers whose train/eval behaviour differs."""

  def __init__(self, d_in=8, hidden=8, d_out=3, *, dtype=jnp.float32, rngs):
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.linear1 = nnx.Linear(d_in, hidden, **kw)
    self.batch_norm = nnx.BatchNorm(hidden, **kw)
    self.dropout = nnx.Dropout(0.5)
    self.linear2 = nnx.Linear(hidden, d_out, **kw)

  def __call__(self, x, rngs=None):
    h = nnx.relu(self.batch_norm(self.linear1(x)))
    return self.linear2(self.dropout(h, rngs=rngs))


def batch(n=16, d_in=8, d_out=3, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, d_in)).astype(dtype), "label": (np.arange(n) % d_out).astype(np.int32)}


def loss_fn(model, b, rngs=None):
  logits = model(b["image"], rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()


def pure(model):
  return jax.tree.map(np.asarray, models.params_of(model))


# ---------------------------------------------------------------------------------------------------
# Masked forward pass
# ---------------------------------------------------------------------------------------------------


def test_masked_module_equals_manual_masking_and_its_gradient_is_the_dense_straight_through_one():
  model = Net(rngs=nnx.Rngs(0))
  model.eval()  # deterministic forward, so the two computations see the same function
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="mdgf", total_steps=20, warmup_steps=0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  b = batch()
  opt_state = models.opt_state_of(optimizer)
  assert float(opt_state.beta) == 1.0  # move beta off 1 so the soft mask is not the identity
  opt_state = opt_state._replace(beta=jnp.asarray(0.25, jnp.float32))
  view = models.masked_module(model, opt_state)

  # Manual: split, mask the pure parameters by hand (w * (m + (1 - m) beta)), merge.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  manual = jax.tree.map(lambda w, m: w * np.where(m, 1.0, 0.25) if m is not None else w,
                        pure(model), jax.tree.map(np.asarray, opt_state.masks), is_leaf=lambda x: x is None)
  np.testing.assert_allclose(np.asarray(view.linear1.kernel[...]), manual["linear1"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(view.linear1.bias[...]), np.asarray(model.linear1.bias[...]))
  out_manual = nnx.merge(graphdef, jax.tree.map(jnp.asarray, manual), rest)(b["image"])
  np.testing.assert_allclose(np.asarray(view(b["image"])), np.asarray(out_manual), rtol=1e-6)

  # Gradient through the view == straight-through dense gradient of loss(forward_params(p, state)).
  grads = nnx.grad(loss_fn)(view, b)
  def functional_loss(p):
    return loss_fn(nnx.merge(graphdef, forward_params(p, opt_state), rest), b)
  ref = jax.grad(functional_loss)(nnx.as_pure(params))
  for g, r in zip(jax.tree.leaves(nnx.as_pure(grads)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)

  # Hard masks: w * m; exactly half of every masked kernel is zero.
  hard = models.masked_module(model, optimizer, hard=True)
  ref_hard = hard_masked_params(nnx.as_pure(params), opt_state)
  np.testing.assert_array_equal(np.asarray(hard.linear2.kernel[...]), np.asarray(ref_hard["linear2"]["kernel"]))
  assert float(jnp.mean(hard.linear1.kernel[...] == 0)) == 0.5
  # The model itself is unchanged.
  assert float(jnp.mean(model.linear1.kernel[...] == 0)) == 0.0


def test_masked_module_in_an_nnx_jit_train_step_trains_the_dense_weights_and_updates_batch_stats():
  model = Net(rngs=nnx.Rngs(0))
  tx = nm.nm_sparsity(optax.sgd(0.1), 2, 4, method="srste")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, b, rngs):
    loss, grads = nnx.value_and_grad(loss_fn)(models.masked_module(model, optimizer), b, rngs)
    optimizer.update(model, grads)
    return loss

  b = batch()
  mean0 = np.asarray(model.batch_norm.mean[...])
  w0 = pure(model)
  opt_state0 = models.opt_state_of(optimizer)
  rngs = nnx.Rngs(1)
  losses = [float(train_step(model, optimizer, b, rngs)) for _ in range(30)]
  assert losses[-1] < losses[0]
  # BatchNorm statistics updated through the view land in the model.
  assert not np.allclose(np.asarray(model.batch_norm.mean[...]), mean0)
  # The first update equals the hand-written one: SR-STE gradient of the masked forward, SGD 0.1.
  model1 = Net(rngs=nnx.Rngs(0))
  opt1 = nnx.Optimizer(model1, tx, wrt=nnx.Param)
  model1.eval()
  model.eval()
  graphdef, params, rest = nnx.split(model1, nnx.Param, ...)
  g = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, forward_params(p, opt_state0), rest), b))(nnx.as_pure(params))
  g = jax.tree.map(lambda gi, w, m: gi + 2e-4 * (1 - m) * w if m is not None else gi, g, nnx.as_pure(params),
                   opt_state0.masks, is_leaf=lambda x: x is None)
  expected = jax.tree.map(lambda w, gi: w - 0.1 * gi, w0, g)
  opt1.update(model1, nnx.grad(loss_fn)(models.masked_module(model1, opt1), b))
  for a, e in zip(jax.tree.leaves(pure(model1)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, np.asarray(e), rtol=1e-5, atol=1e-7)


def test_masked_module_with_pruning_masks_and_errors():
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, pruning.rigl(optax.sgd(0.1), sparsity=0.75, end_step=10), wrt=nnx.Param)
  view = models.masked_module(model, optimizer)
  masks = models.opt_state_of(optimizer).masks
  np.testing.assert_array_equal(np.asarray(view.linear1.kernel[...]),
                                np.asarray(model.linear1.kernel[...]) * np.asarray(masks["linear1"]["kernel"]))
  assert type(view) is Net and type(view.linear1.kernel) is nnx.Param
  with pytest.raises(ValueError, match=r"masked_module: the optimizer state holds no sparsity state"):
    models.masked_module(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))


# ---------------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------------


def test_module_fisher_equals_hand_computed_per_example_fisher_float64():
  with jax.enable_x64(True):
    model = Net(d_in=3, hidden=4, d_out=3, dtype=jnp.float64, rngs=nnx.Rngs(2))
    # Non-trivial running statistics: the Fisher must use them (evaluation mode), not batch statistics.
    # (flax creates the statistics in float32 whatever param_dtype; store them in float64)
    model.batch_norm.mean = nnx.BatchStat(jnp.asarray([0.3, -0.2, 0.1, 0.5], jnp.float64))
    model.batch_norm.var = nnx.BatchStat(jnp.asarray([2.0, 0.5, 1.5, 1.0], jnp.float64))
    b = batch(n=7, d_in=3, d_out=3, seed=4, dtype=np.float64)
    f = models.module_fisher(model, b)
    assert model.dropout.deterministic is False and model.batch_norm.use_running_average is False

    # Hand-computed: the network written out in numpy, per-example gradient of log softmax by hand
    # (backpropagation through linear2, ReLU, BatchNorm with running stats, linear1), F = mean g^2.
    p = jax.tree.map(np.asarray, models.params_of(model))
    mu, var = np.asarray(model.batch_norm.mean[...]), np.asarray(model.batch_norm.var[...])
    eps = model.batch_norm.epsilon
    acc = {k: np.zeros_like(v) for k, v in
           {"w1": p["linear1"]["kernel"], "b1": p["linear1"]["bias"], "s": p["batch_norm"]["scale"],
            "c": p["batch_norm"]["bias"], "w2": p["linear2"]["kernel"], "b2": p["linear2"]["bias"]}.items()}
    for x, y in zip(b["image"], b["label"]):
      z1 = x @ p["linear1"]["kernel"] + p["linear1"]["bias"]
      zhat = (z1 - mu) / np.sqrt(var + eps)
      a = zhat * p["batch_norm"]["scale"] + p["batch_norm"]["bias"]
      h = np.maximum(a, 0)
      logits = h @ p["linear2"]["kernel"] + p["linear2"]["bias"]
      prob = np.exp(logits - logits.max())
      prob /= prob.sum()
      d_logits = np.eye(3)[y] - prob                      # d log p_y / d logits
      d_h = p["linear2"]["kernel"] @ d_logits
      d_a = d_h * (a > 0)
      d_z1 = d_a * p["batch_norm"]["scale"] / np.sqrt(var + eps)
      grads = {"w1": np.outer(x, d_z1), "b1": d_z1, "s": d_a * zhat, "c": d_a, "w2": np.outer(h, d_logits),
               "b2": d_logits}
      for k in acc:
        acc[k] += grads[k] ** 2 / len(b["label"])
    np.testing.assert_allclose(np.asarray(f["linear1"]["kernel"]), acc["w1"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(f["linear1"]["bias"]), acc["b1"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(f["batch_norm"]["scale"]), acc["s"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(f["batch_norm"]["bias"]), acc["c"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(f["linear2"]["kernel"]), acc["w2"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(f["linear2"]["bias"]), acc["b2"], rtol=1e-10)
    assert f["linear1"]["kernel"].dtype == jnp.float64

    # module_logprob + diagonal_fisher is the same computation, and (x, y) pairs work too.
    fn, params = models.module_logprob(model)
    f2 = ewc_lib.diagonal_fisher(fn, params, (b["image"], b["label"]))
    for a2, a1 in zip(jax.tree.leaves(f2), jax.tree.leaves(f)):
      np.testing.assert_allclose(np.asarray(a2), np.asarray(a1), rtol=1e-12)


def test_module_fisher_custom_call_and_compiles_once():
  model = Net(rngs=nnx.Rngs(0))
  call = lambda m, x: m(x, None)  # noqa: E731  (a model called as model(x, rngs))
  logprob = models.classifier_logprob(call)
  assert models.classifier_logprob(call) is logprob
  b = batch()
  f1 = models.module_fisher(model, b, logprob_fn=logprob)
  size = models._nnx._module_fisher._cache_size()
  model.linear1.kernel[...] = model.linear1.kernel[...] * 2
  f2 = models.module_fisher(model, b, logprob_fn=logprob)
  assert models._nnx._module_fisher._cache_size() == size
  assert not np.allclose(np.asarray(f1["linear1"]["kernel"]), np.asarray(f2["linear1"]["kernel"]))


# ---------------------------------------------------------------------------------------------------
# Optimizer-state write-back
# ---------------------------------------------------------------------------------------------------


def test_update_opt_state_consolidates_ewc_inside_the_nnx_optimizer_and_the_next_step_feels_it():
  model = Net(rngs=nnx.Rngs(0))
  lam = 50.0
  optimizer = nnx.Optimizer(model, optax.chain(ewc_lib.ewc(lam), optax.sgd(0.1)), wrt=nnx.Param)
  b = batch()
  fisher = models.module_fisher(model, b)
  anchor = pure(model)
  new = models.update_opt_state(optimizer, ewc_lib.consolidate_opt_state, models.params_of(model), fisher)
  state = ewc_lib.find_ewc_state(models.opt_state_of(optimizer))
  assert int(state.num_tasks) == 1
  for got, want in zip(jax.tree.leaves(state.fisher), jax.tree.leaves(fisher)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert ewc_lib.find_ewc_state(new).num_tasks == 1
  # The optimizer's own update now adds lambda F (w - w*): move the weights, step with zero gradients.
  model.linear1.kernel[...] = model.linear1.kernel[...] + 1.0
  zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zero)
  moved = anchor["linear1"]["kernel"] + 1.0
  expected = moved - 0.1 * lam * np.asarray(fisher["linear1"]["kernel"]) * 1.0
  np.testing.assert_allclose(np.asarray(model.linear1.kernel[...]), expected, rtol=1e-5)


def test_update_opt_state_gpm_bases_and_unfreezing_reset():
  model = Net(rngs=nnx.Rngs(0))
  mask = lambda p: jax.tree.map(lambda x: jnp.ndim(x) == 2, p)  # noqa: E731
  optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), gpm_lib.gpm(mask)), wrt=nnx.Param)
  acts = jax.tree.map(lambda _: None, models.params_of(model))
  acts["linear1"]["kernel"] = jnp.asarray(batch()["image"][:, :8])
  acts["linear2"]["kernel"] = jnp.ones((4, 8))
  models.update_opt_state(optimizer, gpm_lib.gpm_update_opt_state, acts, 1.0)
  ranks = gpm_lib.find_gpm_state(models.opt_state_of(optimizer)).ranks
  assert int(ranks["linear1"]["kernel"]) == 8 and int(ranks["linear2"]["kernel"]) == 1

  # Unfreezing: restart the schedule (a new task) by resetting the per-group step counters.
  tx = unfreeze.progressive_unfreezing(optax.sgd(0.1), ["linear2", "linear1"], interval=2)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  for _ in range(3):
    opt.update(model, grads)
  steps = lambda: [int(x) for x in jax.tree.leaves(models.opt_state_of(opt))]  # noqa: E731
  assert steps() == [3, 3]
  models.update_opt_state(opt, lambda s: jax.tree.map(jnp.zeros_like, s))
  assert steps() == [0, 0]
  before = np.asarray(model.linear1.kernel[...])
  opt.update(model, grads)  # group 1 (linear1) is frozen again until step 2
  np.testing.assert_array_equal(np.asarray(model.linear1.kernel[...]), before)


def test_set_opt_state_refuses_a_different_structure_shape_or_dtype():
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  state = models.opt_state_of(optimizer)
  with pytest.raises(ValueError, match=r"set_opt_state: .*dtype float16 != float32"):
    models.set_opt_state(optimizer, jax.tree.map(lambda x: x.astype(jnp.float16) if x.ndim == 2 else x, state))
  with pytest.raises(ValueError, match=r"set_opt_state: .*shape \(1,\) != \(8, 8\)"):
    models.set_opt_state(optimizer, jax.tree.map(lambda x: jnp.zeros(1) if x.shape == (8, 8) else x, state))
  with pytest.raises(ValueError, match="set_opt_state: "):
    models.set_opt_state(optimizer, optax.sgd(0.1).init(models.params_of(model)))
  with pytest.raises(TypeError, match="expected an nnx.Optimizer"):
    models.set_opt_state(state, state)


def test_update_opt_state_inside_nnx_jit():
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(ewc_lib.ewc(1.0), optax.sgd(0.1)), wrt=nnx.Param)
  fisher = jax.tree.map(jnp.ones_like, models.params_of(model))

  @nnx.jit
  def boundary(model, optimizer, fisher):
    models.update_opt_state(optimizer, ewc_lib.consolidate_opt_state, models.params_of(model), fisher)

  boundary(model, optimizer, fisher)
  assert int(ewc_lib.find_ewc_state(models.opt_state_of(optimizer)).num_tasks) == 1


def test_classifier_logprob_with_a_class_mask_float64():
  with jax.enable_x64(True):
    model = Net(d_in=3, hidden=4, d_out=5, dtype=jnp.float64, rngs=nnx.Rngs(1))
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=3))
    mask = jnp.asarray([False, True, False, True, True])
    example = {"image": x, "label": jnp.asarray(3), "class_mask": mask}
    z = np.asarray(model(x[None]))[0]
    want = z[3] - np.log(np.sum(np.exp(z[[1, 3, 4]])))
    got = models.classifier_logprob(classes="class_mask")(model, example)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    # Without the mask: all five classes compete.
    np.testing.assert_allclose(float(models.classifier_logprob()(model, example)),
                               z[3] - np.log(np.sum(np.exp(z))), rtol=1e-12)
    # The Fisher through the masked log-prob is finite, and zero for the head rows of masked classes.
    batch = {"image": jnp.stack([x, -x]), "label": jnp.asarray([3, 1]), "class_mask": jnp.stack([mask, mask])}
    f = models.module_fisher(model, batch, logprob_fn=models.classifier_logprob(classes="class_mask"))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(f))
    np.testing.assert_array_equal(np.asarray(f["linear2"]["kernel"])[:, [0, 2]], 0.0)
    assert np.all(np.asarray(f["linear2"]["kernel"])[:, [1, 3, 4]].sum(0) > 0)
    with pytest.raises(ValueError, match="classes='class_mask' needs examples that are mappings"):
      models.classifier_logprob(classes="class_mask")(model, (x, 3))
