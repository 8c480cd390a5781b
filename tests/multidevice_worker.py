"""Runs prox's step in several scenarios and saves every number they produce (a test helper).

Run as a subprocess so that the device count (``--devices``, fake CPU devices) and the multi-process
set-up (``--num-processes``/``--process-id``/``--port``, gloo collectives) are fixed before JAX starts.
``tests/test_multidevice.py`` runs it on several layouts and compares the outputs.

Every scenario is scale-sensitive on purpose (plain SGD, no clipping, no Adam): a step that applied the
sum of the device gradients instead of their mean, or built statistics from sums over devices, changes
every saved number.

Scenarios (global batch 64, 20 steps):
- ``sgd``: an MLP with plain SGD; params after steps 1 and 20, loss and accuracy of every step. Its
  micro-batch size is ``--sgd-micro`` (0: the whole per-device batch).
Layouts: 1, 2, 4 or 8 devices, several processes, and ``data x fsdp`` meshes (``--fsdp``: parameters,
optimizer state and ``extra`` fully sharded).

- ``stats``: AdaGradNorm, micro-batches of 8 on every layout (8 groups of 8 in all), ``GradStats``, the
  group inner-product statistics, the norm test and a batch-size controller updated in the step;
  AdaGradNorm's accumulator, the controller's decisions and the statistics of every step.
- ``continual``: SGD under EWC and GPM; at step 10 a transition consolidates EWC with the Fisher of the
  step's own batch and extends the GPM bases with the layer inputs of that batch, in the step.
- ``batchnorm``: an MLP with batch norm (statistics per micro-batch of 8), SGD; params, running
  statistics and metrics.
- ``groups``: the 1-D CNN with plain SGD and per-example statistics with ``example_groups=4`` (the
  convolutions' kernel gradients of 4 groups of 2 per micro-batch of 8, formed in the backward pass and
  summed into the gradient): params and the estimated statistics of every step.
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--sgd-micro", type=int, default=0)
parser.add_argument("--fsdp", type=int, default=1, help="devices per parameter shard (a data x fsdp mesh)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", required=True)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from prox import distributed  # noqa: E402
from prox import models  # noqa: E402
from prox import optim  # noqa: E402
from prox import step as S  # noqa: E402
from prox.transforms import ewc as ewc_lib  # noqa: E402
from prox.transforms import gpm as gpm_lib  # noqa: E402

if args.num_processes > 1:
  distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)

GLOBAL_BATCH = 64
rng = np.random.default_rng(0)
x_all = rng.normal(size=(args.steps * GLOBAL_BATCH, 20)).astype(np.float32)
y_all = ((x_all[:, :3].sum(1) > 0).astype(np.int32) + (x_all[:, 3] > 1).astype(np.int32)).astype(np.int32)
mesh = S.data_mesh() if args.fsdp == 1 else S.fsdp_mesh(jax.device_count() // args.fsdp, args.fsdp)
per_process = GLOBAL_BATCH // jax.process_count()
lo = jax.process_index() * per_process
saved: dict[str, np.ndarray] = {}


def host(x):
  """A global array (replicated, or sharded over fsdp) as a numpy array on every process."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save(prefix, tree):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    saved[prefix + jax.tree_util.keystr(path)] = host(leaf)


def batch(i):
  rows = slice(i * GLOBAL_BATCH + lo, i * GLOBAL_BATCH + lo + per_process)
  return S.shard_batch({"x": x_all[rows], "y": y_all[rows]}, mesh)


def init_params(key, bn=False):
  k1, k2 = jax.random.split(key)
  p = {"h": {"w": jax.random.normal(k1, (20, 64)) * 0.2, "b": jnp.zeros(64)},
       "o": {"w": jax.random.normal(k2, (64, 3)) * 0.2, "b": jnp.zeros(3)}}
  if bn:
    p["bn"] = {"scale": jnp.ones(64), "bias": jnp.zeros(64)}
  return jax.device_get(p)


def layer_inputs(params, x):
  return {"h": x, "o": jax.nn.relu(x @ params["h"]["w"] + params["h"]["b"])}


def logits_of(params, x):
  return layer_inputs(params, x)["o"] @ params["o"]["w"] + params["o"]["b"]


def loss(params, b, rng):
  logits = logits_of(params, b["x"])
  value = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
  return value, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == b["y"])}


