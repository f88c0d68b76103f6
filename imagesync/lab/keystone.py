"""One lab cloud's Keystone: its configuration, keystone-manage set-up, uwsgi, and catalog.

Everything lives in DIRECTORY/<cloud>/keystone (configuration, sqlite database, fernet and
credential keys: never /etc/keystone). Set-up runs the venv's ``keystone-manage``; then, as the
bootstrap admin through python-keystoneclient, it creates what a real deployment has: a
``service`` project with a ``glance`` user (admin role), the ``image`` service with public and
internal endpoints, and an ordinary project ``imagesync`` with a ``member`` user ``imagesync``.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagesync.lab import procs
from imagesync.lab.state import ADMIN, PROJECT, REGION, USERNAME, CloudState

DB_FILE = "keystone.sqlite"


FILES = procs.ServiceFiles("keystone", "keystone.conf")
# what lab/control.py and lab/start.py look up
log_file = FILES.log_file
pid_file = FILES.pid_file


def db_file(cloud_dir: Path) -> Path:
    return FILES.home(cloud_dir) / DB_FILE


def write_config(cloud_dir: Path, token_expiration: int | None) -> None:
    """keystone.conf; rewritten at every start (so a new token lifetime takes effect)."""
    k = FILES.home(cloud_dir)
    for sub in ("fernet-keys", "credential-keys", "locks"):
        (k / sub).mkdir(parents=True, exist_ok=True)
    procs.make_service_dirs(cloud_dir)
    token = f"expiration = {token_expiration}\n" if token_expiration is not None else ""
    FILES.conf_file(cloud_dir).write_text(f"""\
# Written by `imagesync lab up`; rewritten at every start.
[database]
connection = sqlite:///{db_file(cloud_dir)}

[token]
provider = fernet
{token}
[fernet_tokens]
key_repository = {k / "fernet-keys"}

[fernet_receipts]
key_repository = {k / "fernet-keys"}

[credential]
key_repository = {k / "credential-keys"}

[identity]
# bcrypt's minimum cost: every token issue checks a password, and the lab is not the place
# for slow hashing.
password_hash_rounds = 4

[oslo_concurrency]
lock_path = {k / "locks"}
""")


def _manage(
    tools: procs.Tools, cloud_dir: Path, *args: str, env: dict[str, str] | None = None
) -> None:
    step = args[0]
    procs.run_step(
        [tools.keystone_manage, "--config-file", FILES.conf_file(cloud_dir), *args],
        cloud_dir / "logs" / f"keystone-manage-{step}.log",
        f"{cloud_dir.name}: keystone-manage {step}",
        env=env,
    )


def db_sync(tools: procs.Tools, cloud_dir: Path) -> None:
    _manage(tools, cloud_dir, "db_sync")


def key_setups() -> list[tuple[str, ...]]:
    """The argument lists of fernet_setup and credential_setup (independent of the database)."""
    owner = (
        "--keystone-user",
        pwd.getpwuid(os.getuid()).pw_name,
        "--keystone-group",
        grp.getgrgid(os.getgid()).gr_name,
    )
    return [("fernet_setup", *owner), ("credential_setup", *owner)]


def key_setup(tools: procs.Tools, cloud_dir: Path, args: tuple[str, ...]) -> None:
    _manage(tools, cloud_dir, *args)


def bootstrap(tools: procs.Tools, cloud_dir: Path, cloud: CloudState) -> None:
    # The password goes through the environment, not argv (visible to every user in ps).
    _manage(
        tools,
        cloud_dir,
        "bootstrap",
        "--bootstrap-public-url",
        cloud.keystone_url,
        "--bootstrap-internal-url",
        cloud.keystone_url,
        "--bootstrap-region-id",
        REGION,
        env={"OS_BOOTSTRAP_PASSWORD": cloud.admin_password},
    )


def start(tools: procs.Tools, cloud_dir: Path, cloud: CloudState) -> int:
    argv = procs.service_argv(
        tools, cloud.keystone.port, tools.keystone_wsgi, FILES.pid_file(cloud_dir)
    )
    env = {
        "OS_KEYSTONE_CONFIG_DIR": str(FILES.home(cloud_dir)),
        "OS_KEYSTONE_CONFIG_FILES": "keystone.conf",
    }
    return procs.start_service(argv, FILES.log_file(cloud_dir), env)


def wait_ready(
    cloud_dir: Path, cloud: CloudState, *, timeout: float, abort: Callable[[], None] | None
) -> None:
    """Wait until the keystone started for ``cloud`` (its pid in the state) answers."""
    pid = cloud.keystone.pid or 0
    procs.wait_service(cloud_dir, "keystone", cloud.keystone_url, pid, timeout, abort)


def admin_session(cloud: CloudState) -> Any:
    """A keystoneauth1 session as the bootstrap admin (project admin)."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.Password(
        auth_url=cloud.keystone_url,
        username=ADMIN,
        password=cloud.admin_password,
        project_name=ADMIN,
        user_domain_name="Default",
        project_domain_name="Default",
    )
    return session.Session(auth=auth)


def configure(cloud_dir: Path, cloud: CloudState) -> None:
    """Create the service project and user, Glance's catalog entry, and imagesync's user."""
    from keystoneauth1 import exceptions as ksa_exc
    from keystoneclient.v3 import client

    try:
        ks = client.Client(session=admin_session(cloud), interface="public", region_name=REGION)
        roles = {r.name: r for r in ks.roles.list()}
        service_project = ks.projects.create(
            name="service", domain="default", description="Service users"
        )
        glance_user = ks.users.create(
            name="glance",
            domain="default",
            password=cloud.glance_password,
            default_project=service_project,
        )
        ks.roles.grant(roles["admin"], user=glance_user, project=service_project)
        image = ks.services.create(name="glance", type="image", description="Image service")
        for interface in ("public", "internal"):
            ks.endpoints.create(
                service=image, url=cloud.glance_url, interface=interface, region=REGION
            )
        project = ks.projects.create(
            name=PROJECT, domain="default", description="imagesync's own project"
        )
        user = ks.users.create(
            name=USERNAME, domain="default", password=cloud.password, default_project=project
        )
        ks.roles.grant(roles["member"], user=user, project=project)
    except (ksa_exc.ClientException, KeyError) as exc:
        raise procs.failure(
            f"{cloud.name}: setting up Keystone's projects, users and catalog failed: {exc!r}",
            FILES.log_file(cloud_dir),
        ) from None


def check_port(cloud: CloudState) -> None:
    procs.require_free_port(f"{cloud.name}: keystone", cloud.keystone.port)
