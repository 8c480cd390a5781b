"""Experiment ``curriculum``: curriculum teachers and self-distillation.

Parts (``config.parts``, comma-separated):

* ``alp_gmm``: ALP-GMM (Portelas et al. 2019) vs random task sampling on the toy env (10 x 10 grid,
  neighbour-gated competence), ``episodes`` episodes over ``seeds`` seeds, all seeds of a teacher in one
  jitted, vmapped ``lax.scan`` (``prox.tasks.toy_env.run``); mastered cells every ``score_every``
  episodes, a mastery plot and a picture of where ALP-GMM samples over time.
* ``pudf``: PUDF (Meng, Lalor et al. 2024) vs random order vs plain training on ``digits``. Item
  difficulties b_i come from a 1PL IRT fit (``irt.fit_1pl``) of an artificial crowd's answers:
  ``crowd_size`` small MLPs, member j trained for ``crowd_steps (j + 1) / crowd_size`` Adam steps on a
  bootstrap resample of the training set, answer every training item. Training runs on ``prox.loop``
  with an ``irt.SubsetSource``: before each epoch (a start / epoch-boundary action) the model's ability
  theta is estimated by MAP from its answers on ``num_probe`` random training items and the epoch
  trains on {i : b_i <= theta} (stall bump after ``patience`` epochs; ``irt.pudf_step``, whose state
  lives in ``TrainState.extra``). "random order" trains each epoch on a uniformly random subset of the
  size PUDF chose that epoch (same seed), so it isolates *which* items are chosen; "plain" trains on the
  whole training set every epoch.
* ``pskd``: PS-KD (Kim et al. 2021) vs plain cross-entropy on ``digits``, same initialisation and batch
  order: test accuracy per epoch, final expected calibration error and NLL. The per-sample prediction
  store lives in ``TrainState.extra["pskd"]``; the loss reads it as soft targets
  (``pskd.targets_fn``, the epoch from the batch metadata) and a step transition writes the batch's
  predictions into it inside the compiled step (``pskd.transition``).
* ``forecast``: trains the ``classify`` experiment (its config with this model, data and learning rate;
  evaluations every ``eval_every`` steps) and fits the learning-curve forecaster (``prox.tasks.forecast``)
  to its test-accuracy curve after each fraction in ``fractions`` of the run: predicted vs actual final
  accuracy and interval, and where the stopping rule (``should_stop``: the interval's top gains less than
  ``min_gain`` over the best so far) first fires.

Every epoch of the digits parts visits its items once; its last batch is completed with the epoch's
first items (``SubsetSource``), so every row of every batch is a real example.

Departures: the crowd is built once per run (seed ``seed``) and its difficulties are shared by all
training seeds; PUDF never trains on fewer than ``batch_size`` items (the easiest ones, ties by index),
so an epoch is never empty. With a crowd of J members a 1PL difficulty takes at most J + 1 values, so
the first epochs' items, and how fast PUDF's ability estimate grows from them, depend on the crowd's
draw (results.md shows their classes).

Output in ``workdir``: ``results.json``, ``results.md`` (a table per part) and PNG plots. Every run (a
teacher comparison, the crowd, one method and seed, the forecast) has its own directory under
``workdir/<part>/`` with its ``config.json`` and ``result.json``; a run that finished is reused when the
command is run again (``common.run_once``).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from prox import loop
from prox import models
from prox import step as step_lib
from prox.experiments import _curriculum_report as curriculum_report
from prox.experiments import classify
from prox.experiments import common
from prox.experiments import report
from prox.losses import classification_loss
from prox.tasks import EpochSource
from prox.tasks import alp_gmm
from prox.tasks import data as data_lib
from prox.tasks import forecast as forecast_lib
from prox.tasks import irt
from prox.tasks import pskd
from prox.tasks import toy_env

PARTS = ("alp_gmm", "pudf", "pskd", "forecast")
ConfigError = common.ConfigError

# ``--config.quick=True``: a tiny run of every part (tests, smoke checks); applied by ``prox``.
QUICK = {
    "num_seeds": 1,
    "model_kwargs.hidden": (32,),
    "alp_gmm.episodes": 1_000,
    "alp_gmm.seeds": 2,
    "alp_gmm.score_every": 250,
    "alp_gmm.fit_rate": 100,
    "pudf.epochs": 3,
    "pudf.crowd_size": 3,
    "pudf.crowd_steps": 10,
    "pudf.num_probe": 200,
    "pskd.epochs": 3,
    "forecast.num_steps": 200,
    "forecast.eval_every": 20,
    "forecast.fractions": (0.5, 0.75),
    "forecast.num_bootstrap": 10,
}
# Each run has its own directory and record, so other parts or more seeds may follow in the same workdir.
RESUMABLE = ("parts", "num_seeds")


# --- validation ---------------------------------------------------------------------------------------

def parts(config: ml_collections.ConfigDict) -> list[str]:
  """The parts ``config.parts`` names, in the order given."""
  names = common.names(config, "parts", PARTS)
  common.require(len(set(names)) == len(names), f"parts names a part twice: {config.parts!r}")
  return names


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the selected parts use; raises ``ConfigError`` naming the first bad one."""
  selected = parts(config)
  common.positive_ints(config, "seed", zero_ok=True)
  if "alp_gmm" in selected:
    a = config.alp_gmm
    common.positive_ints(config, "alp_gmm.episodes", "alp_gmm.seeds", "alp_gmm.score_every", "alp_gmm.fit_rate")
    common.require(a.episodes % a.score_every == 0,
                   f"alp_gmm.episodes ({a.episodes}) must be a multiple of alp_gmm.score_every ({a.score_every})")
    try:
      low, high = (np.asarray(v, np.float64) for v in a.bounds)
    except (TypeError, ValueError):
      raise ConfigError(f"alp_gmm.bounds must be a pair (low, high) of 2-vectors, got {a.bounds!r}") from None
    common.require(low.shape == (2,) and high.shape == (2,),
                   f"alp_gmm.bounds must be a pair (low, high) of 2-vectors (the toy env is 2-D), got {a.bounds!r}")
    common.library_check("alp_gmm", alp_gmm.init, (tuple(low), tuple(high)), key=jax.random.key(0),
                         fit_rate=a.fit_rate, random_task_ratio=a.random_task_ratio,
                         history_size=max(a.episodes, 6))
  if {"pudf", "pskd", "forecast"} & set(selected):
    common.check_data(config)
    common.check_model(config)
    common.numbers(config, "learning_rate", low=0, low_open=True)
    common.positive_ints(config, "num_seeds")
    common.check_batch("batch_size", config.batch_size)
    common.check_batch("eval_batch_size", config.eval_batch_size)
  if "pudf" in selected:
    p = config.pudf
    common.positive_ints(config, "pudf.epochs", "pudf.crowd_steps", "pudf.num_probe")
    common.require(common.is_int(p.crowd_size) and p.crowd_size >= 2,
                   f"pudf.crowd_size must be an integer >= 2, got {p.crowd_size!r}")
    common.library_check("pudf", irt.pudf_init, patience=p.patience, bump=p.bump)
    if config.model == "mlp":
      common.library_check("pudf.crowd_hidden", models.check_options, "mlp", input_shape=(8, 8, 1),
                           num_classes=10, hidden=tuple(p.crowd_hidden))
  if "pskd" in selected:
    common.positive_ints(config, "pskd.epochs", "pskd.ece_bins")
    common.library_check("pskd", pskd.targets_fn, num_epochs=config.pskd.epochs, alpha_T=config.pskd.alpha_T)
  if "forecast" in selected:
    f = config.forecast
    common.positive_ints(config, "forecast.num_steps", "forecast.eval_every", "forecast.min_points")
    common.require(f.min_points >= 4, f"forecast.min_points must be >= 4 (3-parameter curves), got {f.min_points}")
    common.require(f.num_steps // f.eval_every >= 4,
                   f"forecast.num_steps / forecast.eval_every must give >= 4 evaluations, got "
                   f"{f.num_steps} / {f.eval_every}")
    common.require(len(f.fractions) > 0 and all(common.is_number(x) and 0 < x < 1 for x in f.fractions),
                   f"forecast.fractions must lie in (0, 1), got {tuple(f.fractions)}")
    common.numbers(config, "forecast.min_gain", low=0)
    common.positive_ints(config, "forecast.num_bootstrap", zero_ok=True)
    common.numbers(config, "forecast.level", low=0, high=1, low_open=True, high_open=True)
  if workdir is not None:
    common.check_workdir(workdir)


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
  for name, teacher in teachers.items():
    started = time.perf_counter()
    res = jax.block_until_ready(toy_env.run(teacher, keys, num_episodes=int(a.episodes),
                                            score_every=int(a.score_every), **kwargs[name]))
    seconds = time.perf_counter() - started
    scores = np.asarray(res.scores)
    out["teachers"][name] = {"scores": scores.tolist(), "seconds": seconds,
                             "final_competence_seed0": np.asarray(res.env_state.competence[0]).tolist()}
    if name == "alp_gmm":
      out["alp_gmm_tasks_seed0"] = np.asarray(res.tasks[0])[:, :2].round(4).tolist()
    _say(cfg, f"alp_gmm: {name} {a.seeds} seeds x {a.episodes} episodes in {seconds:.1f} s, "
              f"final mastered {scores[:, -1].tolist()}")
  return out


