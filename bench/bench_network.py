"""Real-network shapes on the lab: a slow cloud in a fan-out, and a source read that is cut.

Loopback links are all equally fast; real ones are not. Two scenarios, each run by this
tree's imagesync and by every ``--also LABEL=TREE`` one, side by side in every round:

* **fan-out with a slow cloud**: ``imagesync push`` lab1 → {a directory store, lab2, lab3},
  lab3 behind ``tests/faultproxy.py`` capping its uploads at 1/5 of lab2's measured solo
  speed. Each target's time until its copy is published (polled from outside: Glance's
  listing, the store's directory) is set against the same target's time as the only target,
  in the same round and tree (paired ratios). Goals: fast targets ≤ 1.2× solo, the slow one
  ≤ 1.1× solo, peak RSS ≤ 100 MB. Also {store, lab2} without the slow cloud ("pair": what the
  two fast targets cost each other on these cores), and the CPU seconds of each push:
  imagesync's own, and the lab's servers' (every process whose command line names the lab).
  ``--fast-link-mb N`` puts lab2 behind a proxy too, capped at N MiB/s (a fast WAN link; lab3
  then gets 1/5 of lab2's capped speed): on loopback the fast targets' solo runs keep both
  cores of the bench machine busy, so there their fan-out times measure the CPU they share.
* **cut source read**: lab1 (behind a proxy) → lab2, the download cut at 50% and again at 90%
  of the image, against an uncut copy through the same proxy. Goal ≤ 1.1×. The bytes the
  proxy passed from the source count how often the source was read.

::

    .venv/bin/python bench/bench_network.py --lab-dir /tmp/benchlab --also before=/tmp/base
    .venv/bin/python bench/bench_network.py --lab-dir /tmp/benchlab --only fanout --fast-link-mb 40

Results go to ``bench/results/network.json``; the figures are in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    Glance,
    MiB,
    check_trees,
    ensure_source,
    imagesync_command,
    median,
    rename_image,
    run_timed,
)
from imagesync import lab
from imagesync.lab import LabInfo
from tests.faultproxy import FaultProxy

RESULTS = Path(__file__).parent / "results" / "network.json"
IMAGESYNC = str(Path(sys.executable).parent / "imagesync")
STORE = "archive"


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Push:
    """One push: wall seconds, peak RSS (MB), each target's seconds until published."""

    seconds: float
    rss_mb: float | None
    published: dict[str, float] = field(default_factory=dict)
    source_bytes: int = 0  # passed by the proxy in front of the source, when there is one
    cpu_s: float | None = None  # imagesync's user + system CPU seconds
    lab_cpu_s: float | None = None  # the lab's servers' (Glance, Keystone) during the push
    #: targets detached onto a second read: seconds from the push's start, and the offset (MiB)
    detached: dict[str, tuple[float, float]] = field(default_factory=dict)


def detached(stderr: str, wall0: float) -> dict[str, tuple[float, float]]:
    """The ``copy.detached`` events of a push's JSON log: when (from ``wall0``) and where."""
    out = {}
    for line in stderr.splitlines():
        if '"copy.detached"' not in line:
            continue
        try:
            ev = json.loads(line)
            when = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        out[str(ev.get("site"))] = (round(when - wall0, 2), round(ev.get("offset", 0) / MiB, 1))
    return out


def lab_cpu(lab_dir: Path) -> float:
    """CPU seconds (user + system, and their reaped children's) of every process whose
    command line names ``lab_dir``: the lab's uWSGI servers."""
    tick = os.sysconf("SC_CLK_TCK")
    marker = str(lab_dir).encode()
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes():
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


