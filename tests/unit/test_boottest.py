"""The boot test's decisions (imagesync.boottest.run_boot_tests) against a scripted Nova, on
an injected clock: only a newest version that waits for its test (``plan.awaiting_boot_test``)
and has an image on the boot test's cloud (its original, or the hidden copy imagesync made) is
booted; passed marks it (and shows a hidden copy); ERROR or a timeout quarantines it (marked;
hidden only if imagesync made it); the test server is deleted every time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from imagesync.boottest import QUARANTINED, TESTED, run_boot_tests
from imagesync.config.types import BootTest, ImageRule
from imagesync.sites.nova import Server
from tests.fakeclock import FakeClock
from tests.unit.test_plan import img, inv
from tests.unit.test_snapshot import _clock

RULE = ImageRule(pattern="img*", clouds=("a", "b"), boot_test=BootTest("a", "tiny", 30))


@dataclass
class BootingNova:
    """Servers go through ``states`` (one per look); every boot and delete is counted."""

    states: list[str] = field(default_factory=lambda: ["BUILD", "ACTIVE"])
    name: str = "a"
    booted: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    props: dict[str, dict[str, str]] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)

    def flavor_id(self, flavor: str) -> str:
        return "1"

    def boot(self, name: str, image_id: str, flavor_id: str) -> str:
        self.booted.append(image_id)
        return f"srv{len(self.booted)}"

    def get_server(self, server_id: str) -> Server:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return Server(
            server_id, "t", state, None, None, fault="no host" if state == "ERROR" else None
        )

    def delete_server(self, server_id: str) -> None:
        self.deleted.append(server_id)

    def set_image_properties(self, image_id: str, props: Mapping[str, str]) -> None:
        self.props.setdefault(image_id, {}).update(props)

    def hide_image(self, image_id: str) -> None:
        self.hidden.append(image_id)

    def show_image(self, image_id: str) -> None:
        self.shown.append(image_id)


def _run(nova: BootingNova, *records: object) -> list[tuple[bool, str]]:
    out = run_boot_tests(
        inv(*records),  # type: ignore[arg-type]
        (RULE,),
        ("a", "b", "c", "store"),
        lambda cloud: nova,
        clock=_clock(FakeClock()),
    )
    return [(o.passed, o.result) for o in out]


def test_a_new_version_on_its_cloud_is_booted_marked_and_the_server_deleted() -> None:
    nova = BootingNova()
    v = img("a")
    assert _run(nova, v) == [(True, "passed")]
    assert nova.booted == [v.id] and nova.deleted == ["srv1"]
    assert nova.props[v.id][TESTED].startswith("passed") and nova.hidden == []


def test_tested_spread_or_elsewhere_versions_are_not_booted() -> None:
    nova = BootingNova()
    assert _run(nova, img("a", props={TESTED: "passed"})) == []
    first = img("a", digest="2")
    spread = img("b", digest="2", copy_of=f"a:{first.id}")
    assert _run(nova, first, spread) == []  # held by two sites: tested before it spread
    # first copy not on the boot test's cloud: the planner copies it there first
    assert _run(nova, img("b", digest="3")) == []
    assert nova.booted == []


def test_the_hidden_copy_made_on_the_cloud_is_booted_and_shown_when_it_passes() -> None:
    nova = BootingNova()
    first = img("b", digest="5")
    held = img("a", digest="5", copy_of=f"b:{first.id}", hidden=True, props={TESTED: "pending"})
    assert _run(nova, first, held) == [(True, "passed")]
    assert nova.booted == [held.id] and nova.shown == [held.id]
    assert nova.props[held.id][TESTED].startswith("passed")


def test_a_failing_copy_stays_hidden_and_the_users_original_is_only_marked() -> None:
    nova = BootingNova(states=["ERROR"])
    first = img("b", digest="6")
    held = img("a", digest="6", copy_of=f"b:{first.id}", hidden=True, props={TESTED: "pending"})
    assert _run(nova, first, held) == [(False, "error")]
    assert QUARANTINED in nova.props[held.id] and first.id not in nova.props
    assert nova.hidden == [] and nova.shown == []  # hidden already; the original is the user's


def test_error_or_timeout_quarantines_and_still_deletes_the_server() -> None:
    nova = BootingNova(states=["BUILD", "ERROR"])
    v = img("a")
    assert _run(nova, v) == [(False, "error")]
    # the user's own upload: marked, never hidden (imagesync hides only what it made)
    assert nova.hidden == [] and "no host" in nova.props[v.id][QUARANTINED]
    slow = BootingNova(states=["BUILD"])
    origin = img("b", digest="4")
    w = img("a", digest="4", copy_of=f"b:{origin.id}", props={TESTED: "pending"})
    assert _run(slow, origin, w) == [(False, "timeout")]  # a test copy left visible: hidden
    assert slow.hidden == [w.id] and slow.deleted == ["srv1"]
