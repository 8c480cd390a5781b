"""Tests for prox.tasks._prototypes: OnPro's feedback sampler (pair probabilities, draw frequencies, mixup)
and ProtoCL's conjugate prototypes against closed-form posteriors (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from prox.tasks import replay
from prox.tasks._prototypes import _beta, bayesian_prototypes, mixup_inputs, prototype_feedback


def _memory(labels, cap=None, d=2):
  labels = np.asarray(labels, np.int32)
  cap = cap or len(labels)
  x = np.stack([labels.astype(np.float32) * 10 + np.arange(len(labels)) * 0.01] * d, 1)
  mem = replay.reservoir_init({"x": jnp.zeros((d,), jnp.float32), "label": jnp.int32(0)}, cap)
  return replay.reservoir_add(mem, {"x": jnp.asarray(x), "label": jnp.asarray(labels)}, jax.random.key(0))


def _means():
  means = np.zeros((4, 2), np.float32)
  means[0], means[1], means[3] = [0, 0], [1, 0], [0, 3]          # class 2 absent
  return jnp.asarray(means), jnp.asarray([True, True, False, True])


def test_pair_probabilities_are_softmax_of_inverse_distances():
  fb = prototype_feedback(4)
  state = fb.update(fb.init(2), *_means())
  p = np.asarray(fb.pair_probabilities(state))
  d01, d03, d13 = 1.0, 3.0, np.sqrt(10.0)
  e = np.exp([1 / d01, 1 / d03, 1 / d13])
  e /= e.sum()
  np.testing.assert_allclose([p[0, 1], p[0, 3], p[1, 3]], e, rtol=1e-5)
  mask = np.zeros((4, 4), bool)
  mask[0, 1] = mask[0, 3] = mask[1, 3] = True
  assert np.all(p[~mask] == 0)


def test_feedback_rows_follow_the_pair_probabilities_and_their_classes():
  fb = prototype_feedback(4, base_rate=0.25, mixup_p=0.6)
  state = fb.update(fb.init(2), *_means())
  memory = _memory([0, 1, 2, 3] * 25)
  draw = jax.jit(jax.vmap(lambda k: fb.sample(state, memory, k, 40)))
  out = draw(jax.random.split(jax.random.key(3), 100))          # 100 draws x 30 feedback rows
  fbr = np.asarray(out.from_feedback)
  assert fbr[:, :10].sum() == 0 and fbr[:, 10:].all()
  a = np.asarray(out.labels_first)[:, 10:].ravel()
  b = np.asarray(out.labels_second)[:, 10:].ravel()
  assert np.all(a < b) and not np.any(np.isin(np.concatenate([a, b]), [2]))
  p = np.asarray(fb.pair_probabilities(state))
  n = a.size
  for (i, j) in ((0, 1), (0, 3), (1, 3)):
    freq = np.mean((a == i) & (b == j))
    assert abs(freq - p[i, j]) < 4 * np.sqrt(p[i, j] * (1 - p[i, j]) / n), (i, j, freq, p[i, j])
  # the stored examples carry the drawn labels
  x = np.asarray(out.first["x"])[:, 10:, 0].ravel()
  np.testing.assert_array_equal(np.floor(x / 10 + 1e-6).astype(int), a)
  # mixup: a row is mixed with probability p; feedback lam ~ Beta(0.4, 0.4) (mean 1/2), base lam ~ U(0, 0.6)
  lam = np.asarray(out.lam)
  assert abs(np.mean(lam[:, 10:] > 0) - 0.6) < 0.03
  assert abs(np.mean(lam[:, 10:][lam[:, 10:] > 0]) - 0.5) < 0.03
  base = lam[:, :10]
  assert abs(np.mean(base > 0) - 0.6) < 0.05 and base.max() <= 0.6
  assert abs(np.mean(base[base > 0]) - 0.3) < 0.03
  assert bool(np.all(out.valid))


def test_without_pairs_or_memory():
  fb = prototype_feedback(3)                                    # one shape throughout: one compile
  memory = _memory([0, 1, 2, 0, 1], cap=8)
  out = fb.sample(fb.init(2), memory, jax.random.key(0), 8)     # no class in the means: uniform rows
  assert not np.any(np.asarray(out.from_feedback))
  assert np.asarray(out.valid).tolist() == [True] * 5 + [False] + [True, True]  # base 6 rows from 5 stored
  empty = replay.reservoir_init({"x": jnp.zeros((2,), jnp.float32), "label": jnp.int32(0)}, 8)
  assert not np.any(np.asarray(fb.sample(fb.init(2), empty, jax.random.key(0), 8).valid))
  # a class of the means that the memory lost: a stored example stands in
  state = fb.update(fb.init(2), jnp.asarray([[0.0, 0], [1, 0], [5, 5]]), jnp.asarray([True, True, True]))
  only01 = _memory([0, 1, 0, 1], cap=8)
  out = fb.sample(state, only01, jax.random.key(1), 8)
  assert np.asarray(out.from_feedback).sum() == 2
  assert set(np.asarray(out.labels_second)[np.asarray(out.valid)].tolist()) <= {0, 1}


def test_johnk_beta_sampler_matches_the_beta_distribution():
  for a, b in ((0.4, 0.4), (2.0, 0.5)):
    x = np.asarray(jax.jit(lambda k: _beta(k, a, b, (50_000,)))(jax.random.key(0)))
    assert stats.kstest(x, stats.beta(a, b).cdf).pvalue > 1e-3, (a, b)
  # a wrong sampler (e.g. X alone, not X / (X + Y)) is far off
  assert stats.kstest(np.random.default_rng(0).uniform(size=50_000) ** (1 / 0.4), stats.beta(0.4, 0.4).cdf).pvalue < 1e-6


def test_mixup_inputs_mixes_floats_only():
  first = {"x": jnp.asarray([[1.0, 1.0], [2.0, 2.0]]), "label": jnp.asarray([1, 2])}
  second = {"x": jnp.asarray([[3.0, 5.0], [0.0, 0.0]]), "label": jnp.asarray([7, 8])}
  out = mixup_inputs(first, second, jnp.asarray([0.5, 0.0]))
  np.testing.assert_allclose(out["x"], [[2.0, 3.0], [2.0, 2.0]])
  assert out["label"].tolist() == [1, 2]


def test_feedback_errors():
  with pytest.raises(ValueError, match="base_rate"):
    prototype_feedback(3, base_rate=1.5)
  with pytest.raises(ValueError, match="mixup_upper"):
    prototype_feedback(3, mixup_lower=0.5, mixup_upper=0.2)
  fb = prototype_feedback(3)
  with pytest.raises(ValueError, match="capacity"):
    fb.sample(fb.init(2), _memory([0, 1]), jax.random.key(0), 3)


# ---------------------------------------------------------------------------------------------- ProtoCL


def _stream(seed=0, n=30, c=3, d=2):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, c - 1, size=n)                           # the last class is never observed
  z = rng.normal(size=(n, d)) + y[:, None] * 2.0
  return z, y


def test_normal_posterior_matches_the_closed_form_float64():
  with jax.enable_x64(True):
    z, y = _stream()
    sigma2, s02, m0, a0 = np.asarray([0.5, 2.0]), 3.0, 0.7, 2.0
    head = bayesian_prototypes(3, 2, noise_variance=sigma2, prior_variance=s02, prior_mean=m0, dirichlet=a0)
    state = head.init()
    for lo, hi in ((0, 7), (7, 8), (8, 30)):                   # sequential batches, one of a single example
      state = jax.jit(head.update)(state, jnp.asarray(z[lo:hi]), jnp.asarray(y[lo:hi]))
    for c in range(3):
      zc = z[y == c]
      lam = 1 / s02 + len(zc) / sigma2
      np.testing.assert_allclose(state.precision[c], lam, rtol=1e-12)
      np.testing.assert_allclose(state.mean[c], (m0 / s02 + zc.sum(0) / sigma2) / lam, rtol=1e-12)
      assert float(state.concentration[c]) == a0 + len(zc)
    q = np.random.default_rng(5).normal(size=(4, 2))
    joint = np.asarray(head.log_joint(state, jnp.asarray(q)))
    alpha = np.asarray(state.concentration)
    for c in range(3):
      var = 1 / np.asarray(state.precision[c]) + sigma2
      ref = stats.norm.logpdf(q, np.asarray(state.mean[c]), np.sqrt(var)).sum(1) + np.log(alpha[c] / alpha.sum())
      np.testing.assert_allclose(joint[:, c], ref, rtol=1e-12)
    post = np.asarray(head.log_posterior(state, jnp.asarray(q)))
    np.testing.assert_allclose(post, joint - np.log(np.exp(joint).sum(1, keepdims=True)), rtol=1e-10)
    np.testing.assert_array_equal(head.predict(state, jnp.asarray(q)), np.argmax(joint, 1))


def test_normal_inverse_gamma_posterior_and_student_t_predictive_float64():
  with jax.enable_x64(True):
    z, y = _stream(seed=1)
    k0, a0, b0, m0 = 0.5, 2.0, 1.5, -0.3
    head = bayesian_prototypes(3, 2, likelihood="normal_inverse_gamma", prior_kappa=k0, prior_shape=a0,
                               prior_rate=b0, prior_mean=m0)
    state = head.init()
    for lo, hi in ((0, 11), (11, 12), (12, 30)):
      state = head.update(state, jnp.asarray(z[lo:hi]), jnp.asarray(y[lo:hi]))
    q = np.random.default_rng(6).normal(size=(3, 2))
    joint = np.asarray(head.log_joint(state, jnp.asarray(q)))
    alpha = np.asarray(state.concentration)
    for c in range(3):
      zc = z[y == c]
      n = len(zc)
      zbar = zc.mean(0) if n else np.zeros(2)
      kn, an = k0 + n, a0 + n / 2
      mn = (k0 * m0 + n * zbar) / kn
      bn = b0 + 0.5 * ((zc - zbar) ** 2).sum(0) + k0 * n * (zbar - m0) ** 2 / (2 * kn)
      np.testing.assert_allclose(state.mean[c], mn, rtol=1e-12)
      np.testing.assert_allclose(state.rate[c], bn, rtol=1e-12)
      assert float(state.shape[c]) == an
      scale = np.sqrt(bn * (kn + 1) / (an * kn))
      ref = stats.t.logpdf(q, 2 * an, mn, scale).sum(1) + np.log(alpha[c] / alpha.sum())
      np.testing.assert_allclose(joint[:, c], ref, rtol=1e-10)


def test_loss_trains_the_embedding_not_the_state_and_weights_count():
  head = bayesian_prototypes(3, 2, noise_variance=0.5)
  z, y = _stream(seed=2)
  state = head.update(head.init(), jnp.asarray(z, jnp.float32), jnp.asarray(y))
  zq = jnp.asarray(z[:5], jnp.float32)
  loss = head.loss(state, zq, jnp.asarray(y[:5]))
  np.testing.assert_allclose(loss, -np.asarray(head.log_posterior(state, zq))[np.arange(5), y[:5]], rtol=1e-6)
  gz, gs = jax.grad(lambda zz, s: jnp.sum(head.loss(s, zz, jnp.asarray(y[:5]))), argnums=(0, 1))(zq, state)
  assert float(jnp.sum(jnp.abs(gz))) > 0 and all(float(jnp.sum(jnp.abs(g))) == 0 for g in jax.tree.leaves(gs))
  # update gives no gradient to z; a weight-0 row changes nothing
  gu = jax.grad(lambda zz: jnp.sum(head.update(state, zz, jnp.asarray(y[:5])).mean))(zq)
  assert float(jnp.sum(jnp.abs(gu))) == 0
  w = jnp.asarray([1.0, 1, 0, 1, 1])
  with_w = head.update(head.init(), zq, jnp.asarray(y[:5]), weights=w)
  keep = np.asarray(w) > 0
  without = head.update(head.init(), zq[keep], jnp.asarray(y[:5])[keep])
  np.testing.assert_allclose(with_w.mean, without.mean, rtol=1e-6)


def test_prototype_errors():
  with pytest.raises(ValueError, match="noise_variance"):
    bayesian_prototypes(3, 2, noise_variance=0.0)
  with pytest.raises(ValueError, match="likelihood"):
    bayesian_prototypes(3, 2, likelihood="laplace")
  with pytest.raises(ValueError, match="broadcast"):
    bayesian_prototypes(3, 2, prior_mean=np.zeros(5))
  head = bayesian_prototypes(3, 2)
  with pytest.raises(ValueError, match="z must be"):
    head.update(head.init(), jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32))


def test_protocl_head_in_the_one_step():
  """The posterior in TrainState.extra: the loss reads it (before the batch), a transition adds the batch."""
  from prox import step as S
  import optax
  head = bayesian_prototypes(3, 2, noise_variance=0.5)
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, size=24)
  data = {"x": (rng.normal(size=(24, 4)) + y[:, None]).astype(np.float32), "y": y.astype(np.int32)}
  encode = lambda p, x: x @ p["w"]

  def loss_fn(params, model_state, batch, ctx):
    z = encode(params, batch["x"])
    return jnp.mean(head.loss(ctx.extra["protos"], z, batch["y"])), ({}, model_state)

  def transition(state, info):
    z = encode(info.params, info.batch["x"])                     # the features the loss saw
    return state._replace(extra={"protos": head.update(state.extra["protos"], z, info.batch["y"])})

  params = {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  tx = optax.sgd(0.05)
  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state={},
                       extra={"protos": head.init()}, rng=jax.random.key_data(jax.random.key(0)))
  mesh = S.data_mesh()
  state = S.replicate(state, mesh)
  step = S.make_train_step(loss_fn, tx, transition=transition)
  expected = head.update(head.init(), encode(params, jnp.asarray(data["x"])), jnp.asarray(data["y"]))
  state, out = step(state, S.shard_batch(data, mesh))
  np.testing.assert_allclose(state.extra["protos"].mean, expected.mean, rtol=1e-5)
  assert float(state.extra["protos"].count.sum()) == 24
  state, out = step(state, S.shard_batch(data, mesh))
  assert float(state.extra["protos"].count.sum()) == 48 and step._cache_size() == 1
