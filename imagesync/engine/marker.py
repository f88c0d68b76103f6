"""The upload marker: which imagesync owns an unpublished upload, and until when.

Locks and leases live in one host's ``state_dir``, so another imagesync (a standby host, an
admin's laptop with its own state) cannot tell from them whether an upload it finds is a crash
leftover or someone else's copy in flight. Every upload therefore carries a property,
``imagesync.upload``, set when it is created (in the same request as the ``uploading`` mark),
naming its owner: host, instance id (a uuid kept in the owner's ``state_dir``), process, start
time and lease expiry, as compact JSON (well under Glance's 255-character property limit).

Recovery removes an upload of *another* instance only once its lease has expired (plus a grace
for clock skew between hosts); its own instance's uploads follow the lock rule (a free
``(name, site)`` lock means no live process of ours writes it).

The lease is not renewed while the upload runs: it is chosen long enough for any copy
(:func:`lease_seconds`: six hours, or the image's size at 1 MiB/s when that is longer), and
the transfer refuses to publish an upload that outlived it (it removes it instead), so an
instance that cleans an expired upload never destroys a copy that could still be published.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from imagesync.model import PROP_UPLOAD, ImageRecord

__all__ = ["PROP_UPLOAD", "UploadMarker", "lease_seconds"]
#: the shortest lease an upload gets
MIN_LEASE = 6 * 3600.0
#: the slowest transfer rate a lease allows for, in bytes per second
MIN_RATE = float(1 << 20)
#: another instance's upload is removed only this long after its lease expired: the hosts'
#: clocks may disagree (this instance's clock decides, the owner's wrote ``expires``)
SKEW_GRACE = 3600.0


def lease_seconds(size: int | None) -> float:
    """How long an upload of ``size`` bytes may take before others may remove it."""
    return max(MIN_LEASE, (size or 0) / MIN_RATE)


@dataclass(frozen=True)
class UploadMarker:
    """Who owns an upload and until when (times are the owner's clock, seconds since epoch)."""

    host: str
    instance: str
    pid: int
    started: float
    expires: float

    @classmethod
    def new(cls, instance: str, now: float, size: int | None) -> UploadMarker:
        return cls(
            host=socket.gethostname()[:64],
            instance=instance,
            pid=os.getpid(),
            started=now,
            expires=now + lease_seconds(size),
        )

    def to_property(self) -> str:
        return json.dumps(
            {
                "host": self.host,
                "instance": self.instance,
                "pid": self.pid,
                "started": int(self.started),
                "expires": int(self.expires),
            },
            separators=(",", ":"),
        )

    @classmethod
    def of(cls, rec: ImageRecord) -> UploadMarker | None:
        """The marker ``rec`` carries, or None (none, or unreadable: made before markers)."""
        raw = rec.properties.get(PROP_UPLOAD)
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(
                host=str(d["host"]),
                instance=str(d["instance"]),
                pid=int(d["pid"]),
                started=float(d["started"]),
                expires=float(d["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def live_for_others(self, now: float) -> bool:
        """Must another instance leave this upload alone at ``now`` (its own clock)?"""
        return now < self.expires + SKEW_GRACE
