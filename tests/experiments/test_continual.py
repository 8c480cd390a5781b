"""The `continual` experiment on the one loop: its in-step pieces against hand computations (the replay
memory and its layout-independent mixing, the ring of recent batches, EWC consolidated inside the step when
the detector fires), bad config values as one-line errors, and (slow) a quick run of every method and
stream, the same run on 4 fake devices, and resume after a crash mid-stream."""
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from prox import loop
from prox import step as S
from prox.experiments import common
from prox.experiments import continual
from prox.experiments import main
from prox.experiments.configs import continual as continual_config
from prox.tasks import TaskSource
from prox.tasks import data as data_lib
from prox.tasks import replay as R
from prox.tasks import shift_detector as SD
from prox.transforms import ewc as E

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "continual.py"


def _config(quick=True, **fields) -> ml_collections.ConfigDict:
  """The default config (with ``continual.QUICK`` applied as ``main`` does when ``quick``); ``a__b=v``
  sets ``a.b``."""
  cfg = continual_config.get_config("quick" if quick else "")
  main.effective_config(cfg, continual.QUICK, [])
  cfg.progress = False
  for dotted, value in fields.items():
    cfg.update_from_flattened_dict({dotted.replace("__", "."): value})
  return cfg


# --- prox.tasks.replay: layout-independent mixing and the ring of recent batches ---------------------

def _memory(capacity=8, filled=5):
  example = {"x": jnp.zeros((2,), jnp.float32), "y": jnp.zeros((), jnp.int32)}
  memory = R.reservoir_init(example, capacity)
  data = {"x": np.arange(2 * filled, dtype=np.float32).reshape(filled, 2) + 100, "y": np.arange(filled) + 50}
  return R.reservoir_add(memory, data, jax.random.key(0))


@pytest.mark.parametrize("filled", [0, 3, 8])
def test_replay_mix_gives_every_layout_the_global_weighted_mean(filled):
  memory = _memory(filled=filled) if filled else R.reservoir_init({"x": jnp.zeros((2,)), "y": jnp.zeros((), jnp.int32)}, 8)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 2)).astype(np.float32), "y": np.arange(8, dtype=np.int32)}
  key = jax.random.key(7)
  per_example = lambda d: d["x"][:, 0] ** 2 + 0.1 * d["y"]          # any per-example loss
  drawn, valid = R.reservoir_sample(memory, key, 4)
  n = float(np.sum(valid))
  expected = (np.sum(per_example(batch)) + np.sum(np.asarray(valid) * per_example(drawn))) / (8 + n)
  for b in (8, 4, 2):   # 1, 2 and 4 micro-batches (devices): the mean of their losses is the same L
    losses, shares = [], []
    for r in range(0, 8, b):
      part = {k: v[r:r + b] for k, v in batch.items()}
      mixed, w = R.replay_mix(memory, key, part, num=4, first_row=r, global_rows=8)
      assert mixed["x"].shape == (b + 4 * b // 8, 2) and w.shape == (b + 4 * b // 8,)
      np.testing.assert_array_equal(mixed["y"][:b], part["y"])
      losses.append(np.sum(w * per_example(mixed)))
      shares.append(mixed["y"][b:])
    np.testing.assert_allclose(np.mean(losses), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate(shares), drawn["y"])   # the shares make up the one draw


def test_replay_mix_refuses_shares_that_do_not_split():
  memory = _memory()
  batch = {"x": np.zeros((4, 2), np.float32), "y": np.zeros((4,), np.int32)}
  with pytest.raises(ValueError, match="num \\* rows per micro-batch must divide by global_rows"):
    R.replay_mix(memory, jax.random.key(0), batch, num=3, first_row=0, global_rows=8)
  with pytest.raises(ValueError, match="global_rows must be a multiple"):
    R.replay_mix(memory, jax.random.key(0), batch, num=4, first_row=0, global_rows=6)


def test_recent_batches_ring_keeps_the_last_batches_oldest_first():
  ring = R.recent_init({"x": jnp.zeros((2, 3))}, 3)
  push = jax.jit(R.recent_push)
  for i in range(5):
    ring = push(ring, {"x": np.full((2, 3), i, np.float32)})
  assert int(ring.pushes) == 5
  oldest, full = R.recent_oldest(ring, 2)        # stored: 2, 3, 4; the two oldest: 2, 3
  assert bool(full) and oldest["x"].shape == (4, 3)
  np.testing.assert_array_equal(oldest["x"][:, 0], [2, 2, 3, 3])
  _, full = R.recent_oldest(R.recent_push(R.recent_init({"x": jnp.zeros((2, 3))}, 3), {"x": np.ones((2, 3))}), 1)
  assert not bool(full)
  with pytest.raises(ValueError, match="k must be an int in \\[1, size=3\\]"):
    R.recent_oldest(ring, 4)


# --- the replay method inside the step ------------------------------------------------------------------

def _env(cfg):
  train_ds, test_ds = common.load_splits(cfg)
  return continual._env(cfg, train_ds), train_ds, test_ds


def test_replay_memory_after_n_steps_is_algorithm_r_over_the_presented_batches():
  cfg = _config()
  env, train_ds, _ = _env(cfg)
  setting = continual._setting("permuted", cfg)
  method = continual.replay(env, setting, continual.Spec("replay", "replay", "replay", {}))
  step = S.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition)
  params = env.init_params(0)
  state = common.replicated_state(params, method.tx, env.mesh, seed=0, extra=method.extra(params, 0))
  num_steps, b = 10, cfg.batch_size           # 320 examples offered to a memory of 200
  source = lambda: TaskSource([train_ds], [num_steps], seed=3, transform=continual._transform(None))
  result = loop.run(step, state, source(), mesh=env.mesh, batch_size=b, num_steps=num_steps)
  memory = jax.device_get(result.state.extra["replay"]["memory"])
  # Reference: Algorithm R one example at a time, with the step's transition keys.
  cap = cfg.replay.capacity
  ref_image = np.zeros((cap,) + train_ds.images.shape[1:], np.float32)
  ref_label = np.zeros((cap,), np.int32)
  rng, seen, src = np.asarray(jax.random.key_data(jax.random.key(0))), 0, source()
  for _ in range(num_steps):
    nxt, _, transition_key = jax.random.split(jax.random.wrap_key_data(rng), 3)
    rng = jax.random.key_data(nxt)
    batch = src.next(b).data
    draws = np.asarray(jax.random.randint(transition_key, (b,), 0, seen + np.arange(b) + 1))
    for i in range(b):
      slot = seen if seen < cap else draws[i]
      if slot < cap:
        ref_image[slot], ref_label[slot] = batch["image"][i], batch["label"][i]
      seen += 1
  assert int(memory.seen) == num_steps * b
  np.testing.assert_array_equal(memory.data["label"], ref_label)
  np.testing.assert_array_equal(memory.data["image"], ref_image)


