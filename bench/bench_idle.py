"""Benchmark: one idle reconcile pass over 3 clouds x N images (default 2000). Goal: <= 2 s.

An *idle* pass is what the daemon does almost every time: list every site, plan, find nothing
to do, record the answers. This script makes a lab (or reuses one, ``--lab-dir``), fills every
cloud with N one-byte images already in sync (originals on lab1; on lab2 and lab3 copies
carrying imagesync's provenance, as a sync would have left them), then times passes made
the daemon's way (``Engine.inventories`` → ``plan`` → ``Engine.execute_concurrently``):

- the first pass of a fresh engine (tokens fetched, capabilities probed), then
- ``--runs`` warm passes on the same engine (the daemon keeps its engine between passes),

counting every HTTP request through keystoneauth (``Session.request`` is wrapped here, in the
benchmark only). Side by side, the naive way: glanceclient's ``images.list()`` per cloud.

    .venv/bin/python bench/bench_idle.py                     # own lab, stopped afterwards
    .venv/bin/python bench/bench_idle.py --lab-dir DIR       # a lab of your own, kept

Filling a new lab takes long (about 35 minutes for 3 x 2000 on 2 CPUs: the lab's Glance keeps
its database in sqlite and slows down as it grows); reuse it with ``--lab-dir``.

What bounds the pass (measured on 2 CPUs): the listing. Glance spends about 0.7 ms of CPU
rendering each image of a page, in one GIL-bound process per cloud, so listing 2000 images
takes about 1.65 s per cloud even alone, and concurrent requests to one Glance do not overlap.
imagesync's own share (JSON, records, plan, execute, record) is about 0.3 s. Three lab clouds
on two CPUs therefore take about 3.4 s a pass; clouds with hardware of their own about 2.0 s.
Going well below needs listing fewer images per pass (only those changed since the last pass).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from imagesync import lab as labmod
from imagesync.config.types import CloudConfig, Config, ImageRule
from imagesync.engine import FULL_LIST_EVERY, Engine
from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_VERSION, format_time, parse_time
from imagesync.plan import plan

GOAL_SECONDS = 2.0
PREFIX = "bench-"
CLOUDS = ("lab1", "lab2", "lab3")


# -- counting API calls ---------------------------------------------------------------------


class CallCounter:
    """Counts HTTP requests made through any keystoneauth1 Session, by service and path."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def installed(self) -> Iterator[None]:
        from keystoneauth1 import session as ks_session

        original: Callable[..., Any] = ks_session.Session.request
        counter = self

        def request(self: Any, url: str, method: str, *args: Any, **kwargs: Any) -> Any:
            parsed = urlparse(url)
            # query parameter names only: markers and filters differ from call to call
            names = sorted(set(parse_qs(parsed.query)) | set(kwargs.get("params") or {}))
            path = parsed.path + (f"?{','.join(names)}" if names else "")
            if kwargs.get("endpoint_filter") and "://" not in url:
                what = f"{kwargs['endpoint_filter'].get('service_type', '?')} {method} {path}"
            elif "/v3/auth/tokens" in path:
                what = f"identity {method} /v3/auth/tokens"
            else:
                what = f"{method} {path}"
            # one line per kind of call, image ids folded
            what = "/".join(
                "{id}" if len(p) == 36 and p.count("-") == 4 else p for p in what.split("/")
            )
            with counter._lock:
                counter.calls[what] += 1
            return original(self, url, method, *args, **kwargs)

        ks_session.Session.request = request  # type: ignore[method-assign]
        try:
            yield
        finally:
            ks_session.Session.request = original  # type: ignore[method-assign]

    def take(self) -> Counter[str]:
        with self._lock:
            out, self.calls = self.calls, Counter()
        return out


# -- filling the lab ------------------------------------------------------------------------


def _existing(lab: LabInfo, cloud: str) -> dict[str, dict[str, Any]]:
    """name → image, for the bench's images already on ``cloud`` (raw JSON, 1000 a page)."""
    from imagesync.lab import session

    sess = session(lab, cloud)
    base = lab.cloud(cloud).glance_url
    out: dict[str, dict[str, Any]] = {}
    url: str | None = f"{base}/v2/images?limit=1000&visibility=all"
    while url:
        page = sess.get(url).json()
        for img in page["images"]:
            if img["name"].startswith(PREFIX) and img["status"] == "active":
                out[img["name"]] = img
        nxt = page.get("next")
        url = f"{base}{nxt}" if nxt else None
    return out


