"""Layer-input capture: the input of every dense kernel of :class:`prox.models.MLP`, from its parameters.

Methods that work on a layer's inputs need them beside the logits: gradient projection memory (Saha,
Garg & Roy 2021) builds each kernel's basis from its inputs on old tasks, and SLCA's classifier
alignment (Zhang et al. 2023) models the class-wise distribution of the head's input (the features).
The model's own ``__call__`` returns only the logits, so the forward pass is written out here on the
parameter dict of ``prox.models.functional(MLP(...)).params``:

    h_0 = flatten(x),    h_{i+1} = relu(h_i W_i + b_i)  (i = 0 .. L-1),    logits = h_L W_head + b_head

and ``mlp_layer_inputs`` returns ``{"dense0": h_0, ..., "dense{L-1}": h_{L-1}, "head": h_L}``: the input
of each kernel, keyed like the parameters (``params["hidden"]["dense{i}"]``, ``params["head"]``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def mlp_layer_inputs(params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
  """The input of every dense kernel of an MLP (see the module docstring).

  Args:
    params: the MLP's parameter dict (``{"hidden": {"dense0": {"kernel", "bias"}, ...}, "head": ...}``).
    images: ``[N, ...]`` inputs, flattened per example as the MLP does.

  Returns:
    ``{"dense0": [N, d_0], ..., "head": [N, d_L]}`` in float32; ``inputs["head"] @ W_head + b_head`` are
    the model's logits. Jittable.
  """
  hidden = params.get("hidden", {})
  x = jnp.asarray(images).reshape(images.shape[0], -1).astype(jnp.float32)
  out = {}
  for i in range(len(hidden)):
    layer = hidden[f"dense{i}"]
    out[f"dense{i}"] = x
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  out["head"] = x
  return out