def test_class_incremental_split_has_no_logit_mask():
  cfg = _config()
  train_ds, test_ds = common.load_splits(cfg)
  tasks = continual._tasks("split_class", cfg, train_ds, test_ds, 0)
  for stream, masked in (("split_class", False), ("split", True), ("permuted", False)):
    setting = continual._setting(stream, cfg)
    assert setting.masked == masked
  assert continual._setting("split_class", cfg).shared_head and not continual._setting("split", cfg).shared_head
  source = TaskSource([t.train.materialize() for t in tasks], [1] * len(tasks), seed=0,
                      transform=continual._transform(None))
  labels = []
  for _ in tasks:
    batch = source.next(cfg.batch_size)
    assert set(batch.data) == {"image", "label", "row"}   # no logit_mask: one head over all classes
    labels.append(set(batch.data["label"].tolist()))
  assert labels == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
  masked = TaskSource([tasks[1].train.materialize()], [1], seed=0,
                      transform=continual._transform([t.logit_mask for t in tasks[1:]])).next(4).data
  np.testing.assert_array_equal(masked["logit_mask"][0], np.arange(10) // 2 == 1)


# --- EWC consolidated inside the step when the detector fires --------------------------------------------

def _linear_logprob(params, example):
  logits = example["image"] @ params["w"] + params["b"]
  return jax.nn.log_softmax(logits)[example["label"]]


def _info(step, loss, batch):
  return S.StepInfo(step=jnp.int32(step), samples=None, batch_size=None, rng=None, meta=None, params=None,
                    opt_state=None, grads=None, loss=jnp.float32(loss), metrics=None, grad_stats=None,
                    group_stats=None, batch=batch, valid=None)


@pytest.mark.parametrize("fisher_batches, fires", [(2, True), (3, False)])
def test_in_step_ewc_consolidation_when_the_detector_fires_equals_a_hand_computation(fisher_batches, fires):
  rng = np.random.default_rng(0)
  d, c, b = 3, 4, 5
  params = {"w": rng.normal(size=(d, c)).astype(np.float32), "b": rng.normal(size=(c,)).astype(np.float32)}
  batches = [{"image": rng.normal(size=(b, d)).astype(np.float32), "label": rng.integers(0, c, b).astype(np.int32)}
             for _ in range(3)]
  lam, lr = 7.0, 0.1
  tx = optax.chain(E.ewc(lam), optax.sgd(lr))
  detector = SD.shift_detector(reference_window=2, test_window=1, threshold=1.0)
  transition = jax.jit(continual.ewc_detect_transition(
      detector, _linear_logprob, fields=("image", "label"), fisher_batches=fisher_batches, learning_rate=lr,
      stability_limit=2.0))
  extra = continual.ewc_detect_extra(detector, batches[0], 1 + fisher_batches)   # ring: W + k batches
  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state={},
                       extra=extra, rng=None, samples=jnp.int32(0))
  for i, loss in enumerate((1.0, 1.1, 5.0)):   # the third loss jumps: z = 45 > 1
    state = transition(state, _info(i, loss, batches[i]))
    if i < 2:
      assert float(jnp.sum(E.find_ewc_state(state.opt_state).fisher["w"])) == 0.0
  ex = state.extra["detect"]
  assert int(ex["detector"].num_switches) == 1 and int(ex["switch_steps"][0]) == 3
  ewc_state = E.find_ewc_state(state.opt_state)
  if not fires:   # the ring holds 3 of its 4 batches: no consolidation, counted
    assert int(ex["consolidations"]) == 0 and int(ex["without_data"]) == 1
    assert float(jnp.sum(ewc_state.fisher["w"])) == 0.0 and int(ewc_state.num_tasks) == 0
    return
  # Hand computation (float64): per-example gradients of log softmax(x W + b)[y] on the two oldest
  # batches of the ring (the first two), squared and averaged; the anchor is the current weights.
  x = np.concatenate([bt["image"] for bt in batches[:2]]).astype(np.float64)
  y = np.concatenate([bt["label"] for bt in batches[:2]])
  z = x @ params["w"].astype(np.float64) + params["b"]
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  delta = np.eye(c)[y] - p                                   # d log p_y / d z
  fisher_w = np.mean(x[:, :, None] ** 2 * delta[:, None, :] ** 2, axis=0)
  fisher_b = np.mean(delta ** 2, axis=0)
  np.testing.assert_allclose(ewc_state.fisher["w"], fisher_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ewc_state.fisher["b"], fisher_b, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(ewc_state.anchor["w"], params["w"])
  assert int(ewc_state.num_tasks) == 1 and int(ex["consolidations"]) == 1 and int(ex["without_data"]) == 0
  expected_stability = lam * max(fisher_w.max(), fisher_b.max()) * lr
  np.testing.assert_allclose(float(ex["max_stability"]), expected_stability, rtol=1e-5)
  # The next update carries the penalty gradient lambda F (w - m): zero at the anchor, lambda F dw away.
  moved = jax.tree.map(lambda v: v + 0.5, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state.opt_state, moved)
  np.testing.assert_allclose(updates["w"], -lr * lam * fisher_w * 0.5, rtol=1e-5, atol=1e-8)


# --- config errors -----------------------------------------------------------------------------------------

def _cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


BAD = [
    (("--config.permuted.ewc_lambdas=(10.0, -1.0)",),
     "permuted.ewc_lambdas: ewc_lambda must be a finite number >= 0, got -1.0"),
    (("--config.ewc.gamma=1.5",), "ewc.gamma: gamma must be in [0, 1], got 1.5"),
    (("--config.methods=naive,ewc2",), "unknown method 'ewc2'; known: naive, replay, ewc, ewc_online, gpm"),
    (("--config.streams=permuted,rotated",), "unknown stream 'rotated'; known: permuted, split, split_class"),
]


def test_bad_config_values_are_one_line_cli_errors(tmp_path):
  procs = [_cli(tmp_path / str(i), *args) for i, (args, _) in enumerate(BAD)]   # in parallel
  for i, ((args, expected), proc) in enumerate(zip(BAD, procs)):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (args, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("prox: error: " + expected), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / str(i) / "runs").exists()


@pytest.mark.parametrize("fields, expected", [
    ({"split__ewc_detect_lambda": -5.0}, "split.ewc_detect_lambda: ewc_lambda must be a finite number >= 0, got -5.0"),
    ({"split_class__ewc_lambdas": (1.0, float("nan"))},
     "split_class.ewc_lambdas: ewc_lambda must be a finite number >= 0, got nan"),
    ({"ewc__gamma": -0.1}, "ewc.gamma: gamma must be in [0, 1], got -0.1"),
    ({"permuted__epochs_per_task": 0}, "permuted.epochs_per_task must be an integer >= 1, got 0"),
    ({"replay__batch_size": 300}, "replay.batch_size 300 exceeds replay.capacity 200"),
    ({"model": "cnn", "model_kwargs": {"width": 8, "hidden": 16}, "methods": "naive,gpm"},
     "method 'gpm' reads the dense layers' inputs and needs model"),
    ({"model": "resnet20", "model_kwargs": {"width": 4}}, "continual supports models without batch statistics"),
    ({"gpm__threshold_base": 1.5}, "gpm.threshold_base must be a finite number in (0, 1], got 1.5"),
    ({"slca__backbone_scale": -1.0}, "slca.backbone_scale: slow_learner: scale must be finite and >= 0"),
    ({"detector__test_window": 0}, "detector: test_window must be an int >= 1, got 0"),
    ({"momentum": 1.0}, "momentum must be a finite number in [0, 1), got 1.0"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite number in (0, inf], got 0.0"),
    ({"scaling": "minmax"}, "unknown scaling 'minmax'; known: standard, unit"),
    ({"model_kwargs": {"hidden": (8,), "init": "xavier"}}, "model 'mlp' rejects model_kwargs"),
    ({"streams": "", "methods": "", "scole__enabled": False}, "nothing to run"),
])
def test_validate_names_the_bad_value(tmp_path, fields, expected):
  cfg = _config(quick=False)
  for dotted, value in fields.items():
    if isinstance(value, dict):
      cfg[dotted] = ml_collections.ConfigDict(value)
    else:
      cfg.update_from_flattened_dict({dotted.replace("__", "."): value})
  with pytest.raises(common.ConfigError, match="^" + re.escape(expected)):
    continual.validate(cfg, str(tmp_path))


def test_detector_windows_longer_than_a_task_fail_before_training(tmp_path):
  cfg = _config(quick=False, methods="ewc_detect", streams="split", scole__enabled=False)
  cfg.detector.reference_window = 80   # split tasks have ~85 steps of 10 epochs; 80 + 10 >= that
  with pytest.raises(common.ConfigError, match="detector windows reference_window \\+ test_window = 90"):
    continual.run(cfg, str(tmp_path))
  assert not (tmp_path / "runs").exists()


def test_a_run_directory_of_another_config_is_refused(tmp_path):
  cfg = _config(streams="split", methods="naive", scole__enabled=False)
  continual.run(cfg, str(tmp_path))
  other = _config(streams="split", methods="naive", scole__enabled=False, learning_rate=0.02)
  with pytest.raises(common.ConfigError, match="holds a run of continual with learning_rate=0.05 \\(now 0.02\\)"):
    continual.run(other, str(tmp_path))
  # Fields that only select runs may change: the finished naive run is read back, not trained again.
  first = json.loads((tmp_path / "runs" / "split" / "naive" / "seed0" / "result.json").read_text())
  more = _config(streams="split", methods="naive", scole__enabled=False, split__ewc_lambdas=(5.0,))
  continual.run(more, str(tmp_path))
  assert _read(tmp_path)["streams"]["split"]["naive"]["seeds"]["0"] == first


def test_avalanche_setting_unit_inputs_and_torch_init(tmp_path):
  cfg = _config(streams="split_class", methods="naive", scole__enabled=False, scaling="unit")
  cfg.model_kwargs.init = "torch"
  continual.validate(cfg, str(tmp_path))
  train_ds, _ = common.load_splits(cfg)
  assert float(train_ds.images.min()) == 0.0 and float(train_ds.images.max()) == 1.0   # x / 16
  env = continual._env(cfg, train_ds)
  bias = np.asarray(env.init_params(0)["head"]["bias"])
  assert np.all(bias != 0) and np.all(np.abs(bias) <= 1 / np.sqrt(32))   # U(+-1/sqrt(fan_in)), hidden 32
  result = continual.run(cfg, str(tmp_path))
  assert 0.0 <= result["split_class_naive_forgetting"] <= 1.0


# --- end to end (slow) --------------------------------------------------------------------------------------

QUICK_FIELDS = {"permuted__num_tasks": 2, "scole__num_tasks": 3}


def _read(workdir):
  return json.loads((Path(workdir) / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
  """The quick config (every method and stream, SCoLe) on 1 device here, and its permuted and split
  streams (every code path: shared and masked heads) on 4 fake devices in a subprocess at the same time."""
  tmp = tmp_path_factory.mktemp("continual")
  overrides = [f"--config.{k.replace('__', '.')}={v}" for k, v in QUICK_FIELDS.items()]
  overrides.append("--config.streams=permuted,split")
  four = subprocess.Popen(
      [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}:quick", f"--workdir={tmp / 'four'}",
       "--config.progress=False", *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  headline = continual.run(_config(**QUICK_FIELDS), str(tmp / "one"))
  _, err = four.communicate(timeout=1200)
  assert four.returncode == 0, err[-3000:]
  return headline, _read(tmp / "one"), _read(tmp / "four"), tmp


def _check_stream(res, stream, num_tasks):
  runs = res["streams"][stream]
  expected = [m for m in continual.METHODS if m != "wsn" or stream == "split"]   # WSN: task-incremental only
  assert sorted({r["kind"] for r in runs.values()}) == sorted(expected)
  for run in runs.values():
    (result,) = run["seeds"].values()
    r = np.asarray(result["R"])
    assert r.shape == (num_tasks, num_tasks) and np.asarray(result["R_class"]).shape == r.shape
    assert len(result["initial"]) == num_tasks and ((r >= 0) & (r <= 1)).all()
    assert set(result["metrics"]) == {"avg_acc", "forgetting", "bwt", "fwt", "avg_acc_class_il"}
    assert np.isclose(result["metrics"]["avg_acc"], r[-1].mean())
    assert np.isclose(result["metrics"]["bwt"], np.mean(r[-1, :-1] - np.diag(r)[:-1]))
    assert np.isclose(result["metrics"]["fwt"], np.mean(r[np.arange(num_tasks - 1), np.arange(1, num_tasks)]
                                                         - np.asarray(result["initial"])[1:]))
    assert len(result["task_end_steps"]) == num_tasks and result["steps"] == result["task_end_steps"][-1]
    assert result["nonfinite_steps"] == 0
  assert np.mean(np.diag(np.asarray(runs["naive"]["seeds"]["0"]["R"]))) > 0.5   # it learns
  detect = next(r for r in runs.values() if r["kind"] == "ewc_detect")["seeds"]["0"]["log"]
  assert detect["switch_steps"] and detect["consolidations"] >= 1   # consolidated inside the step
  gpm_log = runs["gpm"]["seeds"]["0"]["log"]
  assert len(gpm_log["ranks"]) == num_tasks and max(gpm_log["ranks"][0].values()) > 0
  ewc_log = next(r for r in runs.values() if r["kind"] == "ewc")["seeds"]["0"]["log"]
  low, high = ewc_log["lambda_range"][0]
  assert 0 < low < high and len(ewc_log["lambda_range"]) == num_tasks - 1
  replay_log = runs["replay"]["seeds"]["0"]["log"]
  assert replay_log["memory_seen"] == runs["replay"]["seeds"]["0"]["steps"] * 32
  assert len(runs["slca"]["seeds"]["0"]["log"]["align_loss"]) == num_tasks
  # the new methods: MAS consolidated at every boundary and stable; the memory methods fill replay's
  # reservoir with every training example; ProtoCL's posterior absorbed every incoming row once; CUBER's
  # bases grow at every boundary
  mas_log = runs["mas"]["seeds"]["0"]["log"]
  assert len(mas_log["stability"]) == num_tasks and 0 < max(mas_log["stability"]) < 2
  assert all(v > 0 for v in mas_log["importance_sum"])
  for kind in ("mir", "protocl", "onpro"):
    result = runs[kind]["seeds"]["0"]
    assert result["log"]["memory_seen"] == result["steps"] * 32, kind
  protocl = runs["protocl"]["seeds"]["0"]
  assert sum(protocl["log"]["posterior_counts"][-1]) == protocl["steps"] * 32
  if stream == "split":   # WSN is forget-free: a stored subnetwork's accuracy never changes
    wsn_r = np.asarray(runs["wsn"]["seeds"]["0"]["R"])
    for j in range(num_tasks):
      np.testing.assert_array_equal(wsn_r[j:, j], wsn_r[j, j])
  tame_log = runs["tame"]["seeds"]["0"]["log"]    # switches detected inside the step spawn experts
  assert tame_log["num_experts"][0] == 1 and tame_log["num_experts"][-1] >= 2
  cuber_log = runs["cuber"]["seeds"]["0"]["log"]
  assert len(cuber_log["ranks"]) == len(cuber_log["open"]) == num_tasks
  assert cuber_log["ranks"][0] == gpm_log["ranks"][0]    # until a subspace opens, CUBER trains as GPM
  return runs


@pytest.mark.slow
def test_quick_run_of_every_method_and_stream(quick_runs):
  headline, res, _, tmp = quick_runs
  permuted = _check_stream(res, "permuted", 2)
  split = _check_stream(res, "split", 5)
  split_class = _check_stream(res, "split_class", 5)
  for runs in (permuted, split_class):   # no mask: the scored and the all-class accuracies are one
    for run in runs.values():
      np.testing.assert_array_equal(run["seeds"]["0"]["R_class"], run["seeds"]["0"]["R"])
  assert any(np.asarray(run["seeds"]["0"]["R_class"]).sum() < np.asarray(run["seeds"]["0"]["R"]).sum()
             for run in split.values())   # task-incremental: the mask helps
  assert any("head" in k for k in permuted["gpm"]["seeds"]["0"]["log"]["ranks"][0])      # shared head
  assert any("head" in k for k in split_class["gpm"]["seeds"]["0"]["log"]["ranks"][0])
  assert not any("head" in k for k in split["gpm"]["seeds"]["0"]["log"]["ranks"][0])    # per-task heads
  # class-incremental naive fine-tuning forgets the old classes (one head, no mask)
  naive_class = np.asarray(split_class["naive"]["seeds"]["0"]["R"])
  assert naive_class[-1, :-1].mean() < 0.2 < naive_class.diagonal().mean()
  scole = res["scole"]["0"]
  assert len(scole["accuracy"]) == 3 and np.asarray(scole["class_accuracy"]).shape == (3, 10)
  assert all(len(c) == 2 for c in scole["classes"])
  one = tmp / "one"
  for name in ("heatmap_permuted.png", "accuracy_split_class.png", "scole_accuracy.png"):
    assert (one / name).read_bytes()[:4] == b"\x89PNG"
  table = (one / "results.md").read_text()
  assert "| EWC separate λ=10 |" in table and "| GPM |" in table and "## SCoLe" in table
  assert "class-incremental" in table and "`ewc_lambda_range`" in table
  assert headline["split_class_naive_forgetting"] == pytest.approx(
      np.mean(res["summary"]["split_class"]["naive"]["forgetting"]))
  assert (one / "runs" / "permuted" / "naive" / "seed0" / "result.json").exists()


@pytest.mark.slow
def test_four_devices_give_the_numbers_of_one(quick_runs):
  """MIR and OnPro excepted (their per-device parts are documented). Plain SGD is scale-sensitive: a step applying D x the mean gradient, a replay draw per device or a
  consolidation on one device's data would change these numbers."""
  _, one, four, _ = quick_runs
  for stream in ("permuted", "split"):
    for run_id, run in one["streams"][stream].items():
      if run["kind"] in ("mir", "onpro"):
        # each device's virtual step (MIR) and new-class prototypes (OnPro) use its own rows: by design
        # these two depend on the layout (see their docstrings); every other method must not
        continue
      a, b = run["seeds"]["0"], four["streams"][stream][run_id]["seeds"]["0"]
      np.testing.assert_allclose(b["R"], a["R"], atol=1e-9, err_msg=f"{stream} {run_id}")
      np.testing.assert_allclose(b["R_class"], a["R_class"], atol=1e-9, err_msg=f"{stream} {run_id}")
      np.testing.assert_allclose(float(b["param_norm"]), float(a["param_norm"]), rtol=1e-4,
                                 err_msg=f"{stream} {run_id}")
      assert a["nonfinite_steps"] == b["nonfinite_steps"] == 0, (stream, run_id)
      for key in ("memory_classes", "ranks", "switch_steps", "consolidations"):
        assert b["log"].get(key) == a["log"].get(key), (stream, run_id, key)
  np.testing.assert_allclose(four["scole"]["0"]["accuracy"], one["scole"]["0"]["accuracy"], atol=1e-9)


def _crash_after(monkeypatch, calls):
  """The ``calls + 1``-th batch drawn by any TaskSource raises, as a killed process would stop."""
  real = TaskSource.next
  count = {"n": 0}

  def crashing(self, batch_size, context=None):
    count["n"] += 1
    if count["n"] > calls:
      raise KeyboardInterrupt("simulated crash")
    return real(self, batch_size, context)

  monkeypatch.setattr(TaskSource, "next", crashing)


@pytest.mark.slow
def test_resume_after_a_crash_mid_stream_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  fields = {"streams": "permuted", "methods": "replay,ewc_detect,slca", "permuted__num_tasks": 2,
            "scole__num_tasks": 4}   # 42 steps per permuted task, about 10 per SCoLe task
  whole, crashed = tmp_path / "whole", tmp_path / "crashed"
  continual.run(_config(**fields), str(whole))
  for calls in (84 + 60, 42 + 84 + 20):   # mid-task: ewc_detect's 2nd task (replay done), SCoLe's 3rd
    with monkeypatch.context() as m:
      _crash_after(m, calls)
      with pytest.raises(KeyboardInterrupt):
        continual.run(_config(**fields), str(crashed))
  assert (crashed / "runs" / "permuted" / "slca" / "seed0" / "result.json").exists()
  assert not (crashed / "runs" / "scole" / "seed0" / "result.json").exists()
  continual.run(_config(**fields), str(crashed))
  a, b = _read(whole), _read(crashed)
  for run_id in ("replay", "ewc_detect_lam30", "slca"):
    ra, rb = a["streams"]["permuted"][run_id]["seeds"]["0"], b["streams"]["permuted"][run_id]["seeds"]["0"]
    assert ra["R"] == rb["R"] and ra["log"] == rb["log"] and ra["steps"] == rb["steps"], run_id
    assert ra["param_norm"] == rb["param_norm"], run_id
  for key in ("accuracy", "class_accuracy", "classes", "train_loss"):
    assert a["scole"]["0"][key] == b["scole"]["0"][key]


# --- the methods on the library's newer parts: MAS, MIR, CUBER, ProtoCL, OnPro ------------------------------

@pytest.fixture(scope="module")
def digits():
  cfg = _config()
  train_ds, test_ds = common.load_splits(cfg)
  return cfg, train_ds, test_ds


def _setup(cfg, train_ds, test_ds, stream, kind, tasks=None):
  env = continual._env(cfg, train_ds)
  run_tasks = continual._tasks(stream, cfg, train_ds, test_ds, 0) if tasks is None else tasks
  run = continual.Run(0, run_tasks, [t.train.materialize() for t in run_tasks])
  (spec,) = continual._specs(stream, cfg, [kind])
  method = continual._method(env, stream, continual._setting(stream, cfg), spec, run.tasks)
  params = env.init_params(0)
  if method.params is not None:
    params = method.params(params, 0)
  state = common.replicated_state(params, method.tx, env.mesh, seed=0, extra=method.extra(params, 0))
  return env, run, method, state


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def test_mas_importance_is_zero_until_a_consolidation_then_the_papers_omega(digits):
  """Before the first boundary the penalty is off (Omega = 0: the update is SGD's); after it Omega is the
  mean |grad ||F(x)||^2| of the task's inputs with F the task's own logits, and the update adds 2 lambda
  Omega (w - w*)."""
  cfg, train_ds, test_ds = digits
  env, run, method, state = _setup(cfg, train_ds, test_ds, "split", "mas")
  params, lr, lam = state.params, float(cfg.learning_rate), float(cfg.split.mas_lambda)
  assert not any(np.any(np.asarray(f)) for f in jax.tree.leaves(E.find_ewc_state(state.opt_state).fisher))
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  moved = jax.tree.map(lambda p: p + 0.1, params)
  before, _ = method.tx.update(g, state.opt_state, moved)
  _close(before, jax.tree.map(lambda x: -lr * x, g), rtol=1e-6)
  state = method.end_task(state, 0, run, {})
  omega = E.find_ewc_state(state.opt_state).fisher
  ds, mask = run.train_sets[0], run.tasks[0].logit_mask
  idx = continual._subset(len(ds.labels), int(cfg.mas.examples), 0, 0, 3)

  def sq_norm(p, x):
    logits = env.apply(p, {}, x[None], train=False)[0][0]
    return jnp.sum(jnp.where(mask, logits, 0.0) ** 2)

  per_example = jax.vmap(jax.grad(sq_norm), in_axes=(None, 0))(params, jnp.asarray(ds.images[idx]))
  expected = jax.tree.map(lambda x: jnp.mean(jnp.abs(x), 0), per_example)
  _close(omega, expected, rtol=1e-4, atol=1e-7)
  assert float(jnp.sum(omega["head"]["kernel"])) > 0
  assert not np.any(np.asarray(omega["head"]["kernel"])[:, ~mask])     # other tasks' logits: no importance
  after, _ = method.tx.update(g, state.opt_state, moved)
  _close(after, jax.tree.map(lambda x, o: -lr * (x + 2 * lam * o * 0.1), g, omega), rtol=1e-5, atol=1e-7)


def test_mir_mix_replays_the_most_interfered_memories_with_replays_weights():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  per_example = lambda p, ex: optax.softmax_cross_entropy_with_integer_labels(ex["x"] @ p["w"], ex["y"])
  memory = R.reservoir_init({"x": jnp.zeros((4,), jnp.float32), "y": jnp.zeros((), jnp.int32)}, 16)
  memory = R.reservoir_add(memory, {"x": rng.normal(size=(16, 4)).astype(np.float32),
                                    "y": rng.integers(0, 3, size=16).astype(np.int32)}, jax.random.key(1))
  batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": rng.integers(0, 3, size=8).astype(np.int32)}
  key, lr = jax.random.key(3), 0.5
  mixed, w = continual.mir_mix(per_example, params, memory, key, batch, num=4, candidates=12, learning_rate=lr,
                               first_row=0, global_rows=8)
  # by hand: the same 12 candidates, the loss increase under the virtual step on the batch, the top 4
  cands, valid = R.reservoir_sample(memory, key, 12)
  grad = jax.grad(lambda p: jnp.mean(per_example(p, batch)))(params)
  virtual = {"w": params["w"] - lr * grad["w"]}
  scores = np.asarray(per_example(virtual, cands) - per_example(params, cands))
  assert np.all(np.asarray(valid))
  top = np.argsort(-scores)[:4]
  np.testing.assert_array_equal(mixed["y"][:8], batch["y"])
  np.testing.assert_allclose(mixed["x"][8:], np.asarray(cands["x"])[top])
  np.testing.assert_array_equal(mixed["y"][8:], np.asarray(cands["y"])[top])
  np.testing.assert_allclose(w, np.full(12, 1 / 12), rtol=1e-6)
  assert not np.array_equal(np.sort(top), np.arange(4))     # not simply the first uniform draws
  # two micro-batches of 4 rows: each takes 2 of the retrieved rows (in score order), weights scaled by 2
  m2, w2 = continual.mir_mix(per_example, params, memory, key, {k: v[4:] for k, v in batch.items()}, num=4,
                             candidates=12, learning_rate=lr, first_row=4, global_rows=8)
  assert m2["y"].shape == (6,) and np.allclose(w2, 2 / 12)


def _cuber_by_hand(env, run, state, t_next, eps):
  """Task 0's block of each projected kernel, the decision from the next task's gradient, by hand."""
  cfg = env.cfg

  def mean_loss(p, t):
    ds = run.train_sets[t]
    idx = continual._subset(len(ds.labels), int(cfg.cuber.examples), 0, t, 4)
    logits = env.apply(p, {}, jnp.asarray(ds.images[idx]), train=False)[0]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ds.labels[idx])))

  r0, g = jax.grad(mean_loss)(state.params, 0), jax.grad(mean_loss)(state.params, t_next)
  return r0, g


def test_cuber_opens_an_old_subspace_only_where_the_next_gradient_is_aligned(digits):
  """After task 0: the bases grow (GPM's rule); task 0's block opens at a kernel iff the next task's gradient
  has >= eps of its norm in it and a positive inner product with task 0's stored gradient there; an update
  keeps its in-block part where open (beta = 1) and loses it where closed (GPM)."""
  from prox.transforms import find_cuber_state
  cfg0, train_ds, test_ds = digits
  tasks = continual._tasks("split_class", cfg0, train_ds, test_ds, 0)
  cases = [(0.5, tasks[:2], 1), (0.0, [tasks[0], tasks[0]], 1)]     # the real next task; task 0 again
  opened = []
  for eps, run_tasks, t_next in cases:
    cfg = _config(cuber__projection_threshold=eps)
    env, run, method, state = _setup(cfg, train_ds, test_ds, "split_class", "cuber", tasks=run_tasks)
    state = method.end_task(state, 0, run, {})
    cs = find_cuber_state(state.opt_state)
    r0, g = _cuber_by_hand(env, run, state, t_next, eps)
    rng = np.random.default_rng(1)
    grad = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
    update, _ = method.tx.update(grad, state.opt_state, state.params)
    for path in (("head", "kernel"), ("hidden", "dense0", "kernel"), ("hidden", "dense1", "kernel")):
      get = lambda tree: functools.reduce(lambda x, k: x[k], path, tree)
      rank = int(get(cs.gpm.ranks))
      b = np.asarray(get(cs.gpm.bases))[:, :rank]
      assert rank > 0
      gk, rk = np.asarray(get(g), np.float64), np.asarray(get(r0), np.float64)
      ratio = np.linalg.norm(b.T @ gk) / np.linalg.norm(gk)
      align = np.sum((b.T @ gk) * (b.T @ rk))
      open_ = bool(ratio >= eps and ratio > 0 and align > 0)
      assert bool(np.asarray(get(cs.allowed))[0]) == open_, (eps, path, ratio, align)
      u = -float(cfg.learning_rate) * np.asarray(get(grad), np.float64)
      expected = u if open_ else u - b @ (b.T @ u)
      np.testing.assert_allclose(np.asarray(get(update)), expected, rtol=1e-4, atol=1e-6)
      opened.append(open_)
  assert all(opened[3:])        # the same task again: its gradient is aligned with itself everywhere
  np.testing.assert_array_equal(update["head"]["bias"], 0.0)   # biases frozen as GPM's


def test_protocl_predicts_by_the_posterior_and_absorbs_each_batch_once(digits):
  from prox import models
  from prox.tasks import bayesian_prototypes
  cfg, train_ds, test_ds = digits
  env, run, method, state = _setup(cfg, train_ds, test_ds, "split_class", "protocl")
  head = bayesian_prototypes(10, int(cfg.model_kwargs.hidden[-1]))
  ds = run.train_sets[0]
  rows = {"image": ds.images[:32], "label": ds.labels[:32], "row": np.arange(32, dtype=np.int32)}
  step = S.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition)
  params0 = jax.device_get(state.params)    # the step donates the state
  state, _ = step(state, S.shard_batch(rows, env.mesh))
  z = models.mlp_layer_inputs(params0, jnp.asarray(rows["image"]))["head"]    # the weights the loss saw
  expected = head.update(head.init(), z, jnp.asarray(rows["label"]))
  _close(state.extra["protos"].mean, expected.mean, rtol=1e-4, atol=1e-5)
  assert float(jnp.sum(state.extra["protos"].count)) == 32      # the replayed rows are not absorbed
  test = run.tasks[0].test.materialize()
  got = method.evaluate(state, test, 64, 0)
  zt = models.mlp_layer_inputs(state.params, jnp.asarray(test.images))["head"]
  pred = np.argmax(np.asarray(head.log_joint(state.extra["protos"], zt)), -1)
  assert got["accuracy"] == pytest.approx(np.mean(pred == test.labels))
  logits = env.apply(state.params, {}, jnp.asarray(test.images), train=False)[0]
  assert not np.array_equal(np.argmax(np.asarray(logits), -1), pred)   # not the unused linear head


def test_onpro_feedback_means_are_the_replayed_rows_prototypes_at_the_step_weights(digits):
  from prox import models
  from prox.losses import online_prototypes
  from prox.tasks import prototype_feedback
  cfg, train_ds, test_ds = digits
  env, run, method, state = _setup(cfg, train_ds, test_ds, "permuted", "onpro")
  ds = run.train_sets[0]
  memory = R.reservoir_add(state.extra["replay"]["memory"], {"image": ds.images[:64], "label": ds.labels[:64]},
                           jax.random.key(5))
  state = state._replace(extra={**state.extra, "replay": {**state.extra["replay"], "memory": memory}})
  rows = {"image": ds.images[64:96], "label": ds.labels[64:96], "row": np.arange(32, dtype=np.int32)}
  step = S.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition)
  for _ in range(2):   # the second step draws class pairs from the first step's means
    before = jax.device_get(state)           # the step donates the state
    state, out = step(state, S.shard_batch(rows, env.mesh))
  fb = prototype_feedback(10, base_rate=float(cfg.onpro.base_rate), mixup_p=float(cfg.onpro.mixup_p))
  key = jax.random.fold_in(jax.random.wrap_key_data(before.extra["replay"]["key"]), 1)
  sample = fb.sample(before.extra["feedback"], before.extra["replay"]["memory"], key, int(cfg.replay.batch_size))
  h = models.mlp_layer_inputs(before.params["net"], sample.first["image"])["head"]
  means, present = online_prototypes(h @ before.params["proj"]["kernel"], sample.labels_first, num_classes=10)
  _close(state.extra["feedback"].class_means, means, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(state.extra["feedback"].present, present)
  assert float(out.metrics["feedback_rows"]) == 8 and bool(np.asarray(before.extra["feedback"].present).any())


def test_wsn_keeps_a_finished_tasks_subnetwork_and_its_accuracy_exactly(digits):
  """After task 0's mask is stored, training task 1 changes no weight of it (frozen weights, fixed biases):
  task 0's test accuracy with its mask is unchanged, while the shared weights do move."""
  from prox.transforms import find_task_mask_state
  cfg, train_ds, test_ds = digits
  env, run, method, state = _setup(cfg, train_ds, test_ds, "split", "wsn")
  step = S.make_train_step(method.loss, method.tx, mesh=env.mesh)
  test0 = run.tasks[0].test.materialize()

  def train(state, t, steps=20):
    ds, mask = run.train_sets[t], run.tasks[t].logit_mask
    for i in range(steps):
      idx = np.arange(32 * i, 32 * i + 32) % len(ds.labels)
      rows = {"image": ds.images[idx], "label": ds.labels[idx], "logit_mask": np.broadcast_to(mask, (32, 10))}
      state, _ = step(state, S.shard_batch(rows, env.mesh))
    return state

  state = method.end_task(train(state, 0), 0, run, log := {})
  assert int(find_task_mask_state(state.opt_state).num_tasks) == 1 and 0.3 < log["used_fraction"][0][
      "['hidden']['dense0']['kernel']"] <= 0.5 + 1e-6
  acc0 = method.evaluate(state, test0, 64, 0, logit_mask=run.tasks[0].logit_mask)["accuracy_masked"]
  w0 = jax.device_get(state.params["weights"])
  state = train(state, 1)
  acc1 = method.evaluate(state, test0, 64, 0, logit_mask=run.tasks[0].logit_mask)["accuracy_masked"]
  assert acc1 == acc0 and acc0 > 0.6
  used = jax.device_get(find_task_mask_state(state.opt_state).used)
  w1 = jax.device_get(state.params["weights"])
  for name in ("dense0", "dense1"):
    a, b, u = w0["hidden"][name]["kernel"], w1["hidden"][name]["kernel"], used["hidden"][name]["kernel"]
    np.testing.assert_array_equal(b[u], a[u])                 # task 0's weights: frozen
    assert np.any(b[~u] != a[~u])                             # the others: trained on task 1
    np.testing.assert_array_equal(w1["hidden"][name]["bias"], w0["hidden"][name]["bias"])


def test_tame_spawns_an_expert_at_a_detected_switch_and_routes_by_the_selector(digits):
  """Task 0, then task 1's new classes: the detector fires inside the step, the trained expert is kept in
  slot 0 (frozen from then on) and a copy becomes the active expert 1; memory rows carry the expert that
  trained on them; the prediction runs each input through the expert of largest live selector logit."""
  from prox import models  # noqa: F401
  cfg, train_ds, test_ds = digits
  env, run, method, state = _setup(cfg, train_ds, test_ds, "split_class", "tame")
  step = S.make_train_step(method.loss, method.tx, mesh=env.mesh, transition=method.transition)

  def batch(t, i):
    ds = run.train_sets[t]
    idx = np.arange(32 * i, 32 * i + 32) % len(ds.labels)
    return S.shard_batch({"image": ds.images[idx], "label": ds.labels[idx],
                          "row": np.arange(32, dtype=np.int32)}, env.mesh)

  for i in range(20):
    state, _ = step(state, batch(0, i))
  assert int(state.extra["tame"].num_experts) == 1
  for i in range(20):
    state, _ = step(state, batch(1, i))
    if int(state.extra["tame"].num_experts) == 2:
      break
  tstate = jax.device_get(state.extra["tame"])
  assert int(tstate.num_experts) == 2 and int(tstate.active) == 1 and i < 19
  slot0 = jax.tree.map(lambda b: np.asarray(b[0]), tstate.experts)
  _close(slot0, jax.device_get(state.params["expert"]), rtol=0, atol=0)       # the copy starts from it
  for j in range(3):
    state, _ = step(state, batch(1, 20 + j))
  tstate = jax.device_get(state.extra["tame"])
  _close(jax.tree.map(lambda b: np.asarray(b[0]), tstate.experts), slot0, rtol=0, atol=0)   # kept
  assert not np.allclose(state.params["expert"]["head"]["kernel"], slot0["head"]["kernel"])
  memory = jax.device_get(state.extra["replay"]["memory"])
  stored = np.asarray(memory.data["expert"])[:int(memory.seen)]
  assert set(stored.tolist()) == {0, 1}
  test = run.tasks[1].test.materialize()
  got = method.evaluate(state, test, 64, 1)
  from prox.experiments.continual import _selector_apply
  bank = method_bank = jax.tree.map(lambda b: np.asarray(b), tstate.experts)
  bank = jax.tree.map(lambda b, p: np.concatenate([b[:1], np.asarray(p)[None], b[2:]]), method_bank,
                      jax.device_get(state.params["expert"]))                  # active slot: the live params
  sel = np.asarray(_selector_apply(state.params["selector"], jnp.asarray(test.images)))
  route = np.argmax(np.where(np.asarray(tstate.alive), sel, -np.inf), -1)
  pred = np.array([np.argmax(env.apply(jax.tree.map(lambda b: b[e], bank), {}, test.images[n:n + 1],
                                       train=False)[0][0]) for n, e in enumerate(route)])
  assert got["accuracy"] == pytest.approx(np.mean(pred == test.labels))
  assert set(route.tolist()) <= {0, 1}
