"""Tables and plots of the ``continual`` experiment: ``results.md``, ``results.json`` and PNGs."""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from prox.tasks import cl_metrics

_METRICS = ("avg_acc", "forgetting", "bwt", "fwt")
_SCOLE_MARKS = (1, 10, 25, 50, 100, 150, 200, 250, 300, 500, 1000)


def _mean_std(values: list[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _fmt(mean: float, std: float, n: int, signed: bool = False) -> str:
  m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
  return f"{m} ± {std:.3f}" if n > 1 else m


def aggregate(results: dict) -> dict:
  """Per stream and run: metrics over seeds (mean, std), the mean accuracy matrix and curves."""
  out = {}
  for stream, runs in results["streams"].items():
    rows = {}
    for run_id, run in runs.items():
      seeds = list(run["seeds"].values())
      r = np.mean([np.asarray(s["R"]) for s in seeds], axis=0)
      entry = {"label": run["label"], "kind": run["kind"], "num_seeds": len(seeds),
               "R_mean": r.tolist(),
               "acc_curve": np.mean([np.asarray(cl_metrics.average_accuracy_curve(np.asarray(s["R"])))
                                     for s in seeds], axis=0).tolist(),
               "seconds_per_run": float(np.mean([s["seconds"] for s in seeds]))}
      for k in _METRICS + ("avg_acc_class_il",):
        entry[k] = _mean_std([s["metrics"][k] for s in seeds])
      logs = [s["log"] for s in seeds]
      if run["kind"] in ("ewc", "ewc_online", "ewc_detect"):
        entry["max_stability"] = max((max(l.get("stability", [0.0]) or [0.0]) for l in logs), default=0.0)
        entry["stability_warnings"] = int(sum(l.get("stability_warnings", 0) for l in logs))
        entry["skipped_steps"] = int(sum(l.get("skipped_steps", 0) for l in logs))
      if run["kind"] == "ewc_detect":
        entry["detection"] = [_detection(l, len(r)) for l in logs]
      if run["kind"] == "gpm":
        entry["final_ranks"] = [l["ranks"][-1] for l in logs if l.get("ranks")]
      rows[run_id] = entry
    out[stream] = rows
  return out


def _detection(log: dict, num_tasks: int) -> dict:
  """Detected switches against the true boundaries (the step counts where tasks 1..T-1 start)."""
  ends = log.get("task_end_steps", [])
  boundaries = ends[:num_tasks - 1]           # step count at which task t+1 starts
  switches = list(log.get("switch_steps", []))
  hits, latencies = 0, []
  unmatched = list(switches)
  for i, b in enumerate(boundaries):
    nxt = boundaries[i + 1] if i + 1 < len(boundaries) else float("inf")
    after = [s for s in unmatched if b < s <= nxt]
    if after:
      hits += 1
      latencies.append(after[0] - b)
      unmatched.remove(after[0])
  return {"boundaries": len(boundaries), "detected": hits, "false_alarms": len(unmatched),
          "latency_steps": latencies}


def scole_summary(scole: dict) -> dict:
  """Accuracy over all classes at marks, and per-class accuracy around the k-th occurrence of a class."""
  seeds = list(scole.values())
  acc = np.asarray([s["accuracy"] for s in seeds])   # [S, T]
  num = acc.shape[1]
  marks = [m for m in _SCOLE_MARKS if m <= num] + ([num] if num not in _SCOLE_MARKS else [])
  before, after = {}, {}
  for s in seeds:
    cls_acc = np.asarray(s["class_accuracy"])          # [T, C], after each task
    count = np.zeros(cls_acc.shape[1], int)
    for t, classes in enumerate(s["classes"]):
      for c in classes:
        count[c] += 1
        k = int(count[c])
        prev = cls_acc[t - 1, c] if t > 0 else 0.0
        before.setdefault(k, []).append(float(prev))
        after.setdefault(k, []).append(float(cls_acc[t, c]))
  ks = sorted(k for k in before if len(before[k]) >= 5)[:12]
  return {
      "num_tasks": num, "num_seeds": len(seeds),
      "initial_accuracy": _mean_std([s["initial_accuracy"] for s in seeds]),
      "accuracy_at": {str(m): _mean_std(acc[:, m - 1].tolist()) for m in marks},
      "mean_accuracy_curve": acc.mean(0).tolist(),
      "occurrence": [{"k": k, "before": float(np.mean(before[k])), "after": float(np.mean(after[k])),
                      "n": len(before[k])} for k in ks],
      "seconds_per_run": float(np.mean([s["seconds"] for s in seeds])),
  }


def markdown(results: dict, agg: dict, scole: dict | None) -> str:
  cfg = results["config"]
  lines = ["# continual: results", ""]
  lines.append(f"Dataset `{cfg['dataset']}`, model `{cfg['model']}` {dict(cfg['model_kwargs'])}, SGD lr "
               f"{cfg['learning_rate']} momentum {cfg['momentum']}, batch {cfg['batch_size']}. Mean ± sample "
               f"std over seeds. R[i, j] = accuracy on task j after training task i; avg acc = mean_j R[T-1, j]; "
               f"forgetting = mean_j (max_{{l<T-1}} R[l, j] - R[T-1, j]); BWT = mean_j (R[T-1, j] - R[j, j]); "
               f"FWT = mean_{{j>0}} (R[j-1, j] - b_j), b_j the untrained model's accuracy.")
  lines.append("")
  lines += _setup(cfg)
  for stream, rows in agg.items():
    naive = next((e for e in rows.values() if e["kind"] == "naive"), None)
    s_cfg = cfg[stream]
    if stream == "permuted":
      lines.append(f"## permuted digits ({s_cfg['num_tasks']} tasks, domain-incremental, "
                   f"{s_cfg['epochs_per_task']} epochs per task)")
    else:
      lines.append(f"## split digits ({10 // s_cfg['classes_per_task']} tasks of {s_cfg['classes_per_task']} "
                   f"classes, task-incremental: logits masked to the task's classes; {s_cfg['epochs_per_task']} "
                   f"epochs per task)")
    lines.append("")
    extra_col = stream == "split"
    head = ("| method | seeds | avg acc | forgetting | forgetting / naive's | BWT | FWT |"
            + (" class-IL avg acc |" if extra_col else ""))
    lines.append(head + " notes | s/run |")
    lines.append("|" + "---|" * (head.count("|") + 1))
    for run_id, e in rows.items():
      n = e["num_seeds"]
      ratio = (f"{e['forgetting'][0] / naive['forgetting'][0]:.2f}"
               if naive is not None and naive["forgetting"][0] > 0.01 else "")
      cells = [e["label"], str(n), _fmt(*e["avg_acc"], n), _fmt(*e["forgetting"], n), ratio,
               _fmt(*e["bwt"], n, signed=True), _fmt(*e["fwt"], n, signed=True)]
      if extra_col:
        cells.append(_fmt(*e["avg_acc_class_il"], n))
      cells += [_notes(e), f"{e['seconds_per_run']:.1f}"]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  if scole:
    sc = cfg["scole"]
    lines.append(f"## SCoLe ({scole['num_tasks']} tasks of {sc['classes_per_task']} random classes, "
                 f"{sc['epochs_per_task']} epoch each, absent logits masked, naive SGD; skew {sc['skew']})")
    lines.append("")
    lines.append("Accuracy over all 10 classes (unmasked test set) after task t:")
    lines.append("")
    marks = list(scole["accuracy_at"])
    lines.append("| | before training | " + " | ".join(f"t = {m}" for m in marks) + " |")
    lines.append("|" + "---|" * (len(marks) + 2))
    n = scole["num_seeds"]
    lines.append("| accuracy | " + _fmt(*scole["initial_accuracy"], n) + " | "
                 + " | ".join(_fmt(*scole["accuracy_at"][m], n) for m in marks) + " |")
    lines.append("")
    if scole["occurrence"]:
      lines.append("Accuracy on a class just before and just after its k-th occurrence (mean over classes, "
                   "occurrences and seeds):")
      lines.append("")
      occ = scole["occurrence"]
      lines.append("| k | " + " | ".join(str(o["k"]) for o in occ) + " |")
      lines.append("|" + "---|" * (len(occ) + 1))
      lines.append("| before | " + " | ".join(f"{o['before']:.3f}" for o in occ) + " |")
      lines.append("| after | " + " | ".join(f"{o['after']:.3f}" for o in occ) + " |")
      lines.append("")
  lines.append(f"Wall time of this invocation: {results['seconds_this_run']:.0f} s.")
  lines.append("")
  return "\n".join(lines)


def _setup(cfg: dict) -> list[str]:
  """The method settings the tables depend on, as a bullet list."""
  r, e, g, sl, d = cfg["replay"], cfg["ewc"], cfg["gpm"], cfg["slca"], cfg["detector"]
  return [
      "Setup:",
      "",
      f"- replay: reservoir memory of {r['capacity']} examples (each task's training examples offered once, at "
      f"the end of the task), {r['batch_size']} memory examples added to every batch of {cfg['batch_size']}.",
      f"- EWC: `chain(ewc, sgd)` in `optax.apply_if_finite`; per-example diagonal Fisher of {e['fisher_examples']} "
      f"training examples of the task; online γ = {e['gamma']}. The notes give the largest λ·max(F)·lr reached "
      f"(plain SGD diverges above 2) and the stability warnings `consolidate` issued.",
      f"- GPM: kernels projected (the head only for the single-head permuted stream), biases frozen at 0; "
      f"bases from {g['examples']} examples per task, threshold {g['threshold_base']} + "
      f"{g['threshold_increment']} t.",
      f"- SLCA: backbone updates x {sl['backbone_scale']} (from a random initialisation: no pre-trained backbone "
      f"here); after each task {sl['samples_per_class']} sampled features per class (permuted: per (task, class)), "
      f"{sl['align_epochs']} epochs of head alignment, SGD {sl['align_learning_rate']} momentum "
      f"{sl['align_momentum']}, τ = {sl['tau']}.",
      f"- EWC + detector: consolidation when the windowed z-test on the training loss (reference "
      f"{d['reference_window']}, test {d['test_window']} steps, threshold {d['threshold']}) flags a switch; Fisher "
      f"of the {d['fisher_batches']} batches before the test window; the task boundaries are not used.",
      "",
  ]


def _notes(e: dict) -> str:
  notes = []
  if "max_stability" in e:
    notes.append(f"max λ·maxF·lr {e['max_stability']:.3g}")
    if e["stability_warnings"]:
      notes.append(f"{e['stability_warnings']} stability warnings")
    if e["skipped_steps"]:
      notes.append(f"{e['skipped_steps']} non-finite steps skipped")
  if "detection" in e:
    d = e["detection"]
    hits = sum(x["detected"] for x in d)
    total = sum(x["boundaries"] for x in d)
    false = sum(x["false_alarms"] for x in d)
    lat = [v for x in d for v in x["latency_steps"]]
    notes.append(f"detected {hits}/{total} switches, {false} false alarms"
                 + (f", median latency {np.median(lat):.0f} step(s)" if lat else ""))
  if e.get("final_ranks"):
    ranks = e["final_ranks"][0]
    notes.append("final GPM ranks (seed 0) " + ", ".join(f"{_short(k)} {v}" for k, v in ranks.items()))
  return "; ".join(notes)


def _short(path: str) -> str:
  return path.replace("['", "").replace("']", ".").rstrip(".").replace(".kernel", "")


# --- plots -----------------------------------------------------------------------------------------

def _figure(width: float, height: float, layout: str | None = "constrained"):
  from matplotlib.figure import Figure   # pylint: disable=g-import-not-at-top (Agg, no pyplot)
  return Figure(figsize=(width, height), layout=layout)


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def plot_heatmaps(rows: dict, stream: str, path: str) -> None:
  """One accuracy-matrix heatmap per method (tasks numbered from 1), values in percent."""
  n = len(rows)
  cols = min(4, n)
  nrows = -(-n // cols)
  height = 3.1 * nrows + 0.7
  fig = _figure(3.3 * cols + 0.8, height, layout=None)   # a fixed layout: constrained is slow here
  fig.subplots_adjust(left=0.06, right=0.9, bottom=0.06, top=1 - 0.95 / height, wspace=0.35,
                      hspace=0.45)
  axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
  for ax, e in zip(axes, rows.values()):
    r = np.asarray(e["R_mean"])
    im = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
    t = r.shape[0]
    if t <= 10:
      for i in range(t):
        for j in range(t):
          ax.text(j, i, f"{100 * r[i, j]:.0f}", ha="center", va="center", fontsize=6,
                  color="white" if r[i, j] < 0.6 else "black")
    ticks = np.arange(t)
    ax.set_xticks(ticks, [str(k + 1) for k in ticks])
    ax.set_yticks(ticks, [str(k + 1) for k in ticks])
    ax.set_title(f"{e['label']}\navg {e['avg_acc'][0]:.3f}, forg. {e['forgetting'][0]:.3f}", fontsize=8)
    ax.set_xlabel("evaluated task j", fontsize=7)
    ax.set_ylabel("after task i", fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.colorbar(im, cax=fig.add_axes((0.93, 0.25, 0.015, 0.5)), label="accuracy")
  fig.suptitle(f"{stream}: accuracy matrix R[i, j] (mean over seeds)")
  _save(fig, path)


def plot_curves(rows: dict, stream: str, path: str) -> None:
  from matplotlib import colormaps   # pylint: disable=g-import-not-at-top
  fig = _figure(11, 4)
  left, right = fig.subplots(1, 2)
  cmap = colormaps["tab20"]
  for i, e in enumerate(rows.values()):
    r = np.asarray(e["R_mean"])
    x = np.arange(1, r.shape[0] + 1)
    left.plot(x, e["acc_curve"], marker=".", color=cmap(i % 20), label=e["label"])
    right.plot(x, r[:, 0], marker=".", color=cmap(i % 20), label=e["label"])
  left.set_title("average accuracy over the tasks seen so far")
  right.set_title("accuracy on task 1")
  for ax in (left, right):
    ax.set_xlabel("after training task")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.suptitle(f"{stream} digits (mean over seeds)")
  _save(fig, path)


def plot_scole(scole: dict, summary: dict, path: str) -> None:
  fig = _figure(11, 4)
  left, right = fig.subplots(1, 2)
  for seed, s in scole.items():
    acc = [s["initial_accuracy"]] + s["accuracy"]
    left.plot(np.arange(len(acc)), acc, lw=0.6, alpha=0.5, label=f"seed {seed}")
  mean = [summary["initial_accuracy"][0]] + summary["mean_accuracy_curve"]
  left.plot(np.arange(len(mean)), mean, lw=2, color="black", label="mean")
  left.set_xlabel("tasks trained")
  left.set_ylabel("accuracy over all classes")
  left.set_title("SCoLe: accuracy over all classes over time")
  left.set_ylim(0, 1.02)
  left.grid(alpha=0.3)
  left.legend(fontsize=7)
  occ = summary["occurrence"]
  if occ:
    ks = [o["k"] for o in occ]
    right.plot(ks, [o["before"] for o in occ], marker="o", label="just before the k-th occurrence")
    right.plot(ks, [o["after"] for o in occ], marker="o", label="just after the k-th occurrence")
    right.set_xlabel("occurrence k of a class")
    right.set_ylabel("accuracy on that class")
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("per-class accuracy vs reoccurrence")
  _save(fig, path)


def write_all(workdir: str, results: dict) -> dict:
  """Writes results.json, results.md and the PNGs; returns a few headline numbers."""
  agg = aggregate(results)
  scole = scole_summary(results["scole"]) if results["scole"] else None
  for stream, rows in agg.items():
    if rows:
      plot_heatmaps(rows, stream, os.path.join(workdir, f"heatmap_{stream}.png"))
      plot_curves(rows, stream, os.path.join(workdir, f"accuracy_{stream}.png"))
  if scole:
    plot_scole(results["scole"], scole, os.path.join(workdir, "scole_accuracy.png"))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results, agg, scole))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"summary": agg, "scole_summary": scole, **results}, f)
  headline: dict[str, Any] = {}
  for stream, rows in agg.items():
    for e in rows.values():
      if e["kind"] in ("naive", "gpm", "replay"):
        headline[f"{stream}_{e['kind']}_forgetting"] = e["forgetting"][0]
    ewc = [e["forgetting"][0] for e in rows.values() if e["kind"] == "ewc"]
    if ewc:
      headline[f"{stream}_ewc_min_forgetting"] = min(ewc)
  if scole:
    headline["scole_first_acc"] = scole["mean_accuracy_curve"][0]
    headline["scole_last_acc"] = scole["mean_accuracy_curve"][-1]
  return headline
