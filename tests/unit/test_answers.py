"""Issue 11 items 1-4, without servers: answers ``check`` can trust (every inventory records),
the daemon reading a source once for all its targets, names that do not exist, and a user
who may not write ``state_dir`` (run as ``nobody`` in a subprocess).

Directory stores stand in for clouds where a command (``push``, ``status``, ``check``) opens
its sites itself; memory sites where the engine is driven directly.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imagesync.check import check
from imagesync.cli import main
from imagesync.commands import NoSuchImage, push, status
from imagesync.config.types import Config, ImageRule, StoreConfig
from imagesync.daemon.passes import PassWatch, run_one_pass
from imagesync.engine import Engine
from imagesync.errors import StateDirError
from imagesync.metrics import Metrics
from imagesync.model import ImageRecord, NewImage
from imagesync.plan import plan
from imagesync.sites.directory import DirectorySite
from imagesync.sites.memory import MemorySite
from imagesync.state import State
from tests.unit.memconfig import memory_config

KB = 1000


# --------------------------------------------------------------------------- helpers


def stores_config(
    tmp_path: Path, names: tuple[str, ...] = ("a", "b"), required: tuple[str, ...] | None = None
) -> Config:
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
    return Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / "state",
        poll_interval=60,
        clouds={},
        stores={n: StoreConfig(name=n, type="directory", path=tmp_path / n) for n in names},
        images=(ImageRule(pattern="img*", clouds=(), stores=required or names),),
        transfer_retries=1,
    )


def upload(root: Path, site: str, name: str, data: bytes) -> str:
    """Put an image in a directory store as a person would (not through a copy)."""
    s = DirectorySite(site, root)
    new = NewImage(name, "raw", "bare", 0, 0, {}, len(data))
    w = s.create(new)
    w.write(data)
    rec = w.finish()
    s.publish(rec.id)
    return rec.id


@pytest.fixture
def pushed(tmp_path: Path) -> Config:
    """Directory stores a and b; ``img-test`` (v1) uploaded to a and pushed to b."""
    config = stores_config(tmp_path)
    upload(tmp_path / "a", "a", "img-test", b"v1" * 500)
    assert push(config, "img-test") == 0
    return config


# --------------------------------------------------------------------------- 1: check


def test_status_that_finds_a_copy_stale_stops_check_answering_it(
    pushed: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pushed
    assert check(config, "img-test", "b") == 0
    old_id = capsys.readouterr().out.strip()
    upload(tmp_path / "a", "a", "img-test", b"v2" * 500)  # a newer version, on a only
    assert status(config, "img-test") == 0
    assert "stale" in capsys.readouterr().out
    # the recorded "current" was replaced by what status saw: the old id is never handed out
    assert check(config, "img-test", "b") == 1
    captured = capsys.readouterr()
    assert old_id not in captured.out and "stale" in captured.err


def test_a_dry_run_records_what_it_found_too(pushed: Config, tmp_path: Path) -> None:
    config = pushed
    upload(tmp_path / "a", "a", "img-test", b"v2" * 500)
    assert push(config, "img-test", dry_run=True) == 0
    state = State(config.state_dir)
    cell = state.cell("img-test", "b")
    assert cell is not None and cell.state == "stale"


def test_check_json_says_as_of_when_the_answer_was_taken(
    pushed: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pushed
    recorded = State(config.state_dir).cell("img-test", "b")
    assert recorded is not None
    capsys.readouterr()
    assert check(config, "img-test", "b", as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    as_of = datetime.fromisoformat(out["as_of"].replace("Z", "+00:00"))
    assert as_of.timestamp() == int(recorded.recorded)  # the recorded time, to the second
    assert check(config, "img-test", "b", as_json=True, fresh=True) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert fresh["answered_from"] == "sites" and fresh["as_of"].endswith("Z")


def test_a_daemon_pass_records_before_its_copies_run(tmp_path: Path) -> None:
    """A pass that finds a cell stale records it before copying: while a long copy runs,
    check does not answer the old id from an older record."""
    seen: list[str | None] = []

    class Slow(MemorySite):
        def create(self, new: NewImage) -> Any:
            cell = engine.state.cell("img-a", "c2")
            seen.append(cell.state if cell else None)
            return super().create(new)

    sites: dict[str, MemorySite] = {"c1": MemorySite("c1"), "c2": Slow("c2")}
    engine = Engine(memory_config(tmp_path, ["c1", "c2"]), sites=sites)
    sites["c1"].add("img-a", b"x" * 3 * KB)
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    engine.execute_concurrently(p)
    assert seen == ["missing"]


# --------------------------------------------------------------------------- 2: fan out


class CountingSite(MemorySite):
    """A memory site that counts the bytes it serves (what the source's network would)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.served = 0
        self._count = threading.Lock()

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        for chunk in super().open(image, offset):
            with self._count:
                self.served += len(chunk)
            yield chunk


def daemon_pass_reads(tmp_path: Path, targets: int, *, split: bool = False) -> tuple[int, int]:
    """(bytes the source served, copy.start events) for one daemon pass to ``targets``."""
    names = ["src", *[f"t{i}" for i in range(targets)]]
    src = CountingSite("src")
    sites: dict[str, MemorySite] = {"src": src, **{n: MemorySite(n) for n in names[1:]}}
    src.add("img-a", os.urandom(300 * KB))
    engine = Engine(memory_config(tmp_path / f"{targets}{split}", names), sites=sites)
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    with capture_logs() as logs:
        if split:  # what the daemon did before issue 11: one task per target
            results = engine.executor.run(p, concurrency=4, split_targets=True)
        else:
            results = engine.execute_concurrently(p)
    assert all(r.ok for r in results)
    assert all(len(sites[n].images) == 1 for n in names[1:])
    return src.served, sum(1 for e in logs if e["event"] == "copy.start")


def test_a_daemon_pass_reads_the_source_once_for_all_its_targets(tmp_path: Path) -> None:
    size = 300 * KB
    assert daemon_pass_reads(tmp_path, 1) == (size, 1)
    assert daemon_pass_reads(tmp_path, 3) == (size, 1)  # read once, fan out
    assert daemon_pass_reads(tmp_path, 3, split=True) == (3 * size, 3)  # the old way


def test_a_target_at_its_limit_is_split_off_and_waits_alone(tmp_path: Path) -> None:
    """A copy whose targets are partly busy starts now to the free ones; the busy target
    gets its own copy later (never more than its site's limit at once)."""
    gate = threading.Event()
    from tests.unit.test_daemon import HookSite

    sites: dict[str, MemorySite] = {
        "c1": MemorySite("c1"),
        "slow": HookSite("slow", gate.wait),
        "c3": MemorySite("c3"),
    }
    for i in range(2):
        sites["c1"].add(f"img-{i}", os.urandom(3 * KB))
    # img-0 and img-1 are on c3 already: their copies need only the slow site
    first = Engine(memory_config(tmp_path / "first", ["c1", "c3"]), sites=sites)
    first.execute(plan(first.rules, first.inventories(), first.site_names))
    sites["c1"].add("img-2", os.urandom(3 * KB))
    # every site may take 2 transfers at once (overall 3, one left to the others)
    engine = Engine(memory_config(tmp_path, list(sites), max_transfers=3), sites=sites)
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    assert [c.targets for c in p.copies] == [("slow",), ("slow",), ("slow", "c3")]
    done: list[Any] = []
    with capture_logs() as logs:
        runner = threading.Thread(target=lambda: done.append(engine.execute_concurrently(p)))
        runner.start()
        try:
            # img-2 found slow at its limit: its copy to c3 did not wait for slow
            for _ in range(400):
                # ...once both copies to slow have started (threads lag on a loaded host)
                started = getattr(sites["slow"], "active", 0) == 2
                if started and any(s.rec.name == "img-2" for s in sites["c3"].images.values()):
                    break
                gate.wait(0.025)
            assert any(s.rec.name == "img-2" for s in sites["c3"].images.values())
            slow = sites["slow"]
            assert isinstance(slow, HookSite) and slow.active == 2
        finally:
            gate.set()
            runner.join(timeout=10)
    assert done and all(r.ok for r in done[0])
    assert sites["slow"].most_active <= 2  # type: ignore[attr-defined]
    starts = [tuple(e["targets"]) for e in logs if e["event"] == "copy.start"]
    assert sorted(starts) == [("c3",), ("slow",), ("slow",), ("slow",)]
    assert len(sites["slow"].images) == 3 and len(sites["c3"].images) == 3


# --------------------------------------------------------------------------- 3: names


def test_push_of_a_typo_names_the_sites_and_the_closest_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stores_config(tmp_path)
    upload(tmp_path / "a", "a", "img-test", b"x" * 100)
    with pytest.raises(NoSuchImage) as err:
        push(config, "img-tset")
    assert str(err.value) == "no image named 'img-tset' on a, b (did you mean 'img-test'?)"


def test_push_and_status_of_a_typo_exit_non_zero_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stores_config(tmp_path)
    cfg = write_config(tmp_path, config)
    upload(tmp_path / "a", "a", "img-test", b"x" * 100)
    for argv in (["push", "img-tset"], ["status", "img-tset"], ["status", "nosuch"]):
        assert main(["-c", str(cfg), *argv]) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == "" and "missing" not in captured.err
        assert f"no image named '{argv[1]}' on a, b" in captured.err


def test_status_says_not_required_where_no_rule_wants_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stores_config(tmp_path, ("a", "b", "c"), required=("a", "b"))
    upload(tmp_path / "a", "a", "img-test", b"x" * 100)
    assert status(config) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("img"))
    assert row.split("  ")[-1].strip() == "not required"
    assert "missing" in row  # b is required and missing


