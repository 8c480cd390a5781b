"""A recurrent hypernetwork that generates a target network's weights from a task embedding (Chandra,
Varshney, Srijith & Gupta 2023, "Continual Learning with Dependency Preserving Hypernetworks").

A hypernetwork ``h(e_t; Theta)`` maps a learned task embedding ``e_t`` to all the weights ``theta_t`` of a
target network; continual learning then protects the *outputs* of ``h`` for the old embeddings
(``prox.losses.hypernet_output_regularizer``, after von Oswald et al. 2020). Chunked hypernetworks generate
the weights in chunks independently; Chandra et al. generate them with a recurrent network, so each chunk
depends on the ones before it (the dependencies between layers are kept) at the same parameter cost. Here
an LSTM runs for ``K = ceil(P / chunk_size)`` steps, its input at every step the task embedding (and,
optionally, a learned embedding of the chunk), and a linear head turns each hidden state into the next
``chunk_size`` weights:

    (h_k, c_k) = LSTM([e_t, c_emb_k], (h_{k-1}, c_{k-1})),    theta_t[k chunk : (k + 1) chunk] = s (W h_k + b)

with the LSTM ``gates = x W_x + h W_h + b_g``, ``i, f, o = sigmoid(.)``, ``g = tanh(.)``, ``c_k = f c_{k-1} + i g``,
``h_k = o tanh(c_k)`` (``h_0 = c_0 = 0``; forget-gate bias initialised to 1), ``s = output_scale``. The first
``P`` generated numbers are split and reshaped into the target's parameter tree (leaf order of
``jax.tree.leaves``).

Use with prox's functional form::

  hnet = RecurrentHypernet(target_params, num_tasks=5, rngs=nnx.Rngs(0))
  fn = hypernet_functional(hnet)               # apply(params, task) -> target params; flat(params, tasks)
  logits = target_apply(fn.apply(params, task), x)

Departures: the paper's own importance-weighted regularisation and its network growth are not implemented;
the regulariser is von Oswald et al.'s output regulariser.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PyTree = Any


class RecurrentHypernet(nnx.Module):
  """LSTM hypernetwork: ``hnet(task) -> target parameter tree`` (see the module docstring)."""

  def __init__(self, target: PyTree, *, num_tasks: int, embedding_dim: int = 32, hidden_dim: int = 64,
               chunk_size: int = 256, chunk_embedding_dim: int = 0, output_scale: float = 1.0,
               rngs: nnx.Rngs):
    leaves, treedef = jax.tree.flatten(target)
    if not leaves:
      raise ValueError("RecurrentHypernet: the target parameter tree is empty")
    for name, value, lo in (("num_tasks", num_tasks, 1), ("embedding_dim", embedding_dim, 1),
                            ("hidden_dim", hidden_dim, 1), ("chunk_size", chunk_size, 1),
                            ("chunk_embedding_dim", chunk_embedding_dim, 0)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"RecurrentHypernet: {name} must be an int >= {lo}, got {value!r}")
    if not np.isfinite(output_scale) or output_scale <= 0:
      raise ValueError(f"RecurrentHypernet: output_scale must be a finite number > 0, got {output_scale!r}")
    self.treedef = treedef
    self.shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
    self.dtypes = tuple(jnp.dtype(getattr(x, "dtype", jnp.float32)).name for x in leaves)
    self.num_outputs = int(sum(int(np.prod(s)) for s in self.shapes))
    self.chunk_size = int(chunk_size)
    self.num_chunks = -(-self.num_outputs // self.chunk_size)
    self.output_scale = float(output_scale)
    in_dim = embedding_dim + chunk_embedding_dim
    h = int(hidden_dim)
    # One normal draw carved into every initial value (each separate random call would compile its own
    # hash): embeddings N(0, 1); w_x, w_h, w_out LeCun-normal N(0, 1 / fan_in).
    sizes = (num_tasks * embedding_dim, self.num_chunks * chunk_embedding_dim, in_dim * 4 * h, h * 4 * h,
             h * self.chunk_size)
    z = jax.random.normal(rngs.params(), (sum(sizes),), jnp.result_type(float))   # float64 under x64
    e, ce, wx, wh, wo = jnp.split(z, np.cumsum(sizes)[:-1])
    self.task_embeddings = nnx.Param(e.reshape(num_tasks, embedding_dim))
    self.chunk_embeddings = (nnx.Param(ce.reshape(self.num_chunks, chunk_embedding_dim))
                             if chunk_embedding_dim else None)
    self.w_x = nnx.Param(wx.reshape(in_dim, 4 * h) / np.sqrt(in_dim))
    self.w_h = nnx.Param(wh.reshape(h, 4 * h) / np.sqrt(h))
    self.b_gates = nnx.Param(jnp.zeros((4 * h,)).at[h:2 * h].set(1.0))   # gate order i, f, g, o
    self.w_out = nnx.Param(wo.reshape(h, self.chunk_size) / np.sqrt(h))
    self.b_out = nnx.Param(jnp.zeros((self.chunk_size,)))

  def generate_flat(self, task: jax.Array, *, stop_embedding: bool = False) -> jax.Array:
    """The ``P`` generated numbers for ``task`` (an int scalar), float32 ``[P]``.

    ``stop_embedding=True`` blocks the gradient to the task embedding (the output regulariser protects the
    old tasks through ``Theta``, with their embeddings held fixed).
    """
    e = jnp.take(self.task_embeddings[...], jnp.asarray(task, jnp.int32), axis=0)
    if stop_embedding:
      e = jax.lax.stop_gradient(e)
    inputs = jnp.broadcast_to(e, (self.num_chunks, e.shape[0]))
    if self.chunk_embeddings is not None:
      inputs = jnp.concatenate([inputs, self.chunk_embeddings[...]], axis=1)
    w_x, w_h, b = self.w_x[...], self.w_h[...], self.b_gates[...]
    hdim = w_h.shape[0]

    def cell(carry, x):
      h, c = carry
      gates = x @ w_x + h @ w_h + b
      i, f, g, o = (gates[k * hdim:(k + 1) * hdim] for k in range(4))
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((hdim,), inputs.dtype)
    _, hs = jax.lax.scan(cell, (zeros, zeros), inputs)                   # [K, H]
    chunks = self.output_scale * (hs @ self.w_out[...] + self.b_out[...])  # [K, chunk]
    return chunks.reshape(-1)[: self.num_outputs]

  def unflatten(self, flat: jax.Array) -> PyTree:
    """Splits ``P`` numbers into the target's parameter tree."""
    out, start = [], 0
    for shape, dtype in zip(self.shapes, self.dtypes):
      n = int(np.prod(shape))
      out.append(flat[start:start + n].reshape(shape).astype(dtype))
      start += n
    return jax.tree.unflatten(self.treedef, out)

  def __call__(self, task: jax.Array, *, stop_embedding: bool = False) -> PyTree:
    return self.unflatten(self.generate_flat(task, stop_embedding=stop_embedding))


