"""The daemon's status page and ``/status.json``, over in-memory sites (no servers but the
listener itself): the matrix is what ``status --json`` would say, copies in flight show their
progress, everything from a site is escaped, the listener is read-only and the page's
Content-Security-Policy lets its own inline style and script run and nothing else."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from imagesync.daemon import Daemon
from imagesync.daemon.live import LiveStatus
from imagesync.daemon.statuspage import SCRIPT, STYLE, pages, render
from imagesync.engine import Engine
from imagesync.engine.report import status_document
from imagesync.plan import Copy, plan
from imagesync.sites.memory import MemorySite
from tests.unit.test_daemon import config_for, daemon_for

KB = 1000


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside each <script>/<style>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.raw: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in self.raw else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self.raw[self._in].append(data)

    def cells(self) -> dict[tuple[str, str], dict[str, str | None]]:
        return {
            (str(a["data-name"]), str(a["data-site"])): a
            for t, a in self.tags
            if t == "td" and "data-state" in a
        }


def parse(html: str) -> Tags:
    p = Tags()
    p.feed(html)
    return p


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Daemon, str, dict[str, MemorySite]]]:
    sites = {n: MemorySite(n) for n in ("c1", "c2", "c3")}
    sites["c1"].add("img-a", os.urandom(5 * KB))
    sites["c2"].add("img-b", os.urandom(7 * KB))
    d = daemon_for(tmp_path, sites)
    host, port = d.metrics.serve("127.0.0.1:0", pages=pages(d.live))
    try:
        yield d, f"http://{host}:{port}", sites
    finally:
        d.metrics.close()


def test_before_the_first_pass_the_page_says_it_is_waiting(
    served: tuple[Daemon, str, dict[str, MemorySite]],
) -> None:
    _, url, _ = served
    status, _, body = get(url + "/")
    assert status == 200 and "waiting for the first pass" in body.decode()
    doc = json.loads(get(url + "/status.json")[2])
    assert doc["images"] == [] and doc["as_of"] is None and doc["last_pass"] is None


def test_after_a_pass_page_and_json_show_what_status_json_would(
    served: tuple[Daemon, str, dict[str, MemorySite]], tmp_path: Path
) -> None:
    d, url, sites = served
    report = d.run_pass()
    assert report is not None and report.copied == 4
    doc = json.loads(get(url + "/status.json")[2])

    # what `imagesync status --json` prints now, from a fresh listing
    engine = Engine(config_for(tmp_path, list(sites)), sites=sites)
    inventories = engine.inventories()
    expected = status_document(plan(engine.rules, inventories, engine.site_names).assessments, {})
    assert doc["images"] == expected["images"] and doc["unreachable"] == {}
    assert doc["last_pass"]["copied"] == 4 and doc["last_pass"]["ok"] is True
    assert {r["target"] for r in doc["history"]} == {"c1", "c2", "c3"}
    assert all(r["started"].endswith("Z") for r in doc["history"])
    assert set(doc["sites"]) == {"c1", "c2", "c3"}
    assert all(s["reachable"] and s["last_listed"] for s in doc["sites"].values())

    status, headers, body = get(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    cells = parse(body.decode()).cells()
    assert len(cells) == 6
    for image in expected["images"]:
        for site, cell in image["sites"].items():
            shown = cells[(image["name"], site)]
            assert (shown["data-state"], shown["data-image-id"]) == ("current", cell["image_id"])


def test_a_site_down_is_unreachable_with_its_last_successful_listing_kept(
    served: tuple[Daemon, str, dict[str, MemorySite]],
) -> None:
    d, url, sites = served
    d.run_pass()
    first = json.loads(get(url + "/status.json")[2])["sites"]["c3"]["last_listed"]
    sites["c3"].faults.fail_list = True
    d.run_pass()
    doc = json.loads(get(url + "/status.json")[2])
    assert "c3" in doc["unreachable"]
    assert doc["sites"]["c3"]["reachable"] is False
    assert doc["sites"]["c3"]["last_listed"] == first  # the last success, not this failure
    assert {i["sites"]["c3"]["state"] for i in doc["images"]} == {"unreachable"}
    page = get(url + "/")[2].decode()
    assert "unreachable" in page and 'data-state="unreachable"' in page


def test_a_copy_in_flight_shows_its_progress_and_its_cells_in_flight(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    sites["c1"].add("img-a", os.urandom(10 * KB))
    engine = Engine(config_for(tmp_path, list(sites)), sites=sites)
    inventories = engine.inventories()
    p = plan(engine.rules, inventories, engine.site_names)
    (copy,) = [a for a in p.actions if isinstance(a, Copy)]
    now = [1000.0]
    live = LiveStatus(clock=lambda: now[0])
    live.observe_plan({"c1": "cloud", "c2": "store"}, inventories, p.assessments)
    live.copy_started(copy)
    live.copy_progress(2500)
    live.copy_progress(2500)
    now[0] += 12
    doc = live.document()
    (flight,) = doc["in_flight"]
    assert (flight["name"], flight["targets"], flight["bytes"], flight["size"]) == (
        "img-a",
        ["c2"],
        5 * KB,
        10 * KB,
    )
    assert flight["seconds"] == 12
    assert doc["images"][0]["sites"]["c2"]["state"] == "in-flight"
    page = render(doc)
    assert '<progress max="100" value="50">' in page
    assert 'data-site="c2" data-state="in-flight"' in page

    live.copy_finished(engine.executor.run_copy(copy))
    done = live.document()
    assert done["in_flight"] == []
    assert done["images"][0]["sites"]["c2"]["state"] == "missing"  # until the pass's results


HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


def test_everything_from_sites_is_escaped() -> None:
    """Names, ids, errors, owners, versions: a hostile string anywhere adds no element and
    no attribute; the only script is the page's own."""
    cell = {
        "state": HOSTILE,
        "required": False,
        "image_id": HOSTILE,
        "duplicates": [HOSTILE],
        "have": HOSTILE,
        "converted_to": HOSTILE,
    }
    doc: dict[str, Any] = {
        "generated": "2030-01-01T00:00:00Z",
        "as_of": HOSTILE,
        "images": [
            {
                "name": HOSTILE,
                "newest": {"version": HOSTILE, "sha512": HOSTILE, "origin": HOSTILE},
                "not_copyable": HOSTILE,
                "sites": {HOSTILE: cell},
                "ignored": [{"site": HOSTILE, "image_id": HOSTILE, "owner": HOSTILE}],
            }
        ],
        "unreachable": {HOSTILE: HOSTILE},
        "sites": {
            HOSTILE: {
                "kind": HOSTILE,
                "reachable": False,
                "error": HOSTILE,
                "images": HOSTILE,
                "last_listed": HOSTILE,
            }
        },
        "in_flight": [
            {
                "name": HOSTILE,
                "version": HOSTILE,
                "source": HOSTILE,
                "targets": [HOSTILE],
                "bytes": 1,
                "size": 2,
                "started": HOSTILE,
                "seconds": 1,
            }
        ],
        "last_pass": {"started": HOSTILE, "error": HOSTILE, "seconds": HOSTILE},
        "quarantined": [
            {
                "name": HOSTILE,
                "site": HOSTILE,
                "image_id": HOSTILE,
                "version": HOSTILE,
                "hidden": True,
                "reason": HOSTILE,
            }
        ],
        "saves": [
            {
                "cloud": HOSTILE,
                "server": HOSTILE,
                "server_name": HOSTILE,
                "name": HOSTILE,
                "state": HOSTILE,
                "image_id": HOSTILE,
                "error": HOSTILE,
            }
        ],
        "history": [
            {
                "started": HOSTILE,
                "name": HOSTILE,
                "source": HOSTILE,
                "target": HOSTILE,
                "result": HOSTILE,
                "error": HOSTILE,
                "bytes": None,
                "seconds": None,
            }
        ],
    }
    page = parse(render(doc))
    assert [t for t, _ in page.tags if t in ("script", "img")] == ["script"]
    assert page.raw["script"] == [SCRIPT]
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    assert any(a.get("data-name") == HOSTILE for _, a in page.tags)  # there, as text


