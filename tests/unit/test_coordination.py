"""Issue 13 without servers: the pure parts of coordination (may a member act, which names
it drives) with an injected clock, and the engine's ownership checks against an in-memory
stand-in for tooz on etcd (the same calls imagesync.coordination makes: a lock's key holding
its uuid, upload leases as keys attached to the lock's lease). The real thing is exercised
against a real etcd in tests/integration/test_coordination.py."""

from __future__ import annotations

import base64
import json
import math
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagesync.config.load import load_config
from imagesync.config.types import Config, CoordinationConfig, ImageRule
from imagesync.coordination import (
    CLOUD_STEPS_KEY,
    Coordinator,
    Health,
    assign,
    may_act,
    owner_of,
)
from imagesync.daemon.passes import owned_only
from imagesync.engine import Engine
from imagesync.errors import ConfigError, LockBusy
from imagesync.model import PROP_STATE, PROP_UPLOAD, STATE_UPLOADING
from imagesync.plan import plan
from imagesync.sites.memory import MemorySite, MemoryWriter
from tests.fakeclock import FakeClock

# --------------------------------------------------------------------------- a tooz stand-in


class FakeLease:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.keys: set[str] = set()

    def expire(self) -> None:
        for k in self.keys:
            self.client.kv.pop(k, None)


