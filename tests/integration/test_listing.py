"""A Glance listing either completes or fails, against a real Glance behind the fault proxy:
a 5xx on page 2, a ``next`` link that loops, a malformed page, and an image whose
``os_hidden`` flips between the visible and the hidden listing (it must not vanish)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from imagesync.errors import SiteError
from imagesync.lab import LabInfo, glance_client
from imagesync.sites.glance import GlanceSite
from tests.integration.labcfg import proxied, uid

pytestmark = pytest.mark.integration


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _make_images(lab: LabInfo, n: int) -> str:
    name = uid("list")
    gc = glance_client(lab, "lab1")
    for _ in range(n):
        gc.images.create(name=name, disk_format="raw", container_format="bare")
    return name


def _on_page_2(answer: bytes) -> Callable[[bytes], bytes | None]:
    """Answer the first request for a second page (it carries a marker) with ``answer``."""
    done: list[bool] = []

    def hook(line: bytes) -> bytes | None:
        if b"/v2/images?" in line and b"marker=" in line and not done:
            done.append(True)
            return answer
        return None

    return hook


@pytest.mark.parametrize(
    "answer",
    [
        _response("500 Internal Server Error", b'{"message": "boom"}'),
        _response("200 OK", b'{"oops": []}'),
        _response("200 OK", b"not json"),
        _response("200 OK", b'{"images": [{"name": "no id"}]}'),
    ],
    ids=["5xx", "no-images-key", "not-json", "image-without-id"],
)
def test_a_bad_second_page_fails_the_listing(lab: LabInfo, answer: bytes) -> None:
    name = _make_images(lab, 3)
    with proxied(lab, "lab1") as (proxy, cfg):
        site = GlanceSite(cfg)
        assert len(site._list({"name": name, "limit": "2"})) == 3  # two pages, through the proxy
        proxy.plan.on_request = _on_page_2(answer)
        with pytest.raises(SiteError, match="list images"):
            site._list({"name": name, "limit": "2"})


def test_a_next_link_that_loops_fails_the_listing(lab: LabInfo) -> None:
    name = _make_images(lab, 3)
    with proxied(lab, "lab1") as (proxy, cfg):
        site = GlanceSite(cfg)

        def loop(line: bytes) -> bytes | None:
            if b"marker=" not in line:
                return None
            path = line.split(b" ")[1].decode()  # page 2 says: next is page 2 again
            return _response("200 OK", json.dumps({"images": [], "next": path}).encode())

        proxy.plan.on_request = loop
        with pytest.raises(SiteError, match="loops"):
            site._list({"name": name, "limit": "2"})


def test_an_image_published_between_the_two_listings_does_not_vanish(lab: LabInfo) -> None:
    # Hidden while the visible images are listed, published (os_hidden=false) just before the
    # hidden ones are: in neither listing unless what changed meanwhile is listed again.
    name = uid("flip")
    gc = glance_client(lab, "lab1")
    steady = gc.images.create(name=name, disk_format="raw", container_format="bare")
    flipping = gc.images.create(
        name=name, disk_format="raw", container_format="bare", os_hidden=True
    )
    flipped: list[bool] = []

    def publish_before_hidden_listing(line: bytes) -> bytes | None:
        if b"os_hidden=true" in line and b"updated_at" not in line and not flipped:
            gc.images.update(flipping["id"], os_hidden=False)
            flipped.append(True)
        return None

    with proxied(lab, "lab1") as (proxy, cfg):
        site = GlanceSite(cfg)
        proxy.plan.on_request = publish_before_hidden_listing
        found = {r.id: r for r in site.list_images(name)}
    assert flipped
    assert set(found) == {steady["id"], flipping["id"]}
    assert not found[flipping["id"]].hidden  # its latest state
