"""The `distill` experiment: its losses against hand-written float64 references (the stage's teacher and
weights read from ``extra``, the weak-to-strong filter, DPO on the model's own pairs, the boosted
ensemble), the stage machine stepping inside the compiled step while the host draws each batch from its
stage's source, FLOP counts and features from the layer taps, the per-stage learning rate, config errors,
and the quick experiment end to end through the CLI (about a minute), with its reuse when run again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from prox import loop
from prox import models
from prox import step as step_lib
from prox import tasks
from prox.experiments import common
from prox.experiments import distill
from prox.experiments.configs import distill as distill_config
from prox.losses import preference_pairs
from prox.tasks import data as data_lib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "distill.py"
T, ALPHA = 3.0, 0.7


def _mlp(hidden, seed, inputs=6, classes=4):
  return models.functional(models.make_model("mlp", input_shape=(inputs,), num_classes=classes, seed=seed,
                                             hidden=hidden))


def _np_mlp(params, x):
  """The MLP in float64: ``(logits, the head's input)``."""
  h = np.asarray(x, np.float64)
  for i in range(len(params.get("hidden", {}))):
    layer = params["hidden"][f"dense{i}"]
    h = np.maximum(h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64), 0.0)
  return h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"], np.float64), h


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ctx(extra, rng=0):
  return step_lib.LossContext(rng=jax.random.key(rng), step=jnp.int32(0), samples=jnp.int32(0), extra=extra,
                              meta={"source": np.int32(0)})


def _bank(nets):
  forward = distill.with_features(nets[0].apply)
  apply = lambda v, x: forward(v["params"], v["model_state"], x, train=False)[:2]
  bank = tasks.switched_teacher_bank([apply] * len(nets))
  return bank, bank.init([{"params": n.params, "model_state": {}} for n in nets])


# --- losses ---------------------------------------------------------------------------------------------

def test_distill_loss_reads_teacher_and_weights_of_the_stage():
  student = _mlp((5,), 0)
  teachers = [_mlp((7,), 1), _mlp((7,), 2)]
  bank, bank_state = _bank(teachers)
  machine = tasks.stage_machine([tasks.Stage(teacher=0, weights={"latent": 1.0}, steps=3),
                                 tasks.Stage(teacher=1, weights={"latent": 0.5, "soft": 2.0, "hard": 0.25})])
  loss_fn = distill.distill_loss(student.apply, bank, machine, temperature=T, alpha=ALPHA)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  proj = {"kernel": rng.normal(size=(5, 7)).astype(np.float32), "bias": rng.normal(size=7).astype(np.float32)}
  params = {"student": student.params, "proj": proj}
  z, h = _np_mlp(student.params, x)
  for stage_index in (0, 1):
    stage = machine.init()._replace(stage=jnp.int32(stage_index))
    loss, (metrics, _) = jax.jit(loss_fn)(params, {}, {"image": x, "label": y},
                                          _ctx({"stage": stage, "teachers": bank_state}))
    t, h_t = _np_mlp(teachers[stage_index].params, x)
    latent = np.mean((h @ proj["kernel"] + proj["bias"] - h_t) ** 2, axis=1).mean()
    log_pt, log_ps = _log_softmax(t / T), _log_softmax(z / T)
    soft = (T * T * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)).mean()
    hard = -_log_softmax(z)[np.arange(8), y].mean()
    expected = latent if stage_index == 0 else 0.5 * latent + 2.0 * soft + 0.25 * hard
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_latent"]), latent, rtol=1e-5)


