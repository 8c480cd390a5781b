"""Experiment ``curriculum`` (METHODS.md section 5): curriculum teachers and self-distillation.

Parts (``config.parts``, comma-separated):

* ``alp_gmm``: ALP-GMM (Portelas et al. 2019) vs random task sampling on the toy env (10 x 10 grid,
  neighbour-gated competence), ``episodes`` episodes over ``seeds`` seeds, all seeds of a teacher in one
  jitted, vmapped call (``prox.tasks.toy_env.run``); mastered cells every ``score_every`` episodes
  (mean, std, min, max over seeds), a mastery plot and a picture of where ALP-GMM samples over time.
* ``pudf``: PUDF (Meng, Lalor et al. 2024) vs random order vs plain training on ``digits``. Item
  difficulties b_i come from a 1PL IRT fit (``prox.tasks.irt.fit_1pl``) of an artificial crowd's answers:
  ``crowd_size`` small MLPs, each trained for a different number of Adam steps on a bootstrap resample
  of the training set, answer every training item. Each epoch the model's ability theta is estimated by
  MAP on ``num_probe`` random training items, and the epoch trains on {i : b_i <= theta} (stall bump
  after ``patience`` epochs, ``irt.pudf_step``). "random order" trains each epoch on a uniformly random
  subset of the same size as PUDF's that epoch (same seed), so it isolates the effect of *which* items
  are chosen; "plain" trains on the whole training set every epoch.
* ``pskd``: PS-KD (Kim et al. 2021) vs plain cross-entropy on ``digits``: test accuracy per epoch and the
  final expected calibration error. The per-sample prediction store is carried in ``TrainState.model_state``
  next to the network's own state, and each batch carries its examples' indices (added on the host), the
  valid-row mask and the epoch number (so alpha_t changes without recompiling).
* ``forecast``: trains the ``classify`` experiment (its config with this model, data and learning rate;
  evaluations every ``eval_every`` steps) and fits the learning-curve forecaster
  (``prox.tasks.forecast``) to its test-accuracy curve after each fraction in ``fractions`` of the run:
  predicted vs actual final accuracy and interval; and where the stopping rule (``should_stop``: the
  interval's top gains less than ``min_gain`` over the best so far) first fires.

Output in ``workdir``: ``results.json``, ``results.md`` (a table per part) and PNG plots; each finished
part is also saved as ``<part>.json`` and reused when the same command is run again with the same
settings (a killed run resumes at part granularity).

Departures: the digits parts train on one process (the host builds whole batches); the PS-KD store is
written on every device and combined by the step's mean over the data axis, with each device's write
scaled by the device count so the mean equals the written value (exact on one device, and up to
rounding on several). The crowd is built once per run (seed ``seed``), and its difficulties are shared
by all training seeds.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from prox import models
from prox import step as step_lib
from prox.experiments import train as train_lib
from prox.experiments import writers
from prox.experiments import _curriculum_report as report
from prox.tasks import alp_gmm
from prox.tasks import data as data_lib
from prox.tasks import forecast as forecast_lib
from prox.tasks import irt
from prox.tasks import pskd
from prox.tasks import toy_env

PARTS = ("alp_gmm", "pudf", "pskd", "forecast")
ConfigError = train_lib.ConfigError


# --- validation ---------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive_ints(cfg: ml_collections.ConfigDict, prefix: str, *names: str) -> None:
  for name in names:
    v = cfg[name]
    train_lib.require(_is_int(v) and v > 0, f"{prefix}{name} must be a positive integer, got {v!r}")


def parts(config: ml_collections.ConfigDict) -> list[str]:
  """The parts ``config.parts`` names, in the order given; unknown or empty is a ``ConfigError``."""
  value = config.parts
  train_lib.require(isinstance(value, str), f"parts must be a comma-separated string, got {value!r}")
  names = [p.strip() for p in value.split(",") if p.strip()]
  train_lib.require(bool(names), f"parts names no part; known: {', '.join(PARTS)}")
  for p in names:
    train_lib.require(p in PARTS, f"unknown part {p!r} in parts; known: {', '.join(PARTS)}")
  train_lib.require(len(set(names)) == len(names), f"parts names a part twice: {value!r}")
  return names


def _library_check(field: str, factory: Callable, *args, **kwargs) -> None:
  """Runs a library factory eagerly (no compilation) and turns its ValueError into a ConfigError."""
  try:
    factory(*args, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{field}: {e}") from None


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks every value the selected parts use; raises ``ConfigError`` naming the first bad one."""
  train_lib.require(bool(workdir), "--workdir is required (the run's output and checkpoint directory)")
  selected = parts(config)
  train_lib.require(_is_int(config.seed) and config.seed >= 0, f"seed must be a non-negative integer, got {config.seed!r}")
  if "alp_gmm" in selected:
    a = config.alp_gmm
    _positive_ints(a, "alp_gmm.", "episodes", "seeds", "score_every")
    train_lib.require(a.episodes % a.score_every == 0,
             f"alp_gmm.episodes ({a.episodes}) must be a multiple of alp_gmm.score_every ({a.score_every})")
    train_lib.require(_is_int(a.fit_rate) and a.fit_rate > 0, f"alp_gmm.fit_rate must be a positive integer, got {a.fit_rate!r}")
    try:
      low, high = (np.asarray(v, np.float64) for v in a.bounds)
    except (TypeError, ValueError):
      raise ConfigError(f"alp_gmm.bounds must be a pair (low, high) of 2-vectors, got {a.bounds!r}") from None
    train_lib.require(low.shape == (2,) and high.shape == (2,),
             f"alp_gmm.bounds must be a pair (low, high) of 2-vectors (the toy env is 2-D), got {a.bounds!r}")
    _library_check("alp_gmm", alp_gmm.init, (tuple(low), tuple(high)), key=jax.random.key(0),
                   fit_rate=a.fit_rate, random_task_ratio=a.random_task_ratio,
                   history_size=max(a.episodes, 6))
  if "pudf" in selected or "pskd" in selected or "forecast" in selected:
    train_lib.require(config.dataset in data_lib.DATASETS,
             f"unknown dataset {config.dataset!r}; known: {', '.join(data_lib.DATASETS)}")
    train_lib.require(config.model in models.MODELS, f"unknown model {config.model!r}; known: {', '.join(models.MODELS)}")
    train_lib.require(config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}")
    _positive_ints(config, "", "num_seeds", "batch_size", "eval_batch_size")
  if "pudf" in selected:
    p = config.pudf
    _positive_ints(p, "pudf.", "epochs", "crowd_steps", "num_probe")
    train_lib.require(_is_int(p.crowd_size) and p.crowd_size >= 2, f"pudf.crowd_size must be an integer >= 2, got {p.crowd_size!r}")
    _library_check("pudf", irt.pudf_init, patience=p.patience, bump=p.bump)
  if "pskd" in selected:
    s = config.pskd
    _positive_ints(s, "pskd.", "epochs", "ece_bins")
    _library_check("pskd", pskd.alpha, 0, num_epochs=s.epochs, alpha_T=s.alpha_T)
  if "forecast" in selected:
    f = config.forecast
    _positive_ints(f, "forecast.", "num_steps", "eval_every", "min_points")
    train_lib.require(f.min_points >= 4, f"forecast.min_points must be >= 4 (3-parameter curves), got {f.min_points}")
    train_lib.require(f.num_steps // f.eval_every >= 4,
             f"forecast.num_steps / forecast.eval_every must give >= 4 evaluations, got "
             f"{f.num_steps} / {f.eval_every}")
    train_lib.require(len(f.fractions) > 0 and all(0 < x < 1 for x in f.fractions),
             f"forecast.fractions must lie in (0, 1), got {tuple(f.fractions)}")
    train_lib.require(f.min_gain >= 0, f"forecast.min_gain must be >= 0, got {f.min_gain}")
    train_lib.require(_is_int(f.num_bootstrap) and f.num_bootstrap >= 0,
             f"forecast.num_bootstrap must be an integer >= 0, got {f.num_bootstrap!r}")
    train_lib.require(0 < f.level < 1, f"forecast.level must be in (0, 1), got {f.level}")
  train_lib.check_workdir(workdir)


