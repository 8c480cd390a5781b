"""SinkGD: a stateless optimizer that Sinkhorn-normalises each 2-D gradient (Scetbon et al. 2025).

For a gradient ``G`` of shape ``(m, n)``, repeat ``L`` times (``L = 5`` by default):

    G <- sqrt(n) * G / ||G_i,:||      (every row gets l2 norm sqrt(n))
    G <- sqrt(m) * G / ||G_:,j||      (every column gets l2 norm sqrt(m))

then ``w <- w - lr * G``. There is no optimizer state: memory is that of SGD. SinkGD is defined
for matrices only; use :func:`sinkgd_for_matrices` (an ``optax.partition`` recipe) to send 2-D
leaves to SinkGD and the rest (biases, norms, convolution kernels) to another transform.

Learning-rate scale. The last pass gives every non-zero column the norm ``sqrt(m)``, so whatever the
gradient's scale and ``L``,

    ||SR^L(G)||_F^2 = m * n      (m * #non-zero columns),   i.e.   RMS_ij SR^L(G)_ij = 1,

and a matrix of +-1 entries is a fixed point: SinkGD's step has the per-entry size of signSGD's, ``lr``
(slightly less where ReLU units give zero columns). Adam's step is ``lr * mhat / (sqrt(vhat) + eps)``:
``+-lr`` at the first step; for a stationary gradient entry with mean ``mu`` and noise ``sigma`` its RMS is
about ``lr * sqrt((mu^2 + sigma^2 (1 - b1) / (1 + b1)) / (mu^2 + sigma^2))``, between ``0.23 lr`` (pure
noise, ``b1 = 0.9``) and ``lr``; and lower still while the gradients shrink during training, because
``vhat`` (memory ``1 / (1 - b2) = 1000`` steps) still holds the larger early gradients. So at the same
learning rate SinkGD's step equals Adam's first step and is several times larger than Adam's later ones;
the SinkGD learning rate comparable to Adam's ``lr`` is ``rho * lr``, ``rho`` the RMS of Adam's normalised
step, which :func:`matching_learning_rate` measures on your own updates.

Measured (MLP 64-128-128-10 on the embedded digits, batch 32, 500 steps, 3 seeds; SinkGD on the kernels,
Adam 1e-3 on the biases; ``examples/flax_mnist/sinkgd_learning_rate.py``): Adam(1e-3)'s ``rho`` is 0.94 /
0.51 / 0.19 / 0.10 at steps 1 / 10 / 100 / 500. Final training loss (test accuracy): Adam 1e-3 0.018
(97.6%); SinkGD 1e-4 0.194 (94.9%), 3e-4 0.058 (97.3%), 1e-3 0.032 (97.3%), 3e-3 diverged (NaN). Take
SinkGD's learning rate between ``rho * lr_adam`` and ``lr_adam``; not above it.

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


def update_rms(updates: Any, *, matrices_only: bool = True) -> jax.Array:
  """The per-entry RMS of a step, ``sqrt(sum_l ||U_l||_F^2 / sum_l size(U_l))``, over the 2-D leaves.

  ``matrices_only=False`` takes every leaf. Returns a float32 scalar (0 when there is no leaf).
  """
  leaves = [u for u in jax.tree.leaves(updates) if not matrices_only or np.ndim(u) == 2]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  total = sum(jnp.sum(jnp.square(jnp.asarray(u, jnp.float32))) for u in leaves)
  return jnp.sqrt(total / sum(int(np.size(u)) for u in leaves))


def matching_learning_rate(reference_updates: Any) -> jax.Array:
  """The SinkGD learning rate whose step has the per-entry size of ``reference_updates``.

  SinkGD's direction has per-entry RMS exactly 1 (module docstring), so a step of ``lr * SR^L(G)`` has RMS
  ``lr``, and the learning rate matching another optimizer's step ``U`` (its update, learning rate
  included, e.g. Adam's ``-lr * mhat / sqrt(vhat)``) on the 2-D leaves is ``RMS(U)``: :func:`update_rms`.
  Average it over some steps after the first (Adam's first step has RMS ``lr`` exactly)::

    updates, adam_state = adam.update(grads, adam_state, params)
    lr_sinkgd = matching_learning_rate(updates)     # 0.19 * Adam's lr at step 100 of the digits MLP
  """
  return update_rms(reference_updates, matrices_only=True)
