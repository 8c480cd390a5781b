"""Step time of each prox transform inside the NNX loop of ``train.py``, relative to plain optax.

For every transform, the ``nnx.jit`` train step of ``train.py`` with that transform and with plain
``optax.sgd`` (the same model, batches and loop) run ``--repeats`` times ``--steps`` steps, taking turns.
Per step, the table gives the fastest repeat's CPU time of this process (all threads) and wall time; the
fastest repeat is the one least disturbed by other processes sharing the machine. The ratio is of the
CPU times.

  python examples/flax_mnist/benchmark.py [--steps 50] [--repeats 15] [--transforms nm_sparsity,ewc]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--transforms", default=",".join(t for t in train.TRANSFORMS if t != "none"))
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; batch 32, "
        f"{args.steps} steps x {args.repeats} repeats")
  print("| transform | protocol | plain optax CPU ms/step | prox CPU ms/step | prox / plain | "
        "plain wall ms/step | prox wall ms/step |")
  print("|---|---|---|---|---|---|---|")
  for name in args.transforms.split(","):
    config = default.get_config(name)
    plain = default.get_config("none")
    plain.protocol = train.protocol_of(config)
    t_plain, t_prox = train.step_times([plain, config], steps=args.steps, repeats=args.repeats)
    cpu_plain, cpu_prox = min(t_plain["cpu"]), min(t_prox["cpu"])
    print(f"| {name} | {plain.protocol} | {cpu_plain * 1e3:.2f} | {cpu_prox * 1e3:.2f} | {cpu_prox / cpu_plain:.2f} | "
          f"{min(t_plain['wall']) * 1e3:.2f} | {min(t_prox['wall']) * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
  main()
