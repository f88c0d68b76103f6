"""Save on shutdown's decisions (imagesync.saving) against a scripted Nova: a marked SHUTOFF
server is snapshotted once per shutdown, a running one waits, a name outside the rules is
refused on the server (written once, not every pass), a failed snapshot is not retried for
the same shutdown, and a new stop makes the server due again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from imagesync.config.types import ImageRule
from imagesync.saving import SAVE_AS, SAVE_ERROR, SAVED, TRIED, SaveOutcome, SaveState, save_marked
from imagesync.sites.nova import Server
from tests.fakeclock import FakeClock
from tests.unit.test_snapshot import FakeNova, _clock

RULES = (ImageRule(pattern="web-*", clouds=("c1",)),)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@dataclass
class MarkedNova(FakeNova):
    """One server, ``s1``, with metadata and a last stop time; metadata writes are counted."""

    metadata: dict[str, str] = field(default_factory=lambda: {SAVE_AS: "web-a"})
    booted_at: str | None = "2026-01-01T11:00:00.000000"
    writes: list[dict[str, str]] = field(default_factory=list)

    def _server(self) -> Server:
        return Server("s1", "srv", self.status, self.task_state, "img0", dict(self.metadata))

    def servers(self) -> list[Server]:
        return [self._server(), Server("s2", "other", "SHUTOFF", None, "img0")]

    def set_metadata(self, server_id: str, metadata: Mapping[str, str]) -> None:
        self.writes.append(dict(metadata))
        self.metadata.update(metadata)

    def delete_metadata(self, server_id: str, key: str) -> None:
        self.metadata.pop(key, None)

    def last_booted(self, server_id: str) -> str | None:
        return self.booted_at


def _save(nova: MarkedNova) -> list[SaveState]:
    made: list[str] = []
    out = save_marked(
        nova, RULES, timeout=60, record=lambda i, n: made.append(i), clock=_clock(FakeClock())
    )
    nova.task_state = None  # the snapshot's task is over (the fake does not get there alone)
    assert all(o.server_id == "s1" for o in out)  # the unmarked server is not looked at
    return [o.state for o in out]


def test_saved_once_per_shutdown_and_again_after_a_new_stop() -> None:
    nova = MarkedNova()
    assert _save(nova) == [SaveState.SAVED]
    assert nova.metadata[SAVED].startswith("snap1 ") and nova.calls.count("create web-a") == 1
    assert _save(nova) == [SaveState.UP_TO_DATE]  # stays off: not saved twice
    assert nova.calls.count("create web-a") == 1
    nova.booted_at = (
        datetime.now(UTC).replace(year=2100).isoformat()
    )  # booted (and so stopped) again
    nova.image_states, nova.task_states = ["active"], [None]
    assert _save(nova) == [SaveState.SAVED]
    assert nova.calls.count("create web-a") == 2


def test_a_running_server_waits() -> None:
    nova = MarkedNova(status="ACTIVE")
    assert _save(nova) == [SaveState.NOT_SHUTOFF]
    assert not any(c.startswith("create") for c in nova.calls) and nova.writes == []


def test_a_name_outside_the_rules_is_refused_once_on_the_server() -> None:
    nova = MarkedNova(metadata={SAVE_AS: "db-a"})
    assert _save(nova) == [SaveState.REFUSED]
    assert "refused" in nova.metadata[SAVE_ERROR] and "db-a" in nova.metadata[SAVE_ERROR]
    assert _save(nova) == [SaveState.REFUSED]
    assert len(nova.writes) == 1  # not rewritten every pass
    assert not any(c.startswith("create") for c in nova.calls)


def test_a_failed_snapshot_is_not_retried_for_the_same_shutdown() -> None:
    nova = MarkedNova(image_states=["gone"])
    assert _save(nova) == [SaveState.FAILED]
    assert "snapshot failed" in nova.metadata[SAVE_ERROR] and TRIED in nova.metadata
    assert _save(nova) == [SaveState.UP_TO_DATE]
    assert nova.calls.count("create web-a") == 1


def test_a_save_in_progress_is_shown_on_the_server_and_cleared() -> None:
    from imagesync.saving import SAVING

    nova = MarkedNova()
    seen: list[str] = []
    writes = nova.set_metadata

    def spy(server_id: str, metadata: Mapping[str, str]) -> None:
        writes(server_id, metadata)
        if SAVING in metadata:
            seen.append(metadata[SAVING].split(" since ")[0])

    nova.set_metadata = spy  # type: ignore[method-assign]
    assert _save(nova) == [SaveState.SAVED]
    assert seen == ["snapshotting", "waiting for active: snap1"]
    assert SAVING not in nova.metadata  # cleared once the save ended


def test_a_save_under_way_is_shown_live_on_the_status_page() -> None:
    """The daemon's page learns of a save while it runs (snapshotting, then waiting for the
    image), not only from the pass's outcome afterwards."""
    from imagesync.daemon.live import LiveStatus

    live = LiveStatus()
    seen: list[tuple[str, str]] = []

    def saving(o: SaveOutcome, what: str) -> None:
        live.observe_saving({**o.as_dict(), "saving": what})
        (row,) = live.document()["saves"]
        seen.append((row["state"], row["saving"].split(" since ")[0]))

    nova = MarkedNova()
    save_marked(
        nova, RULES, timeout=60, record=lambda i, n: None, clock=_clock(FakeClock()), saving=saving
    )
    assert seen == [("saving", "snapshotting"), ("saving", "waiting for active: snap1")]
