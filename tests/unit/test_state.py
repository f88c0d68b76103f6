"""The state directory's own rules: explicit modes whatever the umask, and lock files that
cannot be opened (a root-run ``push`` left them) fail one (name, site), not the pass."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from imagesync.errors import LockBusy, LockDenied
from imagesync.state import State, _key
from imagesync.transfer import new_image_for
from tests.unit.test_engine import make, one_pass


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_state_files_have_explicit_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        state = State(tmp_path / "state")
        state.add_lease("s", "id", "img")  # a write: sqlite makes its -wal and -shm files
        with state.lock("img", "s"):
            pass
        root = tmp_path / "state"
        # while open: the -wal and -shm files exist
        modes = {p.name: _mode(p) for p in root.rglob("*") if p.is_file()}
        state.close()
    finally:
        os.umask(old)
    assert _mode(root) == 0o750 and _mode(root / "locks") == 0o750
    assert modes == {
        "imagesync.sqlite": 0o640,
        "imagesync.sqlite-wal": 0o640,
        "imagesync.sqlite-shm": 0o640,
        _key("img", "s"): 0o640,
    }


def _refuse_lock_files(monkeypatch: pytest.MonkeyPatch, *, writes_only: bool = False) -> None:
    """os.open of a lock file fails as it does for the service user facing a root-owned one
    (tests run as root, so permissions alone cannot show it)."""
    real = os.open

    def guarded(path: object, flags: int, *a: int, **kw: object) -> int:
        denied = not writes_only or flags & (os.O_WRONLY | os.O_RDWR)
        if str(path).endswith(".lock") and denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", guarded)


def test_a_lock_file_that_cannot_be_opened_is_lock_denied_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = State(tmp_path / "state")
    _refuse_lock_files(monkeypatch)
    with pytest.raises(LockDenied) as caught, state.lock("img", "s"):
        pass
    message = str(caught.value)
    assert "img on s" in message and str(tmp_path / "state" / "locks") in message
    assert "Permission denied" in message and "chown" in message
    assert isinstance(caught.value, LockBusy)  # every "cannot take it now" handler copes


def test_a_lock_file_readable_only_still_excludes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = State(tmp_path / "state")
    with state.lock("img", "s"):
        pass  # the file exists now, as an older root-run push left it (0644, root's)
    _refuse_lock_files(monkeypatch, writes_only=True)
    other = State(tmp_path / "state")
    with state.lock("img", "s"), pytest.raises(LockBusy), other.lock("img", "s"):
        pass


def test_a_new_lock_file_made_by_root_belongs_to_the_state_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can make a file for another user")
    state = State(tmp_path / "state")
    os.chown(tmp_path / "state" / "locks", 4321, 4322)
    with state.lock("img", "s"):
        pass
    st = (tmp_path / "state" / "locks" / _key("img", "s")).stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_a_denied_lock_fails_that_name_and_site_and_the_pass_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, sites = make(tmp_path, n=3)
    sites["c1"].add("img-a", os.urandom(3000))
    sites["c1"].add("img-b", os.urandom(3000))
    # a crashed upload of img-c on c2: recovery needs the lock it cannot open, and skips it
    crashed = sites["c1"].add("img-c", b"c")
    leftover = sites["c2"].create(new_image_for(crashed, crashed.version, "private")).image_id
    sites["c1"].delete(crashed.id)
    denied = (_key("img-a", "c2"), _key("img-c", "c2"))
    refused: set[str] = set()
    real = os.open

    def guarded(path: object, flags: int, *a: int, **kw: object) -> int:
        if str(path).endswith(denied):
            refused.add(Path(str(path)).name)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", guarded)
    _, results = one_pass(engine, ["img-a", "img-b"])
    by_name = {r.action.name: r for r in results}
    a, b = by_name["img-a"], by_name["img-b"]
    assert b.ok and b.outcome == "done"
    assert not a.ok and a.outcome == "failed"
    by_site = {t.site: t for t in a.targets}
    assert by_site["c3"].ok  # the other target of the same name was copied
    assert by_site["c2"].error_kind == "site" and "cannot open the lock file" in (
        by_site["c2"].error or ""
    )
    published = [s.rec.name for s in sites["c2"].images.values() if s.rec.counts]
    assert published == ["img-b"]
    assert leftover in sites["c2"].images  # never deleted without its lock
    assert refused == set(denied)  # both the copy and the recovery met the denied lock
