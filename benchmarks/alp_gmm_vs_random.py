"""ALP-GMM vs random task sampling on the toy env of the ALP-GMM paper (Portelas et al. 2019, figure 2).

Runs both teachers for 20,000 episodes over 5 seeds (all seeds of a teacher in one jitted, vmapped call),
prints the mastered cells (of 100) every 1,000 episodes as mean +- std over the seeds, and saves a PNG
with the mastery curves and where ALP-GMM samples its tasks over time (seed 0).

    python benchmarks/alp_gmm_vs_random.py --out alp_gmm_toy_env.png [--seeds 5] [--episodes 20000]
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from prox.tasks import toy_env


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="path of the PNG to write")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--episodes", type=int, default=20_000)
  parser.add_argument("--score-every", type=int, default=1_000)
  args = parser.parse_args()

  keys = jax.random.split(jax.random.key(0), args.seeds)
  runs, seconds = {}, {}
  for name in ("random", "alp_gmm"):
    t = time.perf_counter()
    runs[name] = jax.block_until_ready(
        toy_env.run(name, keys, num_episodes=args.episodes, score_every=args.score_every))
    seconds[name] = time.perf_counter() - t
  print(f"{args.seeds} seeds x {args.episodes} episodes per teacher, all seeds in one jitted call: "
        f"random {seconds['random']:.1f} s, ALP-GMM {seconds['alp_gmm']:.1f} s (compile included)")

  scores = {k: np.asarray(v.scores) for k, v in runs.items()}
  print(f"\nmastered cells (of 100), mean +- std over {args.seeds} seeds")
  print(f"{'episode':>8}  {'Random':>13}  {'ALP-GMM':>13}")
  for j in range(scores["random"].shape[1]):
    r, a = scores["random"][:, j], scores["alp_gmm"][:, j]
    print(f"{j * args.score_every:8d}  {r.mean():6.1f} +- {r.std():4.1f}  {a.mean():6.1f} +- {a.std():4.1f}")
  print(f"final per seed: Random {scores['random'][:, -1].tolist()}, ALP-GMM {scores['alp_gmm'][:, -1].tolist()}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = np.asarray(runs["alp_gmm"].tasks[0])
  windows = np.linspace(0, args.episodes, 6).astype(int)
  fig = plt.figure(figsize=(18, 7))
  ax = fig.add_subplot(2, 6, (1, 8))
  x = np.arange(scores["random"].shape[1]) * args.score_every / 1000
  for name, label, colour in (("random", "Random", "grey"), ("alp_gmm", "ALP-GMM", "tab:blue")):
    m, s = scores[name].mean(0), scores[name].std(0)
    ax.plot(x, m, color=colour, label=label, linewidth=2)
    ax.fill_between(x, m - s, m + s, color=colour, alpha=0.25)
  ax.set_xlabel("episodes (x1000)")
  ax.set_ylabel("mastered cells (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"toy env, mean +- std over {args.seeds} seeds")
  ax.legend()
  for i, (lo, hi) in enumerate(zip(windows[:-1], windows[1:])):
    a = fig.add_subplot(2, 6, [3, 4, 5, 6, 11][i])
    a.scatter(tasks[lo:hi, 0], tasks[lo:hi, 1], s=1, alpha=0.3, color="tab:blue")
    a.set_xticks(np.linspace(0, 1, 11), minor=True)
    a.set_yticks(np.linspace(0, 1, 11), minor=True)
    a.grid(which="minor", linewidth=0.3)
    a.set_xlim(0, 1)
    a.set_ylim(0, 1)
    a.set_aspect("equal")
    a.set_title(f"ALP-GMM tasks, episodes {lo}-{hi}", fontsize=9)
  comp = np.asarray(runs["alp_gmm"].env_state.competence[0])
  a = fig.add_subplot(2, 6, 9)
  a.imshow(comp.T, origin="lower", extent=(0, 1, 0, 1), vmin=0, vmax=100, cmap="viridis")
  a.set_title("ALP-GMM final competence (seed 0)", fontsize=9)
  comp = np.asarray(runs["random"].env_state.competence[0])
  a = fig.add_subplot(2, 6, 10)
  a.imshow(comp.T, origin="lower", extent=(0, 1, 0, 1), vmin=0, vmax=100, cmap="viridis")
  a.set_title("Random final competence (seed 0)", fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"\nsaved {args.out}")


if __name__ == "__main__":
  main()
