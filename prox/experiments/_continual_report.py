"""Tables and plots of the ``continual`` experiment (``results.md``, ``results.json``, PNGs) via ``report``."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from prox.experiments import report
from prox.tasks import cl_metrics

_METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "avg_acc_class_il")
_SCOLE_MARKS = (1, 10, 25, 50, 100, 150, 200, 250, 300, 500, 1000)
_TITLES = {
    "permuted": "permuted digits ({num_tasks} tasks, domain-incremental: one shared head; {epochs_per_task} "
                "epochs per task)",
    "split": "split digits ({tasks} tasks of {classes_per_task} classes, task-incremental: logits masked to "
             "the task's classes in training and test; {epochs_per_task} epochs per task)",
    "split_class": "split digits, class-incremental ({tasks} tasks of {classes_per_task} classes, one shared "
                   "head, no mask in training or test; {epochs_per_task} epochs per task)",
}


def aggregate(results: dict) -> dict:
  """Per stream and run: metrics over seeds (the values per seed), mean accuracy matrix and curve."""
  out = {}
  for stream, runs in results["streams"].items():
    rows = {}
    for run_id, run in runs.items():
      seeds = list(run["seeds"].values())
      entry = {"label": run["label"], "kind": run["kind"], "num_seeds": len(seeds), "seeds": list(run["seeds"]),
               "R_mean": np.mean([s["R"] for s in seeds], axis=0).tolist(),
               "acc_curve": np.mean([np.asarray(cl_metrics.average_accuracy_curve(np.asarray(s["R"])))
                                     for s in seeds], axis=0).tolist(),
               "seconds_per_run": float(np.mean([s["seconds"] for s in seeds])),
               "ms_per_step": float(np.median([1e3 * s["train_seconds"] / max(s["steps"], 1) for s in seeds]))}
      for k in _METRICS:
        entry[k] = [s["metrics"][k] for s in seeds]
      logs = [s["log"] for s in seeds]
      if run["kind"] in ("ewc", "ewc_online"):
        entry["max_stability"] = max(max(map(float, l.get("stability") or [0.0])) for l in logs)
        ranges = [np.asarray(l["lambda_range"], np.float64) for l in logs if l.get("lambda_range")]
        if ranges:
          entry["lambda_range_first"] = _finite_mean([r[0] for r in ranges])
          entry["lambda_range_last"] = _finite_mean([r[-1] for r in ranges])
      if run["kind"] == "tame":
        entry["experts"] = [l["num_experts"][-1] for l in logs if l.get("num_experts")]
      if run["kind"] == "ewc_detect":
        entry["max_stability"] = max(float(l.get("max_stability", 0.0)) for l in logs)
        entry["detection"] = [_detection(l, s["task_end_steps"]) for l, s in zip(logs, seeds)]
      if run["kind"] == "mas":
        entry["max_stability"] = max(max(map(float, l.get("stability") or [0.0])) for l in logs)
      if run["kind"] in ("ewc", "ewc_online", "ewc_detect", "mas"):
        entry["stability_warnings"] = int(sum(l.get("stability_warnings", 0) for l in logs))
        entry["skipped_steps"] = int(sum(s.get("nonfinite_steps", 0) for s in seeds))
      if run["kind"] in ("gpm", "cuber"):
        entry["final_ranks"] = [l["ranks"][-1] for l in logs if l.get("ranks")]
      if run["kind"] == "cuber":   # (kernel, old task) subspaces opened per boundary, summed over boundaries
        entry["opened"] = [sum(len(v) for o in l.get("open", []) for v in o.values()) for l in logs]
      rows[run_id] = entry
    out[stream] = rows
  return out


def _finite_mean(pairs: list) -> list[float]:
  """The mean of the finite ``(low, high)`` pairs (a diverged run's Fisher gives NaN); NaN if none."""
  pairs = np.asarray(pairs, np.float64).reshape(-1, 2)
  pairs = pairs[np.all(np.isfinite(pairs), axis=1)]
  return pairs.mean(axis=0).tolist() if len(pairs) else [float("nan")] * 2


def _detection(log: dict, task_end_steps: list[int]) -> dict:
  """Detected switches against the true boundaries (the step counts at which tasks 2..T start)."""
  boundaries = task_end_steps[:-1]
  unmatched = list(log.get("switch_steps", []))
  hits, latencies = 0, []
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
        before.setdefault(k, []).append(float(cls_acc[t - 1, c]) if t > 0 else 0.0)
        after.setdefault(k, []).append(float(cls_acc[t, c]))
  ks = sorted(k for k in before if len(before[k]) >= 5)[:12]
  return {
      "num_tasks": num, "num_seeds": len(seeds),
      "initial_accuracy": [s["initial_accuracy"] for s in seeds],
      "accuracy_at": {str(m): acc[:, m - 1].tolist() for m in marks},
      "mean_accuracy_curve": acc.mean(0).tolist(),
      "occurrence": [{"k": k, "before": float(np.mean(before[k])), "after": float(np.mean(after[k])),
                      "n": len(before[k])} for k in ks],
      "seconds_per_run": float(np.mean([s["seconds"] for s in seeds])),
  }


# --- results.md -------------------------------------------------------------------------------------------

def markdown(results: dict, agg: dict, scole: dict | None) -> str:
  cfg = results["config"]
  lines = ["# continual: results", "",
           f"Dataset `{cfg['dataset']}` (scaling `{cfg['scaling']}`), model `{cfg['model']}` "
           f"{dict(cfg['model_kwargs'])}, SGD lr {cfg['learning_rate']} momentum {cfg['momentum']}, batch "
           f"{cfg['batch_size']}. Mean ± sample std over seeds. R[i, j] = accuracy on task j after training "
           "task i; avg acc = mean_j R[T-1, j]; forgetting = mean_j (max_{l<T-1} R[l, j] - R[T-1, j]); BWT = "
           "mean_j (R[T-1, j] - R[j, j]); FWT = mean_{j>0} (R[j-1, j] - b_j), b_j the untrained model's "
           "accuracy.", ""]
  lines += _setup(cfg)
  for stream, rows in agg.items():
    s_cfg = cfg[stream]
    tasks = s_cfg.get("num_tasks") or 10 // s_cfg["classes_per_task"]
    lines += [f"## {_TITLES[stream].format(tasks=tasks, **s_cfg)}", ""]
    naive = next((e for e in rows.values() if e["kind"] == "naive"), None)
    extra_col = stream == "split"
    headers = ["method", "seeds", "avg acc", "forgetting", "forgetting / naive's", "BWT", "FWT"]
    headers += (["class-IL avg acc"] if extra_col else []) + ["notes", "s/run"]
    table = []
    for e in rows.values():
      ratio = (f"{np.mean(e['forgetting']) / np.mean(naive['forgetting']):.2f}"
               if naive is not None and np.mean(naive["forgetting"]) > 0.01 else "")
      cells = [e["label"], e["num_seeds"], report.fmt_mean_std(e["avg_acc"]),
               report.fmt_mean_std(e["forgetting"]), ratio, report.fmt_mean_std(e["bwt"], signed=True),
               report.fmt_mean_std(e["fwt"], signed=True)]
      if extra_col:
        cells.append(report.fmt_mean_std(e["avg_acc_class_il"]))
      table.append(cells + [_notes(e), f"{e['seconds_per_run']:.1f}"])
    lines += [report.markdown_table(headers, table, align="l" + "r" * (len(headers) - 3) + "lr")]
    stable = [e for e in rows.values() if "lambda_range_first" in e and not e["skipped_steps"]]
    if stable:
      (low, high) = _finite_mean([e["lambda_range_first"] for e in stable])
      (low_t, high_t) = _finite_mean([e["lambda_range_last"] for e in stable])
      lines += [f"`ewc_lambda_range` (the accumulated per-example Fisher against the curvature of the next "
                f"task's loss at the anchor, retention 0.5, SGD lr {cfg['learning_rate']}; mean over seeds and "
                f"the EWC runs without skipped steps): after task 1 λ in [{low:.3g}, {high:.3g}], after task "
                f"{tasks - 1} [{low_t:.3g}, {high_t:.3g}].", ""]
  expected = expectations(agg)
  if expected:
    lines += ["## The new methods: effects fixed before running", ""] + expected
  if scole:
    sc = cfg["scole"]
    lines += [f"## SCoLe ({scole['num_tasks']} tasks of {sc['classes_per_task']} random classes, "
              f"{sc['epochs_per_task']} epoch each, absent logits masked, naive SGD; skew {sc['skew']})", "",
              "Accuracy over all 10 classes (unmasked test set) after task t:", ""]
    marks = list(scole["accuracy_at"])
    lines.append(report.markdown_table(
        [""] + ["before training"] + [f"t = {m}" for m in marks],
        [["accuracy", report.fmt_mean_std(scole["initial_accuracy"])]
         + [report.fmt_mean_std(scole["accuracy_at"][m]) for m in marks]]))
    occ = scole["occurrence"]
    if occ:
      lines += ["Accuracy on a class just before and just after its k-th occurrence (mean over classes, "
                "occurrences and seeds):", ""]
      lines.append(report.markdown_table(
          ["k"] + [str(o["k"]) for o in occ],
          [["before"] + [f"{o['before']:.3f}" for o in occ], ["after"] + [f"{o['after']:.3f}" for o in occ]]))
  lines += [f"Wall time of this invocation: {results['seconds_this_run']:.0f} s ({results['runs']} runs, "
            f"{results['runs_read_back']} of them read back from an earlier invocation; s/run is each run's "
            f"own wall time, compilation included).", ""]
  return "\n".join(lines)


def _setup(cfg: dict) -> list[str]:
  """The method settings the tables depend on, as a bullet list."""
  r, e, g, sl, d = cfg["replay"], cfg["ewc"], cfg["gpm"], cfg["slca"], cfg["detector"]
  return [
      "Setup:", "",
      f"- replay: reservoir memory of {r['capacity']} examples offered every training batch inside the step "
      f"(a uniform sample of every example presented so far), {r['batch_size']} memory examples drawn per "
      f"step and mixed into the batch of {cfg['batch_size']}.",
      f"- EWC: `chain(ewc, sgd)`, non-finite steps skipped and counted; per-example diagonal Fisher of "
      f"{e['fisher_examples']} training examples of the task at its end; online γ = {e['gamma']}. The notes "
      f"give the largest λ·max(F)·lr reached (plain SGD diverges above 2) and the stability warnings "
      f"`consolidate` issued.",
      f"- GPM: kernels projected (the head only where it is shared: permuted, class-incremental split), "
      f"biases frozen at their initial values; bases from {g['examples']} examples per task, threshold "
      f"{g['threshold_base']} + {g['threshold_increment']} t.",
      f"- SLCA: backbone updates x {sl['backbone_scale']} (from a random initialisation: no pre-trained "
      f"backbone here); after each task {sl['samples_per_class']} sampled features per class (permuted: per "
      f"(task, class)), {sl['align_epochs']} epochs of head alignment, SGD {sl['align_learning_rate']} "
      f"momentum {sl['align_momentum']}, τ = {sl['tau']}.",
      f"- EWC + detector: consolidation inside the step when the windowed z-test on the training loss "
      f"(reference {d['reference_window']}, test {d['test_window']} steps, threshold {d['threshold']}) flags "
      f"a switch; Fisher of the {d['fisher_batches']} batches before the test window; the task boundaries "
      f"are not used."] + _setup_new(cfg) + [""]


_NEW = ("mas", "mir", "cuber", "protocl", "onpro", "wsn", "tame")
_BUDGET = {"mas": " (no memory)", "cuber": " (no memory)", "wsn": " (no memory)",
           "tame": " (same memory + a bank of experts)"}   # against replay's reservoir


def _setup_new(cfg: dict) -> list[str]:
  methods = {m.strip() for m in cfg["methods"].split(",")}
  r, out = cfg["replay"], []
  if "mas" in methods:
    lams = ", ".join(f"{s} {cfg[s]['mas_lambda']:g}" for s in ("permuted", "split", "split_class")
                     if "mas_lambda" in cfg[s])
    out.append(f"- MAS: `chain(mas, sgd)` (EWC's online quadratic with the summed importance Ω = mean |∇‖F(x)‖²|, "
               f"F the logits (split: the task's own), over {cfg['mas']['examples']} inputs of each task at its "
               f"end); λ per stream: {lams}. The notes give the largest 2λ·maxΩ·lr reached.")
  if "mir" in methods:
    out.append(f"- MIR: replay's reservoir ({r['capacity']} examples) and {r['batch_size']} replayed rows per "
               f"step, the most interfered of {cfg['mir']['candidates']} uniform candidates (loss increase under "
               f"a virtual SGD step on the batch at the real learning rate).")
  if "cuber" in methods:
    c = cfg["cuber"]
    out.append(f"- CUBER: GPM's bases and thresholds; an old task's basis block opens at a kernel for the next "
               f"task when the next task's gradient ({c['examples']} examples, at the boundary) has ≥ "
               f"{c['projection_threshold']} of its norm in it and a positive inner product with the old task's "
               f"stored gradient there; backward scale β = {c['backward_scale']}.")
  if "protocl" in methods:
    p = cfg["protocl"]
    out.append(f"- ProtoCL: conjugate Gaussian prototypes per class on the last hidden layer (noise variance "
               f"{p['noise_variance']}, prior N(0, {p['prior_variance']}), Dirichlet {p['dirichlet']}), the "
               f"incoming batch absorbed after each step; loss -log p(y | z) on the batch and "
               f"{r['batch_size']} draws from replay's reservoir ({r['capacity']} examples); predictions by the "
               f"posterior.")
  if "wsn" in methods:
    out.append(f"- WSN (split only): top {cfg['wsn']['density']} of the scores per kernel as a task's "
               f"subnetwork, earlier tasks' weights frozen, biases fixed, fresh random scores per task, each "
               f"task scored with its stored mask; SGD on weights and scores.")
  if "tame" in methods:
    t, d = cfg["tame"], cfg["detector"]
    out.append(f"- TAME: up to {t['max_experts']} experts; a switch of the loss-shift detector (reference "
               f"{d['reference_window']}, test {d['test_window']} steps, threshold {d['threshold']}) spawns a copy "
               f"of the active expert; a selector MLP (one hidden layer of {t['selector_hidden']}) trained on "
               f"{r['batch_size']} draws per step from replay's reservoir ({r['capacity']} examples tagged with "
               f"their expert) routes each test input; the task boundaries are not used. Its memory is replay's "
               f"plus the bank of experts (one model copy per detected task).")
  if "onpro" in methods:
    o = cfg["onpro"]
    out.append(f"- OnPro: projection head of {o['projection_dim']} dims, second view = {o['drop']:g} of the "
               f"pixels zeroed, τ = {o['temperature']}; {r['batch_size']} replay rows per step from the "
               f"prototypical feedback sampler (base rate {o['base_rate']}, mixup p {o['mixup_p']}) on replay's "
               f"reservoir ({r['capacity']} examples); loss CE + mixup CE(replay) + prototype equilibrium.")
  return out


def expectations(agg: dict) -> list[str]:
  """The effects fixed before the new methods ran, tested by seed-paired comparisons."""
  lines = []
  rows = agg.get("split_class", {})
  replay = next((e for e in rows.values() if e["kind"] == "replay"), None)
  new = [e for e in rows.values() if e["kind"] in _NEW]
  if replay is not None and new:
    lines += ["### Expected before running: on class-incremental split digits, some new method is above replay "
              "at the same memory (average accuracy, paired by seed)", ""]
    table, above = [], []
    for e in new:
      c = report.paired_comparison(dict(zip(e["seeds"], e["avg_acc"])), dict(zip(replay["seeds"], replay["avg_acc"])))
      table.append(_paired_row(e["label"] + _BUDGET.get(e["kind"], ""), c))
      above += [e["label"]] if c["verdict"] == "better" else []
    lines += [report.markdown_table(["method − replay", "pairs", "mean diff", "95% CI", "p", "wins/ties/losses",
                                     "verdict"], table), ""]
    lines += [("Holds: " + ", ".join(above) + " above replay (95% CI of the paired difference above 0)."
               if above else "Does not hold: no new method is above replay with a 95% CI above 0."), ""]
  pairs = [(stream, next((e for e in r.values() if e["kind"] == "cuber"), None),
            next((e for e in r.values() if e["kind"] == "gpm"), None)) for stream, r in agg.items()]
  pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
  if pairs:
    lines += ["### Expected before running: CUBER's BWT above GPM's (paired by seed)", ""]
    table = []
    for stream, cub, gpm in pairs:
      c = report.paired_comparison(dict(zip(cub["seeds"], cub["bwt"])), dict(zip(gpm["seeds"], gpm["bwt"])))
      table.append(_paired_row(stream, c))
    lines += [report.markdown_table(["stream: CUBER − GPM (BWT)", "pairs", "mean diff", "95% CI", "p",
                                     "wins/ties/losses", "verdict"], table), ""]
  return lines


def _paired_row(name: str, c: dict) -> list:
  return [name, c["num_pairs"], f"{c['diff_mean']:+.3f}", f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]",
          f"{c['p_value']:.3g}", f"{c['wins']}/{c['ties']}/{c['losses']}", c["verdict"]]


