"""``imagesync demo``: the whole job end to end on a local lab of real OpenStack services.

Starts (or reuses) a 2-cloud lab — a real Keystone and a real Glance per cloud — and a
directory store, uploads a freshly generated image to lab1 as a user would, checks every
connection, runs one sync pass (imagesync's main job) so that the image reaches lab2 and the
store verified byte for byte, prints the status and the pre-flight answer a batch scheduler
would get, then stops the lab (``--keep`` leaves it running for you to explore).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from imagesync import lab
from imagesync.config.load import load_config

NAME = "demo-image"


def _section(title: str) -> None:
    print(f"\n== {title}")


def _image_bytes(size: int) -> bytes:
    """A small but real-looking raw disk: random bytes, different on every run."""
    return os.urandom(size)


def _upload_new_version(info: lab.LabInfo) -> None:
    """What a user does outside imagesync: a new version of NAME on lab1, with glanceclient."""
    data = _image_bytes(8 << 20)
    gc = lab.glance_client(info, "lab1")
    img = gc.images.create(
        name=NAME, disk_format="raw", container_format="bare", os_distro="demo-linux"
    )
    gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
    img = gc.images.get(img["id"])
    print(f"  lab1: {img['id']} {img['size']} bytes, sha512 {img['os_hash_value'][:16]}…")


def run_demo(directory: Path | None = None, keep: bool = False) -> int:
    from imagesync.check import check
    from imagesync.commands import status, sync
    from imagesync.sites.probe import check_connections

    started = time.monotonic()
    from imagesync.sites import store_kinds

    _section(
        "1. start a lab: 2 clouds, each a real Keystone 30 + Glance 33 on loopback, "
        "and a VOSpace store"
    )
    # the lab's VOSpace service is the central store (as CANFAR's vault would be)
    info = lab.up(clouds=2, directory=directory, vospace_store="vospace" in store_kinds())
    try:
        print(lab.describe(info))
        config = load_config(info.config_file)

        _section(f"2. imagesync -c {info.config_file} config check --connect")
        results = check_connections(config)
        for site, ok, detail in results:
            print(f"  {site}: {'ok' if ok else 'FAILED'} - {detail}")
        if not all(ok for _, ok, _ in results):
            return 1

        _section(f"3. a user uploads a new version of {NAME!r} to lab1 (glanceclient)")
        _upload_new_version(info)

        _section(f"4. imagesync -c {info.config_file} sync   (one pass of the main job)")
        code = sync(config)
        if code != 0:
            return code

        _section(f"5. imagesync -c {info.config_file} status {NAME}")
        status(config, NAME)

        _section(
            f"6. imagesync -c {info.config_file} check {NAME} --cloud lab2   "
            "(a scheduler's pre-flight)"
        )
        code = check(config, NAME, "lab2", fresh=True)
        if code != 0:
            return code

        _section("7. a second pass has nothing to do (idempotent)")
        code = sync(config, dry_run=True)
        print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
        return code
    finally:
        if keep:
            print(
                f"\nthe lab keeps running: imagesync lab status --dir {info.directory}; "
                f"stop it with: imagesync lab down --dir {info.directory}"
            )
        else:
            print("\n" + lab.down(info.directory))
