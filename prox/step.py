"""The data-parallel training step: ``TrainState`` and ``make_train_step``.

One step, pmap semantics, written as ``jax.jit(jax.shard_map(...))`` over a one-dimensional ``data`` mesh:
each device runs the per-device code below on its shard of the global batch, and the only cross-device
communication is explicit (``pmean`` of gradients, metrics and batch statistics). The same step runs on
one CPU, N local devices, GPUs, or a multi-host pod after ``prox.distributed.initialize``.

How the reduction works. The state enters the ``shard_map`` replicated (``P()``), i.e. as values that are
*invariant* over the ``data`` axis. Differentiating a per-device loss with respect to an invariant value
makes JAX insert a ``psum`` in the transpose (the cotangent of a broadcast is a sum), which would give
the sum of the D device gradients instead of this device's. The step therefore first casts the
parameters to *varying* (``lax.pcast(params, 'data', to='varying')``): every gradient computed inside
the ``shard_map`` (each micro-batch's, hence ``GradStats`` and the group gradients) is this device's own,
and the one reduction over devices is the explicit ``pmean`` (``psum`` for group statistics, which are
sums). Code that differentiates inside a ``shard_map`` of its own must do the same.

Groups. Per device the batch is split into ``K`` micro-batches of ``micro_batch_size`` examples; the
gradient is accumulated in a loop inside the compiled step,

    g = 1/(D n) sum_{d=1..D} sum_{k=1..n} grad L(w; B_{d,k}),      n <= K (dynamic)

so that a growing batch only changes the dynamic ``num_micro_batches`` argument, not the compiled shapes:
a batch buffer padded to K micro-batches serves every batch size up to ``D K micro_batch_size``. A *group*
is one micro-batch on one device; group ``(d, k)`` is the ``(d K + k)``-th block of the global buffer.
Everything a group computes depends only on its rows, its index and the state at the start of the step:
its random key is ``fold_in(step_key, d K + k)`` and its model-state update (batch-norm statistics)
starts from the step's ``model_state``; the step's new ``model_state`` is the mean of the groups' (floating
leaves; integer leaves take the maximum). So 1 device with 4 micro-batches, 2 devices with 2 and 4 devices
with 1 compute the same step, bit for bit up to float summation order.

After the reduction, at the level of the jitted function (global arrays, replicated parameters):

    updates, opt_state = tx.update(g, opt_state, params, value=loss)
    params = params + updates
    state = transition(state, StepInfo(...))        # state machines, consolidations, controllers

The step knows no method by name. It composes
- ``loss_fn(params, model_state, batch, ctx) -> (loss, (metrics, new_model_state))``: the mean loss of one
  micro-batch; ``ctx`` is a :class:`LossContext` (the micro-batch's rng, the step, samples seen,
  ``TrainState.extra`` and the step's metadata) so a loss can read e.g. distillation targets or stage
  weights from ``extra``;
- an optax transform, called as ``tx.update(g, opt_state, params, value=loss, samples=samples,
  batch_size=b)`` (examples consumed before the step, and in it; plain transforms are wrapped with
  ``optax.with_extra_args_support``, which drops what they do not take);
- optional hooks: ``forward_fn(params, state)`` for the weights used in the forward pass (e.g. sparse
  masks from the optimizer state, with gradients flowing to the dense ``params``), ``group_stats_fn`` for
  statistics of the per-group gradients, and ``transition(state, info) -> state`` for state machines
  outside the gradient (batch-size controllers, detectors, teachers, EWC consolidation), which may change
  any part of the state, ``opt_state`` included, under ``lax.cond`` when they fire.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prox import taps as taps_lib

__all__ = ["DATA_AXIS", "FSDP_AXIS", "FSDP_MIN_SIZE", "TrainState", "LossContext", "GradStats",
    "ExampleStats", "StepInfo", "StepOutput", "stateless", "in_extra", "chain_transitions", "init_state",
    "data_mesh", "fsdp_mesh", "fsdp_dim", "state_shardings", "place", "replicate", "shard_batch",
    "pack_micro_batches", "make_train_step", "make_eval_step"]

PyTree = Any
Metrics = dict[str, jax.Array]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
FSDP_MIN_SIZE = 1024   # leaves with fewer elements stay replicated on an fsdp mesh


class TrainState(NamedTuple):
  """Everything a training run carries from step to step; a pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer updates applied so far.
    params: the trainable parameters (a plain pytree, e.g. from ``nnx.split``).
    opt_state: the optax state of the composed transform.
    model_state: non-trainable model variables (batch-norm statistics); ``{}`` if none.
    extra: the slot for state machines outside the gradient (batch-size controllers, teachers,
      detectors); any pytree, ``()`` if none; by convention a dict of machine states by name.
    rng: a ``jax.random.key_data`` uint32 key array, split once per step.
    samples: int32 scalar, number of training examples consumed so far (the clock of sample-budgeted
      schedules).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  extra: PyTree
  rng: jax.Array
  samples: jax.Array = np.int32(0)


