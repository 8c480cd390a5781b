"""NoProp-DT training memory vs end-to-end backpropagation through the same blocks.

Model: ``prox.models.NoPropDT`` on digits-shaped inputs (8x8x1, 10 classes): ``T`` denoising blocks (each a
64-H-H image path, a 10-H latent path and an H-H-10 fused head, ``H = --hidden``), class embeddings
and a linear head; Adam.

* NoProp (prox): one block per step (``model.loss(..., block=t)``, ``t`` traced), its gradient local to
  block ``t`` (plus the head and the embeddings); also printed: all ``T`` blocks' local losses in one step
  (``block=None``).
* backprop (the baseline a user writes in jax/optax): the same blocks chained end to end,
  ``z_t = u_hat_t(z_{t-1}, x)`` from ``z_0 = 0``, cross-entropy of the head on ``z_T``, ``jax.grad``
  through the whole chain, one parameter tree per block (slicing NoPropDT's stacked parameters inside the
  gradient would add a full-size buffer per block to the backward pass and inflate the baseline).

Metric: XLA's ``temp_size_in_bytes`` from ``jax.jit(step).lower(...).compile().memory_analysis()`` -- the
scratch memory of one training step (activations kept for the backward pass, gradients, temporaries),
not counting the arguments (parameters, optimizer state, batch) and outputs, which are the same for
both. Prints the sizes per depth ``T`` and the ratio NoProp / backprop.

  python benchmarks/noprop_memory.py [--blocks 4 8 16 32] [--batch 256] [--hidden 256]
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prox import models


def temp_bytes(fn, *args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=256)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; batch {args.batch}, "
        f"hidden {args.hidden}; metric: compiled temp_size_in_bytes of one training step")
  x = jnp.zeros((args.batch, 8, 8, 1), jnp.float32)
  y = jnp.zeros((args.batch,), jnp.int32)
  tx = optax.adam(1e-3)
  print(f"{'T':>4} {'params':>10} {'noprop 1 block':>15} {'noprop all':>12} {'backprop':>12} {'1 block/bp':>11} "
        f"{'all/bp':>8}")
  for T in args.blocks:
    model = models.NoPropDT((8, 8, 1), 10, num_blocks=T, hidden=args.hidden, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = tx.init(params)

    def update(p, o, g):
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o

    def noprop_step(p, o, x, y, key, block):
      g = jax.grad(lambda q: jnp.mean(nnx.merge(graphdef, q, rest).loss(x, y, key, block=block).total))(p)
      return update(p, o, g)

    def noprop_all_step(p, o, x, y, key):
      g = jax.grad(lambda q: jnp.mean(nnx.merge(graphdef, q, rest).loss(x, y, key).total))(p)
      return update(p, o, g)

    # the baseline holds one parameter tree per block (what a user writes), not NoPropDT's stacked array
    block_def, stacked = nnx.split(model.blocks)
    bp_params = {"blocks": [jax.tree.map(lambda a, t=t: a[t], stacked) for t in range(T)],
                 "embeddings": model.embeddings[...], "head": nnx.state(model.head)}
    bp_opt = tx.init(bp_params)

    def backprop_step(p, o, x, y):
      def loss(q):
        xf = x.reshape(x.shape[0], -1)
        z = jnp.zeros((x.shape[0], model.dim), jnp.float32)
        for t in range(T):
          o_t = nnx.merge(block_def, q["blocks"][t])(z, xf)
          z = jax.nn.softmax(o_t, -1) @ q["embeddings"]
        logits = nnx.merge(nnx.graphdef(model.head), q["head"])(z)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      return update(p, o, jax.grad(loss)(p))

    key = jax.random.key(0)
    one = temp_bytes(noprop_step, params, opt, x, y, key, jnp.int32(0))
    every = temp_bytes(noprop_all_step, params, opt, x, y, key)
    bp = temp_bytes(backprop_step, bp_params, bp_opt, x, y)
    n = models.param_count(params)
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    print(f"{T:>4} {n:>10,} {mib(one):>15} {mib(every):>12} {mib(bp):>12} {one / bp:>11.3f} {every / bp:>8.3f}")


if __name__ == "__main__":
  main()