def _notes(e: dict) -> str:
  notes = []
  if "max_stability" in e:
    name = "2λ·maxΩ·lr" if e["kind"] == "mas" else "λ·maxF·lr"
    notes.append(f"max {name} {e['max_stability']:.3g}")
    if e["stability_warnings"]:
      notes.append(f"{e['stability_warnings']} stability warnings")
    if e["skipped_steps"]:
      notes.append(f"{e['skipped_steps']} non-finite steps skipped")
  if "detection" in e:
    d = e["detection"]
    hits, total = sum(x["detected"] for x in d), sum(x["boundaries"] for x in d)
    false = sum(x["false_alarms"] for x in d)
    lat = [v for x in d for v in x["latency_steps"]]
    notes.append(f"detected {hits}/{total} switches, {false} false alarms"
                 + (f", median latency {np.median(lat):.0f} step(s)" if lat else ""))
  if e.get("final_ranks"):
    ranks = e["final_ranks"][0]
    notes.append("final GPM ranks (seed 0) " + ", ".join(f"{_short(k)} {v}" for k, v in ranks.items()))
  if "experts" in e:
    notes.append(f"experts at the end per seed {e['experts']}")
  if "opened" in e:
    notes.append(f"old-task subspaces opened (kernel, task; summed over boundaries) per seed {e['opened']}")
  return "; ".join(notes)