def populate(lab: LabInfo, count: int) -> float:
    """Make sure lab1 holds N originals and lab2/lab3 their copies; return seconds spent.

    One writer per cloud: the lab's Glance keeps its database in sqlite, which answers
    concurrent writers with "database is locked". The three clouds are filled side by side,
    each copy as soon as its original exists.
    """
    t0 = time.monotonic()
    names = [f"{PREFIX}{i:05d}" for i in range(count)]

    def make(cloud: str, name: str, data: bytes, props: dict[str, str]) -> dict[str, Any]:
        gc = glance_client(lab, cloud)
        for attempt in range(6):  # sqlite still says "locked" now and then: try again
            img: dict[str, Any] | None = None
            try:
                img = dict(
                    gc.images.create(name=name, disk_format="raw", container_format="bare", **props)
                )
                gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
                return dict(gc.images.get(img["id"]))
            except Exception:
                if img is not None:
                    with contextlib.suppress(Exception):
                        gc.images.delete(img["id"])
                if attempt == 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    originals = _existing(lab, "lab1")
    have = {c: _existing(lab, c) for c in CLOUDS[1:]}
    missing = [n for n in names if n not in originals]
    for c in CLOUDS:
        todo = len(missing) if c == "lab1" else sum(1 for x in names if x not in have[c])
        print(f"{c}: creating {todo} of {count} bench images", flush=True)
    queues: dict[str, queue.Queue[str | None]] = {c: queue.Queue() for c in CLOUDS[1:]}
    for c, q in queues.items():
        for n in names:
            if n in originals and n not in have[c]:
                q.put(n)

    def originals_worker() -> None:
        try:
            for n in missing:
                originals[n] = make("lab1", n, n.encode(), {})
                for c, q in queues.items():
                    if n not in have[c]:
                        q.put(n)
        finally:
            for q in queues.values():
                q.put(None)

    def copies_worker(cloud: str) -> None:
        # what a sync would have made: the same bytes, with the original's provenance
        q = queues[cloud]
        while (name := q.get()) is not None:
            orig = originals[name]
            data = name.encode()
            version = parse_time(orig["created_at"])
            assert version is not None
            make(
                cloud,
                name,
                data,
                {
                    PROP_ORIGIN: f"lab1:{orig['id']}",
                    PROP_VERSION: format_time(version),
                    PROP_SHA512: hashlib.sha512(data).hexdigest(),
                },
            )

    with ThreadPoolExecutor(len(CLOUDS)) as pool:
        jobs = [pool.submit(originals_worker)] + [pool.submit(copies_worker, c) for c in CLOUDS[1:]]
        for j in jobs:
            j.result()
    return time.monotonic() - t0


# -- the passes -----------------------------------------------------------------------------


def bench_config(lab: LabInfo, state_dir: Path) -> Config:
    clouds = {}
    for name in CLOUDS:
        c = lab.cloud(name)
        clouds[name] = CloudConfig(
            name=name,
            auth=c.password_auth(),
            auth_type="password",
            region_name=c.region,
            timeout=60.0,
        )
    return Config(
        path=None,
        state_dir=state_dir,
        poll_interval=300,
        clouds=clouds,
        stores={},
        images=(ImageRule(pattern=f"{PREFIX}*", clouds=CLOUDS),),
    )


def one_pass(engine: Engine, incremental: bool = True) -> dict[str, Any]:
    """One daemon pass: inventory (incremental, as the daemon lists), plan, execute."""
    t0 = time.perf_counter()
    inventories = engine.inventories(incremental=incremental)
    t1 = time.perf_counter()
    p = plan(engine.rules, inventories, engine.site_names)
    t2 = time.perf_counter()
    results = engine.execute_concurrently(p)
    t3 = time.perf_counter()
    errors = {s: inv.error for s, inv in inventories.items() if not inv.ok}
    return {
        "seconds": t3 - t0,
        "inventory": t1 - t0,
        "plan": t2 - t1,
        "execute": t3 - t2,
        "names": len(p.assessments),
        "images": sum(len(i.images) for i in inventories.values()),
        "actions": len(p.actions),
        "results": len(results),
        "errors": errors,
    }


def naive_baseline(lab: LabInfo) -> dict[str, Any]:
    """glanceclient's images.list() per cloud, one after another (default page size)."""
    t0 = time.perf_counter()
    total = 0
    for cloud in CLOUDS:
        total += sum(1 for _ in glance_client(lab, cloud).images.list())
    return {"seconds": time.perf_counter() - t0, "images": total}


