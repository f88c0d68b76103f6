"""What a lab is: its persisted state (DIRECTORY/lab.json), its public description, its files.

``lab.json`` holds ports, passwords, pids and pgids, so that ``status`` and ``down`` work from
any process. ``clouds.yaml`` and ``imagesync.yaml`` are written for clients: the OpenStack CLI,
openstacksdk and imagesync itself. Files holding secrets are written mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesync.config.types import VOSPACE_KEYS
from imagesync.errors import LabError
from imagesync.lab import etcd as etcd_service
from imagesync.lab import procs
from imagesync.lab.vospace import service as vospace_service

STATE_FILE = "lab.json"
STATE_VERSION = 1
REGION = "RegionOne"
PROJECT = "imagesync"
USERNAME = "imagesync"
ADMIN = "admin"


@dataclass(frozen=True)
class LabCloud:
    """One lab cloud as a client sees it. ``keystone_url`` is the auth URL (ends in /v3)."""

    name: str
    keystone_url: str
    glance_url: str
    password: str
    admin_password: str
    #: every lab cloud has the one region, project and member user
    region: str = REGION
    project: str = PROJECT
    username: str = USERNAME
    #: Nova's API (``…/v2.1``) when the cloud has compute (``lab up --nova``), else None
    compute_url: str | None = None
    placement_url: str | None = None

    def password_auth(self) -> dict[str, str]:
        """The password auth of the imagesync member user: a config's ``auth`` mapping."""
        return {
            "auth_url": self.keystone_url,
            "username": self.username,
            "password": self.password,
            "project_name": self.project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        }


@dataclass(frozen=True)
class LabVOSpace:
    """The lab's VOSpace service as a client sees it (see ``imagesync.lab.vospace``).

    CADC's client finds it through a registry line ``resource_id = capabilities_url``; its
    nodes are ``vos://{authority}/path`` (``~`` or ``!``). ``container`` is the vos:// URI of
    the container the generated imagesync.yaml keeps images in; ``directory`` is the service's
    own (``faults.json`` there switches its fault hooks).
    """

    url: str
    capabilities_url: str
    resource_id: str
    authority: str
    container: str
    token: str
    token_file: Path
    directory: Path

    @property
    def registry_line(self) -> str:
        return f"{self.resource_id} = {self.capabilities_url}"


