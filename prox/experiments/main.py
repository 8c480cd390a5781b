"""``prox``: run an experiment from an ml_collections config file.

  prox --config=prox/experiments/configs/classify.py --workdir=runs/classify [--config.field=value ...]

The config's ``experiment`` field names the experiment module (``prox.experiments.<name>``), which has
``validate(config, workdir)`` (every check, before anything compiles) and ``run(config, workdir)``.
Bad flags or config values print one line, ``prox: error: ...``, and exit with status 2.
Multi-host: every process runs the same command; ``jax.distributed`` is initialised from the cluster's
environment (SLURM, TPU pods) or from --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_NOT_EXPERIMENTS = ("main", "train", "writers")


def experiments() -> list[str]:
  """Every module of ``prox.experiments`` that is an experiment (has ``validate`` and ``run``)."""
  from prox import experiments as package  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                if not m.ispkg and m.name not in _NOT_EXPERIMENTS and not m.name.startswith("_"))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: metrics, plots, checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0 (default: from the cluster).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def _fail(message: str) -> None:
  print(f"prox: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax and absl INFO chatter only with --verbosity=0
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override config fields")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    _fail("--config is required, e.g. --config=prox/experiments/configs/classify.py")
  if not workdir:
    _fail("--workdir is required (the run's output and checkpoint directory)")
  name = config.get("experiment", "classify")
  known = experiments()
  if name not in known:
    _fail(f"unknown experiment {name!r}; known: {', '.join(known)}")

  from prox import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from prox.experiments import train  # pylint: disable=g-import-not-at-top
  experiment = importlib.import_module(f"prox.experiments.{name}")
  try:
    experiment.validate(config, workdir)
  except train.ConfigError as e:
    _fail(str(e))
  try:
    final = experiment.run(config, workdir)
  except train.ConfigError as e:   # found only at run time, e.g. a TFDS dataset that is not prepared
    _fail(str(e))
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
