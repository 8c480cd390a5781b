"""Tests for prox.tasks._budgets: the budget schedules and the entropy curriculum against their rules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prox.tasks._budgets import budget_schedule, entropy_curriculum, predictive_entropy


def _trajectory(schedule, n, metrics=None):
  """budget(state) and value(state) after each of n updates, in one jitted scan."""
  metrics = jnp.full((n,), jnp.nan) if metrics is None else jnp.asarray(metrics, jnp.float32)

  @jax.jit
  def go(metrics):
    def body(state, x):
      state = schedule.update(state, metric=x)
      return state, (schedule.budget(state), schedule.value(state), state.changed)
    return jax.lax.scan(body, schedule.init(), metrics)[1]

  return [np.asarray(a) for a in go(metrics)]


def test_linear_budget_follows_the_formula_and_stays_at_the_end():
  schedule = budget_schedule(start=8, end=2, kind="linear", total_steps=60)
  budgets, values, changed = _trajectory(schedule, 80)
  ref = [8 + (2 - 8) * min(s / 60, 1.0) for s in range(1, 81)]
  np.testing.assert_allclose(values, ref, rtol=1e-6)
  np.testing.assert_array_equal(budgets, [math.ceil(v - 1e-4) for v in ref])
  assert budgets[59] == 2 and budgets[-1] == 2 and budgets[0] == 8
  np.testing.assert_array_equal(changed[1:], budgets[1:] != budgets[:-1])


def test_exponential_budget_is_train_long_think_short_decay():
  schedule = budget_schedule(start=16, end=2, kind="exponential", interval=10, decay=0.7)
  _, values, _ = _trajectory(schedule, 120)
  ref = [max(2.0, 16 * 0.7 ** (s // 10)) for s in range(1, 121)]
  np.testing.assert_allclose(values, ref, rtol=1e-5)
  # with only a horizon, the decay reaches the end exactly at total_steps
  horizon = budget_schedule(start=8, end=1, kind="exponential", interval=25, total_steps=100)
  budgets, values, _ = _trajectory(horizon, 100)
  gamma = (1 / 8) ** (25 / 100)
  np.testing.assert_allclose(values[[23, 24, 49, 74, 99]], [8, 8 * gamma, 8 * gamma**2, 8 * gamma**3, 1],
                             rtol=1e-5)
  assert budgets[24] == 5 and budgets[49] == 3 and budgets[-1] == 1


def _accuracy_reference(metrics, start, end, threshold, min_steps, delta, d):
  value, ema, n, held, out = start, 0.0, 0, 0, []
  for x in metrics:
    held += 1
    if not math.isnan(x):
      ema, n = d * ema + (1 - d) * x, n + 1
    smoothed = ema / (1 - d ** n) if n else math.nan
    if n and held >= min_steps and smoothed >= threshold and value > end:
      value, ema, n, held = max(end, value - delta), 0.0, 0, 0
    out.append(value)
  return out


def test_accuracy_triggered_budget_matches_a_python_reference():
  rng = np.random.default_rng(0)
  metrics = np.clip(np.linspace(0.3, 1.0, 200) + rng.normal(0, 0.05, 200), 0, 1)
  metrics[::7] = np.nan                      # steps without an evaluation
  schedule = budget_schedule(start=6, end=2, kind="accuracy", threshold=0.8, min_steps=5, delta=1.0,
                             metric_decay=0.8)
  budgets, values, _ = _trajectory(schedule, 200, metrics)
  ref = _accuracy_reference(metrics.tolist(), 6.0, 2.0, 0.8, 5, 1.0, 0.8)
  np.testing.assert_allclose(values, ref)
  assert budgets[0] == 6 and budgets[-1] == 2 and sorted(set(budgets.tolist())) == [2, 3, 4, 5, 6]


def test_budget_schedule_vmaps_and_reads_an_explicit_step():
  schedule = budget_schedule(start=8, end=2, kind="linear", total_steps=10)
  states = jax.vmap(lambda s: schedule.update(schedule.init(), step=s))(jnp.array([0, 5, 10, 20]))
  np.testing.assert_array_equal(np.asarray(schedule.budget(states)), [8, 5, 2, 2])


@pytest.mark.parametrize("kwargs,match", [
    (dict(start=2, end=4, kind="linear", total_steps=5), "tightens"),
    (dict(start=4, end=2, kind="linear"), "total_steps"),
    (dict(start=4, end=2, kind="exponential"), "decay or total_steps"),
    (dict(start=4, end=2, kind="exponential", decay=1.5), "decay"),
    (dict(start=4, end=2, kind="accuracy"), "threshold"),
    (dict(start=4, end=0, kind="linear", total_steps=5), "end"),
    (dict(start=4, end=2, kind="cosine"), "kind"),
])
def test_budget_schedule_rejects_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    budget_schedule(**kwargs)


def test_predictive_entropy_by_hand():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0], [1.0, 2.0, 3.0, 4.0]])
  p = np.exp([1.0, 2.0, 3.0, 4.0]) / np.exp([1.0, 2.0, 3.0, 4.0]).sum()
  h = np.asarray(predictive_entropy(logits))
  np.testing.assert_allclose(h, [math.log(4), 0.0, -(p * np.log(p)).sum()], atol=1e-5)
  np.testing.assert_allclose(np.asarray(predictive_entropy(logits, normalize=True))[0], 1.0, rtol=1e-6)


def test_entropy_curriculum_probabilities_follow_the_annealed_tilt():
  cur = entropy_curriculum(4, beta_start=4.0, beta_end=-2.0, total_steps=10)
  state = cur.init()
  np.testing.assert_allclose(np.asarray(cur.probabilities(state)), 0.25)   # nothing scored: uniform
  h = jnp.array([0.1, 0.5, 0.9])
  state = cur.update(state, jnp.array([0, 1, 2]), entropy=h)                # step 1: beta = 4 - 0.6
  beta = 4.0 - 6.0 * 0.1
  scores = np.array([0.1, 0.5, 0.9, 0.5])                                   # unseen example 3: the mean
  ref = np.exp(-beta * scores) / np.exp(-beta * scores).sum()
  np.testing.assert_allclose(float(cur.beta(state)), beta, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cur.probabilities(state)), ref, rtol=1e-5)
  late = cur.update(state, jnp.array([3]), entropy=jnp.array([0.2]), step=20)   # past the horizon
  assert float(cur.beta(late)) == -2.0
  p = np.asarray(cur.probabilities(late))
  assert p[2] > p[1] > p[3] > p[0]                                          # hard first at beta < 0


def test_entropy_curriculum_update_from_logits_ema_and_padding():
  cur = entropy_curriculum(3, ema=0.5)
  state = cur.update(cur.init(), jnp.array([0, -1]), jnp.array([[0.0, 0.0], [5.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(state.entropy)[0], 1.0, rtol=1e-6)
  assert np.isnan(np.asarray(state.entropy)[1:]).all()                      # the -1 row was ignored
  state = cur.update(state, jnp.array([0]), entropy=jnp.array([0.0]))
  np.testing.assert_allclose(np.asarray(state.entropy)[0], 0.5)
  with pytest.raises(ValueError, match="exactly one"):
    cur.update(state, jnp.array([0]))


def test_entropy_curriculum_samples_distinct_examples_with_its_probabilities():
  cur = entropy_curriculum(5, beta_start=3.0, beta_end=3.0, total_steps=1)
  state = cur.update(cur.init(), jnp.arange(5), entropy=jnp.array([0.0, 0.25, 0.5, 0.75, 1.0]))
  draws = jax.jit(jax.vmap(lambda k: cur.sample(state, k, 2)))(jax.random.split(jax.random.key(0), 4000))
  draws = np.asarray(draws)
  assert np.all(draws[:, 0] != draws[:, 1])
  first = np.bincount(draws[:, 0], minlength=5) / len(draws)     # the first draw follows p exactly
  np.testing.assert_allclose(first, np.asarray(cur.probabilities(state)), atol=0.03)
  with pytest.raises(ValueError, match="sample size"):
    cur.sample(state, jax.random.key(0), 6)


def test_budget_and_interval_machines_run_inside_prox_step():
  """The machines live in TrainState.extra, the loss reads them from ctx.extra, a transition updates them."""
  import optax
  from flax import nnx
  from prox import step as S
  from prox.losses import interval_step_loss, per_step_cross_entropy
  from prox.models import IterativeClassifier, functional
  from prox.tasks import backward_interval

  K = 4
  f = functional(IterativeClassifier((8, 8, 1), 10, width=8, hidden=8, max_steps=K, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(IterativeClassifier((8, 8, 1), 10, width=8, hidden=8, max_steps=K, rngs=nnx.Rngs(0)))
  schedule = budget_schedule(start=K, end=1, kind="linear", total_steps=6)
  interval = backward_interval(K, total_steps=6)

  def loss(params, model_state, batch, ctx):
    budget = schedule.budget(ctx.extra["budget"])
    t_start = interval.t_start(ctx.extra["interval"])
    model = nnx.merge(graphdef, nnx.State(params))
    logits = model(batch["image"], budget, train_from=t_start)
    value = jnp.mean(interval_step_loss(per_step_cross_entropy(logits, batch["label"]), t_start))
    return value, ({"budget": budget.astype(jnp.float32), "t_start": t_start.astype(jnp.float32)}, model_state)

  transition = S.chain_transitions(
      S.in_extra("budget", lambda s, info: schedule.update(s, step=info.step + 1)),
      S.in_extra("interval", lambda s, info: interval.update(s, step=info.step + 1)))
  tx = optax.sgd(0.1)
  mesh = S.data_mesh(jax.devices()[:1])
  step = S.make_train_step(loss, tx, mesh=mesh, transition=transition)
  state = S.replicate(S.init_state(f.params, tx, extra={"budget": schedule.init(), "interval": interval.init()}),
                      mesh)
  rng = np.random.default_rng(0)
  seen = []
  for _ in range(8):
    batch = {"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, 4)}
    state, out = step(state, S.shard_batch(batch, mesh))
    seen.append((int(out.metrics["budget"]), int(out.metrics["t_start"])))
  budgets = [math.ceil(K + (1 - K) * min(s / 6, 1.0) - 1e-4) for s in range(8)]
  t_starts = [K - min(K, 1 + (s * K) // 6) + 1 for s in range(8)]
  assert seen == list(zip(budgets, t_starts))
