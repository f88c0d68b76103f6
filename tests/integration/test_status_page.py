"""The daemon's status page in a real headless browser (Debian's ``chromium``), against a
daemon syncing the lab's three clouds and its VOSpace store ``archive``.

The page's matrix (the ``data-*`` attributes of its cells, as the browser built the DOM) must
say what ``imagesync status --json`` says; its script must run under its own
Content-Security-Policy (it swaps the page's main part in after a refresh); screenshots are
saved as test artifacts: in the pytest tmp dir, and copied to ``test-artifacts/`` at the top of
the tree (git-ignored): ``status-page-in-flight.png`` while a throttled copy runs,
``status-page.png`` once a new version could not reach lab3 (its uploads cut: stale there, the
failures in the history).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from imagesync.lab import LabInfo
from tests.daemonproc import DaemonProcess
from tests.debpkg import ensure_tool
from tests.faultproxy import FaultProxy
from tests.integration.labcfg import random_bytes, uid, upload

pytestmark = pytest.mark.integration
MB = 1 << 20
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

Matrix = dict[tuple[str, str], tuple[str, str]]  # (name, site) -> (state, image id)


@pytest.fixture(scope="session")
def chromium() -> Path:
    return ensure_tool("/usr/bin/chromium", "chromium")


def browse(chromium: Path, tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless chromium run: no network beyond the URL, a profile of its own."""
    profile = tmp / f"profile-{uid()}"
    return subprocess.run(
        [
            str(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def dom(chromium: Path, tmp: Path, url: str, *args: str) -> str:
    return browse(chromium, tmp, url, "--dump-dom", *args).stdout


def screenshot(chromium: Path, tmp: Path, url: str, name: str) -> Path:
    shot = tmp / name
    browse(chromium, tmp, url, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000, "an empty screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    print(f"\nscreenshot: {shot} (and {ARTIFACTS / name})")
    return shot


class Cells(HTMLParser):
    """The matrix's cells, and <main>'s attributes, from the DOM the browser dumped."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix: Matrix = {}
        self.main: dict[str, str | None] = {}
        self.flights: list[str] = []
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "main":
            self.main = a
        if tag == "table":
            self._table = a.get("id")
        if tag == "td" and "data-state" in a:
            key = (str(a["data-name"]), str(a["data-site"]))
            self.matrix[key] = (str(a["data-state"]), str(a["data-image-id"]))
        if tag == "tr" and self._table == "in-flight" and "data-name" in a:
            self.flights.append(str(a["data-name"]))


def cells(html: str) -> Cells:
    p = Cells()
    p.feed(html)
    return p


def status_json(config: Path) -> Matrix:
    out = subprocess.run(
        [sys.executable, "-m", "imagesync.cli", "-c", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return {
        (i["name"], s): (c["state"], c["image_id"] or "")
        for i in json.loads(out)["images"]
        for s, c in i["sites"].items()
    }


def page_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status.json", timeout=30) as resp:
        doc: dict[str, Any] = json.load(resp)
    return doc


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting until {what}")


def agree(
    chromium: Path,
    tmp: Path,
    url: str,
    config: Path,
    want: Callable[[Matrix], bool],
    attempts: int = 8,
) -> Matrix:
    """The page's matrix as the browser shows it, once it equals ``status --json``'s and is
    what the test wants (a pass may change a cell between the two reads, or between the wait
    that came before and now: read both again, a few times)."""
    page: Matrix = {}
    expected: Matrix = {}
    for _ in range(attempts):
        expected = status_json(config)
        page = cells(dom(chromium, tmp, url + "/")).matrix
        if page == expected and want(page):
            return page
        time.sleep(1)
    assert page == expected
    assert want(page), page
    return page


@pytest.fixture
def lab3_proxy(lab: LabInfo) -> Iterator[FaultProxy]:
    port = urlparse(lab.cloud("lab3").glance_url).port
    assert port is not None
    proxy = FaultProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()


def write_config(lab: LabInfo, tmp_path: Path, prefix: str, lab3_glance: str, port: int) -> Path:
    """The lab's own generated configuration (3 clouds, the VOSpace store ``archive``), for
    this test's names only, with lab3 reached through a fault proxy and a metrics port."""
    doc = yaml.safe_load(lab.config_file.read_text())
    doc.update(
        state_dir=str(tmp_path / "state"),
        poll_interval="2s",
        transfer_retries=0,
        metrics_listen=f"127.0.0.1:{port}",
        images=[{"name": f"{prefix}-*", "clouds": "all", "store": "archive"}],
    )
    doc["clouds"]["lab3"] = {"cloud": "lab3", "endpoint_override": lab3_glance, "timeout": "10s"}
    assert "archive" in doc["stores"]
    path = tmp_path / "imagesync.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refuse_new_images(request_line: bytes) -> bytes | None:
    """Glance answering 403 to every image creation (a quota reached), nothing else."""
    if request_line.startswith(b"POST /v2/images "):
        body = b"403 Forbidden: image quota exceeded"
        head = f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
        return head.encode() + b"\r\nConnection: close\r\n\r\n" + body
    return None


def test_the_status_page_shows_what_status_json_says(
    lab: LabInfo, tmp_path: Path, chromium: Path, lab3_proxy: FaultProxy
) -> None:
    prefix = uid("page")
    a, b, slow = f"{prefix}-alpha", f"{prefix}-beta", f"{prefix}-slow"
    upload(lab, "lab1", a, random_bytes(MB))
    upload(lab, "lab2", b, random_bytes(MB))
    upload(lab, "lab3", slow, random_bytes(12 * MB))
    lab3_proxy.plan.download_rate = 1.0 * MB  # reading `slow` from lab3 takes ~12 s

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = write_config(lab, tmp_path, prefix, lab3_proxy.url, port)
    url = f"http://127.0.0.1:{port}"
    with DaemonProcess(config) as daemon:
        daemon.wait_event("metrics.listening")

        # 1. a copy in flight: its row, its progress, its target cells
        wait_for(
            lambda: any(f["name"] == slow and f["bytes"] > 0 for f in page_json(url)["in_flight"]),
            120,
            "the copy of the slow image is under way",
        )
        shown = cells(dom(chromium, tmp_path, url + "/"))
        assert slow in shown.flights
        assert {st for (n, _), (st, _) in shown.matrix.items() if n == slow} >= {"in-flight"}
        screenshot(chromium, tmp_path, url + "/", "status-page-in-flight.png")

        # 2. settled: every cell current, as status --json says
        def settled() -> bool:
            doc = page_json(url)
            states = {c["state"] for i in doc["images"] for c in i["sites"].values()}
            return len(doc["images"]) == 3 and states == {"current"} and not doc["in_flight"]

        lab3_proxy.plan.download_rate = 0
        wait_for(settled, 180, "all three names are current everywhere")
        matrix = agree(
            chromium, tmp_path, url, config, lambda m: {st for st, _ in m.values()} == {"current"}
        )
        assert len(matrix) == 3 * 4  # three names x (three clouds + the store)
        assert {site for _, site in matrix} == {"lab1", "lab2", "lab3", "archive"}

        # 3. a new version that cannot reach lab3 (it refuses every new image at once, so no
        # half-made upload is ever there to list): stale there
        lab3_proxy.plan.on_request = refuse_new_images
        upload(lab, "lab1", a, random_bytes(MB))

        def stale_on_lab3() -> bool:
            doc = page_json(url)
            cell = {i["name"]: i["sites"] for i in doc["images"]}[a]
            failed = any(r["name"] == a and r["result"] != "ok" for r in doc["history"])
            behind = cell["lab3"]["state"] == "stale" and cell["lab2"]["state"] == "current"
            return behind and failed

        wait_for(stale_on_lab3, 180, f"{a} is stale on lab3 and a failure is recorded")
        matrix = agree(
            chromium,
            tmp_path,
            url,
            config,
            lambda m: m[(a, "lab3")][0] == "stale" and m[(a, "archive")][0] == "current",
        )
        assert matrix[(b, "lab3")][0] == "current"

        # the page's own script runs (the CSP admits it): after a refresh it swapped <main>
        refreshed = cells(dom(chromium, tmp_path, url + "/", "--virtual-time-budget=7000"))
        assert refreshed.main.get("data-refreshes") == "1", refreshed.main
        assert refreshed.matrix  # and the swapped-in part has the matrix

        shot = screenshot(chromium, tmp_path, url + "/", "status-page.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        code, _ = daemon.terminate()
        assert code == 0
