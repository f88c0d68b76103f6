"""The server-side copy path (engine/serverside.py): when a target fetches from the source's
URL itself, when the bytes are relayed instead, and what is left when an import goes wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from imagesync.engine.serverside import (
    RELAY,
    WEB_DOWNLOAD,
    WhyRelay,
    copy_image,
    expected_sha512,
    verify_import,
    why_relay,
)
from imagesync.errors import Cancelled, SiteError
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_STATE, ImageRecord, NewImage
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Capabilities, SharedURL
from imagesync.sites.memory import MemorySite
from imagesync.transfer import CopyResult, ErrorKind, new_image_for

DATA = os.urandom(50_000)
SHA = hashlib.sha512(DATA).hexdigest()
SECRET = "s3cr3t-grant"
FAST = RetryPolicy(attempts=2, base=0.0, cap=0.0)


class SharingSite(MemorySite):
    """A store that hands out URLs (with a grant in them) for its images."""

    def __init__(self, name: str, *, serve: Callable[[bytes], bytes] = lambda b: b) -> None:
        super().__init__(name)
        self.serve = serve
        self.shared = 0

    def share_url(self, image: ImageRecord) -> SharedURL | None:
        self.shared += 1
        url = f"mem://{self.name}/preauth:{SECRET}/{image.id}"
        return SharedURL(url, f"mem://{self.name}/preauth:…/{image.id}", image.size or 0, SECRET)

    def fetch(self, url: str) -> bytes:
        return self.serve(self.data(url.rsplit("/", 1)[1]))


class ImportingSite(MemorySite):
    """A cloud that may fetch an image from a URL itself (counts its probes and imports)."""

    def __init__(
        self, name: str, source: SharingSite, *, offered: bool = True, fail: bool = False
    ) -> None:
        super().__init__(name)
        self.source = source
        self.offered = offered
        self.fail = fail
        self.probes = 0
        self.imports = 0
        self.stop_during_import: threading.Event | None = None

    def imports_urls(self) -> bool:
        self.probes += 1
        return self.offered

    def create_for_import(self, new: NewImage) -> str:
        return self.create(new).image_id

    def import_url(
        self, image_id: str, url: SharedURL, should_stop: Callable[[], bool]
    ) -> ImageRecord:
        self.imports += 1
        if self.stop_during_import is not None:
            self.stop_during_import.set()
        if should_stop():
            raise Cancelled("cancelled")
        if self.fail:
            raise SiteError(f"import of {url.url} refused (400)", site=self.name)
        data = self.source.fetch(url.url)
        stored = self.images[image_id]
        stored.data[:] = data
        stored.rec = stored.rec.with_(
            status="active",
            size=len(data),
            hashes={"sha512": hashlib.sha512(data).hexdigest()},
        )
        return stored.rec


class Watcher:
    """The leases an upload watcher holds."""

    def __init__(self) -> None:
        self.held: set[tuple[str, str]] = set()
        self.started_count = 0

    def started(self, site: str, image_id: str) -> None:
        self.started_count += 1
        self.held.add((site, image_id))

    def ended(self, site: str, image_id: str) -> None:
        self.held.discard((site, image_id))


def _run(
    src: SharingSite, targets: list[MemorySite], cancel: threading.Event | None = None
) -> tuple[ImageRecord, Watcher, CopyResult]:
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    watcher = Watcher()
    result = copy_image(
        src,
        rec,
        [(t, new) for t in targets],
        policy=FAST,
        sleep=lambda s: None,
        cancel=cancel,
        watcher=watcher,
    )
    return rec, watcher, result


def _only(site: MemorySite) -> bytes:
    (stored,) = site.images.values()
    assert stored.published and not stored.rec.hidden
    assert PROP_STATE not in stored.rec.properties
    return bytes(stored.data)


def test_the_decision_needs_both_abilities_and_a_known_sha512_and_size() -> None:
    src = SharingSite("src")
    tgt = ImportingSite("tgt", src)
    plain = MemorySite("plain")
    assert why_relay(src.capabilities, tgt.capabilities, SHA, 10) is None
    assert why_relay(plain.capabilities, tgt.capabilities, SHA, 10) is WhyRelay.SOURCE_CANNOT_SHARE
    assert why_relay(src.capabilities, plain.capabilities, SHA, 10) is WhyRelay.TARGET_CANNOT_IMPORT
    assert why_relay(src.capabilities, tgt.capabilities, None, 10) is WhyRelay.NO_SHA512
    assert why_relay(src.capabilities, tgt.capabilities, SHA, None) is WhyRelay.NO_SIZE
    assert Capabilities.fill(plain).url_import is None


def test_expected_sha512_is_none_when_the_site_and_the_provenance_disagree() -> None:
    src = SharingSite("src")
    rec = src.add("img", DATA)
    assert expected_sha512(rec, rec.version) == SHA
    claimed = dataclasses.replace(rec.version, sha512="0" * 128)
    assert expected_sha512(rec, claimed) is None
    assert expected_sha512(rec.with_(hashes={}), claimed) == "0" * 128


def test_verify_import_wants_the_same_sha512_size_and_an_active_image() -> None:
    rec = SharingSite("s").add("img", DATA)
    assert verify_import(rec, SHA, len(DATA)) == []
    assert verify_import(rec, "f" * 128, len(DATA))
    assert verify_import(rec, SHA, len(DATA) + 1)
    assert verify_import(rec.with_(hashes={"md5": "x"}), SHA, len(DATA))
    assert verify_import(rec.with_(status="queued"), SHA, len(DATA))


def test_a_target_that_imports_gets_the_image_without_a_byte_through_imagesync() -> None:
    src = SharingSite("src")
    tgt = ImportingSite("tgt", src)
    rec, watcher, result = _run(src, [tgt])
    assert result.ok and result.bytes_read == 0 and src.reads == 0
    (tr,) = result.targets
    assert tr.via == WEB_DOWNLOAD and tr.image is not None
    assert _only(tgt) == DATA
    (stored,) = tgt.images.values()
    assert stored.rec.properties[PROP_SHA512] == SHA
    assert stored.rec.properties[PROP_ORIGIN] == rec.ref
    assert result.sha512 == SHA
    assert watcher.started_count == 1 and not watcher.held


def test_the_probe_is_asked_once_per_copy_and_the_url_once_for_all_targets() -> None:
    src = SharingSite("src")
    a, b = ImportingSite("a", src), ImportingSite("b", src)
    _, _, result = _run(src, [a, b])
    assert result.ok
    assert src.shared == 1 and a.imports == b.imports == 1


def test_an_import_of_other_bytes_is_deleted_and_the_copy_relayed() -> None:
    src = SharingSite("src", serve=lambda b: bytes([b[0] ^ 1]) + b[1:])
    tgt = ImportingSite("tgt", src)
    with capture_logs() as logs:
        _, watcher, result = _run(src, [tgt])
    assert result.ok and result.bytes_read == len(DATA)
    (tr,) = result.targets
    assert tr.via == RELAY
    assert _only(tgt) == DATA  # the bad import is gone; only the relayed copy is there
    assert not watcher.held
    (fallback,) = [e for e in logs if e["event"] == "copy.server_side_fallback"]
    assert fallback["kind"] is ErrorKind.INTEGRITY and SECRET not in fallback["error"]


def test_a_failed_import_is_deleted_relayed_and_its_error_hides_the_grant() -> None:
    src = SharingSite("src")
    tgt = ImportingSite("tgt", src, fail=True)
    with capture_logs() as logs:
        _, watcher, result = _run(src, [tgt])
    assert result.ok and _only(tgt) == DATA
    assert result.targets[0].via == RELAY
    assert SECRET not in repr(logs) and "preauth:…" in repr(logs)
    assert not watcher.held


@pytest.mark.parametrize("offered", [False])
def test_a_target_without_web_download_is_relayed_and_no_url_is_asked(offered: bool) -> None:
    src = SharingSite("src")
    tgt = ImportingSite("tgt", src, offered=offered)
    plain = MemorySite("plain")
    _, _, result = _run(src, [tgt, plain])
    assert result.ok and src.shared == 0 and tgt.imports == 0
    assert [t.via for t in result.targets] == [RELAY, RELAY]
    assert src.reads == 1  # one read for both relayed targets
    assert _only(tgt) == DATA and _only(plain) == DATA


def test_mixed_targets_keep_their_order_and_only_the_relayed_bytes_count() -> None:
    src = SharingSite("src")
    plain, tgt = MemorySite("plain"), ImportingSite("tgt", src)
    _, _, result = _run(src, [plain, tgt])
    assert [t.site for t in result.targets] == ["plain", "tgt"]
    assert [t.via for t in result.targets] == [RELAY, WEB_DOWNLOAD]
    assert result.bytes_read == len(DATA) and src.reads == 1


def test_a_cancelled_import_leaves_nothing() -> None:
    src = SharingSite("src")
    tgt = ImportingSite("tgt", src)
    cancel = threading.Event()
    tgt.stop_during_import = cancel
    _, watcher, result = _run(src, [tgt], cancel=cancel)
    (tr,) = result.targets
    assert tr.error_kind is ErrorKind.CANCELLED and not tgt.images and not watcher.held


def test_a_sharedurl_never_shows_its_grant() -> None:
    url = SharedURL("http://h/data/preauth:abc123/x", "http://h/data/preauth:…/x", 3, "abc123")
    assert "abc123" not in repr(url)
    assert url.scrub(f"GET {url.url} failed; token abc123") == (
        "GET http://h/data/preauth:…/x failed; token …"
    )
