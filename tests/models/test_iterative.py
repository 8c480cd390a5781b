"""Tests for prox.models._iterative: the weight-tied iterative classifier with per-example budgets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prox.losses._reasoning import interval_step_loss, per_step_cross_entropy
from prox.models import functional
from prox.models._iterative import IterativeClassifier, logits_at
from prox.tasks import data


@pytest.mark.parametrize("shape", [(8, 8, 1), (40, 1)])
def test_per_step_logits_shapes_on_digits_and_mnist1d(shape):
  model = IterativeClassifier(shape, 10, max_steps=5, halting=True, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda m, x: m.run(x))(model, jnp.ones((3, *shape)))
  assert out.logits.shape == (3, 5, 10) and out.halt_logits.shape == (3, 5)
  np.testing.assert_array_equal(np.asarray(out.steps), [5, 5, 5])
  assert nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, *shape))).shape == (2, 5, 10)


def test_budget_freezes_each_example_after_its_steps_without_recompiling():
  model = IterativeClassifier((8, 8, 1), 10, max_steps=6, rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def run(state, x, steps):
    traces.append(1)
    return nnx.merge(graphdef, state)(x, steps)

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  full = run(state, x, jnp.array([6, 6, 6, 6]))
  budget = jnp.array([1, 3, 6, 2])
  cut = run(state, x, budget)
  assert len(traces) == 1                         # the budget is a traced argument
  for i, n in enumerate([1, 3, 6, 2]):
    np.testing.assert_allclose(np.asarray(cut[i, :n]), np.asarray(full[i, :n]), rtol=1e-6)   # same steps
    for k in range(n, 6):
      np.testing.assert_array_equal(np.asarray(cut[i, k]), np.asarray(cut[i, n - 1]))      # frozen after
  assert not np.allclose(np.asarray(full[0, 0]), np.asarray(full[0, 5]))                    # steps do work
  np.testing.assert_array_equal(np.asarray(logits_at(cut, budget)), np.asarray(cut[:, -1]))
  np.testing.assert_array_equal(np.asarray(logits_at(full, 2)), np.asarray(full[:, 1]))


def test_weights_are_tied_parameter_count_independent_of_steps():
  count = lambda k: sum(x.size for x in jax.tree.leaves(nnx.state(
      IterativeClassifier((40, 1), 10, max_steps=k, rngs=nnx.Rngs(0)), nnx.Param)))
  assert count(2) == count(12)


def _manual_forward(p, x, k_max, detach_before):
  """The model's rule written out on its parameter dict; the state entering step ``detach_before`` is
  a constant."""
  dense = lambda layer, h: h @ layer["kernel"] + (layer["bias"] if "bias" in layer else 0.0)
  e = jnp.tanh(dense(p["encoder"], x.reshape(x.shape[0], -1)))
  inject = dense(p["cell_inject"], e)
  h, outs = e, []
  for k in range(1, k_max + 1):
    if k == detach_before:
      h = jax.lax.stop_gradient(h)
    h = h + dense(p["cell_out"], jnp.tanh(dense(p["cell_in"], h) + inject))
    outs.append(dense(p["head"], h))
  return jnp.stack(outs, 1)


def test_train_from_cuts_the_gradient_before_the_active_interval():
  model = IterativeClassifier((8, 8, 1), 10, max_steps=5, rngs=nnx.Rngs(2))
  f = functional(model)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  y = jnp.arange(6) % 10

  def loss(params, train_from, manual):
    if manual:
      logits = _manual_forward(params, x, 5, train_from)
    else:
      graphdef, state = nnx.split(model)
      m = nnx.merge(graphdef, nnx.State(jax.tree.map(lambda a: a, params)))
      logits = m(x, train_from=train_from)
    return jnp.mean(interval_step_loss(per_step_cross_entropy(logits, y), train_from))

  params = f.params
  np.testing.assert_allclose(np.asarray(_manual_forward(params, x, 5, 0)),
                             np.asarray(f.apply(params, {}, x, train=False)[0]), rtol=1e-5, atol=1e-6)
  g_model = jax.jit(jax.grad(lambda p: loss(p, 4, False)))(params)
  g_ref = jax.jit(jax.grad(lambda p: loss(p, 4, True)))(params)
  g_full = jax.jit(jax.grad(lambda p: loss(p, 0, True)))(params)
  for a, b in zip(jax.tree.leaves(g_model), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_full)))
  assert diff > 1e-4                                # without the cut the gradients differ


def test_iterative_classifier_learns_digits_with_a_per_step_loss():
  ds = data.load("digits", "train")
  test = data.load("digits", "test")
  model = IterativeClassifier((8, 8, 1), 10, width=32, hidden=64, max_steps=4, rngs=nnx.Rngs(0))
  f = functional(model)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      logits, _ = f.apply(p, {}, x, train=True)
      return jnp.mean(per_step_cross_entropy(logits, y))
    g = jax.grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  params, opt = f.params, tx.init(f.params)
  rng = np.random.default_rng(0)
  for _ in range(300):
    idx = rng.integers(0, len(ds.labels), 64)
    params, opt = step(params, opt, ds.images[idx], ds.labels[idx])
  logits, _ = f.apply(params, {}, test.images, train=False)
  acc = np.mean(np.argmax(np.asarray(logits), -1) == test.labels[:, None], 0)
  assert acc[-1] > 0.85 and acc[-1] >= acc[0] - 0.02, acc


def test_bad_options_raise():
  with pytest.raises(ValueError, match="max_steps"):
    IterativeClassifier((8, 8, 1), 10, max_steps=0, rngs=nnx.Rngs(0))
