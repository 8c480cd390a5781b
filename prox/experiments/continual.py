"""Experiment ``continual``: task streams on digits, seven continual-learning methods, and SCoLe.

For every stream, method and seed, a model is trained on the tasks in order by ``prox.loop.run`` over a
``TaskSource`` (the batch that ends a task has ``boundary="task"``) and evaluated on every task's test set
at every task boundary: the accuracy matrix ``R[i, j]`` (after task ``i``, on task ``j``), from which
``prox.tasks.cl_metrics`` gives average accuracy, forgetting, BWT and FWT (FWT against the untrained
model). Streams:

* ``permuted``: 10 tasks of all ten classes under a seeded pixel permutation; domain-incremental, one head;
* ``split``: 5 tasks of 2 classes, task-incremental: logits masked to the task's classes in training and
  test (``R``), the unmasked (class-incremental) accuracy of the same model beside it (``R_class``);
* ``split_class``: the same tasks, class-incremental: one shared head, no mask in training or test.

A method is a plain function of the library's parts giving ``(tx, loss, transition, extra, end_task)`` (and,
where the trained parameters or the prediction are not the model's own, ``params`` and ``evaluate``):

* ``naive``: SGD.
* ``replay``: a reservoir memory (``prox.tasks.replay``) in ``TrainState.extra``, offered every training
  batch by the step's transition; the loss mixes ``replay.batch_size`` memory examples into every batch
  (``replay_mix``: one draw per step, so every device layout trains alike).
* ``ewc`` / ``ewc_online``: ``chain(ewc, sgd)`` (``prox.transforms.ewc``); at the end of a task the
  per-example Fisher of its examples is consolidated (a jitted boundary action), and ``ewc_lambda_range``
  of the accumulated Fisher against the next task's curvature is recorded.
* ``ewc_detect``: EWC whose consolidation happens INSIDE the step under ``lax.cond`` when the loss-shift
  detector (``prox.tasks.shift_detector``, in ``extra``) fires, with the Fisher of the oldest
  ``detector.fisher_batches`` of the last ``test_window + fisher_batches`` batches (a ring in ``extra``):
  the task boundaries are not used.
* ``gpm``: ``chain(sgd, gpm, zero biases)``; the bases grow at each task boundary from the layer inputs
  (``prox.models.mlp_layer_inputs``); the head is projected when it is shared (not for ``split``).
* ``slca``: slow learner (backbone updates x ``backbone_scale``); at each boundary the class statistics
  (in ``extra``) and the jitted classifier alignment (``prox.tasks.slca.align_classifier``).

Methods built on the library's newer parts (plain functions too):

* ``mas``: MAS (``prox.transforms.mas``): EWC's online quadratic with the unsupervised importance
  ``Omega = mean |grad ||F(x)||^2|`` summed over tasks; no memory; every stream.
* ``mir``: ER-MIR (``prox.tasks.mir_retrieve`` in the loss): replay's reservoir and ``replay.batch_size``
  rows per step, the most interfered of ``mir.candidates`` draws; every stream.
* ``cuber``: CUBER (``prox.transforms.cuber``) on GPM's bases: old tasks' subspaces reopen where the next
  task's gradient is aligned with theirs; every stream (head as GPM's); MLP only, as GPM.
* ``protocl``: ProtoCL (``prox.tasks.bayesian_prototypes``): conjugate Gaussian class prototypes on the
  last hidden layer in ``extra``, absorbed by the step's transition; replay's reservoir; every stream
  (``split`` masks the posterior to the task's classes); MLP only (it reads the last hidden layer).
* ``wsn``: WSN (``prox.transforms.task_masks``): a top-``density`` subnetwork per task, earlier tasks'
  weights frozen, each task scored with its own stored mask; ``split`` only (task identity at test time).
* ``tame``: TAME (``prox.tasks.tame``): one expert trained at a time, a new one spawned when the shift
  detector flags a switch (no task boundaries), a selector trained on replay's reservoir (examples tagged
  with their expert) routes each test input; every stream.
* ``onpro``: OnPro (``prox.losses.onpro_equilibrium_loss``, ``prox.tasks.prototype_feedback``): projection
  head, prototype equilibrium on two views, feedback-sampled mixup replay from replay's reservoir; every
  stream (``split``: a mixed row answers to the union of its two examples' heads); MLP only.

The memory methods keep exactly ``replay``'s budget: ``replay.capacity`` stored examples and
``replay.batch_size`` replayed rows per step. Effects fixed before the new methods ran (tested in
``results.md`` by seed-paired comparisons, ``report.paired_comparison``): (1) on class-incremental split
digits some new method's average accuracy is above replay's at the same memory; (2) CUBER's BWT is above
GPM's (it may update inside the old tasks' subspaces only where that lowers their loss to first order).

SCoLe: naive SGD over hundreds of 2-class tasks with reoccurring classes and masked absent logits, the
accuracy over all classes after every task, on the same loop.

Every run (stream, method, seed) has its directory ``workdir/runs/<stream>/<run>/seed<k>/`` (its config
record, ``checkpoints/`` written at every task boundary, ``result.json``): a restarted experiment skips
finished runs and resumes the others exactly where their last task ended. Outputs in ``workdir``:
``results.md``, ``results.json``, ``heatmap_<stream>.png``, ``accuracy_<stream>.png``,
``scole_accuracy.png``.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from prox import loop
from prox import models
from prox import step as step_lib
from prox.experiments import common
from prox.experiments import _continual_report as report_lib
from prox.losses import classification_loss, mask_logits, mixup_cross_entropy, online_prototypes
from prox.losses import onpro_equilibrium_loss
from prox.optim import slow_learner
from prox.tasks import TaskSource
from prox.tasks import bayesian_prototypes as prototypes_lib
from prox.tasks import mir_retrieve, mixup_inputs, prototype_feedback, routed_apply
from prox.tasks import tame as tame_lib
from prox.tasks import cl_metrics
from prox.tasks import data as data_lib
from prox.tasks import replay as replay_lib
from prox.tasks import shift_detector as detector_lib
from prox.tasks import slca as slca_lib
from prox.tasks import streams as streams_lib

from prox.transforms import ewc as ewc_lib  # noqa: E402  (the modules, not the factories)
from prox.transforms import gpm as gpm_lib  # noqa: E402
from prox.transforms import cuber as cuber_tx, cuber_correlation, cuber_update_bases, find_cuber_state  # noqa: E402
from prox.transforms import mas as mas_tx, mas_importance, replace_cuber_state  # noqa: E402
from prox.transforms import find_task_mask_state, mask_bytes, task_masks  # noqa: E402

PyTree = Any

STREAMS = ("permuted", "split", "split_class")
METHODS = ("naive", "replay", "ewc", "ewc_online", "gpm", "slca", "ewc_detect", "mas", "mir", "cuber", "protocl",
           "onpro", "wsn", "tame")

# ``--config.quick=True``: a tiny run of every method and stream (tests, smoke checks).
QUICK = {
    "methods": ",".join(METHODS),
    "num_seeds": 1,
    "learning_rate": 0.05,
    "model_kwargs.hidden": (32, 32),
    "permuted.num_tasks": 3,
    "permuted.epochs_per_task": 1,
    "permuted.ewc_lambdas": (10.0,),
    "split.epochs_per_task": 2,
    "split.ewc_lambdas": (100.0,),
    "split.ewc_detect_lambda": 100.0,
    "split_class.epochs_per_task": 2,
    "split_class.ewc_lambdas": (10.0,),
    "split_class.ewc_detect_lambda": 10.0,
    "split_class.mas_lambda": 0.1,   # at the quick learning rate lambda = 1 passes SGD's stability bound
    "ewc.fisher_examples": 64,
    "gpm.examples": 32,
    "slca.samples_per_class": 32,
    "slca.align_epochs": 1,
    "mas.examples": 64,
    "mir.candidates": 64,
    "cuber.examples": 32,
    "detector.reference_window": 8,
    "detector.test_window": 2,
    "detector.fisher_batches": 2,
    "scole.num_tasks": 6,
}

# Fields that only select which runs happen: they may change when the experiment resumes.
# ``wsn.*`` and ``tame.*`` joined after runs of the other methods existed; each run records its own config anyway.
RESUMABLE = ("num_seeds", "streams", "methods", "scole.enabled", "wsn.density", "tame.max_experts",
             "tame.selector_hidden") + tuple(
    f"{s}.{f}" for s in STREAMS for f in ("ewc_lambdas", "ewc_detect_lambda"))

_SWITCH_LOG = 64   # detected switches whose steps ewc_detect keeps (more are counted, not located)


# --- config ------------------------------------------------------------------------------------------

def _lambdas(config: ml_collections.ConfigDict, stream: str) -> list[float]:
  value = config[stream].ewc_lambdas
  return sorted(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the experiment uses (before anything compiles); raises ``ConfigError``."""
  cfg = config
  streams = _names(cfg, "streams", STREAMS)
  methods = _names(cfg, "methods", METHODS)
  common.require(bool(streams and methods) or cfg.scole.enabled,
                 "nothing to run: streams or methods is empty and scole.enabled is False")
  common.check_data(cfg)
  common.check_model(cfg)
  common.require(cfg.model in ("mlp", "cnn"),
                 f"continual supports models without batch statistics (mlp, cnn), got {cfg.model!r}")
  for m in ("gpm", "slca", "cuber", "protocl", "onpro"):
    common.require(m not in methods or cfg.model == "mlp",
                   f"method {m!r} reads the dense layers' inputs and needs model 'mlp', got {cfg.model!r}")
  common.require(common.is_int(cfg.seed) and 0 <= cfg.seed < 2**31,
                 f"seed must be an int in [0, 2**31), got {cfg.seed!r}")
  common.positive_ints(cfg, "num_seeds", "permuted.num_tasks", "permuted.epochs_per_task",
                       "split.classes_per_task", "split.epochs_per_task", "split_class.classes_per_task",
                       "split_class.epochs_per_task", "ewc.fisher_examples", "replay.capacity",
                       "replay.batch_size", "gpm.examples", "slca.samples_per_class", "slca.align_epochs",
                       "slca.align_batch_size", "detector.fisher_batches", "mas.examples", "mir.candidates",
                       "cuber.examples", "scole.num_tasks",
                       "scole.classes_per_task", "scole.epochs_per_task")
  common.require(cfg.permuted.num_tasks >= 2, f"permuted.num_tasks must be >= 2, got {cfg.permuted.num_tasks}")
  common.numbers(cfg, "learning_rate", "slca.align_learning_rate", "slca.tau", low=0, low_open=True)
  common.numbers(cfg, "momentum", "slca.align_momentum", low=0, high=1, high_open=True)
  common.numbers(cfg, "gpm.threshold_base", low=0, high=1, low_open=True)
  common.numbers(cfg, "gpm.threshold_increment", "scole.skew", low=0)
  common.require(cfg.replay.batch_size <= cfg.replay.capacity,
                 f"replay.batch_size {cfg.replay.batch_size} exceeds replay.capacity {cfg.replay.capacity}")
  for stream in STREAMS:
    lambdas = cfg[stream].ewc_lambdas
    lambdas = (lambdas,) if isinstance(lambdas, (int, float)) else lambdas
    common.require(isinstance(lambdas, (tuple, list)) and len(lambdas) > 0,
                   f"{stream}.ewc_lambdas must be a non-empty tuple of numbers, got {lambdas!r}")
    checks = [(f"{stream}.ewc_lambdas", lam) for lam in lambdas]
    checks.append((f"{stream}.ewc_detect_lambda", cfg[stream].ewc_detect_lambda))
    for field, lam in checks:
      common.require(common.is_number(lam), f"{field}: ewc_lambda must be a finite number >= 0, got {lam!r}")
      common.library_check(field, ewc_lib.ewc, float(lam))
  common.numbers(cfg, "ewc.gamma")
  for stream in STREAMS:
    common.numbers(cfg, f"{stream}.mas_lambda", low=0)
    common.library_check(f"{stream}.mas_lambda", mas_tx, float(cfg[stream].mas_lambda))
  common.require(cfg.replay.batch_size <= cfg.mir.candidates <= cfg.replay.capacity,
                 f"mir.candidates {cfg.mir.candidates} must lie in [replay.batch_size, replay.capacity] = "
                 f"[{cfg.replay.batch_size}, {cfg.replay.capacity}] (MIR keeps replay.batch_size of them)")
  common.library_check("protocl", prototypes_lib, 2, 1, noise_variance=cfg.protocl.noise_variance,
                       prior_variance=cfg.protocl.prior_variance, dirichlet=cfg.protocl.dirichlet)
  common.positive_ints(cfg, "onpro.projection_dim", "tame.max_experts", "tame.selector_hidden")
  common.library_check("wsn.density", task_masks, optax.sgd(1.0), density=float(cfg.wsn.density), max_tasks=1)
  common.numbers(cfg, "onpro.temperature", low=0, low_open=True)
  common.numbers(cfg, "onpro.drop", low=0, high=1, high_open=True)
  common.library_check("onpro", prototype_feedback, 2, base_rate=float(cfg.onpro.base_rate),
                       mixup_p=float(cfg.onpro.mixup_p))
  common.numbers(cfg, "cuber.projection_threshold", "cuber.backward_scale", low=0, high=1)
  common.library_check("cuber.backward_scale", cuber_tx, max_tasks=1, backward_scale=float(cfg.cuber.backward_scale))
  common.library_check("ewc.gamma", ewc_lib.ewc, 1.0, mode="online", gamma=float(cfg.ewc.gamma))
  common.library_check("slca.backbone_scale", slow_learner, optax.sgd(1.0), cfg.slca.backbone_scale,
                       {"head": False, "hidden": True})
  common.library_check("detector", detector_lib.shift_detector, cfg.detector.reference_window,
                       cfg.detector.test_window, cfg.detector.threshold)
  common.require(jax.process_count() == 1, "continual runs in one process (any number of local devices)")
  common.check_batch("batch_size", cfg.batch_size)
  common.check_batch("eval_batch_size", cfg.eval_batch_size)
  common.check_batch("replay.batch_size", cfg.replay.batch_size)   # each device mixes its share in
  if workdir is not None:
    common.check_workdir(workdir)