class LossContext(NamedTuple):
  """What a loss function sees besides parameters, model state and the micro-batch."""
  rng: jax.Array          # this group's key: fold_in(step key, global group index)
  step: jax.Array         # TrainState.step at the start of the step
  samples: jax.Array      # TrainState.samples at the start of the step
  extra: PyTree           # TrainState.extra at the start of the step
  meta: PyTree            # the step's metadata (``meta`` argument of the step), e.g. a task id


LossFn = Callable[[PyTree, PyTree, PyTree, LossContext], tuple[jax.Array, tuple[Metrics, PyTree]]]


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


ExampleStats = taps_lib.ExampleStats


class StepInfo(NamedTuple):
  """What a ``transition`` sees: the step just taken, all values reduced over devices (global arrays).

  Attributes:
    step, samples: the counters at the start of the step (``state.step``/``state.samples`` minus this
      step's increments).
    batch_size: real examples in this step (``D n micro_batch_size``).
    rng: a key for the transition's own sampling, independent of the loss keys.
    meta: the step's metadata (as passed to the step).
    params, opt_state: parameters and optimizer state *before* this step's update.
    grads: the mean gradient; loss: the mean loss; metrics: the loss function's metrics and ``loss``.
    grad_stats, group_stats: as in :class:`StepOutput` (``None`` unless asked for).
    batch: the global batch buffer (sharded over ``data``); ``valid``: bool per row, True for the real
      rows (the buffer may be padded, see ``pack_micro_batches``).
  """
  step: jax.Array
  samples: jax.Array
  batch_size: jax.Array
  rng: jax.Array
  meta: PyTree
  params: PyTree
  opt_state: PyTree
  grads: PyTree
  loss: jax.Array
  metrics: Metrics
  grad_stats: GradStats | None
  group_stats: PyTree | None
  batch: PyTree
  valid: jax.Array
  example_stats: ExampleStats | None = None


class StepOutput(NamedTuple):
  """What the step returns beside the new state.

  ``finite`` is False when the loss, the gradient or the updated parameters are not finite; with
  ``skip_nonfinite=True`` such a step leaves params, opt_state, model_state and extra unchanged.
  """
  metrics: Metrics        # 'loss' and the loss function's metrics, averaged over the global batch
  grad_stats: GradStats | None
  group_stats: PyTree | None
  finite: jax.Array
  example_stats: ExampleStats | None = None


Transition = Callable[[TrainState, StepInfo], TrainState]


def stateless(loss: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Metrics]]) -> LossFn:
  """Adapts ``loss(params, batch, rng) -> (loss, metrics)`` for models without ``model_state``."""

  def loss_fn(params, model_state, batch, ctx):
    value, metrics = loss(params, batch, ctx.rng)
    return value, (metrics, model_state)

  return loss_fn