class FakeClient:
    """etcd3gw's client as coordination uses it: get/put/delete/get_prefix."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.calls = 0

    def get(self, key: str) -> list[bytes]:
        self.calls += 1
        return [self.kv[key]] if key in self.kv else []

    def put(self, key: str, value: str | bytes, lease: FakeLease | None = None) -> bool:
        self.calls += 1
        self.kv[key] = value.encode() if isinstance(value, str) else value
        if lease is not None:
            lease.keys.add(key)
        return True

    def delete(self, key: str) -> bool:
        self.calls += 1
        return self.kv.pop(key, None) is not None

    def get_prefix(self, prefix: str) -> list[tuple[bytes, dict[str, Any]]]:
        return [(v, {"key": k.encode()}) for k, v in self.kv.items() if k.startswith(prefix)]


class FakeLock:
    def __init__(self, backend: Backend, name: bytes) -> None:
        self.backend = backend
        self.client = backend.client
        self._key = b"/tooz/locks" + name
        self._uuid = base64.b64encode(uuid.uuid4().bytes).decode()
        self._lease: FakeLease | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if self._key.decode() in self.client.kv:
            return False
        self._lease = FakeLease(self.client)
        self.client.put(self._key.decode(), base64.b64decode(self._uuid), lease=self._lease)
        return True

    def release(self) -> bool:
        if self.backend.no_release:
            return False
        key = self._key.decode()
        if self.client.kv.get(key) == base64.b64decode(self._uuid):
            del self.client.kv[key]
            return True
        return False


class _Result:
    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        return self.value


class FakeRing:
    def __init__(self, members: set[bytes]) -> None:
        self.members = members

    @property
    def nodes(self) -> set[bytes]:
        return self.members


class FakePartitioner:
    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.ring = FakeRing(driver.backend.members)


class Backend:
    """What several members share: the key space and the group."""

    def __init__(self) -> None:
        self.client = FakeClient()
        self.members: set[bytes] = set()
        self.down = False
        self.no_release = False


class FakeDriver:
    def __init__(self, backend: Backend, me: str) -> None:
        self.backend = backend
        self.me = me
        self.client = backend.client

    def _up(self) -> None:
        if self.backend.down:
            raise ConnectionError("service away")

    def start(self, start_heart: bool = False) -> None:
        self._up()

    def stop(self) -> None:
        self.backend.members.discard(self.me.encode())

    def heartbeat(self) -> None:
        self._up()

    def join_partitioned_group(self, group: bytes, partitions: int = 32) -> FakePartitioner:
        self.backend.members.add(self.me.encode())
        return FakePartitioner(self)

    def leave_partitioned_group(self, p: FakePartitioner) -> None:
        self.backend.members.discard(self.me.encode())

    def join_group(self, group: bytes, capabilities: Any = None) -> _Result:
        self.backend.members.add(self.me.encode())
        return _Result(None)

    def run_watchers(self) -> None:
        self._up()

    def get_members(self, group: bytes) -> _Result:
        self._up()
        return _Result(set(self.backend.members))

    def get_lock(self, name: bytes) -> FakeLock:
        return FakeLock(self.backend, name)


CFG = CoordinationConfig(url="etcd3+http://127.0.0.1:2379", lease_timeout=30.0)


def member(
    backend: Backend, name: str, clock: Callable[[], float], instance: str | None = None
) -> Coordinator:
    c = Coordinator(CFG, name, clock=clock, driver=FakeDriver(backend, name), instance_id=instance)
    c.start(join=True)
    return c


# --------------------------------------------------------------------------- pure parts


def test_may_act_only_within_half_a_lease_of_the_last_success() -> None:
    assert may_act(100.0, 90.0, 30.0, member=True) is Health.OK
    assert may_act(100.0, 85.0, 30.0, member=True) is Health.STALE  # exactly half: no
    assert may_act(100.0, None, 30.0, member=True) is Health.STALE
    assert may_act(100.0, 99.0, 30.0, member=False) is Health.EXPELLED
    assert may_act(100.0, 99.0, 30.0, member=True, started=False) is Health.NOT_STARTED


NAMES = [f"img-{i}" for i in range(200)]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7])
def test_every_name_is_driven_by_one_member_and_the_shares_are_within_one(m: int) -> None:
    members = [f"host{i}:{i:08x}" for i in range(m)]
    for n in range(len(NAMES) + 1):
        owners = assign(NAMES[:n], members)
        assert sorted(owners) == sorted(NAMES[:n])
        shares = Counter(owners.values())
        counts = [shares.get(x, 0) for x in members]
        assert max(counts) - min(counts) <= 1, (n, counts)


def test_the_assignment_depends_only_on_the_sets_not_their_order() -> None:
    members = ["b:2", "a:1", "c:3"]
    once = assign(NAMES[:30], members)
    rng = random.Random(7)
    for _ in range(20):
        names, ms = NAMES[:30] + NAMES[:5], members + members[:1]
        rng.shuffle(names)
        rng.shuffle(ms)
        assert assign(names, ms) == once
    # a digest, not hash(): another process (another host) computes the same
    code = (
        "import json; from imagesync.coordination import assign; "
        f"print(json.dumps(assign({NAMES[:30]!r}, {members!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert json.loads(out.stdout) == once


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_a_join_or_a_death_moves_a_bounded_number_of_names(m: int) -> None:
    """Measured: a join moves at most twice the newcomer's share (on average 1.0–1.2 times
    it); a death moves the dead member's names and at most as many others again."""
    members = [f"m{i}" for i in range(m)]
    for n in range(1, len(NAMES) + 1):
        before = assign(NAMES[:n], members)
        joined = assign(NAMES[:n], [*members, "new"])
        moved = [x for x in before if before[x] != joined[x]]
        assert len(moved) <= 2 * math.ceil(n / (m + 1)), (n, len(moved))
        assert sum(o == "new" for o in joined.values()) >= n // (m + 1)
        if m > 1:
            died = assign(NAMES[:n], members[1:])
            moved = [x for x in before if before[x] != died[x]]
            assert len(moved) <= 2 * math.ceil(n / m), (n, len(moved))


def test_thirty_names_over_three_members_then_four() -> None:
    """The benchmark's case: 10/10/10, and a fourth member moves about a quarter."""
    names = [f"bc-{i:02d}" for i in range(30)]
    three = assign(names, ["m0", "m1", "m2"])
    assert sorted(Counter(three.values()).values()) == [10, 10, 10]
    four = assign(names, ["m0", "m1", "m2", "m3"])
    assert sorted(Counter(four.values()).values()) == [7, 7, 8, 8]
    assert sum(three[x] != four[x] for x in names) <= 12


