"""prox's data-parallel step vs a hand-written ``jax.jit`` optax step, measured side by side.

Prints two ratios (and their targets):
  time(prox step) / time(hand-written step)        on the 784-1024-1024-10 MLP, batch 512   (<= 1.05)
  achieved FLOP/s of the prox step / FLOP/s of a large matmul on the same device            (>= 0.8)

The two steps alternate in each repeat so that machine noise hits both alike; medians are reported.
FLOPs are counted analytically (the matmuls: forward, weight gradients, input gradients of every
layer but the first); XLA's cost analysis is printed beside it (it matches on CPU; on GPU it does not
count the cuBLAS/cuDNN custom calls, so it is not used for the ratio).

  python benchmarks/step_overhead.py [--batch 512] [--repeats 15] [--steps 20] [--dtype float32]
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import step as S
from _timing import timed  # benchmarks/_timing.py

SIZES = (784, 1024, 1024, 10)


def init_mlp(key, dtype):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(SIZES) - 1), zip(SIZES[:-1], SIZES[1:])):
    params.append({"w": (jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in)).astype(dtype),
                   "b": jnp.zeros(n_out, dtype)})
  return params


def loss(params, batch, rng):
  h = batch["x"]
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = (h @ params[-1]["w"] + params[-1]["b"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


def matmul_flops(batch: int) -> float:
  """FLOPs of one training step's matmuls: 2BNM forward, 2BNM weight gradient, 2BNM input gradient."""
  layers = list(zip(SIZES[:-1], SIZES[1:]))
  return sum(2.0 * batch * n * m * (2 if i == 0 else 3) for i, (n, m) in enumerate(layers))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--matmul", type=int, default=0, help="matmul size (default: 4096 on GPU/TPU, 2048 on CPU)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  mesh = S.data_mesh([device])
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  batch_np = {"x": rng.normal(size=(args.batch, SIZES[0])).astype(dtype),
              "y": rng.integers(0, SIZES[-1], size=args.batch).astype(np.int32)}

  # Hand-written: the step a user would write with jax.jit and optax.
  @jax.jit
  def hand_step(params, opt_state, batch):
    value, grads = jax.value_and_grad(lambda p: loss(p, batch, None)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  hand_step = jax.jit(hand_step.__wrapped__, donate_argnums=(0, 1))
  params = init_mlp(jax.random.key(0), dtype)
  hand = [params, tx.init(params)]
  hand_batch = jax.device_put(batch_np, device)

  prox_step = S.make_train_step(S.stateless(loss), tx, mesh=mesh)
  state = S.replicate(S.TrainState(np.int32(0), jax.device_get(params), jax.device_get(tx.init(params)),
                                   {}, (), np.asarray(jax.random.key_data(jax.random.key(0)))), mesh)
  prox_batch = S.shard_batch(batch_np, mesh)
  holder = [state]

  def run_hand():
    hand[0], hand[1], value = hand_step(hand[0], hand[1], hand_batch)
    return value

  def run_prox():
    holder[0], out = prox_step(holder[0], prox_batch)
    return out.metrics["loss"]

  xla = hand_step.lower(hand[0], hand[1], hand_batch).compile().cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla or {}).get("flops", float("nan"))
  flops = matmul_flops(args.batch)

  n = args.matmul or (2048 if device.platform == "cpu" else 4096)
  a = jax.device_put(jnp.asarray(rng.normal(size=(n, n)), dtype), device)
  b = jax.device_put(jnp.asarray(rng.normal(size=(n, n)), dtype), device)
  matmul = jax.jit(lambda a, b: a @ b)

  for fn in (run_hand, run_prox, lambda: matmul(a, b)):  # compile and warm up
    timed(fn, 3)
  t_hand, t_prox, t_mm = [], [], []
  mm_steps = max(2, args.steps // 4)
  for _ in range(args.repeats):
    t_hand.append(timed(run_hand, args.steps))
    t_prox.append(timed(run_prox, args.steps))
    t_mm.append(timed(lambda: matmul(a, b), mm_steps))
  t_hand, t_prox, t_mm = map(statistics.median, (t_hand, t_prox, t_mm))
  mm_flops = 2.0 * n ** 3 / t_mm
  step_flops = flops / t_prox
  print(f"device: {device.device_kind} ({device.platform}), dtype {args.dtype}, batch {args.batch}, "
        f"MLP {'-'.join(map(str, SIZES))}, Adam")
  print(f"hand-written jit step: {t_hand * 1e3:8.3f} ms")
  print(f"prox step:             {t_prox * 1e3:8.3f} ms")
  print(f"step FLOPs: {flops / 1e9:.3f} GFLOP (XLA cost analysis: {xla / 1e9:.3f}) "
        f"-> {step_flops / 1e12:.3f} TFLOP/s")
  print(f"{n}x{n} matmul: {mm_flops / 1e12:.3f} TFLOP/s")
  print(f"ratio time(prox) / time(hand-written) = {t_prox / t_hand:.3f}   (target <= 1.05)")
  print(f"ratio step FLOP/s / matmul FLOP/s     = {step_flops / mm_flops:.3f}   (target >= 0.8)")


if __name__ == "__main__":
  main()
