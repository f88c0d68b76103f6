"""Starting, inspecting and stopping a lab: the implementation of ``up``, ``status``, ``down``.

A cold start builds every cloud from nothing; it runs the one-shot set-up commands in parallel
(the schema is created once and its sqlite files copied to the other new clouds, since it is the
same everywhere) and then brings the clouds up side by side. A warm start only starts the uwsgi
services of clouds that are already built. Any failure stops whatever this call started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesync.errors import LabError
from imagesync.lab import etcd, glance, keystone, nova, procs
from imagesync.lab.state import (
    VOSPACE_RESOURCE_ID,
    CloudState,
    EtcdState,
    LabInfo,
    LabState,
    ServiceState,
    VOSpaceState,
    load_state,
    locked,
    save_state,
    write_client_files,
)
from imagesync.lab.vospace import service as vospace

DIR_ENV = "IMAGESYNC_LAB_DIR"
READY_TIMEOUT = 60.0


def default_dir() -> Path:
    """$IMAGESYNC_LAB_DIR, else ~/.local/state/imagesync/lab."""
    env = os.environ.get(DIR_ENV, "").strip()
    return Path(env) if env else Path.home() / ".local/state/imagesync/lab"


def _resolve(directory: Path | None) -> Path:
    return (directory if directory is not None else default_dir()).expanduser().resolve()


def _cloud_dir(state: LabState, cloud: CloudState) -> Path:
    return state.directory / cloud.name


def _markers(state: LabState, cloud: CloudState) -> tuple[str, str]:
    d = _cloud_dir(state, cloud)
    return str(keystone.pid_file(d)), str(glance.pid_file(d))


_PID_FILES = {
    "keystone": keystone.pid_file,
    "glance": glance.pid_file,
    "placement": nova.placement_pid_file,
    "nova": nova.pid_file,
}


def _services(state: LabState, cloud: CloudState) -> list[tuple[str, ServiceState, str]]:
    """Every service of a cloud: (name, its state, the marker in its argv)."""
    d = _cloud_dir(state, cloud)
    return [(name, svc, str(_PID_FILES[name](d))) for name, svc in cloud.services()]


def _pool_size() -> int:
    return max(2, os.cpu_count() or 2)


def _new_ports(count: int, avoid: set[int]) -> list[int]:
    for _ in range(20):
        ports = procs.free_ports(count)
        if not avoid.intersection(ports):
            return ports
    raise LabError("could not find free loopback ports for the lab")


def _password() -> str:
    return secrets.token_urlsafe(18)


def up(
    clouds: int = 2,
    directory: Path | None = None,
    token_expiration: int | None = None,
    vospace_store: bool | None = None,
    nova_clouds: int = 0,
    with_etcd: bool = False,
) -> LabInfo:
    """Start the lab in ``directory`` (default: ``default_dir()``) with ``clouds`` clouds.

    Idempotent: a running lab is returned as it is; a built but stopped lab gets its services
    restarted (warm); anything not yet built is built (cold). A lab grows if asked for more
    clouds, but never shrinks (that would throw data away): asked for fewer clouds than it
    has, it starts and returns all of them. ``token_expiration`` (seconds) sets Keystone's
    token lifetime; None keeps the lab's current setting (Keystone's default, 3600 s, for a
    new lab). Beside the clouds runs one VOSpace service (``imagesync.lab.vospace``);
    ``vospace_store=True`` makes it the generated imagesync.yaml's central store (the caller
    says so when imagesync can build a VOSpace site: the lab does not look at the sites), False
    keeps the directory store, None keeps the lab's current choice.
    new lab). ``nova_clouds`` gives the first N clouds compute (Placement + Nova, about
    320 MB each; see imagesync.lab.nova); like clouds, compute is added, never taken away.
    ``with_etcd`` adds a real etcd (``imagesync.lab.etcd``) and names it in imagesync.yaml's
    ``coordination``; like compute, it is added, never taken away.
    """
    if clouds < 1:
        raise LabError("a lab needs at least one cloud")
    if nova_clouds < 0:
        raise LabError("the number of clouds with Nova cannot be negative")
    if token_expiration is not None and token_expiration < 1:
        raise LabError("the token expiration must be at least 1 second")
    tools = procs.find_tools()
    directory = _resolve(directory)
    start = time.monotonic()
    with locked(directory):
        state = load_state(directory) or LabState(directory=directory)
        restart_keystone = (
            token_expiration is not None and token_expiration != state.token_expiration
        )
        if token_expiration is not None:
            state.token_expiration = token_expiration
        if vospace_store is not None:
            state.vospace_store = vospace_store
        _add_clouds(state, max(clouds, nova_clouds))
        _add_nova(state, nova_clouds)
        _add_vospace(state)
        if with_etcd and state.etcd is None:
            etcd.find_binary()  # before anything starts: say which package is missing
            used = {svc.port for c in state.clouds for _, svc in c.services()}
            ports = _new_ports(2, used | ({state.vospace.port} if state.vospace else set()))
            state.etcd = EtcdState(port=ports[0], peer_port=ports[1])
        save_state(state)
        write_client_files(state)  # ports and passwords are known: clients may look already
        kind = _Start(tools, state, restart_keystone=restart_keystone).run()
        save_state(state)
    return state.info(time.monotonic() - start, kind)


def _add_clouds(state: LabState, count: int) -> None:
    missing = count - len(state.clouds)
    if missing <= 0:
        return
    used = {p for c in state.clouds for p in (c.keystone.port, c.glance.port)}
    ports = _new_ports(2 * missing, used)
    for i in range(missing):
        state.clouds.append(
            CloudState(
                name=f"lab{len(state.clouds) + 1}",
                keystone=ServiceState(port=ports[2 * i]),
                glance=ServiceState(port=ports[2 * i + 1]),
                admin_password=_password(),
                glance_password=_password(),
                password=_password(),
            )
        )


def _add_vospace(state: LabState) -> None:
    if state.vospace is not None:
        return
    used = {svc.port for c in state.clouds for _, svc in c.services()}
    state.vospace = VOSpaceState(port=_new_ports(1, used)[0], token=secrets.token_urlsafe(24))


def _vospace_marker(state: LabState) -> str:
    return str(vospace.pid_file(state.vospace_dir))


def _add_nova(state: LabState, count: int) -> None:
    wanting = [c for c in state.clouds[:count] if c.nova is None]
    if not wanting:
        return
    used = {svc.port for c in state.clouds for _, svc in c.services()}
    if state.vospace is not None:
        used.add(state.vospace.port)
    ports = _new_ports(2 * len(wanting), used)
    for i, cloud in enumerate(wanting):
        cloud.nova = ServiceState(port=ports[2 * i])
        cloud.placement = ServiceState(port=ports[2 * i + 1])
        cloud.nova_password = _password()
        cloud.nova_built = False


class _Aborted(Exception):
    """Another cloud failed: this one gives up (its error is not the one to report)."""


@dataclass
class _ColdJobs:
    """The one-shot set-up of the clouds being built, running in the set-up pool.

    The schema is the same in every cloud: it is made once (in ``first``) and copied.
    """

    first: Path
    keystone_schema: Future[None]
    glance_schema: Future[None]
    keys: dict[str, list[Future[None]]]


class _Start:
    """One ``up``: brings every cloud up side by side, and remembers what it started so that
    a failure stops exactly that."""

    def __init__(self, tools: procs.Tools, state: LabState, *, restart_keystone: bool) -> None:
        self.tools = tools
        self.state = state
        self.restart_keystone = restart_keystone
        self.started: dict[int, str] = {}  # pgid -> marker
        self.kinds: dict[str, str] = {}
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self.nova_builds: dict[str, Future[None]] = {}
        self.nova_launched: set[str] = set()
        needs_nova = any(c.nova is not None for c in state.clouds)
        self.nova_tools = nova.find_tools() if needs_nova else None

    def run(self) -> str:
        setup = ThreadPoolExecutor(_pool_size(), thread_name_prefix="lab-setup")
        clouds = ThreadPoolExecutor(len(self.state.clouds), thread_name_prefix="lab-up")
        try:
            cold = [c for c in self.state.clouds if not self._is_built(c)]
            for cloud in cold:
                self._reset(cloud)
            jobs = self._submit_setup(setup, cold) if cold else None
            self._submit_nova_builds(setup)
            futures = [
                clouds.submit(self._bring_up, c, jobs if c in cold else None)
                for c in self.state.clouds
            ]
            try:
                self._bring_up_etcd()
                self._bring_up_vospace()  # meanwhile, here: it starts in about a second
            except _Aborted:
                pass  # a cloud failed: its error is the one _raise_first reports
            except BaseException:
                self.failed.set()
                raise
            for f in futures:
                f.exception()  # wait (interruptible: Ctrl-C lands here)
            _raise_first(futures)
        except BaseException as exc:
            # Let the other threads give up (they check `failed` between steps) before
            # stopping what they started, or they could start something afterwards.
            self.failed.set()
            setup.shutdown(wait=True, cancel_futures=True)
            clouds.shutdown(wait=True, cancel_futures=True)
            procs.stop_groups(self.started)
            for c in self.state.clouds:
                for _, svc in c.services():
                    if svc.pgid in self.started:
                        svc.pid = svc.pgid = None
            v = self.state.vospace
            if v is not None and v.pgid in self.started:
                v.pid = v.pgid = None
            e = self.state.etcd
            if e is not None and e.pgid in self.started:
                e.pid = e.pgid = None
            save_state(self.state)
            if isinstance(exc, OSError):
                raise LabError(
                    f"starting the lab in {self.state.directory} failed: {exc}"
                ) from None
            raise
        finally:
            setup.shutdown(wait=False)
            clouds.shutdown(wait=False)
        kinds = set(self.kinds.values())
        return "cold" if "cold" in kinds else "warm" if "warm" in kinds else "running"

    def _bring_up_vospace(self) -> None:
        v = self.state.vospace
        assert v is not None
        marker = _vospace_marker(self.state)
        config = vospace.prepare(self.state.vospace_dir, v.port, v.token)
        if procs.is_running(v.pid, marker):
            self.kinds["vospace"] = "running"
        else:
            # a service of this lab that lab.json does not know of would hold the port
            procs.stop_groups(procs.lab_processes(self.state.vospace_dir))
            procs.require_free_port("vospace", v.port)
            self.kinds["vospace"] = "warm"
            pid = vospace.start(config, v.port)
            with self._lock:
                v.pid = v.pgid = pid
                self.started[pid] = marker
        self._check()
        vospace.wait_ready(config, v.pid or 0, timeout=READY_TIMEOUT, abort=self._check)

    def _bring_up_etcd(self) -> None:
        e = self.state.etcd
        if e is None:
            return
        d = self.state.directory
        if not procs.is_running(e.pid, etcd.marker(d)):
            procs.stop_groups(etcd.processes(d))  # one lab.json lost would hold the port
            procs.require_free_port("etcd", e.port)
            pid = etcd.start(d, e.port, e.peer_port)
            with self._lock:
                e.pid = e.pgid = pid
                self.started[pid] = etcd.marker(d)
        self._check()
        etcd.wait_ready(d, e.port, e.pid or 0, timeout=READY_TIMEOUT)

    def _is_built(self, cloud: CloudState) -> bool:
        d = _cloud_dir(self.state, cloud)
        return cloud.built and keystone.db_file(d).is_file() and glance.db_file(d).is_file()

    def _record(self, svc: ServiceState, pid: int, marker: str) -> None:
        with self._lock:
            svc.pid = svc.pgid = pid
            self.started[pid] = marker

    def _check(self) -> None:
        if self.failed.is_set():
            raise _Aborted

    def _reset(self, cloud: CloudState) -> None:
        """An empty directory with fresh configuration for a cloud to be built."""
        cloud.built = False
        d = _cloud_dir(self.state, cloud)
        # Leftovers of an interrupted cold start: stop them and start afresh.
        procs.stop_groups(procs.lab_processes(d))
        for _, svc in cloud.services():
            svc.pid = svc.pgid = None
        cloud.nova_built = False
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        keystone.write_config(d, self.state.token_expiration)
        glance.write_config(self.tools, d, cloud)

    def _submit_setup(self, pool: ThreadPoolExecutor, cold: list[CloudState]) -> _ColdJobs:
        first = _cloud_dir(self.state, cold[0])
        # The schemas first: they take longest, and everything else waits for them.
        jobs = _ColdJobs(
            first=first,
            keystone_schema=pool.submit(self._guarded, keystone.db_sync, self.tools, first),
            glance_schema=pool.submit(self._guarded, glance.db_sync, self.tools, first),
            keys={},
        )
        for cloud in cold:
            d = _cloud_dir(self.state, cloud)
            jobs.keys[cloud.name] = [
                pool.submit(self._guarded, keystone.key_setup, self.tools, d, args)
                for args in keystone.key_setups()
            ]
        return jobs

    def _submit_nova_builds(self, pool: ThreadPoolExecutor) -> None:
        """Nova's and Placement's template databases (≈15 s) for clouds that lack them."""
        if self.nova_tools is None:
            return
        nova_manage, placement_manage, _, paste = self.nova_tools
        for cloud in self.state.clouds:
            d = _cloud_dir(self.state, cloud)
            if cloud.nova is None or nova.templates_built(d):
                continue
            nova.write_config(d, cloud, paste)
            self.nova_builds[cloud.name] = pool.submit(
                self._guarded, nova.build_templates, nova_manage, placement_manage, d
            )

    def _nova_running(self, cloud: CloudState) -> bool:
        d = _cloud_dir(self.state, cloud)
        assert cloud.nova is not None and cloud.placement is not None
        return procs.is_running(cloud.nova.pid, str(nova.pid_file(d))) and procs.is_running(
            cloud.placement.pid, str(nova.placement_pid_file(d))
        )

    def _launch_nova(self, cloud: CloudState) -> None:
        """(Re)start Placement and Nova together on fresh databases (Nova's are new at every
        start, so Placement's must be too). Nova waits by itself for Keystone and Placement
        before starting its services: a warm start launches it while Keystone still starts."""
        assert cloud.nova is not None and cloud.placement is not None
        assert self.nova_tools is not None
        d = _cloud_dir(self.state, cloud)
        n_marker, p_marker = str(nova.pid_file(d)), str(nova.placement_pid_file(d))
        if self.kinds.get(cloud.name) == "running":
            self.kinds[cloud.name] = "warm"
        procs.stop_groups(
            {
                svc.pgid: marker
                for svc, marker in ((cloud.nova, n_marker), (cloud.placement, p_marker))
                if svc.pgid is not None
            }
        )
        cloud.nova.pid = cloud.nova.pgid = cloud.placement.pid = cloud.placement.pgid = None
        _, _, placement_wsgi, paste = self.nova_tools
        nova.write_config(d, cloud, paste)
        nova.check_ports(cloud)
        build = self.nova_builds.get(cloud.name)
        if build is not None:
            build.result()
        self._check()
        if not cloud.nova_built:
            nova.register(d, cloud, keystone.admin_session(cloud))
        nova.install_templates(d)
        self._record(
            cloud.placement, nova.start_placement(self.tools, placement_wsgi, d, cloud), p_marker
        )
        self._record(cloud.nova, nova.start_nova(d, cloud), n_marker)
        self.nova_launched.add(cloud.name)

    def _launch_nova_early(self, cloud: CloudState) -> None:
        """On a warm start, launch a built cloud's Nova as soon as its Keystone is launched."""
        if cloud.nova is None or not cloud.nova_built or self.nova_tools is None:
            return
        if not self._nova_running(cloud):
            self._launch_nova(cloud)

    def _bring_up_nova(self, cloud: CloudState) -> None:
        """Placement and Nova up (Keystone is ready), and the flavors of a fresh start."""
        if cloud.nova is None or cloud.placement is None or self.nova_tools is None:
            return
        d = _cloud_dir(self.state, cloud)
        # a built Nova left running by an earlier `up` keeps its flavors; one started here
        # (now or early) is on fresh databases and needs them
        started_here = cloud.name in self.nova_launched
        if not started_here and not (self._nova_running(cloud) and cloud.nova_built):
            self._launch_nova(cloud)
            started_here = True
        nova.wait_ready(
            d,
            cloud,
            cloud.placement.pid or 0,
            cloud.nova.pid or 0,
            timeout=READY_TIMEOUT,
            abort=self._check,
        )
        if started_here:
            nova.create_flavors(d, cloud, keystone.admin_session(cloud))
            cloud.nova_built = True

    def _guarded(self, func: Callable[..., None], *args: Any) -> None:
        self._check()
        try:
            func(*args)
        except BaseException:
            self.failed.set()
            raise

    def _bring_up(self, cloud: CloudState, jobs: _ColdJobs | None) -> None:
        try:
            self._bring_up_cloud(cloud, jobs)
        except BaseException:
            self.failed.set()
            raise

    def _bring_up_cloud(  # noqa: C901 - one cloud's start-up steps, in the order they must run
        self, cloud: CloudState, jobs: _ColdJobs | None
    ) -> None:
        d = _cloud_dir(self.state, cloud)
        k_marker, g_marker = _markers(self.state, cloud)
        k_up = procs.is_running(cloud.keystone.pid, k_marker)
        g_up = procs.is_running(cloud.glance.pid, g_marker)
        if k_up and self.restart_keystone:
            # A new token lifetime only takes effect in a new Keystone process.
            procs.stop_groups({cloud.keystone.pid or 0: k_marker})
            k_up = False
        if jobs is None and k_up and g_up:
            keystone.wait_ready(
                d, cloud, cloud.keystone.pid or 0, timeout=READY_TIMEOUT, abort=self._check
            )
            glance.wait_ready(
                d, cloud, cloud.glance.pid or 0, timeout=READY_TIMEOUT, abort=self._check
            )
            self.kinds[cloud.name] = "running"
            self._bring_up_nova(cloud)
            return
        self.kinds[cloud.name] = "warm" if jobs is None else "cold"
        if jobs is None:
            # Processes of this cloud that lab.json does not know of would hold its ports.
            known = {svc.pid for _, svc in cloud.services() if svc.pid is not None}
            procs.stop_groups({g: m for g, m in procs.lab_processes(d).items() if g not in known})
            keystone.write_config(d, self.state.token_expiration)
            glance.write_config(self.tools, d, cloud)
        if not k_up:
            keystone.check_port(cloud)
        if not g_up:
            glance.check_port(cloud)
        if jobs is not None:
            jobs.glance_schema.result()
            if d != jobs.first:
                shutil.copyfile(glance.db_file(jobs.first), glance.db_file(d))
        self._check()
        if not g_up:
            # Glance needs Keystone only to serve requests, not to start: start it early.
            self._record(cloud.glance, glance.start(self.tools, d, cloud), g_marker)

        def check() -> None:
            # Meanwhile, a Glance that dies on start-up fails the start at once.
            self._check()
            if not procs.is_running(cloud.glance.pid, g_marker):
                raise procs.failure(
                    f"{cloud.name}: glance exited while starting", glance.log_file(d)
                )

        if jobs is not None:
            jobs.keystone_schema.result()
            if d != jobs.first:
                shutil.copyfile(keystone.db_file(jobs.first), keystone.db_file(d))
            for key_job in jobs.keys[cloud.name]:
                key_job.result()
            check()
            keystone.bootstrap(self.tools, d, cloud)
        check()
        if not k_up:
            self._record(cloud.keystone, keystone.start(self.tools, d, cloud), k_marker)
        if jobs is None:
            self._launch_nova_early(cloud)
        keystone.wait_ready(d, cloud, cloud.keystone.pid or 0, timeout=READY_TIMEOUT, abort=check)
        if jobs is not None:
            check()
            keystone.configure(d, cloud)
            cloud.built = True
        glance.wait_ready(d, cloud, cloud.glance.pid or 0, timeout=READY_TIMEOUT, abort=self._check)
        self._bring_up_nova(cloud)


def _raise_first(futures: list[Future[Any]]) -> None:
    """Raise the futures' errors: LabErrors as one (every failing cloud has its say)."""
    errors: list[BaseException] = []
    for f in futures:
        exc = f.exception()
        if exc is not None and not isinstance(exc, _Aborted) and all(exc is not e for e in errors):
            errors.append(exc)
    lab_errors = [e for e in errors if isinstance(e, LabError)]
    if lab_errors and len(lab_errors) == len(errors):
        if len(lab_errors) == 1:
            raise lab_errors[0]
        raise LabError("\n".join(dict.fromkeys(str(e) for e in lab_errors)))
    if errors:
        raise errors[0]
    if any(f.exception() is not None for f in futures):
        raise LabError("starting the lab was interrupted")


def info(directory: Path | None = None) -> LabInfo | None:
    """The lab in ``directory`` as recorded (running or not), or None if there is none."""
    state = load_state(_resolve(directory))
    if state is None or not state.clouds:
        return None
    return state.info(0.0, "running" if _all_running(state) else "stopped")


def _all_running(state: LabState) -> bool:
    v = state.vospace
    if v is None or not procs.is_running(v.pid, _vospace_marker(state)):
        return False
    return all(
        procs.is_running(svc.pid, marker)
        for c in state.clouds
        for _, svc, marker in _services(state, c)
    )


def status(directory: Path | None = None) -> tuple[str, bool]:
    """A human description of the lab's services, and whether all of them are running."""
    directory = _resolve(directory)
    state = load_state(directory)
    if state is None or not state.clouds:
        return (
            f"no lab in {directory} (start one with `imagesync lab up --dir {directory}`)",
            False,
        )
    lifetime = state.token_expiration or 3600
    lines = [f"lab in {directory}: {len(state.clouds)} clouds, token lifetime {lifetime} s"]
    all_up = True
    for c in state.clouds:
        k_marker, g_marker = _markers(state, c)
        k_up = procs.is_running(c.keystone.pid, k_marker)
        g_up = procs.is_running(c.glance.pid, g_marker)
        all_up = all_up and k_up and g_up
        rss = (procs.rss_mb(c.keystone.pgid, k_marker) if k_up else 0.0) + (
            procs.rss_mb(c.glance.pgid, g_marker) if g_up else 0.0
        )
        compute = ""
        for name, svc, marker in _services(state, c)[2:]:
            up_ = procs.is_running(svc.pid, marker)
            all_up = all_up and up_
            rss += procs.rss_mb(svc.pgid, marker) if up_ else 0.0
            compute += f"; {name} port {svc.port} pid {svc.pid or '-'} "
            compute += "running" if up_ else "STOPPED"
        lines.append(
            f"  {c.name}: keystone {c.keystone_url} pid {c.keystone.pid or '-'} "
            f"{'running' if k_up else 'STOPPED'}; glance {c.glance_url} pid "
            f"{c.glance.pid or '-'} {'running' if g_up else 'STOPPED'}{compute}; "
            f"RSS {rss:.0f} MB"
        )
    v = state.vospace
    if v is None:
        all_up = False
        lines.append("  vospace: not set up yet (the next `imagesync lab up` adds it)")
    else:
        marker = _vospace_marker(state)
        v_up = procs.is_running(v.pid, marker)
        all_up = all_up and v_up
        rss = procs.rss_mb(v.pgid, marker) if v_up else 0.0
        lines.append(
            f"  vospace: {v.url} ({VOSPACE_RESOURCE_ID}) pid {v.pid or '-'} "
            f"{'running' if v_up else 'STOPPED'}; RSS {rss:.0f} MB"
        )
    if state.etcd is not None:
        e_up = procs.is_running(state.etcd.pid, etcd.marker(directory))
        all_up = all_up and e_up
        lines.append(
            f"  etcd: {etcd.client_url(state.etcd.port)} pid {state.etcd.pid or '-'} "
            f"{'running' if e_up else 'STOPPED'}"
        )
    lines.append(f"  clouds.yaml: {state.clouds_yaml}")
    lines.append(f"  imagesync config: {state.config_file}")
    if not all_up:
        lines.append(f"  start it: imagesync lab up --clouds {len(state.clouds)} --dir {directory}")
    return "\n".join(lines), all_up


def down(directory: Path | None = None) -> str:
    """Stop every process of the lab (masters and workers); keep its data for a warm start."""
    directory = _resolve(directory)
    if not directory.is_dir():
        return f"no lab in {directory}: nothing to stop"
    with locked(directory):
        try:
            state = load_state(directory)
        except LabError:
            state = None  # still stop whatever runs from this directory
        groups: dict[int, str] = {}
        if state is not None:
            for c in state.clouds:
                for _, svc, marker in _services(state, c):
                    if svc.pgid is not None:
                        groups[svc.pgid] = marker
            if state.vospace is not None and state.vospace.pgid is not None:
                groups[state.vospace.pgid] = _vospace_marker(state)
            if state.etcd is not None and state.etcd.pgid is not None:
                groups[state.etcd.pgid] = etcd.marker(directory)
        groups.update(etcd.processes(directory))
        # Also whatever lab.json does not know of (an interrupted `up`, a lost lab.json).
        groups.update(procs.lab_processes(directory))
        count = procs.stop_groups(groups)
        if state is not None:
            for c in state.clouds:
                for _, svc in c.services():
                    svc.pid = svc.pgid = None
            if state.vospace is not None:
                state.vospace.pid = state.vospace.pgid = None
            if state.etcd is not None:
                state.etcd.pid = state.etcd.pgid = None
            save_state(state)
    clouds = len(state.clouds) if state is not None else 0
    if count == 0:
        return f"lab in {directory}: nothing was running"
    return (
        f"lab in {directory}: stopped {count} processes of {clouds} clouds; data kept "
        "(the next `imagesync lab up` is a warm start)"
    )


def describe(info: LabInfo) -> str:
    """What `imagesync lab up` prints: endpoints, how to use the lab, how long it took."""
    started = {
        "cold": f"built and started (cold) in {info.start_seconds:.1f} s",
        "warm": f"restarted (warm) in {info.start_seconds:.1f} s",
        "running": "already running",
    }.get(info.start_kind, info.start_kind)
    lines = [f"lab in {info.directory}: {len(info.clouds)} clouds, {started}"]
    for c in info.clouds:
        lines.append(
            f"  {c.name}: keystone {c.keystone_url}  glance {c.glance_url}  "
            f"region {c.region}  user {c.username}/project {c.project} (member); "
            f"admin: --os-cloud {c.name}-admin"
        )
        if c.compute_url:
            lines.append(
                f"    compute: nova {c.compute_url}  placement {c.placement_url}  "
                f"flavors {', '.join(f[0] for f in nova.FLAVORS)}"
            )
    first = info.clouds[0].name if info.clouds else "lab1"
    lines += [
        "use it:",
        f"  export OS_CLIENT_CONFIG_FILE={info.clouds_yaml}",
        f"  openstack --os-cloud {first} image list",
        f"  imagesync -c {info.config_file} config check --connect",
        f"  central store: {info.store_dir}",
        *(
            [
                f"  vospace: {info.vospace.url}  container {info.vospace.container}  "
                f"token in {info.vospace.token_file}",
                f"    CADC's vos client: put `{info.vospace.registry_line}` in "
                "~/.config/cadc-registry/resource-caps",
            ]
            if info.vospace
            else []
        ),
        *([f"  coordination (etcd): {info.coordination_url}"] if info.coordination_url else []),
        f"stop it: imagesync lab down --dir {info.directory}  (data is kept: the next "
        "`up` is warm)",
    ]
    return "\n".join(lines)
