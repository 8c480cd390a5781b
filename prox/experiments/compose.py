"""Experiment ``compose``: four progressive methods in one step and one loop.

One run trains an MLP on a continuous family of digits tasks while
  * a batch-size controller grows the batch when the norm test asks (AdAdaGrad; exact per-example
    moments from layer taps, in the step);
  * N:M masks decay towards 2:4 (MdGf; the schedule counts samples, since the batch grows);
  * a shift detector watches the loss and, when it fires, EWC consolidates inside the step with the
    Fisher of that step's own batch (online EWC);
  * an ALP-GMM teacher chooses the next task after every episode of ``episode_steps`` steps (its
    reward: the accuracy on the episode's fresh batches before each update; the EM refit runs as its
    own jitted function after each episode, not in the step).
Each method can be switched off, so the sweep compares plain training, each method alone and all four.

Tasks: a digits image transformed by ``(p, s)`` in [0, 1]^2: the pixels of the first ``round(64 p)``
positions of a fixed random order are rotated among themselves (``p = 1``: a fixed permutation of all
pixels) and Gaussian noise of standard deviation ``3 s`` is added (``s`` near 1: hardly learnable).
Nearby tasks share most of their input mapping, distant ones interfere, and the noisy corner offers
little progress: where a teacher spends the samples matters. Evaluation: the test split under a 5 x 5
grid of tasks.

Outputs: ``results.md``, ``results.json``, ``accuracy_over_time.png`` (mean grid accuracy and its noise
bands per method), ``composed.png`` (the composed run: batch size, mask beta, consolidations, teacher
samples over the task square), ``runs/<method>/seed<k>/``.
"""
from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from prox import loop
from prox import optim
from prox import step as step_lib
from prox.experiments import common
from prox.experiments import report
from prox.losses import classification_loss
from prox.tasks import ParametricTaskSource, episodic_teacher
from prox.tasks.shift_detector import shift_detector
from prox.transforms import ewc as ewc_lib
from prox.transforms import forward_params, nm_sparsity

RUNS = {"plain": (), "norm_test": ("batch",), "nm": ("nm",), "ewc_detector": ("ewc",),
        "alp_gmm": ("teacher",), "composed": ("batch", "nm", "ewc", "teacher")}
QUICK = {"num_seeds": 1, "budget_samples": 12_000, "b_max": 256, "episode_steps": 10, "fit_rate": 10,
         "eval_every_samples": 4_000, "detector.reference_window": 10, "detector.test_window": 3,
         "model_kwargs.hidden": (64, 64)}
RESUMABLE = ("num_seeds", "runs", "eval_every_samples", "log_every")
GRID = np.linspace(0.0, 1.0, 5)


# --- the task family ----------------------------------------------------------------------------------

def family(seed: int, num_pixels: int):
  """``transform(batch, task, rng)`` of the digits family (module docstring)."""
  order = np.random.default_rng((seed, 1)).permutation(num_pixels)

  def transform(batch: dict, task: np.ndarray, rng: np.random.Generator) -> dict:
    x = batch["image"].reshape(len(batch["label"]), -1)
    k = int(round(float(task[0]) * num_pixels))
    if k > 1:
      x = x.copy()
      x[:, order[:k]] = x[:, np.roll(order[:k], 1)]
    x = x + 3.0 * float(task[1]) * rng.standard_normal(x.shape).astype(np.float32)
    return {**batch, "image": x.reshape(batch["image"].shape).astype(np.float32)}

  return transform


