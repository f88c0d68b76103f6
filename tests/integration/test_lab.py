"""The lab is real: independent clients use it, Keystone refuses bad credentials, the clouds are
separate, web-download works from loopback, and up/down/up leaves nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from imagesync import cli
from imagesync import lab as lab_mod
from imagesync.errors import LabError
from imagesync.lab import LabInfo, procs
from imagesync.sites import store_kinds
from tests.integration.labcfg import openstack_cli

pytestmark = pytest.mark.integration

GlanceClient = Callable[..., Any]


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes (not this one) that mention ``path``."""
    needle = str(path.resolve())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        args = raw.decode("utf-8", "replace").replace("\0", " ")
        if needle in args:
            found.append(f"{entry.name}: {args[:200]}")
    return found


def _openstack(lab: LabInfo, *args: str) -> Any:
    """Run the OpenStack CLI (an independent client) against the lab; parse its JSON."""
    return openstack_cli(lab, *args)


def _upload(gc: Any, name: str, data: bytes) -> str:
    img = gc.images.create(name=name, disk_format="raw", container_format="bare")
    gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
    return str(img["id"])


def test_the_openstack_cli_sees_an_image_made_with_glanceclient(
    lab: LabInfo, glance_client: GlanceClient, unique_name: str
) -> None:
    data = os.urandom(200_000)
    gc = glance_client(lab, "lab1")
    image_id = _upload(gc, unique_name, data)
    try:
        listed = _openstack(lab, "--os-cloud", "lab1", "image", "list")
        assert {"ID": image_id, "Name": unique_name, "Status": "active"} in listed
        shown = _openstack(lab, "--os-cloud", "lab1", "image", "show", image_id)
        assert shown["size"] == len(data)
        assert shown["properties"]["os_hash_algo"] == "sha512"
        assert shown["properties"]["os_hash_value"] == hashlib.sha512(data).hexdigest()
        # Separate clouds: lab2 has its own Glance and knows nothing of it.
        assert list(glance_client(lab, "lab2").images.list(filters={"name": unique_name})) == []
    finally:
        gc.images.delete(image_id)


def test_the_client_files_are_what_clients_expect(lab: LabInfo) -> None:
    import yaml
    from openstack import config as os_config

    loader = os_config.OpenStackConfig(config_files=[str(lab.clouds_yaml)])
    for cloud in lab.clouds:
        region = loader.get_one(cloud.name)
        assert region.config["auth"]["auth_url"] == cloud.keystone_url
        assert region.config["auth"]["username"] == "imagesync"
        assert region.config["auth"]["password"] == cloud.password
        assert region.get_region_name() == "RegionOne"
        assert region.get_interface() == "public"
        admin = loader.get_one(f"{cloud.name}-admin")
        assert admin.config["auth"]["password"] == cloud.admin_password
    assert oct(lab.clouds_yaml.stat().st_mode & 0o777) == "0o600"

    config = yaml.safe_load(lab.config_file.read_text())
    store = config.pop("stores")
    assert config == {
        "clouds_yaml": str(lab.clouds_yaml),
        "state_dir": str(lab.directory / "state"),
        "poll_interval": "30s",
        "clouds": {c.name: {"cloud": c.name} for c in lab.clouds},
        "images": [{"name": "*", "clouds": "all", "store": "archive"}],
    }
    # the central store is the lab's VOSpace service once imagesync builds VOSpace sites
    if "vospace" in store_kinds():
        assert lab.vospace is not None
        assert store["archive"]["type"] == "vospace"
        assert store["archive"]["container"] == lab.vospace.container
    else:
        assert store == {"archive": {"type": "directory", "path": str(lab.store_dir)}}
    assert lab.store_dir.is_dir()


def _token(cloud: lab_mod.LabCloud, password: str) -> requests.Response:
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": cloud.username,
                        "domain": {"name": "Default"},
                        "password": password,
                    }
                },
            },
            "scope": {"project": {"name": cloud.project, "domain": {"name": "Default"}}},
        }
    }
    return requests.post(f"{cloud.keystone_url}/auth/tokens", json=body, timeout=30)


def test_keystone_refuses_a_wrong_password_and_glance_a_foreign_token(lab: LabInfo) -> None:
    lab1, lab2 = lab.cloud("lab1"), lab.cloud("lab2")
    assert _token(lab1, lab1.password + "x").status_code == 401
    good = _token(lab1, lab1.password)
    assert good.status_code == 201
    token = good.headers["X-Subject-Token"]
    catalog = {e["type"] for e in good.json()["token"]["catalog"]}
    assert {"identity", "image"} <= catalog
    roles = {r["name"] for r in good.json()["token"]["roles"]}
    assert "member" in roles and "admin" not in roles

    def images(cloud: lab_mod.LabCloud, tok: str) -> int:
        return requests.get(
            f"{cloud.glance_url}/v2/images", headers={"X-Auth-Token": tok}, timeout=30
        ).status_code

    assert images(lab1, token) == 200
    assert images(lab1, "not-a-token") == 401
    # lab2's Keystone has its own fernet keys: lab1's token means nothing there.
    assert images(lab2, token) == 401


