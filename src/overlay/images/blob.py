"""Layer blobs: which format a blob is, and reading its uncompressed tar
stream, from the start or at any offset.

Formats: "tar" (uncompressed), "gzip" and "zstd" (by their magic numbers).
Random access: a tar is read where it lies; a gzip stream through
indexed_gzip with decompression checkpoints every CHECKPOINT_SPACING bytes,
built while the blob is first read (index_gzip) and kept in the cache; a
zstd stream has no restart points unless it was written in frames, so it
is read from the start (the layer then fills all its files in one pass,
see layer.BlobLayer).
"""

from __future__ import annotations

import os
import threading

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHECKPOINT_SPACING = 1 << 20
READBUF = 64 << 10

TAR, GZIP, ZSTD = "tar", "gzip", "zstd"


class BlobError(Exception):
    """A blob that cannot be read as a layer (one line, for the log)."""


def sniff_head(head: bytes) -> str | None:
    """The format the first 262 bytes of a file say it has, or None."""
    if head.startswith(GZIP_MAGIC):
        return GZIP
    if head.startswith(ZSTD_MAGIC):
        return ZSTD
    if head[257:262] == b"ustar":
        return TAR
    return None


def sniff(fd: int) -> str:
    fmt = sniff_head(os.pread(fd, 262, 0))
    if fmt is None and os.fstat(fd).st_size == 0:
        fmt = TAR
    if fmt is None:
        raise BlobError("not a layer blob (neither tar, gzip nor zstd)")
    return fmt


def read_exactly(stream, n: int, what: str) -> bytes:
    """n bytes from a stream (which may give fewer at a time), or
    BlobError naming what ends early."""
    out = []
    while n > 0:
        b = stream.read(min(n, 1 << 20))
        if not b:
            raise BlobError(f"{what} ends early")
        out.append(b)
        n -= len(b)
    return b"".join(out)


def need(module: str, what: str):
    """Import an optional dependency (the images extra) or say which."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BlobError(f"{what} needs the Python package {module!r}: "
                        f"pip install 'overlay-fuse[images]'") from None


class _FdFile:
    """A read-only file object over an fd at its own offset (pread), for
    the readers below; the fd is not closed."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = os.fstat(self.fd).st_size - self.pos
        b = os.pread(self.fd, n, self.pos)
        self.pos += len(b)
        return b

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[:len(b)] = b
        return len(b)

    def seek(self, off: int, whence: int = 0) -> int:
        if whence == 1:
            off += self.pos
        elif whence == 2:
            off += os.fstat(self.fd).st_size
        self.pos = off
        return off

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def open_stream(fd: int, fmt: str, index_path: str | None = None):
    """A seekable file object of the uncompressed stream. For gzip, the
    checkpoints are imported from index_path if given, else built as the
    stream is read (export them with save_gzip_index)."""
    if fmt == TAR:
        return _FdFile(fd)
    if fmt == GZIP:
        ig = need("indexed_gzip", "a gzip layer")
        # (a small read buffer: a random read of a few KiB decompresses
        # from the checkpoint before it, not 16 MiB ahead; 2.7 ms against
        # 4.3 here, see docs/IMAGES.md)
        f = ig.IndexedGzipFile(fileobj=_FdFile(fd), spacing=CHECKPOINT_SPACING,
                               auto_build=True, readbuf_size=READBUF, buffer_size=READBUF)
        if index_path is not None:
            f.import_index(index_path)
        return f
    if fmt == ZSTD:
        zstd = need("zstandard", "a zstd layer")
        return zstd.ZstdDecompressor().stream_reader(_FdFile(fd), read_across_frames=True)
    raise BlobError(f"unknown format {fmt!r}")


def save_gzip_index(stream, path: str) -> None:
    stream.export_index(path)


class RandomReader:
    """read(offset, size) of the uncompressed stream, from several threads
    (one stream, one lock: reads of a layer take turns)."""

    def __init__(self, fd: int, fmt: str, index_path: str | None):
        if fmt == ZSTD:
            raise BlobError("a zstd stream has no random access")
        self.stream = open_stream(fd, fmt, index_path)
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.stream.seek(offset)
            return read_exactly(self.stream, size, f"the blob, read at {offset},")

    def close(self) -> None:
        self.stream.close()
