"""The elastic (Once-for-All) CNN: sub-network forward vs a separately built small network, kernels, depth."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox.models import (ElasticConfig, depthwise_conv, elastic_apply, elastic_flops, extract_subnet, init_elastic, reorder_channels,
                         sandwich_loss, transformed_kernel)
from prox.tasks import Subnet

CFG = ElasticConfig(input_shape=(8, 8, 1), num_classes=3, stem_channels=4, stages=((4, 2, 1), (6, 2, 2)),
                    kernel_sizes=(3, 5), width_fractions=(0.5, 1.0), expand_ratio=2)


def random_params(seed=0, cfg=CFG):
  p = init_elastic(cfg, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  # Non-identity transforms and non-zero biases, so that every piece matters.
  return jax.tree.map(lambda a: a + 0.2 * jnp.asarray(rng.normal(size=a.shape), a.dtype), p)


PARAMS = random_params()
APPLY = jax.jit(lambda p, x, s: elastic_apply(p, x, s, config=CFG))
X = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 1)), jnp.float32)
GRAD = jax.jit(jax.grad(lambda p, s: APPLY(p, X, s).sum()))


def ref_kernel(dw, k_index, cfg):
  """By hand: W_5 = stored; W_3 = reshape(M_3 vec(centre_3(W_5)))."""
  w = np.asarray(dw["kernel"], np.float64)
  for j in range(len(cfg.kernel_sizes) - 2, k_index - 1, -1):
    k = cfg.kernel_sizes[j]
    s = (w.shape[0] - k) // 2
    w = w[s:s + k, s:s + k]
    w = (np.asarray(dw["transform"][f"{k}x{k}"], np.float64) @ w.reshape(k * k, -1)).reshape(k, k, -1)
  return w


def ref_small_network(p, x, subnet, cfg):
  """A plain CNN built by hand from the sliced weights of the chosen sub-network (float64 numpy/lax)."""
  dn = ("NHWC", "HWIO", "NHWC")
  x = np.asarray(x, np.float64)
  h = jax.lax.conv_general_dilated(x, np.asarray(p["stem"]["kernel"], np.float64), (1, 1), "SAME", dimension_numbers=dn)
  h = np.maximum(np.asarray(h) + np.asarray(p["stem"]["bias"]), 0)
  for i, b in enumerate(cfg.blocks):
    if b.index > 0 and b.index >= int(subnet.depth[b.stage]):
      continue
    e = max(1, math.ceil(cfg.width_fractions[int(subnet.width[i])] * b.mid_channels - 1e-9))
    bp = jax.tree.map(lambda a: np.asarray(a, np.float64), p["blocks"][b.name])
    y = np.maximum(h @ bp["expand"]["kernel"][:, :e] + bp["expand"]["bias"][:e], 0)
    kern = ref_kernel({"kernel": bp["depthwise"]["kernel"][:, :, :e], "transform": bp["depthwise"]["transform"]},
                      int(subnet.kernel[i]), cfg)
    y = jax.lax.conv_general_dilated(y, kern[:, :, None, :], (b.stride, b.stride), "SAME", dimension_numbers=dn,
                                     feature_group_count=e)
    y = np.maximum(np.asarray(y) + bp["depthwise"]["bias"][:e], 0)
    y = y @ bp["project"]["kernel"][:e] + bp["project"]["bias"]
    h = y + h if (b.stride == 1 and b.in_channels == b.out_channels) else y
  return h.mean(axis=(1, 2)) @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"])


subnets = st.builds(
    lambda k, w, d: Subnet(np.asarray(k, np.int32), np.asarray(w, np.int32), np.asarray(d, np.int32)),
    st.lists(st.integers(0, 1), min_size=4, max_size=4), st.lists(st.integers(0, 1), min_size=4, max_size=4),
    st.lists(st.integers(1, 2), min_size=2, max_size=2))


@settings(max_examples=20)
@given(subnet=subnets)
def test_subnet_forward_equals_a_separately_built_small_network(subnet):
  with jax.enable_x64(True):
    want = ref_small_network(PARAMS, X, subnet, CFG)
  got = APPLY(PARAMS, X, jax.tree.map(jnp.asarray, subnet))  # traced choice: one compilation for all
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  # Concrete choices resolve at trace time to the same function.
  np.testing.assert_allclose(elastic_apply(PARAMS, X, subnet, config=CFG), want, rtol=2e-4, atol=2e-4)


def test_extract_subnet_gives_the_small_networks_weights():
  subnet = Subnet(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 0]), np.array([1, 2]))
  small = extract_subnet(PARAMS, subnet, config=CFG)
  assert set(small["blocks"]) == {"stage1_block1", "stage2_block1", "stage2_block2"}
  b = small["blocks"]["stage1_block1"]  # kernel 3, width 0.5 of E = 8
  assert b["depthwise"]["kernel"].shape == (3, 3, 4) and b["expand"]["kernel"].shape == (4, 4)
  assert b["project"]["kernel"].shape == (4, 4)
  with jax.enable_x64(True):
    want = ref_kernel({"kernel": PARAMS["blocks"]["stage1_block1"]["depthwise"]["kernel"][:, :, :4],
                       "transform": PARAMS["blocks"]["stage1_block1"]["depthwise"]["transform"]}, 0, CFG)
  np.testing.assert_allclose(b["depthwise"]["kernel"], want, rtol=1e-5, atol=1e-6)
  b = small["blocks"]["stage2_block2"]  # kernel 5 (the stored one), width 0.5 of 12
  assert b["depthwise"]["kernel"].shape == (5, 5, 6)


def test_kernel_transform_shapes_and_identity_start():
  cfg = ElasticConfig(input_shape=(8, 8, 1), num_classes=2, stem_channels=2, stages=((2, 1, 1),),
                      kernel_sizes=(3, 5, 7), width_fractions=(1.0,), expand_ratio=2)
  p = init_elastic(cfg, jax.random.PRNGKey(0))
  dw = p["blocks"]["stage1_block1"]["depthwise"]
  assert dw["kernel"].shape == (7, 7, 4)
  assert {k: v.shape for k, v in dw["transform"].items()} == {"3x3": (9, 9), "5x5": (25, 25)}
  for i, k in enumerate((3, 5, 7)):
    w = transformed_kernel(dw, i, cfg)
    assert w.shape == (k, k, 4)
    s = (7 - k) // 2  # identity matrices: plain centre crops
    np.testing.assert_array_equal(w, dw["kernel"][s:s + k, s:s + k])
  # A non-identity 5x5 matrix changes the 5x5 and (through it) the 3x3 kernel, not the 7x7.
  m = jax.random.normal(jax.random.PRNGKey(1), (25, 25))
  dw2 = {**dw, "transform": {**dw["transform"], "5x5": m}}
  w5 = (m @ dw["kernel"][1:6, 1:6].reshape(25, -1)).reshape(5, 5, 4)
  np.testing.assert_allclose(transformed_kernel(dw2, 1, cfg), w5, rtol=1e-5)
  np.testing.assert_allclose(transformed_kernel(dw2, 0, cfg), w5[1:4, 1:4], rtol=1e-5)


def test_depth_keeps_the_first_blocks_and_skips_the_rest():
  full = Subnet(jnp.ones(4, jnp.int32), jnp.ones(4, jnp.int32), jnp.asarray([2, 2]))
  short = full._replace(depth=jnp.asarray([1, 2]))
  # Changing a skipped block's weights changes nothing; it gets a zero gradient.
  p2 = jax.tree.map(lambda a: a, PARAMS)
  p2["blocks"] = dict(p2["blocks"])
  p2["blocks"]["stage1_block2"] = jax.tree.map(lambda a: a * 3.0 + 1.0, PARAMS["blocks"]["stage1_block2"])
  np.testing.assert_array_equal(APPLY(PARAMS, X, short), APPLY(p2, X, short))
  assert not np.allclose(APPLY(PARAMS, X, full), APPLY(p2, X, full))
  g = GRAD(PARAMS, short)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(g["blocks"]["stage1_block2"]))
  assert float(jnp.abs(g["blocks"]["stage1_block1"]["expand"]["kernel"]).max()) > 0
  # Width: the second half of the middle channels gets no gradient at width 0.5.
  half = full._replace(width=jnp.zeros(4, jnp.int32))
  g = GRAD(PARAMS, half)
  assert float(jnp.abs(g["blocks"]["stage1_block1"]["expand"]["kernel"][:, 4:]).max()) == 0
  assert float(jnp.abs(g["blocks"]["stage1_block1"]["expand"]["kernel"][:, :4]).max()) > 0


def test_reorder_channels_sorts_by_importance_and_keeps_the_function():
  full = Subnet(jnp.ones(4, jnp.int32), jnp.ones(4, jnp.int32), jnp.asarray([2, 2]))
  q = reorder_channels(PARAMS, config=CFG)
  np.testing.assert_allclose(APPLY(q, X, full), APPLY(PARAMS, X, full), rtol=1e-5, atol=1e-5)
  for b in CFG.blocks:
    imp = np.abs(np.asarray(q["blocks"][b.name]["project"]["kernel"])).sum(axis=1)
    assert np.all(np.diff(imp) <= 0)
  # A width-0.5 sub-network now keeps the most important half.
  order = np.argsort(-np.abs(np.asarray(PARAMS["blocks"]["stage1_block1"]["project"]["kernel"])).sum(1), kind="stable")
  np.testing.assert_array_equal(q["blocks"]["stage1_block1"]["expand"]["kernel"],
                                np.asarray(PARAMS["blocks"]["stage1_block1"]["expand"]["kernel"])[:, order])


def test_elastic_flops_by_hand():
  s = Subnet(jnp.asarray([0, 1, 1, 0]), jnp.asarray([0, 1, 1, 1]), jnp.asarray([1, 2]))
  # stem 64*9*1*4; stage1_block1 (k3, e=4, 8x8): 64*4*4 + 64*9*4 + 64*4*4; stage1_block2 skipped;
  # stage2_block1 (k5, e=8, 8x8 -> 4x4, stride 2): 64*4*8 + 16*25*8 + 16*8*6;
  # stage2_block2 (k3, e=12, 4x4): 16*6*12 + 16*9*12 + 16*12*6; head 6*3.
  want = (64 * 9 * 4 + (64 * 16 + 64 * 36 + 64 * 16) + (64 * 32 + 16 * 200 + 16 * 48)
          + (16 * 72 + 16 * 108 + 16 * 72) + 18)
  assert float(elastic_flops(s, config=CFG)) == want
  assert float(jax.jit(lambda s: elastic_flops(s, config=CFG))(s)) == want


def test_sandwich_loss_by_hand_and_kd_stops_at_the_teacher():
  y = jnp.asarray([0, 1, 2])
  big = Subnet(jnp.ones(4, jnp.int32), jnp.ones(4, jnp.int32), jnp.asarray([2, 2]))
  small = Subnet(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), jnp.asarray([1, 1]))
  loss, aux = sandwich_loss(PARAMS, X, y, (big, small), config=CFG, kd_weight=0.5, temperature=2.0)
  zt, zs = APPLY(PARAMS, X, big), APPLY(PARAMS, X, small)
  ce = lambda z: float(np.mean(-jax.nn.log_softmax(z)[np.arange(3), y]))
  pt, ps = jax.nn.softmax(zt / 2.0), jax.nn.softmax(zs / 2.0)
  kl = float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)))
  np.testing.assert_allclose(float(loss), ce(zt) + ce(zs) + 0.5 * 4.0 * kl, rtol=1e-5)
  np.testing.assert_allclose(float(aux["kd_1"]), kl, rtol=1e-4, atol=1e-7)
  # The teacher receives no gradient from the KD term: d/dtheta of KD alone only reaches the student path.
  loss_same, aux_same = sandwich_loss(PARAMS, X, y, (big, big), config=CFG)
  assert abs(float(aux_same["kd_1"])) < 1e-6


@pytest.mark.parametrize("stride,size,k", [(1, 7, 3), (2, 7, 5), (2, 8, 3), (1, 6, 7)])
def test_depthwise_conv_matches_lax_in_value_and_gradient(stride, size, k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 3)), jnp.float32)
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  np.testing.assert_allclose(depthwise_conv(x, w, stride), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(lambda x, w: depthwise_conv(x, w, stride)), argnums=(0, 1))(x, w)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_config_validation_names_the_bad_value():
  with pytest.raises(ValueError, match="kernel_sizes"):
    ElasticConfig(input_shape=(8, 8, 1), num_classes=2, kernel_sizes=(5, 3))
  with pytest.raises(ValueError, match="width_fractions"):
    ElasticConfig(input_shape=(8, 8, 1), num_classes=2, width_fractions=(0.5, 0.75))
  with pytest.raises(ValueError, match="input_shape"):
    ElasticConfig(input_shape=(8, 8), num_classes=2)
