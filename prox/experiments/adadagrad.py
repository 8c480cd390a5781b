"""Experiment ``adadagrad``: adaptive batch sizes for AdaGradNorm and AdaGrad (Lau, Liu, Kolar 2024).

For every model and optimizer of the config, one run per batch-size method (constant small and large
batch, stagewise doubling, linear ramp-up, and the tests: norm test for each ``eta`` of the sweep,
inner-product / orthogonality / augmented inner-product tests, the coordinate-wise test for AdaGrad),
all with the same budget of samples, through the adaptive-batch loop of ``_adaptive``. Runs with the
same compiled structure share compiled steps (compile time is reported apart from training time).

Outputs in the workdir::

  results.md         one table per model/optimizer and the verdict on the paper's effect
  results.json       the same, with every run's evaluation curve and batch sizes
  <model>_<optimizer>.png   test accuracy vs samples, vs steps, and batch size vs steps
  runs/<run>/        each run's metrics.jsonl, metrics.json and checkpoints (resumed on a rerun)

The paper's effect, as tested here: with ``target`` = the final test accuracy of constant small-batch
training - 0.5 points, an adaptive run (a test) shows it when its final accuracy is ``>= target``, it
first reaches ``target`` in at most 1/3 of the steps constant small-batch training takes to first
reach it, and with fewer samples than constant large-batch training takes to reach it (or never does).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from prox.experiments import _adaptive
from prox.experiments import train

_METHODS = ("constant_small", "constant_large", "stagewise", "ramp", "norm", "inner_product",
            "orthogonality", "augmented", "coordinate")
_LABELS = {"constant_small": "constant b={b0}", "constant_large": "constant b={large}",
           "stagewise": "stagewise doubling", "ramp": "linear ramp-up", "norm": "norm test eta={eta}",
           "inner_product": "inner-product test", "orthogonality": "orthogonality test",
           "augmented": "augmented inner-product test", "coordinate": "coordinate-wise test"}
_QUICK = dict(models="logreg", etas=(0.1,), budget_samples=3072, b_max=512, large_batch=256,
              stage_samples=512, ramp_increment=64, eval_every_samples=512)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the sweep: its name, labels and its ``_adaptive.run_config``."""
  name: str
  model: str
  optimizer: str
  method: str           # one of _METHODS
  label: str
  config: ml_collections.ConfigDict


def _names(text: str) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def effective_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with ``quick`` applied (a small subset for tests)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.quick:
    config.update(_QUICK)
  return config


