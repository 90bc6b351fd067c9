"""BlobLayer: one layer blob served as a lower layer (see the package's
docstring): its cache entry, skeleton and index, and ensure(), which puts
a file's data in place before the core reads them.

Cache layout (CACHE is blob_cache=, by default /var/cache/overlay-fuse as
root, else ~/.cache/overlay-fuse):

    CACHE/sha256/HEX/tree/        the skeleton (the layer's tree, no data)
    CACHE/sha256/HEX/index.json   what the skeleton's files hold and where
                                  their data lie in the uncompressed stream
    CACHE/sha256/HEX/gzip.idx     decompression checkpoints (gzip blobs)
    CACHE/sha256/HEX/source.json  where a layer store's skeleton's data come
                                  from (overlay.images.store)
    CACHE/by-file/KEY             HEX of the blob with that path, device,
                                  inode, size and mtime (no hashing at
                                  each mount)
    CACHE/locks/HEX               held (shared flock) by every mount using
                                  the layer; its mtime: the last use
                                  (blob_cache_max=: see cache.py)
    CACHE/locks/HEX.build         held (flock) by the one process building
                                  the layer's skeleton and index

Nothing says on disk that a file's data are in place: they count as such
once they hash to the index's digest (_in_place).

Every path inside a skeleton is opened below its root with openat2 (no
symlink followed, nothing above the root reached): a blob's names and
link targets are data, never paths to follow.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat as S
import tarfile
import threading
import time

from overlay_core import sys_open_inside

from .blob import GZIP, TAR, ZSTD, BlobError, open_stream, read_exactly, sniff

log = logging.getLogger("overlay.images")

INDEX_VERSION = 2      # (2: "files" last, its checksum over its bytes as written)
_FILES_KEY = b',"files":'


def _json(obj) -> bytes:
    """Compact JSON: msgspec's encoder where it is there (seven times as
    fast as json's, the GIL held that much less while a skeleton's index is
    written beside the first reads), json's for what it refuses (names that
    are not UTF-8: lone surrogates)."""
    try:
        import msgspec
        return msgspec.json.encode(obj)
    except (ImportError, UnicodeEncodeError):
        return json.dumps(obj, separators=(",", ":")).encode()
READAHEAD = 1 << 20         # bytes of the following files filled with the one asked for
PREFETCH_RUN = 8 << 20      # prefetch=all: bytes filled at a time (an open waits at most one run)


class _Count:
    """A count several threads change (x += 1 on a shared int is not one
    step: two threads may lose an update, and a count left above 0 would
    keep a tree's builder waiting at every dir)."""

    def __init__(self):
        self.n = 0
        self._lock = threading.Lock()

    def add(self, k: int) -> None:
        with self._lock:
            self.n += k


_FILLING = _Count()         # fills going on in this process (a tree's builder makes way for them)
BUILD_DELAY = 1.0           # a lazily made tree's builder starts this long after the mount began
                            # (the mount and its first lookups go first)
OCI_WH = ".wh."
OCI_OPQ = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"          # (the core's with userxattr)
# owners and modes of a skeleton made without privilege (no chown, no
# trusted.* xattrs: a rootless container's user namespace, a plain user):
# "UID:GID:MODE" as fuse-overlayfs and containers/storage keep them; the
# core reads a layer whose root dir carries one this way
OWNER_XATTR = "user.containers.override_stat"
O_PATH = getattr(os, "O_PATH", 0o10000000)


def default_cache() -> str:
    if os.geteuid() == 0:
        return "/var/cache/overlay-fuse"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "overlay-fuse")