def _names(cfg: ml_collections.ConfigDict, field: str, options: tuple[str, ...]) -> list[str]:
  value = cfg[field]
  common.require(isinstance(value, str), f"{field} must be a comma-separated string, got {value!r}")
  out = [v.strip() for v in value.split(",") if v.strip()]
  for v in out:
    common.require(v in options, f"unknown {field[:-1]} {v!r}; known: {', '.join(options)}")
  return out


def _steps(n: int, epochs: int, batch_size: int) -> int:
  return max(1, math.ceil(epochs * n / batch_size))


def _check_data(cfg: ml_collections.ConfigDict, train_ds: data_lib.ArrayDataset, streams: list[str],
                methods: list[str]) -> None:
  """The checks that need the data (class counts, task lengths); still before anything compiles."""
  c = train_ds.num_classes
  for stream in streams:
    if stream != "permuted":
      k = cfg[stream].classes_per_task
      common.require(c % k == 0 and c // k >= 2,
                     f"{stream}.classes_per_task {k} must divide the {c} classes into at least 2 tasks")
  if cfg.scole.enabled:
    common.require(cfg.scole.classes_per_task <= c,
                   f"scole.classes_per_task {cfg.scole.classes_per_task} exceeds the {c} classes")
  if "ewc_detect" in methods:
    window = cfg.detector.reference_window + cfg.detector.test_window
    for stream in streams:
      steps = min(_steps(len(t.train), cfg[stream].epochs_per_task, cfg.batch_size)
                  for t in _tasks(stream, cfg, train_ds, train_ds, cfg.seed))
      common.require(window < steps, f"detector windows reference_window + test_window = {window} must be "
                     f"below the {steps} steps of a {stream} task, or no switch can be detected")


# --- streams -------------------------------------------------------------------------------------------

def _tasks(stream: str, cfg, train_ds, test_ds, seed: int) -> list[streams_lib.Task]:
  if stream == "permuted":
    return streams_lib.permuted_tasks(train_ds, test_ds, cfg.permuted.num_tasks, seed)
  return streams_lib.split_tasks(train_ds, test_ds, cfg[stream].classes_per_task)


class Setting(NamedTuple):
  """How a stream is trained and scored."""
  masked: bool         # task-incremental: each task's logits masked to its classes (training and R)
  shared_head: bool    # one head for all tasks (GPM projects it)
  per_task_stats: bool  # SLCA: classes reoccur in every task, statistics per (task, class)
  groups: int          # SLCA's logit groups: classes per group (0: one group)


def _setting(stream: str, cfg) -> Setting:
  if stream == "permuted":
    return Setting(masked=False, shared_head=True, per_task_stats=True, groups=0)
  k = cfg[stream].classes_per_task
  return Setting(masked=stream == "split", shared_head=stream == "split_class", per_task_stats=False,
                 groups=k)


class Env(NamedTuple):
  """What every run of one experiment invocation shares (so each jitted piece compiles once)."""
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  apply: Callable
  init_params: Callable[[int], PyTree]
  image_shape: tuple[int, ...]
  num_classes: int
  evaluate: Callable
  logprob: Callable           # log p(y | x) of one example, for the Fisher (one object: one compile)


def _logprob(apply: Callable) -> Callable:
  def logprob(params, example):
    logits = apply(params, {}, example["image"][None], train=False)[0][0]
    if "logit_mask" in example:
      logits = mask_logits(logits, example["logit_mask"])
    return jax.nn.log_softmax(logits)[example["label"]]
  return logprob


class Spec(NamedTuple):
  """One row of a stream's table: a method with its options."""
  run_id: str
  label: str
  kind: str
  options: dict


def _specs(stream: str, cfg, methods: list[str]) -> list[Spec]:
  out = []
  for kind in METHODS:
    if kind not in methods:
      continue
    if kind in ("ewc", "ewc_online"):
      mode = "separate" if kind == "ewc" else "online"
      for lam in _lambdas(cfg, stream):
        label = f"EWC {mode} λ={lam:g}" + (f" γ={cfg.ewc.gamma:g}" if mode == "online" else "")
        out.append(Spec(f"{kind}_lam{lam:g}", label, kind, {"ewc_lambda": lam, "mode": mode}))
    elif kind == "wsn" and stream != "split":
      continue      # a task's subnetwork needs the task's identity at test time: task-incremental only
    elif kind == "ewc_detect":
      lam = float(cfg[stream].ewc_detect_lambda)
      out.append(Spec(f"ewc_detect_lam{lam:g}", f"EWC + detector λ={lam:g}", kind, {"ewc_lambda": lam}))
    else:
      label = {"naive": "naive", "replay": f"replay ({cfg.replay.capacity} ex.)", "gpm": "GPM",
               "slca": "SLCA", "mas": f"MAS λ={float(cfg[stream].mas_lambda):g}",
               "mir": f"MIR ({cfg.replay.capacity} ex.)", "cuber": "CUBER",
               "protocl": f"ProtoCL ({cfg.replay.capacity} ex.)", "onpro": f"OnPro ({cfg.replay.capacity} ex.)",
               "wsn": f"WSN (density {float(cfg.wsn.density):g})",
               "tame": f"TAME ({cfg.replay.capacity} ex.)"}[kind]
      options = {"mas_lambda": float(cfg[stream].mas_lambda)} if kind == "mas" else {}
      out.append(Spec(kind, label, kind, options))
  return out


# --- methods: plain functions of the library's parts ------------------------------------------------------

class Method(NamedTuple):
  """What a method adds to plain SGD training (see the module docstring).

  ``end_task(state, t, run, log) -> state`` is the action at the end of task ``t`` (before the task's
  evaluation); it may write what it measured into the run's ``log`` (a JSON dict in the checkpointed
  record)."""
  tx: optax.GradientTransformation
  loss: step_lib.LossFn
  transition: step_lib.Transition | None
  extra: Callable[[PyTree, int], PyTree]              # (params, seed) -> initial TrainState.extra
  end_task: Callable[..., step_lib.TrainState] | None
  skip_nonfinite: bool = False    # skip (and count) non-finite steps instead of stopping the run
  evaluate: Callable | None = None  # (state, ds, batch_size, task, **fields) -> dict; None: the model's logits
  params: Callable[[PyTree, int], PyTree] | None = None   # (model params, seed) -> the trained params


