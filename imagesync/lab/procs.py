"""Processes of the lab: finding the tools, starting services, readiness, memory, stopping,
and the file locks they share.

Every service runs as its own process group (``start_new_session=True``), so a uwsgi master and
its workers are stopped together with one ``killpg``. Every service's argv carries a
``--pidfile`` inside the lab directory: that marks it as a process of *this* lab, which is how
``down`` finds processes even when ``lab.json`` is stale, and how pid reuse is told apart.
Only Linux is supported (``/proc``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagesync.errors import LabError

EXTRA_MISSING = "the lab needs the 'lab' extra: pip install 'imagesync[lab]'"
LOOPBACK = "127.0.0.1"

#: Popen objects of the services this process started, kept so that they are reaped (no zombies,
#: no "subprocess is still running" warnings) when the same process stops them again.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Tools:
    """Where the lab's programs and files are. See ``find_tools``."""

    venv: Path  # passed to uwsgi --virtualenv
    uwsgi: Path
    keystone_manage: Path
    glance_manage: Path
    keystone_wsgi: Path
    glance_wsgi: Path
    glance_paste: Path


def find_executable(name: str) -> Path | None:
    """``name`` next to the running interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def data_dirs(relative: str) -> list[Path]:
    """Where a package's data file (``etc/...``) may have been installed."""
    return [Path(sys.prefix) / relative, Path(sysconfig.get_path("data")) / relative]


def python() -> Path:
    """The interpreter running the lab (the venv's): runs the lab's own service modules."""
    return Path(sys.executable)


def _glance_paste_ini() -> Path | None:
    candidates = data_dirs("etc/glance/glance-api-paste.ini")
    return next((c for c in candidates if c.is_file()), None)


def find_tools() -> Tools:
    """Locate uwsgi, keystone-manage, glance-manage and the services' WSGI files.

    Raises LabError naming the 'lab' extra when any of them is missing.
    """
    missing: list[str] = []
    exes = {name: find_executable(name) for name in ("uwsgi", "keystone-manage", "glance-manage")}
    missing += [name for name, path in exes.items() if path is None]
    pkgs = {name: package_dir(name) for name in ("keystone", "glance")}
    missing += [name for name, path in pkgs.items() if path is None]
    missing += [m for m in ("keystonemiddleware", "keystoneclient") if package_dir(m) is None]
    wsgi = {name: path / "wsgi/api.py" for name, path in pkgs.items() if path is not None}
    missing += [f"{name}/wsgi/api.py" for name, path in wsgi.items() if not path.is_file()]
    paste = _glance_paste_ini()
    if paste is None and pkgs["glance"] is not None:
        missing.append("etc/glance/glance-api-paste.ini")
    if missing:
        raise LabError(f"{EXTRA_MISSING} (not found: {', '.join(missing)})")
    assert paste is not None
    return Tools(
        venv=Path(sys.prefix),
        uwsgi=_found(exes["uwsgi"]),
        keystone_manage=_found(exes["keystone-manage"]),
        glance_manage=_found(exes["glance-manage"]),
        keystone_wsgi=wsgi["keystone"],
        glance_wsgi=wsgi["glance"],
        glance_paste=paste,
    )


def _found(path: Path | None) -> Path:
    assert path is not None
    return path


# --- ports ------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now (the OS picks them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # uwsgi sets SO_REUSEADDR too: a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# --- logs and one-shot commands ----------------------------------------------------------------


def log_tail(log: Path, lines: int = 25) -> str:
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"    (cannot read {log}: {exc.strerror})"
    # Eventlet's multi-line deprecation banner says nothing about the failure.
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in kept)


def failure(message: str, log: Path) -> LabError:
    return LabError(f"{message}; last lines of {log}:\n{log_tail(log)}")


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # The services talk to each other over loopback: never through a proxy.
    no_proxy = ",".join(filter(None, [env.get("no_proxy", ""), "127.0.0.1,localhost"]))
    env["no_proxy"] = env["NO_PROXY"] = no_proxy
    env.update(extra)
    return env