# --- part: ALP-GMM vs random on the toy env -----------------------------------------------------------

def _boxed_init(bounds, *, key, box, make, **kwargs):
  """``make(box, key=key, **kwargs)``: a teacher whose task box is ``box`` whatever the driver passes."""
  del bounds
  return make(box, key=key, **kwargs)


def run_alp_gmm(cfg: ml_collections.ConfigDict) -> dict:
  """Both teachers on the toy env; scores [seeds, episodes / score_every + 1] and ALP-GMM's tasks."""
  a = cfg.alp_gmm
  box = tuple(tuple(float(v) for v in side) for side in a.bounds)
  teachers = {
      "random": alp_gmm.RANDOM._replace(init=functools.partial(_boxed_init, box=box, make=alp_gmm.random_init)),
      "alp_gmm": alp_gmm.ALP_GMM._replace(init=functools.partial(_boxed_init, box=box, make=alp_gmm.init)),
  }
  kwargs = {"random": {}, "alp_gmm": dict(fit_rate=int(a.fit_rate), random_task_ratio=float(a.random_task_ratio),
                                          history_size=int(a.episodes))}
  keys = jax.random.split(jax.random.key(cfg.seed), a.seeds)
  out = {"episodes": int(a.episodes), "score_every": int(a.score_every), "seeds": int(a.seeds), "teachers": {}}
  tasks = None
  for name, teacher in teachers.items():
    started = time.perf_counter()
    res = jax.block_until_ready(toy_env.run(teacher, keys, num_episodes=int(a.episodes),
                                            score_every=int(a.score_every), **kwargs[name]))
    seconds = time.perf_counter() - started
    scores = np.asarray(res.scores)
    out["teachers"][name] = {"scores": scores.tolist(), "seconds": seconds,
                             "final_competence_seed0": np.asarray(res.env_state.competence[0]).tolist()}
    if name == "alp_gmm":
      tasks = np.asarray(res.tasks[0])
    _say(cfg, f"alp_gmm: {name} {a.seeds} seeds x {a.episodes} episodes in {seconds:.1f} s, "
              f"final mastered {scores[:, -1].tolist()}")
  out["alp_gmm_tasks_seed0"] = tasks[:, :2].round(4).tolist()
  return out


