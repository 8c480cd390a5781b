"""Experiment adadagrad: the adaptive-batch loop (one compilation per bucket, a batch that never
decreases, the controller equal to the pure test functions), exact resume, one-line CLI errors, and
the sweep's outputs."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prox import optim
from prox import step as S
from prox.experiments import _adaptive as A
from prox.experiments import adadagrad
from prox.experiments import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "adadagrad.py"


@pytest.fixture(scope="module")
def splits():
  return train.load_splits(A.run_config())


def _config(**overrides) -> ml_collections.ConfigDict:
  c = A.run_config()   # logistic regression, AdaGradNorm
  # Epochs of the plain digits split: the augmented stream compiles its warp once per power-of-two
  # bucket (seconds each), which only the resume test pays.
  c.update(dict(b0=8, b_max=128, micro_batch_size=4, budget_samples=1500, eval_every_samples=512,
                evals_per_decade=5, checkpoint_every=4, stage_samples=256, ramp_increment=8, augment=False))
  c.update(overrides)
  return c


def _compiles_of_the_train_step(caplog) -> int:
  return sum("Finished XLA compilation of jit(step)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method, overrides", [
    ("ramp", {}), pytest.param("norm", dict(eta=1.0), marks=pytest.mark.slow)])
def test_growing_batch_compiles_once_per_bucket_and_never_decreases(tmp_path, splits, caplog, method,
                                                                    overrides):
  config = _config(method=method, **overrides)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles(True):
    summary = A.train_run(config, str(tmp_path), datasets=splits)
  sizes = summary["batch_sizes"]["batch_size"]
  assert sizes[0] == 8 and sizes[-1] > 8, sizes
  assert all(a <= b for a, b in zip(sizes, sizes[1:])), sizes
  assert all(b % 4 == 0 and b <= 128 for b in sizes)
  buckets = {optim.bucket(b, 4) for b in sizes}
  assert len(buckets) >= 3
  assert _compiles_of_the_train_step(caplog) == len(buckets)
  if method == "ramp":   # 16 batch sizes 8, 16, ..., 128 in the buckets 2, 4, 8, 16, 32
    assert sizes[:16] == list(range(8, 129, 8)) and sorted(buckets) == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("method", ["norm", "augmented", "coordinate"])
def test_controller_asks_what_the_pure_test_function_says(splits, method):
  config = _config(method=method, optimizer="adagrad", learning_rate=0.1, eta=0.3, theta=0.2, nu=0.25,
                   b0=16, b_max=64)
  setup = A.build(config, splits[0])
  state, data, seen = setup.state, A._data_init(config), set()
  for k in range(3):
    b = setup.policy.batch_size(state, k)
    local, data = A.draw(config, splits[0], data, b)
    packed = S.pack_micro_batches(local, num_devices=1, micro_batch_size=4,
                                  max_micro_batches=optim.bucket(b, 4))
    before = jax.device_get(state)   # the step donates `state`
    state, out = setup.steps.train_step(state, S.shard_batch(packed, setup.mesh), np.int32(b // 4))
    stats, inner = jax.device_get(out.grad_stats), jax.device_get(out.group_stats)
    assert int(stats.num_groups) == b // 4 and stats.group_size == 4
    if method == "norm":
      want = optim.norm_test_from_stats(stats, 0.3)
    elif method == "augmented":
      want = optim.augmented_inner_product_test_from_stats(stats, inner, 0.2, 0.25)
    else:
      steps = optim.adagrad_step_size(before.opt_state, eps=1e-7)
      want = optim.coordinate_wise_test_from_stats(stats, steps, 0.3)
      flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(steps)])
      assert k == 0 or np.ptp(flat) > 0   # after a step AdaGrad's steps differ between coordinates
    got = jax.device_get(state.extra.controller)
    np.testing.assert_allclose(got.requested, want, rtol=2e-5)
    assert int(got.batch_size) == int(optim.batch_size_update(before.extra.controller, got.requested).batch_size)
    seen.add(int(got.batch_size))
  assert max(seen) > 16   # the test asked for more than b0 at least once


def _final_checkpoint(workdir: Path):
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  step = max(steps)
  tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  return step, [np.asarray(x) for x in jax.tree.leaves(tree)], meta


def test_resumed_run_equals_the_uninterrupted_run(tmp_path, splits):
  # The second part restores TrainState (controller included), stream position and counters from the
  # checkpoint the first part ended with. (Compiled steps are shared to keep the test short; the
  # SIGKILL test of tests/experiments/test_main.py resumes the shared loop in a new process.)
  cache = {}
  config = _config(method="norm", eta=1.0, b_max=16, budget_samples=600, augment=True)
  whole = A.train_run(config, str(tmp_path / "whole"), datasets=splits, cache=cache)
  first = _config(method="norm", eta=1.0, b_max=16, budget_samples=250, augment=True)
  part = A.train_run(first, str(tmp_path / "resumed"), datasets=splits, cache=cache)
  assert part["samples"] < whole["samples"] and len(set(whole["batch_sizes"]["batch_size"])) > 2
  resumed = A.train_run(config, str(tmp_path / "resumed"), datasets=splits, cache=cache)
  step_a, leaves_a, meta_a = _final_checkpoint(tmp_path / "whole")
  step_b, leaves_b, meta_b = _final_checkpoint(tmp_path / "resumed")
  assert step_a == step_b == whole["step"] == resumed["step"]
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):   # params, optimizer state, controller, rng: bit-identical
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert meta_a["data"] == meta_b["data"] == {"seed": 0, "position": whole["samples"]}
  assert meta_a["samples"] == meta_b["samples"]
  assert whole["batch_sizes"] == resumed["batch_sizes"]
  accuracy = lambda s: dict(zip(s["evals"]["step"], s["evals"]["accuracy"]))
  a, b = accuracy(whole), accuracy(resumed)
  assert all(a[k] == b[k] for k in a)
  # A finished run is not trained again; a run under another config is refused.
  assert A.train_run(config, str(tmp_path / "whole"), datasets=splits, cache=cache)["step"] == whole["step"]
  with pytest.raises(train.ConfigError, match="holds a run with other eta"):
    A.train_run(_config(method="norm", eta=0.5, b_max=16, budget_samples=600, augment=True),
                str(tmp_path / "whole"), datasets=splits, cache=cache)


def _prox(*args):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("overrides, expected", [
    (["--config.b0=8192"], "b0=8192 is larger than b_max=4096"),
    (["--config.etas=(0.1,-0.5)"], "eta must be > 0, got -0.5 in etas"),
    (["--config.micro_batch_size=12"], "micro_batch_size 12 x 1 device(s) does not divide b0=32"),
])
def test_bad_input_is_one_line_before_compiling(tmp_path, overrides, expected):
  result = _prox(f"--workdir={tmp_path}", *overrides)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == "prox: error: " + expected, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, value, expected", [
    ("eta", 0.0, "eta must be > 0, got 0.0"),
    ("methods", "norm,linear", "unknown method 'linear'"),
    ("large_batch", 8192, "large_batch=8192 must be an integer in [b0, b_max] = [32, 4096]"),
    ("models", "logreg,vit", "unknown model 'vit'"),
])
def test_sweep_config_errors(tmp_path, field, value, expected):
  config = ml_collections.ConfigDict(adadagrad.effective_config(_sweep_config()).to_dict())
  config[field] = value
  with pytest.raises(train.ConfigError) as error:
    adadagrad.validate(config, str(tmp_path))
  assert str(error.value).startswith(expected), str(error.value)


def _sweep_config():
  from prox.experiments.configs import adadagrad as configs  # pylint: disable=g-import-not-at-top
  return configs.get_config()


@pytest.mark.slow
def test_sweep_writes_tables_plots_and_verdicts(tmp_path):
  config = _sweep_config()
  config.update(dict(models="logreg", optimizers="adagrad_norm,adagrad",
                     methods="constant_small,constant_large,norm,coordinate", etas=(0.5,), b0=8,
                     large_batch=64, b_max=64, budget_samples=640, eval_every_samples=128,
                     evals_per_decade=5))
  names = [s.name for s in adadagrad.run_specs(config)]
  assert names == ["logreg-adagrad_norm-constant_small", "logreg-adagrad_norm-constant_large",
                   "logreg-adagrad_norm-norm_eta0.5", "logreg-adagrad-constant_small",
                   "logreg-adagrad-constant_large", "logreg-adagrad-norm_eta0.5",
                   "logreg-adagrad-coordinate"]   # no coordinate-wise test for AdaGradNorm
  final = adadagrad.run(config, str(tmp_path))
  assert final["runs"] == 7
  text = (tmp_path / "results.md").read_text()
  assert "## logreg / adagrad_norm" in text and "## logreg / adagrad" in text
  assert "| coordinate-wise test |" in text and "| constant b=64 |" in text
  results = json.loads((tmp_path / "results.json").read_text())
  for run in results["runs"]:
    assert run["samples"] <= 640 and run["samples"] > 640 - 64
    assert run["evals"]["step"][-1] == run["step"]
  verdicts = results["verdicts"]["logreg/adagrad"]
  assert [r["name"] for r in verdicts["runs"]] == ["logreg-adagrad-norm_eta0.5", "logreg-adagrad-coordinate"]
  for name in ("logreg_adagrad_norm.png", "logreg_adagrad.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
