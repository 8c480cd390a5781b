"""The model zoo: MLP, CNN, ResNet-20 and a 1-D CNN in Flax NNX, and their pure functional form.

``make_model(name, input_shape=..., num_classes=...)`` builds one of ``MODELS``:

* ``mlp``: flatten, then ``hidden`` ReLU dense layers, then a linear head; any input shape.
* ``cnn``: two 3x3 conv + ReLU + 2x2 max-pool blocks (``width``, ``2 * width`` channels), a ReLU dense
  layer of ``hidden`` units and a linear head; works on 8x8, 28x28 and 32x32 inputs.
* ``resnet20``: the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning for Image Recognition",
  Sec. 4.2): a 3x3 conv, 3 stages x 3 basic blocks with 16/32/64 channels (stride 2 at the start of
  stages 2 and 3), BatchNorm, identity shortcuts with zero-padded channels (option A), global average
  pooling and a linear head: 0.27M parameters for CIFAR-10.
* ``cnn1d``: the CNN of Greydanus and Kobak 2024 ("Scaling Down Deep Learning with MNIST-1D"): three
  stride-2 1-D convolutions (kernel 5, 3, 3; padding 1; ``width = 25`` channels) with ReLU, flattened into
  a linear head: 5,210 parameters on MNIST-1D's [40, 1] sequences. Inputs ``[B, *S, C]`` are read as
  sequences of length ``prod(S)`` (row-major), so images work too (as pixel sequences).

``functional(model)`` splits a model into ``apply(params, model_state, images, *, train)`` and two plain
pytrees (nested dicts of jax arrays with string keys), which jit, grad, shard_map, optax and orbax all take
as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PyTree = Any

MODELS = ("mlp", "cnn", "resnet20", "cnn1d")

# BatchNorm as in the reference CIFAR ResNets (PyTorch defaults): running <- 0.9 running + 0.1 batch.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5

# Parameter initialisations of ``mlp`` and ``cnn`` (option ``init``): flax's defaults, or PyTorch's.
INITS = ("default", "torch")


def _uniform(bound: float) -> Callable[..., jax.Array]:
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _init(init: str, fan_in: int) -> dict[str, Any]:
  """The ``kernel_init``/``bias_init`` of a dense or conv layer with ``fan_in`` inputs per output.

  ``"default"``: flax's (LeCun-normal kernels, zero biases). ``"torch"``: ``torch.nn.Linear``'s and
  ``torch.nn.Conv2d``'s, ``kaiming_uniform_(W, a=sqrt(5))`` and a uniform bias (He et al. 2015, "Delving
  Deep into Rectifiers"): with gain ``sqrt(2 / (1 + a^2)) = sqrt(1/3)`` the kernel bound
  ``gain sqrt(3 / fan_in)`` is ``1 / sqrt(fan_in)``, so ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
  (``fan_in``: inputs x receptive field; the kernel's from its shape, the bias's given here).
  """
  if init == "default":
    return {}
  return {"kernel_init": nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
          "bias_init": _uniform(1.0 / float(np.sqrt(fan_in)))}


class MLP(nnx.Module):
  """``logits = W_out relu(... relu(W_1 flatten(x) + b_1) ...) + b_out``."""

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *,
               hidden: Sequence[int] = (1024, 1024), dtype: Any = None, init: str = "default",
               rngs: nnx.Rngs):
    sizes = (int(np.prod(input_shape)), *hidden)
    self.num_hidden = len(hidden)
    self.hidden = nnx.Dict({
        f"dense{i}": nnx.Linear(n_in, n_out, dtype=dtype, rngs=rngs, **_init(init, n_in))
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))})
    self.head = nnx.Linear(sizes[-1], num_classes, dtype=dtype, rngs=rngs, **_init(init, sizes[-1]))

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no train/eval difference
    x = images.reshape(images.shape[0], -1)
    for i in range(self.num_hidden):
      x = jax.nn.relu(self.hidden[f"dense{i}"](x))
    return self.head(x).astype(jnp.float32)


class CNN(nnx.Module):
  """Two conv(3x3) + ReLU + max-pool(2x2) blocks, a ReLU dense layer and a linear head."""

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: int = 32,
               hidden: int = 128, dtype: Any = None, init: str = "default", rngs: nnx.Rngs):
    height, width_px, channels = input_shape
    self.conv1 = nnx.Conv(channels, width, (3, 3), dtype=dtype, rngs=rngs, **_init(init, 9 * channels))
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), dtype=dtype, rngs=rngs, **_init(init, 9 * width))
    half = lambda n: (n + 1) // 2  # output size of a stride-2 SAME pooling
    pooled = half(half(height)) * half(half(width_px))
    self.dense = nnx.Linear(pooled * 2 * width, hidden, dtype=dtype, rngs=rngs,
                            **_init(init, pooled * 2 * width))
    self.head = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs, **_init(init, hidden))

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no train/eval difference
    x = images
    for conv in (self.conv1, self.conv2):
      x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), strides=(2, 2), padding="SAME")
    x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(x).astype(jnp.float32)


class BasicBlock(nnx.Module):
  """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut subsamples and zero-pads."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, *, dtype: Any = None,
               rngs: nnx.Rngs):
    conv = dict(kernel_size=(3, 3), use_bias=False, kernel_init=nnx.initializers.he_normal(),
                dtype=dtype, rngs=rngs)
    norm = dict(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(in_channels, out_channels, strides=stride, **conv)
    self.bn1 = nnx.BatchNorm(out_channels, **norm)
    self.conv2 = nnx.Conv(out_channels, out_channels, **conv)
    self.bn2 = nnx.BatchNorm(out_channels, **norm)
    self.stride = stride
    self.extra_channels = out_channels - in_channels

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    y = self.bn2(self.conv2(y), use_running_average=not train)
    shortcut = x[:, ::self.stride, ::self.stride, :]
    if self.extra_channels:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, self.extra_channels)))
    return jax.nn.relu(y + shortcut.astype(y.dtype))


