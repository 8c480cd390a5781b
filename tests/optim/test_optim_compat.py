"""Every prox.optim transform in optax.chain, inject_hyperparams, apply_if_finite; jit cache; dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import optim

MASK = lambda tree: {k: k == "w" for k in tree}  # the slow group is "w"


def _params(dtype=jnp.float32, with_bias=True):
  rng = np.random.default_rng(0)
  p = {"w": rng.normal(size=(3, 4)), "v": rng.normal(size=(5, 2))}
  if with_bias:
    p["b"] = rng.normal(size=(4,))
  return {k: jnp.asarray(x, dtype) for k, x in p.items()}


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=x.shape), x.dtype) for k, x in params.items()}


# name -> (plain factory, (injectable factory, kwargs, static_args), params need only 2-D leaves)
CASES = {
    "adagrad_norm": (lambda: optim.adagrad_norm(0.1),
                     (optim.adagrad_norm, dict(learning_rate=0.1, b0=0.1), ()), False),
    "sinkgd": (lambda: optim.sinkgd(0.1),
               (optim.sinkgd, dict(learning_rate=0.1, num_iters=5), ()), True),
    "sinkgd_for_matrices": (lambda: optim.sinkgd_for_matrices(0.1),
                            (optim.sinkgd_for_matrices, dict(learning_rate=0.1), ()), False),
    "scale_group": (lambda: optim.scale_group(0.01, MASK),
                    (optim.scale_group, dict(scale=0.01, mask=MASK), ("mask",)), False),
    "slow_learner": (lambda: optim.slow_learner(optax.adam(0.1), 0.01, MASK),
                     (optim.slow_learner, dict(inner=optax.adam(0.1), scale=0.01, mask=MASK), ("mask",)), False),
    "slow_learner_frozen": (lambda: optim.slow_learner(optax.adam(0.1), 0, MASK),
                            (optim.slow_learner, dict(inner=optax.adam(0.1), scale=0.0, mask=MASK), ("mask",)),
                            False),
}


def _run(tx, params, steps=3, dtype_check=None):
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for t in range(steps):
    updates, state = update(_grads(params, t + 1), state, params)
    outs.append(updates)
  return outs, state, update


@pytest.mark.parametrize("name", sorted(CASES))
def test_chain_matches_plain_and_jit_compiles_once(name):
  make, _, only_2d = CASES[name]
  params = _params(with_bias=not only_2d)
  plain, _, update = _run(make(), params)
  assert update._cache_size() == 1  # three calls with new values, one compilation
  chained, _, _ = _run(optax.chain(make(), optax.scale(-2.0)), params)
  for p, c in zip(plain, chained):
    for k in p:
      np.testing.assert_allclose(np.asarray(c[k]), -2.0 * np.asarray(p[k]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inject_hyperparams_matches_plain(name):
  make, (factory, kwargs, static), only_2d = CASES[name]
  params = _params(with_bias=not only_2d)
  plain, _, _ = _run(make(), params)
  injected, state, update = _run(optax.inject_hyperparams(factory, static_args=static)(**kwargs), params)
  assert update._cache_size() == 1
  for p, i in zip(plain, injected):
    for k in p:
      np.testing.assert_allclose(np.asarray(i[k]), np.asarray(p[k]), rtol=1e-5, atol=1e-7)
  # a changed hyperparameter takes effect without recompiling
  name = next(k for k in kwargs if k in state.hyperparams)
  before, _ = update(_grads(params, 9), state, params)
  state.hyperparams[name] = state.hyperparams[name] * 0.5
  after, _ = update(_grads(params, 9), state, params)
  assert update._cache_size() == 1
  changed = any(not np.allclose(np.asarray(before[k]), np.asarray(after[k])) for k in before)
  assert changed == (float(kwargs[name]) != 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_if_finite_skips_nan_step(name):
  make, _, only_2d = CASES[name]
  params = _params(with_bias=not only_2d)
  tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params, 1))
  updates, state_bad = update(bad, state, params)
  for u in jax.tree.leaves(updates):
    assert np.all(np.asarray(u) == 0)
  assert int(state_bad.notfinite_count) == 1
  good, _ = update(_grads(params, 1), state_bad, params)
  ref, _ = make().update(_grads(params, 1), make().init(params), params)
  for k in ref:
    np.testing.assert_allclose(np.asarray(good[k]), np.asarray(ref[k]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dtypes_preserved(name, dtype):
  make, _, only_2d = CASES[name]
  params = _params(dtype, with_bias=not only_2d)
  outs, state, _ = _run(make(), params, steps=2)
  for u in outs:
    for k, x in u.items():
      assert x.dtype == dtype, (k, x.dtype)
      assert np.all(np.isfinite(np.asarray(x, np.float32)))
  new_params = optax.apply_updates(params, outs[-1])
  assert all(new_params[k].dtype == dtype for k in params)
