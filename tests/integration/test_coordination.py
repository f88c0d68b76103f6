"""Issue 13 against real services: several ``imagesync daemon`` processes (separate state dirs,
as on separate hosts) sharing the work through tooz on a real etcd (Debian's etcd-server, one
started here under tmp_path), copying between the lab's real Keystone/Glance clouds.

Short leases (``lease_timeout: 4s``) keep it quick. The kill -9 test repeats
``IMAGESYNC_COORD_ROUNDS`` times (default 3 in CI; 10 or more by hand), killing the copying
member at a different point of its copy each round.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagesync.config.types import CoordinationConfig
from imagesync.coordination import describe_group
from imagesync.lab import LabInfo, procs
from imagesync.lab import etcd as lab_etcd
from tests.daemonproc import DaemonProcess
from tests.debpkg import ensure_tool
from tests.faultproxy import FaultProxy
from tests.integration.labcfg import images_named, random_bytes, uid, upload, write_doc, yaml_cloud
from tests.integration.test_daemon import half_made, proxies, published, wait_until

pytestmark = pytest.mark.integration
__all__ = ["proxies"]  # the fixture, used by name
MB = 1 << 20
LEASE = 4.0
ROUNDS = int(os.environ.get("IMAGESYNC_COORD_ROUNDS", "3"))
TARGETS = ("lab2", "lab3")


class Etcd:
    """A real etcd on loopback under ``directory``, stoppable and restartable on its data."""

    def __init__(self, directory: Path) -> None:
        ensure_tool("/usr/bin/etcd", lab_etcd.PACKAGE)
        self.directory = directory
        self.port, self.peer = procs.free_ports(2)
        self.pid = 0
        self.start()

    @property
    def url(self) -> str:
        return lab_etcd.coordination_url(self.port)

    def start(self) -> None:
        self.pid = lab_etcd.start(self.directory, self.port, self.peer)
        lab_etcd.wait_ready(self.directory, self.port, self.pid)

    def stop(self) -> None:
        procs.stop_groups({self.pid: lab_etcd.marker(self.directory)})


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    e = Etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield e
    finally:
        e.stop()


class Members:
    """Daemons sharing one configuration, each with its own state dir (as on its own host)."""

    def __init__(self, lab: LabInfo, tmp_path: Path, etcd: Etcd) -> None:
        self.lab, self.tmp_path, self.etcd = lab, tmp_path, etcd
        self.group = uid("g")
        self.running: dict[str, DaemonProcess] = {}
        self.gone: list[DaemonProcess] = []

    def config(self, member: str, names: list[str], source_override: str | None) -> Path:
        d = self.tmp_path / member
        d.mkdir(exist_ok=True)
        lab1 = yaml_cloud(self.lab, "lab1", timeout="10s", max_transfers=1)
        if source_override:
            lab1["endpoint_override"] = source_override
        doc: dict[str, Any] = {
            "state_dir": str(d / "state"),
            "poll_interval": "1s",
            "max_transfers": 1,  # one copy at a time per member (one host's bandwidth)
            "transfer_retries": 1,
            "clouds": {
                "lab1": lab1,
                **{t: yaml_cloud(self.lab, t, timeout="10s", max_transfers=1) for t in TARGETS},
            },
            "images": [{"name": n, "clouds": ["lab1", *TARGETS]} for n in names],
            "coordination": {
                "url": self.etcd.url,
                "lease_timeout": f"{LEASE:g}s",
                "member_id": member,
                "group": self.group,
            },
        }
        return write_doc(d, doc)

    def start(self, member: str, names: list[str], source_override: str | None = None) -> None:
        self.running[member] = DaemonProcess(self.config(member, names, source_override))

    def kill(self, member: str) -> None:
        d = self.running.pop(member)
        d.proc.kill()
        d.proc.wait(timeout=10)
        self.gone.append(d)

    def all(self) -> list[DaemonProcess]:
        return [*self.running.values(), *self.gone]

    def members(self) -> list[str]:
        cfg = CoordinationConfig(url=self.etcd.url, lease_timeout=LEASE, group=self.group)
        return list(describe_group(cfg, [])["members"])

    def wait_members(self, want: set[str], timeout: float = 60) -> None:
        wait_until(lambda: set(self.members()) == want, timeout, f"members are {sorted(want)}")
        time.sleep(1.5)  # every member's next pass applies the change to its ring

    def copier(self, name: str) -> str | None:
        """The member that started copying ``name`` (still running)."""
        for m, d in self.running.items():
            if any(e.get("image") == name for e in d.events("copy.start")):
                return m
        return None

    def close(self) -> None:
        for d in self.all():
            d.close()


@pytest.fixture
def members(lab: LabInfo, tmp_path: Path, etcd: Etcd) -> Iterator[Members]:
    m = Members(lab, tmp_path, etcd)
    try:
        yield m
    finally:
        m.close()


def sha(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def copying(members: Members, name: str) -> Callable[[], bool]:
    return lambda: members.copier(name) is not None


@pytest.fixture
def slow_lab1(proxies: Callable[[str], FaultProxy]) -> FaultProxy:
    """A proxy in front of lab1 at 1 MB/s: a 3 MB copy takes ~3 s, time to act in its middle."""
    proxy = proxies("lab1")
    proxy.plan.download_rate = 1.0 * MB
    return proxy


def converged(lab: LabInfo, name: str, data: bytes) -> bool:
    """The version ``data`` is published on every target (older ones may stay: retention)."""
    want = sha(data)
    return all(want in {i.get("os_hash_value") for i in published(lab, t, name)} for t in TARGETS)


def copies_done(members: Members, name: str) -> list[tuple[str, str]]:
    """(member, target) of every verified copy of ``name``, across every member's log."""
    out = []
    for m, d in [*members.running.items(), *(("gone", g) for g in members.gone)]:
        out += [(m, e["target"]) for e in d.events("copy.done") if e.get("image") == name]
    return out