class Run(NamedTuple):
  """One seed of a stream: its tasks and their training sets (for the boundary actions)."""
  seed: int
  tasks: list[streams_lib.Task]
  train_sets: list[data_lib.ArrayDataset]


def _sgd(cfg) -> optax.GradientTransformation:
  return optax.sgd(float(cfg.learning_rate), momentum=float(cfg.momentum) or None)


def _subset(n: int, size: int, seed: int, t: int, salt: int) -> np.ndarray:
  """``min(size, n)`` distinct positions out of ``n``, seeded by (seed, task, salt)."""
  return np.sort(np.random.default_rng((seed, t, salt)).permutation(n)[:min(size, n)])


def _examples(run: Run, t: int, idx: np.ndarray | slice, setting: Setting) -> dict[str, np.ndarray]:
  ds = run.train_sets[t]
  out = {"image": ds.images[idx], "label": ds.labels[idx]}
  if setting.masked:
    mask = run.tasks[t].logit_mask
    out["logit_mask"] = np.broadcast_to(mask, (len(out["label"]), mask.shape[0]))
  return out


def _fields(setting: Setting) -> tuple[str, ...]:
  return ("image", "label", "logit_mask") if setting.masked else ("image", "label")


def naive(env: Env, setting: Setting, spec: Spec) -> Method:
  """Fine-tuning: SGD on each task in turn."""
  del setting, spec
  return Method(_sgd(env.cfg), classification_loss(env.apply), None, lambda params, seed: {}, None)


class _Reservoir(NamedTuple):
  """The reservoir memory that ``replay`` and ``mir`` share: its transition, initial ``extra`` and log."""
  offer: step_lib.Transition
  extra: Callable[[PyTree, int], PyTree]
  end_task: Callable[..., step_lib.TrainState]


def _reservoir(env: Env, setting: Setting) -> _Reservoir:
  """A reservoir of ``replay.capacity`` examples in ``extra["replay"]`` (with the key of its draws),
  offered every training batch inside the step (Algorithm R); logs the classes it holds per task."""
  cfg, fields = env.cfg, _fields(setting)

  def offer(state, info: step_lib.StepInfo):
    memory = replay_lib.reservoir_add(state["memory"], {k: info.batch[k] for k in fields}, info.rng,
                                      info.valid)
    return {**state, "memory": memory}

  def extra(params, seed):
    del params
    example = {"image": jax.ShapeDtypeStruct(env.image_shape, jnp.float32),
               "label": jax.ShapeDtypeStruct((), jnp.int32)}
    if setting.masked:
      example["logit_mask"] = jax.ShapeDtypeStruct((env.num_classes,), jnp.bool_)
    key = jax.random.fold_in(jax.random.key(seed), 0x5EED)
    return {"replay": {"memory": replay_lib.reservoir_init(example, int(cfg.replay.capacity)),
                       "key": jax.random.key_data(key)}}

  def end_task(state, t, run, log):
    del t, run
    memory = jax.device_get(state.extra["replay"]["memory"])
    labels = np.asarray(memory.data["label"])[:int(replay_lib.reservoir_size(memory))]
    log.setdefault("memory_classes", []).append(np.bincount(labels, minlength=env.num_classes).tolist())
    log["memory_seen"] = int(memory.seen)
    return state

  return _Reservoir(step_lib.in_extra("replay", offer), extra, end_task)


def _weighted_loss(apply: Callable, setting: Setting, params, model_state, mixed: dict, w: jax.Array):
  logits, model_state = apply(params, model_state, mixed["image"], train=True)
  if setting.masked:
    logits = mask_logits(logits, mixed["logit_mask"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, mixed["label"])
  correct = (jnp.argmax(logits, -1) == mixed["label"]).astype(jnp.float32)
  return jnp.sum(w * ce), ({"accuracy": jnp.sum(w * correct)}, model_state)


def replay(env: Env, setting: Setting, spec: Spec) -> Method:
  """Experience replay with a reservoir memory updated inside the step (Chaudhry et al. 2019, "On Tiny
  Episodic Memories in Continual Learning"): each step trains on the batch and ``m = replay.batch_size``
  memory draws, ``L = (sum_batch l_i + sum_draws v_j l_j) / (B + sum_j v_j)`` (``v_j = 1`` for a stored
  example, 0 while the memory holds fewer than ``m``), then offers the batch to the memory (Algorithm R:
  the memory is a uniform sample of every training example presented so far, epochs included)."""
  del spec
  cfg, apply, fields = env.cfg, env.apply, _fields(setting)
  num, rows = int(cfg.replay.batch_size), int(cfg.batch_size)

  def loss_fn(params, model_state, batch, ctx):
    state = ctx.extra["replay"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), ctx.step)   # one draw per step
    mixed, w = replay_lib.replay_mix(state["memory"], key, {k: batch[k] for k in fields}, num=num,
                                     first_row=batch["row"][0], global_rows=rows)
    return _weighted_loss(apply, setting, params, model_state, mixed, w)

  memory = _reservoir(env, setting)
  return Method(_sgd(cfg), loss_fn, memory.offer, memory.extra, memory.end_task)


def _ewc_tx(env: Env, ewc_lambda: float, mode: str) -> optax.GradientTransformation:
  gamma = float(env.cfg.ewc.gamma) if mode == "online" else 1.0
  return optax.chain(ewc_lib.ewc(ewc_lambda, mode=mode, gamma=gamma), _sgd(env.cfg))


def ewc(env: Env, setting: Setting, spec: Spec) -> Method:
  """Elastic weight consolidation (Kirkpatrick et al. 2017; online mode: Schwarz et al. 2018): the
  gradient gets ``lambda F (w - m)`` (``prox.transforms.ewc``); at the end of task ``t`` the per-example
  diagonal Fisher ``F_t = mean_n (grad log p(y_n | x_n))^2`` of ``ewc.fisher_examples`` of its training
  examples is consolidated with the current weights as anchor. Logged per task: the penalty before the
  consolidation, ``lambda max(F) lr`` (SGD diverges above 2) and the warnings ``consolidate`` issued, and
  ``ewc_lambda_range`` of the accumulated Fisher against the curvature of the next task's loss (its
  Fisher at the anchor): the lambdas that both hold the old weights and keep SGD stable. A lambda beyond
  the stability bound makes SGD diverge: such steps (loss, gradient or weights not finite) are skipped
  and counted, as ``optax.apply_if_finite`` would."""
  cfg = env.cfg
  lr, momentum = float(cfg.learning_rate), float(cfg.momentum)
  limit = ewc_lib.sgd_stability_limit(momentum)
  size = int(cfg.ewc.fisher_examples)

  def fisher(params, run, t):
    idx = _subset(len(run.train_sets[t].labels), size, run.seed, t, 1)
    return ewc_lib.diagonal_fisher(env.logprob, params, _examples(run, t, idx, setting), chunk_size=128)

  def end_task(state, t, run, log):
    params = state.params
    log.setdefault("penalty", []).append(
        float(ewc_lib.ewc_penalty(ewc_lib.find_ewc_state(state.opt_state), params)))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      opt_state = ewc_lib.consolidate_opt_state(state.opt_state, params, fisher(params, run, t),
                                                learning_rate=lr, stability_limit=limit)
    accumulated = ewc_lib.find_ewc_state(opt_state)
    if t + 1 < len(run.tasks):   # the penalty the next tasks train with (the last one's is never used)
      log.setdefault("stability", []).append(float(ewc_lib.ewc_stability(accumulated, lr)))
      log["stability_warnings"] = log.get("stability_warnings", 0) + sum(
          issubclass(w.category, RuntimeWarning) for w in caught)
      curvature = fisher(params, run, t + 1)
      finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((accumulated.fisher, curvature)))
      r = ewc_lib.ewc_lambda_range(accumulated, curvature=curvature, learning_rate=lr, momentum=momentum
                                   ) if finite else None    # not finite: the run diverged
      log.setdefault("lambda_range", []).append([r.low, r.high] if r else [math.nan, math.nan])
    return state._replace(opt_state=opt_state)

  tx = _ewc_tx(env, spec.options["ewc_lambda"], spec.options["mode"])
  return Method(tx, classification_loss(env.apply), None, lambda params, seed: {}, end_task,
                skip_nonfinite=True)


def ewc_detect_transition(detector: detector_lib.ShiftDetector, logprob: Callable, *, fields: tuple[str, ...],
                          fisher_batches: int, learning_rate: float,
                          stability_limit: float) -> step_lib.Transition:
  """EWC consolidated inside the step when the loss-shift detector fires (``state.extra["detect"]``).

  After each update: the step's batch joins the ring of the last ``W + k`` batches (``W`` the detector's
  test window, ``k = fisher_batches``); the detector sees the step's loss; when it flags a switch and the
  ring is full, ``lax.cond`` consolidates every EWC state of ``opt_state`` with the per-example Fisher of
  the ``k`` oldest ring batches (the newest ``W`` may already belong to the new task) at the current
  weights, which become the anchor. Counted in ``extra["detect"]``: consolidations, switches without
  enough batches, the steps (1-based) of the first switches, the largest ``lambda max(F) lr`` and the
  consolidations above ``stability_limit``.
  """

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    ex = state.extra["detect"]
    recent = replay_lib.recent_push(ex["recent"], {f: info.batch[f] for f in fields})
    detector_state, switched = detector.update(ex["detector"], info.loss)
    data, full = replay_lib.recent_oldest(recent, fisher_batches)
    fire = switched & full

    def consolidate(opt_state):
      fisher = ewc_lib.diagonal_fisher(logprob, state.params, data, chunk_size=128)
      return ewc_lib.consolidate_opt_state(opt_state, state.params, fisher)

    opt_state = jax.lax.cond(fire, consolidate, lambda o: o, state.opt_state)
    stability = ewc_lib.ewc_stability(ewc_lib.find_ewc_state(opt_state), learning_rate)
    slot = jnp.where(switched, detector_state.num_switches - 1, _SWITCH_LOG)   # out of range: dropped
    new = {"detector": detector_state, "recent": recent,
           "switch_steps": ex["switch_steps"].at[slot].set(info.step + 1, mode="drop"),
           "consolidations": ex["consolidations"] + fire.astype(jnp.int32),
           "without_data": ex["without_data"] + (switched & ~full).astype(jnp.int32),
           "max_stability": jnp.where(fire, jnp.maximum(ex["max_stability"], stability), ex["max_stability"]),
           "unstable": ex["unstable"] + (fire & (stability > stability_limit)).astype(jnp.int32)}
    return state._replace(opt_state=opt_state, extra={**state.extra, "detect": new})

  return transition