# --- digits training shared by pudf and pskd ----------------------------------------------------------

class _Trainer(NamedTuple):
  apply: Callable
  tx: optax.GradientTransformation
  step: Callable
  eval_step: Callable
  probs: Callable          # (state, images) -> softmax probabilities
  mesh: Any


def _classifier_loss(apply: Callable, *, num_classes: int, use_pskd: bool, num_epochs: int = 1,
                     alpha_T: float = 0.8) -> step_lib.LossFn:
  """Masked mean cross-entropy of ``apply``; with ``use_pskd`` against PS-KD's soft targets

      target_i = (1 - alpha_t) onehot(y_i) + alpha_t P[i],    alpha_t = alpha_T (t + 1) / T,

  writing softmax(f(x_i)) into the store P (``model_state["pskd"]``) for the next epoch."""

  def loss_fn(params, model_state, batch, rng):
    del rng
    logits, net_state = apply(params, model_state["net"], batch["image"], train=True)
    w = batch["valid"].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    store = model_state["pskd"]
    if use_pskd:
      current = pskd.PSKDState(store["predictions"], store["seen"] > 0.5)
      targets = pskd.targets(current, batch["index"], batch["label"], epoch=batch["epoch"][0],
                             num_epochs=num_epochs, alpha_T=alpha_T)
      written = pskd.store(current, batch["index"], logits, batch["valid"])
      # The step averages float model state over the data axis; scale this device's write by the device
      # count so the mean over devices is the written value (rows no device wrote stay unchanged).
      d = lax.psum(1, step_lib.DATA_AXIS)
      store = {"predictions": store["predictions"] + d * (written.predictions - store["predictions"]),
               "seen": store["seen"] + d * (written.seen.astype(jnp.float32) - store["seen"])}
    else:
      targets = jax.nn.one_hot(batch["label"], num_classes, dtype=logits.dtype)
    loss = jnp.sum(w * optax.softmax_cross_entropy(logits, targets)) / denom
    accuracy = jnp.sum(w * (jnp.argmax(logits, -1) == batch["label"])) / denom
    return loss, ({"accuracy": accuracy}, {"net": net_state, "pskd": store})

  return loss_fn


