"""Save on shutdown: a server its user marked (``imagesync.save-as=NAME``) is snapshotted as
the newest version of NAME once it is SHUTOFF, once per shutdown.

The server's own metadata is the record, so that its user reads it where they set the mark
(``openstack server show``):

- ``imagesync.saved=<image id> <time>``: the last snapshot that became active;
- ``imagesync.save-tried=<time>``: the last attempt that failed (not retried for the same
  shutdown: a broken snapshot must not loop once a pass);
- ``imagesync.save-error=<reason>``: why the last attempt failed or was refused (a NAME that no
  image rule matches is refused without a snapshot; it is looked at again every pass, so a
  fixed mark or a new rule takes effect). Removed once a save succeeds.

"Once per shutdown": a SHUTOFF server is saved when it has not been saved (or tried) since it
last booted (its newest create/start/reboot/... instance action): being off now, it has been
shut down since. A server booted and stopped again is saved again; one that stays off is not;
a guest that powered itself off counts like a stop (no stop action is needed). A server
whose actions Nova does not list is saved once (imagesync.saved set: done). The times
compared are Nova's and imagesync's clocks: the hosts are expected to keep time (NTP).

Bounded: the servers of one cloud are saved one at a time (concurrency 1 per cloud), each
within the snapshot timeout. Nothing here raises for one server's trouble: each outcome is a
:class:`SaveOutcome` (logged, and shown by ``status``).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from imagesync.config.types import Config, ImageRule
from imagesync.errors import ImageSyncError
from imagesync.model import SiteInventory
from imagesync.plan import rule_for
from imagesync.sites.nova import Server
from imagesync.snapshot import Clock, Nova, SnapshotRequest, take

log = structlog.get_logger("imagesync.saving")

SAVE_AS = "imagesync.save-as"
SAVED = "imagesync.saved"
TRIED = "imagesync.save-tried"
SAVE_ERROR = "imagesync.save-error"
#: while a save runs: "snapshotting since T", then "waiting for active: IMAGE since T"
#: (removed when it ends), so that ``status`` and ``openstack server show`` say what is going on
SAVING = "imagesync.saving"
#: Nova refuses metadata values longer than this
MAX_VALUE = 255


class SaveState(enum.Enum):
    """What became of one marked server in one pass."""

    SAVED = "saved"  # snapshotted and active now
    FAILED = "failed"  # the snapshot failed (why: the error)
    REFUSED = "refused"  # NAME matches no image rule
    UP_TO_DATE = "up to date"  # saved since its last shutdown already
    SAVING = "saving"  # under way (only ever seen live, by the status page)
    NOT_SHUTOFF = "not shutoff"  # running (or busy): nothing to do yet


@dataclass(frozen=True)
class SaveOutcome:
    cloud: str
    server_id: str
    server_name: str
    name: str
    state: SaveState
    image_id: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "cloud": self.cloud,
            "server": self.server_id,
            "server_name": self.server_name,
            "name": self.name,
            "state": self.state.value,
            "image_id": self.image_id,
            "error": self.error,
        }


class SaveNova(Nova, Protocol):
    """What saving needs of a cloud's Nova beyond a snapshot (sites.nova.NovaSnapshots)."""

    def servers(self) -> list[Server]: ...
    def set_metadata(self, server_id: str, metadata: Mapping[str, str]) -> None: ...
    def delete_metadata(self, server_id: str, key: str) -> None: ...
    def last_booted(self, server_id: str) -> str | None: ...


