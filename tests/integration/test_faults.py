"""The fault suite (``tests/faults.py``) in CI: a bounded, seeded run against the lab.

Ten rounds by default (``IMAGESYNC_FAULT_ROUNDS``), a fresh seed each run, printed first
(``IMAGESYNC_FAULT_SEED`` replays one). Every round's invariants are checked by the suite; this
test asserts that none broke and that the run was as rough as it should be: at least 20
``kill -9``s during the faults, some of them at the lease boundary, and every kind of fault
armed. Run it with ``-s`` to watch the rounds go by.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesync.lab import LabInfo
from tests.faults import FAULT_KINDS, env_options, run

pytestmark = pytest.mark.integration
CI_ROUNDS = 10


def test_fault_suite_keeps_the_invariants(lab: LabInfo, tmp_path: Path) -> None:
    opts = env_options(CI_ROUNDS)
    tally = run(lab, tmp_path / "faults", opts, lambda line: print(line, flush=True))
    report = tally.text()
    print(report)
    assert tally.rounds == opts.rounds
    assert not tally.violations, report
    assert tally.versions >= opts.rounds
    assert tally.verified > 0
    if opts.rounds >= CI_ROUNDS:
        assert tally.fault_kills >= 20, report
        assert tally.boundary_kills >= 2, report
        kinds = [k for k in FAULT_KINDS if k != "full_disk" or tally.full_disk]
        assert all(tally.faults[k] >= 1 for k in kinds), report
