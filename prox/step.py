"""The data-parallel training step: ``TrainState`` and ``make_train_step``.

One step, pmap semantics, written as ``jax.jit(jax.shard_map(...))`` over a one-dimensional ``data`` mesh:
each device runs the per-device code below on its shard of the global batch, and the only cross-device
communication is explicit (``pmean`` of gradients, metrics and batch statistics). The same step runs on
one CPU, N local devices, GPUs, or a multi-host pod after ``prox.distributed.initialize``.

Per device the batch is split into ``K`` micro-batches of ``micro_batch_size`` examples; the gradient is
accumulated in a loop inside the compiled step,

    g = 1/(D n) sum_{d=1..D} sum_{k=1..n} grad L(w; B_{d,k}),      n <= K (dynamic)

so that a growing batch only changes the dynamic ``num_micro_batches`` argument, not the compiled shapes:
a batch buffer padded to K micro-batches serves every batch size up to ``D K micro_batch_size``.

The step knows no method by name. It composes
- ``loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))``;
- an optax transform, called as ``tx.update(g, opt_state, params, value=loss)`` (plain transforms are
  wrapped with ``optax.with_extra_args_support``);
- optional hooks: ``forward_fn(params, state)`` for the weights used in the forward pass (e.g. sparse
  masks from the optimizer state, with gradients flowing to the dense ``params``), ``group_stats_fn`` for
  statistics of the per-group gradients, and ``extra_update(extra, info)`` for state transitions outside
  the gradient (batch-size controllers, teachers, penalties) that live in ``TrainState.extra``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, tuple[Metrics, PyTree]]]

DATA_AXIS = "data"


class TrainState(NamedTuple):
  """Everything a training run carries from step to step; a pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: the trainable parameters (a plain pytree, e.g. from ``nnx.split``).
    opt_state: the optax state of the composed transform.
    model_state: non-trainable model variables (batch-norm statistics); ``{}`` if none.
    extra: the slot for state machines outside the gradient (batch-size controllers, teachers,
      penalties); any pytree, ``()`` if none.
    rng: a ``jax.random.key_data`` uint32 key array, split once per step.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  extra: PyTree
  rng: jax.Array


class GradStats(NamedTuple):
  """First and second moments of the group gradients across the data axis.

  A group is one micro-batch on one device; ``g_k`` is the mean gradient of its ``group_size`` examples.
  With ``G = num_groups`` groups, ``mean = 1/G sum_k g_k`` (the step's gradient) and
  ``second_moment = 1/G sum_k g_k**2`` (elementwise). The per-example gradient variance is then
  estimated without per-example gradients as ``Var_i(G_i) ~= group_size * G/(G-1) * (second_moment -
  mean**2)``.
  """
  mean: PyTree
  second_moment: PyTree
  num_groups: jax.Array
  group_size: int


class StepInfo(NamedTuple):
  """What an ``extra_update`` hook sees (all values already reduced across the data axis)."""
  step: jax.Array
  params: PyTree          # parameters before this step's update
  grads: PyTree           # the mean gradient
  loss: jax.Array
  metrics: Metrics
  grad_stats: GradStats | None
  group_stats: PyTree | None
  opt_state: PyTree = None  # optimizer state before this step's update (e.g. AdaGrad's accumulator)


class StepOutput(NamedTuple):
  metrics: Metrics        # 'loss' and the loss function's metrics, averaged over the global batch
  grad_stats: GradStats | None
  group_stats: PyTree | None


def stateless(loss: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Metrics]]) -> LossFn:
  """Adapts ``loss(params, batch, rng) -> (loss, metrics)`` for models without ``model_state``."""

  def loss_fn(params, model_state, batch, rng):
    value, metrics = loss(params, batch, rng)
    return value, (metrics, model_state)

  return loss_fn


