"""Each cloud gets the disk format it wants: a copy converted with ``qemu-img`` on its way.

A cloud's ``disk_formats:`` lists the formats it accepts, preferred first
(:func:`imagesync.model.choose_format` decides, purely, per target). :func:`copy_with_formats`
is what the executor calls instead of :func:`imagesync.transfer.copy_image`: the targets that
take the version as it is get the usual streamed copy (one read, N writers); those that need
another format get, per format, one conversion through a bounded scratch directory (qcow2
needs random access, so it cannot be converted as a stream):

1. the scratch space is reserved first (the original, then its converted size as
   ``qemu-img`` measures it; for a qcow2 source going to raw the virtual size read from its
   header as soon as the download starts): a conversion that does not fit within
   ``conversion.scratch_max_size`` or the disk's free space fails at once, saying what it
   needs and what there is, and leaves nothing behind;
2. the source is downloaded to the scratch directory and hashed: its bytes must be the
   version's (sha512, size);
3. ``qemu-img info`` must find the declared format with no backing file or external data
   file (an image naming a host file would copy that file into the converted image);
4. ``qemu-img convert``, then ``qemu-img compare`` of the original and the converted file:
   the converted copy is published only when they hold the same guest-visible data;
5. the converted file is uploaded with :func:`~imagesync.transfer.copy_image` (hidden until
   verified: its own sha512 must match what the site stored), and published with the
   original's ``imagesync.sha512`` (the version's identity), ``imagesync.converted_from``
   (``FORMAT:SHA512`` of the original) and ``imagesync.converted_sha512`` (its own bytes).

A failure fails the targets of that conversion alone (``ErrorKind.CONVERSION``, not retried:
a missing ``qemu-img`` or a scratch directory too small does not mend itself in a second);
the scratch files are removed whatever happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import structlog

from imagesync.convert_scratch import ConversionFailed as ConversionFailed
from imagesync.convert_scratch import Room, size_text
from imagesync.convert_scratch import Scratch as Scratch
from imagesync.errors import Cancelled, SiteError
from imagesync.model import (
    PROP_CONVERTED_FROM,
    PROP_CONVERTED_SHA512,
    PROP_SHA512,
    QEMU_FORMATS,
    ImageRecord,
    NewImage,
    choose_format,
)
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Capabilities, Site, Writer
from imagesync.transfer import (
    CopyResult,
    ErrorKind,
    Progress,
    TargetResult,
    Tuning,
    UploadWatcher,
    copy_image,
)

log = structlog.get_logger("imagesync.convert")

QEMU_PACKAGE = "qemu-utils"
_CHUNK = 1024 * 1024
_QCOW2_MAGIC = b"QFI\xfb"


# --------------------------------------------------------------------------- qemu-img


def qemu_img() -> str:
    """The ``qemu-img`` to run, or ConversionFailed saying which package to install."""
    found = shutil.which("qemu-img")
    if found is None:
        raise ConversionFailed(
            "qemu-img is not installed, and this copy needs a disk format conversion: "
            f"install Debian's {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE}), or remove "
            "the target cloud's disk_formats: to copy images as they are"
        )
    return found


def _run(
    args: Sequence[str], cancel: threading.Event | None, ok: tuple[int, ...] = (0,)
) -> tuple[int, str]:
    """Run qemu-img; stop it when ``cancel`` is set. Returns its exit code and output."""
    try:
        proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        raise ConversionFailed(f"could not run {args[0]}: {exc}") from exc
    while True:
        try:
            out, err = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if cancel is not None and cancel.is_set():
                proc.kill()
                proc.communicate()
                raise Cancelled("cancelled") from None
    if proc.returncode not in ok:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise ConversionFailed(f"qemu-img {args[1]} failed ({proc.returncode}): {last}")
    return proc.returncode, out


def _info(tool: str, path: Path, fmt: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        _run([tool, "info", "--output=json", "-f", fmt, str(path)], None)[1]
    )
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if info.get("backing-filename") or info.get("full-backing-filename") or data_file:
        raise ConversionFailed(
            f"the image names another file ({info.get('backing-filename') or data_file!r}): "
            "imagesync converts only self-contained images"
        )
    return info


def _measure(tool: str, path: Path, src: str, dst: str) -> int:
    argv = [tool, "measure", "--output=json", "-f", src, "-O", dst, str(path)]
    out = json.loads(_run(argv, None)[1])
    return int(out["required"])


def _qcow2_virtualsize_text(head: bytes) -> int | None:
    """The virtual size in a qcow2 header (offset 24, big-endian), None if not qcow2."""
    if len(head) < 32 or head[:4] != _QCOW2_MAGIC:
        return None
    return int(struct.unpack(">Q", head[24:32])[0])


# --------------------------------------------------------------------------- the copy


class CopyOptions(TypedDict, total=False):
    """``copy_image``'s options that ``copy_with_formats`` hands on unchanged to every copy it
    makes (the download before a conversion heeds ``policy``, ``sleep`` and ``cancel`` too);
    one left out takes ``copy_image``'s default."""

    policy: RetryPolicy | None
    sleep: Callable[[float], None]
    cancel: threading.Event | None
    watcher: UploadWatcher | None
    lease_expired: Callable[[], bool] | None
    tuning: Tuning | None