def test_imitation_term_is_hintons_mix_and_plain_needs_no_teacher():
  student, teacher = _mlp((5,), 0), _mlp((7,), 1)
  bank, bank_state = _bank([teacher])
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  kd = tasks.stage_machine([tasks.Stage(weights={"imitation": 1.0})])
  loss, _ = distill.distill_loss(student.apply, bank, kd, temperature=T, alpha=ALPHA)(
      {"student": student.params}, {}, {"image": x, "label": y}, _ctx({"stage": kd.init(), "teachers": bank_state}))
  z, _ = _np_mlp(student.params, x)
  t, _ = _np_mlp(teacher.params, x)
  log_pt, log_ps = _log_softmax(t / T), _log_softmax(z / T)
  soft = T * T * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)
  hard = -_log_softmax(z)[np.arange(8), y]
  np.testing.assert_allclose(float(loss), np.mean(ALPHA * soft + (1 - ALPHA) * hard), rtol=1e-5)
  plain = tasks.stage_machine([tasks.Stage(weights={"hard": 1.0})])
  loss, _ = distill.distill_loss(student.apply, None, plain, temperature=T, alpha=ALPHA)(
      {"student": student.params}, {}, {"image": x, "label": y}, _ctx({"stage": plain.init()}))
  np.testing.assert_allclose(float(loss), hard.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="need a teacher bank"):
    distill.distill_loss(student.apply, None, kd, temperature=T, alpha=ALPHA)
  with pytest.raises(ValueError, match="unknown loss terms"):
    distill.distill_loss(student.apply, bank, tasks.stage_machine([tasks.Stage(weights={"dark": 1.0})]),
                         temperature=T, alpha=ALPHA)


