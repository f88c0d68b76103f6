"""The lab's VOSpace service, checked by CADC's own client (``vos``: AGPL, a test-only
dependency, driven only through its console scripts in subprocesses).

The client runs offline as ``shared/reference/vos-client-recipe.md`` says: HOME in a temporary
directory, the registry (``resource-caps``) and PyPI version caches seeded with a future
mtime, so it asks nobody but the lab's service. Fault hooks (``imagesync.lab.vospace.faults``)
make the service answer 503, cut a download short or lie about a Digest; the tests check the
client sees what a real CADC service would make it see.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from imagesync.lab import LabVOSpace, procs
from imagesync.lab.vospace import Fault, clear_faults, set_faults
from imagesync.lab.vospace import service as vospace_service
from imagesync.lab.vospace.xmldoc import PROP_MD5, VOS_NS

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
BIG = 6 * 1024 * 1024  # over CADC_MAX_MD5_COMPUTE_SIZE (5 MiB): the client's other upload path
CUSTOM = "ivo://imagesync.example/props#origin"


@dataclass(frozen=True)
class VOS:
    """CADC's client set up against one service: run its commands, reach the service."""

    service: LabVOSpace
    env: dict[str, str]
    root: str  # vos:// URI of this test's own container

    def run(self, cmd: str, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        # --token=VALUE: a token may start with "-" (urlsafe base64), which argparse would take
        # for an option in "--token VALUE"
        argv = [str(BIN / cmd), *([f"--token={self.service.token}"] if token else []), *args]
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=180, check=False
        )

    def ok(self, cmd: str, *args: str) -> str:
        done = self.run(cmd, *args)
        assert done.returncode == 0, f"{cmd} {args}: {done.stdout}{done.stderr}"
        return done.stdout

    def http(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.headers["Authorization"] = f"Bearer {self.service.token}"
        return s

    def node_url(self, uri: str) -> str:
        return f"{self.service.url}/nodes/{uri.split('/', 3)[3]}"

    def data_url(self, uri: str) -> str:
        return f"{self.service.url}/data/{uri.split('/', 3)[3]}"


def client_env(home: Path, registry_line: str) -> dict[str, str]:
    """An environment in which CADC's client talks to the given service only (recipe §1)."""
    reg = home / ".config/cadc-registry"
    caches = home / ".config/vos/caches"
    reg.mkdir(parents=True)
    caches.mkdir(parents=True)
    (reg / "resource-caps").write_text(registry_line + "\n")
    (caches / ".pypi_versions.json").write_text('{"releases": {}}\n')
    future = 4_070_908_800  # 2099-01-01: a cache from the future is always fresh
    for f in (reg / "resource-caps", caches / ".pypi_versions.json"):
        os.utime(f, (future, future))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOSPACE", "CADC"))}
    env["HOME"] = str(home)
    return env


@pytest.fixture
def vos(lab_vospace: LabVOSpace, tmp_path: Path, unique_name: str) -> VOS:
    client = VOS(
        lab_vospace,
        client_env(tmp_path / "home", lab_vospace.registry_line),
        f"{lab_vospace.container}/{unique_name}",
    )
    client.ok("vmkdir", client.root)
    return client


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _props(vos: VOS, uri: str) -> dict[str, str]:
    resp = vos.http().get(vos.node_url(uri), params={"limit": "0"}, timeout=30)
    assert resp.status_code == 200, resp.text
    root = ET.fromstring(resp.content)
    return {
        p.attrib["uri"]: p.text or ""
        for p in root.iter(f"{{{VOS_NS}}}property")
        if p.attrib.get("uri")
    }


def _log_lines(vospace: LabVOSpace, needle: str) -> list[str]:
    log = vospace_service.log_file(vospace.directory)
    return [ln for ln in log.read_text(errors="replace").splitlines() if needle in ln]


# --------------------------------------------------------------------------- the service


def test_capabilities_are_public_and_nodes_need_the_token(lab_vospace: LabVOSpace) -> None:
    vospace = lab_vospace
    s = requests.Session()
    s.trust_env = False
    caps = s.get(vospace.capabilities_url, timeout=30)
    assert caps.status_code == 200
    for std in (
        "ivo://ivoa.net/std/VOSI#availability",
        "ivo://ivoa.net/std/VOSpace/v2.0#nodes",
        "ivo://ivoa.net/std/VOSpace#sync-2.1",
        "ivo://ivoa.net/std/VOSpace#files-proto",
    ):
        assert f'standardID="{std}"' in caps.text
    nodes = f"{vospace.url}/nodes/{vospace.container.split('/', 3)[3]}"
    assert s.get(nodes, timeout=30).status_code == 401
    wrong = s.get(nodes, headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert wrong.status_code == 401
    assert vospace.token not in wrong.text
    right = s.get(nodes, headers={"Authorization": f"Bearer {vospace.token}"}, timeout=30)
    assert right.status_code == 200
    assert 'xsi:type="vos:ContainerNode"' in right.text


# --------------------------------------------------------------------------- CADC's client


def test_the_cadc_client_round_trips_small_and_big_files(vos: VOS, tmp_path: Path) -> None:
    small = os.urandom(100_000)
    big = os.urandom(BIG + 12_345)
    (tmp_path / "small.img").write_bytes(small)
    (tmp_path / "big.img").write_bytes(big)
    sub = f"{vos.root}/dir"
    assert vos.run("vmkdir", sub).returncode == 0
    again = vos.run("vmkdir", sub)
    assert again.returncode == 17, again.stderr  # 409 → AlreadyExists

    vos.ok("vcp", str(tmp_path / "small.img"), f"{sub}/small.img")
    vos.ok("vcp", str(tmp_path / "big.img"), f"{sub}/big.img")
    listing = vos.ok("vls", "-l", sub)
    assert "small.img" in listing and "big.img" in listing
    assert str(len(big)) in listing

    for name, data in (("small.img", small), ("big.img", big)):
        out = tmp_path / f"back-{name}"
        vos.ok("vcp", f"{sub}/{name}", str(out))
        assert out.read_bytes() == data
        props = _props(vos, f"{sub}/{name}")
        assert props[PROP_MD5] == _md5(data)
        head = vos.http().head(vos.data_url(f"{sub}/{name}"), timeout=30)
        raw_md5 = base64.b64decode(head.headers["Digest"].removeprefix("md5="))
        assert raw_md5.hex() == _md5(data)
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["Content-Disposition"] == f'inline; filename="{name}"'

    # The big file went through the client's no-digest upload path (x-put-txn-op: start).
    assert _log_lines(vos.service, f"PUT /data/{sub.split('/', 3)[3]}/big.img")

    vos.ok("vtag", f"{sub}/big.img", f"{CUSTOM}=lab1/v7")
    assert _props(vos, f"{sub}/big.img")[CUSTOM] == "lab1/v7"
    assert CUSTOM in vos.ok("vtag", f"{sub}/big.img")  # listed by the client too
    vos.ok("vtag", f"{sub}/big.img", f"{CUSTOM}=")  # k= : xsi:nil deletes it
    props = _props(vos, f"{sub}/big.img")
    assert CUSTOM not in props
    assert props[PROP_MD5] == _md5(big)  # immutable ones survive the client's POST

    vos.ok("vrm", f"{sub}/small.img")
    assert "small.img" not in vos.ok("vls", sub)
    gone = vos.run("vcp", f"{sub}/small.img", str(tmp_path / "gone"))
    assert gone.returncode != 0
    vos.ok("vrm", f"{sub}/big.img")
    vos.ok("vrmdir", sub)
    assert "dir" not in vos.ok("vls", vos.root)


def test_the_service_accepts_both_uri_separators(vos: VOS, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"bang")
    bang = vos.root.replace("~", "!", 1)
    vos.ok("vcp", str(tmp_path / "f"), f"{bang}/f")
    assert "f" in vos.ok("vls", vos.root).split()


def test_the_client_sees_an_unauthenticated_call_fail(vos: VOS) -> None:
    done = vos.run("vls", vos.root, token=False)
    assert done.returncode != 0 or "NotAuthenticated" in done.stderr + done.stdout


# --------------------------------------------------------------------------- fault hooks


def test_an_upload_whose_digest_does_not_match_is_refused_with_412(vos: VOS) -> None:
    uri = f"{vos.root}/x.img"
    s = vos.http()
    good = os.urandom(50_000)
    put = s.put(
        vos.data_url(uri),
        data=good,
        headers={"Digest": "md5=" + base64.b64encode(hashlib.md5(good).digest()).decode()},
        timeout=30,
    )
    assert put.status_code == 201
    assert put.headers["Digest"] == "md5=" + base64.b64encode(hashlib.md5(good).digest()).decode()

    bad = os.urandom(50_000)
    wrong = "md5=" + base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    refused = s.put(vos.data_url(uri), data=bad, headers={"Digest": wrong}, timeout=30)
    assert refused.status_code == 412
    # nothing changed: the node still holds the first upload
    assert s.get(vos.data_url(uri), timeout=30).content == good
    assert _props(vos, uri)[PROP_MD5] == _md5(good)


def test_an_empty_start_put_creates_and_truncates_nothing(vos: VOS) -> None:
    uri = f"{vos.root}/seg.img"
    s = vos.http()
    start = {"x-put-txn-op": "start", "x-total-length": "1000", "Content-Length": "0"}
    answer = s.put(vos.data_url(uri), headers=start, timeout=30)
    assert answer.ok and "x-put-txn-id" not in answer.headers  # no segmented uploads offered
    assert s.get(vos.node_url(uri), timeout=30).status_code == 404
    s.put(vos.data_url(uri), data=b"kept", timeout=30).raise_for_status()
    s.put(vos.data_url(uri), headers=start, timeout=30).raise_for_status()
    assert s.get(vos.data_url(uri), timeout=30).content == b"kept"


def test_a_cut_download_is_resumed_with_a_range_request(vos: VOS, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "r.img").write_bytes(data)
    uri = f"{vos.root}/r.img"
    vos.ok("vcp", str(tmp_path / "r.img"), uri)
    path = uri.split("/", 3)[3]
    # the first read (the files shortcut) is cut after 1 MiB; the client keeps the .part
    # file and asks the negotiated endpoint for the rest only
    set_faults(
        vos.service.directory,
        [Fault("cut", method="GET", path=f"/{path}", times=1, after_bytes=1024 * 1024)],
    )
    out = tmp_path / "out.img"
    vos.ok("vcp", uri, str(out))
    assert out.read_bytes() == data
    assert any("(HTTP/1.1 206)" in ln for ln in _log_lines(vos.service, f"GET /data/{path}"))


def test_a_range_request_gets_206_with_content_range(vos: VOS) -> None:
    uri = f"{vos.root}/range.img"
    s = vos.http()
    data = os.urandom(10_000)
    s.put(vos.data_url(uri), data=data, timeout=30).raise_for_status()
    part = s.get(vos.data_url(uri), headers={"Range": "bytes=4000-"}, timeout=30)
    assert part.status_code == 206
    assert part.headers["Content-Range"] == "bytes 4000-9999/10000"
    assert part.headers["Accept-Ranges"] == "bytes"
    assert part.content == data[4000:]
    tail = s.get(vos.data_url(uri), headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.content == data[-10:]
    past = s.get(vos.data_url(uri), headers={"Range": "bytes=10000-"}, timeout=30)
    assert past.status_code == 416


def test_the_client_waits_out_503_with_retry_after(vos: VOS) -> None:
    path = vos.root.split("/", 3)[3]
    set_faults(
        vos.service.directory,
        [Fault("unavailable", method="GET", path=f"/nodes/{path}", times=2, retry_after=1)],
    )
    vos.ok("vls", vos.root)
    assert len([ln for ln in _log_lines(vos.service, f"/nodes/{path}") if "(HTTP/1.1 503)" in ln])


def test_a_wrong_digest_on_download_fails_the_client(vos: VOS, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "d.img").write_bytes(data)
    uri = f"{vos.root}/d.img"
    vos.ok("vcp", str(tmp_path / "d.img"), uri)
    set_faults(vos.service.directory, [Fault("wrong_digest", method="GET")])
    done = vos.run("vcp", uri, str(tmp_path / "bad.img"))
    assert done.returncode != 0
    assert not (tmp_path / "bad.img").exists()
    clear_faults(vos.service.directory)
    vos.ok("vcp", uri, str(tmp_path / "good.img"))
    assert (tmp_path / "good.img").read_bytes() == data


def test_slow_reads_still_deliver_every_byte(vos: VOS) -> None:
    uri = f"{vos.root}/slow.img"
    s = vos.http()
    data = os.urandom(3 * 1024 * 1024)
    s.put(vos.data_url(uri), data=data, timeout=30).raise_for_status()
    set_faults(vos.service.directory, [Fault("slow", method="GET", delay=0.05)])
    assert s.get(vos.data_url(uri), timeout=60).content == data


def test_node_listings_page_with_limit_and_uri(vos: VOS) -> None:
    s = vos.http()
    names = [f"n{i:02d}" for i in range(7)]
    for name in names:
        s.put(vos.data_url(f"{vos.root}/{name}"), data=name.encode(), timeout=30)

    def page(**params: str) -> list[str]:
        resp = s.get(vos.node_url(vos.root), params=params, timeout=30)
        assert resp.status_code == 200
        root = ET.fromstring(resp.content)
        return [n.attrib["uri"].rsplit("/", 1)[1] for n in root.iter(f"{{{VOS_NS}}}node")][1:]

    assert page() == names
    assert page(limit="0") == []
    assert page(limit="3") == names[:3]
    assert page(limit="3", uri=f"{vos.root}/n03") == names[3:6]


# --------------------------------------------------------------------------- TLS


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """A service of its own (https, no token): the lab CA's client certificate is the login,
    for plain HTTPS clients and for CADC's client (``--certfile``, ``-k``: a private CA)."""
    port = procs.free_ports(1)[0]
    config = vospace_service.prepare(tmp_path / "svc", port, None, tls=True)
    pid = vospace_service.start(config, port)
    marker = str(vospace_service.pid_file(config.directory))
    try:
        vospace_service.wait_ready(config, pid)
        tls = vospace_service.tls_files(config.directory)
        nodes = f"{config.base_url}/nodes/images"
        s = requests.Session()
        s.trust_env = False
        assert s.get(nodes, verify=str(tls.ca), timeout=30).status_code == 401
        with_cert = s.get(nodes, verify=str(tls.ca), cert=str(tls.client_pem), timeout=30)
        assert with_cert.status_code == 200

        env = client_env(tmp_path / "home", vospace_service.registry_line(config))
        data = os.urandom(70_000)
        (tmp_path / "c.img").write_bytes(data)
        uri = f"vos://{config.authority}/images/c.img"
        cert = ["-k", "--certfile", str(tls.client_pem)]

        def vos_cmd(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(BIN / args[0]), *cert, *args[1:]],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        up = vos_cmd("vcp", str(tmp_path / "c.img"), uri)
        assert up.returncode == 0, up.stderr
        down = vos_cmd("vcp", uri, str(tmp_path / "back.img"))
        assert down.returncode == 0, down.stderr
        assert (tmp_path / "back.img").read_bytes() == data
    finally:
        procs.stop_groups({pid: marker})
