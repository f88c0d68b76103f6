"""Issue 11 items 1-3 on the lab's real clouds: check never hands out an id an inventory found
stale, a daemon pass reads the source Glance once for all its targets (counted at the
source: the bytes its uwsgi processes wrote), and a typo is named as one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from imagesync.check import check
from imagesync.commands import NoSuchImage, push, status
from imagesync.engine import Engine
from imagesync.lab import LabInfo
from imagesync.plan import plan
from tests.integration.labcfg import make_config, random_bytes, uid, upload

pytestmark = pytest.mark.integration

MB = 1_000_000
SIZE = 32 * MB


def test_check_does_not_answer_an_id_status_found_stale(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's scenario: push, a new upload to lab1, status shows lab2 stale; check
    --cloud lab2 must not print the old id with exit 0."""
    name = uid("op-test")
    upload(lab, "lab1", name, random_bytes(4000))
    config = make_config(lab, tmp_path, "op-*", clouds=["lab1", "lab2"])
    assert push(config, name) == 0
    capsys.readouterr()
    assert check(config, name, "lab2") == 0
    old_id = capsys.readouterr().out.strip()
    time.sleep(1.1)  # a later creation time, as a person uploading later would have
    upload(lab, "lab1", name, random_bytes(4001))
    assert status(config, name) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(name))
    assert "stale" in row
    code = check(config, name, "lab2", as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert (code, out["state"]) == (1, "stale") and out.get("image_id") != old_id
    assert out["as_of"].endswith("Z")


def test_push_of_a_typo_names_every_site_asked_and_the_closest_name(
    lab: LabInfo, tmp_path: Path
) -> None:
    name = uid("op-test")
    upload(lab, "lab1", name, random_bytes(1000))
    config = make_config(lab, tmp_path, "op-*", clouds=["lab1", "lab2"])
    typo = name.replace("op-test", "op-tset")
    with pytest.raises(NoSuchImage) as err:
        push(config, typo)
    assert str(err.value).startswith(f"no image named '{typo}' on lab1, lab2, archive")
    assert f"(did you mean '{name}'?)" in str(err.value)


def _served(lab: LabInfo, cloud: str) -> int:
    """Bytes the cloud's Glance (uwsgi master and workers) has written so far: at the
    source of a copy, the image bytes it served plus small API answers."""
    master = int((lab.directory / cloud / "run" / "glance.pid").read_text())
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry.name))
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                total += int(line.split()[1])
    return total


def _daemon_pass(
    lab: LabInfo, tmp_path: Path, clouds: list[str], store: bool, *, split: bool = False
) -> tuple[int, float, int]:
    """(source bytes served, seconds, targets copied) for one daemon-style pass."""
    name = uid("fan")
    upload(lab, "lab1", name, os.urandom(SIZE))
    (tmp_path / name).mkdir()
    config = make_config(lab, tmp_path / name, name, clouds=clouds, store=store)
    engine = Engine(config)
    try:
        p = plan(engine.rules, engine.inventories(), engine.site_names)
        before, t0 = _served(lab, "lab1"), time.monotonic()
        if split:  # the daemon before issue 11: one task per target
            results = engine.executor.run(p, concurrency=config.max_transfers, split_targets=True)
        else:
            results = engine.execute_concurrently(p)
        seconds, served = time.monotonic() - t0, _served(lab, "lab1") - before
    finally:
        engine.close()
    copied = sum(1 for r in results for t in r.targets if t.ok)
    return served, seconds, copied


def test_a_daemon_pass_reads_the_source_glance_once_for_all_targets(
    lab: LabInfo, tmp_path: Path
) -> None:
    size = SIZE
    one, t1, n1 = _daemon_pass(lab, tmp_path, ["lab1", "lab2"], store=False)
    three, t3, n3 = _daemon_pass(lab, tmp_path, ["lab1", "lab2", "lab3"], store=True)
    old, t_old, n_old = _daemon_pass(lab, tmp_path, ["lab1", "lab2", "lab3"], True, split=True)
    print(
        f"\nsource bytes served / seconds: 1 target {one} B {t1:.2f}s; "
        f"3 targets grouped {three} B {t3:.2f}s; 3 targets split (before) {old} B {t_old:.2f}s"
    )
    assert (n1, n3, n_old) == (1, 3, 3)
    assert size <= one < 1.2 * size
    assert size <= three < 1.2 * size  # read once, fan out
    assert old >= 3 * size  # what the daemon did before: once per target
