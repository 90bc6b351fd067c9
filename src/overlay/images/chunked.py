"""zstd:chunked and eStargz layers read where they lie, in a registry: only
the table of contents at the first mount, then each file's chunks when it
is opened.

A zstd:chunked blob (``skopeo copy --dest-compress-format zstd:chunked``,
containers/storage's format) is a tar+zstd stream whose files' data are
zstd frames of their own, with a table of contents in a frame near its end;
the layer's descriptor says where it is
(``io.containers.zstd-chunked.manifest-position``: offset, length,
uncompressed length, kind) and its digest
(``io.containers.zstd-chunked.manifest-checksum``). The TOC lists every
entry with its metadata, the sha256 of a file's data and the byte range
of each of its chunks in the blob.

An eStargz blob (stargz-snapshotter's format) is a tar+gzip stream whose
files' data are gzip members of their own, with a table of the same form
(``stargz.index.json``, in a tar in a gzip member) whose offset a 51-byte
gzip footer gives (``%016xSTARGZ`` in its extra field); its layer
descriptor carries the table's digest
(``containerd.io/snapshot/stargz/toc.digest``). Its entries have no end
offsets: a chunk ends where the next one with data begins (the gzip
members of tar headers between them are decompressed past and dropped),
the last one where the table begins.

ChunkedLayer (a BlobLayer) builds the skeleton from the TOC, fetched with
one range request and checked against its digest, and fills a file by
fetching its chunks' ranges, each decompressed and the whole checked
against the TOC's digest. A network error fails that open with EIO (and a
log line); the next open of the file tries again.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import re
import tarfile
import threading
import time

from .blob import BlobError, need
from .layer import INDEX_VERSION, READAHEAD, BlobLayer

log = logging.getLogger("overlay.images")

TOC_POSITION = "io.containers.zstd-chunked.manifest-position"
TOC_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
FORMAT = "zstd:chunked"
ESTARGZ = "estargz"
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_FOOTER = 51             # (the legacy stargz footer: 47)
GROUP_BYTES = 8 << 20           # a range request held whole covers chunks up to this much
STREAMED_GROUP_MOST = 64 << 20  # a range request read as it arrives: up to this much
PART_BYTES = 1 << 20            # (read of it a few whole chunks at a time, about this much)
FETCHES_IN_FLIGHT = 4           # range requests of one file at once

_TYPES = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}
_TIME = re.compile(r"(-?\d+)-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def is_chunked(desc: dict) -> bool:
    ann = desc.get("annotations") or {}
    return TOC_POSITION in ann or ESTARGZ_TOC_DIGEST in ann


_DECODER = None
_ENTRY = None
_DCTX = threading.local()      # (ChunkedLayer._chunk's decompressor, one a thread)


def toc_entry():
    """The struct type of an entry of toc_decoder's tables."""
    toc_decoder()
    return _ENTRY


def toc_decoder():
    """A msgspec decoder of a table of contents (zstd:chunked's and
    eStargz's: one JSON shape) into structs with the fields read here: a
    table of 100,000 entries in a third of the json module's time, and in a
    fifth of the memory of dicts (entries wait in the lazy tree's plan until
    their dir is made). Its errors are ValueErrors."""
    global _DECODER, _ENTRY
    if _DECODER is None:
        msgspec = need("msgspec", "a layer's table of contents")

        entry = msgspec.defstruct("TocEntry", [
            ("type", str, ""), ("name", str, ""), ("linkName", str, ""), ("mode", int, 0),
            ("uid", int, 0), ("gid", int, 0), ("size", int, 0), ("modtime", str, ""),
            ("devMajor", int, 0), ("devMinor", int, 0), ("xattrs", dict[str, str], {}),
            ("digest", str, ""), ("offset", int, 0),
            ("endOffset", int | None, None),        # (eStargz has none: estargz_ends)
            ("chunkOffset", int, 0), ("chunkSize", int, 0), ("chunkDigest", str, ""),
            ("innerOffset", int, 0)], gc=False)
        toc = msgspec.defstruct("Toc", [("version", int, 0), ("entries", list[entry], [])])
        _DECODER, _ENTRY = msgspec.json.Decoder(toc), entry
    return _DECODER


def estargz_ends(entries: list, toc_offset: int) -> None:
    """An eStargz table's entries with data get the end offset they lack:
    the offset of the next entry with data (or the table's)."""
    with_data = [e for e in entries if e.type == "chunk" or (e.type == "reg" and e.size)]
    for e, nxt in zip(with_data, with_data[1:] + [None]):
        if e.endOffset is None:
            e.endOffset = nxt.offset if nxt is not None else toc_offset