class ResNet20(nnx.Module):
  """He et al. 2016's CIFAR ResNet-20 (6n + 2 layers with n = 3), option-A shortcuts."""

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: int = 16,
               dtype: Any = None, rngs: nnx.Rngs):
    channels = input_shape[-1]
    self.conv = nnx.Conv(channels, width, (3, 3), use_bias=False,
                         kernel_init=nnx.initializers.he_normal(), dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype, rngs=rngs)
    blocks = {}
    in_channels = width
    for stage in range(3):
      out_channels = width * 2**stage
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks[f"stage{stage + 1}_block{block + 1}"] = BasicBlock(
            in_channels, out_channels, stride, dtype=dtype, rngs=rngs)
        in_channels = out_channels
    self.block_names = tuple(blocks)
    self.blocks = nnx.Dict(blocks)
    self.head = nnx.Linear(in_channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    x = jax.nn.relu(self.bn(self.conv(images), use_running_average=not train))
    for name in self.block_names:
      x = self.blocks[name](x, train=train)
    return self.head(x.mean(axis=(1, 2))).astype(jnp.float32)


class CNN1D(nnx.Module):
  """Greydanus and Kobak 2024's MNIST-1D CNN: ``h_1 = relu(conv_5(x))``, ``h_2 = relu(conv_3(h_1))``,
  ``h_3 = relu(conv_3(h_2))``, ``logits = W flatten(h_3) + b``; every conv has stride 2 and padding 1.

  A sequence of length ``L`` becomes ``L_1 = floor((L - 3) / 2) + 1``, then ``L_2 = floor((L_1 - 1) / 2)
  + 1``, ``L_3 = floor((L_2 - 1) / 2) + 1`` positions (40 -> 19 -> 10 -> 5), so the head reads
  ``L_3 * width`` features (125 on MNIST-1D).
  """

  def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: int = 25,
               dtype: Any = None, rngs: nnx.Rngs):
    *spatial, channels = input_shape
    length = int(np.prod(spatial))
    conv = dict(strides=2, padding=((1, 1),), dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(channels, width, (5,), **conv)
    self.conv2 = nnx.Conv(width, width, (3,), **conv)
    self.conv3 = nnx.Conv(width, width, (3,), **conv)
    for kernel in (5, 3, 3):
      length = (length + 2 - kernel) // 2 + 1
    self.head = nnx.Linear(length * width, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no train/eval difference
    x = images.reshape(images.shape[0], -1, images.shape[-1])  # [B, L, C]
    for conv in (self.conv1, self.conv2, self.conv3):
      x = jax.nn.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1)).astype(jnp.float32)


_OPTIONS = {"mlp": ("hidden", "dtype", "init"), "cnn": ("width", "hidden", "dtype", "init"),
            "resnet20": ("width", "dtype"), "cnn1d": ("width", "dtype")}
_CLASSES = {"mlp": MLP, "cnn": CNN, "resnet20": ResNet20, "cnn1d": CNN1D}
_CNN1D_MIN_LENGTH = 3  # the first conv (kernel 5, padding 1) needs 3 positions