def run_step(
    argv: Sequence[str | Path],
    log: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> None:
    """Run a one-shot command (db_sync, bootstrap, ...), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n".encode())
        out.flush()
        try:
            done = subprocess.run(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(env or {}),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise failure(f"{what} did not finish within {timeout:.0f} s", log) from None
        except OSError as exc:
            raise LabError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        raise failure(f"{what} failed (exit status {done.returncode})", log)


# --- services ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceFiles:
    """Where one of a cloud's services keeps its files: its home DIRECTORY/<cloud>/<service>/
    (``etc/`` below it, for those configured there), its main configuration file (relative to
    its home), its log and its pid file. One table, so that each service's module names its
    paths instead of repeating the same small functions."""

    service: str
    conf: str

    def home(self, cloud_dir: Path) -> Path:
        return cloud_dir / self.service

    def etc(self, cloud_dir: Path) -> Path:
        return self.home(cloud_dir) / "etc"

    def conf_file(self, cloud_dir: Path) -> Path:
        return self.home(cloud_dir) / self.conf

    def log_file(self, cloud_dir: Path) -> Path:
        return service_log(cloud_dir, self.service)

    def pid_file(self, cloud_dir: Path) -> Path:
        return service_pid_file(cloud_dir, self.service)


def service_log(cloud_dir: Path, service: str) -> Path:
    """A cloud's service writes its log to DIRECTORY/<cloud>/logs/<service>.log."""
    return cloud_dir / "logs" / f"{service}.log"


def service_pid_file(cloud_dir: Path, service: str) -> Path:
    """A cloud's service's ``--pidfile`` (its process mark): DIRECTORY/<cloud>/run/<service>.pid."""
    return cloud_dir / "run" / f"{service}.pid"


def make_service_dirs(cloud_dir: Path) -> None:
    """The logs/ and run/ directories of a cloud's services."""
    (cloud_dir / "logs").mkdir(exist_ok=True)
    (cloud_dir / "run").mkdir(exist_ok=True)


def require_free_port(what: str, port: int) -> None:
    """Fail, saying what to do, when ``port`` (``what``'s) is taken by another program."""
    if not port_is_free(port):
        raise LabError(
            f"{what}'s port {port} is taken by another program; stop it, or remove the lab "
            "directory for a fresh lab"
        )


def service_argv(
    tools: Tools, port: int, wsgi_file: Path, pid_file: Path, *, extra: Sequence[str] = ()
) -> list[str | Path]:
    """uwsgi serving one of a cloud's OpenStack services (from the lab's venv) over HTTP/1.1
    on loopback ``port``."""
    socket = ["--http11-socket", f"{LOOPBACK}:{port}"]
    return uwsgi_argv(tools.uwsgi, tools.venv, socket, wsgi_file, pid_file, extra=extra)


def uwsgi_argv(
    uwsgi: Path,
    venv: Path,
    socket: Sequence[str],
    wsgi_file: Path,
    pid_file: Path,
    *,
    threads: int = 4,
    extra: Sequence[str] = (),
) -> list[str | Path]:
    """uwsgi serving one WSGI app: a master with one process of ``threads`` threads, the app
    loaded in the worker (``--lazy-apps``), stopped by SIGTERM, marked by ``pid_file``."""
    return [
        uwsgi,
        *socket,
        "--wsgi-file",
        wsgi_file,
        "--master",
        "--processes",
        "1",
        "--threads",
        str(threads),
        "--lazy-apps",
        "--die-on-term",
        "--need-app",
        "--buffer-size",
        "65535",
        *extra,
        "--virtualenv",
        venv,
        "--pidfile",
        pid_file,
    ]


def start_service(argv: Sequence[str | Path], log: Path, env: Mapping[str, str]) -> int:
    """Start a long-running service in its own process group; returns its pid (= its pgid)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, pgid) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _all_pids() -> Iterable[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def group_members(pgid: int, marker: str) -> list[int]:
    """Live (non-zombie) processes of group ``pgid`` whose argv contains ``marker``."""
    _reap()
    found = []
    for pid in _all_pids():
        st = _stat(pid)
        if st is None or st[1] != pgid or st[0] == "Z":
            continue
        if marker in cmdline(pid):
            found.append(pid)
    return found


def is_running(pid: int | None, marker: str) -> bool:
    """Is the service master ``pid`` (started with ``marker`` in its argv) still there?"""
    if pid is None:
        return False
    _reap()
    child = _CHILDREN.get(pid)
    if child is not None:
        # Started by this process: its handle is the truth. The argv check is for services
        # another process started (pids read back from lab.json); a service may rewrite its
        # argv while it starts, and the check once took a starting keystone for a dead one.
        return child.poll() is None
    st = _stat(pid)
    return st is not None and st[0] != "Z" and marker in cmdline(pid)


def lab_processes(directory: Path) -> dict[int, str]:
    """Every process group started with a ``--pidfile`` inside ``directory``: pgid -> pidfile."""
    _reap()
    prefix = str(directory.resolve()) + os.sep
    groups: dict[int, str] = {}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        args = cmdline(pid)
        for flag, value in itertools.pairwise(args):
            if flag == "--pidfile" and value.startswith(prefix):
                st = _stat(pid)
                if st is not None and st[0] != "Z":
                    groups.setdefault(st[1], value)
                break
    return groups


def rss_mb(pgid: int | None, marker: str) -> float:
    """Resident memory of a service: VmRSS summed over its master and workers, in MB."""
    if pgid is None:
        return 0.0
    total_kb = 0
    for pid in group_members(pgid, marker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def stop_groups(groups: Mapping[int, str], *, grace: float = 10.0) -> int:
    """SIGTERM each process group (pgid -> marker), wait, SIGKILL what is left.

    Returns how many processes there were. Groups with no process carrying their marker are
    left alone: their pgid may have been reused by someone else's processes.
    """
    members = {pgid: group_members(pgid, marker) for pgid, marker in groups.items()}
    members = {pgid: pids for pgid, pids in members.items() if pids}
    count = sum(len(pids) for pids in members.values())
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pgid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while members and time.monotonic() < deadline:
            members = {
                pgid: pids for pgid, pids in members.items() if group_members(pgid, groups[pgid])
            }
            if members:
                time.sleep(0.1)
        if not members:
            break
    if members:
        raise LabError(f"could not stop process groups {sorted(members)} (even with SIGKILL)")
    return count


@dataclass(frozen=True)
class Starting:
    """A service being waited for: its process (``pid`` and the ``marker`` in its argv), its
    ``log`` (its tail is quoted when it fails), what to call it, and how long to wait.
    ``abort`` is called at every round: it may raise to give up."""

    pid: int
    marker: str
    log: Path
    what: str
    timeout: float = 60.0
    abort: Callable[[], None] | None = None

    def wait(self, ready: Callable[[], bool], not_ready: str) -> float:
        """Poll ``ready`` every 0.1 s while the service runs; returns the seconds it took.
        Fails fast if the service exits, else after ``timeout`` seconds."""
        start = time.monotonic()
        while not ready():
            if self.abort is not None:
                self.abort()
            if not is_running(self.pid, self.marker):
                raise failure(f"{self.what} exited while starting", self.log)
            if time.monotonic() - start > self.timeout:
                raise failure(f"{self.what} {not_ready} within {self.timeout:.0f} s", self.log)
            time.sleep(0.1)
        return time.monotonic() - start


def wait_http(url: str, service: Starting, context: ssl.SSLContext | None = None) -> float:
    """Poll ``url`` until it answers 200 or 300; returns the seconds it took. ``context``
    verifies an https service (the lab's own CA)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)

    def answers() -> bool:
        try:
            with opener.open(url, timeout=2.0) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except (OSError, ValueError):
            code = 0
        return code in (200, 300)

    return service.wait(answers, f"did not answer {url}")


def wait_file(path: Path, content: str, service: Starting) -> float:
    """Wait until ``path`` holds ``content`` (a service's own readiness mark); as wait_http."""

    def marked() -> bool:
        try:
            return path.read_text().strip() == content
        except OSError:
            return False

    return service.wait(marked, "was not ready")


def wait_service(
    cloud_dir: Path,
    service: str,
    url: str,
    pid: int,
    timeout: float,
    abort: Callable[[], None] | None,
) -> None:
    """Wait for a cloud's service (with the usual log and pidfile) to answer ``url``."""
    marker = str(service_pid_file(cloud_dir, service))
    log = service_log(cloud_dir, service)
    wait_http(url, Starting(pid, marker, log, f"{cloud_dir.name}: {service}", timeout, abort))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): one process at a time, be it
    another thread, a test process or a service's worker."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