def parse_time(text: str | None) -> datetime | None:
    """Nova's times (with or without a zone; naive means UTC) and ours; None if unreadable."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def last_attempt(server: Server) -> datetime | None:
    """When the server was last saved or tried, from its metadata."""
    saved = server.metadata.get(SAVED, "").split()
    times = [
        parse_time(saved[1]) if len(saved) > 1 else None,
        parse_time(server.metadata.get(TRIED)),
    ]
    found = [t for t in times if t is not None]
    return max(found) if found else None


def _set_error(nova: SaveNova, server: Server, reason: str, tried: datetime | None) -> None:
    meta = {SAVE_ERROR: reason[:MAX_VALUE]}
    if tried is not None:
        meta[TRIED] = _stamp(tried)
    if all(server.metadata.get(k) == v for k, v in meta.items()):
        return  # said already: no write every pass
    nova.set_metadata(server.id, meta)


def _set_saved(nova: SaveNova, server: Server, image_id: str, started: datetime) -> None:
    """Mark the server saved by ``image_id``; an error from an earlier try no longer holds."""
    nova.set_metadata(server.id, {SAVED: f"{image_id} {_stamp(started)}"})
    if SAVE_ERROR in server.metadata:
        nova.delete_metadata(server.id, SAVE_ERROR)


def _not_due(
    nova: SaveNova, server: Server, rules: Sequence[ImageRule], name: str
) -> tuple[SaveState, str | None] | None:
    """Why the server is not saved now: (its state, the error it is refused with, if any);
    None when it is due. A refusal is written on the server, where its user looks."""
    if rule_for(rules, name) is None:
        reason = f"refused: no image rule of imagesync matches {name!r}"
        _set_error(nova, server, reason, None)
        return SaveState.REFUSED, reason
    if server.status != "SHUTOFF" or server.task_state is not None:
        return SaveState.NOT_SHUTOFF, None
    booted = parse_time(nova.last_booted(server.id))
    attempted = last_attempt(server)
    if attempted is not None and (booted is None or attempted >= booted):
        return SaveState.UP_TO_DATE, None
    return None


def save_server(
    nova: SaveNova,
    server: Server,
    rules: Sequence[ImageRule],
    *,
    timeout: float,
    record: Callable[[str, str], None],
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Clock | None = None,
    saving: Callable[[SaveOutcome, str], None] = lambda o, what: None,
) -> SaveOutcome:
    """Look at one marked server; snapshot it if it is due. Raises only SiteError (Nova
    unreachable while reading or writing the server's metadata)."""
    name = server.metadata.get(SAVE_AS, "").strip()

    def outcome(
        state: SaveState,
        image_id: str | None = None,
        error: str | None = None,
        seconds: float = 0.0,
    ) -> SaveOutcome:
        return SaveOutcome(nova.name, server.id, server.name, name, state, image_id, error, seconds)

    not_due = _not_due(nova, server, rules, name)
    if not_due is not None:
        state, reason = not_due
        return outcome(state, error=reason)
    log.info("save.snapshotting", cloud=nova.name, server=server.id, name=name)
    started = now()
    nova.set_metadata(server.id, {SAVING: f"snapshotting since {_stamp(started)}"})
    saving(outcome(SaveState.SAVING), f"snapshotting since {_stamp(started)}")

    def made(image_id: str, image_name: str) -> None:
        record(image_id, image_name)
        what = f"waiting for active: {image_id} since {_stamp(started)}"
        saving(outcome(SaveState.SAVING, image_id=image_id), what)
        with contextlib.suppress(ImageSyncError):  # the state shown is a courtesy
            nova.set_metadata(server.id, {SAVING: what})

    try:
        request = SnapshotRequest(server.id, name=name, timeout=timeout)
        result = take(nova, request, clock=clock, record=made)
    except ImageSyncError as exc:
        reason = f"snapshot failed: {exc}"
        log.warning("save.failed", cloud=nova.name, server=server.id, name=name, error=str(exc))
        _set_error(nova, server, reason, started)
        return outcome(SaveState.FAILED, error=reason)
    finally:
        with contextlib.suppress(ImageSyncError):
            nova.delete_metadata(server.id, SAVING)
    _set_saved(nova, server, result.image_id, started)
    log.info(
        "save.saved",
        cloud=nova.name,
        server=server.id,
        name=name,
        image_id=result.image_id,
        seconds=round(result.seconds, 2),
    )
    return outcome(SaveState.SAVED, image_id=result.image_id, seconds=result.seconds)


def save_marked(
    nova: SaveNova,
    rules: Sequence[ImageRule],
    *,
    timeout: float,
    record: Callable[[str, str], None],
    clock: Clock | None = None,
    saving: Callable[[SaveOutcome, str], None] = lambda o, what: None,
) -> list[SaveOutcome]:
    """Every marked server of one cloud, one at a time (concurrency 1 per cloud). A server
    whose metadata cannot be read or written is logged and left for the next pass."""
    out: list[SaveOutcome] = []
    for server in nova.servers():
        if SAVE_AS not in server.metadata:
            continue
        try:
            out.append(
                save_server(
                    nova,
                    server,
                    rules,
                    timeout=timeout,
                    record=record,
                    clock=clock,
                    saving=saving,
                )
            )
        except ImageSyncError as exc:
            log.warning("save.error", cloud=nova.name, server=server.id, error=str(exc))
            out.append(
                SaveOutcome(
                    nova.name,
                    server.id,
                    server.name,
                    server.metadata.get(SAVE_AS, ""),
                    SaveState.FAILED,
                    error=str(exc),
                )
            )
    return out


def marked_states(nova: SaveNova) -> list[dict[str, str]]:
    """For ``status``: each marked server of the cloud and what its metadata says."""
    rows = []
    for s in nova.servers():
        if SAVE_AS not in s.metadata:
            continue
        rows.append(
            {
                "cloud": nova.name,
                "server": s.id,
                "server_name": s.name,
                "save_as": s.metadata[SAVE_AS],
                "status": s.status,
                "saved": s.metadata.get(SAVED, ""),
                "error": s.metadata.get(SAVE_ERROR, ""),
                "saving": s.metadata.get(SAVING, ""),
            }
        )
    return rows


def save_rows(
    config: Config, name: str | None, inventories: Mapping[str, SiteInventory]
) -> tuple[list[dict[str, str]], list[str]]:
    """For ``status``: the servers marked for save on shutdown, on the clouds that have
    compute and answered this listing (``inventories``), and what their metadata says
    (``state``: saving, error, saved or not saved yet); only those saved as ``name`` when it
    is given. Also a line for each cloud whose servers could not be listed."""
    from imagesync.sites.nova import NovaSnapshots
    from imagesync.sites.openstack import make_session

    out: list[dict[str, str]] = []
    errors: list[str] = []
    for cloud, cfg in config.clouds.items():
        if cloud not in inventories or not inventories[cloud].ok:
            continue  # unreachable, said above; or not listed (status NAME lists them all)
        try:
            nova = NovaSnapshots(cfg, make_session(cfg))
            rows = marked_states(nova) if nova.has_compute() else []
        except ImageSyncError as exc:
            errors.append(f"  save on shutdown, {cloud}: cannot list servers: {exc}")
            continue
        for r in rows:
            if name is not None and r["save_as"] != name:
                continue
            state = (
                f"SAVING: {r['saving']}"
                if r.get("saving")
                else f"ERROR: {r['error']}"
                if r["error"]
                else f"saved {r['saved']}"
                if r["saved"]
                else "not saved yet"
            )
            out.append({**r, "state": state})
    return out, errors
