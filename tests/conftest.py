"""Hypothesis profiles: the default run is reproducible; ``HYPOTHESIS_PROFILE=explore`` searches further.

The default profile derandomizes Hypothesis so that CI and every developer see the same examples (a
property test never passes on one run and fails on the next). Search new examples with
``HYPOTHESIS_PROFILE=explore python -m pytest -n 2 -k "not slow"``; turn what it finds into an ``@example``.
"""
import os

from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