def test_the_listener_is_read_only_and_the_csp_admits_only_the_page_s_own(
    served: tuple[Daemon, str, dict[str, MemorySite]],
) -> None:
    d, url, _ = served
    d.run_pass()
    status, headers, body = get(url + "/")
    csp = headers["Content-Security-Policy"]
    page = parse(body.decode())
    for kind, text in (("script", SCRIPT), ("style", STYLE)):
        assert page.raw[kind] == [text]
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in csp  # the browser runs it
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    # nothing from elsewhere: no src or href leaving the daemon
    for _, attrs in page.tags:
        for key in ("src", "href"):
            assert "//" not in (attrs.get(key) or "")
    assert get(url + "/", method="POST")[0] == 405
    assert get(url + "/status.json", method="DELETE")[0] == 405
    assert get(url + "/nosuch")[0] == 404
    status, headers, body = get(url + "/", method="HEAD")
    assert status == 200 and body == b""
    assert b"imagesync_copies_total" in get(url + "/metrics")[2]  # still there


def test_history_that_cannot_be_read_keeps_the_last_rows() -> None:
    live = LiveStatus()
    rows = [{"name": "img-a", "started": 0.0, "finished": 1.5, "result": "ok"}]
    live.read_history_from(lambda n: rows[:n])
    assert live.document()["history"] == [
        {
            "name": "img-a",
            "started": "1970-01-01T00:00:00Z",
            "finished": "1970-01-01T00:00:01.500000Z",
            "result": "ok",
        }
    ]

    def closed(n: int) -> list[dict[str, Any]]:
        raise RuntimeError("Cannot operate on a closed database.")

    live.read_history_from(closed)
    assert live.document()["history"][0]["name"] == "img-a"


