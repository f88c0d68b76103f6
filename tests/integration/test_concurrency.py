"""Two `imagesync push` processes for the same image and site at once make one copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagesync.lab import LabInfo
from tests.integration.labcfg import images_named, random_bytes, uid, upload, write_yaml

pytestmark = pytest.mark.integration


def test_two_concurrent_pushes_make_one_copy(lab: LabInfo, tmp_path: Path) -> None:
    name = uid("race")
    upload(lab, "lab1", name, random_bytes(4 << 20))
    cfg = write_yaml(lab, tmp_path, name, ["lab1", "lab2"])
    cmd = [
        sys.executable,
        "-m",
        "imagesync.cli",
        "-c",
        str(cfg),
        "--log-format",
        "json",
        "push",
        name,
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    copies = [i for i in images_named(lab, "lab2", name)]
    assert len(copies) == 1, outs
    assert copies[0]["status"] == "active" and not copies[0].get("os_hidden")
    # one run copied; the other either found the lock held (exit 1: busy, retry later)
    # or, coming second, found the copy already there (exit 0)
    assert codes in ([0, 0], [0, 1]), outs
    text = "".join(o + e for o, e in outs)
    assert text.count('"event": "copy.done"') == 1
    # afterwards a push is a no-op
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(images_named(lab, "lab2", name)) == 1
