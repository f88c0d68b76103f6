"""A Keystone token expiring in the middle of a long transfer must not fail the copy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesync import lab as lab_mod
from imagesync.commands import push
from imagesync.lab import LabInfo
from tests.integration import labcfg

pytestmark = pytest.mark.integration
TOKEN_SECONDS = 4


@pytest.fixture(scope="module")
def short_token_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    directory = tmp_path_factory.mktemp("shortlab")
    info = lab_mod.up(clouds=1, directory=directory, token_expiration=TOKEN_SECONDS)
    try:
        yield info
    finally:
        lab_mod.down(directory)


def test_token_expires_mid_transfer_and_the_copy_succeeds(
    lab: LabInfo, short_token_lab: LabInfo, tmp_path: Path
) -> None:
    """Source: the session lab's lab1; target: a cloud whose tokens live 4 seconds."""
    name = labcfg.uid("tok")
    data = labcfg.random_bytes(2 << 20)
    labcfg.upload(lab, "lab1", name, data)
    with labcfg.proxied(short_token_lab, "lab1") as (proxy, _):
        # 2 MiB at 0.15 s per 64 KiB: the upload lasts ~5 s, longer than a token lives.
        proxy.plan.throttle_upload = 0.15
        short = labcfg.cloud_config(
            short_token_lab, "lab1", endpoint_override=proxy.url, site_name="short"
        )
        config = labcfg.make_config(
            lab, tmp_path, name, clouds=["lab1", "short"], store=False, overrides={"short": short}
        )
        started = time.monotonic()
        assert push(config, name) == 0
        assert time.monotonic() - started > TOKEN_SECONDS
    (copy,) = labcfg.images_named(short_token_lab, "lab1", name)
    assert copy["status"] == "active" and copy["os_hash_value"] == labcfg.sha512(data)


def test_tokens_really_expire_in_this_lab(short_token_lab: LabInfo) -> None:
    """Proves the test above exercised an expiry: an old token is refused."""
    import requests

    from imagesync.lab import session

    sess = session(short_token_lab, "lab1")
    token = sess.get_token()
    glance = short_token_lab.cloud("lab1").glance_url
    assert (
        requests.get(f"{glance}/v2/images", headers={"X-Auth-Token": token}, timeout=10).status_code
        == 200
    )
    time.sleep(TOKEN_SECONDS + 2)
    assert (
        requests.get(f"{glance}/v2/images", headers={"X-Auth-Token": token}, timeout=10).status_code
        == 401
    )
