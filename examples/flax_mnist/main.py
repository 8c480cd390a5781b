"""Main file for running the digits example with a prox transform.

This file is intentionally kept short. The majority of the logic is in libraries that can be easily tested
and imported in Colab.

  python examples/flax_mnist/main.py --workdir=/tmp/digits --config=examples/flax_mnist/configs/default.py:ewc
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere: `import train`
import train  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory to store the summary in.')
config_flags.DEFINE_config_file(
    'config',
    None,
    'File path to the training hyperparameter configuration.',
    lock_config=True,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.info('JAX process: %d / %d', jax.process_index(), jax.process_count())
  logging.info('JAX local devices: %r', jax.local_devices())
  try:
    train.protocol_of(FLAGS.config)
  except ValueError as e:
    raise app.UsageError(str(e))
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info('summary: %s', {k: v for k, v in summary.items() if k != 'history'})


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