# --- digits training on the loop, shared by pudf and pskd ---------------------------------------------

def probabilities(apply: Callable) -> Callable[[step_lib.TrainState, np.ndarray], np.ndarray]:
  """``predict(state, images) -> softmax`` of ``apply`` in eval mode (jitted; one compile serves every
  model of the same architecture, whatever its parameters)."""
  fn = jax.jit(lambda params, model_state, x: jax.nn.softmax(apply(params, model_state, x, train=False)[0], -1))
  return lambda state, images: np.asarray(fn(state.params, state.model_state, images))


_pudf_step = jax.jit(irt.pudf_step)


def train_epochs(cfg: ml_collections.ConfigDict, net: models.Functional, step: Callable,
                 tx: optax.GradientTransformation, source: irt.SubsetSource, test_ds: data_lib.ArrayDataset,
                 *, seed: int, evaluate: Callable, extra: Any = (),
                 select: Callable[[loop.Context], step_lib.TrainState | None] | None = None,
                 cache: loop.CompileCache | None = None) -> loop.LoopResult:
  """Trains ``net`` on the epochs of ``source`` with ``prox.loop.run``; after each epoch the test accuracy,
  the epoch's item count and the step count go into the record; ``select`` (an action) runs at the start
  and after each epoch, after the test, and may change the source's items and the state."""
  mesh = step_lib.data_mesh()
  state = common.replicated_state(net.params, tx, mesh, seed=seed, model_state=net.model_state, extra=extra)

  def after_epoch(ctx: loop.Context) -> None:
    rec = ctx.record
    rec.setdefault("accuracy", []).append(evaluate(ctx.state, test_ds, cfg.eval_batch_size)["accuracy"])
    rec.setdefault("items", []).append(len(source.items))   # the finished epoch's (select runs after this)
    rec.setdefault("steps", []).append(ctx.step)

  actions = [(loop.Every(boundary="epoch"), after_epoch)]
  if select is not None:
    actions.append((loop.Every(start=True, boundary="epoch"), select))
  upper = source.num_epochs * -(-len(source.ds.labels) // cfg.batch_size)   # the source ends the run
  return loop.run(step, state, source, mesh=mesh, batch_size=cfg.batch_size, num_steps=upper,
                  actions=tuple(actions), compile_cache=cache)


# --- part: PUDF ---------------------------------------------------------------------------------------

def crowd_responses(cfg: ml_collections.ConfigDict, train_ds: data_lib.ArrayDataset) -> dict:
  """The artificial crowd's 0/1 answers [crowd_size, N] on every training item (see module docstring):
  member j trains with ``prox.loop.run`` on epochs of its bootstrap resample."""
  p = cfg.pudf
  kwargs = {"hidden": tuple(p.crowd_hidden)} if cfg.model == "mlp" else dict(cfg.model_kwargs)
  n = len(train_ds.labels)
  mesh = step_lib.data_mesh()
  tx = optax.adam(cfg.learning_rate)
  cache = loop.CompileCache()
  step = predict = None
  answers = []
  for j in range(p.crowd_size):
    net = models.functional(models.make_model(cfg.model, input_shape=train_ds.images.shape[1:],
                                              num_classes=train_ds.num_classes,
                                              seed=10_000 + cfg.seed * 100 + j, **kwargs))
    if step is None:   # one step and one prediction function (one compile each) for the whole crowd
      step = step_lib.make_train_step(classification_loss(net.apply), tx, mesh=mesh)
      predict = probabilities(net.apply)
    rows = np.random.default_rng([cfg.seed, 10_000 + j]).choice(n, size=n, replace=True)   # bootstrap
    resample = data_lib.ArrayDataset(train_ds.images[rows], train_ds.labels[rows], train_ds.num_classes,
                                     f"{train_ds.name}-bootstrap{j}")
    state = common.replicated_state(net.params, tx, mesh, seed=cfg.seed, model_state=net.model_state)
    result = loop.run(step, state, EpochSource(resample, cfg.seed + j), mesh=mesh, batch_size=cfg.batch_size,
                      num_steps=max(1, round(p.crowd_steps * (j + 1) / p.crowd_size)), compile_cache=cache)
    pred = predict(result.state, train_ds.images).argmax(-1)
    answers.append((pred == train_ds.labels).astype(np.int32))
  responses = np.stack(answers)
  fit = irt.fit_1pl(responses)
  return {"responses": responses.tolist(), "difficulties": np.asarray(fit.difficulties).tolist(),
          "irt_steps": int(fit.num_steps)}


def pudf_run(cfg: ml_collections.ConfigDict, method: str, seed: int, difficulties: np.ndarray,
             sizes: list[int] | None, splits: tuple, tools: dict) -> dict:
  """One training run of ``method`` (pudf, random, plain); ``sizes``: PUDF's item counts (random)."""
  p = cfg.pudf
  train_ds, test_ds = splits
  n = len(train_ds.labels)
  net = common.build_model(cfg, train_ds, seed=seed)
  source = irt.SubsetSource(train_ds, seed, num_epochs=p.epochs)
  mesh = step_lib.data_mesh()
  log: dict[str, list] = {"theta": [], "theta_hat": []}
  extra, select = (), None
  if method == "pudf":
    b = np.asarray(difficulties, np.float32)
    extra = {"pudf": irt.pudf_init(patience=p.patience, bump=p.bump, min_items=cfg.batch_size)}

    def select(ctx: loop.Context) -> step_lib.TrainState | None:
      """The ability estimate on the probe items, then PUDF's items for the next epoch."""
      epoch = source.epoch
      if epoch >= p.epochs:
        return None
      probe = np.asarray(irt.probe_indices(jax.random.fold_in(jax.random.key(seed), epoch), n, p.num_probe))
      correct = tools["predict"](ctx.state, train_ds.images[probe]).argmax(-1) == train_ds.labels[probe]
      schedule, sel, theta_hat = _pudf_step(ctx.state.extra["pudf"], b, probe, correct)
      source.select(np.asarray(sel.indices)[:int(sel.count)])
      log["theta"].append(float(schedule.theta))
      log["theta_hat"].append(float(theta_hat))
      return ctx.state._replace(extra={**ctx.state.extra, "pudf": step_lib.replicate(jax.device_get(schedule), mesh)})
  elif method == "random":

    def select(ctx: loop.Context) -> None:
      """A uniformly random subset of the size PUDF chose for this epoch."""
      epoch = source.epoch
      if epoch < p.epochs:
        source.select(np.sort(np.random.default_rng([seed, epoch, 1]).choice(n, size=sizes[epoch], replace=False)))

  result = train_epochs(cfg, net, tools["step"], tools["tx"], source, test_ds, seed=seed,
                        evaluate=tools["evaluate"], extra=extra, select=select,
                        cache=tools["caches"].setdefault(method, loop.CompileCache()))
  out = {k: result.record[k] for k in ("accuracy", "items", "steps")}
  if method == "pudf":
    out.update(log)
  return out


def run_pudf(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """PUDF vs random order vs plain training: test accuracy per epoch, selection sizes, abilities."""
  p = cfg.pudf
  splits = train_ds, _ = common.load_splits(cfg)
  shared = _shared(cfg)
  started = time.perf_counter()
  crowd = _once(workdir, "pudf/crowd", {**shared, "seed": cfg.seed, "pudf": p.to_dict()},
                lambda: crowd_responses(cfg, train_ds))
  responses = np.asarray(crowd["responses"])
  _say(cfg, f"pudf: crowd of {p.crowd_size} (accuracy {responses.mean(1).round(3).tolist()}), 1PL fit in "
            f"{crowd['irt_steps']} L-BFGS steps, {time.perf_counter() - started:.1f} s")
  net = common.build_model(cfg, train_ds)
  tx = optax.adam(cfg.learning_rate)
  mesh = step_lib.data_mesh()
  tools = {"tx": tx, "step": step_lib.make_train_step(classification_loss(net.apply), tx, mesh=mesh),
           "evaluate": common.evaluator(net.apply, mesh), "predict": probabilities(net.apply), "caches": {}}
  runs: dict[str, list] = {"pudf": [], "random": [], "plain": []}
  for seed in common.seeds(cfg):
    for method in runs:
      sizes = runs["pudf"][-1]["items"] if method == "random" else None
      settings = {**shared, "seed": seed, "method": method, "pudf": p.to_dict(), "crowd_seed": cfg.seed}
      runs[method].append(_once(workdir, f"pudf/{method}_seed{seed}", settings, functools.partial(
          pudf_run, cfg, method, seed, crowd["difficulties"], sizes, splits, tools)))
    _say(cfg, f"pudf: seed {seed}: final test accuracy PUDF {runs['pudf'][-1]['accuracy'][-1]:.4f}, random order "
              f"{runs['random'][-1]['accuracy'][-1]:.4f}, plain {runs['plain'][-1]['accuracy'][-1]:.4f}")
  first = irt.select(-np.inf, np.asarray(crowd["difficulties"], np.float32), cfg.batch_size)
  first_classes = np.bincount(train_ds.labels[np.asarray(first.indices)[:int(first.count)]],
                              minlength=train_ds.num_classes)
  return {"epochs": int(p.epochs), "num_items": len(train_ds.labels), "crowd_accuracy": responses.mean(1).tolist(),
          "first_items": int(first.count), "first_items_classes": first_classes.tolist(),
          "difficulties": crowd["difficulties"], "irt_steps": crowd["irt_steps"], "runs": runs,
          "seeds": list(common.seeds(cfg)),
          "seconds": crowd["seconds"] + sum(r["seconds"] for logs in runs.values() for r in logs)}


# --- part: PS-KD --------------------------------------------------------------------------------------

def pskd_run(cfg: ml_collections.ConfigDict, method: str, seed: int, splits: tuple, tools: dict) -> dict:
  """One run of ``method`` (ce, pskd): test accuracy per epoch, final ECE and NLL."""
  s = cfg.pskd
  train_ds, test_ds = splits
  net = common.build_model(cfg, train_ds, seed=seed)
  extra = {"pskd": pskd.init(len(train_ds.labels), train_ds.num_classes)} if method == "pskd" else ()
  source = irt.SubsetSource(train_ds, seed, num_epochs=s.epochs)
  result = train_epochs(cfg, net, tools["steps"][method], tools["tx"], source, test_ds, seed=seed,
                        evaluate=tools["evaluate"], extra=extra,
                        cache=tools["caches"].setdefault(method, loop.CompileCache()))
  probs = tools["predict"](result.state, test_ds.images)
  nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(probs)), test_ds.labels], 1e-12))))
  return {"accuracy": result.record["accuracy"], "ece": float(pskd.ece(probs, test_ds.labels, s.ece_bins)),
          "nll": nll, "seed": seed}


