"""Experiment ``classify``: train a classifier with the optimizer the config names, evaluate on the test split.

  prox --config=prox/experiments/configs/classify.py --workdir=runs/classify

``train_and_evaluate`` is the whole run: data, model, optimizer, the data-parallel step and the one loop
(``prox.loop.run``) with the standard actions (train metrics every ``log_every`` steps, test accuracy
every ``eval_every`` steps and at the end). Outputs in ``workdir``: ``metrics.jsonl``, TensorBoard events
(``tb/``), ``curves.png``, ``metrics.json`` and ``checkpoints/`` (a killed run started again resumes
exactly). Other experiments reuse it with another transform (``tx``), forward-pass weights
(``forward_fn``), evaluation weights (``eval_params``) or logged state scalars (``state_metrics``).

``--config.noise_scale=True`` logs the gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish
et al. 2018) with every train record, from exact per-example gradient norms taken in the step (layer
taps; near the cost of a plain step), as a ratio of exponential moving averages (``noise_scale_decay``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import optax

from prox import loop
from prox import optim
from prox import step as step_lib
from prox.experiments import common
from prox.experiments import report
from prox.losses import classification_loss
from prox.tasks import EpochSource


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value ``train_and_evaluate`` uses; raises ``ConfigError`` naming the first bad one."""
  common.check_data(config)
  common.check_mesh(config)
  common.check_model(config)
  common.check_optimizer(config)
  common.positive_ints(config, "num_steps", "log_every", "eval_every", "checkpoint_every",
                       "keep_checkpoints")
  common.positive_ints(config, "micro_batch_size", zero_ok=True)
  common.check_batch("batch_size", config.batch_size, config.micro_batch_size)
  common.check_batch("eval_batch_size", config.eval_batch_size)
  if workdir is not None:
    common.check_workdir(workdir)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    tx: optax.GradientTransformation | None = None,
    forward_fn: Callable | None = None,
    eval_params: Callable[[step_lib.TrainState], Any] | None = None,
    state_metrics: Callable[[step_lib.TrainState], dict] | None = None,
    datasets: tuple | None = None,
) -> dict:
  """Trains and evaluates as ``config`` says; returns the final metrics (also in ``metrics.json``)."""
  train_ds, test_ds = datasets or common.load_splits(config)
  mesh = common.build_mesh(config)
  net = common.build_model(config, train_ds)
  tx = tx if tx is not None else common.build_optimizer(config)
  extra, noise = {}, {}
  if config.get("noise_scale", False):   # B_simple from exact per-example norms, smoothed (an EMA)
    ema = optim.noise_scale_ema(config.get("noise_scale_decay", 0.95))
    extra["noise_scale"] = ema.init()
    noise = {"example_stats": ("norm",),
             "transition": step_lib.in_extra("noise_scale", lambda s, i: ema.update(s, i.example_stats, i.grads))}
    state_metrics = _with_noise_scale(state_metrics, ema)
  step = step_lib.make_train_step(classification_loss(net.apply), tx, mesh=mesh,
                                  micro_batch_size=config.micro_batch_size or None, forward_fn=forward_fn,
                                  **noise)
  state = common.replicated_state(net.params, tx, mesh, seed=config.seed, model_state=net.model_state,
                                  extra=extra)

  evaluate = common.evaluator(net.apply, mesh)
  test = lambda s: evaluate(s if eval_params is None else s._replace(params=eval_params(s)), test_ds,
                            config.eval_batch_size)
  writer = report.MetricWriter(workdir, total_steps=config.num_steps, tensorboard=config.tensorboard,
                                progress=config.progress)
  with writer:
    result = loop.run(
        step, state, EpochSource(train_ds, config.seed), mesh=mesh, batch_size=config.batch_size,
        num_steps=config.num_steps,
        actions=common.train_actions(writer, test, log_every=config.log_every, eval_every=config.eval_every,
                                     state_metrics=state_metrics),
        checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint=loop.Every(steps=config.checkpoint_every),
        keep_checkpoints=config.keep_checkpoints, progress=writer.update)
  final = common.summary(result)
  if jax.process_index() == 0:
    report.write_summary(workdir, final)
    if config.get("plot_curves", True):
      report.plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
  return final


def _with_noise_scale(state_metrics: Callable | None, ema: optim.NoiseScaleEMA) -> Callable:
  def metrics(state: step_lib.TrainState) -> dict:
    out = {} if state_metrics is None else dict(state_metrics(state))
    return {**out, "noise_scale": ema.value(state.extra["noise_scale"])}
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  validate(config, workdir)
  return train_and_evaluate(config, workdir)
