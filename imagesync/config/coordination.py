"""Reading the ``coordination:`` section: several daemons sharing the work through tooz.

Kept out of ``config.load`` (which only calls :func:`parse_coordination`) so that the section's
rules live in one place. Every mistake names the file, the key and the fix; the URL may hold
credentials, so messages show it without them (``CoordinationConfig.display_url``).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from imagesync.config.document import Document, join, suggest
from imagesync.config.types import (
    COORDINATION_KEYS,
    LEASE_TIMEOUT_RANGE,
    CoordinationConfig,
)
from imagesync.secrets import register_secret

#: tooz drivers by URL scheme; etcd (through its HTTP gateway) is the reference backend,
#: the others are accepted where tooz supports them (see README: what each guarantees)
SCHEMES = (
    "etcd3+http",
    "etcd3+https",
    "redis",
    "rediss",
    "zookeeper",
    "kazoo",
    "memcached",
    "consul",
    "file",
)
_EXAMPLE = "etcd3+http://etcd.example.org:2379"
_MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,99}")


def parse_coordination(
    doc: Document, raw: object, key: str = "coordination"
) -> CoordinationConfig | None:
    """The section, or None when it is absent (this host alone, local locks)."""
    if raw is None:
        return None
    section = doc.mapping(raw, key, f"write `{key}: {{url: {_EXAMPLE}}}`")
    doc.known_keys(section, key, COORDINATION_KEYS, {})
    if "url" not in section:
        doc.fail(key, f"has no url: add `url: {_EXAMPLE}` (the tooz backend's URL)")
    url_key = join(key, "url")
    url = doc.string(section["url"], url_key, "a URL").strip()
    parts = urlsplit(url)
    if parts.password:
        register_secret(parts.password)
    shown = CoordinationConfig(url=url).display_url
    if parts.scheme not in SCHEMES:
        doc.fail(
            url_key,
            f"{shown!r} names no coordination backend imagesync knows: "
            f"{suggest(parts.scheme, SCHEMES)}write it like {_EXAMPLE} "
            f"(schemes: {', '.join(SCHEMES)})",
        )
    if parts.scheme != "file" and not parts.hostname:
        doc.fail(url_key, f"{shown!r} has no host: write it like {_EXAMPLE}")
    out = CoordinationConfig(url=url)
    if "lease_timeout" in section:
        out = CoordinationConfig(
            url=url,
            lease_timeout=doc.duration(
                section["lease_timeout"], join(key, "lease_timeout"), within=LEASE_TIMEOUT_RANGE
            ),
        )
    member_id = None
    if section.get("member_id") is not None:
        mkey = join(key, "member_id")
        member_id = doc.string(section["member_id"], mkey)
        if not _MEMBER_ID.fullmatch(member_id):
            doc.fail(
                mkey,
                f"{member_id!r} is not a usable member id: use letters, digits and . _ : @ - "
                "(at most 100), e.g. imagesync@host1, or leave it out (host + instance)",
            )
    group = "imagesync"
    if section.get("group") is not None:
        gkey = join(key, "group")
        group = doc.string(section["group"], gkey)
        if not _MEMBER_ID.fullmatch(group):
            doc.fail(gkey, f"{group!r}: use letters, digits and . _ : @ - (at most 100)")
    return CoordinationConfig(
        url=url, lease_timeout=out.lease_timeout, member_id=member_id, group=group
    )