def run_specs(config: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run of the sweep, in order (the coordinate-wise test only for optimizers with AdaGrad's
  accumulator)."""
  specs = []
  for model in _names(config.models):
    for optimizer in _names(config.optimizers):
      for method in _names(config.methods):
        variants = [dict(eta=float(e)) for e in config.etas] if method == "norm" else [{}]
        for variant in variants:
          spec = _spec(config, model, optimizer, method, **variant)
          if method == "coordinate" and not _adaptive.has_adagrad_accumulator(spec.config):
            continue
          specs.append(spec)
  return specs


def _spec(config, model: str, optimizer: str, method: str, eta: float | None = None) -> RunSpec:
  c = _adaptive.run_config()
  for key in c:
    if key in config and key not in ("model_kwargs", "optimizer_kwargs"):
      c[key] = config[key]
  settings = config.model_settings[model]
  c.model = settings.model
  c.model_kwargs = ml_collections.ConfigDict(settings.model_kwargs.to_dict())
  c.optimizer = optimizer
  c.learning_rate = float(config.learning_rates[optimizer])
  kwargs = config.optimizer_kwargs.get(optimizer, ml_collections.ConfigDict())
  c.optimizer_kwargs = ml_collections.ConfigDict(kwargs.to_dict())
  c.method = {"constant_small": "constant", "constant_large": "constant"}.get(method, method)
  if method == "constant_large":
    c.b0 = config.large_batch
  if eta is not None:
    c.eta = eta
  label = _LABELS[method].format(b0=config.b0, large=config.large_batch, eta=eta)
  suffix = f"_eta{eta:g}" if eta is not None else ""
  return RunSpec(name=f"{model}-{optimizer}-{method}{suffix}", model=model, optimizer=optimizer,
                 method=method, label=label, config=c)


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the sweep and every run's config before anything compiles (``train.ConfigError``)."""
  req = train.require
  config = effective_config(config)
  req(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
  models, optimizers, methods = _names(config.models), _names(config.optimizers), _names(config.methods)
  req(bool(models), "models is empty")
  for model in models:
    req(model in config.model_settings,
        f"unknown model {model!r}; model_settings has: {', '.join(config.model_settings)}")
  req(bool(optimizers), "optimizers is empty")
  for optimizer in optimizers:
    req(optimizer in config.learning_rates,
        f"no learning rate for optimizer {optimizer!r}; learning_rates has: {', '.join(config.learning_rates)}")
  req(bool(methods), "methods is empty")
  for method in methods:
    req(method in _METHODS, f"unknown method {method!r}; known: {', '.join(_METHODS)}")
  etas = config.etas if isinstance(config.etas, (tuple, list)) else (config.etas,)
  req(len(etas) > 0, "etas is empty")
  for eta in etas:
    req(isinstance(eta, (int, float)) and np.isfinite(eta) and eta > 0, f"eta must be > 0, got {eta!r} in etas")
  for target in config.targets:
    req(0 < target <= 1, f"targets must be accuracies in (0, 1], got {target!r}")
  # b0, b_max, micro-batch and the shared fields first, as the constant small-batch run uses them.
  _adaptive.validate_run(_spec(config, models[0], optimizers[0], "constant_small").config)
  req(isinstance(config.large_batch, int) and config.b0 <= config.large_batch <= config.b_max,
      f"large_batch={config.large_batch!r} must be an integer in [b0, b_max] = [{config.b0}, {config.b_max}]")
  specs = run_specs(config)
  req(bool(specs), "the sweep has no runs")
  for spec in specs:
    _adaptive.validate_run(spec.config)
  train.check_workdir(workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the sweep and writes results.md, results.json and the plots."""
  config = effective_config(config)
  validate(config, workdir)
  datasets = train.load_splits(config)
  cache: _adaptive.StepCache = {}
  started = time.perf_counter()
  specs = run_specs(config)
  results = []
  for i, spec in enumerate(specs):
    summary = _adaptive.train_run(spec.config, os.path.join(workdir, "runs", spec.name), cache=cache,
                                  datasets=datasets)
    results.append({"name": spec.name, "model": spec.model, "optimizer": spec.optimizer,
                    "method": spec.method, "label": spec.label, "eta": spec.config.eta, **summary})
    print(f"[{i + 1}/{len(specs)}] {spec.name}: test accuracy {summary['final_accuracy']:.4f}, "
          f"{summary['step']} steps, {summary['samples']} samples, train {summary['train_seconds']:.1f} s, "
          f"compile {summary['compile_seconds']:.1f} s", flush=True)
  sweep_seconds = time.perf_counter() - started
  verdicts = {f"{m}/{o}": verdict(results, m, o) for m in _names(config.models) for o in _names(config.optimizers)}
  out = epath.Path(workdir)
  payload = {"config": config.to_dict(), "sweep_seconds": sweep_seconds, "runs": results, "verdicts": verdicts}
  (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
  (out / "results.md").write_text(results_markdown(config, results, verdicts, sweep_seconds))
  for model in _names(config.models):
    for optimizer in _names(config.optimizers):
      plot(results, model, optimizer, out / f"{model}_{optimizer}.png")
  shown = sum(v["effect"] for vs in verdicts.values() for v in vs["runs"])
  total = sum(len(vs["runs"]) for vs in verdicts.values())
  return {"runs": len(results), "adaptive_runs_showing_the_effect": f"{shown}/{total}",
          "sweep_seconds": sweep_seconds, "results": os.fspath(out / "results.md")}


# --- verdict -------------------------------------------------------------------------------------------

def _evals(result: dict) -> list[dict]:
  e = result["evals"]
  return [dict(zip(e, values)) for values in zip(*e.values())]


def verdict(results: list[dict], model: str, optimizer: str) -> dict:
  """Whether each adaptive run of one model/optimizer shows the paper's effect (module docstring)."""
  mine = [r for r in results if r["model"] == model and r["optimizer"] == optimizer]
  small = next((r for r in mine if r["method"] == "constant_small"), None)
  large = next((r for r in mine if r["method"] == "constant_large"), None)
  if small is None:
    return {"target": None, "runs": [], "note": "no constant_small run: nothing to compare with"}
  target = small["final_accuracy"] - 0.005
  small_hit = _adaptive.first_reaching(_evals(small), target)
  large_hit = _adaptive.first_reaching(_evals(large), target) if large else None
  rows = []
  for r in mine:
    if r["method"] not in _adaptive.TESTS:
      continue
    hit = _adaptive.first_reaching(_evals(r), target)
    steps_ok = hit is not None and small_hit is not None and hit["step"] <= small_hit["step"] / 3
    total_steps_ok = hit is not None and hit["step"] <= small["step"] / 3
    samples_ok = hit is not None and (large is None or large_hit is None or hit["samples"] < large_hit["samples"])
    final_ok = r["final_accuracy"] >= target - 1e-12
    rows.append({
        "name": r["name"], "label": r["label"], "final_accuracy": r["final_accuracy"],
        "gap_points": 100 * (r["final_accuracy"] - small["final_accuracy"]),
        "steps_to_target": hit["step"] if hit else None, "samples_to_target": hit["samples"] if hit else None,
        "steps_ratio_to_small": hit["step"] / small_hit["step"] if hit and small_hit else None,
        "final_ok": final_ok, "steps_ok": steps_ok, "samples_ok": samples_ok,
        "effect": bool(final_ok and steps_ok and samples_ok),
        "effect_vs_total_steps": bool(final_ok and total_steps_ok and samples_ok)})
  return {"target": target, "small_final": small["final_accuracy"],
          "small_steps_to_target": small_hit["step"] if small_hit else None,
          "small_total_steps": small["step"],
          "large_samples_to_target": large_hit["samples"] if large_hit else None,
          "large_present": large is not None, "runs": rows}


# --- tables and plots ---------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 0) -> str:
  if value is None:
    return "not reached"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return f"{value:,}" if isinstance(value, int) else str(value)


def results_markdown(config: ml_collections.ConfigDict, results: list[dict], verdicts: dict,
                     sweep_seconds: float) -> str:
  """The results as markdown: a table per model/optimizer, then the verdicts."""
  stream = (f"augmented stream (shift <= {config.max_shift:g} px, rotation <= {config.max_rotation:g} deg, "
            f"scale {config.scale_low:g}-{config.scale_high:g}, noise {config.noise_std:g})"
            if config.augment else "plain epochs")
  lines = [
      "# adadagrad: adaptive batch sizes for AdaGradNorm and AdaGrad",
      "",
      f"Dataset `{config.dataset}`, {stream}; test accuracy on the real test split. Every run: "
      f"{config.budget_samples:,} samples (it stops before a step would exceed them), b0 = {config.b0}, "
      f"b_max = {config.b_max}, micro-batch {config.micro_batch_size} (the tests' cheap estimator uses "
      f"b / {config.micro_batch_size} groups), constant large batch {config.large_batch}. Learning rates: "
      + ", ".join(f"{k} {v:g}" for k, v in config.learning_rates.items()) +
      f". Stagewise doubling: the batch doubles every {config.stage_samples:,} samples; linear ramp-up: "
      f"b0 + {config.ramp_increment} per step. Tests (cheap micro-batch estimators, inside the step): "
      f"theta = {config.theta:g}, nu = {config.nu:g}, coordinate-wise eta = {config.eta:g}. "
      f"Sweep wall time {sweep_seconds:.0f} s. Train s: the training loop (data, step, batch-size "
      "read) without evaluation, checkpoints and compilation; compile s: compilations this run made "
      "(runs of the same structure share compiled steps, so later runs show less).",
      ""]
  pct = [round(100 * t) for t in config.targets]
  for key, v in verdicts.items():
    model, optimizer = key.split("/")
    lines += [f"## {model} / {optimizer}", ""]
    head = ["method", "final test acc", "steps", "samples", "train s", "compile s", "final batch"]
    for p in pct:
      head += [f"steps to {p}%", f"samples to {p}%"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
      if r["model"] != model or r["optimizer"] != optimizer:
        continue
      final_batch = r["batch_sizes"]["batch_size"][-1] if r["batch_sizes"]["batch_size"] else None
      row = [r["label"], f"{100 * r['final_accuracy']:.2f}%", _fmt(r["step"]), _fmt(r["samples"]),
             _fmt(r["train_seconds"], 1), _fmt(r["compile_seconds"], 1), _fmt(final_batch)]
      for p in pct:
        row += [_fmt(r[f"steps_to_{p}"]), _fmt(r[f"samples_to_{p}"])]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if v["target"] is None:
      lines += [v.get("note", ""), ""]
      continue
    lines += [
        f"Target: constant b={config.b0}'s final accuracy {100 * v['small_final']:.2f}% - 0.5 = "
        f"{100 * v['target']:.2f}%. Constant b={config.b0} first reaches it at step "
        f"{_fmt(v['small_steps_to_target'])} (of {v['small_total_steps']:,}); constant b={config.large_batch} "
        + (f"after {v['large_samples_to_target']:,} samples." if v["large_samples_to_target"] is not None
           else "never reaches it." if v["large_present"] else "was not run."), "",
        "| test | final acc - small's (points) | steps to target | / small's steps to target | "
        "/ small's total steps | samples to target | effect | effect vs small's total steps |",
        "|---|---|---|---|---|---|---|---|"]
    for row in v["runs"]:
      ratio = _fmt(row["steps_ratio_to_small"], 2)
      reasons = [name for name, ok in (("accuracy", row["final_ok"]), ("steps", row["steps_ok"]),
                                       ("samples", row["samples_ok"])) if not ok]
      effect = "yes" if row["effect"] else "no (" + ", ".join(reasons) + ")"
      to_total = (f"{row['steps_to_target'] / v['small_total_steps']:.3f}"
                  if row["steps_to_target"] is not None else "not reached")
      lines.append(f"| {row['label']} | {row['gap_points']:+.2f} | {_fmt(row['steps_to_target'])} | {ratio} | "
                   f"{to_total} | {_fmt(row['samples_to_target'])} | {effect} | "
                   f"{'yes' if row['effect_vs_total_steps'] else 'no'} |")
    lines.append("")
  lines += [
      "Effect (Lau, Liu, Kolar 2024), as decided before the runs: an adaptive run ends at or above the "
      "target, first reaches it in at most 1/3 of the steps constant small-batch training needs to first "
      "reach it, and with fewer samples than constant large-batch training needs (or it never does). "
      "The last column reads \"one third of its optimizer steps\" as one third of all the steps of the "
      "constant small-batch run (its whole budget), a weaker condition.", ""]
  return "\n".join(lines)


def plot(results: list[dict], model: str, optimizer: str, png_path: epath.Path) -> None:
  """Test accuracy vs samples and vs steps, and batch size vs steps, for one model/optimizer."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top (Agg, no pyplot)

  mine = [r for r in results if r["model"] == model and r["optimizer"] == optimizer]
  fig = Figure(figsize=(16, 4.6), layout="constrained")
  ax_samples, ax_steps, ax_batch = fig.subplots(1, 3)
  for i, r in enumerate(mine):
    style = dict(label=r["label"], color=f"C{i % 10}", linestyle="-" if i < 10 else "--", linewidth=1.3)
    e = r["evals"]
    ax_samples.plot(e["samples"], e["accuracy"], **style)
    ax_steps.plot(e["step"], e["accuracy"], **style)
    b = r["batch_sizes"]
    steps, sizes = list(b["step"]), list(b["batch_size"])
    if steps and steps[-1] < r["step"]:
      steps, sizes = steps + [r["step"]], sizes + [sizes[-1]]
    ax_batch.plot(steps, sizes, drawstyle="steps-post", **style)
  low = min([r["final_accuracy"] for r in mine] + [1.0]) - 0.1
  for ax, xlabel in ((ax_samples, "samples seen"), (ax_steps, "optimizer steps")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, min(low, 0.8)), 1.0)
    ax.grid(alpha=0.3)
  ax_steps.set_xscale("log")
  ax_batch.set_xscale("log")
  ax_batch.set_yscale("log", base=2)
  ax_batch.set_xlabel("optimizer steps")
  ax_batch.set_ylabel("batch size")
  ax_batch.grid(alpha=0.3)
  ax_batch.legend(fontsize=7, loc="lower right")
  fig.suptitle(f"{model} / {optimizer}")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=72)
  png_path.write_bytes(buf.getvalue())


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value