@pytest.fixture
def http_source() -> Iterator[tuple[str, bytes]]:
    """A plain HTTP server on loopback serving one image file."""
    data = os.urandom(300_000)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image.raw", data
    finally:
        server.shutdown()
        server.server_close()


def test_web_download_from_loopback_on_any_port(
    lab: LabInfo, glance_client: GlanceClient, unique_name: str, http_source: tuple[str, bytes]
) -> None:
    url, data = http_source
    gc = glance_client(lab, "lab2")
    methods = gc.images.get_import_info()["import-methods"]["value"]
    assert {"glance-direct", "web-download", "copy-image"} <= set(methods)
    img = gc.images.create(name=unique_name, disk_format="raw", container_format="bare")
    try:
        gc.images.image_import(img["id"], method="web-download", uri=url)
        deadline = time.monotonic() + 60
        while True:
            got = gc.images.get(img["id"])
            assert not got.get("os_glance_failed_import"), got
            if got["status"] == "active" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got["status"] == "active"
        assert got["os_hash_value"] == hashlib.sha512(data).hexdigest()
    finally:
        # Glance may still be finishing the import task (a 500 on a loaded machine):
        # cleaning up must not hide the test's own verdict
        with contextlib.suppress(Exception):
            gc.images.delete(img["id"])


def test_a_small_lab_goes_up_down_and_warm_up_again(tmp_path: Path) -> None:
    directory = tmp_path / "small"
    try:
        cold = lab_mod.up(clouds=1, directory=directory)
        assert cold.start_kind == "cold"
        assert [c.name for c in cold.clouds] == ["lab1"]
        assert oct(cold.clouds_yaml.stat().st_mode & 0o777) == "0o600"
        assert oct((directory / "lab.json").stat().st_mode & 0o777) == "0o600"
        text, running = lab_mod.status(directory)
        assert running, text
        assert "lab1" in text and "running" in text and "MB" in text
        assert _processes_mentioning(directory)
        image_id = _upload(lab_mod.glance_client(cold, "lab1"), "kept", b"\1" * 4096)

        again = lab_mod.up(clouds=1, directory=directory)  # idempotent: nothing restarted
        assert again.start_kind == "running"
        assert again.clouds == cold.clouds

        summary = lab_mod.down(directory)
        assert "stopped" in summary
        assert _processes_mentioning(directory) == []
        assert lab_mod.status(directory)[1] is False
        assert "nothing was running" in lab_mod.down(directory)

        warm = lab_mod.up(clouds=1, directory=directory)
        assert warm.start_kind == "warm"
        assert warm.start_seconds < cold.start_seconds
        assert warm.clouds == cold.clouds  # same ports, same passwords
        # The data survived: same users (no new bootstrap), same image.
        got = lab_mod.glance_client(warm, "lab1").images.get(image_id)
        assert got["name"] == "kept" and got["status"] == "active"

        # A new token lifetime restarts Keystone (only) and takes effect.
        glance_pid = json.loads((directory / "lab.json").read_text())["clouds"][0]["glance"]
        short = lab_mod.up(clouds=1, directory=directory, token_expiration=7)
        assert short.start_kind == "warm"
        after = json.loads((directory / "lab.json").read_text())["clouds"][0]["glance"]
        assert after == glance_pid
        token = _token(short.cloud("lab1"), short.cloud("lab1").password).json()["token"]
        lifetime = datetime.fromisoformat(
            token["expires_at"].replace("Z", "+00:00")
        ) - datetime.fromisoformat(token["issued_at"].replace("Z", "+00:00"))
        assert 5 <= lifetime.total_seconds() <= 8
    finally:
        lab_mod.down(directory)
    assert _processes_mentioning(directory) == []


def test_a_failed_start_stops_what_it_started_and_shows_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken_api.py"
    broken.write_text("raise RuntimeError('glance cannot start in this test')\n")
    real = procs.find_tools

    def tools_with_a_broken_glance() -> procs.Tools:
        return dataclasses.replace(real(), glance_wsgi=broken)

    monkeypatch.setattr(procs, "find_tools", tools_with_a_broken_glance)
    directory = tmp_path / "failing"
    try:
        with pytest.raises(LabError) as caught:
            lab_mod.up(clouds=1, directory=directory)
        message = str(caught.value)
        assert "lab1: glance exited while starting" in message
        assert str(directory / "lab1" / "logs" / "glance.log") in message
        assert "glance cannot start in this test" in message
        assert _processes_mentioning(directory) == []
    finally:
        lab_mod.down(directory)


def test_up_without_the_lab_extra_says_what_to_install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_find, real_package = procs.find_executable, procs.package_dir
    monkeypatch.setattr(
        procs, "find_executable", lambda name: None if name == "uwsgi" else real_find(name)
    )
    with pytest.raises(LabError, match=r"pip install 'imagesync\[lab\]' \(not found: uwsgi\)"):
        lab_mod.up(clouds=1, directory=tmp_path / "a")
    assert not (tmp_path / "a").exists()

    monkeypatch.setattr(procs, "find_executable", real_find)
    monkeypatch.setattr(
        procs, "package_dir", lambda name: None if name == "glance" else real_package(name)
    )
    assert cli.main(["lab", "up", "--clouds", "1", "--dir", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "the lab needs the 'lab' extra: pip install 'imagesync[lab]'" in err
    assert "glance" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
