"""The compose experiment: four methods in one step and one loop; the same numbers on 1 and 4 devices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prox.experiments import common
from prox.experiments import compose

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "compose.py"
TINY = ["--config.quick=True", "--config.runs=composed", "--config.budget_samples=2560",
        "--config.eval_every_samples=2560", "--config.checkpoint_every=1000", "--config.b_max=256",
        "--config.optimizer_kwargs.momentum=0.0", "--config.log_every=1"]


def _prox(workdir, *args, devices=1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


def _final_params(run_dir: Path):
  ckpt = run_dir / "checkpoints"
  step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as c:
    path = ckpt / str(step) / "state"
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        c.metadata(path).item_metadata.tree)
    tree = c.restore(path, target)
  return step, jax.tree.map(np.asarray, tree["params"]), jax.tree.map(np.asarray, tree["extra"])


def test_composed_run_is_the_same_on_one_and_four_devices(tmp_path):
  """Plain SGD (scale-sensitive): norm-test batches, N:M masks, EWC on shifts and the teacher's tasks
  give the same parameters, batch sizes and tasks on 1 device and on 4 fake devices."""
  one, four = tmp_path / "one", tmp_path / "four"
  r1 = _prox(one, *TINY, devices=1)
  assert r1.returncode == 0, r1.stderr[-3000:]
  r4 = _prox(four, *TINY, devices=4)
  assert r4.returncode == 0, r4.stderr[-3000:]
  s1, params1, extra1 = _final_params(one / "runs" / "composed" / "seed0")
  s4, params4, extra4 = _final_params(four / "runs" / "composed" / "seed0")
  assert s1 == s4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), params1, params4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), extra1, extra4)
  res1 = json.loads((one / "results.json").read_text())["runs"][0]
  res4 = json.loads((four / "results.json").read_text())["runs"][0]
  assert [x["batch_size"] for x in res1["log"]] == [x["batch_size"] for x in res4["log"]]
  assert max(x["batch_size"] for x in res1["log"]) > 64          # the norm test grew the batch
  assert res1["log"][-1]["beta"] < 1.0                           # the masks decayed
  assert res1["compiles"] == len({1 << (x["batch_size"] // 64 - 1).bit_length() for x in res1["log"]})
  for name in ("results.md", "accuracy_over_time.png", "composed.png"):
    assert (one / name).exists()


@pytest.mark.slow
def test_composed_run_is_the_same_on_one_device_and_a_2_x_4_fsdp_mesh(tmp_path):
  """Parameters, optimizer and every state machine sharded over fsdp = 4 (2 x 4 mesh of 8 fake devices):
  the same parameters and state machines as on one device, with plain SGD (scale-sensitive)."""
  one, eight = tmp_path / "one", tmp_path / "eight"
  r1 = _prox(one, *TINY, devices=1)
  assert r1.returncode == 0, r1.stderr[-3000:]
  r8 = _prox(eight, *TINY, "--config.fsdp=4", devices=8)
  assert r8.returncode == 0, r8.stderr[-3000:]
  s1, params1, extra1 = _final_params(one / "runs" / "composed" / "seed0")
  s8, params8, extra8 = _final_params(eight / "runs" / "composed" / "seed0")
  assert s1 == s8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), params1, params8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), extra1, extra8)
  log1 = json.loads((one / "results.json").read_text())["runs"][0]["log"]
  log8 = json.loads((eight / "results.json").read_text())["runs"][0]["log"]
  assert [x["batch_size"] for x in log1] == [x["batch_size"] for x in log8]


def test_family_transform_and_config_errors(tmp_path):
  transform = compose.family(0, 64)
  x = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8, 1)
  batch = {"image": x, "label": np.zeros(2, np.int32)}
  same = transform(batch, np.array([0.0, 0.0], np.float32), np.random.default_rng(0))
  np.testing.assert_array_equal(same["image"], x)
  moved = transform(batch, np.array([1.0, 0.0], np.float32), np.random.default_rng(0))["image"]
  assert sorted(moved[0].ravel()) == sorted(x[0].ravel()) and not np.array_equal(moved, x)   # a permutation
  noisy = transform(batch, np.array([0.0, 1.0], np.float32), np.random.default_rng(0))["image"]
  assert 2.0 < np.std(noisy - x) < 4.0
  from prox.experiments.configs import compose as configs
  c = configs.get_config()
  c.runs = "plain,teleport"
  with pytest.raises(common.ConfigError, match="runs: unknown 'teleport'"):
    compose.validate(c, str(tmp_path))
  c = configs.get_config()
  c.n = 4
  with pytest.raises(common.ConfigError, match="sparsity"):
    compose.validate(c, str(tmp_path))


def test_ewc_on_detected_shifts_stays_stable_with_a_large_lambda(tmp_path):
  """The Fisher consolidated at a detected shift is capped at half SGD's stability limit (a batch's Fisher at
  a shift made lambda = 10 diverge at lr 0.05, momentum 0.9): lambda = 1e4 trains to a finite end."""
  out = _prox(tmp_path, "--config.quick=True", "--config.runs=ewc_detector", "--config.ewc_lambda=1e4")
  assert out.returncode == 0, out.stderr[-2000:]
  run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
  assert run["log"][-1]["consolidations"] > 0            # the detector fired: the penalty was active
  assert np.isfinite(run["final_mean"])