def gunzip_chunk(raw: bytes, size: int, inner: int = 0) -> bytes:
    """size bytes from inner on of the data of the gzip member(s) at the
    start of raw (what follows them is not read)."""
    import zlib
    out = bytearray()
    want = inner + size
    while len(out) < want and raw:
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(raw, want - len(out))
        except zlib.error as e:
            raise OSError(5, f"a chunk does not decompress: {e}") from None
        if not d.eof:
            break
        raw = d.unused_data
    if len(out) < want:
        raise OSError(5, f"a chunk holds {len(out)} bytes, not {want}")
    return bytes(out[inner:want])


def _pax_time(text: str) -> str:
    """An RFC 3339 time as PAX's "seconds.fraction" (exact to the ns)."""
    import calendar
    m = _TIME.fullmatch(text or "")
    if not m:
        return "0"
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(sec)))
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return f"{secs}.{(frac or '0')[:9]}"


def toc_members(entries: list):
    """(TarInfo, chunks, digest function) of each TOC entry, as
    BlobLayer._make takes them; a file's "chunk" entries are gathered into
    its chunk list [[offset, end offset, offset in the file, size, offset
    in the decompressed member (eStargz's innerOffset), its digest or ""]]."""
    out = []
    for e in entries:
        kind = e.type
        if kind == "chunk":
            if not out or out[-1][1] is None:
                raise BlobError("a chunk with no file before it in the table of contents")
            # (a chunk's compressed end: its own endOffset where written,
            # else the next chunk's offset, the last one's the file's end)
            out[-1][1].append([e.offset, e.endOffset, e.chunkOffset, e.chunkSize, e.innerOffset,
                               e.chunkDigest])
            continue
        if kind not in _TYPES:
            raise BlobError(f"table of contents: entry of unknown type {kind!r}")
        ti = tarfile.TarInfo(e.name.rstrip("/") or ".")
        ti.type = _TYPES[kind]
        ti.mode = e.mode & 0o7777
        ti.uid, ti.gid = e.uid, e.gid
        ti.linkname = e.linkName
        ti.devmajor, ti.devminor = e.devMajor, e.devMinor
        pax = {"mtime": _pax_time(e.modtime)}
        for k, v in e.xattrs.items():
            pax["SCHILY.xattr." + k] = base64.b64decode(v).decode("utf-8", "surrogateescape")
        ti.pax_headers = pax
        chunks = None
        if kind == "reg":
            ti.size = e.size
            if ti.size:
                if e.endOffset is None:
                    raise BlobError(f"table of contents: no end offset for {ti.name!r}")
                chunks = [[e.offset, e.endOffset, 0, e.chunkSize or ti.size, e.innerOffset, e.chunkDigest]]
        digest = e.digest
        out.append([ti, chunks, (lambda d=digest: d.partition(":")[2])])
    for ti, chunks, _ in out:
        if chunks:
            file_end = chunks[0][1]         # the file entry's endOffset: after all its chunks
            if len(chunks) > 1:
                chunks[0][1] = None
            for k, c in enumerate(chunks):
                if c[1] is None or (k + 1 < len(chunks) and c[1] > chunks[k + 1][0]):
                    c[1] = chunks[k + 1][0] if k + 1 < len(chunks) else file_end
                nxt = chunks[k + 1][2] if k + 1 < len(chunks) else ti.size
                if c[3] == 0 or c[2] + c[3] > nxt:
                    c[3] = nxt - c[2]
            if any(c[1] is None or c[1] <= c[0] for c in chunks):
                raise BlobError(f"table of contents: bad chunk ranges for {ti.name!r}")
    return [(ti, chunks, f) for ti, chunks, f in out]


def _covers(chunks: list, size: int) -> bool:
    """Do the chunks (in file order) cover the file, each after the other?"""
    pos = 0
    for c in chunks:
        if c[2] != pos:
            return False
        pos += c[3]
    return pos == size


def _groups(chunks: list, most: int = GROUP_BYTES) -> list:
    """The chunks of a file (in file order) cut into runs that lie one after
    the other in the blob, each at most most bytes there (or one chunk):
    one range request each."""
    out = []
    for c in chunks:
        if out and out[-1][-1][1] == c[0] and c[1] - out[-1][0][0] <= most:
            out[-1].append(c)
        else:
            out.append([c])
    return out


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _write_at(fd: int, pieces: list, off: int) -> None:
    """pieces written one after the other into fd from off, with as few
    calls as can be (IOV_MAX pieces a call; a short write carried on)."""
    for k in range(0, len(pieces), _IOV_MAX):
        batch = pieces[k:k + _IOV_MAX]
        want = sum(len(b) for b in batch)
        done = os.pwritev(fd, batch, off)
        if done < want:
            rest = memoryview(b"".join(batch))[done:]
            while rest:
                n = os.pwrite(fd, rest, off + done)
                if n <= 0:
                    raise OSError(errno.EIO, "a write that wrote nothing")
                rest, done = rest[n:], done + n
        off += want