class Watch(threading.Thread):
    """Polls the targets until each shows the copy published; notes when, from ``t0``."""

    def __init__(self, bench: Bench, name: str, targets: Sequence[str], store: Path) -> None:
        super().__init__(daemon=True)
        self.bench, self.name, self.targets, self.store = bench, name, list(targets), store
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def _published(self, target: str) -> bool:
        if target == STORE:
            return any(self.store.glob(f"{self.name}/[!.]*.img"))
        return any(
            i.get("status") == "active" and not i.get("os_hidden") and "imagesync.state" not in i
            for i in self.bench.glance[target].named(self.name)
        )

    def run(self) -> None:
        while True:
            last = self.done.is_set()  # one more look after the push ended: nothing missed
            for t in self.targets:
                if t not in self.seen and self._published(t):
                    self.seen[t] = time.monotonic() - self.t0
            if last:
                return
            self.done.wait(0.2)


class Bench:
    def __init__(self, info: LabInfo, work: Path) -> None:
        self.info = info
        self.work = work
        self.glance = {c.name: Glance(info, c.name) for c in info.clouds}
        self.env = {"OS_CLIENT_CONFIG_FILE": str(info.clouds_yaml), "PYTHONUNBUFFERED": "1"}
        self.proxies = {c: FaultProxy(self._port(c)) for c in ("lab1", "lab2", "lab3")}

    def _port(self, cloud: str) -> int:
        port = urlparse(self.info.cloud(cloud).glance_url).port
        assert port is not None
        return port

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()

    def _config(self, run_dir: Path, name: str, clouds: Sequence[str], proxied: set[str]) -> Path:
        import yaml

        doc: dict[str, Any] = {
            "state_dir": str(run_dir / "state"),
            "poll_interval": "1m",
            "log_format": "json",
            "clouds": {},
            "stores": {STORE: {"type": "directory", "path": str(run_dir / "store")}},
            "images": [{"name": name, "clouds": list(clouds), "store": STORE}],
        }
        for n in clouds:
            c = self.info.cloud(n)
            entry: dict[str, Any] = {
                "auth": c.password_auth(),
                "region_name": c.region,
            }
            if n in proxied:
                entry["endpoint_override"] = self.proxies[n].url
            doc["clouds"][n] = entry
        (run_dir / "store").mkdir()
        path = run_dir / "imagesync.yaml"
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    def push(
        self, src: dict[str, Any], targets: Sequence[str], tree: Path | None, proxied: set[str]
    ) -> Push:
        name = rename_image(self.glance["lab1"], src, "bench-net")
        run_dir = self.work / name
        run_dir.mkdir()
        clouds = ["lab1", *(t for t in ("lab2", "lab3") if t in targets)]
        cfg = self._config(run_dir, name, clouds, proxied)
        cmd, env = imagesync_command(self.env, IMAGESYNC, tree)
        cmd += ["-c", str(cfg), "push", name, "--json"]
        for t in targets:
            cmd += ["--to", t]
        before = self.proxies["lab1"].plan.downloaded
        watch = Watch(self, name, targets, run_dir / "store")
        watch.start()
        cpu0, wall0 = lab_cpu(self.info.directory), time.time()
        t = run_timed(cmd, env, cwd=tree)
        lab_cpu_s = lab_cpu(self.info.directory) - cpu0
        watch.done.set()
        watch.join()
        if t.returncode != 0:
            raise RuntimeError(f"imagesync push failed: {t.stdout[-1500:]} {t.stderr[-1500:]}")
        out = json.loads(t.stdout)
        ok = [x for r in out["results"] if r["kind"] == "copy" for x in r["results"] if x["ok"]]
        if len(ok) != len(targets) or set(watch.seen) != set(targets):
            raise RuntimeError(f"not every target got its copy: {t.stdout[-1500:]}")
        for c in ("lab2", "lab3"):
            if c in targets:
                self.glance[c].delete_named(name)
        shutil.rmtree(run_dir, ignore_errors=True)
        rss = t.rss_kb / 1024 if t.rss_kb else None
        return Push(
            t.seconds,
            rss,
            watch.seen,
            self.proxies["lab1"].plan.downloaded - before,
            t.cpu,
            lab_cpu_s,
            detached(t.stderr, wall0),
        )