def test_a_single_key_changes_hands_only_to_a_newcomer() -> None:
    """owner_of (plain rendezvous, for the cloud steps' key): a join moves a key only to the
    member that joined."""
    keys = [f"key-{i}" for i in range(100)]
    three = {k: owner_of(k, ["a", "b", "c"]) for k in keys}
    four = {k: owner_of(k, ["c", "d", "a", "b"]) for k in keys}
    assert all(four[k] in (three[k], "d") for k in keys)
    assert owner_of("x", []) is None


def test_members_split_the_names_between_them_through_the_service() -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    names = NAMES[:31]
    a, b = member(backend, "m1", clock), member(backend, "m2", clock)
    for c in (a, b):
        c.refresh()
    mine_a, mine_b = a.drives(names), b.drives(names)
    assert mine_a | mine_b == set(names) and not mine_a & mine_b
    assert sorted([len(mine_a), len(mine_b)]) == [15, 16]
    assert a.status().drives == b.status().drives == {"m1": len(mine_a), "m2": len(mine_b)}
    # exactly one of them runs the cloud steps
    assert [a.owns(CLOUD_STEPS_KEY), b.owns(CLOUD_STEPS_KEY)].count(True) == 1
    # a third joins: until each has refreshed they may disagree (the locks keep one writer);
    # once all have, the names are split three ways again
    c3 = member(backend, "m3", clock)
    for c in (a, b, c3):
        c.refresh()
    shares = [len(c.drives(names)) for c in (a, b, c3)]
    assert sorted(shares) == [10, 10, 11]
    assert set().union(*(c.drives(names) for c in (a, b, c3))) == set(names)
    # a member that may not act drives nothing, but still says who drives what
    backend.down = True
    clock.now += 20
    assert a.refresh() is Health.STALE and a.drives(names) == set()
    assert sum(a.status().drives.values()) == len(names)
    for c in (a, b, c3):
        c.stop()


def test_owned_only_keeps_every_assessment_and_the_owned_actions(tmp_path: Path) -> None:
    src = MemorySite("c1")
    for i in range(6):
        src.add(f"img-{i}", b"x" * 100)
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": MemorySite("c2")})
    p = plan(eng.rules, eng.inventories(), eng.site_names)
    mine = owned_only(p, lambda name: name in ("img-1", "img-4"))
    assert sorted(c.name for c in mine.copies) == ["img-1", "img-4"]
    assert mine.assessments == p.assessments
    assert owned_only(p, lambda _n: False).copies == []


# --------------------------------------------------------------------------- the member


def test_a_member_whose_service_went_quiet_takes_no_lock_and_owns_nothing() -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    c = member(backend, "m1", clock)
    with c.lock("img-a", "c2"):
        assert c.holds("img-a", "c2")
    backend.down = True
    clock.now += 14.0  # under half the lease: what it holds is still surely its own
    assert c.can_act()
    clock.now += 2.0  # past half the lease without a successful call
    assert c.refresh() is Health.STALE
    assert not c.owns("img-a")
    with pytest.raises(LockBusy), c.lock("img-a", "c2"):
        pass
    backend.down = False  # the service is back: the next pass acts again
    assert c.refresh() is Health.OK
    c.stop()


def test_an_expelled_member_rejoins() -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    c = member(backend, "m1", clock)
    backend.members.discard(b"m1")  # frozen past its TTL: the service dropped it
    assert c.health() is Health.EXPELLED
    assert c.refresh() is Health.OK  # rejoined
    assert b"m1" in backend.members
    c.stop()