def _calls_line(calls: Counter[str]) -> str:
    return ", ".join(f"{n} x {what}" for what, n in sorted(calls.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--lab-dir", type=Path, help="use (and start if needed) the lab here; it is left running"
    )
    ap.add_argument("--keep-lab", action="store_true", help="leave a lab this script started")
    ap.add_argument("--images", type=int, default=2000, help="images per cloud (2000)")
    ap.add_argument("--runs", type=int, default=5, help="warm idle passes to time (5)")
    args = ap.parse_args(argv)

    own = args.lab_dir is None
    # a directory of our own: never fill someone else's lab with thousands of images
    lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="imagesync-bench-lab-"))
    t0 = time.monotonic()
    lab = labmod.up(clouds=3, directory=lab_dir)
    print(f"lab in {lab_dir}: {lab.start_kind} in {time.monotonic() - t0:.1f}s", flush=True)
    try:
        spent = populate(lab, args.images)
        print(f"populated in {spent:.1f}s", flush=True)
        counter = CallCounter()
        with counter.installed(), tempfile.TemporaryDirectory() as state:
            engine = Engine(bench_config(lab, Path(state)))
            first = one_pass(engine)
            first_calls = counter.take()
            assert not first["errors"], first["errors"]
            if first["actions"]:
                print(f"WARNING: the first pass planned {first['actions']} actions (not idle)")
            warm = []
            warm_calls = Counter[str]()
            for _ in range(args.runs):
                warm.append(one_pass(engine))
                warm_calls = counter.take()
            full = []  # side by side: the same pass with a full listing of every site
            full_calls = Counter[str]()
            for _ in range(args.runs):
                full.append(one_pass(engine, incremental=False))
                full_calls = counter.take()
            alone = {}
            for cloud in CLOUDS:  # each cloud listed with nothing else running
                t = time.perf_counter()
                engine.inventory(cloud)
                alone[cloud] = time.perf_counter() - t
            counter.take()
            engine.close()
            base = naive_baseline(lab)
            base_calls = counter.take()

        med = statistics.median(r["seconds"] for r in warm)
        print()
        print(
            f"idle pass over {len(CLOUDS)} clouds x {args.images} images "
            f"({warm[-1]['images']} images listed, {warm[-1]['names']} names planned, "
            f"{warm[-1]['actions']} actions)"
        )
        print(
            f"  first pass (fresh engine): {first['seconds']:.2f}s, "
            f"{sum(first_calls.values())} API calls: {_calls_line(first_calls)}"
        )
        each = ", ".join(f"{r['seconds']:.2f}" for r in warm)
        print(
            f"  warm passes ({args.runs}): median {med:.2f}s [{each}], "
            f"{sum(warm_calls.values())} API calls each: {_calls_line(warm_calls)}"
        )
        last = warm[len(warm) // 2]
        print(
            f"    of which inventory {last['inventory']:.2f}s, plan {last['plan']:.2f}s, "
            f"execute+record {last['execute']:.2f}s"
        )
        fmed = statistics.median(r["seconds"] for r in full)
        print(
            f"  full-listing passes ({args.runs}): median {fmed:.2f}s, "
            f"{sum(full_calls.values())} API calls each (the daemon lists fully every "
            f"{FULL_LIST_EVERY:.0f}s); incremental/full = {med / fmed:.2f}x"
        )
        print(
            f"  goal {GOAL_SECONDS:.1f}s: median is {med / GOAL_SECONDS:.0%} of the goal "
            f"-> {'MET' if med <= GOAL_SECONDS else 'NOT MET'}"
        )
        ours = last["plan"] + last["execute"]
        print(
            "  each cloud listed alone: "
            + ", ".join(f"{c} {t:.2f}s" for c, t in alone.items())
            + f" (the lab's {len(CLOUDS)} Glance servers share {os.cpu_count()} CPUs here; "
            f"clouds with CPUs of their own list side by side: about "
            f"{max(alone.values()) + ours:.2f}s a pass)"
        )
        print(
            f"  naive baseline, glanceclient images.list() per cloud: {base['seconds']:.2f}s, "
            f"{sum(base_calls.values())} API calls ({base['images']} images; it does not "
            "even see hidden images)"
        )
        return 0 if med <= GOAL_SECONDS else 1
    finally:
        if own and not args.keep_lab:
            labmod.down(lab_dir)
            print(f"lab in {lab_dir} stopped")


if __name__ == "__main__":
    sys.exit(main())
