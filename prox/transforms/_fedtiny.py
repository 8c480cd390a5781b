"""FedTiny's pieces as pure functions, with clients as a (vmapped) leading axis.

Huang, Zhang, Sun, Fang, Yuan, Wu 2023, "Distributed Pruning Towards Tiny Neural Networks in Federated
Learning" (FedTiny). Two modules:

1. Adaptive batch-norm selection of a coarse pruned model. The server holds ``K`` candidate masks of the
   target density (e.g. magnitude masks with different per-layer densities:
   :func:`random_layer_densities`, :func:`magnitude_masks`). Each client ``i`` recalibrates the batch-norm
   statistics of every candidate on its own data (``stats_fn``: per-channel first and second moments),
   the server averages them, ``S_k = sum_i w_i S_ik`` (``w_i`` proportional to the clients' sample counts),
   each client evaluates candidate ``k`` with ``S_k`` on its data, and the server picks
   ``k* = argmin_k sum_i w_i L_ik`` (:func:`adaptive_bn_selection`). Recalibrating the statistics first
   removes the bias a pruned model's stale statistics would put into the comparison, and averaging them
   over clients removes the bias of any one client's data.
2. Progressive layer-wise pruning with memory-bounded gradients. In a round, one layer is adjusted. Each
   client keeps only the ``K`` largest accumulated gradients of the layer's *pruned* weights
   (:func:`topk_accumulate`, an ``O(K)`` buffer updated at every local step: existing entries add the
   new gradient, the new step's top-``K`` pruned entries compete, the ``K`` largest ``|sum|`` stay). The
   server sums the clients' buffers (weighted) into ``G``, grows the ``n_t`` pruned weights of largest
   ``|G|`` and prunes the ``n_t`` active weights of smallest ``|w|`` (grown ones excepted), so the density
   is unchanged (:func:`grow_and_prune`); ``n_t = floor(alpha/2 (1 + cos(pi t / T)) * n_active)``
   (:func:`adjust_count`, the cosine decay of RigL). Grown weights start at 0.

Only jax/numpy are imported.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

__all__ = [
    "TopKBuffer",
    "adaptive_bn_selection",
    "adjust_count",
    "grow_and_prune",
    "magnitude_masks",
    "random_layer_densities",
    "topk_accumulate",
    "topk_init",
]


# ----------------------------------------------------------------------------------------------------
# Coarse candidates and adaptive BN selection
# ----------------------------------------------------------------------------------------------------


def random_layer_densities(key: jax.Array, sizes: Sequence[int], density: float, num: int, *,
                           spread: float = 0.5, iterations: int = 20) -> np.ndarray:
  """``[num, L]`` per-layer densities whose size-weighted mean is ``density`` (host side, numpy).

  Row ``k`` is ``d_l = clip(c_k density exp(spread z_kl), 1/n_l, 1)`` with ``z ~ N(0, 1)`` and ``c_k``
  solved (fixed-point iterations) so that ``sum_l d_l n_l = density sum_l n_l``. Row 0 is uniform.
  """
  if not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
    raise ValueError(f"random_layer_densities: density must lie in (0, 1], got {density!r}")
  if not isinstance(num, numbers.Integral) or num < 1:
    raise ValueError(f"random_layer_densities: num must be an int >= 1, got {num!r}")
  n = np.asarray(sizes, np.float64)
  z = np.asarray(jax.random.normal(key, (num, n.size)), np.float64)
  z[0] = 0.0
  raw = density * np.exp(spread * z)
  low = 1.0 / n
  out = np.empty_like(raw)
  for k in range(num):
    c = 1.0
    for _ in range(iterations):
      d = np.clip(c * raw[k], low, 1.0)
      c *= density * n.sum() / max((d * n).sum(), 1e-12)
    out[k] = np.clip(c * raw[k], low, 1.0)
  return out


def magnitude_masks(params: PyTree, densities: jax.Array) -> PyTree:
  """Masks keeping the ``round(d_l n_l)`` largest ``|w|`` of each leaf ``l`` (``densities``: ``[L]``
  in leaf order; vmap over a leading axis for several candidates)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, w in enumerate(leaves):
    k = jnp.round(densities[i] * w.size).astype(jnp.int32)
    order = jnp.argsort(-jnp.abs(w.reshape(-1)), stable=True)
    rank = jnp.zeros(w.size, jnp.int32).at[order].set(jnp.arange(w.size, dtype=jnp.int32))
    out.append((rank < k).reshape(w.shape))
  return jax.tree.unflatten(treedef, out)


