"""Benchmark (issue 13): several daemons sharing the work through tooz on a real etcd.

1. **Converge**: N new versions (default 30 of 16 MiB) on lab1, to be copied to lab2 and
   lab3, every member limited to one copy at a time (``max_transfers: 1``, a stand-in for one
   host's bandwidth). The time from the versions appearing until every version is published
   on both targets, for 1 member and for 3 members, alternating (paired ratio per round).
   Goal: 3 members ≤ 0.5 × 1 member. The daemons are started first and left to settle (two
   idle passes each after the last one started), and only then do the versions appear (they
   were uploaded under a staging name and are renamed, about 1 s for 30): start-up is out of
   the timed span in the 1- and the 3-member runs alike. Each member reads the source
   through its own throttling proxy (``--rate-mb``, default 8 MiB/s): one host's bandwidth.
   Without it, on a shared 2-core machine, every copy is bound by the lab clouds' CPU and
   more members cannot help. Every (name, target) must be copied exactly once (from the
   members' ``copy.done`` lines): ``copied_twice`` lists any that was not.
2. **Idle-pass overhead**: once converged, one member's idle passes with and without
   ``coordination:``: the median pass time (``pass.done`` seconds) and the calls made to
   etcd per pass (the ``imagesync_coordination_calls`` gauge between two scrapes, heartbeat
   thread included, divided by the passes in between).

    .venv/bin/python bench/bench_coordination.py --lab-dir /tmp/lab   # a running lab (kept)
    .venv/bin/python bench/bench_coordination.py --names 12 --size-mb 8 --rounds 1   # quick

It starts its own etcd (Debian's etcd-server) under a temporary directory. The machine is
shared and loaded: read the paired ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from imagesync.coordination import assign
from imagesync.lab import LabInfo, glance_client, procs
from imagesync.lab import etcd as lab_etcd
from imagesync.lab.control import info as lab_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.faultproxy import FaultProxy  # the tests' throttling proxy

MiB = 1 << 20
TARGETS = ("lab2", "lab3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cloud(lab: LabInfo, name: str) -> dict[str, Any]:
    c = lab.cloud(name)
    return {
        "auth": c.password_auth(),
        "region_name": c.region,
        "max_transfers": 1,
    }


def write_config(
    lab: LabInfo,
    directory: Path,
    prefix: str,
    etcd_url: str | None,
    member: str,
    metrics_port: int | None = None,
    source_url: str | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "state_dir": str(directory / "state"),
        "poll_interval": "2s",
        "max_transfers": 1,
        "clouds": {n: cloud(lab, n) for n in ("lab1", *TARGETS)},
        "images": [{"name": f"{prefix}*", "clouds": ["lab1", *TARGETS]}],
        "log_level": "info",
    }
    if source_url is not None:  # this member's own link to the source (its bandwidth)
        doc["clouds"]["lab1"]["endpoint_override"] = source_url
    if etcd_url is not None:
        doc["coordination"] = {"url": etcd_url, "lease_timeout": "10s", "member_id": member}
    if metrics_port is not None:
        doc["metrics_listen"] = f"127.0.0.1:{metrics_port}"
    path = directory / "imagesync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "imagesync.cli", "-c", str(config), "daemon"],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop(ps: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every member at once; kill one still there after 20 s (before 373b380 a
    coordinated daemon hung at exit after logging ``daemon.stopped``)."""
    for p in ps:
        p.terminate()
    deadline = time.monotonic() + 20
    for p in ps:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def upload_all(lab: LabInfo, prefix: str, count: int, size: int) -> dict[str, str]:
    """The versions, uploaded under a staging name no rule matches: {image id: final name}."""
    gc = glance_client(lab, "lab1")
    staged = {}
    for i in range(count):
        name = f"{prefix}{i:02d}"
        img = gc.images.create(name=f"staged-{name}", disk_format="raw", container_format="bare")
        gc.images.upload(img["id"], io.BytesIO(os.urandom(size)))
        staged[img["id"]] = name
    return staged