def test_pkd_loss_fits_the_ensemble_of_frozen_students():
  teacher, first, second = _mlp((7,), 1), _mlp((5,), 2), _mlp((3,), 3)
  bank, bank_state = _bank([teacher])
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  y = rng.integers(0, 4, 8).astype(np.int32)
  loss_fn = distill.pkd_loss(second.apply, [first.apply], bank, temperature=T, alpha=ALPHA)
  extra = {"teachers": bank_state, "previous": ({"student": first.params},)}
  loss, (metrics, _) = loss_fn({"student": second.params}, {}, {"image": x, "label": y}, _ctx(extra))
  f, _ = _np_mlp(first.params, x)
  z, _ = _np_mlp(second.params, x)
  t, _ = _np_mlp(teacher.params, x)
  log_pt, log_ps = _log_softmax(t / T), _log_softmax((f + z) / T)
  soft = T * T * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)
  hard = -_log_softmax(f + z)[np.arange(8), y]
  np.testing.assert_allclose(float(loss), np.mean(ALPHA * soft + (1 - ALPHA) * hard), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ensemble_accuracy"]), np.mean(np.argmax(f + z, -1) == y))
  grads = jax.grad(lambda p: loss_fn(p, {}, {"image": x, "label": y}, _ctx(extra))[0])({"student": second.params})
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_w2s_loss_trains_on_weak_labels_where_the_reference_agrees():
  strong, reference, weak = _mlp((5,), 0), _mlp((5,), 1), _mlp((), 2)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = rng.integers(0, 4, 32).astype(np.int32)
  loss_fn = jax.jit(distill.w2s_loss(strong.apply, weak.apply))
  a_weak = np.argmax(_np_mlp(weak.params, x)[0], -1)
  a_ref = np.argmax(_np_mlp(reference.params, x)[0], -1)
  ce = -_log_softmax(_np_mlp(strong.params, x)[0])[np.arange(32), a_weak]
  keep = a_weak == a_ref
  assert 0 < keep.sum() < 32
  for filtered, rows in ((False, np.ones(32, bool)), (True, keep)):
    extra = {"weak": {"student": weak.params}, "reference": {"student": reference.params},
             "filtered": jnp.asarray(filtered)}
    loss, (metrics, _) = loss_fn({"student": strong.params}, {}, {"image": x, "label": y}, _ctx(extra))
    np.testing.assert_allclose(float(loss), ce[rows].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kept"]), rows.mean())
    np.testing.assert_allclose(float(metrics["kept_label_accuracy"]), np.mean(a_weak[rows] == y[rows]), rtol=1e-6)


def test_w2s_dpo_loss_on_the_reference_models_own_pairs():
  strong, reference, weak = _mlp((5,), 0), _mlp((5,), 1), _mlp((), 2)
  rng = np.random.default_rng(4)
  x = rng.normal(size=(64, 6)).astype(np.float32)
  y = rng.integers(0, 4, 64).astype(np.int32)
  samples, beta = 5, 0.3
  loss_fn = distill.w2s_dpo_loss(strong.apply, weak.apply, samples=samples, beta=beta, min_confidence=0.6,
                                 weak_negative_confidence=0.8)
  extra = {"weak": {"student": weak.params}, "reference": {"student": reference.params}, "filtered": jnp.asarray(False)}
  loss, (metrics, _) = loss_fn({"student": strong.params}, {}, {"image": x, "label": y}, _ctx(extra, rng=7))
  # the draws and pairs as the loss makes them, then the DPO loss by hand in float64
  ref_logits, _ = _np_mlp(reference.params, x)
  key_draw, key_pair = jax.random.split(jax.random.key(7))
  draws = np.asarray(jax.random.categorical(key_draw, jnp.asarray(ref_logits, jnp.float32), axis=-1,
                                            shape=(samples, 64))).T
  a_weak = np.argmax(_np_mlp(weak.params, x)[0], -1)
  pairs = jax.device_get(preference_pairs(a_weak.astype(np.int32), draws.astype(np.int32), key=key_pair,
                                          min_confidence=0.6, weak_negative_confidence=0.8))
  assert 0 < pairs.valid.sum() < 64
  candidates = np.concatenate([draws, a_weak[:, None]], 1)
  chosen = candidates[np.arange(64), pairs.chosen]
  rejected = candidates[np.arange(64), pairs.rejected]
  lp, lr = _log_softmax(_np_mlp(strong.params, x)[0]), _log_softmax(ref_logits)
  i = np.arange(64)
  margin = beta * ((lp[i, chosen] - lr[i, chosen]) - (lp[i, rejected] - lr[i, rejected]))
  per_pair = np.log1p(np.exp(-margin))
  np.testing.assert_allclose(float(loss), per_pair[pairs.valid].mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["pairs"]), pairs.valid.mean())


# --- the stages inside the step, the source from the host -------------------------------------------------

def test_stage_machine_in_the_step_switches_teacher_source_and_weights():
  """Three stages over two sources (source 0: label 0, source 1: label 1): every batch comes from its
  stage's source, the transition counts them, the loss uses the stage's teacher and weights."""
  mesh = step_lib.data_mesh(jax.devices()[:1])
  student = _mlp((5,), 0)
  teachers = [_mlp((7,), 1), _mlp((7,), 2)]
  bank, bank_state = _bank(teachers)
  machine = tasks.stage_machine([tasks.Stage(teacher=0, source=0, weights={"soft": 1.0}, steps=3),
                                 tasks.Stage(teacher=1, source=1, weights={"soft": 1.0}, steps=2),
                                 tasks.Stage(teacher=1, source=0, weights={"hard": 1.0})])
  loss_fn = distill.distill_loss(student.apply, bank, machine, temperature=T, alpha=ALPHA)

  def logged(params, model_state, batch, ctx):
    loss, (metrics, ms) = loss_fn(params, model_state, batch, ctx)
    return loss, ({**metrics, "teacher": machine.teacher(ctx.extra["stage"]).astype(jnp.float32),
                   "label": jnp.mean(batch["label"].astype(jnp.float32))}, ms)

  tx = optax.sgd(0.1)
  step = step_lib.make_train_step(logged, tx, mesh=mesh, transition=distill.stage_transition(machine))
  rng = np.random.default_rng(5)
  sets = [data_lib.ArrayDataset(rng.normal(size=(16, 6)).astype(np.float32), np.full(16, k, np.int32), 4, f"s{k}")
          for k in (0, 1)]
  source = distill.SwitchedSource([tasks.EpochSource(d, 0) for d in sets], distill.stage_source(machine))
  extra = {"stage": machine.init(), "teachers": bank_state, "source_samples": np.zeros(2, np.int32),
           "wrong_source": np.int32(0)}
  state = common.replicated_state({"student": student.params}, tx, mesh, seed=0, extra=extra)
  seen = []
  record = lambda ctx: seen.append((ctx.step, common.scalars(ctx.out.metrics)))
  result = loop.run(step, state, source, mesh=mesh, batch_size=4, num_steps=8, actions=((loop.Every(steps=1), record),))
  extra = jax.device_get(result.state.extra)
  assert extra["source_samples"].tolist() == [4 * (3 + 3), 4 * 2]
  assert int(extra["wrong_source"]) == 0 and int(extra["stage"].stage) == 2
  assert [m["label"] for _, m in seen] == [0, 0, 0, 1, 1, 0, 0, 0]
  assert [m["teacher"] for _, m in seen] == [0, 0, 0, 1, 1, 1, 1, 1]
  assert all("loss_hard" in m for _, m in seen)
  np.testing.assert_allclose([m["loss"] for _, m in seen[5:]], [m["loss_hard"] for _, m in seen[5:]], rtol=1e-6)
  np.testing.assert_allclose([m["loss"] for _, m in seen[:5]], [m["loss_soft"] for _, m in seen[:5]], rtol=1e-6)


def test_a_source_out_of_step_with_the_stage_is_counted():
  """The in-step check can fail: a source that ignores the stage is counted by the transition."""
  mesh = step_lib.data_mesh(jax.devices()[:1])
  student = _mlp((5,), 0)
  machine = tasks.stage_machine([tasks.Stage(source=0, weights={"hard": 1.0}, steps=2),
                                 tasks.Stage(source=1, weights={"hard": 1.0})])
  tx = optax.sgd(0.1)
  step = step_lib.make_train_step(distill.distill_loss(student.apply, None, machine, temperature=T, alpha=ALPHA), tx,
                                  mesh=mesh, transition=distill.stage_transition(machine))
  ds = data_lib.ArrayDataset(np.zeros((8, 6), np.float32), np.zeros(8, np.int32), 4, "zeros")
  extra = {"stage": machine.init(), "source_samples": np.zeros(2, np.int32), "wrong_source": np.int32(0)}
  state = common.replicated_state({"student": student.params}, tx, mesh, seed=0, extra=extra)
  always_first = distill.SwitchedSource([tasks.EpochSource(ds, 0), tasks.EpochSource(ds, 1)])
  result = loop.run(step, state, always_first, mesh=mesh, batch_size=4, num_steps=5)
  assert int(jax.device_get(result.state.extra["wrong_source"])) == 3


def test_switched_source_position_round_trips():
  ds = data_lib.ArrayDataset(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10, dtype=np.int32), 10, "n")
  make = lambda: distill.SwitchedSource([tasks.EpochSource(ds, 0), tasks.EpochSource(ds, 1)],
                                        lambda ctx: ctx["k"])
  a = make()
  for k in (0, 1, 1, 0):
    a.next(3, {"k": k})
  b = make()
  b.set_state(json.loads(json.dumps(a.get_state())))
  for k in (1, 0):
    x, y = a.next(3, {"k": k}), b.next(3, {"k": k})
    np.testing.assert_array_equal(x.data["label"], y.data["label"])
    assert x.meta == y.meta == {"source": np.int32(k)}