class HypernetFunctional(NamedTuple):
  """A hypernetwork as pure functions of its parameter pytree.

  Attributes:
    apply: ``apply(params, task, *, stop_embedding=False) -> target params``.
    flat: ``flat(params, tasks [T], *, stop_embedding=False) -> [T, P]`` float32, the generated numbers of
      several tasks (vmapped), for ``prox.losses.hypernet_output_regularizer``.
    params: the hypernetwork's parameters (a plain nested dict).
  """
  apply: Callable[..., PyTree]
  flat: Callable[..., jax.Array]
  params: PyTree


def hypernet_functional(model: RecurrentHypernet) -> HypernetFunctional:
  """Splits a :class:`RecurrentHypernet` into pure ``apply`` / ``flat`` functions and its parameters."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def module(p):
    return nnx.merge(graphdef, p, rest)

  def apply(p: PyTree, task: jax.Array, *, stop_embedding: bool = False) -> PyTree:
    return module(p)(task, stop_embedding=stop_embedding)

  def flat(p: PyTree, tasks: jax.Array, *, stop_embedding: bool = False) -> jax.Array:
    m = module(p)
    return jax.vmap(lambda t: m.generate_flat(t, stop_embedding=stop_embedding))(jnp.asarray(tasks, jnp.int32))

  return HypernetFunctional(apply=apply, flat=flat, params=nnx.to_pure_dict(params))
