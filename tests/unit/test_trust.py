"""Whose images count, what imagesync made, and which version is newest, through the engine,
the state database, the daemon's log and the configuration (the planner's own cases are in
test_plan.py)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imagesync.commands import action_line
from imagesync.config.load import load_config
from imagesync.config.render import render_config
from imagesync.config.types import Config
from imagesync.daemon.passes import IgnoredImages
from imagesync.engine import Engine
from imagesync.errors import ConfigError
from imagesync.plan import Assessment, Ignored, Skip, SkipReason, plan
from imagesync.sites.memory import MemorySite
from imagesync.state import State
from tests.unit.memconfig import memory_config

NOON = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _config(tmp_path: Path, sites: tuple[str, ...], **rule: object) -> Config:
    return memory_config(tmp_path, sites, rule=rule)


def _pass(engine: Engine) -> None:
    p = plan(engine.rules, engine.recover(engine.inventories()), engine.site_names)
    assert all(r.ok for r in engine.execute(p))


def test_a_site_whose_clock_is_an_hour_slow_still_has_its_newer_upload_win(
    tmp_path: Path,
) -> None:
    a = MemorySite("a", clock=lambda: NOON)
    b = MemorySite("b", clock=lambda: NOON - timedelta(hours=1))  # an hour slow
    now = [1000.0]  # imagesync's own clock
    engine = Engine(_config(tmp_path, ("a", "b")), sites={"a": a, "b": b}, clock=lambda: now[0])
    a.add("img", b"old version")
    _pass(engine)
    assert sorted(b.data(i) for i in b.images) == [b"old version"]
    now[0] = 2000.0
    b.add("img", b"new version")  # uploaded later, but b says 11:00, before a's 12:00
    _pass(engine)
    assert sorted(a.data(i) for i in a.images) == [b"new version", b"old version"]
    (assessment,) = plan(engine.rules, engine.inventories(), engine.site_names).assessments
    assert {c.state for c in assessment.cells.values()} == {"current"}


def test_first_seen_is_kept_across_processes(tmp_path: Path) -> None:
    assert State(tmp_path).first_seen(["a:1"], now=10.0) == {"a:1": 10.0}
    other = State(tmp_path)  # another process, later
    assert other.first_seen(["a:1", "b:2"], now=20.0) == {"a:1": 10.0, "b:2": 20.0}
    assert other.first_seen([], now=30.0) == {}


def test_the_copies_imagesync_publishes_are_recorded(tmp_path: Path) -> None:
    a, b = MemorySite("a"), MemorySite("b")
    engine = Engine(_config(tmp_path, ("a", "b")), sites={"a": a, "b": b})
    original = a.add("img", b"bytes")
    _pass(engine)
    assert engine.state.made() == {"b": frozenset(b.images)}
    assert original.id not in engine.state.made().get("a", frozenset())


def test_copies_in_history_from_before_the_made_table_count_as_made(tmp_path: Path) -> None:
    state = State(tmp_path)
    for result, image_id in (("ok", "copied"), ("integrity", "removed")):
        state.record_transfer(
            started=1.0, name="img", source="a:1", target="b", result=result, image_id=image_id
        )
    state.close()
    db = sqlite3.connect(tmp_path / "imagesync.sqlite")
    db.execute("DROP TABLE made")  # as a state database written before it existed
    db.commit()
    db.close()
    assert State(tmp_path).made() == {"b": frozenset({"copied"})}


def test_ignored_images_are_logged_once_per_change() -> None:
    watch = IgnoredImages()
    one = Ignored("lab1", "id-1", "p-evil")

    def seen(*ignored: Ignored) -> list[Assessment]:
        return [Assessment("img", None, None, None, {}, ignored=ignored)]

    with capture_logs() as logs:
        watch.observe(seen(one))
        watch.observe(seen(one))  # the next pass: nothing new, nothing logged
        watch.observe(seen(one, Ignored("lab2", "id-2", "p-evil")))
        watch.observe(seen())
    events = [(e["event"], e.get("reason")) for e in logs]
    assert events == [
        ("image.ignored", "owned by project p-evil"),
        ("image.ignored", "owned by project p-evil"),
        ("image.ignored_gone", None),
    ]
    assert logs[1]["images"] == ["lab1:id-1", "lab2:id-2"]


def test_names_from_sites_are_printed_without_escape_sequences() -> None:
    line = action_line(Skip("img\x1b]0;pwned\x07\x1b[2J", "a", SkipReason.NO_VERSION, "x\ry"))
    assert "\x1b" not in line and "\r" not in line and "\x07" not in line
    assert "\\x1b]0;pwned" in line


# -- configuration ---------------------------------------------------------------------------
CLOUD = (
    "clouds:\n  a:\n    auth: {auth_url: 'https://k.example/v3', username: u, "
    "password: pw-123456, project_name: p}\n"
)


def test_trusted_owners_are_read_and_shown(tmp_path: Path) -> None:
    path = tmp_path / "imagesync.yaml"
    path.write_text(CLOUD + "    trusted_owners: [0a1b2c3d, 'ffee', 0a1b2c3d]\n")
    config = load_config(path)
    assert config.clouds["a"].trusted_owners == ("0a1b2c3d", "ffee")
    shown = render_config(config)
    assert "trusted_owners: [0a1b2c3d, ffee]" in shown
    path.write_text(CLOUD)
    assert load_config(path).clouds["a"].trusted_owners == ()
    assert "trusted_owners: []" in render_config(load_config(path))


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("0a1b2c3d", "write a list of project ids"),
        ("[1234]", "is a number: put the project id in quotes"),
        ("['a b']", "is not a project id"),
        ("['']", "is empty"),
    ],
)
def test_trusted_owners_errors_name_the_file_the_key_and_the_fix(
    tmp_path: Path, text: str, wanted: str
) -> None:
    path = tmp_path / "imagesync.yaml"
    path.write_text(CLOUD + f"    trusted_owners: {text}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key is not None and exc.value.key.startswith("clouds.a.trusted_owners")
    assert wanted in str(exc.value)
