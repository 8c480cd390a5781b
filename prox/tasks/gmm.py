"""Full-covariance Gaussian mixtures fitted by EM, in JAX, for many component counts at once.

The ALP-GMM teacher (Portelas et al. 2019, "Teacher algorithms for curriculum learning of Deep RL in
continuously parameterized environments"; ref flowersteam/teachDeepRL) refits GMMs with k = 2..10
components every 250 episodes and keeps the one with the lowest AIC. The reference loops over
scikit-learn's ``GaussianMixture``; here one jitted call fits every k in parallel: each fit is padded to
``max_components`` components and the components ``j >= k`` are masked out (weight 0, log-probability
-inf), so all fits share one shape and ``jax.vmap`` runs them together.

The algorithm follows scikit-learn's ``GaussianMixture(covariance_type='full')``:

- init: responsibilities r_nj from a hard k-means clustering (``init='kmeans'``: k-means++ seeding
  then Lloyd iterations), from the k-means++ seeds alone (``'k-means++'``) or random (``'random'``),
  followed by one M-step;
- E-step: log r_nj = log pi_j + log N(x_n | mu_j, Sigma_j) - log sum_l pi_l N(x_n | mu_l, Sigma_l);
  the mean log-likelihood L = 1/N sum_n log sum_j pi_j N(x_n | mu_j, Sigma_j) is the lower bound;
- M-step: N_j = sum_n r_nj + 10 eps, pi_j = N_j / sum_l N_l, mu_j = sum_n r_nj x_n / N_j,
  Sigma_j = sum_n r_nj (x_n - mu_j)(x_n - mu_j)^T / N_j + reg_covar I;
- stop when |L_t - L_{t-1}| < tol or after max_iter EM steps;
- AIC = -2 N L(final params) + 2 p with p = k D (D + 1) / 2 + k D + k - 1.

Departures from scikit-learn (documented, not bugs): greedy k-means++ tries 2 + floor(log K) candidates
per centre with K = max_components (scikit-learn: with the actual k); an empty k-means cluster keeps its
previous centre (scikit-learn moves it to a far point); the random streams differ, so fits agree in
distribution, not bit for bit. Sums over the points are written as dot products and small-D linear
algebra is unrolled into elementwise ops, which is what makes the fits fast on CPU (also under vmap).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INITS = ("kmeans", "k-means++", "random")


class GMMParams(NamedTuple):
  """A Gaussian mixture padded to ``K = max_components`` components (inactive ones masked).

  Attributes:
    weights: [K] mixing weights pi_j (0 for inactive components; the active ones sum to 1).
    means: [K, D] component means mu_j.
    covariances: [K, D, D] full covariances Sigma_j (the identity for inactive components).
    cholesky: [K, D, D] lower Cholesky factors L_j, Sigma_j = L_j L_j^T.
    active: bool [K], True for the k components in use.
  """
  weights: jax.Array
  means: jax.Array
  covariances: jax.Array
  cholesky: jax.Array
  active: jax.Array


class GMMFit(NamedTuple):
  """Result of one EM fit (leading axis [num_ks] when returned by ``fit_many``).

  Attributes:
    params: the fitted mixture.
    log_likelihood: mean log-likelihood per point under ``params`` (scikit-learn's ``score``).
    lower_bound: the last E-step's mean log-likelihood (scikit-learn's ``lower_bound_``).
    num_iters: EM steps run.
    converged: whether |L_t - L_{t-1}| < tol was reached within max_iter steps.
    num_components: k, the number of active components.
    aic: -2 N log_likelihood + 2 p.
    bic: -2 N log_likelihood + p log N.
  """
  params: GMMParams
  log_likelihood: jax.Array
  lower_bound: jax.Array
  num_iters: jax.Array
  converged: jax.Array
  num_components: jax.Array
  aic: jax.Array
  bic: jax.Array


def num_parameters(num_components, dim: int):
  """Free parameters of a full-covariance GMM: p = k D (D + 1) / 2 + k D + (k - 1)."""
  return num_components * (dim * (dim + 1) // 2 + dim + 1) - 1


_UNROLL_MAX_DIM = 12  # below this, small-matrix algebra is unrolled into elementwise ops (fast on CPU)


def _cholesky(cov: jax.Array) -> jax.Array:
  """Lower Cholesky factor of [..., D, D]; unrolled elementwise for small D (batched LAPACK calls on
  tiny matrices dominate the EM time on CPU otherwise)."""
  dim = cov.shape[-1]
  if dim > _UNROLL_MAX_DIM:
    return jnp.linalg.cholesky(cov)
  l = [[None] * dim for _ in range(dim)]
  for j in range(dim):
    s = cov[..., j, j] - sum((l[j][k] ** 2 for k in range(j)), jnp.zeros_like(cov[..., j, j]))
    l[j][j] = jnp.sqrt(s)
    for i in range(j + 1, dim):
      s = cov[..., i, j] - sum((l[i][k] * l[j][k] for k in range(j)), jnp.zeros_like(cov[..., i, j]))
      l[i][j] = s / l[j][j]
  zero = jnp.zeros_like(cov[..., 0, 0])
  return jnp.stack([jnp.stack([l[i][j] if j <= i else zero for j in range(dim)], -1)
                    for i in range(dim)], -2)


def _maha(chol: jax.Array, xt: jax.Array, means: jax.Array) -> jax.Array:
  """Squared Mahalanobis distances |L_k^{-1} (x_n - mu_k)|^2, shape [K, N], by forward substitution.

  ``xt`` is x transposed, [D, N]. For small D the coordinates are kept as separate [K, N] arrays (no
  trailing axis of size D, no tiny batched matmuls), which is several times faster on CPU."""
  dim = xt.shape[0]
  if dim > _UNROLL_MAX_DIM:
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=xt.dtype), chol.shape)
    chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    z = jnp.einsum("kij,kjn->kin", chol_inv, xt[None, :, :] - means[:, :, None])
    return jnp.sum(z * z, axis=1)
  z = []
  for i in range(dim):
    acc = xt[None, i, :] - means[:, i, None]
    for k in range(i):
      acc = acc - chol[:, i, k, None] * z[k]
    z.append(acc / chol[:, i, i, None])
  return sum((zi * zi for zi in z[1:]), z[0] * z[0])


def _weighted_log_prob_t(xt: jax.Array, params: GMMParams) -> jax.Array:
  """[K, N] matrix log pi_j + log N(x_n | mu_j, Sigma_j); -inf for inactive components."""
  dim = xt.shape[0]
  maha = _maha(params.cholesky, xt, params.means)
  half_log_det = jnp.sum(jnp.log(jnp.diagonal(params.cholesky, axis1=-2, axis2=-1)), axis=-1)
  log_norm = jnp.log(jnp.where(params.active, params.weights, 1.0)) - half_log_det
  log_norm = log_norm - 0.5 * dim * math.log(2 * math.pi)
  return jnp.where(params.active[:, None], log_norm[:, None] - 0.5 * maha, -jnp.inf)


def _lse0(a: jax.Array) -> jax.Array:
  m = jnp.max(a, axis=0)
  return m + jnp.log(jnp.sum(jnp.exp(a - m[None]), axis=0))


def _e_step_t(xt: jax.Array, params: GMMParams) -> tuple[jax.Array, jax.Array]:
  wlp = _weighted_log_prob_t(xt, params)
  norm = _lse0(wlp)
  return jnp.mean(norm), wlp - norm[None, :]


def log_likelihood(x: jax.Array, params: GMMParams) -> jax.Array:
  """Per-point log density log p(x_n) = log sum_j pi_j N(x_n | mu_j, Sigma_j), shape [N]."""
  return _lse0(_weighted_log_prob_t(jnp.asarray(x).T, params))


def e_step(x: jax.Array, params: GMMParams) -> tuple[jax.Array, jax.Array]:
  """E-step: (mean log-likelihood L, log responsibilities [N, K]) with
  log r_nj = log pi_j N(x_n | mu_j, Sigma_j) - log sum_l pi_l N(x_n | mu_l, Sigma_l)."""
  lb, log_resp_t = _e_step_t(jnp.asarray(x).T, params)
  return lb, log_resp_t.T


def _m_step_t(xt: jax.Array, resp_t: jax.Array, active: jax.Array, reg_covar) -> GMMParams:
  dtype = xt.dtype
  dim = xt.shape[0]
  resp_t = jnp.where(active[:, None], resp_t, 0.0)
  # Sums over the N points are written as dot products: XLA:CPU's plain reductions along the minor
  # axis become several times slower once an outer vmap (seeds) adds a batch dimension.
  nk = resp_t @ jnp.ones((xt.shape[1],), dtype) + 10 * jnp.finfo(dtype).eps
  means = jnp.einsum("kn,dn->kd", resp_t, xt) / nk[:, None]
  if dim > _UNROLL_MAX_DIM:
    diff = xt[None, :, :] - means[:, :, None]                            # [K, D, N]
    cov = jnp.einsum("kin,kjn->kij", resp_t[:, None, :] * diff, diff)
  else:  # per-coordinate [K, N] arrays: much faster than tiny batched matmuls on CPU
    diffs = [xt[None, i, :] - means[:, i, None] for i in range(dim)]
    wdiffs = [resp_t * d for d in diffs]
    cols = {}
    for i in range(dim):
      for j in range(i + 1):
        cols[i, j] = cols[j, i] = jnp.einsum("kn,kn->k", wdiffs[i], diffs[j])
    cov = jnp.stack([jnp.stack([cols[i, j] for j in range(dim)], -1) for i in range(dim)], -2)
  cov = cov / nk[:, None, None]
  eye = jnp.eye(dim, dtype=dtype)
  cov = cov + jnp.asarray(reg_covar, dtype) * eye
  cov = jnp.where(active[:, None, None], cov, eye)
  means = jnp.where(active[:, None], means, 0.0)
  nk = jnp.where(active, nk, 0.0)
  weights = nk / jnp.sum(nk)
  return GMMParams(weights, means, cov, _cholesky(cov), active)


def m_step(x: jax.Array, resp: jax.Array, active: jax.Array, reg_covar=1e-6) -> GMMParams:
  """M-step from responsibilities r [N, K]:
  N_j = sum_n r_nj + 10 eps, mu_j = sum_n r_nj x_n / N_j,
  Sigma_j = sum_n r_nj (x_n - mu_j)(x_n - mu_j)^T / N_j + reg_covar I, pi_j = N_j / sum_l N_l
  (inactive components get pi_j = 0, mu_j = 0, Sigma_j = I)."""
  return _m_step_t(jnp.asarray(x).T, jnp.asarray(resp).T, active, reg_covar)


def _em_step_t(xt, params, reg_covar):
  lb, log_resp_t = _e_step_t(xt, params)
  return lb, _m_step_t(xt, jnp.exp(log_resp_t), params.active, reg_covar)


def em_step(x: jax.Array, params: GMMParams, reg_covar=1e-6) -> tuple[jax.Array, GMMParams]:
  """One EM iteration: returns (L under the incoming params, params after the M-step)."""
  return _em_step_t(jnp.asarray(x).T, params, reg_covar)


def _active_mask(num_components, max_components: int) -> jax.Array:
  return jnp.arange(max_components) < num_components


def _sq_dists_t(xt: jax.Array, centres: jax.Array) -> jax.Array:
  """[K, N] squared distances between centres [K, D] and the points xt [D, N]."""
  return sum(((xt[None, i, :] - centres[:, i, None]) ** 2 for i in range(1, xt.shape[0])),
             (xt[None, 0, :] - centres[:, 0, None]) ** 2)


def kmeans_plusplus(x: jax.Array, num_components, key: jax.Array, *,
                    max_components: int) -> jax.Array:
  """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant): the first centre
  uniform over the points; for each next one draw L = 2 + floor(log K) candidates with probability
  D(x)^2 / sum D^2 (D = distance to the nearest chosen centre) and keep the candidate that most reduces
  sum D^2. (scikit-learn takes L from the actual k; here K = max_components so that shapes are static.)

  Returns [max_components, D] centres; rows j >= num_components repeat the first centre.
  """
  x = jnp.asarray(x)
  n = x.shape[0]
  trials = 2 + int(math.log(max_components))
  u = jax.random.uniform(key, (max_components, trials), x.dtype)   # all the draws at once
  first = x[jnp.minimum(jnp.floor(u[0, 0] * n).astype(jnp.int32), n - 1)]
  centres = jnp.broadcast_to(first, (max_components, x.shape[1]))
  d2 = jnp.sum((x - first) ** 2, axis=-1)

  def body(i, carry):
    centres, d2 = carry
    cdf = jnp.cumsum(d2)
    # inverse-CDF draws with P(n) = d2_n / sum d2; uniform if every point is already a centre
    idx = jnp.where(cdf[-1] > 0, jnp.sum(cdf[None, :] <= u[i, :, None] * cdf[-1], axis=1),
                    jnp.floor(u[i] * n).astype(jnp.int32))
    cands = x[jnp.clip(idx, 0, n - 1)]                                     # [L, D]
    cand_d2 = jnp.minimum(d2[None, :], _sq_dists_t(x.T, cands))            # [L, N]
    best = jnp.argmin(jnp.sum(cand_d2, axis=1))
    use = i < num_components
    centres = centres.at[i].set(jnp.where(use, cands[best], centres[i]))
    d2 = jnp.where(use, cand_d2[best], d2)
    return centres, d2

  centres, _ = lax.fori_loop(1, max_components, body, (centres, d2))
  return centres


def kmeans(x: jax.Array, num_components, key: jax.Array, *, max_components: int,
           max_iter: int = 300, tol: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means from k-means++ seeds: c_j <- mean{x_n : argmin_l |x_n - c_l| = j}, until the total
  squared centre shift is <= tol * mean_d Var(x_d) (scikit-learn's rule) or max_iter iterations.

  Returns (centres [max_components, D], labels [N]); inactive centres never receive points.
  """
  x = jnp.asarray(x)
  xt = x.T
  active = _active_mask(num_components, max_components)
  centres0 = kmeans_plusplus(x, num_components, key, max_components=max_components)
  tol_abs = tol * jnp.mean(jnp.var(x, axis=0))

  def assign_onehot(c):
    d = jnp.where(active[:, None], _sq_dists_t(xt, c), jnp.inf)         # [K, N]
    labels = jnp.argmin(d, axis=0)
    return labels, (labels[None, :] == jnp.arange(max_components)[:, None]).astype(x.dtype)

  def cond(carry):
    _, shift, it = carry
    return (it < max_iter) & (shift > tol_abs)

  def body(carry):
    c, _, it = carry
    _, onehot = assign_onehot(c)
    counts = onehot @ jnp.ones((xt.shape[1],), x.dtype)      # dots, not minor-axis reductions (see
    new = jnp.einsum("kn,dn->kd", onehot, xt)                 # _m_step_t)
    new = new / jnp.maximum(counts, 1.0)[:, None]
    new = jnp.where((counts > 0)[:, None], new, c)
    return new, jnp.sum((new - c) ** 2), it + 1

  centres, _, _ = lax.while_loop(cond, body, (centres0, jnp.asarray(jnp.inf, x.dtype), 0))
  return centres, assign_onehot(centres)[0]


