"""Experiment adadagrad on the one loop: one compile per bucket, a batch that never decreases, the
controller equal to the pure test functions, exact resume, one-line CLI errors, the sweep's outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

from prox import optim
from prox.experiments import adadagrad as A
from prox.experiments import common
from prox.experiments.configs import adadagrad as configs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "adadagrad.py"


def _config(**overrides) -> ml_collections.ConfigDict:
  c = configs.get_config()
  c.update(dict(models="logreg", optimizers="adagrad_norm", num_seeds=1, budgets="samples", b0=16,
                b_max=256, large_batch=64, micro_batch_size=0, budget_samples=2048, budget_steps=20,
                eval_every_samples=512, evals_per_decade=5, checkpoint_every=4, stage_samples=256,
                ramp_increment=16, etas=(0.5,)))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def shared():
  return A.Shared(_config())


def _run(config, method, workdir, shared, **kw):
  spec = next(r for r in A.runs(config) if r.method == method)
  spec = spec._replace(**kw)
  return A.train_run(config, spec, str(workdir), shared)


def test_growing_batch_compiles_once_per_bucket_and_never_decreases(tmp_path, shared):
  config = _config(methods="ramp")
  summary = _run(config, "ramp", tmp_path, shared)
  sizes = summary["batch_sizes"]["batch_size"]
  assert sizes[:4] == [16, 32, 48, 64], sizes
  assert all(a < b for a, b in zip(sizes, sizes[1:])) and all(b % 16 == 0 and b <= 256 for b in sizes)
  buckets = {optim.bucket(b, 16) for b in sizes}
  assert summary["compiles"] == len(buckets) >= 4
  assert summary["samples"] <= 2048 and summary["evals"]["step"][-1] == summary["step"]


@pytest.mark.parametrize("method", ["norm", "augmented", "coordinate"])
def test_controller_asks_what_the_per_sample_test_says(tmp_path, shared, method):
  """The controller's b' at the first step equals the exact test on vmap(grad) per-sample gradients."""
  config = _config(methods=method, optimizers="adagrad", eta=0.3, theta=0.2, nu=0.25)
  spec = next(r for r in A.runs(config) if r.method == method)
  train_ds = shared.datasets[0]
  net = common.build_model(config, train_ds, seed=spec.seed, prefix="model_settings.logreg.")
  source = A._source(config, train_ds, spec.seed)
  batch = source.next(16).data
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      net.apply(p, {}, x[None], train=True)[0], y[None]).mean()
  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(net.params, batch["image"], batch["label"])
  eta = 0.5 if method == "norm" else 0.3
  if method == "norm":
    want = optim.norm_test(grads, eta)
  elif method == "augmented":
    want = optim.augmented_inner_product_test(grads, 0.2, 0.25)
  else:     # AdaGrad's steps before the first update: 1/sqrt(initial accumulator + eps), uniform
    tx = common.build_optimizer(A._optimizer_config(config, "adagrad"))
    want = optim.coordinate_wise_test(grads, optim.adagrad_step_size(tx.init(net.params)), 0.3)
  summary = A.train_run(config, spec, str(tmp_path), shared)
  # The controller's first request decides the second batch size.
  sizes = summary["batch_sizes"]["batch_size"]
  second = sizes[1] if len(sizes) > 1 and summary["batch_sizes"]["step"][1] == 2 else 16
  expect = min(256, max(16, int(-(-np.ceil(float(want)) // 16) * 16)))
  assert second == expect, (second, float(want))


def test_resumed_run_equals_the_uninterrupted_run(tmp_path, shared):
  config = _config(methods="norm")
  whole = _run(config, "norm", tmp_path / "whole", shared)
  part = _run(_config(methods="norm", budget_samples=700), "norm", tmp_path / "resumed", shared)
  assert part["samples"] < whole["samples"]
  resumed = _run(config, "norm", tmp_path / "resumed", shared)
  assert resumed["step"] == whole["step"] and resumed["samples"] == whole["samples"]
  assert resumed["batch_sizes"] == whole["batch_sizes"]
  assert resumed["evals"]["accuracy"] == whole["evals"]["accuracy"]


def _prox(*args):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("overrides, expected", [
    (["--config.b0=16384"], "b0/b_max: batch_size_init: b0=16384 is larger than b_max=8192"),
    (["--config.etas=(0.1,-0.5)"], "etas must be numbers > 0, got (0.1, -0.5)"),
    (["--config.micro_batch_size=12"], "micro_batch_size 12 x 1 device(s) does not divide b0=64"),
    (["--config.methods=norm,linear"], "methods: unknown 'linear'"),
])
def test_bad_input_is_one_line_before_compiling(tmp_path, overrides, expected):
  result = _prox(f"--workdir={tmp_path}", *overrides)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("prox: error: " + expected), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, value, expected", [
    ("eta", 0.0, "eta must be a finite number in (0, inf]"),
    ("large_batch", 8192, "large_batch=8192 must be in [b0, b_max]"),
    ("models", "logreg,vit", "unknown model 'vit'"),
    ("budgets", "samples,epochs", "budgets: unknown 'epochs'"),
])
def test_sweep_config_errors(tmp_path, field, value, expected):
  config = _config()
  config[field] = value
  with pytest.raises(common.ConfigError) as error:
    A.validate(config, str(tmp_path))
  assert str(error.value).startswith(expected), str(error.value)


@pytest.mark.slow
def test_sweep_writes_tables_plots_and_verdicts(tmp_path):
  config = _config(optimizers="adagrad_norm,adagrad", methods="constant_small,constant_large,norm,coordinate",
                   budgets="samples,steps", budget_samples=1024)
  names = [r.name for r in A.runs(config)]
  assert names[:3] == ["samples/logreg-adagrad_norm-constant_small/seed0",
                       "samples/logreg-adagrad_norm-constant_large/seed0",
                       "samples/logreg-adagrad_norm-norm_eta0.5/seed0"]
  assert not any("adagrad_norm-coordinate" in n for n in names)   # no coordinate test for AdaGradNorm
  final = A.run(config, str(tmp_path))
  assert final["runs"] == len(names) == 14
  text = (tmp_path / "results.md").read_text()
  assert "## logreg / adagrad / budget in steps" in text and "| coordinate-wise test |" in text
  results = json.loads((tmp_path / "results.json").read_text())
  for run in results["runs"]:
    assert run["samples"] <= 1024 and run["evals"]["step"][-1] == run["step"]
    if run["budget"] == "steps":
      assert run["step"] <= 20
  # A steps-budget run whose samples-budget twin ended before 20 steps (b=64: 16 steps) is read from it;
  # one that the step budget cuts (b=16: 64 steps with the samples budget) is trained.
  by_name = {r["name"]: r for r in results["runs"]}
  large = by_name["steps/logreg-adagrad_norm-constant_large/seed0"]
  assert large["same_as"] == "samples/logreg-adagrad_norm-constant_large/seed0"
  assert large["evals"] == by_name[large["same_as"]]["evals"]
  small = by_name["steps/logreg-adagrad_norm-constant_small/seed0"]
  assert "same_as" not in small and small["step"] == 20
  assert (tmp_path / "mnist1d_logreg_adagrad_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A rerun skips every finished run.
  again = A.run(config, str(tmp_path))
  assert again["runs"] == final["runs"]
