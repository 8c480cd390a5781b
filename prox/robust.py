"""Training on perturbed inputs: adversarial examples (FGSM, PGD) and the dual-input/dual-output loss.

Pure functions of a user loss ``loss_fn(params, x, y) -> scalar``; they jit, vmap and shard like the rest
of prox and import only jax/optax. (They live here, not in a loss module, because the attacks produce
inputs rather than losses.)

* FGSM (Goodfellow, Shlens, Szegedy 2015, "Explaining and Harnessing Adversarial Examples"):
  ``x' = clip(x + eps sign(grad_x L(x, y)))`` for the L-inf ball; for ``norm="l2"`` the fast gradient
  method step ``x + eps g / ||g||_2`` (per example).
* PGD (Madry, Makelov, Schmidt, Tsipras, Vladu 2018, "Towards Deep Learning Models Resistant to
  Adversarial Attacks"): from a uniform random start in the ball, ``steps`` iterations of
  ``x <- Proj_{B(x0, eps)}(x + alpha sign(g))`` (L-inf; L2: ``alpha g / ||g||_2`` and projection by
  rescaling ``delta`` to norm ``<= eps``), each followed by clipping to the data range.
* Dual-input/dual-output training (Isong 2025, "Building Efficient Lightweight CNN Models"): two identical
  sub-models are trained at once, one on the original images and one on augmented copies, with the sum of
  their losses (the Keras two-output default, equal weights);
  ``L = w_o CE(f_o(x), y) + w_a CE(f_a(aug(x)), y)``. Their weights are then unified into one model that
  is fine-tuned with progressive unfreezing (``prox.transforms.progressive_unfreezing``).
  :func:`unify_submodels` unifies by averaging the two sub-models' parameters,
  ``theta = lambda theta_o + (1 - lambda) theta_a`` (the paper says the weights are unified; averaging is
  our reading).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

__all__ = [
    "NORMS",
    "dual_io_loss",
    "fgsm",
    "pair_apply",
    "pgd",
    "unify_submodels",
]

NORMS = ("linf", "l2")


def _check_scalar(where: str, name: str, v: Any) -> None:
  """Concrete Python numbers must be >= 0; arrays (possibly traced, e.g. an eps schedule) pass."""
  if isinstance(v, bool) or not isinstance(v, (numbers.Real, jax.Array, np.ndarray)):
    raise ValueError(f"{where}: {name} must be a number >= 0, got {v!r}")
  if isinstance(v, numbers.Real) and v < 0:
    raise ValueError(f"{where}: {name} must be a number >= 0, got {v!r}")


def _check(where: str, eps: Any, norm: str, clip: Any) -> None:
  _check_scalar(where, "eps", eps)
  if norm not in NORMS:
    raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")
  if clip is not None and (not isinstance(clip, (tuple, list)) or len(clip) != 2 or not clip[0] < clip[1]):
    raise ValueError(f"{where}: clip must be None or (low, high) with low < high, got {clip!r}")


def _per_example_l2(g: jax.Array) -> jax.Array:
  axes = tuple(range(1, g.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))


def _direction(g: jax.Array, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.sign(g)
  return (g / jnp.maximum(_per_example_l2(g), 1e-12)).astype(g.dtype)


def _project(delta: jax.Array, eps: float, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.clip(delta, -eps, eps)
  n = _per_example_l2(delta)
  return (delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))).astype(delta.dtype)


def _clip(x: jax.Array, clip: Any) -> jax.Array:
  return x if clip is None else jnp.clip(x, clip[0], clip[1])


def fgsm(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array, *, eps: float, norm: str = "linf",
         clip: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """One fast gradient step: ``clip(x + eps sign(grad_x loss_fn(params, x, y)))`` (L2: ``eps g/||g||``).

  ``x`` is ``[B, ...]``; the L2 normalisation is per example. The result carries no gradient
  (``stop_gradient``), as adversarial examples are inputs.
  """
  _check("fgsm", eps, norm, clip)
  g = jax.grad(loss_fn, argnums=1)(params, x, y)
  return lax.stop_gradient(_clip(x + eps * _direction(g, norm), clip))


def pgd(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array, key: jax.Array, *, eps: float,
        step_size: float, steps: int, norm: str = "linf", random_start: bool = True,
        clip: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Projected gradient ascent on ``loss_fn`` inside the ``eps`` ball around ``x`` (Madry et al. 2018).

  ``eps`` and ``step_size`` may be traced scalars (e.g. an eps warm-up schedule); ``steps`` is static.

  Start: ``x + delta_0`` with ``delta_0`` uniform in the L-inf cube, or for L2 a uniform direction times
  a radius ``eps u^(1/d)`` (uniform in the ball), if ``random_start``. Each of ``steps`` iterations:
  ``x <- clip(x0 + Proj(x + step_size * dir(g) - x0))``. The result stays in the ball and the data
  range and carries no gradient. ``steps`` is static (``lax.fori_loop``).
  """
  _check("pgd", eps, norm, clip)
  if not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"pgd: steps must be an int >= 0, got {steps!r}")
  _check_scalar("pgd", "step_size", step_size)
  x0 = lax.stop_gradient(x)
  if random_start:
    if norm == "linf":
      delta = jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)
    else:
      kd, kr = jax.random.split(key)
      d = jax.random.normal(kd, x.shape, jnp.float32)
      dims = max(1, x[0].size)
      r = eps * jax.random.uniform(kr, (x.shape[0],) + (1,) * (x.ndim - 1)) ** (1.0 / dims)
      delta = d / jnp.maximum(_per_example_l2(d), 1e-12) * r
    xa = _clip(x0 + delta.astype(x.dtype), clip)
  else:
    xa = x0
  grad = jax.grad(loss_fn, argnums=1)

  def body(_, xa):
    g = grad(params, xa, y)
    xa = xa + step_size * _direction(g, norm)
    return _clip(x0 + _project(xa - x0, eps, norm), clip)

  return lax.stop_gradient(lax.fori_loop(0, steps, body, xa))