def _rel(name: str) -> str | None:
    """A member name as a path below the layer's root ("" for the root
    itself), or None where it would leave it."""
    if name and name[0] not in "./" and "//" not in name and "/." not in name:
        return name[:-1] if name[-1] == "/" else name      # (the common case, quickly)
    parts = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            return None
        parts.append(c)
    return "/".join(parts)


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """The member's mtime in ns (a PAX mtime keeps its fraction)."""
    v = ti.pax_headers.get("mtime")
    if v:
        from decimal import Decimal, InvalidOperation
        try:
            return int(Decimal(v) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(ti.mtime) * 1_000_000_000


def _sha256(f) -> str:
    h = hashlib.sha256()
    while True:
        b = f.read(1 << 20)
        if not b:
            return h.hexdigest()
        h.update(b)


def _xattrs(ti: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out = []
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out.append((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape")))
    return out


def _owner(ti: tarfile.TarInfo, kind: int) -> bytes:
    """OWNER_XATTR's value for a member."""
    return b"%d:%d:%o" % (ti.uid, ti.gid, kind | (ti.mode & 0o7777))


class BlobLayer:
    """One layer blob. prepare() gives the skeleton dir to use as the lower
    dir; ensure(ino) is the core's provider call (the data of the skeleton
    file with that inode number, in place before they are read)."""

    def __init__(self, path: str, cache: str | None = None):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not S.S_ISREG(st.st_mode):
            os.close(fd)
            raise BlobError(f"{path}: not a regular file")
        try:
            fmt = sniff(fd)
        except BlobError:
            os.close(fd)
            raise
        self._setup(path, cache, fd, st.st_size, fmt, None)
        self.st = st

    def _setup(self, path: str, cache: str | None, fd: int, size: int, fmt: str, digest) -> None:
        """The state of a layer: where it comes from (path, fd or -1) and
        what it is; nothing loaded yet (prepare)."""
        self.path = path
        self.cache = cache or default_cache()
        self.fd = fd
        self.size = size
        self.fmt = fmt
        self.dir = None
        self.tree_fd = -1
        self.files: dict[int, tuple[str, int, int, str]] = {}   # ino -> (path, offset, size, sha256)
        self.done: set[int] = set()
        self.lock = threading.Lock()
        self.reader = None
        self._order = None          # inos of the files in the blob's order (see _following)
        self.fetched = 0            # bytes of data put in place by this process
        self.seconds = 0.0          # spent doing it (by each thread that fills)
        self.stats_lock = threading.Lock()      # (files of a layer filled side by side)
        self.digest = digest
        self.hold_fd = -1           # cache.hold: the layer is in use
        # lazy (image= from a registry, a table of contents at hand): the
        # skeleton is made a dir at a time, the dirs looked into first
        # (ensure_dir, from the core), the rest by a thread (_build_rest)
        self.lazy = False
        # how the skeleton is made: the core's xattr names (userxattr), and
        # whether owners and modes go in OWNER_XATTR (unprivileged: then
        # devices are not made and only user.* xattrs are kept, as a
        # rootless extraction does)
        self.userxattr = False
        self.unprivileged = False
        self._plan = None           # dir path -> its members, while not all are made
        self._made: set[str] = set()           # dirs whose entries are being made or are
        self._complete: set[str] = set()       # ... and those whose entries are all there
        self._pending: dict[int, str] = {}      # st_ino of a dir whose entries are not made -> path
        self._dtimes: dict[str, int] = {}       # dir path -> its mtime (ns)
        self._built = threading.Event()         # the whole skeleton is there (and its index)
        self.tree_lock = threading.Lock()       # making entries (not self.lock: a long fill
                                                # must not hold up a lookup)

    # ------------------------------------------------------------ cache

    def _file_key(self) -> str:
        real = os.path.realpath(self.path)
        ident = f"{real}\0{self.st.st_dev}\0{self.st.st_ino}\0{self.st.st_size}\0{self.st.st_mtime_ns}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()

    def _digest(self) -> str:
        """The blob's sha256, remembered by file identity."""
        os.makedirs(os.path.join(self.cache, "by-file"), exist_ok=True)
        keyp = os.path.join(self.cache, "by-file", self._file_key())
        try:
            with open(keyp) as f:
                hexd = f.read().strip()
            if len(hexd) == 64 and all(c in "0123456789abcdef" for c in hexd):
                return hexd
        except OSError:
            pass
        h = hashlib.sha256()
        off = 0
        while True:
            b = os.pread(self.fd, 1 << 20, off)
            if not b:
                break
            h.update(b)
            off += len(b)
        hexd = h.hexdigest()
        tmp = f"{keyp}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(hexd + "\n")
        os.replace(tmp, keyp)
        return hexd

    def prepare(self) -> str:
        """The skeleton dir (built now unless a valid one is in the cache)."""
        hexd = self._digest()
        self.digest = "sha256:" + hexd
        if self.hold_fd < 0:
            from .cache import hold
            self.hold_fd = hold(self.cache, hexd)     # (never removed while this lives)
        d = os.path.join(self.cache, "sha256", hexd)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        # one builder of a layer at a time (a mount waits for another's build)
        lock = os.open(os.path.join(self.cache, "locks", hexd + ".build"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._load(d):
                members = self._lazy_members() if self.lazy else None
                if members is not None:
                    log.info("%s: making its tree as it is looked into (%s, %d bytes)",
                             self.path, self.fmt, self.size)
                    self._start_lazy(d, members, lock)
                    lock = -1       # (the builder thread lets it go)
                    return os.path.join(d, "tree")
                log.info("%s: building its index (%s, %d bytes)", self.path, self.fmt, self.size)
                self._build(d)
                if not self._load(d):
                    raise BlobError(f"{self.path}: the index just built does not load")
        finally:
            if lock >= 0:
                os.close(lock)
        self.dir = d
        return os.path.join(d, "tree")

    def _members(self):
        """The layer's members (as _make takes them) without reading the
        blob through, or None where that cannot be (a tar stream)."""
        return None

    def _lazy_members(self):
        """[(name, is a dir, what _member_of makes the member of)]: a
        lazily made tree turns a member into a TarInfo only when its dir is
        made (a table of contents of 100,000 entries is read in a fraction
        of the time); None where _members is."""
        members = self._members()
        if members is None:
            return None
        return [(m[0].name, m[0].isdir(), m) for m in members]

    def _member_of(self, raw):
        """A member (as _make takes them) of what _lazy_members gave."""
        return raw

    def _implicit(self, rel: str, now: int):
        """What _member_of makes a dir the layer does not list of (0755,
        root's, made now: as _parent makes one)."""
        ti = tarfile.TarInfo(rel)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, now
        return (ti, None, None)

    # ------------------------------------------------------------ lazily

    def _start_lazy(self, d: str, members, lock: int) -> None:
        """The skeleton in d/tree, its root's entries now, the rest as the
        core looks into dirs (ensure_dir) and by a thread (_build_rest),
        which writes the index and lets the build lock go at the end."""
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "tree"))
        self.tree_fd = os.open(os.path.join(d, "tree"), O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mark_made_dir(self.tree_fd)
        self.dir = d
        self.files, self.done, self._order = {}, set(), None
        # (each dir's members, by its path: a dir is known once it has a
        # list here)
        plan: dict[str, list] = {"": []}
        # (a dir's subdirs and opaque mark, made with the dir: its nlink
        # and opacity right even before it is looked into, as a listing
        # of its parent shows it)
        shells: dict[str, list] = {}
        now = int(time.time())
        listed = plan.get
        for name, is_dir, member in members:        # (100,000s: kept tight)
            rel = _rel(name)
            if rel is None:
                log.warning("%s: member %r leaves the layer: skipped", self.path, name)
                continue
            parent, _, base = rel.rpartition("/")
            siblings = listed(parent)
            if siblings is None:                    # dirs the blob does not list
                missing = []
                p = parent
                while p not in plan:
                    missing.append(p)
                    p = p.rpartition("/")[0]
                for m in reversed(missing):
                    implicit = self._implicit(m, now)
                    plan[m.rpartition("/")[0]].append(implicit)
                    shells.setdefault(m.rpartition("/")[0], []).append(implicit)
                    plan[m] = []
                siblings = plan[parent]
            siblings.append(member)
            if is_dir:
                if rel:
                    shells.setdefault(parent, []).append(member)
                    if rel not in plan:
                        plan[rel] = []
            elif base == OCI_OPQ:
                shells.setdefault(parent, []).append(member)
        self._plan = plan
        self._shells = shells
        self._pending = {}
        self._materialize("")
        threading.Thread(target=self._build_rest, args=(lock,), name="skeleton", daemon=True).start()

    def _materialize(self, rel: str) -> None:
        """The entries of dir rel (its parents' made), its times kept.
        Under self.tree_lock, or before the mount serves."""
        if rel in self._made or self._plan is None:
            return
        self._made.add(rel)     # (first: a hard link's target dir may lead back here)
        members = [self._member_of(m) for m in self._plan.get(rel, [])]
        for ti, _w, _d in members:      # a hard link's target first
            if ti.islnk():
                trel = _rel(ti.linkname)
                if trel:
                    self._materialize_path(trel.rpartition("/")[0])
        _files, dirs = self._make_all(members, self.tree_fd, self.files, {}, None, -1)
        self._register(dirs)
        for child in dirs:          # the shells of its subdirs (see _start_lazy)
            if child and child not in self._made:
                shell = [self._member_of(m) for m in self._shells.get(child, [])]
                if shell:
                    self._register(self._make_all(shell, self.tree_fd, self.files, {}, None, -1)[1])
                    self._put_time(child)
        self._put_time(rel)
        self._complete.add(rel)     # (last: ensure_dir looks at it without the lock)

    def _register(self, dirs: dict) -> None:
        """Dirs just made: their times, and their inode numbers for
        ensure_dir."""
        for child, ns in dirs.items():
            self._dtimes[child] = ns
            if child:
                try:
                    fd = sys_open_inside(self.tree_fd, os.fsencode(child), O_PATH | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    self._pending[os.fstat(fd).st_ino] = child
                finally:
                    os.close(fd)

    def _put_time(self, rel: str) -> None:
        """Dir rel's time back to the layer's (making entries in it changed it)."""
        if rel in self._dtimes:
            ns = self._dtimes[rel]
            fd = sys_open_inside(self.tree_fd, os.fsencode(rel) or b".", O_PATH | os.O_DIRECTORY)
            try:
                os.utime(f"/proc/self/fd/{fd}", ns=(ns, ns))
            finally:
                os.close(fd)

    def _materialize_path(self, rel: str) -> None:
        """Dir rel's entries and those of every dir above it."""
        parts = rel.split("/") if rel else []
        for k in range(len(parts) + 1):
            self._materialize("/".join(parts[:k]))

    def ensure_dir(self, fd: int) -> None:
        """The core is about to look into the skeleton dir at fd: its
        entries, made first (a lazily made layer; nothing otherwise)."""
        if self._plan is None:
            return
        rel = self._pending.get(os.fstat(fd).st_ino)
        if rel is None or rel in self._complete:
            return
        with self.tree_lock:
            self._materialize_path(rel)

    def ensure_path(self, fd: int, comps: list) -> None:
        """The dirs on the way to comps[-1] below the skeleton dir at fd,
        made first (a redirect followed into a lazily made layer)."""
        if self._plan is None:
            return
        st = os.fstat(fd)
        base = "" if st.st_ino == os.fstat(self.tree_fd).st_ino else self._pending.get(st.st_ino)
        if base is None:
            return
        with self.tree_lock:
            rel = base
            self._materialize_path(rel)
            for c in comps[:-1]:
                rel = f"{rel}/{os.fsdecode(c)}" if rel else os.fsdecode(c)
                if rel not in self._plan:
                    break
                self._materialize(rel)

    def _build_rest(self, lock: int) -> None:
        """The rest of the skeleton, breadth first, a dir at a time (an
        ensure_dir waits for one dir at most), then its index; the build
        lock is let go at the end (or at a failure: the next mount builds
        it again)."""
        time.sleep(BUILD_DELAY)
        t0 = time.monotonic()
        try:
            queue = sorted(self._plan, key=lambda r: (r.count("/") if r else -1, r))
            for rel in queue:
                # (a file being filled meanwhile goes first: its threads
                # would queue for the GIL behind this one's Python)
                waited = 0
                while _FILLING.n and waited < 100:
                    time.sleep(0.005)
                    waited += 1
                with self.tree_lock:
                    self._materialize(rel)
            with self.tree_lock:
                tst = os.fstat(self.tree_fd)
                self._write_index_in_place(self.dir, self.files, tst)
                self._plan = None
                self._pending = {}
                self._order = None
            log.info("%s: tree made (%d files with data) in %.1f s", self.path, len(self.files),
                     time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - the layer stays usable as far as it is made
            log.exception("%s: making the rest of its tree failed", self.path)
        finally:
            os.close(lock)
            self._built.set()

    def _load(self, d: str) -> bool:
        """Trust d's index only if it says what this blob and its skeleton
        are; else remove it (it is rebuilt)."""
        try:
            with open(os.path.join(d, "index.json"), "rb") as f:
                raw = f.read()
            doc = json.loads(raw)
            # ("files" last: the bytes of its value, between its key and the
            # closing brace; the head's values hold no such key)
            cut = raw.find(_FILES_KEY)
            body = raw[cut + len(_FILES_KEY):-1] if cut > 0 else b""
            tree = os.open(os.path.join(d, "tree"), O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError, KeyError, TypeError):
            if os.path.lexists(d):
                log.warning("%s: cached index unusable, rebuilding it", self.path)
                shutil.rmtree(d, ignore_errors=True)
            return False
        tst = os.fstat(tree)
        ok = (doc.get("version") == INDEX_VERSION and doc.get("digest") == "sha256:" + os.path.basename(d)
              and doc.get("format") == self.fmt and doc.get("blob_size") == self.size
              and doc.get("tree") == [tst.st_dev, tst.st_ino] and doc.get("owners", "chown") == self._how()
              and doc.get("files_sha256") == hashlib.sha256(body).hexdigest()
              and (self.fmt != GZIP or os.path.exists(os.path.join(d, "gzip.idx"))))
        if not ok:
            os.close(tree)
            log.warning("%s: cached index does not match the blob, rebuilding it", self.path)
            shutil.rmtree(d, ignore_errors=True)
            return False
        self.tree_fd = tree
        self.files = {int(ino): (p, off, size, h) for ino, p, off, size, h in doc["files"]}
        self.done = set()
        self._order = None
        self._built.set()
        return True

    # ------------------------------------------------------------ building

    def _new_tree(self, d: str) -> tuple[str, int]:
        """A fresh dir beside d to build into, and an fd of its tree/."""
        tmp = f"{d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "tree"))
        fd = os.open(os.path.join(tmp, "tree"), O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mark_made_dir(fd)
        return tmp, fd

    def _xattrs(self, ti: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        """The member's xattrs to set: unprivileged, its user.* ones only
        (the others, security.capability among them, need privilege)."""
        out = _xattrs(ti)
        return [(k, v) for k, v in out if k.startswith("user.")] if self.unprivileged else out

    def _how(self) -> str:
        """How the skeleton's owners and opaque marks are kept (an index
        made otherwise is not used)."""
        return ("xattr" if self.unprivileged else "chown") + (",user" if self.userxattr else "")

    def _mark_made_dir(self, fd: int) -> None:
        """A dir no member describes (yet), in an unprivileged skeleton:
        OWNER_XATTR says root's, 0755, as extraction makes it. The root
        dir always carries one: the core reads owners and modes of the
        whole layer from there."""
        if self.unprivileged:
            os.setxattr(f"/proc/self/fd/{fd}", OWNER_XATTR, b"0:0:%o" % (S.S_IFDIR | 0o755))

    def _build(self, d: str) -> None:
        tmp, root = self._new_tree(d)
        try:
            stream = open_stream(self.fd, self.fmt)
            try:
                mode = "r|" if self.fmt == ZSTD else "r:"
                with tarfile.open(fileobj=stream, mode=mode) as tf:
                    files, dirs = self._skeleton(tf, root)
                if self.fmt == GZIP:
                    stream.export_index(os.path.join(tmp, "gzip.idx"))
            except (tarfile.TarError, EOFError, OSError) as e:
                if isinstance(e, OSError) and e.errno not in (None, errno.EIO, errno.EINVAL):
                    raise
                raise BlobError(f"{self.path}: not a readable layer: {e}") from None
            finally:
                stream.close()
            self._dir_times(root, dirs)
            tst = os.fstat(root)
        finally:
            os.close(root)
        self._write_index(tmp, d, files, tst)

    @staticmethod
    def _dir_times(root: int, dirs: dict) -> None:
        """Dirs' times last (their entries changed them), deepest first."""
        for rel, ns in sorted(dirs.items(), key=lambda kv: -kv[0].count("/")):
            fd = sys_open_inside(root, os.fsencode(rel) or b".", O_PATH | os.O_DIRECTORY)
            try:
                os.utime(f"/proc/self/fd/{fd}", ns=(ns, ns))
            finally:
                os.close(fd)

    def _index_bytes(self, d: str, files: dict, tst) -> bytes:
        """index.json: what the skeleton is, then its files last, checked
        by a sha256 of their bytes as written (a load hashes them without
        encoding them again)."""
        body = _json([[ino, p, off, size, h] for ino, (p, off, size, h) in files.items()])
        head = _json({"version": INDEX_VERSION, "digest": "sha256:" + os.path.basename(d), "format": self.fmt,
                      "blob_size": self.size, "tree": [tst.st_dev, tst.st_ino], "owners": self._how(),
                      "files_sha256": hashlib.sha256(body).hexdigest()})
        return head[:-1] + _FILES_KEY + body + b"}"

    @staticmethod
    def _put_index(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _write_index(self, tmp: str, d: str, files: dict, tst) -> None:
        """index.json into tmp (flushed), then tmp in d's place."""
        self._put_index(os.path.join(tmp, "index.json"), self._index_bytes(d, files, tst))
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)

    def _write_index_in_place(self, d: str, files: dict, tst) -> None:
        """index.json beside a tree made in place (lazily): written whole,
        then renamed there (a tree without it is made again)."""
        tmp = os.path.join(d, f"index.json.{os.getpid()}")
        self._put_index(tmp, self._index_bytes(d, files, tst))
        os.rename(tmp, os.path.join(d, "index.json"))

    def _skeleton(self, tf: tarfile.TarFile, root: int):
        """The skeleton of a tar stream (see _make)."""
        def members():
            for ti in tf:
                if ti.isreg() and ti.size:
                    yield ti, ti.offset_data, lambda ti=ti: _sha256(tf.extractfile(ti))
                else:
                    yield ti, None, None
        return self._make(members(), root)

    def _make(self, members, root: int):
        """Make every member's entry below root, members giving (TarInfo,
        where its data lie, a function giving their sha256); returns
        ({ino: (path, where, size, sha256)} of the regular files with data,
        {dir path: mtime})."""
        files: dict[int, tuple] = {}
        dirs: dict[str, int] = {}
        # (the parent of the last member kept open: a tar lists a dir's
        # entries together; modes as given, no umask: the build runs before
        # the daemon's threads do)
        cached, cached_fd = None, -1
        umask = os.umask(0)
        try:
            return self._make_all(members, root, files, dirs, cached, cached_fd)
        finally:
            os.umask(umask)

    def _make_all(self, members, root, files, dirs, cached, cached_fd):
        for ti, where, digest in members:
            rel = _rel(ti.name)
            if rel is None:
                log.warning("%s: member %r leaves the layer: skipped", self.path, ti.name)
                continue
            parent, _, base = rel.rpartition("/")
            if not base:
                if ti.isdir():       # the layer's root: its metadata
                    self._meta_fd(root, ti)
                    dirs[""] = _mtime_ns(ti)
                continue
            if parent != cached or cached_fd < 0:
                if cached_fd >= 0 and cached_fd != root:
                    os.close(cached_fd)
                cached, cached_fd = None, -1
                try:
                    cached_fd = self._parent(root, parent, dirs)
                except OSError as e:
                    log.warning("%s: member %r: parent %r: %s: skipped", self.path, ti.name, parent, e.strerror)
                    continue
                cached = parent
            pfd = cached_fd
            try:
                if base == OCI_OPQ:
                    os.setxattr(f"/proc/self/fd/{pfd}", USER_OPAQUE_XATTR if self.userxattr else OPAQUE_XATTR,
                                b"y")
                    continue
                if base.startswith(OCI_WH):
                    self._replace(pfd, base[len(OCI_WH):])
                    os.mknod(base[len(OCI_WH):], S.S_IFCHR | 0o000, 0, dir_fd=pfd)
                    continue
                if ti.isdir():
                    try:
                        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                    except FileNotFoundError:
                        os.mkdir(base, 0o700, dir_fd=pfd)
                    else:
                        if not S.S_ISDIR(st.st_mode):
                            self._replace(pfd, base)
                            os.mkdir(base, 0o700, dir_fd=pfd)
                    fd = sys_open_inside(pfd, os.fsencode(base), O_PATH | os.O_DIRECTORY)
                    try:
                        self._meta_fd(fd, ti)
                    finally:
                        os.close(fd)
                    dirs[rel] = _mtime_ns(ti)
                    continue
                self._replace(pfd, base)
                if ti.isreg():
                    # (through the fd: no path resolved again for each step)
                    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 0o600 if self.unprivileged else ti.mode & 0o777, dir_fd=pfd)
                    try:
                        if ti.size:
                            os.ftruncate(fd, ti.size)
                        st = os.fstat(fd)
                        if self.unprivileged:
                            os.setxattr(fd, OWNER_XATTR, _owner(ti, S.S_IFREG))
                        else:
                            if (st.st_uid, st.st_gid) != (ti.uid, ti.gid):
                                os.fchown(fd, ti.uid, ti.gid)
                            if ti.mode & 0o7000 or S.S_IMODE(st.st_mode) != ti.mode & 0o7777:
                                # (after chown, which clears set-id bits; and
                                # whatever the umask took)
                                os.fchmod(fd, ti.mode & 0o7777)
                        for k, v in self._xattrs(ti):
                            os.setxattr(fd, k, v)
                        ns = _mtime_ns(ti)
                        os.utime(fd, ns=(ns, ns))
                    finally:
                        os.close(fd)
                    if ti.size:
                        files[st.st_ino] = (rel, where, ti.size, digest())
                elif ti.islnk():
                    trel = _rel(ti.linkname)
                    if not trel:
                        raise OSError(errno.EXDEV, "hard link target outside the layer")
                    tparent, _, tbase = trel.rpartition("/")
                    tfd = sys_open_inside(root, os.fsencode(tparent) or b".", O_PATH | os.O_DIRECTORY)
                    try:
                        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                    finally:
                        os.close(tfd)
                elif ti.issym():
                    os.symlink(ti.linkname, base, dir_fd=pfd)
                    if not self.unprivileged:   # (no user.* xattr on a symlink: the daemon's)
                        os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
                    for k, v in self._xattrs(ti):
                        os.setxattr(f"/proc/self/fd/{pfd}/{base}", k, v, follow_symlinks=False)
                    ns = _mtime_ns(ti)
                    os.utime(base, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
                elif (ti.ischr() or ti.isblk()) and self.unprivileged:
                    # (as a rootless extraction: no device without privilege)
                    log.info("%s: device %r not made (no privilege)", self.path, ti.name)
                elif ti.ischr() or ti.isblk() or ti.isfifo():
                    kind = S.S_IFCHR if ti.ischr() else S.S_IFBLK if ti.isblk() else S.S_IFIFO
                    dev = os.makedev(ti.devmajor, ti.devminor) if kind != S.S_IFIFO else 0
                    os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
                    fd = sys_open_inside(pfd, os.fsencode(base), O_PATH)
                    try:
                        self._meta_fd(fd, ti)
                    finally:
                        os.close(fd)
                else:
                    log.warning("%s: member %r of type %r: skipped", self.path, ti.name, ti.type)
            except OSError as e:
                log.warning("%s: member %r: %s: skipped", self.path, ti.name, e.strerror)
        if cached_fd >= 0 and cached_fd != root:
            os.close(cached_fd)
        return files, dirs

    def _parent(self, root: int, parent: str, dirs: dict) -> int:
        """An O_PATH fd of the dir parent below root, made (0755, root's)
        where the tar did not list it first."""
        if not parent:
            return root
        try:
            return sys_open_inside(root, os.fsencode(parent), O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            pass
        fd = root
        done = []
        for c in parent.split("/"):
            try:
                nfd = sys_open_inside(fd, os.fsencode(c), O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                os.mkdir(c, 0o755, dir_fd=fd)
                nfd = sys_open_inside(fd, os.fsencode(c), O_PATH | os.O_DIRECTORY)
                self._mark_made_dir(nfd)
            if fd != root:
                os.close(fd)
            fd = nfd
            done.append(c)
        return fd

    def _replace(self, pfd: int, name: str) -> None:
        """A later member of the same name replaces an earlier one."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if S.S_ISDIR(st.st_mode):
            fd = sys_open_inside(pfd, os.fsencode(name), os.O_RDONLY | os.O_DIRECTORY)
            try:
                for e in os.listdir(fd):
                    raise OSError(errno.ENOTEMPTY, f"a non-empty dir {name!r} replaced ({e!r} in it)")
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    def _meta_fd(self, fd: int, ti: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs and times of the object at fd (an O_PATH fd
        or an open one), as extraction sets them (unprivileged: owner and
        mode in OWNER_XATTR, a dir's own mode 0700, a fifo the daemon's)."""
        p = f"/proc/self/fd/{fd}"
        if not self.unprivileged:
            os.chown(p, ti.uid, ti.gid)
            os.chmod(p, ti.mode & 0o7777)      # (after chown, which clears set-id bits)
        elif ti.isdir():
            os.chmod(p, 0o700)
            os.setxattr(p, OWNER_XATTR, _owner(ti, S.S_IFDIR))
        for k, v in self._xattrs(ti):
            os.setxattr(p, k, v)
        ns = _mtime_ns(ti)
        os.utime(p, ns=(ns, ns))

    # ------------------------------------------------------------ data

    def describe(self) -> str:
        """The layer for people (overlay which, the layer xattr)."""
        return f"{self.path} (layer blob {self.digest}, {self.fmt})"

    def describe_entry(self, ino: int) -> str:
        """Where in the blob the skeleton file with this inode number has
        its data ("" for one without data)."""
        f = self.files.get(ino)
        if f is None:
            return ""
        state = "taken out" if ino in self.done else "not read yet"
        if isinstance(f[1], list):
            return (f" (entry {f[0]}: {f[2]} bytes in {len(f[1])} chunk(s) at {min(c[0] for c in f[1])}"
                    f"-{max(c[1] for c in f[1])} of the blob, {state})")
        return f" (entry {f[0]}: {f[2]} bytes at offset {f[1]} of the tar stream, {state})"

    def stats(self) -> dict:
        return {"blob": self.path, "digest": self.digest, "format": self.fmt,
                # (files: those made so far, while a lazily made tree is not whole)
                "tree_made": self._built.is_set(),
                "files": len(self.files), "files_filled": len(self.done & self.files.keys()),
                "bytes_filled": self.fetched, "seconds_filling": round(self.seconds, 3)}

    def needs(self, ino: int) -> bool:
        return ino in self.files and ino not in self.done

    def ensure(self, ino: int, budget: int = READAHEAD) -> None:
        """The data of the skeleton file with this inode number, in place
        (written from the blob into the skeleton file, its times kept),
        before they are read, with up to budget bytes of the small files
        that follow it. A zstd blob (no random access) fills all its files
        at the first call."""
        if ino not in self.files or ino in self.done:
            return
        t0 = time.monotonic()
        _FILLING.add(1)
        try:
            self._ensure(ino, budget)
        finally:
            _FILLING.add(-1)
            with self.stats_lock:
                self.seconds += time.monotonic() - t0

    def prefetch(self) -> None:
        """prefetch=all: every file's data in place, in the blob's order, a
        run of PREFETCH_RUN bytes at a time (an open meanwhile waits for
        one run at most); run in a thread of its own. A file that fails
        is left for its open (which then fails or retries)."""
        self._built.wait()
        t0, failed = time.monotonic(), 0
        for ino in self._in_order():
            if ino in self.done or self.tree_fd < 0:
                continue
            try:
                self.ensure(ino, PREFETCH_RUN)
            except OSError as exc:
                failed += 1
                log.warning("%s: prefetch of %s: %s", self.path, self.files[ino][0], exc)
                if failed >= 10:
                    log.warning("%s: prefetch stopped after 10 failures", self.path)
                    return
        log.info("%s: prefetched %d files in %.1f s", self.path, len(self.done), time.monotonic() - t0)

    def _ensure(self, ino: int, budget: int = READAHEAD) -> None:
        with self.lock:
            if ino in self.done:
                return
            if self.fmt == ZSTD:
                self._fill_all()
                return
            if self.reader is None:
                from .blob import RandomReader
                self.reader = RandomReader(self.fd, self.fmt,
                                           os.path.join(self.dir, "gzip.idx") if self.fmt == GZIP else None)
            if self._in_place(ino):
                return
            # the file, then small files after it in the stream while the
            # decompressor is there (READAHEAD bytes at most)
            for i in [ino] + self._following(ino, budget, lambda i: self.files[i][2]):
                if i != ino and self._in_place(i):
                    continue
                rel, off, size, want = self.files[i]

                def pieces(off=off, size=size):
                    pos = 0
                    while pos < size:
                        n = min(size - pos, 1 << 20)
                        yield self.reader.read(off + pos, n)
                        pos += n
                try:
                    self._fill(i, rel, size, want, pieces())
                except OSError:
                    if i == ino:
                        raise

    def _fill(self, ino: int, rel: str, size: int, want: str, pieces, writer=None) -> None:
        """Write the file's data into its skeleton file, checked against
        the digest the index has of them: data that differ (a blob changed
        or damaged since) are never left in place, and the read that
        needed them fails with EIO. writer(fd) -> whether what it wrote is
        right, instead (chunks written and checked each by itself)."""
        fd = sys_open_inside(self.tree_fd, os.fsencode(rel), os.O_WRONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_ino != ino:
                raise BlobError(f"{self.path}: skeleton file {rel!r} is not the one indexed")
            # (a write drops security.capability, as the kernel's
            # file_remove_privs does: put back what the skeleton had)
            kept = {k: os.getxattr(fd, k) for k in os.listxattr(fd)}
            try:
                if writer is not None:
                    ok = writer(fd)
                else:
                    pos, digest = self._write_hashed(fd, pieces)
                    ok = pos == size and digest == want
                if not ok:
                    log.error("%s: the data of %r differ from the index's digest (blob changed or damaged)",
                              self.path, rel)
                    raise OSError(errno.EIO, f"{rel}: data differ from the layer's index")
            except BaseException:
                # (wrong data, or a network error half way: the file back
                # to holes, not a half that the next open would hash)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                raise
            finally:
                now = set(os.listxattr(fd))
                for k, v in kept.items():
                    if k not in now:
                        os.setxattr(fd, k, v)
                if os.fstat(fd).st_mode != st.st_mode:
                    os.chmod(fd, S.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
        with self.stats_lock:
            self.fetched += size
        self.done.add(ino)

    @staticmethod
    def _write_hashed(fd: int, pieces) -> tuple[int, str]:
        """pieces written into fd from offset 0 and hashed: (bytes, their
        sha256)."""
        h = hashlib.sha256()
        pos = 0
        for b in pieces:
            h.update(b)
            os.pwrite(fd, b, pos)
            pos += len(b)
        return pos, h.hexdigest()

    def _in_place(self, ino: int) -> bool:
        """Are the file's data in its skeleton file already (put there by an
        earlier mount)? Trusted only once they hash to the index's digest:
        nothing is written to disk to say a file is complete, so a crash
        can never make half-written data count as done."""
        rel, _where, size, want = self.files[ino]
        try:
            fd = sys_open_inside(self.tree_fd, os.fsencode(rel), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if st.st_ino != ino or st.st_blocks == 0:
                return False
            h = hashlib.sha256()
            pos = 0
            while pos < size:
                b = os.pread(fd, min(size - pos, 1 << 20), pos)
                if not b:
                    return False
                h.update(b)
                pos += len(b)
            if h.hexdigest() != want:
                return False
        finally:
            os.close(fd)
        self.done.add(ino)
        return True

    def _following(self, ino: int, budget: int, span) -> list[int]:
        """Files after ino in the blob whose data are not in place, as many
        as fit in budget (span(ino) -> their cost): filled with it, one read
        or request for several small files."""
        self._in_order()
        out = []
        k = self._pos.get(ino, len(self._order)) + 1
        while k < len(self._order) and budget > 0:
            nxt = self._order[k]
            if nxt not in self.done:
                cost = span(nxt)
                if cost > budget:
                    break
                budget -= cost
                out.append(nxt)
            k += 1
        return out

    def _in_order(self) -> list[int]:
        """The inode numbers of the files with data, in the blob's order."""
        if self._order is None or len(self._order) != len(self.files):     # (a tree made lazily grows)
            self._order = sorted(self.files, key=lambda i: self._key(self.files[i][1]))
            self._pos = {i: k for k, i in enumerate(self._order)}
        return self._order

    @staticmethod
    def _key(where) -> int:
        return where if isinstance(where, int) else min(c[0] for c in where)

    def _fill_all(self) -> None:
        """One pass over a stream without random access: every file whose
        data are not in place yet gets them."""
        todo = sorted((off, ino, rel, size, h) for ino, (rel, off, size, h) in self.files.items()
                      if ino not in self.done)
        stream = open_stream(self.fd, self.fmt)
        try:
            pos = 0
            for off, ino, rel, size, h in todo:
                if ino in self.done:
                    continue
                skip = off - pos
                while skip > 0:
                    skip -= len(read_exactly(stream, min(skip, 1 << 20), self.path))
                pos = off + size

                def pieces(size=size):
                    left = size
                    while left > 0:
                        b = read_exactly(stream, min(left, 1 << 20), self.path)
                        left -= len(b)
                        yield b
                self._fill(ino, rel, size, h, pieces())
        finally:
            stream.close()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.tree_fd >= 0:
            os.close(self.tree_fd)
            self.tree_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1


__all__ = ["BlobLayer", "BlobError", "default_cache", "GZIP", "TAR", "ZSTD"]
