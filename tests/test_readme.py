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
