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

from imagesync.engine import Engine
from imagesync.lab import LabInfo
from imagesync.model import PROP_STATE
from imagesync.plan import plan
from tests.faults import FAULT_KINDS, env_options, run
from tests.integration.labcfg import images_named, make_config, proxied, random_bytes, uid, upload

pytestmark = pytest.mark.integration
CI_ROUNDS = 10
KB = 1024


def test_fault_suite_keeps_the_invariants(lab: LabInfo, tmp_path: Path) -> None:
    opts = env_options(CI_ROUNDS)
    tally = run(lab, tmp_path / "faults", opts, lambda line: print(line, flush=True))
    report = tally.text()
    print(report)
    assert tally.suite_error is None, report
    assert tally.rounds == opts.rounds
    assert not tally.violations, report
    assert tally.versions >= opts.rounds
    assert tally.verified > 0
    if opts.rounds >= CI_ROUNDS:
        assert tally.fault_kills >= 20, report
        assert tally.boundary_kills >= 2, report
        kinds = [k for k in FAULT_KINDS if k != "full_disk" or tally.full_disk]
        assert all(tally.faults[k] >= 1 for k in kinds), report


def test_a_publish_whose_answer_is_lost_keeps_the_copy(lab: LabInfo, tmp_path: Path) -> None:
    """Found by the suite (seed 13, round 3): Glance applied the publish, the connection
    dropped before its answer came back, and imagesync deleted the published copy."""
    name = uid("lost")
    upload(lab, "lab1", name, random_bytes(64 * KB))
    with proxied(lab, "lab2") as (proxy, cloud):
        proxy.plan.lose_methods, proxy.plan.lose_responses = ("PATCH",), 1
        config = make_config(
            lab, tmp_path, name, clouds=["lab1", "lab2"], overrides={"lab2": cloud}, store=False
        )
        engine = Engine(config)
        try:
            inventories = engine.recover(engine.inventories())
            (result,) = engine.execute(plan(engine.rules, inventories, engine.site_names))
        finally:
            engine.close()
    assert proxy.plan.lost == 1  # the publish's answer was lost
    (copy,) = images_named(lab, "lab2", name)
    assert copy["status"] == "active" and not copy["os_hidden"] and PROP_STATE not in copy
    assert copy["id"] in proxy.published_ids() and proxy.deleted_ids() == {}
    assert result.ok
