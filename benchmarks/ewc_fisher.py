"""EWC on digits: per-example vs Avalanche's mini-batch Fisher, and the step cost vs the number of tasks.

Run: ``python benchmarks/ewc_fisher.py`` (CPU, well under a minute).

1. Trains a small MLP (64-64-10, tanh) with SGD on split-digits task 0 (classes {0, 1}) and on all ten
   classes, then prints ``sum(F_per_example) / sum(F_minibatch)`` and the median per-coordinate ratio for
   several mini-batch sizes ``B``: the factor by which a lambda tuned with Avalanche's mini-batch Fisher must
   be divided to give the same penalty with the per-example Fisher.
2. Times one jitted ``chain(ewc, sgd)`` update with the running-sum state after 1 and after 100 tasks, next to
   an explicit per-task sum (what Avalanche computes each step) over 100 stored (F, w*) pairs.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.tasks import data
from prox.tasks import streams
from prox.transforms import ewc as E


def init_mlp(key, sizes=(64, 64, 10)):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k = jax.random.split(key)
    params[f"l{i}"] = {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros((b,))}
  return params


def logits_fn(params, x):
  h = x.reshape(x.shape[0], -1)
  h = jnp.tanh(h @ params["l0"]["kernel"] + params["l0"]["bias"])
  return h @ params["l1"]["kernel"] + params["l1"]["bias"]


def logprob(params, example):
  x, y = example
  return jax.nn.log_softmax(logits_fn(params, x[None])[0])[y]


def train(params, images, labels, epochs=20, lr=0.1, batch=32, seed=0):
  tx = optax.sgd(lr)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, y):
    g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(logits_fn(q, x), y).mean())(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(labels))
    for s in range(0, len(order) - batch + 1, batch):
      idx = order[s:s + batch]
      params, opt = step(params, opt, images[idx], labels[idx])
  return params


def fisher_ratios(name, params, images, labels):
  batch = (jnp.asarray(images), jnp.asarray(labels))
  f = E.diagonal_fisher(logprob, params, batch)
  acc = float(jnp.mean(jnp.argmax(logits_fn(params, batch[0]), -1) == batch[1]))
  fs = np.concatenate([np.ravel(x) for x in jax.tree.leaves(f)])
  for b in (10, 32, 64, 128):
    fb = E.diagonal_fisher(logprob, params, batch, minibatch_size=b)
    fbs = np.concatenate([np.ravel(x) for x in jax.tree.leaves(fb)])
    nz = fbs > 1e-12
    print(f"  {name:<22} n={len(labels):5d} train_acc={acc:.3f}  B={b:4d}  "
          f"sum(F)/sum(F_B)={fs.sum() / fbs.sum():7.2f}  median_i F_i/F_B,i={np.median(fs[nz] / fbs[nz]):7.2f}")


def time_fn(fn, *args, repeats=50):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  train_ds, test_ds = data.load("digits", "train"), data.load("digits", "test")
  del test_ds
  print("1) per-example vs mini-batch (Avalanche) diagonal Fisher, MLP 64-64-10 trained with SGD(0.1), 20 epochs")
  task0 = streams.split_tasks(train_ds, data.load("digits", "test"), 2)[0].train.materialize()
  p0 = train(init_mlp(jax.random.key(0)), task0.images, task0.labels)
  fisher_ratios("split-digits task 0", p0, task0.images, task0.labels)
  pa = train(init_mlp(jax.random.key(0)), train_ds.images, train_ds.labels)
  fisher_ratios("digits, 10 classes", pa, train_ds.images, train_ds.labels)

  print("2) step cost vs number of consolidated tasks (jitted chain(ewc, sgd) update, median of 50)")
  params = init_mlp(jax.random.key(1))
  tx = optax.chain(E.ewc(100.0), optax.sgd(0.01))
  grads = jax.tree.map(jnp.ones_like, params)
  upd = jax.jit(tx.update)
  num_tasks = 100
  rng = np.random.default_rng(0)
  fishers = [jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape), jnp.float32), params)
             for _ in range(num_tasks)]
  anchors = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(num_tasks)]
  s1 = E.consolidate_opt_state(tx.init(params), anchors[0], fishers[0])
  sT = tx.init(params)
  for f, a in zip(fishers, anchors):
    sT = E.consolidate_opt_state(sT, a, f)
  t1 = time_fn(upd, grads, s1, params)
  tT = time_fn(upd, grads, sT, params)
  stacked_f = jax.tree.map(lambda *x: jnp.stack(x), *fishers)
  stacked_a = jax.tree.map(lambda *x: jnp.stack(x), *anchors)

  @jax.jit
  def explicit(g, w, fs, ws):  # sum_j lambda F_j (w - w*_j), one term per stored task
    return jax.tree.map(lambda gi, wi, f, a: gi + 100.0 * jnp.sum(f * (wi[None] - a), 0), g, w, fs, ws)

  tE = time_fn(explicit, grads, params, stacked_f, stacked_a)
  a = jax.tree.leaves(upd(jax.tree.map(jnp.zeros_like, grads), sT, params)[0])
  b = jax.tree.leaves(explicit(jax.tree.map(jnp.zeros_like, grads), params, stacked_f, stacked_a))
  err = max(float(jnp.max(jnp.abs(x / -0.01 - y)) / jnp.max(jnp.abs(y))) for x, y in zip(a, b))
  print(f"  running sums, 1 task:   {t1 * 1e6:8.1f} us")
  print(f"  running sums, {num_tasks} tasks: {tT * 1e6:8.1f} us   ratio to 1 task: {tT / t1:5.2f}")
  print(f"  explicit sum, {num_tasks} tasks: {tE * 1e6:8.1f} us   ratio to running sums: {tE / tT:5.2f}"
        f"   (max rel. difference of the penalty gradients: {err:.1e})")


if __name__ == "__main__":
  main()
