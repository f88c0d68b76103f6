"""VOSpace benchmark: ``imagesync push`` from Glance into the lab's VOSpace service, against a
``curl | curl`` relay between the same two endpoints, and compressed storage (``compress:
zstd``) against plain.

Usage::

    .venv/bin/python bench/bench_vospace.py [--lab-dir DIR] [--size-gb 1] [--repeat 3]
                                            [--only push|compress] [--also LABEL=TREE]
                                            [--python PYTHON] [--results FILE]

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
``--python`` runs every imagesync contender with another interpreter: a virtualenv with
imagesync's runtime dependencies only (``pip install -e .``), as a deployment has. The bench's
own venv also holds the lab's servers and the test tools, and keystoneauth imports osprofiler
(and with it oslo.config) and structlog imports rich when they are installed: ~0.2 to 0.3 s
of start-up a deployment does not pay.

Peak RSS is ``ru_maxrss`` from ``/usr/bin/time`` (the process tree; ``/proc`` VmHWM polling
without it); CPU seconds are the contender's own. "MB" is 10^6 bytes, the image's "GB" a GiB.
Results: a table and the goals on stdout, and ``bench/results/vospace.json``. Not part of
the test suite; see bench/README.md for the figures and what they mean.
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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common
import requests
import yaml
from _common import GB, T0, Glance, MiB, say  # the script's own directory is on sys.path

from imagesync.lab import LabInfo, LabVOSpace

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vospace.json"
VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
LENGTH = "ivo://ivoa.net/vospace/core#length"

# The goals from the issue
PUSH_RATIO_MIN = 0.9  # imagesync push throughput / curl relay throughput, paired
RSS_MAX_MB = 100.0
STORED_FRACTION_MAX = 0.35  # bytes written to a compressed store / image size (70% zeros)
COMPRESSED_RATIO_MIN = 0.9  # compressed push throughput / plain push throughput, paired


def zero70_chunks(size: int) -> Iterator[bytes]:
    """``size`` bytes in 1 MiB blocks: 70% zeros, 30% not compressible (blocks 2, 5, 8 of 10)."""
    random = _common.generated_chunks(size)
    zero = bytes(MiB)
    sent = i = 0
    while sent < size:
        block = next(random) if i % 10 in (2, 5, 8) else zero
        n = min(MiB, size - sent)
        yield block[:n]
        sent += n
        i += 1


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
class Run(_common.Run):
    """One run of one contender, with what the store holds afterwards."""

    stored_bytes: int | None = None  # what the store holds for the image afterwards


Row = _common.Row[Run]


def _mb(kib: int | None) -> float | None:
    return kib * 1024 / 1e6 if kib is not None else None


class Bench:
    def __init__(
        self,
        info: LabInfo,
        work: Path,
        also: Sequence[tuple[str, Path]] = (),
        python: str = sys.executable,
    ) -> None:
        if info.vospace is None:
            raise RuntimeError(f"the lab in {info.directory} has no VOSpace service")
        self.info = info
        self.work = work
        self.glance = Glance(info, "lab1")
        self.vos = VOSpace(info.vospace)
        self.env = {"OS_CLIENT_CONFIG_FILE": str(info.clouds_yaml), "PYTHONUNBUFFERED": "1"}
        self.also = list(also)  # (label, source tree): more imagesync versions to compare
        # the interpreter (and so the installed packages) imagesync runs with, and its script
        self.python = python
        self.imagesync = str(Path(python).parent / "imagesync")

    def _config(self, name: str, run_dir: Path, compress: str | None) -> Path:
        """One rule, lab1 and the VOSpace store (``compress`` as given)."""
        vo = self.info.vospace
        assert vo is not None
        path = _common.imagesync_config(
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
        name = _common.rename_image(self.glance, src, "bench-vo-is")
        run_dir = self.work / name
        run_dir.mkdir()
        cfg = self._config(name, run_dir, compress)
        cmd, env = _common.imagesync_command(self.env, self.imagesync, tree, self.python)
        t = _common.run_timed(
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
        t = _common.run_timed(script).check("curl relay")
        nodes = self.vos.data_nodes(name)
        self.vos.delete_name(name)
        if nodes.get(leaf) != src["size"]:
            raise RuntimeError(f"curl relay: the store holds {nodes}, not {src['size']} bytes")
        return Run(t.seconds, _mb(t.rss_kb), t.cpu, stored_bytes=nodes[leaf])


def stored(run: Run, nbytes: int) -> str:
    """How much of the image the store holds after ``run`` (said after every run)."""
    return "" if run.stored_bytes is None else f", stored {run.stored_bytes / nbytes:.1%}"


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
                "paired_vs_baseline": round(_common.paired(r, base), 3) if base else None,
                "baseline": base.contender if base else None,
                "peak_rss_mb": round(r.rss_mb, 1) if r.rss_mb is not None else None,
                "cpu_seconds": round(_common.median([x.cpu_seconds or 0.0 for x in r.runs]), 1),
                "stored_fraction": round(max(stored) / r.nbytes, 4) if stored else None,
            }
        )

    def goal(name: str, measured: str, ok: bool) -> None:
        goals.append({"goal": name, "measured": measured, "pass": ok})

    goals += _common.rss_goal(
        [r for r in rows if r.contender.startswith("imagesync")],
        RSS_MAX_MB,
        lambda r: f"{r.scenario}/{r.contender}",
    )
    plain, zstd = by.get(("compress", "push, plain store")), by.get(("compress", "push, zstd"))
    if zstd:
        written = max(x.stored_bytes or 0 for x in zstd.runs)
        goal(
            f"70%-zero image: bytes written to a compressed store ≤ {STORED_FRACTION_MAX:.0%}",
            f"{written / size:.1%} ({written / 1e6:.0f} MB of {size / 1e6:.0f} MB)",
            written <= STORED_FRACTION_MAX * size,
        )
    # the throughput goals, each judged on the ratio paired within rounds
    for what, row, base, minimum in (
        (
            f"push Glance → VOSpace ≥ {PUSH_RATIO_MIN}× a curl \\| curl relay",
            by.get(("push", "imagesync push")),
            by.get(("push", "curl relay")),
            PUSH_RATIO_MIN,
        ),
        (
            f"compressed push ≥ {COMPRESSED_RATIO_MIN}× the throughput of a plain push",
            zstd,
            plain,
            COMPRESSED_RATIO_MIN,
        ),
    ):
        if row and base:
            ratio, measured = _common.speed_vs(row, base)
            goal(what, measured, ratio >= minimum)
    return table, goals


COLUMNS = _common.columns(
    [("× baseline, paired", "paired_vs_baseline", ".2f")],
    [("stored / image", "stored_fraction", ".1%")],
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    _common.add_common_options(
        p,
        RESULTS,
        "also run imagesync push from this source tree in the push scenario (repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=["push", "compress"],
        help="run only these scenarios (repeatable)",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="run imagesync with this interpreter: a virtualenv holding imagesync and its "
        "runtime dependencies only, as a deployment has (default: this one, whose venv also "
        "holds the lab's Glance and Keystone and the test tools, which some of imagesync's "
        "libraries import when they find them: osprofiler, rich)",
    )
    args = p.parse_args(argv)
    also = _common.also_trees(args.also)
    scenarios = set(args.only or ["push", "compress"])
    if not shutil.which("curl"):
        p.error("the curl relay needs curl: apt-get install curl")
    size = int(args.size_gb * GB)
    rows: list[Row] = []
    with (
        _common.bench_lab(args.lab_dir, 2) as info,
        tempfile.TemporaryDirectory(prefix="imagesync-bench-vo-") as tmp,
    ):
        bench = Bench(info, Path(tmp), also, args.python)
        _common.check_trees(bench.also, bench.env, bench.python)
        if "push" in scenarios:
            src = _common.ensure_source(bench.glance, size, say)
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
            rows += _common.rounds("push", size, args.repeat, contenders, stored)
        if "compress" in scenarios:
            zsrc = _common.ensure_source(bench.glance, size, say, "zero70", zero70_chunks)
            say(f"compress: {args.size_gb:g} GB, 70% zero blocks, {args.repeat} rounds")
            rows += _common.rounds(
                "compress",
                size,
                args.repeat,
                [
                    ("push, plain store", lambda: bench.imagesync_push(zsrc), True),
                    ("push, zstd", lambda: bench.imagesync_push(zsrc, "zstd"), False),
                ],
                stored,
            )
    table, goals = report(rows, size)
    print()
    print(_common.markdown(COLUMNS, table, goals))
    total = time.monotonic() - T0
    _common.write_results(
        args.results,
        "bench/bench_vospace.py",
        argv,
        {
            "size_bytes": size,
            "repeat": args.repeat,
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
    )
    print(f"\nwhole run: {total:.0f}s\nresults: {args.results}")
    return 0 if all(g["pass"] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
