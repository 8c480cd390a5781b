"""LAPP: scores, soft-to-hard masks, temperature and budget schedules, FLOPs penalty, bypass."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import transforms as T
from prox.models import functional, make_model, structure_of

MODEL = make_model("mlp", input_shape=(4, 4, 1), num_classes=3, hidden=(8, 6))
F = functional(MODEL)
S = structure_of("mlp", F.params, input_shape=(4, 4, 1))
FULL = T.full_flops(S)  # 16*8 + 8*6 + 6*3 = 194


def test_scores_are_mean_normalised_l1_norms_without_gradient():
  s = T.lapp_scores(S, F.params)
  k = F.params["hidden"]["dense0"]
  imp = np.abs(k["kernel"]).sum(0) + np.abs(k["bias"])
  np.testing.assert_allclose(s["dense0"], imp / imp.mean(), rtol=1e-5)
  g = jax.grad(lambda p: sum(v.sum() for v in T.lapp_scores(S, p).values()))(F.params)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(g))


def test_schedules_and_masks_by_hand():
  lp = T.lapp(S, flops_target=0.5, start_step=10, end_step=30, temperature=(1.0, 100.0))
  np.testing.assert_allclose(float(lp.temperature(0)), 1.0)
  np.testing.assert_allclose(float(lp.temperature(20)), 10.0, rtol=1e-5)  # geometric midpoint
  np.testing.assert_allclose(float(lp.temperature(99)), 100.0, rtol=1e-5)
  np.testing.assert_allclose(float(lp.budget(10)), 1.0)
  np.testing.assert_allclose(float(lp.budget(20)), 1 - 0.5 * (1 - 0.5 ** 3), rtol=1e-6)
  np.testing.assert_allclose(float(lp.budget(40)), 0.5, rtol=1e-6)
  th = {"dense0": jnp.float32(1.0), "dense1": jnp.float32(0.5)}
  m = lp.masks(F.params, th, 20)
  s = T.lapp_scores(S, F.params)
  np.testing.assert_allclose(m["dense0"], jax.nn.sigmoid(10.0 * (s["dense0"] - 1.0)), rtol=1e-5)
  hard = lp.hard_masks(F.params, th)
  np.testing.assert_array_equal(hard["dense1"], np.asarray(s["dense1"]) > 0.5)
  # Every group keeps its best channel even with a threshold above all scores.
  hard = lp.hard_masks(F.params, {"dense0": jnp.float32(99.0), "dense1": jnp.float32(99.0)})
  assert int(hard["dense0"].sum()) == 1 and bool(hard["dense0"][jnp.argmax(s["dense0"])])


def test_penalty_is_a_hinge_square_on_the_flops_fraction():
  lp = T.lapp(S, flops_target=0.5, start_step=0, end_step=1, penalty_weight=3.0)
  ones = T.full_channel_masks(S, jnp.float32)
  np.testing.assert_allclose(float(lp.penalty(ones, 5)), 3.0 * 0.5 ** 2, rtol=1e-6)
  half = {"dense0": jnp.full(8, 0.5), "dense1": jnp.full(6, 0.5)}
  frac = (16 * 4 + 4 * 3 + 3 * 3) / FULL
  np.testing.assert_allclose(float(lp.penalty(half, 5)), 3.0 * max(frac - 0.5, 0) ** 2, rtol=1e-5)
  assert float(lp.penalty(ones, 0)) == 0.0  # budget 1 at the start
  # Raising a threshold lowers the penalty: its gradient is negative.
  th = lp.init_thresholds()
  g = jax.grad(lambda t: lp.penalty(lp.masks(F.params, t, 0), 5))(th)  # T = 1: not saturated
  assert float(g["dense0"]) < 0 and float(g["dense1"]) < 0


def test_thresholds_learn_to_meet_the_budget():
  """Task loss + penalty, weights and thresholds trained together: the hard network ends within budget."""
  lp = T.lapp(S, flops_target=0.4, start_step=0, end_step=150, temperature=(2.0, 50.0), penalty_weight=50.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 64))
  params = {"model": F.params, "thresholds": lp.init_thresholds()}
  tx = optax.adam(3e-2)

  def loss(p, step):
    m = lp.masks(p["model"], p["thresholds"], step)
    logits, _ = F.apply(T.apply_channel_masks(S, m, p["model"]), {}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + lp.penalty(m, step)

  @jax.jit
  def step(p, o, t):
    g = jax.grad(loss)(p, t)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt = tx.init(params)
  for t in range(200):
    params, opt = step(params, opt, t)
  hard = lp.hard_masks(params["model"], params["thresholds"])
  assert float(T.masked_flops(S, hard)) / FULL <= 0.4 + 0.03
  assert all(int(v.sum()) >= 1 for v in hard.values())


def test_bypass():
  k = T.bypass_init(3, 5)
  assert k.shape == (3, 5) and float(jnp.abs(k).max()) == 0
  x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  y = T.bypass_apply(w, x, stride=2)
  assert y.shape == (2, 3, 3, 5)
  np.testing.assert_allclose(y[0, 1, 2], x[0, 2, 4] @ w, rtol=1e-5)
  assert T.bypass_flops(16, 16, 32 * 32) == 16 * 16 * 1024


def test_bad_options():
  with pytest.raises(ValueError, match="temperature"):
    T.lapp(S, flops_target=0.5, temperature=(0.0, 1.0))
  with pytest.raises(ValueError, match="target"):
    T.lapp(S, flops_target=0.0)
