"""What a person at the command line sees: --version, the shipped example and unit, help texts
with exit codes and examples, quiet terminals, the progress bar, history, "nothing to do".

Terminal behaviour is tested by running the real CLI in a pseudo-terminal (``pty``): a pipe
would make imagesync choose its non-interactive output.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import pty
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import imagesync
from imagesync import data
from imagesync.cli import build_parser, main
from imagesync.config.types import Config, ImageRule
from imagesync.engine import Engine
from imagesync.errors import NotFound
from imagesync.logs import OncePerState
from imagesync.model import NewImage
from imagesync.plan import SkipReason, plan
from imagesync.progress import ProgressBar, clock_time, human_rate
from imagesync.sites.directory import DirectorySite
from imagesync.sites.memory import MemorySite
from tests.fakeclock import FakeClock

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def run_in_pty(
    args: list[str],
    cwd: Path,
    *,
    prelude: str = "",
    interrupt_on: str | None = None,
) -> tuple[int, str]:
    """Run ``imagesync ARGS`` with stdin, stdout and stderr on a terminal; (exit code, output).

    ``prelude``: Python run first in the child (to slow a copy down); ``interrupt_on``: send
    SIGINT (Ctrl-C) once the output shows this text.
    """
    # A terminal's Ctrl-C reaches a program whose SIGINT is not ignored: a test run started in
    # the background (`.ci/run &`) ignores it, and its children would inherit that (CPython
    # then installs no KeyboardInterrupt handler), so the child restores Python's own.
    code = (
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{prelude}\nfrom imagesync.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        close_fds=True,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        out += chunk
        if interrupt_on is not None and interrupt_on.encode() in out:
            proc.send_signal(signal.SIGINT)
            interrupt_on = None
    os.close(leader)
    return proc.wait(timeout=60), out.decode("utf-8", "replace").replace("\r\n", "\n")


# --------------------------------------------------------------------------- install (item 5)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"imagesync {imagesync.__version__} (Python ")
    assert sys.prefix in out  # which venv: the question after an upgrade


@pytest.mark.parametrize(
    ("shipped", "copy"),
    [
        (data.CONFIG_EXAMPLE, "etc/imagesync.yaml.example"),
        (data.CLOUDS_EXAMPLE, "etc/clouds.yaml.example"),
        (data.SYSTEMD_UNIT, "systemd/imagesync.service"),
    ],
)
def test_the_copies_in_the_tree_equal_what_the_package_ships(shipped: str, copy: str) -> None:
    assert (ROOT / copy).read_text() == data.read(shipped), (
        f"{copy} and imagesync/data/{shipped} differ: edit one, copy it over the other"
    )


@pytest.mark.parametrize(
    ("argv", "shipped"),
    [
        (["config", "example"], data.CONFIG_EXAMPLE),
        (["config", "example", "--clouds-yaml"], data.CLOUDS_EXAMPLE),
        (["config", "unit"], data.SYSTEMD_UNIT),
    ],
)
def test_config_example_and_unit_print_the_shipped_files(
    argv: list[str], shipped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # no configuration needed: this is how an operator gets the first one
    assert main(["-c", "/nonexistent/imagesync.yaml", *argv]) == 0
    assert capsys.readouterr().out == data.read(shipped)


def test_the_printed_example_passes_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OS_CLIENT_CONFIG_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./clouds.yaml from elsewhere
    etc = tmp_path / "etc" / "imagesync"
    etc.mkdir(parents=True)
    assert main(["config", "example"]) == 0
    (etc / "imagesync.yaml").write_text(capsys.readouterr().out)
    assert main(["config", "example", "--clouds-yaml"]) == 0
    (etc / "clouds.yaml").write_text(capsys.readouterr().out)
    assert main(["-c", str(etc / "imagesync.yaml"), "config", "check"]) == 0
    assert capsys.readouterr().out.startswith(f"{etc / 'imagesync.yaml'}: ok (2 clouds,")


def test_the_unit_and_example_say_where_clouds_yaml_lives() -> None:
    unit = data.read(data.SYSTEMD_UNIT)
    assert "ProtectHome=true" in unit and "/etc/imagesync/clouds.yaml" in unit
    assert "ExecStart=/usr/local/bin/imagesync -c /etc/imagesync/imagesync.yaml daemon" in unit
    assert "file:///usr/share/doc" not in unit  # nothing installs that README
    example = data.read(data.CONFIG_EXAMPLE)
    assert "\nclouds_yaml: clouds.yaml\n" in example and "ProtectHome" in example


def test_a_missing_configuration_points_at_config_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", str(tmp_path / "nope.yaml"), "status"]) == 2
    err = capsys.readouterr().err
    assert "`imagesync config example`" in err and "etc/imagesync.yaml.example" not in err
    (tmp_path / "empty.yaml").write_text("")
    assert main(["-c", str(tmp_path / "empty.yaml"), "status"]) == 2
    assert "`imagesync config example`" in capsys.readouterr().err


def test_readme_installs_into_a_venv_not_the_system_python() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\npip install .  " not in readme  # fails on Debian 12: externally managed
    for step in (
        "python3 -m venv /opt/imagesync",
        "ln -sf /opt/imagesync/bin/imagesync /usr/local/bin/imagesync",
        "imagesync config unit > /etc/systemd/system/imagesync.service",
        "journalctl -u imagesync -o cat | jq",
        ".backup",
        "pip install --upgrade",
        "rm -r /opt/imagesync",
    ):
        assert step in readme, step


# --------------------------------------------------------------------------- help (item 7)


def _parsers(
    parser: argparse.ArgumentParser, path: str = "imagesync"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{path}: {action.dest}"
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_every_command_shows_exit_codes_and_an_example() -> None:
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "exit codes:" in text, path
        assert "\nexample" in text, path
        assert parser.description, path


def test_top_level_help_describes_imagesync_not_the_cli_module(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Command line: parses arguments" not in out  # the module docstring
    assert "newest version of every named VM image" in out
    for code in ("  0 ", "  1 ", "  2 ", "  3 ", "  130 "):
        assert code in out
    assert "imagesync check canfar-batch-el9 --cloud uvic" in out


# --------------------------------------------------------------------------- quiet output (6)


def _engine(tmp_path: Path, sites: dict[str, MemorySite], **rule: Any) -> Engine:
    config = Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / "state",
        poll_interval=60,
        clouds={},
        stores={},
        images=(ImageRule(pattern="img*", clouds=tuple(sites), **rule),),
        transfer_retries=1,
    )
    return Engine(config, sites=sites)


def _pass(engine: Engine) -> None:
    inventories = engine.recover(engine.inventories())
    engine.execute(plan(engine.rules, inventories, engine.site_names))


def test_a_skip_met_every_pass_is_logged_once_per_change(tmp_path: Path) -> None:
    site = MemorySite("c1")
    now = datetime.now(UTC)
    # two originals; keep: 1 retires the older, but imagesync did not make it: skipped, kept
    site.add("img-a", b"old", created=now - timedelta(days=2))
    site.add("img-a", b"new", created=now - timedelta(days=1))
    engine = _engine(tmp_path, {"c1": site}, keep=1)
    with capture_logs() as logs:
        for _ in range(3):
            _pass(engine)
    skips = [e for e in logs if e["event"] == "skip"]
    assert [e["log_level"] for e in skips] == ["info", "debug", "debug"]  # the repeats: -v
    assert SkipReason.NOT_OURS.value in skips[0]["reason"]

    site.add("img-a", b"newer", created=now)  # now two are beyond keep: one more fact
    with capture_logs() as logs:
        _pass(engine)
        _pass(engine)
    levels = [e["log_level"] for e in logs if e["event"] == "skip"]
    assert levels.count("info") == 1 and levels.count("debug") == 3


def test_once_per_state_logs_again_after_a_fact_goes_away() -> None:
    said = OncePerState()
    assert said.changed("k", "a") and not said.changed("k", "a")
    assert said.changed("k", "b")  # the state changed
    said.keep_only([])  # not seen this time: gone
    assert said.changed("k", "b")  # back: worth saying again


def _directory_setup(tmp_path: Path, size: int) -> Path:
    """Two directory stores, an image of ``size`` bytes in the first; the config's path."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = DirectorySite("a", tmp_path / "a")
    w = src.create(NewImage("img-one", "raw", "bare", 0, 0, {}, size))
    w.write(os.urandom(size))
    src.publish(w.finish().id)
    path = tmp_path / "imagesync.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"stores:\n  a: {{type: directory, path: {tmp_path / 'a'}}}\n"
        f"  b: {{type: directory, path: {tmp_path / 'b'}}}\n"
        "images:\n  - {name: img-one, stores: [a, b]}\n"
    )
    return path


