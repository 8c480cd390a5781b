"""One step, every layout: 1 device == 2 == 4 == 1 device x 8 micro-batches == 2 processes x 2 devices,
and the fully sharded meshes: 8 devices as data x fsdp = 8 x 1, 4 x 2, 2 x 4, 1 x 8, and 2 processes x 4
devices as 2 x 4.

The worker (``multidevice_worker.py``) runs scale-sensitive scenarios (plain SGD, no clipping, no Adam:
a step applying the sum of the device gradients moves the weights D times too far) in fresh subprocesses
with fake CPU devices and gloo collectives, and saves every number: parameters after 1 and 20 steps, every
logged metric, ``GradStats`` and group statistics, the norm-test statistic, AdaGradNorm's accumulator,
the batch-size controller's decisions, EWC's Fisher and GPM's bases computed in the step, and batch-norm
statistics. Every layout must give the same numbers within float32 summation-order tolerance.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multidevice_worker.py")


def _start(out, *args):
  cmd = [sys.executable, str(WORKER), "--out", str(out), *map(str, args)]
  return subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, timeout=600):
  output, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, output
  return output


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("layouts")
  runs = {"1 device": ("--devices", 1), "2 devices": ("--devices", 2), "4 devices": ("--devices", 4),
          "1 device x 8 micro-batches": ("--devices", 1, "--sgd-micro", 8),
          "8 x 1": ("--devices", 8), "4 x 2": ("--devices", 8, "--fsdp", 2),
          "2 x 4": ("--devices", 8, "--fsdp", 4), "1 x 8": ("--devices", 8, "--fsdp", 8)}
  names = list(runs)
  for first in range(0, len(names), 2):        # two at a time: the machine has 2 cores
    procs = [_start(tmp / f"{i}.npz", *runs[names[i]]) for i in range(first, min(first + 2, len(names)))]
    for p in procs:
      _finish(p)
  for label, extra, total in (("2 processes x 2 devices", (), 4),
                              ("2 processes x 4 devices, 2 x 4", ("--fsdp", 4), 8)):
    port = _free_port()
    hosts = [_start(tmp / f"{label}.npz", "--devices", total // 2, "--num-processes", 2, "--process-id", i,
                    "--port", port, *extra) for i in range(2)]
    outputs = [_finish(p) for p in hosts]
    assert f"ok {total} 2" in outputs[0], outputs[0]
  out = {name: _load(tmp / f"{i}.npz") for i, name in enumerate(runs)}
  out["2 processes x 2 devices"] = _load(tmp / "2 processes x 2 devices.npz")
  out["2 processes x 4 devices, 2 x 4"] = _load(tmp / "2 processes x 4 devices, 2 x 4.npz")
  return out


SCENARIOS = ("sgd", "stats", "continual", "batchnorm", "groups")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_layout_gives_the_same_numbers(layouts, scenario):
  ref = {k: v for k, v in layouts["1 device"].items() if k.startswith(scenario + "/")}
  assert len(ref) > 10, sorted(ref)
  for name, got in layouts.items():
    assert {k for k in got if k.startswith(scenario + "/")} == set(ref), name
    for k, v in ref.items():
      np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=1e-5, err_msg=f"{name}: {k}")


def test_the_scenarios_are_scale_sensitive(layouts):
  """Guards the guard: the saved numbers move with the gradient's scale and the statistics are live."""
  ref = layouts["1 device"]
  before = ref["sgd/params1['h']['w']"]
  assert np.abs(ref["sgd/params['h']['w']"] - before).max() > 1e-2   # SGD moved the weights
  # The controller asked for growing batches and the accumulator grew every step.
  sizes = [ref[f"stats/extra['controller'].batch_size"]]
  assert int(sizes[0]) > 64
  assert float(ref["stats/extra['norm_test']"]) > 0
  fisher = ref["continual/fisher['h']['w']"]
  assert fisher.max() > 0
  ranks = [v for k, v in ref.items() if k.startswith("continual/opt_state") and "ranks" in k]
  assert ranks and max(int(r.max()) for r in ranks) > 0
  assert np.abs(ref["batchnorm/model_state['mean']"]).max() > 1e-3
  moved = [np.abs(ref[k] - ref[k.replace("groups/params", "groups/params1")]).max()
           for k in ref if k.startswith("groups/params[") and "conv" in k and "kernel" in k]
  assert moved and min(moved) > 1e-3                                   # the grouped kernels trained