def nothing_broken(lab: LabInfo, name: str, data: bytes) -> None:
    """What a scheduler could boot is never a wrong or half-made image."""
    for t in TARGETS:
        for i in published(lab, t, name):
            assert i.get("os_hash_value") == sha(data), (t, i["id"])


# --------------------------------------------------------------------------------------------


def test_three_members_converge_with_no_version_copied_twice(
    lab: LabInfo, members: Members
) -> None:
    names = [uid("co") for _ in range(6)]
    for m in ("m1", "m2", "m3"):
        members.start(m, names)
    members.wait_members({"m1", "m2", "m3"})
    blobs = {n: random_bytes(MB) for n in names}
    for n, b in blobs.items():
        upload(lab, "lab1", n, b)
    wait_until(lambda: all(converged(lab, n, blobs[n]) for n in names), 90, "all converged")
    drivers = set()
    for n in names:
        done = copies_done(members, n)
        assert sorted(t for _, t in done) == sorted(TARGETS), (n, done)  # each target once
        assert len({m for m, _ in done}) == 1, (n, done)  # one member drove the name
        drivers |= {m for m, _ in done}
        for t in TARGETS:
            assert len(images_named(lab, t, n)) == 1
    print(f"\nnames driven by {sorted(drivers)}")
    assert len(drivers) >= 2  # the work was shared


def test_kill_9_of_the_copying_member_another_completes_after_the_lease(
    lab: LabInfo, members: Members, slow_lab1: FaultProxy
) -> None:
    names = [uid("k9") for _ in range(ROUNDS)]
    for m in ("m1", "m2", "m3"):
        members.start(m, names, slow_lab1.url)
    members.wait_members({"m1", "m2", "m3"})
    took = []
    for i, name in enumerate(names):
        data = random_bytes(3 * MB)
        upload(lab, "lab1", name, data)
        wait_until(copying(members, name), 60, f"{name} is being copied")
        victim = members.copier(name)
        assert victim is not None
        # a different point of the copy each round: from its start to near its end
        time.sleep(0.3 + (2.4 * i / max(1, ROUNDS - 1)))
        nothing_broken(lab, name, data)
        t_kill = time.time()
        members.kill(victim)
        left = [im for t in TARGETS for im in half_made(lab, t, name)]
        t0 = time.monotonic()
        while not converged(lab, name, data):
            nothing_broken(lab, name, data)
            assert time.monotonic() - t0 < 90, f"round {i}: {name} did not converge"
            time.sleep(0.3)
        took.append(time.monotonic() - t0)
        # the half-made uploads were removed, and only once the dead member's lease expired
        for t in TARGETS:
            assert not half_made(lab, t, name), (i, t)
        cleaned = [
            e
            for d in members.running.values()
            for e in d.events("cleanup.leftover")
            if e.get("image") == name
        ]
        if left:
            assert cleaned, f"round {i}: nobody removed {name}'s half-made uploads"
        for e in cleaned:
            when = time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
            when -= time.timezone
            assert when >= t_kill + LEASE / 2 - 1, (i, e)
        # as if the host came back: the member restarts on its own state dir
        members.start(victim, names, slow_lab1.url)
        members.wait_members({"m1", "m2", "m3"})
    print(f"\n{ROUNDS} rounds of kill -9: converged after {[round(t, 1) for t in took]} s")


