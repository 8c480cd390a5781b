"""Tests for prox.losses._distillation: KD, hidden-state, loss mix, DPO / weak-to-strong, boosted students."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from prox import losses as L


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------ KD


def test_kd_loss_hand_values():
  # s = (0, 0), t = (log 3, 0): p_t = (3/4, 1/4), p_s = (1/2, 1/2).
  with jax.enable_x64(True):
    s = jnp.zeros((1, 2), jnp.float64)
    t = jnp.array([[math.log(3.0), 0.0]], jnp.float64)
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(L.kd_loss(s, t, temperature=1.0)[0]) == pytest.approx(kl1, rel=1e-12)
    # T = 2: p_t = (sqrt3, 1) / (1 + sqrt3); the loss carries the factor T^2 = 4.
    q = math.sqrt(3.0) / (1.0 + math.sqrt(3.0))
    kl2 = q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
    assert float(L.kd_loss(s, t, temperature=2.0)[0]) == pytest.approx(4.0 * kl2, rel=1e-12)
    assert float(L.kd_loss(t, t, temperature=3.0)[0]) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_gradient_is_temperature_times_probability_gap(temperature):
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    s = jnp.asarray(rng.normal(size=(3, 5)) * 2)
    t = jnp.asarray(rng.normal(size=(3, 5)) * 2)
    g = jax.grad(lambda s: jnp.sum(L.kd_loss(s, t, temperature=temperature)))(s)
    want = temperature * (_softmax(np.asarray(s) / temperature) - _softmax(np.asarray(t) / temperature))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-10, atol=1e-13)


def test_distillation_loss_mixes_soft_and_hard():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  y = jnp.array([0, 2, 1, 1])
  ce = optax.softmax_cross_entropy_with_integer_labels(s, y)
  kd = L.kd_loss(s, t, temperature=3.0)
  got = L.distillation_loss(s, t, y, temperature=3.0, alpha=0.7)
  np.testing.assert_allclose(got, 0.7 * kd + 0.3 * ce, rtol=1e-6)
  np.testing.assert_allclose(L.distillation_loss(s, t, y, temperature=3.0, alpha=0.0), ce, rtol=1e-6)
  np.testing.assert_allclose(L.distillation_loss(s, t, y, temperature=3.0, alpha=1.0), kd, rtol=1e-6)
  # label distributions instead of integer labels; alpha traced under jit
  onehot = jax.nn.one_hot(y, 3)
  f = jax.jit(lambda a: L.distillation_loss(s, t, onehot, temperature=3.0, alpha=a))
  np.testing.assert_allclose(f(0.7), got, rtol=1e-5)


def test_kd_dtypes_and_bad_input():
  s = jnp.ones((2, 4), jnp.bfloat16)
  assert L.kd_loss(s, s * 2, temperature=2.0).dtype == jnp.float32
  with pytest.raises(ValueError, match="temperature"):
    L.kd_loss(s, s, temperature=0.0)
  with pytest.raises(ValueError, match="same shape"):
    L.kd_loss(jnp.ones((2, 4)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="alpha"):
    L.distillation_loss(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.array([0, 1]), alpha=1.5)
  with pytest.raises(ValueError, match="labels"):
    L.distillation_loss(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.array([0, 1, 2]))


# ------------------------------------------------------------------------------------------ hidden


def test_hidden_loss_hand_value_and_token_axes():
  proj = {"kernel": jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]), "bias": jnp.array([0.0, 1.0, 0.0])}
  hs = jnp.array([[[1.0, 2.0]], [[0.0, 0.0]]])            # [B=2, L=1, d_S=2]
  ht = jnp.array([[[1.0, 3.0, 1.0]], [[1.0, 1.0, 0.0]]])  # [B=2, L=1, d_T=3]
  # projected: [1, 3, 0] and [0, 1, 0] -> squared errors (0, 0, 1) and (1, 0, 0)
  np.testing.assert_allclose(L.hidden_distillation_loss(hs, ht, proj), [1 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(L.hidden_distillation_loss(ht, ht), [0.0, 0.0])
  with pytest.raises(ValueError, match="projection"):
    L.hidden_distillation_loss(ht, ht, proj)


def test_hidden_projection_is_trained_with_the_student():
  key_w, key_x, key_p = jax.random.split(jax.random.key(0), 3)
  teacher_map = jax.random.normal(key_w, (4, 6))
  x = jax.random.normal(key_x, (64, 4))
  proj = L.hidden_projection_init(key_p, 4, 6)
  assert proj["kernel"].shape == (4, 6) and proj["bias"].shape == (6,)
  tx = optax.adam(0.05)
  opt = tx.init(proj)

  @jax.jit
  def step(proj, opt):
    loss, g = jax.value_and_grad(lambda p: L.hidden_distillation_loss(x, x @ teacher_map, p).mean())(proj)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(proj, updates), opt, loss

  first = None
  for _ in range(300):
    proj, opt, loss = step(proj, opt)
    first = loss if first is None else first
  assert float(loss) < 1e-3 * float(first)
  with pytest.raises(ValueError, match="student_width"):
    L.hidden_projection_init(key_p, 0, 6)


# ------------------------------------------------------------------------------------------ loss mix


def test_loss_mix_shapes_hand_values():
  lin = L.loss_mix([[1.0, 0.0], [0.0, 1.0]], total=200)
  np.testing.assert_allclose(lin(50), [0.75, 0.25])
  np.testing.assert_allclose(lin(-5), [1.0, 0.0])
  np.testing.assert_allclose(lin(1000), [0.0, 1.0])
  cos = L.loss_mix([[1.0, 0.0], [0.0, 1.0]], shape="cosine")
  np.testing.assert_allclose(cos(0.25), [1 - (1 - math.cos(math.pi / 4)) / 2, (1 - math.cos(math.pi / 4)) / 2],
                             rtol=1e-6)
  np.testing.assert_allclose(cos(0.5), [0.5, 0.5], atol=1e-7)
  three = L.loss_mix([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], positions=[0.0, 0.2, 1.0], total=100)
  np.testing.assert_allclose(three(10), [0.5, 0.5, 0.0], atol=1e-7)
  np.testing.assert_allclose(three(60), [0.0, 0.5, 1.0], atol=1e-7)
  step = L.loss_mix([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], shape="step", total=90)
  assert [step(c).tolist() for c in (0, 29, 30, 59, 60, 90)] == [
      [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]
  jitted = jax.jit(step)
  assert jitted(jnp.int32(45)).tolist() == [0.0, 1.0] and jitted(jnp.int32(70)).tolist() == [0.5, 0.5]
  assert jitted._cache_size() == 1
  np.testing.assert_allclose(L.loss_mix([[0.3, 0.7]])(0.9), [0.3, 0.7])


def test_loss_mix_bad_input():
  with pytest.raises(ValueError, match="shape"):
    L.loss_mix([[1.0], [0.0]], shape="exp")
  with pytest.raises(ValueError, match="positions"):
    L.loss_mix([[1.0], [0.0]], positions=[0.5, 0.5])
  with pytest.raises(ValueError, match="weights"):
    L.loss_mix([[1.0, 0.0], [1.0]])
  with pytest.raises(ValueError, match="total"):
    L.loss_mix([[1.0], [0.0]], total=0)


# ------------------------------------------------------------------------------------------ DPO


def test_dpo_loss_and_gradient_two_examples():
  with jax.enable_x64(True):
    pc, pr = jnp.array([-1.0, -2.0]), jnp.array([-2.0, -1.0])
    rc = rr = jnp.array([-1.5, -1.5])
    # margins beta * ((pc - rc) - (pr - rr)) = 0.5 * (1, -1) = (0.5, -0.5)
    loss = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))], rtol=1e-12)
    grads = jax.grad(lambda *a: jnp.sum(L.dpo_loss(*a, beta=0.5)), argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = np.array([-0.5 * sig(-0.5), -0.5 * sig(0.5)])
    np.testing.assert_allclose(grads[0], want, rtol=1e-12)
    np.testing.assert_allclose(grads[1], -want, rtol=1e-12)
    np.testing.assert_array_equal(grads[2], [0.0, 0.0])   # the reference is frozen
    np.testing.assert_array_equal(grads[3], [0.0, 0.0])
  with pytest.raises(ValueError, match="beta"):
    L.dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_sequence_log_prob_masks_prompt_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))  # [B=1, L=3, V=2]
  targets = jnp.array([[0, 1, 0]])
  mask = jnp.array([[False, True, True]])
  np.testing.assert_allclose(L.sequence_log_prob(logits, targets, mask), [math.log(0.75 * 0.9)], rtol=1e-6)
  np.testing.assert_allclose(L.sequence_log_prob(logits[:, 1], targets[:, 1]), [math.log(0.75)], rtol=1e-6)


def test_agreement_and_weak_to_strong_masks():
  weak = jnp.array([0, 1, 2, 3])
  strong_scores = jnp.array([[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
  valid = jnp.array([True, True, True, False])
  assert L.agreement_mask(weak, strong_scores).tolist() == [True, False, True, True]
  assert L.agreement_mask(weak, strong_scores, valid=valid).tolist() == [True, False, True, False]
  assert L.weak_to_strong_mask(weak, mode="naive").tolist() == [True] * 4
  assert L.weak_to_strong_mask(weak, mode="naive", valid=valid).tolist() == [True, True, True, False]
  assert jax.jit(L.weak_to_strong_mask)(weak, jnp.array([0, 2, 2, 3])).tolist() == [True, False, True, True]
  with pytest.raises(ValueError, match="strong"):
    L.weak_to_strong_mask(weak)
  with pytest.raises(ValueError, match="mode"):
    L.weak_to_strong_mask(weak, weak, mode="all")


def test_preference_pairs_hand_cases():
  samples = jnp.array([
      [1, 1, 1, 2, 3],     # c = 0.6, weak = majority -> (weak, first disagreeing sample 3)
      [1, 1, 1, 1, 1],     # every sample agrees with the weak answer -> no negative, no pair
      [2, 2, 2, 2, 1],     # c = 0.8, weak wrong -> (first majority sample 0, weak)
      [2, 2, 2, 1, 1],     # c = 0.6 < 0.8, weak wrong -> no pair
      [1, 2, 3, 4, 4],     # c = 0.4 < 0.6 -> no pair
      [7, 8, 8, 7, 9],     # tie 7/8: the answer sampled first (7) is the majority; c = 0.4
      [-1, -1, -1, 2, 2],  # majority unreadable -> no pair
  ])
  weak = jnp.array([1, 1, 3, 3, 4, 7, 2])
  pairs = L.preference_pairs(weak, samples, invalid_answer=-1)
  assert pairs.valid.tolist() == [True, False, True, False, False, False, False]
  assert pairs.chosen.tolist()[:3:2] == [5, 0] and pairs.rejected.tolist()[:3:2] == [3, 5]
  assert pairs.majority.tolist() == [1, 1, 2, 2, 4, 7, -1]
  np.testing.assert_allclose(pairs.confidence, [0.6, 1.0, 0.8, 0.6, 0.4, 0.4, 0.6])
  # random choice: uniform over the valid candidates
  row = jnp.array([[5, 5, 5, 5, 6, 7, 8, 5, 5, 5]])
  seen = set()
  draw = jax.jit(lambda k: L.preference_pairs(jnp.array([5]), row, key=k))
  for k in jax.random.split(jax.random.key(0), 60):
    p = draw(k)
    assert bool(p.valid[0]) and int(p.chosen[0]) == 10
    seen.add(int(p.rejected[0]))
  assert seen == {4, 5, 6}


def _reference_pairs(weak, samples, lo=0.6, hi=0.8):
  """The stage-II rule written out in plain Python (first candidate instead of a random one)."""
  out = []
  for w, row in zip(weak.tolist(), samples.tolist()):
    counts = {}
    for a in row:
      counts[a] = counts.get(a, 0) + 1
    best = max(counts.values())
    majority = next(a for a in row if counts[a] == best)
    c = best / len(row)
    if c < lo:
      out.append(None)
    elif w == majority:
      neg = [i for i, a in enumerate(row) if a != majority]
      out.append((len(row), neg[0]) if neg else None)
    elif c >= hi:
      out.append(([i for i, a in enumerate(row) if a == majority][0], len(row)))
    else:
      out.append(None)
  return out


@given(st.integers(0, 2**31 - 1))
def test_preference_pairs_match_the_written_rule(seed):
  rng = np.random.default_rng(seed)
  samples = rng.integers(0, 3, size=(16, 6))
  weak = rng.integers(0, 3, size=16)
  pairs = L.preference_pairs(jnp.asarray(weak), jnp.asarray(samples))
  got = [(int(c), int(r)) if v else None for c, r, v in zip(pairs.chosen, pairs.rejected, pairs.valid)]
  assert got == _reference_pairs(weak, samples)


# ------------------------------------------------------------------------------------------ students


def test_residual_target_and_ensemble_hand_example():
  teacher = jnp.array([[3.0, 1.0, 0.0]])
  z1 = jnp.array([[1.0, 1.0, 1.0]])
  z2 = jnp.array([[1.5, -0.5, -1.0]])
  np.testing.assert_allclose(L.residual_target(teacher), teacher)
  np.testing.assert_allclose(L.residual_target(teacher, [z1]), [[2.0, 0.0, -1.0]])
  np.testing.assert_allclose(L.residual_target(teacher, jnp.stack([z1, z2])), [[0.5, 0.5, 0.0]])
  stacked = jnp.stack([z1, z2, z2])
  ens = jax.jit(lambda k: L.ensemble_logits(stacked, count=k))
  np.testing.assert_allclose(ens(1), z1)
  np.testing.assert_allclose(ens(2), [[2.5, 0.5, 0.0]])
  np.testing.assert_allclose(ens(3), [[4.0, 0.0, -1.0]])
  assert ens._cache_size() == 1
  np.testing.assert_allclose(L.residual_target(teacher, stacked, count=2), [[0.5, 0.5, 0.0]])
  # residual_loss: 1/2 ||z - r||^2, gradient z - r
  r = L.residual_target(teacher, [z1])
  assert float(L.residual_loss(z2, r)[0]) == pytest.approx(0.5 * (0.25 + 0.25 + 0.0))
  np.testing.assert_allclose(jax.grad(lambda z: L.residual_loss(z, r).sum())(z2), z2 - r)


def test_boosted_students_recover_the_teacher_greedily():
  """Rank-1 linear students fitted in turn to the residual of a linear teacher's logits: the ensemble of
  k students is the best rank-k approximation of the teacher (Eckart-Young), so the residual shrinks to
  the teacher's trailing singular values."""
  rng = np.random.default_rng(0)
  x = np.linalg.qr(rng.normal(size=(40, 6)))[0]                # orthonormal inputs
  w_teacher = rng.normal(size=(6, 5))
  teacher = jnp.asarray(x @ w_teacher)
  students = []
  for k in range(5):
    r = np.asarray(L.residual_target(teacher, students or None))
    w_fit = x.T @ r                                            # least-squares map onto the residual
    u, s, vt = np.linalg.svd(w_fit)
    students.append(jnp.asarray(x @ (s[0] * np.outer(u[:, 0], vt[0]))))   # a rank-1 student
    err = np.linalg.norm(np.asarray(teacher - L.ensemble_logits(students)))
    sv = np.linalg.svd(w_teacher, compute_uv=False)
    assert err == pytest.approx(np.sqrt(np.sum(sv[k + 1:] ** 2)), abs=1e-5)