def ewc_detect_extra(detector: detector_lib.ShiftDetector, batch: PyTree, ring: int) -> dict:
  """The initial ``extra`` of :func:`ewc_detect_transition` for batches shaped like ``batch``."""
  return {"detect": {"detector": detector.init(), "recent": replay_lib.recent_init(batch, ring),
                     "switch_steps": jnp.full((_SWITCH_LOG,), -1, jnp.int32),
                     "consolidations": jnp.zeros((), jnp.int32), "without_data": jnp.zeros((), jnp.int32),
                     "max_stability": jnp.zeros((), jnp.float32), "unstable": jnp.zeros((), jnp.int32)}}


def ewc_detect(env: Env, setting: Setting, spec: Spec) -> Method:
  """EWC (separate mode) consolidated when the windowed z-test on the training loss flags a task switch
  (Zhu et al. 2024, "Task-agnostic continual learning with multiple experts" declare switches so), inside
  the step: see :func:`ewc_detect_transition`. The task boundaries are only used for logging."""
  cfg, d = env.cfg, env.cfg.detector
  detector = detector_lib.shift_detector(d.reference_window, d.test_window, float(d.threshold))
  fields = _fields(setting)
  transition = ewc_detect_transition(
      detector, env.logprob, fields=fields, fisher_batches=int(d.fisher_batches),
      learning_rate=float(cfg.learning_rate), stability_limit=ewc_lib.sgd_stability_limit(float(cfg.momentum)))
  b = int(cfg.batch_size)
  batch = {"image": jax.ShapeDtypeStruct((b,) + env.image_shape, jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32),
           "logit_mask": jax.ShapeDtypeStruct((b, env.num_classes), jnp.bool_)}
  batch = {k: batch[k] for k in fields}

  def end_task(state, t, run, log):
    del t, run
    ex = jax.device_get(state.extra["detect"])
    log.setdefault("penalty", []).append(
        float(ewc_lib.ewc_penalty(ewc_lib.find_ewc_state(state.opt_state), state.params)))
    steps = np.asarray(ex["switch_steps"])
    log.update(switch_steps=steps[steps > 0].tolist(), switches=int(ex["detector"].num_switches),
               consolidations=int(ex["consolidations"]), switches_without_data=int(ex["without_data"]),
               max_stability=float(ex["max_stability"]), stability_warnings=int(ex["unstable"]))
    return state

  tx = _ewc_tx(env, spec.options["ewc_lambda"], "separate")
  extra = lambda params, seed: ewc_detect_extra(detector, batch, int(d.test_window + d.fisher_batches))
  return Method(tx, classification_loss(env.apply), transition, extra, end_task, skip_nonfinite=True)


def _keystr(path) -> str:
  return jax.tree_util.keystr(path)


@jax.jit
def _gpm_update(opt_state: PyTree, params: PyTree, images: jax.Array, threshold: jax.Array) -> PyTree:
  inputs = models.mlp_layer_inputs(params, images)
  activations = {"head": {"kernel": inputs["head"], "bias": None},
                 "hidden": {name: {"kernel": inputs[name], "bias": None} for name in params["hidden"]}}
  return gpm_lib.gpm_update_opt_state(opt_state, activations, threshold)


def _projected_kernels(setting: Setting) -> Callable[[Any], Any]:
  """GPM's and CUBER's mask: the 2-D kernels, the head's only where it is shared."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ndim(p) == 2 and (setting.shared_head or not _keystr(path).startswith("['head']")),
      params)


def _biases(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: _keystr(path).endswith("['bias']"), params)


def gpm(env: Env, setting: Setting, spec: Spec) -> Method:
  """Gradient projection memory (Saha, Garg & Roy 2021): ``chain(sgd, gpm(kernels), zero(biases))``;
  the biases stay at their initial values (the reference networks have none); the head's kernel is
  projected when it is shared (a task-incremental head has private columns per task through the masks).
  After task ``t`` each kernel's basis grows with the inputs of ``gpm.examples`` training examples at
  energy threshold ``base + increment t``."""
  del spec
  g = env.cfg.gpm

  kernel_mask, bias_mask = _projected_kernels(setting), _biases

  tx = optax.chain(_sgd(env.cfg), gpm_lib.gpm(kernel_mask), optax.masked(optax.set_to_zero(), bias_mask))

  def end_task(state, t, run, log):
    idx = _subset(len(run.train_sets[t].labels), int(g.examples), run.seed, t, 2)
    threshold = gpm_lib.gpm_threshold(t, float(g.threshold_base), float(g.threshold_increment))
    opt_state = _gpm_update(state.opt_state, state.params, run.train_sets[t].images[idx], threshold)
    ranks = jax.device_get(gpm_lib.find_gpm_state(opt_state).ranks)
    log.setdefault("ranks", []).append(
        {_keystr(path): int(r) for path, r in jax.tree_util.tree_flatten_with_path(ranks)[0]})
    return state._replace(opt_state=opt_state)

  return Method(tx, classification_loss(env.apply), None, lambda params, seed: {}, end_task)


def slca(env: Env, setting: Setting, spec: Spec, *, num_tasks: int, max_examples: int) -> Method:
  """SLCA (Zhang et al. 2023): the backbone's updates scaled by ``slca.backbone_scale``; after task ``t``
  the Gaussian statistics of the head's input per class of the task (per (task, class) where classes
  reoccur in every task, so the alignment sees every task's features), ``samples_per_class`` features per
  seen class from ``N(s_c mu_c, Sigma_c)``, and the head retrained on them (``align_classifier``, logits
  normalised per group of ``classes_per_task`` classes). One jitted function per boundary."""
  del spec
  s, c = env.cfg.slca, env.num_classes
  entries = num_tasks * c if setting.per_task_stats else c
  groups = None if setting.groups == 0 else np.arange(c) // setting.groups
  align_tx = optax.sgd(float(s.align_learning_rate), momentum=float(s.align_momentum) or None)
  tx = slow_learner(_sgd(env.cfg), float(s.backbone_scale), {"head": False, "hidden": True})

  @jax.jit
  def boundary(params, stats, images, labels, valid, classes, t, key):
    features = models.mlp_layer_inputs(params, images)["head"]
    stats = slca_lib.class_stats_update(stats, features, labels, classes, t, valid=valid)
    feats, entry, weights = slca_lib.sample_class_features(stats, jax.random.fold_in(key, 0), t,
                                                           int(s.samples_per_class))
    head, losses = slca_lib.align_classifier(
        params["head"], feats, entry % c, weights, jax.random.fold_in(key, 1), tx=align_tx,
        epochs=int(s.align_epochs), batch_size=int(s.align_batch_size), tau=float(s.tau),
        logit_groups=groups)
    return {**params, "head": head}, stats, losses

  def end_task(state, t, run, log):
    ds = run.train_sets[t]
    n = len(ds.labels)
    pad = max_examples - n
    offset = t * c if setting.per_task_stats else 0
    images = np.concatenate([ds.images, np.zeros((pad,) + ds.images.shape[1:], ds.images.dtype)])
    labels = np.concatenate([ds.labels, np.zeros((pad,), ds.labels.dtype)]) + offset
    valid = np.arange(max_examples) < n
    classes = np.asarray(run.tasks[t].classes, np.int32) + offset
    key = jax.random.fold_in(jax.random.key(run.seed), 2_000_003 + t)
    params, stats, losses = boundary(state.params, state.extra["slca"], images, labels, valid, classes,
                                     np.int32(t), key)
    log.setdefault("align_loss", []).append(float(jax.device_get(losses)[-1]))
    return state._replace(params=params, extra={**state.extra, "slca": stats})

  def extra(params, seed):
    del seed
    return {"slca": slca_lib.class_stats_init(entries, int(params["head"]["kernel"].shape[0]))}

  return Method(tx, classification_loss(env.apply), None, extra, end_task)


# --- the methods added on the library's newer parts: MAS, MIR, CUBER ------------------------------------

def _outputs(apply: Callable, setting: Setting) -> Callable:
  """``F(x; theta)`` of one example for MAS: the logits; for a task-incremental stream only the task's own
  head (the other logits zeroed, as the paper's multi-head networks have one output per task)."""

  def output(params, example):
    logits = apply(params, {}, example["image"][None], train=False)[0][0]
    return jnp.where(example["logit_mask"], logits, 0.0) if "logit_mask" in example else logits

  return output


def mas(env: Env, setting: Setting, spec: Spec) -> Method:
  """Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware
  Synapses: Learning what (not) to forget"): ``chain(mas, sgd)`` (``prox.transforms.mas``, EWC's online
  quadratic) adds ``2 lambda Omega (w - w*)``, the gradient of ``lambda sum_i Omega_i (w_i - w*_i)^2``;
  at the end of task ``t`` the importance of ``mas.examples`` of its training inputs (no labels),

      Omega_t = 1/N sum_n |grad_w ||F(x_n; w)||_2^2|,

  joins the sum ``Omega <- Omega + Omega_t`` and the current weights become the anchor ``w*``. ``F`` are the
  logits (for ``split``, the task's own; see :func:`_outputs`). Logged per task as for EWC: the penalty
  before the consolidation and ``2 lambda max(Omega) lr`` (SGD diverges above 2); non-finite steps are
  skipped and counted."""
  cfg = env.cfg
  lr, size = float(cfg.learning_rate), int(cfg.mas.examples)
  limit = ewc_lib.sgd_stability_limit(float(cfg.momentum))
  output = _outputs(env.apply, setting)   # one object: mas_importance compiles once

  def end_task(state, t, run, log):
    params = state.params
    log.setdefault("penalty", []).append(
        float(ewc_lib.ewc_penalty(ewc_lib.find_ewc_state(state.opt_state), params)))
    idx = _subset(len(run.train_sets[t].labels), size, run.seed, t, 3)
    inputs = {k: v for k, v in _examples(run, t, idx, setting).items() if k != "label"}
    omega = mas_importance(output, params, inputs, chunk_size=128)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      opt_state = ewc_lib.consolidate_opt_state(state.opt_state, params, omega, learning_rate=lr,
                                                stability_limit=limit)
    log.setdefault("importance_sum", []).append(float(sum(jnp.sum(x) for x in jax.tree.leaves(omega))))
    log.setdefault("stability", []).append(float(ewc_lib.ewc_stability(ewc_lib.find_ewc_state(opt_state), lr)))
    log["stability_warnings"] = log.get("stability_warnings", 0) + sum(
        issubclass(w.category, RuntimeWarning) for w in caught)
    return state._replace(opt_state=opt_state)

  tx = optax.chain(mas_tx(spec.options["mas_lambda"]), _sgd(cfg))
  return Method(tx, classification_loss(env.apply), None, lambda params, seed: {}, end_task,
                skip_nonfinite=True)


def mir_mix(per_example: Callable, params: PyTree, memory: replay_lib.ReservoirState, key: jax.Array,
            batch: dict, *, num: int, candidates: int, learning_rate: float, first_row: jax.Array,
            global_rows: int) -> tuple[dict, jax.Array]:
  """ER-MIR's training rows for one micro-batch: ``batch`` followed by its share of the ``num`` memories
  :func:`prox.tasks.mir_retrieve` picks out of ``candidates`` uniform draws (those whose loss the virtual
  SGD step ``w - lr grad L(w; batch)`` raises most), with the weights of ``replay_mix``:

      L = (sum_batch l_i + sum_retrieved v_j l_j) / (B + sum_j v_j)

  (``v_j = 0`` for rows the memory cannot fill yet). A micro-batch of ``b`` of the ``B`` rows starting at
  ``r`` takes the retrieved rows ``[r num / B, (r + b) num / B)`` in the order of their scores and weights
  scaled by ``B / b``. The same ``key`` in every micro-batch draws the same candidates; the virtual step
  uses the micro-batch's own gradient (on one device without micro-batches: the batch's, as the paper)."""
  b = int(jax.tree.leaves(batch)[0].shape[0])
  got = mir_retrieve(per_example, params, batch, memory, key, num_candidates=candidates, k=num,
                     learning_rate=learning_rate)
  share, start = num * b // global_rows, first_row * num // global_rows
  mem = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, share), got.batch)
  v = jax.lax.dynamic_slice_in_dim(got.valid.astype(jnp.float32), start, share)
  scale = (global_rows / b) / (global_rows + jnp.sum(got.valid.astype(jnp.float32)))
  mixed = jax.tree.map(lambda x, y: jnp.concatenate([x, y.astype(x.dtype)]), batch, mem)
  return mixed, scale * jnp.concatenate([jnp.ones((b,), jnp.float32), v])


