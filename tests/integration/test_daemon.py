"""`imagesync daemon` as a process against the lab's real Keystone and Glance clouds.

Cold start convergence, a new version spreading, kill -9 mid-copy then restart, SIGTERM
mid-copy, a site down (a black hole: every request times out) then back, retention
(hide, delete, protected). Copies are made slow where a test needs them in flight by putting
the fault proxy (``tests/faultproxy.py``) in front of the source's Glance
(``endpoint_override``), throttling downloads; the daemon runs as ``tests/daemonproc.py``
starts it, with its own sd_notify socket, and a metrics port.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_ORIGIN, PROP_STATE
from tests.daemonproc import DaemonProcess
from tests.faultproxy import FaultProxy
from tests.integration.labcfg import images_named, random_bytes, uid, upload, write_doc, yaml_cloud

#: a fixture that puts a fault proxy in front of a cloud's Glance (closed after the test)
Proxies = Callable[[str], FaultProxy]
#: a fixture that starts an ``imagesync daemon`` process on a config (stopped after the test)
Daemons = Callable[[Path], DaemonProcess]

pytestmark = pytest.mark.integration
MB = 1 << 20
POLL = 2.0


# -- proxies in front of a cloud's Glance ------------------------------------------------------


def _port(url: str) -> int:
    port = urlparse(url).port
    assert port is not None
    return port


@pytest.fixture
def proxies(lab: LabInfo) -> Iterator[Proxies]:
    made: list[FaultProxy] = []

    def make(cloud: str) -> FaultProxy:
        p = FaultProxy(_port(lab.cloud(cloud).glance_url))
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


# -- the daemon process ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    lab: LabInfo,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    *,
    clouds: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    store: bool = True,
    metrics_port: int | None = None,
) -> Path:
    entries = {}
    for name in clouds or lab.names:
        entry = yaml_cloud(lab, name, timeout="5s", max_transfers=2)
        entry.update((overrides or {}).get(name, {}))
        entries[name] = entry
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "poll_interval": f"{POLL}s",
        "max_transfers": 6,
        "transfer_retries": 1,
        "clouds": entries,
        "images": rules,
    }
    if store:
        (tmp_path / "store").mkdir(exist_ok=True)
        doc["stores"] = {"archive": {"type": "directory", "path": str(tmp_path / "store")}}
    if metrics_port is not None:
        doc["metrics_listen"] = f"127.0.0.1:{metrics_port}"
    return write_doc(tmp_path, doc)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    made: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        d = DaemonProcess(config)
        made.append(d)
        return d

    try:
        yield start
    finally:
        for d in made:
            d.close()


# -- what the clouds and the store hold --------------------------------------------------------


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def published(lab: LabInfo, cloud: str, name: str) -> list[dict[str, Any]]:
    """Active, visible, finished images of that name (what a scheduler would boot)."""
    return [
        i
        for i in images_named(lab, cloud, name)
        if i["status"] == "active" and not i.get("os_hidden") and PROP_STATE not in i
    ]


def half_made(lab: LabInfo, cloud: str, name: str) -> list[dict[str, Any]]:
    """Images of that name that are not finished: queued, saving, or marked uploading."""
    return [
        i for i in images_named(lab, cloud, name) if i["status"] != "active" or i.get(PROP_STATE)
    ]


def store_files(tmp_path: Path, name: str) -> list[Path]:
    folder = tmp_path / "store" / name
    return sorted(folder.iterdir()) if folder.is_dir() else []


def store_sha(tmp_path: Path, name: str) -> set[str]:
    return {
        sha512(p.read_bytes())
        for p in store_files(tmp_path, name)
        if p.suffix == ".img" and not p.name.startswith(".")
    }


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.25)
    return time.monotonic() - t0


def everywhere(
    lab: LabInfo,
    tmp_path: Path,
    name: str,
    data: bytes,
    clouds: tuple[str, ...] = ("lab1", "lab2", "lab3"),
    store: bool = True,
) -> bool:
    want = sha512(data)
    for c in clouds:
        if want not in {i.get("os_hash_value") for i in published(lab, c, name)}:
            return False
    return not store or want in store_sha(tmp_path, name)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


# -- the tests ---------------------------------------------------------------------------------


def test_cold_start_converges_and_a_new_version_spreads_within_a_poll(
    lab: LabInfo, tmp_path: Path, daemons: Daemons
) -> None:
    prefix = uid("conv")
    data = {
        f"{prefix}-a": random_bytes(2 * MB),
        f"{prefix}-b": random_bytes(MB + 1),
        f"{prefix}-c": random_bytes(3 * MB // 2),
    }
    for (name, blob), cloud in zip(data.items(), ("lab1", "lab2", "lab3"), strict=True):
        upload(lab, cloud, name, blob)
    metrics_port = _free_port()
    config = write_config(
        lab,
        tmp_path,
        [{"name": f"{prefix}-*", "clouds": "all", "store": "archive"}],
        metrics_port=metrics_port,
    )
    d = daemons(config)
    d.wait_note("READY=1")
    converged = wait_until(
        lambda: all(everywhere(lab, tmp_path, n, b) for n, b in data.items()),
        90,
        "3 images are on 3 clouds and the store",
    )
    print(
        f"\ncold start: 3 images on 3 clouds + store converged in {converged:.1f}s "
        f"(daemon start included)"
    )
    assert d.wait_note("WATCHDOG=1") == "WATCHDOG=1"
    assert "STATUS=last pass" in d.wait_note("STATUS=last pass")
    done = d.events("copy.done")
    assert len(done) == 9 and {e["target"] for e in done} == {"lab1", "lab2", "lab3", "archive"}
    for e in done:  # one key-value event per action, with what happened
        assert e["bytes"] > 0 and e["seconds"] >= 0 and e["image_id"]

    # A new version on lab3 reaches every required site within one poll plus the copy time.
    name = f"{prefix}-a"
    time.sleep(1.1)  # Glance's created_at has one-second resolution
    new = random_bytes(2 * MB + 5)
    upload(lab, "lab3", name, new)
    spread = wait_until(
        lambda: everywhere(lab, tmp_path, name, new), 60, "the new version is everywhere"
    )
    copies = [
        e for e in d.events("copy.done") if e["image"] == name and e["source"].startswith("lab3:")
    ]
    copy_time = max(e["seconds"] for e in copies)
    print(
        f"new version on lab3 reached lab1, lab2, archive in {spread:.1f}s "
        f"(poll {POLL}s, slowest copy {copy_time:.2f}s)"
    )
    # observed by polling every 0.25 s; allow one poll, the copies, one listing, and slack
    assert spread <= POLL + copy_time * len(copies) + 5.0
    for cloud in ("lab1", "lab2"):
        newest = [i for i in published(lab, cloud, name) if i["os_hash_value"] == sha512(new)]
        assert newest and newest[0][PROP_ORIGIN].startswith("lab3:")

    text = scrape(metrics_port)
    ok = float(re.search(r'imagesync_copies_total\{result="ok"\} (\S+)', text).group(1))  # type: ignore[union-attr]
    assert ok >= 12
    assert f'imagesync_sync_lag_seconds{{image="{name}",site="lab1"}} 0.0' in text
    assert 'imagesync_last_successful_poll_timestamp_seconds{site="lab2"}' in text
    assert "imagesync_bytes_copied_total" in text and "imagesync_transfers_in_flight 0.0" in text

    r = subprocess.run(
        [sys.executable, "-m", "imagesync.cli", "-c", str(config), "history", name, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = json.loads(r.stdout)
    # v1 from lab1 to lab2, lab3, archive; v2 from lab3 to lab1, lab2, archive
    assert {row["target"] for row in rows if row["result"] == "ok"} == {
        "lab1",
        "lab2",
        "lab3",
        "archive",
    }
    assert all(row["bytes"] and row["seconds"] is not None for row in rows)

    code, seconds = d.terminate()
    assert code == 0 and seconds < 30
    assert "Traceback" not in d.stderr()


def _copy_under_way(
    lab: LabInfo,
    tmp_path: Path,
    proxies: Proxies,
    daemons: Daemons,
    size: int = 24 * MB,
    rate: float = 1.5 * MB,
) -> tuple[str, bytes, Path, FaultProxy, DaemonProcess]:
    """A daemon copying a new image from lab1 (behind a slow proxy) to lab2 and the store,
    once both copies are under way: (name, bytes, config, the proxy, the daemon)."""
    name = uid("slow")
    data = random_bytes(size)
    upload(lab, "lab1", name, data)
    proxy = proxies("lab1")
    proxy.plan.download_rate = rate  # every read of the source takes size/rate seconds
    config = write_config(
        lab,
        tmp_path,
        [{"name": name, "clouds": ["lab1", "lab2"], "store": "archive"}],
        overrides={"lab1": {"endpoint_override": proxy.url}},
    )
    daemon = daemons(config)
    wait_until(
        lambda: _in_flight(lab, tmp_path, name),
        60,
        "the copies to lab2 and the store are under way",
    )
    return name, data, config, proxy, daemon


def _in_flight(lab: LabInfo, tmp_path: Path, name: str) -> bool:
    partial = [p for p in store_files(tmp_path, name) if p.name.endswith(".img.partial")]
    uploading = [i for i in images_named(lab, "lab2", name) if i.get(PROP_STATE)]
    return bool(partial and partial[0].stat().st_size > 0 and uploading)


def test_kill_9_during_a_copy_then_restart_cleans_up_and_completes(
    lab: LabInfo, tmp_path: Path, proxies: Proxies, daemons: Daemons
) -> None:
    name, data, config, proxy, first = _copy_under_way(lab, tmp_path, proxies, daemons)
    first.proc.kill()  # kill -9: no chance to clean up
    first.proc.wait(timeout=10)
    # what a crash leaves: a hidden upload on lab2, a partial file in the store
    assert half_made(lab, "lab2", name)
    assert any(p.name.endswith(".img.partial") for p in store_files(tmp_path, name))

    proxy.plan.download_rate = 0  # fast again, so that the restarted copy is quick
    second = daemons(config)
    took = wait_until(
        lambda: everywhere(lab, tmp_path, name, data, ("lab2",)),
        60,
        "the restarted daemon completed the copy",
    )
    print(f"\nafter kill -9: restarted daemon cleaned up and completed in {took:.1f}s")
    cleaned = second.events("cleanup.leftover")
    assert {e["site"] for e in cleaned} == {"lab2", "archive"}
    images = images_named(lab, "lab2", name)
    assert len(images) == 1 and not half_made(lab, "lab2", name)
    assert [
        p.name for p in store_files(tmp_path, name) if p.name.startswith(".")
    ] == []  # no .partial, no unpublished metadata
    assert len([p for p in store_files(tmp_path, name) if p.suffix == ".img"]) == 1
    code, _ = second.terminate()
    assert code == 0


def test_sigterm_during_a_copy_exits_quickly_and_leaves_nothing(
    lab: LabInfo, tmp_path: Path, proxies: Proxies, daemons: Daemons
) -> None:
    name, _, _, _, d = _copy_under_way(lab, tmp_path, proxies, daemons)
    code, seconds = d.terminate()
    print(f"\nSIGTERM during a copy: exited {code} in {seconds:.2f}s")
    assert code == 0 and seconds < 30
    d.wait_note("STOPPING=1")
    assert images_named(lab, "lab2", name) == []
    assert store_files(tmp_path, name) == []
    assert {e["target"] for e in d.events("copy.cancelled")} == {"lab2", "archive"}
    assert d.events("daemon.stopped") and not d.events("daemon.abandoned")
    assert "Traceback" not in d.stderr()


def test_a_site_down_during_a_pass_does_not_stop_the_others_and_is_repaired(
    lab: LabInfo, tmp_path: Path, proxies: Proxies, daemons: Daemons
) -> None:
    name = uid("down")
    data = random_bytes(MB)
    upload(lab, "lab1", name, data)
    proxy = proxies("lab2")
    proxy.stop()
    proxy.plan.blackhole = True  # lab2's Glance accepts connections and never answers
    proxy.start()
    config = write_config(
        lab,
        tmp_path,
        [{"name": name, "clouds": "all", "store": "archive"}],
        overrides={"lab2": {"endpoint_override": proxy.url}},
    )
    d = daemons(config)
    took = wait_until(
        lambda: everywhere(lab, tmp_path, name, data, ("lab1", "lab3")),
        60,
        "lab3 and the store have it while lab2 is down",
    )
    print(f"\nlab2 down (requests time out after 5s): lab3 + store synced in {took:.1f}s")
    wait_until(
        lambda: any("lab2" in e["unreachable"] for e in d.events("pass.done")),
        30,
        "a pass reports lab2 unreachable",
    )
    assert "unreachable: lab2" in d.wait_note("unreachable: lab2")
    assert published(lab, "lab2", name) == []

    proxy.stop()
    proxy.plan.blackhole = False
    proxy.start()  # back, on the same address
    repaired = wait_until(lambda: everywhere(lab, tmp_path, name, data), 60, "lab2 is repaired")
    print(f"lab2 back: repaired in {repaired:.1f}s")
    assert len(images_named(lab, "lab2", name)) == 1
    code, _ = d.terminate()
    assert code == 0


def test_retention_keep_2_hides_the_oldest_and_spares_protected(
    lab: LabInfo, tmp_path: Path, daemons: Daemons
) -> None:
    prefix = uid("keep")
    hide, delete, guarded = f"{prefix}-hide", f"{prefix}-delete", f"{prefix}-protected"
    rules = [
        {"name": hide, "clouds": ["lab1", "lab2"], "keep": 2},
        {"name": delete, "clouds": ["lab1", "lab2"], "keep": 2, "retire": "delete"},
        {"name": guarded, "clouds": ["lab1", "lab2"], "keep": 2, "retire": "delete"},
    ]
    config = write_config(lab, tmp_path, rules, store=False)
    names = (hide, delete, guarded)
    versions: list[bytes] = []
    admin = glance_client(lab, "lab2", admin=True)
    d = daemons(config)
    copies_v1: dict[str, str] = {}
    for v in range(3):
        blob = random_bytes(100_000 + v)
        versions.append(blob)
        if v:
            time.sleep(1.1)  # distinct version times
        for n in names:
            upload(lab, "lab1", n, blob)

        def on_lab2(b: bytes = blob) -> bool:
            return all(everywhere(lab, tmp_path, n, b, ("lab2",), store=False) for n in names)

        wait_until(on_lab2, 60, f"version {v + 1} is on lab2")
        if v == 0:
            for n in names:
                (copy,) = published(lab, "lab2", n)
                copies_v1[n] = copy["id"]
            admin.images.update(copies_v1[guarded], protected=True)

    def retired() -> bool:
        # The lab has no Nova: its clouds cannot tell which images servers use, so
        # ``retire: delete`` hides there too (and says why), rather than delete blind.
        return all(
            {i["id"]: i for i in images_named(lab, "lab2", n)}.get(copies_v1[n], {}).get(
                "os_hidden"
            )
            is True
            for n in (hide, delete)
        )

    def kept_protected_said() -> bool:
        # the pass logs its skips after its retirements: wait for the line, not only the hides
        return any(
            "protected" in e["reason"] for e in d.events("skip") if e.get("image") == guarded
        )

    wait_until(
        lambda: retired() and kept_protected_said(),
        30,
        "the oldest copies are hidden / deleted, and the protected one said kept",
    )
    try:
        for n in names:  # the two newest versions stay visible everywhere
            shas = {i["os_hash_value"] for i in published(lab, "lab2", n)}
            assert shas == {sha512(versions[1]), sha512(versions[2])} | (
                {sha512(versions[0])} if n == guarded else set()
            )
            # the originals on lab1 were uploaded by a person: never retired
            assert len(published(lab, "lab1", n)) == 3
        kept = admin.images.get(copies_v1[guarded])
        assert kept["protected"] and not kept["os_hidden"] and kept["status"] == "active"
        done = {e["image"]: e for e in d.events("retire.done")}
        assert {n: e["mode"] for n, e in done.items()} == {hide: "hide", delete: "hide"}
        assert "cannot tell" in done[delete]["fallback"] and done[hide]["fallback"] is None
    finally:
        admin.images.update(copies_v1[guarded], protected=False)
    code, _ = d.terminate()
    assert code == 0
