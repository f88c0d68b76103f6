"""Streaming copy: one reader, N writers, hashing on the fly, verify, publish or clean up.

The source is read once; each chunk is hashed (sha512; md5 too when a side lacks sha512 and
the source's own md5 cannot stand for it, see ``_vouched_md5``)
and handed to every live target through a bounded queue of its own (a thread per target writes
from it), so memory does not grow with image size. A target that falls behind (it held the
reader back, its queue full while another target had nothing to write, for
``Tuning.detach_after``; or ``Tuning.paces`` knows it to be much slower) is *detached*: it is served
from then on, from the offset it reached, at its own pace, by a reader of its own of the copy's
spool (the read kept on local disk, ``imagesync.spool``), so fast targets finish and publish at
their own speed and the source is read once; without room for a spool, by a second read of the
source (``Site.open(image, offset)``: Range) shared by every target detached later (two reads
at most). A read that is cut mid-stream
resumes from where it stopped (``Tuning.resumes`` times per read), after checking that the
source is still the same image (size, hashes, version), while the uploads keep streaming from
their queues. When the stream ends the digests are compared with everything the source claimed (its
own hashes, size, provenance) and with what each target reports it stored. A target that
fails or mismatches is deleted (nothing half-made is left) while the others carry on; only
verified copies are published, with the provenance marks (``imagesync.origin``,
``.version``, ``.sha512``).

Transient failures are retried with the shared policy (``retry.py``): a failed target alone
is re-sent from a fresh read of the source; a source read that failed beyond its resumes
retries every target it served. The bytes a detached target got from the spool or the second read
are not hashed again: what it stored is compared with the digests of the first, whole read.

One target never takes the others down: any exception a target's site raises while creating,
writing, finishing or publishing (a ``SiteError``, or a bug outside the hierarchy, which counts
as ``ErrorKind.UNEXPECTED`` and is logged with its traceback) fails that target alone, which is
aborted or deleted, while every other target is still finished or aborted (a Glance writer's
upload thread waits for one or the other). ``abort`` that fails anyway leaves the upload
leased, for recovery to remove.

A copy can be cancelled (the daemon on SIGTERM): ``cancel`` is checked between chunks, and
every target still being written is aborted, so a cancelled copy leaves nothing behind.
An :class:`UploadWatcher` hears of each upload from its creation until it is published or
removed; the engine records these as leases (what this process has half-made, where).

This module drives a copy (attempts, hashing, verifying, publishing); its parts below it:
``imagesync.settling`` (finishing, verifying and publishing each target), ``imagesync.fanout``
(the reads handed to the targets' queues, detaching), ``imagesync.reading`` (resuming a cut
read, reading a copy back) and ``imagesync.uploads`` (results, ``Tuning``, one target's
upload and how it fails alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from imagesync.errors import Cancelled, IntegrityError, SiteError, TransientError
from imagesync.fanout import FanOut
from imagesync.hashing import MultiHasher
from imagesync.model import (
    PROP_ORIGIN,
    PROP_VERSION,
    ImageRecord,
    NewImage,
    Version,
    format_time,
    layout_of,
)
from imagesync.reading import read_from
from imagesync.retry import RetryPolicy
from imagesync.settling import settle_all
from imagesync.sites.base import Site, Writer
from imagesync.uploads import (
    CopyResult,
    ErrorKind,
    Live,
    NoWatcher,
    Progress,
    TargetResult,
    Tuning,
    UploadWatcher,
    cancel_rest,
    check_cancel,
    fail,
    kind_of,
    log_failed,
    set_error,
)

# The public names of a copy, defined in imagesync.uploads, are importable from here as they
# always were.
__all__ = [
    "CopyResult",
    "ErrorKind",
    "Progress",
    "TargetResult",
    "Tuning",
    "UploadWatcher",
    "copy_image",
    "new_image_for",
]

log = structlog.get_logger("imagesync.transfer")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def new_image_for(source: ImageRecord, version: Version, visibility: str) -> NewImage:
    """What a copy of ``source`` looks like on a target, before its bytes are verified."""
    props = source.user_properties()
    props[PROP_ORIGIN] = version.origin
    props[PROP_VERSION] = format_time(version.time)
    return NewImage(
        name=source.name,
        **layout_of(source),
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


def _vouched_md5(source: Site, image: ImageRecord) -> str | None:
    """The source's own md5 of ``image``, when it stands for the md5 of the bytes a copy
    reads, so that the copy need not compute it; else None.

    It does when the source computed its md5 and sha512 together over the bytes it stores
    (``capabilities.joint_hashes``: Glance) and the copy checks every byte it reads against
    that sha512 (``_source_problems``): the bytes read are then the ones the md5 is of. A
    target lacking sha512 (a plain VOSpace node) is still checked end to end: its service's
    md5 of what it stored must equal this md5 (sent as the upload's ``Digest``, and compared
    in ``settling``). A source without sha512 (a legacy image) gets its
    md5 computed, and so does one whose hashes are not all its own (a VOSpace node: its
    sha512 is a property, so its reads verify both).
    """
    if not source.capabilities.joint_hashes or not image.hashes.get("sha512"):
        return None
    md5 = image.hashes.get("md5", "").lower()
    return md5 if _HEX32.fullmatch(md5) else None


def _attempt(
    source: Site,
    image: ImageRecord,
    version: Version,
    targets: Sequence[tuple[Site, NewImage]],
    progress: Progress | None,
    result: CopyResult,
    cancel: threading.Event | None = None,
    watcher: UploadWatcher | None = None,
    lease_expired: Callable[[], bool] | None = None,
    tuning: Tuning | None = None,
) -> list[TargetResult]:
    """One pass: stream to every target (those that fell behind from a second read). Raises
    TransientError when the first read failed, Cancelled (after removing every upload it
    started) when ``cancel`` was set."""
    results = [TargetResult(site=site.name) for site, _ in targets]
    vouched = _vouched_md5(source, image)
    if vouched is not None:  # a target whose service checks an upload's digest sends it
        targets = [(site, dataclasses.replace(new, md5=vouched)) for site, new in targets]
    live = _open_targets(targets, results, cancel, watcher or NoWatcher())
    if not live:
        return results
    need_md5 = vouched is None and _md5_decides(image, version, live)
    lone = _hashed_by_its_target(live, image, version, need_md5)
    fan = FanOut(source, image, live, tuning or Tuning(), cancel, result, progress)
    try:
        _settle_fan(fan, version, need_md5, vouched, lone, lease_expired)
    finally:
        fan.close()  # no read of the spool outlives the attempt
    return results


def _settle_fan(
    fan: FanOut,
    version: Version,
    need_md5: bool,
    vouched: str | None,
    lone: bool,
    lease_expired: Callable[[], bool] | None,
) -> None:
    """Read the source through ``fan`` (hashing it unless ``lone``: the one target hashes what
    it is handed), then verify and publish (or remove) every target: those that got every byte
    from the first read first, then each detached one as its read ends."""
    source, image, result, cancel = fan.source, fan.image, fan.result, fan.cancel
    nbytes, got = _stream(source, image, fan, fan.progress, cancel, need_md5, hash_read=not lone)
    result.bytes_read = max(result.bytes_read, nbytes)
    if not fan.ready and not fan.later:
        return  # every target failed while the source was read
    if lone:  # what the target says it was handed must be the version's bytes
        got = {"sha512": _expected(image, version)["sha512"]}
    result.sha512 = got["sha512"]
    try:
        # 1. Did the source deliver the bytes it claims to hold?
        problems = _source_problems(image, version, nbytes, got)
        if problems:
            err = IntegrityError(f"{image.ref}: " + "; ".join(problems))
            for lv in fan.ready + fan.stop_later():
                fail(lv, err, ErrorKind.INTEGRITY)
            return
        if vouched is not None:
            # the bytes read are the source's (their sha512 is its own): so is its md5
            got = {**got, "md5": vouched}
        # 2. Did each target store exactly these bytes? Then publish it: those that got every
        # byte from the first read now, each detached one once its read has served it.
        settled = settle_all(fan.ready, got, nbytes, cancel, lease_expired)
        for done in fan.finished_later() if settled else ():
            if not settle_all(done, got, nbytes, cancel, lease_expired):
                break
        cancel_rest(fan.stop_later())  # none left, unless settling was cancelled
    except BaseException:
        # Ctrl-C (or a bug in the watcher) while settling: the detached targets still being
        # written wait for finish or abort (a Glance upload thread).
        cancel_rest(fan.stop_later())
        raise


def _open_targets(
    targets: Sequence[tuple[Site, NewImage]],
    results: Sequence[TargetResult],
    cancel: threading.Event | None,
    watcher: UploadWatcher,
) -> list[Live]:
    """Start an invisible upload on every target that accepts one."""
    check_cancel(cancel)
    live: list[Live] = []
    for (site, _), res, made in zip(targets, results, _create_all(targets), strict=True):
        res.attempts += 1
        if isinstance(made, Exception):
            set_error(res, made)
            log_failed(site.name, made, kind_of(made))
            continue
        try:
            live.append(Live(site, made, res, watcher))
        except Exception as exc:  # the lease could not be recorded: do not write blind
            set_error(res, exc)
            log_failed(site.name, exc, kind_of(exc))
            with contextlib.suppress(Exception):
                made.abort()
    try:
        check_cancel(cancel)
    except Cancelled:
        for lv in live:
            lv.abort()
        raise
    return live


def _create_all(targets: Sequence[tuple[Site, NewImage]]) -> list[Writer | Exception]:
    """Each target's new image, or why it could not be made: side by side, as each costs a
    round trip or more to its site (a Glance create through a WAN link ~0.2 s here), which
    the copy's first byte would otherwise wait for one after another."""

    def one(target: tuple[Site, NewImage]) -> Writer | Exception:
        site, new = target
        try:
            return site.create(new)
        except Exception as exc:  # that target fails alone
            return exc

    if len(targets) == 1:
        return [one(targets[0])]
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="create") as pool:
        return list(pool.map(one, targets))


