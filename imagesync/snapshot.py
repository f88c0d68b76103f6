"""Taking a snapshot of a server as a new version of an image name: Nova's ``createImage``,
then watching it until the image is ``active`` or the snapshot has failed.

The snapshot is an original: Nova writes ``image_type=snapshot`` and ``instance_uuid`` on it
and copies its base image's properties, imagesync's provenance marks included; the model
(``ImageRecord.is_server_image``) ignores inherited marks, so a snapshot of a server booted
from an imagesync copy is a version of its own, newer than the copy's (never "the same
version"). It is recorded as made by imagesync (state ``made``), so that its name's rule may
retire it later like any copy imagesync made.

A snapshot has failed when its image is ``killed``/``deleted`` or gone (Nova deletes the image
when the upload fails), or when the server's task state is back to none while the image is
not active. Whatever it left is removed. The clock and the sleep are passed in (unit tests run
the whole watch without waiting).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from imagesync.errors import ImageSyncError, SiteError, UsageError
from imagesync.sites.nova import Server, SnapshotImage

log = structlog.get_logger("imagesync.snapshot")

FAILED_STATUSES = frozenset({"killed", "deleted", "gone"})
#: how often the server and the image are looked at while waiting
POLL = 0.5


class SnapshotFailed(ImageSyncError):
    """The snapshot did not become an active image; whatever it left was removed."""


class Nova(Protocol):
    """What taking a snapshot needs of a cloud's Nova (sites.nova.NovaSnapshots)."""

    name: str

    def find_server(self, ref: str) -> Server: ...
    def get_server(self, server_id: str) -> Server: ...
    def stop(self, server_id: str) -> None: ...
    def create_image(self, server_id: str, name: str, metadata: Mapping[str, str]) -> str: ...
    def get_image(self, image_id: str) -> SnapshotImage: ...
    def image_name(self, image_id: str) -> str | None: ...
    def delete_image(self, image_id: str) -> bool: ...
    def failure_detail(self, server_id: str) -> str | None: ...


