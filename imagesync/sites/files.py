"""Durable file operations for a store on a file system (local disk or NFS).

Files and folders made with explicit modes whatever the umask; writes made atomic by a
temp file, fsync and rename; renames made durable by fsyncing their folder; a file's size and
hashes read back from the disk (not from the page cache); and every ``OSError`` turned into
the :class:`~imagesync.errors.SiteError` that says what failed and, when known, what to do
(:class:`~imagesync.errors.TransientError` for what a soft NFS mount or a failing-over
server answers). :mod:`imagesync.sites.directory` is built on them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imagesync.errors import SiteError, TransientError
from imagesync.sites.compress import decompressed

CHUNK = 1 << 20
FILE_MODE = 0o640
DIR_MODE = 0o750
# Worth retrying: what a soft NFS mount, a server failing over or a busy disk answers.
_TRANSIENT = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR})
_HINTS = {
    errno.ENOSPC: "the store is full: free space on it or grow it",
    errno.EDQUOT: "the store's quota is exhausted: raise it or free space",
    errno.EACCES: "permission denied: the user imagesync runs as must be able to write the store",
    errno.EPERM: "permission denied: the user imagesync runs as must be able to write the store",
    errno.EROFS: "the store is mounted read-only",
    errno.ENAMETOOLONG: "a path is too long for this file system",
    errno.EIO: "I/O error (a failing disk, or an NFS server not answering)",
    errno.ESTALE: "stale NFS file handle (the server restarted or the export changed)",
}


def os_error(exc: OSError, what: str, site: str) -> SiteError:
    """The SiteError for ``exc``, saying what failed and, when known, what to do."""
    detail = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or 0)
    message = f"{what}: {detail}" + (f" ({hint})" if hint else "")
    if exc.errno in _TRANSIENT:
        return TransientError(message, site=site)
    return SiteError(message, site=site)


def create_file(path: Path) -> int:
    """Create ``path`` (it must not exist) with FILE_MODE whatever the umask; return its fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask narrowed (or widened nothing of) what open gave
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dir(path: Path) -> None:
    """Create the folder ``path`` with DIR_MODE whatever the umask (an existing one is kept)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable: a rename is only on disk once its directory is."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with os.fdopen(create_file(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not leave temp files behind
            tmp.unlink()
        raise


def file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def hash_file(
    path: Path, site: str, *, compressed_size: int | None = None
) -> tuple[int, dict[str, str]]:
    """Size and hashes of the image ``path`` holds on disk (the caller has fsynced it).
    ``compressed_size``: it holds a zstd frame of that many uncompressed bytes (decompressed
    to be hashed; a frame of another size is an error)."""
    sha512 = hashlib.sha512()
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            # The pages are clean after fsync: dropping them makes the read below come from
            # the disk (or the NFS server), not from the copy the kernel still holds.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = file_chunks(f)
        if compressed_size is not None:
            chunks = decompressed(
                chunks, size=compressed_size, what=f"reading back {path}", site=site
            )
        for chunk in chunks:
            sha512.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return size, {"sha512": sha512.hexdigest(), "md5": md5.hexdigest()}