# --- models, FLOPs, schedules --------------------------------------------------------------------------------

def test_features_are_the_heads_input():
  mlp = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, hidden=(9, 7)))
  x = np.random.default_rng(6).normal(size=(5, 8, 8, 1)).astype(np.float32)
  logits, features, _ = distill.with_features(mlp.apply)(mlp.params, {}, x, train=False)
  np.testing.assert_allclose(features, models.mlp_layer_inputs(mlp.params, x)["head"], rtol=1e-6)
  cnn = models.functional(models.make_model("cnn1d", input_shape=(40, 1), num_classes=10, width=8))
  x = np.random.default_rng(7).normal(size=(5, 40, 1)).astype(np.float32)
  logits, features, _ = distill.with_features(cnn.apply)(cnn.params, {}, x, train=False)
  assert features.shape == (5, 5 * 8)
  head = cnn.params["head"]
  np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-6)


def test_forward_flops_by_hand():
  abstract = lambda model, shape, **kw: models.functional(nnx.eval_shape(
      lambda: models.make_model(model, input_shape=shape, num_classes=10, **kw)))
  mlp = abstract("mlp", (8, 8, 1), hidden=(90, 90))
  assert distill.forward_flops(mlp, (8, 8, 1)) == 2 * (64 * 90 + 90 * 90 + 90 * 10)
  cnn = abstract("cnn1d", (40, 1), width=8)
  # output positions 40 -> 19 -> 10 -> 5; kernels 5x1x8, 3x8x8, 3x8x8; head 40 x 10
  assert distill.forward_flops(cnn, (40, 1)) == 2 * (5 * 1 * 8 * 19 + 3 * 8 * 8 * 10 + 3 * 8 * 8 * 5 + 40 * 10)


