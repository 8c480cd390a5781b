"""Experiment ``nm_sparsity``: N:M sparse training with progressive gradient flow (Bambhaniya et al. 2024).

  prox --config=prox/experiments/configs/nm_sparsity.py --workdir=runs/nm_sparsity

For every setting (a model on ``dataset``), every N:M of ``sparsities`` and every method of ``methods``
(``dense``; ``srste``, Zhou et al. 2021; ``mdgf_<decay>``, mask decay; ``sdgf_<structure>``, structure
decay), ``num_seeds`` seeds are trained on the one loop (``prox.loop.run``) with
``prox.transforms.nm_sparsity`` wrapping the configured optimizer. The forward pass uses
``forward_params`` (``w * (m + (1 - m) beta)``, straight-through gradient to the dense weights); the test
accuracy is always measured with hard masks (``hard_masked_params``, beta = 0), whatever beta the schedule
ended at. beta, the mask density and the sparsity of the evaluated weights are logged with the train
metrics every ``log_every`` steps.

Each run lives in ``workdir/runs/<setting>/<method>/<N>of<M>/seed<k>/`` (``config.json``, the loop's
``metrics.jsonl``, ``metrics.json`` and ``result.json``; its checkpoints are deleted once the result is
recorded unless ``keep_run_checkpoints``); :func:`prox.experiments.common.run_once` skips finished runs when
the sweep starts again and refuses a run directory made with another config. The seeds of one (setting,
method, N:M) share one compiled train step (a ``loop.CompileCache``: parameters, rng and data are its
arguments), and every run of a setting shares the compiled evaluation.

Outputs in ``workdir``: ``results.md`` (test accuracy mean ± std over seeds per method and N:M, the true
sparsity of the evaluated weights, paired comparisons of the decaying methods against SR-STE),
``results.json``, ``accuracy_vs_sparsity.png`` and ``schedules.png`` (beta and mask density over training
for one run of each method).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from prox import loop
from prox import models
from prox import step as step_lib
from prox.experiments import classify
from prox.experiments import common
from prox.experiments import report
from prox.losses import classification_loss
from prox.tasks import EpochSource
from prox.transforms import filters as filters_lib
from prox.transforms import masking
from prox.transforms import nm as nm_lib

# ``--config.quick=True``: every method on a small MLP in a few seconds per run (main applies it).
QUICK = {
    "num_seeds": 2,
    "settings": "mlp",
    "models.mlp.model_kwargs.hidden": (32, 32),
    "models.mlp.num_steps": 40,
    "sparsities": "2:4,1:8",
    "schedule_plot": "last",
    "learning_rate": 1e-2,
    "log_every": 5,
    "eval_every": 20,
}
# The sweep may grow or shrink when it starts again; each run's own config is checked by ``run_once``.
RESUMABLE = ("settings", "sparsities", "methods", "num_seeds", "schedule_plot")

_TRAIN_FIELDS = ("dataset", "data_dir", "optimizer", "optimizer_kwargs", "learning_rate", "schedule",
                 "warmup_steps", "grad_clip_norm", "micro_batch_size", "eval_batch_size", "log_every",
                 "eval_every")
_SETTING_FIELDS = ("model", "model_kwargs", "num_steps", "batch_size")   # of ``models.<setting>``
_DENSE = "dense"
_BASELINE = "srste"

Cell = tuple[str, str, "tuple[int, int] | None"]   # (setting, method, N:M); N:M is None for dense


# --- config ----------------------------------------------------------------------------------------

def parse_sparsities(value: Any) -> list[tuple[int, int]]:
  """``"2:4,1:8"`` -> ``[(2, 4), (1, 8)]`` (the N < M check is the library's, see ``make_tx``)."""
  common.require(isinstance(value, str), f"sparsities must be a comma-separated string, got {value!r}")
  out = []
  for item in [v.strip() for v in value.split(",") if v.strip()]:
    match = re.fullmatch(r"(\d+):(\d+)", item)
    common.require(match is not None, f"sparsities: {item!r} is not of the form N:M (e.g. 1:16)")
    nm = (int(match.group(1)), int(match.group(2)))
    common.require(nm not in out, f"sparsities: {item!r} is listed twice")
    out.append(nm)
  common.require(bool(out), "sparsities is empty")
  return out


def nm_label(nm: tuple[int, int] | None) -> str:
  return _DENSE if nm is None else f"{nm[0]}:{nm[1]}"


def method_kwargs(cfg: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
  """The ``nm_sparsity`` keyword arguments of a method name: dense, srste, mdgf_<decay>, sdgf_<structure>."""
  base, _, variant = method.partition("_")
  if method in (_DENSE, "srste"):
    kwargs: dict[str, Any] = {"method": method}
    if method == "srste":
      kwargs["srste_lambda"] = cfg.srste_lambda
    return kwargs
  if base == "mdgf" and variant:
    kwargs = {"method": "mdgf", "decay": variant}
    if variant != "step":
      kwargs["decay_end"] = cfg.decay_end
    if variant == "exp":
      kwargs["floor"] = cfg.floor
    return kwargs
  if base == "sdgf" and variant:
    return {"method": "sdgf", "structure": variant}
  raise common.ConfigError(f"methods: unknown method {method!r}; expected dense, srste, mdgf_<decay> "
                           f"(decay: {', '.join(nm_lib.DECAYS)}) or sdgf_<structure> (stepwise, geometric)")


def cells(cfg: ml_collections.ConfigDict, settings: list[str] | None = None) -> list[Cell]:
  """``(setting, method, nm)`` of every run but the seed, in table order (``nm`` None for dense)."""
  methods = common.names(cfg, "methods")
  out: list[Cell] = []
  for setting in settings or common.names(cfg, "settings"):
    if _DENSE in methods:
      out.append((setting, _DENSE, None))
    for nm in parse_sparsities(cfg.sparsities):
      out.extend((setting, method, nm) for method in methods if method != _DENSE)
  return out


def run_config(cfg: ml_collections.ConfigDict, setting: str, method: str, nm: tuple[int, int] | None,
               seed: int) -> ml_collections.ConfigDict:
  """The config of one run: ``configs/classify.py``'s fields and the ``nm_sparsity`` arguments
  (``sparsity``), recorded in the run's ``config.json``."""
  spec = cfg.models[setting]
  c = ml_collections.ConfigDict({k: cfg[k] for k in _TRAIN_FIELDS})
  c.seed = int(seed)
  c.model = spec.model
  c.model_kwargs = ml_collections.ConfigDict(spec.model_kwargs)
  c.num_steps = spec.num_steps
  c.batch_size = spec.batch_size
  c.checkpoint_every = cfg.checkpoint_every or spec.num_steps
  c.keep_checkpoints = 1
  c.progress = False
  c.tensorboard = False
  c.plot_curves = False
  n, m = nm if nm is not None else (1, 2)   # dense: all-ones masks, N:M unused
  phases = ({} if method == _DENSE else
            {"warmup_steps": cfg.warmup_fraction, "finetune_steps": cfg.finetune_fraction})
  c.sparsity = ml_collections.ConfigDict({
      "n": n, "m": m, "total_steps": spec.num_steps, "filter": cfg.sparse_filter, **phases,
      **method_kwargs(cfg, method)})
  return c


def make_tx(rc: ml_collections.ConfigDict, where: str) -> optax.GradientTransformationExtraArgs:
  """``nm_sparsity(<the configured optimizer>, **rc.sparsity)``; the library's ``ValueError`` names ``where``."""
  kwargs = rc.sparsity.to_dict()
  n, m = kwargs.pop("n"), kwargs.pop("m")
  return common.library_check(where, nm_lib.nm_sparsity, common.build_optimizer(rc), n, m, **kwargs)


def _where(method: str, nm: tuple[int, int] | None) -> str:
  return method if nm is None else f"{method} at {nm_label(nm)}"


def _schedule_plot(cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """The N:M whose schedules are plotted: ``schedule_plot`` (``last``: the last of ``sparsities``)."""
  if not cfg.schedule_plot:
    return None
  sparsities = parse_sparsities(cfg.sparsities)
  return sparsities[-1] if cfg.schedule_plot == "last" else parse_sparsities(cfg.schedule_plot)[0]


def _abstract_params(cfg: ml_collections.ConfigDict, setting: str, input_shape: tuple[int, ...],
                     num_classes: int) -> Any:
  """Parameter shapes of a setting's model, without running anything (``nnx.eval_shape``)."""
  spec = cfg.models[setting]
  model = nnx.eval_shape(lambda: models.make_model(spec.model, input_shape=input_shape,
                                                   num_classes=num_classes, **dict(spec.model_kwargs)))
  return models.functional(model).params


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the experiment uses, shapes included, before anything compiles."""
  cfg = config
  if workdir is not None:
    common.check_workdir(workdir)
  common.positive_ints(cfg, "num_seeds")
  common.require(common.is_int(cfg.seed) and 0 <= cfg.seed and cfg.seed + cfg.num_seeds <= 2**31,
                 f"seed must be an int in [0, 2**31 - num_seeds], got {cfg.seed!r}")
  settings = common.names(cfg, "settings")
  for s in settings:
    common.require(s in cfg.models, f"settings: unknown setting {s!r}; known (in models): "
                                    f"{', '.join(cfg.models)}")
    common.require(isinstance(cfg.models[s], ml_collections.ConfigDict)
                   and sorted(cfg.models[s]) == sorted(_SETTING_FIELDS),
                   f"models.{s} must be a dict with the fields {', '.join(_SETTING_FIELDS)}")
    common.positive_ints(cfg, f"models.{s}.num_steps", f"models.{s}.batch_size")
  sparsities = parse_sparsities(cfg.sparsities)
  for method in common.names(cfg, "methods"):
    method_kwargs(cfg, method)
  common.numbers(cfg, "warmup_fraction", "finetune_fraction", low=0, high=1, high_open=True)
  common.require(cfg.warmup_fraction + cfg.finetune_fraction < 1,
                 f"warmup_fraction + finetune_fraction must be < 1 (no sparse phase left), got "
                 f"{cfg.warmup_fraction} + {cfg.finetune_fraction}")
  common.positive_ints(cfg, "checkpoint_every", zero_ok=True)
  try:
    re.compile(cfg.sparse_filter)
  except (re.error, TypeError) as e:
    raise common.ConfigError(f"sparse_filter {cfg.sparse_filter!r} is not a valid regex: {e}") from None
  for s in settings:
    rc = run_config(cfg, s, _DENSE, None, cfg.seed)
    try:
      classify.validate(rc, None)   # data, model, optimizer, intervals, batch sizes of every run
    except common.ConfigError as e:
      raise common.ConfigError(f"models.{s}: {e}") from None
    for _, method, nm in cells(cfg, [s]):
      make_tx(run_config(cfg, s, method, nm, cfg.seed), _where(method, nm))   # N < M, decay, phases
  # Shapes: the test split gives the input shape; every (setting, method, N:M) optimizer state is traced
  # (jax.eval_shape: no compilation), which checks that M divides each sparse leaf's grouping axis at
  # every SdGf stage.
  probe = common.load_splits(cfg)[1]
  shape = tuple(int(d) for d in probe.images.shape[1:])
  for s in settings:
    params = _abstract_params(cfg, s, shape, probe.num_classes)
    common.require(bool(filters_lib.selected_paths(params, cfg.sparse_filter)),
                   f"sparse_filter {cfg.sparse_filter!r} selects no parameter of models.{s} "
                   f"(paths: {', '.join(filters_lib.selected_paths(params, filters_lib.by_ndim(0)))})")
    for _, method, nm in cells(cfg, [s]):
      tx = make_tx(run_config(cfg, s, method, nm, cfg.seed), _where(method, nm))
      common.library_check(f"models.{s}, {_where(method, nm)}", jax.eval_shape, tx.init, params)
  common.require(cfg.schedule_plot in ("", "last") or (
      isinstance(cfg.schedule_plot, str) and re.fullmatch(r"\d+:\d+", cfg.schedule_plot) is not None
      and parse_sparsities(cfg.schedule_plot)[0] in sparsities),
      f"schedule_plot {cfg.schedule_plot!r} must be '', 'last' or one of sparsities {cfg.sparsities!r}")


# --- one run ---------------------------------------------------------------------------------------

def forward_fn(params: Any, state: step_lib.TrainState) -> Any:
  """Forward-pass weights ``w * (m + (1 - m) beta)`` from the sparsity state in the optimizer state."""
  return masking.forward_params(params, state.opt_state)


def eval_params(state: step_lib.TrainState) -> Any:
  """Evaluation weights: hard masks, ``w * m`` (beta = 0)."""
  return masking.hard_masked_params(state.params, state.opt_state)


@jax.jit
def hard_masked_state(state: step_lib.TrainState) -> step_lib.TrainState:
  """The state evaluated: hard-masked weights and no optimizer state (so one compiled evaluation serves
  every method)."""
  return state._replace(params=eval_params(state), opt_state=())


def state_metrics_fn(sparse_filter: str) -> Callable[[step_lib.TrainState], dict[str, jax.Array]]:
  """``state -> {beta, mask_density, eval_sparsity, eval_sparsity_all}``.

  ``eval_sparsity``: zeros / size of the evaluated (hard-masked) weights over the sparse leaves;
  ``eval_sparsity_all``: over all parameters (biases and dense layers included).
  """

  def state_metrics(state: step_lib.TrainState) -> dict[str, jax.Array]:
    s = masking.find_mask_states(state.opt_state)[0]
    hard = eval_params(state)
    return {
        "beta": s.beta,
        "mask_density": 1.0 - filters_lib.sparsity_summary(s.masks)["total"],
        "eval_sparsity": filters_lib.sparsity_summary(hard, sparse_filter)["total"],
        "eval_sparsity_all": filters_lib.sparsity_summary(hard, filters_lib.by_ndim(0))["total"],
    }

  return state_metrics


def train_and_evaluate(
    rc: ml_collections.ConfigDict,
    workdir: str,
    *,
    net: models.Functional,
    tx: optax.GradientTransformation,
    step: Callable,
    evaluate: Callable,
    state_metrics: Callable[[step_lib.TrainState], dict],
    datasets: tuple,
    compile_cache: loop.CompileCache,
) -> dict:
  """One run (``classify.train_and_evaluate`` with a step and evaluation shared by the runs of a cell).

  ``net`` gives this seed's initial parameters; ``step`` is ``make_train_step(..., tx, forward_fn=...)``
  and ``evaluate`` the setting's ``common.evaluator``, both built once, so that ``compile_cache`` serves
  every seed. Returns the final metrics, with the final state metrics and the run's wall time.
  """
  started = time.perf_counter()
  train_ds, test_ds = datasets
  mesh = step_lib.data_mesh()
  state = common.replicated_state(net.params, tx, mesh, seed=rc.seed, model_state=net.model_state)
  test = lambda s: evaluate(hard_masked_state(s), test_ds, rc.eval_batch_size)
  writer = report.MetricWriter(workdir, total_steps=rc.num_steps, tensorboard=rc.tensorboard,
                               progress=rc.progress)
  with writer:
    result = loop.run(
        step, state, EpochSource(train_ds, rc.seed), mesh=mesh, batch_size=rc.batch_size,
        num_steps=rc.num_steps,
        actions=common.train_actions(writer, test, log_every=rc.log_every, eval_every=rc.eval_every,
                                     state_metrics=state_metrics),
        checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint=loop.Every(steps=rc.checkpoint_every),
        keep_checkpoints=rc.keep_checkpoints, compile_cache=compile_cache, progress=writer.update)
  final = common.summary(result, **common.scalars(jax.jit(state_metrics)(result.state)),
                         seconds=time.perf_counter() - started)
  if jax.process_index() == 0:
    report.write_summary(workdir, final)
  return final


def run_dir(workdir: str, setting: str, method: str, nm: tuple[int, int] | None, seed: int) -> str:
  parts = [workdir, "runs", setting, method] + ([] if nm is None else [f"{nm[0]}of{nm[1]}"])
  return os.path.join(*parts, f"seed{seed}")


# --- the experiment --------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every (setting, method, N:M, seed), then writes results.md/json and the plots."""
  validate(config, workdir)
  cfg = config
  started = time.perf_counter()
  datasets = common.load_splits(cfg)
  mesh = step_lib.data_mesh()
  state_metrics = state_metrics_fn(cfg.sparse_filter)   # one function: compiled once per opt_state structure
  results = []
  for setting in common.names(cfg, "settings"):
    # The model's apply (and so the loss and the evaluation) is the same for every seed.
    base = run_config(cfg, setting, _DENSE, None, cfg.seed)
    apply = common.build_model(base, datasets[0]).apply
    evaluate = common.evaluator(apply, mesh)
    for _, method, nm in cells(cfg, [setting]):
      tx = make_tx(run_config(cfg, setting, method, nm, cfg.seed), _where(method, nm))
      tx = tx._replace(init=jax.jit(tx.init))   # compiled once for the seeds (its lax.switch over stages)
      step = step_lib.make_train_step(classification_loss(apply), tx, mesh=mesh,
                                      micro_batch_size=cfg.micro_batch_size or None, forward_fn=forward_fn)
      cache = loop.CompileCache()   # the seeds of this cell share the compiled step
      for seed in common.seeds(cfg):
        rc = run_config(cfg, setting, method, nm, seed)
        path = run_dir(workdir, setting, method, nm, seed)
        final = common.run_once(path, "nm_sparsity", rc, lambda rc=rc, path=path: train_and_evaluate(
            rc, path, net=common.build_model(rc, datasets[0]), tx=tx, step=step, evaluate=evaluate,
            state_metrics=state_metrics, datasets=datasets, compile_cache=cache))
        if not cfg.keep_run_checkpoints:
          shutil.rmtree(os.path.join(path, "checkpoints"), ignore_errors=True)
        r = {"setting": setting, "model": rc.model, "method": method, "nm": None if nm is None else nm_label(nm),
             "seed": seed, **final}
        results.append(r)
        if cfg.progress:
          print(f"nm_sparsity: {setting:11s} {method:14s} {r['nm'] or '-':5s} seed {seed}: test acc "
                f"{r['test_accuracy']:.4f}  sparsity {r['eval_sparsity']:.4f}  ({r['seconds']:.1f} s)",
                flush=True)
  seconds = time.perf_counter() - started
  return write_report(workdir, cfg, results, schedule_curves(workdir, cfg), seconds)


def schedule_curves(workdir: str, cfg: ml_collections.ConfigDict) -> dict:
  """The train records (beta, mask density, loss) of the first seed of each method of the first setting
  at the ``schedule_plot`` N:M (and dense)."""
  target = _schedule_plot(cfg)
  if target is None:
    return {}
  setting, seed = common.names(cfg, "settings")[0], cfg.seed
  runs = {}
  for _, method, nm in cells(cfg, [setting]):
    if nm is None or nm == target:
      path = os.path.join(run_dir(workdir, setting, method, nm, seed), "metrics.jsonl")
      runs[method] = [r for r in report.read_metrics(path) if r["split"] == "train"]
  return {"setting": setting, "nm": nm_label(target), "seed": seed, "runs": runs}


# --- report ----------------------------------------------------------------------------------------

def aggregate(results: list[dict]) -> dict:
  """``table[setting][method][nm]``: per-seed test accuracies with their mean and std, and the mean
  sparsities (``nm`` is ``"dense"`` for the dense baseline)."""
  table: dict[str, dict[str, dict[str, dict]]] = {}
  for r in results:
    cell = table.setdefault(r["setting"], {}).setdefault(r["method"], {}).setdefault(
        r["nm"] or _DENSE, {"seeds": [], "accuracy": [], "eval_sparsity": [], "eval_sparsity_all": [],
                            "beta": [], "seconds": []})
    cell["seeds"].append(r["seed"])
    cell["accuracy"].append(r["test_accuracy"])
    for k in ("eval_sparsity", "eval_sparsity_all", "beta", "seconds"):
      cell[k].append(r[k])
  for setting in table.values():
    for by_nm in setting.values():
      for cell in by_nm.values():
        cell["mean"], cell["std"] = report.mean_std(cell["accuracy"])
        for k in ("eval_sparsity", "eval_sparsity_all", "seconds"):
          cell[f"{k}_mean"] = float(np.mean(cell[k]))
  return table


def comparisons(table: dict, methods: list[str], nms: list[str]) -> list[dict]:
  """Each decaying method minus SR-STE at each N:M of each setting, paired by seed
  (``report.paired_comparison``: same initialisation and data order)."""
  out = []
  for setting, rows in table.items():
    for nm in nms:
      for method in methods:
        if method in (_DENSE, _BASELINE) or nm not in rows.get(method, {}) or nm not in rows.get(_BASELINE, {}):
          continue
        ours, base = rows[method][nm], rows[_BASELINE][nm]
        c = report.paired_comparison(dict(zip(ours["seeds"], ours["accuracy"])),
                                     dict(zip(base["seeds"], base["accuracy"])))
        out.append({"setting": setting, "method": method, "nm": nm, **c})
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _model_label(spec: ml_collections.ConfigDict) -> str:
  kw = dict(spec.model_kwargs)
  if spec.model == "mlp" and "hidden" in kw:
    return "MLP " + "-".join(str(h) for h in kw["hidden"])
  return spec.model.upper() + (" " + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) if kw else "")


def _setup_lines(cfg: ml_collections.ConfigDict, nms: list[str], methods: list[str]) -> list[str]:
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
      stages = []
      for nm in nms:
        n, m = (int(x) for x in nm.split(":"))
        stages.append(" → ".join(f"{a}:{b}" for a, b in nm_lib.structure_stages(n, m, method.partition("_")[2])))
      lines.append(f"- {method} stages (evenly over the sparse phase): " + "; ".join(stages) + ".")
  return lines


def markdown(cfg: ml_collections.ConfigDict, table: dict, comps: list[dict], nms: list[str], methods: list[str],
             seconds: float, results: list[dict]) -> str:
  run_seconds = sum(r["seconds"] for r in results)
  compile_seconds = sum(r["compile_seconds_this_run"] for r in results)
  compiles = sum(r["compiles_this_run"] for r in results)
  lines = ["# N:M sparsity with progressive gradient flow", ""]
  lines += _setup_lines(cfg, nms, methods)
  lines.append(f"- {len(results)} runs: {run_seconds / 60:.1f} min in the runs (sum of their wall clock; "
               f"{compiles} train-step compilations, {compile_seconds / 60:.1f} min: the seeds of a method and "
               f"N:M share one); this invocation took {seconds / 60:.1f} min (finished runs are not repeated).")
  lines.append("")
  for setting, rows in table.items():
    spec = cfg.models[setting]
    n_seeds = max(len(c["accuracy"]) for by_nm in rows.values() for c in by_nm.values())
    body = []
    for method in methods:
      by_nm = rows.get(method, {})
      if method == _DENSE and _DENSE in by_nm:
        body.append([method] + [f"{_pct(by_nm[_DENSE]['mean'])} ± {_pct(by_nm[_DENSE]['std'])}"] * len(nms))
      else:
        body.append([method] + [f"{_pct(by_nm[nm]['mean'])} ± {_pct(by_nm[nm]['std'])}" if nm in by_nm else "–"
                                for nm in nms])
    for key, label in (("eval_sparsity_mean", "sparsity of the sparse layers (%)"),
                       ("eval_sparsity_all_mean", "sparsity of all parameters (%)")):
      row = [label]
      for nm in nms:
        sparse = [rows[m][nm][key] for m in methods if m != _DENSE and nm in rows.get(m, {})]
        row.append(_pct(float(np.mean(sparse))) if sparse else "–")
      body.append(row)
    lines += [f"## `{setting}`: {_model_label(spec)}, {spec.num_steps} steps of batch {spec.batch_size}", "",
              f"Test accuracy (%), mean ± std over {n_seeds} seeds.", "",
              report.markdown_table(["method"] + nms, body)]
  if comps:
    lines += ["## Decaying gradient flow minus SR-STE", "",
              "Test accuracy difference in percentage points, paired by seed; 95% CI of the mean (Student "
              "t); p: two-sided paired t-test. `better` / `worse` only when the interval excludes 0 "
              f"(no correction for the {len(comps)} comparisons).", ""]
    body = [[c["setting"], c["nm"], c["method"], f"{100 * c['diff_mean']:+.2f}",
             f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]", f"{c['p_value']:.3f}",
             f"{c['wins']}/{c['ties']}/{c['losses']}", c["verdict"]] for c in comps]
    lines.append(report.markdown_table(
        ["setting", "N:M", "method", "Δ mean (pp)", "95% CI (pp)", "p", "wins/ties/losses", "verdict"], body,
        align="lllrlrll"))
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


def _color(method: str, methods: list[str]) -> str:
  sparse = [m for m in methods if m != _DENSE]
  return "k" if method == _DENSE else f"C{sparse.index(method) % 10}"


def plot_accuracy(path: str, cfg: ml_collections.ConfigDict, table: dict, nms: list[str],
                  methods: list[str]) -> None:
  """Test accuracy (mean ± std over seeds) against N:M, one panel per setting; dense as a band."""
  settings = list(table)
  fig, axes = report.figure(5.0 * len(settings), 3.8, ncols=len(settings), squeeze=False)
  xs = {nm: math.log2(int(nm.split(":")[1]) / int(nm.split(":")[0])) for nm in nms}
  sparse_methods = [m for m in methods if m != _DENSE]
  for ax, setting in zip(axes[0], settings):
    rows = table[setting]
    if _DENSE in rows.get(_DENSE, {}):
      c = rows[_DENSE][_DENSE]
      ax.axhline(100 * c["mean"], color="k", ls="--", lw=1, label="dense")
      ax.axhspan(100 * (c["mean"] - c["std"]), 100 * (c["mean"] + c["std"]), color="k", alpha=0.08)
    for i, method in enumerate(sparse_methods):
      by_nm = rows.get(method, {})
      pts = [nm for nm in nms if nm in by_nm]
      if not pts:
        continue
      offset = 0.06 * (i - (len(sparse_methods) - 1) / 2)
      ax.errorbar([xs[nm] + offset for nm in pts], [100 * by_nm[nm]["mean"] for nm in pts],
                  yerr=[100 * by_nm[nm]["std"] for nm in pts], marker="o", ms=4, capsize=3, label=method,
                  color=_color(method, methods))
    ax.set_xticks([xs[nm] for nm in nms])
    ax.set_xticklabels([f"{nm}\n{100 * (1 - int(nm.split(':')[0]) / int(nm.split(':')[1])):.1f}%" for nm in nms])
    ax.set_xlabel("N:M (sparsity of the sparse layers)")
    ax.set_ylabel("test accuracy (%), hard masks")
    ax.set_title(f"{setting}: {_model_label(cfg.models[setting])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path, dpi=90)


def plot_schedules(path: str, curves: dict, methods: list[str]) -> None:
  """beta, mask density, forward density ``d + (1 - d) beta`` and train loss of one run per method."""
  fig, axes = report.figure(9, 6.4, nrows=2, ncols=2)
  axes = axes.ravel()
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
  report.save_figure(fig, path, dpi=90)


def write_report(workdir: str, cfg: ml_collections.ConfigDict, results: list[dict], curves: dict,
                 seconds: float) -> dict:
  """Writes results.md, results.json, accuracy_vs_sparsity.png and schedules.png; returns a summary."""
  nms = [nm_label(nm) for nm in parse_sparsities(cfg.sparsities)]
  methods = common.names(cfg, "methods")
  table = aggregate(results)
  comps = comparisons(table, methods, nms)
  keep = ("setting", "method", "nm", "seed", "test_accuracy", "test_loss", "eval_sparsity", "eval_sparsity_all",
          "beta", "mask_density", "train_loss", "seconds", "compile_seconds_this_run")
  data = {"config": cfg, "seconds": seconds, "run_seconds": sum(r["seconds"] for r in results),
          "table": table, "comparisons": comps, "runs": [{k: r.get(k) for k in keep} for r in results],
          "schedule_curves": curves}
  figures = {"accuracy_vs_sparsity.png": lambda p: plot_accuracy(p, cfg, table, nms, methods)}
  if curves.get("runs"):
    figures["schedules.png"] = lambda p: plot_schedules(p, curves, methods)
  report.write_results(workdir, data, markdown(cfg, table, comps, nms, methods, seconds, results), figures)
  high = [c for c in comps if c["nm"] in ("1:16", "1:32")]
  return {"runs": len(results), "seconds": seconds, "run_seconds": data["run_seconds"],
          **{f"vs_srste_at_1:16_1:32_{v.replace(' ', '_')}": sum(c["verdict"] == v for c in high)
             for v in ("better", "no difference", "worse")}}
