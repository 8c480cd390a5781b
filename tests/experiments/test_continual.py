"""The `continual` experiment: the pieces against references, bad config values as one-line errors through
the CLI, a short end-to-end run; marked slow (about 20 s of CPU each): a tiny run of every method on each
stream and resume after a crash."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from prox import models
from prox.experiments import _continual_methods as M
from prox.experiments import continual
from prox.experiments import train
from prox.experiments.configs import continual as continual_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "continual.py"


def _config(quick=True, **fields) -> ml_collections.ConfigDict:
  cfg = continual_config.get_config("quick" if quick else "")
  cfg.progress = False
  for dotted, value in fields.items():
    *parents, leaf = dotted.split("__")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def test_mlp_layer_inputs_reproduce_the_model():
  net = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=10, seed=3,
                                            hidden=(16, 12)))
  x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  inputs = M.mlp_layer_inputs(net.params, x)
  assert [inputs[k].shape for k in ("dense0", "dense1", "head")] == [(5, 64), (5, 16), (5, 12)]
  logits = inputs["head"] @ net.params["head"]["kernel"] + net.params["head"]["bias"]
  np.testing.assert_allclose(logits, net.apply(net.params, {}, x, train=False)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(inputs["dense0"], x.reshape(5, -1))


def test_masked_loss_is_the_weighted_masked_cross_entropy():
  net = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=4, seed=0,
                                            hidden=(8,)))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(6, 8, 8, 1)).astype(np.float32),
           "label": np.array([0, 1, 2, 3, 0, 1], np.int32),
           "logit_mask": np.array([[1, 1, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2 + [[1, 1, 1, 1]] * 2, bool),
           "weight": np.array([1, 1, 1, 0, 1, 1], np.float32)}
  loss, (metrics, _) = M.masked_loss(net.apply)(net.params, {}, batch, None)
  logits = np.asarray(net.apply(net.params, {}, batch["image"], train=False)[0], np.float64)
  ref, hits = [], []
  for z, y, m, w in zip(logits, batch["label"], batch["logit_mask"], batch["weight"]):
    z = np.where(m, z, -np.inf)
    ref.append(w * -(z[y] - np.log(np.sum(np.exp(z[m])))))
    hits.append(w * (np.argmax(z) == y))
  np.testing.assert_allclose(loss, np.sum(ref) / 5, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.sum(hits) / 5, rtol=1e-6)


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
    (("--config.streams=permuted,rotated",), "unknown stream 'rotated'; known: permuted, split"),
]


def test_bad_config_values_are_one_line_cli_errors(tmp_path):
  procs = [_cli(tmp_path / str(i), *args) for i, (args, _) in enumerate(BAD)]   # in parallel
  for i, ((args, expected), proc) in enumerate(zip(BAD, procs)):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (args, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("prox: error: " + expected), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / str(i) / "checkpoints").exists()


@pytest.mark.parametrize("fields, expected", [
    ({"split__ewc_detect_lambda": -5.0}, "split.ewc_detect_lambda: ewc_lambda must be a finite number >= 0, got -5.0"),
    ({"split__ewc_lambdas": (1.0, float("nan"))}, "split.ewc_lambdas: ewc_lambda must be a finite number >= 0, got nan"),
    ({"ewc__gamma": -0.1}, "ewc.gamma: gamma must be in [0, 1], got -0.1"),
    ({"permuted__epochs_per_task": 0}, "permuted.epochs_per_task must be a positive integer, got 0"),
    ({"replay__batch_size": 300}, "replay.batch_size 300 exceeds replay.capacity 200"),
    ({"model": "cnn", "methods": "naive,gpm"}, "method 'gpm' reads the dense layers' inputs and needs model"),
    ({"gpm__threshold_base": 1.5}, "gpm.threshold_base must be in (0, 1], got 1.5"),
    ({"slca__backbone_scale": -1.0}, "slca.backbone_scale: slow_learner: scale must be finite and >= 0"),
    ({"detector__test_window": 0}, "detector: test_window must be an int >= 1, got 0"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    ({"streams": "", "methods": "", "scole__enabled": False}, "nothing to run"),
])
def test_validate_names_the_bad_value(tmp_path, fields, expected):
  with pytest.raises(train.ConfigError, match="^" + re.escape(expected)):
    continual.validate(_config(quick=False, **fields), str(tmp_path))


def test_detector_windows_longer_than_a_task_fail_before_training(tmp_path):
  cfg = _config(quick=False, methods="ewc_detect", streams="split", scole__enabled=False)
  cfg.detector.reference_window = 80   # split tasks have ~85 steps of 10 epochs; 80 + 10 >= that
  with pytest.raises(train.ConfigError, match="detector windows reference_window \\+ test_window = 90"):
    continual.run(cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def _read(workdir):
  return json.loads((Path(workdir) / "results.json").read_text())


def _check_stream(res, stream, num_tasks):
  runs = res["streams"][stream]
  assert sorted({r["kind"] for r in runs.values()}) == sorted(M.KINDS)
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
    assert result["tasks_done"] == num_tasks and result["steps"] > 0
  assert np.mean(np.diag(np.asarray(runs["naive"]["seeds"]["0"]["R"]))) > 0.5   # it learns
  detect = next(r for r in runs.values() if r["kind"] == "ewc_detect")["seeds"]["0"]["log"]
  assert detect["switch_steps"] and "stability" in detect   # the detector triggered a consolidation
  gpm_log = runs["gpm"]["seeds"]["0"]["log"]
  assert len(gpm_log["ranks"]) == num_tasks and max(gpm_log["ranks"][0].values()) > 0
  return runs


@pytest.mark.slow
def test_tiny_run_of_every_method(tmp_path):
  cfg = _config(streams="permuted", permuted__num_tasks=2, scole__num_tasks=3)
  headline = continual.run(cfg, str(tmp_path))
  res = _read(tmp_path)
  runs = _check_stream(res, "permuted", 2)
  for run in runs.values():   # all logits live: task- and class-incremental accuracies agree
    np.testing.assert_allclose(run["seeds"]["0"]["R_class"], run["seeds"]["0"]["R"])
  assert any("head" in k for k in runs["gpm"]["seeds"]["0"]["log"]["ranks"][0])   # single head: projected
  scole = res["scole"]["0"]
  assert len(scole["accuracy"]) == 3 and np.asarray(scole["class_accuracy"]).shape == (3, 10)
  assert all(len(c) == 2 for c in scole["classes"])
  for name in ("results.md", "heatmap_permuted.png", "accuracy_permuted.png", "scole_accuracy.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" or name.endswith(".md")
  table = (tmp_path / "results.md").read_text()
  assert "| EWC separate λ=10 |" in table and "| GPM |" in table and "## SCoLe" in table
  assert headline["permuted_naive_forgetting"] == res["summary"]["permuted"]["naive"]["forgetting"][0]


@pytest.mark.slow
def test_tiny_run_of_every_method_on_split(tmp_path):
  continual.run(_config(streams="split", scole__enabled=False), str(tmp_path))
  res = _read(tmp_path)
  runs = _check_stream(res, "split", 5)
  assert not any("head" in k for k in runs["gpm"]["seeds"]["0"]["log"]["ranks"][0])   # per-task heads
  assert "class-IL avg acc" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "heatmap_split.png").read_bytes()[:4] == b"\x89PNG"


def _crash_after(monkeypatch, calls):
  real = continual._train_task
  count = {"n": 0}

  def crashing(*args, **kwargs):
    count["n"] += 1
    if count["n"] > calls:
      raise KeyboardInterrupt("simulated crash")
    return real(*args, **kwargs)

  monkeypatch.setattr(continual, "_train_task", crashing)


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  fields = {"streams": "permuted", "methods": "replay,ewc_detect", "permuted__num_tasks": 2,
            "scole__num_tasks": 4}   # SCoLe checkpoints every 2 tasks in the quick config
  whole, crashed = tmp_path / "whole", tmp_path / "crashed"
  continual.run(_config(**fields), str(whole))
  with monkeypatch.context() as m:
    _crash_after(m, 3)   # replay tasks 1-2 and ewc_detect task 1 run; the crash hits ewc_detect's task 2
    with pytest.raises(KeyboardInterrupt):
      continual.run(_config(**fields), str(crashed))
  assert (crashed / "runs" / "permuted" / "replay" / "seed0.json").exists()
  assert not (crashed / "runs" / "permuted" / "ewc_detect_lam10" / "seed0.json").exists()
  with monkeypatch.context() as m:
    _crash_after(m, 4)   # ewc_detect's task 2, SCoLe tasks 1-3 (checkpoint after 2); crash in task 4
    with pytest.raises(KeyboardInterrupt):
      continual.run(_config(**fields), str(crashed))
  continual.run(_config(**fields), str(crashed))
  a, b = _read(whole), _read(crashed)
  for run_id in ("replay", "ewc_detect_lam10"):
    ra, rb = a["streams"]["permuted"][run_id]["seeds"]["0"], b["streams"]["permuted"][run_id]["seeds"]["0"]
    assert ra["R"] == rb["R"] and ra["log"] == rb["log"] and ra["steps"] == rb["steps"]
  assert a["scole"]["0"]["accuracy"] == b["scole"]["0"]["accuracy"]
  assert a["scole"]["0"]["class_accuracy"] == b["scole"]["0"]["class_accuracy"]
  assert b["scole"]["0"]["steps"] == a["scole"]["0"]["steps"]


def test_a_workdir_of_another_config_is_refused(tmp_path):
  cfg = _config(streams="split", methods="naive", scole__enabled=False)
  continual.run(cfg, str(tmp_path))
  other = _config(streams="split", methods="naive", scole__enabled=False, learning_rate=0.05)
  with pytest.raises(train.ConfigError, match="different config"):
    continual.run(other, str(tmp_path))


@pytest.mark.slow
def test_every_method_runs_on_four_devices(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}:quick", f"--workdir={tmp_path}",
       "--config.streams=permuted", "--config.permuted.num_tasks=2", "--config.scole.num_tasks=2",
       "--config.progress=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = _read(tmp_path)["streams"]["permuted"]
  assert sorted(r["kind"] for r in runs.values()) == sorted(M.KINDS)
  assert all(np.asarray(r["seeds"]["0"]["R"]).shape == (2, 2) for r in runs.values())
