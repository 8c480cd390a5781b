"""SinkGD: a stateless optimizer that Sinkhorn-normalises each 2-D gradient (Scetbon et al. 2025).

For a gradient ``G`` of shape ``(m, n)``, repeat ``L`` times (``L = 5`` by default):

    G <- sqrt(n) * G / ||G_i,:||      (every row gets l2 norm sqrt(n))
    G <- sqrt(m) * G / ||G_:,j||      (every column gets l2 norm sqrt(m))

then ``w <- w - lr * G``. There is no optimizer state: memory is that of SGD. SinkGD is defined
for matrices only; use :func:`sinkgd_for_matrices` (an ``optax.partition`` recipe) to send 2-D
leaves to SinkGD and the rest (biases, norms, convolution kernels) to another transform.

Scetbon, Ma, Gong, Meeds 2025, "Gradient Multi-Normalization for Stateless and Scalable LLM
Training" (SinkGD). This file imports only jax, numpy and optax.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ScaleBySinkhornState(NamedTuple):
  """SinkGD keeps no state."""


def _check_matrices(tree: Any, where: str) -> None:
  """Raises a one-line ``ValueError`` naming the first leaf of ``tree`` that is not 2-D."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = np.shape(leaf)
    if len(shape) != 2:
      raise ValueError(
          f"{where}: SinkGD needs 2-D leaves, leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
          f"{tuple(shape)}; route other ranks elsewhere with prox.optim.sinkgd_for_matrices")


def _check_num_iters(num_iters: Any) -> None:
  if isinstance(num_iters, jax.core.Tracer):
    return
  if isinstance(num_iters, bool) or np.ndim(num_iters) != 0 or int(num_iters) != num_iters or num_iters < 1:
    raise ValueError(f"scale_by_sinkhorn: num_iters must be an integer >= 1, got {num_iters!r}")


def sinkhorn_normalize(g: jax.Array, num_iters: int | jax.Array = 5) -> jax.Array:
  """Alternating row / column normalisation of one ``(m, n)`` matrix (SinkGD's update direction).

  ``L`` times: ``G <- sqrt(n) G / ||row||``, then ``G <- sqrt(m) G / ||col||``.

  Every iterate is ``diag(sqrt(p)) G diag(sqrt(q))``, so the loop runs on the scaling vectors:
  with ``A = G * G`` (elementwise), ``p = n / (A q)`` and ``q = m / (A^T p)`` (starting from
  ``q = 1``) give exactly the row / column passes above, but each pass only reads ``A`` and writes
  two vectors; the matrix is scaled once at the end. ``G`` is first divided by ``max |G|`` (the
  map is scale invariant) so that ``A`` neither overflows nor underflows. Computed in float32
  (float64 for float64 input) and returned in the input dtype. A zero row or column stays zero.
  """
  m, n = g.shape
  dtype = jnp.result_type(jnp.float32, g.dtype)
  x = g.astype(dtype)
  peak = jnp.max(jnp.abs(x))
  x = x / jnp.where(peak > 0, peak, 1)
  a = jnp.square(x)

  def inverse(target, s):
    return jnp.where(s > 0, target / jnp.where(s > 0, s, 1), 0).astype(dtype)

  def body(_, pq):
    _, q = pq
    p = inverse(n, jnp.sum(a * q[None, :], axis=1))   # squared row scales: rows get norm sqrt(n)
    q = inverse(m, jnp.sum(a * p[:, None], axis=0))   # squared column scales: columns get sqrt(m)
    return p, q

  pq = (jnp.ones((m,), dtype), jnp.ones((n,), dtype))
  if isinstance(num_iters, int):  # static count: unrolled, so XLA fuses the passes
    for i in range(num_iters):
      pq = body(i, pq)
  else:
    pq = jax.lax.fori_loop(0, num_iters, body, pq)
  p, q = pq
  return (x * jnp.sqrt(p)[:, None] * jnp.sqrt(q)[None, :]).astype(g.dtype)


def scale_by_sinkhorn(num_iters: int = 5) -> optax.GradientTransformation:
  """Replaces each 2-D update by its Sinkhorn normalisation (rows to norm sqrt(n), columns sqrt(m)).

  ``u = SR^L(g)`` with ``SR(G) = C(R(G))``, ``R(G)_ij = sqrt(n) G_ij / ||G_i,:||``,
  ``C(G)_ij = sqrt(m) G_ij / ||G_:,j||`` (Scetbon et al. 2025). Stateless.

  Args:
    num_iters: ``L >= 1``, the number of row-then-column passes (5 in the paper). May be injected
      with ``optax.inject_hyperparams`` (a traced count runs as a ``fori_loop``).

  Returns:
    An ``optax.GradientTransformation``; ``init`` and ``update`` raise ``ValueError`` naming the
    leaf path and shape of any leaf that is not 2-D.
  """
  _check_num_iters(num_iters)
  if not isinstance(num_iters, jax.core.Tracer) and not isinstance(num_iters, jax.Array):
    num_iters = int(num_iters)

  def init_fn(params):
    _check_matrices(params, "scale_by_sinkhorn")
    return ScaleBySinkhornState()

  def update_fn(updates, state, params=None):
    del params
    _check_matrices(updates, "scale_by_sinkhorn")
    return jax.tree.map(lambda g: sinkhorn_normalize(g, num_iters), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def sinkgd(learning_rate: optax.ScalarOrSchedule, num_iters: int = 5) -> optax.GradientTransformation:
  """SinkGD: ``w <- w - lr * SR^L(g)`` for 2-D weights (Scetbon et al. 2025); no state.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    num_iters: ``L``, the number of row/column normalisation passes.

  Returns:
    ``optax.chain(scale_by_sinkhorn(num_iters), optax.scale_by_learning_rate(learning_rate))``.
  """
  return optax.chain(scale_by_sinkhorn(num_iters), optax.scale_by_learning_rate(learning_rate))


def matrix_labels(params: Any) -> Any:
  """Labels each leaf ``"sinkgd"`` if it is 2-D, else ``"other"`` (for ``optax.partition``)."""
  return jax.tree.map(lambda p: "sinkgd" if np.ndim(p) == 2 else "other", params)


def sinkgd_for_matrices(
    learning_rate: optax.ScalarOrSchedule,
    num_iters: int = 5,
    other: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SinkGD on the 2-D leaves, ``other`` (default ``optax.adam(learning_rate)``) on the rest.

  The recipe, for your own labels::

      optax.partition({"sinkgd": sinkgd(lr), "other": optax.adam(lr)}, matrix_labels)

  Only the ``other`` leaves carry optimizer state. Note that every 2-D leaf is sent to SinkGD,
  including embeddings and the classifier; pass your own labels to ``optax.partition`` to change
  that, and reshape convolution kernels to 2-D yourself if you want SinkGD on them.

  Args:
    learning_rate: learning rate of SinkGD (and of the default ``other``).
    num_iters: ``L`` of SinkGD.
    other: the transform for leaves that are not 2-D.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if other is None:
    other = optax.adam(learning_rate)
  return optax.partition({"sinkgd": sinkgd(learning_rate, num_iters), "other": other}, matrix_labels)
