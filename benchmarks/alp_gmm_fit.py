"""Benchmark: ALP-GMM's refit, GMMs with k = 2..10 on 250 3-D points, in one jitted JAX call
(``prox.tasks.gmm.fit_best``) vs the reference's loop over scikit-learn's ``GaussianMixture`` (full
covariance, k-means init, reg_covar 1e-6, max_iter 100, tol 1e-3, AIC selection).

Two data sets: a synthetic mixture of 4 Gaussians, and the (task, alp) points ALP-GMM actually fits
(the last 250 episodes of a prox toy-env run after 5,000 episodes). Prints compile time, median run
times, their ratio, and the selected k / AIC of both.

    python benchmarks/alp_gmm_fit.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from prox.tasks import gmm, toy_env

KS = tuple(range(2, 11))


def synthetic(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  centres = np.array([[0.2, 0.2, 0.0], [0.8, 0.3, 0.3], [0.3, 0.8, 0.6], [0.7, 0.7, 0.9]])
  x = np.concatenate([rng.normal(c, 0.05, (63, 3)) for c in centres])[:250]
  return x.astype(np.float32)


def toy_env_points() -> np.ndarray:
  run = toy_env.run("alp_gmm", jax.random.split(jax.random.key(0), 1), num_episodes=5000)
  return np.asarray(run.teacher_state.recent[0])


def sklearn_fit(x: np.ndarray, seed: int):
  fits = [GaussianMixture(k, covariance_type="full", reg_covar=1e-6, max_iter=100, tol=1e-3,
                          init_params="kmeans", random_state=seed).fit(x) for k in KS]
  aics = [f.aic(x) for f in fits]
  best = int(np.argmin(aics))
  return KS[best], aics[best]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  fit = jax.jit(lambda x, key: gmm.fit_best(x, key, KS))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; scikit-learn with 1 BLAS thread "
        "(OpenBLAS' pool makes its tiny solves ~100x slower on this shared 2-core machine)")
  datasets = (("synthetic, 4 Gaussian clusters", synthetic()), ("toy-env (task, alp)", toy_env_points()))
  t = time.perf_counter()
  fit.lower(datasets[0][1], jax.random.key(0)).compile()
  print(f"prox compile time (one program for every k, both data sets): {time.perf_counter() - t:.2f} s")
  for name, x in datasets:
    jax.block_until_ready(fit(x, jax.random.key(0)))  # warm-up
    times, ks, aics = [], [], []
    for r in range(args.repeats):
      t = time.perf_counter()
      res = jax.block_until_ready(fit(x, jax.random.key(r)))
      times.append(time.perf_counter() - t)
      ks.append(int(res.num_components))
      aics.append(float(res.aic))
    t_jax = float(np.median(times))
    sk_times, sk_ks, sk_aics = [], [], []
    with threadpool_limits(limits=1):
      sklearn_fit(x, 0)  # warm-up (imports, caches)
      for r in range(max(3, args.repeats // 4)):
        t = time.perf_counter()
        k, aic = sklearn_fit(x, r)
        sk_times.append(time.perf_counter() - t)
        sk_ks.append(k)
        sk_aics.append(aic)
    t_sk = float(np.median(sk_times))
    print(f"\n{name}: {x.shape[0]} points, dim {x.shape[1]}, k = {KS[0]}..{KS[-1]}")
    print(f"  prox jitted:  median of {args.repeats} seeds {t_jax * 1e3:.2f} ms; selected k {ks}, "
          f"best AIC mean {np.mean(aics):.1f}")
    print(f"  sklearn loop: median of {len(sk_times)} seeds {t_sk * 1e3:.2f} ms; selected k {sk_ks}, "
          f"best AIC mean {np.mean(sk_aics):.1f}")
    print(f"  speed-up (sklearn / prox): {t_sk / t_jax:.1f}x")


if __name__ == "__main__":
  main()
