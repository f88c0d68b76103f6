"""What may be deleted, and when, against the lab's real Keystone and Glance (issue 8, 4-6).

The lab has no Nova yet, so its Glance clouds cannot tell which images servers use:
``retire: delete`` must hide there, and say why. (The in-use path itself is tested over the
memory site in tests/unit/test_recovery.py.)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imagesync.engine import Engine
from imagesync.engine.marker import PROP_UPLOAD, SKEW_GRACE, UploadMarker, lease_seconds
from imagesync.lab import LabInfo
from imagesync.plan import plan
from imagesync.state import State
from imagesync.transfer import new_image_for
from tests.integration.labcfg import images_named, make_config, random_bytes, uid, upload

pytestmark = pytest.mark.integration
KB = 1024


def test_retire_delete_on_a_cloud_without_compute_hides_and_says_why(
    lab: LabInfo, tmp_path: Path
) -> None:
    name = uid("retire")
    upload(lab, "lab1", name, random_bytes(10 * KB))
    config = make_config(
        lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, keep=1, retire="delete"
    )
    engine = Engine(config)
    try:
        engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
        (old,) = images_named(lab, "lab2", name)
        time.sleep(1.1)  # Glance's created_at has one-second resolution
        upload(lab, "lab1", name, random_bytes(10 * KB))
        engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
        p = plan(engine.rules, engine.inventories(), engine.site_names)
        (retire,) = p.retires
        assert retire.image_id == old["id"] and retire.mode == "delete"
        with capture_logs() as logs:
            result = engine.run_retire(retire)
    finally:
        engine.close()
    assert result.ok and "hide instead of delete" in result.detail
    after = {i["id"]: i for i in images_named(lab, "lab2", name)}
    assert old["id"] in after and after[old["id"]]["os_hidden"] is True  # hidden, not deleted
    (done,) = [e for e in logs if e["event"] == "retire.done"]
    assert done["mode"] == "hide" and "cannot tell" in done["fallback"]
    row = State(config.state_dir).history(name)[0]
    assert row["result"] == "retired:hide" and "cannot tell" in row["error"]


def test_a_leased_copy_published_before_a_kill_survives_recovery(
    lab: LabInfo, tmp_path: Path
) -> None:
    name = uid("lease")
    upload(lab, "lab1", name, random_bytes(10 * KB))
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    engine = Engine(config)
    try:
        engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
        (copy,) = images_named(lab, "lab2", name)
        # the run was killed between publish() and dropping its lease
        engine.state.add_lease("lab2", copy["id"], name)
        engine.recover(engine.inventories())
    finally:
        engine.close()
    assert [i["id"] for i in images_named(lab, "lab2", name)] == [copy["id"]]
    assert State(config.state_dir).leases() == []


def test_another_instances_upload_stays_until_its_lease_expired(
    lab: LabInfo, tmp_path: Path
) -> None:
    """The marker survives Glance (a property) and a second instance honours it."""
    name = uid("marker")
    upload(lab, "lab1", name, random_bytes(KB))
    first = Engine(make_config(lab, tmp_path / "one", name, clouds=["lab1", "lab2"], store=False))
    second = Engine(make_config(lab, tmp_path / "two", name, clouds=["lab1", "lab2"], store=False))
    try:
        src = first.site("lab1").list_images(name)[0]
        marker = UploadMarker.new(first.state.instance_id, time.time(), KB)
        new = new_image_for(src, src.version, "private")
        props = {**new.properties, PROP_UPLOAD: marker.to_property()}
        writer = first.site("lab2").create(dataclasses.replace(new, properties=props))
        # first is writing it (it holds its own lock; second cannot see that lock)
        second.recover(second.inventories())
        assert [i["id"] for i in images_named(lab, "lab2", name)] == [writer.image_id]
        (listed,) = second.site("lab2").list_images(name)
        assert UploadMarker.of(listed) == dataclasses.replace(
            marker, started=int(marker.started), expires=int(marker.expires)
        )
        late = time.time() + lease_seconds(KB) + SKEW_GRACE + 60
        second.recovery.clock = lambda: late
        second.recover(second.inventories())
        assert images_named(lab, "lab2", name) == []
        writer.abort()
    finally:
        first.close()
        second.close()
