"""VOSpace benchmark: ``imagesync push`` from Glance into the lab's VOSpace service, against a
``curl | curl`` relay between the same two endpoints, and compressed storage (``compress:
zstd``) against plain.

Usage::

    .venv/bin/python bench/bench_vospace.py [--lab-dir DIR] [--size-gb 1] [--repeat 3]
                                            [--only push|compress] [--also LABEL=TREE]
                                            [--results FILE]

Starts a lab (2 clouds and its VOSpace service; or reuses the lab running in ``--lab-dir``
and leaves it running) and puts two generated raw images of ``--size-gb`` on lab1, each found
again by its tag when the lab is reused:

* ``random``: 64 MiB of urandom repeated, every 1 MiB chunk stamped with its index (nothing
  for a compressor or a deduplicator to find; ``_common.generated_chunks``);
* ``zero70``: the same size in 1 MiB blocks, 70% of them zeros and 30% random (blocks 2, 5
  and 8 of every 10), as a raw disk with empty space is.

Scenarios, each contender run in every round (order flipped from one round to the next,
medians over ``--repeat`` rounds, and ratios paired within each round):

``push``
    ``random`` lab1 → the VOSpace store: ``imagesync push NAME --to vault`` (the real CLI,
    its own config and state directory, a name used once) vs a relay of curl processes:
    ``curl GLANCE/v2/images/ID/file | curl -T - VOSPACE/data/…`` (chunked, as imagesync's
    compressed upload; the relay's PUT URL is negotiated through the service's ``sync``
    endpoint and the Glance token fetched before the timed span starts). imagesync's span is
    the whole process: config, Keystone, listing, node creation, negotiation, upload, the
    read of the stored node, MoveNode and properties. Goals: ≥ 0.9× the relay's throughput
    (paired), peak RSS ≤ 100 MB.
``compress``
    ``zero70`` lab1 → the store: ``imagesync push`` to a plain store vs to a ``compress:
    zstd`` store (the same service and container). Goals: the bytes the compressed push wrote
    to the store (the data node's ``core#length``) ≤ 35% of the image, and its throughput
    ≥ 0.9× the plain push's (paired).

``--also LABEL=TREE`` adds ``imagesync push`` run from another source tree (``PYTHONPATH``,
``python -m imagesync.cli``) to the push scenario as one more contender in the same rounds:
a before/after of a change paired within each round, as ``bench_transfer.py --also``.

Peak RSS is ``ru_maxrss`` from ``/usr/bin/time`` (the process tree; ``/proc`` VmHWM polling
without it); CPU seconds are the contender's own. "MB" is 10^6 bytes, the image's "GB" a GiB.
Results: a table and the goals on stdout, and ``bench/results/vospace.json``. Not part of
the test suite; see bench/README.md for the figures and what they mean.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from _common import (  # the script's own directory is on sys.path
    GB,
    Glance,
    MiB,
    check_trees,
    ensure_source,
    generated_chunks,
    imagesync_command,
    imagesync_config,
    median,
    paired,
    rename_image,
    run_timed,
)

from imagesync import lab
from imagesync.lab import LabInfo, LabVOSpace

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vospace.json"
IMAGESYNC = str(Path(sys.executable).parent / "imagesync")
VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
LENGTH = "ivo://ivoa.net/vospace/core#length"

# The goals from the issue
PUSH_RATIO_MIN = 0.9  # imagesync push throughput / curl relay throughput, paired
RSS_MAX_MB = 100.0
STORED_FRACTION_MAX = 0.35  # bytes written to a compressed store / image size (70% zeros)
COMPRESSED_RATIO_MIN = 0.9  # compressed push throughput / plain push throughput, paired

_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.0f}s] {text}", flush=True)


def zero70_chunks(size: int) -> Iterator[bytes]:
    """``size`` bytes in 1 MiB blocks: 70% zeros, 30% not compressible (blocks 2, 5, 8 of 10)."""
    random = generated_chunks(size)
    zero = bytes(MiB)
    sent = i = 0
    while sent < size:
        block = next(random) if i % 10 in (2, 5, 8) else zero
        n = min(MiB, size - sent)
        yield block[:n]
        sent += n
        i += 1


def ensure_zero70(glance: Glance, size: int) -> dict[str, Any]:
    """The ``zero70`` source on ``glance`` (made once, found again by its tag)."""
    tag = f"bench-src-zero70-{size // MiB}m"
    for img in glance.find({"tag": tag}):
        if img.get("status") == "active" and img.get("size") == size:
            return img
        glance.delete(str(img["id"]))
    say(f"  uploading the {size / GB:g} GB 70%-zero source image {tag} ...")
    img = glance.create(tag, tags=[tag])
    r = glance.http.put(
        f"{glance.url}/v2/images/{img['id']}/file",
        data=zero70_chunks(size),
        timeout=3600,
        headers={"X-Auth-Token": glance.token(), "Content-Type": "application/octet-stream"},
    )
    r.raise_for_status()
    img = glance.get(str(img["id"]))
    if img.get("status") != "active" or img.get("size") != size:
        raise RuntimeError(f"source image {img['id']}: {img.get('status')}, {img.get('size')}")
    return img


class VOSpace:
    """The lab's VOSpace service over plain HTTP, as any client of the standard (not
    imagesync's site code): nodes, a ``sync`` negotiation, deletion."""

    def __init__(self, vo: LabVOSpace) -> None:
        self.vo = vo
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["Authorization"] = f"Bearer {vo.token}"
        self.top = vo.container.removeprefix(f"vos://{vo.authority}/")

    def _node(self, path: str) -> ET.Element | None:
        r = self.http.get(
            f"{self.vo.url}/nodes/{path}", params={"detail": "max", "limit": "1000"}, timeout=60
        )
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return ET.fromstring(r.content)

    def data_nodes(self, name: str) -> dict[str, int]:
        """Leaf → stored length of every data node under the name's container."""
        node = self._node(f"{self.top}/{name}")
        out: dict[str, int] = {}
        if node is None:
            return out
        for child in node.iter(f"{{{VOS}}}node"):
            uri = child.get("uri", "")
            if uri.rstrip("/").endswith(f"/{name}"):
                continue  # the container itself
            length = 0
            for prop in child.iter(f"{{{VOS}}}property"):
                if prop.get("uri") == LENGTH and (prop.text or "").isdigit():
                    length = int(prop.text or "0")
            out[uri.rsplit("/", 1)[-1]] = length
        return out

    def delete_name(self, name: str) -> None:
        for leaf in self.data_nodes(name):
            self.http.delete(f"{self.vo.url}/nodes/{self.top}/{name}/{leaf}", timeout=60)
        self.http.delete(f"{self.vo.url}/nodes/{self.top}/{name}", timeout=60)

    def negotiate_put(self, name: str, leaf: str) -> str:
        """Make ``name/leaf`` (container and data node) and negotiate where to PUT its bytes:
        pushToVoSpace through ``sync`` (its 303 to the transfer details followed)."""
        for path, kind in (
            (f"{self.top}/{name}", "ContainerNode"),
            (f"{self.top}/{name}/{leaf}", "DataNode"),
        ):
            doc = (
                f'<vos:node xmlns:vos="{VOS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
                f' uri="vos://{self.vo.authority}/{path}" xsi:type="vos:{kind}"/>'
            )
            r = self.http.put(
                f"{self.vo.url}/nodes/{path}",
                data=doc,
                headers={"Content-Type": "text/xml"},
                timeout=60,
            )
            if r.status_code not in (200, 201, 409):
                r.raise_for_status()
        transfer = (
            f'<vos:transfer xmlns:vos="{VOS}" version="2.1"><vos:target>{self.vo.container}/'
            f"{name}/{leaf}</vos:target><vos:direction>pushToVoSpace</vos:direction>"
            '<vos:protocol uri="ivo://ivoa.net/vospace/core#httpput"/></vos:transfer>'
        )
        r = self.http.post(
            f"{self.vo.url}/sync", data=transfer, headers={"Content-Type": "text/xml"}, timeout=60
        )
        r.raise_for_status()
        endpoints = [e.text for e in ET.fromstring(r.content).iter(f"{{{VOS}}}endpoint") if e.text]
        if not endpoints:
            raise RuntimeError(f"the service offered no endpoint: {r.text[:500]}")
        return endpoints[0]


