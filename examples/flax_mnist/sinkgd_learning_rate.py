"""Measures the learning rate at which SinkGD's step matches Adam's, on the embedded digits.

SinkGD's normalised direction has per-entry RMS exactly 1, so its step has RMS ``lr``; Adam's step has RMS
``rho * lr`` with ``rho`` in ``[0.23, 1]`` (``prox/optim/sinkgd.py`` derives both). This script trains an MLP
64-128-128-10 (plain optax, batch 32) with ``optax.adam(1e-3)`` and prints ``rho`` =
``matching_learning_rate(adam_updates) / 1e-3`` at a few steps, then trains SinkGD on the 2-D kernels (Adam
1e-3 on the biases) at several learning rates and prints the mean training loss of the last 50 steps and
the test accuracy after ``--steps`` steps, next to Adam's.

  python examples/flax_mnist/sinkgd_learning_rate.py [--steps 500] [--seeds 3]

Printed (2 shared CPU cores, defaults, 70 s):

| optimizer | loss (last 50 steps) | test accuracy | step RMS / 1e-3 at steps [1, 10, 100, 500] |
|---|---|---|---|
| adam 1e-3 | 0.0183 | 0.9756 | 0.94 / 0.51 / 0.19 / 0.10 |
| sinkgd 0.0001 | 0.1935 | 0.9489 | 0.10 / 0.10 / 0.10 / 0.10 |
| sinkgd 0.0003 | 0.0577 | 0.9733 | 0.29 / 0.29 / 0.29 / 0.29 |
| sinkgd 0.001 | 0.0317 | 0.9726 | 0.97 / 0.97 / 0.98 / 0.99 |
| sinkgd 0.003 | nan | 0.6659 | 2.92 / 2.89 / 2.95 / nan |
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import optim
from prox.optim.sinkgd import matching_learning_rate
from prox.tasks import data


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * np.sqrt(2.0 / a), "bias": jnp.zeros(b)}
  return params


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
  x = x.reshape(x.shape[0], -1)
  n = len(params)
  for i in range(n):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, batch):
  logits = apply_mlp(params, batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def train(tx: optax.GradientTransformation, train_ds, test_ds, steps: int, seed: int):
  params = init_mlp(jax.random.key(seed), (64, 128, 128, 10))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, matching_learning_rate(updates)

  rng = np.random.default_rng(seed)
  losses, rms = [], []
  for _ in range(steps):
    idx = rng.integers(0, len(train_ds.labels), 32)
    batch = {"image": train_ds.images[idx], "label": train_ds.labels[idx]}
    params, opt_state, loss, r = step(params, opt_state, batch)
    losses.append(float(loss))
    rms.append(float(r))
  logits = apply_mlp(params, test_ds.images)
  acc = float(jnp.mean(jnp.argmax(logits, -1) == test_ds.labels))
  return np.array(losses), np.array(rms), acc


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  train_ds, test_ds = data.load("digits", "train"), data.load("digits", "test")
  lr = 1e-3
  runs = {"adam 1e-3": lambda: optax.adam(lr)}
  for sink_lr in (1e-4, 3e-4, 1e-3, 3e-3):
    runs[f"sinkgd {sink_lr:g}"] = lambda s=sink_lr: optim.sinkgd_for_matrices(s, other=optax.adam(lr))
  marks = [s for s in (1, 10, 100, 500, 1000) if s <= args.steps]
  print(f"| optimizer | loss (last 50 steps) | test accuracy | step RMS / 1e-3 at steps {marks} |")
  print("|---|---|---|---|")
  for name, make in runs.items():
    out = [train(make(), train_ds, test_ds, args.steps, seed) for seed in range(args.seeds)]
    loss = np.mean([o[0][-50:].mean() for o in out])
    acc = np.mean([o[2] for o in out])
    rms = np.mean([o[1] for o in out], axis=0) / lr
    print(f"| {name} | {loss:.4f} | {acc:.4f} | {' / '.join(f'{rms[s - 1]:.2f}' for s in marks)} |")


if __name__ == "__main__":
  main()