def rounds(
    n: int, contenders: Sequence[tuple[str, Path | None]], runs: dict[str, Callable[..., Push]]
) -> dict[str, dict[str, list[Push]]]:
    """Every run of every contender in every round; the order flips each round."""
    out: dict[str, dict[str, list[Push]]] = {
        label: {k: [] for k in runs} for label, _ in contenders
    }
    for r in range(n):
        order = [(label, tree, k) for label, tree in contenders for k in runs]
        if r % 2:
            order.reverse()
        for label, tree, k in order:
            p = runs[k](tree)
            out[label][k].append(p)
            published = {t: round(s, 1) for t, s in p.published.items()}
            say(
                f"  round {r + 1} {label:8s} {k:12s} {p.seconds:6.1f}s {published} "
                f"rss {p.rss_mb} cpu {p.cpu_s} lab cpu {p.lab_cpu_s:.1f} load {load()} "
                f"detached (s, MiB) {p.detached}"
            )
    return out


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def fanout(
    bench: Bench, src: dict[str, Any], contenders: Any, n: int, fast_link: float = 0.0
) -> dict[str, Any]:
    """``fast_link``: lab2's uploads capped at that many bytes/s (0: loopback speed)."""
    lab2, lab3 = bench.proxies["lab2"], bench.proxies["lab3"]
    lab2.plan.upload_rate, lab3.plan.upload_rate = fast_link, 0.0
    slow = {"lab2", "lab3"} if fast_link else {"lab3"}
    solo = bench.push(src, ["lab2"], None, slow)  # calibrate: lab2's solo speed
    rate = src["size"] / solo.published["lab2"] / 5
    lab3.plan.upload_rate = rate
    say(f"  lab2 solo {solo.published['lab2']:.1f}s: lab3 capped at {rate / MiB:.1f} MiB/s")
    runs: dict[str, Callable[..., Push]] = {
        "solo-archive": lambda tree: bench.push(src, [STORE], tree, slow),
        "solo-lab2": lambda tree: bench.push(src, ["lab2"], tree, slow),
        "solo-lab3": lambda tree: bench.push(src, ["lab3"], tree, slow),
        "fan-out": lambda tree: bench.push(src, [STORE, "lab2", "lab3"], tree, slow),
        "pair": lambda tree: bench.push(src, [STORE, "lab2"], tree, slow),
    }
    res = rounds(n, contenders, runs)
    summary: dict[str, Any] = {"cap_mib_s": rate / MiB, "lab2_cap_mib_s": fast_link / MiB}
    for label, by in res.items():
        ratios = {
            t: median(
                [
                    f.published[t] / s.published[t]
                    for f, s in zip(by["fan-out"], by[f"solo-{t}"], strict=True)
                ]
            )
            for t in (STORE, "lab2", "lab3")
        }
        summary[label] = {
            "fan-out / solo (paired median)": ratios,
            "solo seconds (median)": {
                t: median([p.published[t] for p in by[f"solo-{t}"]])
                for t in (STORE, "lab2", "lab3")
            },
            "fan-out seconds (median)": {
                t: median([p.published[t] for p in by["fan-out"]]) for t in (STORE, "lab2", "lab3")
            },
            "pair / solo (paired median)": {
                t: median(
                    [
                        f.published[t] / s.published[t]
                        for f, s in zip(by["pair"], by[f"solo-{t}"], strict=True)
                    ]
                )
                for t in (STORE, "lab2")
            },
            "fan-out peak RSS MB (max)": max(p.rss_mb or 0 for p in by["fan-out"]),
            "peak RSS MB (max)": {k: max(p.rss_mb or 0 for p in v) for k, v in by.items()},
            "imagesync CPU s (median)": {
                k: median([p.cpu_s or 0 for p in v]) for k, v in by.items()
            },
            "lab CPU s (median)": {k: median([p.lab_cpu_s or 0 for p in v]) for k, v in by.items()},
            "runs": {k: [asdict(p) for p in v] for k, v in by.items()},
        }
    return summary