def pair_apply(apply_fn: Callable[[PyTree, jax.Array], jax.Array]) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Two identical sub-models as one dual-input/dual-output model.

  Returns ``apply(params, (x_original, x_augmented)) -> (logits_o, logits_a)`` for
  ``params = {"original": theta_o, "augmented": theta_a}``.
  """

  def apply(params: PyTree, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return apply_fn(params["original"], inputs[0]), apply_fn(params["augmented"], inputs[1])

  return apply


def dual_io_loss(apply_fn: Callable[..., tuple[jax.Array, jax.Array]], params: PyTree, images: jax.Array,
                 augmented: jax.Array, labels: jax.Array, *, weights: tuple[float, float] = (1.0, 1.0)
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``w_o CE(out_o, y) + w_a CE(out_a, y)`` for ``(out_o, out_a) = apply_fn(params, (images, augmented))``.

  ``apply_fn`` is any dual-output model: two sub-models (:func:`pair_apply`) or a shared trunk with two
  heads. Mean cross-entropies over the batch; returns ``(loss, {"original": CE_o, "augmented": CE_a})``.
  """
  if (not isinstance(weights, (tuple, list)) or len(weights) != 2
      or not all(isinstance(w, numbers.Real) and w >= 0 for w in weights)):
    raise ValueError(f"dual_io_loss: weights must be two numbers >= 0, got {weights!r}")
  out_o, out_a = apply_fn(params, (images, augmented))
  ce_o = optax.softmax_cross_entropy_with_integer_labels(out_o, labels).mean()
  ce_a = optax.softmax_cross_entropy_with_integer_labels(out_a, labels).mean()
  return weights[0] * ce_o + weights[1] * ce_a, {"original": ce_o, "augmented": ce_a}


def unify_submodels(params: PyTree, *, weight: float = 0.5) -> PyTree:
  """One model from the two sub-models of ``params = {"original", "augmented"}``: ``w theta_o + (1-w) theta_a``."""
  if not isinstance(weight, numbers.Real) or not 0.0 <= weight <= 1.0:
    raise ValueError(f"unify_submodels: weight must lie in [0, 1], got {weight!r}")
  if not isinstance(params, dict) or set(params) != {"original", "augmented"}:
    raise ValueError("unify_submodels: params must be {'original': ..., 'augmented': ...}")
  return jax.tree.map(lambda a, b: (weight * a + (1.0 - weight) * b).astype(a.dtype), params["original"],
                      params["augmented"])