def copy_with_formats(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    *,
    accepted: Callable[[str], tuple[str, ...]],
    scratch: Scratch,
    progress: Progress | None = None,
    plain_copy: Callable[..., CopyResult] = copy_image,
    **options: Unpack[CopyOptions],
) -> CopyResult:
    """``copy_image`` for the targets that take ``image`` as it is, a conversion for each
    format the others need; one result with the targets in the order given. ``plain_copy``
    makes the copies taken as they are (the executor passes the server-side copy, which
    falls back to ``copy_image``)."""
    plain: list[tuple[Site, NewImage]] = []
    converting: dict[str, list[tuple[Site, NewImage]]] = {}
    refused: dict[str, TargetResult] = {}
    for site, new in targets:
        choice = choose_format(image.disk_format, accepted(site.name))
        if choice.refused is not None:
            msg = f"{site.name}: {choice.refused}"
            log.error("convert.refused", image=image.name, site=site.name, reason=msg)
            refused[site.name] = TargetResult(
                site.name, error=msg, error_kind=ErrorKind.CONVERSION, attempts=1
            )
        elif choice.convert_to is not None:
            converting.setdefault(choice.convert_to, []).append((site, new))
        else:
            plain.append((site, new))
    started = time.monotonic()
    if plain or not converting:
        view, plain = _as_is(image, plain)
        result = plain_copy(source, view, plain, progress=progress, **options)
        result.source, result.version = image, image.version
    else:
        result = CopyResult(source=image, version=image.version)
    done = {t.site: t for t in result.targets} | refused
    for fmt, group in converting.items():
        converted = _convert_copy(source, image, fmt, group, scratch, progress, options)
        done.update((t.site, t) for t in converted.targets)
        result.bytes_read = max(result.bytes_read, converted.bytes_read)
        result.sha512 = result.sha512 or converted.sha512
    result.targets = [done[s.name] for s, _ in targets]
    result.seconds = time.monotonic() - started
    return result


def _as_is(
    image: ImageRecord, targets: list[tuple[Site, NewImage]]
) -> tuple[ImageRecord, list[tuple[Site, NewImage]]]:
    """What ``copy_image`` is given for targets taking ``image`` as it is. A converted copy
    as the source (no copy holding the original's bytes is left) is checked against its own
    sha512, and its copies keep the version's identity and the conversion marks."""
    if not image.converted or not targets:
        return image, targets
    own = image.properties.get(PROP_CONVERTED_SHA512, "")
    identity = image.version.sha512 or ""
    marks = {PROP_CONVERTED_FROM: image.properties[PROP_CONVERTED_FROM], PROP_CONVERTED_SHA512: own}
    view = image.with_(properties={**image.properties, PROP_SHA512: own})
    return view, [
        (
            _Identity(site, identity),
            dataclasses.replace(new, properties={**new.properties, **marks}),
        )
        for site, new in targets
    ]


