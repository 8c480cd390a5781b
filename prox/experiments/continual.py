"""Experiment ``continual``: task streams on digits, seven continual-learning methods, and SCoLe.

For every stream (``permuted``: 10 tasks of all ten classes under a seeded pixel permutation, domain-
incremental; ``split``: 5 tasks of 2 classes, task-incremental with per-task logit masks), every method
(``_continual_methods.KINDS``; EWC once per lambda of the stream's sweep) and every seed, a model is trained
on the tasks in order with ``prox.step``'s train step (one compiled step per method, reused for all seeds)
and evaluated on every task's test set after every task: the accuracy matrix ``R[i, j]`` (after task ``i``,
on task ``j``), from which ``prox.tasks.cl_metrics`` gives average accuracy, forgetting, BWT and FWT (FWT
against the accuracy of the untrained model). SCoLe: naive SGD over hundreds of 2-class tasks with
reoccurring classes and masked absent logits, accuracy over all classes after every task.

Outputs in ``workdir``: ``results.md`` (a table per stream, mean and spread over seeds), ``results.json``
(everything: matrices, logs, per-seed metrics), ``heatmap_<stream>.png``, ``accuracy_<stream>.png`` and
``scole_accuracy.png``. Each run (stream, method, seed) is checkpointed after every task (orbax, the whole
``TrainState`` and the accuracy rows so far) under ``workdir/checkpoints/`` and its result is kept in
``workdir/runs/``; a restarted experiment skips finished runs and resumes the others at the last finished
task (SCoLe: every ``scole.checkpoint_every_tasks`` tasks).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from prox import checkpoint as ckpt_lib
from prox import models
from prox import step as step_lib
from prox.experiments import _continual_methods as methods_lib
from prox.experiments import _continual_report as report_lib
from prox.experiments import train
from prox.optim import slow_learner
from prox.tasks import cl_metrics
from prox.tasks import data as data_lib
from prox.tasks import shift_detector as detector_lib
from prox.tasks import streams as streams_lib

# ``prox.transforms`` exports the functions ``ewc`` and ``gpm``, which shadow the module attributes of the
# same names: take the modules themselves.
ewc_lib = importlib.import_module("prox.transforms.ewc")


STREAMS = ("permuted", "split")
METHODS = methods_lib.KINDS

# Fields that only select which runs happen; the rest of the config must match a workdir's earlier runs.
_SELECTION = ("num_seeds", "streams", "methods", "progress", "scole.enabled", "permuted.ewc_lambdas",
              "split.ewc_lambdas", "permuted.ewc_detect_lambda", "split.ewc_detect_lambda")


# --- config ----------------------------------------------------------------------------------------

def _names(value: Any, field: str) -> list[str]:
  if not isinstance(value, str):
    raise train.ConfigError(f"{field} must be a comma-separated string, got {value!r}")
  return [v.strip() for v in value.split(",") if v.strip()]


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive_ints(cfg: ml_collections.ConfigDict, *dotted: str) -> None:
  for name in dotted:
    value = _get(cfg, name)
    train.require(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _library_check(field: str, factory, *args, **kwargs) -> None:
  """Runs a library factory for its argument checks; its ``ValueError`` becomes a ``ConfigError``."""
  try:
    factory(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise train.ConfigError(f"{field}: {e}") from None


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks every value the experiment uses (before anything compiles); raises ``ConfigError``."""
  cfg = config
  train.require(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
  streams = _names(cfg.streams, "streams")
  for s in streams:
    train.require(s in STREAMS, f"unknown stream {s!r}; known: {', '.join(STREAMS)}")
  methods = _names(cfg.methods, "methods")
  for m in methods:
    train.require(m in METHODS, f"unknown method {m!r}; known: {', '.join(METHODS)}")
  train.require(bool(streams and methods) or cfg.scole.enabled,
           "nothing to run: streams or methods is empty and scole.enabled is False")
  train.require(cfg.dataset in data_lib.DATASETS,
           f"unknown dataset {cfg.dataset!r}; known: {', '.join(data_lib.DATASETS)}")
  train.require(cfg.model in models.MODELS, f"unknown model {cfg.model!r}; known: {', '.join(models.MODELS)}")
  train.require(cfg.model in ("mlp", "cnn"),
           f"continual supports models without batch statistics (mlp, cnn), got {cfg.model!r}")
  for m in ("gpm", "slca"):
    train.require(m not in methods or cfg.model == "mlp",
             f"method {m!r} reads the dense layers' inputs and needs model 'mlp', got {cfg.model!r}")
  train.require(_is_int(cfg.seed) and 0 <= cfg.seed < 2**31, f"seed must be an int in [0, 2**31), got {cfg.seed!r}")
  _positive_ints(cfg, "num_seeds", "batch_size", "eval_batch_size", "permuted.num_tasks",
                 "permuted.epochs_per_task", "split.classes_per_task", "split.epochs_per_task",
                 "ewc.fisher_examples", "replay.capacity", "replay.batch_size", "gpm.examples",
                 "slca.samples_per_class", "slca.align_epochs", "slca.align_batch_size",
                 "detector.fisher_batches", "scole.num_tasks", "scole.classes_per_task",
                 "scole.epochs_per_task", "scole.checkpoint_every_tasks")
  train.require(cfg.permuted.num_tasks >= 2, f"permuted.num_tasks must be >= 2, got {cfg.permuted.num_tasks}")
  train.require(_is_number(cfg.learning_rate) and cfg.learning_rate > 0,
           f"learning_rate must be a positive number, got {cfg.learning_rate!r}")
  for name in ("momentum", "slca.align_momentum"):
    v = _get(cfg, name)
    train.require(_is_number(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
  train.require(_is_number(cfg.slca.align_learning_rate) and cfg.slca.align_learning_rate > 0,
           f"slca.align_learning_rate must be a positive number, got {cfg.slca.align_learning_rate!r}")
  train.require(_is_number(cfg.slca.tau) and cfg.slca.tau > 0, f"slca.tau must be a number > 0, got {cfg.slca.tau!r}")
  train.require(cfg.replay.batch_size <= cfg.replay.capacity,
           f"replay.batch_size {cfg.replay.batch_size} exceeds replay.capacity {cfg.replay.capacity}")
  for stream in STREAMS:
    lambdas = cfg[stream].ewc_lambdas
    if isinstance(lambdas, (int, float)):
      lambdas = (lambdas,)
    train.require(isinstance(lambdas, (tuple, list)) and len(lambdas) > 0,
             f"{stream}.ewc_lambdas must be a non-empty tuple of numbers, got {lambdas!r}")
    for lam in lambdas:
      train.require(_is_number(lam), f"{stream}.ewc_lambdas: ewc_lambda must be a finite number >= 0, got {lam!r}")
      _library_check(f"{stream}.ewc_lambdas", ewc_lib.ewc, float(lam))
    lam = cfg[stream].ewc_detect_lambda
    train.require(_is_number(lam), f"{stream}.ewc_detect_lambda must be a finite number >= 0, got {lam!r}")
    _library_check(f"{stream}.ewc_detect_lambda", ewc_lib.ewc, float(lam))
  train.require(_is_number(cfg.ewc.gamma), f"ewc.gamma must be in [0, 1], got {cfg.ewc.gamma!r}")
  _library_check("ewc.gamma", ewc_lib.ewc, 1.0, mode="online", gamma=float(cfg.ewc.gamma))
  train.require(_is_number(cfg.gpm.threshold_base) and 0 < cfg.gpm.threshold_base <= 1,
           f"gpm.threshold_base must be in (0, 1], got {cfg.gpm.threshold_base!r}")
  train.require(_is_number(cfg.gpm.threshold_increment) and cfg.gpm.threshold_increment >= 0,
           f"gpm.threshold_increment must be >= 0, got {cfg.gpm.threshold_increment!r}")
  _library_check("slca.backbone_scale", slow_learner, optax.sgd(1.0), cfg.slca.backbone_scale,
                 {"head": False, "hidden": True})
  _library_check("detector", detector_lib.shift_detector, cfg.detector.reference_window,
                 cfg.detector.test_window, cfg.detector.threshold)
  train.require(_is_number(cfg.scole.skew) and cfg.scole.skew >= 0,
           f"scole.skew must be a finite number >= 0, got {cfg.scole.skew!r}")
  devices = jax.device_count()
  train.require(jax.process_count() == 1, "continual runs in one process (any number of local devices)")
  for name, value in (("batch_size", cfg.batch_size), ("eval_batch_size", cfg.eval_batch_size),
                      ("slca.align_batch_size", cfg.slca.align_batch_size),
                      ("batch_size + replay.batch_size", cfg.batch_size + cfg.replay.batch_size)):
    train.require(value % devices == 0, f"{name} {value} is not divisible by the device count {devices}")
  train.check_workdir(workdir)


def _check_data(cfg: ml_collections.ConfigDict, train_ds: data_lib.ArrayDataset, streams: list[str],
                methods: list[str]) -> None:
  """Checks that need the data (class counts, task sizes); still before anything compiles."""
  c = train_ds.num_classes
  if "split" in streams:
    k = cfg.split.classes_per_task
    train.require(c % k == 0 and c // k >= 2,
             f"split.classes_per_task {k} must divide the {c} classes into at least 2 tasks")
  if cfg.scole.enabled:
    train.require(cfg.scole.classes_per_task <= c,
             f"scole.classes_per_task {cfg.scole.classes_per_task} exceeds the {c} classes")
  if "ewc_detect" in methods:
    window = cfg.detector.reference_window + cfg.detector.test_window
    for stream in streams:
      steps = min(_steps(len(t.train), cfg[stream].epochs_per_task, cfg.batch_size)
                  for t in _tasks(stream, cfg, train_ds, train_ds, cfg.seed))
      train.require(window < steps, f"detector windows reference_window + test_window = {window} must be below "
                               f"the {steps} steps of a {stream} task, or no switch can be detected")


def _fingerprint(cfg: ml_collections.ConfigDict) -> str:
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict):
        walk(v, name + ".")
      elif name not in _SELECTION:
        flat[name] = list(v) if isinstance(v, tuple) else v

  walk(cfg.to_dict(), "")
  return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- streams and method specs ----------------------------------------------------------------------

def _tasks(stream: str, cfg, train_ds, test_ds, seed: int) -> list[streams_lib.Task]:
  if stream == "permuted":
    return streams_lib.permuted_tasks(train_ds, test_ds, cfg.permuted.num_tasks, seed)
  return streams_lib.split_tasks(train_ds, test_ds, cfg.split.classes_per_task)


def _steps(n: int, epochs: int, batch_size: int) -> int:
  return max(1, math.ceil(epochs * n / batch_size))


def _specs(stream: str, cfg, methods: list[str]) -> list[tuple[str, str, str, dict]]:
  """``(run id, table label, kind, kwargs)`` for every run of a stream, in table order."""
  s = cfg[stream]
  lambdas = s.ewc_lambdas if isinstance(s.ewc_lambdas, (tuple, list)) else (s.ewc_lambdas,)
  lambdas = sorted(float(x) for x in lambdas)
  out = []
  for kind in METHODS:
    if kind not in methods:
      continue
    if kind in ("ewc", "ewc_online"):
      mode = "separate" if kind == "ewc" else "online"
      for lam in lambdas:
        label = f"EWC {mode} λ={lam:g}" + (f" γ={cfg.ewc.gamma:g}" if mode == "online" else "")
        out.append((f"{kind}_lam{lam:g}", label, kind, {"ewc_lambda": lam, "mode": mode}))
    elif kind == "ewc_detect":
      lam = float(s.ewc_detect_lambda)
      out.append((f"ewc_detect_lam{lam:g}", f"EWC + detector λ={lam:g}", kind, {"ewc_lambda": lam}))
    else:
      out.append((kind, {"naive": "naive", "replay": f"replay ({cfg.replay.capacity} ex.)", "gpm": "GPM",
                         "slca": "SLCA"}[kind], kind, {}))
  return out


def _build(kind: str, label: str, kwargs: dict, common: methods_lib.Common, cfg, stream: str,
           num_tasks: int, num_classes: int) -> methods_lib.Learner:
  m = methods_lib
  if kind == "naive":
    return m.Learner(common, label)
  if kind == "replay":
    return m.ReplayLearner(common, label, capacity=cfg.replay.capacity, replay_batch=cfg.replay.batch_size)
  if kind in ("ewc", "ewc_online"):
    return m.EWCLearner(common, label, ewc_lambda=kwargs["ewc_lambda"], mode=kwargs["mode"],
                        gamma=float(cfg.ewc.gamma), fisher_examples=cfg.ewc.fisher_examples)
  if kind == "ewc_detect":
    d = cfg.detector
    return m.EWCDetectLearner(common, label, ewc_lambda=kwargs["ewc_lambda"],
                              fisher_examples=cfg.ewc.fisher_examples, reference_window=d.reference_window,
                              test_window=d.test_window, threshold=float(d.threshold),
                              fisher_batches=d.fisher_batches)
  if kind == "gpm":
    g = cfg.gpm
    return m.GPMLearner(common, label, project_head=stream == "permuted", examples=g.examples,
                        threshold_base=float(g.threshold_base), threshold_increment=float(g.threshold_increment))
  if kind == "slca":
    s = cfg.slca
    groups = None if stream == "permuted" else np.arange(num_classes) // cfg.split.classes_per_task
    return m.SLCALearner(common, label, num_tasks=num_tasks, per_task_stats=stream == "permuted",
                         logit_groups=groups, backbone_scale=float(s.backbone_scale),
                         samples_per_class=s.samples_per_class, align_epochs=s.align_epochs,
                         align_learning_rate=float(s.align_learning_rate),
                         align_momentum=float(s.align_momentum), align_batch_size=s.align_batch_size,
                         tau=float(s.tau))
  raise ValueError(f"unknown method {kind!r}")


# --- evaluation ------------------------------------------------------------------------------------

def _evaluate(eval_step, state, sets: list[tuple[data_lib.ArrayDataset, np.ndarray]], batch_size: int,
              mesh) -> dict[str, np.ndarray]:
  """Per test set: accuracy with the set's logit mask (``task``) and over all classes (``all``); summed
  per-class counts over all sets (``class_correct``, ``class_count``)."""
  sums = []
  for ds, mask in sets:
    parts = []
    for batch in data_lib.epoch_batches(ds, batch_size):
      batch["logit_mask"] = np.broadcast_to(mask, (batch_size, mask.shape[0]))
      parts.append(eval_step(state, step_lib.shard_batch(batch, mesh)))
    sums.append(parts)
  sums = jax.device_get(sums)
  total = lambda parts, k: np.sum([np.asarray(p[k], np.float64) for p in parts], axis=0)
  count = np.array([total(p, "count") for p in sums])
  return {"task": np.array([total(p, "correct_task") for p in sums]) / count,
          "all": np.array([total(p, "correct_all") for p in sums]) / count,
          "class_correct": np.sum([total(p, "class_correct") for p in sums], axis=0),
          "class_count": np.sum([total(p, "class_count") for p in sums], axis=0)}


# --- one run ---------------------------------------------------------------------------------------

def _loader_seed(seed: int, t: int, salt: int) -> int:
  return int(np.random.SeedSequence((seed, t, salt)).generate_state(1)[0])


def _train_task(learner, state, task, t: int, seed: int, epochs: int, cfg, mesh, log: dict, salt: int):
  ds = task.train.materialize()
  loader = data_lib.loader_init(_loader_seed(seed, t, salt))
  steps = _steps(len(ds.labels), epochs, cfg.batch_size)
  task_key = jax.random.fold_in(jax.random.key(seed), t) if learner.needs_key else None
  out = None
  for s in range(steps):
    local, loader = data_lib.next_batch(ds, loader, cfg.batch_size)
    batch = methods_lib.task_batch(local["image"], local["label"], task.logit_mask)
    key = jax.random.fold_in(task_key, s) if task_key is not None else None
    batch = learner.prepare(state, batch, key)
    state, out = learner.step(state, step_lib.shard_batch(batch, mesh))
    state = learner.after_step(state, batch, log)
  metrics = jax.device_get(out.metrics)
  return state, steps, {k: float(v) for k, v in metrics.items()}


def _run_path(workdir: str, *parts: str) -> str:
  return os.path.join(workdir, *parts)


def _load_result(path: str, fingerprint: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  if result.get("fingerprint") != fingerprint:
    raise train.ConfigError(f"{path} was written with a different config; use a new --workdir")
  return result


def _copy(meta: dict) -> dict:
  """A deep copy of the JSON meta for an asynchronous save (the loop keeps appending to ``meta``)."""
  return json.loads(json.dumps(meta))


def _save_result(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, path)


def _run_stream(learner, stream: str, tasks, seed: int, cfg, mesh, eval_step, workdir: str, run_id: str,
                fingerprint: str) -> dict:
  """Trains ``learner`` on ``tasks`` in order; returns the run's result (cached in workdir/runs)."""
  result_path = _run_path(workdir, "runs", stream, run_id, f"seed{seed}.json")
  cached = _load_result(result_path, fingerprint)
  if cached is not None:
    return cached
  started = time.perf_counter()
  num = len(tasks)
  test_sets = [(task.test.materialize(), task.logit_mask) for task in tasks]
  epochs = cfg[stream].epochs_per_task
  state = learner.init_state(seed)
  checkpointer = ckpt_lib.Checkpointer(_run_path(workdir, "checkpoints", stream, run_id, f"seed{seed}"),
                                       max_to_keep=1)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    if meta.get("fingerprint") != fingerprint:
      raise train.ConfigError(f"checkpoints of {stream}/{run_id} were written with a different config; "
                              "use a new --workdir")
  else:
    first = _evaluate(eval_step, state, test_sets, cfg.eval_batch_size, mesh)
    meta = {"fingerprint": fingerprint, "tasks_done": 0, "R": [], "R_class": [],
            "initial": first["task"].tolist(), "initial_class": first["all"].tolist(), "train": [],
            "steps": 0, "seconds": 0.0, "log": {}}
  log = meta["log"]
  try:
    for t in range(meta["tasks_done"], num):
      state, steps, last = _train_task(learner, state, tasks[t], t, seed, epochs, cfg, mesh, log, salt=0)
      # Boundary transitions run on host copies (one device), then the state is replicated again: on a
      # multi-device mesh, SPMD versions of the small linear algebra there (cholesky) can stall on CPU.
      state = learner.end_task(jax.device_get(state), tasks[t], t, seed, log)
      state = step_lib.replicate(jax.device_get(state), mesh)
      row = _evaluate(eval_step, state, test_sets, cfg.eval_batch_size, mesh)
      meta["R"].append(row["task"].tolist())
      meta["R_class"].append(row["all"].tolist())
      meta["train"].append(last)
      meta["steps"] += steps
      meta["tasks_done"] = t + 1
      meta["seconds"] = meta["seconds"] + time.perf_counter() - started
      started = time.perf_counter()
      checkpointer.save(t + 1, state, _copy(meta), force=True)
  finally:
    checkpointer.close()   # waits for the last (async) save
  r, r_class = np.asarray(meta["R"]), np.asarray(meta["R_class"])
  result = {**meta, "stream": stream, "run_id": run_id, "label": learner.label, "kind": learner.kind,
            "seed": seed, "metrics": _metrics(r, r_class, np.asarray(meta["initial"]))}
  _save_result(result_path, result)
  return result


def _metrics(r: np.ndarray, r_class: np.ndarray, initial: np.ndarray) -> dict[str, float]:
  return {"avg_acc": float(cl_metrics.average_accuracy(r)), "forgetting": float(cl_metrics.forgetting(r)),
          "bwt": float(cl_metrics.backward_transfer(r)), "fwt": float(cl_metrics.forward_transfer(r, initial)),
          "avg_acc_class_il": float(cl_metrics.average_accuracy(r_class))}


def _run_scole(learner, train_ds, test_ds, seed: int, cfg, mesh, eval_step, workdir: str,
               fingerprint: str) -> dict:
  """Naive SGD over ``scole.num_tasks`` SCoLe tasks; accuracy over all classes after every task."""
  result_path = _run_path(workdir, "runs", "scole", f"seed{seed}.json")
  cached = _load_result(result_path, fingerprint)
  if cached is not None:
    return cached
  started = time.perf_counter()
  sc = cfg.scole
  c = train_ds.num_classes
  test_set = [(test_ds, np.ones((c,), bool))]
  state = learner.init_state(seed)
  checkpointer = ckpt_lib.Checkpointer(_run_path(workdir, "checkpoints", "scole", f"seed{seed}"),
                                       max_to_keep=1)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    if meta.get("fingerprint") != fingerprint:
      raise train.ConfigError("SCoLe checkpoints were written with a different config; use a new --workdir")
  else:
    first = _evaluate(eval_step, state, test_set, cfg.eval_batch_size, mesh)
    meta = {"fingerprint": fingerprint, "tasks_done": 0, "initial_accuracy": float(first["all"][0]),
            "accuracy": [], "class_accuracy": [], "classes": [], "train_loss": [], "steps": 0,
            "seconds": 0.0, "log": {}}
  cls_cfg = {"classes_per_task": sc.classes_per_task, "seed": seed, "skew": float(sc.skew)}
  try:
    for t in range(meta["tasks_done"], sc.num_tasks):
      task = streams_lib.scole_task(train_ds, test_ds, t, **cls_cfg)
      state, steps, last = _train_task(learner, state, task, t, seed, sc.epochs_per_task, cfg, mesh,
                                       meta["log"], salt=1)
      row = _evaluate(eval_step, state, test_set, cfg.eval_batch_size, mesh)
      meta["accuracy"].append(float(row["all"][0]))
      meta["class_accuracy"].append((row["class_correct"] / np.maximum(row["class_count"], 1)).tolist())
      meta["classes"].append(list(task.classes))
      meta["train_loss"].append(last["loss"])
      meta["steps"] += steps
      meta["tasks_done"] = t + 1
      if (t + 1) % sc.checkpoint_every_tasks == 0 or t + 1 == sc.num_tasks:
        meta["seconds"] = meta["seconds"] + time.perf_counter() - started
        started = time.perf_counter()
        checkpointer.save(t + 1, state, _copy(meta), force=True)
  finally:
    checkpointer.close()
  result = {**meta, "seed": seed}
  _save_result(result_path, result)
  return result


# --- the experiment --------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every (stream, method, seed) and SCoLe, then writes results.md/json and the plots."""
  validate(config, workdir)
  cfg = config
  streams = _names(cfg.streams, "streams")
  methods = _names(cfg.methods, "methods")
  train_ds, test_ds = train.load_splits(cfg)
  _check_data(cfg, train_ds, streams, methods)
  fingerprint = _fingerprint(cfg)
  started = time.perf_counter()

  mesh = step_lib.data_mesh()
  image_shape = tuple(int(d) for d in train_ds.images.shape[1:])
  try:
    template = models.make_model(cfg.model, input_shape=image_shape, num_classes=train_ds.num_classes,
                                 seed=cfg.seed, **dict(cfg.model_kwargs))
  except (ValueError, TypeError) as e:
    raise train.ConfigError(f"model_kwargs: {e}") from None
  net = models.functional(template)

  def init_params(seed: int):
    f = models.functional(models.make_model(cfg.model, input_shape=image_shape,
                                            num_classes=train_ds.num_classes, seed=seed,
                                            **dict(cfg.model_kwargs)))
    return jax.device_get(f.params), jax.device_get(f.model_state)

  common = methods_lib.Common(apply=net.apply, init_params=init_params, mesh=mesh,
                              num_classes=train_ds.num_classes, learning_rate=float(cfg.learning_rate),
                              momentum=float(cfg.momentum), batch_size=cfg.batch_size, image_shape=image_shape)
  eval_step = step_lib.make_eval_step(methods_lib.masked_eval(net.apply), mesh=mesh)
  seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
  naive = None
  results: dict[str, Any] = {"streams": {}, "scole": {}}
  for stream in streams:
    tasks_by_seed = {seed: _tasks(stream, cfg, train_ds, test_ds, seed) for seed in seeds}
    num_tasks = len(tasks_by_seed[seeds[0]])
    runs = results["streams"].setdefault(stream, {})
    for run_id, label, kind, kwargs in _specs(stream, cfg, methods):
      if kind == "naive":
        naive = naive or _build(kind, label, kwargs, common, cfg, stream, num_tasks, train_ds.num_classes)
        learner = naive
      else:
        learner = _build(kind, label, kwargs, common, cfg, stream, num_tasks, train_ds.num_classes)
      for seed in seeds:
        result = _run_stream(learner, stream, tasks_by_seed[seed], seed, cfg, mesh, eval_step, workdir,
                             run_id, fingerprint)
        runs.setdefault(run_id, {"label": label, "kind": kind, "seeds": {}})["seeds"][str(seed)] = result
        if cfg.progress:
          m = result["metrics"]
          print(f"continual: {stream:8s} {label:28s} seed {seed}: avg acc {m['avg_acc']:.3f}  forgetting "
                f"{m['forgetting']:.3f}  bwt {m['bwt']:+.3f}  fwt {m['fwt']:+.3f}  ({result['seconds']:.1f} s)",
                flush=True)
  if cfg.scole.enabled:
    naive = naive or _build("naive", "naive", {}, common, cfg, "scole", 0, train_ds.num_classes)
    for seed in seeds:
      result = _run_scole(naive, train_ds, test_ds, seed, cfg, mesh, eval_step, workdir, fingerprint)
      results["scole"][str(seed)] = result
      if cfg.progress:
        acc = result["accuracy"]
        print(f"continual: scole seed {seed}: accuracy over all classes after task 1 {acc[0]:.3f}, "
              f"after task {len(acc)} {acc[-1]:.3f}  ({result['seconds']:.1f} s)", flush=True)
  results["config"] = cfg.to_dict()
  results["seconds_this_run"] = time.perf_counter() - started
  summary = report_lib.write_all(workdir, results)
  summary["seconds"] = results["seconds_this_run"]
  return summary
