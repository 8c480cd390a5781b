"""Tests for launch/*.sh: syntax, and the commands they would run (PROX_DRY_RUN=1)."""
import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = ("local.sh", "gpu_slurm.sh", "tpu_pod.sh")
MAIN = ["-m", "prox.experiments.main"]
ODD_ARG = "--config.name=a b'c"   # a space and a quote must reach the program as one argument


def run(script, env=None, args=(), cwd=None):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROX_", "SLURM_", "XLA_", "JAX_")) and k not in ("PYTHON", "PROJECT")}
  return subprocess.run(["bash", str(LAUNCH / script), *args], env={**clean, **(env or {})},
                        capture_output=True, text=True, timeout=30, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_strict_mode(script):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_local_dry_run_defaults_and_extra_args(tmp_path):
  result = run("local.sh", {"PROX_DRY_RUN": "1"}, ["--config.num_steps=5", ODD_ARG], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == [
      "python", *MAIN, f"--config={LAUNCH.parent}/prox/experiments/configs/classify.py",
      "--workdir=runs/local", "--config.num_steps=5", ODD_ARG]
  assert not (tmp_path / "runs").exists()   # nothing ran


def test_local_header_names_real_config_fields():
  """The usage examples in local.sh's header override fields its default config has (it named
  ``--config.steps``; the field is ``num_steps``)."""
  import re  # pylint: disable=g-import-not-at-top
  from prox.experiments import main  # pylint: disable=g-import-not-at-top
  config = main.load_config(str(LAUNCH.parent / "prox" / "experiments" / "configs" / "classify.py"))
  header = "".join(line for line in (LAUNCH / "local.sh").read_text().splitlines(True)
                   if line.startswith("#"))
  named = re.findall(r"--config\.([\w.]+)=", header)
  assert named, header
  for field in named:
    assert main._lookup(config, field)[0], f"local.sh names --config.{field}, not a field"


def test_local_dry_run_fake_devices_and_overrides():
  env = {"PROX_DRY_RUN": "1", "PROX_FAKE_DEVICES": "4", "XLA_FLAGS": "--xla_dump_to=/tmp/d",
         "PROX_CONFIG": "my.py", "PROX_WORKDIR": "runs/x", "PYTHON": "/venv/bin/python"}
  result = run("local.sh", env)
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == [
      "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4", "JAX_PLATFORMS=cpu",
      "/venv/bin/python", *MAIN, "--config=my.py", "--workdir=runs/x"]


@pytest.mark.parametrize("bad", ["0", "x", "-2"])
def test_local_rejects_bad_fake_devices(bad):
  result = run("local.sh", {"PROX_DRY_RUN": "1", "PROX_FAKE_DEVICES": bad})
  assert result.returncode == 2 and "PROX_FAKE_DEVICES" in result.stderr and result.stdout == ""


def test_local_runs_the_program_with_the_environment(tmp_path):
  """Without PROX_DRY_RUN the script execs PYTHON with the exported variables and all arguments."""
  fake = tmp_path / "python"
  fake.write_text('#!/usr/bin/env bash\necho "XLA_FLAGS=$XLA_FLAGS"\nprintf "%s\\n" "$@"\n')
  fake.chmod(0o755)
  result = run("local.sh", {"PYTHON": str(fake), "PROX_FAKE_DEVICES": "2"}, [ODD_ARG])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "XLA_FLAGS=--xla_force_host_platform_device_count=2"
  assert lines[1:3] == MAIN and lines[-1] == ODD_ARG


@pytest.mark.parametrize("tasks_per_node, device_ids", [("8", None), ("1", "0,1,2,3")])
def test_slurm_dry_run(tmp_path, tasks_per_node, device_ids):
  env = {"PROX_DRY_RUN": "1", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(tmp_path),
         "SLURM_NTASKS_PER_NODE": tasks_per_node, "SLURM_GPUS_ON_NODE": "4"}
  result = run("gpu_slurm.sh", {**env, "SLURM_JOB_NUM_NODES": "2", "PROX_FSDP": "4"}, [ODD_ARG])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  words = shlex.split(lines[0])
  if device_ids:
    assert words.pop(0) == f"JAX_LOCAL_DEVICE_IDS={device_ids}"
  program = ["python", *MAIN, "--config=prox/experiments/configs/classify.py", "--workdir=runs/slurm-77",
             "--config.fsdp=4", ODD_ARG]
  assert words == ["srun", "--kill-on-bad-exit=1", *program]
  per_node = int(tasks_per_node)
  assert len(lines) == 3        # the srun command, then what each of the 2 hosts runs
  for node, line in enumerate(lines[1:]):
    head, command = line.split(": ", 2)[:2], line.split(": ", 2)[2]
    assert head == [f"# host {node}", f"SLURM_PROCID={node * per_node}..{node * per_node + per_node - 1}"]
    assert shlex.split(command) == program


def test_tpu_requires_its_variables():
  result = run("tpu_pod.sh", {"PROX_DRY_RUN": "1", "ZONE": "z", "PROX_WORKDIR": "gs://b/r"})
  assert result.returncode != 0 and "TPU_NAME" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("install", [False, True])
def test_tpu_dry_run(install):
  env = {"PROX_DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-west4-a", "PROJECT": "proj",
         "PROX_WORKDIR": "gs://bucket/prox/run1"}
  if install:
    env.update(PROX_INSTALL="1", PROX_REPO="https://example.com/prox.git")
  result = run("tpu_pod.sh", {**env, "PROX_WORKERS": "2"}, [ODD_ARG])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  per_worker = [line for line in lines if line.startswith("# worker ")]
  assert [line.split(": ", 1)[0] for line in per_worker] == ["# worker 0", "# worker 1"]
  commands = [shlex.split(line) for line in lines if not line.startswith("# worker ")]
  assert len(commands) == 1 + install
  remotes = []
  for words in commands:
    assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-west4-a",
                          "--worker=all", "--project=proj"]
    assert words[-1].startswith("--command=")
    remotes.append(words[-1][len("--command="):])
  # What each worker's shell runs, split as that shell would.
  assert shlex.split(remotes[-1]) == [
      "cd", "prox", "&&", "python3", *MAIN, "--config=prox/experiments/configs/classify.py",
      "--workdir=gs://bucket/prox/run1", ODD_ARG]
  if install:
    words = shlex.split(remotes[0])
    assert words[words.index("git"):words.index("git") + 4] == [
        "git", "clone", "https://example.com/prox.git", "prox"]
    assert words[-7:] == ["install", "-U", "-e", ".", "jax[tpu]>=0.10,<0.11", "gcsfs",
                          "google-cloud-storage"]
