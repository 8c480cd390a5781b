"""A distillation step built with prox (``prox.step.make_train_step``: teacher bank and stage machine in
``TrainState.extra``, the KD loss reading them through ``ctx.extra``, the stage machine stepped by a
transition), vs the same work written by hand as two jitted calls (teacher forward, then student step).

Teacher: MLP 64-512-512-10 (digits-sized, 301,066 parameters); student: MLP 64-90-90-10 (14,950
parameters, 1/20 of the teacher); Adam; Hinton loss ``alpha T^2 KL + (1 - alpha) CE`` with T = 4,
alpha = 0.9. These are the digits models of the ``distill`` experiment, whose steps have this form.

* prox step (``step``): ``prox.step.make_train_step`` as the ``distill`` experiment builds it: the
  teachers are a ``prox.tasks.switched_teacher_bank`` of two teachers in ``extra`` (an argument of the
  compiled step, so one compile serves every seed; ``lax.switch`` runs the selected teacher on its
  parameters in place), a ``prox.tasks.stage_machine`` in ``extra`` switches teachers half-way through
  the timed steps (a transition updates it inside the step), the loss is
  ``prox.losses.distillation_loss`` and the batch carries its data-source index as metadata.
* ``step/stacked``: the same with a ``prox.tasks.stacked_teacher_bank`` (the default ``"slice"``
  selection copies the selected teacher's 301,066 parameters out of the stack in every step).
* ``step/4mb``: the step with 4 micro-batches (the teacher's forward runs per micro-batch inside the
  step's accumulation loop, on a quarter of the batch each time: the same work in total).
* ``bank``: prox's teacher bank, stage machine and loss in one hand-written ``jax.jit`` (no
  ``prox.step``).
* hand-written baseline (jax/optax, what a user writes first): ``teacher_forward = jax.jit(mlp)`` and
  ``student_step = jax.jit(...)`` taking the teacher's logits; a step is the two calls.
* also printed, for reference: the same hand-written code fused into one ``jax.jit`` (no prox), and the
  two calls made serial (``block_until_ready`` after each), which removes the overlap that asynchronous
  dispatch allows between the next step's teacher forward and the current student step.

Prints, per batch size, time(prox step) / time(hand-written two calls) (target <= 1.1). The steps
alternate within each repeat so that machine noise hits them alike; times are medians over repeats and
ratios medians of the per-repeat ratios (on a shared machine, other processes' load, printed before and
after, still moves them). ``cpu step/two`` is the same paired ratio of process CPU time (all threads),
which a busy machine moves less: it compares the work done, not the overlap of the two calls; ``min cpu
step/two`` divides the smallest CPU time per step of each variant over the repeats (the least disturbed
measurement of each).

  python benchmarks/distill_step.py [--batches 128 256 512 1024] [--repeats 31] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import losses, tasks
from prox import step as S
from _timing import timed  # benchmarks/_timing.py

TEACHER = (64, 512, 512, 10)
STUDENT = (64, 90, 90, 10)
TEMPERATURE, ALPHA = 4.0, 0.9


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict]:
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)})
  return params


def mlp(params: list[dict], x: jax.Array) -> jax.Array:
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def hand_loss(student: list[dict], x: jax.Array, y: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Hinton's loss written out in jax/optax, as a user would."""
  s = mlp(student, x)
  soft_t = jax.nn.softmax(teacher_logits / TEMPERATURE)
  kl = jnp.sum(soft_t * (jax.nn.log_softmax(teacher_logits / TEMPERATURE) - jax.nn.log_softmax(s / TEMPERATURE)), -1)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, y)
  return jnp.mean(ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * ce)


