"""The `prox` command: a short real run, one-line errors, and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "classify.py"


def prox(*args, env=None, **kwargs):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, **kwargs)


def test_short_run_writes_every_output(tmp_path):
  result = prox(f"--workdir={tmp_path}", "--config.num_steps=120", "--config.eval_every=60",
                "--config.log_every=20", "--config.checkpoint_every=60")
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((tmp_path / "metrics.json").read_text())
  assert final["step"] == 120 and final["test_accuracy"] > 0.9
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["split"] == "train"] == [20, 40, 60, 80, 100, 120]
  assert [l["step"] for l in lines if l["split"] == "test"] == [60, 120]
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any((tmp_path / "tb").iterdir())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["120", "60"]
  assert "test_accuracy=" in result.stdout


@pytest.mark.parametrize("override, expected", [
    ("--config.dataset=imagenet", "unknown dataset 'imagenet'; known: digits, mnist"),
    ("--config.model=vit", "unknown model 'vit'; known: mlp, cnn, resnet20"),
    ("--config.optimizer=adamm", "unknown optimizer 'adamm'; known: "),
    ("--config.learning_rate=-0.1", "learning_rate must be positive, got -0.1"),
    ("--config.micro_batch_size=48", "micro_batch_size 48 does not divide the per-device batch 128"),
])
def test_bad_config_is_one_line(tmp_path, override, expected):
  result = prox(f"--workdir={tmp_path}", override)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("prox: error: " + expected), result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_batch_not_divisible_by_devices_and_unwritable_workdir(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = prox(f"--workdir={tmp_path}", "--config.batch_size=130", env=env)
  assert result.returncode == 2
  assert "batch_size 130 is not divisible by the device count 4" in result.stderr
  blocker = tmp_path / "file"
  blocker.write_text("x")
  result = prox(f"--workdir={blocker / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert f"workdir '{blocker / 'run'}' is not writable" in result.stderr


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  result = prox(f"--workdir={tmp_path / 'run'}", "--config.dataset=mnist",
                f"--config.data_dir={tmp_path / 'tfds'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert "mnist" in line and "digits" in line


def _final_params(workdir: Path, step: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  args = ["--config.num_steps=150", "--config.checkpoint_every=1", "--config.keep_checkpoints=2",
          "--config.eval_every=50", "--config.progress=false"]
  whole = tmp_path / "whole"
  assert prox(f"--workdir={whole}", *args).returncode == 0

  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={killed}", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.time() + 300
  ckpts = killed / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) >= 40:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
  assert max(steps) < 150
  resumed = prox(f"--workdir={killed}", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for a, b in zip(_final_params(whole, 150), _final_params(killed, 150), strict=True):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_unknown_experiment_lists_the_known_ones(tmp_path):
  result = prox(f"--workdir={tmp_path}", "--config.experiment=classfy")
  assert result.returncode == 2
  assert "unknown experiment 'classfy'; known: " in result.stderr and "classify" in result.stderr


def test_model_options_are_checked_and_a_config_variant_selects_another_model(tmp_path):
  result = prox(f"--workdir={tmp_path / 'bad'}", "--config.model=cnn")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("prox: error: model 'cnn' rejects model_kwargs {'hidden': (256, 256)}")
  assert "classify.py:cnn" in line
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}:cnn",
         f"--workdir={tmp_path / 'cnn'}", "--config.num_steps=30", "--config.eval_every=30",
         "--config.progress=false"]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((tmp_path / "cnn" / "metrics.json").read_text())["step"] == 30
