"""Bringing a lab up: every cloud side by side, cold (built from nothing) or warm.

A cold start runs the one-shot set-up commands in a pool (the schema is created once and its
sqlite files copied to the other new clouds, since it is the same everywhere) while each
cloud's thread starts its services in the order they need each other; a warm start only
starts the uwsgi services of clouds already built. :class:`Start` remembers what it started,
so that a failure anywhere stops exactly that. :mod:`imagesync.lab.control` calls it.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesync.errors import LabError
from imagesync.lab import etcd, glance, keystone, nova, procs
from imagesync.lab.state import CloudState, LabState, ServiceState, save_state
from imagesync.lab.vospace import service as vospace

READY_TIMEOUT = 60.0


def cloud_dir(state: LabState, cloud: CloudState) -> Path:
    return state.directory / cloud.name


def markers(state: LabState, cloud: CloudState) -> tuple[str, str]:
    d = cloud_dir(state, cloud)
    return str(keystone.pid_file(d)), str(glance.pid_file(d))


def _pool_size() -> int:
    return max(2, os.cpu_count() or 2)


def vospace_marker(state: LabState) -> str:
    return str(vospace.pid_file(state.vospace_dir))


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


class Start:
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
        marker = vospace_marker(self.state)
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
        d = cloud_dir(self.state, cloud)
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
        d = cloud_dir(self.state, cloud)
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
        first = cloud_dir(self.state, cold[0])
        # The schemas first: they take longest, and everything else waits for them.
        jobs = _ColdJobs(
            first=first,
            keystone_schema=pool.submit(self._guarded, keystone.db_sync, self.tools, first),
            glance_schema=pool.submit(self._guarded, glance.db_sync, self.tools, first),
            keys={},
        )
        for cloud in cold:
            d = cloud_dir(self.state, cloud)
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
            d = cloud_dir(self.state, cloud)
            if cloud.nova is None or nova.templates_built(d):
                continue
            nova.write_config(d, cloud, paste)
            self.nova_builds[cloud.name] = pool.submit(
                self._guarded, nova.build_templates, nova_manage, placement_manage, d
            )

    def _nova_running(self, cloud: CloudState) -> bool:
        d = cloud_dir(self.state, cloud)
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
        d = cloud_dir(self.state, cloud)
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
        d = cloud_dir(self.state, cloud)
        # a built Nova left running by an earlier `up` keeps its flavors; one started here
        # (now or early) is on fresh databases and needs them
        started_here = cloud.name in self.nova_launched
        if not started_here and not (self._nova_running(cloud) and cloud.nova_built):
            self._launch_nova(cloud)
            started_here = True
        nova.wait_ready(d, cloud, timeout=READY_TIMEOUT, abort=self._check)
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

    def _wait_running(self, cloud: CloudState) -> None:
        """A cloud an earlier ``up`` left running: wait until it answers (and its Nova)."""
        d = cloud_dir(self.state, cloud)
        keystone.wait_ready(d, cloud, timeout=READY_TIMEOUT, abort=self._check)
        glance.wait_ready(d, cloud, timeout=READY_TIMEOUT, abort=self._check)
        self.kinds[cloud.name] = "running"
        self._bring_up_nova(cloud)

    def _prepare_warm(self, cloud: CloudState) -> None:
        """A built cloud about to be started again: its ports freed, its configuration fresh."""
        d = cloud_dir(self.state, cloud)
        # Processes of this cloud that lab.json does not know of would hold its ports.
        known = {svc.pid for _, svc in cloud.services() if svc.pid is not None}
        procs.stop_groups({g: m for g, m in procs.lab_processes(d).items() if g not in known})
        keystone.write_config(d, self.state.token_expiration)
        glance.write_config(self.tools, d, cloud)

    def _bring_up_cloud(  # noqa: C901 - one cloud's start-up steps, in the order they must run
        self, cloud: CloudState, jobs: _ColdJobs | None
    ) -> None:
        d = cloud_dir(self.state, cloud)
        k_marker, g_marker = markers(self.state, cloud)
        k_up = procs.is_running(cloud.keystone.pid, k_marker)
        g_up = procs.is_running(cloud.glance.pid, g_marker)
        if k_up and self.restart_keystone:
            # A new token lifetime only takes effect in a new Keystone process.
            procs.stop_groups({cloud.keystone.pid or 0: k_marker})
            k_up = False
        if jobs is None and k_up and g_up:
            self._wait_running(cloud)
            return
        self.kinds[cloud.name] = "warm" if jobs is None else "cold"
        if jobs is None:
            self._prepare_warm(cloud)
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
        keystone.wait_ready(d, cloud, timeout=READY_TIMEOUT, abort=check)
        if jobs is not None:
            check()
            keystone.configure(d, cloud)
            cloud.built = True
        glance.wait_ready(d, cloud, timeout=READY_TIMEOUT, abort=self._check)
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
