"""NoProp-DT: blocks trained alone to denoise a noisy class embedding, no end-to-end backpropagation.

NoProp (Li, Teh and Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation"), discrete-time variant. A network of ``T`` blocks maps noise ``z_0 ~ N(0, I)`` to a
representation ``z_T`` of the class, one block per step; block ``t`` predicts the label's embedding
``u_y`` (a row of the class-embedding matrix ``U``) from the input and the previous latent,
``u_hat_t(z_{t-1}, x)``. Training never chains the blocks: the latent a block sees is drawn from the
fixed noising process ("backward process" in the paper)::

    q(z_t | y) = N(z_t; sqrt(abar_t) u_y, (1 - abar_t) I),    abar_t = prod_{s=t}^{T} alpha_s,   t = 0..T

(``abar`` rises with ``t``: ``z_0`` is nearly pure noise, ``z_T`` nearly the embedding). The objective is the
negative ELBO (the paper's Eq. 8)::

    L = E_{q(z_T|y)}[-log softmax(f_out(z_T))_y] + KL(q(z_0|y) || N(0, I))
        + (T / 2) eta E_{t ~ U{1..T}} E_{q(z_{t-1}|y)} [ (SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2 ]

    SNR(t) = abar_t / (1 - abar_t)

so block ``t``'s term depends on its own parameters (and the shared ``U``) only: its gradient never
touches another block. :func:`noprop_loss` with ``block=t`` is the paper's one-block-per-step estimate
(draw ``t``, update block ``t``, the head and ``U``), with ``block=None`` the exact expectation over ``t``
(all blocks in one step, each still local). Inference runs the chain with the Gaussian posterior of the
process (:func:`noprop_infer`)::

    z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t,    eps_t ~ N(0, I)
    a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})
    b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})
    c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})

and predicts ``argmax f_out(z_T)``; a ``stop_gradient`` sits between blocks, so differentiating through
the chain (an evaluation metric, a probe) can never couple them.

Schedule. The paper uses a fixed cosine schedule; here the cosine schedule of Nichol and Dhariwal 2021
("Improved Denoising Diffusion Probabilistic Models") on ``T + 1`` noise levels read backwards::

    abar_t = g((T + 1 - t) / (T + 1)) / g(0),    g(u) = cos^2(pi/2 (u + s) / (1 + s)),   s = 0.008

so ``abar_0 = 0`` (``z_0`` is exactly the prior: the KL term is 0 and ``SNR(0) = 0``) and ``abar_T < 1``.

Departures. The paper's blocks use a CNN image path with batch normalisation; ``prox.models.NoPropDT``
uses small dense paths (the rule does not depend on the architecture). Exact values of the cosine
schedule's endpoints (the paper clips them in its code) are as written above. ``u_hat`` may be the
embedding mixture ``softmax(o) U`` of the block's class scores ``o`` (the model's default) or a direct
linear output.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Denoise = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (block, z, x) -> u_hat [m, d]
Classify = Callable[[jax.Array], jax.Array]                         # z_T -> logits [m, C]


class NoPropSchedule(NamedTuple):
  """The noise schedule and its derived coefficients (float32 arrays).

  Attributes:
    alpha_bar: ``[T + 1]``, ``abar_t`` for ``t = 0..T`` (increasing).
    snr: ``[T + 1]``, ``SNR(t)``.
    weight: ``[T]``, ``SNR(t) - SNR(t-1)`` for ``t = 1..T`` (block ``t - 1``'s loss weight).
    a, b, c: ``[T]``, the inference coefficients ``a_t, b_t, c_t`` for ``t = 1..T``.
  """
  alpha_bar: jax.Array
  snr: jax.Array
  weight: jax.Array
  a: jax.Array
  b: jax.Array
  c: jax.Array

  @property
  def num_blocks(self) -> int:
    return int(self.weight.shape[0])


def noprop_schedule(num_blocks: int, *, s: float = 0.008, alpha_bar: Any = None) -> NoPropSchedule:
  """The schedule of ``T = num_blocks`` blocks: the cosine ``abar`` of the module docstring, or a given
  increasing ``alpha_bar`` of length ``T + 1`` in ``[0, 1)``. Computed in float64 on the host."""
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
    raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
  T = int(num_blocks)
  if alpha_bar is None:
    if not s > 0:
      raise ValueError(f"s must be > 0, got {s!r}")
    g = lambda u: np.cos(0.5 * np.pi * (u + s) / (1.0 + s)) ** 2
    t = np.arange(T + 1, dtype=np.float64)
    ab = g((T + 1 - t) / (T + 1)) / g(0.0)
    ab[0] = 0.0                                     # cos(pi/2) = 6e-17 in floating point
  else:
    ab = np.asarray(alpha_bar, np.float64)
    if ab.shape != (T + 1,) or not np.all(np.isfinite(ab)) or ab.min() < 0 or ab.max() >= 1 or np.any(
        np.diff(ab) <= 0):
      raise ValueError(f"alpha_bar must be {T + 1} increasing values in [0, 1), got {alpha_bar!r:.80}")
  snr = ab / (1.0 - ab)
  prev, cur = ab[:-1], ab[1:]                        # abar_{t-1}, abar_t for t = 1..T
  alpha_prev = prev / cur                            # alpha_{t-1} = abar_{t-1} / abar_t
  a = np.sqrt(cur) * (1.0 - alpha_prev) / (1.0 - prev)
  b = np.sqrt(alpha_prev) * (1.0 - cur) / (1.0 - prev)
  c = (1.0 - cur) * (1.0 - alpha_prev) / (1.0 - prev)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return NoPropSchedule(alpha_bar=f32(ab), snr=f32(snr), weight=f32(snr[1:] - snr[:-1]), a=f32(a), b=f32(b),
                        c=f32(c))


def noisy_embedding(key: jax.Array, u: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """A draw of ``q(z | y) = N(sqrt(abar) u_y, (1 - abar) I)`` for embeddings ``u`` ``[m, d]`` (``alpha_bar``
  a scalar or ``[m]``)."""
  ab = jnp.asarray(alpha_bar, u.dtype)
  ab = ab[..., None] if ab.ndim else ab
  return jnp.sqrt(ab) * u + jnp.sqrt(1.0 - ab) * jax.random.normal(key, u.shape, u.dtype)


def prior_kl(u: jax.Array, alpha_bar_0: jax.Array) -> jax.Array:
  """``[m]``: ``KL(N(sqrt(abar_0) u, (1 - abar_0) I) || N(0, I))
  = (abar_0 ||u||^2 - d abar_0 - d log(1 - abar_0)) / 2``."""
  ab = jnp.asarray(alpha_bar_0, u.dtype)
  d = u.shape[-1]
  return 0.5 * (ab * jnp.sum(u * u, -1) - d * ab - d * jnp.log1p(-ab))


def denoising_loss(u_hat: jax.Array, u: jax.Array, weight: jax.Array, *, num_blocks: int,
                   eta: float = 1.0) -> jax.Array:
  """``[m]``: one block's term ``(T / 2) eta w_t ||u_hat - u_y||^2`` (``w_t = SNR(t) - SNR(t-1)``)."""
  return 0.5 * num_blocks * eta * jnp.asarray(weight, u_hat.dtype) * jnp.sum((u_hat - u) ** 2, -1)


class NoPropTerms(NamedTuple):
  """The per-example terms of :func:`noprop_loss` (``[m]`` each; ``total`` is their sum)."""
  total: jax.Array
  classifier: jax.Array
  kl: jax.Array
  denoising: jax.Array


def noprop_loss(denoise: Denoise, classify: Classify, embeddings: jax.Array, inputs: jax.Array,
                labels: jax.Array, key: jax.Array, schedule: NoPropSchedule, *, block: Any = None,
                eta: float = 1.0) -> NoPropTerms:
  """The NoProp-DT objective per example (module docstring).

  Args:
    denoise: ``denoise(block, z, x) -> u_hat`` ``[m, d]``, block ``0..T-1`` (the paper's ``t = block + 1``
      maps ``z_{t-1}`` to ``z_t``); ``block`` is a traced int32 scalar.
    classify: ``classify(z_T) -> logits`` ``[m, C]``.
    embeddings: ``U``, ``[C, d]``.
    inputs: ``x``, ``[m, ...]``.
    labels: ``[m]`` ints.
    key: the draws of the noisy latents.
    schedule: a :class:`NoPropSchedule` with ``T`` blocks.
    block: a traced int in ``[0, T)``: only that block's term, scaled by ``T`` (the unbiased one-sample
      estimate of the expectation over ``t``; draw it uniformly each step); ``None``: all ``T`` blocks.
    eta: the denoising weight ``eta``.

  Returns:
    :class:`NoPropTerms`.
  """
  T = schedule.num_blocks
  u = jnp.asarray(embeddings)[labels]
  k_out, k_blocks = jax.random.split(key)
  z_T = noisy_embedding(k_out, u, schedule.alpha_bar[T])
  classifier = optax.softmax_cross_entropy_with_integer_labels(classify(z_T).astype(jnp.float32), labels)
  kl = prior_kl(u, schedule.alpha_bar[0]).astype(jnp.float32)
  if block is None:
    keys = jax.random.split(k_blocks, T)

    def one(t, k):
      z = noisy_embedding(k, u, schedule.alpha_bar[t])
      return denoising_loss(denoise(t, z, inputs), u, schedule.weight[t], num_blocks=1, eta=eta)

    per_block = jax.vmap(one, out_axes=0)(jnp.arange(T, dtype=jnp.int32), keys)   # (1/2) eta w_t ||.||^2
    denoise_term = jnp.sum(per_block, 0)
  else:
    t = jnp.asarray(block, jnp.int32)
    z = noisy_embedding(k_blocks, u, schedule.alpha_bar[t])
    denoise_term = denoising_loss(denoise(t, z, inputs), u, schedule.weight[t], num_blocks=T, eta=eta)
  denoise_term = denoise_term.astype(jnp.float32)
  return NoPropTerms(total=classifier + kl + denoise_term, classifier=classifier, kl=kl,
                     denoising=denoise_term)


def noprop_infer(denoise: Denoise, classify: Classify, inputs: jax.Array, schedule: NoPropSchedule, *,
                 dim: int, key: jax.Array | None = None, return_latent: bool = False) -> jax.Array:
  """Runs the chain ``z_0 -> z_T`` and returns ``classify(z_T)`` (module docstring).

  ``key=None`` runs the chain without noise (``z_0 = 0``, ``eps_t = 0``: the posterior means), a key draws
  ``z_0 ~ N(0, I)`` and the ``eps_t``. ``dim`` is the embedding size ``d``. A ``stop_gradient`` separates
  the blocks. ``return_latent``: return ``z_T`` instead of the logits.
  """
  m = inputs.shape[0]
  T = schedule.num_blocks
  if key is None:
    z0, eps = jnp.zeros((m, dim), jnp.float32), jnp.zeros((T, m, dim), jnp.float32)
  else:
    k0, k1 = jax.random.split(key)
    z0 = jax.random.normal(k0, (m, dim), jnp.float32)
    eps = jax.random.normal(k1, (T, m, dim), jnp.float32)

  def body(z, xs):
    t, e = xs
    u_hat = denoise(t, jax.lax.stop_gradient(z), inputs).astype(jnp.float32)
    z = schedule.a[t] * u_hat + schedule.b[t] * z + jnp.sqrt(schedule.c[t]) * e
    return z, None

  z_T, _ = jax.lax.scan(body, z0, (jnp.arange(T, dtype=jnp.int32), eps))
  return z_T if return_latent else classify(z_T)

