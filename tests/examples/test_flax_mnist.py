"""examples/flax_mnist: every transform choice trains in the NNX loop; masks are exactly as sparse as asked.

The example is not part of the package; it is imported by path. Every transform runs once, on a small CNN
for three epochs (per task), in two subprocesses that share the transforms and run side by side; XLA's
backend optimisation is off there (``--xla_backend_optimization_level=0``), which makes compiling the
CNN's train step about 3x faster on CPU. The tests check learning (accuracy well above chance, loss below
its initial ``ln(classes)``), the exact sparsity of the evaluated weights, and that the README's
per-transform lines are the example's own.
"""
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from prox.transforms.pruning import erk_sparsities

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "flax_mnist"
TRANSFORMS = ("adagrad_norm", "sinkgd", "nm_sparsity", "gradual_pruning", "rigl", "ewc", "gpm", "sara", "unfreezing")
# The small configuration of the tests (every field as in configs/default.py otherwise).
SMALL = dict(width=8, hidden=32, num_epochs=3)

RUNNER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import train
from configs import default
for transform in sys.argv[3:]:
  config = default.get_config(transform)
  config.update(json.loads(sys.argv[2]))
  train.train_and_evaluate(config, os.path.join(os.environ["RUN_DIR"], transform))
"""


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs every transform once (two subprocesses side by side); returns the run directory."""
  out = tmp_path_factory.mktemp("flax_mnist")
  env = dict(os.environ, RUN_DIR=str(out), XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu")
  halves = [TRANSFORMS[0::2], TRANSFORMS[1::2]]
  procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(EXAMPLE), json.dumps(SMALL), *half], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for half in halves]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return out


def _result(runs, transform):
  summary = json.loads((runs / transform / "summary.json").read_text())
  weights = dict(np.load(runs / transform / "weights.npz"))
  return summary, weights


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_each_transform_learns_in_the_nnx_loop(runs, transform):
  summary, _ = _result(runs, transform)
  history = summary["history"]
  assert summary["protocol"] == {"ewc": "continual", "gpm": "continual", "sara": "finetune",
                                 "unfreezing": "finetune"}.get(transform, "single")
  # Three epochs (per task) of a small CNN: the training loss falls well below its initial ln(classes) and
  # the test accuracy (with BatchNorm's running averages, which still lag) is far above chance.
  if summary["protocol"] == "single":
    assert history[-1]["test_accuracy"] > 0.45, history          # chance: 0.1
    assert history[-1]["train_loss"] < min(0.5 * math.log(10), history[0]["train_loss"]), history
  else:
    assert summary["task0_after_task0"] > 0.6, summary           # chance: 0.2 among a task's 5 classes
    assert summary["task1_after_task1"] > 0.6, summary
    assert history[-1]["train_loss"] < min(0.5 * math.log(5), history[3]["train_loss"]), history
  if transform == "ewc":
    r = summary["ewc_lambda_range"]
    assert 0 < r["low"] < r["used"] < r["high"] < math.inf and r["max_fisher"] > 0
    np.testing.assert_allclose(r["used"], math.sqrt(r["low"] * r["high"]), rtol=1e-6)
  elif transform == "gpm":
    assert summary["gpm_rank"] > 0
  elif transform == "sara":
    assert 0.0 < summary["sara_trainable"] < 1.0


def _kernels(weights):
  return {k: v for k, v in weights.items() if k.endswith("kernel")}


@pytest.mark.parametrize("transform", ["nm_sparsity", "gradual_pruning", "rigl"])
def test_masks_give_the_exact_sparsity(runs, transform):
  summary, weights = _result(runs, transform)
  kernels = _kernels(weights)
  assert sorted(kernels) == ["conv1/kernel", "conv2/kernel", "linear1/kernel", "linear2/kernel"]
  if transform == "nm_sparsity":
    # Every group of 4 along the input axis keeps exactly 2; conv1 ([3, 3, 1, 4]: one input channel) is left
    # dense by the default filter.
    for name in ("conv2/kernel", "linear1/kernel", "linear2/kernel"):
      w = kernels[name]
      groups = w.reshape(w.shape[:-2] + (w.shape[-2] // 4, 4, w.shape[-1]))
      np.testing.assert_array_equal(np.count_nonzero(groups, axis=-2), 2, err_msg=name)
      assert summary["sparsity"][name] == 0.5
    assert np.count_nonzero(kernels["conv1/kernel"]) == kernels["conv1/kernel"].size
  else:
    # Exactly round(s_l * size) zeros per layer: s_l = 0.8 (uniform) or the ERK sparsities (RigL); the
    # selected leaves are the four kernels (ndim >= 2), in flattening order.
    names = sorted(kernels)
    targets = ([0.8] * 4 if transform == "gradual_pruning"
               else erk_sparsities([kernels[n].shape for n in names], 0.8))
    for name, target in zip(names, targets):
      w = kernels[name]
      assert np.sum(w == 0) == round(target * w.size), (name, np.sum(w == 0), target * w.size)
    assert summary["sparsity"]["total"] == pytest.approx(0.8, abs=2e-3)


def test_bad_transform_is_a_one_line_value_error():
  train = _load("flax_mnist_train", EXAMPLE / "train.py")
  default = _load("flax_mnist_default_config", EXAMPLE / "configs" / "default.py")
  with pytest.raises(ValueError, match=r"unknown transform 'magic'; expected one of none, adagrad_norm"):
    train.train_and_evaluate(default.get_config("magic"))
  config = default.get_config("none")
  config.protocol = "sideways"
  with pytest.raises(ValueError, match=r"unknown protocol 'sideways'"):
    train.train_and_evaluate(config)
  assert tuple(t for t in train.TRANSFORMS if t != "none") == TRANSFORMS


def _readme_sections():
  """{transform: [the '+' lines of its diff blocks]} from the README, and the README's text."""
  text = (EXAMPLE / "README.md").read_text()
  sections = {}
  for name, body in re.findall(r"^### `(\w+)`\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S):
    blocks = re.findall(r"```diff\n(.*?)```", body, flags=re.S)
    sections[name] = [line[1:].strip() for b in blocks for line in b.splitlines() if line.startswith("+")]
  return sections, text


def test_readme_lists_each_transform_with_the_lines_the_example_runs():
  sections, text = _readme_sections()
  assert set(sections) == set(TRANSFORMS)
  source = [re.sub(r"\s+#.*$", "", line).strip() for line in (EXAMPLE / "train.py").read_text().splitlines()]
  for name, lines in sections.items():
    assert lines, name
    for line in lines:
      assert line in source, (name, line)
    # the count the README states is the number of '+' lines
    count = re.search(rf"^### `{name}`\n\n\*\*(\d+) lines?\b", text, flags=re.M)
    assert count and int(count.group(1)) == len(lines), (name, len(lines))
