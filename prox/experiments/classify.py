"""Experiment ``classify``: the shared training loop with the optimizer the config names."""
from __future__ import annotations

import ml_collections

from prox.experiments import train


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  train.validate(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return train.train(config, workdir)
