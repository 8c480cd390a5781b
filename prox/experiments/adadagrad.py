"""Experiment ``adadagrad``: adaptive batch sizes for AdaGradNorm and AdaGrad (Lau, Liu, Kolar 2024).

For every model, optimizer, budget and seed of the config, one run per batch-size method: constant small
(b0) and large batches, stagewise doubling, linear ramp-up, and the tests (the norm test for each ``eta``
of the sweep, the augmented inner-product test, the coordinate-wise test for AdaGrad). Each run is
``prox.loop.run`` over a stream of fresh samples (MNIST-1D, generated; or augmented digits); a test's
controller (``prox.optim.adaptive_batch_size``) lives in ``TrainState.extra`` and is updated inside the
compiled step from per-example gradient moments (exact, from layer taps, in the same backward pass); the
host reads the batch size once per step, draws that many samples and packs them into a power-of-two
bucket of micro-batches (one compile per bucket, shared by every run of the same structure).

Budgets: ``samples`` (every run sees ``budget_samples`` samples) and ``steps`` (every run takes
``budget_steps`` optimizer steps, or stops at ``budget_samples``). A steps-budget run whose samples-budget
twin ended in fewer than ``budget_steps`` steps is that same computation and is read from it (its
result.json says ``same_as``), not trained again.

The paper's effect, fixed before the runs: with ``target`` = the final test accuracy of constant small-batch
training - 0.5 points, an adaptive run shows it when its final accuracy is ``>= target``, it first reaches
``target`` in at most 1/3 of the steps constant small-batch training takes to first reach it, and with
fewer samples than constant large-batch training takes to reach it (or that never does).

Outputs: ``results.md`` (a table per model/optimizer/budget: mean over seeds; the verdicts per seed),
``results.json``, ``<dataset>_<model>_<optimizer>_<budget>.png``, and ``runs/<run>/`` (each run's metrics and
checkpoints; a rerun resumes and skips finished runs).
"""
from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from prox import loop
from prox import optim
from prox import step as step_lib
from prox.experiments import common
from prox.experiments import report
from prox.losses import classification_loss
from prox.tasks import EpochSource, StreamSource

BASELINES = ("constant_small", "constant_large", "stagewise", "ramp")
TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")
METHODS = BASELINES + TESTS
_LABELS = {"constant_small": "constant b={b0}", "constant_large": "constant b={large}",
           "stagewise": "stagewise doubling", "ramp": "linear ramp-up", "norm": "norm test eta={eta}",
           "inner_product": "inner-product test", "orthogonality": "orthogonality test",
           "augmented": "augmented inner-product test", "coordinate": "coordinate-wise test"}

QUICK = {"models": "logreg", "optimizers": "adagrad_norm", "etas": (0.5,), "num_seeds": 1,
         "budgets": "samples", "budget_samples": 8192, "budget_steps": 40, "b_max": 1024,
         "large_batch": 512, "stage_samples": 2048, "ramp_increment": 64, "eval_every_samples": 2048,
         "methods": "constant_small,constant_large,stagewise,norm,augmented"}
RESUMABLE = ("num_seeds", "models", "optimizers", "methods", "etas", "budgets", "other_devices_results")


class Run(NamedTuple):
  """One run of the sweep."""
  name: str
  model: str
  optimizer: str
  method: str
  budget: str
  seed: int
  eta: float | None
  label: str


def names(config: ml_collections.ConfigDict, field: str, options=None) -> list[str]:
  return common.names(config, field, options)