def write_config(tmp_path: Path, config: Config) -> Path:
    lines = [f"state_dir: {config.state_dir}", "stores:"]
    lines += [f"  {n}: {{type: directory, path: {s.path}}}" for n, s in config.stores.items()]
    lines += ["images:", '  - name: "img*"', f"    stores: [{', '.join(config.stores)}]"]
    path = tmp_path / "imagesync.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- 4: permissions

SETPRIV = shutil.which("setpriv")
as_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv to run the CLI as nobody",
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder nobody may traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="imagesync-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(cfg: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    cmd = [SETPRIV, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    cmd += [sys.executable, "-m", "imagesync.cli", "-c", str(cfg), *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd="/")


@as_nobody
def test_another_user_gets_one_line_naming_the_state_dir_and_the_fix(shared_dir: Path) -> None:
    config = stores_config(shared_dir)
    for n in config.stores:
        (shared_dir / n).chmod(0o755)
    cfg = write_config(shared_dir, config)
    cfg.chmod(0o644)
    upload(shared_dir / "a", "a", "img-test", b"x" * 100)
    assert push(config, "img-test") == 0  # root made the state dir: 0750 root
    assert stat.S_IMODE(os.stat(config.state_dir).st_mode) == 0o750
    for argv in (
        ["status"],
        ["push", "img-test"],
        ["check", "img-test", "--cloud", "b"],
        ["history"],
    ):
        r = run_as_nobody(cfg, *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(config.state_dir) in r.stderr and "as user nobody" in r.stderr
        assert "sudo -u root imagesync" in r.stderr or "let nobody read it" in r.stderr
    r = run_as_nobody(cfg, "config", "check", "--connect")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"state_dir: FAILED - {config.state_dir} is not writable by nobody" in r.stdout


def test_a_failed_pass_for_an_expected_reason_logs_one_line_without_traceback() -> None:
    def broken() -> Engine:
        raise StateDirError("cannot use the state directory /x as user nobody: permission denied")

    watch = PassWatch(Metrics(), lambda: None)
    with capture_logs() as logs:
        report = run_one_pass(broken, cancel=threading.Event(), watch=watch)
    assert report.error is not None and "/x" in report.error
    [event] = [e for e in logs if e["event"] == "pass.failed"]
    assert event["log_level"] == "error" and "exc_info" not in event
