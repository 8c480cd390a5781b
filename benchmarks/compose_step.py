"""The composed step of the ``compose`` experiment vs the same step without its methods.

The composed step runs, in one jitted data-parallel step: the norm test's per-example moments and the
batch-size controller, N:M masks in the forward pass and around the optimizer (MdGf), online EWC with a
shift detector that consolidates under ``lax.cond``, and the episodic ALP-GMM teacher's update. The
baseline is the same prox step on the same model, optimizer and micro-batching without them. For each
batch size (a power-of-two bucket of micro-batches of 64) it prints the median step time ratio
(target <= 1.2) and the compile time of each step (target: the composed step's compile <= 2x the plain
step's). Variants alternate in every repeat; medians.

  python benchmarks/compose_step.py [--batches 64 256 1024] [--repeats 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from prox import models
from prox import step as S
from prox.experiments import compose
from prox.experiments.configs import compose as configs
from prox.losses import classification_loss
from _timing import timed  # benchmarks/_timing.py


def build(config, net, methods):
  comp = compose.composition(config, net.apply, methods, jax.random.key(0))
  mesh = S.data_mesh(jax.devices()[:1])
  step = S.make_train_step(classification_loss(net.apply), comp.tx, mesh=mesh, forward_fn=comp.forward_fn,
                           transition=comp.transition, micro_batch_size=64, **comp.step_options)
  state = S.replicate(S.init_state(net.params, comp.tx, extra=comp.extra), mesh)
  return step, state, mesh


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  config = configs.get_config()
  net = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, hidden=(256, 256)))
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}; MLP 64-256-256-10, micro-batches of 64")
  worst = 0.0
  for b in args.batches:
    x = rng.normal(size=(b, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, b).astype(np.int32)
    n = np.int32(b // 64)
    calls, compile_s = {}, {}
    for label, methods in (("plain", ()), ("composed", ("batch", "nm", "ewc", "teacher"))):
      step, state, mesh = build(config, net, methods)
      batch = S.shard_batch({"image": x, "label": y}, mesh)
      t0 = time.perf_counter()
      exe = step.lower(state, batch, n, None).compile()
      compile_s[label] = time.perf_counter() - t0
      holder = [state]

      def call(exe=exe, holder=holder, batch=batch):
        holder[0], out = exe(holder[0], batch, n, None)
        return out.metrics["loss"]

      call()
      calls[label] = call
    times = {k: [] for k in calls}
    for _ in range(args.repeats):
      for k, call in calls.items():
        times[k].append(timed(call, max(3, 2048 // b)))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["composed"] / med["plain"]
    worst = max(worst, ratio)
    print(f"b={b:5d}  plain {1e3 * med['plain']:7.3f} ms  composed {1e3 * med['composed']:7.3f} ms  "
          f"ratio {ratio:.3f}   compile plain {compile_s['plain']:.2f} s  composed {compile_s['composed']:.2f} s "
          f"({compile_s['composed'] / compile_s['plain']:.2f}x)", flush=True)
  print(f"composed_vs_plain_step={worst:.3f}")


if __name__ == "__main__":
  main()