def param_count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def measure(batch: int, repeats: int, steps: int) -> tuple[float, float, float]:
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, TEACHER[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, TEACHER[-1], size=batch), jnp.int32)
  teachers = [init_mlp(k, TEACHER) for k in jax.random.split(jax.random.key(1), 2)]
  student0 = init_mlp(jax.random.key(2), STUDENT)

  # --- hand-written: two jitted calls
  teacher_forward = jax.jit(mlp)

  def student_step(params, opt_state, x, y, teacher_logits):
    loss, grads = jax.value_and_grad(hand_loss)(params, x, y, teacher_logits)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  student_step = jax.jit(student_step, donate_argnums=(0, 1))
  two = [jax.tree.map(jnp.copy, student0), tx.init(student0)]

  def run_two():
    t = teacher_forward(teachers[0], x)
    two[0], two[1], loss = student_step(two[0], two[1], x, y, t)
    return loss

  def run_serial():
    t = jax.block_until_ready(teacher_forward(teachers[0], x))
    two[0], two[1], loss = jax.block_until_ready(student_step(two[0], two[1], x, y, t))
    return loss

  # --- hand-written fused (reference only)
  def fused_step(params, opt_state, teacher, x, y):
    return student_step.__wrapped__(params, opt_state, x, y, mlp(teacher, x))

  fused_step = jax.jit(fused_step, donate_argnums=(0, 1))
  fused = [jax.tree.map(jnp.copy, student0), tx.init(student0)]

  def run_fused():
    fused[0], fused[1], loss = fused_step(fused[0], fused[1], teachers[0], x, y)
    return loss

  # --- prox: teacher bank + stage machine + distillation_loss in one jit
  bank = tasks.stacked_teacher_bank(mlp)
  bank_state = bank.init(teachers)
  switch_at = 3 + repeats * steps // 2          # warm-up calls + half of the timed steps
  machine = tasks.stage_machine([tasks.Stage(teacher=0, steps=switch_at), tasks.Stage(teacher=1)])

  def prox_step(params, opt_state, stage, step, bank_state, x, y):
    t = bank.apply(bank_state, machine.teacher(stage), x)

    def loss_fn(p):
      return losses.distillation_loss(mlp(p, x), t, y, temperature=TEMPERATURE, alpha=ALPHA).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    stage = machine.update(stage, step=step + 1, samples=None, metric=loss)
    return optax.apply_updates(params, updates), opt_state, stage, step + 1, loss

  prox_step = jax.jit(prox_step, donate_argnums=(0, 1, 2, 3))
  one = [jax.tree.map(jnp.copy, student0), tx.init(student0), machine.init(), jnp.int32(0)]

  def run_prox():
    one[0], one[1], one[2], one[3], loss = prox_step(one[0], one[1], one[2], one[3], bank_state, x, y)
    return loss

  # --- prox.step: the distill experiment's form (teachers and stage machine in extra, a transition)
  def transition(state, info):
    stage = machine.update(state.extra["stage"], step=info.step + 1, samples=info.samples + info.batch_size,
                           metric=info.loss)
    return state._replace(extra={**state.extra, "stage": stage})

  def step_loss(teacher_bank):
    def loss_fn(params, model_state, batch, ctx):
      stage = ctx.extra["stage"]
      t = teacher_bank.apply(ctx.extra["teachers"], machine.teacher(stage), batch["image"])
      s = mlp(params, batch["image"])
      w = machine.weights(stage)[0]
      loss = w * losses.distillation_loss(s, t, batch["label"], temperature=TEMPERATURE, alpha=ALPHA).mean()
      return loss, ({}, model_state)
    return loss_fn

  switched = tasks.switched_teacher_bank([mlp, mlp])   # the distill experiment's bank
  mesh = S.data_mesh(jax.devices()[:1])
  batch_dev = S.shard_batch({"image": np.asarray(x), "label": np.asarray(y)}, mesh)
  meta = {"source": np.int32(0)}
  steps_prox = {}
  for name, teacher_bank, micro in (("step", switched, None), ("step/stacked", bank, None),
                                    ("step/4mb", switched, batch // 4)):
    fn = S.make_train_step(step_loss(teacher_bank), tx, mesh=mesh, micro_batch_size=micro, transition=transition)
    state = S.replicate(S.init_state(jax.device_get(student0), tx, extra={
        "teachers": jax.device_get(teacher_bank.init(teachers)), "stage": jax.device_get(machine.init())}), mesh)
    steps_prox[name] = [fn, state]

  def make_run_step(name):
    holder = steps_prox[name]

    def run_step():
      holder[1], out = holder[0](holder[1], batch_dev, None, meta)
      return out.metrics["loss"]

    return run_step

  runs = {"two": run_two, "step": make_run_step("step"), "step/stacked": make_run_step("step/stacked"),
          "step/4mb": make_run_step("step/4mb"), "bank": run_prox, "fused": run_fused, "serial": run_serial}
  for fn in runs.values():
    timed(fn, 3)
  times = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.process_time()
      times[name].append(timed(fn, steps))
      cpu[name].append((time.process_time() - start) / steps)
  if int(one[2].stage) != 1 or prox_step._cache_size() != 1:
    raise RuntimeError("the stage machine did not switch teachers once without recompiling")
  for name, (fn, state) in steps_prox.items():
    if int(state.extra["stage"].stage) != 1 or fn._cache_size() != 1:
      raise RuntimeError(f"{name}: the stage machine did not switch teachers once without recompiling")
  paired = lambda t, a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))
  ratios = {"step/two": paired(times, "step", "two"), "step/fused": paired(times, "step", "fused"),
            "stacked/two": paired(times, "step/stacked", "two"), "step4/two": paired(times, "step/4mb", "two"),
            "bank/two": paired(times, "bank", "two"), "fused/two": paired(times, "fused", "two"),
            "cpu step/two": paired(cpu, "step", "two"), "cpu stacked/two": paired(cpu, "step/stacked", "two"),
            "cpu step/fused": paired(cpu, "step", "fused"),
            "min cpu step/two": min(cpu["step"]) / min(cpu["two"]),
            "min cpu stacked/two": min(cpu["step/stacked"]) / min(cpu["two"])}
  return {k: statistics.median(v) for k, v in times.items()}, ratios


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
  parser.add_argument("--repeats", type=int, default=31)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  device = jax.devices()[0]
  t_params = param_count(init_mlp(jax.random.key(0), TEACHER))
  s_params = param_count(init_mlp(jax.random.key(0), STUDENT))
  print(f"device: {device.device_kind} ({device.platform}); teacher MLP {'-'.join(map(str, TEACHER))} "
        f"({t_params:,} params), student MLP {'-'.join(map(str, STUDENT))} ({s_params:,} params, "
        f"1/{t_params / s_params:.1f}), Adam, T={TEMPERATURE}, alpha={ALPHA}")
  print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  print("time per step: median over repeats; ratios: median over repeats of the paired ratio (the variants")
  print("run back to back within a repeat, so a busy machine slows both sides of a ratio alike)")
  columns = ("two", "serial", "fused", "bank", "step", "step/stacked", "step/4mb")
  ratio_columns = ("step/two", "step/fused", "stacked/two", "step4/two", "bank/two", "fused/two", "cpu step/two",
                   "cpu stacked/two", "cpu step/fused", "min cpu step/two", "min cpu stacked/two")
  print(f"{'batch':>6} " + " ".join(f"{c:>12}" for c in columns) + " " + " ".join(f"{c:>15}" for c in ratio_columns))
  for batch in args.batches:
    t, r = measure(batch, args.repeats, args.steps)
    print(f"{batch:>6} " + " ".join(f"{t[c] * 1e3:>10.3f}ms" for c in columns) + " "
          + " ".join(f"{r[c]:>15.3f}" for c in ratio_columns), flush=True)
  print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  print("target: step/two <= 1.1 (the prox.step distillation step vs the hand-written two jitted calls)")


if __name__ == "__main__":
  main()