def _weights(client_weights: Any, num_clients: int) -> jax.Array:
  if client_weights is None:
    return jnp.full([num_clients], 1.0 / num_clients, jnp.float32)
  w = jnp.asarray(client_weights, jnp.float32)
  return w / jnp.sum(w)


def adaptive_bn_selection(
    params: PyTree,
    candidate_masks: PyTree,
    client_x: jax.Array,
    client_y: jax.Array,
    *,
    stats_fn: Callable[[PyTree, jax.Array], PyTree],
    loss_fn: Callable[[PyTree, PyTree, jax.Array, jax.Array], jax.Array],
    client_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, PyTree]:
  """FedTiny's adaptive batch-norm selection among ``K`` candidate masks (clients vmapped).

  Args:
    params: the dense model parameters.
    candidate_masks: masks like ``params`` with a leading ``[K]`` axis (bool), e.g. ``vmap(magnitude_masks)``.
    client_x, client_y: ``[N, B, ...]`` / ``[N, B]`` one local batch per client.
    stats_fn: ``(masked_params, x) -> stats``, the recalibrated batch-norm sufficient statistics (e.g.
      per-channel ``E[h]`` and ``E[h^2]``), which average linearly over clients.
    loss_fn: ``(masked_params, stats, x, y) -> scalar`` the loss with the given statistics.
    client_weights: ``[N]`` (e.g. sample counts); uniform if ``None``.

  Returns:
    ``(k*, losses [K], stats [K, ...])``: the chosen index, the weighted client losses and the averaged
    statistics of every candidate.
  """
  n = client_x.shape[0]
  w = _weights(client_weights, n)

  def candidate(mask):
    masked = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)
    per_client = jax.vmap(stats_fn, in_axes=(None, 0))(masked, client_x)
    stats = jax.tree.map(lambda s: jnp.tensordot(w, s, axes=1), per_client)
    losses = jax.vmap(loss_fn, in_axes=(None, None, 0, 0))(masked, stats, client_x, client_y)
    return jnp.dot(w, losses), stats

  losses, stats = lax.map(candidate, candidate_masks)
  return jnp.argmin(losses).astype(jnp.int32), losses, stats


# ----------------------------------------------------------------------------------------------------
# Progressive pruning with memory-bounded top-K gradients
# ----------------------------------------------------------------------------------------------------


class TopKBuffer(NamedTuple):
  """``K`` accumulated gradients of pruned weights: flat ``index`` (int32, ``-1`` = empty) and ``value``."""
  index: jax.Array
  value: jax.Array


def topk_init(k: int) -> TopKBuffer:
  """An empty buffer of ``k`` entries."""
  if not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"topk_init: k must be an int >= 1, got {k!r}")
  return TopKBuffer(jnp.full([k], -1, jnp.int32), jnp.zeros([k], jnp.float32))


