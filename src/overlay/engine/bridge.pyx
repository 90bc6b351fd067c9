# cython: language_level=3
"""overlay.engine.bridge: FUSE requests to overlay nodes.

The middle layer of the native engine, between the wire (wire.pyx: fds,
threads, replies) and the overlay core (overlay_core, which knows nothing
of FUSE). A protocol adapter only: node ids, lookup counts, file handles
and backing ids in, calls into the core, replies out. OSError from the core
becomes an errno reply in handle() and nowhere else; any other exception is
logged by the wire and answered with EIO.

Node ids: the kernel's id of a Node is its `fuse_id`, given out from a
counter that never wraps (the root is FUSE_ROOT_ID); the st_ino reported is
the Node's `ino`, the kernel overlay's number, which several Nodes can share.
Lookup counts go up with every entry handed to the kernel (lookup, create,
mkdir..., readdirplus records) and down with forget; a Node is dropped at 0.

Locking: `lock` guards the core and these tables; every request holds it
while it calls into the core. Data (read, write without passthrough), fsync
and the copy of a big file's data during copy-up run without it.
"""

import errno as E
import json
import logging
import os
import stat as S
import threading
import time

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t, int64_t, int32_t
from libc.string cimport memset, memcpy
from posix.unistd cimport pread, pwrite, write

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

from overlay.engine.abi cimport *
from overlay.engine.wire cimport Session, READ_BUFFER

log = logging.getLogger("overlay.engine")

# Reading this xattr on the mount's root gives the counters as JSON
# (overlay stats); it is never stored and cannot be set.
STATS_XATTR = b"user.overlay-fuse.stats"

cdef extern from "<sys/sysmacros.h>" nogil:
    unsigned int c_major "major"(unsigned long dev)
    unsigned int c_minor "minor"(unsigned long dev)
    unsigned long c_makedev "makedev"(unsigned int ma, unsigned int mi)


cdef inline uint32_t _encode_dev(unsigned long long rdev) noexcept:
    """dev_t -> the kernel's 32-bit new_encode_dev() form used in fuse_attr."""
    cdef uint32_t ma = c_major(rdev), mi = c_minor(rdev)
    return (mi & 0xff) | (ma << 8) | ((mi & ~0xff) << 12)


cdef inline unsigned long _decode_dev(uint32_t d) noexcept:
    return c_makedev((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))


cdef extern from "<fcntl.h>" nogil:
    int c_fallocate "fallocate"(int fd, int mode, long long offset, long long length)

cdef extern from "<unistd.h>" nogil:
    long long c_lseek "lseek64"(int fd, long long offset, int whence)
    ssize_t c_copy_file_range "copy_file_range"(int fd_in, long long *off_in, int fd_out,
                                               long long *off_out, size_t length, unsigned int flags)


cdef inline size_t _align8(size_t n) noexcept nogil:
    return (n + 7) & ~(<size_t>7)


cdef inline bytes _cstr(const char *p, size_t avail):
    """The NUL-terminated string at p (at most avail bytes)."""
    return PyBytes_FromStringAndSize(p, strnlen(p, avail))


cdef class _Handle:
    cdef public int fd
    cdef public object node
    cdef public int flags
    cdef public bint lower       # opened before any copy-up: follows it
    cdef public uint64_t backing_key   # node id whose backing this open uses, or 0


cdef class _Backing:
    """A passthrough backing file registered for one node id."""
    cdef public int id           # the kernel's backing id
    cdef public int opens        # passthrough opens using it
    cdef public object real      # (st_dev, st_ino) of the file it stands for



