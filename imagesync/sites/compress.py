"""Compressed storage for stores (``compress: zstd``): the stored object is one zstd frame,
made and read while streaming, never held whole.

What a compressed store keeps is not what an image *is*: the image's identity stays the sha512
of its uncompressed bytes (provenance, ``imagesync.sha512``, the hashes a site reports) and its
size the uncompressed size. Only the stored object is smaller; how much is its stored size.

- :class:`Compressor` turns the chunks an upload is handed into the frame's bytes, one chunk
  at a time. The frame carries its content size (when the upload announced one) and zstd's
  own checksum of the content (XXH64), so a stored object that was damaged at rest is found
  by decompressing it, by imagesync or by ``zstd -d``.
- :func:`decompressed` streams the uncompressed bytes back out of the stored object's chunks
  in pieces of at most ``CHUNK`` (a megabyte of zeros compresses to a few bytes: decompressing
  a whole input chunk at once could make gigabytes). A read from an ``offset`` (a resumed
  copy) decompresses from the start of the frame and drops what lies before ``offset``: it
  costs as much reading and CPU as reading up to there, because a zstd frame cannot be entered
  in the middle.

A frame that is corrupt (zstd's checksum, a malformed block) or ends early is a
:class:`~imagesync.errors.SiteError` saying so: the copy that read it fails, nothing is made of
it. Level 1: images are mostly empty blocks and already-compressed data, which every level
handles alike; level 1 keeps the push's throughput (``bench/bench_vospace.py``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import IO, cast

import zstandard

from imagesync.errors import SiteError

ZSTD = "zstd"  # a store's ``compress:`` (config.types.COMPRESSIONS)
#: what a person sees at the end of a compressed object's name where the store names objects
SUFFIX = ".zst"
LEVEL = 1
CHUNK = 1 << 20


class Compressor:
    """One stored object being written: :meth:`compress` each chunk, then :meth:`flush`."""

    def __init__(self, size: int | None, *, what: str, site: str) -> None:
        self.what = what
        self.site = site
        cctx = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, write_content_size=True)
        # the announced size goes into the frame's header (zstd -l shows it) and zstd refuses
        # to end a frame of another size
        self._obj = cctx.compressobj(size=-1 if size is None else size)
        #: uncompressed bytes handed in, compressed bytes given out
        self.size = 0
        self.stored_size = 0

    def compress(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        try:
            out = self._obj.compress(chunk)
        except zstandard.ZstdError as exc:
            raise SiteError(f"{self.what}: compressing: {exc}", site=self.site) from exc
        self.stored_size += len(out)
        return out

    def flush(self) -> bytes:
        """The end of the frame (its last block and checksum)."""
        try:
            out = self._obj.flush()
        except zstandard.ZstdError as exc:
            # e.g. fewer or more bytes than announced: zstd will not write a frame that lies
            raise SiteError(f"{self.what}: compressing: {exc}", site=self.site) from exc
        self.stored_size += len(out)
        return out


class _ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of chunks (what zstd's stream reader reads from)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: object) -> int:
        target = memoryview(cast("bytearray", b)).cast("B")
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def decompressed(
    chunks: Iterator[bytes], *, offset: int = 0, size: int | None, what: str, site: str
) -> Iterator[bytes]:
    """The uncompressed bytes, from ``offset``, of the zstd frame read as ``chunks``.

    ``size``: the uncompressed size the store recorded (None: unknown); a frame that yields
    another number of bytes is an error, so a stored object cut short is never taken for a
    shorter image. ``chunks`` is closed when this iterator is.
    """
    dctx = zstandard.ZstdDecompressor()
    reader = dctx.stream_reader(
        cast("IO[bytes]", _ChunkReader(chunks)), read_size=CHUNK, read_across_frames=False
    )
    total = 0
    skip = offset
    try:
        while True:
            try:
                out = reader.read(CHUNK)
            except zstandard.ZstdError as exc:
                raise SiteError(
                    f"{what}: the stored object is corrupt (zstd: {exc})", site=site
                ) from exc
            if not out:
                break
            total += len(out)
            if skip:
                cut = min(skip, len(out))
                out, skip = out[cut:], skip - cut
                if not out:
                    continue
            yield out
    finally:
        reader.close()  # type: ignore[no-untyped-call]  # (zstandard's stub lacks a type)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if size is not None and total != size:
        raise SiteError(
            f"{what}: the stored object decompresses to {total} bytes, not the {size} "
            "recorded: it is cut short or corrupt",
            site=site,
        )
