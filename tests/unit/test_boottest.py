"""The boot test's decisions (imagesync.boottest.run_boot_tests) against a scripted Nova, on
an injected clock: only a version held by one site, on the boot test's cloud, and not tested
yet is booted; passed marks it; ERROR or a timeout quarantines it (marked and hidden); the test
server is deleted every time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from imagesync.boottest import QUARANTINED, TESTED, run_boot_tests
from imagesync.config.types import BootTest, ImageRule
from imagesync.sites.nova import Server
from tests.unit.test_plan import img, inv
from tests.unit.test_snapshot import FakeClock, _clock

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
    assert _run(nova, img("b", digest="3")) == []  # first copy not on the boot test's cloud
    assert nova.booted == []


def test_error_or_timeout_quarantines_and_still_deletes_the_server() -> None:
    nova = BootingNova(states=["BUILD", "ERROR"])
    v = img("a")
    assert _run(nova, v) == [(False, "error")]
    assert nova.hidden == [v.id] and "no host" in nova.props[v.id][QUARANTINED]
    slow = BootingNova(states=["BUILD"])
    w = img("a", digest="4")
    assert _run(slow, w) == [(False, "timeout")]
    assert slow.hidden == [w.id] and slow.deleted == ["srv1"]
