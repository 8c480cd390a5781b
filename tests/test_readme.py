"""README.md's code and commands stay true."""
import re
from pathlib import Path

import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_runs_and_fits():
  block = re.search(r"## A prox transform in your own optax code\n\n```python\n(.*?)```", README, re.S)
  namespace = {}
  exec(compile(block.group(1), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  params = namespace["params"]
  np.testing.assert_allclose(params["w"], [1.0, -2.0, 0.5], atol=1e-2)
  np.testing.assert_allclose(params["b"], 0.3, atol=1e-2)


def test_ci_runs_the_readme_test_command():
  command = re.search(r"Install and run the tests:\n\n```bash\n(.*?)\n```", README, re.S).group(1)
  ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
  assert command in ci.splitlines()


def _block(header: str) -> str:
  """The first python block after ``header``."""
  return re.search(re.escape(header) + r"\n.*?```python\n(.*?)```", README, re.S).group(1)


def test_readme_noise_scale_example_runs(capsys):
  namespace = {}
  exec(compile(_block("## The gradient noise scale in your own optax code"), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  b = float(namespace["noise"].value(namespace["ema"]))
  assert np.isfinite(b) and b > 0
  assert "gradient noise scale" in capsys.readouterr().out


def test_readme_step_and_loop_example_runs_and_resumes(tmp_path, capsys):
  code = _block("## One step, one loop")
  code = code.replace("budget = 100_000", "budget = 4_000").replace('"/tmp/prox_readme_run"', repr(str(tmp_path)))
  for _ in range(2):                                   # the second run resumes at the end: no step, no compile
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert int(result.state.samples) <= 4_000 and int(result.state.samples) > 4_000 - 1024
  assert result.compiles == 0
  assert int(result.state.extra["batch_size"].size.batch_size) >= 64


def test_readme_dataset_example_runs():
  namespace = {}
  exec(compile(_block("### Datasets"), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (32, 10)
