"""Transfer benchmark: ``imagesync push`` against what one machine allows, side by side.

Usage::

    .venv/bin/python bench/bench_transfer.py [--lab-dir DIR] [--size-gb 1] [--big-gb 4]
                                             [--repeat 3] [--quick] [--only SCENARIO]
                                             [--also LABEL=TREE] [--results FILE]

Starts a lab of 4 real clouds (Keystone + Glance on loopback; or reuses the lab running in
``--lab-dir`` and leaves it running), puts a generated raw image of ``--size-gb`` on lab1 and
runs, in one process, each contender of each scenario in turn (alternating the order from one
round to the next, the median of ``--repeat`` rounds is reported):

``copy``
    lab1 → lab2: ``imagesync push`` vs a ``curl | curl`` relay between the same two Glance
    servers (the limit on one machine) vs ``openstack image save`` + ``openstack image
    create`` (what operators do today; includes writing the image to a temporary file).
``fanout``
    lab1 → lab2, lab3, lab4: one ``imagesync push`` vs three ``curl | curl`` relays run in
    parallel from the same source. The source Glance's request log shows how often the
    source was read.
``big``
    (not with ``--quick``) ``--big-gb`` lab1 → lab2: imagesync's peak RSS must not grow with
    the image size; one curl relay alongside for the throughput ratio.
``check``
    ``imagesync check`` answering from what the last push recorded, ``imagesync check
    --fresh`` (asks the cloud) and ``openstack image show``: wall time of the whole process.

Every imagesync run is the real CLI in a subprocess with its own configuration (inline auth,
one rule) and state directory, on a name used once (the source image is renamed before each
run), so idempotence never skips a copy; copies are deleted after each run. Peak RSS is the
kernel's ``ru_maxrss`` from ``/usr/bin/time``; CPU seconds are the contender's (user +
system) and, separately, the lab's Glance servers'. ``--also LABEL=TREE`` adds imagesync run
from another source tree (a checkout with a candidate change) to the transfer scenarios, side
by side. Results: a table on stdout, the goals with PASS/FAIL, and
``bench/results/latest.json``. "MB" is 10^6 bytes; "GB" of image size is GiB.

The machine's background load drifts while the benchmark runs, so the ratio to the curl relay
is also given paired (the median of the ratios within each round), and the goals are judged
on it. Not part of the test suite: see bench/README.md for results and findings.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common
from _common import GB, T0, Glance, MiB, say  # the script's own directory is on sys.path

from imagesync.lab import LabInfo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
VENV_BIN = Path(sys.executable).parent
IMAGESYNC = str(VENV_BIN / "imagesync")
OPENSTACK = str(VENV_BIN / "openstack")
CLOUDS = 4
TARGETS = ("lab2", "lab3", "lab4")

# The goals from the issue
COPY_RATIO_MIN = 0.9  # imagesync throughput / curl relay throughput
FANOUT_TIME_MAX = 1.1  # imagesync fan-out time / three parallel relays' time
RSS_MAX_MB = 100.0
RSS_GROWTH_MAX_MB = 10.0  # "not growing with size": 4 GB peak within 10 MB of the 1 GB peak
CHECK_RECORDED_MAX = 0.25
CHECK_FRESH_MAX = 1.0


@dataclass
class Run(_common.Run):
    """One run of one contender, with what the Glance servers did for it."""

    server_cpu_seconds: float | None = None  # the source and target Glance servers
    source_reads: int | None = None  # data requests the source Glance served
    source_bytes: int | None = None


Row = _common.Row[Run]


class Bench:
    """The lab, the source image and the contenders."""

    def __init__(self, info: LabInfo, work: Path, also: Sequence[tuple[str, Path]] = ()) -> None:
        self.info = info
        self.work = work
        self.also = list(also)  # (label, source tree): more imagesync versions to compare
        self.glance = {c.name: Glance(info, c.name) for c in info.clouds}
        self.source_log = _common.UwsgiLog(info.directory, "lab1")
        self.servers = _common.ServerCPU(info.directory, [c.name for c in info.clouds])
        self.env = {"OS_CLIENT_CONFIG_FILE": str(info.clouds_yaml), "PYTHONUNBUFFERED": "1"}

    # -- helpers --------------------------------------------------------------------------------
    def clean(self, name: str, clouds: Sequence[str]) -> None:
        for c in clouds:
            self.glance[c].delete_named(name)

    def _header_file(self, cloud: str, upload: bool) -> Path:
        path = self.work / f"h-{cloud}-{'up' if upload else 'down'}"
        lines = [f"X-Auth-Token: {self.glance[cloud].token()}"]
        if upload:
            lines.append("Content-Type: application/octet-stream")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def _relay_cmd(self, src: dict[str, Any], target: str, target_id: str) -> str:
        g1, g2 = self.glance["lab1"], self.glance[target]
        down, up = self._header_file("lab1", False), self._header_file(target, True)
        return (
            f"curl -sfS -H @{down} {g1.url}/v2/images/{src['id']}/file"
            f" | curl -sfS -T - -H @{up} -X PUT {g2.url}/v2/images/{target_id}/file"
            " -o /dev/null"
        )

    # -- contenders -----------------------------------------------------------------------------
    def imagesync_push(
        self, src: dict[str, Any], targets: Sequence[str], tree: Path | None = None
    ) -> Run:
        """``imagesync push`` (the installed one, or the one in source ``tree``)."""
        name = _common.rename_image(self.glance["lab1"], src, "bench-is")
        run_dir = self.work / name
        run_dir.mkdir()
        cfg = _common.imagesync_config(
            self.info, run_dir / "imagesync.yaml", name, ["lab1", *targets], run_dir / "state"
        )
        cmd, env = _common.imagesync_command(self.env, IMAGESYNC, tree)
        cmd += ["-c", str(cfg), "push", name, "--json"]
        for target in targets:
            cmd += ["--to", target]
        self.source_log.mark()
        t = _common.run_timed(cmd, env, cwd=tree).check("imagesync push")
        reads, nbytes = self.source_log.served_since_mark(str(src["id"]))
        out = json.loads(t.stdout)
        copies = [r for r in out["results"] if r["kind"] == "copy"]
        ok = [x for r in copies for x in r.get("results", []) if x["ok"]]
        if len(ok) != len(targets) or copies[0]["bytes"] != src["size"]:
            raise RuntimeError(f"imagesync push did not copy to every target: {t.stdout}")
        self.clean(name, targets)
        return Run(
            t.seconds,
            _mb(t),
            t.cpu,
            transfer_seconds=float(copies[0]["seconds"]),
            source_reads=reads,
            source_bytes=nbytes,
        )

    def curl_relays(self, src: dict[str, Any], targets: Sequence[str]) -> Run:
        """One ``curl | curl`` per target, all in parallel; timed from creating the images."""
        name = f"bench-curl-{uuid.uuid4().hex[:8]}"
        cmds: list[str] = []
        self.source_log.mark()
        started = time.monotonic()
        for target in targets:
            new = self.glance[target].create(name)
            cmds.append(self._relay_cmd(src, target, str(new["id"])))
        created = time.monotonic() - started
        if len(cmds) == 1:
            script = cmds[0]
        else:
            script = " ".join(f"( {c} ) & p{i}=$!;" for i, c in enumerate(cmds))
            script += " " + " && ".join(f"wait $p{i}" for i in range(len(cmds)))
        t = _common.run_timed(script).check("curl relay")
        reads, nbytes = self.source_log.served_since_mark(str(src["id"]))
        for target in targets:
            images = self.glance[target].named(name)
            if [i.get("status") for i in images] != ["active"] or images[0].get("size") != src[
                "size"
            ]:
                raise RuntimeError(f"curl relay to {target}: {images}")
        self.clean(name, targets)
        return Run(created + t.seconds, _mb(t), t.cpu, source_reads=reads, source_bytes=nbytes)

    def openstack_cli(self, src: dict[str, Any], target: str) -> Run:
        """``openstack image save`` then ``openstack image create --file``, defaults as given."""
        name = f"bench-osc-{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            path = Path(tmp) / "image.raw"
            save = _common.run_timed(
                [
                    OPENSTACK,
                    "--os-cloud",
                    "lab1",
                    "image",
                    "save",
                    "--file",
                    str(path),
                    str(src["id"]),
                ],
                self.env,
            ).check("openstack image save")
            create = _common.run_timed(
                [
                    OPENSTACK,
                    "--os-cloud",
                    target,
                    "image",
                    "create",
                    "--disk-format",
                    "raw",
                    "--container-format",
                    "bare",
                    "--file",
                    str(path),
                    name,
                ],
                self.env,
            ).check("openstack image create")
        images = self.glance[target].named(name)
        if [i.get("status") for i in images] != ["active"] or images[0].get("size") != src["size"]:
            raise RuntimeError(f"openstack image create: {images}")
        self.clean(name, [target])
        rss = [x for x in (_mb(save), _mb(create)) if x is not None]
        return Run(
            save.seconds + create.seconds,
            max(rss) if rss else None,
            (save.cpu or 0.0) + (create.cpu or 0.0),
        )

    # -- scenarios ------------------------------------------------------------------------------
    def rounds(
        self,
        scenario: str,
        nbytes: int,
        repeat: int,
        contenders: Sequence[tuple[str, Callable[[], Run], bool]],
    ) -> list[Row]:
        def with_servers(fn: Callable[[], Run]) -> Callable[[], Run]:
            def run() -> Run:
                before = self.servers.seconds()
                out = fn()
                out.server_cpu_seconds = round(self.servers.seconds() - before, 2)
                return out

            return run

        def detail(run: Run, nbytes: int) -> str:
            extra = (
                f", imagesync's copy {run.transfer_seconds:.1f}s"
                if run.transfer_seconds is not None
                else ""
            )
            return f", Glance servers' CPU {run.server_cpu_seconds:.1f}s{extra}"

        return _common.rounds(
            scenario,
            nbytes,
            repeat,
            [(label, with_servers(fn), base) for label, fn, base in contenders],
            detail,
        )

    def _pushes(
        self, src: dict[str, Any], targets: Sequence[str]
    ) -> list[tuple[str, Callable[[], Run], bool]]:
        out: list[tuple[str, Callable[[], Run], bool]] = [
            ("imagesync push", lambda: self.imagesync_push(src, targets), False)
        ]
        for label, tree in self.also:
            out.append(
                (
                    f"imagesync push [{label}]",
                    functools.partial(self.imagesync_push, src, targets, tree),
                    False,
                )
            )
        return out

    def copy(self, src: dict[str, Any], repeat: int) -> list[Row]:
        return self.rounds(
            "copy 1→1",
            int(src["size"]),
            repeat,
            [
                *self._pushes(src, ["lab2"]),
                ("curl relay", lambda: self.curl_relays(src, ["lab2"]), True),
                ("openstack save + create", lambda: self.openstack_cli(src, "lab2"), False),
            ],
        )

    def fanout(self, src: dict[str, Any], repeat: int) -> list[Row]:
        return self.rounds(
            "fan-out 1→3",
            int(src["size"]),
            repeat,
            [
                *self._pushes(src, TARGETS),
                ("3 parallel curl relays", lambda: self.curl_relays(src, TARGETS), True),
            ],
        )

    def big(self, src: dict[str, Any]) -> list[Row]:
        return self.rounds(
            "big 1→1",
            int(src["size"]),
            1,
            [
                *self._pushes(src, ["lab2"]),
                ("curl relay", lambda: self.curl_relays(src, ["lab2"]), True),
            ],
        )

    def check(self, repeat: int) -> list[Row]:
        """A small image pushed to lab2; then the three ways of asking whether it is there."""
        g1 = self.glance["lab1"]
        name = f"bench-check-{uuid.uuid4().hex[:8]}"
        img = g1.create(name)
        g1.upload_generated(str(img["id"]), 8 * MiB)
        run_dir = self.work / name
        run_dir.mkdir()
        cfg = _common.imagesync_config(
            self.info, run_dir / "imagesync.yaml", name, ["lab1", "lab2"], run_dir / "state"
        )
        base = [IMAGESYNC, "-c", str(cfg), "check", name, "--cloud", "lab2"]
        _common.run_timed([IMAGESYNC, "-c", str(cfg), "push", name], self.env).check("push")
        copy_id = self.glance["lab2"].named(name)[0]["id"]
        for extra, want in (([], "recorded"), (["--fresh"], "sites")):
            t = _common.run_timed([*base, *extra, "--json"], self.env).check("check")
            got = json.loads(t.stdout)
            if got.get("answered_from") != want or got.get("image_id") != copy_id:
                raise RuntimeError(f"imagesync check {extra}: {got}")
        contenders: list[tuple[str, list[str]]] = [
            ("imagesync check (recorded)", base),
            ("imagesync check --fresh", [*base, "--fresh"]),
            (
                "openstack image show",
                [OPENSTACK, "--os-cloud", "lab2", "image", "show", str(copy_id)],
            ),
        ]

        def timed(cmd: list[str]) -> Callable[[], Run]:
            def run() -> Run:
                t = _common.run_timed(cmd, self.env).check(shlex.join(cmd[:4]))
                return Run(t.seconds, _mb(t), t.cpu)

            return run

        rows = self.rounds(
            "check", 0, repeat, [(label, timed(cmd), False) for label, cmd in contenders]
        )
        self.clean(name, ["lab1", "lab2"])
        return rows


def _med(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(_common.median(known), 2) if known else None


def _mb(t: _common.Timed) -> float | None:
    return t.rss_kb / 1024 if t.rss_kb is not None else None


# -- report ----------------------------------------------------------------------------------------
def _baseline(rows: Sequence[Row], row: Row) -> Row | None:
    return next((b for b in rows if b.scenario == row.scenario and b.baseline), None)


def table(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows with their ratio to the scenario's baseline (the curl relay): the ratio of the
    median times, and the median of the ratios within each round."""
    out = []
    for r in rows:
        base = _baseline(rows, r)
        ratio = base.seconds / r.seconds if base is not None else None
        pair = _common.paired(r, base) if base is not None else None
        out.append(
            {
                "scenario": r.scenario,
                "contender": r.contender,
                "seconds": round(r.seconds, 3),
                "runs": len(r.runs),
                "mb_s": round(r.mb_s, 1) if r.mb_s else None,
                "ratio_vs_curl": round(ratio, 3) if ratio is not None else None,
                "paired_ratio_vs_curl": round(pair, 3) if pair is not None else None,
                "peak_rss_mb": round(r.rss_mb, 1) if r.rss_mb is not None else None,
                "cpu_seconds": _med([x.cpu_seconds for x in r.runs]),
                "server_cpu_seconds": _med([x.server_cpu_seconds for x in r.runs]),
                "all_seconds": [round(x.seconds, 3) for x in r.runs],
                "transfer_seconds": [
                    x.transfer_seconds for x in r.runs if x.transfer_seconds is not None
                ]
                or None,
                "source_reads": [
                    (x.source_reads, x.source_bytes) for x in r.runs if x.source_reads is not None
                ]
                or None,
            }
        )
    return out


