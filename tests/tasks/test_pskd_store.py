"""Tests for prox.tasks.pskd: the PS-KD prediction store, target transition and ECE; on the loop, the same
result on 1 device, 1 device with micro-batches and 4 devices (subprocesses with fake CPU devices)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks import pskd


def test_alpha_schedule():
  for t in range(10):
    assert float(pskd.alpha(t, num_epochs=10)) == pytest.approx(0.8 * (t + 1) / 10)
  assert float(pskd.alpha(4, num_epochs=5, alpha_T=0.5)) == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_targets_follow_the_formula(dtype):
  rng = np.random.default_rng(0)
  n, c, T = 12, 5, 10
  state = pskd.init(n, c, dtype)
  idx = np.array([3, 7, 0, 11])
  labels = np.array([1, 4, 0, 2])
  onehot = np.eye(c)[labels]
  # epoch 0: nothing stored yet -> P = onehot -> target = onehot
  np.testing.assert_allclose(np.asarray(pskd.targets(state, idx, labels, epoch=0, num_epochs=T), np.float32),
                             onehot, atol=1e-6)
  logits = rng.normal(size=(4, c)).astype(np.float32)
  state = pskd.store(state, idx, logits)
  assert state.predictions.dtype == dtype
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  for epoch in (1, 6):
    a = 0.8 * (epoch + 1) / T
    got = np.asarray(pskd.targets(state, idx, labels, epoch=epoch, num_epochs=T), np.float32)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(got, (1 - a) * onehot + a * probs, atol=tol)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=tol * c)
  # unseen examples still get their one-hot labels
  got = np.asarray(pskd.targets(state, np.array([5]), np.array([3]), epoch=6, num_epochs=T), np.float32)
  np.testing.assert_allclose(got[0], np.eye(c)[3], atol=1e-6)


def test_store_overwrites_and_drops_padding_and_jits():
  state = pskd.init(6, 3)
  store = jax.jit(pskd.store)
  state = store(state, jnp.array([0, 1, 2]), jnp.zeros((3, 3)), jnp.array([True, True, False]))
  np.testing.assert_array_equal(np.asarray(state.seen), [True, True, False, False, False, False])
  np.testing.assert_allclose(np.asarray(state.predictions[:2]), 1 / 3, rtol=1e-6)
  assert float(jnp.sum(state.predictions[2:])) == 0.0
  state = store(state, jnp.array([1, 4, 5]), jnp.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]]),
                jnp.array([True, True, True]))
  assert float(state.predictions[1, 0]) > 0.99 and store._cache_size() == 1
  # gradients do not flow into the stored predictions
  g = jax.grad(lambda z: jnp.sum(pskd.store(pskd.init(2, 3), jnp.array([0, 1]), z).predictions))(jnp.ones((2, 3)))
  assert float(jnp.sum(jnp.abs(g))) == 0.0


def test_pskd_loss_with_optax():
  state = pskd.init(4, 3)
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  state = pskd.store(state, jnp.array([0, 1]), logits)
  t = pskd.targets(state, jnp.array([0, 1]), jnp.array([0, 2]), epoch=9, num_epochs=10)
  loss = optax.softmax_cross_entropy(logits, t)
  assert loss.shape == (2,) and bool(jnp.all(jnp.isfinite(loss)))


def test_ece_by_hand():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
  labels = np.array([0, 1, 0, 0, 1])
  # 15 bins of width 1/15: conf 0.9 -> bin 13, 0.8 -> 11, 0.6 -> 8, 0.55 -> 8, 0.7 -> 10
  expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(2 - 1.15) + abs(1 - 0.7)) / 5
  assert float(pskd.ece(probs, labels)) == pytest.approx(expected, rel=1e-6)
  # one bin: |accuracy - mean confidence|
  assert float(pskd.ece(probs, labels, num_bins=1)) == pytest.approx(abs(4 / 5 - np.mean(probs.max(1))), rel=1e-6)
  perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert float(pskd.ece(perfect, np.array([0, 1]))) == 0.0


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: pskd.init(0, 3), "num_examples"),
      (lambda: pskd.alpha(0, num_epochs=0), "num_epochs"),
      (lambda: pskd.alpha(0, num_epochs=3, alpha_T=1.5), "alpha_T"),
      (lambda: pskd.store(pskd.init(3, 2), jnp.array([0]), jnp.zeros((1, 3))), "logits"),
      (lambda: pskd.ece(np.zeros(3), np.zeros(3)), "probs"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)


# --- PS-KD on prox.step / prox.loop: the store in TrainState.extra, written by a transition -------------

_LAYOUT_RUN = r"""
import os, sys
devices, micro, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, optax
from prox import loop, models, step as S
from prox.losses import classification_loss
from prox.tasks import data, irt, pskd
assert jax.device_count() == devices
rng = np.random.default_rng(0)
x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
ds = data.ArrayDataset(x, rng.integers(0, 4, size=40).astype(np.int32), 4, "toy")
net = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=4, seed=0, hidden=(16,)))
tx = optax.sgd(0.5)                    # plain SGD: a wrongly scaled reduction changes every number
mesh = S.data_mesh()
loss = classification_loss(net.apply, targets_fn=pskd.targets_fn(num_epochs=3))
step = S.make_train_step(loss, tx, mesh=mesh, micro_batch_size=micro or None, transition=pskd.transition(net.apply))
state = S.replicate(S.init_state(net.params, tx, extra={"pskd": pskd.init(40, 4)}, seed=0), mesh)
losses = []
result = loop.run(step, state, irt.SubsetSource(ds, 1, num_epochs=3), mesh=mesh, batch_size=16, num_steps=100,
                  actions=((loop.Every(steps=1), lambda c: losses.append(float(c.out.metrics["loss"]))),))
