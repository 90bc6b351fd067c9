"""faultyfs: a tiny read-only pyfuse3 passthrough filesystem that fails on purpose.

Used by tests/test_reliability.py as a *lower layer* that returns EIO, to
check that an I/O error of a layer reaches the overlay's caller as EIO and
that the overlay keeps serving afterwards.

It mirrors a source directory (read-only) and injects faults by name:

* ``read()`` of a file whose name starts with ``bad`` fails with EIO
  (open, stat and readdir of it work);
* ``lookup()`` of a name starting with ``eio`` fails with EIO (the name is
  still listed by readdir);
* ``opendir()`` of a directory whose name starts with ``baddir`` fails with EIO;
* ``read()`` of a file whose name starts with ``slow`` answers after
  ``FAULTYFS_SLOW_S`` seconds (default 3): a layer on a slow disk or network.

Run it in the foreground::

    python tests/faultyfs.py SRC MOUNTPOINT

It prints ``ready`` on stdout once mounted and serves until unmounted
(``fusermount3 -u MOUNTPOINT``) or SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import pyfuse3
import trio
from pyfuse3 import FUSEError


def _fault_read(name: bytes) -> bool:
    return name.startswith(b"bad")


def _fault_lookup(name: bytes) -> bool:
    return name.startswith(b"eio")


def _fault_opendir(name: bytes) -> bool:
    return name.startswith(b"baddir")


def _slow_read(name: bytes) -> bool:
    return name.startswith(b"slow")


SLOW_S = float(os.environ.get("FAULTYFS_SLOW_S", "3"))


class FaultyFS(pyfuse3.Operations):
    """Read-only passthrough of ``src`` with the faults listed above."""

    enable_writeback_cache = False

    def __init__(self, src: str):
        super().__init__()
        self.src = os.fsencode(os.path.abspath(src))
        self.paths = {pyfuse3.ROOT_INODE: self.src}   # inode -> path
        self.handles = {}                              # fh -> (fd, faulty)
        self._fh = 0

    # -------------------------------------------------------------- helpers

    def _path(self, inode) -> bytes:
        try:
            return self.paths[inode]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _inode(self, path: bytes, st) -> int:
        if path == self.src:
            return pyfuse3.ROOT_INODE
        self.paths[st.st_ino] = path
        return st.st_ino

    def _attrs(self, path: bytes) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(path, st)
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, f, getattr(st, f))
        return a

    # -------------------------------------------------------------- handlers

    async def lookup(self, parent_inode, name, ctx):
        if _fault_lookup(name):
            raise FUSEError(errno.EIO)
        return self._attrs(os.path.join(self._path(parent_inode), name))

    async def getattr(self, inode, ctx):
        return self._attrs(self._path(inode))

    async def readlink(self, inode, ctx):
        try:
            return os.readlink(self._path(inode))
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def opendir(self, inode, ctx):
        path = self._path(inode)
        if _fault_opendir(os.path.basename(path)):
            raise FUSEError(errno.EIO)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise FUSEError(e.errno) from None
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                attrs = self._attrs(child)
            except FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, names[i], attrs, i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        path = self._path(inode)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise FUSEError(e.errno) from None
        self._fh += 1
        name = os.path.basename(path)
        self.handles[self._fh] = (fd, "bad" if _fault_read(name) else "slow" if _slow_read(name) else None)
        # direct_io: every read reaches us, so the fault cannot hide in a cache
        return pyfuse3.FileInfo(fh=self._fh, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        fd, faulty = self.handles[fh]
        if faulty == "bad":
            raise FUSEError(errno.EIO)
        if faulty == "slow":
            await trio.sleep(SLOW_S)
        return os.pread(fd, size, off)

    async def release(self, fh):
        fd, _ = self.handles.pop(fh, (None, None))
        if fd is not None:
            os.close(fd)

    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def listxattr(self, inode, ctx):
        try:
            return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]
        except OSError as e:
            raise FUSEError(e.errno) from None

    async def statfs(self, ctx):
        v = os.statvfs(self.src)
        s = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, f, getattr(v, f))
        return s


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: faultyfs.py SRC MOUNTPOINT", file=sys.stderr)
        return 2
    src, mp = argv
    fs = FaultyFS(src)
    pyfuse3.init(fs, mp, {"fsname=faultyfs", "subtype=faultyfs", "ro", "default_permissions"})
    print("ready", flush=True)
    stop = False

    async def serve():
        nonlocal stop
        async with trio.open_nursery() as nursery:
            async def on_signal():
                nonlocal stop
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        stop = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