def test_a_member_frozen_past_its_lease_does_not_act_on_what_it_lost(
    lab: LabInfo, members: Members, slow_lab1: FaultProxy
) -> None:
    name = uid("stop")
    for m in ("m1", "m2"):
        members.start(m, [name], slow_lab1.url)
    members.wait_members({"m1", "m2"})
    data = random_bytes(4 * MB)
    upload(lab, "lab1", name, data)
    wait_until(lambda: members.copier(name) is not None, 60, "the copy started")
    frozen = members.copier(name)
    assert frozen is not None
    other = next(m for m in members.running if m != frozen)
    time.sleep(1.0)
    os.kill(members.running[frozen].proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: converged(lab, name, data), 90, "the other member completed it")
        assert {m for m, _ in copies_done(members, name)} == {other}
    finally:
        os.kill(members.running[frozen].proc.pid, signal.SIGCONT)
    # resumed: it must not publish what it was writing, nor do anything else with the name
    time.sleep(LEASE + 3)
    assert {m for m, _ in copies_done(members, name)} == {other}
    for t in TARGETS:
        assert len(published(lab, t, name)) == 1 and not half_made(lab, t, name), t
    d = members.running[frozen]
    assert d.proc.poll() is None
    print(
        "\nresumed member:",
        sorted(
            {
                e["event"]
                for e in d.lines
                if e.get("event", "").startswith(("coordination", "pass.not_acting", "copy."))
            }
        ),
    )


def test_etcd_away_no_changes_check_answers_then_converges(
    lab: LabInfo, members: Members, etcd: Etcd, tmp_path: Path
) -> None:
    name = uid("down")
    for m in ("m1", "m2"):
        members.start(m, [name])
    members.wait_members({"m1", "m2"})
    first = random_bytes(MB)
    upload(lab, "lab1", name, first)
    wait_until(lambda: converged(lab, name, first), 60, "the first version spread")
    etcd.stop()
    try:
        time.sleep(LEASE)  # past half a lease: nobody may act
        second = random_bytes(MB)
        upload(lab, "lab1", name, second)
        time.sleep(2 * LEASE)
        for t in TARGETS:  # no change while the service is away
            assert [i.get("os_hash_value") for i in images_named(lab, t, name)] == [sha(first)]
        for d in members.running.values():
            assert d.events("pass.not_acting")
        # check keeps answering (from the state every pass records)
        cfg = tmp_path / "m1" / "imagesync.yaml"
        t0 = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "imagesync.cli",
                "-c",
                str(cfg),
                "check",
                name,
                "--cloud",
                "lab2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode in (0, 1), out.stderr[-500:]
        answer = json.loads(out.stdout)
        print(f"\ncheck while etcd is away ({time.monotonic() - t0:.1f}s): {answer.get('state')}")
    finally:
        etcd.start()
    try:
        wait_until(lambda: converged(lab, name, second), 90, "converged after etcd came back")
    except AssertionError:
        for m, d in members.running.items():
            print(m, [(e.get("event"), e.get("reason") or e.get("error")) for e in d.lines[-25:]])
        raise


def test_a_joining_member_takes_some_names_without_interrupting_copies(
    lab: LabInfo, members: Members, slow_lab1: FaultProxy
) -> None:
    slow = uid("slow")
    names = [slow, *(uid("join") for _ in range(8))]
    for m in ("m1", "m2"):
        members.start(m, names, slow_lab1.url)
    members.wait_members({"m1", "m2"})
    data = random_bytes(5 * MB)
    upload(lab, "lab1", slow, data)
    wait_until(lambda: members.copier(slow) is not None, 60, "the slow copy started")
    busy = members.copier(slow)
    members.start("m3", names, slow_lab1.url)
    members.wait_members({"m1", "m2", "m3"})
    slow_lab1.plan.download_rate = 0
    blobs = {n: random_bytes(256 * 1024) for n in names[1:]}
    for n, b in blobs.items():
        upload(lab, "lab1", n, b)
    wait_until(
        lambda: converged(lab, slow, data) and all(converged(lab, n, b) for n, b in blobs.items()),
        120,
        "everything converged",
    )
    # the copy in flight was not interrupted: its member finished it, nothing cancelled
    assert {m for m, _ in copies_done(members, slow)} == {busy}
    assert not any(d.events("copy.cancelled") for d in members.all())
    owners = {m for n in blobs for m, _ in copies_done(members, n)}
    assert "m3" in owners, owners  # the newcomer took some names
    for n in names:
        # no (name, target) copied twice. The targets of one name may be copied by two
        # members: in CI, m2 copied a name to one cloud and m3, once the group of three had
        # settled, the same name to the other (each under its own (name, target) lock)
        done = copies_done(members, n)
        assert len(done) == len({t for _, t in done}), (n, done)
