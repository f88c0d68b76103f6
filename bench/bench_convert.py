"""Disk format conversion on the way: a copy converted by imagesync against a plain relay of the
same image, lab1 → lab2, side by side in the same rounds.

For each direction (qcow2 → raw, raw → qcow2) the source image is uploaded to lab1 once; every
round runs ``push`` twice, in alternating order: once to a lab2 that takes the image as it is
(the relay: one streamed read, one upload) and once to a lab2 whose ``disk_formats:`` wants
the other format (download to scratch, ``qemu-img convert``, ``qemu-img compare``, upload).
The copy on lab2 is deleted after each run, and every run has its own state directory, so
nothing is skipped as already current. Prints the median times and the paired ratio
(conversion / relay per round, then the median), and writes them to ``--results``.

    .venv/bin/python bench/bench_convert.py --lab-dir /tmp/benchlab [--size-mb 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imagesync import lab as lab_mod  # noqa: E402
from imagesync.commands import push  # noqa: E402
from imagesync.config.types import ConversionConfig  # noqa: E402
from imagesync.lab import LabInfo, glance_client  # noqa: E402
from tests.integration.labcfg import cloud_config, images_named, make_config, uid  # noqa: E402

MiB = 1 << 20


def make_disk(where: Path, fmt: str, size: int) -> bytes:
    """A ``size`` disk, half of it random data in 4 MiB runs among holes, in ``fmt``."""
    raw = where / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, 8 * MiB):
            f.seek(off)
            f.write(os.urandom(4 * MiB))
    if fmt == "raw":
        return raw.read_bytes()
    out = where / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, raw, out], check=True)
    return out.read_bytes()


def one_run(lab: LabInfo, work: Path, name: str, wants: str | None) -> float:
    config = make_config(lab, work, name, clouds=["lab1", "lab2"], store=False)
    lab2 = cloud_config(lab, "lab2")
    if wants is not None:
        lab2 = dataclasses.replace(lab2, disk_formats=(wants,))
    config = dataclasses.replace(
        config,
        clouds={**config.clouds, "lab2": lab2},
        state_dir=work / f"state-{time.monotonic_ns()}",
        conversion=ConversionConfig(work / "scratch", 4096 * MiB),
    )
    started = time.monotonic()
    assert push(config, name) == 0
    seconds = time.monotonic() - started
    admin = glance_client(lab, "lab2", admin=True)
    for img in images_named(lab, "lab2", name):
        admin.images.delete(img["id"])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lab-dir", type=Path, required=True)
    ap.add_argument("--size-mb", type=int, default=256, help="virtual size of the disk")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/convert.json")
    args = ap.parse_args()
    # a running lab is reused as it is (the tests' way: up() on a running lab just reads it)
    lab = lab_mod.up(clouds=3, directory=args.lab_dir)
    out: dict[str, object] = {"size_mb": args.size_mb, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for have, wants in (("qcow2", "raw"), ("raw", "qcow2")):
            data = make_disk(work, have, args.size_mb * MiB)
            name = uid(f"bench-{have}")
            gc = glance_client(lab, "lab1")
            img = gc.images.create(name=name, disk_format=have, container_format="bare")
            gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
            relay: list[float] = []
            conv: list[float] = []
            for i in range(args.repeat):
                order = [None, wants] if i % 2 == 0 else [wants, None]
                for w in order:
                    (relay if w is None else conv).append(one_run(lab, work, name, w))
            gc.images.delete(img["id"])
            ratios = [c / r for c, r in zip(conv, relay, strict=True)]
            row = {
                "source_bytes": len(data),
                "relay_s": relay,
                "convert_s": conv,
                "relay_median_s": statistics.median(relay),
                "convert_median_s": statistics.median(conv),
                "paired_ratio_median": statistics.median(ratios),
            }
            out[f"{have}->{wants}"] = row
            print(
                f"{have} → {wants}: source {len(data) / MiB:.0f} MiB; relay "
                f"{row['relay_median_s']:.2f} s, conversion {row['convert_median_s']:.2f} s, "
                f"paired ratio {row['paired_ratio_median']:.2f}"
            )
    args.results.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