def reveal(lab: LabInfo, staged: dict[str, str]) -> None:
    """Make the versions appear: rename each to a name the rule matches (about 1 s for 30)."""
    gc = glance_client(lab, "lab1")
    for image_id, name in staged.items():
        gc.images.update(image_id, name=name)


def passes_done(log: Path) -> int:
    return log.read_text().count('"pass.done"') if log.exists() else 0


def wait_settled(logs: list[Path], procs_: list[subprocess.Popen[bytes]]) -> None:
    """Every member started, joined and finished two passes since the last one had its
    first: start-up is then behind them all, in the 1- and in the 3-member runs alike."""
    deadline = time.monotonic() + 300
    while min(passes_done(p) for p in logs) < 1:
        if any(p.poll() is not None for p in procs_):
            raise SystemExit(f"a daemon exited during start-up: see {logs}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the daemons did not start within 5 min: see {logs}")
        time.sleep(0.2)
    base = [passes_done(p) for p in logs]
    while any(passes_done(p) < b + 2 for p, b in zip(logs, base, strict=True)):
        time.sleep(0.2)


def published(lab: LabInfo, target: str, prefix: str) -> set[str]:
    gc = glance_client(lab, target)
    return {
        i["name"]
        for i in gc.images.list(filters={"status": "active"})
        if i["name"].startswith(prefix) and "imagesync.state" not in i and not i.get("os_hidden")
    }


def converge(
    lab: LabInfo, work: Path, etcd_url: str, members: int, count: int, size: int, rate: float
) -> dict[str, Any]:
    prefix = f"bc{uuid.uuid4().hex[:6]}-"
    staged = upload_all(lab, prefix, count, size)
    names = list(staged.values())
    procs_ = []
    # each member reads the source through a proxy of its own at ``rate`` bytes/s: one host's
    # bandwidth (on this shared 2-core machine the clouds' CPU, not the network, bounds a copy)
    port = urlsplit(lab.cloud("lab1").glance_url).port
    assert port is not None
    proxies = [FaultProxy(port) for _ in range(members)]
    for px in proxies:
        px.plan.download_rate = rate
    logs = [work / f"{prefix}m{m}.log" for m in range(members)]
    for m in range(members):
        cfg = write_config(
            lab, work / f"{prefix}m{m}", prefix, etcd_url, f"m{m}", source_url=proxies[m].url
        )
        procs_.append(start_daemon(cfg, logs[m]))
    # the daemons are up and idle before the versions appear: start-up is not timed
    wait_settled(logs, procs_)
    t0 = time.monotonic()
    reveal(lab, staged)
    revealed = time.monotonic() - t0
    try:
        while True:
            if all(published(lab, t, prefix) >= set(names) for t in TARGETS):
                break
            if time.monotonic() - t0 > 1800:
                raise SystemExit(f"{members} members did not converge within 30 min")
            time.sleep(1.0)
        seconds = time.monotonic() - t0
    finally:
        stop(procs_)
        for px in proxies:
            px.close()
    copiers: dict[str, int] = {}
    copied: dict[tuple[str, str], int] = {}  # (name, target) -> copies made: 1 each, never 2
    for m in range(members):
        for line in logs[m].read_text().splitlines():
            if '"copy.done"' in line:  # one per target reached
                copiers[f"m{m}"] = copiers.get(f"m{m}", 0) + 1
                ev = json.loads(line)
                key = (str(ev.get("image")), str(ev.get("target")))
                copied[key] = copied.get(key, 0) + 1
    cleanup(lab, prefix)
    # what a 4th member joining would move (the same pure function every member runs)
    three = assign(names, [f"m{m}" for m in range(3)])
    four = assign(names, [f"m{m}" for m in range(4)])
    if len(copied) != 2 * len(names):
        print(f"warning: {len(copied)} (name, target) copies logged, not {2 * len(names)}")
    return {
        "members": members,
        "seconds": round(seconds, 1),
        "reveal_s": round(revealed, 2),
        "copies_by_member": copiers,
        "names_by_member": dict(Counter(three.values())) if members == 3 else None,
        "moved_if_a_4th_joins": sum(three[n] != four[n] for n in names),
        "copied_twice": sorted(f"{n}@{t}" for (n, t), c in copied.items() if c > 1),
    }