def _make_trainer(cfg, train_ds, *, model_kwargs: dict, use_pskd: bool = False, num_epochs: int = 1,
                  alpha_T: float = 0.8) -> _Trainer:
  model = models.make_model(cfg.model, input_shape=train_ds.images.shape[1:], num_classes=train_ds.num_classes,
                            seed=0, **model_kwargs)
  net = models.functional(model)
  mesh = step_lib.data_mesh()
  tx = optax.adam(cfg.learning_rate)
  loss = _classifier_loss(net.apply, num_classes=train_ds.num_classes, use_pskd=use_pskd,
                          num_epochs=num_epochs, alpha_T=alpha_T)
  step = step_lib.make_train_step(loss, tx, mesh=mesh)

  def eval_apply(params, model_state, images, train):
    return net.apply(params, model_state["net"], images, train=train)[0], model_state

  eval_step = step_lib.make_eval_step(train_lib.classification_eval(eval_apply), mesh=mesh)
  probs = jax.jit(lambda s, x: jax.nn.softmax(net.apply(s.params, s.model_state["net"], x, train=False)[0]))
  return _Trainer(net.apply, tx, step, eval_step, probs, mesh)


def _init_state(cfg, trainer: _Trainer, train_ds, seed: int, *, model_kwargs: dict,
                use_pskd: bool = False) -> step_lib.TrainState:
  f = models.functional(models.make_model(cfg.model, input_shape=train_ds.images.shape[1:],
                                          num_classes=train_ds.num_classes, seed=seed, **model_kwargs))
  params = jax.device_get(f.params)
  store = {}
  if use_pskd:
    n, c = train_ds.labels.shape[0], train_ds.num_classes
    store = {"predictions": np.zeros((n, c), np.float32), "seen": np.zeros((n,), np.float32)}
  state = step_lib.TrainState(
      step=np.int32(0), params=params, opt_state=jax.device_get(trainer.tx.init(params)),
      model_state={"net": jax.device_get(f.model_state), "pskd": store}, extra=(),
      rng=np.asarray(jax.random.key_data(jax.random.key(seed))))
  return step_lib.replicate(state, trainer.mesh)


def _train_epoch(trainer: _Trainer, state, train_ds, items: np.ndarray, epoch: int, batch_size: int,
                 rng: np.random.Generator):
  """One pass over ``items`` in random order; the last batch is padded (valid False). Returns
  (state, number of steps)."""
  order = rng.permutation(np.asarray(items))
  steps = 0
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    valid = np.ones(batch_size, bool)
    if len(rows) < batch_size:
      valid[len(rows):] = False
      rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    batch = {"image": train_ds.images[rows], "label": train_ds.labels[rows], "index": rows.astype(np.int32),
             "valid": valid, "epoch": np.full(batch_size, epoch, np.int32)}
    state, _ = trainer.step(state, step_lib.shard_batch(batch, trainer.mesh))
    steps += 1
  return state, steps


def _test_accuracy(cfg, trainer: _Trainer, state, test_ds) -> float:
  return train_lib.evaluate(trainer.eval_step, state, test_ds, cfg.eval_batch_size, trainer.mesh)["accuracy"]


# --- part: PUDF ---------------------------------------------------------------------------------------

