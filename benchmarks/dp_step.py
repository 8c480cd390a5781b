"""DP-SGD step cost: prox's ghost clipping and optax's vmap-based dpsgd, each relative to a non-private step.

Model: the MLP 64-512-512-10 of ``prox.models`` (digits-sized, 301,066 parameters, every layer tapped),
softmax cross-entropy, SGD. Three jitted steps on the same parameters and batches:

* non-private (the baseline a user writes): ``jax.grad`` of the mean loss, ``optax.sgd`` update;
* prox ghost clipping: ``prox.optim.dp_gradient`` (one backward pass to the layer outputs for the
  per-example norms, one reweighted backward pass for the sum of clipped gradients, Gaussian noise),
  then the same SGD update;
* optax: per-example gradients by ``jax.vmap(jax.grad(...))`` into ``optax.contrib.dpsgd`` (clip, sum,
  noise, SGD), the way optax documents it.

Prints, per batch size, the median time of each step and the ratios ghost / non-private (target <= 3) and
optax-vmap / non-private; the steps alternate inside each repeat so that machine noise hits them alike.

  python benchmarks/dp_step.py [--batches 128 256 512 1024] [--repeats 7] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prox import models, optim
from _timing import timed  # benchmarks/_timing.py

HIDDEN = (512, 512)
CLIP, SIGMA, LR = 1.0, 1.0, 0.1


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  f = models.functional(models.MLP((8, 8, 1), 10, hidden=HIDDEN, rngs=nnx.Rngs(0)))
  params = f.params
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}; MLP 64-{'-'.join(map(str, HIDDEN))}-10, "
        f"{models.param_count(params):,} parameters")

  def per_example(p, batch):
    logits, _ = f.apply(p, {}, batch["image"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

  sgd = optax.sgd(LR)

  @jax.jit
  def plain_step(p, batch):
    g = jax.grad(lambda q: jnp.mean(per_example(q, batch)))(p)
    return optax.apply_updates(p, sgd.update(g, sgd.init(p))[0])

  @jax.jit
  def ghost_step(p, batch, key):
    g = optim.dp_gradient(per_example, p, batch, CLIP, key, SIGMA)
    return optax.apply_updates(p, sgd.update(g, sgd.init(p))[0])

  dpsgd = optax.contrib.dpsgd(LR, CLIP, SIGMA, seed=0)

  @jax.jit
  def optax_step(p, opt, batch):
    grads = jax.vmap(lambda ex: jax.grad(lambda q: per_example(q, jax.tree.map(lambda a: a[None], ex))[0])(p))(batch)
    u, opt = dpsgd.update(grads, opt, p)
    return optax.apply_updates(p, u), opt

  rng = np.random.default_rng(0)
  print(f"{'batch':>6} {'plain ms':>9} {'ghost ms':>9} {'optax ms':>9} {'ghost/plain':>12} {'optax/plain':>12}")
  for b in args.batches:
    batch = {"image": jnp.asarray(rng.normal(size=(b, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32)}
    key = jax.random.key(1)
    opt = dpsgd.init(params)
    jax.block_until_ready((plain_step(params, batch), ghost_step(params, batch, key),
                           optax_step(params, opt, batch)))                       # compile
    times = {"plain": [], "ghost": [], "optax": []}
    for _ in range(args.repeats):
      times["plain"].append(timed(lambda: plain_step(params, batch), args.steps))
      times["ghost"].append(timed(lambda: ghost_step(params, batch, key), args.steps))
      times["optax"].append(timed(lambda: optax_step(params, opt, batch), args.steps))
    ratio = lambda name: statistics.median(t / p for t, p in zip(times[name], times["plain"]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{b:>6} {med['plain']:>9.2f} {med['ghost']:>9.2f} {med['optax']:>9.2f} {ratio('ghost'):>12.2f} "
          f"{ratio('optax'):>12.2f}")
  print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