def mir(env: Env, setting: Setting, spec: Spec) -> Method:
  """Maximally interfered retrieval (Aljundi, Caccia, Belilovsky, Caccia, Lin, Charlin & Tuytelaars 2019,
  "Online Continual Learning with Maximally Interfered Retrieval"), ER-MIR on ``replay``'s reservoir (same
  ``replay.capacity``, same ``replay.batch_size = k`` replayed rows per step): each step draws
  ``C = mir.candidates`` memories, scores ``s_c = l(w - lr grad L(w; B_in); x_c) - l(w; x_c)`` and trains on
  the batch and the ``k`` of largest ``s_c`` (:func:`mir_mix`); the batch then joins the reservoir as in
  ``replay``. Departure: the candidates may come from the current task (the reservoir keeps no task ids)."""
  del spec
  cfg, apply, fields = env.cfg, env.apply, _fields(setting)
  num, rows, cands, lr = int(cfg.replay.batch_size), int(cfg.batch_size), int(cfg.mir.candidates), float(
      cfg.learning_rate)

  def per_example(params, examples):
    logits, _ = apply(params, {}, examples["image"], train=True)
    if setting.masked:
      logits = mask_logits(logits, examples["logit_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])

  def loss_fn(params, model_state, batch, ctx):
    state = ctx.extra["replay"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), ctx.step)   # one draw per step
    mixed, w = mir_mix(per_example, params, state["memory"], key, {k: batch[k] for k in fields}, num=num,
                       candidates=cands, learning_rate=lr, first_row=batch["row"][0], global_rows=rows)
    return _weighted_loss(apply, setting, params, model_state, mixed, w)

  memory = _reservoir(env, setting)
  return Method(_sgd(cfg), loss_fn, memory.offer, memory.extra, memory.end_task)


def cuber(env: Env, setting: Setting, spec: Spec, *, num_tasks: int) -> Method:
  """CUBER (Lin, Yang, Fan & Zhang 2022, "Beyond Not-Forgetting: Continual Learning with Backward Knowledge
  Transfer") on ``gpm``'s bases (same kernels, ``gpm.examples``, thresholds): ``chain(sgd, cuber, zero
  biases)`` projects an update ``G`` of a kernel as

      G' = G - sum_{j closed} B_j B_j^T G - (1 - beta) sum_{j open} B_j B_j^T G,

  ``B_j`` the basis columns task ``j`` added, ``beta = cuber.backward_scale``. At the end of task ``t`` the
  bases grow as in GPM and the task's direction ``r_t = grad L_t`` (the mean loss of ``cuber.examples`` of
  its training examples at the final weights) is stored as ``B_t^T r_t``; then, from the gradient ``g`` of
  the next task's loss at the same weights (the same number of its training examples: the start of the
  task, where the paper tests the correlation), old task ``j`` is opened at a kernel when
  ``||B_j^T g|| >= eps ||g||`` (``eps = cuber.projection_threshold``) and ``<B_j^T g, B_j^T r_j> > 0``, and
  stays so for the task. With every subspace closed it is GPM."""
  del spec
  g, c = env.cfg.gpm, env.cfg.cuber
  size, eps = int(c.examples), float(c.projection_threshold)

  kernel_mask, bias_mask = _projected_kernels(setting), _biases

  tx = optax.chain(_sgd(env.cfg), cuber_tx(kernel_mask, max_tasks=num_tasks,
                                            backward_scale=float(c.backward_scale)),
                   optax.masked(optax.set_to_zero(), bias_mask))
  mean_loss = lambda params, examples: jnp.mean(_cuber_loss(env.apply, params, examples))

  @jax.jit
  def consolidate(opt_state, params, images, examples, threshold):
    inputs = models.mlp_layer_inputs(params, images)
    activations = {"head": {"kernel": inputs["head"], "bias": None},
                   "hidden": {name: {"kernel": inputs[name], "bias": None} for name in params["hidden"]}}
    reference = jax.grad(mean_loss)(params, examples)
    return replace_cuber_state(opt_state, lambda s: cuber_update_bases(s, activations, threshold, reference))

  @jax.jit
  def correlate(opt_state, params, examples):
    grads = jax.grad(mean_loss)(params, examples)
    return replace_cuber_state(opt_state, lambda s: cuber_correlation(s, grads, projection_threshold=eps))

  def end_task(state, t, run, log):
    n = len(run.train_sets[t].labels)
    idx = _subset(n, int(g.examples), run.seed, t, 2)
    threshold = gpm_lib.gpm_threshold(t, float(g.threshold_base), float(g.threshold_increment))
    examples = _examples(run, t, _subset(n, size, run.seed, t, 4), setting)
    opt_state = consolidate(state.opt_state, state.params, run.train_sets[t].images[idx], examples,
                            np.float32(threshold))
    if t + 1 < len(run.tasks):
      following = _examples(run, t + 1, _subset(len(run.train_sets[t + 1].labels), size, run.seed, t + 1, 4),
                            setting)
      opt_state = correlate(opt_state, state.params, following)
    st = jax.device_get(find_cuber_state(opt_state))
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]   # MaskedNode(): no leaves
    log.setdefault("ranks", []).append({_keystr(p): int(r) for p, r in flat(st.gpm.ranks)})
    log.setdefault("open", []).append({_keystr(p): np.flatnonzero(np.asarray(a)).tolist()
                                       for p, a in flat(st.allowed)})
    return state._replace(opt_state=opt_state)

  return Method(tx, classification_loss(env.apply), None, lambda params, seed: {}, end_task)


def _cuber_loss(apply: Callable, params: PyTree, examples: dict) -> jax.Array:
  logits = apply(params, {}, examples["image"], train=False)[0]
  if "logit_mask" in examples:
    logits = mask_logits(logits, examples["logit_mask"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])