cdef class OverlayFS(Session):
    """The request handlers of one overlay mount."""
    cdef public object core
    cdef dict inodes              # node id -> Node
    cdef dict nlookup             # node id -> kernel lookup count
    cdef dict handles             # fh -> _Handle
    cdef dict listings            # dir node id -> [(name, Node, Stat)] being read
    cdef uint64_t next_id
    cdef uint64_t next_fh
    cdef object lock
    cdef uint64_t entry_sec, attr_sec
    cdef uint32_t entry_nsec, attr_nsec
    cdef object uidmap, gidmap
    cdef bint squash
    cdef uint64_t counts[FUSE_OPCODE_MAX]
    cdef dict backings            # node id -> _Backing
    cdef public bint passthrough_broken   # BACKING_OPEN refused: serve data ourselves

    def __init__(self, core, *, double entry_timeout=300.0, double attr_timeout=300.0,
                 uidmap=None, gidmap=None, bint squash_to_root=False):
        Session.__init__(self)
        self.core = core
        self.inodes = {FUSE_ROOT_ID: core.root}
        self.nlookup = {FUSE_ROOT_ID: 1}
        self.handles = {}
        self.listings = {}
        core.root.fuse_id = FUSE_ROOT_ID
        self.next_id = FUSE_ROOT_ID + 1
        self.next_fh = 1
        self.lock = threading.Lock()
        core.set_lock(self.lock)    # the core lets go of it during long copy-ups
        self.entry_sec = <uint64_t>entry_timeout
        self.entry_nsec = <uint32_t>((entry_timeout - self.entry_sec) * 1e9)
        self.attr_sec = <uint64_t>attr_timeout
        self.attr_nsec = <uint32_t>((attr_timeout - self.attr_sec) * 1e9)
        self.uidmap = uidmap or None
        self.gidmap = gidmap or None
        self.squash = squash_to_root
        memset(self.counts, 0, sizeof(self.counts))
        self.backings = {}

    # ------------------------------------------------------------ tables

    cdef uint64_t _key(self, node):
        cdef uint64_t fid = node.fuse_id
        if not fid:
            fid = self.next_id
            self.next_id += 1
            node.fuse_id = fid
        return fid

    cdef object _node(self, uint64_t nodeid):
        try:
            return self.inodes[nodeid]
        except KeyError:
            raise OSError(E.ESTALE, "unknown node id") from None

    cdef uint64_t _ref(self, node, uint64_t count=1):
        cdef uint64_t key = self._key(node)
        known = self.inodes.get(key)
        if known is not node:
            self.inodes[key] = node
            self.core.remember(node)
            if known is None:
                self.nlookup[key] = 0
        self.nlookup[key] = self.nlookup.get(key, 0) + count
        return key

    cdef _forget(self, uint64_t nodeid, uint64_t count):
        if nodeid == FUSE_ROOT_ID:
            return
        left = self.nlookup.get(nodeid, 0) - count
        if left > 0:
            self.nlookup[nodeid] = left
            return
        self.nlookup.pop(nodeid, None)
        self.listings.pop(nodeid, None)
        node = self.inodes.pop(nodeid, None)
        if node is None:
            return
        if node.fuse_id != nodeid and node.fuse_id in self.inodes:
            return      # the node lives on under a newer id (see _passthrough)
        self.core.forget(node)

    def stats(self):
        """The counters `overlay stats` shows."""
        from overlay.engine.wire import OPCODE_NAMES
        req = {}
        for i in range(FUSE_OPCODE_MAX):
            if self.counts[i]:
                req[OPCODE_NAMES.get(i, str(i)).lower()] = self.counts[i]
        return {"requests": req, "core": dict(self.core.counters),
                "inodes_known": len(self.inodes), "open_files": len(self.handles),
                "engine": "native", "passthrough": self.passthrough and not self.passthrough_broken,
                "backing_files": len(self.backings),
                "workers": self.nworkers}

    # ------------------------------------------------------------ attributes

    cdef _fill_attr(self, fuse_attr *a, node, st):
        """fuse_attr of node from its Stat st."""
        cdef int64_t t
        a.ino = node.ino
        a.size = st.st_size
        a.blocks = st.st_blocks
        t = st.st_atime_ns
        a.atime = t // 1000000000
        a.atimensec = t % 1000000000
        t = st.st_mtime_ns
        a.mtime = t // 1000000000
        a.mtimensec = t % 1000000000
        t = st.st_ctime_ns
        a.ctime = t // 1000000000
        a.ctimensec = t % 1000000000
        a.mode = st.st_mode
        a.nlink = 1 if node.merged else st.st_nlink
        if self.squash:
            a.uid = a.gid = 0
        else:
            a.uid = self.uidmap.shown(st.st_uid) if self.uidmap else st.st_uid
            a.gid = self.gidmap.shown(st.st_gid) if self.gidmap else st.st_gid
        a.rdev = _encode_dev(st.st_rdev)
        a.blksize = st.st_blksize
        a.flags = 0
        if node.upper < 0 and S.S_ISREG(st.st_mode):
            # remember what the kernel now believes of a lower file, so an
            # edit made to it directly is noticed at the next open
            node.cached = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    cdef _fill_entry(self, fuse_entry_out *e, node, st):
        """An entry for node (not counted: see _ref)."""
        if st is None:
            st = self.core.getattr(node)
        e.nodeid = self._key(node)
        e.generation = 0
        if node.ghost:
            # a whiteout that readdir lists: never cached, so the next use
            # of the name looks it up and gets ENOENT, as on the kernel
            e.entry_valid = e.attr_valid = 0
            e.entry_valid_nsec = e.attr_valid_nsec = 0
        else:
            e.entry_valid = self.entry_sec
            e.entry_valid_nsec = self.entry_nsec
            e.attr_valid = self.attr_sec
            e.attr_valid_nsec = self.attr_nsec
        self._fill_attr(&e.attr, node, st)

    cdef int _reply_entry(self, int fd, uint64_t unique, node) except -1:
        """Reply with an entry for node and count the lookup (undone if the
        request is gone)."""
        cdef fuse_entry_out e
        st, node.st = node.st, None     # what the lookup just saw, if any
        self._fill_entry(&e, node, st)
        key = self._ref(node)
        if self.reply(fd, unique, &e, sizeof(e)) == -E.ENOENT:
            self._forget(key, 1)
        return 0

    cdef int _reply_attr(self, int fd, uint64_t unique, node, st=None) except -1:
        cdef fuse_attr_out o
        if st is None:
            st = self.core.getattr(node)
        o.attr_valid = 0 if node.ghost else self.attr_sec
        o.attr_valid_nsec = 0 if node.ghost else self.attr_nsec
        o.dummy = 0
        self._fill_attr(&o.attr, node, st)
        self.reply(fd, unique, &o, sizeof(o))
        return 0

    cdef tuple _ids(self, uint32_t uid, uint32_t gid):
        """Host ids to store for ids given through the mount."""
        u, g = uid, gid
        if self.uidmap:
            u = self.uidmap.host(u)
        if self.gidmap:
            g = self.gidmap.host(g)
        return u, g

    cdef object _copy_up(self, node, bint data=True):
        """Copy node up (the caller holds the lock); the node to use next."""
        if node.upper >= 0:
            return node
        return self.core.copy_up(node, data)

    cdef _renumbered(self):
        """Tell the kernel about st_ino/nlink changes made by a copy-up."""
        core = self.core
        while core.renumbered:
            node = core.renumbered.pop()
            if node.fuse_id and node.fuse_id in self.inodes:
                self.notify_inval_inode(node.fuse_id, -1, 0, True)

    # ------------------------------------------------------------ dispatch

    cdef int handle(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef uint32_t op = h.opcode
        cdef uint64_t unique = h.unique
        if op < FUSE_OPCODE_MAX:
            self.counts[op] += 1
        try:
            if op == FUSE_LOOKUP:
                self.op_lookup(fd, h, arg, n)
            elif op == FUSE_GETATTR:
                self.op_getattr(fd, h, arg, n)
            elif op == FUSE_FORGET:
                with self.lock:
                    self._forget(h.nodeid, (<fuse_forget_in*>arg).nlookup)
            elif op == FUSE_BATCH_FORGET:
                self.op_batch_forget(h, arg, n)
            elif op == FUSE_READDIRPLUS or op == FUSE_READDIR:
                self.op_readdir(fd, h, arg, n, op == FUSE_READDIRPLUS)
            elif op == FUSE_OPEN:
                self.op_open(fd, h, arg, n)
            elif op == FUSE_READ:
                self.op_read(fd, h, arg, n)
            elif op == FUSE_WRITE:
                self.op_write(fd, h, arg, n)
            elif op == FUSE_RELEASE:
                self.op_release(fd, h, arg, n)
            elif op == FUSE_FLUSH:
                self.reply_err(fd, unique, 0)
            elif op == FUSE_OPENDIR:
                self.op_opendir(fd, h, arg, n)
            elif op == FUSE_RELEASEDIR:
                self.reply_err(fd, unique, 0)
            elif op == FUSE_CREATE:
                self.op_create(fd, h, arg, n)
            elif op == FUSE_SETATTR:
                self.op_setattr(fd, h, arg, n)
            elif op == FUSE_MKDIR:
                self.op_mkdir(fd, h, arg, n)
            elif op == FUSE_MKNOD:
                self.op_mknod(fd, h, arg, n)
            elif op == FUSE_SYMLINK:
                self.op_symlink(fd, h, arg, n)
            elif op == FUSE_LINK:
                self.op_link(fd, h, arg, n)
            elif op == FUSE_UNLINK or op == FUSE_RMDIR:
                self.op_remove(fd, h, arg, n, op == FUSE_RMDIR)
            elif op == FUSE_RENAME or op == FUSE_RENAME2:
                self.op_rename(fd, h, arg, n, op == FUSE_RENAME2)
            elif op == FUSE_READLINK:
                with self.lock:
                    target = self.core.readlink(self._node(h.nodeid))
                self.reply(fd, unique, PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target))
            elif op == FUSE_STATFS:
                self.op_statfs(fd, h)
            elif op == FUSE_FSYNC or op == FUSE_FSYNCDIR:
                self.op_fsync(fd, h, arg, n, op == FUSE_FSYNCDIR)
            elif op == FUSE_GETXATTR or op == FUSE_LISTXATTR:
                self.op_getxattr(fd, h, arg, n, op == FUSE_LISTXATTR)
            elif op == FUSE_SETXATTR:
                self.op_setxattr(fd, h, arg, n)
            elif op == FUSE_REMOVEXATTR:
                self.op_removexattr(fd, h, arg, n)
            elif op == FUSE_FALLOCATE:
                self.op_fallocate(fd, h, arg, n)
            elif op == FUSE_LSEEK:
                self.op_lseek(fd, h, arg, n)
            elif op == FUSE_COPY_FILE_RANGE or op == FUSE_COPY_FILE_RANGE_64:
                self.op_copy_file_range(fd, h, arg, n, op == FUSE_COPY_FILE_RANGE_64)
            elif op == FUSE_STATX:
                self.op_statx(fd, h, arg, n)
            elif op == FUSE_TMPFILE:
                self.op_tmpfile(fd, h, arg, n)
            elif op == FUSE_SYNCFS:
                with self.lock:
                    core = self.core
                core.syncfs()
                self.reply_err(fd, unique, 0)
            elif op == FUSE_INTERRUPT:
                pass        # requests run to completion; the kernel needs no reply
            elif op == FUSE_NOTIFY_REPLY:
                pass
            else:
                self.reply_err(fd, unique, E.ENOSYS)
        except OSError as e:
            if op != FUSE_FORGET and op != FUSE_BATCH_FORGET:
                self.reply_err(fd, unique, e.errno if e.errno else E.EIO)
        except KeyError:
            # an unknown file handle
            self.reply_err(fd, unique, E.EBADF)
        return 0

    # ------------------------------------------------------------ lookup & attrs

    cdef int op_lookup(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        name = _cstr(arg, n)
        with self.lock:
            node = self.core.lookup(self._node(h.nodeid), name)
            self._reply_entry(fd, h.unique, node)
        return 0

    cdef int op_batch_forget(self, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_batch_forget_in *b = <fuse_batch_forget_in*>arg
        cdef fuse_forget_one *one = <fuse_forget_one*>(arg + sizeof(fuse_batch_forget_in))
        cdef uint32_t i, count = b.count
        if sizeof(fuse_batch_forget_in) + count * sizeof(fuse_forget_one) > n:
            count = (n - sizeof(fuse_batch_forget_in)) // sizeof(fuse_forget_one)
        with self.lock:
            for i in range(count):
                self._forget(one[i].nodeid, one[i].nlookup)
        return 0

    cdef int op_getattr(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        with self.lock:
            node = self._node(h.nodeid)
            self._reply_attr(fd, h.unique, node)
        return 0

    cdef int op_setattr(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_setattr_in *a = <fuse_setattr_in*>arg
        cdef uint32_t valid = a.valid
        kw = {}
        if valid & FATTR_MODE:
            kw["mode"] = a.mode
        if valid & FATTR_UID:
            kw["uid"] = self.uidmap.host(a.uid) if self.uidmap else a.uid
        if valid & FATTR_GID:
            kw["gid"] = self.gidmap.host(a.gid) if self.gidmap else a.gid
        if valid & FATTR_ATIME_NOW:
            kw["atime_ns"] = time.time_ns()
        elif valid & FATTR_ATIME:
            kw["atime_ns"] = a.atime * 1000000000 + a.atimensec
        if valid & FATTR_MTIME_NOW:
            kw["mtime_ns"] = time.time_ns()
        elif valid & FATTR_MTIME:
            kw["mtime_ns"] = a.mtime * 1000000000 + a.mtimensec
        with self.lock:
            node = self._node(h.nodeid)
            if valid & FATTR_SIZE:
                kw["size"] = a.size
                if valid & FATTR_FH:
                    hd = self.handles.get(a.fh)
                    if hd is not None:
                        kw["fh"] = self._fd(hd)
            if kw:
                try:
                    self.core._need_upper()
                    node = self._copy_up(node, kw.get("size", 1) != 0)
                    self.core.setattr(node, **kw)
                    if valid & FATTR_KILL_SUIDGID and "mode" not in kw:
                        self._kill_suidgid(node)
                finally:
                    self._renumbered()
            self._reply_attr(fd, h.unique, node)
        return 0

    cdef _kill_suidgid(self, node):
        """Clear set-user-id (and set-group-id with group execute) as the
        kernel does on a write or truncate by an unprivileged caller."""
        st = self.core.getattr(node)
        mode = st.st_mode
        if not S.S_ISREG(mode):
            return
        new = mode & ~S.S_ISUID
        if mode & S.S_IXGRP:
            new &= ~S.S_ISGID
        if new != mode:
            self.core.setattr(node, mode=new)

    # ------------------------------------------------------------ namespace

    cdef int op_mknod(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_mknod_in *a = <fuse_mknod_in*>arg
        name = _cstr(arg + sizeof(fuse_mknod_in), n - sizeof(fuse_mknod_in))
        with self.lock:
            uid, gid = self._ids(h.uid, h.gid)
            try:
                node = self.core.mknod(self._node(h.nodeid), name, a.mode & ~a.umask,
                                       _decode_dev(a.rdev), uid, gid)
            finally:
                self._renumbered()
            self._reply_entry(fd, h.unique, node)
        return 0

    cdef int op_mkdir(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_mkdir_in *a = <fuse_mkdir_in*>arg
        name = _cstr(arg + sizeof(fuse_mkdir_in), n - sizeof(fuse_mkdir_in))
        with self.lock:
            uid, gid = self._ids(h.uid, h.gid)
            try:
                node = self.core.mkdir(self._node(h.nodeid), name,
                                       S.S_IMODE(a.mode) & ~a.umask, uid, gid)
            finally:
                self._renumbered()
            self._reply_entry(fd, h.unique, node)
        return 0

    cdef int op_symlink(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        name = _cstr(arg, n)
        cdef size_t off = len(name) + 1
        target = _cstr(arg + off, n - off) if off < n else b""
        with self.lock:
            uid, gid = self._ids(h.uid, h.gid)
            try:
                node = self.core.symlink(self._node(h.nodeid), name, target, uid, gid)
            finally:
                self._renumbered()
            self._reply_entry(fd, h.unique, node)
        return 0

    cdef int op_link(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_link_in *a = <fuse_link_in*>arg
        name = _cstr(arg + sizeof(fuse_link_in), n - sizeof(fuse_link_in))
        with self.lock:
            try:
                src = self._copy_up(self._node(a.oldnodeid))
                node = self.core.link(src, self._node(h.nodeid), name)
            finally:
                self._renumbered()
            self._reply_entry(fd, h.unique, node)
        return 0

    cdef int op_remove(self, int fd, fuse_in_header *h, char *arg, size_t n, bint isdir) except -1:
        name = _cstr(arg, n)
        with self.lock:
            try:
                if isdir:
                    self.core.rmdir(self._node(h.nodeid), name)
                else:
                    self.core.unlink(self._node(h.nodeid), name)
            finally:
                self._renumbered()
        self.reply_err(fd, h.unique, 0)
        return 0

    cdef int op_rename(self, int fd, fuse_in_header *h, char *arg, size_t n, bint v2) except -1:
        cdef uint64_t newdir
        cdef uint32_t flags = 0
        cdef size_t off
        if v2:
            newdir = (<fuse_rename2_in*>arg).newdir
            flags = (<fuse_rename2_in*>arg).flags
            off = sizeof(fuse_rename2_in)
        else:
            newdir = (<fuse_rename_in*>arg).newdir
            off = sizeof(fuse_rename_in)
        oldname = _cstr(arg + off, n - off)
        off += len(oldname) + 1
        newname = _cstr(arg + off, n - off) if off < n else b""
        with self.lock:
            try:
                self.core.rename(self._node(h.nodeid), oldname, self._node(newdir), newname, flags)
            finally:
                self._renumbered()
        self.reply_err(fd, h.unique, 0)
        return 0

    # ------------------------------------------------------------ files

    cdef _backing_flags(self, int flags):
        """With the writeback cache the kernel handles O_APPEND itself and may
        read pages of a file opened write-only: open the real file so."""
        if self.writeback_cache:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    cdef int _passthrough(self, uint64_t nodeid, node) except -2:
        """The backing id an open of nodeid uses (0: none, data through us;
        -1: answer ESTALE).

        One backing file per node id while passthrough opens exist. An open
        of a file whose lower copy still backs opens of this id (opened
        before a copy-up) can neither use that (writes would reach the lower
        layer, reads would miss them) nor register another (EBUSY): the node
        gets a new id for its next lookup and the open is answered ESTALE,
        which makes the kernel revalidate the name and open the new id. The
        earlier opens keep reading the lower file, as it was."""
        cdef _Backing bk
        if not self.passthrough or self.passthrough_broken or not node.fuse_id:
            return 0
        bk = self.backings.get(nodeid)
        if bk is not None and bk.opens > 0:
            if bk.real == node.real:
                bk.opens += 1
                return bk.id
            node.fuse_id = 0
            return -1
        st = self.core.getattr(node)
        if not S.S_ISREG(st.st_mode) or st.st_mode & (S.S_ISUID | S.S_ISGID):
            # set-id files: their writes come to us, so the kill hint can
            # clear the bits as the kernel overlay does
            return 0
        from overlay.engine.wire import backing_open
        try:
            bid = backing_open(self.devfd, node.fd)
        except OSError as e:
            log.warning("passthrough off: BACKING_OPEN failed (%s)", e.strerror)
            self.passthrough_broken = True
            return 0
        bk = _Backing()
        bk.id = bid
        bk.opens = 1
        bk.real = node.real
        self.backings[nodeid] = bk
        return bid

    cdef _unback(self, uint64_t key):
        """One passthrough open of node id key is gone."""
        cdef _Backing bk = self.backings.get(key)
        if bk is None:
            return
        bk.opens -= 1
        if bk.opens <= 0:
            del self.backings[key]
            from overlay.engine.wire import backing_close
            try:
                backing_close(self.devfd, bk.id)
            except OSError as e:
                log.debug("BACKING_CLOSE %d: %s", bk.id, e.strerror)

    cdef int _reply_open(self, int fd, uint64_t unique, uint64_t nodeid, int rfd, node,
                         int flags, fuse_entry_out *entry) except -1:
        """Make a handle for rfd and reply (with entry first for CREATE)."""
        cdef fuse_open_out o
        cdef _Handle hd
        cdef uint64_t fh
        cdef int r, bid
        bid = self._passthrough(nodeid, node)
        if bid < 0:
            os.close(rfd)
            self.reply_err(fd, unique, E.ESTALE)
            return 0
        fh = self.next_fh
        self.next_fh += 1
        hd = _Handle()
        hd.fd = rfd
        hd.node = node
        hd.flags = flags
        hd.lower = node.upper < 0
        hd.backing_key = nodeid if bid > 0 else 0
        self.handles[fh] = hd
        node.pins += 1          # keeps its fds: fstat must work after an unlink
        keep = True
        if node.upper < 0:
            st = os.fstat(rfd)
            now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if node.cached is not None and node.cached != now and node.fuse_id:
                # the lower file was changed behind the mount: drop what the
                # kernel cached of it (attributes, and pages: no KEEP_CACHE)
                keep = False
                self.notify_inval_inode(node.fuse_id, -1, 0, True)
            node.cached = now
        memset(&o, 0, sizeof(o))
        o.fh = fh
        if bid > 0:
            o.open_flags = FOPEN_PASSTHROUGH | FOPEN_NOFLUSH
            o.backing_id = bid
        else:
            o.open_flags = FOPEN_NOFLUSH | (FOPEN_KEEP_CACHE if keep else 0)
        if entry != NULL:
            r = self.reply2(fd, unique, entry, sizeof(fuse_entry_out), &o, sizeof(o))
        else:
            r = self.reply(fd, unique, &o, sizeof(o))
        if r == -E.ENOENT:
            # the request is gone: so is the handle (and the lookup)
            self._release(fh)
            if entry != NULL:
                self._forget(entry.nodeid, 1)
        return 0

    cdef int op_open(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_open_in *a = <fuse_open_in*>arg
        cdef int flags = self._backing_flags(a.flags)
        cdef uint32_t oflags = a.open_flags
        with self.lock:
            node = self._node(h.nodeid)
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                try:
                    self.core._need_upper()
                    node = self._copy_up(node, not flags & os.O_TRUNC)
                    rfd, node = self.core.open(node, flags)
                    if oflags & FUSE_OPEN_KILL_SUIDGID:
                        self._kill_suidgid(node)
                finally:
                    self._renumbered()
            else:
                rfd, node = self.core.open(node, flags)
            self._reply_open(fd, h.unique, h.nodeid, rfd, node, flags, NULL)
        return 0

    cdef int op_create(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_create_in *a = <fuse_create_in*>arg
        cdef int flags = self._backing_flags(a.flags)
        cdef fuse_entry_out e
        name = _cstr(arg + sizeof(fuse_create_in), n - sizeof(fuse_create_in))
        with self.lock:
            uid, gid = self._ids(h.uid, h.gid)
            try:
                rfd, node = self.core.create(self._node(h.nodeid), name, flags,
                                             S.S_IMODE(a.mode) & ~a.umask, uid, gid)
            finally:
                self._renumbered()
            st, node.st = node.st, None
            self._fill_entry(&e, node, st)
            self._ref(node)
            self._reply_open(fd, h.unique, e.nodeid, rfd, node, flags, &e)
        return 0

    cdef int _fd(self, _Handle hd) except -1:
        """The fd behind a handle (the caller holds the lock). A handle opened
        on a lower file before it was copied up follows the copy, as the
        kernel overlay's files do: the upper file is put in place of the
        old fd with dup2, so a read running meanwhile sees one or the other."""
        if hd.lower and hd.node.upper >= 0:
            nfd = os.open(f"/proc/self/fd/{hd.node.upper}",
                          hd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY) | os.O_CLOEXEC)
            os.dup2(nfd, hd.fd)
            os.close(nfd)
            hd.lower = False
        return hd.fd

    cdef int op_read(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_read_in *a = <fuse_read_in*>arg
        cdef uint64_t unique = h.unique
        cdef uint64_t off = a.offset
        cdef size_t size = a.size
        cdef ssize_t got, r
        cdef size_t done = 0
        cdef int rfd, err = 0
        cdef char *out = (<char*>h) + sizeof(fuse_out_header)
        cdef fuse_out_header *oh = <fuse_out_header*>h
        hd = self.handles[a.fh]
        if (<_Handle>hd).lower:
            with self.lock:
                rfd = self._fd(hd)
        else:
            rfd = (<_Handle>hd).fd
        if size > READ_BUFFER - sizeof(fuse_out_header):
            size = READ_BUFFER - sizeof(fuse_out_header)
        with nogil:
            # a short read is EOF to the kernel: read until size or EOF
            while done < size:
                r = pread(rfd, out + done, size - done, off + done)
                if r < 0:
                    if errno == 4:      # EINTR
                        continue
                    err = errno
                    break
                if r == 0:
                    break
                done += r
            if err == 0 or done > 0:
                oh.len = sizeof(fuse_out_header) + done
                oh.error = 0
                oh.unique = unique
                write(fd, oh, oh.len)
        if err and done == 0:
            self.reply_err(fd, unique, err)
        return 0

    cdef int op_write(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_write_in *a = <fuse_write_in*>arg
        cdef const char *data = arg + sizeof(fuse_write_in)
        cdef size_t size = a.size
        cdef uint64_t off = a.offset
        cdef size_t done = 0
        cdef ssize_t r
        cdef int rfd, err = 0
        cdef fuse_write_out o
        if size > n - sizeof(fuse_write_in):
            size = n - sizeof(fuse_write_in)
        hd = self.handles[a.fh]
        if (<_Handle>hd).lower:
            with self.lock:
                rfd = self._fd(hd)
        else:
            rfd = (<_Handle>hd).fd
        if a.write_flags & FUSE_WRITE_KILL_SUIDGID:
            with self.lock:
                self._kill_suidgid((<_Handle>hd).node)
        with nogil:
            while done < size:
                r = pwrite(rfd, data + done, size - done, off + done)
                if r < 0:
                    if errno == 4:
                        continue
                    err = errno
                    break
                done += r
        if err and done == 0:
            self.reply_err(fd, h.unique, err)
            return 0
        o.size = done
        o.padding = 0
        self.reply(fd, h.unique, &o, sizeof(o))
        return 0

    cdef _release(self, uint64_t fh):
        cdef _Handle hd = self.handles.pop(fh, None)
        if hd is None:
            return
        os.close(hd.fd)
        if hd.backing_key:
            self._unback(hd.backing_key)
        node = hd.node
        node.pins -= 1
        if not node.pins and node.fuse_id not in self.inodes:
            self.core.release(node)       # forgotten while open

    cdef int op_release(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        with self.lock:
            self._release((<fuse_release_in*>arg).fh)
        self.reply_err(fd, h.unique, 0)
        return 0

    cdef int op_fsync(self, int fd, fuse_in_header *h, char *arg, size_t n, bint isdir) except -1:
        cdef fuse_fsync_in *a = <fuse_fsync_in*>arg
        cdef bint datasync = a.fsync_flags & FUSE_FSYNC_FDATASYNC
        if isdir:
            with self.lock:
                node = self._node(h.nodeid)
                if node.upper < 0:
                    self.reply_err(fd, h.unique, 0)
                    return 0
                dfd = os.open(f"/proc/self/fd/{node.upper}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.core.fsync(dfd, datasync)
            finally:
                os.close(dfd)
        else:
            with self.lock:
                rfd = self._fd(self.handles[a.fh])
            self.core.fsync(rfd, datasync)
        self.reply_err(fd, h.unique, 0)
        return 0

    # ------------------------------------------------------------ directories

    cdef int op_opendir(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        """No directory handles: ENOSYS makes the kernel open every dir without
        asking (and without RELEASEDIR), keep the listings it reads in its
        page cache (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR) and start over when
        the dir's mtime or version changes, as any change through the mount
        does. Warm find and ls -R then never reach us."""
        self.reply_err(fd, h.unique, E.ENOSYS)
        return 0

    cdef list _listing(self, node):
        """[(name, Node, Stat)] of the dir, with . and .. first."""
        parent = node.parent if node.parent is not None else node
        core = self.core
        entries = [(b".", node, core.getattr(node)), (b"..", parent, core.getattr(parent))]
        for name, child in core.readdir(node):
            st, child.st = child.st, None
            if st is None:
                try:
                    st = core.getattr(child)
                except FileNotFoundError:
                    continue
            entries.append((name, child, st))
        return entries

    cdef int op_readdir(self, int fd, fuse_in_header *h, char *arg, size_t n, bint plus) except -1:
        cdef fuse_read_in *a = <fuse_read_in*>arg
        cdef uint64_t unique = h.unique
        cdef uint64_t start = a.offset
        cdef size_t size = a.size
        cdef char *out = (<char*>h) + sizeof(fuse_out_header)
        cdef size_t used = 0, reclen, namelen
        cdef fuse_direntplus *dp
        cdef fuse_dirent *de
        cdef Py_ssize_t i, count
        cdef bytes name
        cdef list counted = []
        if size > READ_BUFFER - sizeof(fuse_out_header):
            size = READ_BUFFER - sizeof(fuse_out_header)
        with self.lock:
            # the listing is built at offset 0 and kept while the kernel
            # reads on (an interrupted reader may come back to any offset)
            entries = self.listings.get(h.nodeid) if start else None
            if entries is None:
                node = self._node(h.nodeid)
                if not node.is_dir:
                    raise OSError(E.ENOTDIR, "not a directory")
                entries = self._listing(node)
                self.listings[h.nodeid] = entries
            count = len(entries)
            i = start
            while i < count:
                name, child, st = entries[i]
                namelen = len(name)
                if plus:
                    reclen = _align8(sizeof(fuse_direntplus) + namelen)
                    if used + reclen > size:
                        break
                    dp = <fuse_direntplus*>(out + used)
                    memset(dp, 0, reclen)
                    dot = name == b"." or name == b".."
                    if dot:
                        self._fill_attr(&dp.entry_out.attr, child, st)
                    else:
                        self._fill_entry(&dp.entry_out, child, st)
                        counted.append(child)
                    de = &dp.dirent
                else:
                    reclen = _align8(sizeof(fuse_dirent) + namelen)
                    if used + reclen > size:
                        break
                    de = <fuse_dirent*>(out + used)
                    memset(de, 0, reclen)
                de.ino = child.ino
                de.off = i + 1
                de.namelen = namelen
                de.type = (st.st_mode & 0o170000) >> 12
                memcpy((<char*>de) + sizeof(fuse_dirent), PyBytes_AS_STRING(name), namelen)
                used += reclen
                i += 1
            if start >= count:
                self.listings.pop(h.nodeid, None)   # read to the end: the kernel has it
            keys = [self._ref(c) for c in counted]
        if self.reply(fd, unique, out, used) == -E.ENOENT and keys:
            with self.lock:
                for k in keys:
                    self._forget(k, 1)
        return 0

    # ------------------------------------------------------------ what pyfuse3 could not do

    cdef int op_fallocate(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        """fallocate(2) on the real file (the handle is open for writing, so
        the file is in the upper layer already)."""
        cdef fuse_fallocate_in *a = <fuse_fallocate_in*>arg
        cdef int rfd, ret, mode = a.mode
        cdef long long off = a.offset, length = a.length
        with self.lock:
            rfd = self._fd(self.handles[a.fh])
        with nogil:
            ret = c_fallocate(rfd, mode, off, length)
        if ret != 0:
            raise OSError(errno, os.strerror(errno))
        self.reply_err(fd, h.unique, 0)
        return 0

    cdef int op_lseek(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        """SEEK_DATA / SEEK_HOLE on the real file: the lower one before a
        copy-up, the upper one after."""
        cdef fuse_lseek_in *a = <fuse_lseek_in*>arg
        cdef fuse_lseek_out o
        cdef int rfd, whence = a.whence
        cdef long long off = a.offset, r
        with self.lock:
            rfd = self._fd(self.handles[a.fh])
        with nogil:
            r = c_lseek(rfd, off, whence)
        if r < 0:
            raise OSError(errno, os.strerror(errno))
        o.offset = r
        self.reply(fd, h.unique, &o, sizeof(o))
        return 0

    cdef int op_copy_file_range(self, int fd, fuse_in_header *h, char *arg, size_t n,
                                bint wide) except -1:
        """copy_file_range(2) between the real files, in the kernel (a
        reflink or a server-side copy where the filesystem can)."""
        cdef fuse_copy_file_range_in *a = <fuse_copy_file_range_in*>arg
        cdef fuse_write_out o
        cdef fuse_copy_file_range_out o64
        cdef int fin, fout
        cdef long long oin = a.off_in, oout = a.off_out
        cdef size_t length = a.len
        cdef unsigned int flags = a.flags
        cdef ssize_t r
        with self.lock:
            fin = self._fd(self.handles[a.fh_in])
            fout = self._fd(self.handles[a.fh_out])
        if not wide and length > 0xfffff000:
            length = 0xfffff000
        with nogil:
            r = c_copy_file_range(fin, &oin, fout, &oout, length, flags)
        if r < 0:
            raise OSError(errno, os.strerror(errno))
        if wide:
            o64.bytes_copied = r
            self.reply(fd, h.unique, &o64, sizeof(o64))
        else:
            o.size = r
            o.padding = 0
            self.reply(fd, h.unique, &o, sizeof(o))
        return 0

    cdef int op_statx(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        """statx(2): the real object's, birth time included, with the
        overlay's st_ino, nlink and ids, as for GETATTR."""
        cdef fuse_statx_in *a = <fuse_statx_in*>arg
        cdef fuse_statx_out o
        cdef uint32_t mask = a.sx_mask
        memset(&o, 0, sizeof(o))
        with self.lock:
            node = self._node(h.nodeid)
            x = self.core.statx(node, mask | 0x7ff)       # STATX_BASIC_STATS too
            merged = node.merged
            o.stat.ino = node.ino
            ghost = node.ghost
        o.attr_valid = 0 if ghost else self.attr_sec
        o.attr_valid_nsec = 0 if ghost else self.attr_nsec
        o.stat.mask = x.stx_mask
        o.stat.blksize = x.stx_blksize
        o.stat.attributes = x.stx_attributes
        o.stat.attributes_mask = x.stx_attributes_mask
        o.stat.nlink = 1 if merged else x.stx_nlink
        if self.squash:
            o.stat.uid = o.stat.gid = 0
        else:
            o.stat.uid = self.uidmap.shown(x.stx_uid) if self.uidmap else x.stx_uid
            o.stat.gid = self.gidmap.shown(x.stx_gid) if self.gidmap else x.stx_gid
        o.stat.mode = x.stx_mode
        o.stat.size = x.stx_size
        o.stat.blocks = x.stx_blocks
        o.stat.atime.tv_sec = x.stx_atime_sec
        o.stat.atime.tv_nsec = x.stx_atime_nsec
        o.stat.btime.tv_sec = x.stx_btime_sec
        o.stat.btime.tv_nsec = x.stx_btime_nsec
        o.stat.ctime.tv_sec = x.stx_ctime_sec
        o.stat.ctime.tv_nsec = x.stx_ctime_nsec
        o.stat.mtime.tv_sec = x.stx_mtime_sec
        o.stat.mtime.tv_nsec = x.stx_mtime_nsec
        o.stat.rdev_major = x.stx_rdev_major
        o.stat.rdev_minor = x.stx_rdev_minor
        self.reply(fd, h.unique, &o, sizeof(o))
        return 0

    cdef int op_tmpfile(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        """O_TMPFILE: an unnamed file in the upper dir, linked by a later
        linkat(2) (LINK) if at all."""
        cdef fuse_create_in *a = <fuse_create_in*>arg
        cdef int flags = self._backing_flags(a.flags)
        cdef fuse_entry_out e
        with self.lock:
            uid, gid = self._ids(h.uid, h.gid)
            try:
                rfd, node = self.core.tmpfile(self._node(h.nodeid), flags,
                                              S.S_IMODE(a.mode) & ~a.umask, uid, gid)
            finally:
                self._renumbered()
            st, node.st = node.st, None
            self._fill_entry(&e, node, st)
            self._ref(node)
            self._reply_open(fd, h.unique, e.nodeid, rfd, node, flags, &e)
        return 0

    # ------------------------------------------------------------ misc

    cdef int op_statfs(self, int fd, fuse_in_header *h) except -1:
        cdef fuse_statfs_out o
        memset(&o, 0, sizeof(o))
        with self.lock:
            v = self.core.statfs()
        o.st.blocks = v.f_blocks
        o.st.bfree = v.f_bfree
        o.st.bavail = v.f_bavail
        o.st.files = v.f_files
        o.st.ffree = v.f_ffree
        o.st.bsize = v.f_bsize
        o.st.namelen = v.f_namemax
        o.st.frsize = v.f_frsize
        self.reply(fd, h.unique, &o, sizeof(o))
        return 0

    cdef int _reply_sized(self, int fd, uint64_t unique, uint32_t size, bytes value) except -1:
        """getxattr/listxattr: the size when asked with size 0, else the value
        (ERANGE if it does not fit)."""
        cdef fuse_getxattr_out o
        if size == 0:
            o.size = len(value)
            o.padding = 0
            self.reply(fd, unique, &o, sizeof(o))
        elif <size_t>len(value) > size:
            self.reply_err(fd, unique, E.ERANGE)
        else:
            self.reply(fd, unique, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        return 0

    cdef int op_getxattr(self, int fd, fuse_in_header *h, char *arg, size_t n, bint listing) except -1:
        cdef fuse_getxattr_in *a = <fuse_getxattr_in*>arg
        cdef uint32_t size = a.size
        if listing:
            with self.lock:
                names = self.core.listxattr(self._node(h.nodeid))
            value = b"".join(nm + b"\0" for nm in names)
        else:
            name = _cstr(arg + sizeof(fuse_getxattr_in), n - sizeof(fuse_getxattr_in))
            if name == STATS_XATTR and h.nodeid == FUSE_ROOT_ID:
                with self.lock:
                    value = json.dumps(self.stats()).encode()
            else:
                with self.lock:
                    value = self.core.getxattr(self._node(h.nodeid), name)
        self._reply_sized(fd, h.unique, size, value)
        return 0

    cdef int op_setxattr(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef fuse_setxattr_in *a = <fuse_setxattr_in*>arg
        cdef size_t off = sizeof(fuse_setxattr_in) if self.setxattr_ext else 8
        cdef uint32_t vsize = a.size
        cdef int xflags = a.flags
        name = _cstr(arg + off, n - off)
        off += len(name) + 1
        if off + vsize > n:
            raise OSError(E.EINVAL, "short setxattr")
        value = PyBytes_FromStringAndSize(arg + off, vsize)
        if name == STATS_XATTR:
            raise OSError(E.EPERM, "reserved")
        with self.lock:
            try:
                node = self._node(h.nodeid)
                self.core._need_upper()
                node = self._copy_up(node)
                self.core.setxattr(node, name, value, xflags)
            finally:
                self._renumbered()
        self.reply_err(fd, h.unique, 0)
        return 0

    cdef int op_removexattr(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        name = _cstr(arg, n)
        with self.lock:
            try:
                self.core.removexattr(self._node(h.nodeid), name)
            finally:
                self._renumbered()
        self.reply_err(fd, h.unique, 0)
        return 0
