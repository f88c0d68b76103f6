"""One lab cloud's compute: a real Placement under uwsgi and a real Nova 34 in one process.

Optional (``imagesync lab up --nova``): about 320 MB a cloud (Nova all-in-one ≈ 210 MB,
Placement ≈ 115 MB). Nova runs its api, conductor, scheduler and compute services in one
Python process (``imagesync.lab.nova_service``) with in-memory messaging (``fake:/``), native
threading, Nova's own in-process Neutron double and an uploading fake virt driver; Placement
runs under uwsgi like Glance. See ../shared/reference/nova-recipe.md for why each piece is so.

The fake driver gives a server no network and no disk, but its snapshot uploads real bytes:
``snapshot_data(server_id)`` (what tests predict the sha512 of). It fails on request: a server
with metadata ``lab.fail`` containing ``boot`` or ``snapshot``, or the words in the cloud's
``fail_file`` (``DIRECTORY/<cloud>/nova/lab-fail``), make that step fail as a real driver would.

Nova's fake node gets a new identity at every start and Nova refuses an old database for it,
so the Nova and Placement databases are built once as templates (``build_templates``, ≈15 s)
and copied afresh at every start (servers and flavors do not survive a restart; Glance's
images do). Flavors are created after every start.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagesync.errors import LabError
from imagesync.lab import procs
from imagesync.lab.state import REGION, CloudState, write_private

#: the size of a lab snapshot's bytes
SNAPSHOT_SIZE = 1024 * 1024
#: metadata key on a server (and words in fail_file): "boot", "snapshot"
FAIL_KEY = "lab.fail"
#: (name, id, ram MB, vcpus, disk GB): created after every start
FLAVORS = (("lab.tiny", "1", 64, 1, 1), ("lab.small", "2", 512, 1, 10))
#: what the runner prints (and writes to ready_file) once every service is up
READY_MARKER = "imagesync-lab: nova ready"
_DBS = ("nova_api.sqlite", "nova_cell0.sqlite", "nova_cell1.sqlite")


def snapshot_data(server_id: str) -> bytes:
    """The bytes the lab's fake driver uploads for a snapshot of ``server_id``: sha512 of the
    server's id, repeated to SNAPSHOT_SIZE bytes (deterministic, so tests know the hash)."""
    block = hashlib.sha512(server_id.encode()).digest()
    return (block * (SNAPSHOT_SIZE // len(block) + 1))[:SNAPSHOT_SIZE]


# --- paths ----------------------------------------------------------------------------------


FILES = procs.ServiceFiles("nova", "etc/nova.conf")
PLACEMENT = procs.ServiceFiles("placement", "placement.conf")
# what lab/control.py and lab/start.py look up
log_file = FILES.log_file
pid_file = FILES.pid_file
placement_pid_file = PLACEMENT.pid_file


def templates(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / "templates"


def fail_file(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / "lab-fail"


def state_path(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / "state"


def ready_file(cloud_dir: Path) -> Path:
    return cloud_dir / "run" / "nova.ready"


def placement_db(cloud_dir: Path) -> Path:
    return PLACEMENT.home(cloud_dir) / "placement.sqlite"


def templates_built(cloud_dir: Path) -> bool:
    t = templates(cloud_dir)
    return all((t / n).is_file() for n in (*_DBS, "placement.sqlite"))


# --- tools ----------------------------------------------------------------------------------


def find_tools() -> tuple[Path, Path, Path, Path]:
    """(nova-manage, placement-manage, placement's wsgi file, nova's api-paste.ini)."""
    missing: list[str] = []
    nova_manage = procs.find_executable("nova-manage")
    placement_manage = procs.find_executable("placement-manage")
    placement_pkg = procs.package_dir("placement")
    nova_pkg = procs.package_dir("nova")
    for name, found in (
        ("nova-manage", nova_manage),
        ("placement-manage", placement_manage),
        ("placement", placement_pkg),
        ("nova", nova_pkg),
    ):
        if found is None:
            missing.append(name)
    paste = next(
        (p for p in procs.data_dirs("etc/nova/api-paste.ini") if p.is_file()),
        None,
    )
    if paste is None:
        missing.append("etc/nova/api-paste.ini")
    if missing or nova_manage is None or placement_manage is None or placement_pkg is None:
        raise LabError(f"{procs.EXTRA_MISSING} (not found: {', '.join(missing)})")
    assert paste is not None
    return nova_manage, placement_manage, placement_pkg / "wsgi/api.py", paste


# --- configuration ----------------------------------------------------------------------------


def _auth_section(cloud: CloudState, user: str) -> str:
    return f"""\
auth_type = password
auth_url = {cloud.keystone_root}
project_domain_name = Default
user_domain_name = Default
project_name = service
username = {user}
password = {cloud.nova_password}
region_name = {REGION}
valid_interfaces = public
"""


def _authtoken(cloud: CloudState, user: str) -> str:
    return f"""\
www_authenticate_uri = {cloud.keystone_root}
auth_url = {cloud.keystone_root}
auth_type = password
interface = public
project_domain_name = Default
user_domain_name = Default
project_name = service
username = {user}
password = {cloud.nova_password}
"""


#: nova.conf, filled in by write_config (str.format)
_NOVA_CONF = """\
# Written by `imagesync lab up --nova`; rewritten at every start.
[DEFAULT]
host = {host}
my_ip = 127.0.0.1
state_path = {state}
instances_path = {instances}
# in-memory messaging: every Nova service runs in the one lab process
transport_url = fake:/
compute_driver = fake.ImagesyncLabDriver
debug = False
# no caller waits for a network interface to be plugged: there is no Neutron
vif_plugging_timeout = 0

[wsgi]
api_paste_config = {paste}

[api]
auth_strategy = keystone

[api_database]
connection = sqlite:///{api_db}

[database]
connection = sqlite:///{cell_db}

[keystone_authtoken]
{authtoken}
[placement]
{auth}
[glance]
region_name = {region}
valid_interfaces = public

[neutron]
{auth}
[oslo_concurrency]
lock_path = {locks}

[oslo_messaging_notifications]
driver = noop

[notifications]
notification_format = unversioned

[scheduler]
discover_hosts_in_cells_interval = -1

[vnc]
enabled = False

[spice]
enabled = False

[serial_console]
enabled = False
"""

#: placement.conf, filled in by write_config (str.format)
_PLACEMENT_CONF = """\
# Written by `imagesync lab up --nova`; rewritten at every start.
[DEFAULT]
debug = False

[api]
auth_strategy = keystone

[placement_database]
connection = sqlite:///{db}

[keystone_authtoken]
{authtoken}
"""


def write_config(cloud_dir: Path, cloud: CloudState, paste: Path) -> None:
    """nova.conf and placement.conf (0600: they hold the service users' password)."""
    n, p = FILES.home(cloud_dir), PLACEMENT.home(cloud_dir)
    for sub in ("etc", "state", "instances", "locks", "templates"):
        (n / sub).mkdir(parents=True, exist_ok=True)
    p.mkdir(parents=True, exist_ok=True)
    procs.make_service_dirs(cloud_dir)
    shutil.copyfile(paste, FILES.etc(cloud_dir) / "api-paste.ini")
    nova_conf = _NOVA_CONF.format(
        host=cloud.name,
        state=n / "state",
        instances=n / "instances",
        paste=FILES.etc(cloud_dir) / "api-paste.ini",
        api_db=n / "nova_api.sqlite",
        cell_db=n / "nova_cell1.sqlite",
        authtoken=_authtoken(cloud, "nova"),
        auth=_auth_section(cloud, "nova"),
        region=REGION,
        locks=n / "locks",
    )
    write_private(FILES.conf_file(cloud_dir), nova_conf)
    placement = _PLACEMENT_CONF.format(
        db=placement_db(cloud_dir), authtoken=_authtoken(cloud, "placement")
    )
    write_private(PLACEMENT.conf_file(cloud_dir), placement)


# --- the template databases -------------------------------------------------------------------


def build_templates(nova_manage: Path, placement_manage: Path, cloud_dir: Path) -> None:
    """Build the Nova (api, cell0, cell1) and Placement databases once, keep them as templates.

    They are built at the paths the services use (cell mappings hold absolute paths), then
    copied aside; ``install_templates`` copies them back at every start.
    """
    n = FILES.home(cloud_dir)
    logs = cloud_dir / "logs"
    for name in (*_DBS, "placement.sqlite"):
        (templates(cloud_dir) / name).unlink(missing_ok=True)
    for f in (*(n / name for name in _DBS), placement_db(cloud_dir)):
        f.unlink(missing_ok=True)
    procs.run_step(
        [placement_manage, "--config-file", PLACEMENT.conf_file(cloud_dir), "db", "sync"],
        logs / "placement-manage-db_sync.log",
        f"{cloud_dir.name}: placement-manage db sync",
    )
    conf = FILES.conf_file(cloud_dir)
    for args in (
        ("api_db", "sync"),
        ("cell_v2", "map_cell0", "--database_connection", f"sqlite:///{n / 'nova_cell0.sqlite'}"),
        (
            "cell_v2",
            "create_cell",
            "--name",
            "cell1",
            "--database_connection",
            f"sqlite:///{n / 'nova_cell1.sqlite'}",
            "--transport-url",
            "fake:/",
        ),
        ("db", "sync"),
    ):
        procs.run_step(
            [nova_manage, "--config-file", conf, *args],
            logs / f"nova-manage-{args[0]}-{args[1]}.log",
            f"{cloud_dir.name}: nova-manage {' '.join(args[:2])}",
        )
    for f in (*(n / name for name in _DBS), placement_db(cloud_dir)):
        shutil.copyfile(f, templates(cloud_dir) / f.name)


def install_templates(cloud_dir: Path) -> None:
    """Fresh databases for a start (servers and flavors of the last run are gone)."""
    n = FILES.home(cloud_dir)
    for name in _DBS:
        shutil.copyfile(templates(cloud_dir) / name, n / name)
    shutil.copyfile(templates(cloud_dir) / "placement.sqlite", placement_db(cloud_dir))
    # the fake node's identity is new at every start: none of the last run's may linger
    shutil.rmtree(state_path(cloud_dir), ignore_errors=True)
    state_path(cloud_dir).mkdir()


# --- services ---------------------------------------------------------------------------------


def start_placement(tools: procs.Tools, wsgi: Path, cloud_dir: Path, cloud: CloudState) -> int:
    assert cloud.placement is not None
    argv = procs.service_argv(tools, cloud.placement.port, wsgi, PLACEMENT.pid_file(cloud_dir))
    return procs.start_service(
        argv,
        PLACEMENT.log_file(cloud_dir),
        {"OS_PLACEMENT_CONFIG_DIR": str(PLACEMENT.home(cloud_dir))},
    )


def start_nova(cloud_dir: Path, cloud: CloudState) -> int:
    """The all-in-one Nova process; its argv carries ``--pidfile`` (the lab's process mark)."""
    assert cloud.nova is not None
    ready_file(cloud_dir).unlink(missing_ok=True)
    argv: list[str | Path] = [
        procs.python(),
        "-m",
        "imagesync.lab.nova_service",
        "--config-dir",
        FILES.etc(cloud_dir),
        "--ready-file",
        ready_file(cloud_dir),
        "--fail-file",
        fail_file(cloud_dir),
        "--port",
        str(cloud.nova.port),
        # it starts its services only once these answer (compute reports to Placement)
        "--wait-for",
        cloud.keystone_url,
        "--wait-for",
        cloud.placement_url,
        "--pidfile",
        FILES.pid_file(cloud_dir),
    ]
    return procs.start_service(
        argv,
        FILES.log_file(cloud_dir),
        {"OS_NOVA_DISABLE_EVENTLET_PATCHING": "1", "OS_NOVA_CONFIG_DIR": str(FILES.etc(cloud_dir))},
    )


def wait_ready(
    cloud_dir: Path, cloud: CloudState, *, timeout: float, abort: Callable[[], None] | None
) -> None:
    """Placement answers, then the Nova process says all its services are up (pids: the state)."""
    assert cloud.nova is not None and cloud.placement is not None  # a cloud with Nova
    placement_pid, nova_pid = cloud.placement.pid or 0, cloud.nova.pid or 0
    procs.wait_service(cloud_dir, "placement", cloud.placement_url, placement_pid, timeout, abort)
    nova = procs.Starting(
        nova_pid,
        str(FILES.pid_file(cloud_dir)),
        FILES.log_file(cloud_dir),
        f"{cloud.name}: nova",
        timeout,
        abort,
    )
    procs.wait_file(ready_file(cloud_dir), str(nova_pid), nova)


def check_ports(cloud: CloudState) -> None:
    for what, svc in (("nova", cloud.nova), ("placement", cloud.placement)):
        if svc is not None:
            procs.require_free_port(f"{cloud.name}: {what}", svc.port)


# --- Keystone and the compute API ------------------------------------------------------------


def register(cloud_dir: Path, cloud: CloudState, admin_session: Any) -> None:
    """The nova and placement service users and the compute and placement endpoints.

    Idempotent: a lab built without Nova gets them when ``--nova`` first asks for it.
    """
    from keystoneauth1 import exceptions as ksa_exc
    from keystoneclient.v3 import client

    try:
        ks = client.Client(session=admin_session, interface="public", region_name=REGION)
        roles = {r.name: r for r in ks.roles.list()}
        project = next(p for p in ks.projects.list(name="service"))
        users = {u.name for u in ks.users.list(domain="default")}
        for name in ("nova", "placement"):
            if name in users:
                continue
            user = ks.users.create(
                name=name, domain="default", password=cloud.nova_password, default_project=project
            )
            ks.roles.grant(roles["admin"], user=user, project=project)
            if "service" in roles:
                ks.roles.grant(roles["service"], user=user, project=project)
        services = {s.type for s in ks.services.list()}
        for stype, name, url in (
            ("compute", "nova", cloud.compute_url),
            ("placement", "placement", cloud.placement_url),
        ):
            if stype in services:
                continue
            service = ks.services.create(name=name, type=stype, description=f"lab {name}")
            for interface in ("public", "internal"):
                ks.endpoints.create(service=service, url=url, interface=interface, region=REGION)
    except (ksa_exc.ClientException, KeyError, StopIteration) as exc:
        raise procs.failure(
            f"{cloud.name}: registering Nova and Placement in Keystone failed: {exc!r}",
            FILES.log_file(cloud_dir),
        ) from None


def create_flavors(cloud_dir: Path, cloud: CloudState, admin_session: Any) -> None:
    """The lab's flavors (they live in the Nova API database, which is new at every start)."""
    from keystoneauth1 import exceptions as ksa_exc

    try:
        for name, fid, ram, vcpus, disk in FLAVORS:
            admin_session.post(
                f"{cloud.compute_url}/flavors",
                json={
                    "flavor": {"name": name, "id": fid, "ram": ram, "vcpus": vcpus, "disk": disk}
                },
                headers={"X-OpenStack-Nova-API-Version": "2.55"},
                raise_exc=True,
            )
    except ksa_exc.ClientException as exc:
        raise procs.failure(
            f"{cloud.name}: creating the lab's flavors failed: {exc!r}", FILES.log_file(cloud_dir)
        ) from None
