"""End to end with a VOSpace central store: the lab's clouds (real Keystone and Glance) and the
lab's VOSpace service (the flipped byte: a service of its own behind a fault proxy that every
one of its URLs leads through, see ``tests/vospacelab.py``).

- a new version uploaded to one cloud reaches the store and the other clouds;
- a version that only the store holds (as CANFAR's vmsave or vcp leave one) reaches every cloud;
- a byte flipped between the store and imagesync is an integrity error, nothing left behind;
- a storm of 503s (Retry-After) on the store delays the pass but does not fail it;
- a store with ``compress: zstd`` keeps a smaller node, and the image its identity.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import requests

from imagesync.commands import push, sync
from imagesync.config.types import Config, StoreConfig
from imagesync.lab import LabInfo, LabVOSpace
from imagesync.lab.vospace import Fault, set_faults
from imagesync.model import PROP_ORIGIN, PROP_SHA512
from imagesync.sites.vospace import VOSpaceSite
from imagesync.state import State
from tests.integration.labcfg import images_named, make_config, random_bytes, sha512, uid, upload
from tests.vospacelab import ProxiedVOSpace, proxied_service, site_config

pytestmark = pytest.mark.integration
MB = 1 << 20
VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedVOSpace]:
    """A service of its own behind a fault proxy (the lab's cannot be put behind one)."""
    with proxied_service(tmp_path_factory.mktemp("vault")) as running:
        yield running


def config_with_store(
    lab: LabInfo,
    store: LabVOSpace,
    tmp_path: Path,
    name: str,
    clouds: list[str],
    compress: Literal["zstd"] | None = None,
) -> Config:
    base = make_config(lab, tmp_path, name, clouds=clouds, store=False)
    vault = StoreConfig("vault", "vospace", vospace=site_config(store), compress=compress)
    rule = dataclasses.replace(base.images[0], stores=("vault",))
    return dataclasses.replace(base, stores={"vault": vault}, images=(rule,))


def write_as_another_client(store: LabVOSpace, name: str, leaf: str, data: bytes) -> None:
    """What CANFAR's vmsave (or vcp) leaves: a data node in the name's container, no marks of
    imagesync. Raw HTTP, as the standard says, independent of imagesync's site."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {store.token}"
    base = store.url
    authority = store.authority
    top = store.container.removeprefix(f"vos://{authority}/")
    for path, kind in ((f"{top}/{name}", "ContainerNode"), (f"{top}/{name}/{leaf}", "DataNode")):
        doc = (
            f'<vos:node xmlns:vos="{VOS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'uri="vos://{authority}/{path}" xsi:type="vos:{kind}"/>'
        )
        r = s.put(f"{base}/nodes/{path}", data=doc, headers={"Content-Type": "text/xml"})
        assert r.status_code in (201, 409), r.text
    transfer = (
        f'<vos:transfer xmlns:vos="{VOS}" version="2.1"><vos:target>{store.container}/'
        f"{name}/{leaf}</vos:target><vos:direction>pushToVoSpace</vos:direction>"
        '<vos:protocol uri="ivo://ivoa.net/vospace/core#httpput"/></vos:transfer>'
    )
    r = s.post(f"{base}/sync", data=transfer, headers={"Content-Type": "text/xml"})
    r.raise_for_status()
    (endpoint,) = [e.text for e in ET.fromstring(r.content).iter(f"{{{VOS}}}endpoint")][:1]
    assert endpoint
    s.put(endpoint, data=data).raise_for_status()


def in_store(store: LabVOSpace, name: str) -> list[tuple[str, bytes]]:
    site = VOSpaceSite("vault", site_config(store))
    try:
        return [
            (r.properties.get(PROP_SHA512, ""), b"".join(site.open(r)))
            for r in site.list_images(name)
            if r.counts
        ]
    finally:
        site.close()


@pytest.fixture
def store(lab_vospace: LabVOSpace) -> LabVOSpace:
    """The VOSpace store the tests sync with: the lab's service, no fault rules."""
    return lab_vospace


def test_a_new_version_on_one_cloud_reaches_the_store_and_the_other_cloud(
    lab: LabInfo, store: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("vo-new")
    data = random_bytes(3 * MB + 17)
    orig = upload(lab, "lab1", name, data, os_distro="centos")
    config = config_with_store(lab, store, tmp_path, name, ["lab1", "lab2"])
    assert push(config, name) == 0
    assert in_store(store, name) == [(sha512(data), data)]
    (copy,) = images_named(lab, "lab2", name)
    assert copy["os_hash_value"] == sha512(data) and copy[PROP_ORIGIN] == f"lab1:{orig['id']}"
    (stored,) = VOSpaceSite("vault", site_config(store)).list_images(name)
    assert stored.properties["os_distro"] == "centos"  # user properties travel
    assert stored.properties[PROP_ORIGIN] == f"lab1:{orig['id']}"


def test_a_version_only_in_the_store_reaches_every_cloud(
    lab: LabInfo, store: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("vo-only")
    data = random_bytes(2 * MB + 5)
    write_as_another_client(store, name, "vmsave-2024.img", data)
    clouds = [c.name for c in lab.clouds]
    config = config_with_store(lab, store, tmp_path, name, clouds)
    assert sync(config) == 0
    for cloud in clouds:
        (copy,) = images_named(lab, cloud, name)
        assert copy["os_hash_value"] == sha512(data)
        assert copy[PROP_ORIGIN] == f"vault:{name}/vmsave-2024.img"


def test_a_byte_flipped_between_the_store_and_imagesync_is_an_integrity_error(
    lab: LabInfo, proxied: ProxiedVOSpace, tmp_path: Path
) -> None:
    name = uid("vo-flip")
    data = random_bytes(2 * MB)
    store, plan = proxied.vospace, proxied.proxy.plan
    write_as_another_client(store, name, "sl6.img", data)
    flips = plan.flips
    plan.flip_download_at = 765_432
    config = config_with_store(lab, store, tmp_path, name, ["lab1", "lab2"])
    try:
        assert push(config, name) == 1
    finally:
        plan.flip_download_at = None
    assert plan.flips > flips
    for cloud in ("lab1", "lab2"):
        assert images_named(lab, cloud, name) == []  # nothing left, not even hidden
    hist = State(config.state_dir).history(name)
    assert hist and {h["result"] for h in hist} == {"integrity"}


def test_a_503_storm_on_the_store_delays_but_does_not_fail_the_pass(
    lab: LabInfo, store: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("vo-503")
    data = random_bytes(MB + 3)
    upload(lab, "lab1", name, data)
    config = config_with_store(lab, store, tmp_path, name, ["lab1"])
    # longer than the shared policy's 4 tries of one request: the site waits as CADC's clients do
    set_faults(store.directory, [Fault("unavailable", times=5, retry_after=1)])
    assert sync(config) == 0
    assert in_store(store, name) == [(sha512(data), data)]


def test_a_compressed_store_keeps_a_smaller_node_and_the_images_identity(
    lab: LabInfo, store: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("vo-zstd")
    block = random_bytes(MB)
    data = b"".join(block if i % 10 in (2, 5, 8) else bytes(MB) for i in range(10))  # 70% zeros
    upload(lab, "lab1", name, data)
    config = config_with_store(lab, store, tmp_path, name, ["lab1", "lab2"], compress="zstd")
    assert push(config, name) == 0
    assert in_store(store, name) == [(sha512(data), data)]  # decompressed, verified
    (copy,) = images_named(lab, "lab2", name)
    assert copy["os_hash_value"] == sha512(data)
    site = VOSpaceSite("vault", site_config(store))
    try:
        (rec,) = site.list_images(name)
        node = site.node(f"{site.root}/{rec.id}", "look")
    finally:
        site.close()
    assert rec.id.endswith(".img.zst") and rec.size == len(data)
    assert int(node.properties["ivo://ivoa.net/vospace/core#length"]) <= 0.35 * len(data)