@dataclass
class SnapshotResult:
    """What became of one snapshot."""

    cloud: str
    server_id: str
    server_name: str
    name: str
    image_id: str
    status: str  # the image's: "active" once waited for, else as created ("queued")
    sha512: str | None = None
    size: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    stopped: bool = False  # imagesync stopped the server first (--stop)

    def as_dict(self) -> dict[str, Any]:
        """The ``snapshot --json`` answer of a snapshot that was taken."""
        return {
            "ok": True,
            "cloud": self.cloud,
            "server": self.server_id,
            "name": self.name,
            "image_id": self.image_id,
            "status": self.status,
            "sha512": self.sha512,
            "size": self.size,
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class Clock:
    """Time for waiting, passed in."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def _wait_shutoff(nova: Nova, server_id: str, deadline: float, clock: Clock) -> Server:
    while True:
        server = nova.get_server(server_id)
        if server.status == "SHUTOFF" and server.task_state is None:
            return server
        if server.status == "ERROR":
            raise SnapshotFailed(
                f"{nova.name}: server {server_id} went into ERROR while stopping"
                + (f": {server.fault}" if server.fault else "")
            )
        if clock.now() > deadline:
            raise SnapshotFailed(
                f"{nova.name}: server {server_id} did not stop in time (it is {server.status})"
            )
        clock.sleep(POLL)


def default_name(nova: Nova, server: Server) -> str:
    """The name of the image the server was booted from: the snapshot is its next version."""
    name = nova.image_name(server.image_id) if server.image_id else None
    if not name:
        raise UsageError(
            f"server {server.name or server.id} on {nova.name}: its base image is gone or has "
            "no name: say which image name the snapshot is a version of with --as NAME"
        )
    return name


@dataclass(frozen=True)
class SnapshotRequest:
    """Which server to snapshot as a version of which name, and how: what ``snapshot`` on the
    command line asks for, handed unchanged to :func:`take` (the daemon's save, too)."""

    #: the server's id or unique name
    server: str
    #: the image name the snapshot is a version of (None: its base image's name)
    name: str | None = None
    #: stop a running server first and leave it stopped. Without it, a server that is not
    #: SHUTOFF is snapshotted anyway, with a warning (its disk may be inconsistent)
    stop: bool = False
    #: watch until active (else return once Nova accepted the request)
    wait: bool = True
    #: seconds for stopping and becoming active together
    timeout: float = 600.0


def take(
    nova: Nova,
    request: SnapshotRequest,
    *,
    clock: Clock | None = None,
    record: Callable[[str, str], None] | None = None,
) -> SnapshotResult:
    """Snapshot the server ``request`` names, as it says. ``record`` is called with (image
    id, name) once Nova has made the image: imagesync made it. Raises SnapshotFailed (after
    removing what the snapshot left) or SiteError.
    """
    clock = clock or Clock()
    start = clock.now()
    deadline = start + request.timeout
    server = nova.find_server(request.server)
    target = request.name or default_name(nova, server)
    server, stopped, warnings = _quiesce(nova, server, request.stop, deadline, clock)
    image_id = nova.create_image(server.id, target, {})
    log.info("snapshot.created", cloud=nova.name, server=server.id, image_id=image_id, name=target)
    if record is not None:
        record(image_id, target)
    result = SnapshotResult(
        cloud=nova.name,
        server_id=server.id,
        server_name=server.name,
        name=target,
        image_id=image_id,
        status="queued",
        warnings=warnings,
        stopped=stopped,
    )
    if not request.wait:
        result.seconds = clock.now() - start
        return result
    image = _watch(nova, server.id, image_id, deadline, request.timeout, clock)
    result.status, result.sha512, result.size = image.status, image.sha512, image.size
    result.seconds = clock.now() - start
    log.info("snapshot.active", cloud=nova.name, image_id=image_id, seconds=result.seconds)
    return result


def _quiesce(
    nova: Nova, server: Server, stop: bool, deadline: float, clock: Clock
) -> tuple[Server, bool, list[str]]:
    """The server ready to be snapshotted: (it, whether imagesync stopped it, warnings).
    Stopped first with ``stop``, else snapshotted as it is, with a warning when it runs;
    SnapshotFailed when a task of its own is under way."""
    warnings: list[str] = []
    stopped = False
    if server.status != "SHUTOFF":
        if stop:
            log.info("snapshot.stopping", cloud=nova.name, server=server.id)
            if server.status == "ACTIVE":
                nova.stop(server.id)
            server = _wait_shutoff(nova, server.id, deadline, clock)
            stopped = True
        else:
            warnings.append(
                f"server {server.name or server.id} is {server.status}, not SHUTOFF: its disk "
                "may be inconsistent (use --stop to stop it first)"
            )
    if server.task_state is not None:
        raise SnapshotFailed(
            f"{nova.name}: server {server.name or server.id} is busy ({server.task_state}): "
            "try again when it is done"
        )
    return server, stopped, warnings


def _watch(
    nova: Nova, server_id: str, image_id: str, deadline: float, timeout: float, clock: Clock
) -> SnapshotImage:
    """Until the image is active; on failure or timeout remove it and raise SnapshotFailed."""
    try:
        while True:
            image = nova.get_image(image_id)
            if image.status == "active":
                return image
            if image.status in FAILED_STATUSES:
                _fail(nova, server_id, image_id, f"Nova's image is {image.status}")
            server = nova.get_server(server_id)
            if server.task_state is None:
                # the driver finishes the upload before it clears the task state: look again
                image = nova.get_image(image_id)
                if image.status == "active":
                    return image
                _fail(
                    nova,
                    server_id,
                    image_id,
                    f"the server's task is over but the image is {image.status}",
                )
            if clock.now() > deadline:
                _fail(
                    nova,
                    server_id,
                    image_id,
                    f"not active within {timeout:.0f} s (image {image.status}, "
                    f"task {server.task_state})",
                )
            clock.sleep(POLL)
    except SiteError as exc:
        _cleanup(nova, image_id)
        raise SnapshotFailed(
            f"{nova.name}: snapshot {image_id} of server {server_id} failed: {exc}"
        ) from None


def _fail(nova: Nova, server_id: str, image_id: str, why: str) -> None:
    detail = nova.failure_detail(server_id)
    removed = _cleanup(nova, image_id)
    raise SnapshotFailed(
        f"{nova.name}: snapshot of server {server_id} failed: {why}; Nova says: "
        f"{detail or 'no reason given (see the compute log)'}"
        + ("" if removed else f"; image {image_id} could not be removed: remove it by hand")
    )


def _cleanup(nova: Nova, image_id: str) -> bool:
    try:
        if nova.get_image(image_id).status == "gone":
            return True
    except SiteError:
        pass  # try the delete all the same
    return nova.delete_image(image_id)
