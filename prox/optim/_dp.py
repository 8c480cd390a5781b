"""DP-SGD gradients: per-example clipping and Gaussian noise, with per-example norms from layer taps.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"). For a batch of ``m`` examples with
per-example gradients ``g_i = grad l_i(w)``, a clipping norm ``C`` and a noise multiplier ``sigma``::

    g_bar = ( sum_i g_i min(1, C / ||g_i||) + sigma C xi ) / m,      xi ~ N(0, I)

(``optax.contrib.differentially_private_aggregate``'s convention; ``||g_i|| = 0`` is left unscaled).
Each example then moves ``g_bar`` by at most ``C / m`` plus noise, which an accountant turns into an
``(epsilon, delta)`` guarantee (``prox.tasks.dp_epsilon``).

Ghost clipping (Li, Tramer, Liang and Hashimoto 2022, "Large Language Models Can Be Strong Differentially
Private Learners"; norms as in Goodfellow 2015, "Efficient Per-Example Gradient Computations"). The sum of
clipped gradients needs only the per-example *norms*, not the per-example gradients:

1. one backward pass of ``sum_i l_i`` to the outputs of the tapped layers gives each layer's inputs
   ``x_i`` and output cotangents ``d_i``, and ``||g_i||^2 = sum_layers ||sum_t x_it d_it^T||^2 (+ bias)``
   without forming ``g_i`` (``prox.taps``); a layer applied several times (weight tying) has its calls
   concatenated along ``t`` first, so the norm is that of the summed gradient;
2. a second backward pass of ``sum_i c_i l_i`` with the constants ``c_i = min(1, C / ||g_i||)`` gives
   ``sum_i c_i g_i``, the sum of clipped gradients.

:func:`dp_gradient` does both (``method="ghost"``) or the reference ``vmap(grad)`` form
(``method="vmap"``: ``m`` per-example gradients, clipped and summed by optax's
``per_example_global_norm_clip``, as ``optax.contrib.dpsgd`` does). For ``prox.step`` (which owns the backward pass),
:func:`ghost_clipped_loss` turns a per-example loss into one whose gradient is the mean clipped
gradient (pass 1 inside the loss, the step's own backward is pass 2), and :func:`dp_noise` adds the
noise ``sigma C xi / B`` to the step's mean gradient as an optax transform.

Requirements of the ghost method: every parameter is in a tapped layer (``nnx.Linear``/``nnx.Conv`` of a
``prox.models.functional`` model; checked) and examples do not interact (no batch statistics).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from prox import taps as taps_lib

PyTree = Any
LossPerExample = Callable[[PyTree, PyTree], jax.Array]   # (params, batch) -> [m] losses

METHODS = ("ghost", "vmap")


class ClippedGrad(NamedTuple):
  """The sum of clipped per-example gradients and what was measured on the way.

  Attributes:
    grad_sum: ``sum_i min(1, C / ||g_i||) g_i``, a tree like the params.
    losses: ``[m]`` per-example losses.
    norms: ``[m]`` per-example gradient norms ``||g_i||`` (before clipping).
    scale: ``[m]`` the factors ``min(1, C / ||g_i||)``.
  """
  grad_sum: PyTree
  losses: jax.Array
  norms: jax.Array
  scale: jax.Array


def _check_clip(clip: Any) -> None:
  if isinstance(clip, (int, float)) and not (clip > 0 and math.isfinite(clip)):
    raise ValueError(f"clip must be a positive finite number, got {clip!r}")


def _check_noise(noise_multiplier: Any) -> None:
  if isinstance(noise_multiplier, (int, float)) and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
    raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def clip_factors(norms: jax.Array, clip: Any) -> jax.Array:
  """``min(1, C / ||g_i||)`` (1 for a zero gradient)."""
  norms = jnp.asarray(norms)
  return jnp.where(norms > 0, jnp.minimum(1.0, clip / jnp.where(norms > 0, norms, 1.0)), 1.0)


def per_example_grad_norms(loss_per_example_fn: LossPerExample, params: PyTree, batch: PyTree, *,
                           axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """``(losses [m], ||g_i|| [m])`` from one backward pass to the tapped layers' outputs (pass 1).

  ``loss_per_example_fn(params, batch)`` must run a tapped model (``prox.models.functional``) and return
  one loss per example. ``axis_name``: the data axis when called inside a ``shard_map`` (the zero
  perturbations are made per-device values, see ``prox.step``).
  """
  discovery = taps_lib.Recorder()
  with taps_lib.recording(discovery):
    out = jax.eval_shape(lambda p, b: loss_per_example_fn(p, b), params, batch)
  if not discovery.taps:
    raise ValueError("ghost clipping needs a model whose layers are tapped (prox.models.functional taps "
                     "nnx.Linear and nnx.Conv); the loss called none")
  if len(out.shape) != 1:
    raise ValueError(f"loss_per_example_fn must return one loss per example ([m]), got shape {out.shape}")
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  covered = taps_lib.covered_size(discovery.taps)
  if covered != total:
    raise ValueError(f"the tapped layers cover {covered} of the {total} parameters; DP clipping needs every "
                     "parameter's per-example gradient (use method='vmap' for other layers)")
  meta = [t._replace(inputs=None) for t in discovery.taps]

  def fun(perturbations):
    rec = taps_lib.Recorder(perturbations)
    with taps_lib.recording(rec):
      losses = loss_per_example_fn(params, batch)
    return jnp.sum(losses), (losses, [t.inputs for t in rec.taps])

  zeros = [jnp.zeros(shape, dtype) for shape, dtype in discovery.output_shapes]
  if axis_name is not None:
    zeros = [lax.pcast(z, (axis_name,), to="varying") for z in zeros]
  (_, (losses, inputs)), deltas = jax.value_and_grad(fun, has_aux=True)(zeros)
  tapped = [t._replace(inputs=x) for t, x in zip(meta, inputs)]
  sq = taps_lib.sq_norms(tapped, deltas)      # deltas of the sum: d_i = dl_i / dy_i, no rescaling
  return losses, jnp.sqrt(jnp.maximum(sq, 0.0))


def clipped_grad_sum(loss_per_example_fn: LossPerExample, params: PyTree, batch: PyTree, clip: Any, *,
                     method: str = "ghost", axis_name: str | None = None) -> ClippedGrad:
  """``sum_i min(1, C / ||g_i||) g_i`` by ghost clipping (two backward passes) or by ``vmap(grad)``."""
  _check_clip(clip)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "vmap":
    def one(example):
      ex = jax.tree.map(lambda a: a[None], example)
      return jax.value_and_grad(lambda p: loss_per_example_fn(p, ex)[0])(params)

    losses, grads = jax.vmap(one)(batch)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1).astype(jnp.promote_types(g.dtype, jnp.float32)) ** 2, 1)
                         for g in jax.tree.leaves(grads)))
    leaves, treedef = jax.tree.flatten(grads)
    clipped, _ = optax.per_example_global_norm_clip(leaves, clip)     # optax's clip-and-sum
    return ClippedGrad(grad_sum=jax.tree.unflatten(treedef, clipped), losses=losses, norms=norms,
                       scale=clip_factors(norms, clip))
  losses, norms = per_example_grad_norms(loss_per_example_fn, params, batch, axis_name=axis_name)
  scale = lax.stop_gradient(clip_factors(norms, clip))
  grad_sum = jax.grad(lambda p: jnp.sum(scale * loss_per_example_fn(p, batch)))(params)
  return ClippedGrad(grad_sum=grad_sum, losses=losses, norms=norms, scale=scale)


def gaussian_noise(key: jax.Array, like: PyTree, std: Any) -> PyTree:
  """``std * N(0, I)`` in the shape and dtype of the tree ``like`` (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def dp_gradient(loss_per_example_fn: LossPerExample, params: PyTree, batch: PyTree, clip: Any,
                key: jax.Array | None, noise_multiplier: Any, *, method: str = "ghost",
                axis_name: str | None = None) -> PyTree:
  """The noised mean clipped gradient ``(sum_i min(1, C/||g_i||) g_i + sigma C xi) / m`` (module docstring).

  Args:
    loss_per_example_fn: ``(params, batch) -> [m]`` per-example losses (a tapped model for ``"ghost"``).
    params: the parameters.
    batch: a pytree of ``[m, ...]`` arrays.
    clip: ``C`` (> 0).
    key: the noise key (``None`` only with ``noise_multiplier = 0``).
    noise_multiplier: ``sigma`` (>= 0).
    method: ``"ghost"`` (two backward passes, no per-example gradients) or ``"vmap"``.
    axis_name: the data axis inside a ``shard_map`` (see :func:`per_example_grad_norms`).

  Returns:
    A tree like ``params``.
  """
  _check_noise(noise_multiplier)
  out = clipped_grad_sum(loss_per_example_fn, params, batch, clip, method=method, axis_name=axis_name)
  m = out.losses.shape[0]
  if key is None:
    if isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0:
      return jax.tree.map(lambda g: g / m, out.grad_sum)
    raise ValueError("dp_gradient needs a key when noise_multiplier > 0")
  noise = gaussian_noise(key, out.grad_sum, noise_multiplier * clip)
  return jax.tree.map(lambda g, n: (g + n) / m, out.grad_sum, noise)


def ghost_clipped_loss(loss_per_example_fn: LossPerExample, clip: Any, *,
                       axis_name: str | None = None) -> Callable[[PyTree, PyTree], tuple[jax.Array, dict]]:
  """A loss whose gradient is the mean clipped gradient of its batch, for a step that differentiates.

  ``loss(params, batch) -> (mean_i c_i l_i, metrics)`` with ``c_i = min(1, C / ||g_i||)`` computed by
  pass 1 inside and held constant, so the caller's ``grad`` is pass 2: ``1/m sum_i c_i g_i``. The
  metrics hold the plain mean loss (``"loss_unclipped"``), the mean norm and the clipped fraction.
  Inside ``prox.step`` pass ``axis_name=prox.step.DATA_AXIS`` and adapt it with ``prox.step.stateless``;
  add the noise after the reduction with :func:`dp_noise`.
  """
  _check_clip(clip)

  def loss(params: PyTree, batch: PyTree) -> tuple[jax.Array, dict]:
    losses, norms = per_example_grad_norms(loss_per_example_fn, lax.stop_gradient(params), batch,
                                           axis_name=axis_name)
    scale = lax.stop_gradient(clip_factors(norms, clip))
    value = jnp.mean(scale * loss_per_example_fn(params, batch))
    metrics = {"loss_unclipped": jnp.mean(losses), "grad_norm_mean": jnp.mean(norms),
               "clipped_fraction": jnp.mean((scale < 1.0).astype(jnp.float32))}
    return value, metrics

  return loss


class DPNoiseState(NamedTuple):
  """State of :func:`dp_noise`: the uint32 key data of the next draw."""
  key: jax.Array


def dp_noise(clip: float, noise_multiplier: float, batch_size: int, key: jax.Array | int = 0
             ) -> optax.GradientTransformation:
  """Adds ``sigma C xi / B`` (``xi ~ N(0, I)``, a new draw each update) to a mean clipped gradient.

  Put it first in the chain after a loss from :func:`ghost_clipped_loss`: the two together are DP-SGD's
  ``g_bar`` for batches of ``B = batch_size`` examples.
  """
  _check_clip(clip)
  _check_noise(noise_multiplier)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  std = noise_multiplier * clip / batch_size

  def init(params):
    del params
    k = jax.random.key(key) if isinstance(key, int) else key
    return DPNoiseState(key=jax.random.key_data(k))

  def update(updates, state, params=None):
    del params
    k, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    noised = jax.tree.map(lambda g, n: g + n, updates, gaussian_noise(sub, updates, std))
    return noised, DPNoiseState(key=jax.random.key_data(k))

  return optax.GradientTransformation(init, update)