def test_on_a_terminal_push_shows_its_bar_and_summary_not_info_logs(tmp_path: Path) -> None:
    config = _directory_setup(tmp_path, 300_000)
    code, out = run_in_pty(["-c", str(config), "push", "img-one"], tmp_path)
    assert code == 0, out
    assert "copy.start" not in out and "copy.done" not in out, out
    assert "[###" in out and (" ETA " in out or " in 0:0" in out)
    summary = next(line for line in out.splitlines() if line.startswith("copied img-one to b"))
    assert "(293.0 KiB in " in summary and summary.endswith(("KiB/s)", "MiB/s)", "GiB/s)"))
    assert out.rstrip().endswith("img-one: already current on a")


def test_minus_v_on_a_terminal_adds_info_and_debug_detail(tmp_path: Path) -> None:
    config = _directory_setup(tmp_path, 1000)
    code, out = run_in_pty(["-v", "-c", str(config), "push", "img-one"], tmp_path)
    assert code == 0, out
    assert "copy.done" in out and "inventory.listed" in out and "plan" in out


def test_off_a_terminal_the_info_log_stays(tmp_path: Path) -> None:
    # journald and cron read JSON lines: piping is not a person at a terminal
    config = _directory_setup(tmp_path, 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "imagesync.cli", "-c", str(config), "push", "img-one"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert '"event": "copy.done"' in proc.stderr


# --------------------------------------------------------------------------- progress bar (6)


def test_the_bar_shows_rate_and_eta_in_the_summary_units() -> None:
    clock, out = FakeClock(100.0), io.StringIO()
    bar = ProgressBar("img → c2", 4 * MiB, stream=out, clock=clock)
    clock.now += 2.0
    bar(1 * MiB)  # 1 MiB in 2 s: 3 MiB left at 512 KiB/s is 6 s
    line = out.getvalue()
    assert "1.0 MiB/4.0 MiB" in line and "512.0 KiB/s" in line and "ETA 0:06" in line
    assert "25.0%" in line
    clock.now += 6.0
    bar(3 * MiB)
    bar.close()
    assert out.getvalue().endswith("in 0:08\n")
    assert human_rate(4 * MiB, 8.0) == "512.0 KiB/s"  # what the summary line prints


def test_a_shorter_line_covers_the_longer_one_before_it() -> None:
    clock, out = FakeClock(100.0), io.StringIO()
    bar = ProgressBar("x", None, stream=out, clock=clock)
    clock.now += 1
    bar(5 * MiB)
    clock.now += 1000
    bar(1)  # the rate drops: a shorter line
    first, second = out.getvalue().split("\r")[1:]
    assert len(second) >= len(first)


def test_after_ctrl_c_the_bar_ends_its_line_and_says_the_uploads_were_removed() -> None:
    clock, out = FakeClock(100.0), io.StringIO()
    bar = ProgressBar("img → c2", 100, stream=out, clock=clock)
    clock.now += 1
    bar(10)
    bar.close(interrupted=True)
    assert out.getvalue().endswith(
        "\nimg → c2: interrupted: the uploads it had started were removed\n"
    )


def test_durations_read_as_a_clock() -> None:
    assert [clock_time(s) for s in (0, 42, 65, 3723)] == ["0:00", "0:42", "1:05", "1:02:03"]


#: makes every directory-store read slow enough to be interrupted halfway (in the child)
SLOW_READS = """
import time
from imagesync.sites import directory
_open = directory.DirectorySite.open
def _slow(self, image, offset=0):
    for chunk in _open(self, image, offset):
        for i in range(0, len(chunk), 16384):
            time.sleep(0.02)
            yield chunk[i : i + 16384]
directory.DirectorySite.open = _slow
"""


def test_ctrl_c_ends_the_bar_line_removes_the_uploads_and_history_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _directory_setup(tmp_path, 4 * MiB)
    code, out = run_in_pty(
        ["-c", str(config), "push", "img-one"], tmp_path, prelude=SLOW_READS, interrupt_on="ETA"
    )
    assert code == 130, out
    bar, said, last, end = out.split("\n")[-4:]
    assert "%" in bar.split("\r")[-1] and " ETA " in bar  # the bar's line, ended by a newline
    assert said == "img-one → b: interrupted: the uploads it had started were removed"
    assert (last, end) == ("imagesync: interrupted", "")
    assert "copy.interrupted" not in out  # the bar said it: no log line inside the bar
    assert [p.name for p in (tmp_path / "b").rglob("*") if p.is_file()] == []
    # history lists it (it did not before: the interrupt skipped the recording)
    assert main(["-c", str(config), "history", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["result"] == "interrupted" and row["target"] == "b"
    assert 0 < row["bytes"] < 4 * MiB and row["error"].endswith("the upload was removed")


# --------------------------------------------------------------------------- history (item 7)


def test_a_copy_whose_source_fails_is_in_history(tmp_path: Path) -> None:
    src, dst = MemorySite("c1"), MemorySite("c2")
    src.add("img-a", b"x" * 100)
    engine = _engine(tmp_path, {"c1": src, "c2": dst})
    inventories = engine.inventories()

    def gone(op: str, image_id: str | None) -> None:
        if op == "get_image":
            raise NotFound("no image: deleted meanwhile", site="c1")

    src.faults.hook = gone
    engine.execute(plan(engine.rules, inventories, engine.site_names))
    (row,) = engine.state.history("img-a")
    assert row["result"] == "source" and row["target"] == "c2"
    assert "deleted meanwhile" in row["error"]


def test_an_interrupted_copy_is_in_history_and_leaves_nothing(tmp_path: Path) -> None:
    src, dst = MemorySite("c1"), MemorySite("c2")
    src.add("img-a", os.urandom(300_000))
    engine = _engine(tmp_path, {"c1": src, "c2": dst})
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    screen = io.StringIO()

    class CtrlC(ProgressBar):
        def __call__(self, n: int) -> None:
            super().__call__(n)
            raise KeyboardInterrupt

    def factory(label: str, total: int | None) -> CtrlC:
        return CtrlC(label, total, stream=screen)

    with pytest.raises(KeyboardInterrupt):
        engine.execute(p, progress=factory)
    assert dst.images == {}
    (row,) = engine.state.history("img-a")
    assert row["result"] == "interrupted" and row["bytes"] > 0
    assert screen.getvalue().endswith("the uploads it had started were removed\n")


def _history_rows(tmp_path: Path) -> Path:
    """A configuration whose state holds a copy, a failed copy and a retirement."""
    from imagesync.state import State

    path = tmp_path / "imagesync.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\nstores: {{a: {{type: directory, path: {tmp_path}}}}}\n"
    )
    state = State(tmp_path / "state")
    t0 = datetime(2026, 3, 1, 12, 0, 5, 250000, tzinfo=UTC).timestamp()
    state.record_transfer(
        started=t0,
        finished=t0 + 75.5,
        name="canfar-batch-el9",
        source="lab1:0b2c3d4e-0000-4000-8000-000000000001",
        target="lab2",
        version="2026-03-01T11:00:00Z",
        sha512="ab" * 64,
        bytes=3 * 1024**3 // 2,
        seconds=75.5,
        result="ok",
        image_id="9f8e7d6c-0000-4000-8000-000000000002",
    )
    state.record_transfer(
        started=t0 + 100,
        finished=t0 + 101,
        name="canfar-batch-el9",
        source="lab1:0b2c3d4e-0000-4000-8000-000000000001",
        target="lab3",
        version="2026-03-01T11:00:00Z",
        bytes=1536,
        seconds=1.0,
        result="transient",
        error="503 Service Unavailable",
    )
    return path


def test_history_is_a_table_with_a_header_human_sizes_and_iso_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _history_rows(tmp_path)
    assert main(["-c", str(path), "history"]) == 0
    header, newest, oldest = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "STARTED",
        "NAME",
        "SOURCE",
        "TARGET",
        "RESULT",
        "SIZE",
        "TIME",
        "IMAGE",
        "ID",
        "ERROR",
    ]
    assert oldest.startswith("2026-03-01T12:00:05Z  canfar-batch-el9  lab1:0b2c3d4e  lab2")
    assert "1.5 GiB" in oldest and "1:16" in oldest and "9f8e7d6c" in oldest
    assert "1.5 KiB" in newest and "503 Service Unavailable" in newest
    # aligned: every column starts where its header does
    for column in ("NAME", "TARGET", "RESULT", "IMAGE ID"):
        at = header.index(column)
        assert newest[at - 2 : at] == "  " and oldest[at - 2 : at] == "  ", column
    assert newest.index("KiB") + 3 == oldest.index("GiB") + 3  # sizes line up on the right


def test_history_json_has_the_same_fields_with_iso_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _history_rows(tmp_path)
    assert main(["-c", str(path), "history", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["started"] == "2026-03-01T12:00:05.250000Z"
    assert rows[1]["finished"] == "2026-03-01T12:01:20.750000Z"
    assert rows[1]["bytes"] == 3 * 1024**3 // 2 and rows[1]["seconds"] == 75.5
    assert rows[0]["result"] == "transient" and rows[0]["error"] == "503 Service Unavailable"
    from imagesync.commands import HISTORY_FIELDS

    for _, key in HISTORY_FIELDS:  # whatever the table shows, JSON has
        assert key in rows[0]


def _two_stores_in_sync(tmp_path: Path) -> Path:
    path = _directory_setup(tmp_path, 1000)
    assert main(["-c", str(path), "push", "img-one"]) == 0
    return path


def test_sync_says_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _two_stores_in_sync(tmp_path)
    capsys.readouterr()
    assert main(["-c", str(path), "sync"]) == 0
    assert capsys.readouterr().out == (
        "nothing to do: every image is current where its rule wants it\n"
    )


def test_push_json_says_already_current_per_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _directory_setup(tmp_path, 1000)
    assert main(["-c", str(path), "push", "img-one", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["sites"] == {"a": "already current", "b": "copied"}
    assert main(["-c", str(path), "push", "img-one", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sites"] == {"a": "already current", "b": "already current"}
    assert again["results"] == []