def goals(rows: Sequence[Row], size: int) -> list[dict[str, Any]]:
    def find(scenario: str, contender: str) -> Row | None:
        return next((r for r in rows if r.scenario == scenario and r.contender == contender), None)

    out: list[dict[str, Any]] = []

    def goal(text: str, measured: str, ok: bool) -> None:
        out.append({"goal": text, "measured": measured, "pass": ok})

    # Judged on the paired ratio (see ``paired``); the ratio of the medians is shown too.
    push, relay = find("copy 1→1", "imagesync push"), find("copy 1→1", "curl relay")
    if push and relay:
        ratio, pair = relay.seconds / push.seconds, _common.paired(push, relay)
        goal(
            f"copy {size / GB:g} GB: ≥ {COPY_RATIO_MIN}× the curl relay's throughput",
            f"{pair:.2f}× paired, {ratio:.2f}× of medians ({push.mb_s:.0f} vs "
            f"{relay.mb_s:.0f} MB/s)",
            pair >= COPY_RATIO_MIN,
        )
    fan, relays = (
        find("fan-out 1→3", "imagesync push"),
        find("fan-out 1→3", "3 parallel curl relays"),
    )
    if fan and relays:
        ratio, pair = fan.seconds / relays.seconds, 1 / _common.paired(fan, relays)
        goal(
            f"fan-out 1→3: ≤ {FANOUT_TIME_MAX}× the time of 3 parallel curl relays",
            f"{pair:.2f}× paired, {ratio:.2f}× of medians ({fan.seconds:.1f} vs "
            f"{relays.seconds:.1f} s)",
            pair <= FANOUT_TIME_MAX,
        )
        reads = [(x.source_reads, x.source_bytes) for x in fan.runs]
        once = all(n == 1 and b == size for n, b in reads)
        goal(
            "fan-out 1→3: the source is read once", f"source requests/bytes per push: {reads}", once
        )
    out += _common.rss_goal(
        [r for r in rows if r.contender == "imagesync push"],
        RSS_MAX_MB,
        lambda r: f"{r.scenario} {r.nbytes / GB:g} GB",
    )
    small, large = find("copy 1→1", "imagesync push"), find("big 1→1", "imagesync push")
    if small and large and small.rss_mb and large.rss_mb:
        growth = large.rss_mb - small.rss_mb
        goal(
            f"push peak RSS does not grow with size (≤ +{RSS_GROWTH_MAX_MB:.0f} MB)",
            f"{small.nbytes / GB:g} GB: {small.rss_mb:.1f} MB, {large.nbytes / GB:g} GB: "
            f"{large.rss_mb:.1f} MB ({growth:+.1f} MB)",
            growth <= RSS_GROWTH_MAX_MB,
        )
    rec, fresh = (
        find("check", "imagesync check (recorded)"),
        find("check", "imagesync check --fresh"),
    )
    show = find("check", "openstack image show")
    vs = f" (openstack image show {show.seconds:.2f} s)" if show else ""
    if rec:
        goal(
            f"check from the recorded answer ≤ {CHECK_RECORDED_MAX} s",
            f"{rec.seconds:.3f} s{vs}",
            rec.seconds <= CHECK_RECORDED_MAX,
        )
    if fresh:
        goal(
            f"check --fresh (asks the cloud) ≤ {CHECK_FRESH_MAX} s",
            f"{fresh.seconds:.3f} s{vs}",
            fresh.seconds <= CHECK_FRESH_MAX,
        )
    return out


