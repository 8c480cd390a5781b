"""One prepared GPU check of prox's step, in one call of under 8 minutes on one GPU.

  python benchmarks/gpu_check.py [--budget-seconds 420] [--quick]

Against the hand-written ``jax.jit`` optax step a user would write (same model, optimizer, batch; buffers
donated), median of alternating repeats, on models where a GPU is not launch-bound:

  1. ResNet-20 on CIFAR-shaped synthetic data (32x32x3, 10 classes), batch 512 / 1024 / 2048, float32 and
     bfloat16 compute (parameters float32), SGD with momentum: prox step / hand-written (target <= 1.05
     for bf16 at 1024), and achieved FLOP/s / the FLOP/s of a large matmul of the same dtype (target >= 0.5
     for bf16 at 1024). FLOPs are counted analytically (convolutions and dense layers: forward 2 x MACs,
     backward twice that); XLA's cost analysis on GPU misses cuDNN/cuBLAS custom calls.
  2. The 784-1024-1024-10 MLP at batch 4096 and 8192 (float32, bfloat16), Adam: the same two ratios.
  3. Overheads on the MLP at batch 4096 against prox's plain step: the norm test (exact per-example
     moments from layer taps + the controller in the step), decaying N:M masks (MdGf 2:4), and the composed
     step of the ``compose`` experiment (norm test + N:M + EWC with a shift detector + the episodic teacher).

Each section stops early when the time budget would be exceeded, and says so. The last lines summarise.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from prox import models  # noqa: E402
from prox import optim  # noqa: E402
from prox import step as S  # noqa: E402
from prox.losses import classification_loss  # noqa: E402
from prox.transforms import forward_params, nm_sparsity  # noqa: E402
from _timing import timed  # noqa: E402

START = time.perf_counter()
SUMMARY: list[str] = []


def elapsed() -> float:
  return time.perf_counter() - START


def matmul_flops_per_s(dtype, n: int = 8192) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = statistics.median(timed(lambda: f(a, a), 10) for _ in range(5))
  return 2.0 * n ** 3 / t


def conv_model_flops(net: models.Functional, image_shape, batch: int) -> float:
  """Forward multiply-adds of every tapped layer (convolutions as dense layers over patches), x 2 for
  FLOPs, x 3 for a training step (forward, input gradient, weight gradient)."""
  from prox import taps  # pylint: disable=g-import-not-at-top
  rec = taps.Recorder()
  with taps.recording(rec):
    jax.eval_shape(lambda p, x: net.apply(p, net.model_state, x, train=True), net.params,
                   jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32))
  macs = 0
  for tap, (out_shape, _) in zip(rec.taps, rec.output_shapes):
    fan_in = int(np.prod(tap.kernel_shape[:-1]))
    macs += int(np.prod(out_shape)) * fan_in
  return 2.0 * 3.0 * macs


def hand_step(net, tx):
  def loss(params, model_state, x, y):
    logits, model_state = net.apply(params, model_state, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model_state

  def step(params, opt_state, model_state, x, y):
    (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(params, model_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state, value

  return jax.jit(step, donate_argnums=(0, 1, 2))


def compare(label: str, net, tx, x, y, *, flops: float | None, mm: float | None, repeats: int,
            variants: dict | None = None) -> dict[str, float]:
  """Median seconds per step of the hand-written and prox steps (and extra prox variants)."""
  mesh = S.data_mesh(jax.devices()[:1])
  calls = {}
  h = hand_step(net, tx)
  carry = [jax.tree.map(jnp.array, net.params), tx.init(jax.tree.map(jnp.array, net.params)),
           jax.tree.map(jnp.array, net.model_state)]

  def run_hand():
    carry[0], carry[1], carry[2], v = h(carry[0], carry[1], carry[2], x, y)
    return v

  calls["hand-written"] = run_hand
  batch = S.shard_batch({"image": np.asarray(x), "label": np.asarray(y)}, mesh)
  for name, (step_tx, kwargs, extra) in {"prox": (tx, {}, ()), **(variants or {})}.items():
    step = S.make_train_step(classification_loss(net.apply), step_tx, mesh=mesh, **kwargs)
    holder = [S.replicate(S.init_state(net.params, step_tx, model_state=net.model_state, extra=extra), mesh)]

    def run(step=step, holder=holder):
      holder[0], out = step(holder[0], batch)
      return out.metrics["loss"]

    calls[name] = run
  for call in calls.values():
    jax.block_until_ready(call())
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      times[k].append(timed(call, 5))
  med = {k: statistics.median(v) for k, v in times.items()}
  line = f"{label}: hand-written {1e3 * med['hand-written']:.3f} ms, prox {1e3 * med['prox']:.3f} ms, " \
         f"prox / hand-written {med['prox'] / med['hand-written']:.3f}"
  if flops and mm:
    line += f", step FLOP/s / matmul FLOP/s {flops / med['prox'] / mm:.3f} ({flops / med['prox'] / 1e12:.1f} TFLOP/s)"
  for k in (variants or {}):
    line += f", {k} / prox {med[k] / med['prox']:.3f}"
  print(line, flush=True)
  return med


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--budget-seconds", type=float, default=420.0)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test of the script)")
  args = parser.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind}; jax {jax.__version__}", flush=True)
  resnet_batches = (32,) if args.quick else (512, 1024, 2048)
  mlp_batches = (256,) if args.quick else (4096, 8192)
  mm = {d: matmul_flops_per_s(d, 1024 if args.quick else 8192) for d in (jnp.float32, jnp.bfloat16)}
  for d, v in mm.items():
    print(f"matmul FLOP/s ({jnp.dtype(d).name}): {v / 1e12:.1f} TFLOP/s", flush=True)
  rng = np.random.default_rng(0)

  # 1. ResNet-20 on CIFAR-shaped data.
  for dtype in (jnp.bfloat16, jnp.float32):
    net = models.functional(models.make_model("resnet20", input_shape=(32, 32, 3), num_classes=10, dtype=dtype))
    tx = optax.sgd(0.1, momentum=0.9)
    for b in resnet_batches:
      if elapsed() > args.budget_seconds * 0.45:
        print(f"resnet20 {jnp.dtype(dtype).name} b={b}: skipped (time budget)")
        continue
      x = jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32)
      y = jnp.asarray(rng.integers(0, 10, b), jnp.int32)
      med = compare(f"resnet20 {jnp.dtype(dtype).name} b={b}", net, tx, x, y,
                    flops=conv_model_flops(net, (32, 32, 3), b), mm=mm[dtype], repeats=args.repeats)
      if dtype == jnp.bfloat16 and b == (1024 if not args.quick else resnet_batches[0]):
        ratio = med["prox"] / med["hand-written"]
        util = conv_model_flops(net, (32, 32, 3), b) / med["prox"] / mm[dtype]
        SUMMARY.append(f"resnet20_bf16_b{b}: prox/hand-written={ratio:.3f} (target <= 1.05), "
                       f"step/matmul FLOP/s={util:.3f} (target >= 0.5)")

  # 2. The MLP.
  for dtype in (jnp.float32, jnp.bfloat16):
    net = models.functional(models.make_model("mlp", input_shape=(784,), num_classes=10, hidden=(1024, 1024),
                                              dtype=dtype))
    for b in mlp_batches:
      if elapsed() > args.budget_seconds * 0.65:
        print(f"mlp {jnp.dtype(dtype).name} b={b}: skipped (time budget)")
        continue
      x = jnp.asarray(rng.normal(size=(b, 784)), jnp.float32)
      y = jnp.asarray(rng.integers(0, 10, b), jnp.int32)
      flops = 2.0 * b * (784 * 1024 * 2 + 1024 * 1024 * 3 + 1024 * 10 * 3)
      med = compare(f"mlp {jnp.dtype(dtype).name} b={b}", net, optax.adam(1e-3), x, y, flops=flops,
                    mm=mm[dtype], repeats=args.repeats)
      SUMMARY.append(f"mlp_{jnp.dtype(dtype).name}_b{b}: prox/hand-written={med['prox'] / med['hand-written']:.3f}")

  # 3. Overheads of the methods on the MLP.
  if elapsed() < args.budget_seconds * 0.8:
    b = mlp_batches[0]
    net = models.functional(models.make_model("mlp", input_shape=(784,), num_classes=10, hidden=(1024, 1024)))
    x = jnp.asarray(rng.normal(size=(b, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, b), jnp.int32)
    tx = optim.adagrad_norm(1.0)
    ctrl = optim.adaptive_batch_size("norm", b0=64, b_max=1 << 20)
    nm_tx = nm_sparsity(optim.adagrad_norm(1.0), 2, 4, method="mdgf", total_steps=10_000)
    from prox.experiments import compose  # pylint: disable=g-import-not-at-top
    from prox.experiments.configs import compose as compose_configs  # pylint: disable=g-import-not-at-top
    comp = compose.composition(compose_configs.get_config(), net.apply, ("batch", "nm", "ewc", "teacher"),
                               jax.random.key(0))
    variants = {
        "norm test": (tx, {**ctrl.step_options, "transition": S.in_extra("batch_size", ctrl.update)},
                      {"batch_size": ctrl.init()}),
        "MdGf 2:4": (nm_tx, {"forward_fn": forward_params}, ()),
        "composed": (comp.tx, {"forward_fn": comp.forward_fn, "transition": comp.transition, **comp.step_options},
                     comp.extra),
    }
    med = compare(f"mlp float32 b={b}, AdaGradNorm", net, tx, x, y, flops=None, mm=None, repeats=args.repeats,
                  variants=variants)
    for k in variants:
      SUMMARY.append(f"{k.replace(' ', '_')}_vs_plain_prox_step={med[k] / med['prox']:.3f}")
  else:
    print("method overheads: skipped (time budget)")
  print(f"--- summary ({elapsed():.0f} s) ---")
  for line in SUMMARY:
    print(line)


if __name__ == "__main__":
  main()