def _short(path: str) -> str:
  return path.replace("['", "").replace("']", ".").rstrip(".").replace(".kernel", "")


# --- figures --------------------------------------------------------------------------------------------

def plot_heatmaps(rows: dict, stream: str, path: str) -> None:
  """One accuracy-matrix heatmap per method (tasks numbered from 1), values in percent."""
  n = len(rows)
  cols = min(4, n)
  nrows = -(-n // cols)
  height = 3.1 * nrows + 0.7
  fig, axes = report.figure(3.3 * cols + 0.8, height, nrows=nrows, ncols=cols, squeeze=False, layout=None)
  fig.subplots_adjust(left=0.06, right=0.9, bottom=0.06, top=1 - 0.95 / height, wspace=0.35, hspace=0.45)
  axes = axes.ravel()
  im = None
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
    ax.set_title(f"{e['label']}\navg {np.mean(e['avg_acc']):.3f}, forg. {np.mean(e['forgetting']):.3f}",
                 fontsize=8)
    ax.set_xlabel("evaluated task j", fontsize=7)
    ax.set_ylabel("after task i", fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.colorbar(im, cax=fig.add_axes((0.93, 0.25, 0.015, 0.5)), label="accuracy")
  fig.suptitle(f"{stream}: accuracy matrix R[i, j] (mean over seeds)")
  report.save_figure(fig, path, dpi=90)


def plot_curves(rows: dict, stream: str, path: str) -> None:
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  fig, (left, right) = report.figure(11, 4, ncols=2)
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
  fig.suptitle(f"{stream} (mean over seeds)")
  report.save_figure(fig, path, dpi=90)


def plot_scole(scole: dict, summary: dict, path: str) -> None:
  fig, (left, right) = report.figure(11, 4, ncols=2)
  for seed, s in scole.items():
    acc = [s["initial_accuracy"]] + s["accuracy"]
    left.plot(np.arange(len(acc)), acc, lw=0.6, alpha=0.5, label=f"seed {seed}")
  mean = [float(np.mean(summary["initial_accuracy"]))] + summary["mean_accuracy_curve"]
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
  report.save_figure(fig, path, dpi=90)


def write_all(workdir: str, results: dict) -> dict[str, Any]:
  """Writes results.json, results.md and the PNGs; returns the headline numbers."""
  agg = aggregate(results)
  scole = scole_summary(results["scole"]) if results["scole"] else None
  figures = {}
  for stream, rows in agg.items():
    if rows:
      figures[f"heatmap_{stream}.png"] = lambda path, rows=rows, stream=stream: plot_heatmaps(rows, stream, path)
      figures[f"accuracy_{stream}.png"] = lambda path, rows=rows, stream=stream: plot_curves(rows, stream, path)
  if scole:
    figures["scole_accuracy.png"] = lambda path: plot_scole(results["scole"], scole, path)
  report.write_results(workdir, {"summary": agg, "scole_summary": scole, **results},
                       markdown(results, agg, scole), figures)
  headline: dict[str, Any] = {}
  for stream, rows in agg.items():
    for e in rows.values():
      if e["kind"] in ("naive", "gpm", "replay", "slca") + _NEW:
        headline[f"{stream}_{e['kind']}_forgetting"] = float(np.mean(e["forgetting"]))
    ewc = [float(np.mean(e["forgetting"])) for e in rows.values() if e["kind"] == "ewc"]
    if ewc:
      headline[f"{stream}_ewc_min_forgetting"] = min(ewc)
  if scole:
    headline["scole_first_acc"] = scole["mean_accuracy_curve"][0]
    headline["scole_last_acc"] = scole["mean_accuracy_curve"][-1]
  headline["seconds"] = results["seconds_this_run"]
  return headline