def in_extra(name: str, update: Callable[[PyTree, StepInfo], PyTree]) -> Transition:
  """A transition that updates ``state.extra[name]`` with ``update(state.extra[name], info)``.

  ``extra`` is a dict of state-machine states by name; each machine sees the step (``info``) and its
  own state, e.g. ``in_extra("controller", lambda s, i: controller.update(s, norm_test(i.grad_stats)))``.
  """

  def transition(state: TrainState, info: StepInfo) -> TrainState:
    return state._replace(extra={**state.extra, name: update(state.extra[name], info)})

  return transition


def chain_transitions(*transitions: Transition | None) -> Transition:
  """Runs transitions one after the other (``None`` entries are skipped)."""
  transitions = tuple(t for t in transitions if t is not None)

  def transition(state: TrainState, info: StepInfo) -> TrainState:
    for t in transitions:
      state = t(state, info)
    return state

  return transition


def init_state(params: PyTree, tx: optax.GradientTransformation, *, model_state: PyTree = None,
               extra: PyTree = (), seed: int | jax.Array = 0) -> TrainState:
  """A host ``TrainState`` at step 0: ``tx.init(params)``, the rng of ``seed``; place it with ``replicate``."""
  params = jax.device_get(params)
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  return TrainState(step=np.int32(0), params=params, opt_state=jax.device_get(tx.init(params)),
                    model_state=jax.device_get({} if model_state is None else model_state),
                    extra=jax.device_get(extra), rng=np.asarray(jax.random.key_data(key)),
                    samples=np.int32(0))