def _stream(
    source: Site,
    image: ImageRecord,
    fan: FanOut,
    progress: Progress | None,
    cancel: threading.Event | None,
    need_md5: bool,
    *,
    hash_read: bool = True,
) -> tuple[int, dict[str, str]]:
    """Read the whole source once (resuming a cut read), hash it and hand each chunk to the
    targets still on this read (``fan``: one that falls behind is detached onto a second read).
    Every target left on this read has written every byte when it returns (``fan.ready``).
    Returns the bytes read and their digests (none when ``hash_read`` is false: the one
    target hashes them, see ``_hashed_by_its_target``)."""
    # each algorithm hashes in a thread of its own, beside the reads and the uploads
    algorithms = (["sha512", "md5"] if need_md5 else ["sha512"]) if hash_read else []
    hasher = MultiHasher(algorithms) if algorithms else None
    nbytes = 0
    stream = read_from(source, image, 0, fan.tuning, fan.count)
    try:
        for chunk in stream:
            check_cancel(cancel)
            if hasher is not None:
                hasher.update(chunk)
            nbytes += len(chunk)
            fan.hand(chunk)
            if progress is not None:
                progress(len(chunk))
            if not fan.busy:
                break
        check_cancel(cancel)
        fan.end()
        got = hasher.hexdigests() if hasher is not None else {}
    except BaseException as exc:
        live = fan.abort_all()
        if isinstance(exc, SiteError):
            for lv in live:
                lv.result.error, lv.result.error_kind = str(exc), ErrorKind.SOURCE
            raise TransientError(f"reading {image.ref}: {exc}", site=source.name) from exc
        if isinstance(exc, Exception) and not isinstance(exc, Cancelled):
            # The source (or the progress callback) failed outside the hierarchy: a bug,
            # not worth a retry; every target was aborted above.
            raise _Unexpected(f"reading {image.ref}: {exc!r}") from exc
        raise
    finally:
        if hasher is not None:
            hasher.close()
        stream.close()
    return nbytes, got


