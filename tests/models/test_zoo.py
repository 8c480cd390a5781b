"""Tests for prox.models: shapes, the functional form under jit/grad, BatchNorm, a quick training run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from prox import models

SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar": (32, 32, 3), "mnist1d": (40, 1)}
IMAGE_ONLY = ("cnn", "resnet20")  # models that take (H, W, C) images only


def _abstract(name, shape, num_classes=10, **kwargs):
  """The functional form of a model built abstractly (shapes only, no initialisation compute)."""
  return models.functional(nnx.eval_shape(
      lambda: models.make_model(name, input_shape=shape, num_classes=num_classes, **kwargs)))


@pytest.fixture(scope="module")
def digits_models():
  """Concrete models for 8x8x1 digits, built once for the tests that run them."""
  options = {"mlp": {"hidden": (256, 256)}, "cnn": {}, "resnet20": {}, "cnn1d": {}}
  return {name: models.functional(models.make_model(name, input_shape=(8, 8, 1), num_classes=10,
                                                    seed=1, **options[name]))
          for name in models.MODELS}


def _loss(apply, params, model_state, images, labels, *, train=True):
  logits, new_state = apply(params, model_state, images, train=train)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, new_state


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("data", list(SHAPES))
def test_output_shapes(name, data):
  shape = SHAPES[data]
  if name in IMAGE_ONLY and len(shape) != 3:
    pytest.skip(f"{name} takes images")
  fn = _abstract(name, shape, num_classes=7)
  images = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  for train in (True, False):
    logits, state = jax.eval_shape(functools.partial(fn.apply, train=train), fn.params,
                                   fn.model_state, images)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert jax.tree.structure(state) == jax.tree.structure(fn.model_state)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), fn.model_state)


def test_param_counts():
  # He et al. 2016 Table 6: ResNet-20 has 0.27M parameters; exactly 269,722 with option-A shortcuts.
  resnet = _abstract("resnet20", (32, 32, 3))
  assert models.param_count(resnet.params) == 269_722
  mlp = _abstract("mlp", (28, 28, 1), hidden=(1024, 1024))
  assert models.param_count(mlp.params) == (784 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)
  assert mlp.model_state == {}
  cnn = _abstract("cnn", (28, 28, 1), width=8, hidden=32)
  # conv 3x3 1->8, conv 3x3 8->16, 28 -> 14 -> 7 after pooling, dense 7*7*16 -> 32, head 32 -> 10.
  expected = (9 * 1 * 8 + 8) + (9 * 8 * 16 + 16) + (7 * 7 * 16 * 32 + 32) + (32 * 10 + 10)
  assert models.param_count(cnn.params) == expected
  # Greydanus and Kobak 2024's MNIST-1D CNN has 5,210 parameters: conv 5 x 1 -> 25, two conv 3 x 25 -> 25,
  # 40 -> 19 -> 10 -> 5 positions, head 5 * 25 -> 10.
  cnn1d = _abstract("cnn1d", (40, 1))
  assert models.param_count(cnn1d.params) == 5_210
  assert (5 * 1 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10) == 5_210
  assert cnn1d.params["head"]["kernel"].shape == (125, 10) and cnn1d.model_state == {}
  # The MLP of the same paper's table (two hidden layers of 100) has 15,210, as prox's mlp on [40, 1].
  assert models.param_count(_abstract("mlp", (40, 1), hidden=(100, 100)).params) == 15_210


def _conv1d_reference(x, kernel, bias, stride=2, pad=1):
  """``y[t, o] = b[o] + sum_{k, c} x_pad[stride * t + k, c] kernel[k, c, o]`` for one sequence [L, C]."""
  x = np.pad(x, ((pad, pad), (0, 0)))
  size = kernel.shape[0]
  steps = (len(x) - size) // stride + 1
  return np.stack([np.einsum("kc,kco->o", x[stride * t:stride * t + size], kernel)
                   for t in range(steps)]) + bias


def test_cnn1d_matches_hand_written_forward():
  fn = models.functional(models.make_model("cnn1d", input_shape=(40, 1), num_classes=10, seed=3))
  params = jax.tree.map(np.asarray, fn.params)
  x = np.random.default_rng(0).normal(size=(2, 40, 1)).astype(np.float32)
  logits, _ = jax.jit(fn.apply, static_argnames="train")(fn.params, {}, x, train=False)
  for row, sample in enumerate(x):
    h = sample.astype(np.float64)
    for layer, length in (("conv1", 19), ("conv2", 10), ("conv3", 5)):
      h = np.maximum(_conv1d_reference(h, params[layer]["kernel"], params[layer]["bias"]), 0.0)
      assert h.shape == (length, 25)
    expected = h.reshape(-1) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(np.asarray(logits[row]), expected, rtol=1e-4, atol=1e-5)
  # Images are read as sequences in row-major order: an 8x8x1 image is the sequence of its 64 pixels.
  square = models.functional(models.make_model("cnn1d", input_shape=(8, 8, 1), num_classes=10, seed=3))
  assert jax.tree.map(np.shape, square.params)["head"]["kernel"] == (8 * 25, 10)
  image = np.random.default_rng(1).normal(size=(1, 8, 8, 1)).astype(np.float32)
  as_image, _ = square.apply(square.params, {}, image, train=False)
  flat = models.functional(models.make_model("cnn1d", input_shape=(64, 1), num_classes=10, seed=3))
  as_sequence, _ = flat.apply(flat.params, {}, image.reshape(1, 64, 1), train=False)
  np.testing.assert_allclose(np.asarray(as_image), np.asarray(as_sequence), rtol=1e-6)


@pytest.mark.parametrize("name", models.MODELS)
def test_apply_under_jit_and_grad(name, digits_models):
  fn = digits_models[name]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3])
  grad_fn = jax.jit(jax.value_and_grad(functools.partial(_loss, fn.apply), has_aux=True))
  (loss, state), grads = grad_fn(fn.params, fn.model_state, images, labels)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(fn.params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # Gradient against a central finite difference along a random direction (float32 tolerance).
  direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), fn.params)
  norm = optax.tree.norm(direction)
  direction = jax.tree.map(lambda d: d / norm, direction)  # unit length
  shift = lambda eps: jax.tree.map(lambda p, d: p + eps * d, fn.params, direction)
  value = lambda p: grad_fn(p, fn.model_state, images, labels)[0][0]  # same compiled function
  eps = 1e-2
  numeric = (value(shift(eps)) - value(shift(-eps))) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(numeric), float(analytic), rtol=5e-2, atol=1e-3)
  # No recompilation on the second call; the returned state feeds straight back in.
  grad_fn(fn.params, state, images + 1.0, labels)
  assert grad_fn._cache_size() == 1  # pylint: disable=protected-access


def test_batch_norm_train_and_eval(digits_models):
  fn = digits_models["resnet20"]
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(loc=0.5, size=(6, 8, 8, 1)), jnp.float32)
  apply = jax.jit(fn.apply, static_argnames="train")

  _, eval_state = apply(fn.params, fn.model_state, images, train=False)
  for before, after in zip(jax.tree.leaves(fn.model_state), jax.tree.leaves(eval_state)):
    np.testing.assert_array_equal(before, after)

  _, train_state = apply(fn.params, fn.model_state, images, train=True)
  # The stem BatchNorm: running mean <- 0.9 * 0 + 0.1 * batch mean of the stem conv's output, and
  # running var <- 0.9 * 1 + 0.1 * batch variance.
  stem = jax.lax.conv_general_dilated(images, fn.params["conv"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(train_state["bn"]["mean"], 0.1 * stem.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(train_state["bn"]["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(fn.model_state),
                                                    jax.tree.leaves(train_state))]
  assert all(changed)

  # Eval mode: each example's logits do not depend on the rest of the batch; train mode: they do.
  others = images.at[3:].set(jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32))
  logits_eval, _ = apply(fn.params, train_state, images, train=False)
  mixed_eval, _ = apply(fn.params, train_state, others, train=False)
  np.testing.assert_allclose(logits_eval[:3], mixed_eval[:3], rtol=1e-5, atol=1e-5)
  logits_train, _ = apply(fn.params, fn.model_state, images, train=True)
  mixed_train, _ = apply(fn.params, fn.model_state, others, train=True)
  assert not np.allclose(logits_train[:3], mixed_train[:3], atol=1e-4)


def test_optax_and_orbax_take_params_and_state_as_they_are(tmp_path, digits_models):
  fn = digits_models["resnet20"]
  tx = optax.adam(1e-3)

  @jax.jit
  def adam_step(params):
    opt_state = tx.init(params)
    updates, opt_state = tx.update(params, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new_params, opt_state = adam_step(fn.params)
  assert jax.tree.structure(new_params) == jax.tree.structure(fn.params)
  tree = {"params": new_params, "model_state": fn.model_state, "opt_state": opt_state}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", tree)
  checkpointer.wait_until_finished()
  # String keys throughout, so even a restore without a target gives back the same structure.
  restored = checkpointer.restore(tmp_path / "ckpt")
  assert jax.tree.structure(restored["params"]) == jax.tree.structure(fn.params)
  assert jax.tree.structure(restored["model_state"]) == jax.tree.structure(fn.model_state)
  for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  fn = models.functional(models.make_model("cnn", input_shape=(8, 8, 1), num_classes=10,
                                           dtype=jnp.bfloat16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(fn.params))
  logits, _ = jax.jit(fn.apply, static_argnames="train")(fn.params, fn.model_state,
                                                         jnp.ones((2, 8, 8, 1)), train=True)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_mlp_learns_digits(digits_models):
  from prox.tasks import data  # pylint: disable=g-import-not-at-top

  train = data.load("digits", "train")
  fn = digits_models["mlp"]  # 64-256-256-10
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, images, labels):
    (loss, _), grads = jax.value_and_grad(
        functools.partial(_loss, fn.apply), has_aux=True)(params, {}, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, state = fn.params, tx.init(fn.params), data.loader_init(0)
  for _ in range(100):
    batch, state = data.next_batch(train, state, 128)
    params, opt_state, _ = step(params, opt_state, batch["image"], batch["label"])
  logits, _ = fn.apply(params, {}, train.images, train=False)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == train.labels))
  assert accuracy > 0.9, accuracy


def test_cnn1d_learns_fresh_mnist1d_samples():
  pytest.importorskip("mnist1d")
  from prox.tasks import data  # pylint: disable=g-import-not-at-top

  fn = models.functional(models.make_model("cnn1d", input_shape=(40, 1), num_classes=10, seed=0))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, images, labels):
    (loss, _), grads = jax.value_and_grad(
        functools.partial(_loss, fn.apply), has_aux=True)(params, {}, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, stream = fn.params, tx.init(fn.params), data.stream_init(0)
  for _ in range(300):
    batch, stream = data.next_mnist1d_stream_batch(stream, 100)
    params, opt_state, _ = step(params, opt_state, batch["image"], batch["label"])
  held_out, _ = data.next_mnist1d_stream_batch(data.stream_init(1), 2000)  # other seed: unseen samples
  logits, _ = fn.apply(params, {}, held_out["image"], train=False)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == held_out["label"]))
  assert accuracy > 0.6, accuracy  # chance is 0.1; the paper's linear model reaches 0.32


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown model 'vit'; known models: mlp, cnn, resnet20, cnn1d"):
    models.make_model("vit", input_shape=(8, 8, 1), num_classes=10)
  with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints, got 64"):
    models.make_model("mlp", input_shape=64, num_classes=10)
  with pytest.raises(ValueError, match=r"input_shape must be a tuple of positive ints, got \(8, 0, 1\)"):
    models.make_model("mlp", input_shape=(8, 0, 1), num_classes=10)
  with pytest.raises(ValueError, match=r"model 'cnn' takes images: input_shape must be \(H, W, C\)"):
    models.make_model("cnn", input_shape=(40, 1), num_classes=10)
  with pytest.raises(ValueError, match=r"model 'cnn1d' takes sequences.*length >= 3, got \(2, 1\)"):
    models.make_model("cnn1d", input_shape=(2, 1), num_classes=10)
  with pytest.raises(ValueError, match=r"model 'cnn1d' takes sequences"):
    models.make_model("cnn1d", input_shape=(40,), num_classes=10)
  with pytest.raises(TypeError, match="unknown option.*hidden for model 'cnn1d'"):
    models.make_model("cnn1d", input_shape=(40, 1), num_classes=10, hidden=8)
  with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
    models.make_model("cnn", input_shape=(8, 8, 1), num_classes=0)
  with pytest.raises(TypeError, match="unknown option.*depth for model 'resnet20'"):
    models.make_model("resnet20", input_shape=(8, 8, 1), num_classes=10, depth=56)
  with pytest.raises(ValueError, match="hidden must be a tuple of positive ints"):
    models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, hidden=(64, -1))
