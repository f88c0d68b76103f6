"""Build imagesync configurations pointing at the test lab's real clouds (and proxies), and
make what the tests act on there as a person would: images, and servers on Nova."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imagesync.config.types import CloudConfig, Config, ImageRule, StoreConfig
from imagesync.lab import LabCompute, LabInfo, compute_client, glance_client
from tests.faultproxy import FaultProxy

MB = 1 << 20


def cloud_auth(lab: LabInfo, name: str, *, auth_url: str | None = None) -> dict[str, str]:
    """The password auth of the lab's ordinary user on cloud ``name`` (a config's ``auth``)."""
    auth = lab.cloud(name).password_auth()
    if auth_url:
        auth["auth_url"] = auth_url
    return auth


def yaml_cloud(lab: LabInfo, name: str, **extra: Any) -> dict[str, Any]:
    """Cloud ``name``'s entry under ``clouds:`` in an imagesync.yaml, with ``extra`` keys."""
    return {"auth": cloud_auth(lab, name), "region_name": lab.cloud(name).region, **extra}


def write_doc(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` written as tmp_path/imagesync.yaml."""
    import yaml

    path = tmp_path / "imagesync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cloud_config(
    lab: LabInfo,
    name: str,
    *,
    endpoint_override: str | None = None,
    auth_url: str | None = None,
    site_name: str | None = None,
) -> CloudConfig:
    return CloudConfig(
        name=site_name or name,
        auth=cloud_auth(lab, name, auth_url=auth_url),
        auth_type="password",
        region_name=lab.cloud(name).region,
        interface="public",
        endpoint_override=endpoint_override,
        timeout=30.0,
    )


def make_config(
    lab: LabInfo,
    tmp_path: Path,
    pattern: str,
    *,
    clouds: list[str] | None = None,
    overrides: dict[str, CloudConfig] | None = None,
    store: bool = True,
    **rule: Any,
) -> Config:
    names = clouds or [c.name for c in lab.clouds]
    cc = {n: (overrides or {}).get(n) or cloud_config(lab, n) for n in names}
    stores = {}
    if store:
        (tmp_path / "store").mkdir(exist_ok=True)
        stores["archive"] = StoreConfig(name="archive", type="directory", path=tmp_path / "store")
    return Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / "state",
        poll_interval=60,
        clouds=cc,
        stores=stores,
        images=(ImageRule(pattern=pattern, clouds=tuple(names), stores=tuple(stores), **rule),),
        transfer_retries=2,
    )


def upload(lab: LabInfo, cloud: str, name: str, data: bytes, **props: str) -> dict[str, Any]:
    """Upload an image as a person would, with an independent client."""
    gc = glance_client(lab, cloud)
    img = gc.images.create(name=name, disk_format="raw", container_format="bare", **props)
    import io

    gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
    return dict(gc.images.get(img["id"]))


def random_image(
    lab: LabInfo, prefix: str, size: int, cloud: str = "lab1", **props: str
) -> tuple[str, bytes, dict[str, Any]]:
    """A name never used before, ``size`` random bytes, and the image of them uploaded under
    that name (Glance's record): what a test copies and then compares the copies with."""
    name = uid(prefix)
    data = random_bytes(size)
    return name, data, upload(lab, cloud, name, data, **props)


def fresh_image(
    lab: LabInfo, prefix: str, size: int = 8192, cloud: str = "lab1"
) -> tuple[str, dict[str, Any]]:
    """A name never used before, and an image of ``size`` random bytes uploaded under it."""
    name, _, record = random_image(lab, prefix, size, cloud)
    return name, record


def stored_bytes(store: Path, name: str) -> bytes:
    """The bytes of the one copy of ``name`` in a directory store (a test's ``make_config``
    puts it at ``tmp_path / "store"``)."""
    (stored,) = (store / name).glob("*.img")
    return stored.read_bytes()


@contextmanager
def nova_server(
    lab: LabInfo, name: str, image_id: str, *, stop: bool = False, **boot: Any
) -> Iterator[tuple[LabCompute, str]]:
    """A server on lab1's Nova booted from ``image_id`` (then stopped, with ``stop``) and its
    id; deleted at the end."""
    nova = compute_client(lab, "lab1")
    server_id = str(nova.boot(name, image_id, **boot)["id"])
    try:
        if stop:
            nova.stop(server_id)
        yield nova, server_id
    finally:
        nova.delete(server_id)


def images_named(lab: LabInfo, cloud: str, name: str) -> list[dict[str, Any]]:
    """Every image of that name on the cloud, hidden ones and every status included (admin),
    but ``deleted``: under load the lab Glance's SQLite can fail a DELETE half way (HTTP 500,
    "database is locked") after setting the status, leaving a row that every later DELETE
    refuses ("transition from deleted to deleted") and that no API can boot, download or
    remove. Seen in CI (a failed upload's placeholder, deleted by imagesync); a Glance on a
    real database server commits the delete whole."""
    gc = glance_client(lab, cloud, admin=True)
    out: list[Any] = []
    for hidden in ("false", "true"):
        filters = {"name": name, "visibility": "all", "os_hidden": hidden}
        out.extend(dict(i) for i in gc.images.list(filters=filters) if i["status"] != "deleted")
    return out


def openstack_cli(lab: LabInfo, *args: str, as_json: bool = True) -> Any:
    """Run the OpenStack CLI (an independent client) against the lab; its JSON parsed (None
    when it printed nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["OS_CLIENT_CONFIG_FILE"] = str(lab.clouds_yaml)
    exe = Path(sys.executable).parent / "openstack"
    done = subprocess.run(
        [str(exe), *args, *(["-f", "json"] if as_json else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_yaml(lab: LabInfo, tmp_path: Path, pattern: str, clouds: list[str], **extra: Any) -> Path:
    """An imagesync.yaml for the CLI, with the lab's clouds given inline."""
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "poll_interval": "1m",
        "clouds": {n: yaml_cloud(lab, n) for n in clouds},
        "images": [{"name": pattern, "clouds": "all"}],
    }
    doc.update(extra)
    return write_doc(tmp_path, doc)


@contextmanager
def proxied(lab: LabInfo, cloud: str) -> Iterator[tuple[FaultProxy, CloudConfig]]:
    """A fault-injecting proxy in front of ``cloud``'s Glance, and a CloudConfig using it."""
    port = urlparse(lab.cloud(cloud).glance_url).port
    assert port is not None
    proxy = FaultProxy(port)
    try:
        yield proxy, cloud_config(lab, cloud, endpoint_override=proxy.url)
    finally:
        proxy.close()
