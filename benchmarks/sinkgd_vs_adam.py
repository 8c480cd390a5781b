"""SinkGD step vs Adam step on the 784-1024-1024-10 MLP, measured side by side.

Prints, for a plain ``jax.jit`` optax training step (forward, backward, optimizer, apply):
  time(SinkGD step) / time(Adam step)                 (expected near 1.0)
  bytes(SinkGD opt_state) / bytes(Adam opt_state)     (expected <= 1.0: SinkGD keeps no state)

SinkGD runs on the 2-D weights, the biases go to Adam (``prox.optim.sinkgd_for_matrices``); a
pure-SGD step is timed as a floor. The steps alternate in each repeat so that machine noise hits
all alike; medians over repeats are reported.

  python benchmarks/sinkgd_vs_adam.py [--batch 512] [--repeats 11] [--steps 10] [--num-iters 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import optim

SIZES = (784, 1024, 1024, 10)


def init_mlp(key):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(SIZES) - 1), zip(SIZES[:-1], SIZES[1:])):
    params.append({"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)})
  return params


def loss_fn(params, batch):
  h = batch["x"]
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_step(tx):
  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return jax.jit(step, donate_argnums=(0, 1))


def state_bytes(opt_state) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(opt_state))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--num-iters", type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  batch = jax.device_put({"x": rng.normal(size=(args.batch, SIZES[0])).astype(np.float32),
                          "y": rng.integers(0, SIZES[-1], size=args.batch).astype(np.int32)})
  txs = {
      "adam": optax.adam(1e-3),
      "sinkgd": optim.sinkgd_for_matrices(1e-3, num_iters=args.num_iters, other=optax.adam(1e-3)),
      "sgd": optax.sgd(1e-3),
  }
  runs, memory = {}, {}
  for name, tx in txs.items():
    params = init_mlp(jax.random.key(0))
    opt_state = tx.init(params)
    memory[name] = state_bytes(opt_state)
    step = make_step(tx)
    params, opt_state, value = step(params, opt_state, batch)  # compile and warm up
    params, opt_state, value = step(params, opt_state, batch)
    jax.block_until_ready(value)
    runs[name] = [step, params, opt_state]

  times = {name: [] for name in txs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      step = run[0]
      start = time.perf_counter()
      for _ in range(args.steps):
        run[1], run[2], value = step(run[1], run[2], batch)
      jax.block_until_ready((run[1], value))
      times[name].append((time.perf_counter() - start) / args.steps)

  med = {name: statistics.median(t) for name, t in times.items()}
  param_bytes = state_bytes(init_mlp(jax.random.key(0)))
  print(f"device: {jax.devices()[0].device_kind}; MLP {'-'.join(map(str, SIZES))}, batch {args.batch}, "
        f"SinkGD L={args.num_iters}, median of {args.repeats} x {args.steps} steps")
  for name in txs:
    print(f"  {name:7s} step {med[name] * 1e3:8.3f} ms   opt_state {memory[name]:>10,d} bytes "
          f"({memory[name] / param_bytes:.4f} x params)")
  print(f"time   SinkGD / Adam: {med['sinkgd'] / med['adam']:.3f}   (SGD / Adam: {med['sgd'] / med['adam']:.3f})")
  print(f"memory SinkGD / Adam: {memory['sinkgd'] / memory['adam']:.4f}")


if __name__ == "__main__":
  main()
