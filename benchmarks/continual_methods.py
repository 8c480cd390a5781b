"""Step time of MIR and OnPro (prox's library pieces) against a naive experience-replay step written by hand.

Model: the MLP of MIR's MNIST experiments, 784-400-400-10 (ReLU), plain SGD (lr 0.1), an incoming batch of
10 examples and 10 replayed ones (MIR's and OnPro's stream settings), a reservoir memory of 1,000 examples,
random MNIST-shaped data. Every step is one ``jax.jit`` (state donated):

* naive replay, hand-written (the baseline a user writes first): 10 uniform draws from the memory (index
  sampling and a vectorised Algorithm-R insert in plain jax), one mean cross-entropy over the 20 rows, SGD.
* MIR (prox): ``prox.tasks.mir_retrieve`` -- the incoming batch's gradient, the virtual SGD step, losses before
  and after it on C = 50 candidates (MIR's ``subsample``), the 10 most interfered -- then the reference
  update ``grad L(B_in) + grad L(B_mem)`` reusing the incoming gradient, SGD, ``reservoir_add``.
* OnPro (prox): two views of the incoming batch and of a uniform memory draw (the second view: a random 10%
  of the pixels zeroed), 10 replay rows from ``prox.tasks.prototype_feedback`` mixed with
  ``prox.tasks.mixup_inputs``; one forward pass of the 50 rows through the encoder (784-400-400) with a
  linear classifier and a 128-d projection head; loss = CE(incoming) + mixup CE(replay) +
  ``prox.losses.onpro_equilibrium_loss``; SGD; the feedback state updated with the replayed batch's class
  means; ``reservoir_add``. (OnPro's instance-wise contrastive loss of OCM on 16 rotations is not included.)

Two references separate the methods' own work from prox's overhead: MIR written by hand (the same maths
inline: ``jax.random.choice`` candidates, ``lax.top_k``), and the naive step over 50 rows (40 replayed), the
rows OnPro's forward pass sees.

Prints, per step, the median and the fastest wall-clock time over repeats of ``--steps`` steps (alternating,
so that machine noise hits them alike) and the median process-CPU time (steadier than the wall clock when
other processes share the cores), each with its ratio to the naive step (target <= 2.0).

  python benchmarks/continual_methods.py [--repeats 15] [--steps 50]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import losses, tasks
from prox.tasks import replay
from _timing import timed  # benchmarks/_timing.py

SIZES = (784, 400, 400, 10)
PROJ = 128
BATCH, REPLAY, CANDIDATES, CAPACITY, LR = 10, 10, 50, 1000, 0.1


def init_mlp(key, sizes):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def per_example_ce(params, ex):
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, ex["x"]), ex["y"])


def sgd(params, grads):
  return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def timed_both(fn, steps: int) -> tuple[float, float]:
  """Mean wall-clock and process-CPU seconds per call of ``fn()`` (CPU time: all of this process's threads;
  on a machine shared with other busy processes it moves far less than the wall clock)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(BATCH, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32)
  batch = {"x": x, "y": y}
  mem_x = jnp.asarray(rng.uniform(size=(CAPACITY, 784)), jnp.float32)
  mem_y = jnp.asarray(rng.integers(0, 10, size=CAPACITY), jnp.int32)
  memory0 = replay.reservoir_add(replay.reservoir_init({"x": x[0], "y": y[0]}, CAPACITY),
                                 {"x": mem_x, "y": mem_y}, jax.random.key(1))
  params0 = init_mlp(jax.random.key(0), SIZES)

  # --- naive replay, hand-written (``replay`` memory rows; REPLAY for the baseline, 40 for the row-matched one)
  def naive_step(params, data, seen, key, batch, replay_rows=REPLAY):
    k1, k2 = jax.random.split(key)
    size = jnp.minimum(seen, CAPACITY)
    idx = jax.random.randint(k1, (replay_rows,), 0, jnp.maximum(size, 1))
    mixed = jax.tree.map(lambda b, m: jnp.concatenate([b, m[idx]]), batch, data)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(per_example_ce(p, mixed)))(params)
    n = seen + jnp.arange(BATCH)
    slot = jnp.where(n < CAPACITY, n, jax.random.randint(k2, (BATCH,), 0, n + 1))
    data = jax.tree.map(lambda m, b: m.at[slot].set(b, mode="drop"), data, batch)
    return sgd(params, grads), data, seen + BATCH, loss

  naive50_step = jax.jit(functools.partial(naive_step, replay_rows=5 * BATCH - BATCH), donate_argnums=(0, 1))
  naive_step = jax.jit(functools.partial(naive_step, replay_rows=REPLAY), donate_argnums=(0, 1))
  naive = [jax.tree.map(jnp.copy, params0), jax.tree.map(jnp.copy, memory0.data), memory0.seen]
  naive50 = [jax.tree.map(jnp.copy, params0), jax.tree.map(jnp.copy, memory0.data), memory0.seen]

  # --- MIR written by hand (the same maths inline, no prox), for prox's overhead
  def mir_hand_step(params, data, seen, key, batch):
    k1, k2, k3 = jax.random.split(key, 3)
    g_in = jax.grad(lambda p: jnp.mean(per_example_ce(p, batch)))(params)
    size = jnp.minimum(seen, CAPACITY)
    scores = jnp.where(jnp.arange(CAPACITY) < size, jax.random.uniform(k1, (CAPACITY,)), 2.0)
    cand = jax.lax.top_k(-scores, CANDIDATES)[1]                # C distinct stored slots, uniformly
    cx = jax.tree.map(lambda m: m[cand], data)
    virtual = sgd(params, g_in)
    top = jax.lax.top_k(per_example_ce(virtual, cx) - per_example_ce(params, cx), REPLAY)[1]
    mem = jax.tree.map(lambda m: m[top], cx)
    loss, g_mem = jax.value_and_grad(lambda p: jnp.mean(per_example_ce(p, mem)))(params)
    n = seen + jnp.arange(BATCH)
    slot = jnp.where(n < CAPACITY, n, jax.random.randint(k3, (BATCH,), 0, n + 1))
    data = jax.tree.map(lambda m, b: m.at[slot].set(b, mode="drop"), data, batch)
    return sgd(params, jax.tree.map(jnp.add, g_in, g_mem)), data, seen + BATCH, loss

  mir_hand_step = jax.jit(mir_hand_step, donate_argnums=(0, 1))
  mir_hand = [jax.tree.map(jnp.copy, params0), jax.tree.map(jnp.copy, memory0.data), memory0.seen]

  # --- MIR with prox
  def mir_step(params, memory, key, batch):
    k1, k2 = jax.random.split(key)
    g_in = jax.grad(lambda p: jnp.mean(per_example_ce(p, batch)))(params)
    got = tasks.mir_retrieve(per_example_ce, params, batch, memory, k1, num_candidates=CANDIDATES, k=REPLAY,
                             learning_rate=LR, grads=g_in)
    w = got.valid.astype(jnp.float32)
    loss, g_mem = jax.value_and_grad(
        lambda p: jnp.sum(w * per_example_ce(p, got.batch)) / jnp.maximum(jnp.sum(w), 1.0))(params)
    params = sgd(params, jax.tree.map(jnp.add, g_in, g_mem))
    return params, replay.reservoir_add(memory, batch, k2), loss

  mir_step = jax.jit(mir_step, donate_argnums=(0, 1))
  mir = [jax.tree.map(jnp.copy, params0), jax.tree.map(jnp.copy, memory0)]

  # --- OnPro with prox
  feedback = tasks.prototype_feedback(10, label_of=lambda d: d["y"])
  enc0 = init_mlp(jax.random.key(2), SIZES[:3])
  heads0 = {"cls": init_mlp(jax.random.key(3), (SIZES[2], 10))[0],
            "proj": init_mlp(jax.random.key(4), (SIZES[2], PROJ))[0]}

  def encoder(enc, x):
    for layer in enc:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x

  def onpro_step(model, fb_state, memory, key, batch):
    k_mem, k_fb, k_aug, k_add = jax.random.split(key, 4)
    mem, mem_valid = replay.reservoir_sample(memory, k_mem, REPLAY)
    drawn = feedback.sample(fb_state, memory, k_fb, REPLAY)
    mixed = tasks.mixup_inputs(drawn.first, drawn.second, drawn.lam)
    keep = jax.random.bernoulli(k_aug, 0.9, (1, 784)).astype(jnp.float32)   # the second view's pixel mask
    rows = jnp.concatenate([batch["x"], batch["x"] * keep, mem["x"], mem["x"] * keep, mixed["x"]])

    def loss_fn(model):
      feats = encoder(model["enc"], rows)                                         # [50, 400]
      logits = feats @ model["heads"]["cls"]["w"] + model["heads"]["cls"]["b"]
      z = feats @ model["heads"]["proj"]["w"] + model["heads"]["proj"]["b"]
      b = BATCH
      ce_new = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:b], batch["y"]))
      ce_mix = losses.mixup_cross_entropy(logits[4 * b:], drawn.labels_first, drawn.labels_second, drawn.lam)
      w = drawn.valid.astype(jnp.float32)
      ce_mix = jnp.sum(w * ce_mix) / jnp.maximum(jnp.sum(w), 1.0)
      ope = losses.onpro_equilibrium_loss(z[:b], z[b:2 * b], batch["y"], z[2 * b:3 * b], z[3 * b:4 * b], mem["y"],
                                          num_classes=10, seen_weights=mem_valid)
      means_a, present = losses.online_prototypes(z[2 * b:3 * b], mem["y"], num_classes=10, weights=mem_valid)
      means_b, _ = losses.online_prototypes(z[3 * b:4 * b], mem["y"], num_classes=10, weights=mem_valid)
      return ce_new + ce_mix + ope, ((means_a + means_b) / 2, present)

    (loss, (means, present)), grads = jax.value_and_grad(loss_fn, has_aux=True)(model)
    model = sgd(model, grads)
    fb_state = feedback.update(fb_state, means, present)
    return model, fb_state, replay.reservoir_add(memory, batch, k_add), loss

  onpro_step = jax.jit(onpro_step, donate_argnums=(0, 1, 2))
  onpro = [{"enc": enc0, "heads": heads0}, feedback.init(PROJ), jax.tree.map(jnp.copy, memory0)]

  keys = iter(jax.random.split(jax.random.key(5), 5 * (args.repeats * args.steps + 10)))

  def run_naive():
    naive[0], naive[1], naive[2], loss = naive_step(naive[0], naive[1], naive[2], next(keys), batch)
    return loss

  def run_naive50():
    naive50[0], naive50[1], naive50[2], loss = naive50_step(naive50[0], naive50[1], naive50[2], next(keys), batch)
    return loss

  def run_mir_hand():
    mir_hand[0], mir_hand[1], mir_hand[2], loss = mir_hand_step(mir_hand[0], mir_hand[1], mir_hand[2], next(keys),
                                                                batch)
    return loss

  def run_mir():
    mir[0], mir[1], loss = mir_step(mir[0], mir[1], next(keys), batch)
    return loss

  def run_onpro():
    onpro[0], onpro[1], onpro[2], loss = onpro_step(onpro[0], onpro[1], onpro[2], next(keys), batch)
    return loss

  runs = {"naive": run_naive, "mir": run_mir, "onpro": run_onpro, "mir_hand": run_mir_hand,
          "naive50": run_naive50}
  for fn in runs.values():
    timed(fn, 3)
  times = {k: [] for k in runs}
  cpu_times = {k: [] for k in runs}
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); MLP {'-'.join(map(str, SIZES))}, SGD lr {LR}, "
        f"batch {BATCH} + replay {REPLAY}, memory {CAPACITY}, MIR candidates {CANDIDATES}, OnPro projection {PROJ}")
  print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  for _ in range(args.repeats):
    for name, fn in runs.items():
      wall, cpu = timed_both(fn, args.steps)
      times[name].append(wall)
      cpu_times[name].append(cpu)
  if any(f._cache_size() != 1 for f in (naive_step, mir_step, onpro_step, mir_hand_step, naive50_step)):
    raise RuntimeError("a step recompiled")
  med = {k: statistics.median(v) for k, v in times.items()}
  fast = {k: min(v) for k, v in times.items()}
  cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
  print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  print(f"{'step':>22} {'median':>10} {'/naive':>7} {'fastest':>10} {'/naive':>7} {'CPU time':>10} {'/naive':>7}")
  for name, label in (("naive", "naive replay (hand)"), ("mir", "MIR (prox)"), ("onpro", "OnPro (prox)"),
                      ("mir_hand", "MIR (hand, ref.)"), ("naive50", "naive, 50 rows (ref.)")):
    print(f"{label:>22} {med[name] * 1e3:>8.3f}ms {med[name] / med['naive']:>7.2f} {fast[name] * 1e3:>8.3f}ms "
          f"{fast[name] / fast['naive']:>7.2f} {cpu[name] * 1e3:>8.3f}ms {cpu[name] / cpu['naive']:>7.2f}")
  print(f"prox MIR / hand MIR: {med['mir'] / med['mir_hand']:.2f} (median), {fast['mir'] / fast['mir_hand']:.2f} "
        f"(fastest), {cpu['mir'] / cpu['mir_hand']:.2f} (CPU); OnPro / naive with OnPro's 50 forward rows: "
        f"{med['onpro'] / med['naive50']:.2f} (median), {fast['onpro'] / fast['naive50']:.2f} (fastest), "
        f"{cpu['onpro'] / cpu['naive50']:.2f} (CPU)")
  print("target: MIR/naive <= 2.0 and OnPro/naive <= 2.0")


if __name__ == "__main__":
  main()
