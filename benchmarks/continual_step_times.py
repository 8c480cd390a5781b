"""Step time of each continual method against naive's, on the same batch, in the experiment's own setting.

Each method's jitted train step (``prox.step.make_train_step`` with the method's loss, transform and
transition, exactly as ``prox.experiments.continual`` builds it; default config: MLP 64-256-256-10, SGD,
batch 32, replay's 200-example reservoir and 32 replayed rows) is run on one fixed batch of the first
split task, after 20 warm-up steps (the memory is full). Repeats of ``--steps`` steps alternate between the
methods so that machine noise hits them alike; printed per method: the median and the fastest wall-clock
time per step and the median process-CPU time per step, each over naive's. ``wsn`` and naive's reference
for it run on the task-incremental ``split`` stream (logit masks), the others on ``split_class``.

  python benchmarks/continual_step_times.py [--repeats 15] [--steps 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from prox import step as step_lib
from prox.experiments import common, continual
from prox.experiments.configs import continual as continual_config

KINDS = ("naive", "replay", "gpm", "mas", "mir", "cuber", "protocl", "onpro", "tame")


def build(cfg, env, train_ds, test_ds, stream: str, kind: str):
  tasks = continual._tasks(stream, cfg, train_ds, test_ds, 0)   # pylint: disable=protected-access
  setting = continual._setting(stream, cfg)                     # pylint: disable=protected-access
  (spec,) = continual._specs(stream, cfg, [kind])               # pylint: disable=protected-access
  method = continual._method(env, stream, setting, spec, tasks)  # pylint: disable=protected-access
  params = env.init_params(0)
  if method.params is not None:
    params = method.params(params, 0)
  state = common.replicated_state(params, method.tx, env.mesh, seed=0, extra=method.extra(params, 0))
  step = step_lib.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition,
                                  skip_nonfinite=method.skip_nonfinite)
  ds = tasks[0].train.materialize()
  rows = {"image": ds.images[:32], "label": ds.labels[:32], "row": np.arange(32, dtype=np.int32)}
  if setting.masked:
    rows["logit_mask"] = np.broadcast_to(tasks[0].logit_mask, (32, env.num_classes))
  batch = step_lib.shard_batch(rows, env.mesh)
  for _ in range(20):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  return {"step": step, "state": state, "batch": batch}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  cfg = continual_config.get_config()
  cfg.progress = False
  train_ds, test_ds = common.load_splits(cfg)
  env = continual._env(cfg, train_ds)   # pylint: disable=protected-access
  runs = {kind: build(cfg, env, train_ds, test_ds, "split_class", kind) for kind in KINDS}
  runs["naive (split)"] = build(cfg, env, train_ds, test_ds, "split", "naive")
  runs["wsn (split)"] = build(cfg, env, train_ds, test_ds, "split", "wsn")
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  for _ in range(args.repeats):
    for name, r in runs.items():
      w, c = time.perf_counter(), time.process_time()
      state, out = r["state"], None
      for _ in range(args.steps):
        state, out = r["step"](state, r["batch"])
      jax.block_until_ready(out)
      r["state"] = state
      wall[name].append((time.perf_counter() - w) / args.steps)
      cpu[name].append((time.process_time() - c) / args.steps)
  print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  print(f"{'step':>14} {'median':>10} {'/naive':>7} {'fastest':>10} {'/naive':>7} {'CPU time':>10} {'/naive':>7}")
  for name in runs:
    base = "naive (split)" if name.endswith("(split)") else "naive"
    med, fast, c = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
    print(f"{name:>14} {med * 1e3:>8.3f}ms {med / statistics.median(wall[base]):>7.2f} {fast * 1e3:>8.3f}ms "
          f"{fast / min(wall[base]):>7.2f} {c * 1e3:>8.3f}ms {c / statistics.median(cpu[base]):>7.2f}")


if __name__ == "__main__":
  main()
