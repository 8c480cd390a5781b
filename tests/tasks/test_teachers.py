"""Tests for prox.tasks._teachers: stacked and switched banks of frozen teachers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox import losses as L
from prox import models
from prox.tasks import stacked_teacher_bank, switched_teacher_bank


def _mlp_params(key, sizes):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.full((b,), 0.1)})
  return params


def _mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


@pytest.mark.parametrize("selection", ["switch", "slice"])
def test_stacked_bank_selects_each_teacher_with_one_compile(selection):
  teachers = [_mlp_params(k, (8, 16, 3)) for k in jax.random.split(jax.random.key(0), 3)]
  bank = stacked_teacher_bank(_mlp, selection=selection)
  state = bank.init(teachers)
  assert jax.tree.leaves(state)[0].shape[0] == 3
  x = jax.random.normal(jax.random.key(1), (5, 8))
  run = jax.jit(bank.apply)
  for k in range(3):
    np.testing.assert_allclose(run(state, jnp.int32(k), x), _mlp(teachers[k], x), rtol=1e-6)
  assert run._cache_size() == 1
  np.testing.assert_allclose(run(state, jnp.int32(7), x), _mlp(teachers[2], x), rtol=1e-6)   # clamped
  np.testing.assert_allclose(jax.tree.leaves(bank.select(state, 1))[0], jax.tree.leaves(teachers[1])[0])


def test_teachers_receive_no_gradient():
  teachers = [_mlp_params(k, (8, 16, 3)) for k in jax.random.split(jax.random.key(0), 2)]
  x = jax.random.normal(jax.random.key(1), (5, 8))
  student = _mlp_params(jax.random.key(2), (8, 4, 3))
  for bank in (stacked_teacher_bank(_mlp), stacked_teacher_bank(_mlp, selection="slice"),
               switched_teacher_bank([_mlp, _mlp])):
    state = bank.init(teachers)

    def loss(student, state):
      return L.kd_loss(_mlp(student, x), bank.apply(state, 1, x), temperature=2.0).mean()

    g_student, g_bank = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, state)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_bank))
    assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(g_student))


@pytest.mark.parametrize("selection", ["switch", "slice"])
def test_stacked_bank_under_vmap(selection):
  teachers = [_mlp_params(k, (8, 16, 3)) for k in jax.random.split(jax.random.key(0), 3)]
  bank = stacked_teacher_bank(_mlp, selection=selection)
  state = bank.init(teachers)
  x = jax.random.normal(jax.random.key(1), (5, 8))
  out = jax.vmap(bank.apply, in_axes=(None, 0, None))(state, jnp.array([2, 0, 1]), x)
  for i, k in enumerate((2, 0, 1)):
    np.testing.assert_allclose(out[i], _mlp(teachers[k], x), rtol=1e-5)


def test_switched_bank_runs_different_architectures():
  small = _mlp_params(jax.random.key(3), (8, 4, 3))
  big = _mlp_params(jax.random.key(4), (8, 32, 32, 3))

  def linear(p, x):
    return x @ p["w"]

  lin = {"w": jax.random.normal(jax.random.key(5), (8, 3))}
  bank = switched_teacher_bank([_mlp, _mlp, linear])
  state = bank.init([small, big, lin])
  x = jax.random.normal(jax.random.key(6), (5, 8))
  run = jax.jit(bank.apply)
  for k, want in enumerate((_mlp(small, x), _mlp(big, x), linear(lin, x))):
    np.testing.assert_allclose(run(state, jnp.int32(k), x), want, rtol=1e-5)
  assert run._cache_size() == 1
  # a batch of indices under vmap (lax.switch becomes a select over the branches)
  out = jax.vmap(bank.apply, in_axes=(None, 0, None))(state, jnp.array([2, 0]), x)
  np.testing.assert_allclose(out[0], linear(lin, x), rtol=1e-5)
  np.testing.assert_allclose(out[1], _mlp(small, x), rtol=1e-5)
  assert bank.select(state, 2) is not None
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(bank.select)(state, 1)


def test_bank_with_prox_models_and_static_kwargs():
  mods = [models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, hidden=(32,),
                                              seed=s)) for s in (0, 1)]

  def apply(v, images, *, train):
    return mods[0].apply(v["params"], v["model_state"], images, train=train)[0]

  bank = stacked_teacher_bank(apply)
  state = bank.init([{"params": m.params, "model_state": m.model_state} for m in mods])
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  got = jax.jit(lambda s, k, x: bank.apply(s, k, x, train=False))(state, jnp.int32(1), x)
  np.testing.assert_allclose(got, mods[1].apply(mods[1].params, mods[1].model_state, x, train=False)[0],
                             rtol=1e-5)


def test_bank_errors_and_checkpoint(orbax_round_trip):
  bank = stacked_teacher_bank(_mlp)
  with pytest.raises(ValueError, match="teacher 1 leaf"):
    bank.init([_mlp_params(jax.random.key(0), (8, 16, 3)), _mlp_params(jax.random.key(1), (8, 17, 3))])
  with pytest.raises(ValueError, match="tree structure"):
    bank.init([_mlp_params(jax.random.key(0), (8, 16, 3)), _mlp_params(jax.random.key(1), (8, 3))])
  with pytest.raises(ValueError, match="sequence"):
    bank.init([])
  with pytest.raises(ValueError, match="index"):
    bank.apply(bank.init([_mlp_params(jax.random.key(0), (8, 3))]), 0.5, jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="selection"):
    stacked_teacher_bank(_mlp, selection="gather")
  with pytest.raises(ValueError, match="2 parameter trees for 1"):
    switched_teacher_bank([_mlp]).init([_mlp_params(jax.random.key(0), (8, 3))] * 2)
  state = bank.init([_mlp_params(k, (8, 16, 3)) for k in jax.random.split(jax.random.key(0), 2)])
  restored = orbax_round_trip(state)
  x = jnp.ones((2, 8))
  np.testing.assert_array_equal(bank.apply(restored, 1, x), bank.apply(state, 1, x))
