"""tools/plant_bugs.py's mutations stay applicable: each one's text occurs exactly once
in csrc/ (a kernel edit that moves or rewrites a line must carry its mutation along, or
the measure of the tests' power silently loses a bug)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import plant_bugs  # noqa: E402  (tools/plant_bugs.py)


@pytest.mark.parametrize("mutation", plant_bugs.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies(mutation):
    plant_bugs.locate(ROOT, mutation.find)  # SystemExit (a failure) unless exactly once
    assert mutation.replace != mutation.find, mutation.name