def crowd_responses(cfg, train_ds) -> np.ndarray:
  """The artificial crowd's 0/1 answers [crowd_size, N] on every training item (see module docstring)."""
  p = cfg.pudf
  kwargs = {"hidden": tuple(p.crowd_hidden)} if cfg.model == "mlp" else dict(cfg.model_kwargs)
  trainer = _make_trainer(cfg, train_ds, model_kwargs=kwargs)
  n = train_ds.labels.shape[0]
  rng = np.random.default_rng(cfg.seed + 10_000)
  answers = []
  for j in range(p.crowd_size):
    state = _init_state(cfg, trainer, train_ds, 10_000 + cfg.seed * 100 + j, model_kwargs=kwargs)
    subset = rng.choice(n, size=n, replace=True)            # bootstrap resample
    steps = max(1, round(p.crowd_steps * (j + 1) / p.crowd_size))
    done, epoch = 0, 0
    while done < steps:
      batch_rows = rng.choice(subset, size=cfg.batch_size, replace=False)
      batch = {"image": train_ds.images[batch_rows], "label": train_ds.labels[batch_rows],
               "index": batch_rows.astype(np.int32), "valid": np.ones(cfg.batch_size, bool),
               "epoch": np.full(cfg.batch_size, epoch, np.int32)}
      state, _ = trainer.step(state, step_lib.shard_batch(batch, trainer.mesh))
      done += 1
    pred = np.asarray(trainer.probs(state, train_ds.images)).argmax(-1)
    answers.append((pred == train_ds.labels).astype(np.int32))
  return np.stack(answers)


def run_pudf(cfg: ml_collections.ConfigDict) -> dict:
  """PUDF vs random order vs plain training: test accuracy per epoch, selection sizes, abilities."""
  p = cfg.pudf
  train_ds, test_ds = train_lib.load_splits(cfg)
  n = train_ds.labels.shape[0]
  started = time.perf_counter()
  responses = crowd_responses(cfg, train_ds)
  fit = irt.fit_1pl(responses)
  difficulties = np.asarray(fit.difficulties)
  crowd_seconds = time.perf_counter() - started
  _say(cfg, f"pudf: crowd of {p.crowd_size} (accuracy {responses.mean(1).round(3).tolist()}), 1PL fit in "
            f"{int(fit.num_steps)} L-BFGS steps, {crowd_seconds:.1f} s")
  kwargs = dict(cfg.model_kwargs)
  trainer = _make_trainer(cfg, train_ds, model_kwargs=kwargs)
  b = jnp.asarray(difficulties)
  runs = {"pudf": [], "random": [], "plain": []}
  for s in range(cfg.num_seeds):
    seed = cfg.seed + s
    # PUDF
    state = _init_state(cfg, trainer, train_ds, seed, model_kwargs=kwargs)
    schedule = irt.pudf_init(patience=p.patience, bump=p.bump, min_items=cfg.batch_size)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    log = {"accuracy": [], "items": [], "theta": [], "theta_hat": [], "steps": []}
    total = 0
    for epoch in range(p.epochs):
      key, sub = jax.random.split(key)
      probe = np.asarray(irt.probe_indices(sub, n, p.num_probe))
      pred = np.asarray(trainer.probs(state, train_ds.images[probe])).argmax(-1)
      schedule, sel, theta_hat = irt.pudf_step(schedule, b, probe, (pred == train_ds.labels[probe]).astype(np.int32))
      items = np.asarray(sel.indices)[:int(sel.count)]
      state, steps = _train_epoch(trainer, state, train_ds, items, epoch, cfg.batch_size, rng)
      total += steps
      log["accuracy"].append(_test_accuracy(cfg, trainer, state, test_ds))
      log["items"].append(int(sel.count))
      log["theta"].append(float(schedule.theta))
      log["theta_hat"].append(float(theta_hat))
      log["steps"].append(total)
    runs["pudf"].append(log)
    # random order: a random subset of PUDF's size each epoch; plain: everything each epoch
    for method in ("random", "plain"):
      state = _init_state(cfg, trainer, train_ds, seed, model_kwargs=kwargs)
      rng = np.random.default_rng(seed)
      mlog = {"accuracy": [], "items": [], "steps": []}
      total = 0
      for epoch in range(p.epochs):
        size = log["items"][epoch] if method == "random" else n
        items = rng.choice(n, size=size, replace=False)
        state, steps = _train_epoch(trainer, state, train_ds, items, epoch, cfg.batch_size, rng)
        total += steps
        mlog["accuracy"].append(_test_accuracy(cfg, trainer, state, test_ds))
        mlog["items"].append(int(size))
        mlog["steps"].append(total)
      runs[method].append(mlog)
    _say(cfg, f"pudf: seed {seed}: final test accuracy PUDF {log['accuracy'][-1]:.4f}, random order "
              f"{runs['random'][-1]['accuracy'][-1]:.4f}, plain {runs['plain'][-1]['accuracy'][-1]:.4f}")
  return {"epochs": int(p.epochs), "num_items": int(n), "crowd_accuracy": responses.mean(1).tolist(),
          "difficulties": difficulties.tolist(), "irt_steps": int(fit.num_steps), "runs": runs,
          "seeds": [cfg.seed + s for s in range(cfg.num_seeds)]}


