"""Tests for prox.models.mlp_layer_inputs (layer-input capture) and the MLP/CNN ``init="torch"`` option."""
import jax
import numpy as np
import pytest

from prox import models


def _mlp(seed=3, hidden=(16, 12), **kwargs):
  return models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, seed=seed,
                                             hidden=hidden, **kwargs))


def test_layer_inputs_reproduce_the_models_forward_pass():
  net = _mlp()
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  inputs = jax.jit(models.mlp_layer_inputs)(net.params, x)
  assert list(inputs) == ["dense0", "dense1", "head"]
  assert [inputs[k].shape for k in inputs] == [(5, 64), (5, 16), (5, 12)]
  np.testing.assert_array_equal(inputs["dense0"], np.asarray(x).reshape(5, -1))
  hidden = net.params["hidden"]
  for i, (name, nxt) in enumerate((("dense0", "dense1"), ("dense1", "head"))):
    layer = hidden[f"dense{i}"]
    np.testing.assert_allclose(inputs[nxt], np.maximum(inputs[name] @ layer["kernel"] + layer["bias"], 0),
                               rtol=1e-5, atol=1e-6)
  logits = inputs["head"] @ net.params["head"]["kernel"] + net.params["head"]["bias"]
  np.testing.assert_allclose(logits, net.apply(net.params, {}, x, train=False)[0], rtol=1e-5, atol=1e-6)


def test_layer_inputs_of_an_mlp_without_hidden_layers():
  net = _mlp(hidden=())
  x = np.ones((2, 8, 8, 1), np.float32)
  inputs = models.mlp_layer_inputs(net.params, x)
  assert list(inputs) == ["head"]
  np.testing.assert_allclose(inputs["head"] @ net.params["head"]["kernel"] + net.params["head"]["bias"],
                             net.apply(net.params, {}, x, train=False)[0], rtol=1e-5, atol=1e-6)


# ``init="torch"`` (the MLP's and CNN's option; its tests live here beside the MLP capture).

def _bounds_and_spread(leaf, fan_in):
  bound = 1 / np.sqrt(fan_in)
  a = np.asarray(leaf, np.float64).ravel()
  assert np.all(np.abs(a) <= bound + 1e-7), (np.abs(a).max(), bound)
  return a / bound            # U(-1, 1) after scaling


def test_torch_init_is_uniform_within_one_over_sqrt_fan_in():
  net = _mlp(hidden=(300, 200), init="torch")
  scaled = []
  for (name, fan_in) in (("dense0", 64), ("dense1", 300)):
    for leaf in ("kernel", "bias"):
      scaled.append(_bounds_and_spread(net.params["hidden"][name][leaf], fan_in))
  scaled.append(_bounds_and_spread(net.params["head"]["kernel"], 200))
  scaled.append(_bounds_and_spread(net.params["head"]["bias"], 200))
  everything = np.concatenate(scaled)
  # U(-1, 1): variance 1/3, mean 0, and the extremes reached (a normal or a zero bias would fail this).
  assert abs(everything.var() - 1 / 3) < 0.01 and abs(everything.mean()) < 0.01
  assert everything.max() > 0.99 and everything.min() < -0.99
  biases = np.concatenate([net.params["hidden"]["dense0"]["bias"], net.params["head"]["bias"]])
  assert np.all(biases != 0)
  default = _mlp(hidden=(300, 200))
  assert np.all(np.asarray(default.params["head"]["bias"]) == 0)   # flax's default: zero biases


def test_torch_init_of_the_cnn_uses_the_receptive_field():
  net = models.functional(models.make_model("cnn", input_shape=(8, 8, 1), num_classes=10, width=8,
                                            hidden=16, init="torch"))
  for name, fan_in in (("conv1", 9 * 1), ("conv2", 9 * 8), ("dense", 2 * 2 * 16), ("head", 16)):
    _bounds_and_spread(net.params[name]["bias"], fan_in)
    assert np.abs(_bounds_and_spread(net.params[name]["kernel"], fan_in)).max() > 0.8


def test_bad_init_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown init 'xavier'; known: default, torch"):
    models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, init="xavier")
  with pytest.raises(TypeError, match="unknown option"):
    models.make_model("resnet20", input_shape=(8, 8, 1), num_classes=10, init="torch")