@dataclass
class Run:
    seconds: float
    rss_mb: float | None
    cpu_seconds: float | None = None
    transfer_seconds: float | None = None  # imagesync's own copy time (from --json)
    stored_bytes: int | None = None  # what the store holds for the image afterwards


@dataclass
class Row:
    scenario: str
    contender: str
    nbytes: int
    runs: list[Run] = field(default_factory=list)
    baseline: bool = False

    @property
    def seconds(self) -> float:
        return median([r.seconds for r in self.runs])

    @property
    def rss_mb(self) -> float | None:
        values = [r.rss_mb for r in self.runs if r.rss_mb is not None]
        return max(values) if values else None


def _mb(kib: int | None) -> float | None:
    return kib * 1024 / 1e6 if kib is not None else None


class Bench:
    def __init__(self, info: LabInfo, work: Path, also: Sequence[tuple[str, Path]] = ()) -> None:
        if info.vospace is None:
            raise RuntimeError(f"the lab in {info.directory} has no VOSpace service")
        self.info = info
        self.work = work
        self.glance = Glance(info, "lab1")
        self.vos = VOSpace(info.vospace)
        self.env = {"OS_CLIENT_CONFIG_FILE": str(info.clouds_yaml), "PYTHONUNBUFFERED": "1"}
        self.also = list(also)  # (label, source tree): more imagesync versions to compare

    def _config(self, name: str, run_dir: Path, compress: str | None) -> Path:
        """One rule, lab1 and the VOSpace store (``compress`` as given)."""
        vo = self.info.vospace
        assert vo is not None
        path = imagesync_config(
            self.info, run_dir / "imagesync.yaml", name, ["lab1"], run_dir / "state"
        )
        doc = yaml.safe_load(path.read_text())
        store: dict[str, Any] = {
            "type": "vospace",
            "url": vo.capabilities_url,
            "container": vo.container,
            "token_file": str(vo.token_file),
        }
        if compress:
            store["compress"] = compress
        doc["stores"] = {"vault": store}
        doc["images"][0]["stores"] = ["vault"]
        path.write_text(yaml.safe_dump(doc))
        return path

    def imagesync_push(
        self, src: dict[str, Any], compress: str | None = None, tree: Path | None = None
    ) -> Run:
        name = rename_image(self.glance, src, "bench-vo-is")
        run_dir = self.work / name
        run_dir.mkdir()
        cfg = self._config(name, run_dir, compress)
        cmd, env = imagesync_command(self.env, IMAGESYNC, tree)
        t = run_timed(
            [*cmd, "-c", str(cfg), "push", name, "--to", "vault", "--json"], env, cwd=tree
        ).check("imagesync push")
        out = json.loads(t.stdout)
        copies = [r for r in out["results"] if r["kind"] == "copy"]
        ok = [x for r in copies for x in r.get("results", []) if x["ok"]]
        if len(ok) != 1 or copies[0]["bytes"] != src["size"]:
            raise RuntimeError(f"imagesync push did not copy to the store: {t.stdout}")
        nodes = self.vos.data_nodes(name)
        self.vos.delete_name(name)
        if len(nodes) != 1:
            raise RuntimeError(f"the store holds {nodes} for {name}")
        (stored,) = nodes.values()
        return Run(
            t.seconds,
            _mb(t.rss_kb),
            t.cpu,
            transfer_seconds=float(copies[0]["seconds"]),
            stored_bytes=stored,
        )

    def curl_relay(self, src: dict[str, Any]) -> Run:
        """Glance download piped into the VOSpace data endpoint's PUT."""
        name = f"bench-vo-curl-{uuid.uuid4().hex[:8]}"
        leaf = "relay.img"
        url = self.vos.negotiate_put(name, leaf)
        down = self.work / "h-down"
        down.write_text(f"X-Auth-Token: {self.glance.token()}\n")
        up = self.work / "h-up"
        up.write_text(
            f"Authorization: Bearer {self.vos.vo.token}\nContent-Type: application/octet-stream\n"
        )
        for h in (down, up):
            h.chmod(0o600)
        script = (
            f"curl -sfS -H @{down} {self.glance.url}/v2/images/{src['id']}/file"
            f" | curl -sfS -T - -H @{up} -X PUT {shlex.quote(url)} -o /dev/null"
        )
        t = run_timed(script).check("curl relay")
        nodes = self.vos.data_nodes(name)
        self.vos.delete_name(name)
        if nodes.get(leaf) != src["size"]:
            raise RuntimeError(f"curl relay: the store holds {nodes}, not {src['size']} bytes")
        return Run(t.seconds, _mb(t.rss_kb), t.cpu, stored_bytes=nodes[leaf])

    def rounds(
        self,
        scenario: str,
        nbytes: int,
        repeat: int,
        contenders: Sequence[tuple[str, Callable[[], Run], bool]],
    ) -> list[Row]:
        rows = [Row(scenario, label, nbytes, baseline=base) for label, _, base in contenders]
        for i in range(repeat):
            order = list(range(len(contenders)))
            if i % 2:
                order.reverse()
            for k in order:
                label, fn, _ = contenders[k]
                run = fn()
                rows[k].runs.append(run)
                stored = (
                    f", stored {run.stored_bytes / nbytes:.1%}"
                    if run.stored_bytes is not None
                    else ""
                )
                say(
                    f"  {scenario} round {i + 1}/{repeat}: {label}: {run.seconds:.2f}s "
                    f"({nbytes / run.seconds / 1e6:.0f} MB/s), peak RSS {run.rss_mb or 0:.0f} MB, "
                    f"CPU {run.cpu_seconds or 0:.1f}s{stored}"
                )
        return rows