def _md5_decides(image: ImageRecord, version: Version, live: Sequence[Live]) -> bool:
    """md5 decides nothing when the source and every target report sha512 (the strongest
    shared algorithm decides, see model.hashes_agree), and it costs ~1.3 CPU s per GiB on the
    cores the sites' servers need: a copy computes it only when it can decide (and the source
    does not already vouch for it, see ``_vouched_md5``)."""
    return "sha512" not in _expected(image, version) or any(
        "sha512" not in lv.site.capabilities.hashes for lv in live
    )


def _hashed_by_its_target(
    live: Sequence[Live], image: ImageRecord, version: Version, need_md5: bool
) -> bool:
    """True when the copy's one target hashes (sha512) every byte it is handed
    (``capabilities.hashes_handed``: a compressed store, whose service vouches only for the
    frame it stored) and the version's sha512 is known: the target's digest is then compared
    with that sha512 where a read's digest would be (``settling``), which checks the source
    and the hand-over at once, and the copy need not hash the same bytes a second time
    (~1.2 CPU s per GiB)."""
    if len(live) != 1 or need_md5 or "sha512" not in _expected(image, version):
        return False
    return live[0].site.capabilities.hashes_handed


def _source_problems(
    image: ImageRecord, version: Version, nbytes: int, got: Mapping[str, str]
) -> list[str]:
    problems = []
    if image.size is not None and nbytes != image.size:
        problems.append(f"read {nbytes} bytes, the source says {image.size}")
    for algo, value in _expected(image, version).items():
        want_algo = "sha512" if algo == "sha512-claimed" else algo
        if got.get(want_algo) and got[want_algo] != value:
            problems.append(
                f"{want_algo} of the bytes read differs from the source's "
                f"({got[want_algo][:16]}… != {value[:16]}…)"
            )
    return problems


