"""Property-based fuzzing of the loaders (tools/fuzz.py holds the seeds, mutators and loaders).

Hypothesis picks the mutation seed; every mutated PLY, COLMAP text/binary model, transforms.json,
RE10K chunk, checkpoint and image must load correctly or raise ``InputError`` naming the file,
within a time bound (20 s a case: a hang, not a speed test) and without a large allocation (peak RSS growth).
A few cases per loader here; ``python tools/fuzz.py --cases 300`` runs hundreds.
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.fuzz import TARGETS, run_case

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"ply": 12, "colmap_text": 10, "colmap_bin": 10, "transforms": 10, "re10k": 8, "checkpoint": 8, "images": 12}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_files_load_or_raise_input_error(name):
    start = _rss_mb()
    outcomes: list[str] = []

    @settings(
        max_examples=CASES[name],
        derandomize=True,
        deadline=None,  # the time bound is run_case's (a shared 2-core runner makes a tight deadline flaky)
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(seed=st.integers(0, 2**31 - 1))
    def check(seed):
        with tempfile.TemporaryDirectory(prefix="v3dfuzz") as d:
            outcome, detail = run_case(TARGETS[name], seed, Path(d), max_seconds=20.0)
        outcomes.append(outcome)
        assert outcome in ("ok", "input_error", "missing_file"), f"{name} seed {seed}: {outcome}: {detail}"

    check()
    assert "input_error" in outcomes, f"{name}: no mutation was refused; the mutators do not reach the checks"
    assert _rss_mb() - start < 512, f"{name}: peak memory grew by {_rss_mb() - start:.0f} MB"
