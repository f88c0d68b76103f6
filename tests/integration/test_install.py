"""README's install path, done as an operator does it: a wheel, a fresh venv, a symlink.

The wheel is built from a copy of the tree (so the build leaves nothing in the worktree), with
no setuptools deprecation warning (the ``license`` table was one). It is installed into a fresh
venv laid out as README says (``/opt/imagesync`` and ``/usr/local/bin/imagesync``, under a
temporary root), and the installed program, not the worktree's, is run: ``--version``, the
example configuration and clouds.yaml written where README puts them and checked, the unit.
Needs no lab; under tests/integration because installing the dependencies takes a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import imagesync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _operator_env(root: Path) -> dict[str, str]:
    """An environment without this checkout or its venv in it (only the install is found)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{root / 'usr/local/bin'}:/usr/bin:/bin"
    env.pop("IMAGESYNC_CONFIG", None)
    env.pop("OS_CLIENT_CONFIG_FILE", None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "imagesync", src / "imagesync", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    log = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(src)], src
    )
    # the `license = {text = ...}` table made setuptools warn on every build
    assert "SetuptoolsDeprecationWarning" not in log, log
    (built,) = out.glob("imagesync-*.whl")
    return built


def test_the_documented_install_from_a_wheel_works(wheel: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    venv = root / "opt" / "imagesync"
    bindir = root / "usr" / "local" / "bin"
    etc = root / "etc" / "imagesync"
    bindir.mkdir(parents=True)
    etc.mkdir(parents=True)
    # README, "Deploying on a control host": python3 -m venv, pip install the wheel, symlink
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], tmp_path)
    (bindir / "imagesync").symlink_to(venv / "bin" / "imagesync")
    env = _operator_env(root)

    def imagesync_(*args: str) -> str:
        return _run(["imagesync", *args], tmp_path, env)

    version = imagesync_("--version")
    assert version.startswith(f"imagesync {imagesync.__version__} (Python ")
    assert str(venv) in version  # the installed copy ran, not this checkout

    (etc / "imagesync.yaml").write_text(imagesync_("config", "example"))
    (etc / "clouds.yaml").write_text(imagesync_("config", "example", "--clouds-yaml"))
    out = imagesync_("-c", str(etc / "imagesync.yaml"), "config", "check")
    assert out.startswith(f"{etc / 'imagesync.yaml'}: ok (2 clouds, 1 stores, 2 image rules)")

    unit = imagesync_("config", "unit")
    assert "ExecStart=/usr/local/bin/imagesync -c /etc/imagesync/imagesync.yaml daemon" in unit
    assert unit == (ROOT / "systemd" / "imagesync.service").read_text()

    # nothing of the checkout was imported: the package came from the venv
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import imagesync; print(imagesync.__file__)"],
        tmp_path,
        env,
    )
    assert where.strip().startswith(str(venv))