class _Unexpected(Exception):
    """The source failed outside the SiteError hierarchy (a bug): no target is retried."""


def copy_image(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    *,
    policy: RetryPolicy | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
    watcher: UploadWatcher | None = None,
    lease_expired: Callable[[], bool] | None = None,
    tuning: Tuning | None = None,
) -> CopyResult:
    """Copy ``image`` from ``source`` to every target, reading the source once per attempt
    (twice when a target fell behind the others; ``tuning`` says when and how).

    When ``cancel`` is set the copy stops at the next chunk, removes every upload it made and
    returns with the unfinished targets marked ``cancelled`` (targets already published stay).
    When ``lease_expired()`` says the uploads' lease is over, verified uploads are removed
    instead of published.
    """
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
            outcome = _attempt(
                source,
                image,
                version,
                pending,
                progress,
                result,
                cancel,
                watcher,
                lease_expired,
                tuning,
            )
        except (TransientError, Cancelled, _Unexpected) as exc:
            outcome = _all_failed(exc, pending, image)
        retry = []
        for (site, new), res in zip(pending, outcome, strict=True):
            res.attempts = attempt
            final[site.name] = res
            if not res.ok and res.error_kind is not None and res.error_kind.retryable:
                retry.append((site, new))
        if not retry or attempt >= policy.attempts:
            break
        if not _pause(policy, attempt, retry, final, f"copy {image.ref}", sleep, cancel):
            break
        pending = retry
    result.targets = [final[s.name] for s, _ in targets]
    result.seconds = time.monotonic() - started
    return result


def _all_failed(
    exc: TransientError | Cancelled | _Unexpected,
    pending: Sequence[tuple[Site, NewImage]],
    image: ImageRecord,
) -> list[TargetResult]:
    """The outcome of an attempt that failed as a whole (the first read of the source failed,
    or the copy was cancelled): every target it was for, failed alike."""
    if isinstance(exc, TransientError):
        return [
            TargetResult(
                site=s.name,
                error=str(exc),
                error_kind=ErrorKind.TRANSIENT,
                retry_after=exc.retry_after,
            )
            for s, _ in pending
        ]
    if isinstance(exc, Cancelled):
        return [
            TargetResult(site=s.name, error="cancelled", error_kind=ErrorKind.CANCELLED)
            for s, _ in pending
        ]
    log.error("copy.source_failed", source=image.ref, error=str(exc), exc_info=True)
    return [
        TargetResult(site=s.name, error=str(exc), error_kind=ErrorKind.UNEXPECTED)
        for s, _ in pending
    ]


def _pause(
    policy: RetryPolicy,
    attempt: int,
    retry: Sequence[tuple[Site, NewImage]],
    final: dict[str, TargetResult],
    what: str,
    sleep: Callable[[float], None],
    cancel: threading.Event | None,
) -> bool:
    """Wait before the next attempt (the longest ``Retry-After`` the targets gave, if longer
    than the policy's pause); False when cancelled meanwhile (``retry`` are then cancelled)."""
    hints = [final[s.name].retry_after for s, _ in retry]
    hint = max((h for h in hints if h is not None), default=None)
    if policy.pause(
        attempt, hint, what=what, sleep=sleep, cancel=cancel, targets=[s.name for s, _ in retry]
    ):
        return True
    for site, _ in retry:
        final[site.name] = TargetResult(
            site=site.name, error="cancelled", error_kind=ErrorKind.CANCELLED, attempts=attempt
        )
    return False