COLUMNS = _common.columns(
    [("× curl relay", "ratio_vs_curl", ".2f"), ("× curl, paired", "paired_ratio_vs_curl", ".2f")],
    [("Glance CPU s", "server_cpu_seconds", ".1f")],
)


# -- main ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    _common.add_common_options(
        p,
        RESULTS,
        "also run imagesync from this source tree (a checkout with a candidate "
        "change) as another contender, side by side (repeatable)",
    )
    p.add_argument("--big-gb", type=float, default=4.0, help="big image size, GiB (default 4)")
    p.add_argument("--quick", action="store_true", help="skip the big image")
    p.add_argument(
        "--only",
        action="append",
        choices=["copy", "fanout", "big", "check"],
        help="run only these scenarios (repeatable)",
    )
    args = p.parse_args(argv)
    scenarios = set(args.only or ["copy", "fanout", "big", "check"])
    if not shutil.which("curl"):
        p.error("the curl relay needs curl: apt-get install curl")
    if not Path(OPENSTACK).exists() or not Path(IMAGESYNC).exists():
        p.error(
            f"run with the project's venv, which has imagesync and python-openstackclient "
            f"(not found: {OPENSTACK} or {IMAGESYNC})"
        )
    if args.quick:
        scenarios.discard("big")

    rows: list[Row] = []
    size = int(args.size_gb * GB)
    with (
        _common.bench_lab(args.lab_dir, CLOUDS) as info,
        tempfile.TemporaryDirectory(prefix="imagesync-bench-") as tmp,
    ):
        bench = Bench(info, Path(tmp), _common.also_trees(args.also))
        _common.check_trees(bench.also, bench.env)
        if scenarios & {"copy", "fanout"}:
            src = _common.ensure_source(bench.glance["lab1"], size, say)
            if "copy" in scenarios:
                say(f"copy {args.size_gb:g} GB lab1 → lab2, {args.repeat} rounds")
                rows += bench.copy(src, args.repeat)
            if "fanout" in scenarios:
                say(f"fan-out {args.size_gb:g} GB lab1 → lab2, lab3, lab4, {args.repeat} rounds")
                rows += bench.fanout(src, args.repeat)
        if "big" in scenarios:
            big = _common.ensure_source(bench.glance["lab1"], int(args.big_gb * GB), say)
            say(f"big: {args.big_gb:g} GB lab1 → lab2")
            rows += bench.big(big)
        if "check" in scenarios:
            say("check: recorded, --fresh, openstack image show")
            rows += bench.check(max(5, args.repeat))
    total = time.monotonic() - T0
    table_rows, goal_rows = table(rows), goals(rows, size)
    text = _common.markdown(COLUMNS, table_rows, goal_rows)
    print()
    print(text)
    print(f"\nwhole run: {total:.0f}s")
    _common.write_results(
        args.results,
        "bench/bench_transfer.py",
        argv,
        {
            "size_bytes": size,
            "big_bytes": int(args.big_gb * GB) if "big" in scenarios else None,
            "repeat": args.repeat,
            "total_seconds": round(total, 1),
            "rows": table_rows,
            "goals": goal_rows,
            "runs": [asdict(r) for r in rows],
        },
    )
    print(f"results: {args.results}")
    return 0 if all(g["pass"] for g in goal_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
