"""Several daemons sharing the work through tooz (etcd is the reference backend).

When ``coordination:`` is configured, every daemon joins one tooz group with a stable member
id (host name + the instance id of its ``state_dir``); tooz's partitioned group keeps the
membership (its ring is only a second opinion on "am I still in the group"). Which member
drives each image name is :func:`assign`: rendezvous hashing with bounded loads over the
sorted live members and the sorted set of managed names, which every member computes alike
from the same config and listings, balanced to within one name. A pass handles only the
names its member drives. Partitioning spreads the load; it is the per-``(name, site)`` upload
locks, held in the coordination service, that guarantee one writer, and the upload leases
(one key per half-made upload, attached to its lock's etcd lease) that say who is making what
where. A dead member's half-made upload is removed by whoever next takes its lock, and only
once the upload's lease is gone (it dies with the lock, when the member stopped heartbeating).

tooz gives no fencing (measured on tooz 9.1 + etcd3gw against etcd 3.4): a member frozen past
its TTL loses its locks and, resumed, still believes it holds them. So:

* the heartbeat is ours (one thread calling ``coordinator.heartbeat()``), so that the time of
  the last *successful* refresh is known; a member whose last success is older than half the
  lease timeout, or that is no longer in the group (expelled), **may not act**
  (:func:`may_act`, pure, with an injected clock) until a refresh succeeds again and it has
  rejoined;
* before each side effect (create, publish, delete, retire) the executor asks :meth:`holds`,
  which reads the lock's key in etcd and compares it with the lock's own uuid;
* locks are taken with ``blocking=False`` (tooz on etcd3gw raises instead of returning False
  from a timed wait, and each attempt leaves a lease behind).

Without ``coordination:`` nothing here is used: local locks in ``state_dir`` and the upload
markers' long leases (``engine.marker``) stay as they were.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any, Protocol

import structlog

from imagesync.config.types import CoordinationConfig
from imagesync.errors import ConfigError, LockBusy

log = structlog.get_logger("imagesync.coordination")

#: tooz's partitioned group's ring (membership only: names are spread by :func:`assign`)
PARTITIONS = 128
#: the key under which save-on-shutdown and boot tests run: one member drives them
CLOUD_STEPS_KEY = "imagesync:cloud-steps"


class Health(enum.Enum):
    """Whether this member may change anything now, and if not, why."""

    OK = "ok"
    NOT_STARTED = "not started"
    STALE = "no successful call to the coordination service within half the lease timeout"
    EXPELLED = "not a member of the group (expelled after a pause): rejoining"
    STOPPED = "stopped"


def may_act(
    now: float, last_ok: float | None, lease_timeout: float, *, member: bool, started: bool = True
) -> Health:
    """PURE: may a member whose last successful call to the service was at ``last_ok`` (the
    same monotonic clock as ``now``) still act? Only within half the lease timeout: its locks
    and membership are then surely still alive (they last a whole lease timeout from the last
    refresh), with half a lease of margin for the step about to run."""
    if not started:
        return Health.NOT_STARTED
    if last_ok is None or now - last_ok >= lease_timeout / 2:
        return Health.STALE
    if not member:
        return Health.EXPELLED
    return Health.OK


def _score(member: str, key: str) -> int:
    """Rendezvous weight of ``member`` for ``key``: the same on every host and every Python
    (a digest, not ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(key: str, members: Iterable[str]) -> str | None:
    """PURE: the member that ranks highest for ``key`` (plain rendezvous hashing, no
    capacity): for a single key such as :data:`CLOUD_STEPS_KEY`."""
    return max(sorted(set(members)), key=lambda m: _score(m, key), default=None)


def assign(names: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """PURE: which member drives each name: **rendezvous hashing with bounded loads**.

    Every member computes it from the same inputs, the sorted live members and the set of
    managed names the pass saw (one shared config, the same sites listed), so they agree
    without talking. With ``n`` names and ``m`` members, ``n mod m`` members drive
    ``ceil(n/m)`` names and the others ``floor(n/m)``: balanced to within one name (tooz's
    hash ring left a member of three with 5 of 30 names and another with 14).

    The names are taken in the order of their own digest; each goes to the member that ranks
    it highest (:func:`_score`) among those with room left. Room: ``floor(n/m)``, plus one
    for the first ``n mod m`` members to reach it. A joining member takes the names that rank
    it first (about ``n/(m+1)``), and the capacities shrinking by a few names each push a few
    more along (measured in tests/unit/test_coordination.py: 30 names, 3 → 4 members, at most
    half the names move). When two members see different sets (a name appeared or a site was
    unreachable for one of them) or different members (a join not yet seen), they may
    disagree for a pass: the ``(name, site)`` locks in the service and the ownership check
    before every side effect are what keep one writer, not this function.
    """
    ms = sorted(set(members))
    if not ms:
        return {}
    ns = sorted(set(names), key=lambda n: (_score("", n), n))
    floor, extra = divmod(len(ns), len(ms))
    load = dict.fromkeys(ms, 0)
    at_ceiling = 0
    out: dict[str, str] = {}
    for name in ns:
        for m in sorted(ms, key=lambda m: (-_score(m, name), m)):
            room = floor + 1 if at_ceiling < extra else floor
            if load[m] < room:
                load[m] += 1
                at_ceiling += load[m] == floor + 1
                out[name] = m
                break
    return out


def import_tooz() -> None:
    """Import tooz now, from the calling thread: call it from the main thread before any
    other thread may. tooz imports futurist, which imports eventlet when installed, and
    eventlet imported from a worker thread leaves that thread impossible to join: the daemon
    (whose passes run in a pool thread) then hung at exit after ``daemon.stopped``."""
    with warnings.catch_warnings():  # futurist warns about eventlet
        warnings.simplefilter("ignore")
        import tooz.coordination  # noqa: F401


def default_member_id(instance_id: str) -> str:
    """host + instance: stable across restarts (the instance id lives in ``state_dir``)."""
    return f"{socket.gethostname()[:60]}:{instance_id[:8]}"


def lease_of(cfg: CoordinationConfig) -> float:
    """The TTL that holds: the URL's own lock/membership timeouts where it sets them (the
    shorter), else ``lease_timeout``. The heartbeat and may_act follow it."""
    from urllib.parse import parse_qsl, urlsplit

    query = dict(parse_qsl(urlsplit(cfg.url).query))
    given = [float(query[k]) for k in ("lock_timeout", "membership_timeout") if k in query]
    return min(given) if given else cfg.lease_timeout


def tooz_url(cfg: CoordinationConfig) -> str:
    """The URL tooz gets: the lease timeout as the driver's lock and membership TTLs, unless
    the URL sets them itself."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(cfg.url)
    query = dict(parse_qsl(parts.query))
    ttl = str(max(1, round(cfg.lease_timeout)))
    query.setdefault("lock_timeout", ttl)
    query.setdefault("membership_timeout", ttl)
    # the HTTP request timeout too: a frozen etcd must not block a call for longer than a lease
    query.setdefault("timeout", ttl)
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class CoordinationStatus:
    """What ``status``, the status page and the metrics show."""

    url: str  # without credentials
    member_id: str
    health: Health
    members: list[str] = field(default_factory=list)
    last_ok_age: float | None = None
    calls: int = 0  # calls to the service since start
    held_locks: list[str] = field(default_factory=list)
    #: how many names each member drives (the last pass's assignment)
    drives: dict[str, int] = field(default_factory=dict)
    #: every upload lease alive in the group (who is making what where)
    uploads: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "member_id": self.member_id,
            "health": self.health.name.lower(),
            "health_detail": self.health.value,
            "members": self.members,
            "last_ok_seconds_ago": None if self.last_ok_age is None else round(self.last_ok_age, 3),
            "calls": self.calls,
            "held_locks": self.held_locks,
            "drives": self.drives,
            "uploads": self.uploads,
        }


@dataclass(eq=False, repr=False)
class Coordinator:
    """One member's connection to the coordination service (see the module docstring).

    Its state is declared here, the constructor's arguments first. A service object, not a
    value: compared by identity, and no generated repr (``cfg`` holds the service's URL,
    credentials and all)."""

    cfg: CoordinationConfig
    member_id: str
    _: KW_ONLY
    clock: Callable[[], float] = time.monotonic
    #: a tooz coordinator (tests pass their own); None: :meth:`start` makes one from ``cfg``
    driver: InitVar[Any] = None
    #: the state_dir's instance id, which upload markers name (engine.marker)
    instance_id: str | None = None
    calls: int = field(default=0, init=False)  # calls to the service since start
    group: bytes = field(init=False)  # the tooz group, from ``cfg``
    lease: float = field(init=False)  # the TTL that holds (:func:`lease_of`)
    _driver: Any = field(init=False)
    _partitioner: Any = field(default=None, init=False)
    _joined: bool = field(default=False, init=False)
    _started: bool = field(default=False, init=False)
    _last_ok: float | None = field(default=None, init=False)
    _members: list[str] = field(default_factory=list, init=False)
    #: how many names each member drives, as the last :meth:`drives` computed
    _shares: dict[str, int] = field(default_factory=dict, init=False)
    _held: dict[tuple[str, str], Any] = field(default_factory=dict, init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _heart: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self, driver: Any) -> None:
        self._driver = driver
        self.group = self.cfg.group.encode()
        self.lease = lease_of(self.cfg)

    # -- life --------------------------------------------------------------------------------
    def start(self, *, join: bool = True) -> None:
        """Connect (and, for a daemon, join the partitioned group). Raises ConfigError when
        the service cannot be reached at all: a daemon must not start alone by mistake."""
        import_tooz()  # a no-op when the daemon's main thread did it first
        from tooz import coordination as tc

        if self._driver is None:
            try:
                self._driver = tc.get_coordinator(tooz_url(self.cfg), self.member_id.encode())
            except Exception as exc:  # tooz raises its own, or ValueError for a bad URL
                raise ConfigError(
                    f"coordination.url {self.cfg.display_url}: {type(exc).__name__}; check the "
                    "URL's scheme and that its tooz driver is installed"
                ) from None
        try:
            self._driver.start(start_heart=False)  # our heartbeat: it records successes
            self._call_ok()
            self._register_instance()
            if join:
                self._partitioner = self._driver.join_partitioned_group(
                    self.group, partitions=PARTITIONS
                )
                self._joined = True
                self._call_ok()
                self.refresh()
        except tc.ToozError as exc:
            raise ConfigError(
                f"coordination.url {self.cfg.display_url}: cannot reach the coordination "
                f"service ({type(exc).__name__}); start it or fix the URL"
            ) from None
        self._started = True
        self._heart = threading.Thread(target=self._beat, name="coordination-heart", daemon=True)
        self._heart.start()
        (log.info if join else log.debug)(
            "coordination.started",
            url=self.cfg.display_url,
            member=self.member_id,
            lease=self.lease,
        )

    def stop(self) -> None:
        """Leave the group (SIGTERM, shutdown): our names move to the others at once."""
        self._stop.set()
        if self._driver is None or not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            if self._partitioner is not None:
                self._driver.leave_partitioned_group(self._partitioner)
        with contextlib.suppress(Exception):
            self._driver.stop()
        (log.info if self._joined else log.debug)("coordination.left", member=self.member_id)

    def _call_ok(self) -> None:
        with self._mutex:
            self.calls += 1
            self._last_ok = self.clock()

    def _beat(self) -> None:
        """Refresh membership and lock leases every quarter lease; record each success."""
        period = max(0.2, self.lease / 4)
        while not self._stop.wait(period):
            try:
                self._driver.heartbeat()
                self._call_ok()
            except Exception as exc:  # the service away: may_act turns STALE by itself
                log.debug("coordination.heartbeat_failed", error=type(exc).__name__)

    # -- each pass ---------------------------------------------------------------------------
    def refresh(self) -> Health:
        """Once a pass: apply membership changes to the ring, rejoin if expelled. Never
        raises: an unreachable service shows as STALE health."""
        try:
            self._driver.run_watchers()
            self._call_ok()
            members = sorted(
                m.decode() for m in self._driver.get_members(self.group).get(timeout=10)
            )
            self._call_ok()
            if self._joined and self.member_id not in members:
                # expelled (frozen past its TTL, or the service lost it): tooz never rejoins
                # by itself; rejoining shows as a join in the next run_watchers
                log.warning("coordination.rejoining", member=self.member_id)
                with contextlib.suppress(Exception):
                    self._driver.join_group(self.group, {"weight": 1}).get(timeout=10)
                self._driver.run_watchers()
                members = sorted(
                    m.decode() for m in self._driver.get_members(self.group).get(timeout=10)
                )
                self._call_ok()
            self._members = members
        except Exception as exc:
            log.warning(
                "coordination.unreachable", url=self.cfg.display_url, error=type(exc).__name__
            )
        return self.health()

    def health(self) -> Health:
        in_ring = True
        if self._joined and self._partitioner is not None:
            in_ring = self.member_id.encode() in self._partitioner.ring.nodes
        if self._stop.is_set():
            return Health.STOPPED
        return may_act(
            self.clock(),
            self._last_ok,
            self.lease,
            member=in_ring and (not self._joined or self.member_id in self._members),
            started=self._started,
        )

    def can_act(self) -> bool:
        return self.health() is Health.OK

    def owns(self, key: str) -> bool:
        """Does this member drive ``key`` (one key alone, such as :data:`CLOUD_STEPS_KEY`)
        now? No backend call: plain rendezvous over the members the last refresh saw."""
        if not self.can_act():
            return False
        if not self._joined:
            return True
        return owner_of(key, self._members) == self.member_id

    def drives(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` (every managed name the pass saw) this member drives now:
        :func:`assign` over the members the last refresh saw. No backend call. The whole
        assignment is kept for ``status`` (who drives how many), even when this member may
        not act (it then drives none)."""
        names = list(names)
        if not self._joined:
            return set(names) if self.can_act() else set()
        assignment = assign(names, self._members)
        with self._mutex:
            self._shares = {m: 0 for m in self._members}
            for m in assignment.values():
                self._shares[m] += 1
        if not self.can_act():
            return set()
        return {n for n, m in assignment.items() if m == self.member_id}

    # -- locks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, site: str) -> Iterator[None]:
        """The ``(name, site)`` upload lock in the service; LockBusy when another member holds
        it or this one may not act now."""
        if not self.can_act():
            raise LockBusy(f"{name} on {site}: not acting ({self.health().value})")
        lk = self._driver.get_lock(_lock_name(self.cfg.group, name, site))
        try:
            got = lk.acquire(blocking=False)
            self._call_ok()
        except Exception as exc:
            raise LockBusy(
                f"{name} on {site}: coordination service unreachable ({type(exc).__name__})"
            ) from None
        if not got:
            raise LockBusy(f"{name} on {site}: another member is working on it")
        with self._mutex:
            self._held[(name, site)] = lk
        try:
            yield
        finally:
            with self._mutex:
                self._held.pop((name, site), None)
            try:
                lk.release()
                self._call_ok()
            except Exception:  # it expires by itself after the lease timeout
                log.warning("coordination.release_failed", image=name, site=site)

    def holds(self, name: str, site: str) -> bool:
        """Does this member still hold the ``(name, site)`` lock, as the service says now?
        Called before every side effect: tooz's own ``acquired`` stays True after a loss."""
        with self._mutex:
            lk = self._held.get((name, site))
        if lk is None or self._stop.is_set():
            return False
        client = getattr(self._driver, "client", None)
        if client is None:  # a backend without a readable key: trust the fresh heartbeat
            return self.can_act()
        try:
            values = client.get(lk._key.decode())
            self._call_ok()
        except Exception:
            return False
        mine = base64.b64decode(lk._uuid)
        if not values or values[0] != mine:
            log.warning("coordination.lock_lost", image=name, site=site, member=self.member_id)
            return False
        return True

    # -- upload leases -----------------------------------------------------------------------
    def _instance_key(self, instance: str) -> str:
        return f"/imagesync/{self.cfg.group}/instances/{instance}"

    def _register_instance(self) -> None:
        """Say, for good, that uploads marked with this instance id are made under this
        group's locks and leases: only those may be removed as soon as their lease is gone.
        Another instance's (another group's, or one running without coordination) keep the
        marker's own long lease (engine.marker)."""
        client = getattr(self._driver, "client", None)
        if client is None or self.instance_id is None:
            return
        client.put(self._instance_key(self.instance_id), self.member_id)
        self._call_ok()

    def knows_instance(self, instance: str) -> bool:
        """Is ``instance`` a member (now or once) of this group? False when it cannot tell."""
        client = getattr(self._driver, "client", None)
        if client is None:
            return False
        try:
            values = client.get(self._instance_key(instance))
            self._call_ok()
        except Exception:
            return False
        return bool(values)

    def _upload_key(self, site: str, image_id: str) -> str:
        return f"/imagesync/{self.cfg.group}/uploads/{site}/{image_id}"

    def record_upload(self, name: str, site: str, image_id: str) -> None:
        """Say who makes ``image_id`` on ``site``: a key attached to the lock's lease, so it
        disappears exactly when the lock does (the member stopped heartbeating)."""
        with self._mutex:
            lk = self._held.get((name, site))
        client = getattr(self._driver, "client", None)
        if lk is None or client is None:
            return
        value = json.dumps({"member": self.member_id, "name": name, "started": int(time.time())})
        try:
            client.put(self._upload_key(site, image_id), value, lease=lk._lease)
            self._call_ok()
        except Exception as exc:  # the lock's own lease rule still holds for cleanup
            log.warning("coordination.lease_not_recorded", site=site, error=type(exc).__name__)

    def drop_upload(self, site: str, image_id: str) -> None:
        client = getattr(self._driver, "client", None)
        if client is None:
            return
        try:
            client.delete(self._upload_key(site, image_id))
            self._call_ok()
        except Exception:
            pass  # attached to the lock's lease: it goes with it

    def upload_alive(self, site: str, image_id: str) -> bool | None:
        """Is someone's lease on this upload still alive? None: cannot tell (not etcd, or the
        service away); the caller then keeps the upload."""
        client = getattr(self._driver, "client", None)
        if client is None:
            return None
        try:
            values = client.get(self._upload_key(site, image_id))
            self._call_ok()
        except Exception:
            return None
        return bool(values)

    def uploads(self) -> list[dict[str, Any]]:
        """Every upload lease alive now (who is making what where), for ``status``."""
        client = getattr(self._driver, "client", None)
        if client is None:
            return []
        prefix = f"/imagesync/{self.cfg.group}/uploads/"
        out: list[dict[str, Any]] = []
        try:
            for value, meta in client.get_prefix(prefix):
                key = meta["key"]
                key = key.decode() if isinstance(key, bytes) else str(key)
                site, _, image_id = key[len(prefix) :].partition("/")
                with contextlib.suppress(ValueError):
                    out.append({"site": site, "image_id": image_id, **json.loads(value)})
            self._call_ok()
        except Exception:
            return out
        return out

    # -- what it looks like ------------------------------------------------------------------
    def status(self, *, uploads: list[dict[str, Any]] | None = None) -> CoordinationStatus:
        """This member's view; ``uploads`` as :meth:`uploads` read them (a call to the
        service, left to the caller)."""
        with self._mutex:
            last = self._last_ok
            held = [f"{n}@{s}" for n, s in sorted(self._held)]
            shares = dict(self._shares)
        return CoordinationStatus(
            url=self.cfg.display_url,
            member_id=self.member_id,
            health=self.health(),
            members=list(self._members),
            last_ok_age=None if last is None else self.clock() - last,
            calls=self.calls,
            held_locks=held,
            drives=shares,
            uploads=list(uploads or []),
        )


def describe_group(cfg: CoordinationConfig, names: list[str]) -> dict[str, Any]:
    """For ``imagesync status`` (any host, not a member): the live members, which member
    drives each of ``names`` (the ring every member computes), the uploads in flight and
    whether the service answers. Never raises."""
    import os

    out: dict[str, Any] = {"url": cfg.display_url, "group": cfg.group}
    viewer = Coordinator(cfg, f"status-{socket.gethostname()[:40]}-{os.getpid()}")
    try:
        viewer.start(join=False)
        members = sorted(m.decode() for m in viewer._driver.get_members(viewer.group).get(10))
        out["health"] = "ok"
    except Exception as exc:
        out["health"] = f"unreachable ({type(exc).__name__})"
        members = []
    out["members"] = members
    owners = assign(names, members)
    out["owners"] = {n: owners.get(n) for n in names}
    out["uploads"] = viewer.uploads() if members else []
    viewer.stop()
    return out


class _Lockable(Protocol):
    def lock(self, name: str, site: str) -> contextlib.AbstractContextManager[None]: ...


@contextlib.contextmanager
def locked(
    state: _Lockable, coordinator: Coordinator | None, name: str, site: str
) -> Iterator[None]:
    """The ``(name, site)`` lock: the local one (this host's processes), then, coordinated,
    the one in the service (every member's)."""
    with state.lock(name, site):
        if coordinator is None:
            yield
        else:
            with coordinator.lock(name, site):
                yield


def _lock_name(group: str, name: str, site: str) -> bytes:
    # a name may hold any character: keep the key unambiguous and printable
    return f"/{group}/{site}/".encode() + base64.urlsafe_b64encode(name.encode("utf8"))