def runs(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run, in table order (the coordinate-wise test only with AdaGrad's accumulator)."""
  out = []
  for budget in names(config, "budgets", ("samples", "steps")):
    for model in names(config, "models"):
      for optimizer in names(config, "optimizers"):
        for method in names(config, "methods", METHODS):
          if method == "coordinate" and not _has_accumulator(config, optimizer):
            continue
          for eta in (config.etas if method == "norm" else (None,)):
            for seed in common.seeds(config):
              suffix = f"_eta{eta:g}" if eta is not None else ""
              label = _LABELS[method].format(b0=config.b0, large=config.large_batch, eta=eta)
              out.append(Run(f"{budget}/{model}-{optimizer}-{method}{suffix}/seed{seed}", model, optimizer,
                             method, budget, seed, eta, label))
  return out


def micro_batch_size(config) -> int:
  """Examples per micro-batch per device: the config's, or (0) the smallest batch's share of a device."""
  return config.micro_batch_size or max(1, config.b0 // jax.device_count())


def _optimizer_config(config, optimizer: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      optimizer=optimizer, learning_rate=float(config.learning_rates[optimizer]), schedule="constant",
      optimizer_kwargs=dict(config.optimizer_kwargs.get(optimizer, {}))))


def _has_accumulator(config, optimizer: str) -> bool:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tx = common.build_optimizer(_optimizer_config(config, optimizer))
  try:
    optim.adagrad_accumulator(jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}))
  except ValueError:
    return False
  return True


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value of the sweep before anything compiles."""
  c = config
  common.check_data(c)
  common.check_mesh(c)
  common.positive_ints(c, "seed", zero_ok=True)
  common.positive_ints(c, "num_seeds")
  for model in names(c, "models"):
    common.require(model in c.model_settings,
                   f"unknown model {model!r}; model_settings has: {', '.join(c.model_settings)}")
    common.check_model(c, prefix=f"model_settings.{model}.")
  for optimizer in names(c, "optimizers"):
    common.require(optimizer in c.learning_rates,
                   f"no learning rate for optimizer {optimizer!r}; learning_rates has: {', '.join(c.learning_rates)}")
    common.check_optimizer(_optimizer_config(c, optimizer))
  names(c, "methods", METHODS)
  names(c, "budgets", ("samples", "steps"))
  etas = c.etas if isinstance(c.etas, (tuple, list)) else (c.etas,)
  common.require(len(etas) > 0 and all(common.is_number(e) and e > 0 for e in etas),
                 f"etas must be numbers > 0, got {c.etas!r}")
  common.numbers(c, "eta", "theta", "nu", low=0, low_open=True)
  common.positive_ints(c, "micro_batch_size", zero_ok=True)
  common.positive_ints(c, "b0", "b_max", "large_batch", "stage_samples", "ramp_increment",
                       "budget_samples", "budget_steps", "eval_every_samples", "evals_per_decade",
                       "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
  common.require(c.b0 % jax.device_count() == 0,
                 f"b0={c.b0} is not divisible by the device count {jax.device_count()}")
  multiple = micro_batch_size(c) * jax.device_count()
  common.require(c.b0 % multiple == 0,
                 f"micro_batch_size {micro_batch_size(c)} x {jax.device_count()} device(s) does not divide b0={c.b0}")
  common.library_check("b0/b_max", optim.batch_size_init, c.b0, c.b_max, multiple_of=multiple)
  common.require(c.b0 <= c.large_batch <= c.b_max,
                 f"large_batch={c.large_batch} must be in [b0, b_max] = [{c.b0}, {c.b_max}]")
  common.require(c.large_batch % multiple == 0 and c.ramp_increment % multiple == 0,
                 f"large_batch and ramp_increment must be multiples of micro_batch_size x devices = {multiple}")
  common.require(c.budget_samples >= c.large_batch,
                 f"budget_samples={c.budget_samples} is smaller than large_batch={c.large_batch}")
  common.choice(c, "estimator", ("examples", "groups"))
  common.check_batch("eval_batch_size", c.eval_batch_size)
  if c.dataset != "mnist1d" and c.augment:
    common.numbers(c, "max_shift", "max_rotation", "noise_std", low=0)
    common.require(0 < c.scale_low <= c.scale_high, f"scale_low, scale_high must satisfy 0 < low <= high, "
                   f"got {c.scale_low}, {c.scale_high}")
  common.require(bool(runs(c)), "the sweep has no runs")
  if workdir is not None:
    common.check_workdir(workdir)


# --- one run ------------------------------------------------------------------------------------------

class Shared:
  """What runs of one sweep share: the data, compiled steps by structure, and executables."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.datasets = common.load_splits(config)
    self.mesh = common.build_mesh(config)
    self.steps: dict[tuple, Any] = {}
    self.cache = loop.CompileCache()
    self.evaluators: dict[str, Any] = {}

  def step(self, key: tuple, build) -> Any:
    if key not in self.steps:
      self.steps[key] = build()
    return self.steps[key]