final = jax.device_get(result.state)
np.savez(out, *jax.tree.leaves(final.params), predictions=final.extra["pskd"].predictions,
         seen=final.extra["pskd"].seen, losses=np.asarray(losses), steps=int(final.step))
"""


def test_pskd_on_the_loop_is_layout_independent(tmp_path):
  """1 device == 1 device x 4 micro-batches == 4 devices: parameters, every loss and the whole store."""
  layouts = {"1 device": (1, 0), "1 device x 4 micro-batches": (1, 4), "4 devices": (4, 0)}
  procs = {name: subprocess.Popen([sys.executable, "-c", _LAYOUT_RUN, str(d), str(m), str(tmp_path / f"{i}.npz")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, (name, (d, m)) in enumerate(layouts.items())}
  outs = {}
  for i, (name, proc) in enumerate(procs.items()):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    with np.load(tmp_path / f"{i}.npz") as f:
      outs[name] = {k: f[k] for k in f.files}
  ref = outs["1 device"]
  assert int(ref["steps"]) == 9 and ref["seen"].all()   # 3 epochs of ceil(40 / 16) = 3 steps; all stored
  for name, got in outs.items():
    assert got.keys() == ref.keys(), name
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=f"{name}: {k}")


def test_targets_fn_and_transition_check_their_arguments():
  for call, match in [(lambda: pskd.targets_fn(num_epochs=0), "num_epochs"),
                      (lambda: pskd.targets_fn(num_epochs=3, alpha_T=-0.1), "alpha_T")]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)


def test_pskd_store_factory_bundles_the_functions():
  store = pskd.pskd_store(6, 3, num_epochs=4, alpha_T=0.5)
  state = store.init()
  idx, labels = np.array([0, 2]), np.array([1, 2])
  state = store.write(state, idx, jnp.ones((2, 3)))
  np.testing.assert_allclose(store.targets(state, idx, labels, 2),
                             pskd.targets(state, idx, labels, epoch=2, num_epochs=4, alpha_T=0.5))
  with pytest.raises(ValueError):
    pskd.pskd_store(6, 3, num_epochs=0)