def protocl(env: Env, setting: Setting, spec: Spec) -> Method:
  """ProtoCL (Kessler, Cobb, Rudner, Zohren & Roberts 2023, "On Sequential Bayesian Inference for Continual
  Learning"): the classifier is a conjugate Gaussian posterior over one prototype per class on the embedding
  ``z`` (here the head's input, the last hidden layer; the linear head is unused) with a Dirichlet class prior
  (``prox.tasks.bayesian_prototypes``; known noise ``sigma^2 = protocl.noise_variance``, prior ``N(0,
  protocl.prior_variance)``, ``alpha_0 = protocl.dirichlet``), kept in ``extra["protos"]``. The loss is
  ``-log p(y | z, D)`` of the batch and ``replay.batch_size`` memory draws, weighted as ``replay`` (same
  reservoir, same ``replay.capacity``); after the update the step's transition adds the incoming batch's
  embeddings (at the weights the loss saw) to the posterior and offers the batch to the memory. Prediction:
  ``argmax_c log p(z | c, D) + log p(c | D)`` (masked to the task's classes for ``split``)."""
  del spec
  cfg, fields, c = env.cfg, _fields(setting), env.num_classes
  num, rows = int(cfg.replay.batch_size), int(cfg.batch_size)
  dim = int(cfg.model_kwargs.hidden[-1])
  head = prototypes_lib(c, dim, noise_variance=float(cfg.protocl.noise_variance),
                        prior_variance=float(cfg.protocl.prior_variance), dirichlet=float(cfg.protocl.dirichlet))
  embed = lambda params, images: models.mlp_layer_inputs(params, images)["head"]

  def loss_fn(params, model_state, batch, ctx):
    state = ctx.extra["replay"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), ctx.step)   # one draw per step
    mixed, w = replay_lib.replay_mix(state["memory"], key, {k: batch[k] for k in fields}, num=num,
                                     first_row=batch["row"][0], global_rows=rows)
    logits = head.log_posterior(ctx.extra["protos"], embed(params, mixed["image"]))
    if setting.masked:
      logits = jax.nn.log_softmax(mask_logits(logits, mixed["logit_mask"]))
    nll = -jnp.take_along_axis(logits, mixed["label"][:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == mixed["label"]).astype(jnp.float32)
    return jnp.sum(w * nll), ({"accuracy": jnp.sum(w * correct)}, model_state)

  def absorb(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    z = embed(info.params, info.batch["image"])                 # the embeddings the loss saw
    protos = head.update(state.extra["protos"], z, info.batch["label"], info.valid.astype(z.dtype))
    return state._replace(extra={**state.extra, "protos": protos})

  memory = _reservoir(env, setting)
  transition = step_lib.chain_transitions(absorb, memory.offer)

  def classify(params, model_state, images, train=False):
    del train
    return head.log_joint(params["protos"], embed(params["net"], images)), model_state

  evaluate_posterior = common.evaluator(classify, env.mesh, per_class=True)

  def evaluate(state, ds, batch_size, task, **fields_):
    del task
    params = {"net": state.params, "protos": state.extra["protos"]}
    return evaluate_posterior(state._replace(params=params), ds, batch_size, **fields_)

  def extra(params, seed):
    return {**memory.extra(params, seed), "protos": head.init()}

  def end_task(state, t, run, log):
    counts = jax.device_get(state.extra["protos"].count)
    log.setdefault("posterior_counts", []).append(np.asarray(counts).round().astype(int).tolist())
    return memory.end_task(state, t, run, log)

  return Method(_sgd(cfg), loss_fn, transition, extra, end_task, evaluate=evaluate)


def onpro(env: Env, setting: Setting, spec: Spec) -> Method:
  """OnPro (Wei, Ye, Huang, Zhang & Shan 2023, "Online Prototype Learning for Online Continual Learning"):
  the MLP gets a projection head ``z = normalize(h W_p)`` (``h`` the last hidden layer, ``onpro.projection_dim``
  outputs; params ``{"net", "proj"}``). Each step, on ``replay``'s reservoir (same ``replay.capacity``):

  * ``n = replay.batch_size`` replay rows from the adaptive prototypical feedback sampler
    (``prox.tasks.prototype_feedback``, its state in ``extra["feedback"]``): a ``base_rate`` share uniform,
    the rest pairs of classes drawn by ``softmax(1 / ||mu_c - mu_c'||)``, mixed ``(1 - lam) x_a + lam x_b``;
  * two views of the batch and of the replayed rows' first examples: the clean input and the input with a
    random ``onpro.drop`` share of its pixels zeroed;
  * ``L = CE(batch) + mean_valid mixupCE(replay) + L_pro(batch views) + L_pro(replay views)`` (the last two:
    online prototype equilibrium, ``prox.losses.onpro_equilibrium_loss``, ``tau = onpro.temperature``).

  The step's transition then sets the sampler's class means ``mu_c`` to the clean view's prototypes of the
  replayed rows at the weights the loss saw (the same draw: its key is the step's) and offers the batch to
  the memory. Departures: one view (the clean one) for the means, pixel dropout as the only augmentation,
  no OCM instance-wise loss. Predictions: the model's own head."""
  del spec
  cfg, c = env.cfg, env.num_classes
  o = cfg.onpro
  num, dim, tau, drop = int(cfg.replay.batch_size), int(o.projection_dim), float(o.temperature), float(o.drop)
  feedback = prototype_feedback(c, base_rate=float(o.base_rate), mixup_p=float(o.mixup_p))

  def forward(params, images):
    h = models.mlp_layer_inputs(params["net"], images)["head"]
    logits = h @ params["net"]["head"]["kernel"] + params["net"]["head"]["bias"]
    return logits, h @ params["proj"]["kernel"]

  def draw(extra, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(extra["replay"]["key"]), step)   # one draw per step
    return feedback.sample(extra["feedback"], extra["replay"]["memory"], key, num)

  def masked(logits, examples):
    return mask_logits(logits, examples["logit_mask"]) if setting.masked else logits

  def loss_fn(params, model_state, batch, ctx):
    sample = draw(ctx.extra, ctx.step)
    mixed = mixup_inputs(sample.first, sample.second, sample.lam)
    if setting.masked:   # a mixed row answers to both examples' tasks: the union of their heads
      mixed["logit_mask"] = sample.first["logit_mask"] | sample.second["logit_mask"]
    b = batch["label"].shape[0]
    clean = jnp.concatenate([batch["image"], sample.first["image"]])
    keep = jax.random.bernoulli(ctx.rng, 1.0 - drop, clean.shape).astype(clean.dtype)
    logits, z = forward(params, jnp.concatenate([clean, clean * keep, mixed["image"]]))
    n_clean = clean.shape[0]
    z_a, z_b = z[:n_clean], z[n_clean:2 * n_clean]
    new_logits = masked(logits[:b], batch)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(new_logits, batch["label"]))
    v = sample.valid.astype(jnp.float32)
    mix_ce = mixup_cross_entropy(masked(logits[2 * n_clean:], mixed), sample.labels_first,
                                 sample.labels_second, sample.lam)
    replay_ce = jnp.sum(v * mix_ce) / jnp.maximum(jnp.sum(v), 1.0)
    ope = onpro_equilibrium_loss(z_a[:b], z_b[:b], batch["label"], z_a[b:], z_b[b:], sample.labels_first,
                                 num_classes=c, temperature=tau, seen_weights=v)
    accuracy = jnp.mean((jnp.argmax(new_logits, -1) == batch["label"]).astype(jnp.float32))
    return ce + replay_ce + ope, ({"accuracy": accuracy, "replay_ce": replay_ce, "ope": ope,
                                   "feedback_rows": jnp.sum(sample.from_feedback.astype(jnp.float32))},
                                  model_state)

  def remember(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    sample = draw(state.extra, info.step)          # the draw the loss made (extra not yet changed)
    _, z = forward(info.params, sample.first["image"])
    means, present = online_prototypes(z, sample.labels_first, num_classes=c,
                                       weights=sample.valid.astype(jnp.float32))
    return state._replace(extra={**state.extra,
                                 "feedback": feedback.update(state.extra["feedback"], means, present)})

  memory = _reservoir(env, setting)
  transition = step_lib.chain_transitions(remember, memory.offer)

  def init_params(params, seed):
    key = jax.random.fold_in(jax.random.key(seed), 0x0E7)
    width = int(params["head"]["kernel"].shape[0])
    proj = jax.random.normal(key, (width, dim), jnp.float32) / np.sqrt(width)
    return {"net": params, "proj": {"kernel": jax.device_get(proj)}}

  def evaluate(state, ds, batch_size, task, **fields_):
    del task
    return env.evaluate(state._replace(params=state.params["net"]), ds, batch_size, **fields_)

  def extra(params, seed):
    return {**memory.extra(params, seed), "feedback": feedback.init(dim)}

  return Method(_sgd(cfg), loss_fn, transition, extra, memory.end_task, evaluate=evaluate, params=init_params)


def wsn(env: Env, setting: Setting, spec: Spec, *, num_tasks: int) -> Method:
  """Winning subnetworks (Kang, Mina, Madjid, Yoon, Hasegawa-Johnson, Hwang & Yoo 2022, "Forget-free Continual
  Learning with Winning Subnetworks"; ``prox.transforms.task_masks``): every kernel ``W`` gets scores ``S``;
  task ``t`` trains ``W * m_t``, ``m_t`` the top ``wsn.density`` of ``|S|`` per layer (straight-through to
  ``S``), and the weights of earlier tasks' masks are frozen. At the end of task ``t`` its mask is stored
  (bit-packed); task ``j``'s test set is scored with ``W * m_j`` (a task not trained yet: the current mask).
  Biases stay at their initial values (as GPM's; WSN's networks have none), so a stored subnetwork's
  outputs never change: forget-free by construction. Task-incremental ``split`` only (the test needs the
  task's identity). Optimiser: the experiment's SGD on weights and scores (WSN uses Adam). Departure: each
  task starts from fresh random scores (a random subnetwork overlapping the frozen weights), since from the
  last task's scores its mask would hold only frozen weights and SGD moves the scores too little to leave
  them."""
  del spec
  density = float(env.cfg.wsn.density)

  def bias_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _keystr(path).endswith("['bias']"), params)

  tm = task_masks(optax.chain(_sgd(env.cfg), optax.masked(optax.set_to_zero(), bias_mask)), density=density,
                  max_tasks=num_tasks)
  apply = lambda params, model_state, images, train=False: env.apply(tm.forward(params), model_state, images,
                                                                     train=train)
  weights_of = jax.jit(lambda opt_state, params, task: jax.lax.cond(
      task < find_task_mask_state(opt_state).num_tasks,
      lambda: tm.task_weights(find_task_mask_state(opt_state), params, task),
      lambda: tm.forward(params)))

  def evaluate(state, ds, batch_size, task, **fields_):
    weights = weights_of(state.opt_state, state.params, np.int32(task))
    return env.evaluate(state._replace(params=weights), ds, batch_size, **fields_)

  def end_task(state, t, run, log):
    opt_state = tm.consolidate_opt_state(state.opt_state, state.params)
    # fresh scores: the next task starts from a random subnetwork (from the last task's scores its mask would
    # hold only frozen weights, and under SGD the scores move too little to reach free ones)
    key = jax.random.fold_in(jax.random.key(run.seed), 0x5C0 + t + 1)
    scores = tm.init_params(state.params["weights"], key)["scores"]
    params = {"weights": state.params["weights"], "scores": scores}
    st = jax.device_get(find_task_mask_state(opt_state))
    used = jax.tree_util.tree_flatten_with_path(st.used)[0]
    log.setdefault("used_fraction", []).append({_keystr(p): float(np.mean(u)) for p, u in used})
    log["mask_bytes"] = mask_bytes(st)
    return state._replace(params=params, opt_state=opt_state)

  def init_params(params, seed):
    return jax.device_get(tm.init_params(params, jax.random.fold_in(jax.random.key(seed), 0x5C0)))

  return Method(tm.tx, classification_loss(apply), None, lambda params, seed: {}, end_task, evaluate=evaluate,
                params=init_params)


def _selector_init(key: jax.Array, d_in: int, hidden: int, outputs: int) -> dict:
  k1, k2 = jax.random.split(key)
  return {"hidden": {"kernel": jax.random.normal(k1, (d_in, hidden), jnp.float32) * np.sqrt(2.0 / d_in),
                     "bias": jnp.zeros((hidden,), jnp.float32)},
          "out": {"kernel": jax.random.normal(k2, (hidden, outputs), jnp.float32) / np.sqrt(hidden),
                  "bias": jnp.zeros((outputs,), jnp.float32)}}


def _selector_apply(params: dict, images: jax.Array) -> jax.Array:
  x = images.reshape(images.shape[0], -1).astype(jnp.float32)
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def tame(env: Env, setting: Setting, spec: Spec) -> Method:
  """TAME (Zhu, Majzoubi, Jain & Choromanska 2024, "TAME: Task Agnostic Continual Learning using Multiple
  Experts"; ``prox.tasks.tame``): the params are the active expert (the model) and a selector (one hidden
  layer of ``tame.selector_hidden``, ``tame.max_experts`` outputs); ``extra`` holds the bank of experts with
  the detector's state and ``replay``'s reservoir (same ``replay.capacity``), whose rows carry the index of
  the expert active when they were stored. Each step trains the expert on the batch (cross-entropy ``l_e``)
  and the selector on ``replay.batch_size`` memory draws (``tame.selector_loss``, over live experts):
  ``L = l_e + l_sel``. The transition feeds ``l_e`` to the shift detector (``detector.*`` windows and
  threshold): on a switch the expert is written back to its slot and a copy of it becomes the new active
  expert in the next slot (no reuse; a full bank keeps training the active one); then the batch joins the
  memory. The task boundaries are not used. Prediction: each input through the expert the selector routes
  it to (``routed_apply``). Departures: no expert reuse test, no weight pruning."""
  del spec
  cfg, apply, fields, d = env.cfg, env.apply, _fields(setting), env.cfg.detector
  num, e_max = int(cfg.replay.batch_size), int(cfg.tame.max_experts)
  bank = tame_lib(e_max, detector=detector_lib.shift_detector(d.reference_window, d.test_window,
                                                              float(d.threshold)))
  tx = _sgd(cfg)

  def loss_fn(params, model_state, batch, ctx):
    logits, model_state = apply(params["expert"], model_state, batch["image"], train=True)
    if setting.masked:
      logits = mask_logits(logits, batch["logit_mask"])
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    key = jax.random.fold_in(jax.random.wrap_key_data(ctx.extra["replay"]["key"]), ctx.step)
    draws, valid = replay_lib.reservoir_sample(ctx.extra["replay"]["memory"], key, num)
    v = valid.astype(jnp.float32)
    sel = bank.selector_loss(ctx.extra["tame"], _selector_apply(params["selector"], draws["image"]),
                             draws["expert"], v)
    sel = jnp.sum(sel) / jnp.maximum(jnp.sum(v), 1.0)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return ce + sel, ({"accuracy": accuracy, "expert_loss": ce, "selector_loss": sel}, model_state)

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    ex = state.extra
    active = ex["tame"].active
    tstate, upd = bank.update(ex["tame"], state.params["expert"], info.metrics["expert_loss"])
    params = {**state.params, "expert": upd.params}
    fresh = tx.init(params)    # the optimizer state belonged to the previous expert
    opt_state = jax.tree.map(lambda a, b: jnp.where(upd.changed, a, b), fresh, state.opt_state)
    rows = {k: info.batch[k] for k in fields}
    rows["expert"] = jnp.full(info.valid.shape, active, jnp.int32)      # the expert trained on them
    memory = replay_lib.reservoir_add(ex["replay"]["memory"], rows, info.rng, info.valid)
    return state._replace(params=params, opt_state=opt_state,
                          extra={**ex, "tame": tstate, "replay": {**ex["replay"], "memory": memory}})

  def classify(params, model_state, images, train=False):
    del train
    route = bank.route(params["tame"], _selector_apply(params["selector"], images))
    logits = routed_apply(lambda p, x: apply(p, {}, x, train=False)[0], params["bank"], route, images)
    return logits, model_state

  evaluate_routed = common.evaluator(classify, env.mesh, per_class=True)

  def evaluate(state, ds, batch_size, task, **fields_):
    del task
    tstate = state.extra["tame"]
    params = {"bank": bank.bank(tstate, state.params["expert"]), "selector": state.params["selector"],
              "tame": tstate}
    return evaluate_routed(state._replace(params=params), ds, batch_size, **fields_)

  def init_params(params, seed):
    key = jax.random.fold_in(jax.random.key(seed), 0x7A3E)
    d_in = int(np.prod(env.image_shape))
    return {"expert": params, "selector": jax.device_get(_selector_init(key, d_in, int(cfg.tame.selector_hidden),
                                                                        e_max))}

  memory = _reservoir(env, setting)

  def extra(params, seed):
    out = memory.extra(params, seed)
    example = {"image": jax.ShapeDtypeStruct(env.image_shape, jnp.float32),
               "label": jax.ShapeDtypeStruct((), jnp.int32), "expert": jax.ShapeDtypeStruct((), jnp.int32)}
    if setting.masked:
      example["logit_mask"] = jax.ShapeDtypeStruct((env.num_classes,), jnp.bool_)
    out["replay"]["memory"] = replay_lib.reservoir_init(example, int(cfg.replay.capacity))
    return {**out, "tame": bank.init(params["expert"])}

  def end_task(state, t, run, log):
    st = jax.device_get(state.extra["tame"])
    log.setdefault("num_experts", []).append(int(st.num_experts))
    log.setdefault("active", []).append(int(st.active))
    log["switches"] = int(st.detector.num_switches)
    memory_ = jax.device_get(state.extra["replay"]["memory"])
    experts = np.asarray(memory_.data["expert"])[:int(replay_lib.reservoir_size(memory_))]
    log.setdefault("memory_experts", []).append(np.bincount(experts, minlength=e_max).tolist())
    return memory.end_task(state, t, run, log)

  return Method(tx, loss_fn, transition, extra, end_task, evaluate=evaluate, params=init_params)


def _method(env: Env, stream: str, setting: Setting, spec: Spec, tasks: list[streams_lib.Task]) -> Method:
  if spec.kind == "slca":
    return slca(env, setting, spec, num_tasks=len(tasks), max_examples=max(len(t.train) for t in tasks))
  if spec.kind == "cuber":
    return cuber(env, setting, spec, num_tasks=len(tasks))
  if spec.kind == "wsn":
    return wsn(env, setting, spec, num_tasks=len(tasks))
  build = {"naive": naive, "replay": replay, "ewc": ewc, "ewc_online": ewc, "gpm": gpm,
           "ewc_detect": ewc_detect, "mas": mas, "mir": mir, "protocl": protocl,
           "onpro": onpro, "tame": tame}[spec.kind]
  return build(env, setting, spec)


# --- one run: a stream's tasks in order, on the one loop -----------------------------------------------------

def _on_one_device(end_task: Callable[..., step_lib.TrainState], state: step_lib.TrainState,
                   mesh: jax.sharding.Mesh, *args: Any) -> step_lib.TrainState:
  """Runs a boundary action on the state's copy on one device and places the result as the step expects
  it (replicated over ``mesh``); device-to-device copies, no host round trip. On a multi-device CPU mesh
  the replicated (SPMD) versions of the boundary's small linear algebra and loops can deadlock in XLA's
  collectives; on one device there are none. A no-op placement on a one-device mesh."""
  local = jax.device_put(state, mesh.devices.flat[0])
  return jax.device_put(end_task(local, *args), NamedSharding(mesh, PartitionSpec()))


def _evaluate(env: Env, state: step_lib.TrainState, ds: data_lib.ArrayDataset, evaluate: Callable | None = None,
              task: int = 0, **fields: np.ndarray) -> dict:
  if evaluate is None:
    return env.evaluate(state, ds, env.cfg.eval_batch_size, **fields)
  return evaluate(state, ds, env.cfg.eval_batch_size, task, **fields)


def _accuracy_row(env: Env, state: step_lib.TrainState, tests: list[data_lib.ArrayDataset],
                  masks: list[np.ndarray] | None, evaluate: Callable | None = None
                  ) -> tuple[list[float], list[float]]:
  """Per test set: the accuracy as the stream scores it (with the task's logit mask when ``masks``) and
  over all classes (``evaluate``: the method's own evaluator, if any)."""
  scored, unmasked = [], []
  for j, ds in enumerate(tests):
    out = _evaluate(env, state, ds, evaluate, j, **({} if masks is None else {"logit_mask": masks[j]}))
    unmasked.append(out["accuracy"])
    scored.append(out["accuracy_masked"] if masks is not None else out["accuracy"])
  return scored, unmasked


def _transform(masks: list[np.ndarray] | None) -> Callable[[dict, int], dict]:
  """The batch fields beside image and label: each row's global index (``replay_mix`` takes its share by
  it) and, for a task-incremental stream, the task's logit mask."""

  def transform(rows: dict, t: int) -> dict:
    n = len(rows["label"])
    rows["row"] = np.arange(n, dtype=np.int32)
    if masks is not None:
      rows["logit_mask"] = np.broadcast_to(masks[t], (n, masks[t].shape[0]))
    return rows

  return transform


def _loop(env: Env, step: Callable, state: step_lib.TrainState, run: Run, steps: list[int],
          masks: list[np.ndarray] | None, run_dir: str, actions: tuple, record: dict,
          cache: loop.CompileCache, on_nonfinite: str = "stop") -> loop.LoopResult:
  source = TaskSource(run.train_sets, steps, seed=run.seed, transform=_transform(masks))
  return loop.run(step, state, source, mesh=env.mesh, batch_size=env.cfg.batch_size, num_steps=sum(steps),
                  actions=actions, checkpoint_dir=os.path.join(run_dir, "checkpoints"),
                  checkpoint=loop.Every(boundary="task"), keep_checkpoints=1, record=record,
                  compile_cache=cache, on_nonfinite=on_nonfinite)


def train_stream(env: Env, setting: Setting, method: Method, step: Callable, cache: loop.CompileCache,
                 run: Run, epochs: int, run_dir: str) -> dict:
  """Trains one seed of a stream with ``method``; returns the run's result (accuracy matrices, metrics,
  the method's log). Checkpointed at every task boundary in ``run_dir/checkpoints``: started again after
  a crash it continues from the last finished task and ends exactly as an uninterrupted run."""
  started = time.perf_counter()
  cfg = env.cfg
  params = env.init_params(run.seed)
  if method.params is not None:
    params = method.params(params, run.seed)
  state = common.replicated_state(params, method.tx, env.mesh, seed=run.seed, extra=method.extra(params, run.seed))
  tests = [task.test.materialize() for task in run.tasks]
  masks = [task.logit_mask for task in run.tasks] if setting.masked else None
  steps = [_steps(len(ds.labels), epochs, cfg.batch_size) for ds in run.train_sets]

  def start(ctx: loop.Context) -> None:
    ctx.record["initial"], ctx.record["initial_class"] = _accuracy_row(env, ctx.state, tests, masks,
                                                                       method.evaluate)

  def end_of_task(ctx: loop.Context) -> step_lib.TrainState:
    t = len(ctx.record["R"])
    state = ctx.state
    if method.end_task is not None:
      state = _on_one_device(method.end_task, state, env.mesh, t, run, ctx.record["log"])
    row, row_class = _accuracy_row(env, state, tests, masks, method.evaluate)
    ctx.record["R"].append(row)
    ctx.record["R_class"].append(row_class)
    ctx.record["train"].append(common.scalars(ctx.out.metrics))
    ctx.record["task_end_steps"].append(ctx.step)
    return state

  record = {"R": [], "R_class": [], "train": [], "task_end_steps": [], "log": {}}
  result = _loop(env, step, state, run, steps, masks, run_dir,
                 ((loop.Every(start=True), start), (loop.Every(boundary="task"), end_of_task)), record, cache,
                 on_nonfinite="skip" if method.skip_nonfinite else "stop")
  rec = result.record
  r, r_class = np.asarray(rec["R"]), np.asarray(rec["R_class"])
  metrics = {"avg_acc": float(cl_metrics.average_accuracy(r)), "forgetting": float(cl_metrics.forgetting(r)),
             "bwt": float(cl_metrics.backward_transfer(r)),
             "fwt": float(cl_metrics.forward_transfer(r, np.asarray(rec["initial"]))),
             "avg_acc_class_il": float(cl_metrics.average_accuracy(r_class))}
  return {**rec, "metrics": metrics, "steps": int(result.state.step), "nonfinite_steps": result.nonfinite_steps,
          "train_seconds": result.train_seconds,
          "seconds": time.perf_counter() - started,
          "param_norm": float(optax.tree.norm(jax.device_get(result.state.params)))}


def train_scole(env: Env, method: Method, step: Callable, cache: loop.CompileCache, seed: int,
                train_ds: data_lib.ArrayDataset, test_ds: data_lib.ArrayDataset, run_dir: str) -> dict:
  """SCoLe (Lesort et al. 2022, "Scaling the Number of Tasks in Continual Learning"): ``scole.num_tasks``
  tasks of randomly drawn classes, absent logits masked in training, the accuracy over all classes (and
  per class) on the whole test set after every task."""
  started = time.perf_counter()
  sc = env.cfg.scole
  tasks = [streams_lib.scole_task(train_ds, test_ds, t, classes_per_task=sc.classes_per_task, seed=seed,
                                  skew=float(sc.skew)) for t in range(sc.num_tasks)]
  run = Run(seed, tasks, [task.train.materialize() for task in tasks])
  steps = [_steps(len(ds.labels), sc.epochs_per_task, env.cfg.batch_size) for ds in run.train_sets]
  params = env.init_params(seed)
  state = common.replicated_state(params, method.tx, env.mesh, seed=seed, extra=method.extra(params, seed))

  def start(ctx: loop.Context) -> None:
    ctx.record["initial_accuracy"] = _evaluate(env, ctx.state, test_ds)["accuracy"]

  def end_of_task(ctx: loop.Context) -> None:
    t = len(ctx.record["accuracy"])
    out = _evaluate(env, ctx.state, test_ds)
    ctx.record["accuracy"].append(out["accuracy"])
    ctx.record["class_accuracy"].append((out["class_correct"] / np.maximum(out["class_count"], 1)).tolist())
    ctx.record["classes"].append(list(tasks[t].classes))
    ctx.record["train_loss"].append(float(jax.device_get(ctx.out.metrics["loss"])))

  record = {"accuracy": [], "class_accuracy": [], "classes": [], "train_loss": []}
  result = _loop(env, step, state, run, steps, [t.logit_mask for t in tasks], run_dir,
                 ((loop.Every(start=True), start), (loop.Every(boundary="task"), end_of_task)), record, cache)
  return {**result.record, "steps": int(result.state.step), "train_seconds": result.train_seconds,
          "seconds": time.perf_counter() - started}


# --- the experiment -----------------------------------------------------------------------------------------

_METHOD_SECTIONS = {"replay": ("replay",), "ewc": ("ewc",), "ewc_online": ("ewc",),
                    "ewc_detect": ("detector",), "gpm": ("gpm",), "slca": ("slca",), "mas": ("mas",),
                    "mir": ("replay", "mir"), "cuber": ("gpm", "cuber"),
                    "protocl": ("replay", "protocl"), "onpro": ("replay", "onpro"),
                    "wsn": ("wsn",), "tame": ("replay", "detector", "tame")}


def _run_config(cfg: ml_collections.ConfigDict, stream: str, kind: str, options: dict, seed: int) -> dict:
  """What one run depends on: recorded in its directory; a changed one is refused there."""
  out = {k: cfg[k] for k in ("dataset", "scaling", "model", "learning_rate", "momentum", "batch_size",
                             "eval_batch_size")}
  out.update(model_kwargs=cfg.model_kwargs.to_dict(), stream=stream, method=kind, options=options, seed=seed)
  out[stream] = {k: v for k, v in cfg[stream].to_dict().items() if k not in ("ewc_lambdas", "ewc_detect_lambda", "mas_lambda")}
  for section in _METHOD_SECTIONS.get(kind, ()):
    out[section] = cfg[section].to_dict()
  return out


def _env(cfg: ml_collections.ConfigDict, train_ds: data_lib.ArrayDataset) -> Env:
  mesh = step_lib.data_mesh()
  net = common.build_model(cfg, train_ds)
  return Env(cfg=cfg, mesh=mesh, apply=net.apply,
             init_params=lambda seed: jax.device_get(common.build_model(cfg, train_ds, seed=seed).params),
             image_shape=tuple(int(d) for d in train_ds.images.shape[1:]), num_classes=train_ds.num_classes,
             evaluate=common.evaluator(net.apply, mesh, per_class=True), logprob=_logprob(net.apply))


def _progress(cfg, text: str) -> None:
  if cfg.progress:
    print(f"continual: {text}", flush=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every (stream, method, seed) and SCoLe, then writes results.md/json and the plots."""
  validate(config, workdir)
  cfg = config
  streams = _names(cfg, "streams", STREAMS)
  methods = _names(cfg, "methods", METHODS)
  train_ds, test_ds = common.load_splits(cfg)
  _check_data(cfg, train_ds, streams, methods)
  started = time.perf_counter()
  env = _env(cfg, train_ds)
  seeds = common.seeds(cfg)
  results: dict[str, Any] = {"streams": {}, "scole": {}, "runs": 0, "runs_read_back": 0}

  def once(run_dir: str, run_config: dict, train: Callable[[], dict]) -> dict:
    results["runs"] += 1
    results["runs_read_back"] += os.path.exists(os.path.join(run_dir, "result.json"))
    return common.run_once(run_dir, "continual", run_config, train)

  for stream in streams:
    setting = _setting(stream, cfg)
    runs = {}
    for seed in seeds:
      tasks = _tasks(stream, cfg, train_ds, test_ds, seed)
      runs[seed] = Run(seed, tasks, [task.train.materialize() for task in tasks])
    table = results["streams"].setdefault(stream, {})
    for spec in _specs(stream, cfg, methods):
      method = _method(env, stream, setting, spec, runs[seeds[0]].tasks)
      step = step_lib.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition,
                                      skip_nonfinite=method.skip_nonfinite)
      cache = loop.CompileCache()
      for seed in seeds:
        run_dir = os.path.join(workdir, "runs", stream, spec.run_id, f"seed{seed}")
        result = once(
            run_dir, _run_config(cfg, stream, spec.kind, spec.options, seed),
            lambda: train_stream(env, setting, method, step, cache, runs[seed], cfg[stream].epochs_per_task,
                                 run_dir))
        table.setdefault(spec.run_id, {"label": spec.label, "kind": spec.kind, "seeds": {}})["seeds"][str(seed)] = result
        m = result["metrics"]
        _progress(cfg, f"{stream:11s} {spec.label:28s} seed {seed}: avg acc {m['avg_acc']:.3f}  forgetting "
                       f"{m['forgetting']:.3f}  bwt {m['bwt']:+.3f}  fwt {m['fwt']:+.3f}  ({result['seconds']:.1f} s)")
  if cfg.scole.enabled:
    spec = Spec("naive", "naive", "naive", {})
    method = naive(env, Setting(masked=True, shared_head=True, per_task_stats=False, groups=0), spec)
    step = step_lib.make_train_step(method.loss, method.tx, mesh=env.mesh)
    cache = loop.CompileCache()
    for seed in seeds:
      run_dir = os.path.join(workdir, "runs", "scole", f"seed{seed}")
      result = once(run_dir, _run_config(cfg, "scole", "naive", {}, seed),
                    lambda: train_scole(env, method, step, cache, seed, train_ds, test_ds, run_dir))
      results["scole"][str(seed)] = result
      acc = result["accuracy"]
      _progress(cfg, f"scole seed {seed}: accuracy over all classes after task 1 {acc[0]:.3f}, after task "
                     f"{len(acc)} {acc[-1]:.3f}  ({result['seconds']:.1f} s)")
  results["config"] = cfg.to_dict()
  results["seconds_this_run"] = time.perf_counter() - started
  return report_lib.write_all(workdir, results)
