"""Forward time of a physically sliced network / the same network with channel masks, next to its FLOPs ratio.

For the zoo CNN (28x28x1, width 32, hidden 128) and ResNet-20 (32x32x3, width 16), channels are pruned
by ``prox.transforms.channel_importance`` to keep a fraction of every group (the most important ones);
the masked network (full shapes, masked weights) and the network from ``slice_params`` (smaller shapes,
``sliced_functional``) run the same eval-mode forward under ``jax.jit``. Prints, per keep fraction, the
MACs ratio ``masked_flops / full_flops`` and the time ratio sliced / masked (median of interleaved
repeats after warm-up).

    python benchmarks/slice_speed.py [--repeats 20] [--batch 256]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prox import transforms as T
from prox.models import functional, make_model, sliced_functional, structure_of

CASES = {"cnn": dict(input_shape=(28, 28, 1), width=32, hidden=128), "resnet20": dict(input_shape=(32, 32, 3), width=16)}


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def top_fraction_masks(structure, params, keep: float) -> dict:
  imp = T.channel_importance(structure, params)
  out = {}
  for g in structure.groups:
    k = max(1, int(math.ceil(keep * g.size)))
    order = np.argsort(-np.asarray(imp[g.name]), kind="stable")
    m = np.zeros(g.size, bool)
    m[order[:k]] = True
    out[g.name] = jnp.asarray(m)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} batch={args.batch} "
        f"repeats={args.repeats}")
  for name, opts in CASES.items():
    opts = dict(opts)
    shape = opts.pop("input_shape")
    model = make_model(name, input_shape=shape, num_classes=10, **opts)
    f = functional(model)
    s = structure_of(name, f.params, input_shape=shape, model_state=f.model_state)
    x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, *shape))
    fwd = jax.jit(lambda p, st, x: f.apply(p, st, x, train=False)[0])
    for keep in (0.75, 0.5, 0.25):
      masks = top_fraction_masks(s, f.params, keep)
      masked = T.apply_channel_masks(s, masks, f.params)
      sp, ss = T.slice_params(s, masks, f.params, f.model_state)
      sf = sliced_functional(model, sp, ss)
      sfwd = jax.jit(lambda p, st, x: sf.apply(p, st, x, train=False)[0])
      np.testing.assert_allclose(sfwd(sp, ss, x), fwd(masked, f.model_state, x), rtol=1e-4, atol=1e-4)
      for _ in range(3):
        timed(fwd, masked, f.model_state, x)
        timed(sfwd, sp, ss, x)
      tm, ts = [], []
      for _ in range(args.repeats):
        tm.append(timed(fwd, masked, f.model_state, x))
        ts.append(timed(sfwd, sp, ss, x))
      tm, ts = statistics.median(tm), statistics.median(ts)
      flops = float(T.masked_flops(s, masks)) / T.full_flops(s)
      params = float(T.masked_param_count(s, masks, f.params)) / sum(np.size(a) for a in jax.tree.leaves(f.params))
      print(f"{name:8s} keep {keep:.2f} of each group: MACs ratio {flops:.3f}  params ratio {params:.3f}  "
            f"time sliced/masked {ts / tm:.3f}  ({ts * 1e3:.2f} ms vs {tm * 1e3:.2f} ms)")


if __name__ == "__main__":
  main()