def init_params(x: jax.Array, num_components, key: jax.Array, *, max_components: int,
                init: str = "kmeans", reg_covar=1e-6) -> GMMParams:
  """Initial mixture: hard (k-means / k-means++) or random responsibilities, then one M-step."""
  x = jnp.asarray(x)
  active = _active_mask(num_components, max_components)
  if init == "random":
    resp = jax.random.uniform(key, (x.shape[0], max_components), x.dtype)
    resp = jnp.where(active[None, :], resp, 0.0)
    resp = resp / jnp.sum(resp, axis=1, keepdims=True)
  else:
    if init == "kmeans":
      _, labels = kmeans(x, num_components, key, max_components=max_components)
    else:  # "k-means++": hard assignment to the seeds
      centres = kmeans_plusplus(x, num_components, key, max_components=max_components)
      labels = jnp.argmin(jnp.where(active[:, None], _sq_dists_t(x.T, centres), jnp.inf), axis=0)
    resp = jax.nn.one_hot(labels, max_components, dtype=x.dtype)
  return _m_step_t(x.T, resp.T, active, reg_covar)


def _check(x, *, init, reg_covar, max_iter, tol, max_components):
  if not hasattr(x, "ndim") or x.ndim != 2:
    raise ValueError(f"x must be a 2-D array [num_points, dim], got shape {getattr(x, 'shape', None)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if max_components is not None and (int(max_components) < 1 or int(max_components) > x.shape[0]):
    raise ValueError(f"max_components must be in 1..num_points={x.shape[0]}, got {max_components}")
  for name, v, ok in (("reg_covar", reg_covar, lambda v: v >= 0), ("max_iter", max_iter, lambda v: v >= 1),
                      ("tol", tol, lambda v: v >= 0)):
    if not isinstance(v, jax.core.Tracer) and not np.all(ok(np.asarray(v))):
      raise ValueError(f"{name} must be {'>= 1' if name == 'max_iter' else '>= 0'}, got {v}")


def _fit(x, num_components, key, *, max_components, init, reg_covar, max_iter, tol) -> GMMFit:
  n, dim = x.shape
  params = init_params(x, num_components, key, max_components=max_components, init=init,
                       reg_covar=reg_covar)
  tol = jnp.asarray(tol, x.dtype)
  xt = x.T

  def cond(carry):
    _, _, it, converged = carry
    return (it < max_iter) & ~converged

  def body(carry):
    params, prev_lb, it, _ = carry
    lb, params = _em_step_t(xt, params, reg_covar)
    return params, lb, it + 1, jnp.abs(lb - prev_lb) < tol

  params, lb, iters, converged = lax.while_loop(
      cond, body, (params, jnp.asarray(-jnp.inf, x.dtype), jnp.asarray(0, jnp.int32),
                   jnp.asarray(False)))
  ll = jnp.mean(_lse0(_weighted_log_prob_t(xt, params)))
  p = num_parameters(jnp.asarray(num_components, x.dtype), dim)
  aic = -2.0 * n * ll + 2.0 * p
  bic = -2.0 * n * ll + p * math.log(n)
  return GMMFit(params, ll, lb, iters, converged, jnp.asarray(num_components, jnp.int32), aic, bic)


def fit(x: jax.Array, num_components, key: jax.Array, *, max_components: int | None = None,
        init: str = "kmeans", reg_covar=1e-6, max_iter=100, tol=1e-3) -> GMMFit:
  """Fits one full-covariance GMM with ``num_components`` components by EM (see module docstring).

  Args:
    x: [N, D] floating points.
    num_components: k, a Python int or an int array (traceable, e.g. under vmap) <= max_components.
    key: PRNG key for the initialisation.
    max_components: padded size K (static); defaults to ``num_components`` when that is an int.
    init: ``'kmeans'`` (scikit-learn's default), ``'k-means++'`` or ``'random'``.
    reg_covar: added to the covariance diagonals (scikit-learn default 1e-6).
    max_iter: maximum EM steps (may be an array).
    tol: convergence threshold on the change of the mean log-likelihood.
  """
  if max_components is None:
    if isinstance(num_components, jax.core.Tracer) or np.ndim(num_components) != 0:
      raise ValueError("max_components must be given when num_components is not a Python int")
    max_components = int(num_components)
  x = jnp.asarray(x)
  _check(x, init=init, reg_covar=reg_covar, max_iter=max_iter, tol=tol, max_components=max_components)
  return _fit(x, num_components, key, max_components=max_components, init=init, reg_covar=reg_covar,
              max_iter=max_iter, tol=tol)


def fit_many(x: jax.Array, key: jax.Array, ks: Sequence[int] | jax.Array = tuple(range(2, 11)), *,
             max_components: int | None = None, init: str = "kmeans", reg_covar=1e-6, max_iter=100,
             tol=1e-3) -> GMMFit:
  """Fits a GMM for every k in ``ks`` in one vectorised call (``jax.vmap`` over k, components padded to
  ``max_components = max(ks)`` and masked), each with its own key. Returns a ``GMMFit`` whose leaves
  have a leading axis [len(ks)]. ``ks`` may be an int array (then ``max_components`` is required)."""
  if isinstance(ks, jax.core.Tracer):
    if max_components is None:
      raise ValueError("max_components must be given when ks is a traced array")
  else:
    ks_np = np.asarray(ks)
    if ks_np.ndim != 1 or ks_np.size == 0 or not np.issubdtype(ks_np.dtype, np.integer):
      raise ValueError(f"ks must be a non-empty 1-D sequence of ints, got {ks!r}")
    if max_components is None:
      max_components = int(ks_np.max())
    if ks_np.min() < 1 or ks_np.max() > max_components:
      raise ValueError(f"ks must lie in 1..max_components={max_components}, got {ks_np.tolist()}")
  x = jnp.asarray(x)
  _check(x, init=init, reg_covar=reg_covar, max_iter=max_iter, tol=tol, max_components=max_components)
  ks = jnp.asarray(ks, jnp.int32)
  keys = jax.random.split(key, ks.shape[0])
  return jax.vmap(lambda k, kk: _fit(x, k, kk, max_components=max_components, init=init,
                                     reg_covar=reg_covar, max_iter=max_iter, tol=tol))(ks, keys)


def select(fits: GMMFit, criterion: str = "aic") -> GMMFit:
  """The fit with the lowest ``criterion`` ('aic' or 'bic') among stacked fits (NaN counts as +inf)."""
  if criterion not in ("aic", "bic"):
    raise ValueError(f"criterion must be 'aic' or 'bic', got {criterion!r}")
  score = getattr(fits, criterion)
  best = jnp.argmin(jnp.where(jnp.isnan(score), jnp.inf, score))
  return jax.tree.map(lambda a: a[best], fits)


def fit_best(x: jax.Array, key: jax.Array, ks: Sequence[int] | jax.Array = tuple(range(2, 11)), *,
             criterion: str = "aic", **kwargs) -> GMMFit:
  """``select(fit_many(x, key, ks, **kwargs), criterion)``: the reference's refit of ALP-GMM."""
  return select(fit_many(x, key, ks, **kwargs), criterion)


def sample(params: GMMParams, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
  """Draws x = mu_j + L_j eps, j ~ Categorical(pi), eps ~ N(0, I). Returns (samples [n, D], j [n])."""
  kc, kn = jax.random.split(key)
  logits = jnp.where(params.active, jnp.log(jnp.where(params.active, params.weights, 1.0)), -jnp.inf)
  comp = jax.random.categorical(kc, logits, shape=(num_samples,))
  eps = jax.random.normal(kn, (num_samples, params.means.shape[-1]), params.means.dtype)
  x = params.means[comp] + jnp.einsum("nij,nj->ni", params.cholesky[comp], eps)
  return x, comp