# --- config -----------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  c = config
  common.check_data(c)
  common.check_mesh(c)
  common.check_model(c)
  common.check_optimizer(c)
  common.names(c, "runs", RUNS)
  common.positive_ints(c, "seed", zero_ok=True)
  common.positive_ints(c, "num_seeds", "b0", "b_max", "budget_samples", "episode_steps", "fit_rate",
                       "eval_every_samples", "log_every", "checkpoint_every", "eval_batch_size",
                       "detector.reference_window", "detector.test_window")
  common.numbers(c, "eta", "ewc_lambda", "detector.threshold", low=0, low_open=True)
  common.numbers(c, "ewc_gamma", "decay_end", low=0, high=1)
  common.check_batch("b0", c.b0)
  common.check_batch("eval_batch_size", c.eval_batch_size)
  common.library_check("b0/b_max", optim.batch_size_init, c.b0, c.b_max, multiple_of=c.b0)
  common.library_check("sparsity", nm_sparsity, optax.sgd(0.1), c.n, c.m, method="mdgf",
                       clock="samples", total_samples=c.budget_samples, decay_end=c.decay_end)
  common.library_check("detector", shift_detector, c.detector.reference_window, c.detector.test_window,
                       c.detector.threshold)
  if workdir is not None:
    common.check_workdir(workdir)


# --- one run: the composition -------------------------------------------------------------------------

class Composition(NamedTuple):
  """The methods as the step and the loop take them."""
  tx: optax.GradientTransformation
  forward_fn: Any
  transition: Any
  extra: dict
  step_options: dict
  refit: Any                      # (state, key) -> state: the teacher's EM, a jitted action


