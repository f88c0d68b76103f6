"""A bounded, seeded fault suite against the lab: new versions while everything breaks.

Each round a person uploads a new version of one of a few names to a random cloud (and
sometimes a second one mid-round), while a real ``imagesync daemon``, ``imagesync push NAME``
and ``imagesync sync`` processes run at once on one state directory, and the suite:

- ``kill -9``s random processes at random times (half of them one that holds a lease: a copy
  in flight), and arms one *boundary trap* per round: ``lease`` kills the process the moment
  its lease row appears in the state database; ``publish`` holds the state database's write
  lock once data flows (so the process blocks dropping its lease right after ``publish()``),
  kills it as soon as the target shows the image published, and lets go;
- injects faults through ``tests/faultproxy.py`` in front of every cloud's Glance (connection
  cuts in uploads and downloads, answers lost after Glance acted, 5xx bursts, slow reads and
  writes, flipped bytes up and down) and fills the directory store (a small tmpfs of its own)
  to the last few bytes;
- then stops the faults and every process, restarts (a fresh ``imagesync sync``: recovery) and
  checks the invariants of ``tests/faults_checks.py`` (verify, nothing half-made, nothing newest
  deleted, convergence).

The schedule of every round (names, clouds, sizes, faults, kill times, trap modes) comes from
``--seed`` alone (round ``r`` uses ``Random(f"{seed}:{r}")``): a failing round is replayed by
the same seed. Which instruction of imagesync a kill lands on depends on timing and cannot be
replayed. Standalone::

    python -m tests.faults --rounds 200 --seed 7 --lab /tmp/testlab

(``IMAGESYNC_FAULT_SEED`` and ``IMAGESYNC_FAULT_ROUNDS`` set the defaults; without ``--lab`` or
``IMAGESYNC_TEST_LAB_DIR`` a lab is started in a temporary directory.) Mounting the store's
tmpfs needs root; without it the store is a plain directory and no full disk is injected
(the counts say so). It exits 1 when an invariant broke.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from imagesync.lab import LabInfo, glance_client
from tests.faultproxy import FaultPlan, FaultProxy
from tests.faults_checks import (
    STORE,
    Eyes,
    Guard,
    Verifier,
    converged,
    half_made,
    leases,
    patiently,
    present,
    retained,
    zombies,
)
from tests.faults_procs import Actors, Store, StoreWatch, Trap

SEED_ENV = "IMAGESYNC_FAULT_SEED"
ROUNDS_ENV = "IMAGESYNC_FAULT_ROUNDS"
MB = 1 << 20
KEEP = 2  # the rule's retention: the newest two versions per site
FAULT_KINDS = (
    "cut_upload",
    "cut_download",
    "lost_response",
    "http_5xx",
    "slow_download",
    "slow_upload",
    "flip_upload",
    "flip_download",
    "full_disk",
)
TRAPS = ("lease", "publish")


@dataclass
class Tally:
    """What a run did and found."""

    seed: int = 0
    rounds: int = 0
    versions: int = 0
    kills: Counter[str] = field(default_factory=Counter)  # random, lease, publish, stop
    traps_missed: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # armed, by kind
    fault_hits: Counter[str] = field(default_factory=Counter)  # what the proxies did
    started: Counter[str] = field(default_factory=Counter)  # processes, by kind
    terms: int = 0  # daemons stopped by SIGTERM at a round's end
    verified: int = 0
    downloads: int = 0
    extra_syncs: int = 0  # rounds that needed a second clean sync to converge
    status_checks: int = 0  # rounds whose convergence imagesync status --json confirmed
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    full_disk: bool = True  # could the store be filled (its tmpfs mounted)?
    suite_error: str | None = None  # the suite itself failed (not imagesync): the run stopped
    seconds: float = 0.0

    @property
    def fault_kills(self) -> int:
        """Kills during the faults (random and at the boundary), not at a round's end."""
        return self.kills["random"] + self.kills["lease"] + self.kills["publish"]

    @property
    def boundary_kills(self) -> int:
        return self.kills["lease"] + self.kills["publish"]

    def text(self) -> str:
        def counts(c: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        lines = [
            f"fault suite: seed {self.seed}, {self.rounds} rounds, {self.seconds:.0f} s",
            f"  versions uploaded: {self.versions}",
            f"  kills -9 during faults: {self.fault_kills} (random {self.kills['random']}, at "
            f"the boundary {self.boundary_kills}: on a new lease {self.kills['lease']}, "
            f"published but still leased {self.kills['publish']}; traps missed: "
            f"{counts(self.traps_missed)}); at a round's end: {self.kills['stop']} kills, "
            f"{self.terms} SIGTERMs",
            f"  processes started: {counts(self.started)}",
            f"  faults armed: {counts(self.faults)}",
            f"  what the faults did: {counts(self.fault_hits)}",
            f"  visible images verified: {self.verified} ({self.downloads} read and hashed)",
            f"  converged after every round (clean sync, then every site holds the newest; "
            f"status --json agreeing: {self.status_checks} rounds); rounds needing a second "
            f"clean sync: {self.extra_syncs}",
            *(f"  note: {n}" for n in self.notes),
            *([f"  THE SUITE FAILED: {self.suite_error}"] if self.suite_error else []),
            f"  invariant violations: {len(self.violations)}",
            *(f"    {v}" for v in self.violations),
        ]
        return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    rounds: int
    seed: int
    window: float = 10.0  # seconds of faults and kills per round
    random_kills: int = 2  # per round
    names: int = 3
    min_size: int = 1 * MB
    max_size: int = 4 * MB
    faults_per_round: int = 2
    status_every: int = 4  # rounds: imagesync status --json confirms convergence (and last)
    minutes: float | None = None  # stop starting rounds after this long


class FaultRun:
    """One run of the suite over a lab; ``run()`` returns the tally."""

    def __init__(self, lab: LabInfo, workdir: Path, opts: Options, out: Callable[[str], None]):
        self.lab = lab
        self.work = workdir
        self.opts = opts
        self.say = out
        self.tally = Tally(seed=opts.seed)
        tag = hashlib.sha256(f"{opts.seed}:{time.time_ns()}".encode()).hexdigest()[:6]
        self.names = [f"fz-{tag}-{chr(ord('a') + i)}" for i in range(opts.names)]
        self.pattern = f"fz-{tag}-*"
        self.clouds = list(lab.names)
        self.proxies: dict[str, FaultProxy] = {}
        self.store = Store(workdir / "store")
        if not self.store.mounted:
            self.tally.full_disk = False
            self.tally.notes.append(f"full disk not injected: {self.store.why_not}")
        self.state_db = workdir / "state" / "imagesync.sqlite"
        self.eyes = Eyes(lab, self.store.root, self.names)
        self.guard = Guard()
        self.verifier = Verifier(self.eyes)
        self.actors = Actors(workdir / "imagesync.yaml", workdir / "logs")
        self.reported_deletes: set[str] = set()
        self.zombies: set[str] = set()  # images Glance left half-deleted (faults_checks.zombies)
        self.source = self.clouds[0]  # where the latest version was uploaded
        self.order: dict[str, list[str]] = {}  # name -> sha512 of its versions, oldest first
        self.timing = ""  # of the last round's checks
        rng = random.Random(f"{opts.seed}:kinds")
        kinds = [k for k in FAULT_KINDS if k != "full_disk" or self.store.mounted]
        cycle: list[str] = []
        while len(cycle) < opts.rounds * opts.faults_per_round:
            batch = list(kinds)
            rng.shuffle(batch)
            cycle.extend(batch)
        self.fault_cycle = cycle

    # -- set-up ---------------------------------------------------------------------------
    def _configure(self) -> None:
        clouds: dict[str, Any] = {}
        for name in self.clouds:
            c = self.lab.cloud(name)
            port = urlparse(c.glance_url).port
            assert port is not None
            self.proxies[name] = FaultProxy(port)
            clouds[name] = {
                "auth": c.password_auth(),
                "region_name": c.region,
                "endpoint_override": self.proxies[name].url,
                "timeout": "10s",
                "max_transfers": 2,
            }
        doc = {
            "state_dir": str(self.work / "state"),
            "poll_interval": "2s",
            "max_transfers": 4,
            "transfer_retries": 1,
            "clouds": clouds,
            "stores": {STORE: {"type": "directory", "path": str(self.store.root)}},
            "images": [
                {
                    "name": self.pattern,
                    "clouds": "all",
                    "store": STORE,
                    "keep": KEEP,
                    "retire": "delete",
                }
            ],
        }
        (self.work / "imagesync.yaml").write_text(yaml.safe_dump(doc))

    def close(self) -> None:
        for p in self.actors.alive():
            self.actors.kill(p)
        for proxy in self.proxies.values():
            proxy.close()
        self.store.close()

    # -- a round --------------------------------------------------------------------------
    def _upload(self, rng: random.Random, name: str) -> str:
        cloud = rng.choice(self.clouds)
        self.source = cloud
        data = rng.randbytes(rng.randint(self.opts.min_size, self.opts.max_size))
        sha = hashlib.sha512(data).hexdigest()
        self.verifier.known.add(sha)
        image_id = self._person_uploads(cloud, name, data)
        self.guard.new_version(name, sha, cloud, image_id)
        self.order.setdefault(name, []).append(sha)
        self.tally.versions += 1
        return f"{name}@{cloud} {len(data) // 1024} KiB"

    def _person_uploads(self, cloud: str, name: str, data: bytes) -> str:
        """Upload as a person would (the lab's client, straight to Glance); a try the lab's
        Glance failed (a 500: its sqlite locked under load) is deleted and made again."""
        gc = glance_client(self.lab, cloud)
        for attempt in range(5):
            img = patiently(
                lambda: gc.images.create(name=name, disk_format="raw", container_format="bare")
            )
            try:
                gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
                return str(img["id"])
            except Exception as exc:
                self.tally.notes.append(f"a person's upload to {cloud} failed, again: {exc}")
                with contextlib.suppress(Exception):
                    patiently(functools.partial(gc.images.delete, img["id"]))
                time.sleep(attempt + 1)
        raise RuntimeError(f"the lab's {cloud} refused five uploads in a row")

    def _arm(self, rng: random.Random, kind: str) -> str:
        self.tally.faults[kind] += 1
        if kind == "full_disk":
            leave = rng.choice([0, 64 * 1024, MB, 3 * MB])
            self.store.fill(leave)
            return f"full_disk(free {leave // 1024} KiB)"
        # Aim where the traffic is: downloads come from the new version's cloud, uploads
        # (create, data, publish) go to the others, every process lists every cloud.
        targets = [c for c in self.clouds if c != self.source]
        if kind in ("cut_download", "slow_download", "flip_download"):
            cloud = self.source
        elif kind == "http_5xx":
            cloud = rng.choice(self.clouds)
        else:
            cloud = rng.choice(targets)
        plan = self.proxies[cloud].plan
        if kind == "cut_upload":
            plan.cut_upload_after, plan.cut_times = rng.randint(0, 2 * MB), rng.randint(1, 3)
        elif kind == "cut_download":
            plan.cut_download_after = rng.randint(0, 2 * MB)
            plan.cut_download_times = rng.randint(1, 3)
        elif kind == "lost_response":
            plan.lose_methods = rng.choice([("PATCH",), ("POST",), ("PUT",), ()])
            plan.lose_responses = rng.randint(1, 3)
        elif kind == "http_5xx":
            plan.fail_status = rng.choice([500, 502, 503, 504])
            methods: list[tuple[str, ...]] = [(), ("GET",)]
            if cloud != self.source:
                methods += [("POST",), ("PUT",), ("PATCH",)]
            plan.fail_methods = rng.choice(methods)
            plan.fail_requests = rng.randint(2, 12)
        elif kind == "slow_download":
            plan.download_rate = rng.choice([0.5, 1.0, 2.0]) * MB
        elif kind == "slow_upload":
            plan.throttle_upload = rng.choice([0.02, 0.05])
        elif kind == "flip_upload":
            plan.flip_upload_at = rng.randint(0, self.opts.min_size - 1)
        elif kind == "flip_download":
            plan.flip_download_at = rng.randint(0, self.opts.min_size - 1)
        return f"{kind}@{cloud}"

    def _disarm(self) -> None:
        """Every fault off; what struck counted."""
        hits = {
            "flips": "bytes flipped",
            "cuts": "connections cut",
            "failed": "requests answered 5xx",
            "lost": "answers lost",
            "slowed": "transfers slowed",
        }
        for proxy in self.proxies.values():
            for what, label in hits.items():
                self.tally.fault_hits[label] += getattr(proxy.plan, what)
            proxy.plan = FaultPlan()
        if self.store.filled:
            self.tally.fault_hits["store full (ENOSPC seen)"] += self._enospc_seen()
        self.store.empty()

    def _enospc_seen(self) -> int:
        """Did imagesync run into the full store this round (its logs say so)?"""
        needle = "the store is full"
        folder = self.actors.round_dir()
        found = 0
        for f in folder.iterdir():
            with contextlib.suppress(OSError):
                found += needle in f.read_text(errors="replace")
        for p in self.actors.procs:
            if p.daemon is not None:
                found += any(needle in json.dumps(x) for x in list(p.daemon.lines))
        return min(found, 1)

    def _schedule(self, rng: random.Random, r: int) -> list[tuple[float, str, str]]:
        """The round's events: the faults armed from the start (the copies begin within a
        few seconds), push/sync processes, kills (``leased``: of a process with a copy in
        flight, as soon as there is one), sometimes a second new version."""
        w = self.opts.window
        events: list[tuple[float, str, str]] = []
        k = self.opts.faults_per_round
        for kind in self.fault_cycle[r * k : (r + 1) * k]:
            events.append((0.0, "fault", kind))
        events.append((0.0, "spawn", rng.choice(["push", "push", "sync"])))
        if rng.random() < 0.5:
            events.append((rng.uniform(0, w / 2), "spawn", rng.choice(["push", "sync"])))
        for _ in range(self.opts.random_kills):
            # later in the window: the processes need seconds to start and list (more under
            # load), and the faults should meet some copies before the kills do
            events.append((rng.uniform(w * 0.3, w * 0.8), "kill", rng.choice(["any", "leased"])))
        if rng.random() < 0.5:
            events.append((rng.uniform(w / 4, w / 2), "upload", ""))
        return sorted(events)

    def _kill_one(self, rng: random.Random, how: str, late: bool) -> str | None:
        """Kill a random live process (``leased``: one holding a lease; any once ``late``);
        None when there is none to kill now."""
        alive = [p for p in self.actors.alive() if p.pid not in self.actors.reserved]
        if not alive:
            return None
        pids = {pid for _, _, _, pid in leases(self.state_db)}
        held = [p for p in alive if p.pid in pids]
        if how == "leased" and not held and not late:
            return None
        victim = rng.choice(held if how == "leased" and held else alive)
        if self.actors.kill(victim):
            self.tally.kills["random"] += 1
            return victim.kind + ("*" if victim in held else "")  # *: it had a copy in flight
        return None

    def round(self, r: int) -> None:
        t_round = time.monotonic()
        self.actors.round = r
        rng = random.Random(f"{self.opts.seed}:{r}")
        names = list(self.names)
        rng.shuffle(names)
        self.actors.start_daemon()  # first: it takes seconds to start, the upload one
        self.tally.started["daemon"] += 1
        log = [self._upload(rng, names[0])]
        deadline = time.monotonic() + self.opts.window
        trap_mode = TRAPS[(r + self.opts.seed) % len(TRAPS)]
        trap = Trap(trap_mode, self.state_db, self.eyes, self.actors, deadline, set(self.clouds))
        problems: list[str] = []
        watch = StoreWatch(self.eyes, self.guard, problems)
        watch.start()
        trap.start()
        kills = self._window(rng, r, names, deadline, log)
        trap.join()
        if trap.hit:
            self.tally.kills[trap_mode] += 1
            kills.append(f"trap:{trap.detail}")
        else:
            self.tally.traps_missed[trap_mode] += 1
            kills.append(f"trap {trap_mode} missed: {trap.detail}")
        # the faults stop; every process stops (the daemon politely half the time)
        self._disarm()
        for p in self.actors.alive():
            if p.kind == "daemon" and rng.random() < 0.5:
                self.actors.terminate_daemon(p)
                self.tally.terms += 1
            elif self.actors.kill(p):
                self.tally.kills["stop"] += 1
        self.actors.reap_finished()
        watch.stop.set()
        watch.join()
        t_check = time.monotonic()
        problems.extend(self._restart_and_check(r))
        t_end = time.monotonic()
        self.tally.rounds += 1
        self.tally.violations.extend(f"round {r}: {problem}" for problem in problems)
        self.say(
            f"round {r:3d} ({t_check - t_round:4.1f}+{t_end - t_check:4.1f}s): {'; '.join(log)}; "
            f"kills: {', '.join(kills) or '-'}; {self.timing}; "
            + ("ok" if not problems else f"{len(problems)} VIOLATIONS: {problems[:3]}")
        )

    def _window(
        self, rng: random.Random, r: int, names: list[str], deadline: float, log: list[str]
    ) -> list[str]:
        """The round's faults, spawns, kills and a second upload, as scheduled; the daemon
        restarted a moment after each kill. Returns what was killed."""
        events = self._schedule(rng, r)
        t0 = time.monotonic()
        kills: list[str] = []
        daemon_back: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            while events and events[0][0] <= now:
                _, what, arg = events.pop(0)
                if what == "fault":
                    log.append(self._arm(rng, arg))
                elif what == "spawn":
                    self._spawn(arg, names[0])
                elif what == "kill":
                    late = now > self.opts.window * 0.9
                    done = self._kill_one(rng, arg, late)
                    if done is None:  # nobody to kill just now: try again shortly
                        events.append((now + 0.2, what, arg))
                        events.sort()
                    else:
                        kills.append(done)
                elif what == "upload":
                    log.append(self._upload(rng, names[1]))
            alive = self.actors.alive()
            if not any(p.kind == "daemon" for p in alive) and daemon_back is None:
                daemon_back = now + rng.uniform(0.2, 1.5)
            if daemon_back is not None and now >= daemon_back:
                self.actors.start_daemon()
                self.tally.started["daemon"] += 1
                daemon_back = None
            self.actors.reap_finished()
            if not any(p.kind != "daemon" for p in alive) and rng.random() < 0.05:
                self._spawn(rng.choice(["push", "sync"]), rng.choice(names))
            time.sleep(0.1)
        return kills

    def _spawn(self, kind: str, name: str) -> None:
        if kind == "push":
            self.actors.start("push", name)
        else:
            self.actors.start("sync")
        self.tally.started[kind] += 1

    # -- after a round ----------------------------------------------------------------------
    def _restart_and_check(self, r: int) -> list[str]:
        """Restart (a clean sync: recovery), then every invariant."""
        problems: list[str] = []
        t0 = time.monotonic()
        code, _ = self.actors.run("sync", "--json")
        t1 = time.monotonic()
        survey = self.eyes.survey()
        bad = present(survey, self.guard.newest)
        if bad:
            self.tally.extra_syncs += 1
            code, _ = self.actors.run("sync", "--json")
            survey = self.eyes.survey()
            bad = present(survey, self.guard.newest)
        if bad or r % self.opts.status_every == 0 or r == self.opts.rounds - 1:
            self.tally.status_checks += 1
            bad += converged(self._status(), self.guard.newest)
        problems.extend(f"not converged: {b}" for b in bad)
        if bad and code != 0:
            problems.append(f"the clean sync exited {code}")
        t2 = time.monotonic()
        problems.extend(half_made(survey, self.state_db))
        for z in zombies(survey):
            self.zombies.add(f"{z.site}:{z.id}")
        problems.extend(self.verifier.verify(survey))
        problems.extend(self.guard.check(survey))
        problems.extend(self._glance_deletes())
        self.tally.verified = self.verifier.checked
        self.tally.downloads = self.verifier.downloads
        self.timing = (
            f"sync {t1 - t0:.1f}s, survey {t2 - t1:.1f}s, checks {time.monotonic() - t2:.1f}s"
        )
        return problems

    def _final(self) -> None:
        """After the last round: one more clean sync (retention runs on sites that were
        current when a pass planned), then convergence per status --json, and retention."""
        self.actors.round = self.opts.rounds
        code, _ = self.actors.run("sync", "--json")
        survey = self.eyes.survey()
        problems = converged(self._status(), self.guard.newest)
        problems += retained(survey, self.order, KEEP)
        problems += self.verifier.verify(survey)
        if code != 0:
            problems.append(f"the final clean sync exited {code}")
        self.tally.verified = self.verifier.checked
        self.tally.downloads = self.verifier.downloads
        self.tally.violations.extend(f"final: {p}" for p in problems)
        self.say(f"final clean sync: {'ok' if not problems else problems[:3]}")

    def _status(self) -> dict[str, Any]:
        code, out = self.actors.run("status", "--json")
        try:
            return dict(json.loads(out))
        except ValueError:
            return {"images": [], "unreachable": {"status": f"exit {code}: {out[:200]!r}"}}

    def _glance_deletes(self) -> list[str]:
        """No Glance image is deleted after its publish succeeded (there is no Nova in the lab:
        retire: delete hides; recovery deletes only what is still an upload)."""
        problems = []
        for cloud, proxy in self.proxies.items():
            published = proxy.published_ids()
            for iid, ex in proxy.deleted_ids().items():
                if iid in published and iid not in self.reported_deletes:
                    self.reported_deletes.add(iid)
                    publish = [e for e in proxy.audit if e.image_id == iid and e.publishes]
                    lost = (
                        " (the answer to its publish was lost)" if not publish[0].delivered else ""
                    )
                    problems.append(
                        f"{cloud}:{iid}: deleted after its publish succeeded{lost}; "
                        f"DELETE answered {ex.status}"
                    )
        return problems

    def run(self) -> Tally:
        t0 = time.monotonic()
        self._configure()
        self.say(
            f"fault suite: seed {self.opts.seed} ({SEED_ENV}), {self.opts.rounds} rounds "
            f"({ROUNDS_ENV}), names {self.pattern}, work dir {self.work}"
            + ("" if self.store.mounted else f"; {self.tally.notes[0]}")
        )
        try:
            for r in range(self.opts.rounds):
                if self.opts.minutes and time.monotonic() - t0 > self.opts.minutes * 60:
                    self.tally.notes.append(f"stopped after {r} rounds: --minutes reached")
                    break
                self.round(r)
            self._final()
        except Exception as exc:
            # the suite's own failure (the lab, a bug here): said as such, never as imagesync's
            import traceback

            self.tally.suite_error = f"round {self.tally.rounds}: {exc!r}"
            self.say(traceback.format_exc())
        finally:
            self.tally.seconds = time.monotonic() - t0
            if self.zombies:
                self.tally.notes.append(
                    f"Glance left {len(self.zombies)} image(s) half-deleted (status deleted, a "
                    f"new delete refused; its sqlite was locked mid-delete): "
                    + ", ".join(sorted(self.zombies))
                )
            self.close()
        return self.tally


def run(lab: LabInfo, workdir: Path, opts: Options, out: Callable[[str], None] = print) -> Tally:
    """Run the suite (see the module's docstring); the caller checks the tally."""
    workdir.mkdir(parents=True, exist_ok=True)
    return FaultRun(lab, workdir, opts, out).run()


def env_options(default_rounds: int) -> Options:
    """Options from IMAGESYNC_FAULT_SEED / IMAGESYNC_FAULT_ROUNDS (a fresh seed otherwise)."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 1 << 31))
    rounds = int(os.environ.get(ROUNDS_ENV) or default_rounds)
    return Options(rounds=rounds, seed=seed)


@contextlib.contextmanager
def _lab(directory: str | None) -> Iterator[LabInfo]:
    from imagesync import lab as lab_mod

    if directory:
        yield lab_mod.up(clouds=3, directory=Path(directory))
        return
    with tempfile.TemporaryDirectory(prefix="faults-lab-") as tmp:
        info = lab_mod.up(clouds=3, directory=Path(tmp))
        try:
            yield info
        finally:
            lab_mod.down(Path(tmp))


def main(argv: list[str] | None = None) -> int:
    defaults = env_options(10)
    ap = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=defaults.rounds)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--window", type=float, default=Options.window, help="seconds per round")
    ap.add_argument("--kills", type=int, default=Options.random_kills, help="random per round")
    ap.add_argument("--minutes", type=float, help="start no round after this long")
    ap.add_argument("--lab", default=os.environ.get("IMAGESYNC_TEST_LAB_DIR"))
    ap.add_argument("--workdir", help="kept afterwards (default: a temporary directory)")
    args = ap.parse_args(argv)
    opts = dataclasses.replace(
        defaults,
        rounds=args.rounds,
        seed=args.seed,
        window=args.window,
        random_kills=args.kills,
        minutes=args.minutes,
    )
    with _lab(args.lab) as lab:
        if args.workdir:
            tally = run(lab, Path(args.workdir), opts, lambda s: print(s, flush=True))
        else:
            with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
                tally = run(lab, Path(tmp), opts, lambda s: print(s, flush=True))
    print(tally.text(), flush=True)
    return 2 if tally.suite_error else 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