def test_a_lock_taken_over_by_another_is_not_held() -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    c = member(backend, "m1", clock)
    other = member(backend, "m2", clock)
    with c.lock("img-a", "c2"):
        with pytest.raises(LockBusy):
            other.lock("img-a", "c2").__enter__()
        # m1 frozen past its lease: the lease expired and m2 took the lock; tooz still says
        # m1 holds it (no fencing): only the key's value tells
        key = next(k for k in backend.client.kv if k.startswith("/tooz/locks"))
        del backend.client.kv[key]
        with other.lock("img-a", "c2"):
            assert not c.holds("img-a", "c2")
            assert other.holds("img-a", "c2")
    c.stop()
    other.stop()


# --------------------------------------------------------------------------- the engine


def mem_config(tmp_path: Path, state: str = "state") -> Config:
    return Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / state,
        poll_interval=60,
        clouds={},
        stores={},
        images=(ImageRule(pattern="img*", clouds=("c1", "c2")),),
        transfer_retries=1,
        empty_listing_passes=1,  # the leftover's removal empties the listing: believe it
    )


def test_a_copy_whose_lock_was_lost_midway_is_not_published(tmp_path: Path) -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    coord = member(backend, "m1", clock)

    class Stolen(MemorySite):
        """The lock is taken over while the upload is written (m1 paused past its lease)."""

        def create(self, new: Any) -> MemoryWriter:
            for k in [k for k in backend.client.kv if k.startswith("/tooz/locks")]:
                backend.client.kv[k] = b"someone else"
            return super().create(new)

    src, dst = MemorySite("c1"), Stolen("c2")
    src.add("img-a", b"x" * 3000)
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": dst})
    eng.coordinate(coord)
    p = plan(eng.rules, eng.inventories(), eng.site_names)
    results = eng.execute(p)
    assert not results[0].ok
    assert dst.list_images("img-a") == []  # the upload was removed, nothing published
    coord.stop()


def test_a_dead_members_upload_is_removed_only_after_its_lease_expired(tmp_path: Path) -> None:
    backend, clock = Backend(), FakeClock(1000.0)
    src, dst = MemorySite("c1"), MemorySite("c2")
    src.add("img-a", b"x" * 3000)

    # member m2 (its own state_dir) starts a copy and dies in the middle: its upload and its
    # lease are left; the lock's lease (and the upload lease attached to it) still run
    dead_eng = Engine(mem_config(tmp_path, "state-m2"), sites={"c1": src, "c2": dst})
    dead = member(backend, "m2", clock, dead_eng.state.instance_id)
    dead_eng.coordinate(dead)
    copy = plan(dead_eng.rules, dead_eng.inventories(), dead_eng.site_names).copies[0]

    class Killed(BaseException):
        pass

    leases: list[FakeLease | None] = []

    def die_after_create(new: Any, create: Any = dst.create) -> MemoryWriter:
        w = create(new)
        dead.record_upload("img-a", "c2", w.image_id)
        leases.extend(lk._lease for lk in dead._held.values())
        raise Killed  # kill -9: nothing after this runs (no abort, no release)

    dst.create = die_after_create  # type: ignore[method-assign]
    backend.no_release = True  # a killed process releases nothing in the service
    with pytest.raises(Killed):
        dead_eng.executor.run_copy(copy)
    dst.create = MemorySite.create.__get__(dst)  # type: ignore[method-assign]
    (half,) = [r for r in dst.list_images("img-a") if r.in_progress]
    assert PROP_UPLOAD in half.properties
    backend.no_release = False

    c = member(backend, "m1", clock)
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": dst})
    eng.coordinate(c)
    eng.recover(eng.inventories())
    assert [r.id for r in dst.list_images("img-a")] == [half.id]  # lock held: kept
    # the lock lease expired: lock and upload lease are gone together
    for lease in leases:
        assert lease is not None
        lease.expire()
    eng.forget("c2")
    eng.recover(eng.inventories())
    assert dst.list_images("img-a") == []
    # and the name converges
    eng.execute(plan(eng.rules, eng.inventories(), eng.site_names))
    assert [r.in_progress for r in dst.list_images("img-a")] == [False]
    c.stop()


