"""Digits example: flax's NNX MNIST training loop with any prox transform.

Library file which executes the training and evaluation loop on the embedded 8x8 digits (offline, from
``prox.tasks.data``). The model, ``nnx.Optimizer``, ``nnx.jit`` train step and epoch loop follow flax's
``examples/mnist``; ``config.transform`` swaps in a prox transform. The lines that change for each transform
against plain optax carry a ``# prox`` comment (README.md lists them).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prox.models import classifier_logprob, masked_module, module_fisher, opt_state_of, params_of
from prox.models import update_opt_state
from prox.optim import adagrad_norm, sinkgd_for_matrices
from prox.tasks import data
from prox.transforms import gradual_pruning, progressive_unfreezing, rigl, select, sparsity_summary
from prox.transforms.ewc import consolidate_opt_state, ewc, ewc_lambda_range
from prox.transforms.gpm import gpm, gpm_threshold, gpm_update_opt_state
from prox.transforms.nm import nm_sparsity, training_steps
from prox.transforms.sara import sara

TRANSFORMS = ("none", "adagrad_norm", "sinkgd", "nm_sparsity", "gradual_pruning", "rigl", "ewc", "gpm", "sara",
              "unfreezing")
PROTOCOLS = ("single", "continual", "finetune")
_DEFAULT_PROTOCOL = {"ewc": "continual", "gpm": "continual", "sara": "finetune", "unfreezing": "finetune"}
TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))  # the two tasks of the continual and fine-tuning protocols


class CNN(nnx.Module):
  """A simple CNN model (flax's MNIST CNN, sized for 8x8 images)."""

  def __init__(self, *, width: int = 16, hidden: int = 64, dropout: float = 0.05, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(width, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=dropout)
    self.conv2 = nnx.Conv(width, 2 * width, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(2 * width * 2 * 2, hidden, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=dropout)
    self.linear2 = nnx.Linear(hidden, 10, rngs=rngs)

  def features(self, x, rngs: nnx.Rngs | None = None):
    """The convolutional features: the input of ``linear1``."""
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    return x.reshape(x.shape[0], -1)  # flatten

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = self.features(x, rngs)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    x = self.linear2(x)
    return x


def loss_fn(model: CNN, batch, rngs):
  logits = model(batch['image'], rngs)
  logits = jnp.where(batch['class_mask'], logits, -1e9)  # only the current task's classes compete
  loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch['label']).mean()
  return loss, logits


@functools.partial(nnx.jit, static_argnames='masked')
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch, rngs, masked=False):
  """Train for a single step (``masked``: forward pass with the masks of a sparsity transform)."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  if not masked:
    (loss, logits), grads = grad_fn(model, batch, rngs)
  else:
    (loss, logits), grads = grad_fn(masked_module(model, optimizer), batch, rngs)  # prox: nm_sparsity
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
  optimizer.update(model, grads)  # In-place updates.


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch, None)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def get_datasets(classes=tuple(range(10))) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The digits of ``classes`` from the embedded 8x8 digits, train and test, as in-memory arrays.

  Each example carries ``class_mask`` (bool [10], True for ``classes``), so that a task's examples are
  classified among its own classes (task-incremental learning); with all ten classes it changes nothing.
  """
  out = []
  for split in ('train', 'test'):
    ds = data.load('digits', split)
    keep = np.isin(ds.labels, classes)
    mask = np.isin(np.arange(10), classes)
    out.append({'image': ds.images[keep], 'label': ds.labels[keep],
                'class_mask': np.broadcast_to(mask, (int(keep.sum()), 10)).copy()})
  return out[0], out[1]


def train_batches(ds: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator):
  """One epoch of shuffled batches; the last partial batch is dropped."""
  perm = rng.permutation(len(ds['label']))
  for i in range(len(perm) // batch_size):
    idx = perm[i * batch_size:(i + 1) * batch_size]
    yield {k: v[idx] for k, v in ds.items()}


# ----------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------


def protocol_of(config: ml_collections.ConfigDict) -> str:
  if config.transform not in TRANSFORMS:
    raise ValueError(f"unknown transform {config.transform!r}; expected one of {', '.join(TRANSFORMS)}")
  protocol = config.protocol or _DEFAULT_PROTOCOL.get(config.transform, 'single')
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {config.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
  return protocol


def make_tx(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """The optimizer of the (first) training phase: plain optax or the configured prox transform."""
  tx = optax.sgd(config.learning_rate, config.momentum)
  if config.transform == 'adagrad_norm':
    tx = adagrad_norm(config.adagrad_norm_learning_rate)  # prox: adagrad_norm
  elif config.transform == 'sinkgd':
    tx = sinkgd_for_matrices(config.sinkgd_learning_rate, other=tx)  # prox: sinkgd
  elif config.transform == 'nm_sparsity':
    tx = nm_sparsity(tx, config.nm_n, config.nm_m, total_steps=num_steps, finetune_steps=0.1)  # prox: nm_sparsity
  elif config.transform == 'gradual_pruning':
    tx = gradual_pruning(tx, sparsity=config.sparsity, end_step=num_steps // 2, frequency=10)  # prox: gradual_pruning
  elif config.transform == 'rigl':
    tx = rigl(tx, sparsity=config.sparsity, end_step=num_steps * 3 // 4, update_frequency=20)  # prox: rigl
  elif config.transform == 'ewc':
    tx = optax.chain(optax.inject_hyperparams(ewc)(ewc_lambda=0.0), tx)  # prox: ewc (lambda set at the boundary)
  elif config.transform == 'gpm':
    tx = optax.chain(tx, gpm(lambda p: select(p, 'linear1/kernel')))  # prox: gpm
  return tx


def make_finetune_tx(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer of the fine-tuning phase (second task of the "finetune" protocol)."""
  tx = optax.sgd(config.learning_rate, config.momentum)
  if config.transform == 'sara':
    tx = sara(tx, threshold=config.sara_threshold, progressive_iter=None)  # prox: sara
  elif config.transform == 'unfreezing':
    groups = ['linear2', 'linear1', 'conv2|batch_norm2', 'conv1|batch_norm1']  # prox: unfreezing
    tx = progressive_unfreezing(tx, groups, interval=config.unfreeze_interval * steps_per_epoch)  # prox: unfreezing
  return tx


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def evaluate(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, test_ds, masked: bool):
  """Test loss and accuracy (the whole split is one batch); masked: with the hard masks."""
  model.eval()  # Switch to eval mode
  eval_model = model
  if masked:
    eval_model = masked_module(model, optimizer, hard=True)  # prox: nm_sparsity
  eval_step(eval_model, metrics, test_ds)  # prox: nm_sparsity (eval_model)
  eval_metrics = {k: float(v) for k, v in metrics.compute().items()}
  metrics.reset()
  return eval_metrics


def train_epochs(config, model, optimizer, metrics, train_ds, test_ds, rngs, rng, *, masked, label=''):
  """``config.num_epochs`` epochs on ``train_ds``; returns the last epoch's train and test metrics."""
  history = []
  for epoch in range(1, config.num_epochs + 1):
    model.train()  # Switch to train mode
    for batch in train_batches(train_ds, config.batch_size, rng):
      train_step(model, optimizer, metrics, batch, rngs, masked=masked)
    train_metrics = {k: float(v) for k, v in metrics.compute().items()}
    metrics.reset()
    eval_metrics = evaluate(model, optimizer, metrics, test_ds, masked)
    history.append({'train_loss': train_metrics['loss'], 'train_accuracy': train_metrics['accuracy'],
                    'test_loss': eval_metrics['loss'], 'test_accuracy': eval_metrics['accuracy']})
    logging.info('%sepoch:% 3d, train_loss: %.4f, train_accuracy: %.2f, test_loss: %.4f, test_accuracy: %.2f',
                 label, epoch, train_metrics['loss'], train_metrics['accuracy'] * 100, eval_metrics['loss'],
                 eval_metrics['accuracy'] * 100)
  return history


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Execute model training and evaluation loop; returns (and writes to ``workdir/summary.json``) a summary.

  Args:
    config: Hyperparameter configuration for training and evaluation (``configs/default.py``).
    workdir: Directory to write ``summary.json`` and ``weights.npz`` (the evaluated weights by path,
      hard-masked for N:M) to; ``None``: nothing is written.

  Returns:
    ``{"transform", "protocol", "history": [per-epoch metrics], ...}``; with sparsity transforms also
    ``"sparsity"`` (per-layer fraction of zeros of the evaluated weights); with two tasks the test
    accuracy of each task after each phase and the forgetting of task 0.
  """
  protocol = protocol_of(config)
  masked = config.transform == 'nm_sparsity'  # prox: nm_sparsity
  rng = np.random.default_rng(config.seed)
  rngs = nnx.Rngs(config.seed)
  model = CNN(width=config.width, hidden=config.hidden, dropout=config.dropout, rngs=nnx.Rngs(config.seed))
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average('loss'))
  summary: dict[str, Any] = {'transform': config.transform, 'protocol': protocol}

  if protocol == 'single':
    train_ds, test_ds = get_datasets()
    num_steps = training_steps(num_epochs=config.num_epochs, num_examples=len(train_ds['label']),
                               batch_size=config.batch_size)
    optimizer = nnx.Optimizer(model, make_tx(config, num_steps), wrt=nnx.Param)
    summary['history'] = train_epochs(config, model, optimizer, metrics, train_ds, test_ds, rngs, rng,
                                      masked=masked)
    summary['steps'] = num_steps
    if config.transform in ('nm_sparsity', 'gradual_pruning', 'rigl'):
      weights = masked_module(model, optimizer, hard=True) if masked else model
      summary['sparsity'] = {k: float(v) for k, v in sparsity_summary(params_of(weights), 'kernel').items()}
  else:
    (train0, test0), (train1, test1) = get_datasets(TASKS[0]), get_datasets(TASKS[1])
    steps_per_epoch = len(train0['label']) // config.batch_size
    num_steps = 2 * config.num_epochs * steps_per_epoch
    phase0_tx = make_tx(config, num_steps) if protocol == 'continual' else optax.sgd(config.learning_rate,
                                                                                     config.momentum)
    optimizer = nnx.Optimizer(model, phase0_tx, wrt=nnx.Param)
    history = train_epochs(config, model, optimizer, metrics, train0, test0, rngs, rng, masked=False,
                           label='task 0 ')
    summary['task0_after_task0'] = history[-1]['test_accuracy']

    # The model is in eval mode here (the last evaluation): BatchNorm uses its running averages.
    if config.transform == 'ewc':
      fisher = module_fisher(model, train0, logprob_fn=classifier_logprob(classes='class_mask'))  # prox: ewc
      curvature = module_fisher(model, train1, logprob_fn=classifier_logprob(classes='class_mask'))  # prox: ewc
      lam = ewc_lambda_range(fisher, curvature=curvature, learning_rate=config.learning_rate, momentum=config.momentum)
      update_opt_state(optimizer, consolidate_opt_state, params_of(model), fisher)  # prox: ewc
      optimizer.opt_state[0].hyperparams['ewc_lambda'][...] = lam.geometric_mean  # prox: ewc
      if config.ewc_lambda is not None:  # a fixed lambda instead (to compare)
        optimizer.opt_state[0].hyperparams['ewc_lambda'][...] = config.ewc_lambda
      used = float(optimizer.opt_state[0].hyperparams['ewc_lambda'][...])
      logging.info('EWC lambda range [%.4g, %.4g] (max F %.3g); using %.4g', lam.low, lam.high, lam.max_fisher,
                   used)
      summary['ewc_lambda_range'] = {'low': lam.low, 'high': lam.high, 'max_fisher': lam.max_fisher,
                                     'used': used}
    elif config.transform == 'gpm':
      h1 = model.features(train0['image'][:config.gpm_examples])  # prox: gpm (the inputs of linear1)
      activations = jax.tree.map(lambda _: None, params_of(model))  # prox: gpm
      activations['linear1']['kernel'] = h1  # prox: gpm
      update_opt_state(optimizer, gpm_update_opt_state, activations, gpm_threshold(0))  # prox: gpm
      summary['gpm_rank'] = int(opt_state_of(optimizer)[1].ranks['linear1']['kernel'])
    if protocol == 'finetune':
      optimizer = nnx.Optimizer(model, make_finetune_tx(config, steps_per_epoch), wrt=nnx.Param)

    history += train_epochs(config, model, optimizer, metrics, train1, test1, rngs, rng, masked=False,
                            label='task 1 ')
    summary['history'] = history
    summary['task1_after_task1'] = history[-1]['test_accuracy']
    summary['task0_after_task1'] = evaluate(model, optimizer, metrics, test0, masked=False)['accuracy']
    summary['forgetting'] = summary['task0_after_task0'] - summary['task0_after_task1']
    summary['steps'] = num_steps
    logging.info('task 0 accuracy %.2f -> %.2f after task 1 (task 1: %.2f)', summary['task0_after_task0'] * 100,
                 summary['task0_after_task1'] * 100, summary['task1_after_task1'] * 100)
    if config.transform == 'sara':
      trainable = jax.tree.leaves(opt_state_of(optimizer).trainable)
      summary['sara_trainable'] = float(sum(jnp.sum(t) for t in trainable) / sum(t.size for t in trainable))

  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    # The weights the test accuracy was measured with (hard-masked for N:M), by path.
    weights = masked_module(model, optimizer, hard=True) if masked else model
    flat = jax.tree_util.tree_flatten_with_path(params_of(weights))[0]
    np.savez(os.path.join(workdir, 'weights.npz'),
             **{'/'.join(str(k.key) for k in path): np.asarray(w) for path, w in flat})
  return summary


# ----------------------------------------------------------------------------------------------------
# Step time
# ----------------------------------------------------------------------------------------------------


def _timed_setup(config: ml_collections.ConfigDict, steps: int):
  """A compiled train step of ``config``'s (first-phase) optimizer and ``steps`` ready batches."""
  protocol = protocol_of(config)
  masked = config.transform == 'nm_sparsity'
  train_ds, _ = get_datasets(tuple(range(10)) if protocol == 'single' else TASKS[0])
  rng = np.random.default_rng(config.seed)
  batches = []
  while len(batches) < steps:
    batches.extend(train_batches(train_ds, config.batch_size, rng))
  batches = [jax.device_put(b) for b in batches[:steps]]
  model = CNN(width=config.width, hidden=config.hidden, dropout=config.dropout, rngs=nnx.Rngs(config.seed))
  tx = make_tx(config, 10 * steps) if protocol != 'finetune' else make_finetune_tx(config, max(steps // 4, 1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average('loss'))
  rngs = nnx.Rngs(config.seed)
  model.train()

  def run(batches):
    for batch in batches:
      train_step(model, optimizer, metrics, batch, rngs, masked=masked)
    jax.block_until_ready(nnx.state(model))

  run(batches[:5])  # compile and warm up
  return run, batches


def step_times(configs: list[ml_collections.ConfigDict], *, steps: int = 100,
               repeats: int = 7) -> list[dict[str, list[float]]]:
  """Seconds per ``train_step`` of each config in this loop: ``repeats`` timings each, interleaved.

  Each timing runs ``steps`` steps over the same batches and ends with ``jax.block_until_ready`` on the
  model's state; it records the wall time and this process's CPU time (``time.process_time``: all its
  threads), per step. The configs take turns within each repeat, so that a change of machine load hits
  all of them alike. Returns, per config, ``{"wall": [...], "cpu": [...]}``.
  """
  runners = [_timed_setup(c, steps) for c in configs]
  times: list[dict[str, list[float]]] = [{'wall': [], 'cpu': []} for _ in configs]
  for _ in range(repeats):
    for (run, batches), out in zip(runners, times):
      wall, cpu = time.perf_counter(), time.process_time()
      run(batches)
      out['wall'].append((time.perf_counter() - wall) / steps)
      out['cpu'].append((time.process_time() - cpu) / steps)
  return times
