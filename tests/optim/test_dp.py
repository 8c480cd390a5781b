"""Tests for prox.optim._dp: ghost clipping against the vmap(grad)-clip-sum reference in float64, the noise,
the loss form for prox.step (one and two devices) and the optax transform."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prox.models import functional
from prox.models._iterative import IterativeClassifier
from prox.models._zoo import CNN, MLP
from prox.optim._dp import (clip_factors, clipped_grad_sum, dp_gradient, dp_noise, ghost_clipped_loss,
                            per_example_grad_norms)


def _per_example_ce(apply):
  def loss(params, batch):
    logits, _ = apply(params, {}, batch["image"], train=False)
    logits = logits if logits.ndim == 2 else logits[:, -1]          # iterative model: the last step
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return loss


def _per_example_grads(loss_fn, params, batch):
  return jax.vmap(lambda ex: jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda a: a[None], ex))[0])(params))(batch)


def _reference_clipped_sum(loss_fn, params, batch, clip):
  """The definition, written out: per-example gradients by vmap(grad), their norms, clip, sum."""
  grads = _per_example_grads(loss_fn, params, batch)
  norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree.leaves(grads)))
  scale = jnp.minimum(1.0, clip / norms)
  return jax.tree.map(lambda g: jnp.einsum("m,m...->...", scale, g), grads), norms


def _model(kind):
  if kind == "mlp":
    return MLP((8, 8, 1), 10, hidden=(16, 12), rngs=nnx.Rngs(0)), (8, 8, 1)
  if kind == "cnn":
    return CNN((8, 8, 1), 10, width=4, hidden=8, rngs=nnx.Rngs(0)), (8, 8, 1)
  return IterativeClassifier((40, 1), 10, width=8, hidden=12, max_steps=3, rngs=nnx.Rngs(0)), (40, 1)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "iterative"])
def test_ghost_clipping_matches_the_vmap_reference_in_float64(kind):
  model, shape = _model(kind)
  f = functional(model)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), f.params)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.normal(size=(12, *shape))), "label": jnp.asarray(rng.integers(0, 10, 12))}
    loss_fn = _per_example_ce(f.apply)
    grads = jax.tree.map(np.asarray, jax.jit(lambda p: _per_example_grads(loss_fn, p, batch))(params))
    ref_norms = np.sqrt(sum(np.sum(g.reshape(12, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    clip = float(np.median(ref_norms))                  # about half the examples are clipped
    scale = np.minimum(1.0, clip / ref_norms)
    ref_sum = jax.tree.map(lambda g: np.einsum("m,m...->...", scale, g), grads)
    both = jax.jit(lambda p: (clipped_grad_sum(loss_fn, p, batch, clip),
                              clipped_grad_sum(loss_fn, p, batch, clip, method="vmap")))
    ghost, vmapped = both(params)
    # prox.taps accumulates the norms in float32 (at least): ghost norms agree to float32 precision, the
    # vmap method (float64 throughout) to float64 precision
    np.testing.assert_allclose(np.asarray(ghost.norms), ref_norms, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(vmapped.norms), ref_norms, rtol=1e-12)
    assert 0 < int(jnp.sum(ghost.scale < 1)) < 12
    for a, b, c in zip(jax.tree.leaves(ghost.grad_sum), jax.tree.leaves(ref_sum), jax.tree.leaves(vmapped.grad_sum)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6 * np.abs(b).max())
      np.testing.assert_allclose(np.asarray(c), b, rtol=1e-11, atol=1e-14)


def test_weight_tied_layers_need_the_summed_per_example_gradient():
  # the iterative model calls its cell 3 times: the calls' squared norms must not be summed separately
  # (prox.taps merges the calls of one kernel along positions)
  from prox import taps
  model, shape = _model("iterative")
  f = functional(model)
  batch = {"image": jax.random.normal(jax.random.key(0), (5, *shape)), "label": jnp.arange(5)}
  loss_fn = _per_example_ce(f.apply)

  @jax.jit
  def go(params):
    _, norms = per_example_grad_norms(loss_fn, params, batch)
    _, ref = _reference_clipped_sum(loss_fn, params, batch, 1.0)
    _, _, tapped = taps.value_and_grad(lambda p, b: jnp.mean(loss_fn(p, b)))(params, batch)
    separate = sum(taps.sq_norms([t], [d]) for t, d in zip(tapped.taps, tapped.deltas))
    return norms, ref, jnp.sqrt(taps.sq_norms(tapped.taps, tapped.deltas)) * 5, jnp.sqrt(separate) * 5

  norms, ref, merged, separate = go(f.params)
  np.testing.assert_allclose(np.asarray(norms), np.asarray(ref), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(ref), rtol=1e-4)
  assert not np.allclose(np.asarray(separate), np.asarray(ref), rtol=1e-3)


def test_dp_gradient_noise_free_equals_optax_aggregate_and_noise_has_the_right_scale():
  model, shape = _model("mlp")
  f = functional(model)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, *shape)), jnp.float32), "label": jnp.asarray(rng.integers(0, 10, 16))}
  loss_fn = _per_example_ce(f.apply)
  clip, sigma = 0.5, 2.0
  run = jax.jit(lambda p, k, s: dp_gradient(loss_fn, p, batch, clip, k, s))
  mean = run(f.params, jax.random.key(3), 0.0)
  agg = optax.contrib.differentially_private_aggregate(clip, 0.0, key=jax.random.key(0))
  ref = jax.jit(lambda p: agg.update(_per_example_grads(loss_fn, p, batch), agg.init(p))[0])(f.params)
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  noised = run(f.params, jax.random.key(3), sigma)
  z = np.concatenate([np.ravel((np.asarray(a) - np.asarray(b)) * 16 / (sigma * clip))
                      for a, b in zip(jax.tree.leaves(noised), jax.tree.leaves(mean))])
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05, (z.mean(), z.std())
  with pytest.raises(ValueError, match="key"):
    dp_gradient(loss_fn, f.params, batch, clip, None, 1.0)


def test_ghost_clipped_loss_gradient_is_the_mean_clipped_gradient():
  model, shape = _model("cnn")
  f = functional(model)
  batch = {"image": jax.random.normal(jax.random.key(0), (8, *shape)), "label": jnp.arange(8) % 10}
  loss_fn = _per_example_ce(f.apply)
  loss = ghost_clipped_loss(loss_fn, 0.3)
  (value, metrics), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(f.params, batch)
  ref, norms = jax.jit(lambda p: _reference_clipped_sum(loss_fn, p, batch, 0.3))(f.params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) / 8, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["clipped_fraction"]), float(np.mean(np.asarray(norms) > 0.3)))
  np.testing.assert_allclose(float(metrics["loss_unclipped"]), float(jnp.mean(loss_fn(f.params, batch))), rtol=1e-5)


def test_dp_noise_transform_scale_and_fresh_draws():
  tx = dp_noise(2.0, 1.5, 100, key=0)
  zeros = {"w": jnp.zeros((20000,))}
  state = tx.init(zeros)
  a, state = tx.update(zeros, state)
  b, state = tx.update(zeros, state)
  assert abs(float(jnp.std(a["w"])) - 1.5 * 2.0 / 100) < 0.001
  assert not np.allclose(np.asarray(a["w"]), np.asarray(b["w"]))
  with pytest.raises(ValueError, match="batch_size"):
    dp_noise(1.0, 1.0, 0)


def test_untapped_parameters_and_bad_options_are_refused():
  model, shape = _model("mlp")
  f = functional(model)
  params = {**f.params, "scale": jnp.ones(())}
  batch = {"image": jnp.ones((4, *shape)), "label": jnp.arange(4)}
  base = _per_example_ce(f.apply)
  loss_fn = lambda p, b: p["scale"] * base({k: v for k, v in p.items() if k != "scale"}, b)
  with pytest.raises(ValueError, match="cover"):
    clipped_grad_sum(loss_fn, params, batch, 1.0)
  assert jax.jit(lambda p: clipped_grad_sum(loss_fn, p, batch, 1.0, method="vmap").norms)(params).shape == (4,)
  with pytest.raises(ValueError, match="clip"):
    clipped_grad_sum(base, f.params, batch, -1.0)
  with pytest.raises(ValueError, match="method"):
    clipped_grad_sum(base, f.params, batch, 1.0, method="bk")
  np.testing.assert_allclose(np.asarray(clip_factors(jnp.array([0.0, 0.5, 2.0]), 1.0)), [1.0, 1.0, 0.5])


STEP_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from prox import step as S
    from prox.models import functional
    from prox.models._zoo import MLP
    from prox.optim._dp import ghost_clipped_loss, clipped_grad_sum
    f = functional(MLP((8, 8, 1), 10, hidden=(16,), rngs=nnx.Rngs(0)))
    def per_example(params, batch):
      logits, _ = f.apply(params, {}, batch["image"], train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    loss = ghost_clipped_loss(per_example, 0.2, axis_name=S.DATA_AXIS)
    tx = optax.sgd(1.0)
    mesh = S.data_mesh()
    step = S.make_train_step(S.stateless(lambda p, b, r: loss(p, b)), tx, mesh=mesh, donate=False)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}
    state = S.replicate(S.init_state(f.params, tx), mesh)
    new, out = step(state, S.shard_batch(batch, mesh))
    ref = clipped_grad_sum(per_example, f.params, batch, 0.2).grad_sum
    err = max(float(np.max(np.abs(np.asarray(p0) - np.asarray(p1) - np.asarray(g) / 8)))
              for p0, p1, g in zip(jax.tree.leaves(f.params), jax.tree.leaves(new.params), jax.tree.leaves(ref)))
    print("ERR", err, len(jax.devices()))
""")


def test_ghost_clipped_loss_in_prox_step_on_two_devices(tmp_path):
  devices = 2
  script = tmp_path / "step.py"
  script.write_text(STEP_SCRIPT)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  line = [l for l in out.stdout.splitlines() if l.startswith("ERR")][-1].split()
  assert int(line[2]) == devices and float(line[1]) < 1e-6, line
