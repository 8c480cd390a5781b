"""The classify experiment on the one loop: divergence, resume after the last checkpoint, times."""
import json
import os
import subprocess
import sys

import pytest

CONFIG = "prox/experiments/configs/classify.py"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prox(workdir, *overrides, timeout=300):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
         "--config.tensorboard=False", "--config.progress=False", *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]


@pytest.mark.parametrize("optimizer, expected", [("sgd", "is not finite"), ("adam", "the run diverged")])
def test_a_diverging_run_stops_with_one_line_and_exit_1(tmp_path, optimizer, expected):
  proc = _prox(tmp_path, f"--config.optimizer={optimizer}", "--config.learning_rate=1e6",
               "--config.num_steps=300", "--config.log_every=20", "--config.checkpoint_every=50")
  lines = _error_lines(proc)
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("prox: error:") and expected in lines[0], lines
  assert not (tmp_path / "metrics.json").exists()
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_resume_after_the_last_checkpoint_still_reports_train_metrics_and_total_time(tmp_path):
  first = _prox(tmp_path, "--config.num_steps=30", "--config.log_every=10", "--config.eval_every=30")
  assert first.returncode == 0, first.stderr
  done = json.loads((tmp_path / "metrics.json").read_text())
  os.remove(tmp_path / "metrics.json")        # as if killed after the last checkpoint
  again = _prox(tmp_path, "--config.num_steps=30", "--config.log_every=10", "--config.eval_every=30")
  assert again.returncode == 0, again.stderr
  resumed = json.loads((tmp_path / "metrics.json").read_text())
  for key in ("train_loss", "train_accuracy", "test_accuracy"):
    assert resumed[key] == done[key], key
  assert resumed["train_seconds_this_run"] == 0 and resumed["train_seconds"] == done["train_seconds"] > 0


def test_noise_scale_is_logged_when_asked(tmp_path):
  proc = _prox(tmp_path, "--config.num_steps=20", "--config.log_every=10", "--config.noise_scale=True")
  assert proc.returncode == 0, proc.stderr
  final = json.loads((tmp_path / "metrics.json").read_text())
  assert final["train_noise_scale"] > 0
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all("noise_scale" in r for r in logged if r["split"] == "train")