# --- part: PS-KD --------------------------------------------------------------------------------------

def run_pskd(cfg: ml_collections.ConfigDict) -> dict:
  """PS-KD vs cross-entropy: test accuracy per epoch and final ECE per seed."""
  s_cfg = cfg.pskd
  train_ds, test_ds = train_lib.load_splits(cfg)
  n = train_ds.labels.shape[0]
  kwargs = dict(cfg.model_kwargs)
  out = {"epochs": int(s_cfg.epochs), "alpha_T": float(s_cfg.alpha_T), "runs": {}}
  for method in ("ce", "pskd"):
    use = method == "pskd"
    trainer = _make_trainer(cfg, train_ds, model_kwargs=kwargs, use_pskd=use, num_epochs=s_cfg.epochs,
                            alpha_T=s_cfg.alpha_T)
    logs = []
    for s in range(cfg.num_seeds):
      seed = cfg.seed + s
      state = _init_state(cfg, trainer, train_ds, seed, model_kwargs=kwargs, use_pskd=use)
      rng = np.random.default_rng(seed)
      acc = []
      for epoch in range(s_cfg.epochs):
        state, _ = _train_epoch(trainer, state, train_ds, np.arange(n), epoch, cfg.batch_size, rng)
        acc.append(_test_accuracy(cfg, trainer, state, test_ds))
      probs = np.asarray(trainer.probs(state, test_ds.images))
      nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(probs)), test_ds.labels], 1e-12))))
      logs.append({"accuracy": acc, "ece": float(pskd.ece(probs, test_ds.labels, s_cfg.ece_bins)), "nll": nll,
                   "seed": seed})
    out["runs"][method] = logs
    _say(cfg, f"pskd: {method}: final accuracy {[round(l['accuracy'][-1], 4) for l in logs]}, "
              f"ECE {[round(l['ece'], 4) for l in logs]}")
  return out


# --- part: learning-curve forecasting ------------------------------------------------------------------

