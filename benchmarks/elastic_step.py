"""Cost of one elastic (Once-for-All) sandwich step relative to three plain steps of the same sub-networks.

Elastic step: one ``jax.jit`` function that takes the three sub-network choices (largest, smallest and a
random one, from ``prox.tasks.progressive_shrinking`` in its last phase) as traced int arrays, computes
``prox.models.sandwich_loss`` (CE of each + in-place KD from the largest), its gradient and an Adam update
of the shared elastic parameters. Baseline: the hand-written JAX/optax steps a user would write for the
three networks built separately (``extract_subnet`` weights, static shapes, a plain forward written
here, CE, Adam), one step each. Target: elastic / (sum of the three plain steps) <= 1.1. A second
baseline uses ``prox.models.depthwise_conv`` in the plain networks too, to separate the elastic
machinery's cost from the depthwise kernel-gradient implementation.

    python benchmarks/elastic_step.py [--repeats 20] [--batch 64]

Prints the per-step times (median of interleaved repeats after warm-up) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox.models import ElasticConfig, depthwise_conv, elastic_flops, extract_subnet, init_elastic, sandwich_loss
from prox.tasks import progressive_shrinking

CONFIG = ElasticConfig(input_shape=(32, 32, 3), num_classes=10, stem_channels=16, stages=((16, 2, 1), (32, 2, 2)),
                       kernel_sizes=(3, 5, 7), width_fractions=(0.5, 0.75, 1.0), expand_ratio=3)


def plain_forward(p: dict, x: jax.Array, dwconv=None) -> jax.Array:
  """A plain inverted-residual CNN from its weights (hand-written baseline; shapes fix the widths).

  The depthwise conv is ``lax.conv_general_dilated`` (what a user writes) or ``dwconv(h, w, stride)``.
  """
  strides = {b.name: b.stride for b in CONFIG.blocks}
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.nn.relu(jax.lax.conv_general_dilated(x, p["stem"]["kernel"], (1, 1), "SAME", dimension_numbers=dn)
                  + p["stem"]["bias"])
  for name, bp in p["blocks"].items():
    s = strides[name]
    e = bp["expand"]["kernel"].shape[1]
    h = jax.nn.relu(x @ bp["expand"]["kernel"] + bp["expand"]["bias"])
    if dwconv is None:
      h = jax.lax.conv_general_dilated(h, bp["depthwise"]["kernel"][:, :, None, :], (s, s), "SAME",
                                       dimension_numbers=dn, feature_group_count=e)
    else:
      h = dwconv(h, bp["depthwise"]["kernel"], s)
    h = jax.nn.relu(h + bp["depthwise"]["bias"])
    y = h @ bp["project"]["kernel"] + bp["project"]["bias"]
    x = y + x if (s == 1 and y.shape[-1] == x.shape[-1]) else y
  return x.mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def make_plain_step(tx, dwconv=None):
  @jax.jit
  def step(p, opt, x, y):
    loss, g = jax.value_and_grad(
        lambda q: optax.softmax_cross_entropy_with_integer_labels(plain_forward(q, x, dwconv), y).mean())(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt, loss
  return step


def make_elastic_step(tx):
  @jax.jit
  def step(p, opt, x, y, subnets):
    (loss, _), g = jax.value_and_grad(lambda q: sandwich_loss(q, x, y, subnets, config=CONFIG), has_aux=True)(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt, loss
  return step


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0, help="key of the random sub-network")
  args = parser.parse_args()

  ks, ws = len(CONFIG.kernel_sizes), len(CONFIG.width_fractions)
  ps = progressive_shrinking(num_kernels=ks, max_depths=CONFIG.max_depths, num_widths=ws,
                             phase_steps=(1,) * (2 + max(CONFIG.max_depths) - 1 + ws - 1))
  last = ps.init()._replace(count=jnp.asarray(10**6, jnp.int32))
  subnets = ps.sandwich(last, jax.random.PRNGKey(args.seed))
  params = init_elastic(CONFIG, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, *CONFIG.input_shape))
  y = jax.random.randint(jax.random.PRNGKey(2), (args.batch,), 0, CONFIG.num_classes)
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} input={CONFIG.input_shape} "
        f"batch={args.batch} stages={CONFIG.stages} kernels={CONFIG.kernel_sizes} widths={CONFIG.width_fractions}")
  full = float(elastic_flops(subnets[0], config=CONFIG))
  for name, s in zip(("largest", "smallest", "random"), subnets):
    print(f"  {name:8s} kernel={np.asarray(s.kernel).tolist()} width={np.asarray(s.width).tolist()} "
          f"depth={np.asarray(s.depth).tolist()}  MACs/example={float(elastic_flops(s, config=CONFIG)) / 1e6:.2f}M "
          f"({float(elastic_flops(s, config=CONFIG)) / full:.2f} of full)")

  tx = optax.adam(1e-3)
  elastic = make_elastic_step(tx)
  e_opt = tx.init(params)
  plains, plains_dw = [], []
  for s in subnets:
    small = extract_subnet(params, jax.tree.map(np.asarray, s), config=CONFIG)
    plains.append((make_plain_step(tx), small, tx.init(small)))
    plains_dw.append((make_plain_step(tx, depthwise_conv), small, tx.init(small)))

  t0 = time.perf_counter()
  timed(elastic, params, e_opt, x, y, subnets)
  print(f"elastic step compile + first run: {time.perf_counter() - t0:.1f} s")
  for _ in range(2):
    timed(elastic, params, e_opt, x, y, subnets)
    for fn, p, o in plains + plains_dw:
      timed(fn, p, o, x, y)

  t_el, t_pl = [], [[] for _ in plains + plains_dw]
  for _ in range(args.repeats):  # interleaved so that load changes hit all cases alike
    t_el.append(timed(elastic, params, e_opt, x, y, subnets))
    for i, (fn, p, o) in enumerate(plains + plains_dw):
      t_pl[i].append(timed(fn, p, o, x, y))
  el = statistics.median(t_el)
  pl = [statistics.median(t) for t in t_pl[:3]]
  pd = [statistics.median(t) for t in t_pl[3:]]
  for name, t, u in zip(("largest", "smallest", "random"), pl, pd):
    print(f"plain step {name:8s}: {t * 1e3:8.2f} ms (lax depthwise)   {u * 1e3:8.2f} ms (prox depthwise_conv)")
  print(f"three plain steps    : {sum(pl) * 1e3:8.2f} ms (lax depthwise)   {sum(pd) * 1e3:8.2f} ms (prox depthwise_conv)")
  print(f"elastic sandwich step: {el * 1e3:8.2f} ms")
  print(f"elastic / three plain (lax depthwise, the hand-written baseline): {el / sum(pl):.3f}   (target <= 1.1)")
  print(f"elastic / three plain (same depthwise_conv as the elastic net)  : {el / sum(pd):.3f}")


if __name__ == "__main__":
  main()