def test_a_foreign_upload_is_kept_while_its_lease_lives_or_when_not_of_this_group(
    tmp_path: Path,
) -> None:
    """The upload lease, not the lock alone, decides (its key outlives a released lock only
    while the owner's lease runs)."""
    backend, clock = Backend(), FakeClock(1000.0)
    c = member(backend, "m1", clock)
    src, dst = MemorySite("c1"), MemorySite("c2")
    src.add("img-a", b"x" * 3000)
    marker = json.dumps(
        {"host": "h2", "instance": "other", "pid": 1, "started": 1, "expires": 4e9},
        separators=(",", ":"),
    )
    rec = dst.add("img-a", b"", props={PROP_STATE: STATE_UPLOADING, PROP_UPLOAD: marker})
    backend.client.kv[f"/imagesync/imagesync/uploads/c2/{rec.id}"] = b"{}"
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": dst})
    eng.coordinate(c)
    eng.recover(eng.inventories())
    # "other" is not known as a member of this group: the marker's own lease rules (6 h)
    del backend.client.kv[f"/imagesync/imagesync/uploads/c2/{rec.id}"]
    eng.forget("c2")
    eng.recover(eng.inventories())
    assert [r.id for r in dst.list_images("img-a")] == [rec.id]
    backend.client.kv["/imagesync/imagesync/instances/other"] = b"m2"
    backend.client.kv[f"/imagesync/imagesync/uploads/c2/{rec.id}"] = b"{}"
    eng.forget("c2")
    eng.recover(eng.inventories())
    assert [r.id for r in dst.list_images("img-a")] == [rec.id]
    del backend.client.kv[f"/imagesync/imagesync/uploads/c2/{rec.id}"]
    eng.forget("c2")
    eng.recover(eng.inventories())
    assert dst.list_images("img-a") == []
    c.stop()


def test_a_member_that_may_not_act_copies_nothing(tmp_path: Path) -> None:
    from imagesync.daemon.passes import PassWatch, run_one_pass
    from imagesync.metrics import Metrics

    backend, clock = Backend(), FakeClock(1000.0)
    c = member(backend, "m1", clock)
    src, dst = MemorySite("c1"), MemorySite("c2")
    src.add("img-a", b"x" * 3000)
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": dst})
    eng.coordinate(c)
    backend.down = True
    clock.now += 20
    import threading

    report = run_one_pass(
        lambda: eng, cancel=threading.Event(), watch=PassWatch(Metrics(), lambda: None)
    )
    assert report.copied == 0 and dst.list_images() == []
    assert report.error is not None and "not changing anything" in report.error
    # check still answers from what the pass recorded
    assert eng.state.cell("img-a", "c2") is not None
    backend.down = False
    report = run_one_pass(
        lambda: eng, cancel=threading.Event(), watch=PassWatch(Metrics(), lambda: None)
    )
    assert report.copied == 1
    c.stop()


