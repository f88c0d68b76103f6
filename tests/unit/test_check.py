"""`imagesync check`'s contract with a scheduler, without servers: exit 3 (never 1) on
anything unexpected, answers from a state directory it may not write, no secrets needed to
answer from state, a recorded id confirmed by one GET before it is handed out, and a bound
on ``--ensure``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import imagesync.check as check_mod
from imagesync.cli import main
from imagesync.config.load import load_config
from imagesync.errors import SiteError
from imagesync.model import NewImage
from imagesync.sites.directory import DirectorySite
from imagesync.state import RecordedCell, State

# A cloud whose secrets live in a clouds.yaml this account cannot read (here: that is not
# there at all), and a directory store that needs no secret.
CONFIG = """\
state_dir: {state}
clouds_yaml: {clouds_yaml}
clouds:
  lab1: {{cloud: lab1}}
stores:
  archive: {{type: directory, path: {store}}}
images:
  - name: img
    clouds: all
    store: archive
"""


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "imagesync.yaml"
    (tmp_path / "store").mkdir(exist_ok=True)
    path.write_text(
        CONFIG.format(
            state=tmp_path / "state",
            clouds_yaml=tmp_path / "secret" / "clouds.yaml",
            store=tmp_path / "store",
        )
    )
    return path


def record(tmp_path: Path, site: str, image_id: str, sha512: str = "ab" * 64) -> None:
    state = State(tmp_path / "state")
    state.record_cells(
        [RecordedCell("img", site, "current", image_id, "v1", "v1", sha512, time.time())]
    )
    state.close()


def store_image(tmp_path: Path, data: bytes) -> str:
    site = DirectorySite("archive", tmp_path / "store")
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {}, len(data)))
    w.write(data)
    w.finish()
    return site.publish(w.image_id).id


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagesync.cli", *argv], capture_output=True, text=True, timeout=60
    )


# -- exit 3 on anything unexpected --------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom\n  with a second line"), SiteError("listing failed", site="lab1")],
    ids=["bug", "imagesync-error"],
)
def test_anything_unexpected_exits_3_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: Exception,
) -> None:
    # 1 would tell a scheduler "missing or stale" (and it may act on that): a crash is 3.
    path = write_config(tmp_path)

    def explode(*args: Any, **kw: Any) -> int:
        raise exc

    monkeypatch.setattr(check_mod, "check_recorded", explode)
    assert main(["-c", str(path), "check", "img", "--cloud", "lab1"]) == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("imagesync check: cannot tell: ")
    assert "Traceback" not in err


def test_other_commands_still_exit_1_on_an_imagesync_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagesync.commands as commands

    def explode(*args: Any, **kw: Any) -> int:
        raise SiteError("down", site="lab1")

    monkeypatch.setattr(commands, "history", explode)
    path = write_config(tmp_path)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "clouds.yaml").write_text(
        "clouds:\n  lab1:\n    auth: {auth_url: 'http://127.0.0.1:9/v3', username: u, "
        "password: p, project_name: x}\n"
    )
    assert main(["-c", str(path), "history"]) == 1


# -- no secrets, no writes ----------------------------------------------------------------


def test_recorded_answer_needs_no_clouds_yaml(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    record(tmp_path, "lab1", "id-1")
    r = run_cli("-c", str(path), "check", "img", "--cloud", "lab1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image_id"] == "id-1" and out["answered_from"] == "recorded"
    assert "credentials" in out["unconfirmed"]


def test_recorded_answer_writes_nothing_in_state_dir(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    record(tmp_path, "lab1", "id-1")
    state = tmp_path / "state"
    db = state / "imagesync.sqlite"
    before = (db.stat().st_mtime_ns, hashlib.sha256(db.read_bytes()).hexdigest())
    listing = sorted(p.name for p in state.iterdir())
    r = run_cli("-c", str(path), "check", "img", "--cloud", "lab1")
    assert (r.returncode, r.stdout.strip()) == (0, "id-1"), r.stderr
    assert (db.stat().st_mtime_ns, hashlib.sha256(db.read_bytes()).hexdigest()) == before
    # no -wal/-shm left behind (run as root they would lock the service user out)
    assert sorted(p.name for p in state.iterdir()) == listing


def test_recorded_answer_from_a_read_only_state_dir(tmp_path: Path) -> None:
    """The scheduler account may read state_dir, not write it. Tests run as root, for whom
    permissions do not bind, so the state directory is bind-mounted read-only in a private
    mount namespace (unshare: a user namespace, so no privilege is needed)."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed to make a read-only state directory"
    path = write_config(tmp_path)
    record(tmp_path, "lab1", "id-1")
    state = tmp_path / "state"
    script = (
        f'mount --bind "{state}" "{state}" && mount -o remount,bind,ro "{state}" "{state}" && '
        f'! touch "{state}/probe" 2>/dev/null && '
        f'exec "{sys.executable}" -m imagesync.cli -c "{path}" check img --cloud lab1'
    )
    r = subprocess.run(
        [unshare, "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout.strip()) == (0, "id-1"), r.stderr
    assert "Traceback" not in r.stderr


# -- a recorded id is confirmed before it is handed out -------------------------------------


def test_a_recorded_id_the_site_no_longer_has_is_never_handed_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    record(tmp_path, "archive", "0c1d2e3f-0000-4000-8000-000000000000")  # deleted by someone
    config = load_config(path, resolve_clouds=False)
    assert check_mod.check_recorded(config, "img", "archive") is None
    assert capsys.readouterr().out == ""


def test_a_recorded_id_the_site_still_has_is_confirmed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = b"image bytes"
    image_id = store_image(tmp_path, data)
    record(tmp_path, "archive", image_id, hashlib.sha512(data).hexdigest())
    config = load_config(path, resolve_clouds=False)
    assert check_mod.check_recorded(config, "img", "archive", as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_id"] == image_id and out["answered_from"] == "confirmed"


def test_a_recorded_id_now_holding_other_bytes_is_not_handed_out(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    image_id = store_image(tmp_path, b"new bytes")
    record(tmp_path, "archive", image_id, hashlib.sha512(b"old bytes").hexdigest())
    config = load_config(path, resolve_clouds=False)
    assert check_mod.check_recorded(config, "img", "archive") is None


# -- --ensure is bounded --------------------------------------------------------------------


def test_ensure_without_timeout_has_a_default_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float | None] = []

    def fake_ask(config: Any, name: str, cloud: str, base: Any, *rest: Any) -> int:
        seen.append(rest[-1])  # the deadline
        return 0

    monkeypatch.setattr(check_mod, "_ask", fake_ask)
    monkeypatch.setattr(check_mod, "_resolved", lambda config: config)
    config = load_config(write_config(tmp_path), resolve_clouds=False)
    assert check_mod.check(config, "img", "archive", ensure=True) == 0
    assert seen and seen[0] is not None
    assert seen[0] - time.monotonic() <= check_mod.DEFAULT_ENSURE_TIMEOUT
    assert "1800" in run_cli("check", "--help").stdout
