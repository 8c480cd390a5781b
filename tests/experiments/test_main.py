"""The `prox` command: a short real run, one-line errors, and exact resume after SIGKILL."""
import json
import os
import re
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
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 20, 40, 60, 80, 100, 120]
  assert [l["step"] for l in lines if l["split"] == "test"] == [60, 120]
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any((tmp_path / "tb").iterdir())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["120", "60"]
  assert "test_accuracy=" in result.stdout


@pytest.mark.parametrize("override, expected", [
    ("--config.dataset=imagenet", "unknown dataset 'imagenet'; known: digits, mnist"),
    ("--config.model=vit", "unknown model 'vit'; known: mlp, cnn, resnet20"),
    ("--config.optimizer=adamm", "unknown optimizer 'adamm'; known: "),
    ("--config.learning_rate=-0.1", "learning_rate must be "),
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


# --- bad command lines: one line, exit 2, before anything compiles ------------------------------------

def _prox_raw(*args, cwd=ROOT, env=None):
  """``prox`` with exactly ``args`` (no default --config)."""
  return subprocess.run([sys.executable, "-m", "prox.experiments.main", *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _assert_one_error_line(result, expected):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr and result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("prox: error: "), lines[0]
  assert expected in lines[0], lines[0]


_CONFIG_FILES = {
    "raises.py": 'def get_config():\n  raise RuntimeError("no GPU quota")\n',
    "syntax.py": "def get_config(:\n  pass\n",
    "no_get_config.py": "x = 1\n",
    "returns_none.py": "def get_config():\n  return None\n",
    "bad_import.py": "import no_such_module_for_prox\n",
}


@pytest.mark.parametrize("args, expected", [
    (["--config=no/such/config.py", "--workdir=W"], "config file 'no/such/config.py' does not exist"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.no_such_field=1"],
     f"--config.no_such_field: {CONFIG} has no field 'no_such_field'"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.learning_rat=0.1"],
     "has no field 'learning_rat'; did you mean learning_rate?"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.learning_rate=abc"],
     "--config.learning_rate=abc: could not convert string to float: 'abc' (the field holds a float, "
     "default 0.001)"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.num_steps=1.5"],
     "--config.num_steps=1.5: invalid literal for int()"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.model_kwargs=3"],
     "--config.model_kwargs=3: Failed to parse '3' as a ConfigDict"),
    ([f"--config={CONFIG}", "--workdir=W", "--config.num_steps"], "--config.num_steps"),
    ([f"--config={ROOT}/prox/experiments/configs/continual.py:nope", "--workdir=W"],
     "unknown config variant 'nope'; known: '' (default), 'quick' (ValueError, line "),
    ([f"--config={ROOT}/prox/experiments/configs/nm_sparsity.py:nope", "--workdir=W"],
     "nm_sparsity.py takes no variant (got :nope)"),
    (["--config={tmp}/raises.py", "--workdir=W"], "raises.py: no GPU quota (RuntimeError, line 2)"),
    (["--config={tmp}/syntax.py", "--workdir=W"], "syntax.py line 1: invalid syntax"),
    (["--config={tmp}/no_get_config.py", "--workdir=W"], "no_get_config.py has no get_config() function"),
    (["--config={tmp}/returns_none.py", "--workdir=W"], "get_config() returned NoneType"),
    (["--config={tmp}/bad_import.py", "--workdir=W"],
     "bad_import.py failed to load: No module named 'no_such_module_for_prox' (ModuleNotFoundError"),
    (["--config={tmp}", "--workdir=W"], "is not a file"),
    (["--config=", "--workdir=W"], "--config is empty"),
    (["--workdir=W", "--config.num_steps=3", f"--config={CONFIG}"],
     "--config.num_steps=3 comes before --config=FILE"),
    (["--workdir=W", "--config.num_steps=3"], "--config.num_steps=3 needs --config=<file> before it"),
    ([f"--config={CONFIG}", "--workdir=W", "--bogus=1"], "Unknown command line flag 'bogus'"),
    ([f"--config={CONFIG}", "--workdir=W", "--num_processes=x"], "flag --num_processes=x"),
    ([f"--config={CONFIG}", "--workdir=W", "stray"], "unexpected arguments ['stray']"),
    (["--workdir=W"], "--config is required"),
    ([f"--config={CONFIG}"], "--workdir is required"),
])
def test_bad_command_line_is_one_line_before_anything_runs(tmp_path, args, expected):
  for name, text in _CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  args = [a.replace("{tmp}", str(tmp_path)).replace("=W", f"={tmp_path / 'run'}") for a in args]
  result = _prox_raw(*args)
  _assert_one_error_line(result, expected)
  assert not (tmp_path / "run").exists()


def test_kwargs_mappings_take_new_keys_other_fields_do_not(tmp_path):
  """``--config.optimizer_kwargs.momentum`` adds a key (the classify docstring's example); a new key
  elsewhere is refused."""
  from prox.experiments import main  # pylint: disable=g-import-not-at-top
  config = main.load_config(f"{CONFIG}")
  assert main._lookup(config, "optimizer_kwargs.momentum") == (True, None)
  assert main._lookup(config, "model_kwargs.hidden") == (True, (256, 256))
  assert main._lookup(config, "model.depth")[0] is False
  assert main._lookup(config, "no_such")[0] is False
  result = _prox_raw(f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}", "--config.optimizer=sgd",
                     "--config.optimizer_kwargs.momentum=0.9", "--config.seed.x=1")
  _assert_one_error_line(result, "has no field 'seed.x'")


# --- help ----------------------------------------------------------------------------------------------

def test_help_lists_experiments_with_description_and_config():
  from prox.experiments import main  # pylint: disable=g-import-not-at-top
  for flag in ("--help", "-h"):
    result = _prox_raw(flag)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert out.startswith("usage: prox --config=FILE")
    for name in main.EXPERIMENTS:
      description = main._experiment_summary(name)[0]   # its module docstring's first line
      assert description and not description.startswith("Experiment")
      assert f"\n  {name:<13}{description}\n" in out
      assert f"--config=prox/experiments/configs/{name}.py" in out
    assert "--config.quick=True" in out and "num_steps, log_every" in out and "--workdir=DIR" in out


def test_help_with_config_lists_fields_defaults_and_meaning():
  result = _prox_raw("--help", f"--config={CONFIG}", "--config.learning_rate=0.01")
  assert result.returncode == 0 and result.stderr == "", result.stderr
  out = result.stdout
  assert out.startswith(f"{CONFIG} (experiment classify)")
  assert "The base experiment: train a classifier" in out                       # the docstring
  assert re.search(r"\n  data_dir = '' +# TFDS data_dir \(\"\" = TFDS default\)\n", out)   # its comment
  assert "\n  # Data: digits (embedded, offline)" in out                          # a group comment
  assert "\n  learning_rate = 0.01\n" in out                                      # the override
  assert "\n  model_kwargs.hidden = (256, 256)\n" in out and "\n  num_steps = 1500\n" in out
  assert out.index("  seed = ") < out.index("  dataset = ") < out.index("  model = ")   # file order
  assert "May change when the run resumes: num_steps" in out


# --- quick mode ------------------------------------------------------------------------------------------

_NM_CONFIG = ROOT / "prox" / "experiments" / "configs" / "nm_sparsity.py"


def test_quick_overrides_skip_fields_given_on_the_command_line():
  from prox.experiments import main  # pylint: disable=g-import-not-at-top
  quick = {"a": 1, "b.c": 2, "b.d": 3, "e": {"f": 4}, "g": 5}
  assert main.quick_overrides(quick, ["a", "b", "e.f", "gg"]) == {"g": 5}
  assert main.quick_overrides(quick, []) == quick
  assert main.quick_overrides(None, ["a"]) == {}


def test_quick_keeps_nm_sparsity_fields_given_on_the_command_line():
  from prox.experiments import main  # pylint: disable=g-import-not-at-top
  from prox.experiments import nm_sparsity  # pylint: disable=g-import-not-at-top
  config = main.load_config(str(_NM_CONFIG))
  config.quick, config.sparsities, config.models.mlp.num_steps = True, "8:4", 17
  main.effective_config(config, nm_sparsity.QUICK, ["quick", "sparsities", "models.mlp"])
  assert config.sparsities == "8:4" and config.models.mlp.num_steps == 17
  assert config.models.mlp.model_kwargs.hidden == (256, 256)     # inside the given models.mlp
  assert config.num_seeds == nm_sparsity.QUICK["num_seeds"] and config.settings == "mlp"
  config = main.load_config(str(_NM_CONFIG))                      # quick=False: nothing applied
  main.effective_config(config, nm_sparsity.QUICK, [])
  assert config.sparsities == "2:4,1:8,1:16,1:32" and config.num_seeds == 5


_FAKE = '''
"""Experiment ``{name}``: a stand-in that records the config main passes on."""
import json
import sys
from prox.experiments import common
{extra}

def validate(config, workdir):
  common.check_workdir(workdir)

def run(config, workdir):
  print(json.dumps(config.to_dict()))
  if config.get("fail_at_run_time", False):
    raise common.ConfigError("dataset 'x' is not prepared")
  return {{}}
'''


def _run_with_fake(tmp_path, name, args, extra="", module=None):
  """``prox args`` with ``EXPERIMENTS[name]`` replaced by a stand-in module that prints the config it
  receives (no training): what main passes on, and what it refuses before running."""
  module = module or f"fake_{name}"
  (tmp_path / f"{module}.py").write_text(_FAKE.format(name=name, extra=extra))
  code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from prox.experiments import main; "
          f"main.EXPERIMENTS[{name!r}] = {module!r}; main.run()")
  return subprocess.run([sys.executable, "-c", code, str(tmp_path), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_quick_mode_end_to_end_keeps_sparsities_given(tmp_path):
  """``nm_sparsity --config.quick=True --config.sparsities=8:4`` passes 8:4 on (it trained 2:4, 1:8)."""
  result = _run_with_fake(tmp_path, "nm_sparsity",
                          [f"--config={_NM_CONFIG}", f"--workdir={tmp_path / 'run'}",
                           "--config.quick=True", "--config.sparsities=8:4"],
                          extra="from prox.experiments.nm_sparsity import QUICK")
  assert result.returncode == 0, result.stderr[-2000:]
  passed = json.loads(result.stdout.splitlines()[0])
  assert passed["sparsities"] == "8:4"
  assert passed["num_seeds"] == 2 and passed["settings"] == "mlp"     # the other QUICK fields
  assert passed["models"]["mlp"]["num_steps"] == 40
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded == {"experiment": "nm_sparsity", "config": passed}


# --- the run's record: config.json -------------------------------------------------------------------

def test_config_json_written_once_then_compared(tmp_path):
  run = tmp_path / "run"
  base = [f"--config={CONFIG}", f"--workdir={run}"]
  first = _run_with_fake(tmp_path, "classify", base + ["--config.num_steps=10"])
  assert first.returncode == 0, first.stderr[-2000:]
  text = (run / "config.json").read_text()
  record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
  assert record["experiment"] == "classify" and record["config"]["num_steps"] == 10
  assert record["config"]["model_kwargs"] == {"hidden": [256, 256]}
  assert list(record["config"]) == sorted(record["config"])         # stable order
  assert not [p for p in run.iterdir() if p.name.startswith(".config.json")]   # no temp file left

  changed = _run_with_fake(tmp_path, "classify", base + [
      "--config.num_steps=10", "--config.learning_rate=0.01", "--config.model=cnn",
      "--config.model_kwargs={'width': 8}"])
  _assert_one_error_line(changed, (
      f"prox: error: workdir {run} holds a run of classify with learning_rate=0.001 (now 0.01), "
      f"model=mlp (now cnn), model_kwargs.hidden=[256, 256] (now (unset)), model_kwargs.width=(unset) "
      f"(now 8); use a new --workdir or set them back"))
  assert (run / "config.json").read_text() == text

  resumed = _run_with_fake(tmp_path, "classify", base + ["--config.num_steps=30",
                                                         "--config.log_every=5"])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  record = json.loads((run / "config.json").read_text())
  assert record["config"]["num_steps"] == 30 and record["config"]["log_every"] == 5


def test_config_json_experiment_resumable_fields_and_other_experiments(tmp_path):
  run = tmp_path / "run"
  budget = tmp_path / "budget.py"
  budget.write_text("import ml_collections\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
                    "  c.experiment = 'budgeted'\n  c.budget_samples = 100\n  c.lr = 0.1\n  return c\n")
  extra = 'RESUMABLE = ("budget_samples",)'
  assert _run_with_fake(tmp_path, "budgeted", [f"--config={budget}", f"--workdir={run}"],
                        extra=extra).returncode == 0
  more = _run_with_fake(tmp_path, "budgeted", [f"--config={budget}", f"--workdir={run}",
                                               "--config.budget_samples=500"], extra=extra)
  assert more.returncode == 0, more.stderr[-2000:]
  assert json.loads((run / "config.json").read_text())["config"]["budget_samples"] == 500
  other = _run_with_fake(tmp_path, "classify", [f"--config={CONFIG}", f"--workdir={run}"])
  _assert_one_error_line(other, f"workdir {run} holds a run of budgeted (now classify); "
                                "use a new --workdir")


def test_config_json_of_a_start_refused_at_run_time_is_removed(tmp_path):
  run = tmp_path / "run"
  failing = tmp_path / "failing.py"
  failing.write_text("import ml_collections\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
                     "  c.experiment = 'classify'\n  c.fail_at_run_time = True\n  return c\n")
  result = _run_with_fake(tmp_path, "classify", [f"--config={failing}", f"--workdir={run}"])
  assert result.returncode == 2 and result.stderr == "prox: error: dataset 'x' is not prepared\n"
  assert not (run / "config.json").exists()   # a corrected start is not compared with this one


def test_real_experiment_refuses_a_changed_config_before_training(tmp_path):
  """classify itself: the record of a learning rate of 0.001 refuses 0.01 before anything runs."""
  from prox.experiments import _runs, main  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  _runs.write_record(run, _runs.record("classify", main.load_config(str(CONFIG))), main_process=True)
  result = prox(f"--workdir={run}", "--config.learning_rate=0.01")
  _assert_one_error_line(result, f"workdir {run} holds a run of classify with learning_rate=0.001 "
                                 "(now 0.01); use a new --workdir or set it back")
  assert sorted(p.name for p in run.iterdir()) == ["config.json"]   # no checkpoints, no metrics


def test_check_config_unit(tmp_path):
  from prox.experiments import _runs  # pylint: disable=g-import-not-at-top
  from prox.experiments.common import ConfigError  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  rec = _runs.record("x", {"lr": 0.1, "nested": ml_collections.ConfigDict({"a": 1, "b": (1, 2)}),
                           "num_steps": 5, "k": {}, "bad": float("nan")})
  assert rec["config"]["nested"] == {"a": 1, "b": [1, 2]} and rec["config"]["bad"] == "NaN"
  _runs.check_config(tmp_path, rec, main_process=True)                 # first: written
  _runs.check_config(tmp_path, rec, main_process=True)                 # same: fine
  _runs.check_config(tmp_path, _runs.record("x", {**rec["config"], "num_steps": 9}),
                     main_process=True)
  assert _runs.read_record(tmp_path)["config"]["num_steps"] == 9
  nested = _runs.record("x", {**rec["config"], "nested": {"a": 2, "b": [1, 2]}})
  with pytest.raises(ConfigError, match=r"with nested\.a=1 \(now 2\); use a new --workdir or set it "):
    _runs.check_config(tmp_path, nested, main_process=True)
  _runs.check_config(tmp_path, nested, ["nested", "num_steps"], main_process=True)  # containing
  many = _runs.record("x", {f"f{i}": i for i in range(9)})
  with pytest.raises(ConfigError, match=r"with bad=NaN \(now \(unset\)\), f0=\(unset\) \(now 0\), "
                                        r".* and 7 more fields; use") as info:
    _runs.check_config(tmp_path, many, main_process=True)
  assert "\n" not in str(info.value)
  assert _runs.is_resumable("a.b.c", ["a.b"]) and not _runs.is_resumable("a.bc", ["a.b"])
  (tmp_path / "config.json").write_text("{trunc")
  with pytest.raises(ConfigError, match="config.json is damaged"):
    _runs.read_record(tmp_path)
  _runs.check_config(tmp_path / "other", rec, main_process=False)     # not the main process
  assert not (tmp_path / "other" / "config.json").exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path):
  """End to end: a truncated array file in the newest checkpoint costs one warning line, the run
  resumes from the checkpoint before; when none restores, one error line."""
  args = ["--config.checkpoint_every=60", "--config.eval_every=60", "--config.progress=false"]
  assert prox(f"--workdir={tmp_path}", "--config.num_steps=120", *args).returncode == 0
  ckpts = tmp_path / "checkpoints"
  for path in (ckpts / "120" / "state" / "d").iterdir():
    path.write_bytes(path.read_bytes()[:10])
  resumed = prox(f"--workdir={tmp_path}", "--config.num_steps=180", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  lines = resumed.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"prox: warning: checkpoint 120 in {ckpts} does not restore (truncated array file "), lines
  assert lines[0].endswith(f"; using 60; moved to {ckpts / 'corrupt' / '120'}")
  assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 180
  assert sorted(p.name for p in ckpts.iterdir()) == ["120", "180", "60", "corrupt"]
  for step in ("60", "120", "180"):
    for path in (ckpts / step / "state" / "d").iterdir():
      path.write_bytes(path.read_bytes()[:10])
  result = prox(f"--workdir={tmp_path}", "--config.num_steps=180", *args)
  _assert_one_error_line(result, f"no checkpoint in {ckpts} restores: 180 (truncated array file ")
