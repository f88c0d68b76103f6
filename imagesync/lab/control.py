"""Starting, inspecting and stopping a lab: the implementation of ``up``, ``status``, ``down``.

``up`` decides what the lab should hold (clouds, ports, passwords, the VOSpace service, Nova)
and records it in lab.json; :mod:`imagesync.lab.start` then brings every cloud up, cold or
warm, and stops whatever it started if anything fails.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from imagesync.errors import LabError
from imagesync.lab import etcd, glance, keystone, nova, procs
from imagesync.lab.start import Start, cloud_dir, markers, vospace_marker
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

DIR_ENV = "IMAGESYNC_LAB_DIR"


def default_dir() -> Path:
    """$IMAGESYNC_LAB_DIR, else ~/.local/state/imagesync/lab."""
    env = os.environ.get(DIR_ENV, "").strip()
    return Path(env) if env else Path.home() / ".local/state/imagesync/lab"


def _resolve(directory: Path | None) -> Path:
    return (directory if directory is not None else default_dir()).expanduser().resolve()


_PID_FILES = {
    "keystone": keystone.pid_file,
    "glance": glance.pid_file,
    "placement": nova.placement_pid_file,
    "nova": nova.pid_file,
}


def _services(state: LabState, cloud: CloudState) -> list[tuple[str, ServiceState, str]]:
    """Every service of a cloud: (name, its state, the marker in its argv)."""
    d = cloud_dir(state, cloud)
    return [(name, svc, str(_PID_FILES[name](d))) for name, svc in cloud.services()]


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
        kind = Start(tools, state, restart_keystone=restart_keystone).run()
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


def info(directory: Path | None = None) -> LabInfo | None:
    """The lab in ``directory`` as recorded (running or not), or None if there is none."""
    state = load_state(_resolve(directory))
    if state is None or not state.clouds:
        return None
    return state.info(0.0, "running" if _all_running(state) else "stopped")


def _all_running(state: LabState) -> bool:
    v = state.vospace
    if v is None or not procs.is_running(v.pid, vospace_marker(state)):
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
        k_marker, g_marker = markers(state, c)
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
        marker = vospace_marker(state)
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
                groups[state.vospace.pgid] = vospace_marker(state)
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