def pskd_steps(apply: Callable, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *, num_epochs: int,
               alpha_T: float) -> dict[str, Callable]:
  """The two train steps: cross-entropy, and PS-KD (soft targets from the store ``extra["pskd"]``, which a
  transition updates with the batch's predictions inside the step)."""
  loss = classification_loss(apply, targets_fn=pskd.targets_fn(num_epochs=num_epochs, alpha_T=alpha_T))
  return {"ce": step_lib.make_train_step(classification_loss(apply), tx, mesh=mesh),
          "pskd": step_lib.make_train_step(loss, tx, mesh=mesh, transition=pskd.transition(apply))}


def run_pskd(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """PS-KD vs cross-entropy: test accuracy per epoch and final ECE per seed."""
  s = cfg.pskd
  splits = train_ds, _ = common.load_splits(cfg)
  net = common.build_model(cfg, train_ds)
  tx = optax.adam(cfg.learning_rate)
  mesh = step_lib.data_mesh()
  tools = {"tx": tx, "evaluate": common.evaluator(net.apply, mesh), "predict": probabilities(net.apply),
           "caches": {}, "steps": pskd_steps(net.apply, tx, mesh, num_epochs=s.epochs, alpha_T=s.alpha_T)}
  out = {"epochs": int(s.epochs), "alpha_T": float(s.alpha_T), "runs": {"ce": [], "pskd": []}}
  for method, logs in out["runs"].items():
    for seed in common.seeds(cfg):
      settings = {**_shared(cfg), "seed": seed, "method": method, "pskd": s.to_dict()}
      logs.append(_once(workdir, f"pskd/{method}_seed{seed}", settings,
                        functools.partial(pskd_run, cfg, method, seed, splits, tools)))
    _say(cfg, f"pskd: {method}: final accuracy {[round(l['accuracy'][-1], 4) for l in logs]}, "
              f"ECE {[round(l['ece'], 4) for l in logs]}")
  out["seconds"] = sum(r["seconds"] for logs in out["runs"].values() for r in logs)
  return out


# --- part: learning-curve forecasting ------------------------------------------------------------------

def classify_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``classify`` experiment's config with this run's data, model, learning rate and forecast length."""
  from prox.experiments.configs import classify as classify_configs  # pylint: disable=g-import-not-at-top
  c = classify_configs.get_config()
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


def forecast_run(cfg: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains ``classify`` in ``run_dir/classify`` and forecasts its final test accuracy from prefixes of
  its curve."""
  f = cfg.forecast
  classify_dir = os.path.join(run_dir, "classify")
  final = classify.train_and_evaluate(classify_config(cfg), classify_dir)
  records = report.read_metrics(os.path.join(classify_dir, "metrics.jsonl"))
  test = [(r["step"], r["accuracy"]) for r in records if r.get("split") == "test"]
  x = np.asarray([t[0] for t in test], np.float64)
  y = np.asarray([t[1] for t in test], np.float64)
  x_final, actual = float(f.num_steps), float(final["test_accuracy"])
  fit = functools.partial(forecast_lib.forecast, num_bootstrap=f.num_bootstrap, level=f.level, seed=cfg.seed)
  at_fraction = []
  for frac in f.fractions:
    k = int(np.sum(x <= frac * f.num_steps))
    if k < 4:
      at_fraction.append({"fraction": float(frac), "points": k, "skipped": "fewer than 4 evaluations"})
      continue
    fc = fit(x[:k], y[:k], x_final)
    at_fraction.append({"fraction": float(frac), "step": int(x[k - 1]), "points": k, "family": fc.family,
                        "predicted": fc.predicted, "lower": fc.lower, "upper": fc.upper, "actual": actual,
                        "error": fc.predicted - actual, "covered": bool(fc.lower <= actual <= fc.upper),
                        "best_so_far": float(y[:k].max())})
  stop = None
  for k in range(max(int(f.min_points), 4), len(x) + 1):
    fc = fit(x[:k], y[:k], x_final)
    if forecast_lib.should_stop(fc, float(y[:k].max()), min_gain=f.min_gain):
      stop = {"step": int(x[k - 1]), "best_so_far": float(y[:k].max()), "predicted": fc.predicted,
              "upper": fc.upper, "final": actual, "steps_saved_fraction": 1.0 - float(x[k - 1]) / x_final}
      break
  _say(cfg, f"forecast: final accuracy {actual:.4f}; stop rule "
            + (f"fires at step {stop['step']}" if stop else "never fires"))
  return {"steps": x.tolist(), "accuracy": y.tolist(), "final": actual, "at_fraction": at_fraction,
          "stop": stop, "min_gain": float(f.min_gain), "level": float(f.level)}


def run_forecast(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  settings = {"classify": classify_config(cfg).to_dict(), "forecast": cfg.forecast.to_dict()}
  run_dir = os.path.join(workdir, "forecast")
  return _once(workdir, "forecast", settings, lambda: forecast_run(cfg, run_dir))


# --- driver -------------------------------------------------------------------------------------------

def _say(cfg: ml_collections.ConfigDict, message: str) -> None:
  if cfg.progress and jax.process_index() == 0:
    print(message, flush=True)


def _shared(cfg: ml_collections.ConfigDict) -> dict:
  """The settings every digits run depends on."""
  return {"dataset": cfg.dataset, "model": cfg.model, "model_kwargs": cfg.model_kwargs.to_dict(),
          "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size}


def _once(workdir: str, name: str, settings: dict, fn: Callable[[], dict]) -> dict:
  """``fn()`` run once in ``workdir/name`` (reused when it finished before with the same settings); its
  wall time (compiles included) is the result's ``seconds``."""

  def timed() -> dict:
    started = time.perf_counter()
    out = fn()
    out["seconds"] = time.perf_counter() - started
    return out

  return common.run_once(os.path.join(workdir, name), "curriculum", settings, timed)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the selected parts, then writes results.json, results.md and the plots into ``workdir``."""
  validate(config, workdir)
  results = {}
  for part in parts(config):
    if part == "alp_gmm":
      settings = {"seed": config.seed, "alp_gmm": config.alp_gmm.to_dict()}
      result = _once(workdir, "alp_gmm", settings, lambda: run_alp_gmm(config))
    elif part == "pudf":
      result = run_pudf(config, workdir)
    elif part == "pskd":
      result = run_pskd(config, workdir)
    else:
      result = run_forecast(config, workdir)
    results[part] = result
  summary = curriculum_report.summary(results)
  shown = {k: ({kk: vv for kk, vv in v.items() if kk != "alp_gmm_tasks_seed0"} if k == "alp_gmm" else v)
           for k, v in results.items()}
  report.write_results(workdir, {"config": config, "summary": summary, "results": shown},
                       curriculum_report.markdown(results), curriculum_report.figures(results))
  return summary
