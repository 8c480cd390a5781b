"""The ``curriculum`` experiment's headline scalars, tables (results.md) and figures (through ``report``)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from prox.experiments import report

_NAMES = {"random": "Random", "alp_gmm": "ALP-GMM", "pudf": "PUDF", "plain": "plain", "ce": "cross-entropy",
          "pskd": "PS-KD"}
_COLOURS = {"random": "grey", "alp_gmm": "tab:blue", "pudf": "tab:blue", "plain": "tab:green", "ce": "grey",
            "pskd": "tab:orange"}


def _ms(values) -> str:
  return report.fmt_mean_std(values, digits=4)


def _final(runs: list[dict], field: str = "accuracy") -> np.ndarray:
  return np.asarray([r[field][-1] if isinstance(r[field], list) else r[field] for r in runs], np.float64)


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
      out[f"pudf/{name}_accuracy_mean"] = float(_final(runs).mean())
  if "pskd" in results:
    for name, runs in results["pskd"]["runs"].items():
      out[f"pskd/{name}_accuracy_mean"] = float(_final(runs).mean())
      out[f"pskd/{name}_ece_mean"] = float(_final(runs, "ece").mean())
  if "forecast" in results:
    f = results["forecast"]
    out["forecast/final_accuracy"] = f["final"]
    out["forecast/stop_step"] = f["stop"]["step"] if f["stop"] else -1
  return out


def _alp_tables(r: dict) -> list[str]:
  s = {k: np.asarray(v["scores"], np.float64) for k, v in r["teachers"].items()}
  cell = lambda x: f"{x.mean():.1f} ± {x.std():.1f} [{x.min():.0f}, {x.max():.0f}]"
  rows = [(f"{j * r['score_every']:,}", cell(s["random"][:, j]), cell(s["alp_gmm"][:, j]))
          for j in range(s["random"].shape[1])]
  return [f"## ALP-GMM vs Random on the toy env ({r['seeds']} seeds, {r['episodes']:,} episodes)", "",
          "Mastered cells (of 100), mean ± std (population) over seeds [min, max]:", "",
          report.markdown_table(("episodes", "Random", "ALP-GMM"), rows),
          "Final mastered cells per seed: "
          + "; ".join(f"{_NAMES[k]} {v[:, -1].astype(int).tolist()}" for k, v in s.items()), "",
          "Wall time of each teacher's run (all seeds in one jitted call, compile included): "
          + ", ".join(f"{_NAMES[k]} {v['seconds']:.1f} s" for k, v in r["teachers"].items()), "",
          "![mastery](alp_gmm_mastery.png)", "", "![samples](alp_gmm_samples.png)", ""]


def _pudf_tables(r: dict) -> list[str]:
  runs, epochs = r["runs"], r["epochs"]
  mean = lambda method, field, e: np.mean([x[field][e] for x in runs[method]])
  rows = [(e + 1, f"{mean('pudf', 'items', e):.0f}", f"{mean('pudf', 'theta', e):.2f}",
           *(_ms([x["accuracy"][e] for x in runs[k]]) for k in ("pudf", "random", "plain")),
           f"{mean('pudf', 'steps', e):.0f} / {mean('plain', 'steps', e):.0f}") for e in range(epochs)]
  lines = [f"## PUDF vs random order vs plain training on digits ({len(runs['pudf'])} seeds, {epochs} epochs)", "",
           f"Artificial crowd: {len(r['crowd_accuracy'])} models, training-set accuracy "
           f"{', '.join(f'{a:.3f}' for a in r['crowd_accuracy'])}; 1PL fit in {r['irt_steps']} L-BFGS steps; "
           f"difficulties range {min(r['difficulties']):.2f} .. {max(r['difficulties']):.2f} in "
           f"{len(np.unique(np.round(r['difficulties'], 2)))} levels to 0.01 (a 1PL difficulty depends only on how "
           f"many members answered the item). PUDF's first epochs train on the {r['first_items']} easiest items "
           f"(ties by index); their classes (counts of 0..9): {r['first_items_classes']}.", "",
           "Test accuracy (mean ± std over seeds) and optimizer steps so far:", "",
           report.markdown_table(("epoch", "PUDF items", "PUDF theta", "PUDF", "random order", "plain",
                                  "steps PUDF / plain"), rows, align="rrrlllr")]
  pudf_steps = mean("pudf", "steps", epochs - 1)
  plain_steps = np.asarray([mean("plain", "steps", e) for e in range(epochs)])
  e_match = int(np.searchsorted(plain_steps, pudf_steps))
  if e_match < epochs:
    lines += [f"At equal compute: PUDF's {epochs} epochs take {pudf_steps:.0f} optimizer steps (mean over seeds); "
              f"plain training reaches {_ms([x['accuracy'][e_match] for x in runs['plain']])} test accuracy after "
              f"epoch {e_match + 1} ({plain_steps[e_match]:.0f} steps), vs PUDF's final {_ms(_final(runs['pudf']))}.", ""]
  lines += ["Final test accuracy per seed: " + "; ".join(
      f"{'random order' if k == 'random' else _NAMES[k]} {[round(float(x), 4) for x in _final(v)]}"
      for k, v in runs.items()),
      "", "![pudf](pudf_accuracy.png)", ""]
  return lines


def _pskd_tables(r: dict) -> list[str]:
  runs = r["runs"]
  rows = [(_NAMES[k], _ms(_final(v)), _ms(1 - _final(v)), _ms(_final(v, "ece")), _ms(_final(v, "nll")),
           _ms([max(x["accuracy"]) for x in v])) for k, v in runs.items()]
  return [f"## PS-KD vs cross-entropy on digits ({len(runs['ce'])} seeds, {r['epochs']} epochs, "
          f"alpha_T = {r['alpha_T']})", "",
          report.markdown_table(("method", "final test accuracy", "test error", "ECE", "test NLL",
                                 "best-epoch accuracy"), rows, align="llllll"),
          "Per seed (accuracy, ECE): " + "; ".join(
              f"{_NAMES[k]} {[(round(x['accuracy'][-1], 4), round(x['ece'], 4)) for x in v]}" for k, v in runs.items()),
          "", "![pskd](pskd_accuracy.png)", ""]


def _forecast_tables(r: dict) -> list[str]:
  rows = []
  for a in r["at_fraction"]:
    if "skipped" in a:
      rows.append((f"{a['fraction']:.0%}", "", a["points"], a["skipped"], "", "", "", "", "", ""))
      continue
    rows.append((f"{a['fraction']:.0%}", a["step"], a["points"], a["family"], f"{a['predicted']:.4f}",
                 f"[{a['lower']:.4f}, {a['upper']:.4f}]", f"{a['actual']:.4f}", f"{a['error']:+.4f}",
                 "yes" if a["covered"] else "no", f"{a['best_so_far']:.4f}"))
  lines = [f"## Learning-curve forecasting of the classify run (final test accuracy {r['final']:.4f} at step "
           f"{int(r['steps'][-1])})", "",
           report.markdown_table(("after", "step", "points", "family", "predicted final",
                                  f"{int(r['level'] * 100)}% interval", "actual final", "error", "covered",
                                  "best so far"), rows, align="rrrlrlrrlr")]
  s = r["stop"]
  if s:
    lines.append(f"Stopping rule (stop when the interval's top gains < {r['min_gain']} over the best so far): "
                 f"fires at step {s['step']} of {int(r['steps'][-1])} ({s['steps_saved_fraction']:.0%} of the "
                 f"steps saved); best accuracy then {s['best_so_far']:.4f}, predicted final {s['predicted']:.4f} "
                 f"(upper {s['upper']:.4f}), actual final {s['final']:.4f}.")
  else:
    lines.append(f"Stopping rule (min_gain {r['min_gain']}): never fires within the run.")
  return lines + ["", "![forecast](forecast.png)", ""]


def _verdict(results: dict) -> list[str]:
  """One factual line per part, from the numbers below it."""
  out = []
  if "alp_gmm" in results:
    a, r = (np.asarray(results["alp_gmm"]["teachers"][k]["scores"])[:, -1] for k in ("alp_gmm", "random"))
    out.append(f"- ALP-GMM masters {a.mean():.1f} ± {a.std():.1f} cells (min {a.min()}) vs Random "
               f"{r.mean():.1f} ± {r.std():.1f} (max {r.max()}) after {results['alp_gmm']['episodes']:,} episodes.")
  if "pudf" in results:
    fin = {k: _final(v).mean() for k, v in results["pudf"]["runs"].items()}
    out.append(f"- PUDF final test accuracy {fin['pudf']:.4f} vs random order {fin['random']:.4f} vs "
               f"plain {fin['plain']:.4f} (difference PUDF - plain {fin['pudf'] - fin['plain']:+.4f}).")
  if "pskd" in results:
    runs = results["pskd"]["runs"]
    acc = {k: _final(v).mean() for k, v in runs.items()}
    ece = {k: _final(v, "ece").mean() for k, v in runs.items()}
    out.append(f"- PS-KD test accuracy {acc['pskd']:.4f} vs cross-entropy {acc['ce']:.4f} ({acc['pskd'] - acc['ce']:+.4f}); "
               f"ECE {ece['pskd']:.4f} vs {ece['ce']:.4f} ({ece['pskd'] - ece['ce']:+.4f}).")
  if "forecast" in results:
    shown = [a for a in results["forecast"]["at_fraction"] if "skipped" not in a]
    if shown:
      out.append("- Forecast error of the final accuracy: "
                 + ", ".join(f"{a['error']:+.4f} after {a['fraction']:.0%}" for a in shown) + ".")
  return (["Summary:", ""] + out + [""]) if out else []


def markdown(results: dict) -> str:
  """results.md: run times, the summary lines and a section per part."""
  seconds = {k: v.get("seconds", 0.0) for k, v in results.items()}
  lines = ["# Experiment `curriculum`", "",
           "Compute time per part (s, wall time of its runs, compiles included): "
           + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.0f} s.", "",
           "± is the sample standard deviation over seeds (ddof 1) unless marked population.", ""]
  lines += _verdict(results)
  builders = {"alp_gmm": _alp_tables, "pudf": _pudf_tables, "pskd": _pskd_tables, "forecast": _forecast_tables}
  for part in results:
    lines += builders[part](results[part])
  return "\n".join(lines)


def _alp_figures(r: dict) -> dict[str, Callable[[str], None]]:
  def mastery(path: str) -> None:
    fig, ax = report.figure(6, 4)
    for k, t in r["teachers"].items():
      s = np.asarray(t["scores"], np.float64)
      x = np.arange(s.shape[1]) * r["score_every"] / 1000
      ax.plot(x, s.mean(0), color=_COLOURS[k], label=_NAMES[k], linewidth=2)
      ax.fill_between(x, s.min(0), s.max(0), color=_COLOURS[k], alpha=0.2)
    ax.set(xlabel="episodes (x1000)", ylabel="mastered cells (of 100)",
           title=f"toy env: mean, min-max band over {r['seeds']} seeds")
    ax.legend()
    report.save_figure(fig, path, dpi=72)

  def samples(path: str) -> None:
    tasks = np.asarray(r["alp_gmm_tasks_seed0"])
    edges = np.linspace(0, len(tasks), 6).astype(int)
    fig, axes = report.figure(18, 3.6, ncols=6)
    for a, lo, hi in zip(axes, edges[:-1], edges[1:]):
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
    report.save_figure(fig, path, dpi=72)

  return {"alp_gmm_mastery.png": mastery, "alp_gmm_samples.png": samples}


def _accuracy_figure(part: str, runs_by_method: dict) -> Callable[[str], None]:
  def draw(path: str) -> None:
    axes_x = [("epoch", None)] + ([("optimizer steps", "steps")] if part == "pudf" else [])
    fig, axes = report.figure(6 * len(axes_x), 4, ncols=len(axes_x), squeeze=False)
    low = min(_final(v).min() for v in runs_by_method.values())
    for ax, (xlabel, field) in zip(axes[0], axes_x):
      for k, runs in runs_by_method.items():
        acc = np.asarray([x["accuracy"] for x in runs])
        label = "random order" if (part, k) == ("pudf", "random") else _NAMES[k]
        if field is None:
          x = np.arange(1, acc.shape[1] + 1)
          ax.plot(x, acc.mean(0), color=_COLOURS[k], label=label)
          ax.fill_between(x, acc.min(0), acc.max(0), color=_COLOURS[k], alpha=0.2)
        else:
          for i, run in enumerate(runs):
            ax.plot(run[field], run["accuracy"], color=_COLOURS[k], alpha=0.7, label=label if i == 0 else None)
      ax.set(xlabel=xlabel, ylabel="test accuracy",
             title=f"{part}: " + ("mean, min-max band over seeds" if field is None else "each seed vs steps"))
      ax.set_ylim(max(0.0, float(low) - 0.15), 1.0)
      ax.legend()
    report.save_figure(fig, path, dpi=72)

  return draw


def _forecast_figure(r: dict) -> Callable[[str], None]:
  def draw(path: str) -> None:
    fig, ax = report.figure(6, 4)
    ax.plot(r["steps"], r["accuracy"], "k.-", label="test accuracy")
    for a in r["at_fraction"]:
      if "skipped" not in a:
        ax.errorbar([r["steps"][-1]], [a["predicted"]],
                    yerr=[[a["predicted"] - a["lower"]], [a["upper"] - a["predicted"]]],
                    fmt="o", capsize=3, label=f"forecast after {a['fraction']:.0%}")
    if r["stop"]:
      ax.axvline(r["stop"]["step"], color="tab:red", linestyle="--", label="stopping rule fires")
    ax.set(xlabel="step", ylabel="test accuracy", title="classify: forecasts of the final accuracy")
    ax.set_ylim(max(0.0, min(r["accuracy"][len(r["accuracy"]) // 5:]) - 0.05), 1.0)
    ax.legend(fontsize=8)
    report.save_figure(fig, path, dpi=72)

  return draw


def figures(results: dict) -> dict[str, Callable[[str], None]]:
  """The PNG figures of the parts that ran, by file name (for ``report.write_results``)."""
  out = {}
  if "alp_gmm" in results:
    out.update(_alp_figures(results["alp_gmm"]))
  for part in ("pudf", "pskd"):
    if part in results:
      out[f"{part}_accuracy.png"] = _accuracy_figure(part, results[part]["runs"])
  if "forecast" in results:
    out["forecast.png"] = _forecast_figure(results["forecast"])
  return out