def _convert_copy(
    source: Site,
    image: ImageRecord,
    fmt: str,
    group: Sequence[tuple[Site, NewImage]],
    scratch: Scratch,
    progress: Progress | None,
    options: CopyOptions,
) -> CopyResult:
    """Download, convert, compare, then upload to every target in ``group``."""
    src_fmt = image.disk_format or ""
    names = [s.name for s, _ in group]
    what = f"converting {image.name} ({src_fmt} → {fmt})"
    result = CopyResult(source=image, version=image.version)
    cancel = options.get("cancel")
    try:
        tool = qemu_img()
        with scratch.room(what) as room:
            log.info("convert.start", image=image.name, source=image.ref, to=fmt, targets=names)
            original, sha = _download(source, image, room, fmt, progress, cancel, options)
            result.bytes_read = original.stat().st_size
            _info(tool, original, QEMU_FORMATS[src_fmt])
            required = _measure(tool, original, QEMU_FORMATS[src_fmt], QEMU_FORMATS[fmt])
            room.need(
                result.bytes_read + required,
                f"{size_text(result.bytes_read)} for the original and {size_text(required)} for "
                f"the {fmt} copy",
            )
            converted = room.path / f"converted.{fmt}"
            _convert_and_compare(tool, image, original, converted, fmt, cancel)
            own = _sha512(converted, cancel)
            result.sha512 = own
            uploaded = _upload(image, converted, own, sha, fmt, group, options)
            result.targets = uploaded.targets
            log.info(
                "convert.done",
                image=image.name,
                to=fmt,
                targets=[t.site for t in uploaded.targets if t.ok],
                bytes=converted.stat().st_size,
            )
            return result
    except Cancelled:
        result.targets = [
            TargetResult(n, error="cancelled", error_kind=ErrorKind.CANCELLED) for n in names
        ]
    except (ConversionFailed, SiteError, OSError, ValueError) as exc:
        kind = ErrorKind.SOURCE if isinstance(exc, SiteError) else ErrorKind.CONVERSION
        msg = f"{what}: {exc}"
        log.error("convert.failed", image=image.name, to=fmt, targets=names, error=msg)
        result.targets = [TargetResult(n, error=msg, error_kind=kind, attempts=1) for n in names]
    except Exception as exc:  # a bug: these targets fail, the copy's others are unaffected
        msg = f"{what}: unexpected error: {exc!r}"
        log.error("convert.failed", image=image.name, to=fmt, targets=names, exc_info=True)
        result.targets = [
            TargetResult(n, error=msg, error_kind=ErrorKind.UNEXPECTED, attempts=1) for n in names
        ]
    return result


def _convert_and_compare(
    tool: str,
    image: ImageRecord,
    original: Path,
    converted: Path,
    fmt: str,
    cancel: threading.Event | None,
) -> None:
    """``qemu-img convert``, then ``qemu-img compare``: the copy must hold the original's
    guest-visible data, else nothing is uploaded (ConversionFailed)."""
    src_fmt = image.disk_format or ""
    _run(
        [
            *(tool, "convert", "-f", QEMU_FORMATS[src_fmt], "-O", QEMU_FORMATS[fmt]),
            *(str(original), str(converted)),
        ],
        cancel,
    )
    # exit 1: the images differ; anything else: compare itself failed
    if _compare(tool, original, converted, src_fmt, fmt, cancel) != 0:
        raise ConversionFailed(
            f"qemu-img compare found the {fmt} copy of {image.ref} different from "
            "the original: nothing was uploaded"
        )


def _compare(tool: str, a: Path, b: Path, fa: str, fb: str, cancel: threading.Event | None) -> int:
    """0: the same guest-visible data; 1: different (a failure of compare itself raises)."""
    args = [tool, "compare", "-f", QEMU_FORMATS[fa], "-F", QEMU_FORMATS[fb], str(a), str(b)]
    return _run(args, cancel, ok=(0, 1))[0]


def _sha512(path: Path, cancel: threading.Event | None) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            h.update(chunk)
    return h.hexdigest()


def _download(
    source: Site,
    image: ImageRecord,
    room: Room,
    fmt: str,
    progress: Progress | None,
    cancel: threading.Event | None,
    options: CopyOptions,
) -> tuple[Path, str]:
    """The original in the scratch room, checked against the version; its sha512."""
    size = image.size or 0
    room.need(size, f"{size_text(size)} for the original")
    path = room.path / "original"
    policy = options.get("policy") or RetryPolicy()
    attempt = 0
    while True:
        attempt += 1
        try:
            return path, _download_once(source, image, path, room, fmt, progress, cancel)
        except SiteError:
            if attempt >= policy.attempts or not policy.pause(
                attempt,
                None,
                what=f"download {image.ref}",
                sleep=options.get("sleep", time.sleep),
                cancel=cancel,
            ):
                raise


