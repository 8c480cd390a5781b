"""FGSM, PGD and the dual-input/dual-output loss (prox.robust)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prox import robust

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(6,)), jnp.float32)
X = jnp.asarray(RNG.uniform(0.2, 0.8, size=(5, 6)), jnp.float32)
Y = jnp.asarray([1.0, -1.0, 1.0, 1.0, -1.0])


def linear_loss(w, x, y):
  """Mean logistic loss of the linear score w.x: grad_x = -y sigma(-y w.x) w."""
  return jnp.mean(jnp.log1p(jnp.exp(-y * (x @ w))))


def test_fgsm_on_a_linear_model_is_the_closed_form():
  got = robust.fgsm(linear_loss, W, X, Y, eps=0.1, clip=None)
  want = X - 0.1 * Y[:, None] * jnp.sign(W)[None, :]  # x + eps sign(grad) = x - eps y sign(w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got = robust.fgsm(lambda w, x, y: jnp.sum(x @ w), W, X, Y, eps=0.05, clip=None)
  np.testing.assert_allclose(got, X + 0.05 * jnp.sign(W), rtol=1e-6)
  got = robust.fgsm(lambda w, x, y: jnp.sum(x @ w), W, X, Y, eps=0.05, norm="l2", clip=None)
  np.testing.assert_allclose(got, X + 0.05 * W / jnp.linalg.norm(W), rtol=1e-5)
  clipped = robust.fgsm(lambda w, x, y: jnp.sum(x @ w), W, X, Y, eps=0.5, clip=(0.0, 1.0))
  assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0


def test_pgd_on_a_linear_model_reaches_the_optimum_of_the_ball():
  key = jax.random.PRNGKey(0)
  lin = lambda w, x, y: jnp.sum(x @ w)
  # L-inf: step = eps moves any start to the corner x + eps sign(w) within two steps.
  got = robust.pgd(lin, W, X, Y, key, eps=0.1, step_size=0.1, steps=3, clip=None)
  np.testing.assert_allclose(got, X + 0.1 * jnp.sign(W), rtol=1e-6, atol=1e-7)
  # L2: converges to x + eps w / ||w||.
  got = robust.pgd(lin, W, X, Y, key, eps=0.3, step_size=0.3, steps=60, norm="l2", clip=None)
  np.testing.assert_allclose(got, X + 0.3 * W / jnp.linalg.norm(W), atol=1e-4)
  # Without a random start and with one step, PGD is FGSM.
  got = robust.pgd(linear_loss, W, X, Y, key, eps=0.1, step_size=0.1, steps=1, random_start=False, clip=None)
  np.testing.assert_allclose(got, robust.fgsm(linear_loss, W, X, Y, eps=0.1, clip=None), rtol=1e-6)


def mlp_loss(p, x, y):
  h = jnp.tanh(x @ p["w1"])
  return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"], y).mean()


MLP = {"w1": jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32), "w2": jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)}
YC = jnp.asarray([0, 1, 2, 1, 0])
PGD = jax.jit(robust.pgd, static_argnums=0, static_argnames=("steps", "norm", "clip"))


@settings(max_examples=20)
@given(eps=st.floats(0.0, 0.5), steps=st.sampled_from([0, 4]), norm=st.sampled_from(robust.NORMS),
       ratio=st.floats(0.1, 3.0), seed=st.integers(0, 2**31 - 1), clip=st.booleans())
def test_pgd_stays_in_the_ball_and_the_data_range(eps, steps, norm, ratio, seed, clip):
  box = (0.0, 1.0) if clip else None
  # eps and step_size traced: one compilation per (steps, norm, clip).
  xa = PGD(mlp_loss, MLP, X, YC, jax.random.PRNGKey(seed), eps=jnp.float32(eps), step_size=jnp.float32(ratio * eps),
           steps=steps, norm=norm, clip=box)
  d = np.asarray(xa - X, np.float64)
  if norm == "linf":
    assert np.abs(d).max() <= eps + 1e-6
  else:
    assert np.sqrt((d ** 2).sum(axis=1)).max() <= eps * (1 + 1e-5) + 1e-6
  if clip:
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0


def test_pgd_raises_the_loss_and_carries_no_gradient():
  xa = PGD(mlp_loss, MLP, X, YC, jax.random.PRNGKey(0), eps=jnp.float32(0.3), step_size=jnp.float32(0.05), steps=10,
           norm="linf", clip=(0.0, 1.0))
  assert float(mlp_loss(MLP, xa, YC)) > float(mlp_loss(MLP, X, YC)) + 0.1
  # The attack is an input: the gradient of the adversarial loss w.r.t. params does not flow through x_adv.
  g = jax.grad(lambda p: mlp_loss(p, robust.fgsm(mlp_loss, p, X, YC, eps=0.1), YC))(MLP)
  x_fixed = robust.fgsm(mlp_loss, MLP, X, YC, eps=0.1)
  g_fixed = jax.grad(lambda p: mlp_loss(p, x_fixed, YC))(MLP)
  np.testing.assert_allclose(g["w1"], g_fixed["w1"], rtol=1e-5)


def test_attacks_reject_bad_options():
  with pytest.raises(ValueError, match="norm"):
    robust.fgsm(mlp_loss, MLP, X, YC, eps=0.1, norm="l1")
  with pytest.raises(ValueError, match="eps"):
    robust.pgd(mlp_loss, MLP, X, YC, jax.random.PRNGKey(0), eps=-1.0, step_size=0.1, steps=1)
  with pytest.raises(ValueError, match="steps"):
    robust.pgd(mlp_loss, MLP, X, YC, jax.random.PRNGKey(0), eps=0.1, step_size=0.1, steps=-1)


def test_dual_io_loss_by_hand_and_unify():
  apply = lambda p, x: x @ p["w"]
  params = {"original": {"w": jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)},
            "augmented": {"w": jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)}}
  xa = X[::-1]
  loss, aux = robust.dual_io_loss(robust.pair_apply(apply), params, X, xa, YC, weights=(1.0, 0.5))
  ce = lambda z: float(np.mean(-jax.nn.log_softmax(z)[np.arange(5), YC]))
  want_o, want_a = ce(X @ params["original"]["w"]), ce(xa @ params["augmented"]["w"])
  np.testing.assert_allclose(float(loss), want_o + 0.5 * want_a, rtol=1e-6)
  np.testing.assert_allclose(float(aux["augmented"]), want_a, rtol=1e-6)
  # Each sub-model's gradient comes from its own input only.
  g = jax.grad(lambda p: robust.dual_io_loss(robust.pair_apply(apply), p, X, xa, YC)[0])(params)
  g_o = jax.grad(lambda w: optax.softmax_cross_entropy_with_integer_labels(X @ w, YC).mean())(params["original"]["w"])
  np.testing.assert_allclose(g["original"]["w"], g_o, rtol=1e-5)
  merged = robust.unify_submodels(params, weight=0.25)
  np.testing.assert_allclose(merged["w"], 0.25 * params["original"]["w"] + 0.75 * params["augmented"]["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="weights"):
    robust.dual_io_loss(robust.pair_apply(apply), params, X, xa, YC, weights=(1.0,))
  with pytest.raises(ValueError, match="original"):
    robust.unify_submodels({"a": 1})
