"""Cost of AdAdaGrad's batch-size test in the step, and of a batch-size change, measured side by side.

On the model of the ``adadagrad`` experiment (default: the small CNN, width 16, hidden 64, on 8x8x1
digits-shaped inputs; ``--model logreg`` for logistic regression), AdaGradNorm, per batch size:

  plain step            prox step, micro-batches of ``--micro`` examples (what the baselines run)
  norm-test step        the same step with grad_stats=True and the controller update (norm test from the
                        micro-batch statistics, inside the step), as the experiment's adaptive runs
  per-sample step       a jitted step that takes per-sample gradients with vmap(grad), updates with their
                        mean and runs the exact norm test on them (the reference code's estimator)
  one-micro-batch step  prox plain step with the whole batch as one micro-batch (for scale)

Prints time(norm-test) / time(plain) (target <= 1.10) and time(per-sample) / time(plain). Then the cost
of a batch-size change: steps whose ``num_micro_batches`` changes every step within one bucket vs a fixed
one (ratio ~1: no recompilation, nothing rebuilt), and the compile time of a new power-of-two bucket.
The variants alternate in every repeat so that machine noise hits them alike; medians are printed.

  python benchmarks/batch_test_overhead.py [--model cnn|logreg] [--batches 64 512] [--micro 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import models
from prox import optim
from prox import step as S
from prox.experiments import _adaptive
from prox.experiments import train
from _timing import timed  # benchmarks/_timing.py

MODELS = {"cnn": ("cnn", {"width": 16, "hidden": 64}), "logreg": ("mlp", {"hidden": ()})}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--model", default="cnn", choices=sorted(MODELS))
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
  parser.add_argument("--micro", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  name, kwargs = MODELS[args.model]
  device = jax.devices()[0]
  mesh = S.data_mesh([device])
  net = models.functional(models.make_model(name, input_shape=(8, 8, 1), num_classes=10, seed=0, **kwargs))
  tx = optim.adagrad_norm(1.0)
  loss_fn = train.classification_loss(net.apply)
  config = _adaptive.run_config()
  config.update(dict(method="norm", micro_batch_size=args.micro, b0=args.micro, b_max=1 << 20))
  policy = _adaptive.make_policy(config)
  params = jax.device_get(net.params)
  key = np.asarray(jax.random.key_data(jax.random.key(0)))

  def fresh(extra):
    return S.replicate(S.TrainState(np.int32(0), params, jax.device_get(tx.init(params)), {}, extra, key), mesh)

  plain = S.make_train_step(loss_fn, tx, mesh=mesh, micro_batch_size=args.micro)
  tested = S.make_train_step(loss_fn, tx, mesh=mesh, micro_batch_size=args.micro, grad_stats=True,
                             extra_update=policy.extra_update)
  whole = S.make_train_step(loss_fn, tx, mesh=mesh)

  def per_sample_step(params, opt_state, controller, batch):
    def one(p, image, label):
      logits, _ = net.apply(p, {}, image[None], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, label[None]).mean()
    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch["image"], batch["label"])
    mean = jax.tree.map(lambda g: g.mean(0), grads)
    updates, opt_state = tx.update(mean, opt_state, params)
    controller = optim.batch_size_update(controller, optim.norm_test(grads, 0.1))
    return optax.apply_updates(params, updates), opt_state, controller

  per_sample_step = jax.jit(per_sample_step, donate_argnums=(0, 1, 2))
  rng = np.random.default_rng(0)
  print(f"device: {device.device_kind} ({device.platform}); model {args.model} "
        f"({models.param_count(params):,} parameters), AdaGradNorm, micro-batch {args.micro}")

  for b in args.batches:
    data = {"image": rng.normal(size=(b, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size=b).astype(np.int32)}
    batch = S.shard_batch(data, mesh)
    n = np.int32(b // args.micro)
    holders = {"plain": fresh(()), "tested": fresh(policy.extra_init()), "whole": fresh(())}
    sample_state = [jax.device_put(params), tx.init(params), policy.extra_init().controller]
    local = jax.device_put(data, device)

    def run(kind):
      step = {"plain": plain, "tested": tested, "whole": whole}[kind]
      def go():
        if kind == "whole":
          holders[kind], out = step(holders[kind], batch)
        else:
          holders[kind], out = step(holders[kind], batch, n)
        return out.metrics["loss"]
      return go

    def run_sample():
      sample_state[:] = per_sample_step(*sample_state, local)
      return sample_state[0]

    fns = {"plain": run("plain"), "tested": run("tested"), "per-sample": run_sample, "whole": run("whole")}
    times = {k: [] for k in fns}
    for fn in fns.values():   # compile and warm up
      timed(fn, 2)
    for _ in range(args.repeats):
      for k, fn in fns.items():
        times[k].append(timed(fn, args.steps))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {b:5d} ({b // args.micro} micro-batches): plain {t['plain'] * 1e3:8.3f} ms | norm-test "
          f"{t['tested'] * 1e3:8.3f} ms | per-sample (vmap) {t['per-sample'] * 1e3:8.3f} ms | one micro-batch "
          f"{t['whole'] * 1e3:8.3f} ms")
    print(f"  ratio norm-test / plain = {t['tested'] / t['plain']:.3f}   (target <= 1.10)")
    print(f"  ratio per-sample (vmap) / plain = {t['per-sample'] / t['plain']:.3f}   "
          f"(reference PyTorch code: 4.6x at batch 64, 6.4x at batch 512)")
    print(f"  ratio one-micro-batch plain / plain = {t['whole'] / t['plain']:.3f}")

  # A batch-size change: within a bucket only num_micro_batches changes (the same executable). The same
  # sizes (k - 1 and k micro-batches) either alternate every step or stay fixed for a whole block.
  b = args.batches[-1]
  k = optim.bucket(b, args.micro)
  data = {"image": rng.normal(size=(k * args.micro, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, 10, size=k * args.micro).astype(np.int32)}
  batch = S.shard_batch(data, mesh)
  state, cursor = [fresh(policy.extra_init())], [0]

  def with_size(size_fn):
    def go():
      cursor[0] += 1
      state[0], out = tested(state[0], batch, np.int32(size_fn()))
      return out.metrics["loss"]
    return go

  changing = with_size(lambda: k - cursor[0] % 2)
  before = tested._cache_size()
  timed(changing, 4)
  t_change, t_fixed = [], []
  for r in range(2 * args.repeats):
    t_change.append(timed(changing, args.steps))
    t_fixed.append(timed(with_size(lambda r=r: k - r % 2), args.steps))
  print(f"batch-size change within the bucket of {k} micro-batches ({k - 1} <-> {k}): time with a new size "
        f"every step / the same sizes fixed per block = {sum(t_change) / sum(t_fixed):.3f}; new compilations: "
        f"{tested._cache_size() - before}")
  # A new bucket: one compilation.
  big = 2 * k
  data = {"image": np.zeros((big * args.micro, 8, 8, 1), np.float32),
          "label": np.zeros(big * args.micro, np.int32)}
  start = time.perf_counter()
  tested.lower(state[0], S.shard_batch(data, mesh), np.int32(big)).compile()
  compile_s = time.perf_counter() - start
  print(f"compile time of a new bucket ({big} micro-batches, batch up to {big * args.micro}): {compile_s:.2f} s "
        f"= {compile_s / statistics.median(t_fixed):.0f} steps of the bucket below; once per power of two")


if __name__ == "__main__":
  main()
