"""Tables (results.md), results.json and plots of the ``curriculum`` experiment."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

_NAMES = {"random": "Random", "alp_gmm": "ALP-GMM", "pudf": "PUDF", "plain": "plain", "ce": "cross-entropy",
          "pskd": "PS-KD"}


def _ms(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.4f} ± {v.std():.4f}"


def summary(results: dict) -> dict[str, Any]:
  """Headline scalars of every part that ran (printed by ``prox`` and stored in results.json)."""
  out: dict[str, Any] = {}
  if "alp_gmm" in results:
    for name, t in results["alp_gmm"]["teachers"].items():
      final = np.asarray(t["scores"])[:, -1]
      out[f"alp_gmm/{name}_mastered_mean"] = float(final.mean())
      out[f"alp_gmm/{name}_mastered_std"] = float(final.std())
  if "pudf" in results:
    for name, runs in results["pudf"]["runs"].items():
      out[f"pudf/{name}_accuracy_mean"] = float(np.mean([r["accuracy"][-1] for r in runs]))
  if "pskd" in results:
    for name, runs in results["pskd"]["runs"].items():
      out[f"pskd/{name}_accuracy_mean"] = float(np.mean([r["accuracy"][-1] for r in runs]))
      out[f"pskd/{name}_ece_mean"] = float(np.mean([r["ece"] for r in runs]))
  if "forecast" in results:
    f = results["forecast"]
    out["forecast/final_accuracy"] = f["final"]
    out["forecast/stop_step"] = f["stop"]["step"] if f["stop"] else -1
  return out


def _alp_tables(r: dict) -> list[str]:
  scores = {k: np.asarray(v["scores"], np.float64) for k, v in r["teachers"].items()}
  lines = [f"## ALP-GMM vs Random on the toy env ({r['seeds']} seeds, {r['episodes']:,} episodes)", "",
           "Mastered cells (of 100), mean ± std over seeds [min, max]:", "",
           "| episodes | Random | ALP-GMM |", "|---:|---|---|"]
  for j in range(scores["random"].shape[1]):
    cells = [f"{s[:, j].mean():.1f} ± {s[:, j].std():.1f} [{s[:, j].min():.0f}, {s[:, j].max():.0f}]"
             for s in (scores["random"], scores["alp_gmm"])]
    lines.append(f"| {j * r['score_every']:,} | {cells[0]} | {cells[1]} |")
  lines += ["", "Final mastered cells per seed: "
            + "; ".join(f"{_NAMES[k]} {s[:, -1].astype(int).tolist()}" for k, s in scores.items()),
            "", "Wall time of each teacher's run (all seeds in one jitted call, compile included): "
            + ", ".join(f"{_NAMES[k]} {v['seconds']:.1f} s" for k, v in r["teachers"].items()),
            "", "![mastery](alp_gmm_mastery.png)", "", "![samples](alp_gmm_samples.png)", ""]
  return lines


def _pudf_tables(r: dict) -> list[str]:
  runs = r["runs"]
  n_seeds = len(runs["pudf"])
  lines = [f"## PUDF vs random order vs plain training on digits ({n_seeds} seeds, {r['epochs']} epochs)", "",
           f"Artificial crowd: {len(r['crowd_accuracy'])} models, training-set accuracy "
           f"{', '.join(f'{a:.3f}' for a in r['crowd_accuracy'])}; 1PL fit in {r['irt_steps']} L-BFGS steps; "
           f"difficulties range {min(r['difficulties']):.2f} .. {max(r['difficulties']):.2f}.", "",
           "Test accuracy (mean ± std over seeds) and optimizer steps so far:", "",
           "| epoch | PUDF items | PUDF theta | PUDF | random order | plain | steps PUDF / plain |",
           "|---:|---:|---:|---|---|---|---:|"]
  for e in range(r["epochs"]):
    items = np.mean([x["items"][e] for x in runs["pudf"]])
    theta = np.mean([x["theta"][e] for x in runs["pudf"]])
    acc = {k: _ms([x["accuracy"][e] for x in v]) for k, v in runs.items()}
    steps = (np.mean([x["steps"][e] for x in runs["pudf"]]), np.mean([x["steps"][e] for x in runs["plain"]]))
    lines.append(f"| {e + 1} | {items:.0f} | {theta:.2f} | {acc['pudf']} | {acc['random']} | {acc['plain']} | "
                 f"{steps[0]:.0f} / {steps[1]:.0f} |")
  pudf_steps = np.mean([x["steps"][-1] for x in runs["pudf"]])
  plain_steps = np.asarray([np.mean([x["steps"][e] for x in runs["plain"]]) for e in range(r["epochs"])])
  e_match = int(np.searchsorted(plain_steps, pudf_steps))
  if e_match < r["epochs"]:
    matched = _ms([x["accuracy"][e_match] for x in runs["plain"]])
    lines += ["", f"At equal compute: PUDF's {r['epochs']} epochs take {pudf_steps:.0f} optimizer steps (mean over "
              f"seeds); plain training reaches {matched} test accuracy after epoch {e_match + 1} "
              f"({plain_steps[e_match]:.0f} steps), vs PUDF's final {_ms([x['accuracy'][-1] for x in runs['pudf']])}."]
  lines += ["", "Final test accuracy per seed: " + "; ".join(
      f"{'random order' if k == 'random' else _NAMES[k]} {[round(x['accuracy'][-1], 4) for x in v]}"
      for k, v in runs.items()),
      "", "![pudf](pudf_accuracy.png)", ""]
  return lines


def _pskd_tables(r: dict) -> list[str]:
  runs = r["runs"]
  lines = [f"## PS-KD vs cross-entropy on digits ({len(runs['ce'])} seeds, {r['epochs']} epochs, "
           f"alpha_T = {r['alpha_T']})", "",
           "| method | final test accuracy | test error | ECE | test NLL | best-epoch accuracy |",
           "|---|---|---|---|---|---|"]
  for k, v in runs.items():
    acc = [x["accuracy"][-1] for x in v]
    lines.append(f"| {_NAMES[k]} | {_ms(acc)} | {_ms(1 - np.asarray(acc))} | {_ms([x['ece'] for x in v])} | "
                 f"{_ms([x['nll'] for x in v])} | {_ms([max(x['accuracy']) for x in v])} |")
  lines += ["", "Per seed (accuracy, ECE): " + "; ".join(
      f"{_NAMES[k]} {[(round(x['accuracy'][-1], 4), round(x['ece'], 4)) for x in v]}" for k, v in runs.items()),
      "", "![pskd](pskd_accuracy.png)", ""]
  return lines


def _forecast_tables(r: dict) -> list[str]:
  lines = [f"## Learning-curve forecasting of the classify run (final test accuracy {r['final']:.4f} at step "
           f"{int(r['steps'][-1])})", "",
           f"| after | step | points | family | predicted final | {int(r['level'] * 100)}% interval | "
           "actual final | error | covered | best so far |", "|---:|---:|---:|---|---:|---|---:|---:|---|---:|"]
  for a in r["at_fraction"]:
    if "skipped" in a:
      lines.append(f"| {a['fraction']:.0%} | | {a['points']} | {a['skipped']} | | | | | | |")
      continue
    lines.append(f"| {a['fraction']:.0%} | {a['step']} | {a['points']} | {a['family']} | {a['predicted']:.4f} | "
                 f"[{a['lower']:.4f}, {a['upper']:.4f}] | {a['actual']:.4f} | {a['error']:+.4f} | "
                 f"{'yes' if a['covered'] else 'no'} | {a['best_so_far']:.4f} |")
  s = r["stop"]
  lines.append("")
  if s:
    lines.append(f"Stopping rule (stop when the interval's top gains < {r['min_gain']} over the best so far): "
                 f"fires at step {s['step']} of {int(r['steps'][-1])} ({s['steps_saved_fraction']:.0%} of the "
                 f"steps saved); best accuracy then {s['best_so_far']:.4f}, predicted final {s['predicted']:.4f} "
                 f"(upper {s['upper']:.4f}), actual final {s['final']:.4f}.")
  else:
    lines.append(f"Stopping rule (min_gain {r['min_gain']}): never fires within the run.")
  lines += ["", "![forecast](forecast.png)", ""]
  return lines


def _verdict(results: dict) -> list[str]:
  """One factual line per part, from the numbers below it."""
  out = []
  if "alp_gmm" in results:
    t = results["alp_gmm"]["teachers"]
    a, r = (np.asarray(t[k]["scores"])[:, -1] for k in ("alp_gmm", "random"))
    out.append(f"- ALP-GMM masters {a.mean():.1f} ± {a.std():.1f} cells (min {a.min()}) vs Random "
               f"{r.mean():.1f} ± {r.std():.1f} (max {r.max()}) after {results['alp_gmm']['episodes']:,} episodes.")
  if "pudf" in results:
    fin = {k: np.asarray([x["accuracy"][-1] for x in v]) for k, v in results["pudf"]["runs"].items()}
    out.append(f"- PUDF final test accuracy {fin['pudf'].mean():.4f} vs random order {fin['random'].mean():.4f} vs "
               f"plain {fin['plain'].mean():.4f} (difference PUDF - plain {fin['pudf'].mean() - fin['plain'].mean():+.4f}).")
  if "pskd" in results:
    runs = results["pskd"]["runs"]
    acc = {k: np.mean([x["accuracy"][-1] for x in v]) for k, v in runs.items()}
    ece = {k: np.mean([x["ece"] for x in v]) for k, v in runs.items()}
    out.append(f"- PS-KD test accuracy {acc['pskd']:.4f} vs cross-entropy {acc['ce']:.4f} ({acc['pskd'] - acc['ce']:+.4f}); "
               f"ECE {ece['pskd']:.4f} vs {ece['ce']:.4f} ({ece['pskd'] - ece['ce']:+.4f}).")
  if "forecast" in results:
    f = results["forecast"]
    errs = [a["error"] for a in f["at_fraction"] if "skipped" not in a]
    if errs:
      out.append("- Forecast error of the final accuracy: " + ", ".join(
          f"{a['error']:+.4f} after {a['fraction']:.0%}" for a in f["at_fraction"] if "skipped" not in a) + ".")
  return (["Summary:", ""] + out + [""]) if out else []


def _plots(workdir: str, results: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colours = {"random": "grey", "alp_gmm": "tab:blue", "pudf": "tab:blue", "plain": "tab:green",
             "ce": "grey", "pskd": "tab:orange"}
  if "alp_gmm" in results:
    r = results["alp_gmm"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, t in r["teachers"].items():
      s = np.asarray(t["scores"], np.float64)
      x = np.arange(s.shape[1]) * r["score_every"] / 1000
      ax.plot(x, s.mean(0), color=colours[k], label=_NAMES[k], linewidth=2)
      ax.fill_between(x, s.min(0), s.max(0), color=colours[k], alpha=0.2)
    ax.set(xlabel="episodes (x1000)", ylabel="mastered cells (of 100)",
           title=f"toy env: mean, min-max band over {r['seeds']} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "alp_gmm_mastery.png"), dpi=72)
    plt.close(fig)

    tasks = np.asarray(r["alp_gmm_tasks_seed0"])
    edges = np.linspace(0, len(tasks), 6).astype(int)
    fig, axes = plt.subplots(1, 6, figsize=(18, 3.4))
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
      a = axes[i]
      a.hist2d(tasks[lo:hi, 0], tasks[lo:hi, 1], bins=20, range=((0, 1), (0, 1)), cmap="Blues")
      a.set_xticks(np.linspace(0, 1, 11), minor=True)
      a.set_yticks(np.linspace(0, 1, 11), minor=True)
      a.grid(which="minor", linewidth=0.3)
      a.set_aspect("equal")
      a.set_title(f"episodes {lo:,}-{hi:,}", fontsize=9)
    comp = np.asarray(r["teachers"]["alp_gmm"]["final_competence_seed0"])
    axes[5].imshow(comp.T, origin="lower", extent=(0, 1, 0, 1), vmin=0, vmax=100, cmap="viridis")
    axes[5].set_title("final competence", fontsize=9)
    fig.suptitle("where ALP-GMM samples tasks over time (seed 0; task density per window)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "alp_gmm_samples.png"), dpi=72)
    plt.close(fig)

  for part in ("pudf", "pskd"):
    if part not in results:
      continue
    runs_by_method = results[part]["runs"]
    axes_x = [("epoch", None)] + ([("optimizer steps", "steps")] if part == "pudf" else [])
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4), squeeze=False)
    low = min(np.asarray([x["accuracy"] for x in v])[:, -1].min() for v in runs_by_method.values())
    for ax, (xlabel, field) in zip(axes[0], axes_x):
      for k, runs in runs_by_method.items():
        acc = np.asarray([x["accuracy"] for x in runs])
        label = "random order" if (part, k) == ("pudf", "random") else _NAMES[k]
        if field is None:
          x = np.arange(1, acc.shape[1] + 1)
          ax.plot(x, acc.mean(0), color=colours[k], label=label)
          ax.fill_between(x, acc.min(0), acc.max(0), color=colours[k], alpha=0.2)
        else:
          for i, run in enumerate(runs):
            ax.plot(run[field], run["accuracy"], color=colours[k], alpha=0.7, label=label if i == 0 else None)
      ax.set(xlabel=xlabel, ylabel="test accuracy",
             title=f"{part}: " + ("mean, min-max band over seeds" if field is None else "each seed vs steps"))
      ax.set_ylim(max(0.0, float(low) - 0.15), 1.0)
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"{part}_accuracy.png"), dpi=72)
    plt.close(fig)

  if "forecast" in results:
    r = results["forecast"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(r["steps"], r["accuracy"], "k.-", label="test accuracy")
    for a in r["at_fraction"]:
      if "skipped" in a:
        continue
      ax.errorbar([r["steps"][-1]], [a["predicted"]], yerr=[[a["predicted"] - a["lower"]], [a["upper"] - a["predicted"]]],
                  fmt="o", capsize=3, label=f"forecast after {a['fraction']:.0%}")
    if r["stop"]:
      ax.axvline(r["stop"]["step"], color="tab:red", linestyle="--", label="stopping rule fires")
    ax.set(xlabel="step", ylabel="test accuracy", title="classify: forecasts of the final accuracy")
    ax.set_ylim(max(0.0, min(r["accuracy"][len(r["accuracy"]) // 5:]) - 0.05), 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "forecast.png"), dpi=72)
    plt.close(fig)


def write(workdir: str, config: ml_collections.ConfigDict, results: dict, summary_: dict) -> None:
  """results.json (everything), results.md (a table per part) and the plots."""
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump({"config": json.loads(config.to_json_best_effort()), "summary": summary_, "results": results}, fh)
  seconds = {k: v.get("seconds", 0.0) for k, v in results.items()}
  lines = ["# Experiment `curriculum`", "",
           "Run time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
           + f"; total {sum(seconds.values()):.0f} s.", ""]
  lines += _verdict(results)
  builders = {"alp_gmm": _alp_tables, "pudf": _pudf_tables, "pskd": _pskd_tables, "forecast": _forecast_tables}
  for part in results:
    lines += builders[part](results[part])
  with open(os.path.join(workdir, "results.md"), "w") as fh:
    fh.write("\n".join(lines))
  _plots(workdir, results)
