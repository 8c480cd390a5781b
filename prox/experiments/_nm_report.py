"""Tables and plots of the ``nm_sparsity`` experiment: ``results.md``, ``results.json`` and PNGs."""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

_DENSE = "dense"
_BASELINE = "srste"


def _mean_std(values: list[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def aggregate(results: list[dict]) -> dict:
  """``table[setting][method][nm]``: per-seed test accuracies, mean and std, and the mean sparsities.

  ``nm`` is ``"dense"`` for the dense baseline.
  """
  table: dict[str, dict[str, dict[str, dict]]] = {}
  for r in results:
    cell = table.setdefault(r["setting"], {}).setdefault(r["method"], {}).setdefault(
        r["nm"] or _DENSE, {"seeds": [], "accuracy": [], "eval_sparsity": [], "eval_sparsity_all": [],
                            "final_beta": [], "seconds": []})
    cell["seeds"].append(r["seed"])
    cell["accuracy"].append(r["test_accuracy"])
    cell["eval_sparsity"].append(r["eval_sparsity"])
    cell["eval_sparsity_all"].append(r["eval_sparsity_all"])
    cell["final_beta"].append(r["beta"])
    cell["seconds"].append(r["seconds"])
  for setting in table.values():
    for cells in setting.values():
      for cell in cells.values():
        cell["mean"], cell["std"] = _mean_std(cell["accuracy"])
        for k in ("eval_sparsity", "eval_sparsity_all", "seconds"):
          cell[f"{k}_mean"] = float(np.mean(cell[k]))
  return table


def compare(table: dict, setting: str, method: str, nm: str) -> dict | None:
  """``method`` minus SR-STE at ``nm``, paired by seed (same initialisation and data order).

  Returns the mean difference of test accuracy, its std over seeds, the 95% confidence interval of the
  mean (Student t, ``n - 1`` degrees of freedom), the two-sided paired t-test p-value and a verdict:
  ``better`` / ``worse`` when the interval excludes 0, else ``no difference``. With one seed, or
  identical nonzero differences on every seed, the interval is undefined (infinite): ``no difference``.
  """
  rows = table.get(setting, {})
  if _BASELINE not in rows or nm not in rows[_BASELINE] or nm not in rows.get(method, {}):
    return None
  a, b = rows[method][nm], rows[_BASELINE][nm]
  by_seed = dict(zip(b["seeds"], b["accuracy"]))
  pairs = [(x, by_seed[s]) for s, x in zip(a["seeds"], a["accuracy"]) if s in by_seed]
  d = np.asarray([x - y for x, y in pairs], np.float64)
  n = d.size
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if n > 1 else 0.0
  if n > 1 and std > 0:
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    p = float(stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)
  else:
    half, p = (0.0, 1.0) if mean == 0 else (float("inf"), float("nan"))
  low, high = mean - half, mean + half
  verdict = "better" if low > 0 else "worse" if high < 0 else "no difference"
  return {"setting": setting, "method": method, "nm": nm, "num_seeds": n, "diff_mean": mean, "diff_std": std,
          "ci95": [low, high], "p_value": p, "verdict": verdict,
          "wins": int(np.sum(d > 0)), "ties": int(np.sum(d == 0)), "losses": int(np.sum(d < 0))}


def comparisons(table: dict, methods: list[str], nms: list[str]) -> list[dict]:
  out = []
  for setting in table:
    for nm in nms:
      for method in methods:
        if method in (_DENSE, _BASELINE):
          continue
        c = compare(table, setting, method, nm)
        if c is not None:
          out.append(c)
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _model_label(spec: ml_collections.ConfigDict) -> str:
  kw = dict(spec.model_kwargs)
  if spec.model == "mlp" and "hidden" in kw:
    return "MLP " + "-".join(str(h) for h in kw["hidden"])
  return spec.model.upper() + (" " + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) if kw else "")


def _setup_lines(cfg: ml_collections.ConfigDict, nms: list[str], methods: list[str]) -> list[str]:
  from prox.transforms import nm as nm_lib  # pylint: disable=g-import-not-at-top
  warm, fine = cfg.warmup_fraction, cfg.finetune_fraction
  end = warm + cfg.decay_end * (1 - warm - fine)
  lines = [
      f"- Data: `{cfg.dataset}` (digits: train 1,347 / test 450 images, one test image is 0.22%); "
      f"{cfg.optimizer} lr {cfg.learning_rate:g} ({cfg.schedule}); steps and batch size per setting below. "
      f"{cfg.num_seeds} seeds ({cfg.seed}..{cfg.seed + cfg.num_seeds - 1}); a seed fixes the initialisation "
      "and the data order, the same for every method (so differences are paired by seed).",
      f"- Sparse layers: parameters matching `{cfg.sparse_filter}`, N:M groups along the input dimension; "
      "the rest stays dense.",
      f"- Phases (fractions of training): dense warm-up {warm:g}, sparse phase {1 - warm - fine:g}, hard-mask "
      f"fine-tune {fine:g}. MdGf: beta reaches 0 (linear) or {cfg.floor:g}, then 0 (exp), at "
      f"{100 * end:.0f}% of training (`decay_end` = {cfg.decay_end:g} of the sparse phase); SR-STE lambda = "
      f"{cfg.srste_lambda:g}.",
      "- Evaluation: always with hard masks (beta = 0); sparsity = zero fraction of the evaluated weights.",
  ]
  for method in methods:
    if method.startswith("sdgf_"):
      structure = method.partition("_")[2]
      stages = []
      for nm in nms:
        n, m = (int(x) for x in nm.split(":"))
        try:
          stages.append(" → ".join(f"{a}:{b}" for a, b in nm_lib.structure_stages(n, m, structure)))
        except ValueError:
          pass
      lines.append(f"- {method} stages (evenly over the sparse phase): " + "; ".join(stages) + ".")
  return lines


def _steps(cfg: ml_collections.ConfigDict, setting: str) -> tuple[int, int]:
  spec = cfg.models[setting]
  return int(spec.num_steps), int(spec.batch_size)


def markdown(cfg: ml_collections.ConfigDict, table: dict, comps: list[dict], nms: list[str],
             methods: list[str], seconds: float, num_runs: int, run_seconds: float) -> str:
  lines = ["# N:M sparsity with progressive gradient flow", ""]
  lines += _setup_lines(cfg, nms, methods)
  lines.append(f"- {num_runs} runs: {run_seconds / 60:.1f} min in the runs (sum of their wall clock, compilation "
               f"included); this invocation took {seconds / 60:.1f} min (finished runs are not repeated).")
  lines.append("")
  for setting, rows in table.items():
    spec = cfg.models[setting]
    n_seeds = max(len(c["accuracy"]) for cells in rows.values() for c in cells.values())
    steps, batch = _steps(cfg, setting)
    lines += [f"## `{setting}`: {_model_label(spec)}, {steps} steps of batch {batch}", "",
              f"Test accuracy (%), mean ± std over {n_seeds} seeds.", "",
              "| method | " + " | ".join(nms) + " |", "|---|" + "---:|" * len(nms)]
    for method in methods:
      cells = rows.get(method, {})
      if method == _DENSE and _DENSE in cells:
        c = cells[_DENSE]
        vals = [f"{_pct(c['mean'])} ± {_pct(c['std'])}"] * len(nms)
      else:
        vals = [f"{_pct(cells[nm]['mean'])} ± {_pct(cells[nm]['std'])}" if nm in cells else "–" for nm in nms]
      lines.append(f"| {method} | " + " | ".join(vals) + " |")
    sp = []
    sp_all = []
    for nm in nms:
      cells = [rows[m][nm] for m in methods if m != _DENSE and nm in rows.get(m, {})]
      sp.append(f"{_pct(np.mean([c['eval_sparsity_mean'] for c in cells]))}" if cells else "–")
      sp_all.append(f"{_pct(np.mean([c['eval_sparsity_all_mean'] for c in cells]))}" if cells else "–")
    lines.append("| sparsity of the sparse layers (%) | " + " | ".join(sp) + " |")
    lines.append("| sparsity of all parameters (%) | " + " | ".join(sp_all) + " |")
    lines.append("")
  if comps:
    lines += ["## Decaying gradient flow minus SR-STE", "",
              "Test accuracy difference in percentage points, paired by seed; 95% CI of the mean (Student "
              "t); p: two-sided paired t-test. `better` / `worse` only when the interval excludes 0 "
              f"(no correction for the {len(comps)} comparisons).", "",
              "| setting | N:M | method | Δ mean (pp) | 95% CI (pp) | p | wins/ties/losses | verdict |",
              "|---|---|---|---:|---|---:|---|---|"]
    for c in comps:
      lo, hi = c["ci95"]
      lines.append(f"| {c['setting']} | {c['nm']} | {c['method']} | {100 * c['diff_mean']:+.2f} | "
                   f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {c['p_value']:.3f} | "
                   f"{c['wins']}/{c['ties']}/{c['losses']} | {c['verdict']} |")
    lines.append("")
    high = [c for c in comps if c["nm"] in ("1:16", "1:32")]
    if high:
      counts = {v: sum(c["verdict"] == v for c in high) for v in ("better", "no difference", "worse")}
      lines += ["## At 1:16 and 1:32", "",
                f"Of {len(high)} comparisons of a decaying method with SR-STE at 1:16 and 1:32: "
                f"{counts['better']} better, {counts['no difference']} no difference, "
                f"{counts['worse']} worse (95% CI over seeds).", ""]
  lines += ["Plots: `accuracy_vs_sparsity.png` (mean ± std over seeds), `schedules.png` (beta and mask "
            "density of one run of each method).", ""]
  return "\n".join(lines)


def plot_accuracy(path: str, cfg: ml_collections.ConfigDict, table: dict, nms: list[str],
                  methods: list[str]) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top (Agg, no pyplot)

  settings = list(table)
  fig = Figure(figsize=(5.0 * len(settings), 3.8), layout="constrained")
  axes = fig.subplots(1, len(settings), squeeze=False)[0]
  xs = {nm: math.log2(int(nm.split(":")[1]) / int(nm.split(":")[0])) for nm in nms}
  sparse_methods = [m for m in methods if m != _DENSE]
  for ax, setting in zip(axes, settings):
    rows = table[setting]
    if _DENSE in rows.get(_DENSE, {}):
      c = rows[_DENSE][_DENSE]
      ax.axhline(100 * c["mean"], color="k", ls="--", lw=1, label="dense")
      ax.axhspan(100 * (c["mean"] - c["std"]), 100 * (c["mean"] + c["std"]), color="k", alpha=0.08)
    for i, method in enumerate(sparse_methods):
      cells = rows.get(method, {})
      pts = [nm for nm in nms if nm in cells]
      if not pts:
        continue
      offset = 0.06 * (i - (len(sparse_methods) - 1) / 2)
      ax.errorbar([xs[nm] + offset for nm in pts], [100 * cells[nm]["mean"] for nm in pts],
                  yerr=[100 * cells[nm]["std"] for nm in pts], marker="o", ms=4, capsize=3, label=method,
                  color=_color(method, methods))
    ax.set_xticks([xs[nm] for nm in nms])
    ax.set_xticklabels([f"{nm}\n{100 * (1 - int(nm.split(':')[0]) / int(nm.split(':')[1])):.1f}%" for nm in nms])
    ax.set_xlabel("N:M (sparsity of the sparse layers)")
    ax.set_ylabel("test accuracy (%), hard masks")
    ax.set_title(f"{setting}: {_model_label(cfg.models[setting])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, path)


def _color(method: str, methods: list[str]) -> str:
  sparse = [m for m in methods if m != _DENSE]
  return "k" if method == _DENSE else f"C{sparse.index(method) % 10}"


def plot_schedules(path: str, curves: dict, methods: list[str]) -> None:
  """beta, mask density, forward density ``d + (1 - d) beta`` and train loss of one run per method."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(9, 6.4), layout="constrained")
  axes = fig.subplots(2, 2).ravel()
  for method, records in curves["runs"].items():
    steps = [r["step"] for r in records]
    beta = np.asarray([r["beta"] for r in records])
    density = np.asarray([r["mask_density"] for r in records])
    style = dict(label=method, color=_color(method, methods), ls="--" if method == _DENSE else "-")
    axes[0].plot(steps, beta, **style)
    axes[1].plot(steps, density, **style)
    axes[2].plot(steps, density + (1 - density) * beta, **style)
    axes[3].plot(steps, [r["loss"] for r in records], **style)
  titles = ("beta", "mask density d (kept fraction)", "forward density d + (1 - d) beta",
            "train loss (forward weights)")
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  axes[3].set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{curves['setting']} at {curves['nm']}, seed {curves['seed']}")
  _save(fig, path)


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def write_all(workdir: str, cfg: ml_collections.ConfigDict, results: list[dict], curves: dict,
              seconds: float) -> dict:
  """Writes results.md, results.json, accuracy_vs_sparsity.png and schedules.png; returns a summary."""
  nms = [x.strip() for x in cfg.sparsities.split(",") if x.strip()]
  methods = [x.strip() for x in cfg.methods.split(",") if x.strip()]
  table = aggregate(results)
  comps = comparisons(table, methods, nms)
  run_seconds = float(sum(r["seconds"] for r in results))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(cfg, table, comps, nms, methods, seconds, len(results), run_seconds))
  keep = ("setting", "method", "nm", "seed", "test_accuracy", "test_loss", "eval_sparsity", "eval_sparsity_all",
          "beta", "mask_density", "train_loss", "seconds")
  data = {"config": cfg.to_dict(), "seconds": seconds, "run_seconds": run_seconds, "table": table,
          "comparisons": comps,
          "runs": [{k: r.get(k) for k in keep} for r in results],
          "schedule_curves": curves}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(data, f, default=lambda x: list(x) if isinstance(x, tuple) else str(x))
  plot_accuracy(os.path.join(workdir, "accuracy_vs_sparsity.png"), cfg, table, nms, methods)
  if curves and curves.get("runs"):
    plot_schedules(os.path.join(workdir, "schedules.png"), curves, methods)
  high = [c for c in comps if c["nm"] in ("1:16", "1:32")]
  return {"runs": len(results), "seconds": seconds, "run_seconds": run_seconds,
          **{f"vs_srste_at_1:16_1:32_{v.replace(' ', '_')}": sum(c["verdict"] == v for c in high)
             for v in ("better", "no difference", "worse")}}
