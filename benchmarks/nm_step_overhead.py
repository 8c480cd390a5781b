"""Cost of N:M sparsity with progressive gradient flow relative to a dense step.

MLP 784-1024-1024-10, batch 512, Adam inner. Both steps are plain ``jax.jit`` functions written here:
the dense step is ``grad(loss)(params)`` + Adam + ``apply_updates``; the MdGf step differentiates
``loss(forward_params(params, state))`` and runs ``nm_sparsity(adam)`` (which computes the masks of the
new parameters once per step). Also times the mask computation alone, per algorithm with ``--masks``.

    python benchmarks/nm_step_overhead.py [--repeats 20] [--masks]

Prints ratios measured side by side in one run (warm-up, then the median of interleaved repeats).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from prox.transforms import filters, forward_params, nm_masks, nm_sparsity

SIZES = (784, 1024, 1024, 10)
BATCH = 512


def init_mlp(key: jax.Array) -> dict:
  params = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"dense_{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * (2.0 / a) ** 0.5, "bias": jnp.zeros(b)}
  return params


def mlp(params: dict, x: jax.Array) -> jax.Array:
  n = len(SIZES) - 1
  for i in range(n):
    x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def make_dense_step(tx: optax.GradientTransformation):
  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def make_sparse_step(tx: optax.GradientTransformation):
  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(forward_params(p, opt_state), x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--masks", action="store_true", help="also time each mask algorithm")
  args = parser.parse_args()

  key = jax.random.PRNGKey(0)
  params = init_mlp(key)
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, SIZES[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, SIZES[-1])
  kern = filters.dense_kernels()
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} mlp={SIZES} batch={BATCH} "
        f"repeats={args.repeats}")

  dense_tx = optax.adam(1e-3)
  dense_step = make_dense_step(dense_tx)
  cases = {}
  for n, m in ((2, 4), (1, 8), (1, 16)):
    tx = nm_sparsity(optax.adam(1e-3), n, m, method="mdgf", decay="linear", total_steps=10_000, filter=kern)
    cases[f"mdgf {n}:{m}"] = (make_sparse_step(tx), tx.init(params))
  tx = nm_sparsity(optax.adam(1e-3), 2, 4, method="srste", filter=kern)
  cases["srste 2:4"] = (make_sparse_step(tx), tx.init(params))
  masks_fns = {f"{n}:{m}": jax.jit(lambda p, n=n, m=m: nm_masks(p, n, m, filter=kern)) for n, m in ((2, 4), (1, 8), (1, 16))}

  dense_state = dense_tx.init(params)
  for _ in range(3):  # warm-up (compile) every function
    timed(dense_step, params, dense_state, x, y)
    for fn, st in cases.values():
      timed(fn, params, st, x, y)
    for fn in masks_fns.values():
      timed(fn, params)

  times: dict[str, list[float]] = {"dense": []}
  times.update({k: [] for k in cases})
  times.update({f"masks {k}": [] for k in masks_fns})
  for _ in range(args.repeats):  # interleaved so that load changes hit all cases alike
    times["dense"].append(timed(dense_step, params, dense_state, x, y))
    for name, (fn, st) in cases.items():
      times[name].append(timed(fn, params, st, x, y))
    for name, fn in masks_fns.items():
      times[f"masks {name}"].append(timed(fn, params))
  med = {k: statistics.median(v) for k, v in times.items()}
  base = med["dense"]
  print(f"dense step: {base * 1e3:.2f} ms")
  for name in cases:
    print(f"{name} step / dense step: {med[name] / base:.3f}   ({med[name] * 1e3:.2f} ms; target <= 1.15)")
  for name in masks_fns:
    k = f"masks {name}"
    print(f"mask computation {name} (all kernels, once per step): {med[k] * 1e3:.3f} ms = {med[k] / base:.3f} "
          "of a dense step")

  if args.masks:
    from prox.transforms.nm import nm_mask
    ws = [params[f"dense_{i}"]["kernel"] for i in range(3)]
    print("mask algorithms (ms for the three kernels; 'auto' marked *):")
    for n, m in ((2, 4), (1, 8), (1, 16), (2, 16), (4, 32), (8, 32)):
      row = []
      for impl in ("count", "select", "sort"):
        fn = jax.jit(lambda ws, impl=impl, n=n, m=m: [nm_mask(w, n, m, impl=impl) for w in ws if w.shape[0] % m == 0])
        timed(fn, ws)
        t = statistics.median(timed(fn, ws) for _ in range(max(3, args.repeats // 4)))
        row.append(f"{impl} {t * 1e3:8.2f}")
      from prox.transforms.nm import _auto_impl
      print(f"  {n}:{m}  " + "  ".join(r + ("*" if r.startswith(_auto_impl(n, m)) else " ") for r in row))


if __name__ == "__main__":
  main()