def test_the_status_page_shows_the_members_their_shares_health_and_uploads(
    tmp_path: Path,
) -> None:
    import threading

    from imagesync.daemon.live import LiveStatus
    from imagesync.daemon.passes import PassWatch, run_one_pass
    from imagesync.daemon.statuspage import render
    from imagesync.metrics import Metrics

    backend, clock = Backend(), FakeClock(1000.0)
    c, other = member(backend, "m1", clock), member(backend, "m2", clock)
    src, dst = MemorySite("c1"), MemorySite("c2")
    for i in range(5):
        src.add(f"img-{i}", b"x" * 100)
    # another member's upload in flight, as its lease in the service says
    backend.client.kv["/imagesync/imagesync/uploads/c2/abc123"] = json.dumps(
        {"member": "m2", "name": "img-<b>", "started": 1}
    ).encode()
    eng = Engine(mem_config(tmp_path), sites={"c1": src, "c2": dst})
    eng.coordinate(c)
    watch = PassWatch(Metrics(), lambda: None, LiveStatus())
    report = run_one_pass(lambda: eng, cancel=threading.Event(), watch=watch)
    mine = c.drives(f"img-{i}" for i in range(5))
    assert report.copied == len(mine) and len(mine) in (2, 3)

    doc = json.loads(json.dumps(watch.live.document()))  # what /status.json serves
    coordination = doc["coordination"]
    assert coordination["member_id"] == "m1" and coordination["health"] == "ok"
    assert coordination["members"] == ["m1", "m2"]
    assert coordination["drives"] == {"m1": len(mine), "m2": 5 - len(mine)}
    assert coordination["uploads"] == [
        {"site": "c2", "image_id": "abc123", "member": "m2", "name": "img-<b>", "started": 1}
    ]
    page = render(doc)
    assert '<table id="members">' in page and 'data-member="m2"' in page
    assert f"{len(mine)} of 5 names" in page and f"{5 - len(mine)} of 5 names" in page
    assert '<table id="group-uploads">' in page and "img-&lt;b&gt;" in page
    assert "img-<b>" not in page  # escaped like everything from outside
    # a daemon alone shows no coordination section
    assert "Coordination" not in render({**doc, "coordination": None})
    c.stop()
    other.stop()


# --------------------------------------------------------------------------- config


def _cfg(tmp_path: Path, section: str) -> Path:
    (tmp_path / "s").mkdir(exist_ok=True)
    p = tmp_path / "imagesync.yaml"
    p.write_text(
        f"state_dir: {tmp_path / 'st'}\nstores:\n  s: {{type: directory, path: {tmp_path / 's'}}}\n"
        f"images:\n  - name: '*'\n    stores: [s]\n{section}"
    )
    return p


def test_coordination_config(tmp_path: Path) -> None:
    cfg = load_config(
        _cfg(tmp_path, "coordination:\n  url: etcd3+http://127.0.0.1:2379\n  lease_timeout: 5s\n")
    )
    assert cfg.coordination == CoordinationConfig(
        url="etcd3+http://127.0.0.1:2379", lease_timeout=5.0
    )
    assert load_config(_cfg(tmp_path, "")).coordination is None


def test_the_coordination_url_never_shows_its_credentials(tmp_path: Path) -> None:
    url = "redis://admin:s3cretpw@10.0.0.1:6379?password=otherpw&db=0"
    assert (
        CoordinationConfig(url=url).display_url
        == "redis://10.0.0.1:6379?password=%2A%2A%2A%2A%2A%2A%2A%2A&db=0"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(tmp_path, "coordination:\n  url: 'etcd2://u:s3cretpw@h:1'\n"))
    assert "s3cretpw" not in str(exc.value)
    c = Coordinator(CoordinationConfig(url="etcd3+http://u:s3cretpw@127.0.0.1:1"), "m")
    assert "s3cretpw" not in repr(c.status().as_dict())
    assert "s3cretpw" not in repr(c)  # a dataclass, but with no generated repr (cfg has the URL)


def test_a_lab_with_etcd_names_it_in_its_config_and_remembers_it(tmp_path: Path) -> None:
    from imagesync.lab.state import (
        CloudState,
        EtcdState,
        LabState,
        ServiceState,
        load_state,
        save_state,
        write_client_files,
    )

    state = LabState(
        directory=tmp_path,
        clouds=[
            CloudState(
                name="lab1",
                keystone=ServiceState(port=1),
                glance=ServiceState(port=2),
                admin_password="a" * 8,
                glance_password="g" * 8,
                password="p" * 8,
            )
        ],
        etcd=EtcdState(port=2379, peer_port=2380, pid=42, pgid=42),
    )
    save_state(state)
    assert load_state(tmp_path) == state
    write_client_files(state)
    cfg = load_config(state.config_file)
    assert cfg.coordination == CoordinationConfig(
        url="etcd3+http://127.0.0.1:2379", lease_timeout=5.0
    )
    assert state.info(0.0, "running").coordination_url == "etcd3+http://127.0.0.1:2379"