def check_options(name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int = 0,
                  **kwargs: Any) -> dict[str, Any]:
  """Validates ``make_model``'s arguments without building anything; returns the normalised options.

  Raises ``ValueError``/``TypeError`` with one line naming the bad value.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
  if not shape or not all(_is_int(d) and d > 0 for d in shape):
    raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
  if name in ("cnn", "resnet20") and len(shape) != 3:
    raise ValueError(f"model {name!r} takes images: input_shape must be (H, W, C), got {input_shape!r}")
  if name == "cnn1d" and (len(shape) < 2 or np.prod(shape[:-1]) < _CNN1D_MIN_LENGTH):
    raise ValueError(f"model 'cnn1d' takes sequences: input_shape must be (L, C) (or (*S, C), read as a "
                     f"sequence of length prod(S)) with length >= {_CNN1D_MIN_LENGTH}, got {input_shape!r}")
  if not _is_int(num_classes) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if not _is_int(seed):
    raise ValueError(f"seed must be an int, got {seed!r}")
  unknown = sorted(set(kwargs) - set(_OPTIONS[name]))
  if unknown:
    raise TypeError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: "
                    f"{', '.join(_OPTIONS[name])}")
  if "hidden" in kwargs:
    hidden = kwargs["hidden"]
    if name == "mlp":
      if not isinstance(hidden, (tuple, list)) or not all(_is_int(h) and h > 0 for h in hidden):
        raise ValueError(f"hidden must be a tuple of positive ints, got {hidden!r}")
      kwargs["hidden"] = tuple(int(h) for h in hidden)
    elif not _is_int(hidden) or hidden < 1:
      raise ValueError(f"hidden must be a positive int, got {hidden!r}")
  if "width" in kwargs and (not _is_int(kwargs["width"]) or kwargs["width"] < 1):
    raise ValueError(f"width must be a positive int, got {kwargs['width']!r}")
  if "init" in kwargs and kwargs["init"] not in INITS:
    raise ValueError(f"unknown init {kwargs['init']!r}; known: {', '.join(INITS)}")
  return kwargs


def make_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int = 0,
               **kwargs: Any) -> nnx.Module:
  """Builds one of ``MODELS`` for inputs of ``input_shape``.

  Args:
    name: ``"mlp"``, ``"cnn"``, ``"resnet20"`` or ``"cnn1d"``.
    input_shape: the shape of one input: ``(H, W, C)`` for ``cnn`` and ``resnet20``; ``(L, C)`` for
      ``cnn1d`` (which reads ``(*S, C)`` as a sequence of length ``prod(S)``); any shape for ``mlp``.
    num_classes: number of output logits.
    seed: seed of the parameter initialisation.
    **kwargs: model options: mlp ``hidden=(1024, 1024)``; cnn ``width=32, hidden=128``; resnet20
      ``width=16`` (channels of stage 1); cnn1d ``width=25`` (channels of every conv). All take ``dtype`` (computation dtype, e.g. ``jnp.bfloat16``;
      parameters stay float32, logits are float32); mlp and cnn take ``init`` (``"default"``: flax's
      initialisers; ``"torch"``: PyTorch's ``nn.Linear``/``nn.Conv2d`` ones, ``W, b ~ U(+-1/sqrt(fan_in))``).

  Returns:
    The NNX module; ``module(images, train=...)`` returns float32 logits [B, num_classes].
  """
  kwargs = check_options(name, input_shape=input_shape, num_classes=num_classes, seed=seed, **kwargs)
  shape = tuple(int(d) for d in input_shape)
  return _CLASSES[name](shape, int(num_classes), rngs=nnx.Rngs(int(seed)), **kwargs)


class Functional(NamedTuple):
  """A model as a pure function and its state.

  Attributes:
    apply: ``apply(params, model_state, images, *, train) -> (logits, new_model_state)``.
    params: the ``nnx.Param`` values as nested dicts of jax arrays.
    model_state: the ``nnx.BatchStat`` values (running batch-norm statistics) as nested dicts; ``{}``
      for models without them.
  """
  apply: Callable[..., tuple[jax.Array, PyTree]]
  params: PyTree
  model_state: PyTree


def functional(model: nnx.Module) -> Functional:
  """Splits an NNX model into a pure ``apply`` function, its parameters and its model state.

  ``apply(params, model_state, images, *, train)`` rebuilds the module with ``nnx.merge`` and runs it.
  ``train=True`` normalises with batch statistics and returns the updated running statistics
  (``r <- momentum * r + (1 - momentum) * batch_stat``); ``train=False`` uses the running statistics and
  returns ``model_state`` unchanged. It has no side effects, so it can be used inside ``jax.jit``,
  ``jax.grad`` and ``shard_map``; ``train`` must be a Python bool (static).

  Variables that are neither ``nnx.Param`` nor ``nnx.BatchStat`` (none in ``MODELS``) are held fixed at
  their current values. The ``nnx.Linear`` and ``nnx.Conv`` layers are tapped (``tap_layers``): inside a
  ``prox.taps`` recording they report their inputs, so a step with ``example_stats`` gets per-example
  gradient moments; otherwise they are the plain layers.
  """
  from prox.models._taps import tap_layers  # pylint: disable=g-import-not-at-top
  graphdef, params, batch_stats, rest = nnx.split(tap_layers(model), nnx.Param, nnx.BatchStat, ...)

  def apply(params: PyTree, model_state: PyTree, images: jax.Array, *,
            train: bool) -> tuple[jax.Array, PyTree]:
    module = nnx.merge(graphdef, params, model_state, rest)
    logits = module(images, train=train)
    if not train:
      return logits, model_state
    return logits, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

  return Functional(apply=apply, params=nnx.to_pure_dict(params),
                    model_state=nnx.to_pure_dict(batch_stats))


def param_count(params: PyTree) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