def _source(config, train_ds, seed: int):
  if config.dataset == "mnist1d" and config.augment:
    # Fresh MNIST-1D samples, never repeated; the first budget_samples are generated once per seed and
    # served from memory to every run of that seed (the same samples the stream would generate).
    return StreamSource(None, seed, materialize=config.budget_samples)
  if config.augment:
    return StreamSource(train_ds, seed, max_shift=config.max_shift, max_rotation=config.max_rotation,
                        scale_range=(config.scale_low, config.scale_high), noise_std=config.noise_std)
  return EpochSource(train_ds, seed)


def _schedule(config, method: str, multiple: int):
  """A baseline's ``step -> batch size`` (host side)."""
  if method == "constant_small":
    return optim.constant_batch_size(config.b0)
  if method == "constant_large":
    return optim.constant_batch_size(config.large_batch)
  if method == "ramp":
    return optim.linear_ramp_up(config.b0, config.b_max, increment=config.ramp_increment, multiple_of=multiple)
  cap, milestones, b, samples, step = config.b_max // multiple * multiple, [], config.b0, 0, 0
  while b < cap:       # double every stage_samples samples (the reference counts stages in samples)
    target = (len(milestones) + 1) * config.stage_samples
    num = max(1, -(-(target - samples) // b))
    step, samples = step + num, samples + num * b
    milestones.append(step)
    b = min(2 * b, cap)
  return optim.stagewise_doubling(config.b0, config.b_max, multiple_of=multiple, milestones=milestones or [1])


def _geometric_grid(per_decade: int, last: int) -> list[int]:
  """Steps ``k`` with ``floor(P log10 k) > floor(P log10 (k - 1))``: ~``P`` per factor of 10."""
  out, prev = [], -1
  for k in range(1, last + 1):
    g = int(np.floor(per_decade * np.log10(k) + 1e-9))
    if g > prev:
      out.append(k)
      prev = g
  return out


def train_run(config: ml_collections.ConfigDict, run: Run, workdir: str, shared: Shared) -> dict:
  """One run on the loop; returns its summary."""
  train_ds, test_ds = shared.datasets
  mesh = shared.mesh
  setting = config.model_settings[run.model]
  net = common.build_model(config, train_ds, seed=run.seed, prefix=f"model_settings.{run.model}.")
  tx = common.build_optimizer(_optimizer_config(config, run.optimizer))
  micro = micro_batch_size(config)
  multiple = micro * jax.device_count()
  loss = classification_loss(net.apply)
  extra: Any = ()
  if run.method in TESTS:
    ctrl = optim.adaptive_batch_size(run.method, b0=config.b0, b_max=config.b_max, multiple_of=multiple,
                                     eta=run.eta if run.eta is not None else config.eta, theta=config.theta,
                                     nu=config.nu, estimator=config.estimator)
    extra = {"batch_size": ctrl.init()}
    structure = (run.model, run.optimizer, run.method, config.estimator)
    step = shared.step(structure, lambda: step_lib.make_train_step(
        loss, tx, mesh=mesh, micro_batch_size=micro, **ctrl.step_options,
        transition=step_lib.in_extra("batch_size", ctrl.update)))
    batch_size = lambda ctx: int(ctx.state.extra["batch_size"].size.batch_size)
  else:
    schedule = _schedule(config, run.method, multiple)
    step = shared.step((run.model, run.optimizer, "plain"), lambda: step_lib.make_train_step(
        loss, tx, mesh=mesh, micro_batch_size=micro))
    batch_size = lambda ctx: int(schedule(ctx.step))
  del setting
  state = common.replicated_state(net.params, tx, mesh, seed=run.seed, model_state=net.model_state, extra=extra)
  evaluate = shared.evaluators.setdefault(run.model, common.evaluator(net.apply, mesh))

  def log(ctx: loop.Context) -> None:
    changes = ctx.record.setdefault("batch_sizes", {"step": [], "batch_size": []})
    if changes["batch_size"] and changes["batch_size"][-1] == ctx.batch_size and ctx.step % config.log_every:
      return
    if not changes["batch_size"] or changes["batch_size"][-1] != ctx.batch_size:
      changes["step"].append(ctx.step)
      changes["batch_size"].append(ctx.batch_size)
    if run.method in TESTS:
      ctx.record["requested"] = float(jax.device_get(ctx.state.extra["batch_size"].size.requested))

  def test(ctx: loop.Context) -> None:
    result = evaluate(ctx.state, test_ds, config.eval_batch_size)
    evals = ctx.record.setdefault("evals", {"step": [], "samples": [], "accuracy": [], "train_seconds": []})
    for k, v in (("step", ctx.step), ("samples", ctx.samples), ("accuracy", result["accuracy"]),
                 ("train_seconds", ctx.train_seconds)):
      evals[k].append(v)

  last_step = config.budget_samples // config.b0
  num_steps = config.budget_steps if run.budget == "steps" else None
  result = loop.run(
      step, state, _source(config, train_ds, run.seed), mesh=mesh, batch_size=batch_size,
      num_steps=num_steps, num_samples=config.budget_samples, micro_batch_size=micro,
      actions=((loop.Every(steps=1), log),
               (loop.Every(samples=config.eval_every_samples,
                           at=_geometric_grid(config.evals_per_decade, last_step), end=True), test)),
      checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint=loop.Every(steps=config.checkpoint_every),
      keep_checkpoints=config.keep_checkpoints, compile_cache=shared.cache)
  return summarize(result, config.targets)


def first_reaching(evals: dict, accuracy: float) -> dict | None:
  """The first evaluation with test accuracy ``>= accuracy`` (``None`` if none)."""
  for i, a in enumerate(evals["accuracy"]):
    if a >= accuracy - 1e-12:
      return {k: v[i] for k, v in evals.items()}
  return None


def summarize(result: loop.LoopResult, targets) -> dict:
  rec = result.record
  evals = rec["evals"]
  out = {"final_accuracy": evals["accuracy"][-1], "step": int(jax.device_get(result.state.step)),
         "samples": int(jax.device_get(result.state.samples)), "evals": evals,
         "batch_sizes": rec.get("batch_sizes", {"step": [], "batch_size": []}),
         "train_seconds": result.train_seconds, "compile_seconds": result.compile_seconds,
         "compiles": result.compiles}
  for t in targets:
    hit = first_reaching(evals, t)
    out[f"steps_to_{round(100 * t)}"] = hit and hit["step"]
    out[f"samples_to_{round(100 * t)}"] = hit and hit["samples"]
  return out


# --- the sweep ------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the sweep and writes results.md, results.json and the plots."""
  validate(config, workdir)
  shared = Shared(config)
  started = time.perf_counter()
  todo = runs(config)
  results = []
  finished = {}
  for i, r in enumerate(todo):
    run_dir = os.path.join(workdir, "runs", r.name)
    run_config = {"run": r._asdict(), "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}}
    fn = lambda: train_run(config, r, run_dir, shared)
    twin = finished.get(r.name.replace("steps/", "samples/", 1)) if r.budget == "steps" else None
    if twin is not None and twin["step"] < config.budget_steps:
      # Its samples budget ended the samples-budget run before budget_steps steps: with the step budget the
      # run is the same computation (the same seed, schedule, evaluations), so it is not trained again.
      fn = lambda twin=twin: {**twin, "same_as": r.name.replace("steps/", "samples/", 1)}
    summary = common.run_once(run_dir, "adadagrad", run_config, fn)
    finished[r.name] = summary
    results.append({**r._asdict(), **summary})
    print(f"[{i + 1}/{len(todo)}] {r.name}: test accuracy {summary['final_accuracy']:.4f}, {summary['step']} "
          f"steps, {summary['samples']} samples, train {summary['train_seconds']:.1f} s", flush=True)
  seconds = time.perf_counter() - started
  verdicts = {key: verdict(results, *key.split("/")) for key in _groups(config)}
  other = _other_devices(config)
  md = markdown(config, results, verdicts, seconds, other)
  figures = {f"{config.dataset}_{k.replace('/', '_')}.png": _plotter(results, *k.split("/")) for k in verdicts}
  report.write_results(workdir, {"config": config, "sweep_seconds": seconds, "devices": jax.device_count(),
                                 "runs": results, "verdicts": verdicts}, md, figures)
  shown = sum(v["effect"] for vs in verdicts.values() for v in vs["runs"])
  total = sum(len(vs["runs"]) for vs in verdicts.values())
  return {"runs": len(results), "adaptive_runs_showing_the_effect": f"{shown}/{total}", "sweep_seconds": seconds}


def _groups(config) -> list[str]:
  return [f"{m}/{o}/{b}" for b in names(config, "budgets") for m in names(config, "models")
          for o in names(config, "optimizers")]


def _other_devices(config) -> dict | None:
  path = config.get("other_devices_results", "")
  if not path:
    return None
  other = report.read_json(path)
  return {"devices": other.get("devices"), "train_seconds": {r["name"]: r["train_seconds"] for r in other["runs"]}}


# --- verdict --------------------------------------------------------------------------------------------

def verdict(results: list[dict], model: str, optimizer: str, budget: str) -> dict:
  """Per seed, whether each adaptive run shows the paper's effect (module docstring)."""
  mine = [r for r in results if (r["model"], r["optimizer"], r["budget"]) == (model, optimizer, budget)]
  rows, targets = [], {}
  for seed in sorted({r["seed"] for r in mine}):
    of_seed = [r for r in mine if r["seed"] == seed]
    small = next((r for r in of_seed if r["method"] == "constant_small"), None)
    large = next((r for r in of_seed if r["method"] == "constant_large"), None)
    if small is None:
      continue
    target = small["final_accuracy"] - 0.005
    targets[seed] = target
    small_hit = first_reaching(small["evals"], target)
    large_hit = first_reaching(large["evals"], target) if large else None
    for r in of_seed:
      if r["method"] not in TESTS:
        continue
      hit = first_reaching(r["evals"], target)
      steps_ok = hit is not None and small_hit is not None and hit["step"] <= small_hit["step"] / 3
      samples_ok = hit is not None and (large_hit is None or hit["samples"] < large_hit["samples"])
      final_ok = r["final_accuracy"] >= target - 1e-12
      rows.append({"name": r["name"], "label": r["label"], "seed": seed, "final_accuracy": r["final_accuracy"],
                   "gap_points": 100 * (r["final_accuracy"] - small["final_accuracy"]),
                   "steps_to_target": hit and hit["step"], "samples_to_target": hit and hit["samples"],
                   "steps_ratio_to_small": (hit["step"] / small_hit["step"]) if hit and small_hit else None,
                   "final_ok": final_ok, "steps_ok": steps_ok, "samples_ok": samples_ok,
                   "effect": bool(final_ok and steps_ok and samples_ok)})
  return {"targets": targets, "runs": rows}


# --- report ---------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 0) -> str:
  if value is None:
    return "—"
  return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(config, results: list[dict], verdicts: dict, seconds: float, other: dict | None) -> str:
  data = ("MNIST-1D, a stream of freshly generated samples (never repeated)" if config.dataset == "mnist1d"
          else f"{config.dataset}, " + ("the augmented stream" if config.augment else "plain epochs"))
  lines = [
      "# adadagrad: adaptive batch sizes for AdaGradNorm and AdaGrad", "",
      f"{data}; test accuracy on the standard test split. b0 = {config.b0}, b_max = {config.b_max}, "
      f"constant large batch {config.large_batch}, micro-batch {micro_batch_size(config)} per device, "
      f"{jax.device_count()} device(s). Budgets: `samples` = {config.budget_samples:,} samples per run; "
      f"`steps` = {config.budget_steps:,} steps (or the samples budget). Learning rates: "
      + ", ".join(f"{k} {v:g}" for k, v in config.learning_rates.items()) +
      f". Tests from exact per-example gradient moments ({config.estimator}); theta = {config.theta:g}, "
      f"nu = {config.nu:g}, coordinate-wise eta = {config.eta:g}. {config.num_seeds} seed(s); tables give "
      f"mean ± std over seeds. Sweep wall time {seconds:.0f} s. Train s: the loop without evaluation, "
      "checkpoints and compilation.", ""]
  for key, v in verdicts.items():
    model, optimizer, budget = key.split("/")
    mine = [r for r in results if (r["model"], r["optimizer"], r["budget"]) == (model, optimizer, budget)]
    lines += [f"## {model} / {optimizer} / budget in {budget}", ""]
    by_label: dict[str, list[dict]] = {}
    for r in mine:
      by_label.setdefault(r["label"], []).append(r)
    head = ["method", "final test acc (%)", "steps", "samples", "final batch", "train s"]
    if other:
      head.append(f"train s on {other['devices']} devices")
    rows = []
    for label, rs in by_label.items():
      row = [label, report.fmt_mean_std([r["final_accuracy"] for r in rs], digits=2, percent=True),
             report.fmt_mean_std([r["step"] for r in rs], digits=0),
             report.fmt_mean_std([r["samples"] for r in rs], digits=0),
             report.fmt_mean_std([r["batch_sizes"]["batch_size"][-1] for r in rs], digits=0),
             report.fmt_mean_std([r["train_seconds"] for r in rs], digits=1)]
      if other:
        found = [other["train_seconds"][r["name"]] for r in rs if r["name"] in other["train_seconds"]]
        row.append(report.fmt_mean_std(found, digits=1) if found else "—")
      rows.append(row)
    lines += [report.markdown_table(head, rows), ""]
    if not v["runs"]:
      continue
    effect = sum(r["effect"] for r in v["runs"])
    lines += [f"Verdict per seed (target: constant b={config.b0}'s final accuracy - 0.5 points): "
              f"{effect} of {len(v['runs'])} adaptive runs show the effect.", ""]
    vrows = []
    for r in v["runs"]:
      reasons = [n for n, ok in (("accuracy", r["final_ok"]), ("steps", r["steps_ok"]), ("samples", r["samples_ok"]))
                 if not ok]
      vrows.append([r["label"], r["seed"], f"{r['gap_points']:+.2f}", _fmt(r["steps_to_target"]),
                    _fmt(r["steps_ratio_to_small"], 2), _fmt(r["samples_to_target"]),
                    "yes" if r["effect"] else "no (" + ", ".join(reasons) + ")"])
    lines += [report.markdown_table(["test", "seed", "acc - small's (points)", "steps to target",
                                     "/ small's steps", "samples to target", "effect"], vrows), ""]
  lines += ["Effect (Lau, Liu, Kolar 2024), decided before the runs: an adaptive run ends at or above the "
            "target, first reaches it in at most 1/3 of the steps constant small-batch training needs to "
            "first reach it, and with fewer samples than constant large-batch training needs (or it never "
            "does).", ""]
  return "\n".join(lines)


def _plotter(results: list[dict], model: str, optimizer: str, budget: str):
  def draw(path: str) -> None:
    mine = [r for r in results if (r["model"], r["optimizer"], r["budget"]) == (model, optimizer, budget)
            and r["seed"] == min(x["seed"] for x in results)]
    fig, (ax_samples, ax_steps, ax_batch) = report.figure(16, 4.6, ncols=3)
    for i, r in enumerate(mine):
      style = dict(label=r["label"], color=f"C{i % 10}", linestyle="-" if i < 10 else "--", linewidth=1.3)
      e = r["evals"]
      ax_samples.plot(e["samples"], e["accuracy"], **style)
      ax_steps.plot(e["step"], e["accuracy"], **style)
      b = r["batch_sizes"]
      steps, sizes = list(b["step"]) + [r["step"]], list(b["batch_size"]) + [b["batch_size"][-1]]
      ax_batch.plot(steps, sizes, drawstyle="steps-post", **style)
    for ax, xlabel in ((ax_samples, "samples seen"), (ax_steps, "optimizer steps")):
      ax.set_xlabel(xlabel)
      ax.set_ylabel("test accuracy")
      ax.grid(alpha=0.3)
    ax_steps.set_xscale("log")
    ax_batch.set_xscale("log")
    ax_batch.set_yscale("log", base=2)
    ax_batch.set_xlabel("optimizer steps")
    ax_batch.set_ylabel("batch size")
    ax_batch.grid(alpha=0.3)
    ax_batch.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model} / {optimizer} / budget in {budget} (first seed)")
    report.save_figure(fig, path)
  return draw