def data_mesh(devices: Any = None) -> Mesh:
  """A one-dimensional mesh named ``data`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def fsdp_mesh(data: int, fsdp: int, devices: Any = None) -> Mesh:
  """A ``data x fsdp`` mesh: the batch is split over all ``data * fsdp`` devices, and the parameters,
  optimizer state and ``extra`` over the ``fsdp`` axis (fully sharded data parallelism; see
  :func:`make_train_step`). ``fsdp=1`` is plain data parallelism."""
  devices = jax.devices() if devices is None else list(devices)
  if data * fsdp != len(devices):
    raise ValueError(f"a {data} x {fsdp} mesh needs {data * fsdp} devices, got {len(devices)}")
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def _fsdp_size(mesh: Mesh) -> int:
  return mesh.shape.get(FSDP_AXIS, 1)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return (DATA_AXIS, FSDP_AXIS) if FSDP_AXIS in mesh.axis_names else (DATA_AXIS,)


def fsdp_dim(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> int | None:
  """The axis a leaf of ``shape`` is sharded on over ``fsdp`` devices, or ``None`` (replicated).

  A leaf of at least ``min_size`` elements is split along its last axis if ``fsdp`` divides it (a
  kernel's output features: N:M groups, which run along the input axis, stay on one device), else along
  its largest divisible axis; otherwise it is replicated.
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size or not shape:
    return None
  if shape[-1] % fsdp == 0:
    return len(shape) - 1
  candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
  return max(candidates, key=lambda i: shape[i]) if candidates else None


def _spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  d = fsdp_dim(shape, fsdp, min_size)
  return P() if d is None else P(*[FSDP_AXIS if i == d else None for i in range(len(shape))])


def state_shardings(tree: PyTree, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> PyTree:
  """``NamedSharding`` of every leaf of ``tree`` on ``mesh``: split over ``fsdp`` as :func:`fsdp_dim` says
  (replicated on a data mesh)."""
  fsdp = _fsdp_size(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, _spec(np.shape(x), fsdp, min_size)), tree)


def place(tree: PyTree, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> PyTree:
  """Places a host pytree (the same on every process) on ``mesh``: fully sharded over ``fsdp`` where a
  leaf is large enough (:func:`state_shardings`), replicated otherwise. On a data mesh: ``replicate``."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree, state_shardings(tree, mesh, min_size=min_size))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host pytree (the same on every process) on all devices of ``mesh``, replicated."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Builds the global batch from this process's shard (rows split over every device of the mesh:
  the ``data`` axis, and ``fsdp`` on a 2-D mesh).

  Each process passes only the rows it loaded; on a single process this is the whole batch.
  """
  sharding = NamedSharding(mesh, P(_batch_axes(mesh)))
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


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``x`` marked as varying over ``axes`` (a gathered fsdp shard already varies over ``fsdp``)."""
  have = jax.typeof(x).manual_axis_type.varying
  missing = tuple(a for a in axes if a not in have)
  return lax.pcast(x, missing, to="varying") if missing else x


def _is_float(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _all_finite(*trees: PyTree) -> jax.Array:
  """True when every floating leaf is finite (one fused reduction per leaf)."""
  ok = jnp.asarray(True)
  for x in jax.tree.leaves(trees):
    if _is_float(x):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    micro_batch_size: int | None = None,
    grad_stats: bool = False,
    group_stats_fn: Callable[[PyTree, jax.Array, PyTree], PyTree] | None = None,
    forward_fn: Callable[[PyTree, TrainState], PyTree] | None = None,
    transition: Transition | None = None,
    skip_nonfinite: bool = False,
    example_stats: tuple[str, ...] = (),
    example_groups: int | None = None,
    fsdp_min_size: int = FSDP_MIN_SIZE,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, StepOutput]]:
  """Builds ``step(state, batch, num_micro_batches=None, meta=None) -> (state, StepOutput)``, jitted.

  Args:
    loss_fn: ``(params, model_state, batch, ctx) -> (loss, (metrics, new_model_state))``, the mean loss
      of one micro-batch (see ``stateless`` for ``loss(params, batch, rng)``).
    tx: the optax transform; receives ``params``, ``value=loss``, ``samples`` (examples consumed
      before this step) and ``batch_size`` (examples in it) as extra arguments.
    mesh: a mesh with a ``data`` axis (default: ``data_mesh()``), or ``data x fsdp`` (``fsdp_mesh``). The
      batch is split over all its devices. On an ``fsdp`` mesh the parameters, optimizer state, model state
      and ``extra`` are fully sharded over ``fsdp`` (leaves of ``fsdp_min_size`` elements or more, along
      the axis ``fsdp_dim`` picks; place the initial state with ``place``): each device gathers the
      whole forward-pass weights for its micro-batches and the gradient is reduce-scattered, so each
      device keeps and updates only its shard; the optimizer and transitions run on the sharded global
      arrays (XLA inserts the communication a whole-tensor method needs: a global top-k, the norms of a
      Sinkhorn step, an SVD).
    micro_batch_size: examples per micro-batch per device; ``None`` means one micro-batch of the whole
      per-device batch. The per-device batch must be a multiple of it.
    grad_stats: also return ``GradStats`` (first and second moments of the group gradients).
    group_stats_fn: ``(group_grads, valid, mean_grad) -> pytree``: statistics of this device's group
      gradients (stacked ``[K, ...]``, ``valid`` a bool ``[K]`` marking the real micro-batches) given the
      global mean gradient; the result is summed over devices and returned as ``group_stats``. Keeping
      the group gradients costs K copies of the gradient; only asked for when this hook is given.
    forward_fn: ``(params, state) -> params`` used in the forward pass (built once per step, on the global
      arrays); gradients flow to ``params`` through its vector-Jacobian product.
    transition: ``(state, info) -> state`` applied after the update (see :func:`in_extra`,
      :func:`chain_transitions`); it sees the updated state and the step's :class:`StepInfo`.
    skip_nonfinite: when the step is not finite (see :class:`StepOutput`), keep the state's params,
      opt_state, model_state and extra (the counters and rng still advance), like
      ``optax.apply_if_finite``; the loop counts such steps from ``StepOutput.finite``.
    example_stats: per-example gradient moments to compute from layer taps (:class:`ExampleStats`):
      any of ``"norm"`` (``sum_i ||G_i||^2``: the norm test), ``"inner"`` (``<G_i, g>``: inner-product and
      orthogonality tests; with several micro-batches it keeps their activations until the mean
      gradient is known) and ``"diag"`` (``sum_i G_i**2``: the
      coordinate-wise test). The model must tap its layers (``prox.models.functional`` does) and the loss
      must be the unweighted mean over the micro-batch of losses of examples that do not interact (no
      batch norm in train mode). Cost: one ordinary pass, plus O(examples x layer widths) for ``"norm"``
      and one matrix product per layer for ``"inner"`` and ``"diag"`` (a convolution: per-example
      products over its positions, see ``prox.taps``).
    example_groups: ``n`` (>= 2, dividing the micro-batch): convolutions form the kernel gradients of ``n``
      groups of examples per micro-batch instead of one per example - as cheap as their ordinary
      gradient - and their moments are estimated from them (unbiased; dense layers and biases stay
      exact). ``None``: exact per example.
    donate: donate the state's buffers to the step (the old state must not be used afterwards).

  ``num_micro_batches`` (an int32 scalar) says how many of the buffer's per-device micro-batches are real
  (see ``pack_micro_batches``); ``None`` uses all. ``meta`` is a small replicated pytree of the step's
  metadata (e.g. a task id) passed to the loss and the transition; its structure is part of the compiled
  signature, its values are not. Changing either value never recompiles.
  """
  mesh = data_mesh() if mesh is None else mesh
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
  if micro_batch_size is not None and micro_batch_size <= 0:
    raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
  axes = _batch_axes(mesh)
  fsdp = _fsdp_size(mesh)
  num_devices = int(np.prod([mesh.shape[a] for a in axes]))
  tx = optax.with_extra_args_support(tx)
  want_groups = group_stats_fn is not None
  example_stats = tuple(example_stats)
  unknown = sorted(set(example_stats) - {"norm", "inner", "diag"})
  if unknown:
    raise ValueError(f"example_stats {unknown} unknown; known: 'norm', 'inner', 'diag'")
  if example_groups is not None and (not isinstance(example_groups, int) or example_groups < 2):
    raise ValueError(f"example_groups must be an integer >= 2 or None, got {example_groups!r}")
  need_full_mean = grad_stats or want_groups or "inner" in example_stats
  dims = lambda tree: jax.tree.map(lambda x: fsdp_dim(np.shape(x), fsdp, fsdp_min_size), tree)
  specs = lambda tree: jax.tree.map(lambda x: _spec(np.shape(x), fsdp, fsdp_min_size), tree)

  def gather(tree: PyTree, tree_dims: PyTree) -> PyTree:
    """The whole leaves of this device's fsdp shards (identity on a data mesh); ``tree_dims`` come from
    the global shapes (inside the shard_map a leaf has its shard's shape)."""
    if fsdp == 1:
      return tree
    return jax.tree.map(lambda x, d: x if d is None else lax.all_gather(x, FSDP_AXIS, axis=d, tiled=True),
                        tree, tree_dims)

  def reduce_grads(tree: PyTree) -> PyTree:
    """The mean over all devices, each leaf left sharded as the parameters are (reduce-scatter)."""
    def one(g, d):
      if d is None:
        return lax.pmean(g, axes)
      return lax.pmean(lax.psum_scatter(g, FSDP_AXIS, scatter_dimension=d, tiled=True) / fsdp, DATA_AXIS)
    return jax.tree.map(one, tree, dims(tree))

  static = {}   # trace-time facts the per-device code leaves for the step (the taps' coverage)

  def per_device(fwd_params: PyTree, model_state: PyTree, extra: PyTree, counters: tuple, batch: PyTree,
                 num_micro: jax.Array | None, meta: PyTree, step_key: jax.Array):
    step_count, samples = counters
    full_params = gather(fwd_params, static["dims"][0])
    model_state, extra = gather(model_state, static["dims"][1]), gather(extra, static["dims"][2])
    local_rows = jax.tree.leaves(batch)[0].shape[0]
    m = local_rows if micro_batch_size is None else micro_batch_size
    if local_rows % m:
      raise ValueError(f"per-device batch of {local_rows} rows is not a multiple of "
                       f"micro_batch_size={m}")
    k_max = local_rows // m
    micro = jax.tree.map(lambda x: x.reshape((k_max, m) + x.shape[1:]), batch)
    n = jnp.asarray(k_max if num_micro is None else num_micro, jnp.int32)
    device = lax.axis_index(DATA_AXIS) * fsdp + (lax.axis_index(FSDP_AXIS) if fsdp > 1 else 0)
    first_group = device * k_max

    def micro_loss(params, mb, k):
      ctx = LossContext(rng=jax.random.fold_in(step_key, first_group + k), step=step_count,
                        samples=samples, extra=extra, meta=meta)
      return loss_fn(params, model_state, mb, ctx)

    # Per-device gradients: see the module docstring (the parameters are invariant over the mesh axes;
    # the gradient with respect to an invariant value would already be summed over devices).
    params = jax.tree.map(lambda x: _varying(x, axes), full_params)
    zeros = _tree_zeros(full_params)
    first_mb = jax.tree.map(lambda x: x[0], micro)
    _, (metrics_shape, model_state_shape) = jax.eval_shape(micro_loss, full_params, first_mb, 0)
    if example_stats:
      grad_fn = taps_lib.value_and_grad(micro_loss, has_aux=True, axis_name=axes, groups=example_groups)
    else:
      plain_grad = jax.value_and_grad(micro_loss, has_aux=True)
      grad_fn = lambda params, mb, k: (*plain_grad(params, mb, k), None)

    carry = dict(
        grad=zeros,
        loss=jnp.zeros((), jnp.float32),
        metrics=jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape),
        model_state=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model_state_shape),
    )
    if grad_stats:
      carry["sq"] = zeros
    if want_groups:
      carry["groups"] = jax.tree.map(lambda x: jnp.zeros((k_max,) + x.shape, x.dtype), full_params)
    if "norm" in example_stats:
      carry["ex_sq"] = jnp.zeros((), jnp.float32)
    if "diag" in example_stats:
      carry["ex_diag"] = _tree_zeros(full_params, jnp.float32)
    single = k_max == 1 and num_micro is None
    if example_stats:
      shapes = jax.eval_shape(grad_fn, full_params, first_mb, 0)[2]
      static["covered"] = taps_lib.covered_size(shapes.taps) / max(1, sum(
          x.size for x in jax.tree.leaves(full_params)))
    if "inner" in example_stats and not single:
      # The inner products need the step's mean gradient: keep every micro-batch's layer inputs and
      # output cotangents (the activations of the whole per-device batch) until after the reduction.
      carry["ex_tapped"] = jax.tree.map(lambda x: jnp.zeros((k_max,) + x.shape, x.dtype), shapes)
    kept = {}

    # Per-device accumulators differ between devices: mark them as varying over the mesh axes.
    carry = jax.tree.map(lambda x: lax.pcast(x, axes, to="varying"), carry)

    def body(k, c):
      mb = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, k, keepdims=False), micro)
      (loss, (metrics, model_state)), g, tapped = grad_fn(params, mb, k)
      out = dict(
          grad=jax.tree.map(jnp.add, c["grad"], g),
          loss=c["loss"] + loss.astype(jnp.float32),
          metrics=jax.tree.map(lambda a, b: a + b.astype(jnp.float32), c["metrics"], metrics),
          # Floating leaves (batch-norm statistics) are summed and averaged below; counters keep the max.
          model_state=jax.tree.map(lambda a, b: a + b if _is_float(b) else jnp.maximum(a, b),
                                   c["model_state"], model_state),
      )
      if grad_stats:
        out["sq"] = jax.tree.map(lambda a, b: a + b * b, c["sq"], g)
      if want_groups:
        out["groups"] = jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, k, 0),
                                     c["groups"], g)
      if example_stats:
        sums = taps_lib.example_stats(tapped, full_params, [w for w in example_stats if w != "inner"])
        if sums.sq_norm_sum is not None:
          out["ex_sq"] = c["ex_sq"] + sums.sq_norm_sum
        if sums.diag_sum is not None:
          out["ex_diag"] = jax.tree.map(jnp.add, c["ex_diag"], sums.diag_sum)
        if single:
          kept["tapped"] = tapped
        elif "ex_tapped" in c:
          out["ex_tapped"] = jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, k, 0),
                                          c["ex_tapped"], tapped)
      return out

    if single:
      c = body(0, carry)   # one micro-batch: no loop (XLA:CPU runs convolutions ~8x slower in one)
    else:
      c = lax.fori_loop(0, n, body, carry)
    inv_n = 1.0 / n.astype(jnp.float32)
    scale = lambda tree: jax.tree.map(lambda x: (x * inv_n).astype(x.dtype), tree)
    local_mean = scale(c["grad"])
    grads = reduce_grads(local_mean)
    mean = lax.pmean(local_mean, axes) if need_full_mean else None   # the whole mean, every device
    loss = lax.pmean(c["loss"] * inv_n, axes)
    metrics = lax.pmean(scale(c["metrics"]), axes)
    metrics = {"loss": loss, **metrics}
    model_state = jax.tree.map(
        lambda x: lax.pmean(x * inv_n, axes).astype(x.dtype) if _is_float(x)
        else lax.pmax(x, axes), c["model_state"])

    stats = None
    if grad_stats:
      stats = GradStats(mean=mean, second_moment=lax.pmean(scale(c["sq"]), axes),
                        num_groups=n * num_devices, group_size=m)
    group_stats = None
    if want_groups:
      valid = jnp.arange(k_max) < n
      group_stats = lax.psum(group_stats_fn(c["groups"], valid, mean), axes)
    valid_rows = jnp.arange(local_rows) < n * m
    ex = None
    if example_stats:
      psum = lambda x: None if x is None else lax.psum(x, axes)
      inner = inner_sq = None
      if "inner" in example_stats and single:
        found = taps_lib.example_stats(kept["tapped"], full_params, ("inner",), direction=mean)
        inner, inner_sq = found.inner_sum, found.inner_sq_sum
      elif "inner" in example_stats:
        def sums(t):
          found = taps_lib.example_stats(t, full_params, ("inner",), direction=mean)
          return jnp.stack([found.inner_sum, found.inner_sq_sum])
        p = jax.vmap(sums)(c["ex_tapped"]) * (jnp.arange(k_max) < n)[:, None]
        inner, inner_sq = jnp.sum(p[:, 0]), jnp.sum(p[:, 1])
      ex = ExampleStats(count=n * m * num_devices, sq_norm_sum=psum(c.get("ex_sq")), inner_sum=psum(inner),
                        inner_sq_sum=psum(inner_sq),
                        diag_sum=None if "ex_diag" not in c else lax.psum(c["ex_diag"], axes),
                        covered=None)
    return grads, loss, metrics, model_state, stats, group_stats, n * m * num_devices, valid_rows, ex

  def step(state: TrainState, batch: PyTree, num_micro_batches: jax.Array | None = None,
           meta: PyTree = None):
    if num_micro_batches is not None and micro_batch_size is None:
      raise ValueError("num_micro_batches counts micro-batches of micro_batch_size examples: build the step "
                       "with make_train_step(..., micro_batch_size=...) (the size pack_micro_batches used)")
    key = jax.random.wrap_key_data(state.rng)
    next_key, step_key, transition_key = jax.random.split(key, 3)
    num_micro = None if num_micro_batches is None else jnp.asarray(num_micro_batches, jnp.int32)
    # The forward-pass weights (e.g. masked) are built once, at the level of global arrays; the
    # per-device code differentiates the loss with respect to them, and the mean gradient goes back
    # through forward_fn's vector-Jacobian product (linear, so the mean commutes with it).
    if forward_fn is None:
      fwd_params, pullback = state.params, None
    else:
      fwd_params, pullback = jax.vjp(lambda p: forward_fn(p, state), state.params)
    # forward_fn may change the tree (e.g. scores + weights -> weights): shard what is differentiated.
    param_specs = specs(fwd_params)
    static["dims"] = (dims(fwd_params), dims(state.model_state), dims(state.extra))
    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(param_specs, specs(state.model_state), specs(state.extra), P(), P(axes), P(), P(), P()),
        out_specs=(param_specs, P(), P(), P(), P(), P(), P(), P(axes), P()))
    fwd_params = jax.lax.with_sharding_constraint(
        fwd_params, jax.tree.map(lambda sp: NamedSharding(mesh, sp), param_specs))
    grads, loss, metrics, model_state, stats, group_stats, batch_size, valid, ex = sharded(
        fwd_params, state.model_state, state.extra, (state.step, state.samples), batch, num_micro, meta,
        step_key)
    if pullback is not None:
      grads = pullback(grads)[0]
    if ex is not None:
      ex = ex._replace(covered=static["covered"])   # known when tracing: not a device value
    samples = jnp.asarray(state.samples, jnp.int32)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, samples=samples,
                                   batch_size=batch_size.astype(jnp.int32))
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state,
                     extra=state.extra, rng=jax.random.key_data(next_key),
                     samples=samples + batch_size.astype(jnp.int32))
    if transition is not None:
      info = StepInfo(step=state.step, samples=samples, batch_size=batch_size, rng=transition_key,
                      meta=meta, params=state.params, opt_state=state.opt_state, grads=grads, loss=loss,
                      metrics=metrics, grad_stats=stats, group_stats=group_stats, batch=batch,
                      valid=valid, example_stats=ex)
      new = transition(new, info)
    # The state keeps its layout (replicated on a data mesh; fully sharded over fsdp): a transition
    # reducing over the sharded batch could leave XLA free to choose another, and the next step and the
    # checkpoint expect this one.
    new = jax.lax.with_sharding_constraint(new, state_shardings(new, mesh, min_size=fsdp_min_size))
    finite = _all_finite(loss, grads, new.params)
    if skip_nonfinite:
      keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
      new = new._replace(params=keep(new.params, state.params),
                         opt_state=keep(new.opt_state, state.opt_state),
                         model_state=keep(new.model_state, state.model_state),
                         extra=keep(new.extra, state.extra))
    return new, StepOutput(metrics=metrics, grad_stats=stats, group_stats=group_stats, finite=finite,
                           example_stats=ex)

  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
  jitted.micro_batch_size = micro_batch_size   # read by prox.loop.run, which packs batches to match
  return jitted