def test_width_of_equal_flops_is_the_closest():
  c = distill_config.get_config()
  s = distill.Setting("digits", c.digits, data_lib.load("digits", "train"), data_lib.load("digits", "test"))
  env = distill.Env(c, "", step_lib.data_mesh(), loop.CompileCache(), {})
  flops = lambda w: 2 * (64 * w + w * w + 10 * w)
  for target in (flops(90) + flops(64), 47_000.0, flops(120)):
    width = distill.width_of_flops(env, s, target)
    best = min(range(1, 300), key=lambda w: abs(flops(w) - target))
    assert width == best


def test_stage_schedule_restarts_the_cosine_at_every_stage():
  machine = tasks.stage_machine([tasks.Stage(steps=10), tasks.Stage(steps=20), tasks.Stage()])
  schedule = distill.stage_schedule(1.0, 60, machine)
  lrs = np.asarray([schedule(i) for i in range(60)])
  np.testing.assert_allclose(lrs[[0, 10, 30]], 1.0)
  np.testing.assert_allclose(lrs[[5, 20, 45]], 0.5, atol=1e-6)
  assert lrs[9] < 0.03 and lrs[29] < 0.01 and lrs[59] < 0.01
  np.testing.assert_allclose([distill.stage_schedule(1.0, 60)(i) for i in (0, 30)], [1.0, 0.5], atol=1e-6)
  with pytest.raises(ValueError, match="within 25 steps"):
    distill.stage_schedule(1.0, 25, machine)


# --- config -------------------------------------------------------------------------------------------------

