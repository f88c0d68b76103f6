"""The lab's etcd: a real single-node etcd on loopback, for several daemons to coordinate through
(``imagesync lab up --etcd``; see ``imagesync.coordination``).

It is the system's ``etcd`` (Debian's ``etcd-server`` package), started in its own process
group with its data under ``LAB/etcd/data``, like the lab's other services. etcd takes no
``--pidfile``, so the data directory in its argv is the marker that tells this lab's etcd
from any other (``procs.is_running``, ``processes``).
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

from imagesync.errors import LabError
from imagesync.lab import procs

#: the Debian package that ships the binary (README and tests/debpkg.py name it too)
PACKAGE = "etcd-server"
DIR = "etcd"


def find_binary() -> Path:
    """The system's etcd, or a LabError saying which package to install."""
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise LabError(
            f"`lab up --etcd` needs the etcd binary: install Debian's {PACKAGE} "
            f"(apt-get install -y {PACKAGE})"
        )
    return Path(found)


def data_dir(lab_dir: Path) -> Path:
    return lab_dir / DIR / "data"


def log_file(lab_dir: Path) -> Path:
    return lab_dir / DIR / "etcd.log"


def marker(lab_dir: Path) -> str:
    """What this lab's etcd carries in its argv (the value of ``--data-dir``)."""
    return str(data_dir(lab_dir))


def client_url(port: int) -> str:
    return f"http://{procs.LOOPBACK}:{port}"


#: the lab's lease timeout: a dead lab member's names move within seconds, not half a minute
LEASE_SECONDS = 5


def coordination_url(port: int) -> str:
    """The tooz URL the generated imagesync.yaml names (with ``lease_timeout: 5s``)."""
    return f"etcd3+http://{procs.LOOPBACK}:{port}"


def start(lab_dir: Path, port: int, peer_port: int) -> int:
    """Start etcd; returns its pid (= its pgid)."""
    binary = find_binary()
    data_dir(lab_dir).mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir(lab_dir), 0o700)  # etcd refuses a data dir others can read
    url = client_url(port)
    argv: list[str | Path] = [
        binary,
        "--name",
        "imagesync-lab",
        "--data-dir",
        marker(lab_dir),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        client_url(peer_port),
        "--initial-advertise-peer-urls",
        client_url(peer_port),
        "--initial-cluster",
        f"imagesync-lab={client_url(peer_port)}",
        "--log-level",
        "warn",
    ]
    # etcd 3.4 on arm64 and others asks for this to run at all; harmless elsewhere
    env = {"ETCD_UNSUPPORTED_ARCH": os.uname().machine}
    return procs.start_service(argv, log_file(lab_dir), env)


def wait_ready(lab_dir: Path, port: int, pid: int, *, timeout: float = 30.0) -> float:
    """Wait for etcd's /health to answer."""
    return procs.wait_http(
        f"{client_url(port)}/health",
        procs.Starting(pid, marker(lab_dir), log_file(lab_dir), "etcd", timeout),
    )


def processes(lab_dir: Path) -> dict[int, str]:
    """This lab's etcd process groups (pgid -> marker), whether lab.json knows of them or not."""
    want = marker(lab_dir)
    groups: dict[int, str] = {}
    for pid in procs._all_pids():
        args = procs.cmdline(pid)
        for flag, value in itertools.pairwise(args):
            if flag == "--data-dir" and value == want:
                st = procs._stat(pid)
                if st is not None and st[0] != "Z":
                    groups.setdefault(st[1], want)
                break
    return groups
