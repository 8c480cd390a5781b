"""NoProp-DT in Flax NNX: ``T`` denoising blocks with stacked parameters, a class-embedding matrix and a head.

The rule (objective, schedule, inference) is in ``prox.losses`` (``noprop_loss``, ``noprop_infer``, Li, Teh
and Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation or Forward-propagation");
this module is one model it trains. Block ``t`` (0-based) computes::

    f_x = relu(W_x2 relu(W_x1 flatten(x)))            its own image path
    f_z = relu(W_z z)                                  its own latent path
    o   = W_o relu(W_f [f_x, f_z])                     class scores
    u_hat = softmax(o) U      (output="mixture")   or   u_hat = o' = W_u relu(W_f [f_x, f_z])  (output="direct")

with ``U`` ``[C, d]`` the class embeddings (learned, initialised to the one-hot rows when ``d = C``) and a
linear head ``logits = W_out z_T``. The ``T`` blocks share one architecture and have their parameters
stacked on a leading axis, so ``denoise(t, z, x)`` with a *traced* ``t``
slices block ``t``'s parameters: one compiled step serves every block, and the gradient of block ``t``'s
loss is zero on every other slice.

    model = NoPropDT((8, 8, 1), 10, num_blocks=10, rngs=nnx.Rngs(0))
    terms = model.loss(x, y, key, block=t)            # t ~ U{0..T-1} each step: one block trained alone
    logits = model(x)                                 # the chain, noise-free

The gradient of a step is local to block ``t``; an optimizer with memory shared by all blocks (Adam's
moments, weight decay) still moves the other blocks on their old momentum. That is how the tests and the
benchmark train; to keep the other blocks exactly still, zero their updates (e.g. multiply the update of
``blocks`` by a one-hot of ``t`` along the leading axis) or give each block its own optimizer state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prox.losses import _noprop as noprop_lib

OUTPUTS = ("mixture", "direct")


class DenoiseBlock(nnx.Module):
  """One NoProp block ``(z, x) -> u_hat`` before the mixture (see the module docstring)."""

  def __init__(self, n_in: int, dim: int, num_classes: int, hidden: int, output: str, *, rngs: nnx.Rngs):
    self.image1 = nnx.Linear(n_in, hidden, rngs=rngs)
    self.image2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.latent = nnx.Linear(dim, hidden, rngs=rngs)
    self.fuse = nnx.Linear(2 * hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes if output == "mixture" else dim, rngs=rngs)

  def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
    fx = jax.nn.relu(self.image2(jax.nn.relu(self.image1(x))))
    fz = jax.nn.relu(self.latent(z))
    return self.out(jax.nn.relu(self.fuse(jnp.concatenate([fx, fz], -1))))


class NoPropDT(nnx.Module):
  """A NoProp-DT classifier (see the module docstring).

  Args:
    input_shape: one input's shape (flattened).
    num_classes: ``C``.
    num_blocks: ``T``.
    dim: the embedding size ``d`` (default ``C``).
    hidden: the blocks' width.
    output: ``"mixture"`` (``u_hat = softmax(o) U``) or ``"direct"``.
    learn_embeddings: train ``U`` (else it stays at its initial value).
    rngs: ``nnx.Rngs``.
  """

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, num_blocks: int = 10,
               dim: int | None = None, hidden: int = 128, output: str = "mixture",
               learn_embeddings: bool = True, s: float = 0.008, rngs: nnx.Rngs):
    for name, v in (("num_classes", num_classes), ("num_blocks", num_blocks), ("hidden", hidden)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"NoPropDT: {name} must be a positive int, got {v!r}")
    if output not in OUTPUTS:
      raise ValueError(f"NoPropDT: output must be one of {OUTPUTS}, got {output!r}")
    dim = int(num_classes if dim is None else dim)
    if dim < 1:
      raise ValueError(f"NoPropDT: dim must be >= 1, got {dim!r}")
    n_in = int(np.prod(input_shape))
    self.num_blocks, self.dim, self.output = int(num_blocks), dim, output
    self.schedule = nnx.data(noprop_lib.noprop_schedule(self.num_blocks, s=s))

    blocks = [DenoiseBlock(n_in, dim, num_classes, hidden, output, rngs=rngs) for _ in range(self.num_blocks)]
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])
    self.blocks = nnx.merge(graphdef, stacked)     # one DenoiseBlock whose parameters have a leading T axis
    if dim == num_classes:
      init = jnp.eye(num_classes, dtype=jnp.float32)
    else:
      init = jax.random.normal(rngs.params(), (num_classes, dim), jnp.float32) / np.sqrt(dim)
    self.embeddings = (nnx.Param if learn_embeddings else nnx.Variable)(init)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def denoise(self, block: Any, z: jax.Array, x: jax.Array) -> jax.Array:
    """``u_hat`` ``[m, d]`` of block ``block`` (a traced int in ``[0, T)``)."""
    graphdef, state = nnx.split(self.blocks)
    t = jnp.asarray(block, jnp.int32)
    one = nnx.merge(graphdef, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False), state))
    o = one(z, x.reshape(x.shape[0], -1))
    if self.output == "mixture":
      return jax.nn.softmax(o.astype(jnp.float32), -1) @ self.embeddings[...]
    return o

  def classify(self, z: jax.Array) -> jax.Array:
    """``logits = W_out z_T + b``."""
    return self.head(z).astype(jnp.float32)

  def loss(self, x: jax.Array, labels: jax.Array, key: jax.Array, *, block: Any = None,
           eta: float = 1.0) -> noprop_lib.NoPropTerms:
    """``prox.losses.noprop_loss`` of this model (per example)."""
    return noprop_lib.noprop_loss(self.denoise, self.classify, self.embeddings[...], x, labels, key,
                                  self.schedule, block=block, eta=eta)

  def __call__(self, x: jax.Array, key: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    """The chain's logits ``[m, C]`` (``key=None``: noise-free; ``prox.models.functional`` passes ``train``)."""
    del train
    return noprop_lib.noprop_infer(self.denoise, self.classify, x, self.schedule, dim=self.dim, key=key)