def test_times_are_shown_with_their_age() -> None:
    doc: dict[str, Any] = {
        "generated": "2030-01-01T01:00:00Z",
        "as_of": "2030-01-01T00:59:30Z",
        "sites": {},
        "images": [],
    }
    page = render(doc)
    assert "2030-01-01 00:59:30Z</span> (30s ago)" in page


def test_a_converted_copy_shows_as_current_in_its_format() -> None:
    cell = {"state": "current", "required": True, "image_id": "abcdef0123", "duplicates": []}
    doc: dict[str, Any] = {
        "generated": "2030-01-01T01:00:00Z",
        "sites": {s: {"kind": "glance", "reachable": True} for s in ("ceph", "other")},
        "images": [
            {
                "name": "img",
                "newest": {"version": "2030-01-01T00:00:00Z", "sha512": None, "origin": "a:1"},
                "not_copyable": None,
                "sites": {"ceph": {**cell, "converted_to": "raw"}, "other": cell},
                "ignored": [],
            }
        ],
    }
    page = render(doc)
    assert page.count("raw, converted") == 1 and page.count('data-state="current"') == 2


def test_quarantines_and_saves_are_in_the_document_and_on_the_page() -> None:
    """A version a boot test quarantined and the last pass's save-on-shutdown outcomes are in
    ``/status.json`` (``quarantined`` as ``status --json`` has it) and on the page."""
    from imagesync.model import PROP_QUARANTINED, SiteInventory
    from imagesync.saving import SaveOutcome, SaveState
    from tests.unit.test_plan import img

    good = img("a", digest="1")
    bad = img("a", digest="2", hidden=True, props={PROP_QUARANTINED: "boot test on a failed"})
    inventories = {"a": SiteInventory("a", (good, bad))}
    live = LiveStatus()
    live.observe_plan({"a": "cloud"}, inventories, plan([], inventories, ["a"]).assessments)
    saved = SaveOutcome("a", "srv-1", "vm", "img", SaveState.SAVED, image_id="snap-1")
    live.observe_saves([saved.as_dict()])
    doc = live.document()
    (q,) = doc["quarantined"]
    assert (q["image_id"], q["hidden"], q["reason"]) == (bad.id, True, "boot test on a failed")
    assert doc["quarantined"] == status_document([], inventories)["quarantined"]
    assert doc["saves"] == [saved.as_dict()]
    page = parse(render(doc))
    assert any(t == "table" and a.get("id") == "quarantined" for t, a in page.tags)
    assert any(t == "tr" and a.get("data-server") == "srv-1" for t, a in page.tags)
    assert "boot test on a failed" in render(doc) and "snap-1" in render(doc)
