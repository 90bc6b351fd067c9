"""overlay.fs: the pyfuse3 adapter over overlay_core (engine=pyfuse3).

A protocol adapter only: FUSE inode numbers and file handles in, calls into
the Cython core (overlay_core.Overlay), EntryAttributes out. OSError from the
core becomes FUSEError(errno) here and nowhere else; any other exception is
logged and answered with EIO, so one bad request never takes the mount down.

Inode numbers: the FUSE inode number of a Node is its `fuse_id`, given out
here from a counter (the root is pyfuse3.ROOT_INODE); the st_ino reported is
the Node's `ino`, the kernel overlay's number, which several distinct inodes
can share (see overlay._fuseattr).
Lookup counts go up with every entry handed to the kernel (lookup, create,
readdirplus) and down in forget; a Node is dropped at zero.

Long work leaves the trio thread: copy-up of regular files bigger than
COPY_UP_INLINE and fsync run in a worker thread, holding `self.lock`, which
every mutating request also takes, so the tree never changes under a copy-up.

pyfuse3 serves requests with `workers` trio tasks (mount option, default 1).
One is fastest: with more, pyfuse3 starts and retires tasks around nearly
every request. With one, requests wait while a big file is copied up or
synced; `workers=N` lets up to N requests be served at once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import errno
import logging
import os
import signal
import stat as S
import threading
from typing import Callable

import pyfuse3
import trio
from pyfuse3 import FUSEError

from overlay_core import Overlay

from . import _fuseattr, daemon
from .idmap import IdMap

log = logging.getLogger(__name__)

# Regular files up to this size are copied up on the trio thread: a thread
# hop costs more than copying them.
COPY_UP_INLINE = 256 * 1024

# Reading this xattr on the mount's root gives the counters as JSON
# (overlay stats); it is never stored and cannot be set.
STATS_XATTR = b"user.overlay-fuse.stats"

ROOT = pyfuse3.ROOT_INODE


class _Handle:
    __slots__ = ("fd", "node", "flags", "lower")

    def __init__(self, fd, node, flags):
        self.fd = fd
        self.node = node
        self.flags = flags
        self.lower = node.upper < 0 or node.metacopy    # opened before a (data) copy-up


class _DirHandle:
    __slots__ = ("node", "entries")

    def __init__(self, node):
        self.node = node
        self.entries = None


class OverlayOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for one overlay mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    # the kernel caches POSIX ACLs (and checks them): `ls -l` then asks us
    # for system.posix_acl_* once per inode instead of every time
    enable_acl = True

    def __init__(self, core: Overlay, *, entry_timeout: float = 300.0, attr_timeout: float = 300.0,
                 uidmap: IdMap | None = None, gidmap: IdMap | None = None,
                 squash_to_root: bool = False):
        super().__init__()
        self.core = core
        self.uidmap = uidmap or None
        self.gidmap = gidmap or None
        self.squash = squash_to_root
        self.counts = collections.Counter()   # request name -> count (overlay stats)
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.inodes = {ROOT: core.root}      # FUSE inode -> Node
        self.nlookup = {ROOT: 1}              # FUSE inode -> kernel lookup count
        self.handles = {}                     # fh -> _Handle
        core.root.fuse_id = ROOT
        self._next_id = ROOT + 1
        self.dirs = {}                        # fh -> _DirHandle
        self._next_dirfh = 1
        self._next_fh = 1
        self.lock = trio.Lock()

    # ------------------------------------------------------------ helpers

    def _key(self, node) -> int:
        fid = node.fuse_id
        if not fid:
            if _fuseattr.supported:
                fid = self._next_id
                self._next_id += 1
            else:
                fid = node.ino
            node.fuse_id = fid
        return fid

    def _node(self, inode):
        try:
            return self.inodes[inode]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _attrs(self, node, st=None) -> pyfuse3.EntryAttributes:
        if st is None:
            st = self.core.getattr(node)
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        if _fuseattr.supported:
            _fuseattr.set_nodeid(e, self._key(node))
        else:
            e.st_ino = self._key(node)
        e.generation = 0
        if node.ghost:
            # a whiteout that readdir lists: never cache it, so the next use
            # of the name looks it up and gets ENOENT, as on the kernel
            e.entry_timeout = 0
            e.attr_timeout = 0
        else:
            e.entry_timeout = self.entry_timeout
            e.attr_timeout = self.attr_timeout
        e.st_mode = st.st_mode
        e.st_nlink = 1 if node.merged else st.st_nlink
        if e.st_nlink > 1 and not node.is_dir and self.core.index:
            e.entry_timeout = 0     # index=on: the core learns the name used (see engine)
        if self.squash:
            e.st_uid = e.st_gid = 0
        else:
            e.st_uid = self.uidmap.shown(st.st_uid) if self.uidmap else st.st_uid
            e.st_gid = self.gidmap.shown(st.st_gid) if self.gidmap else st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        if node.upper < 0 and S.S_ISREG(st.st_mode):
            # remember what the kernel now believes of a lower file, so an
            # edit made to it directly is noticed at the next open
            node.cached = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return e

    def _ref(self, node, count: int = 1) -> int:
        key = self._key(node)
        known = self.inodes.get(key)
        if known is not node:
            self.inodes[key] = node
            self.core.remember(node)
            if known is None:
                self.nlookup[key] = 0
        self.nlookup[key] = self.nlookup.get(key, 0) + count
        return key

    def _entry(self, node) -> pyfuse3.EntryAttributes:
        st, node.st = node.st, None     # what the lookup just saw, if any
        attrs = self._attrs(node, st)
        self._ref(node)
        return attrs

    def _ids(self, uid: int, gid: int):
        """Host ids to store for ids given through the mount."""
        if self.uidmap:
            uid = self.uidmap.host(uid)
        if self.gidmap:
            gid = self.gidmap.host(gid)
        return uid, gid

    async def _copy_up(self, node, data: bool = True, meta: bool = False):
        """Copy node up, off the trio thread when its data are big; returns
        the node to use from now on (see Overlay.copy_up: meta for a change
        of metadata only, which leaves a metacopy file's data below)."""
        if node.upper >= 0 and (meta or not node.metacopy):
            return node
        if not node.is_dir and data and not (meta and self.core.metacopy):
            st = self.core.getattr(node)
            if S.S_ISREG(st.st_mode) and st.st_size > COPY_UP_INLINE:
                return await trio.to_thread.run_sync(self.core.copy_up, node, data, meta)
        return self.core.copy_up(node, data, meta)

    # ------------------------------------------------------------ lookup & attrs

    async def lookup(self, parent_inode, name, ctx):
        self.counts['lookup'] += 1
        with _errors():
            node = self.core.lookup(self._node(parent_inode), name)
            return self._entry(node)

    async def forget(self, inode_list):
        self.counts['forget'] += 1
        for inode, count in inode_list:
            if inode == ROOT:
                continue
            left = self.nlookup.get(inode, 0) - count
            if left > 0:
                self.nlookup[inode] = left
                continue
            self.nlookup.pop(inode, None)
            node = self.inodes.pop(inode, None)
            if node is not None:
                self.core.forget(node)

    async def getattr(self, inode, ctx):
        self.counts['getattr'] += 1
        with _errors():
            return self._attrs(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        self.counts['setattr'] += 1
        with _errors():
            node = self._node(inode)
            kw = {}
            if fields.update_mode:
                kw["mode"] = attr.st_mode
            if fields.update_uid:
                kw["uid"] = self.uidmap.host(attr.st_uid) if self.uidmap else attr.st_uid
            if fields.update_gid:
                kw["gid"] = self.gidmap.host(attr.st_gid) if self.gidmap else attr.st_gid
            if fields.update_size:
                kw["size"] = attr.st_size
                if fh is not None and fh in self.handles:
                    kw["fh"] = self.handles[fh].fd
            if fields.update_atime:
                kw["atime_ns"] = attr.st_atime_ns
            if fields.update_mtime:
                kw["mtime_ns"] = attr.st_mtime_ns
            async with self._mutating():
                if kw:
                    self.core._need_upper()
                    await self._copy_up(node, data=kw.get("size", 1) != 0, meta="size" not in kw)
                    self.core.setattr(node, **kw)
            return self._attrs(node)

    async def readlink(self, inode, ctx):
        self.counts['readlink'] += 1
        with _errors():
            return self.core.readlink(self._node(inode))

    async def access(self, inode, mode, ctx):
        self.counts['access'] += 1
        with _errors():
            st = self.core.getattr(self._node(inode))
        if mode & os.W_OK and self.core.upper_root < 0:
            raise FUSEError(errno.EROFS)
        if ctx.uid == 0:
            if mode & os.X_OK and not S.S_ISDIR(st.st_mode):
                return bool(st.st_mode & 0o111)
            return True
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (bits & mode) == mode

    # ------------------------------------------------------------ namespace

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self.counts['mknod'] += 1
        with _errors():
            async with self._mutating():
                node = self.core.mknod(self._node(parent_inode), name,
                                       mode & ~ctx.umask, rdev, *self._ids(ctx.uid, ctx.gid))
            return self._entry(node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        self.counts['mkdir'] += 1
        with _errors():
            async with self._mutating():
                node = self.core.mkdir(self._node(parent_inode), name,
                                       S.S_IMODE(mode) & ~ctx.umask, *self._ids(ctx.uid, ctx.gid))
            return self._entry(node)

    async def symlink(self, parent_inode, name, target, ctx):
        self.counts['symlink'] += 1
        with _errors():
            async with self._mutating():
                node = self.core.symlink(self._node(parent_inode), name, target,
                                         *self._ids(ctx.uid, ctx.gid))
            return self._entry(node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self.counts['link'] += 1
        with _errors():
            async with self._mutating():
                src = await self._copy_up(self._node(inode), meta=True)
                node = self.core.link(src, self._node(new_parent_inode), new_name)
            return self._entry(node)

    async def unlink(self, parent_inode, name, ctx):
        self.counts['unlink'] += 1
        with _errors():
            async with self._mutating():
                self.core.unlink(self._node(parent_inode), name)

    async def rmdir(self, parent_inode, name, ctx):
        self.counts['rmdir'] += 1
        with _errors():
            async with self._mutating():
                self.core.rmdir(self._node(parent_inode), name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.counts['rename'] += 1
        with _errors():
            async with self._mutating():
                self.core.rename(self._node(parent_inode_old), name_old,
                                 self._node(parent_inode_new), name_new, flags)

    # ------------------------------------------------------------ files

    async def _invalidate(self, key: int, attr_only: bool) -> None:
        """Drop what the kernel caches of an inode. In a worker thread: the
        kernel may wait for a page lock held by a read we must still answer."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, key, attr_only)
        except OSError as exc:
            log.debug("invalidate_inode(%d): %s", key, exc)

    @contextlib.asynccontextmanager
    async def _mutating(self):
        """Hold the lock for a request that changes the tree; afterwards tell
        the kernel of inode numbers the change renumbered."""
        async with self.lock:
            try:
                yield
            finally:
                if self.core.renumbered:
                    await self._renumbered()

    async def _renumbered(self) -> None:
        """Tell the kernel about st_ino changes made by a copy-up (hard-linked
        lower files get a new number, as in the kernel overlay)."""
        while self.core.renumbered:
            node = self.core.renumbered.pop()
            if node.fuse_id and node.fuse_id in self.inodes:
                await self._invalidate(node.fuse_id, True)

    async def _open_info(self, fd, node, flags) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = _Handle(fd, node, flags)
        node.pins += 1          # keeps its fds: fstat must work after an unlink
        keep = True
        if node.upper < 0:
            st = os.fstat(fd)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if node.changed(*now):
                # the lower file was changed behind the mount: drop what the
                # kernel cached of it (attributes and pages)
                keep = False
                await self._invalidate(self._key(node), True)
            node.cached = now
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    def _backing_flags(self, flags: int) -> int:
        """With the writeback cache the kernel handles O_APPEND itself and may
        read pages of a file opened write-only: open the real file accordingly."""
        if self.enable_writeback_cache:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    async def open(self, inode, flags, ctx):
        self.counts['open'] += 1
        with _errors():
            flags = self._backing_flags(flags)
            node = self._node(inode)
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                async with self._mutating():
                    self.core._need_upper()
                    node = await self._copy_up(node, data=not flags & os.O_TRUNC)
                    fd, node = self.core.open(node, flags)
            else:
                fd, node = self.core.open(node, flags)
            return await self._open_info(fd, node, flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        self.counts['create'] += 1
        with _errors():
            flags = self._backing_flags(flags)
            async with self._mutating():
                fd, node = self.core.create(self._node(parent_inode), name, flags,
                                            S.S_IMODE(mode) & ~ctx.umask,
                                            *self._ids(ctx.uid, ctx.gid))
            attrs = self._entry(node)
            return await self._open_info(fd, node, flags), attrs

    def _fd(self, fh) -> int:
        """The fd behind a handle. A handle opened on a lower file before it
        was copied up follows the copy, as the kernel overlay's files do."""
        h = self.handles[fh]
        if h.lower and h.node.upper >= 0 and not h.node.metacopy:
            fd = os.open(f"/proc/self/fd/{h.node.upper}",
                         h.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY) | os.O_CLOEXEC)
            os.close(h.fd)
            h.fd = fd
            h.lower = False
        return h.fd

    async def read(self, fh, off, size):
        self.counts['read'] += 1
        with _errors():
            return os.pread(self._fd(fh), size, off)

    async def write(self, fh, off, buf):
        self.counts['write'] += 1
        with _errors():
            return os.pwrite(self._fd(fh), buf, off)

    async def flush(self, fh):
        self.counts['flush'] += 1
        pass

    async def release(self, fh):
        self.counts['release'] += 1
        h = self.handles.pop(fh, None)
        if h is not None:
            os.close(h.fd)
            h.node.pins -= 1
            if not h.node.pins and h.node.fuse_id not in self.inodes:
                self.core.release(h.node)       # forgotten while open

    async def fsync(self, fh, datasync):
        self.counts['fsync'] += 1
        with _errors():
            await trio.to_thread.run_sync(self.core.fsync, self._fd(fh), bool(datasync))

    # ------------------------------------------------------------ directories

    async def opendir(self, inode, ctx):
        self.counts['opendir'] += 1
        with _errors():
            node = self._node(inode)
            if not node.is_dir:
                raise FUSEError(errno.ENOTDIR)
            fh = self._next_dirfh
            self._next_dirfh += 1
            self.dirs[fh] = _DirHandle(node)
            return fh

    async def readdir(self, fh, start_id, token):
        self.counts['readdir'] += 1
        with _errors():
            h = self.dirs[fh]
            if h.entries is None or start_id == 0:
                node = h.node
                parent = node.parent if node.parent is not None else node
                entries = [(b".", node, self._attrs(node)),
                           (b"..", parent, self._attrs(parent))]
                for name, child in self.core.readdir(node):
                    st, child.st = child.st, None
                    try:
                        entries.append((name, child, self._attrs(child, st)))
                    except FileNotFoundError:
                        continue
                h.entries = entries
            entries = h.entries
            for i in range(start_id, len(entries)):
                name, child, attrs = entries[i]
                if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                    break
                if name != b"." and name != b"..":
                    self._ref(child)

    async def releasedir(self, fh):
        self.counts['releasedir'] += 1
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        self.counts['fsyncdir'] += 1
        with _errors():
            node = self.dirs[fh].node
            if node.upper >= 0:
                fd = os.open(f"/proc/self/fd/{node.upper}", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    await trio.to_thread.run_sync(self.core.fsync, fd, bool(datasync))
                finally:
                    os.close(fd)

    async def statfs(self, ctx):
        self.counts['statfs'] += 1
        with _errors():
            v = self.core.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = v.f_bsize
        s.f_frsize = v.f_frsize
        s.f_blocks = v.f_blocks
        s.f_bfree = v.f_bfree
        s.f_bavail = v.f_bavail
        s.f_files = v.f_files
        s.f_ffree = v.f_ffree
        s.f_favail = v.f_favail
        s.f_namemax = v.f_namemax
        return s

    # ------------------------------------------------------------ xattrs

    def stats(self) -> dict:
        """The counters `overlay stats` shows."""
        return {"mount": getattr(self, "mount_info", None),
                "requests": dict(self.counts), "core": dict(self.core.counters),
                "layers": self.core.layer_stats(),
                "inodes_known": len(self.inodes), "open_files": len(self.handles)}

    async def getxattr(self, inode, name, ctx):
        self.counts['getxattr'] += 1
        if name == STATS_XATTR and inode == ROOT:
            return json.dumps(self.stats()).encode()
        with _errors():
            return self.core.getxattr(self._node(inode), name)

    async def listxattr(self, inode, ctx):
        self.counts['listxattr'] += 1
        with _errors():
            return self.core.listxattr(self._node(inode))

    async def setxattr(self, inode, name, value, ctx):
        self.counts['setxattr'] += 1
        if name == STATS_XATTR:
            raise FUSEError(errno.EPERM)        # reserved for overlay stats
        with _errors():
            async with self._mutating():
                node = self._node(inode)
                self.core._need_upper()
                node = await self._copy_up(node, meta=True)
                self.core.setxattr(node, name, value)

    async def removexattr(self, inode, name, ctx):
        self.counts['removexattr'] += 1
        with _errors():
            async with self._mutating():
                self.core.removexattr(self._node(inode), name)


class _errors:
    """Context manager: OSError -> FUSEError(errno); anything else -> EIO, logged."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if exc is None or isinstance(exc, FUSEError):
            return False
        if isinstance(exc, OSError) and exc.errno:
            raise FUSEError(exc.errno) from None
        if isinstance(exc, (KeyError, trio.Cancelled, KeyboardInterrupt, SystemExit)):
            if isinstance(exc, KeyError):
                raise FUSEError(errno.EBADF) from None
            return False
        log.error("unexpected error in request handler", exc_info=(etype, exc, tb))
        raise FUSEError(errno.EIO) from None


def fuse_options(config) -> set:
    opts = {"default_permissions", f"fsname={config.fsname}", f"subtype={config.subtype}"}
    if os.geteuid() == 0:
        opts |= {"suid", "dev"}         # (as the native engine: see options.default_flags)
    if config.allow_other:
        opts.add("allow_other")
    if config.read_only:
        opts.add("ro")
    if config.debug:
        opts.add("debug")
    return opts


def run_fs(config, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Mount config on mountpoint and serve until it is unmounted (or the
    process gets SIGTERM/SIGINT, which unmounts). Calls on_ready() once the
    mount is live."""
    daemon.raise_fd_limit()
    daemon.presize_fd_table()
    core = daemon.build_core(config)
    ops = OverlayOperations(core, entry_timeout=config.entry_timeout,
                            attr_timeout=config.attr_timeout,
                            uidmap=IdMap.parse(config.uidmapping, "uidmapping") if config.uidmapping else None,
                            gidmap=IdMap.parse(config.gidmapping, "gidmapping") if config.gidmapping else None,
                            squash_to_root=config.squash_to_root)
    ops.enable_writeback_cache = config.writeback
    ops.mount_info = daemon.mount_info(config, mountpoint)
    pyfuse3.init(ops, mountpoint, fuse_options(config))
    unmount = False
    try:
        # from a thread: the write waits until the kernel has initialised
        # the connection, which needs our request loop running
        threading.Thread(target=daemon.set_readahead, args=(mountpoint, daemon.READAHEAD_KIB),
                         name="readahead", daemon=True).start()
        on_ready()

        async def main():
            nonlocal unmount
            async with trio.open_nursery() as nursery:
                async def on_signal():
                    nonlocal unmount
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                        async for sig in sigs:
                            log.info("signal %d: unmounting", sig)
                            unmount = True
                            pyfuse3.terminate()
                            return

                nursery.start_soon(on_signal)
                await pyfuse3.main(min_tasks=1, max_tasks=config.workers or 1)
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        pyfuse3.close(unmount=unmount)
        core.close()