def report(rows: Sequence[Row], size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    table: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    by = {(r.scenario, r.contender): r for r in rows}
    for r in rows:
        base = next((b for b in rows if b.scenario == r.scenario and b.baseline), None)
        stored = [x.stored_bytes for x in r.runs if x.stored_bytes is not None]
        table.append(
            {
                "scenario": r.scenario,
                "contender": r.contender,
                "runs": len(r.runs),
                "seconds": round(r.seconds, 2),
                "mb_s": round(r.nbytes / r.seconds / 1e6, 1),
                "paired_vs_baseline": round(paired(r, base), 3) if base else None,
                "baseline": base.contender if base else None,
                "peak_rss_mb": round(r.rss_mb, 1) if r.rss_mb is not None else None,
                "cpu_seconds": round(median([x.cpu_seconds or 0.0 for x in r.runs]), 1),
                "stored_fraction": round(max(stored) / r.nbytes, 4) if stored else None,
            }
        )

    def goal(name: str, measured: str, ok: bool) -> None:
        goals.append({"goal": name, "measured": measured, "pass": ok})

    push, relay = by.get(("push", "imagesync push")), by.get(("push", "curl relay"))
    if push and relay:
        ratio = paired(push, relay)
        goal(
            f"push Glance → VOSpace ≥ {PUSH_RATIO_MIN}× a curl \\| curl relay",
            f"{ratio:.2f}× paired, {relay.seconds / push.seconds:.2f}× of medians "
            f"({push.seconds:.1f} vs {relay.seconds:.1f} s)",
            ratio >= PUSH_RATIO_MIN,
        )
    pushes = [r for r in rows if r.contender.startswith("imagesync") and r.rss_mb is not None]
    if pushes:
        peak = max(r.rss_mb or 0.0 for r in pushes)
        goal(
            f"push peak RSS ≤ {RSS_MAX_MB:.0f} MB",
            ", ".join(f"{r.scenario}/{r.contender}: {r.rss_mb:.0f} MB" for r in pushes),
            peak <= RSS_MAX_MB,
        )
    plain, zstd = by.get(("compress", "push, plain store")), by.get(("compress", "push, zstd"))
    if zstd:
        written = max(x.stored_bytes or 0 for x in zstd.runs)
        goal(
            f"70%-zero image: bytes written to a compressed store ≤ {STORED_FRACTION_MAX:.0%}",
            f"{written / size:.1%} ({written / 1e6:.0f} MB of {size / 1e6:.0f} MB)",
            written <= STORED_FRACTION_MAX * size,
        )
    if plain and zstd:
        ratio = paired(zstd, plain)
        goal(
            f"compressed push ≥ {COMPRESSED_RATIO_MIN}× the throughput of a plain push",
            f"{ratio:.2f}× paired, {plain.seconds / zstd.seconds:.2f}× of medians "
            f"({zstd.seconds:.1f} vs {plain.seconds:.1f} s)",
            ratio >= COMPRESSED_RATIO_MIN,
        )
    return table, goals


def render(table: Sequence[dict[str, Any]], goals: Sequence[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "contender",
        "runs",
        "s (median)",
        "MB/s",
        "× baseline, paired",
        "peak RSS MB",
        "CPU s",
        "stored / image",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [
            r["scenario"],
            r["contender"],
            str(r["runs"]),
            f"{r['seconds']:.2f}",
            f"{r['mb_s']:.0f}",
            f"{r['paired_vs_baseline']:.2f}" if r["paired_vs_baseline"] is not None else "",
            f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "",
            f"{r['cpu_seconds']:.1f}",
            f"{r['stored_fraction']:.1%}" if r["stored_fraction"] is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| goal | measured | result |", "|---|---|---|"]
    lines += [
        f"| {g['goal']} | {g['measured']} | {'PASS' if g['pass'] else 'FAIL'} |" for g in goals
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    load: list[str] = []
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_end": load,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--lab-dir",
        type=Path,
        default=None,
        help="lab directory (a running lab there is reused and left running)",
    )
    p.add_argument("--size-gb", type=float, default=1.0, help="image size, GiB (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument(
        "--only",
        action="append",
        choices=["push", "compress"],
        help="run only these scenarios (repeatable)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=TREE",
        help="also run imagesync push from this source tree in the push scenario (repeatable)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args(argv)
    also = [
        (label, Path(tree).resolve()) for label, _, tree in (a.partition("=") for a in args.also)
    ]
    scenarios = set(args.only or ["push", "compress"])
    if not shutil.which("curl"):
        p.error("the curl relay needs curl: apt-get install curl")
    lab_dir = (args.lab_dir or Path(tempfile.mkdtemp(prefix="imagesync-bench-lab-"))).resolve()
    current = lab.info(lab_dir)
    reuse = current is not None and current.start_kind == "running"
    say(f"lab in {lab_dir} ({'reusing the running lab' if reuse else 'starting'})")
    info = lab.up(clouds=max(2, len(current.clouds) if current else 0), directory=lab_dir)
    size = int(args.size_gb * GB)
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="imagesync-bench-vo-") as tmp:
            bench = Bench(info, Path(tmp), also)
            check_trees(bench.also, bench.env)
            if "push" in scenarios:
                src = ensure_source(bench.glance, size, say)
                say(f"push {args.size_gb:g} GB lab1 → VOSpace, {args.repeat} rounds")
                contenders: list[tuple[str, Callable[[], Run], bool]] = [
                    ("imagesync push", lambda: bench.imagesync_push(src), False),
                    ("curl relay", lambda: bench.curl_relay(src), True),
                ]
                contenders += [
                    (
                        f"imagesync push [{label}]",
                        functools.partial(bench.imagesync_push, src, None, tree),
                        False,
                    )
                    for label, tree in also
                ]
                rows += bench.rounds("push", size, args.repeat, contenders)
            if "compress" in scenarios:
                zsrc = ensure_zero70(bench.glance, size)
                say(f"compress: {args.size_gb:g} GB, 70% zero blocks, {args.repeat} rounds")
                rows += bench.rounds(
                    "compress",
                    size,
                    args.repeat,
                    [
                        ("push, plain store", lambda: bench.imagesync_push(zsrc), True),
                        ("push, zstd", lambda: bench.imagesync_push(zsrc, "zstd"), False),
                    ],
                )
    finally:
        if not reuse:
            say("stopping the lab")
            lab.down(lab_dir)
            if args.lab_dir is None:
                shutil.rmtree(lab_dir, ignore_errors=True)
    table, goals = report(rows, size)
    print()
    print(render(table, goals))
    total = time.monotonic() - _T0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": shlex.join(["bench/bench_vospace.py", *(argv or sys.argv[1:])]),
                "size_bytes": size,
                "repeat": args.repeat,
                "machine": machine(),
                "total_seconds": round(total, 1),
                "rows": table,
                "goals": goals,
                "runs": [
                    {
                        "scenario": r.scenario,
                        "contender": r.contender,
                        "runs": [asdict(x) for x in r.runs],
                    }
                    for r in rows
                ],
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"\nwhole run: {total:.0f}s\nresults: {args.results}")
    return 0 if all(g["pass"] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
