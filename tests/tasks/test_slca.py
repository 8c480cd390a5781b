"""Tests for prox.tasks.slca: class statistics, feature sampling, logit-normalised alignment loss, the jitted
classifier alignment."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks import slca as SL


def _features(seed=0, n=60, d=3, c=4):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, size=n).astype(np.int32)
  feats = (rng.normal(size=(n, d)) + 3 * labels[:, None]).astype(np.float32)
  return feats, labels


def test_class_stats_match_numpy_and_keep_other_classes():
  feats, labels = _features()
  stats = SL.class_stats_init(5, 3)
  stats = jax.jit(SL.class_stats_update)(stats, feats, labels, np.array([0, 1]), 0)
  for c in (0, 1):
    f = feats[labels == c]
    np.testing.assert_allclose(stats.mean[c], f.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.cov[c], np.cov(f.T) + 1e-4 * np.eye(3), rtol=1e-4, atol=1e-5)
    assert int(stats.count[c]) == len(f) and int(stats.task[c]) == 0
  for c in (2, 3, 4):  # not requested (2, 3) or absent (4): untouched
    assert int(stats.count[c]) == 0 and int(stats.task[c]) == -1
    np.testing.assert_allclose(stats.cov[c], 1e-4 * np.eye(3))
  # task 1: classes 2, 3 and 4 (absent from the features: keeps its old statistics); class 1 reoccurs
  feats2, labels2 = _features(seed=1)
  new = SL.class_stats_update(stats, feats2, labels2, np.array([1, 2, 3, 4]), 1)
  assert new.task.tolist() == [0, 1, 1, 1, -1]
  np.testing.assert_allclose(new.mean[1], feats2[labels2 == 1].mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new.mean[0], stats.mean[0])
  # padding rows are ignored
  padded = SL.class_stats_update(stats, np.concatenate([feats2, 100 + feats2]), np.concatenate([labels2, labels2]),
                                 np.array([1, 2, 3, 4]), 1, valid=np.arange(120) < 60)
  for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(new)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sampled_features_follow_scaled_gaussians():
  feats, labels = _features(n=400)
  stats = SL.class_stats_update(SL.class_stats_init(4, 3), feats, labels, np.array([0, 1]), 0)
  stats = SL.class_stats_update(stats, feats, labels, np.array([2]), 2)
  s = SL.mean_scale(stats, 2)
  np.testing.assert_allclose(s, [0.9 + 0.1 / 3, 0.9 + 0.1 / 3, 1.0, 0.9], rtol=1e-6)
  x, y, w = jax.jit(SL.sample_class_features, static_argnums=3)(stats, jax.random.key(0), 2, 20000)
  assert x.shape == (80000, 3) and y.shape == (80000,) and w.tolist()[::20000] == [1, 1, 1, 0]
  for c in range(3):
    xc = np.asarray(x[np.asarray(y) == c], np.float64)
    np.testing.assert_allclose(xc.mean(0), s[c] * stats.mean[c], atol=0.03)
    np.testing.assert_allclose(np.cov(xc.T), stats.cov[c], atol=0.05)


def test_logit_normalisation_and_alignment_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 6)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1])
  # one group: LogitNorm
  np.testing.assert_allclose(SL.normalize_logits(logits),
                             logits / (np.linalg.norm(logits, axis=-1, keepdims=True) + 1e-7) / 0.1, rtol=1e-5)
  # SLCA: per-task norms [0:2], [2:4], [4:6] averaged; classes 4, 5 unseen (masked out of norm and softmax)
  groups = np.array([0, 0, 1, 1, 2, 2])
  mask = np.array([True, True, True, True, False, False])
  norm = (np.linalg.norm(logits[:, 0:2], axis=-1) + np.linalg.norm(logits[:, 2:4], axis=-1)) / 2 + 1e-7
  want = logits / norm[:, None] / 0.1
  got = SL.normalize_logits(logits, logit_groups=groups, logit_mask=mask)
  np.testing.assert_allclose(np.asarray(got)[:, :4], want[:, :4], rtol=1e-5)
  z = want[:, :4]
  ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(5), labels]
  wts = np.array([1, 1, 0, 1, 2.0])
  loss = jax.jit(lambda l, y, w: SL.alignment_loss(l, y, logit_groups=groups, logit_mask=mask, weights=w))(
      logits, labels, wts)
  np.testing.assert_allclose(loss, np.sum(wts * ce) / wts.sum(), rtol=1e-5)
  g = jax.grad(lambda l: SL.alignment_loss(l, labels, logit_groups=groups, logit_mask=mask))(logits)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[:, 4:]).max()) == 0.0


def test_head_alignment_on_sampled_features_learns_all_classes():
  # two old classes and one new: retraining a linear head on sampled features separates all three
  rng = np.random.default_rng(0)
  means = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]], np.float32)
  labels = np.repeat(np.arange(3), 100).astype(np.int32)
  feats = means[labels] + rng.normal(size=(300, 2)).astype(np.float32)
  stats = SL.class_stats_update(SL.class_stats_init(3, 2), feats, labels, np.arange(3), 0)
  x, y, w = SL.sample_class_features(stats, jax.random.key(1), 0, 256)
  head = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(head)

  @jax.jit
  def step(h, o):
    loss, g = jax.value_and_grad(lambda hh: SL.alignment_loss(x @ hh["w"] + hh["b"], y, weights=w))(h)
    u, o = tx.update(g, o, h)
    return optax.apply_updates(h, u), o, loss

  for _ in range(60):
    head, opt, loss = step(head, opt)
  acc = float(jnp.mean(jnp.argmax(feats @ head["w"] + head["b"], -1) == labels))
  assert acc > 0.97, acc


def _alignment_problem(seed=0, n=70, unseen=(3,)):
  rng = np.random.default_rng(seed)
  means = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-3.0, -3.0, 1.0], [0.0, 0.0, 5.0]], np.float32)
  labels = rng.integers(0, 4, n).astype(np.int32)
  feats = (means[labels] + rng.normal(size=(n, 3))).astype(np.float32)
  weights = (~np.isin(labels, unseen)).astype(np.float32)   # like sample_class_features' unseen rows
  head = {"kernel": rng.normal(size=(3, 4)).astype(np.float32) * 0.1, "bias": np.zeros((4,), np.float32)}
  return head, feats, labels, weights


def _align_reference(head, feats, labels, weights, key, tx, epochs, batch_size, **loss_kwargs):
  """The alignment written as a plain Python loop over epochs and mini-batches."""
  head = jax.tree.map(jnp.asarray, head)
  opt = tx.init(head)
  valid = weights > 0
  live = np.zeros(4, bool)
  live[labels[valid]] = True
  n_valid = int(valid.sum())
  losses = []
  for e in range(epochs):
    scores = np.where(valid, np.asarray(jax.random.uniform(jax.random.fold_in(key, e), (len(labels),))), 2.0)
    order = np.argsort(scores, kind="stable")[:n_valid]     # the samples, in random order
    batch_losses = []
    for start in range(0, n_valid, batch_size):
      idx = order[start:start + batch_size]
      loss, g = jax.value_and_grad(lambda h: SL.alignment_loss(
          feats[idx] @ h["kernel"] + h["bias"], labels[idx], logit_mask=live, weights=weights[idx],
          **loss_kwargs))(head)
      updates, opt = tx.update(g, opt, head)
      head = optax.apply_updates(head, updates)
      batch_losses.append(float(loss))
    losses.append(np.mean(batch_losses))
  return head, np.asarray(losses)


def test_align_classifier_equals_the_loop_it_compiles():
  head, feats, labels, weights = _alignment_problem()
  tx = optax.sgd(0.05, momentum=0.9)
  groups = np.array([0, 0, 1, 1])
  key = jax.random.key(3)
  got, losses = SL.align_classifier(head, feats, labels, weights, key, tx=tx, epochs=3, batch_size=16,
                                    tau=0.1, logit_groups=groups)
  want, want_losses = _align_reference(head, feats, labels, weights, key, tx, 3, 16, tau=0.1,
                                       logit_groups=groups)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  # the unseen class (weight 0 everywhere) is out of the softmax: its column never moves
  np.testing.assert_array_equal(np.asarray(got["kernel"])[:, 3], head["kernel"][:, 3])
  assert float(np.asarray(got["bias"])[3]) == 0.0


def test_align_classifier_never_reads_weight_zero_rows_and_learns():
  head, feats, labels, weights = _alignment_problem(n=300)
  poisoned = np.where(weights[:, None] > 0, feats, np.nan).astype(np.float32)
  tx = optax.sgd(0.05, momentum=0.9)
  a, losses = SL.align_classifier(head, feats, labels, weights, jax.random.key(0), tx=tx, epochs=5,
                                  batch_size=32)
  b, _ = SL.align_classifier(head, poisoned, labels, weights, jax.random.key(0), tx=tx, epochs=5,
                             batch_size=32)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert losses[-1] < 0.5 * losses[0]
  seen = weights > 0
  pred = np.argmax(feats[seen] @ a["kernel"][:, :3] + a["bias"][:3], -1)
  assert np.mean(pred == labels[seen]) > 0.95


def test_align_classifier_compiles_once_per_optimizer():
  head, feats, labels, weights = _alignment_problem()
  tx = optax.sgd(0.05)
  SL.align_classifier(head, feats, labels, weights, jax.random.key(0), tx=tx, epochs=1, batch_size=16)
  before = SL._align._cache_size()
  for k in range(3):   # another key, other weights, another head: no new compile
    SL.align_classifier(jax.tree.map(lambda x: x + k, head), feats, labels, weights * (k + 1),
                        jax.random.key(k), tx=tx, epochs=1, batch_size=16)
  assert SL._align._cache_size() == before


def test_checkpoint_round_trip(orbax_round_trip):
  feats, labels = _features()
  stats = SL.class_stats_update(SL.class_stats_init(4, 3), feats, labels, np.arange(4), 3)
  restored = orbax_round_trip(stats)
  assert type(restored) is SL.ClassStats
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(a, b)


def test_bad_input():
  with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
    SL.class_stats_init(0, 3)
  stats = SL.class_stats_init(4, 3)
  with pytest.raises(ValueError, match=r"features must be \[N, 3\], got shape \(5, 2\)"):
    SL.class_stats_update(stats, np.zeros((5, 2)), np.zeros(5, np.int32), np.array([0]), 0)
  with pytest.raises(ValueError, match=r"labels must be \[5\]"):
    SL.class_stats_update(stats, np.zeros((5, 3)), np.zeros(4, np.int32), np.array([0]), 0)
  with pytest.raises(ValueError, match="tau must be a finite number > 0, got 0.0"):
    SL.normalize_logits(np.zeros((2, 3)), tau=0.0)
  with pytest.raises(ValueError, match="logit_groups must be 3 non-negative ints"):
    SL.normalize_logits(np.zeros((2, 3)), logit_groups=np.array([0, 1]))
  with pytest.raises(ValueError, match="num_per_class must be a positive int"):
    SL.sample_class_features(stats, jax.random.key(0), 0, 0)
  head, feats, labels, weights = _alignment_problem()
  with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
    SL.align_classifier(head, feats, labels, weights, jax.random.key(0), tx=optax.sgd(0.1), epochs=0)
  with pytest.raises(ValueError, match=r"features must be \[N, 3\], got shape \(70, 2\)"):
    SL.align_classifier(head, feats[:, :2], labels, weights, jax.random.key(0), tx=optax.sgd(0.1))
