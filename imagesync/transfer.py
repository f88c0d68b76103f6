"""Streaming copy: one reader, N writers, hashing on the fly, verify, publish or clean up.

The source is read once; each chunk is hashed (sha512 + md5) and handed to every live target
writer (bounded queues, so memory does not grow with image size). When the stream ends the
digests are compared with everything the source claimed (its own hashes, size, provenance)
and with what each target reports it stored. A target that fails or mismatches is deleted
(nothing half-made is left) while the others carry on; only verified copies are published,
with the provenance marks (``imagesync.origin``, ``.version``, ``.sha512``).

Transient failures are retried with the shared policy (``retry.py``): a failed target alone
is re-sent from a fresh read of the source; a failed source read retries every target.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog

from imagesync.errors import IntegrityError, SiteError, TransientError
from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_VERSION,
    ImageRecord,
    NewImage,
    Version,
    format_time,
    hashes_agree,
)
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Site, Writer

log = structlog.get_logger("imagesync.transfer")

Progress = Callable[[int], None]


@dataclass
class TargetResult:
    """What happened on one target."""

    site: str
    ok: bool = False
    image: ImageRecord | None = None
    error: str | None = None
    error_kind: str | None = None  # "integrity", "transient", "site"
    attempts: int = 0


@dataclass
class CopyResult:
    """What one copy of one image version did, target by target."""

    source: ImageRecord
    version: Version
    bytes_read: int = 0
    seconds: float = 0.0
    sha512: str | None = None
    targets: list[TargetResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.targets)


def new_image_for(source: ImageRecord, version: Version, visibility: str) -> NewImage:
    """What a copy of ``source`` looks like on a target, before its bytes are verified."""
    props = source.user_properties()
    props[PROP_ORIGIN] = version.origin
    props[PROP_VERSION] = format_time(version.time)
    return NewImage(
        name=source.name,
        disk_format=source.disk_format,
        container_format=source.container_format,
        min_disk=source.min_disk,
        min_ram=source.min_ram,
        properties=props,
        size=source.size,
        visibility=visibility,
    )


def _expected(source: ImageRecord, version: Version) -> dict[str, str]:
    exp = {k: v.lower() for k, v in source.hashes.items() if k in ("sha512", "md5")}
    if version.sha512:
        if exp.get("sha512") and exp["sha512"] != version.sha512:
            # The site's own hash and the provenance claim disagree: trust nothing.
            exp["sha512-claimed"] = version.sha512
        else:
            exp["sha512"] = version.sha512
    return exp


class _Live:
    def __init__(self, site: Site, writer: Writer, result: TargetResult) -> None:
        self.site = site
        self.writer = writer
        self.result = result


def _fail(live: _Live, exc: BaseException, kind: str) -> None:
    live.result.ok = False
    live.result.error = str(exc)
    live.result.error_kind = kind
    live.writer.abort()
    log.warning("copy.target_failed", site=live.site.name, error=str(exc), kind=kind)


def _attempt(
    source: Site,
    image: ImageRecord,
    version: Version,
    targets: Sequence[tuple[Site, NewImage]],
    progress: Progress | None,
    result: CopyResult,
) -> list[TargetResult]:
    """One pass: stream once to every target. Raises TransientError when the source failed."""
    results = [TargetResult(site=site.name) for site, _ in targets]
    live: list[_Live] = []
    for (site, new), res in zip(targets, results, strict=True):
        res.attempts += 1
        try:
            live.append(_Live(site, site.create(new), res))
        except SiteError as exc:
            res.error, res.error_kind = str(exc), _kind(exc)
    if not live:
        return results

    sha512 = hashlib.sha512()
    md5 = hashlib.md5(usedforsecurity=False)
    nbytes = 0
    stream: Iterator[bytes] | None = None
    try:
        stream = source.open(image)
        for chunk in stream:
            sha512.update(chunk)
            md5.update(chunk)
            nbytes += len(chunk)
            for lv in list(live):
                try:
                    lv.writer.write(chunk)
                except SiteError as exc:
                    _fail(lv, exc, _kind(exc))
                    live.remove(lv)
            if progress is not None:
                progress(len(chunk))
            if not live:
                break
    except BaseException as exc:
        for lv in live:
            lv.writer.abort()
        if isinstance(exc, SiteError):
            for lv in live:
                lv.result.error, lv.result.error_kind = str(exc), "source"
            raise TransientError(f"reading {image.ref}: {exc}", site=source.name) from exc
        raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    result.bytes_read = max(result.bytes_read, nbytes)
    if not live:
        return results

    got = {"sha512": sha512.hexdigest(), "md5": md5.hexdigest()}
    result.sha512 = got["sha512"]
    # 1. Did the source deliver the bytes it claims to hold?
    problems = []
    if image.size is not None and nbytes != image.size:
        problems.append(f"read {nbytes} bytes, the source says {image.size}")
    for algo, value in _expected(image, version).items():
        want_algo = "sha512" if algo == "sha512-claimed" else algo
        if got.get(want_algo) and got[want_algo] != value:
            problems.append(f"{want_algo} of the bytes read differs from the source's "
                            f"({got[want_algo][:16]}… != {value[:16]}…)")
    if problems:
        err = IntegrityError(f"{image.ref}: " + "; ".join(problems))
        for lv in live:
            _fail(lv, err, "integrity")
        return results

    # 2. Did each target store exactly these bytes? Then publish it.
    final_props = {PROP_SHA512: got["sha512"]}
    for lv in live:
        try:
            stored = lv.writer.finish()
        except SiteError as exc:
            _fail(lv, exc, _kind(exc))
            continue
        agree = hashes_agree(got, stored.hashes)
        if stored.size is not None and stored.size != nbytes:
            agree = False
        if agree is None:
            agree = _read_back(lv.site, stored, got["sha512"])
        if not agree:
            err = IntegrityError(f"{lv.site.name}: stored image {stored.id} does not match the "
                                 f"bytes sent (sha512 {got['sha512'][:16]}…): removed")
            lv.site.delete(stored.id)
            lv.result.error, lv.result.error_kind = str(err), "integrity"
            log.warning("copy.target_failed", site=lv.site.name, error=str(err),
                        kind="integrity")
            continue
        try:
            lv.result.image = lv.site.publish(stored.id, final_props)
            lv.result.ok = True
        except SiteError as exc:
            lv.site.delete(stored.id)
            lv.result.error, lv.result.error_kind = str(exc), _kind(exc)
    return results


def _read_back(site: Site, stored: ImageRecord, sha512: str) -> bool:
    """The target reports no hash we share: read the copy back and hash it ourselves."""
    h = hashlib.sha512()
    for chunk in site.open(stored):
        h.update(chunk)
    return h.hexdigest() == sha512


def _kind(exc: BaseException) -> str:
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, TransientError):
        return "transient"
    return "site"


def copy_image(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    *,
    policy: RetryPolicy | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> CopyResult:
    """Copy ``image`` from ``source`` to every target, reading the source once per attempt."""
    policy = policy or RetryPolicy()
    version = image.version
    result = CopyResult(source=image, version=version)
    started = time.monotonic()
    pending = list(targets)
    final: dict[str, TargetResult] = {}
    attempt = 0
    while pending:
        attempt += 1
        try:
            outcome = _attempt(source, image, version, pending, progress, result)
        except TransientError as exc:
            outcome = [TargetResult(site=s.name, error=str(exc), error_kind="transient",
                                    attempts=1) for s, _ in pending]
        retry = []
        for (site, new), res in zip(pending, outcome, strict=True):
            res.attempts = attempt
            final[site.name] = res
            if not res.ok and res.error_kind in ("transient", "source"):
                retry.append((site, new))
        if not retry or attempt >= policy.attempts:
            break
        wait = policy.delay(attempt)
        log.info("copy.retrying", image=image.ref, targets=[s.name for s, _ in retry],
                 attempt=attempt, wait=round(wait, 2))
        sleep(wait)
        pending = retry
    result.targets = [final[s.name] for s, _ in targets]
    result.seconds = time.monotonic() - started
    return result
