"""Fully sharded (data x fsdp) step vs the data-parallel step on the same 8 fake CPU devices.

The MLP 64-1024-1024-10 with Adam, global batch 512, on 8 fake CPU devices (one process): the step on a
``data x fsdp`` mesh of 8 x 1 (pure data parallelism, replicated state) and of 4 x 2, 2 x 4 and 1 x 8 (state
sharded over fsdp: gathered for the forward/backward pass, gradients reduce-scattered). Fake devices share
the host's cores and memory, so the gathers are copies and the ratio shows the bookkeeping cost of
sharding, not a real interconnect (expected above 1 on CPU); per-device state bytes are printed beside.
Variants alternate in every repeat; medians.

  python benchmarks/fsdp_step.py [--repeats 7]
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from prox import models  # noqa: E402
from prox import step as S  # noqa: E402
from prox.losses import classification_loss  # noqa: E402
from _timing import timed  # noqa: E402  (benchmarks/_timing.py)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--batch", type=int, default=512)
  args = parser.parse_args()
  devices = jax.device_count()
  net = models.functional(models.make_model("mlp", input_shape=(64,), num_classes=10, hidden=(1024, 1024)))
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, 64)).astype(np.float32)
  y = rng.integers(0, 10, args.batch).astype(np.int32)
  calls, nbytes = {}, {}
  for fsdp in (1, 2, 4, 8):
    if devices % fsdp:
      continue
    mesh = S.fsdp_mesh(devices // fsdp, fsdp)
    state = S.place(S.init_state(net.params, tx), mesh)
    nbytes[fsdp] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    step = S.make_train_step(classification_loss(net.apply), tx, mesh=mesh)
    batch = S.shard_batch({"image": x, "label": y}, mesh)
    holder = [state]

    def call(step=step, holder=holder, batch=batch):
      holder[0], out = step(holder[0], batch)
      return out.metrics["loss"]

    call()
    calls[fsdp] = call
  times = {k: [] for k in calls}
  for _ in range(args.repeats):
    for k, call in calls.items():
      times[k].append(timed(call, 5))
  base = statistics.median(times[1])
  print(f"{devices} fake CPU devices, MLP 64-1024-1024-10, Adam, batch {args.batch}")
  for k in calls:
    med = statistics.median(times[k])
    print(f"  {devices // k} x {k}: {1e3 * med:8.2f} ms/step  ratio {med / base:.3f}   per-device state "
          f"{nbytes[k] / 2**20:.2f} MiB ({nbytes[k] / nbytes[1]:.3f} of data parallel)")
  print(f"fsdp_vs_data_parallel={statistics.median(times[max(calls)]) / base:.3f}")


if __name__ == "__main__":
  main()
