"""Test-run settings: the same examples on every run, and no check that depends on this machine's speed.

Hypothesis draws its examples from a seed derived from each test (``derandomize``), keeps no database of
past failures between runs, has no per-example deadline, and does not fail a test for generating data
slowly (``too_slow``): on a loaded machine all three turn a passing test into a failure by chance, and a
``make test`` must pass or fail the same way every time. ``HYPOTHESIS_PROFILE=explore`` draws new random
examples on each run instead (for hunting counterexamples, not for CI).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
