"""How a VOSpace store's nodes read as images, and images' properties as node properties.

An image's id is ``NAME/LEAF``. Provenance, formats and the image's own properties are node
properties under imagesync's URIs (``ivo://imagesync/image#sha512``, ``#origin``, ``#version``,
``#disk_format``, …; user properties as ``ivo://imagesync/property#KEY``); the md5 is the
service's own ``core#MD5`` (never reported for a compressed node, whose md5 is the frame's). A
data node written by someone else (``vmsave``, ``vcp``) is an image of its container's name;
its format is guessed from its extension. An upload still under way (marked, or under its
hidden ``.LEAF.uploading`` name) is hidden.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from urllib.parse import unquote

from imagesync.model import PROP_STATE, STATE_UPLOADING, ImageRecord, parse_time
from imagesync.sites.compress import SUFFIX, ZSTD
from imagesync.sites.vosproto import CORE, IMAGE, PROPERTY, Node, quote_segment

#: node properties under IMAGE that are the record's own fields, not image properties
_ATTRS = (
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "visibility",
    "hidden",
    "compress",
    "size",
)
_FORMAT_OF_EXT = {".qcow2": "qcow2", ".img": "raw", ".raw": "raw", ".vmdk": "vmdk", ".iso": "iso"}
HIDDEN = re.compile(r"^\.(.+)\.uploading$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


def md5_of(node: Node) -> str | None:
    """The service's md5 of the node's stored bytes, if it gave a well-formed one."""
    value = node.properties.get(CORE + "MD5", "").lower().removeprefix("md5:")
    return value if _HEX32.match(value) else None


def record(site: str, name: str, node: Node) -> ImageRecord:
    """The image a data node of ``name``'s container holds, as site ``site`` reports it."""
    p = node.properties
    leaf = node.leaf
    m = HIDDEN.match(leaf)
    uploading_name = m is not None
    if m is not None:
        leaf = m.group(1)
    props: dict[str, str] = {}
    for uri, value in p.items():
        if uri.startswith(PROPERTY):
            props[unquote(uri[len(PROPERTY) :])] = value
        elif uri.startswith(IMAGE) and uri[len(IMAGE) :] not in _ATTRS:
            props["imagesync." + uri[len(IMAGE) :]] = value
    compressed = p.get(IMAGE + "compress") == ZSTD
    hashes: dict[str, str] = {}
    if (md5 := md5_of(node)) is not None and not compressed:
        hashes["md5"] = md5
    sha = p.get(IMAGE + "sha512", "").lower()
    if _HEX128.match(sha):
        hashes["sha512"] = sha
    in_progress = props.get(PROP_STATE) == STATE_UPLOADING
    status = "active"
    # an upload still under way has no hash yet (the service's md5 comes with the data)
    if node.busy or (in_progress and not hashes):
        status = "saving"
    created = (
        parse_time(p.get(CORE + "ctime")) or parse_time(p.get(CORE + "date")) or datetime.now(UTC)
    )
    plain = leaf.removesuffix(SUFFIX) if compressed else leaf
    suffix = "." + plain.rsplit(".", 1)[-1].lower() if "." in plain else ""
    size_prop = p.get(IMAGE + "size" if compressed else CORE + "length", "")
    disk_format = p.get(IMAGE + "disk_format") or _FORMAT_OF_EXT.get(suffix)
    return ImageRecord(
        site=site,
        id=f"{name}/{leaf}",
        name=name,
        status=status,
        created_at=created,
        updated_at=parse_time(p.get(CORE + "mtime")) or parse_time(p.get(CORE + "date")),
        size=int(size_prop) if size_prop.isdigit() else None,
        hashes=hashes,
        disk_format=disk_format,
        container_format=p.get(IMAGE + "container_format") or ("bare" if disk_format else None),
        min_disk=_int(p.get(IMAGE + "min_disk")),
        min_ram=_int(p.get(IMAGE + "min_ram")),
        properties=props,
        visibility=p.get(IMAGE + "visibility") or "private",
        hidden=uploading_name or in_progress or p.get(IMAGE + "hidden") == "true",
    )


def records(site: str, name: str, nodes: Iterable[Node]) -> Iterator[ImageRecord]:
    """The images among a container's children (other data nodes, and no dot-files)."""
    for node in nodes:
        if node.type != "DataNode":
            continue
        leaf = node.leaf
        if leaf.startswith(".") and not HIDDEN.match(leaf):
            continue  # someone's hidden file, not an image
        yield record(site, name, node)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def to_uris(properties: Mapping[str, str]) -> dict[str, str | None]:
    """imagesync's provenance (``imagesync.x``) → ``ivo://imagesync/image#x``; the image's own
    properties → ``ivo://imagesync/property#KEY``."""
    out: dict[str, str | None] = {}
    for key, value in properties.items():
        if key.startswith("imagesync."):
            out[IMAGE + key.removeprefix("imagesync.")] = value
        else:
            out[PROPERTY + quote_segment(key)] = value
    return out
