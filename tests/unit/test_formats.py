"""Disk formats: the pure choice per target, the configuration, and a converted copy's identity
(the model and the planner treat it as the same version as its original)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagesync.config.formats import parse_size
from imagesync.config.load import load_config
from imagesync.config.render import render_config
from imagesync.model import (
    PROP_CONVERTED_FROM,
    PROP_CONVERTED_SHA512,
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_VERSION,
    FormatChoice,
    ImageRecord,
    SiteInventory,
    choose_format,
    format_time,
)
from imagesync.plan import TargetRule, assess, plan_name
from tests.unit.test_cli_config import GOOD_CLOUD

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORIG, CONV = "a" * 128, "b" * 128


@pytest.mark.parametrize(
    ("source", "accepted", "choice"),
    [
        ("qcow2", (), FormatChoice()),  # no disk_formats: as it is (today's behaviour)
        ("qcow2", ("qcow2", "raw"), FormatChoice()),  # accepted as it is, even if not first
        ("raw", ("qcow2",), FormatChoice(convert_to="qcow2")),
        ("qcow2", ("raw",), FormatChoice(convert_to="raw")),
        ("vmdk", ("iso", "raw", "qcow2"), FormatChoice(convert_to="raw")),  # first writable
        ("vhd", ("qcow2",), FormatChoice(convert_to="qcow2")),
    ],
)
def test_choose_format(source: str, accepted: tuple[str, ...], choice: FormatChoice) -> None:
    assert choose_format(source, accepted) == choice


@pytest.mark.parametrize(
    ("source", "accepted", "says"),
    [
        ("iso", ("raw",), "a iso image cannot be converted"),
        ("qcow2", ("iso",), "none is a format qemu-img writes"),
        (None, ("raw",), "the source has no format"),
    ],
)
def test_choose_format_refuses_what_qemu_img_cannot_do(
    source: str | None, accepted: tuple[str, ...], says: str
) -> None:
    choice = choose_format(source, accepted)
    assert choice.convert_to is None and choice.refused is not None and says in choice.refused


# --------------------------------------------------------------------------- configuration


def _config(tmp_path: Path, extra: str, cloud_extra: str = "") -> Path:
    cloud = GOOD_CLOUD[:-1] + (f", {cloud_extra}" if cloud_extra else "") + "}"
    path = tmp_path / "imagesync.yaml"
    path.write_text(f"clouds: {{ceph: {cloud}}}\n{extra}")
    return path


def test_disk_formats_and_conversion_load_and_render(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        f"conversion: {{scratch_dir: {tmp_path}/s, scratch_max_size: 1.5G}}\n",
        "disk_formats: [RAW, qcow2]",
    )
    config = load_config(path)
    assert config.clouds["ceph"].disk_formats == ("raw", "qcow2")
    assert config.conversion.scratch_dir == tmp_path / "s"
    assert config.conversion.scratch_max_size == int(1.5 * 1024**3)
    text = render_config(config)
    assert "disk_formats: [raw, qcow2]" in text and "scratch_max_size: 1610612736" in text


def test_absent_disk_formats_accept_anything(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, ""))
    assert config.clouds["ceph"].disk_formats == ()
    assert config.conversion.directory(config.state_dir) == config.state_dir / "scratch"


@pytest.mark.parametrize(
    ("text", "size"),
    [(4096, 4096), ("512M", 512 * 1024**2), ("20G", 20 * 1024**3), ("1.5TiB", int(1.5 * 1024**4))],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


# --------------------------------------------------------------------------- identity


def _rec(site: str, image_id: str, own: str, **props: str) -> ImageRecord:
    return ImageRecord(
        site=site,
        id=image_id,
        name="img",
        status="active",
        created_at=T0 + timedelta(minutes=1),
        size=10,
        hashes={"sha512": own},
        disk_format="raw" if PROP_CONVERTED_FROM in props else "qcow2",
        properties=props,
    )


def _converted(own: str = CONV, **extra: str) -> ImageRecord:
    props = {
        PROP_ORIGIN: "c1:orig",
        PROP_VERSION: format_time(T0),
        PROP_SHA512: ORIG,
        PROP_CONVERTED_FROM: f"qcow2:{ORIG}",
        PROP_CONVERTED_SHA512: CONV,
        **extra,
    }
    return _rec("c2", "conv", own, **props)


def test_a_converted_copy_is_the_same_version_as_its_original() -> None:
    orig = _rec("c1", "orig", ORIG).with_(created_at=T0)
    copy = _converted()
    assert copy.converted and copy.provenance_ok
    assert copy.version.sha512 == ORIG and copy.version.origin == "c1:orig"
    assert copy.version.same_as(orig.version)
    # a copy of it elsewhere does not carry the conversion marks over
    assert PROP_CONVERTED_FROM not in copy.user_properties()
    assert PROP_CONVERTED_SHA512 not in copy.user_properties()


def test_a_converted_copy_whose_bytes_changed_is_a_version_of_its_own() -> None:
    changed = _converted(own="c" * 128)  # someone re-uploaded other bytes with the marks
    assert not changed.provenance_ok and changed.version.sha512 == "c" * 128
    unmarked = _converted(**{PROP_CONVERTED_SHA512: ""})
    assert not unmarked.provenance_ok


def test_status_and_the_planner_count_a_converted_copy_as_current() -> None:
    orig = _rec("c1", "orig", ORIG).with_(created_at=T0)
    invs = {
        "c1": SiteInventory("c1", (orig,)),
        "c2": SiteInventory("c2", (_converted(),), made=frozenset({"conv"})),
    }
    rule = TargetRule(pattern="img", sites=("c1", "c2"), keep=1)
    a, actions = plan_name("img", rule, invs, ["c1", "c2"])
    assert a.cells["c2"].state == "current" and len(a.versions) == 1
    assert actions == []  # nothing to copy, nothing to retire


def test_the_planner_copies_from_the_original_bytes_not_a_converted_copy() -> None:
    orig = _rec("c3", "orig", ORIG).with_(created_at=T0)
    invs = {
        "c1": SiteInventory("c1", ()),
        "c2": SiteInventory("c2", (_converted(),)),
        "c3": SiteInventory("c3", (orig,)),
    }
    # c2 comes first in site order, but holds converted bytes
    a = assess("img", invs, ["c1", "c2", "c3"])
    assert a.source is not None and a.source.site == "c3"
