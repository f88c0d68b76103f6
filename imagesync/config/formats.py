"""Reading the disk-format settings: a cloud's ``disk_formats:`` and the top-level
``conversion:`` (scratch directory and its size bound).

Kept apart from :mod:`imagesync.config.load`, which calls :func:`with_disk_formats` and
:func:`parse_conversion` once each; what the settings mean for a copy is
:func:`imagesync.model.choose_format` and :mod:`imagesync.convert`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from imagesync.config.document import Document, index, join, suggest
from imagesync.config.types import (
    CONVERSION_KEYS,
    CloudConfig,
    ConversionConfig,
    describe,
)
from imagesync.model import DISK_FORMATS

_FORMATS_HINT = "write a list like [raw] or [qcow2, raw] (accepted formats, preferred first)"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_SIZE_HINT = "write a size like 20G, 512M or 1.5T (binary units; a bare number is bytes)"
#: below this a scratch directory cannot hold even a small image and its conversion
MIN_SCRATCH = 1024**2


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512M"``, ``"20G"``, ``"1.5TiB"`` (K/M/G/T/P are powers of
    1024). Raises ValueError saying what is wrong."""
    if isinstance(value, bool):
        raise ValueError("is true/false, not a size")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"is {describe(value)}, not a size")
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a size")
    power = " kmgtp".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * 1024**power)


def _formats(doc: Document, raw: object, key: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]  # `disk_formats: raw` means [raw]
    if not isinstance(raw, list) or not raw:
        doc.fail(key, f"is {describe(raw)}; {_FORMATS_HINT}")
    out: list[str] = []
    for i, item in enumerate(raw):
        ikey = index(key, i)
        if not isinstance(item, str) or item.strip().lower() not in DISK_FORMATS:
            shown = repr(item) if isinstance(item, str) else describe(item)
            hint = suggest(item, DISK_FORMATS) if isinstance(item, str) else ""
            doc.fail(
                ikey,
                f"{shown} is not a Glance disk format: {hint}"
                f"use some of: {', '.join(DISK_FORMATS)}",
            )
        fmt = item.strip().lower()
        if fmt in out:
            doc.fail(ikey, f"{fmt!r} is listed twice: remove one")
        out.append(fmt)
    return tuple(out)


def with_disk_formats(
    doc: Document, raw_clouds: Mapping[str, Any], clouds: Mapping[str, CloudConfig]
) -> dict[str, CloudConfig]:
    """``clouds`` with each one's ``disk_formats:`` (as written under ``clouds: NAME:``)."""
    out = dict(clouds)
    for name, body in raw_clouds.items():
        if isinstance(body, Mapping) and "disk_formats" in body and name in out:
            formats = _formats(
                doc, body["disk_formats"], join(join("clouds", name), "disk_formats")
            )
            out[name] = dataclasses.replace(out[name], disk_formats=formats)
    return out


def parse_conversion(doc: Document, raw: object) -> ConversionConfig:
    """``conversion: {scratch_dir: PATH, scratch_max_size: 20G}`` (both optional)."""
    body = doc.mapping(
        raw, "conversion", "write `scratch_dir: /var/tmp/imagesync` and `scratch_max_size: 20G`"
    )
    doc.known_keys(body, "conversion", CONVERSION_KEYS)
    conv = ConversionConfig()
    if body.get("scratch_dir") is not None:
        conv = dataclasses.replace(
            conv, scratch_dir=doc.path(body["scratch_dir"], "conversion.scratch_dir")
        )
    if "scratch_max_size" in body:
        key = "conversion.scratch_max_size"
        try:
            size = parse_size(body["scratch_max_size"])
        except ValueError as exc:
            doc.fail(key, f"{exc}: {_SIZE_HINT}")
        if size < MIN_SCRATCH:
            doc.fail(key, f"is {size} bytes: give at least 1M ({_SIZE_HINT})")
        conv = dataclasses.replace(conv, scratch_max_size=size)
    return conv