def composition(c: ml_collections.ConfigDict, apply: Any, methods: tuple[str, ...], key: jax.Array) -> Composition:
  """The user code of the composition: ``methods`` from (``batch``, ``nm``, ``ewc``, ``teacher``)."""
  inner = common.build_optimizer(c)
  if "ewc" in methods:
    inner = optax.chain(ewc_lib.ewc(c.ewc_lambda, mode="online", gamma=c.ewc_gamma), inner)
  tx = (nm_sparsity(inner, c.n, c.m, method="mdgf", clock="samples", total_samples=c.budget_samples,
                    decay_end=c.decay_end) if "nm" in methods else inner)
  forward = forward_params if "nm" in methods else None
  teacher = episodic_teacher("alp_gmm" if "teacher" in methods else "random", ([0.0, 0.0], [1.0, 1.0]),
                             episode_steps=c.episode_steps,
                             **({"fit_rate": c.fit_rate, "history_size": 256} if "teacher" in methods else {}))
  ctrl = optim.adaptive_batch_size("norm", b0=c.b0, b_max=c.b_max, multiple_of=c.b0, eta=c.eta)
  detector = shift_detector(c.detector.reference_window, c.detector.test_window, c.detector.threshold)

  lr = c.learning_rate
  stable = (0.5 * ewc_lib.sgd_stability_limit(c.optimizer_kwargs.get("momentum", 0.0),
                                              nesterov=c.optimizer_kwargs.get("nesterov", False))
            if c.optimizer == "sgd" else jnp.inf)       # the peak rate; adaptive optimizers normalise the step

  def logprob(params, image, label):       # one example, through the weights the forward pass uses
    return jax.nn.log_softmax(apply(params, {}, image[None], train=False)[0][0])[label]

  def ewc_on_shift(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    det, fired = detector.update(state.extra["detector"], info.loss)

    def consolidate(s):
      fwd = info.params if forward is None else forward(info.params, info.opt_state)
      g = jax.vmap(jax.grad(logprob), in_axes=(None, 0, 0))(fwd, info.batch["image"], info.batch["label"])
      w = info.valid.astype(jnp.float32) / jnp.sum(info.valid)         # the batch's real rows
      fisher = jax.tree.map(lambda x: jnp.tensordot(w, x * x, axes=1), g)
      opt_state = ewc_lib.consolidate_opt_state(s.opt_state, info.params, fisher)
      # A batch's Fisher at a shift can be large (max F ~ 9 on this family): the stored Fisher is scaled so
      # that lr * lambda * max F stays at most half SGD's stability limit 2 (1 + momentum) (the penalty
      # alone cannot make the run diverge); the same as capping lambda at that consolidation.
      def cap(e):
        factor = jnp.minimum(1.0, stable / jnp.maximum(ewc_lib.ewc_stability(e, lr), 1e-30))
        return e._replace(fisher=jax.tree.map(lambda f: (f * factor).astype(f.dtype), e.fisher))
      opt_state = jax.tree.map(lambda e: cap(e) if isinstance(e, ewc_lib.EWCState) else e, opt_state,
                               is_leaf=lambda e: isinstance(e, ewc_lib.EWCState))
      return s._replace(opt_state=opt_state)

    state = lax.cond(fired, consolidate, lambda s: s, state) if "ewc" in methods else state
    return state._replace(extra={**state.extra, "detector": det,
                                 "consolidations": state.extra["consolidations"] + fired.astype(jnp.int32)})

  transition = step_lib.chain_transitions(
      step_lib.in_extra("batch_size", ctrl.update) if "batch" in methods else None,
      ewc_on_shift,
      step_lib.in_extra("teacher", lambda t, i: teacher.update(t, i.metrics["accuracy"], i.rng)))
  extra = {"teacher": teacher.init(key), "detector": detector.init(), "consolidations": jnp.int32(0)}
  if "batch" in methods:
    extra["batch_size"] = ctrl.init()
  refit = jax.jit(lambda s, k: s._replace(extra={**s.extra, "teacher": teacher.refit(
      s.extra["teacher"], jax.random.fold_in(k, s.step))}))
  return Composition(tx, forward, transition, extra, ctrl.step_options if "batch" in methods else {}, refit)


def train_run(c: ml_collections.ConfigDict, methods: tuple[str, ...], seed: int, workdir: str,
              shared: dict) -> dict:
  """One run with the given methods on the one loop."""
  train_ds = shared["data"][0]
  mesh = common.build_mesh(c)
  net = common.build_model(c, train_ds, seed=seed)
  key_teacher, key_refit = jax.random.split(jax.random.key(seed))
  comp = composition(c, net.apply, methods, key_teacher)
  micro = c.b0 // jax.device_count()
  step, refit = shared.setdefault(methods, (step_lib.make_train_step(
      classification_loss(net.apply), comp.tx, mesh=mesh, micro_batch_size=micro, forward_fn=comp.forward_fn,
      transition=comp.transition, **comp.step_options), comp.refit))
  state = common.replicated_state(net.params, comp.tx, mesh, seed=seed, extra=comp.extra)
  source = ParametricTaskSource(train_ds, seed, task_of=lambda ctx: ctx.state.extra["teacher"].task,
                                transform=family(c.seed, int(np.prod(train_ds.images.shape[1:]))))
  result = loop.run(
      step, state, source, mesh=mesh, num_samples=c.budget_samples, micro_batch_size=micro,
      batch_size=(lambda ctx: int(ctx.state.extra["batch_size"].size.batch_size)) if "batch" in methods else c.b0,
      actions=((loop.Every(steps=c.episode_steps), lambda ctx: refit(ctx.state, key_refit)),
               (loop.Every(steps=c.log_every, end=True), lambda ctx: log(ctx, methods)),
               (loop.Every(samples=c.eval_every_samples, end=True), lambda ctx: grid_eval(ctx, shared, c))),
      checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint=loop.Every(steps=c.checkpoint_every),
      compile_cache=shared["cache"])
  return summarize(result)


# --- actions: logging and the task-grid evaluation ------------------------------------------------------

def log(ctx: loop.Context, methods: tuple[str, ...]) -> None:
  s = jax.device_get(ctx.state)
  row = {"step": ctx.step, "samples": ctx.samples, "batch_size": ctx.batch_size,
         "consolidations": int(s.extra["consolidations"]), "episodes": int(s.extra["teacher"].episodes),
         "task": [float(v) for v in s.extra["teacher"].task], "loss": float(ctx.out.metrics["loss"]) if ctx.out else None}
  if "nm" in methods:
    nm_state = s.opt_state
    row["beta"] = float(nm_state.beta)
  ctx.record.setdefault("log", []).append(row)


def grid_eval(ctx: loop.Context, shared: dict, c) -> None:
  """Accuracy on the test split under each task of the 5 x 5 grid (fixed noise per task)."""
  test_ds = shared["data"][1]
  if "grid" not in shared:
    transform = family(c.seed, int(np.prod(test_ds.images.shape[1:])))
    sets = []
    for i, p in enumerate(GRID):
      for j, s in enumerate(GRID):
        batch = transform({"image": test_ds.images, "label": test_ds.labels}, np.array([p, s], np.float32),
                          np.random.default_rng((c.seed, 7, i, j)))
        sets.append(test_ds._replace(images=batch["image"]))
    shared["grid"] = sets
  fwd = ctx.state
  if hasattr(ctx.state.opt_state, "masks"):     # N:M: evaluate the hard-masked weights
    from prox.transforms import hard_masked_params  # pylint: disable=g-import-not-at-top
    fwd = ctx.state._replace(params=hard_masked_params(ctx.state.params, ctx.state.opt_state))
  acc = [shared["evaluate"](fwd, ds, c.eval_batch_size)["accuracy"] for ds in shared["grid"]]
  ctx.record.setdefault("grid", []).append({"step": ctx.step, "samples": ctx.samples, "accuracy": acc})


def summarize(result: loop.LoopResult) -> dict:
  rec = result.record
  final = np.asarray(rec["grid"][-1]["accuracy"]).reshape(len(GRID), len(GRID))
  return {"grid": rec["grid"], "log": rec.get("log", []), "final_grid": final.tolist(),
          "final_mean": float(final.mean()), "final_learnable": float(final[:, GRID <= 0.5].mean()),
          "step": int(jax.device_get(result.state.step)), "samples": int(jax.device_get(result.state.samples)),
          "train_seconds": result.train_seconds, "compile_seconds": result.compile_seconds,
          "compiles": result.compiles, "params_l1": float(sum(np.abs(np.asarray(x, np.float64)).sum()
                                                              for x in jax.tree.leaves(jax.device_get(result.state.params))))}


# --- the sweep ------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validate(config, workdir)
  data = common.load_splits(config)
  shared: dict[Any, Any] = {"data": data, "cache": loop.CompileCache()}
  started = time.perf_counter()
  results = []
  for name in common.names(config, "runs", RUNS):
    for seed in common.seeds(config):
      run_dir = os.path.join(workdir, "runs", name, f"seed{seed}")
      record = {"run": name, "seed": seed, "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}}
      if "evaluate" not in shared:
        shared["evaluate"] = common.evaluator(common.build_model(config, data[0]).apply, common.build_mesh(config))
      out = common.run_once(run_dir, "compose", record, lambda: train_run(config, RUNS[name], seed, run_dir, shared))
      results.append({"run": name, "seed": seed, **out})
      print(f"compose: {name:12s} seed {seed}: grid accuracy {out['final_mean']:.4f} (noise <= 0.5: "
            f"{out['final_learnable']:.4f}), {out['step']} steps, {out['compiles']} compiles, "
            f"{out['train_seconds']:.1f} s", flush=True)
  seconds = time.perf_counter() - started
  md = markdown(config, results, seconds)
  report.write_results(workdir, {"config": config, "seconds": seconds, "runs": results}, md,
                       {"accuracy_over_time.png": lambda p: plot_accuracy(results, p),
                        "composed.png": lambda p: plot_composed(results, p)})
  by = {n: [r["final_mean"] for r in results if r["run"] == n] for n in RUNS}
  return {"runs": len(results), "seconds": seconds,
          **{f"grid_accuracy_{n}": float(np.mean(v)) for n, v in by.items() if v}}


def markdown(c, results: list[dict], seconds: float) -> str:
  names = [n for n in RUNS if any(r["run"] == n for r in results)]
  rows = []
  for n in names:
    rs = [r for r in results if r["run"] == n]
    rows.append([n, ", ".join(RUNS[n]) or "none", report.fmt_mean_std([r["final_mean"] for r in rs], percent=True, digits=1),
                 report.fmt_mean_std([r["final_learnable"] for r in rs], percent=True, digits=1),
                 report.fmt_mean_std([r["step"] for r in rs], digits=0),
                 report.fmt_mean_std([r["log"][-1]["batch_size"] if r["log"] else c.b0 for r in rs], digits=0),
                 report.fmt_mean_std([r["log"][-1]["consolidations"] if r["log"] else 0 for r in rs], digits=1),
                 report.fmt_mean_std([r["compiles"] for r in rs], digits=1),
                 report.fmt_mean_std([r["train_seconds"] for r in rs], digits=1)])
  lines = ["# compose: norm-test batches + decaying N:M + EWC on detected shifts + ALP-GMM tasks", "",
           f"Digits under a task family (p: pixels rotated, s: noise 3s); MLP {tuple(c.model_kwargs.hidden)}, "
           f"{c.optimizer} lr {c.learning_rate:g}; {c.budget_samples:,} samples per run; b0 {c.b0}, b_max "
           f"{c.b_max}; N:M {c.n}:{c.m} (MdGf, beta reaches 0 at {c.decay_end:g} of the samples); EWC online "
           f"lambda {c.ewc_lambda:g}, gamma {c.ewc_gamma:g}; episodes of {c.episode_steps} steps, ALP-GMM refit "
           f"every {c.fit_rate} episodes. Test accuracy over the 5 x 5 task grid (sparse runs: hard masks). "
           f"{c.num_seeds} seed(s), mean ± std. Sweep {seconds:.0f} s.", "",
           report.markdown_table(["run", "methods", "grid accuracy (%)", "noise s <= 0.5 (%)", "steps",
                                  "final batch", "shifts detected", "compiles", "train s"], rows), ""]
  plain = {r["seed"]: r["final_mean"] for r in results if r["run"] == "plain"}
  for n in names:
    if n == "plain":
      continue
    comp = report.paired_comparison({r["seed"]: r["final_mean"] for r in results if r["run"] == n}, plain)
    lines.append(f"- {n} vs plain: {100 * comp['diff_mean']:+.2f} points (95% CI {100 * comp['ci95'][0]:+.2f} "
                 f"to {100 * comp['ci95'][1]:+.2f}; {comp['verdict']})")
  return "\n".join(lines) + "\n"


def plot_accuracy(results: list[dict], path: str) -> None:
  fig, ax = report.figure(7, 4.2)
  for i, n in enumerate(RUNS):
    rs = [r for r in results if r["run"] == n]
    if not rs:
      continue
    samples = [g["samples"] for g in rs[0]["grid"]]
    acc = np.mean([[np.mean(g["accuracy"]) for g in r["grid"]] for r in rs], 0)
    ax.plot(samples, acc, label=n, color=f"C{i}")
  ax.set_xlabel("samples seen")
  ax.set_ylabel("mean test accuracy over the task grid")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  report.save_figure(fig, path)


def plot_composed(results: list[dict], path: str) -> None:
  rs = [r for r in results if r["run"] == "composed"]
  if not rs:
    return
  r = rs[0]
  log_rows = r["log"]
  fig, axes = report.figure(16, 4, ncols=4)
  samples = [x["samples"] for x in log_rows]
  axes[0].plot(samples, [x["batch_size"] for x in log_rows])
  axes[0].set_yscale("log", base=2)
  axes[0].set_title("batch size (norm test)")
  axes[1].plot(samples, [x.get("beta", 1.0) for x in log_rows])
  axes[1].set_title("N:M mask beta (MdGf)")
  axes[2].plot(samples, [x["consolidations"] for x in log_rows], drawstyle="steps-post")
  axes[2].set_title("shifts detected (EWC consolidates)")
  tasks = np.asarray([x["task"] for x in log_rows])
  axes[3].scatter(tasks[:, 0], tasks[:, 1], c=samples, s=6, cmap="viridis")
  axes[3].set_xlabel("p (pixels rotated)")
  axes[3].set_ylabel("s (noise)")
  axes[3].set_title("teacher's tasks (colour: samples)")
  for ax in axes[:3]:
    ax.set_xlabel("samples seen")
    ax.grid(alpha=0.3)
  report.save_figure(fig, path)