def cleanup(lab: LabInfo, prefix: str) -> None:
    for c in ("lab1", *TARGETS):
        gc = glance_client(lab, c)
        for i in list(gc.images.list()):
            if i["name"].startswith(prefix):
                gc.images.delete(i["id"])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for key in ("imagesync_coordination_calls", 'imagesync_passes_total{result="ok"}'):
        m = re.search(re.escape(key) + r" ([0-9.e+]+)", text)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def idle(lab: LabInfo, work: Path, etcd_url: str | None, passes: int) -> dict[str, Any]:
    """One member, nothing to copy: pass times and calls to etcd per pass."""
    prefix = f"bi{uuid.uuid4().hex[:6]}-"
    port = free_port()
    d = work / f"{prefix}idle"
    cfg = write_config(lab, d, prefix, etcd_url, "idle", metrics_port=port)
    log = work / f"{prefix}idle.log"
    p = start_daemon(cfg, log)
    try:
        time.sleep(8)  # start-up and the first (cold) passes
        a = scrape(port)
        t0 = time.monotonic()
        key = 'imagesync_passes_total{result="ok"}'
        while scrape(port)[key] < a[key] + passes:
            time.sleep(0.5)
        b = scrape(port)
        wall = time.monotonic() - t0
    finally:
        stop([p])
    times = [
        json.loads(line)["seconds"]
        for line in log.read_text().splitlines()
        if '"pass.done"' in line
    ][2:]
    n = b[key] - a[key]
    return {
        "coordinated": etcd_url is not None,
        "passes": int(n),
        "median_pass_s": round(statistics.median(times), 4) if times else None,
        "etcd_calls_per_pass": round(
            (b["imagesync_coordination_calls"] - a["imagesync_coordination_calls"]) / n, 2
        )
        if n
        else None,
        "etcd_calls_per_s": round(
            (b["imagesync_coordination_calls"] - a["imagesync_coordination_calls"]) / wall, 2
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab-dir", type=Path, required=True, help="a running lab (3 clouds)")
    ap.add_argument("--names", type=int, default=30)
    ap.add_argument("--size-mb", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--idle-passes", type=int, default=10)
    ap.add_argument(
        "--rate-mb", type=float, default=8.0, help="each member's bandwidth to the source (MiB/s)"
    )
    ap.add_argument("--results", type=Path, default=Path("bench/results/coordination.json"))
    args = ap.parse_args()
    lab = lab_info(args.lab_dir)
    if lab is None:
        raise SystemExit(f"no lab in {args.lab_dir}: imagesync lab up --clouds 3 --dir ...")
    work = Path(tempfile.mkdtemp(prefix="bench-coord-"))
    port, peer = procs.free_ports(2)
    pid = lab_etcd.start(work, port, peer)
    lab_etcd.wait_ready(work, port, pid)
    url = lab_etcd.coordination_url(port)
    rows: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = (1, 3) if r % 2 == 0 else (3, 1)  # alternate: load drifts between runs
            got = {
                m: converge(lab, work, url, m, args.names, args.size_mb * MiB, args.rate_mb * MiB)
                for m in order
            }
            ratio = got[3]["seconds"] / got[1]["seconds"]
            rows.append({"round": r, "one": got[1], "three": got[3], "ratio": round(ratio, 3)})
            print(json.dumps(rows[-1]), flush=True)
        idle_rows = []
        for r in range(2):
            for coordinated in (False, True) if r % 2 == 0 else (True, False):
                idle_rows.append(idle(lab, work, url if coordinated else None, args.idle_passes))
                print(json.dumps(idle_rows[-1]), flush=True)
    finally:
        procs.stop_groups({pid: lab_etcd.marker(work)})
    result = {
        "names": args.names,
        "size_mb": args.size_mb,
        "converge": rows,
        "median_ratio_3_vs_1": statistics.median(r["ratio"] for r in rows),
        "idle": idle_rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