def test_boosted_distillation_gradient_is_the_ensembles():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  prev = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  y = jnp.array([0, 1, 3])
  f = lambda z, prev: L.boosted_distillation_loss(z, prev, t, y, temperature=2.0, alpha=0.6).sum()
  g_z, g_prev = jax.grad(f, argnums=(0, 1))(z, prev)
  want = jax.grad(lambda e: L.distillation_loss(e, t, y, temperature=2.0, alpha=0.6).sum())(prev + z)
  np.testing.assert_allclose(g_z, want, rtol=1e-5)
  np.testing.assert_array_equal(g_prev, np.zeros((3, 4)))     # earlier students are frozen


def test_flops_helpers():
  mlp = {"dense0": {"kernel": np.zeros((64, 512)), "bias": np.zeros(512)},
         "dense1": {"kernel": np.zeros((512, 512)), "bias": np.zeros(512)},
         "head": {"kernel": np.zeros((512, 10)), "bias": np.zeros(10)}}
  assert L.dense_conv_flops(mlp) == 2 * (64 * 512 + 512 * 512 + 512 * 10)
  cnn = {"conv1": {"kernel": np.zeros((3, 3, 1, 8)), "bias": np.zeros(8)},
         "head": {"kernel": np.zeros((128, 10))}}
  assert L.dense_conv_flops(cnn, conv_positions=64) == 2 * 3 * 3 * 8 * 64 + 2 * 128 * 10
  assert L.dense_conv_flops(cnn, conv_positions={"['conv1']['kernel']": 16}) == 2 * 72 * 16 + 2 * 1280
  with pytest.raises(ValueError, match="conv1"):
    L.dense_conv_flops(cnn, conv_positions={})
  np.testing.assert_allclose(L.ensemble_flops([1.0, 2.0, 3.0]), [1.0, 3.0, 6.0])
  np.testing.assert_allclose(L.ensemble_flops([1.0, 2.0, 3.0], 12.0), [1 / 12, 0.25, 0.5])
