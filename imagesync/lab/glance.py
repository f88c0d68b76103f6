"""One lab cloud's Glance: its configuration, schema, and uwsgi service.

Glance 33 runs only under a WSGI server: uwsgi with ``--http11-socket`` (keep-alive that
python-glanceclient relies on) and the chunked-input flags (glanceclient uploads chunked).
It authenticates through keystonemiddleware (paste flavor ``keystone``) against the cloud's own
Keystone, and stores images in files under DIRECTORY/<cloud>/glance.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from imagesync.lab import procs
from imagesync.lab.state import CloudState, write_private

DB_FILE = "glance.sqlite"
IMAGE_SIZE_CAP = 20 * 1024**3  # 20 GiB

FILES = procs.ServiceFiles("glance", "etc/glance-api.conf")
# what lab/control.py and lab/start.py look up
log_file = FILES.log_file
pid_file = FILES.pid_file


def db_file(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / DB_FILE


def images_dir(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / "images"


#: glance-api.conf, filled in by write_config (str.format)
_GLANCE_CONF = """\
# Written by `imagesync lab up`; rewritten at every start.
[DEFAULT]
enabled_backends = file1:file
enabled_import_methods = [glance-direct,web-download,copy-image]
show_multiple_locations = False
image_size_cap = {size_cap}
# 0: no per-project storage quota
user_storage_quota = 0
hashing_algorithm = sha512

[database]
connection = sqlite:///{db}

[glance_store]
default_backend = file1

[file1]
filesystem_store_datadir = {images}/

[os_glance_staging_store]
filesystem_store_datadir = {staging}

[os_glance_tasks_store]
filesystem_store_datadir = {tasks}

[import_filtering_opts]
# web-download refuses loopback hosts unless allowed by address (so: use 127.0.0.1 in URLs),
# and ports other than 80/443 unless the list is empty: lab sources are on 127.0.0.1:<any>.
allowed_hosts = [127.0.0.1]
allowed_ports = []

[paste_deploy]
flavor = keystone
config_file = {paste}

[keystone_authtoken]
www_authenticate_uri = {keystone}
auth_url = {keystone}
auth_type = password
# without it: "internal endpoint for identity service not found"
interface = public
project_domain_name = Default
user_domain_name = Default
project_name = service
username = glance
password = {password}

[oslo_concurrency]
lock_path = {locks}
"""


def write_config(tools: procs.Tools, cloud_dir: Path, cloud: CloudState) -> None:
    """glance-api.conf (0600: it holds the glance user's password) and the paste file."""
    g = FILES.home(cloud_dir)
    for sub in ("etc", "images", "staging", "tasks", "locks"):
        (g / sub).mkdir(parents=True, exist_ok=True)
    procs.make_service_dirs(cloud_dir)
    paste = FILES.etc(cloud_dir) / "glance-api-paste.ini"
    shutil.copyfile(tools.glance_paste, paste)
    conf = _GLANCE_CONF.format(
        size_cap=IMAGE_SIZE_CAP,
        db=db_file(cloud_dir),
        images=images_dir(cloud_dir),
        staging=g / "staging",
        tasks=g / "tasks",
        paste=paste,
        keystone=cloud.keystone_root,
        password=cloud.glance_password,
        locks=g / "locks",
    )
    write_private(FILES.conf_file(cloud_dir), conf)


def db_sync(tools: procs.Tools, cloud_dir: Path) -> None:
    procs.run_step(
        [tools.glance_manage, "--config-file", FILES.conf_file(cloud_dir), "db_sync"],
        cloud_dir / "logs" / "glance-manage-db_sync.log",
        f"{cloud_dir.name}: glance-manage db_sync",
    )


def start(tools: procs.Tools, cloud_dir: Path, cloud: CloudState) -> int:
    argv = procs.service_argv(
        tools,
        cloud.glance.port,
        tools.glance_wsgi,
        FILES.pid_file(cloud_dir),
        # glanceclient uploads chunked
        extra=[
            "--http-chunked-input",
            "--http-auto-chunked",
            "--http-raw-body",
            "--chunked-input-limit",
            "10000000",
        ],
    )
    return procs.start_service(
        argv, FILES.log_file(cloud_dir), {"OS_GLANCE_CONFIG_DIR": str(FILES.etc(cloud_dir))}
    )


def wait_ready(
    cloud_dir: Path, cloud: CloudState, *, timeout: float, abort: Callable[[], None] | None
) -> None:
    """Wait until the glance started for ``cloud`` (its pid in the state) answers."""
    pid = cloud.glance.pid or 0
    procs.wait_service(cloud_dir, "glance", f"{cloud.glance_url}/versions", pid, timeout, abort)


def check_port(cloud: CloudState) -> None:
    procs.require_free_port(f"{cloud.name}: glance", cloud.glance.port)
