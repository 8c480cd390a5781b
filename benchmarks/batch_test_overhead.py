"""AdAdaGrad's batch-size tests at the cost of a plain step: prox's steps vs a hand-written optax step.

Baseline: the hand-written ``jax.jit`` optax step a user would write (value_and_grad, tx.update,
apply_updates, buffers donated). Against it, on the same model and batch, one device:

  prox plain       prox.step.make_train_step, no statistics
  norm test        + exact per-example gradient norms from layer taps and the controller in the step
  augmented test   + per-example inner products with the mean gradient (inner-product/orthogonality)
  coordinate test  AdaGrad, + the per-coordinate second moment (against a hand-written AdaGrad step)
  ... (g16)        the same with example_groups=16: convolution kernels' moments from 16 groups of
                   examples (their kernel gradients cost what the plain gradient costs); dense exact
  groups of 4      the earlier estimator: micro-batches of 4 examples in a loop, GradStats (norm test)

for the MNIST-1D MLP (40-100-100-10) and 1-D CNN (5,210 parameters), batch sizes 64..4096. Variants
alternate in every repeat (machine noise hits them alike); medians are printed. Then the error of the
per-example variance estimators against the exact vmap(grad) value on linear regression with known
covariance and on the 1-D CNN. The last two lines are the worst case over models and batch sizes of the
norm-test step with exact moments (``norm_test_exact_vs_handwritten``) and with ``example_groups=16``
(``norm_test_vs_handwritten``, target <= 1.10; for the MLP, which has no convolutions, the two are the
same step).

  python benchmarks/batch_test_overhead.py [--batches 64 256 1024 4096] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import models
from prox import optim
from prox import step as S
from prox.losses import classification_loss
from _timing import timed  # benchmarks/_timing.py

MODELS = {"mlp": ("mlp", {"hidden": (100, 100)}), "cnn1d": ("cnn1d", {"width": 25})}


def handwritten(net, tx):
  def loss(params, x, y):
    logits, _ = net.apply(params, {}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step.__wrapped__, donate_argnums=(0, 1))


def prox_step(net, tx, test=None, **kw):
  mesh = S.data_mesh(jax.devices()[:1])
  options, extra, transition = dict(kw), (), None
  if test is not None:
    ctrl = optim.adaptive_batch_size(test, b0=8, b_max=1 << 20, **{k: kw.pop(k) for k in ("estimator", "example_groups")
                                                                    if k in kw})
    options = {**ctrl.step_options, **kw}
    extra = {"batch_size": ctrl.init()}
    transition = S.in_extra("batch_size", ctrl.update)
  step = S.make_train_step(classification_loss(net.apply), tx, mesh=mesh, transition=transition, **options)
  state = S.replicate(S.init_state(net.params, tx, extra=extra), mesh)
  return step, state, mesh


def bench_model(name, batches, repeats):
  model, kwargs = MODELS[name]
  net = models.functional(models.make_model(model, input_shape=(40, 1), num_classes=10, seed=0, **kwargs))
  rng = np.random.default_rng(0)
  worst = {}
  for b in batches:
    x = rng.normal(size=(b, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, b).astype(np.int32)
    n = max(3, 2048 // b)
    variants = {}
    for label, tx, test, kw in (("handwritten", optim.adagrad_norm(1.0), None, None),
                                ("prox plain", optim.adagrad_norm(1.0), None, {}),
                                ("norm test", optim.adagrad_norm(1.0), "norm", {}),
                                ("augmented test", optim.adagrad_norm(1.0), "augmented", {}),
                                ("norm test g16", optim.adagrad_norm(1.0), "norm", {"example_groups": 16}),
                                ("augmented test g16", optim.adagrad_norm(1.0), "augmented", {"example_groups": 16}),
                                ("handwritten adagrad", optax.adagrad(0.1), None, None),
                                ("coordinate test", optax.adagrad(0.1), "coordinate", {}),
                                ("coordinate test g16", optax.adagrad(0.1), "coordinate", {"example_groups": 16}),
                                ("groups of 4", optim.adagrad_norm(1.0), "norm",
                                 {"estimator": "groups", "micro_batch_size": 4})):
      if kw is None:
        fn = handwritten(net, tx)
        carry = [jax.tree.map(jnp.array, net.params), tx.init(jax.tree.map(jnp.array, net.params))]

        def call(fn=fn, carry=carry):
          carry[0], carry[1], v = fn(carry[0], carry[1], x, y)
          return v
      else:
        step, state, mesh = prox_step(net, tx, test, **kw)
        batch = S.shard_batch({"image": x, "label": y}, mesh)
        holder = [state]

        def call(step=step, holder=holder, batch=batch):
          holder[0], out = step(holder[0], batch)
          return out.metrics["loss"]
      call()   # compile
      variants[label] = call
    times = {k: [] for k in variants}
    for _ in range(repeats):
      for k, call in variants.items():
        times[k].append(timed(call, n))
    med = {k: statistics.median(v) for k, v in times.items()}
    base, base_ada = med["handwritten"], med["handwritten adagrad"]
    ratios = {"prox plain": med["prox plain"] / base, "norm test": med["norm test"] / base,
              "augmented test": med["augmented test"] / base,
              "coordinate test": med["coordinate test"] / base_ada,
              "norm test g16": med["norm test g16"] / base, "augmented test g16": med["augmented test g16"] / base,
              "coordinate test g16": med["coordinate test g16"] / base_ada,
              "groups of 4": med["groups of 4"] / base}
    print(f"{name:6s} b={b:5d}  handwritten {1e3 * base:8.3f} ms | " +
          "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    for k, v in ratios.items():
      worst[k] = max(worst.get(k, 0.0), v)
  return worst


def estimator_errors():
  """Relative error of the per-example gradient variance, exact (taps) and groups of 4, on linear
  regression (d = 16, known diagonal covariance of the inputs)."""
  d, n = 16, 1024
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(n, d)) * np.linspace(0.3, 3.0, d)).astype(np.float32)
  y = (x @ rng.normal(size=(d, 1)) + rng.normal(size=(n, 1))).astype(np.float32)
  net = models.functional(models.make_model("mlp", input_shape=(d,), num_classes=1, hidden=()))

  def loss(params, batch, rng_):
    pred, _ = net.apply(params, {}, batch["x"], train=True)
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2), {}

  per = jax.vmap(jax.grad(lambda p, a, b: loss(p, {"x": a[None], "y": b[None]}, None)[0]), in_axes=(None, 0, 0))
  g = np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree.leaves(per(net.params, x, y))], 1)
  exact = np.var(g.astype(np.float64), 0, ddof=1).sum()
  mesh = S.data_mesh(jax.devices()[:1])
  tx = optax.sgd(0.0)
  state = S.replicate(S.init_state(net.params, tx), mesh)
  batch = S.shard_batch({"x": x, "y": y}, mesh)
  _, out = S.make_train_step(S.stateless(loss), tx, mesh=mesh, example_stats=("norm",), donate=False)(state, batch)
  mean = jax.tree.map(lambda v: v.mean(0), per(net.params, x, y))
  taps = float(optim.gradient_variance_from_examples(out.example_stats, mean))
  _, grouped = S.make_train_step(S.stateless(loss), tx, mesh=mesh, micro_batch_size=4, grad_stats=True,
                                 donate=False)(state, batch)
  groups = float(sum(np.sum(v) for v in jax.tree.leaves(optim.per_sample_variance(grouped.grad_stats))))
  print(f"per-example variance on linear regression (n={n}): exact {exact:.6g}; layer taps {taps:.6g} "
        f"(relative error {abs(taps / exact - 1):.2e}); groups of 4 {groups:.6g} "
        f"(relative error {abs(groups / exact - 1):.2e})")
  # The 1-D CNN (whose convolutions example_groups estimates from group means): exact vmap(grad) vs the
  # exact taps and example_groups=16, on a batch of 1024 random MNIST-1D-shaped inputs, at initialisation
  # and after 200 AdaGradNorm steps of b=64 (the noise is larger early).
  cnn = models.functional(models.make_model("cnn1d", input_shape=(40, 1), num_classes=10, seed=0, width=25))
  x = rng.normal(size=(n, 40, 1)).astype(np.float32)
  y = (x[:, ::4, 0].sum(1) > 0).astype(np.int32) + 2 * (x[:, 1::4, 0].sum(1) > 0).astype(np.int32)

  def cnn_loss(params, batch, rng_):
    logits, _ = cnn.apply(params, {}, batch["image"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

  params = cnn.params
  tx = optim.adagrad_norm(1.0)
  for when in ("initialisation", "200 steps"):
    if when != "initialisation":
      train = S.make_train_step(S.stateless(cnn_loss), tx, mesh=mesh)
      state = S.replicate(S.init_state(params, tx), mesh)
      for k in range(200):
        sl = slice(64 * (k % (n // 64)), 64 * (k % (n // 64)) + 64)
        state, _ = train(state, S.shard_batch({"image": x[sl], "label": y[sl]}, mesh))
      params = jax.device_get(state.params)
    per_cnn = jax.vmap(jax.grad(lambda p, a, b: cnn_loss(p, {"image": a[None], "label": b[None]}, None)[0]),
                       in_axes=(None, 0, 0))
    g = np.concatenate([np.asarray(v, np.float64).reshape(n, -1) for v in jax.tree.leaves(per_cnn(params, x, y))], 1)
    exact = np.var(g, 0, ddof=1).sum()
    mean_c = jax.tree.map(lambda v: v.mean(0), per_cnn(params, x, y))
    state = S.replicate(S.init_state(params, optax.sgd(0.0)), mesh)
    batch = S.shard_batch({"image": x, "label": y}, mesh)
    found = {}
    for label, groups_ in (("layer taps", None), ("example_groups=16", 16)):
      _, out = S.make_train_step(S.stateless(cnn_loss), optax.sgd(0.0), mesh=mesh, example_stats=("norm",),
                                 example_groups=groups_, donate=False)(state, batch)
      found[label] = float(optim.gradient_variance_from_examples(out.example_stats, mean_c))
    print(f"per-example variance, 1-D CNN at {when} (n={n}): exact {exact:.6g}; " + "; ".join(
        f"{k} {v:.6g} (relative error {abs(v / exact - 1):.2e})" for k, v in found.items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
  parser.add_argument("--models", nargs="+", default=sorted(MODELS))
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}; time / hand-written step (median of {args.repeats})")
  worst = {}
  for name in args.models:
    for k, v in bench_model(name, args.batches, args.repeats).items():
      worst[k] = max(worst.get(k, 0.0), v)
  estimator_errors()
  print("worst over models and batch sizes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
  print(f"norm_test_exact_vs_handwritten={worst['norm test']:.3f}")
  print(f"norm_test_vs_handwritten={worst['norm test g16']:.3f}")


if __name__ == "__main__":
  main()
