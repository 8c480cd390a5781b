"""Image classifiers in Flax NNX, and their pure functional form for the training step.

``make_model(name, input_shape=..., num_classes=...)`` builds one of ``MODELS``:

* ``mlp``: flatten, then ``hidden`` ReLU dense layers, then a linear head.
* ``cnn``: two 3x3 conv + ReLU + 2x2 max-pool blocks (``width``, ``2 * width`` channels), a ReLU dense
  layer of ``hidden`` units and a linear head; works on 8x8, 28x28 and 32x32 inputs.
* ``resnet20``: the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning for Image Recognition",
  Sec. 4.2): a 3x3 conv, 3 stages x 3 basic blocks with 16/32/64 channels (stride 2 at the start of
  stages 2 and 3), BatchNorm, identity shortcuts with zero-padded channels (option A), global average
  pooling and a linear head: 0.27M parameters for CIFAR-10.
* ``cnn1d``: the MNIST-1D CNN of Greydanus and Kobak 2024: three stride-2 1-D convolutions (25 channels)
  and a linear head; 5,210 parameters on [40, 1] sequences.

``functional(model)`` splits a model into ``apply(params, model_state, images, *, train)`` and two plain
pytrees (nested dicts of jax arrays with string keys), which jit, grad, shard_map, optax and orbax all take
as they are.
"""
from prox.models._zoo import (
    BasicBlock,
    CNN,
    CNN1D,
    Functional,
    MLP,
    MODELS,
    ResNet20,
    check_options,
    functional,
    make_model,
    param_count,
)
from prox.models._capture import mlp_layer_inputs
from prox.models._nnx import (
    classifier_logprob,
    masked_module,
    module_fisher,
    module_logprob,
    opt_state_of,
    params_of,
    set_opt_state,
    update_opt_state,
)
from prox.models._elastic import (
    BlockSpec,
    ElasticConfig,
    depthwise_conv,
    elastic_apply,
    elastic_flops,
    extract_subnet,
    init_elastic,
    reorder_channels,
    sandwich_loss,
    transformed_kernel,
)
from prox.models._structure import sliced_functional, structure_of
from prox.models._hypernet import HypernetFunctional, RecurrentHypernet, hypernet_functional
from prox.models._iterative import IterativeClassifier, IterativeOutput, logits_at
from prox.models._noprop import NoPropDT

__all__ = [
    "BasicBlock",
    "CNN",
    "CNN1D",
    "Functional",
    "MLP",
    "MODELS",
    "ResNet20",
    "check_options",
    "functional",
    "make_model",
    "mlp_layer_inputs",
    "param_count",
    # prox's transforms in an NNX loop (nnx.Optimizer / nnx.jit)
    "classifier_logprob",
    "masked_module",
    "module_fisher",
    "module_logprob",
    "opt_state_of",
    "params_of",
    "set_opt_state",
    "update_opt_state",
    # elastic networks (Once-for-All) and the zoo's channel structure (structured pruning)
    "BlockSpec",
    "ElasticConfig",
    "depthwise_conv",
    "elastic_apply",
    "elastic_flops",
    "extract_subnet",
    "init_elastic",
    "reorder_channels",
    "sandwich_loss",
    "sliced_functional",
    "structure_of",
    "transformed_kernel",
    # continual learning: a recurrent hypernetwork generating a target network's weights per task
    "HypernetFunctional",
    "RecurrentHypernet",
    "hypernet_functional",
    # iterative (weight-tied, per-example step budgets) and NoProp-DT models
    "IterativeClassifier",
    "IterativeOutput",
    "logits_at",
    "NoPropDT",
]
