"""Channel structure of the zoo's parameter trees, for structured pruning, FLOPs counts and hard slicing.

``structure_of(name, params, input_shape=...)`` returns the :class:`prox.transforms.Structure` of a
``functional(make_model(name, ...)).params`` tree: its channel groups (which leaf axes each prunable
channel owns as output and as input) and its Dense / Conv layers with their output positions (for
``masked_flops``).

* ``mlp``: one group per hidden layer (its kernel's output column and bias; the next kernel's input row).
* ``cnn``: one group per conv (kernel output, bias; the next conv's input channel, or, after the flatten
  of the NHWC feature map, every ``C``-th input row of the dense kernel) and one for the dense layer.
* ``resnet20``: one group per basic block's inner channels (``conv1`` output and ``bn1``; ``conv2``
  input) and ONE group for the residual stream of all three stages. The option-A shortcut adds stage-1
  channel ``c`` into channel ``c`` of stages 2 and 3 (the zero padding appends the new channels), so
  stream channel ``c`` is kept or removed in every stage at once: its producers are the stem conv/bn and
  every block's ``conv2``/``bn2`` output ``c``, its consumers every block's ``conv1`` input ``c`` and the
  head's input ``c``. A removed stream channel is zero in every stage (its BN scale and bias are zero, so
  its shortcut adds zero), and the kept channels of stage ``s`` are the kept stream channels below its
  width, with stage 1's first: the sliced network is again an option-A ResNet whose shortcut zero-pads
  the new kept channels, so the sliced and the masked network compute the same logits.

``sliced_functional(model, params, model_state)`` runs a sliced tree with the module's own code (the
zoo's layers read their sizes from the arrays; only the ResNet block's shortcut padding is re-derived).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from prox.models._zoo import Functional, ResNet20, functional
from prox.transforms._structured import ChannelAxis, ChannelGroup, LinearOp, Structure, check_structure

PyTree = Any

__all__ = ["sliced_functional", "structure_of"]


def _half(n: int) -> int:
  return (n + 1) // 2  # SAME padding, stride 2


def _mlp(params: PyTree, input_shape: tuple[int, ...]) -> Structure:
  hidden = params["hidden"]
  n = len(hidden)
  names = [f"dense{i}" for i in range(n)]
  groups, ops = [], []
  prev, prev_ch = None, int(np.prod(input_shape))
  for i, name in enumerate(names):
    width = int(hidden[name]["kernel"].shape[1])
    nxt = ("hidden", names[i + 1], "kernel") if i + 1 < n else ("head", "kernel")
    groups.append(ChannelGroup(name, width,
                               producers=(ChannelAxis(("hidden", name, "kernel"), 1, width),
                                          ChannelAxis(("hidden", name, "bias"), 0, width)),
                               consumers=(ChannelAxis(nxt, 0, width),)))
    ops.append(LinearOp(f"hidden/{name}", prev, name, prev_ch, width, 1, 1))
    prev, prev_ch = name, width
  ops.append(LinearOp("head", prev, None, prev_ch, int(params["head"]["kernel"].shape[1]), 1, 1))
  return Structure(tuple(groups), tuple(ops))


def _cnn(params: PyTree, input_shape: tuple[int, ...]) -> Structure:
  h, w, c = input_shape
  c1 = int(params["conv1"]["kernel"].shape[-1])
  c2 = int(params["conv2"]["kernel"].shape[-1])
  hidden = int(params["dense"]["kernel"].shape[1])
  classes = int(params["head"]["kernel"].shape[1])
  groups = (
      ChannelGroup("conv1", c1, producers=(ChannelAxis(("conv1", "kernel"), 3, c1), ChannelAxis(("conv1", "bias"), 0, c1)),
                   consumers=(ChannelAxis(("conv2", "kernel"), 2, c1),)),
      # NHWC flatten: row i of the dense kernel reads channel i mod c2.
      ChannelGroup("conv2", c2, producers=(ChannelAxis(("conv2", "kernel"), 3, c2), ChannelAxis(("conv2", "bias"), 0, c2)),
                   consumers=(ChannelAxis(("dense", "kernel"), 0, c2),)),
      ChannelGroup("dense", hidden, producers=(ChannelAxis(("dense", "kernel"), 1, hidden),
                                               ChannelAxis(("dense", "bias"), 0, hidden)),
                   consumers=(ChannelAxis(("head", "kernel"), 0, hidden),)),
  )
  h1, w1 = _half(h), _half(w)
  h2, w2 = _half(h1), _half(w1)
  ops = (
      LinearOp("conv1", None, "conv1", c, c1, 9, h * w),
      LinearOp("conv2", "conv1", "conv2", c1, c2, 9, h1 * w1),
      LinearOp("dense", "conv2", "dense", c2, hidden, h2 * w2, 1),
      LinearOp("head", "dense", None, hidden, classes, 1, 1),
  )
  return Structure(groups, ops)


def _resnet20(params: PyTree, input_shape: tuple[int, ...]) -> Structure:
  h, w, c = input_shape
  blocks = params["blocks"]
  names = sorted(blocks)  # stage{s}_block{b}: lexicographic == network order (1-digit indices)
  stream = int(params["head"]["kernel"].shape[0])
  stem = int(params["conv"]["kernel"].shape[-1])
  groups, ops = [], []
  s_prod = [ChannelAxis(("conv", "kernel"), 3, stem), ChannelAxis(("bn", "scale"), 0, stem),
            ChannelAxis(("bn", "bias"), 0, stem)]
  s_cons = [ChannelAxis(("head", "kernel"), 0, stream)]
  s_state = [ChannelAxis(("bn", "mean"), 0, stem), ChannelAxis(("bn", "var"), 0, stem)]
  ops.append(LinearOp("conv", None, "stream", c, stem, 9, h * w))
  hh, ww = h, w
  for name in names:
    blk = blocks[name]
    cin = int(blk["conv1"]["kernel"].shape[2])
    mid = int(blk["conv1"]["kernel"].shape[3])
    cout = int(blk["conv2"]["kernel"].shape[3])
    if name.endswith("_block1") and not name.startswith("stage1_"):  # stride 2 opens stages 2 and 3
      hh, ww = _half(hh), _half(ww)
    groups.append(ChannelGroup(
        f"{name}/mid", mid,
        producers=(ChannelAxis(("blocks", name, "conv1", "kernel"), 3, mid),
                   ChannelAxis(("blocks", name, "bn1", "scale"), 0, mid),
                   ChannelAxis(("blocks", name, "bn1", "bias"), 0, mid)),
        consumers=(ChannelAxis(("blocks", name, "conv2", "kernel"), 2, mid),),
        state=(ChannelAxis(("blocks", name, "bn1", "mean"), 0, mid),
               ChannelAxis(("blocks", name, "bn1", "var"), 0, mid))))
    s_prod += [ChannelAxis(("blocks", name, "conv2", "kernel"), 3, cout),
               ChannelAxis(("blocks", name, "bn2", "scale"), 0, cout),
               ChannelAxis(("blocks", name, "bn2", "bias"), 0, cout)]
    s_cons.append(ChannelAxis(("blocks", name, "conv1", "kernel"), 2, cin))
    s_state += [ChannelAxis(("blocks", name, "bn2", "mean"), 0, cout),
                ChannelAxis(("blocks", name, "bn2", "var"), 0, cout)]
    ops.append(LinearOp(f"blocks/{name}/conv1", "stream", f"{name}/mid", cin, mid, 9, hh * ww))
    ops.append(LinearOp(f"blocks/{name}/conv2", f"{name}/mid", "stream", mid, cout, 9, hh * ww))
  ops.append(LinearOp("head", "stream", None, stream, int(params["head"]["kernel"].shape[1]), 1, 1))
  groups.insert(0, ChannelGroup("stream", stream, tuple(s_prod), tuple(s_cons), tuple(s_state)))
  return Structure(tuple(groups), tuple(ops))


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet20": _resnet20}


def structure_of(name: str, params: PyTree, *, input_shape: tuple[int, ...],
                 model_state: PyTree | None = None) -> Structure:
  """The channel structure of the zoo model ``name``'s parameter tree (see the module docstring).

  Args:
    name: ``"mlp"``, ``"cnn"`` or ``"resnet20"``.
    params: ``functional(make_model(name, ...)).params`` (any widths).
    input_shape: ``(H, W, C)`` of one image (sets the conv output positions of the FLOPs count).
    model_state: if given, checked against the structure's state axes too.

  Raises:
    ValueError: unknown name, bad input shape, or a tree that does not fit the model.
  """
  if name not in _BUILDERS:
    raise ValueError(f"structure_of: unknown model {name!r}; known: {', '.join(_BUILDERS)}")
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
  if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
    raise ValueError(f"structure_of: input_shape must be (H, W, C) of positive ints, got {input_shape!r}")
  try:
    structure = _BUILDERS[name](params, tuple(int(d) for d in shape))
  except (KeyError, TypeError, IndexError, AttributeError) as e:
    raise ValueError(f"structure_of: params do not look like a {name!r} tree ({e!r})") from None
  check_structure(structure, params, model_state)
  return structure


def sliced_functional(model: nnx.Module, params: PyTree, model_state: PyTree) -> Functional:
  """``functional(model)`` for a sliced tree (from ``prox.transforms.slice_params``) of ``model``'s kind.

  MLP and CNN layers read their sizes from the arrays, so the module's graph runs the smaller tree as is.
  For ResNet-20 the blocks' shortcut padding (a static attribute) is set to ``out - in`` of the sliced
  block. ``model`` itself is not modified.
  """
  if isinstance(model, ResNet20):
    model = nnx.clone(model)
    for name in model.block_names:
      blk = params["blocks"][name]
      model.blocks[name].extra_channels = int(blk["conv2"]["kernel"].shape[-1] - blk["conv1"]["kernel"].shape[-2])
  f = functional(model)
  return Functional(apply=f.apply, params=params, model_state=model_state)