def cut(bench: Bench, src: dict[str, Any], contenders: Any, n: int) -> dict[str, Any]:
    plan = bench.proxies["lab1"].plan
    size = int(src["size"])

    def run(tree: Path | None, cuts: list[int]) -> Push:
        plan.cut_download_at = list(cuts)
        try:
            return bench.push(src, ["lab2"], tree, {"lab1"})
        finally:
            plan.cut_download_at = []

    runs: dict[str, Callable[..., Push]] = {
        "uncut": lambda tree: run(tree, []),
        "cut-50-90": lambda tree: run(tree, [size // 2, size * 9 // 10]),
    }
    res = rounds(n, contenders, runs)
    summary: dict[str, Any] = {}
    for label, by in res.items():
        summary[label] = {
            "cut / uncut (paired median)": median(
                [c.seconds / u.seconds for c, u in zip(by["cut-50-90"], by["uncut"], strict=True)]
            ),
            "seconds (median)": {k: median([p.seconds for p in v]) for k, v in by.items()},
            "source bytes / size (median)": {
                k: median([p.source_bytes / size for p in v]) for k, v in by.items()
            },
            "runs": {k: [asdict(p) for p in v] for k, v in by.items()},
        }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--lab-dir", type=Path, help="a running lab there is reused and left running")
    p.add_argument("--fanout-mb", type=int, default=200, help="fan-out image size, MiB")
    p.add_argument(
        "--fast-link-mb",
        type=float,
        default=0.0,
        help="cap lab2's link at this many MiB/s in the fan-out (a fast WAN link; lab3 then gets "
        "1/5 of lab2's capped speed); default: lab2 at loopback speed",
    )
    p.add_argument("--cut-mb", type=int, default=1024, help="cut-read image size, MiB")
    p.add_argument("--repeat", type=int, default=3, help="rounds per scenario")
    p.add_argument("--only", action="append", choices=["fanout", "cut"])
    p.add_argument("--also", action="append", default=[], metavar="LABEL=TREE")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    lab_dir = (args.lab_dir or Path(tempfile.mkdtemp(prefix="imagesync-bench-lab-"))).resolve()
    reuse = lab.info(lab_dir) is not None
    info = lab.up(clouds=3, directory=lab_dir)
    contenders: list[tuple[str, Path | None]] = [("this", None)]
    contenders += [(a.partition("=")[0], Path(a.partition("=")[2]).resolve()) for a in args.also]
    results: dict[str, Any] = {"contenders": [c[0] for c in contenders]}
    try:
        with tempfile.TemporaryDirectory(prefix="imagesync-bench-net-") as tmp:
            bench = Bench(info, Path(tmp))
            check_trees([(lb, t) for lb, t in contenders if t is not None], bench.env)
            try:
                only = args.only or ["fanout", "cut"]
                if "fanout" in only:
                    src = ensure_source(bench.glance["lab1"], args.fanout_mb * MiB, say)
                    link = f" (capped at {args.fast_link_mb} MiB/s)" if args.fast_link_mb else ""
                    say(f"fan-out {args.fanout_mb} MiB lab1 → store, lab2{link}, lab3 (1/5 speed)")
                    fast_link = args.fast_link_mb * MiB
                    results["fanout"] = fanout(bench, src, contenders, args.repeat, fast_link)
                if "cut" in only:
                    src = ensure_source(bench.glance["lab1"], args.cut_mb * MiB, say)
                    say(f"cut read {args.cut_mb} MiB lab1 → lab2, cut at 50% and 90%")
                    results["cut"] = cut(bench, src, contenders, args.repeat)
            finally:
                bench.close()
    finally:
        if not reuse:
            lab.down(lab_dir)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    for scenario in ("fanout", "cut"):
        for label in results["contenders"]:
            if scenario in results:
                shown = {k: v for k, v in results[scenario][label].items() if k != "runs"}
                say(f"{scenario} {label}: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
