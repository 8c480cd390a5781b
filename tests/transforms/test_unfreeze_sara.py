"""Progressive unfreezing (prox.transforms.unfreeze) and SaRA (prox.transforms.sara)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.transforms import filters, unfreeze
from prox.transforms.sara import nuclear_norm_subgradient, sara


def params_fixture(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32), "bias": jnp.zeros(3)},
          "body": {"kernel": jnp.asarray(rng.normal(size=(4, 5)) * scale, jnp.float32)},
          "stem": {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * scale, jnp.float32)}}


def grads_fixture(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)


# ---------------------------------------------------------------------------------------------------
# Progressive unfreezing
# ---------------------------------------------------------------------------------------------------


def test_groups_unfreeze_on_schedule_with_fresh_inner_state():
  params = params_fixture()
  grads = grads_fixture(params)
  lr = 0.1
  tx = unfreeze.progressive_unfreezing(optax.adam(lr), ["^head/", "^body/", "^stem/"], boundaries=[0, 2, 5])
  labels = unfreeze.unfreeze_labels(params, ["^head/", "^body/", "^stem/"])
  assert labels == {"head": {"kernel": "group_0", "bias": "group_0"}, "body": {"kernel": "group_1"},
                    "stem": {"kernel": "group_2"}}
  # Reference: Adam started fresh on the same (constant) gradients.
  adam = optax.adam(lr)
  ref, s = [], adam.init(grads)
  for _ in range(7):
    r, s = adam.update(grads, s)
    ref.append(r)
  step = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(7):
    u, state = step(grads, state, params)
    for name, start in (("head", 0), ("body", 2), ("stem", 5)):
      got = np.asarray(u[name]["kernel"])
      if t < start:
        np.testing.assert_array_equal(got, 0.0)
      else:  # the group's optimizer starts at its own step 0 when unfrozen
        np.testing.assert_allclose(got, np.asarray(ref[t - start][name]["kernel"]), rtol=1e-6)
  assert step._cache_size() == 1


def test_leaves_outside_groups_train_from_start_and_interval():
  params = params_fixture()
  grads = grads_fixture(params)
  tx = unfreeze.progressive_unfreezing(optax.sgd(1.0), [filters.by_regex("^body/")], interval=3)
  state = tx.init(params)
  u, state = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(u["head"]["kernel"]), -np.asarray(grads["head"]["kernel"]))
  np.testing.assert_allclose(np.asarray(u["stem"]["kernel"]), -np.asarray(grads["stem"]["kernel"]))
  # interval=3 puts the first (only) group at step 0: it trains from the start as well.
  np.testing.assert_allclose(np.asarray(u["body"]["kernel"]), -np.asarray(grads["body"]["kernel"]))


def test_single_group_interval_starts_at_zero_and_later_groups_wait():
  params = params_fixture()
  grads = grads_fixture(params)
  tx = unfreeze.progressive_unfreezing(optax.sgd(1.0), ["^head/", "^body/"], interval=3)
  state = tx.init(params)
  seen = []
  for _ in range(4):
    u, state = tx.update(grads, state, params)
    seen.append(bool(np.any(np.asarray(u["body"]["kernel"]) != 0)))
    assert np.any(np.asarray(u["head"]["kernel"]) != 0)
  assert seen == [False, False, False, True]


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=[]), "groups must not be empty"),
    (dict(groups=["a"]), "exactly one of boundaries or interval"),
    (dict(groups=["a"], boundaries=[0], interval=2), "exactly one of boundaries or interval"),
    (dict(groups=["a", "b"], boundaries=[0]), "1 boundaries for 2 groups"),
    (dict(groups=["a", "b"], boundaries=[3, 1]), "non-decreasing"),
    (dict(groups=["a"], interval=0), "interval must be an int >= 1"),
])
def test_unfreeze_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    unfreeze.progressive_unfreezing(optax.sgd(0.1), **kwargs)


# ---------------------------------------------------------------------------------------------------
# SaRA
# ---------------------------------------------------------------------------------------------------


def test_sara_trains_only_small_weights_and_reselects():
  params = params_fixture(2, scale=0.01)
  grads = grads_fixture(params, 3)
  thr = 0.008
  tx = sara(optax.adamw(1e-3, weight_decay=0.1), threshold=thr, progressive_iter=3, filter=filters.kernels())
  state = tx.init(params)
  for name in ("head", "body", "stem"):
    np.testing.assert_array_equal(np.asarray(state.trainable[name]["kernel"]),
                                  np.abs(np.asarray(params[name]["kernel"])) < thr)
  assert state.trainable["head"]["bias"] is None
  step = jax.jit(tx.update)
  history = []
  p = params
  for t in range(5):
    u, state = step(grads, state, p)
    history.append((u, state))
    for name in ("head", "body", "stem"):
      tr = np.asarray(state.trainable[name]["kernel"])
      got = np.asarray(u[name]["kernel"])
      assert (got[~tr] == 0).all() and (got[tr] != 0).all()
    p = optax.apply_updates(p, u)
    if t == 2:
      before_reselect = p
  # Step 3 re-selected on the values it saw and reset the inner state (Adam's count restarts).
  for name in ("head", "body", "stem"):
    np.testing.assert_array_equal(np.asarray(history[3][1].trainable[name]["kernel"]),
                                  np.abs(np.asarray(before_reselect[name]["kernel"])) < thr)
  adam_count = lambda s: int(jax.tree.leaves(s.inner_state)[0])
  assert [adam_count(s) for _, s in history] == [1, 2, 3, 1, 2]
  np.testing.assert_array_equal(np.asarray(history[0][0]["head"]["bias"]) != 0, True)  # unselected leaves pass


def test_nuclear_norm_subgradient_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 4))
    expect = jax.grad(lambda a: jnp.sum(jnp.linalg.svd(a, compute_uv=False)))(jnp.asarray(x))
    got = nuclear_norm_subgradient(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=1e-5, atol=1e-6)  # svd in float32
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    low = (u[:, :2] * s[:2]) @ vt[:2]
    got_low = np.asarray(nuclear_norm_subgradient(jnp.asarray(low)))
    np.testing.assert_allclose(got_low, u[:, :2] @ vt[:2], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nuclear_norm_subgradient(jnp.zeros((3, 5)))), 0.0)


def test_sara_rank_penalty_on_accumulated_update():
  params = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)) * 1e-3, jnp.float32)}
  grads = grads_fixture(params, 6)
  lam = 0.5
  tx = sara(optax.sgd(1.0), threshold=1.0, progressive_iter=None, rank_lambda=lam)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(u1["w"]), -np.asarray(grads["w"]), rtol=1e-6)  # D = 0: no penalty
  np.testing.assert_allclose(np.asarray(state.delta["w"]), np.asarray(u1["w"]))
  u2, state = tx.update(grads, state, params)
  sub = np.asarray(nuclear_norm_subgradient(u1["w"]))
  np.testing.assert_allclose(np.asarray(u2["w"]), -(np.asarray(grads["w"]) + lam * sub), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.delta["w"]), np.asarray(u1["w"] + u2["w"]), rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=0.0), "threshold must be > 0"),
    (dict(progressive_iter=0), "progressive_iter must be a positive int"),
    (dict(rank_lambda=-1.0), "rank_lambda must be >= 0"),
])
def test_sara_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sara(optax.sgd(0.1), **kwargs)
