"""Tests for prox.tasks.gmm: EM for padded full-covariance GMMs, all k in one vectorised call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn.mixture import GaussianMixture

from prox.tasks import gmm

KS = tuple(range(2, 11))
_fit_many = jax.jit(lambda x, key: gmm.fit_many(x, key, KS))


def _params(weights, means, covs, max_components=None):
  weights, means, covs = (np.asarray(a, np.float64) for a in (weights, means, covs))
  k, d = means.shape
  kmax = max_components or k
  pad = kmax - k
  w = np.concatenate([weights, np.zeros(pad)])
  m = np.concatenate([means, np.zeros((pad, d))])
  c = np.concatenate([covs, np.broadcast_to(np.eye(d), (pad, d, d))])
  return gmm.GMMParams(jnp.asarray(w), jnp.asarray(m), jnp.asarray(c),
                       jnp.asarray(np.linalg.cholesky(c)), jnp.asarray(np.arange(kmax) < k))


def _separated(seed, n_per=150):
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
  covs = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.3]], [[0.25, 0.0], [0.0, 0.25]],
                   [[0.4, 0.15], [0.15, 0.2]]])
  x = np.concatenate([rng.multivariate_normal(c, s, n_per) for c, s in zip(centres, covs)])
  return x.astype(np.float32), centres, covs


def test_responsibilities_match_hand_computation():
  # tiny case: 4 points, 2 components in 2-D, plus one padded (masked) component
  x = np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 2.0], [-1.0, 0.3]])
  w = np.array([0.3, 0.7])
  mu = np.array([[0.0, 0.0], [2.0, 1.5]])
  cov = np.array([[[1.0, 0.2], [0.2, 0.5]], [[0.8, -0.3], [-0.3, 1.2]]])
  dens = np.stack([w[j] * scipy.stats.multivariate_normal(mu[j], cov[j]).pdf(x) for j in range(2)], 1)
  expected_resp = dens / dens.sum(1, keepdims=True)
  expected_ll = np.mean(np.log(dens.sum(1)))
  with jax.enable_x64(True):
    ll, log_resp = gmm.e_step(jnp.asarray(x), _params(w, mu, cov, max_components=3))
    np.testing.assert_allclose(np.exp(np.asarray(log_resp))[:, :2], expected_resp, rtol=1e-10)
    assert np.all(np.exp(np.asarray(log_resp))[:, 2] == 0.0)          # masked component
    np.testing.assert_allclose(float(ll), expected_ll, rtol=1e-12)


def test_m_step_matches_weighted_moments():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3))
  resp = rng.dirichlet(np.ones(2), size=7)
  with jax.enable_x64(True):
    p = gmm.m_step(jnp.asarray(x), jnp.asarray(np.concatenate([resp, np.zeros((7, 1))], 1)),
                   jnp.asarray([True, True, False]), 1e-3)
    eps = 10 * np.finfo(np.float64).eps
    for j in range(2):
      nk = resp[:, j].sum() + eps
      m = resp[:, j] @ x / nk
      c = (resp[:, j, None] * (x - m)).T @ (x - m) / nk + 1e-3 * np.eye(3)
      np.testing.assert_allclose(np.asarray(p.means[j]), m, rtol=1e-10)
      np.testing.assert_allclose(np.asarray(p.covariances[j]), c, rtol=1e-10)
      np.testing.assert_allclose(np.asarray(p.cholesky[j]), np.linalg.cholesky(c), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(p.weights[:2]), resp.sum(0) / resp.sum(), rtol=1e-10)
    assert float(p.weights[2]) == 0.0


def test_log_likelihood_never_decreases():
  x, _, _ = _separated(1, n_per=60)
  with jax.enable_x64(True):
    xx = jnp.asarray(x, jnp.float64)
    step = jax.jit(lambda p: gmm.em_step(xx, p, 0.0))
    for k, key in ((4, 1), (6, 2)):  # k=6 > true k: slow, non-trivial EM path
      p = gmm.init_params(xx, k, jax.random.key(key), max_components=8, init="random")
      lls = []
      for _ in range(40):
        ll, p = step(p)
        lls.append(float(ll))
      assert np.min(np.diff(lls)) >= -1e-12, np.diff(lls)
      assert lls[-1] > lls[0] + 1e-3          # the path did move


def test_recovers_known_mixture():
  x, centres, covs = _separated(0)
  i = KS.index(4)
  # EM finds a local optimum from its k-means start; keep the best of 3 starts (scikit-learn's n_init)
  fits = [jax.tree.map(lambda a: a[i], _fit_many(x, jax.random.key(s))) for s in range(3)]
  fit = max(fits, key=lambda f: float(f.log_likelihood))
  assert bool(fit.converged) and int(fit.num_components) == 4
  means = np.asarray(fit.params.means)[:4]
  order = [int(np.argmin(np.linalg.norm(means - c, axis=1))) for c in centres]
  assert sorted(order) == [0, 1, 2, 3]
  np.testing.assert_allclose(means[order], centres, atol=0.12)
  np.testing.assert_allclose(np.asarray(fit.params.covariances)[order], covs, atol=0.08)
  np.testing.assert_allclose(np.asarray(fit.params.weights)[order], 0.25, atol=0.01)
  assert np.all(np.asarray(fit.params.weights)[4:] == 0)


def test_matches_sklearn_on_separated_data():
  x, _, _ = _separated(2)
  fits = _fit_many(x, jax.random.key(3))
  sk = GaussianMixture(4, covariance_type="full", random_state=0).fit(x)
  i = KS.index(4)
  np.testing.assert_allclose(float(fits.log_likelihood[i]), sk.score(x), rtol=1e-4)
  np.testing.assert_allclose(float(fits.aic[i]), sk.aic(x), rtol=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_aic_picks_true_k_on_separated_data(seed):
  # AIC is not consistent: on some draws even the reference (scikit-learn, best of 5 inits) finds a
  # lower AIC at k = 5 or 7. These data sets are ones where scikit-learn's AIC minimum is at k = 4 by a
  # margin of >= 5; every k-means start of ours must then select k = 4 as well.
  x, _, _ = _separated(seed)
  for key in (seed, seed + 10):
    fits = _fit_many(x, jax.random.key(key))
    best = gmm.select(fits, "aic")
    assert int(best.num_components) == 4
    assert int(jnp.sum(best.params.active)) == 4
  assert np.asarray(fits.num_components).tolist() == list(KS)


def test_parameter_count_and_aic_formula():
  assert gmm.num_parameters(1, 1) == 2                # mean + variance
  assert gmm.num_parameters(3, 2) == 3 * (3 + 2) + 2   # cov 3, mean 2 per component, 2 free weights
  x, _, _ = _separated(0)
  fits = _fit_many(x, jax.random.key(0))
  p = np.array([gmm.num_parameters(k, 2) for k in KS])
  np.testing.assert_allclose(np.asarray(fits.aic), -2 * x.shape[0] * np.asarray(fits.log_likelihood) + 2 * p,
                             rtol=1e-5)


def test_no_recompilation_and_fixed_shapes():
  x, _, _ = _separated(0)
  before = _fit_many._cache_size()
  a = _fit_many(x, jax.random.key(0))
  b = _fit_many(x + 1.0, jax.random.key(1))
  assert _fit_many._cache_size() == max(before, 1)
  assert a.params.means.shape == b.params.means.shape == (len(KS), 10, 2)


def test_sampling_follows_the_mixture():
  p = _params([0.25, 0.75], [[0.0, 0.0], [10.0, 0.0]], [np.eye(2) * 0.01] * 2, max_components=4)
  p = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, p)
  xs, comp = gmm.sample(p, jax.random.key(0), 4000)
  assert set(np.unique(np.asarray(comp)).tolist()) <= {0, 1}
  assert abs(float(jnp.mean(comp == 1)) - 0.75) < 0.03
  np.testing.assert_allclose(np.asarray(xs[comp == 1]).mean(0), [10.0, 0.0], atol=0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ks=(0, 3)), "ks must lie"),
    (dict(ks=()), "ks must be"),
    (dict(init="bogus"), "init must be"),
    (dict(reg_covar=-1.0), "reg_covar"),
    (dict(max_iter=0), "max_iter"),
])
def test_bad_input_is_one_line_error(kwargs, match):
  x = np.zeros((20, 2), np.float32)
  with pytest.raises(ValueError, match=match) as e:
    gmm.fit_many(x, jax.random.key(0), **{"ks": KS, **kwargs})
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="2-D"):
    gmm.fit(np.zeros(5, np.float32), 2, jax.random.key(0))
  with pytest.raises(TypeError, match="floating"):
    gmm.fit(np.zeros((5, 2), np.int32), 2, jax.random.key(0))
