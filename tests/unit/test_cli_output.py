"""What a person at the command line sees: --version, the shipped example and unit, help texts
with exit codes and examples, quiet terminals, the progress bar, history, "nothing to do".

Terminal behaviour is tested by running the real CLI in a pseudo-terminal (``pty``): a pipe
would make imagesync choose its non-interactive output.
"""

from __future__ import annotations

import argparse
import errno
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

import imagesync
from imagesync import data
from imagesync.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def run_in_pty(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``imagesync ARGS`` with stdin, stdout and stderr on a terminal; (exit code, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesync.cli", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=cwd,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


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
