"""Shared test set-up: Hypothesis profiles and the orbax round-trip fixture.

Hypothesis: the default run is reproducible; ``HYPOTHESIS_PROFILE=explore`` searches further.

The default profile derandomizes Hypothesis so that CI and every developer see the same examples (a
property test never passes on one run and fails on the next). Search new examples with
``HYPOTHESIS_PROFILE=explore python -m pytest -n 2 -k "not slow"``; turn what it finds into an ``@example``.
"""
import os

import jax
import orbax.checkpoint as ocp
import pytest
from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def orbax_round_trip(tmp_path):
  """``orbax_round_trip(tree)``: saves ``tree`` with orbax and restores it against its own shapes and
  dtypes, as a resume does; returns the restored tree."""

  def round_trip(tree, name="ckpt"):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / name, tree)
      ckpt.wait_until_finished()
      return ckpt.restore(tmp_path / name, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))

  return round_trip
