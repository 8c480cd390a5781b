"""Tests for prox.tasks._stages: the stage machine, its triggers and the ERNIE-Tiny / Orca tables."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from prox import losses as L
from prox.tasks import Stage, ernie_tiny_stages, orca_stages, stacked_teacher_bank, stage_machine


def _run(machine, steps, samples, metrics):
  """Runs ``update`` over a whole trajectory in one jitted scan; returns the stage after each update."""

  @jax.jit
  def go(steps, samples, metrics):
    def body(state, xs):
      state = machine.update(state, step=xs[0], samples=xs[1], metric=xs[2])
      return state, (state.stage, state.switched)
    return jax.lax.scan(body, machine.init(), (steps, samples, metrics))

  return go(jnp.asarray(steps, jnp.int32), jnp.asarray(samples, jnp.int32), jnp.asarray(metrics, jnp.float32))


def _reference(stages, batches, metrics, decay):
  """The rule of the module docstring in plain Python: the stage after each update."""
  stage, start_step, start_samples, ema, n, out = 0, 0, 0, 0.0, 0, []
  step = samples = 0
  for b, x in zip(batches, metrics):
    step, samples = step + 1, samples + b
    s = stages[stage]
    if not math.isnan(x):
      ema, n = decay * ema + (1 - decay) * x, n + 1
    smoothed = ema / (1 - decay ** n) if n else math.nan
    steps_in, samples_in = step - start_step, samples - start_samples
    done = (s.steps is not None and steps_in >= s.steps) or (s.samples is not None and samples_in >= s.samples)
    if n and steps_in >= s.min_steps:
      done |= s.metric_below is not None and smoothed < s.metric_below
      done |= s.metric_above is not None and smoothed > s.metric_above
    if done and stage < len(stages) - 1:
      stage, start_step, start_samples, ema, n = stage + 1, step, samples, 0.0, 0
    out.append(stage)
  return out


def test_ernie_tiny_table_switches_teacher_data_and_objective_one_at_a_time():
  machine = stage_machine(ernie_tiny_stages(general_steps=3, general_enhanced_steps=2, task_adaptive_steps=4))
  assert machine.loss_names == ("latent", "soft", "hard")
  state = machine.init()
  seen = []
  update = jax.jit(lambda s, i: machine.update(s, step=i))
  read = jax.jit(lambda s: (machine.stage(s), machine.teacher(s), machine.source(s), machine.weights(s)))
  for i in range(1, 13):
    state = update(state, i)
    stage, teacher, source, weights = read(state)
    seen.append((i, int(stage), int(teacher), int(source), tuple(weights.tolist())))
  latent, full = (1.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  # after update i, step i is the next to run: steps 0-2 general, 3-4 enhanced, 5-8 adaptive, 9- specific
  assert seen[1] == (2, 0, 0, 0, latent)
  assert seen[2] == (3, 1, 1, 0, latent)
  assert seen[4] == (5, 2, 1, 1, latent)
  assert seen[7] == (8, 2, 1, 1, latent)
  assert seen[8] == (9, 3, 1, 1, full)
  assert seen[11] == (12, 3, 1, 1, full)
  assert update._cache_size() == 1 and read._cache_size() == 1
  custom = ernie_tiny_stages(general_steps=1, general_enhanced_steps=1, task_adaptive_steps=1,
                             task_specific_weights={"latent": 1.0, "soft": 0.5, "hard": 0.1})
  assert custom[-1].weights == {"latent": 1.0, "soft": 0.5, "hard": 0.1}
  with pytest.raises(ValueError, match="unknown losses"):
    ernie_tiny_stages(general_steps=1, general_enhanced_steps=1, task_adaptive_steps=1,
                      task_specific_weights={"attention": 1.0})


def test_orca_table_and_sample_boundaries():
  machine = stage_machine(orca_stages(first_samples=100))
  assert machine.loss_names == ("imitation",)
  _, (stage, switched) = _run(machine, np.arange(1, 9), np.arange(1, 9) * 32, np.full(8, np.nan))
  assert stage.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]            # 96 < 100 <= 128 samples
  assert switched.tolist() == [False, False, False, True, False, False, False, False]
  state = machine.init()
  assert int(machine.teacher(state)) == 0
  state = machine.update(state, step=4, samples=128)
  assert int(machine.teacher(state)) == 1 and int(machine.source(state)) == 1
  with pytest.raises(ValueError, match="exactly one"):
    orca_stages()
  with pytest.raises(ValueError, match="samples="):
    machine.update(machine.init(), step=1)


_stage_strategy = st.builds(
    lambda kind, n: Stage(steps=n) if kind == "steps" else Stage(samples=n * 8),
    st.sampled_from(["steps", "samples"]), st.integers(1, 12))


@settings(max_examples=30)
@given(st.lists(_stage_strategy, min_size=1, max_size=4), st.lists(st.integers(1, 24), min_size=40, max_size=40))
def test_boundaries_fire_exactly_at_the_configured_counts(stages, batches):
  stages = stages + [Stage()]
  machine = stage_machine(stages)
  steps = np.arange(1, len(batches) + 1)
  samples = np.cumsum(batches)
  states, (stage, switched) = _run(machine, steps, samples, np.full(len(batches), np.nan))
  want = _reference(stages, batches, [math.nan] * len(batches), 0.9)
  assert stage.tolist() == want
  assert switched.tolist() == [a != b for a, b in zip([0] + want[:-1], want)]
  # exact boundary: a step-limited stage k that began after update u ends after update u + steps_k
  begin = 0
  for k, s in enumerate(stages[:-1]):
    if begin >= len(batches):
      break
    if s.steps is not None:
      end = begin + s.steps
    else:
      cum = np.cumsum(batches[begin:])
      end = begin + int(np.argmax(cum >= s.samples)) + 1 if cum[-1] >= s.samples else len(batches) + 1
    if end <= len(batches):
      assert want[end - 1] == k + 1 and (end - 2 < begin or want[end - 2] == k)
    begin = end


def test_metric_trigger_respects_min_stage_length_and_smoothing():
  stages = [Stage(metric_below=0.5, min_steps=6, name="warm"), Stage(metric_above=2.0, steps=50), Stage()]
  machine = stage_machine(stages, metric_decay=0.8)
  metrics = np.array([1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], np.float32)
  n = len(metrics)
  _, (stage, _) = _run(machine, np.arange(1, n + 1), np.zeros(n), metrics)
  want = _reference(stages, [0] * n, metrics.tolist(), 0.8)
  assert stage.tolist() == want
  # the smoothed metric drops below 0.5 after 3 observations, but the stage is held until 6 steps
  assert want.index(1) == 5
  # no metric trigger without min_steps: switches as soon as the average crosses
  early = _reference([Stage(metric_below=0.5), Stage()], [0] * n, metrics.tolist(), 0.8)
  assert early.index(1) == 2
  # the bias-corrected average by hand
  state = machine.init()
  for x in (1.0, 0.1, float("nan"), 0.1):
    state = machine.update(state, step=1, metric=x)
  m = 0.0
  for i, x in enumerate((1.0, 0.1, 0.1), start=1):
    m = 0.8 * m + 0.2 * x
  assert float(machine.smoothed_metric(state)) == pytest.approx(m / (1 - 0.8 ** 3), rel=1e-6)
  assert int(state.metric_count) == 3
  assert math.isnan(float(machine.smoothed_metric(machine.init())))


def test_vmap_over_a_batch_of_machines():
  machine = stage_machine([Stage(metric_below=0.5, min_steps=2), Stage(steps=3), Stage()])
  metrics = jnp.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.9, 0.1, 0.1, 0.1], [0.9] * 6])
  batched = jax.jit(jax.vmap(lambda s, i, x: machine.update(s, step=i, metric=x), in_axes=(0, None, 0)))
  states = jax.vmap(lambda _: machine.init())(jnp.arange(3))
  history = []
  for i in range(6):
    states = batched(states, jnp.int32(i + 1), metrics[:, i])
    history.append(states.stage.tolist())
  for b in range(3):
    single = machine.init()
    for i in range(6):
      single = machine.update(single, step=i + 1, metric=metrics[b, i])
      assert int(single.stage) == history[i][b]
  assert history[-1] == [2, 1, 0]
  np.testing.assert_array_equal(jax.vmap(machine.teacher)(states), [0, 0, 0])


def test_one_compile_across_stages_in_a_distillation_step():
  """Teacher bank + stage machine + KD loss in one jitted train step: no recompiles at switches."""
  teachers = [[{"w": jax.random.normal(k, (4, 3))}] for k in jax.random.split(jax.random.key(0), 2)]
  bank = stacked_teacher_bank(lambda p, x: x @ p[0]["w"])
  machine = stage_machine([Stage(teacher=0, weights={"kd": 1.0, "ce": 0.0}, steps=2),
                           Stage(teacher=1, weights={"kd": 0.5, "ce": 0.5})])
  tx = optax.sgd(0.1)
  student = {"w": jnp.zeros((4, 3))}
  carry = (student, tx.init(student), machine.init(), jnp.int32(0))
  bank_state = bank.init(teachers)
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jnp.arange(8) % 3

  @jax.jit
  def train_step(carry, bank_state):
    params, opt, stage, step = carry
    t = bank.apply(bank_state, machine.teacher(stage), x)
    w = machine.weight_dict(stage)

    def loss_fn(p):
      s = x @ p["w"]
      return jnp.mean(w["kd"] * L.kd_loss(s, t, temperature=2.0)
                      + w["ce"] * optax.softmax_cross_entropy_with_integer_labels(s, y))

    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt)
    stage = machine.update(stage, step=step + 1, metric=loss)
    return (optax.apply_updates(params, updates), opt, stage, step + 1), machine.teacher(stage)

  teachers_used = []
  for _ in range(5):
    carry, teacher = train_step(carry, bank_state)
    teachers_used.append(int(teacher))
  assert teachers_used == [0, 1, 1, 1, 1] and train_step._cache_size() == 1


def test_checkpoint_round_trip_resumes_exactly(orbax_round_trip):
  machine = stage_machine([Stage(steps=3, metric_above=10.0), Stage(samples=40), Stage()])
  state = machine.init()
  for i in range(1, 5):
    state = machine.update(state, step=i, samples=16 * i, metric=float(i))
  restored = orbax_round_trip(state)
  assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), restored, state) == jax.tree.map(lambda _: True, state)
  a, b = state, restored
  for i in range(5, 9):
    a = machine.update(a, step=i, samples=16 * i, metric=float(i))
    b = machine.update(b, step=i, samples=16 * i, metric=float(i))
  assert int(a.stage) == int(b.stage) == 2


def test_init_state_can_be_donated():
  machine = stage_machine([Stage(steps=1), Stage()])
  update = jax.jit(lambda s, i: machine.update(s, step=i), donate_argnums=0)
  state = update(machine.init(), jnp.int32(1))   # fields sharing one buffer could not be donated
  assert int(state.stage) == 1


def test_wrapping_int32_counters():
  machine = stage_machine([Stage(steps=5), Stage()])
  start = 2**31 - 3
  state = machine.init(step=start)
  wrapped = lambda i: np.array(start + i).astype(np.int64).astype(np.int32)   # two's complement wrap
  for i in range(1, 5):
    state = machine.update(state, step=wrapped(i))
    assert int(state.stage) == 0 and int(state.steps_in_stage) == i
  state = machine.update(state, step=wrapped(5))
  assert int(state.stage) == 1


def test_bad_tables():
  with pytest.raises(ValueError, match="at least one stage"):
    stage_machine([])
  with pytest.raises(ValueError, match="stage 0 never ends"):
    stage_machine([Stage(), Stage()])
  with pytest.raises(ValueError, match="steps"):
    stage_machine([Stage(steps=0), Stage()])
  with pytest.raises(ValueError, match="teacher"):
    stage_machine([Stage(teacher=-1)])
  with pytest.raises(ValueError, match="same number of loss weights"):
    stage_machine([Stage(weights=(1.0, 0.0), steps=1), Stage(weights=(1.0,))])
  with pytest.raises(ValueError, match="not in loss_names"):
    stage_machine([Stage(weights={"a": 1.0})], loss_names=("b",))
  with pytest.raises(ValueError, match="metric_decay"):
    stage_machine([Stage()], metric_decay=1.0)
  with pytest.raises(ValueError, match="metric_below"):
    stage_machine([Stage(metric_below=float("nan")), Stage()])