class RemoteBlob:
    """A blob in a registry: its descriptor, read by range."""

    def __init__(self, reg, repo: str, desc: dict):
        self.reg = reg
        self.repo = repo
        self.desc = desc
        self.digest = desc["digest"]
        self.size = desc.get("size", 0)
        self.fetched = 0
        self.waited = 0.0
        self.lock = threading.Lock()

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end), one range request, whole."""
        return b"".join(self.read_parts(start, end, [end - start]))

    def read_parts(self, start: int, end: int, sizes):
        """Bytes [start, end) with one range request, given back as they
        arrive in parts of these sizes (see Registry.blob_range_parts)."""
        parts = self.reg.blob_range_parts(self.repo, self.digest, start, end, sizes)
        try:
            while True:
                t0 = time.monotonic()
                try:
                    data = next(parts, None)
                finally:
                    with self.lock:
                        self.waited += time.monotonic() - t0
                if data is None:
                    return
                with self.lock:
                    self.fetched += len(data)
                yield data
        finally:
            parts.close()

    def name(self) -> str:
        return f"{self.reg.host}/{self.repo}@{self.digest}"


class ChunkedLayer(BlobLayer):
    """A zstd:chunked blob in a registry, as a lower layer (see the module's
    docstring)."""

    def __init__(self, remote: RemoteBlob, cache: str | None = None):
        self.remote = remote
        ann = remote.desc.get("annotations") or {}
        fmt = FORMAT if TOC_POSITION in ann else ESTARGZ
        self._setup(remote.name(), cache, -1, remote.size, fmt, remote.digest)
        self.zstd = need("zstandard", "a zstd:chunked layer") if fmt == FORMAT else None
        self._ahead = None      # (fetch_ahead's future)
        self.filling: dict[int, threading.Event] = {}      # ino -> set when its fill ends

    def _chunk(self, raw: bytes, c: list) -> bytes:
        """One chunk's data from its bytes in the blob."""
        if self.zstd is None:
            return gunzip_chunk(raw, c[3], c[4])
        # (one decompressor a thread, kept: making one for each chunk cost
        # more than decompressing it, a big file's chunks being small)
        dctx = getattr(_DCTX, "zstd", None)
        if dctx is None:
            dctx = _DCTX.zstd = self.zstd.ZstdDecompressor()
        try:
            return dctx.decompress(raw, max_output_size=max(c[3], 1))
        except self.zstd.ZstdError as e:
            raise OSError(5, f"a chunk does not decompress: {e}") from None

    def _digest(self) -> str:
        return self.remote.digest.partition(":")[2]

    def fetch_ahead(self, pool) -> None:
        """The table of contents fetched, checked and decompressed by a
        thread of pool (none of which holds the GIL for long), while the
        layers before this one are read; not where this layer's index is
        in the cache already (the mount then needs no table)."""
        if self.fmt != FORMAT or os.path.exists(os.path.join(self.cache, "sha256", self._digest(), "index.json")):
            return
        try:
            where = self._toc_position()
        except BlobError:
            return          # (_toc says what is wrong)
        self._ahead = pool.submit(self._toc_body, *where)

    def _toc_position(self) -> tuple[int, int, int, str | None]:
        """Where a zstd:chunked table of contents lies, from the layer's
        annotations: (offset, length, length decompressed, its checksum)."""
        ann = self.remote.desc.get("annotations") or {}
        try:
            off, length, ulen, kind = (int(x) for x in ann[TOC_POSITION].split(":"))
        except (KeyError, ValueError):
            raise BlobError(f"{self.path}: bad {TOC_POSITION} annotation") from None
        if kind != 1:
            raise BlobError(f"{self.path}: table of contents of kind {kind} (1 is known)")
        return off, length, ulen, ann.get(TOC_CHECKSUM)

    def _toc_body(self, off: int, length: int, ulen: int, want: str | None) -> bytes:
        """A zstd:chunked table of contents: fetched, checked against its
        checksum, decompressed."""
        raw = self.remote.read(off, off + length)
        if want and "sha256:" + hashlib.sha256(raw).hexdigest() != want:
            raise OSError(5, f"{self.path}: the table of contents does not match its checksum")
        try:
            return self.zstd.ZstdDecompressor().decompress(raw, max_output_size=ulen)
        except self.zstd.ZstdError as e:
            raise BlobError(f"{self.path}: unreadable table of contents: {e}") from None

    def _toc(self) -> list:
        if self.fmt == ESTARGZ:
            return self._estargz_toc()
        where = self._toc_position()
        body = self._ahead.result() if self._ahead is not None else self._toc_body(*where)
        try:
            doc = toc_decoder().decode(body)
        except ValueError as e:
            raise BlobError(f"{self.path}: unreadable table of contents: {e}") from None
        if doc.version != 1:
            raise BlobError(f"{self.path}: table of contents version {doc.version!r}")
        return doc.entries

    def _estargz_toc(self) -> list:
        """The table of an eStargz blob: its offset from the footer, then
        the table (a tar in a gzip member), checked against the layer's
        annotation."""
        import gzip
        import io
        if self.size < ESTARGZ_FOOTER:
            raise BlobError(f"{self.path}: too small for an eStargz blob")
        tail = self.remote.read(self.size - ESTARGZ_FOOTER, self.size)
        m = re.search(rb"([0-9a-f]{16})STARGZ", tail)
        if not m:
            raise BlobError(f"{self.path}: no eStargz footer")
        toc_off = int(m.group(1), 16)
        if not 0 < toc_off < self.size:
            raise BlobError(f"{self.path}: eStargz footer points outside the blob")
        raw = self.remote.read(toc_off, self.size)     # (the footer: an empty member after it)
        try:
            with tarfile.open(fileobj=io.BytesIO(gzip.GzipFile(fileobj=io.BytesIO(raw)).read()), mode="r:") as tf:
                member = tf.extractfile("stargz.index.json")
                body = member.read() if member else b""
        except (OSError, EOFError, tarfile.TarError, KeyError) as e:
            raise BlobError(f"{self.path}: unreadable eStargz table of contents: {e}") from None
        want = (self.remote.desc.get("annotations") or {}).get(ESTARGZ_TOC_DIGEST)
        if want and "sha256:" + hashlib.sha256(body).hexdigest() != want:
            raise OSError(5, f"{self.path}: the table of contents does not match its digest")
        try:
            entries = toc_decoder().decode(body).entries
        except ValueError as e:
            raise BlobError(f"{self.path}: unreadable table of contents: {e}") from None
        estargz_ends(entries, toc_off)
        return entries

    def _members(self):
        return toc_members(self._toc())

    def _lazy_members(self):
        # (each file with its chunk entries, turned into a member only
        # when its dir is made)
        out = []
        add = out.append
        for e in self._toc():
            kind = e.type
            if kind == "chunk":
                if not out:
                    raise BlobError("a chunk with no file before it in the table of contents")
                out[-1][2].append(e)
                continue
            add((e.name, kind == "dir", [e]))
        return out

    def _member_of(self, raw):
        return toc_members(raw)[0]

    def _implicit(self, rel: str, now: int):
        return [toc_entry()(name=rel, type="dir", mode=0o755,
                      modtime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))]

    def _build(self, d: str) -> None:
        tmp, root = self._new_tree(d)
        try:
            files, dirs = self._make(self._members(), root)
            self._dir_times(root, dirs)
            tst = os.fstat(root)
        finally:
            os.close(root)
        self._write_index(tmp, d, files, tst)

    def _span(self, ino: int) -> int:
        chunks = self.files[ino][1]
        return max(c[1] for c in chunks) - min(c[0] for c in chunks)

    def _pieces(self, chunks, data, start):
        """(chunk, its data) of each of chunks, in the order given, from
        data (the blob's bytes from start on)."""
        for c in chunks:
            yield c, self._chunk(data[c[0] - start:c[1] - start], c)

    def _group(self, g):
        """(chunk, its data) of a group (see _groups), fetched with one
        range request."""
        return self._pieces(g, memoryview(self.remote.read(g[0][0], g[-1][1])), g[0][0])

    def _ensure(self, ino: int, budget: int = READAHEAD) -> None:
        # (one fill at a time for a file, not for the layer: a big file's
        # long fetch holds up no open of the layer's other files; an open
        # of a file being filled waits for that fill, and tries again if
        # it failed)
        while True:
            with self.lock:
                if ino in self.done:
                    return
                held = self.filling.get(ino)
                if held is None:
                    batch = self._batch(ino, budget)
                    mine = threading.Event()
                    for i in batch:
                        self.filling[i] = mine
                    break
            held.wait()
        try:
            self._fetch(ino, batch, budget)
        finally:
            with self.lock:
                for i in batch:
                    del self.filling[i]
            mine.set()

    def _batch(self, ino: int, budget: int) -> list[int]:
        """ino, and where it is small the small files after it in the blob
        that no one is filling, in one range of budget bytes at most."""
        if self._span(ino) > budget:
            return [ino]
        start = min(c[0] for c in self.files[ino][1])
        batch = [ino]
        for i in self._following(ino, budget - self._span(ino), self._span):
            # (the range read covers what lies between too: files of dirs
            # not made yet, of a tree made lazily, are not in the order;
            # stop where the range would pass budget)
            if max(c[1] for c in self.files[i][1]) - start > budget:
                break
            if i not in self.filling:
                batch.append(i)
        return batch

    def _fetch(self, ino: int, batch: list[int], budget: int) -> None:
        """The data of the files of batch (see _batch) in place."""
        if self._in_place(ino):
            return
        rel, chunks, size, want = self.files[ino]
        if self._span(ino) <= budget:
            # small files: one request
            start = min(c[0] for c in chunks)
            end = max(c[1] for i in batch for c in self.files[i][1])
            data = self.remote.read(start, end)
            for i in batch:
                if i != ino and self._in_place(i):
                    continue
                r, ch, sz, w = self.files[i]
                try:
                    pieces = (p for _c, p in self._pieces(sorted(ch, key=lambda c: c[2]), data, start))
                    self._fill(i, r, sz, w, pieces)
                except OSError:
                    if i == ino:
                        raise
            return
        chunks = sorted(chunks, key=lambda c: c[2])
        if all(c[5] for c in chunks) and _covers(chunks, size):
            # (few long requests, each read as it arrives: a registry
            # pays for each request; as many as fetched at once at least)
            most = min(STREAMED_GROUP_MOST, max(GROUP_BYTES, self._span(ino) // FETCHES_IN_FLIGHT + 1))
            groups = _groups(chunks, most)
            self._fill(ino, rel, size, want, None, lambda fd: self._write_chunks(fd, groups))
            return
        groups = _groups(chunks)

        def group(g):
            # (in a worker: the range fetched and its chunks
            # decompressed, the GIL let go meanwhile; one piece of
            # them: a write and a hash a group, not a chunk, or the
            # threads queue for the GIL at every chunk)
            return [b"".join([p for _c, p in self._group(g)])]

        def pieces():
            # up to FETCHES_IN_FLIGHT groups at once, in order
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(FETCHES_IN_FLIGHT) as pool:
                pending = [pool.submit(group, g) for g in groups[:FETCHES_IN_FLIGHT]]
                nxt = len(pending)
                while pending:
                    out = pending.pop(0).result()
                    if nxt < len(groups):
                        pending.append(pool.submit(group, groups[nxt]))
                        nxt += 1
                    yield from out
        self._fill(ino, rel, size, want, pieces())

    def _write_chunks(self, fd: int, groups: list) -> bool:
        """A big file whose chunks all have digests (the table's, itself
        checked against the descriptor's): its groups fetched, decompressed,
        checked and written each by a worker, side by side (a whole-file
        digest would make one thread hash it all, after the others)."""
        from concurrent.futures import ThreadPoolExecutor

        def work(g):
            # (one request for the group, read PART_BYTES of whole chunks
            # at a time: each checked and written while in the CPU's cache)
            parts = _groups(g, PART_BYTES)
            data = self.remote.read_parts(g[0][0], g[-1][1], [p[-1][1] - p[0][0] for p in parts])
            try:
                for p, raw in zip(parts, data):
                    pieces = []
                    for c, piece in self._pieces(p, memoryview(raw), p[0][0]):
                        if len(piece) != c[3] or "sha256:" + hashlib.sha256(piece).hexdigest() != c[5]:
                            return False
                        pieces.append(piece)
                    _write_at(fd, pieces, p[0][2])
            finally:
                data.close()
            return True
        with ThreadPoolExecutor(FETCHES_IN_FLIGHT) as pool:
            return all(pool.map(work, groups))

    def describe(self) -> str:
        return f"{self.path} (layer blob, {self.fmt}, read by range)"

    def stats(self) -> dict:
        st = super().stats()
        st.update(bytes_fetched=self.remote.fetched, seconds_waiting=round(self.remote.waited, 3))
        return st


__all__ = ["ChunkedLayer", "RemoteBlob", "is_chunked", "toc_members", "estargz_ends", "gunzip_chunk",
           "INDEX_VERSION"]