def topk_accumulate(buffer: TopKBuffer, grad: jax.Array, mask: jax.Array) -> TopKBuffer:
  """Adds one local step's gradient of a layer to the buffer, keeping the ``K`` largest ``|sum|``.

  Entries already in the buffer add ``g[index]``; the step's ``K`` largest ``|g|`` among the other
  pruned (``~mask``) positions enter with ``g``; the ``K`` largest ``|value|`` of the ``2K`` survive.
  Memory ``O(K)`` beyond the gradient itself. Vmap over clients.
  """
  g = grad.reshape(-1).astype(jnp.float32)
  pruned = ~mask.reshape(-1)
  k = buffer.index.shape[0]
  valid = buffer.index >= 0
  safe = jnp.where(valid, buffer.index, 0)
  old = jnp.where(valid, buffer.value + g[safe], 0.0)
  score = jnp.where(pruned, jnp.abs(g), -1.0)
  score = score.at[jnp.where(valid, buffer.index, g.size)].set(-1.0, mode="drop")
  new_score, new_index = lax.top_k(score, min(k, g.size))
  new_valid = new_score >= 0.0
  index = jnp.concatenate([jnp.where(valid, buffer.index, -1), jnp.where(new_valid, new_index, -1)])
  value = jnp.concatenate([old, jnp.where(new_valid, g[new_index], 0.0)])
  rank_key = jnp.where(index >= 0, jnp.abs(value), -1.0)
  _, keep = lax.top_k(rank_key, k)
  return TopKBuffer(index[keep].astype(jnp.int32), value[keep])


def adjust_count(round_index: jax.Array, *, alpha: float, end_round: int, num_active: jax.Array) -> jax.Array:
  """``n_t = floor(alpha/2 (1 + cos(pi t / T)) n_active)`` for ``t < T``, else 0 (int32)."""
  if not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"adjust_count: alpha must lie in [0, 1], got {alpha!r}")
  if not isinstance(end_round, numbers.Integral) or end_round < 1:
    raise ValueError(f"adjust_count: end_round must be an int >= 1, got {end_round!r}")
  t = jnp.asarray(round_index, jnp.float32)
  frac = alpha / 2.0 * (1.0 + jnp.cos(math.pi * t / end_round))
  # + 1e-3: a product that is an integer in exact arithmetic is not floored one below by float32 rounding.
  n = jnp.floor(frac * jnp.asarray(num_active, jnp.float32) + 1e-3).astype(jnp.int32)
  return jnp.where(t < end_round, n, 0)


def grow_and_prune(weights: jax.Array, mask: jax.Array, client_buffers: TopKBuffer, count: jax.Array, *,
                   client_weights: jax.Array | None = None) -> jax.Array:
  """The server's step for one layer: grow ``count`` pruned weights of largest aggregated ``|G|``, prune
  ``count`` active weights of smallest ``|w|`` (not the grown ones). Returns the new bool mask.

  ``client_buffers`` has a leading client axis ``[N, K]``. ``G = sum_i w_i scatter(buffer_i)``. Positions
  with ``G = 0`` are never grown, and at most as many are pruned as grown, so the density never rises.
  """
  shape = mask.shape
  flat_mask = mask.reshape(-1)
  size = flat_mask.size
  n = client_buffers.index.shape[0]
  w = _weights(client_weights, n)
  idx = client_buffers.index.reshape(-1)
  val = (client_buffers.value * w[:, None]).reshape(-1)
  g = jnp.zeros([size], jnp.float32).at[jnp.where(idx >= 0, idx, size)].add(val, mode="drop")
  count = jnp.asarray(count, jnp.int32)
  # Grow: the `count` largest |G| among pruned positions with G != 0.
  grow_score = jnp.where(~flat_mask & (g != 0.0), jnp.abs(g), -1.0)
  order = jnp.argsort(-grow_score, stable=True)
  rank = jnp.zeros([size], jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
  grown = (rank < count) & (grow_score >= 0.0)
  n_grown = jnp.sum(grown).astype(jnp.int32)
  # Prune: the n_grown smallest |w| among the previously active positions.
  prune_score = jnp.where(flat_mask, jnp.abs(weights.reshape(-1)).astype(jnp.float32), jnp.inf)
  order = jnp.argsort(prune_score, stable=True)
  rank = jnp.zeros([size], jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
  pruned = (rank < n_grown) & flat_mask
  return ((flat_mask & ~pruned) | grown).reshape(shape)
