"""Settling a copy's targets once every byte is written: each target's upload is finished,
what it says it stored is compared with the bytes read, and it is published or removed. Each
target settles in a thread of its own, so that a slow upload's ``finish`` (its site still
taking the last bytes) does not hold up a fast one's publish. ``imagesync.transfer`` drives
it; a failed publish that may have happened all the same is read again, never deleted once
published (recovery's rule, here too).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence

import structlog

from imagesync.errors import Cancelled, IntegrityError, NotFound
from imagesync.model import PROP_SHA512, ImageRecord, hashes_agree
from imagesync.reading import read_back
from imagesync.uploads import ErrorKind, Live, cancel_rest, fail, kind_of, log_failed, set_error

log = structlog.get_logger("imagesync.transfer")


def settle_all(
    live: Sequence[Live],
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None,
) -> bool:
    """Settle every target, each in a thread of its own: a slow upload's ``finish`` (its site
    still taking the last bytes) must not hold up a fast one's publish. False when cancelled
    (the targets not settled yet were aborted)."""
    if len(live) == 1:
        return _settle_one(live[0], got, nbytes, cancel, lease_expired)
    outcome: dict[int, bool | BaseException] = {}

    def one(i: int) -> None:
        try:
            outcome[i] = _settle_one(live[i], got, nbytes, cancel, lease_expired)
        except BaseException as exc:  # a bug in the watcher: raised again below, once every
            outcome[i] = exc  # other target is settled (they are independent)

    threads = [
        threading.Thread(target=one, args=(i,), daemon=True, name=f"settle-{lv.site.name}")
        for i, lv in enumerate(live)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for value in outcome.values():
        if isinstance(value, BaseException):
            raise value
    return all(outcome.values())


def _settle_one(
    lv: Live,
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None,
) -> bool:
    if cancel is not None and cancel.is_set():
        # Not finished yet: abort rather than wait for the site to settle the upload.
        # Targets already published stay published (and are reported so).
        cancel_rest([lv])
        return False
    # finish the upload, verify what it stored, publish it or remove it
    stored = _finish(lv)
    return (
        True
        if stored is None
        else _verify_and_publish(lv, stored, got, nbytes, cancel, lease_expired)
    )


def _finish(lv: Live) -> ImageRecord | None:
    """The target's unpublished record once it stored every byte; None when it failed (the
    target is failed and aborted)."""
    try:
        return lv.writer.finish()
    except Exception as exc:
        fail(lv, exc, kind_of(exc))
        return None


def _verify_and_publish(
    lv: Live,
    stored: ImageRecord,
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None = None,
) -> bool:
    """Compare what the target says it stored with the bytes read (``got``: their digests),
    then publish it or remove it. Returns False when cancelled."""
    try:
        agree = hashes_agree(got, stored.hashes)
        if stored.size is not None and stored.size != nbytes:
            agree = False
        if agree is None:
            agree = read_back(lv.site, stored, got["sha512"], cancel)
    except Cancelled:
        lv.remove(stored.id)
        lv.result.error, lv.result.error_kind = "cancelled", ErrorKind.CANCELLED
        return False
    except Exception as exc:
        lv.remove(stored.id)
        set_error(lv.result, exc, prefix="reading back: ")
        log_failed(lv.site.name, exc, kind_of(exc))
        return True
    if not agree:
        err = IntegrityError(
            f"{lv.site.name}: stored image {stored.id} does not match the "
            f"bytes sent (sha512 {got['sha512'][:16]}…): removed"
        )
        lv.remove(stored.id)
        lv.result.error, lv.result.error_kind = str(err), ErrorKind.INTEGRITY
        log.warning(
            "copy.target_failed", site=lv.site.name, error=str(err), kind=ErrorKind.INTEGRITY.value
        )
        return True
    if lease_expired is not None and lease_expired():
        # Another imagesync may remove an upload whose lease (its marker) has expired: never
        # publish one, it may be half-deleted by now (see engine.marker).
        lv.remove(stored.id)
        lv.result.error = f"{lv.site.name}: upload {stored.id} outlived its lease: removed"
        lv.result.error_kind = ErrorKind.SITE
        return True
    try:
        lv.result.image = lv.site.publish(stored.id, {PROP_SHA512: got["sha512"]})
    except Exception as exc:
        published = _failed_publish(lv, stored.id, exc)
        if published is None:
            return True
        lv.result.image = published
    lv.result.ok = True
    with contextlib.suppress(Exception):  # published: a lease left behind is only re-checked
        lv.watcher.ended(lv.site.name, stored.id)
    return True


def _failed_publish(lv: Live, image_id: str, exc: Exception) -> ImageRecord | None:
    """``publish`` raised: the record if the image was published all the same, else None
    (the target's error set).

    A failed publish may have happened: the site acted and its answer was lost (a connection
    cut after Glance applied the update), or reading the image back afterwards failed. A
    published copy is never deleted (recovery's rule, here too), so the image is read again:
    still an upload, it is removed; published, the copy stands; when even that read fails,
    it is left marked and leased for recovery, which re-reads it under the lock."""
    try:
        now: ImageRecord | None = lv.site.get_image(image_id)
    except NotFound:
        now = None
    except Exception as err:
        set_error(lv.result, exc)
        log.warning(
            "copy.publish_unknown",
            site=lv.site.name,
            image_id=image_id,
            error=str(exc),
            reread_error=str(err),
        )
        return None
    if now is not None and not now.in_progress:
        log.info(
            "copy.published_despite_error", site=lv.site.name, image_id=image_id, error=str(exc)
        )
        return now
    if now is not None:
        lv.remove(image_id)
    else:
        lv.watcher.ended(lv.site.name, image_id)
    set_error(lv.result, exc)
    log_failed(lv.site.name, exc, kind_of(exc))
    return None