def make_eval_step(eval_fn: Callable[[PyTree, PyTree, PyTree], dict[str, jax.Array]], *,
                   mesh: Mesh | None = None,
                   fsdp_min_size: int = FSDP_MIN_SIZE) -> Callable[[TrainState, PyTree], dict[str, jax.Array]]:
  """Builds ``eval_step(state, batch) -> sums``: ``eval_fn(params, model_state, batch)`` returns
  per-device sums (e.g. correct predictions and example counts, honouring a padding mask); they are
  summed over the mesh (the batch is split as in the train step; fsdp-sharded weights are gathered)."""
  mesh = data_mesh() if mesh is None else mesh
  axes, fsdp = _batch_axes(mesh), _fsdp_size(mesh)

  def gather(tree, tree_dims):
    if fsdp == 1:
      return tree
    return jax.tree.map(lambda x, d: x if d is None else lax.all_gather(x, FSDP_AXIS, axis=d, tiled=True),
                        tree, tree_dims)

  def evaluate(state: TrainState, batch: PyTree):
    spec = lambda tree: jax.tree.map(lambda x: _spec(np.shape(x), fsdp, fsdp_min_size), tree)
    dims = lambda tree: jax.tree.map(lambda x: fsdp_dim(np.shape(x), fsdp, fsdp_min_size), tree)
    param_dims, state_dims = dims(state.params), dims(state.model_state)   # global shapes

    def per_device(params: PyTree, model_state: PyTree, batch: PyTree):
      return lax.psum(eval_fn(gather(params, param_dims), gather(model_state, state_dims), batch), axes)

    sharded = jax.shard_map(per_device, mesh=mesh,
                            in_specs=(spec(state.params), spec(state.model_state), P(axes)), out_specs=P())
    return sharded(state.params, state.model_state, batch)

  return jax.jit(evaluate)
