"""Server-side copy benchmark (issue 12.3): a version held by the VOSpace store copied to a cloud
by Glance's own ``web-download`` (from the store's pre-authorized URL) against the relay of the
same image through imagesync (``server_side: false``), side by side.

Usage::

    .venv/bin/python bench/bench_serverside.py [--lab-dir DIR] [--size-mb 256] [--repeat 3]
                                               [--results FILE]

Reuses the lab running in ``--lab-dir`` (it needs its VOSpace service) and leaves it running.
Once: a generated raw image of ``--size-mb`` on lab1 (``_common.ensure_source``, found again by
its tag), renamed to a name used once and pushed into the store by ``imagesync push`` (so the
store's node carries the version's sha512). Then, every round, in flipped order, each
contender copies that version from the store to lab2 with the real CLI (``imagesync push NAME
--to lab2 --json``, its own config and state; lab1 is not in the config, so the store is the
only source), and the copy is deleted afterwards:

``web-download``
    lab2 with the default ``server_side: true``: Glance fetches the store's URL itself.
``relay`` (baseline)
    lab2 with ``server_side: false``: imagesync reads the store and uploads to Glance.

Per contender: wall seconds of the whole process, the bytes that passed through imagesync
(``bytes`` of the push's JSON: what the copy read from the source), how the target got it
(``via``), and that lab2's image has the source's sha512. Ratios are paired within each round
(relay seconds / contender seconds). Results: a table on stdout and
``bench/results/serverside.json``. Not part of the test suite; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _common import (  # the script's own directory is on sys.path
    Glance,
    MiB,
    ensure_source,
    imagesync_config,
    median,
    rename_image,
    run_timed,
)

from imagesync import lab
from imagesync.lab import LabInfo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serverside.json"
IMAGESYNC = str(Path(sys.executable).parent / "imagesync")
CONTENDERS = ("web-download", "relay")


@dataclass
class Run:
    seconds: float
    bytes: int
    via: str | None
    cpu: float | None  # imagesync's own CPU seconds (user + system)
    copy_seconds: float  # the copy alone (the push's JSON): no start-up, config or listing


@dataclass
class Row:
    contender: str
    runs: list[Run] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, info: LabInfo, work: Path) -> None:
        if info.vospace is None:
            raise RuntimeError(f"the lab in {info.directory} has no VOSpace service")
        self.info = info
        self.work = work
        self.lab1 = Glance(info, "lab1")
        self.lab2 = Glance(info, "lab2")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env["OS_CLIENT_CONFIG_FILE"] = str(info.clouds_yaml)

    def config(self, name: str, run: str, clouds: list[str], server_side: bool) -> Path:
        vo = self.info.vospace
        assert vo is not None
        run_dir = self.work / run
        run_dir.mkdir(parents=True, exist_ok=True)
        path = imagesync_config(self.info, run_dir / "imagesync.yaml", name, clouds, run_dir)
        doc = yaml.safe_load(path.read_text())
        doc["stores"] = {
            "vault": {
                "type": "vospace",
                "url": vo.capabilities_url,
                "container": vo.container,
                "token_file": str(vo.token_file),
            }
        }
        doc["images"][0]["stores"] = ["vault"]
        for c in clouds:
            doc["clouds"][c]["server_side"] = server_side
        path.write_text(yaml.safe_dump(doc))
        return path

    def push(self, cfg: Path, name: str, to: str) -> tuple[float, dict[str, Any], float | None]:
        t = run_timed([IMAGESYNC, "-c", str(cfg), "push", name, "--to", to, "--json"], self.env)
        t.check(f"imagesync push {name} --to {to}")
        out = json.loads(t.stdout)
        (copy,) = [r for r in out["results"] if r["kind"] == "copy"]
        return t.seconds, copy, t.cpu

    def setup(self, size: int) -> tuple[str, str]:
        src = ensure_source(self.lab1, size, log=say)
        name = rename_image(self.lab1, src, "bench-ss")
        cfg = self.config(name, "setup", ["lab1"], True)
        seconds, _, _ = self.push(cfg, name, "vault")
        say(f"  {name}: pushed into the store in {seconds:.1f}s")
        return name, str(src["os_hash_value"])

    def copy(self, name: str, sha512: str, contender: str, round_no: int) -> Run:
        self.lab2.delete_named(name)
        cfg = self.config(name, f"{contender}-{round_no}", ["lab2"], contender == "web-download")
        seconds, copy, cpu = self.push(cfg, name, "lab2")
        (target,) = copy["results"]
        if not target["ok"]:
            raise RuntimeError(f"{contender}: {target}")
        (img,) = self.lab2.named(name)
        if img.get("os_hash_value") != sha512:
            raise RuntimeError(f"{contender}: lab2 holds other bytes: {img}")
        self.lab2.delete_named(name)
        return Run(seconds, int(copy["bytes"]), target.get("via"), cpu, float(copy["seconds"]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab-dir", type=Path, required=True)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    info = lab.info(args.lab_dir)
    if info is None:
        raise SystemExit(f"no lab in {args.lab_dir}: start one with imagesync lab up --dir ...")
    size = args.size_mb * MiB
    rows = {c: Row(c) for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="bench-ss-") as tmp:
        bench = Bench(info, Path(tmp))
        name, sha512 = bench.setup(size)
        for i in range(args.repeat):
            order = CONTENDERS if i % 2 == 0 else tuple(reversed(CONTENDERS))
            for c in order:
                run = bench.copy(name, sha512, c, i)
                rows[c].runs.append(run)
                say(
                    f"  round {i + 1} {c}: {run.seconds:.2f}s (copy {run.copy_seconds:.2f}s), "
                    f"CPU {run.cpu or 0:.2f}s, "
                    f"{run.bytes} bytes via {run.via}"
                )
    load = os.getloadavg()
    relay = rows["relay"]
    table = []
    for c in CONTENDERS:
        row = rows[c]
        ratio = median([b.seconds / r.seconds for r, b in zip(row.runs, relay.runs, strict=True)])
        table.append(
            {
                "contender": c,
                "seconds_median": round(median([r.seconds for r in row.runs]), 2),
                "cpu_median": round(median([r.cpu or 0.0 for r in row.runs]), 2),
                "copy_seconds_median": round(median([r.copy_seconds for r in row.runs]), 2),
                "bytes_through_imagesync": sorted({r.bytes for r in row.runs}),
                "via": sorted({str(r.via) for r in row.runs}),
                "speedup_vs_relay_paired": round(ratio, 2),
            }
        )
    say(f"\n{args.size_mb} MiB, {args.repeat} rounds, load average {load[0]:.1f}")
    say("| contender | s (median) | copy s | CPU s | bytes through imagesync | via | × relay |")
    say("|---|---|---|---|---|---|---|")
    for t in table:
        say(
            f"| {t['contender']} | {t['seconds_median']} | {t['copy_seconds_median']} | "
            f"{t['cpu_median']} | "
            f"{t['bytes_through_imagesync']} | "
            f"{', '.join(t['via'])} | {t['speedup_vs_relay_paired']} |"
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "size_mb": args.size_mb,
                "rounds": args.repeat,
                "load": load,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "table": table,
                "runs": {c: [asdict(r) for r in rows[c].runs] for c in CONTENDERS},
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