@dataclass(frozen=True)
class LabInfo:
    """A lab. ``start_kind``: how ``up`` found it: "cold" (built), "warm" (restarted) or
    "running" (left alone); ``info()`` says "running" or "stopped"."""

    directory: Path
    clouds: list[LabCloud]
    clouds_yaml: Path
    config_file: Path
    store_dir: Path
    start_seconds: float
    start_kind: str
    vospace: LabVOSpace | None = None
    #: the tooz URL of the lab's etcd (``lab up --etcd``), as imagesync.yaml names it
    coordination_url: str | None = None

    def cloud(self, name: str) -> LabCloud:
        for c in self.clouds:
            if c.name == name:
                return c
        raise KeyError(f"no cloud {name!r} in the lab (it has {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.clouds]


@dataclass
class ServiceState:
    """One service of the lab: its port and, while it runs, its process's pid (= its pgid;
    for a uwsgi service, its master's)."""

    port: int
    pid: int | None = None
    pgid: int | None = None


@dataclass
class CloudState:
    """One cloud of the lab, as persisted."""

    name: str
    keystone: ServiceState
    glance: ServiceState
    admin_password: str
    glance_password: str
    password: str
    #: set once db_sync, bootstrap and the catalog are done; until then a start is cold
    built: bool = False
    #: Nova's API and Placement, when the cloud has compute (``lab up --nova``)
    nova: ServiceState | None = None
    placement: ServiceState | None = None
    #: the nova and placement service users' password
    nova_password: str = ""
    #: set once Keystone knows Nova and Placement and the template databases exist
    nova_built: bool = False

    @property
    def keystone_root(self) -> str:
        return f"http://127.0.0.1:{self.keystone.port}"

    @property
    def keystone_url(self) -> str:
        return f"{self.keystone_root}/v3"

    @property
    def glance_url(self) -> str:
        return f"http://127.0.0.1:{self.glance.port}"

    @property
    def compute_url(self) -> str:
        assert self.nova is not None
        return f"http://127.0.0.1:{self.nova.port}/v2.1"

    @property
    def placement_url(self) -> str:
        assert self.placement is not None
        return f"http://127.0.0.1:{self.placement.port}"

    def services(self) -> list[tuple[str, ServiceState]]:
        """Every service of the cloud, by name (keystone, glance, and placement, nova)."""
        out = [("keystone", self.keystone), ("glance", self.glance)]
        if self.placement is not None:
            out.append(("placement", self.placement))
        if self.nova is not None:
            out.append(("nova", self.nova))
        return out

    def public(self) -> LabCloud:
        return LabCloud(
            name=self.name,
            keystone_url=self.keystone_url,
            glance_url=self.glance_url,
            password=self.password,
            admin_password=self.admin_password,
            compute_url=self.compute_url if self.nova is not None else None,
            placement_url=self.placement_url if self.placement is not None else None,
        )


@dataclass
class VOSpaceState(ServiceState):
    """The lab's VOSpace service, as persisted: a service with a bearer token."""

    token: str = field(kw_only=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class EtcdState(ServiceState):
    """The lab's etcd (``lab up --etcd``): a service (``port`` the client port) with a peer
    port too."""

    peer_port: int = field(kw_only=True)


VOSPACE_DIR = "vospace"
VOSPACE_AUTHORITY = vospace_service.AUTHORITY
VOSPACE_RESOURCE_ID = "ivo://" + VOSPACE_AUTHORITY.replace("~", "/")
VOSPACE_CONTAINER = vospace_service.CONTAINER


@dataclass
class LabState:
    """The whole lab, as persisted in DIRECTORY/lab.json."""

    directory: Path
    clouds: list[CloudState] = field(default_factory=list)
    #: Keystone token lifetime in seconds; None = Keystone's default (3600)
    token_expiration: int | None = None
    vospace: VOSpaceState | None = None
    #: the generated imagesync.yaml's central store is the VOSpace service (else a directory)
    vospace_store: bool = False
    #: a real etcd for coordinating several daemons (``lab up --etcd``); its URL goes into
    #: the generated imagesync.yaml as ``coordination.url``
    etcd: EtcdState | None = None

    @property
    def clouds_yaml(self) -> Path:
        return self.directory / "clouds.yaml"

    @property
    def config_file(self) -> Path:
        return self.directory / "imagesync.yaml"

    @property
    def store_dir(self) -> Path:
        return self.directory / "store"

    @property
    def vospace_dir(self) -> Path:
        return self.directory / VOSPACE_DIR

    @property
    def vospace_token_file(self) -> Path:
        return self.vospace_dir / "token"

    def vospace_info(self) -> LabVOSpace | None:
        v = self.vospace
        if v is None:
            return None
        return LabVOSpace(
            url=v.url,
            capabilities_url=f"{v.url}/capabilities",
            resource_id=VOSPACE_RESOURCE_ID,
            authority=VOSPACE_AUTHORITY,
            container=f"vos://{VOSPACE_AUTHORITY}/{VOSPACE_CONTAINER}",
            token=v.token,
            token_file=self.vospace_token_file,
            directory=self.vospace_dir,
        )

    def info(self, start_seconds: float, start_kind: str) -> LabInfo:
        return LabInfo(
            directory=self.directory,
            clouds=[c.public() for c in self.clouds],
            clouds_yaml=self.clouds_yaml,
            config_file=self.config_file,
            store_dir=self.store_dir,
            start_seconds=start_seconds,
            start_kind=start_kind,
            vospace=self.vospace_info(),
            coordination_url=None
            if self.etcd is None
            else etcd_service.coordination_url(self.etcd.port),
        )


def write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_state(directory: Path) -> LabState | None:
    path = directory / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(
            f"{path}: unreadable lab state ({exc}); remove the directory to start afresh"
        ) from None
    try:
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
        clouds = [
            CloudState(
                name=c["name"],
                keystone=ServiceState(**c["keystone"]),
                glance=ServiceState(**c["glance"]),
                admin_password=c["admin_password"],
                glance_password=c["glance_password"],
                password=c["password"],
                built=bool(c["built"]),
                nova=ServiceState(**c["nova"]) if c.get("nova") else None,
                placement=ServiceState(**c["placement"]) if c.get("placement") else None,
                nova_password=c.get("nova_password", ""),
                nova_built=bool(c.get("nova_built", False)),
            )
            for c in raw["clouds"]
        ]
        vospace = raw.get("vospace")  # absent in labs made before the VOSpace service
        return LabState(
            directory=directory,
            clouds=clouds,
            token_expiration=raw.get("token_expiration"),
            vospace=VOSpaceState(**vospace) if vospace else None,
            vospace_store=bool(raw.get("vospace_store", False)),
            etcd=EtcdState(**raw["etcd"]) if raw.get("etcd") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LabError(
            f"{path}: unexpected lab state ({exc}); stop its processes with "
            "`imagesync lab down` and remove the directory to start afresh"
        ) from None


def save_state(state: LabState) -> None:
    def service(s: ServiceState) -> dict[str, Any]:
        return {"port": s.port, "pid": s.pid, "pgid": s.pgid}

    raw = {
        "version": STATE_VERSION,
        "token_expiration": state.token_expiration,
        "clouds": [
            {
                "name": c.name,
                "keystone": service(c.keystone),
                "glance": service(c.glance),
                "admin_password": c.admin_password,
                "glance_password": c.glance_password,
                "password": c.password,
                "built": c.built,
                "nova": service(c.nova) if c.nova is not None else None,
                "placement": service(c.placement) if c.placement is not None else None,
                "nova_password": c.nova_password,
                "nova_built": c.nova_built,
            }
            for c in state.clouds
        ],
        "vospace": None
        if state.vospace is None
        else {**service(state.vospace), "token": state.vospace.token},
        "vospace_store": state.vospace_store,
        "etcd": None
        if state.etcd is None
        else {**service(state.etcd), "peer_port": state.etcd.peer_port},
    }
    write_private(state.directory / STATE_FILE, json.dumps(raw, indent=2) + "\n")


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold DIRECTORY/.lock: one ``up``/``down`` at a time per lab."""
    directory.mkdir(parents=True, exist_ok=True)
    with procs.file_lock(directory / ".lock"):
        yield


def _q(value: object) -> str:
    """A YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value))


def write_client_files(state: LabState) -> None:
    """DIRECTORY/clouds.yaml (0600), DIRECTORY/imagesync.yaml, DIRECTORY/store and state/."""
    lines = [
        "# Written by `imagesync lab up`. labN: the imagesync member user; labN-admin: admin.",
        "clouds:",
    ]
    for c in state.clouds:
        for entry, user, project, password in (
            (c.name, USERNAME, PROJECT, c.password),
            (f"{c.name}-admin", ADMIN, ADMIN, c.admin_password),
        ):
            lines += [
                f"  {entry}:",
                "    auth:",
                f"      auth_url: {_q(c.keystone_url)}",
                f"      username: {_q(user)}",
                f"      password: {_q(password)}",
                f"      project_name: {_q(project)}",
                "      user_domain_name: Default",
                "      project_domain_name: Default",
                f"    region_name: {REGION}",
                "    interface: public",
                "    identity_api_version: 3",
            ]
    write_private(state.clouds_yaml, "\n".join(lines) + "\n")

    d = state.directory
    config = [
        "# A ready imagesync configuration for the lab (written by `imagesync lab up`).",
        f"clouds_yaml: {_q(state.clouds_yaml)}",
        f"state_dir: {_q(d / 'state')}",
        "poll_interval: 30s",
        "clouds:",
        *[f"  {c.name}: {{cloud: {c.name}}}" for c in state.clouds],
        "stores:",
        *_store_entry(state),
        "images:",
        '  - name: "*"',
        "    clouds: all",
        "    store: archive",
    ]
    if state.etcd is not None:  # several daemons on this config coordinate through it
        config += [
            "coordination:",
            f"  url: {_q(etcd_service.coordination_url(state.etcd.port))}",
            f"  lease_timeout: {etcd_service.LEASE_SECONDS}s",
        ]
    write_private(state.config_file, "\n".join(config) + "\n")
    state.store_dir.mkdir(exist_ok=True)
    (d / "state").mkdir(exist_ok=True)
    if state.vospace is not None:
        state.vospace_dir.mkdir(exist_ok=True)
        write_private(state.vospace_token_file, state.vospace.token + "\n")


def _store_entry(state: LabState) -> list[str]:
    """The central store ``archive``: the VOSpace service when the caller says imagesync can
    build a VOSpace site (``up(vospace_store=True)``), else the directory."""
    info = state.vospace_info()
    if not state.vospace_store or info is None:
        return [f"  archive: {{type: directory, path: {_q(state.store_dir)}}}"]
    # The site's keys are its own (config.types.VOSPACE_KEYS): follow them rather than guess.
    service = (
        f"    capabilities: {_q(info.capabilities_url)}"
        if "capabilities" in VOSPACE_KEYS
        else f"    url: {_q(info.url)}"
    )
    token = (
        f"    token_file: {_q(info.token_file)}"
        if "token_file" in VOSPACE_KEYS
        else f"    token: {_q(info.token)}"
    )
    return [
        "  archive:",
        "    type: vospace",
        service,
        f"    container: {_q(info.container)}",
        token,
    ]