BAD = [
    ({"methods": "ernie,distil"}, "methods: unknown 'distil'; known: ernie, pkd, orca, w2s"),
    ({"datasets": "cifar10"}, "datasets: unknown 'cifar10'; known: digits, mnist1d"),
    ({"digits__pkd_widths": (64, 45)}, "digits.pkd_widths must be >= 2 non-increasing positive widths starting with "
     "the student's (90), got (64, 45)"),
    ({"ernie__fractions": (0.5, 0.3, 0.3)}, "ernie.fractions must be 3 numbers > 0 with a sum < 1"),
    ({"digits__weak_teacher_steps": 1500}, "digits.weak_teacher_steps (1500) must be below digits.teacher_steps"),
    ({"alpha": 1.5}, "alpha must be a finite number in [0, 1], got 1.5"),
    ({"w2s__min_confidence": 2.0}, "w2s: preference_pairs: min_confidence must be in [0, 1], got 2.0"),
    ({"digits__student_kwargs": ml_collections.ConfigDict({"hidden": (0,)})},
     "digits.student_kwargs: hidden must be a tuple of positive ints, got (0,)"),
    ({"mnist1d__student_steps": 3}, "mnist1d.student_steps (3) is too short for the ERNIE-Tiny and Orca stages"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_config_values(change, message, tmp_path):
  c = distill_config.get_config()
  with c.unlocked():
    for k, v in change.items():
      node = c
      *path, last = k.split("__")
      for p in path:
        node = node[p]
      node[last] = v
  with pytest.raises(common.ConfigError) as e:
    distill.validate(c, str(tmp_path))
  assert message in str(e.value)


def test_bad_value_is_a_one_line_cli_error(tmp_path):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
         "--config.methods=ernie,teacher"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip() == "prox: error: methods: unknown 'teacher'; known: ernie, pkd, orca, w2s"


def test_command_names_the_fields_that_differ_from_the_defaults():
  c = distill_config.get_config()
  head = "prox --config=prox/experiments/configs/distill.py --workdir=w"
  assert distill.command(c, "w") == head
  c.num_seeds, c.digits.pkd_widths, c.ernie.latent_weight = 1, (90, 45), 0.5
  assert distill.command(c, "w") == f"{head} '--config.digits.pkd_widths=(90,45)' --config.ernie.latent_weight=0.5 " \
                                    "--config.num_seeds=1"
  c.quick = True                               # the QUICK values are the flag; another value is shown
  c.update_from_flattened_dict(dict(distill.QUICK))    # pkd_widths (90, 45) is QUICK's value: not shown
  assert distill.command(c, "w") == f"{head} --config.ernie.latent_weight=0.5 --config.quick=True"


# --- end to end ---------------------------------------------------------------------------------------------

def test_quick_run_end_to_end_and_reuse(tmp_path):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={tmp_path}",
         "--config.quick=True"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("results.md", "results.json", "accuracy.png", "ernie_curves.png", "pkd_flops.png"):
    assert (tmp_path / name).exists(), name
  results = json.loads((tmp_path / "results.json").read_text())
  r = results["results"]["digits"]["0"]
  steps, batch = distill.QUICK["digits.student_steps"], distill_config.get_config().batch_size
  lengths = [int(f * steps) for f in distill_config.get_config().ernie.fractions]
  assert r["ernie"]["wrong_source"] == 0 and r["ernie"]["final_stage"] == 3
  assert r["ernie"]["source_samples"] == [batch * (lengths[0] + lengths[1]), batch * (steps - lengths[0] - lengths[1])]
  assert r["orca"]["final_stage"] == 1 and r["kd"]["final_stage"] == 0
  assert len(r["pkd"]["rows"]) == 2 and set(r["w2s"]) == {"weak", "few_shot", "ceiling", "naive", "filtered1", "dpo"}
  assert all(0.0 <= r[k]["accuracy"] <= 1.0 for k in ("plain", "kd", "ernie", "task_specific", "orca"))
  md = (tmp_path / "results.md").read_text()
  assert f"Command: `prox --config=prox/experiments/configs/distill.py --workdir={tmp_path} --config.quick=True`" in md
  assert "Expected effect, fixed before running" in md and "| ERNIE-Tiny 4 stages vs plain KD | digits |" in md
  kept = sorted(p.parent.parent.name for p in tmp_path.glob("runs/digits/*/seed0/checkpoints"))
  assert kept == ["kd", "teacher", "teacher_finetuned", "w2s_few_shot", "w2s_filtered1", "w2s_weak"]   # read later
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "compiles=0" in again.stdout                  # every run was reused, nothing trained again
  assert json.loads((tmp_path / "results.json").read_text())["results"] == results["results"]


def test_readme_section_kd_example_trains():
  """README's plain-optax KD step runs as written and lowers the loss."""
  text = (ROOT / "README.md").read_text().split("## Distillation in your own optax code\n")[1].split("\n## ")[0]
  code = text.split("```python\n")[1].split("```")[0]
  teacher, student = _mlp((7,), 1), _mlp((5,), 0)
  namespace = {"teacher_apply": lambda p, x: teacher.apply(p, {}, x, train=False)[0],
               "student_apply": lambda p, x: student.apply(p, {}, x, train=False)[0], "tx": optax.adam(1e-2)}
  exec(compile(code, "README.md", "exec"), namespace)   # pylint: disable=exec-used
  rng = np.random.default_rng(8)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = rng.integers(0, 4, 32).astype(np.int32)
  params, opt_state = student.params, namespace["tx"].init(student.params)
  losses_seen = []
  for _ in range(20):
    params, opt_state, loss = namespace["train_step"](params, opt_state, teacher.params, x, y)
    losses_seen.append(float(loss))
  assert losses_seen[-1] < 0.8 * losses_seen[0]
