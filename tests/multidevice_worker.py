"""Trains a small MLP with prox's step for a few steps and saves the parameters (a test helper).

Run as a subprocess so that the device count (``--devices``, fake CPU devices) and the multi-process
set-up (``--num-processes``/``--process-id``/``--port``, gloo collectives) are fixed before JAX starts.
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--micro-batch", type=int, default=0)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--out", required=True)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from prox import distributed  # noqa: E402
from prox import step as prox_step  # noqa: E402

if args.num_processes > 1:
  distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)

GLOBAL_BATCH = 32
rng = np.random.default_rng(0)
x_all = rng.normal(size=(args.steps * GLOBAL_BATCH, 20)).astype(np.float32)
y_all = (x_all[:, :3].sum(1) > 0).astype(np.int32) + (x_all[:, 3] > 1).astype(np.int32)


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"h": {"w": jax.random.normal(k1, (20, 64)) * 0.2, "b": jnp.zeros(64)},
          "o": {"w": jax.random.normal(k2, (64, 3)) * 0.2, "b": jnp.zeros(3)}}


def loss(params, batch, rng):
  h = jax.nn.relu(batch["x"] @ params["h"]["w"] + params["h"]["b"])
  logits = h @ params["o"]["w"] + params["o"]["b"]
  value = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return value, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


mesh = prox_step.data_mesh()
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
params = jax.device_get(init_params(jax.random.key(42)))
state = prox_step.TrainState(step=np.int32(0), params=params, opt_state=jax.device_get(tx.init(params)),
                             model_state={}, extra=(),
                             rng=np.asarray(jax.random.key_data(jax.random.key(1))))
state = prox_step.replicate(state, mesh)
train_step = prox_step.make_train_step(prox_step.stateless(loss), tx, mesh=mesh,
                                       micro_batch_size=args.micro_batch or None)
per_process = GLOBAL_BATCH // jax.process_count()
lo = jax.process_index() * per_process
for i in range(args.steps):
  rows = slice(i * GLOBAL_BATCH + lo, i * GLOBAL_BATCH + lo + per_process)
  batch = prox_step.shard_batch({"x": x_all[rows], "y": y_all[rows]}, mesh)
  state, out = train_step(state, batch)
params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)
if jax.process_index() == 0:
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(args.out, loss=np.asarray(out.metrics["loss"].addressable_data(0)), **flat)
print("ok", jax.device_count(), jax.process_count(), file=sys.stderr)