def classify_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``classify`` experiment's config with this run's data, model, learning rate and forecast length."""
  from prox.experiments.configs import classify as classify_config_lib  # pylint: disable=g-import-not-at-top
  c = classify_config_lib.get_config()
  f = cfg.forecast
  c.seed = cfg.seed
  c.dataset, c.data_dir, c.model = cfg.dataset, cfg.data_dir, cfg.model
  c.model_kwargs = ml_collections.ConfigDict(dict(cfg.model_kwargs))
  c.learning_rate = cfg.learning_rate
  c.num_steps = int(f.num_steps)
  c.eval_every = c.log_every = int(f.eval_every)
  c.checkpoint_every = int(f.num_steps)
  c.keep_checkpoints = 1
  c.eval_batch_size = cfg.eval_batch_size
  c.progress = c.tensorboard = False
  c.plot_curves = False
  return c


def run_forecast(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``classify`` and forecasts its final test accuracy from prefixes of its curve."""
  f = cfg.forecast
  # one directory per setting, so a changed config never resumes another config's checkpoint
  digest = hashlib.sha1(json.dumps(_settings(cfg, "forecast"), sort_keys=True).encode()).hexdigest()[:10]
  run_dir = os.path.join(workdir, f"forecast_classify_{digest}")
  final = train_lib.train(classify_config(cfg), run_dir)
  records = writers.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  test = [(r["step"], r["accuracy"]) for r in records if r.get("split") == "test"]
  x = np.asarray([t[0] for t in test], np.float64)
  y = np.asarray([t[1] for t in test], np.float64)
  x_final, actual = float(f.num_steps), float(final["test_accuracy"])
  at_fraction = []
  for frac in f.fractions:
    k = int(np.sum(x <= frac * f.num_steps))
    if k < 4:
      at_fraction.append({"fraction": float(frac), "points": k, "skipped": "fewer than 4 evaluations"})
      continue
    fc = forecast_lib.forecast(x[:k], y[:k], x_final, num_bootstrap=f.num_bootstrap, level=f.level, seed=cfg.seed)
    at_fraction.append({"fraction": float(frac), "step": int(x[k - 1]), "points": k, "family": fc.family,
                        "predicted": fc.predicted, "lower": fc.lower, "upper": fc.upper, "actual": actual,
                        "error": fc.predicted - actual, "covered": bool(fc.lower <= actual <= fc.upper),
                        "best_so_far": float(y[:k].max())})
  stop = None
  for k in range(max(int(f.min_points), 4), len(x) + 1):
    fc = forecast_lib.forecast(x[:k], y[:k], x_final, num_bootstrap=f.num_bootstrap, level=f.level, seed=cfg.seed)
    if forecast_lib.should_stop(fc, float(y[:k].max()), min_gain=f.min_gain):
      stop = {"step": int(x[k - 1]), "best_so_far": float(y[:k].max()), "predicted": fc.predicted,
              "upper": fc.upper, "final": actual, "steps_saved_fraction": 1.0 - float(x[k - 1]) / x_final}
      break
  _say(cfg, f"forecast: final accuracy {actual:.4f}; stop rule "
            + (f"fires at step {stop['step']}" if stop else "never fires"))
  return {"steps": x.tolist(), "accuracy": y.tolist(), "final": actual, "at_fraction": at_fraction,
          "stop": stop, "min_gain": float(f.min_gain), "level": float(f.level)}


# --- driver -------------------------------------------------------------------------------------------

def _say(cfg, message: str) -> None:
  if cfg.progress and jax.process_index() == 0:
    print(message, flush=True)


def _settings(cfg: ml_collections.ConfigDict, part: str) -> dict:
  """The config values a part's result depends on (a saved part is reused only if they match)."""
  shared = {k: cfg[k] for k in ("seed", "num_seeds", "dataset", "model", "learning_rate", "batch_size")}
  shared["model_kwargs"] = dict(cfg.model_kwargs)
  own = cfg[part].to_dict() if part in cfg else {}
  return json.loads(json.dumps({"shared": shared, "part": own}, default=list))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the selected parts, then writes results.json, results.md and the plots into ``workdir``."""
  validate(config, workdir)
  results = {}
  for part in parts(config):
    path = os.path.join(workdir, f"{part}.json")
    settings = _settings(config, part)
    if os.path.exists(path):
      with open(path) as fh:
        saved = json.load(fh)
      if saved.get("settings") == settings:
        results[part] = saved["result"]
        _say(config, f"{part}: reusing {path}")
        continue
    started = time.perf_counter()
    if part == "alp_gmm":
      result = run_alp_gmm(config)
    elif part == "pudf":
      result = run_pudf(config)
    elif part == "pskd":
      result = run_pskd(config)
    else:
      result = run_forecast(config, workdir)
    result["seconds"] = time.perf_counter() - started
    results[part] = result
    if jax.process_index() == 0:
      with open(path + ".tmp", "w") as fh:
        json.dump({"settings": settings, "result": result}, fh)
      os.replace(path + ".tmp", path)
  summary = report.summary(results)
  if jax.process_index() == 0:
    report.write(workdir, config, results, summary)
  return summary