def data_mesh(devices: Any = None) -> Mesh:
  """A one-dimensional mesh named ``data`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host pytree (the same on every process) on all devices of ``mesh``, replicated."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Builds the global batch from this process's shard (rows split over the ``data`` axis).

  Each process passes only the rows it loaded; on a single process this is the whole batch.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def pack_micro_batches(batch: PyTree, *, num_devices: int, micro_batch_size: int,
                       max_micro_batches: int) -> PyTree:
  """Pads a global host batch of ``D n m`` rows into the step's fixed ``D K m`` buffer layout.

  Device ``d`` holds rows ``[d K m, (d+1) K m)`` of the buffer, of which the first ``n m`` are real: the
  rows ``[d n m, (d+1) n m)`` of ``batch``. Pass ``num_micro_batches=n`` to the step.
  """
  d, m, k = num_devices, micro_batch_size, max_micro_batches

  def pack(x):
    x = np.asarray(x)
    if x.shape[0] % (d * m):
      raise ValueError(f"batch of {x.shape[0]} rows is not a multiple of devices x micro-batch = {d * m}")
    n = x.shape[0] // (d * m)
    if n > k:
      raise ValueError(f"batch of {x.shape[0]} rows needs {n} micro-batches > max_micro_batches={k}")
    out = np.zeros((d, k * m) + x.shape[1:], x.dtype)
    out[:, : n * m] = x.reshape((d, n * m) + x.shape[1:])
    return out.reshape((d * k * m,) + x.shape[1:])

  return jax.tree.map(pack, batch)


def _tree_zeros(tree: PyTree, dtype: Any = None) -> PyTree:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)


def _pmean_floats(tree: PyTree, axis_name: str) -> PyTree:
  """Averages floating leaves over the axis; other leaves (counters) take their maximum."""
  def reduce(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return lax.pmean(x, axis_name)
    return lax.pmax(x, axis_name)

  return jax.tree.map(reduce, tree)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    micro_batch_size: int | None = None,
    grad_stats: bool = False,
    group_stats_fn: Callable[[PyTree, jax.Array, PyTree], PyTree] | None = None,
    forward_fn: Callable[[PyTree, TrainState], PyTree] | None = None,
    extra_update: Callable[[PyTree, StepInfo], PyTree] | None = None,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, StepOutput]]:
  """Builds ``step(state, batch, num_micro_batches=None) -> (state, StepOutput)``, jitted.

  Args:
    loss_fn: ``(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))``, the mean loss
      of one micro-batch (see ``stateless`` for models without state).
    tx: the optax transform; receives ``params`` and ``value=loss`` as extra arguments.
    mesh: a mesh with a ``data`` axis (default: ``data_mesh()``). The batch is split over it.
    micro_batch_size: examples per micro-batch per device; ``None`` means one micro-batch of the whole
      per-device batch. The per-device batch must be a multiple of it.
    grad_stats: also return ``GradStats`` (first and second moments of the group gradients).
    group_stats_fn: ``(group_grads, valid, mean_grad) -> pytree``: statistics of this device's group
      gradients (stacked ``[K, ...]``, ``valid`` a bool ``[K]`` marking the real micro-batches) given the
      global mean gradient; the result is summed over devices and returned as ``group_stats``. Keeping
      the group gradients costs K copies of the gradient; only asked for when this hook is given.
    forward_fn: ``(params, state) -> params`` used in the forward pass; gradients flow to ``params``.
    extra_update: ``(extra, StepInfo) -> extra``, a state transition applied once per step.
    donate: donate the state's buffers to the step (the old state must not be used afterwards).

  ``num_micro_batches`` (an int32 scalar, replicated) says how many of the buffer's per-device
  micro-batches are real (see ``pack_micro_batches``); ``None`` uses all. Changing its value never
  recompiles.
  """
  mesh = data_mesh() if mesh is None else mesh
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
  if micro_batch_size is not None and micro_batch_size <= 0:
    raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
  num_devices = mesh.shape[DATA_AXIS]
  tx = optax.with_extra_args_support(tx)
  want_groups = group_stats_fn is not None

  def per_device(state: TrainState, batch: PyTree, num_micro: jax.Array | None):
    local_rows = jax.tree.leaves(batch)[0].shape[0]
    m = local_rows if micro_batch_size is None else micro_batch_size
    if local_rows % m:
      raise ValueError(f"per-device batch of {local_rows} rows is not a multiple of "
                       f"micro_batch_size={m}")
    k_max = local_rows // m
    micro = jax.tree.map(lambda x: x.reshape((k_max, m) + x.shape[1:]), batch)
    n = jnp.asarray(k_max if num_micro is None else num_micro, jnp.int32)

    key = jax.random.wrap_key_data(state.rng)
    next_key, step_key = jax.random.split(key)
    device_key = jax.random.fold_in(step_key, lax.axis_index(DATA_AXIS))

    def micro_loss(params, model_state, mb, rng):
      fwd = params if forward_fn is None else forward_fn(params, state)
      return loss_fn(fwd, model_state, mb, rng)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    zeros = _tree_zeros(state.params)
    _, (metrics_shape, _) = jax.eval_shape(
        micro_loss, state.params, state.model_state,
        jax.tree.map(lambda x: x[0], micro), device_key)

    carry = dict(
        grad=zeros,
        loss=jnp.zeros((), jnp.float32),
        metrics=jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape),
        model_state=state.model_state,
    )
    if grad_stats:
      carry["sq"] = zeros
    if want_groups:
      carry["groups"] = jax.tree.map(lambda x: jnp.zeros((k_max,) + x.shape, x.dtype), state.params)

    # Per-device accumulators differ between devices: mark them as varying over the data axis.
    carry = jax.tree.map(lambda x: lax.pcast(x, (DATA_AXIS,), to="varying"), carry)

    def body(k, c):
      mb = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, k, keepdims=False), micro)
      (loss, (metrics, model_state)), g = grad_fn(
          state.params, c["model_state"], mb, jax.random.fold_in(device_key, k))
      out = dict(
          grad=jax.tree.map(jnp.add, c["grad"], g),
          loss=c["loss"] + loss.astype(jnp.float32),
          metrics=jax.tree.map(lambda a, b: a + b.astype(jnp.float32), c["metrics"], metrics),
          model_state=model_state,
      )
      if grad_stats:
        out["sq"] = jax.tree.map(lambda a, b: a + b * b, c["sq"], g)
      if want_groups:
        out["groups"] = jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, k, 0),
                                     c["groups"], g)
      return out

    if k_max == 1 and num_micro is None:
      c = body(0, carry)   # one micro-batch: no loop (XLA:CPU runs convolutions ~8x slower in one)
    else:
      c = lax.fori_loop(0, n, body, carry)
    inv_n = 1.0 / n.astype(jnp.float32)
    scale = lambda tree: jax.tree.map(lambda x: (x * inv_n).astype(x.dtype), tree)
    grads = lax.pmean(scale(c["grad"]), DATA_AXIS)
    loss = lax.pmean(c["loss"] * inv_n, DATA_AXIS)
    metrics = lax.pmean(scale(c["metrics"]), DATA_AXIS)
    metrics = {"loss": loss, **metrics}
    model_state = _pmean_floats(c["model_state"], DATA_AXIS)

    stats = None
    if grad_stats:
      stats = GradStats(mean=grads, second_moment=lax.pmean(scale(c["sq"]), DATA_AXIS),
                        num_groups=n * num_devices, group_size=m)
    group_stats = None
    if want_groups:
      valid = jnp.arange(k_max) < n
      group_stats = lax.psum(group_stats_fn(c["groups"], valid, grads), DATA_AXIS)

    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    extra = state.extra
    if extra_update is not None:
      info = StepInfo(step=state.step, params=state.params, grads=grads, loss=loss, metrics=metrics,
                      grad_stats=stats, group_stats=group_stats, opt_state=state.opt_state)
      extra = extra_update(extra, info)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=model_state, extra=extra,
                           rng=jax.random.key_data(next_key))
    return new_state, StepOutput(metrics=metrics, grad_stats=stats, group_stats=group_stats)

  def step(state: TrainState, batch: PyTree, num_micro_batches: jax.Array | None = None):
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                            out_specs=P())
    return sharded(state, batch, num_micro_batches)

  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(eval_fn: Callable[[PyTree, PyTree, PyTree], dict[str, jax.Array]], *,
                   mesh: Mesh | None = None) -> Callable[[TrainState, PyTree], dict[str, jax.Array]]:
  """Builds ``eval_step(state, batch) -> sums``: ``eval_fn(params, model_state, batch)`` returns
  per-device sums (e.g. correct predictions and example counts, honouring a padding mask); they are
  summed over the ``data`` axis."""
  mesh = data_mesh() if mesh is None else mesh

  def per_device(state: TrainState, batch: PyTree):
    return lax.psum(eval_fn(state.params, state.model_state, batch), DATA_AXIS)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P()))
