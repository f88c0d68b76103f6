"""Watching a snapshot (imagesync.snapshot.take) against a scripted Nova, on an injected clock:
success, each way a snapshot fails (and that its leftovers are removed), the warning for a
running server, --stop, and a busy server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from imagesync.errors import UsageError
from imagesync.sites.nova import Server, SnapshotImage
from imagesync.snapshot import POLL, Clock, SnapshotFailed, SnapshotRequest, take
from tests.fakeclock import FakeClock


@dataclass
class FakeNova:
    """A Nova whose image goes through ``image_states`` (one per look) while the server's
    task state goes through ``task_states``; every call is counted."""

    status: str = "SHUTOFF"
    task_state: str | None = None
    image_states: list[str] = field(default_factory=lambda: ["queued", "saving", "active"])
    task_states: list[str | None] = field(
        default_factory=lambda: ["image_pending_upload", "image_uploading", None]
    )
    base_name: str | None = "base"
    name: str = "c1"
    calls: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def _server(self) -> Server:
        return Server("s1", "srv", self.status, self.task_state, "img0")

    def find_server(self, ref: str) -> Server:
        self.calls.append("find")
        return self._server()

    def get_server(self, server_id: str) -> Server:
        self.calls.append("get_server")
        if self.image_created and self.task_states:
            self.task_state = self.task_states.pop(0)
        return self._server()

    image_created: bool = False

    def stop(self, server_id: str) -> None:
        self.calls.append("stop")
        self.status = "SHUTOFF"

    def create_image(self, server_id: str, name: str, metadata: Mapping[str, str]) -> str:
        self.calls.append(f"create {name}")
        self.image_created = True
        self.task_state = "image_snapshot"
        return "snap1"

    def get_image(self, image_id: str) -> SnapshotImage:
        self.calls.append("get_image")
        if image_id == "img0":
            return SnapshotImage(image_id, "active", name=self.base_name)
        if image_id in self.deleted:
            return SnapshotImage(image_id, "gone")
        state = self.image_states.pop(0) if len(self.image_states) > 1 else self.image_states[0]
        return SnapshotImage(image_id, state, size=10, sha512="ab" * 64)

    def image_name(self, image_id: str) -> str | None:
        return self.base_name

    def delete_image(self, image_id: str) -> bool:
        self.calls.append("delete")
        self.deleted.append(image_id)
        return True

    def failure_detail(self, server_id: str) -> str | None:
        return "the upload failed"


def _clock(fc: FakeClock) -> Clock:
    return Clock(now=fc, sleep=fc.sleep)


def test_waits_until_active_and_names_it_after_the_base_image() -> None:
    nova, fc = FakeNova(), FakeClock()
    made: list[tuple[str, str]] = []
    r = take(
        nova, SnapshotRequest("srv"), clock=_clock(fc), record=lambda i, n: made.append((i, n))
    )
    assert (r.status, r.name, r.image_id, r.warnings) == ("active", "base", "snap1", [])
    assert made == [("snap1", "base")]
    assert "delete" not in nova.calls and "stop" not in nova.calls


def test_without_wait_it_returns_once_nova_accepted() -> None:
    nova = FakeNova()
    r = take(nova, SnapshotRequest("srv", name="n", wait=False), clock=_clock(FakeClock()))
    assert r.status == "queued" and nova.calls.count("get_image") == 0


@pytest.mark.parametrize("final", ["killed", "deleted", "gone"])
def test_an_image_that_fails_or_vanishes_is_a_failure(final: str) -> None:
    nova = FakeNova(image_states=["queued", final], task_states=["image_uploading"])
    with pytest.raises(SnapshotFailed, match=f"image is {final}.*the upload failed"):
        take(nova, SnapshotRequest("srv", name="n"), clock=_clock(FakeClock()))
    # a killed/deleted image is removed; a gone one needs nothing
    assert nova.calls.count("delete") == (0 if final == "gone" else 1)


def test_task_over_without_an_active_image_is_a_failure_and_is_cleaned_up() -> None:
    nova = FakeNova(image_states=["queued"], task_states=[None])
    with pytest.raises(SnapshotFailed, match="task is over but the image is queued"):
        take(nova, SnapshotRequest("srv", name="n"), clock=_clock(FakeClock()))
    assert nova.deleted == ["snap1"]


def test_a_timeout_removes_the_snapshot() -> None:
    nova = FakeNova(image_states=["saving"], task_states=["image_uploading"] * 1000)
    fc = FakeClock()
    with pytest.raises(SnapshotFailed, match="not active within 5 s"):
        take(nova, SnapshotRequest("srv", name="n", timeout=5), clock=_clock(fc))
    assert nova.deleted == ["snap1"]
    assert fc.sleeps == int(5 / POLL) + 1


def test_a_running_server_gets_a_warning_or_is_stopped() -> None:
    nova = FakeNova(status="ACTIVE")
    r = take(nova, SnapshotRequest("srv", name="n"), clock=_clock(FakeClock()))
    assert "not SHUTOFF" in r.warnings[0] and "stop" not in nova.calls and not r.stopped
    nova = FakeNova(status="ACTIVE")
    r = take(nova, SnapshotRequest("srv", name="n", stop=True), clock=_clock(FakeClock()))
    assert (
        r.warnings == [] and r.stopped and nova.calls.index("stop") < nova.calls.index("create n")
    )


def test_a_busy_server_is_refused_before_anything_is_made() -> None:
    nova = FakeNova(task_state="image_uploading")
    with pytest.raises(SnapshotFailed, match="busy"):
        take(nova, SnapshotRequest("srv", name="n"), clock=_clock(FakeClock()))
    assert not any(c.startswith("create") for c in nova.calls)


def test_no_base_image_name_asks_for_as() -> None:
    with pytest.raises(UsageError, match="--as NAME"):
        take(FakeNova(base_name=None), SnapshotRequest("srv"), clock=_clock(FakeClock()))
