"""Server-side copies: a target that can fetch an image itself (Glance's ``web-download``) from a
URL the source hands out (a VOSpace pre-authorized endpoint) gets it that way, so the bytes
never pass through imagesync; every other target, and every one whose server-side copy did
not verify, gets the relayed copy (:func:`imagesync.transfer.copy_image`).

The engine chooses the path before the relay starts (rclone's server-side ``Copy``, tried
before the streamed one): :func:`why_relay` is the pure part of the decision (what the sites'
capabilities and the version allow, no I/O), then the target is asked once whether it offers
URL imports now (a lazy probe it caches) and the source once per copy for a URL.

A server-side copy is the relay's two-phase write with the upload done by the target: the
same invisible, marked placeholder (``create_for_import``, the same provenance and upload
marker, leased while it exists), the import, then verification stricter than Glance's own
(web-download checks no hash, and a source that closes early yields an *active*, truncated
image): the stored sha512 and size must equal the version's. Only then is it published. A
failed, timed-out or mismatching import is deleted and that target falls back to the relay;
a delete that fails leaves the placeholder hidden, marked and leased, for recovery.
Messages never contain the URL's secret part (``SharedURL.shown`` stands in for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import structlog

from imagesync.errors import Cancelled, IntegrityError, NotFound, SiteError
from imagesync.model import PROP_SHA512, ImageRecord, NewImage, Version
from imagesync.sites.base import Capabilities, SharedURL, Site, URLImporting
from imagesync.transfer import CopyResult, ErrorKind, TargetResult, UploadWatcher
from imagesync.transfer import copy_image as relay_copy
from imagesync.uploads import NoWatcher

log = structlog.get_logger("imagesync.serverside")

#: how a target got its copy (``TargetResult.via``)
RELAY = "relay"
WEB_DOWNLOAD = "web-download"


class WhyRelay(StrEnum):
    """Why a target gets the relayed copy rather than a server-side one."""

    SOURCE_CANNOT_SHARE = "the source cannot hand out URLs"
    TARGET_CANNOT_IMPORT = "the target cannot import from a URL"
    NO_SHA512 = "the version's sha512 is not known, so an import could not be verified"
    NO_SIZE = "the image's size is not known, so an import could not be verified"
    NOT_OFFERED = "the target does not offer web-download (or server_side: false)"
    NO_URL = "the source has no URL for this image"
    FAILED = "the server-side copy failed"


def expected_sha512(image: ImageRecord, version: Version) -> str | None:
    """The sha512 an import must match: the version's, or the source's own; None when
    neither is known or they disagree (then nothing can be trusted: relay, which reports it)."""
    own = image.hashes.get("sha512", "").lower() or None
    claimed = version.sha512.lower() if version.sha512 else None
    if own and claimed and own != claimed:
        return None
    return claimed or own


def why_relay(
    source: Capabilities, target: Capabilities, sha512: str | None, size: int | None
) -> WhyRelay | None:
    """The static part of the choice (no I/O): None when a server-side copy may be tried."""
    if source.share_url is None:
        return WhyRelay.SOURCE_CANNOT_SHARE
    if target.url_import is None:
        return WhyRelay.TARGET_CANNOT_IMPORT
    if not sha512:
        return WhyRelay.NO_SHA512
    if size is None:
        return WhyRelay.NO_SIZE
    return None


def verify_import(stored: ImageRecord, sha512: str, size: int) -> list[str]:
    """What is wrong with an imported image, or [] when it holds exactly the version."""
    problems = []
    got = stored.hashes.get("sha512")
    if got is None:
        problems.append("the target reports no sha512 of what it imported")
    elif got.lower() != sha512:
        problems.append(f"sha512 {got[:16]}… is not the version's {sha512[:16]}…")
    if stored.size != size:
        problems.append(f"size {stored.size} is not the version's {size}")
    if stored.status != "active":
        problems.append(f"status is {stored.status}")
    return problems


def copy_image(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    *,
    cancel: threading.Event | None = None,
    watcher: UploadWatcher | None = None,
    lease_expired: Callable[[], bool] | None = None,
    **relay: Any,
) -> CopyResult:
    """Copy ``image`` to every target: server-side where the sites allow it and it verifies,
    by :func:`imagesync.transfer.copy_image` (given ``relay``'s other arguments) elsewhere.
    ``result.bytes_read`` counts only what passed through imagesync."""
    started = time.monotonic()
    version = image.version
    sha512 = expected_sha512(image, version)
    done, rest = _server_side(
        source, image, targets, sha512, cancel, watcher or NoWatcher(), lease_expired
    )
    if rest:
        result = relay_copy(
            source,
            image,
            rest,
            cancel=cancel,
            watcher=watcher,
            lease_expired=lease_expired,
            **relay,
        )
    else:
        result = CopyResult(source=image, version=version)
    relayed = {t.site: t for t in result.targets}
    result.targets = [done.get(s.name) or relayed[s.name] for s, _ in targets]
    if result.sha512 is None and any(t.ok for t in done.values()):
        result.sha512 = sha512
    result.seconds = time.monotonic() - started
    return result


def _server_side(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    sha512: str | None,
    cancel: threading.Event | None,
    watch: UploadWatcher,
    lease_expired: Callable[[], bool] | None,
) -> tuple[dict[str, TargetResult], list[tuple[Site, NewImage]]]:
    """Copy server-side to every target that allows it: the results of those that got their
    copy (or were cancelled), and the targets left for the relay."""
    done: dict[str, TargetResult] = {}
    rest: list[tuple[Site, NewImage]] = []
    url: SharedURL | None = None
    asked = False
    for site, new in targets:
        why = why_relay(source.capabilities, site.capabilities, sha512, image.size)
        importer = site.capabilities.url_import
        if why is None and importer is not None and not _offers(site, importer):
            why = WhyRelay.NOT_OFFERED
        if why is None and not asked:
            asked = True
            url = _share(source, image)
        if why is None and url is None:
            why = WhyRelay.NO_URL
        if why is None and importer is not None and url is not None and sha512 is not None:
            assert image.size is not None
            res = _pull(site, importer, new, url, sha512, image.size, cancel, watch, lease_expired)
            if res.ok or res.error_kind is ErrorKind.CANCELLED:
                done[site.name] = res
                continue
            why = WhyRelay.FAILED
            log.warning(
                "copy.server_side_fallback",
                image=image.name,
                target=site.name,
                error=res.error,
                kind=res.error_kind,
            )
        log.debug("copy.relay", image=image.name, target=site.name, reason=why)
        rest.append((site, new))
    return done, rest


def _offers(site: Site, importer: URLImporting) -> bool:
    """The target's (cached) answer; a bug in asking it means a relay, not a failed copy."""
    try:
        return importer.imports_urls()
    except Exception as exc:
        log.error("copy.import_probe_crashed", site=site.name, error=str(exc), exc_info=True)
        return False


def _share(source: Site, image: ImageRecord) -> SharedURL | None:
    share = source.capabilities.share_url
    if share is None:
        return None
    try:
        url = share(image)
    except SiteError as exc:
        log.info("copy.no_shared_url", image=image.ref, error=str(exc))
        return None
    except Exception as exc:  # a bug: the relay still copies
        log.error("copy.share_crashed", image=image.ref, error=str(exc), exc_info=True)
        return None
    if url is not None and image.size is not None and url.size != image.size:
        log.info("copy.no_shared_url", image=image.ref, error="the URL serves another size")
        return None
    return url


def _pull(
    site: Site,
    importer: URLImporting,
    new: NewImage,
    url: SharedURL,
    sha512: str,
    size: int,
    cancel: threading.Event | None,
    watcher: UploadWatcher,
    lease_expired: Callable[[], bool] | None,
) -> TargetResult:
    """One server-side copy to ``site``: placeholder, import, verify, publish (or delete)."""
    res = TargetResult(site=site.name, attempts=1, via=WEB_DOWNLOAD)
    try:
        image_id = importer.create_for_import(new)
    except Exception as exc:
        return _failed(res, exc, url)
    try:
        watcher.started(site.name, image_id)
    except Exception as exc:  # the lease could not be recorded: leave nothing unleased
        _delete(site, image_id, watcher, leased=False)
        return _failed(res, exc, url)

    def stop() -> bool:
        return cancel is not None and cancel.is_set()

    try:
        stored = importer.import_url(image_id, url, stop)
    except Cancelled:
        _delete(site, image_id, watcher)
        res.error, res.error_kind = "cancelled", ErrorKind.CANCELLED
        return res
    except Exception as exc:
        _delete(site, image_id, watcher)
        return _failed(res, exc, url)
    problems = verify_import(stored, sha512, size)
    if problems:
        _delete(site, image_id, watcher)
        err = IntegrityError(
            f"{site.name}: imported image {image_id} from {url.shown}: "
            + "; ".join(problems)
            + ": removed"
        )
        return _failed(res, err, url)
    if lease_expired is not None and lease_expired():
        _delete(site, image_id, watcher)
        res.error = f"{site.name}: import {image_id} outlived its lease: removed"
        res.error_kind = ErrorKind.SITE
        return res
    try:
        res.image = site.publish(image_id, {PROP_SHA512: sha512})
    except Exception as exc:
        published = _failed_publish(site, image_id, watcher)
        if published is None:
            return _failed(res, exc, url)
        res.image = published
    res.ok = True
    watcher.ended(site.name, image_id)
    log.info("copy.server_side", target=site.name, image_id=image_id, source=url.shown)
    return res


def _failed(res: TargetResult, exc: BaseException, url: SharedURL) -> TargetResult:
    res.ok = False
    res.error = url.scrub(str(exc))
    res.error_kind = (
        ErrorKind.INTEGRITY
        if isinstance(exc, IntegrityError)
        else ErrorKind.SITE
        if isinstance(exc, SiteError)
        else ErrorKind.UNEXPECTED
    )
    if res.error_kind is ErrorKind.UNEXPECTED:
        log.error("copy.server_side_crashed", site=res.site, error=res.error, exc_info=True)
    return res


def _delete(site: Site, image_id: str, watcher: UploadWatcher, *, leased: bool = True) -> None:
    """Remove a placeholder; when that fails it stays hidden, marked and leased: recovery
    removes it (never a visible broken image)."""
    try:
        site.delete(image_id)
    except Exception as exc:
        log.warning("cleanup.delete_failed", site=site.name, image_id=image_id, error=str(exc))
        return
    if leased:
        watcher.ended(site.name, image_id)


def _failed_publish(site: Site, image_id: str, watcher: UploadWatcher) -> ImageRecord | None:
    """``publish`` raised: it may have happened all the same (an answer lost). Read it back:
    published, the copy stands; still an upload, it is removed; unreadable, it stays leased."""
    try:
        now = site.get_image(image_id)
    except NotFound:
        watcher.ended(site.name, image_id)
        return None
    except Exception:
        return None
    if not now.in_progress:
        return now
    _delete(site, image_id, watcher)
    return None
