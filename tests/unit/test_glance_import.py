"""Glance's web-download (sites/glance_import.py) over a fake Glance: the probe is asked once,
never with ``server_side: false``; the import ends in a record, a failure (Glance back to
queued with ``os_glance_failed_import``), a timeout (injected clock) or a cancel; errors never
show the URL's grant."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import requests

from imagesync.config.types import CloudConfig
from imagesync.errors import Cancelled, SiteError, TransientError
from imagesync.sites.base import SharedURL
from imagesync.sites.glance import GlanceSite
from imagesync.sites.glance_import import WebDownload
from tests.fakeclock import FakeClock

URL = SharedURL("http://s/data/preauth:GRANT/img", "http://s/data/preauth:…/img", 10, "GRANT")
ACTIVE = {"id": "i1", "status": "active", "size": 10, "os_hash_algo": "sha512"}


class Reply:
    def __init__(self, body: Any, status: int = 200) -> None:
        self.body = body
        self.status_code = status

    def json(self) -> Any:
        return self.body


class FakeAdapter:
    """Answers GETs of the image from a script of states; records what was asked."""

    def __init__(self, states: list[dict[str, Any]], post_status: int = 202) -> None:
        self.states = states
        self.post_status = post_status
        self.gets: list[str] = []
        self.posts: list[tuple[str, Any]] = []

    def get(self, url: str, **kw: Any) -> Reply:
        self.gets.append(url)
        if url == "/v2/info/import":
            return Reply({"import-methods": {"value": ["glance-direct", "web-download"]}})
        return Reply(self.states.pop(0) if len(self.states) > 1 else self.states[0])

    def post(self, url: str, json: Any = None, **kw: Any) -> Reply:
        self.posts.append((url, json))
        if self.post_status >= 400:
            resp = requests.Response()
            resp.status_code = self.post_status
            import keystoneauth1.exceptions as ksexc

            raise ksexc.BadRequest(
                f"400 Bad Request: URI {json['method']['uri']} is not allowed",
                http_status=400,
                response=resp,
            )
        return Reply(None, self.post_status)


def _site(adapter: FakeAdapter, server_side: bool = True) -> GlanceSite:
    site = GlanceSite.__new__(GlanceSite)  # no session: the adapter is the fake
    site.name = "c1"
    site.cfg = CloudConfig("c1", {}, "password", timeout=10.0, server_side=server_side)
    site.adapter = cast(Any, adapter)
    return site


def _importer(adapter: FakeAdapter, clock: FakeClock, server_side: bool = True) -> WebDownload:
    return WebDownload(_site(adapter, server_side), clock=clock, sleep=clock.sleep)


NEVER: Callable[[], bool] = lambda: False  # noqa: E731


def test_the_probe_is_asked_once_and_never_when_server_side_is_off() -> None:
    adapter = FakeAdapter([ACTIVE])
    wd = _importer(adapter, FakeClock())
    assert wd.available() and wd.available()
    assert adapter.gets.count("/v2/info/import") == 1
    off = FakeAdapter([ACTIVE])
    assert not _importer(off, FakeClock(), server_side=False).available() and off.gets == []


def test_an_import_waits_for_active_and_the_lock_to_go() -> None:
    queued = {**ACTIVE, "status": "queued"}
    importing = {**ACTIVE, "status": "importing", "os_glance_import_task": "t"}
    locked = {**ACTIVE, "os_glance_import_task": "t", "os_hash_value": "ab"}
    adapter = FakeAdapter([queued, importing, locked, {**ACTIVE, "os_hash_value": "ab"}])
    rec = _importer(adapter, FakeClock()).run("i1", URL, NEVER)
    assert rec.status == "active" and rec.hashes["sha512"] == "ab"
    (post,) = adapter.posts
    assert post == ("/v2/images/i1/import", {"method": {"name": "web-download", "uri": URL.url}})
    assert len(adapter.gets) == 4


def test_a_failed_import_says_so_without_the_grant() -> None:
    failed = {**ACTIVE, "status": "queued", "os_glance_failed_import": "file1"}
    with pytest.raises(SiteError) as err:
        _importer(FakeAdapter([failed]), FakeClock()).run("i1", URL, NEVER)
    assert "failed" in str(err.value) and "GRANT" not in str(err.value)
    assert "preauth:…" in str(err.value)


def test_a_refused_url_is_an_error_without_the_grant() -> None:
    with pytest.raises(SiteError) as err:
        _importer(FakeAdapter([ACTIVE], post_status=400), FakeClock()).run("i1", URL, NEVER)
    # Glance echoes the URL it refused: shown masked, and the site named once
    assert str(err.value).startswith("c1: web-download http://s/data/preauth:…/img into i1")
    assert "GRANT" not in str(err.value) and err.value.__cause__ is None


def test_an_import_that_never_ends_times_out_by_the_injected_clock() -> None:
    clock = FakeClock()
    importing = {**ACTIVE, "status": "importing"}
    with pytest.raises(TransientError, match="timed out"):
        _importer(FakeAdapter([importing]), clock).run("i1", URL, NEVER)
    assert clock.now > 10.0 and clock.sleeps < 100  # polls back off (to 0.5 s), no busy loop


def test_a_cancelled_import_stops_polling() -> None:
    importing = {**ACTIVE, "status": "importing"}
    with pytest.raises(Cancelled):
        _importer(FakeAdapter([importing]), FakeClock()).run("i1", URL, lambda: True)