def train(name, tx, loss_fn, *, micro, model_state=None, extra=(), bn=False, params=None, **step_kwargs):
  params = init_params(jax.random.key(42), bn) if params is None else params
  state = S.place(S.init_state(params, tx, model_state=model_state, extra=extra, seed=1), mesh)
  step = S.make_train_step(loss_fn, tx, mesh=mesh, micro_batch_size=micro or None, **step_kwargs)
  for i in range(args.steps):
    state, out = step(state, batch(i))
    save(f"{name}/metrics/{i}", out.metrics)
    if out.grad_stats is not None:
      save(f"{name}/grad_stats/{i}", out.grad_stats._replace(group_size=np.int32(out.grad_stats.group_size)))
    if out.group_stats is not None:
      save(f"{name}/group_stats/{i}", out.group_stats)
    if out.example_stats is not None:
      save(f"{name}/example_stats/{i}", out.example_stats)
    if i == 0:
      save(f"{name}/params1", state.params)
  save(f"{name}/params", state.params)
  save(f"{name}/model_state", state.model_state)
  save(f"{name}/samples", state.samples)
  return state


# sgd: the plain step.
train("sgd", optax.sgd(0.5), S.stateless(loss), micro=args.sgd_micro)

# stats: AdaGradNorm, GradStats, group statistics, per-example statistics (layer taps of a prox model),
# the norm test and a batch-size controller in the step.
net = models.functional(models.make_model("mlp", input_shape=(20,), num_classes=3, hidden=(64,), seed=42))


def mlp_loss(params, b, rng):
  logits, _ = net.apply(params, {}, b["x"], train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), {}


def control(extra, info):
  wanted = optim.norm_test_from_stats(info.grad_stats, 0.1)
  return {"controller": optim.batch_size_update(extra["controller"], wanted), "norm_test": wanted}


st = train("stats", optim.adagrad_norm(0.5), S.stateless(mlp_loss), micro=8, grad_stats=True,
           example_stats=("norm", "inner", "diag"), params=jax.device_get(net.params),
           group_stats_fn=lambda g, v, m: optim.group_inner_stats(g, m, valid=v),
           extra={"controller": optim.batch_size_init(32, 1 << 20, multiple_of=8),
                  "norm_test": np.float32(0)},
           transition=lambda s, i: s._replace(extra=control(s.extra, i)))
save("stats/opt_state", st.opt_state)
save("stats/extra", st.extra)


# continual: EWC consolidated and GPM bases extended inside the step at step 10, from the step's batch.
def logprob(params, example):
  logits = logits_of(params, example["x"][None])[0]
  return jax.nn.log_softmax(logits)[example["y"]]


def consolidate_at_10(state, info):
  def fire(s):
    fisher = ewc_lib.diagonal_fisher(logprob, info.params, info.batch)
    opt = ewc_lib.consolidate_opt_state(s.opt_state, info.params, fisher)
    acts = layer_inputs(info.params, info.batch["x"])
    acts = {"h": {"w": acts["h"], "b": None}, "o": {"w": acts["o"], "b": None}}
    opt = gpm_lib.gpm_update_opt_state(opt, acts, 0.9)
    return s._replace(opt_state=opt, extra={"fisher": fisher})
  return lax.cond(info.step == 9, fire, lambda s: s, state)


kernels = {"h": {"w": True, "b": False}, "o": {"w": True, "b": False}}
tx = optax.chain(ewc_lib.ewc(ewc_lambda=5.0), gpm_lib.gpm(kernels, max_rank=16), optax.sgd(0.2))
zeros = jax.tree.map(np.zeros_like, init_params(jax.random.key(42)))
cs = train("continual", tx, S.stateless(loss), micro=args.sgd_micro, extra={"fisher": zeros},
           transition=consolidate_at_10)
save("continual/opt_state", cs.opt_state)
save("continual/fisher", cs.extra["fisher"])


# batchnorm: statistics per micro-batch of 8, running averages in model_state.
def bn_loss(params, model_state, b, ctx):
  h = b["x"] @ params["h"]["w"] + params["h"]["b"]
  mu, var = h.mean(0), h.var(0)
  h = (h - mu) / jnp.sqrt(var + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]
  logits = jax.nn.relu(h) @ params["o"]["w"] + params["o"]["b"]
  value = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
  new_state = {"mean": 0.9 * model_state["mean"] + 0.1 * mu, "var": 0.9 * model_state["var"] + 0.1 * var}
  return value, ({"accuracy": jnp.mean(jnp.argmax(logits, -1) == b["y"])}, new_state)


train("batchnorm", optax.sgd(0.5), bn_loss, micro=8, bn=True,
      model_state={"mean": np.zeros(64, np.float32), "var": np.ones(64, np.float32)})

# groups: the convolutions' grouped kernel gradients in the backward pass (custom VJP) on every layout.
cnn = models.functional(models.make_model("cnn1d", input_shape=(20, 1), num_classes=3, width=4, seed=7))


def cnn_loss(params, b, rng):
  logits, _ = cnn.apply(params, {}, b["x"][..., None], train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), {}


train("groups", optax.sgd(0.5), S.stateless(cnn_loss), micro=8, params=jax.device_get(cnn.params),
      example_stats=("norm", "inner", "diag"), example_groups=4)

if jax.process_index() == 0:
  np.savez(args.out, **saved)
print("ok", jax.device_count(), jax.process_count(), file=sys.stderr)