def _download_once(
    source: Site,
    image: ImageRecord,
    path: Path,
    room: Room,
    fmt: str,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> str:
    h = hashlib.sha512()
    n = 0
    head = b""
    checked_header = image.disk_format != "qcow2" or fmt != "raw"
    stream = source.open(image)
    try:
        with path.open("wb") as f:
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                if not checked_header:
                    head += chunk[:32]
                    if len(head) >= 32:
                        # a qcow2 going to raw takes its virtual size: say now if that cannot
                        # fit, not after downloading it all
                        virtual = _qcow2_virtualsize_text(head) or 0
                        room.need(
                            (image.size or 0) + virtual,
                            f"{size_text(image.size or 0)} for the original and "
                            f"{size_text(virtual)} (its virtual size) for the raw copy",
                        )
                        checked_header = True
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
                if image.size is not None and n > image.size:
                    raise ConversionFailed(f"{image.ref} is larger than its size {image.size}")
                if progress is not None:
                    progress(len(chunk))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    digest = h.hexdigest()
    # the bytes must be the version's, as a streamed copy checks them (transfer._expected)
    want = image.properties.get(PROP_CONVERTED_SHA512) if image.converted else image.version.sha512
    own = image.hashes.get("sha512")
    for expected in (want, own):
        if expected and expected.lower() != digest:
            raise ConversionFailed(
                f"the bytes read from {image.ref} are not the version's (sha512 "
                f"{digest[:16]}… != {expected[:16]}…)"
            )
    if image.size is not None and n != image.size:
        raise ConversionFailed(f"read {n} bytes from {image.ref}, which says {image.size}")
    return digest


def _upload(
    image: ImageRecord,
    converted: Path,
    own: str,
    original_sha: str,
    fmt: str,
    group: Sequence[tuple[Site, NewImage]],
    options: CopyOptions,
) -> CopyResult:
    """Stream the converted file to every target with the usual verify-then-publish."""
    size = converted.stat().st_size
    identity = image.version.sha512 or original_sha
    converted_from = image.properties.get(PROP_CONVERTED_FROM) or (
        f"{image.disk_format}:{identity}"
    )
    record = ImageRecord(
        site="scratch",
        id=converted.name,
        name=image.name,
        status="active",
        created_at=datetime.now(UTC),
        size=size,
        hashes={"sha512": own},
        disk_format=fmt,
        container_format=image.container_format,
    )
    targets: list[tuple[Site, NewImage]] = []
    for site, new in group:
        props = {**new.properties, PROP_CONVERTED_FROM: converted_from, PROP_CONVERTED_SHA512: own}
        targets.append(
            (
                _Identity(site, identity),
                dataclasses.replace(new, disk_format=fmt, size=size, properties=props),
            )
        )
    return copy_image(_ScratchFile(converted, record), record, targets, **options)


class _ScratchFile:
    """The converted file as a read-only source for ``copy_image``."""

    kind = "scratch"

    def __init__(self, path: Path, record: ImageRecord) -> None:
        self.name = "scratch"
        self.path = path
        self.record = record
        self._caps = Capabilities.fill(self, hashes=("sha512",))

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        return [self.record]

    def get_image(self, image_id: str) -> ImageRecord:
        return self.record

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        try:
            f = self.path.open("rb")
        except OSError as exc:
            raise SiteError(f"reading {self.path}: {exc}", site=self.name) from exc
        f.seek(offset)
        return _chunks(f)

    def create(self, new: NewImage) -> Writer:
        raise SiteError("the scratch file is read-only", site=self.name)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        raise SiteError("the scratch file is read-only", site=self.name)

    def delete(self, image_id: str) -> None:
        pass

    def check_connection(self) -> str:
        return str(self.path)

    def close(self) -> None:
        pass


def _chunks(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(_CHUNK):
            yield chunk


class _Identity:
    """A target site whose ``publish`` records the version's identity (the original's
    sha512) as ``imagesync.sha512``: ``copy_image`` writes the sha512 of the bytes it sent,
    which for a converted copy is its own (kept as ``imagesync.converted_sha512``)."""

    def __init__(self, site: Site, identity: str) -> None:
        self.site = site
        self.identity = identity
        self.name = site.name
        self.kind = site.kind

    @property
    def capabilities(self) -> Capabilities:
        return self.site.capabilities

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        return self.site.list_images(name)

    def get_image(self, image_id: str) -> ImageRecord:
        return self.site.get_image(image_id)

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        return self.site.open(image, offset)

    def create(self, new: NewImage) -> Writer:
        return self.site.create(new)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        props = dict(properties or {})
        props[PROP_SHA512] = self.identity
        return self.site.publish(image_id, props)

    def delete(self, image_id: str) -> None:
        self.site.delete(image_id)

    def check_connection(self) -> str:
        return self.site.check_connection()

    def close(self) -> None:
        pass  # the pool closes the real site
