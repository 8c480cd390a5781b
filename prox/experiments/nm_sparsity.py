"""Experiment ``nm_sparsity``: N:M sparse training with progressive gradient flow (Bambhaniya et al. 2024).

For every setting (a model on ``dataset``), every N:M of ``sparsities`` and every method of ``methods``
(``dense``; ``srste``, Zhou et al. 2021; ``mdgf_<decay>``, mask decay; ``sdgf_<structure>``, structure
decay), ``num_seeds`` seeds are trained with the shared loop (``train.train``) and
``prox.transforms.nm_sparsity`` wrapping the configured optimizer. The forward pass uses
``forward_params`` (``w * (m + (1 - m) beta)``, straight-through gradient to the dense weights) and the
test accuracy is always measured with hard masks (``hard_masked_params``, beta = 0), whatever beta the
schedule ended at. The train state's beta, mask density and the sparsity of the evaluated weights are
logged every ``log_every`` steps (``Hooks.state_metrics``).

Outputs in ``workdir``: ``results.md`` (test accuracy mean ± std over seeds per method and N:M, the true
sparsity of the evaluated weights, and paired comparisons of the decaying methods against SR-STE),
``results.json``, ``accuracy_vs_sparsity.png`` and ``schedules.png`` (beta and mask density over training
for one run of each method). Each run lives in ``workdir/runs/<setting>/<method>/<N>of<M>/seed<k>/``
(the shared loop's ``metrics.jsonl`` and ``metrics.json``, plus ``result.json``; checkpoints are deleted
once the result is recorded unless ``keep_run_checkpoints``); a restarted experiment skips finished runs and
refuses a workdir whose runs were made with a different config.

Speed: the compiled train step does not depend on the seed (parameters, rng and data are arguments),
so with ``compilation_cache`` JAX's persistent compilation cache (``workdir/xla_cache``) turns the
compilation of seeds 2..S (and of a restarted experiment) into a cache read.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from prox import models
from prox import step as step_lib
from prox.experiments import _nm_report as report_lib
from prox.experiments import train
from prox.experiments import writers
from prox.tasks import data as data_lib
from prox.transforms import filters as filters_lib
from prox.transforms import masking
from prox.transforms import nm as nm_lib

# ``quick=True`` replaces these fields: every method on a small MLP in a few seconds per run.
QUICK = {
    "num_seeds": 2,
    "settings": "mlp",
    "models.mlp.model_kwargs.hidden": (32, 32),
    "models.mlp.num_steps": 40,
    "sparsities": "2:4,1:8",
    "schedule_plot": "1:8",
    "learning_rate": 1e-2,
    "log_every": 5,
    "eval_every": 20,
}

_TRAIN_FIELDS = ("seed", "dataset", "data_dir", "optimizer", "optimizer_kwargs", "learning_rate", "schedule",
                 "warmup_steps", "grad_clip_norm", "micro_batch_size", "eval_batch_size", "log_every",
                 "eval_every")
_SETTING_FIELDS = ("model", "model_kwargs", "num_steps", "batch_size")   # of ``models.<setting>``
_DENSE = "dense"


# --- config ----------------------------------------------------------------------------------------

def effective_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the ``QUICK`` fields applied when ``config.quick``."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if cfg.get("quick", False):
    cfg.update_from_flattened_dict(QUICK)
  return cfg


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _names(value: Any, field: str) -> list[str]:
  train.require(isinstance(value, str), f"{field} must be a comma-separated string, got {value!r}")
  names = [v.strip() for v in value.split(",") if v.strip()]
  train.require(bool(names), f"{field} is empty")
  return names


def parse_sparsities(value: Any) -> list[tuple[int, int]]:
  """``"2:4,1:8"`` -> ``[(2, 4), (1, 8)]`` (the N < M check is the library's, see ``make_tx``)."""
  out = []
  for item in _names(value, "sparsities"):
    match = re.fullmatch(r"(\d+):(\d+)", item)
    train.require(match is not None, f"sparsities: {item!r} is not of the form N:M (e.g. 1:16)")
    nm = (int(match.group(1)), int(match.group(2)))
    train.require(nm not in out, f"sparsities: {item!r} is listed twice")
    out.append(nm)
  return out


def nm_label(n: int, m: int) -> str:
  return f"{n}:{m}"


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
  raise train.ConfigError(f"methods: unknown method {method!r}; expected dense, srste, mdgf_<decay> "
                          f"(decay: {', '.join(nm_lib.DECAYS)}) or sdgf_<structure> (stepwise, geometric)")


def phase_steps(cfg: ml_collections.ConfigDict, method: str, num_steps: int) -> tuple[int, int]:
  """``(warmup_steps, finetune_steps)`` of the sparsity schedule (none for ``dense``)."""
  if method == _DENSE:
    return 0, 0
  return int(round(cfg.warmup_fraction * num_steps)), int(round(cfg.finetune_fraction * num_steps))


def make_tx(cfg: ml_collections.ConfigDict, run_cfg: ml_collections.ConfigDict, method: str,
            nm: tuple[int, int] | None):
  """``nm_sparsity(<the configured optimizer>, n, m, ...)`` for one run; bad values raise ``ConfigError``."""
  kwargs = method_kwargs(cfg, method)
  n, m = nm if nm is not None else (1, 2)   # dense: all-ones masks, N:M unused
  warmup, finetune = phase_steps(cfg, method, run_cfg.num_steps)
  where = method if nm is None else f"{method} at {nm_label(n, m)}"
  try:
    return nm_lib.nm_sparsity(train.build_optimizer(run_cfg), n, m, total_steps=run_cfg.num_steps,
                              warmup_steps=warmup, finetune_steps=finetune, filter=cfg.sparse_filter,
                              **kwargs)
  except (ValueError, TypeError) as e:
    raise train.ConfigError(f"{where}: {e}") from None


def run_config(cfg: ml_collections.ConfigDict, setting: str, seed: int) -> ml_collections.ConfigDict:
  """The shared loop's config (``configs/classify.py`` fields) of one run."""
  spec = cfg.models[setting]
  c = ml_collections.ConfigDict({k: cfg[k] for k in _TRAIN_FIELDS})
  c.experiment = "nm_sparsity"
  c.seed = int(seed)
  c.model = spec.model
  c.model_kwargs = ml_collections.ConfigDict(spec.model_kwargs)
  c.num_steps = spec.num_steps
  c.batch_size = spec.batch_size
  c.checkpoint_every = cfg.checkpoint_every or c.num_steps
  c.keep_checkpoints = 1
  c.progress = False
  c.tensorboard = False
  c.plot_curves = False
  return c


def runs(cfg: ml_collections.ConfigDict,
         settings: list[str] | None = None) -> list[tuple[str, str, tuple[int, int] | None]]:
  """``(setting, method, nm)`` of every run except the seed, in table order (``nm`` None for dense)."""
  methods = _names(cfg.methods, "methods")
  out = []
  for setting in settings or _names(cfg.settings, "settings"):
    if _DENSE in methods:
      out.append((setting, _DENSE, None))
    for nm in parse_sparsities(cfg.sparsities):
      out.extend((setting, method, nm) for method in methods if method != _DENSE)
  return out


def _abstract_params(cfg: ml_collections.ConfigDict, setting: str, input_shape: tuple[int, ...],
                     num_classes: int) -> Any:
  """Parameter shapes of a setting's model, without running anything (``nnx.eval_shape``)."""
  spec = cfg.models[setting]
  try:
    model = nnx.eval_shape(lambda: models.make_model(
        spec.model, input_shape=input_shape, num_classes=num_classes, **dict(spec.model_kwargs)))
  except (ValueError, TypeError) as e:
    raise train.ConfigError(f"models.{setting}: {e}") from None
  return models.functional(model).params


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks every value the experiment uses, shapes included, before anything compiles."""
  cfg = effective_config(config)
  train.require(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
  train.require(_is_int(cfg.num_seeds) and cfg.num_seeds > 0, f"num_seeds must be a positive integer, got "
                                                         f"{cfg.num_seeds!r}")
  train.require(_is_int(cfg.seed) and 0 <= cfg.seed and cfg.seed + cfg.num_seeds <= 2**31,
           f"seed must be an int in [0, 2**31 - num_seeds], got {cfg.seed!r}")
  settings = _names(cfg.settings, "settings")
  for s in settings:
    train.require(s in cfg.models, f"settings: unknown setting {s!r}; known (in models): {', '.join(cfg.models)}")
    train.require(isinstance(cfg.models[s], ml_collections.ConfigDict) and
             sorted(cfg.models[s]) == sorted(_SETTING_FIELDS),
             f"models.{s} must be a dict with the fields {', '.join(_SETTING_FIELDS)}")
    train.require(cfg.models[s].model in models.MODELS,
             f"models.{s}.model: unknown model {cfg.models[s].model!r}; known: {', '.join(models.MODELS)}")
  sparsities = parse_sparsities(cfg.sparsities)
  for name in ("warmup_fraction", "finetune_fraction"):
    v = cfg[name]
    train.require(_is_number(v) and 0 <= v < 1, f"{name} must be a number in [0, 1), got {v!r}")
  train.require(cfg.warmup_fraction + cfg.finetune_fraction < 1,
           f"warmup_fraction + finetune_fraction must be < 1 (no sparse phase left), got "
           f"{cfg.warmup_fraction} + {cfg.finetune_fraction}")
  train.require(_is_int(cfg.checkpoint_every) and cfg.checkpoint_every >= 0,
           f"checkpoint_every must be an int >= 0 (0: only at the end), got {cfg.checkpoint_every!r}")
  try:
    re.compile(cfg.sparse_filter)
  except (re.error, TypeError) as e:
    raise train.ConfigError(f"sparse_filter {cfg.sparse_filter!r} is not a valid regex: {e}") from None
  for s in settings:
    for name in ("num_steps", "batch_size"):
      v = cfg.models[s][name]
      train.require(_is_int(v) and v > 0, f"models.{s}.{name} must be a positive integer, got {v!r}")
    rc = run_config(cfg, s, cfg.seed)
    train.validate(rc, workdir)
    for _, method, nm in runs(cfg, [s]):
      make_tx(cfg, rc, method, nm)   # the library's checks: N < M, decay, structure, phases
  # Shapes: the test split's first image gives the input shape; every (setting, method, N:M) optimizer
  # is built and its state traced (jax.eval_shape: no compilation), which checks that M divides each
  # sparse leaf's grouping axis at every SdGf stage.
  split = "test" if cfg.dataset == "digits" else "test[:1]"
  try:
    probe = data_lib.load(cfg.dataset, split, data_dir=cfg.data_dir or None)
  except (ValueError, FileNotFoundError) as e:
    raise train.ConfigError(str(e)) from None
  shape = tuple(int(d) for d in probe.images.shape[1:])
  for s in settings:
    params = _abstract_params(cfg, s, shape, probe.num_classes)
    train.require(bool(filters_lib.selected_paths(params, cfg.sparse_filter)),
             f"sparse_filter {cfg.sparse_filter!r} selects no parameter of models.{s} "
             f"(paths: {', '.join(filters_lib.selected_paths(params, filters_lib.by_ndim(0)))})")
    rc = run_config(cfg, s, cfg.seed)
    for _, method, nm in runs(cfg, [s]):
      tx = make_tx(cfg, rc, method, nm)
      try:
        jax.eval_shape(tx.init, params)
      except ValueError as e:
        where = method if nm is None else f"{method} at {nm_label(*nm)}"
        raise train.ConfigError(f"models.{s}, {where}: {e}") from None
  train.require(cfg.schedule_plot == "" or cfg.schedule_plot in [nm_label(*nm) for nm in sparsities],
           f"schedule_plot {cfg.schedule_plot!r} must be '' or one of sparsities {cfg.sparsities!r}")


# --- one run ---------------------------------------------------------------------------------------

def forward_fn(params: Any, state: step_lib.TrainState) -> Any:
  """Forward-pass weights ``w * (m + (1 - m) beta)`` from the sparsity state in the optimizer state."""
  return masking.forward_params(params, state.opt_state)


def eval_params(state: step_lib.TrainState) -> Any:
  """Evaluation weights: hard masks, ``w * m`` (beta = 0)."""
  return masking.hard_masked_params(state.params, state.opt_state)


def state_metrics(state: step_lib.TrainState, *, sparse_filter: str) -> dict[str, jax.Array]:
  """beta, the density of the masks, and the zero fraction of the evaluated (hard-masked) weights.

  ``eval_sparsity``: zeros / size over the sparse leaves; ``eval_sparsity_all``: over all parameters
  (biases and dense layers included).
  """
  s = masking.find_mask_states(state.opt_state)[0]
  hard = eval_params(state)
  return {
      "beta": s.beta,
      "mask_density": 1.0 - filters_lib.sparsity_summary(s.masks)["total"],
      "eval_sparsity": filters_lib.sparsity_summary(hard, sparse_filter)["total"],
      "eval_sparsity_all": filters_lib.sparsity_summary(hard, filters_lib.by_ndim(0))["total"],
  }


def run_dir(workdir: str, setting: str, method: str, nm: tuple[int, int] | None, seed: int) -> str:
  parts = [workdir, "runs", setting, method] + ([] if nm is None else [f"{nm[0]}of{nm[1]}"])
  return os.path.join(*parts, f"seed{seed}")


def _fingerprint(run_cfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, method: str,
                 nm: tuple[int, int] | None) -> str:
  spec = {"run": run_cfg.to_dict(), "method": method, "nm": nm, "kwargs": method_kwargs(cfg, method),
          "phases": phase_steps(cfg, method, run_cfg.num_steps), "sparse_filter": cfg.sparse_filter}
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def run_one(cfg: ml_collections.ConfigDict, workdir: str, setting: str, method: str,
            nm: tuple[int, int] | None, seed: int) -> dict:
  """Trains one (setting, method, N:M, seed) with the shared loop, or returns its recorded result."""
  rc = run_config(cfg, setting, seed)
  fingerprint = _fingerprint(rc, cfg, method, nm)
  path = run_dir(workdir, setting, method, nm, seed)
  os.makedirs(path, exist_ok=True)
  marker = _read_json(os.path.join(path, "run.json"))
  if marker is not None and marker.get("fingerprint") != fingerprint:
    raise train.ConfigError(f"{path} holds a run with a different config; use a new --workdir")
  result = _read_json(os.path.join(path, "result.json"))
  if result is not None:
    return result
  _write_json(os.path.join(path, "run.json"), {"fingerprint": fingerprint})
  hooks = train.Hooks(tx=make_tx(cfg, rc, method, nm), forward_fn=forward_fn, eval_params=eval_params,
                      state_metrics=functools.partial(state_metrics, sparse_filter=cfg.sparse_filter))
  started = time.perf_counter()
  final = train.train(rc, path, hooks)
  result = {"setting": setting, "model": rc.model, "method": method,
            "nm": None if nm is None else nm_label(*nm), "seed": seed, "fingerprint": fingerprint,
            "seconds": time.perf_counter() - started, **final}
  _write_json(os.path.join(path, "result.json"), result)
  if not cfg.keep_run_checkpoints:
    shutil.rmtree(os.path.join(path, "checkpoints"), ignore_errors=True)
  return result


@contextlib.contextmanager
def compilation_cache(directory: str | None) -> Iterator[None]:
  """JAX's persistent compilation cache in ``directory`` for the duration (``None``: unchanged).

  Every XLA compilation is stored and looked up by the hash of its program, so a train step that only
  differs in its argument values (another seed) is compiled once. The previous settings are restored.
  """
  if directory is None:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  new = dict(zip(names, (directory, 0.0, 0)))
  try:
    for n, v in new.items():
      jax.config.update(n, v)
    cc.reset_cache()
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    cc.reset_cache()


# --- the experiment --------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every (setting, method, N:M, seed), then writes results.md/json and the plots."""
  validate(config, workdir)
  cfg = effective_config(config)
  seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
  started = time.perf_counter()
  results = []
  cache = os.path.join(workdir, "xla_cache") if cfg.compilation_cache else None
  with compilation_cache(cache):
    for setting, method, nm in runs(cfg):
      for seed in seeds:
        r = run_one(cfg, workdir, setting, method, nm, seed)
        results.append(r)
        if cfg.progress:
          print(f"nm_sparsity: {setting:11s} {method:14s} {r['nm'] or '-':5s} seed {seed}: test acc "
                f"{r['test_accuracy']:.4f}  sparsity {r['eval_sparsity']:.4f}  ({r['seconds']:.1f} s)",
                flush=True)
  seconds = time.perf_counter() - started
  curves = {}
  if cfg.schedule_plot:
    setting = _names(cfg.settings, "settings")[0]
    n, m = (int(x) for x in cfg.schedule_plot.split(":"))
    for _, method, nm in runs(cfg, [setting]):
      if nm is None or nm == (n, m):
        path = os.path.join(run_dir(workdir, setting, method, nm, seeds[0]), "metrics.jsonl")
        curves[method] = [r for r in writers.read_metrics(path) if r["split"] == "train"]
    curves = {"setting": setting, "nm": cfg.schedule_plot, "seed": seeds[0], "runs": curves}
  return report_lib.write_all(workdir, cfg, results, curves, seconds)
