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

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t, int64_t, int32_t
from libc.string cimport memset, memcpy
from posix.unistd cimport pread, pwrite, write
from posix.stat cimport struct_stat, fstat

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

from overlay.engine.abi cimport *
from overlay_core._core cimport Node, Overlay, Stat, node_is_merged, node_note_reported, node_top_fd
from overlay.engine.wire cimport Session, READ_BUFFER

from bisect import bisect_right

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

cdef extern from "<linux/falloc.h>" nogil:
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE

cdef extern from "<unistd.h>" nogil:
    long long c_lseek "lseek64"(int fd, long long offset, int whence)
    ssize_t c_copy_file_range "copy_file_range"(int fd_in, long long *off_in, int fd_out,
                                               long long *off_out, size_t length, unsigned int flags)


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)
    void free(void *ptr)

# O_DIRECT wants buffers aligned to the device's logical block (at most a
# page): the data of a request sit at an odd place in our buffer
DEF DIRECT_ALIGN = 4096

cdef char *_direct_buffer(size_t size) noexcept nogil:
    """An aligned buffer of size bytes (at least one block), or NULL."""
    cdef void *p = NULL
    if posix_memalign(&p, DIRECT_ALIGN, size if size else DIRECT_ALIGN) != 0:
        return NULL
    return <char*>p


DEF CAP_FSETID = 4


cdef object _caller_status(fuse_in_header *h):
    """{field: value} of /proc/PID/status of the caller of h (its thread),
    or None when it is gone (or h came from the kernel itself)."""
    if h.pid == 0:
        return None
    try:
        with open(b"/proc/%d/status" % h.pid, "rb") as f:
            return dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    except OSError:
        return None


cdef bint _in_group(fuse_in_header *h, uint32_t gid):
    """Is the caller of h in group gid (its fsgid or a supplementary
    group), or has it CAP_FSETID, as the kernel's in_group_or_capable?"""
    if h.gid == gid:
        return True
    status = _caller_status(h)
    if status is None:
        return False
    try:
        groups = {int(g) for g in status.get(b"Groups", b"").split()}
        if gid in groups:
            return True
        return bool(int(status.get(b"CapEff", b"0").strip(), 16) & (1 << CAP_FSETID))
    except ValueError:
        return False


cdef inline size_t _align8(size_t n) noexcept nogil:
    return (n + 7) & ~(<size_t>7)


cdef inline bytes _cstr(const char *p, size_t avail):
    """The NUL-terminated string at p (at most avail bytes)."""
    return PyBytes_FromStringAndSize(p, strnlen(p, avail))


include "_idtable.pxi"


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
    cdef public int writers      # ... of them opened for writing
    cdef public object real      # (st_dev, st_ino) of the file it stands for



cdef class OverlayFS(Session):
    """The request handlers of one overlay mount."""
    cdef public Overlay core
    cdef IdTable inodes           # node id -> Node, every inode the kernel knows
    cdef dict old_refs            # node id -> kernel lookups, for ids a Node no longer has
    cdef dict handles             # fh -> _Handle
    cdef dict listings            # dir node id -> _DirOffsets (see _ops_dirs.pxi)
    cdef uint64_t next_id
    cdef uint64_t next_fh
    cdef object lock
    cdef uint64_t entry_sec, attr_sec
    cdef uint32_t entry_nsec, attr_nsec
    cdef object uidmap, gidmap
    cdef bint squash
    cdef int64_t squash_uid, squash_gid   # squash_to_uid/gid, or -1
    cdef bint static_nlink        # dirs show nlink 1 (fuse-overlayfs's static_nlink)
    cdef bint ino32               # st_ino folded to 32 bits (ino32_t)
    cdef bint noxattrs            # xattr requests answered ENOSYS (noxattrs=1)
    cdef uint64_t counts[FUSE_OPCODE_MAX]
    cdef dict backings            # node id -> _Backing
    cdef dict forgotten           # nfs_export: node id <-> core handle of nodes forgotten
    cdef public bint passthrough_broken   # BACKING_OPEN refused: serve data ourselves
    cdef public bint strictatime  # the mount's strictatime: every read reaches a layer
    cdef public bint dir_handles  # OPENDIR answered (mounted strictatime), not ENOSYS
    cdef public object mount_info # pid, mount point, layers, options (daemon.mount_info)
    cdef public int kdirs         # dirs the kernel knows: each keeps its O_PATH fds open
    cdef public int fd_high       # a dir's fd numbered this high starts a relief (_relieve)
    cdef size_t sweep_pos         # where the next relief's sweep of the table starts
    cdef object relief            # the thread relieving now, or None
    cdef double relief_at         # when the last relief started (monotonic)
    cdef int dirs_added           # dirs the kernel got to know since then
    cdef public uint64_t reliefs  # how many ran

    def __init__(self, core, *, double entry_timeout=300.0, double attr_timeout=300.0,
                 uidmap=None, gidmap=None, bint squash_to_root=False, squash_to_uid=None,
                 squash_to_gid=None, bint static_nlink=False, bint ino32=False,
                 bint noxattrs=False):
        Session.__init__(self)
        self.core = core
        self.inodes = IdTable()
        self.inodes.put(FUSE_ROOT_ID, core.root)
        self.kdirs = 1
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_high = (0x7fffffff if soft == resource.RLIM_INFINITY or soft >= 0x7fffffff
                        else max(64, <int>(soft * 3 // 4)))
        self.old_refs = {}
        core.root.kernel_refs = 1
        self.handles = {}
        self.listings = {}
        core.root.fuse_id = FUSE_ROOT_ID
        self.next_id = FUSE_ROOT_ID + 1
        self.next_fh = 1
        self.lock = threading.Lock()
        # the core lets go of it during long copy-ups (and then this thread
        # gives up its io_uring queue, if it owns one: hand_off)
        core.set_lock(self.lock, self.hand_off)
        self.entry_sec = <uint64_t>entry_timeout
        self.entry_nsec = <uint32_t>((entry_timeout - self.entry_sec) * 1e9)
        self.attr_sec = <uint64_t>attr_timeout
        self.attr_nsec = <uint32_t>((attr_timeout - self.attr_sec) * 1e9)
        self.uidmap = uidmap or None
        self.gidmap = gidmap or None
        self.squash = squash_to_root
        self.squash_uid = -1 if squash_to_uid is None else squash_to_uid
        self.squash_gid = -1 if squash_to_gid is None else squash_to_gid
        self.static_nlink = static_nlink
        self.ino32 = ino32
        self.noxattrs = noxattrs
        memset(self.counts, 0, sizeof(self.counts))
        self.backings = {}
        self.forgotten = {}

    # ------------------------------------------------------------ tables

    cdef uint64_t _key(self, Node node):
        cdef uint64_t fid = node.fuse_id
        if not fid:
            if self.forgotten:
                fid = self._known_id(node)
            if not fid:
                fid = self.next_id
                self.next_id += 1
            node.fuse_id = fid
        return fid

    cdef uint64_t _known_id(self, Node node):
        """nfs_export: the node id node's object had before the kernel
        forgot it (its file handles name that id), or 0."""
        try:
            h = self.core.encode_handle(node)
        except OSError:
            return 0
        fid = self.forgotten.pop(h, 0)
        if fid:
            self.forgotten.pop(fid, None)
        return fid

    cdef _remember_forgotten(self, uint64_t nodeid, Node node):
        """nfs_export: the kernel forgot nodeid; keep what finds its object
        again (a core file handle), for the LOOKUP of "." in that id that
        decodes a file handle of it (op_lookup)."""
        try:
            h = self.core.encode_handle(node)
        except OSError as e:
            log.debug("no handle kept for forgotten node %d: %s", nodeid, e)
            return
        self.forgotten[nodeid] = h
        if nodeid == node.fuse_id:
            # (a later node of the object takes this id again; another id
            # with the same handle, e.g. a lower hard link's other name
            # without index, still decodes: to an alias, see op_lookup)
            self.forgotten[h] = nodeid

    cdef Node _node(self, uint64_t nodeid):
        node = self.inodes.get(nodeid)
        if node is None:
            raise OSError(E.ESTALE, "unknown node id")
        return <Node>node

    cdef int _put(self, uint64_t nodeid, Node node) except -1:
        """node enters the table under nodeid. A dir keeps its O_PATH fds
        (one a layer it is in) while the kernel knows it: when one of them
        is numbered past fd_high, the fds are running out (open() gives the
        lowest free number) and a relief starts (_relieve)."""
        self.inodes.put(nodeid, node)
        if not node.is_dir:
            return 0
        self.kdirs += 1
        self.dirs_added += 1
        # (again once the last is done, if 64 dirs were added since or a
        # second has passed: where open files hold the fds, dropping dirs
        # cannot help, and is not done at every request)
        if (node_top_fd(node) >= self.fd_high and self.relief is None
                and (self.dirs_added >= 64 or time.monotonic() - self.relief_at > 1.0)):
            self.relief_at = time.monotonic()
            self.dirs_added = 0
            self.relief = threading.Thread(target=self._relieve, name="overlay-relief", daemon=True)
            self.relief.start()
        return 0

    def _relieve(self):
        """The daemon's fds run short, held by the dirs the kernel knows:
        ask the kernel to drop the dentries of half of them (with the
        subtrees below them), from where the last sweep of the table
        ended. Their FORGETs then close the fds; a dir used again is
        looked up again. (Notifications go through the notifier thread: a
        request in flight may hold the locks they take.)"""
        cdef list victims = []
        try:
            with self.lock:
                want = max(64, self.kdirs // 2)
                for nid, node in self.inodes.sweep_dirs(&self.sweep_pos, want):
                    parent = (<Node>node).parent
                    if nid == FUSE_ROOT_ID or parent is None or not (<Node>parent).fuse_id:
                        continue
                    victims.append(((<Node>parent).fuse_id, (<Node>node).name))
                kdirs = self.kdirs
            for pid, name in victims:
                self.notify_inval_entry(pid, name)
            self.reliefs += 1
            log.info("fds running short (a dir fd numbered %d, limit at %d): the kernel asked "
                     "to drop %d of the %d dirs it knows", self.fd_high, self.fd_high * 4 // 3,
                     len(victims), kdirs)
        finally:
            self.relief = None

    cdef uint64_t _ref(self, Node node, uint64_t count=1) except? 0:
        """The kernel got count more references to node (an entry reply, a
        readdirplus record): its node id, given out now if it had none. The
        count lives in the Node (kernel_refs): no table entry per inode."""
        cdef uint64_t key = self._key(node)
        if not self.inodes.contains(key):
            self._put(key, node)
            self.core.remember(node)
            if self.forgotten:
                h = self.forgotten.pop(key, None)     # known again under its id
                if h is not None:
                    self.forgotten.pop(h, None)
        node.kernel_refs += count
        return key

    cdef _forget(self, uint64_t nodeid, uint64_t count):
        if nodeid == FUSE_ROOT_ID:
            return
        node = self.inodes.get(nodeid)
        if node is None:
            return
        if node.fuse_id == nodeid:
            left = node.kernel_refs - count if node.kernel_refs > count else 0
            node.kernel_refs = left
        else:
            # an id the node had before it got a new one (see _passthrough)
            left = self.old_refs.get(nodeid, 0) - count
            if left > 0:
                self.old_refs[nodeid] = left
            else:
                self.old_refs.pop(nodeid, None)
        if left > 0:
            return
        if node.is_dir:
            self.kdirs -= 1
        self.inodes.pop(nodeid)
        self.listings.pop(nodeid, None)
        if self.want_export:
            self._remember_forgotten(nodeid, <Node>node)
        if node.fuse_id != nodeid and self.inodes.contains(node.fuse_id):
            return      # the node lives on under its newer id
        self.core.forget(node)

    def stats(self):
        """The counters `overlay stats` shows."""
        from overlay.engine.wire import OPCODE_NAMES
        req = {}
        for i in range(FUSE_OPCODE_MAX):
            if self.counts[i]:
                req[OPCODE_NAMES.get(i, str(i)).lower()] = self.counts[i]
        return {"mount": self.mount_info,
                "requests": req, "core": dict(self.core.counters), "layers": self.core.layer_stats(),
                "quota": self.core.quota_usage(), "images": self.core.provider_stats(),
                "inodes_known": len(self.inodes), "dirs_known": self.kdirs,
                "fd_reliefs": self.reliefs, "open_files": len(self.handles),
                "engine": "native", "passthrough": self.passthrough and not self.passthrough_broken,
                "backing_files": len(self.backings),
                "handles_kept": sum(1 for k in self.forgotten if type(k) is int),
                "workers": self.nworkers,
                "uring": ({"queues": self.nqueues, "depth": self.uring_depth,
                           "requests": self.uring_served, "threads": self.uring_threads()}
                          if self.uring else None)}

    # ------------------------------------------------------------ attributes

    cdef _fill_attr(self, fuse_attr *a, Node node, Stat st):
        """fuse_attr of node from its Stat st (C fields only: no Python
        object is made here)."""
        cdef int64_t t
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
        a.ino = self._shown_ino(node._ino)
        a.nlink = self._shown_nlink(node, st.st_nlink)
        a.uid = self._shown_uid(st.st_uid)
        a.gid = self._shown_gid(st.st_gid)
        a.rdev = _encode_dev(st.st_rdev)
        a.blksize = st.st_blksize
        a.flags = 0
        if node._upper == -1 and (st.st_mode & 0o170000) == 0o100000:
            # remember what the kernel now believes of a lower file, so an
            # edit made to it directly is noticed at the next open
            node_note_reported(node, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    cdef uint32_t _shown_uid(self, uint32_t uid):
        """The owner the mount shows for a host uid."""
        if self.squash_uid >= 0:
            return <uint32_t>self.squash_uid
        if self.squash:
            return 0
        return self.uidmap.shown(uid) if self.uidmap is not None else uid

    cdef uint32_t _shown_gid(self, uint32_t gid):
        if self.squash_gid >= 0:
            return <uint32_t>self.squash_gid
        if self.squash:
            return 0
        return self.gidmap.shown(gid) if self.gidmap is not None else gid

    cdef uint64_t _shown_ino(self, uint64_t ino) noexcept:
        """st_ino as shown: with ino32_t folded into 32 bits (programs
        built without large-file support fail with EOVERFLOW otherwise)."""
        if self.ino32 and ino > 0xFFFFFFFF:
            return (ino ^ (ino >> 32)) & 0xFFFFFFFF
        return ino

    cdef uint32_t _shown_nlink(self, Node node, uint64_t nlink):
        if node_is_merged(node) or (self.static_nlink and node.is_dir):
            return 1
        return <uint32_t>nlink

    cdef bint _mapped_writes(self, Node node):
        """Can node's data change without telling us or the kernel's FUSE
        inode? Stores through a shared mapping of a passthrough file go
        to the backing file: while one is open for writing, its
        attributes are never cached, so stat sees the times those stores
        set, as on the kernel overlay."""
        cdef _Backing bk
        if not self.backings:
            return False
        bk = self.backings.get(node.fuse_id)
        return bk is not None and bk.writers > 0

    cdef _fill_entry(self, fuse_entry_out *e, Node node, Stat st):
        """An entry for node (not counted: see _ref)."""
        if st is None:
            st = self.core.getattr(node)
        e.nodeid = self._key(node)
        e.generation = 0
        if node.ghost or self._mapped_writes(node):
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
        if e.attr.nlink > 1 and not node.is_dir and self.core.index:
            # index=on: a name of a file with several links is looked up at
            # each use, so the core knows which name an open or a link is
            # made through (the name the kernel's overlay links up)
            e.entry_valid = e.entry_valid_nsec = 0

    cdef int _reply_entry(self, int fd, uint64_t unique, Node node) except -1:
        """Reply with an entry for node and count the lookup (undone if the
        request is gone)."""
        cdef fuse_entry_out e
        cdef Stat st = node.st          # what the lookup just saw, if any
        cdef uint64_t key
        node.st = None
        self._fill_entry(&e, node, st)
        key = self._ref(node, 1)
        if self.reply(fd, unique, &e, sizeof(e)) == -E.ENOENT:
            self._forget(key, 1)
        return 0

    cdef int _reply_old_id(self, int fd, uint64_t unique, Node node, uint64_t nodeid) except -1:
        """An entry for node under nodeid, an id it is not known by now (a
        file handle the kernel made before it forgot that id): counted
        apart, as the ids a node had before a new one (see _forget)."""
        cdef fuse_entry_out e
        cdef Stat st = node.st
        node.st = None
        self._fill_entry(&e, node, st)
        e.nodeid = nodeid
        if not self.inodes.contains(nodeid):
            self._put(nodeid, node)
        self.old_refs[nodeid] = self.old_refs.get(nodeid, 0) + 1
        self.forgotten.pop(nodeid, None)
        if self.reply(fd, unique, &e, sizeof(e)) == -E.ENOENT:
            self._forget(nodeid, 1)
        return 0

    cdef int _reply_attr(self, int fd, uint64_t unique, Node node, Stat st=None) except -1:
        cdef fuse_attr_out o
        if st is None:
            st = self.core.getattr(node)
        if node.ghost or self._mapped_writes(node):
            o.attr_valid = o.attr_valid_nsec = 0
        else:
            o.attr_valid = self.attr_sec
            o.attr_valid_nsec = self.attr_nsec
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

    cdef object _copy_up(self, node, bint data=True, bint meta=False):
        """Copy node up (the caller holds the lock); the node to use next.
        meta: for a change of its metadata only (see Overlay.copy_up)."""
        if node.upper >= 0:
            return node
        return self.core.copy_up(node, data, meta)

    cdef _renumbered(self):
        """Tell the kernel about st_ino/nlink changes made by a copy-up."""
        core = self.core
        while core.renumbered:
            node = core.renumbered.pop()
            if node.fuse_id and self.inodes.contains(node.fuse_id):
                self.notify_inval_inode(node.fuse_id, -1, 0, True)

    # ------------------------------------------------------------ dispatch

    cdef int handle(self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
        cdef uint32_t op = h.opcode
        cdef uint64_t unique = h.unique
        if op < FUSE_OPCODE_MAX:
            self.counts[op] += 1
        try:
            if self.noxattrs and (op == FUSE_GETXATTR or op == FUSE_LISTXATTR
                                  or op == FUSE_SETXATTR or op == FUSE_REMOVEXATTR):
                # noxattrs=1: the kernel then fails them all with EOPNOTSUPP
                self.reply_err(fd, unique, E.ENOSYS)
                return 0
            if op == FUSE_LOOKUP:
                op_lookup(self, fd, h, arg, n)
            elif op == FUSE_GETATTR:
                op_getattr(self, fd, h, arg, n)
            elif op == FUSE_FORGET:
                with self.lock:
                    self._forget(h.nodeid, (<fuse_forget_in*>arg).nlookup)
            elif op == FUSE_BATCH_FORGET:
                op_batch_forget(self, h, arg, n)
            elif op == FUSE_READDIRPLUS or op == FUSE_READDIR:
                op_readdir(self, fd, h, arg, n, op == FUSE_READDIRPLUS)
            elif op == FUSE_OPEN:
                op_open(self, fd, h, arg, n)
            elif op == FUSE_READ:
                op_read(self, fd, h, arg, n)
            elif op == FUSE_WRITE:
                op_write(self, fd, h, arg, n)
            elif op == FUSE_RELEASE:
                op_release(self, fd, h, arg, n)
            elif op == FUSE_FLUSH:
                self.reply_err(fd, unique, 0)
            elif op == FUSE_OPENDIR:
                op_opendir(self, fd, h, arg, n)
            elif op == FUSE_RELEASEDIR:
                self.reply_err(fd, unique, 0)
            elif op == FUSE_CREATE:
                op_create(self, fd, h, arg, n)
            elif op == FUSE_SETATTR:
                op_setattr(self, fd, h, arg, n)
            elif op == FUSE_MKDIR:
                op_mkdir(self, fd, h, arg, n)
            elif op == FUSE_MKNOD:
                op_mknod(self, fd, h, arg, n)
            elif op == FUSE_SYMLINK:
                op_symlink(self, fd, h, arg, n)
            elif op == FUSE_LINK:
                op_link(self, fd, h, arg, n)
            elif op == FUSE_UNLINK or op == FUSE_RMDIR:
                op_remove(self, fd, h, arg, n, op == FUSE_RMDIR)
            elif op == FUSE_RENAME or op == FUSE_RENAME2:
                op_rename(self, fd, h, arg, n, op == FUSE_RENAME2)
            elif op == FUSE_READLINK:
                with self.lock:
                    target = self.core.readlink(self._node(h.nodeid))
                self.reply(fd, unique, PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target))
            elif op == FUSE_STATFS:
                op_statfs(self, fd, h)
            elif op == FUSE_FSYNC or op == FUSE_FSYNCDIR:
                op_fsync(self, fd, h, arg, n, op == FUSE_FSYNCDIR)
            elif op == FUSE_GETXATTR or op == FUSE_LISTXATTR:
                op_getxattr(self, fd, h, arg, n, op == FUSE_LISTXATTR)
            elif op == FUSE_SETXATTR:
                op_setxattr(self, fd, h, arg, n)
            elif op == FUSE_REMOVEXATTR:
                op_removexattr(self, fd, h, arg, n)
            elif op == FUSE_FALLOCATE:
                op_fallocate(self, fd, h, arg, n)
            elif op == FUSE_LSEEK:
                op_lseek(self, fd, h, arg, n)
            elif op == FUSE_COPY_FILE_RANGE or op == FUSE_COPY_FILE_RANGE_64:
                op_copy_file_range(self, fd, h, arg, n, op == FUSE_COPY_FILE_RANGE_64)
            elif op == FUSE_STATX:
                op_statx(self, fd, h, arg, n)
            elif op == FUSE_TMPFILE:
                op_tmpfile(self, fd, h, arg, n)
            elif op == FUSE_SYNCFS:
                with self.lock:
                    core = self.core
                self.hand_off()
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

    cdef _kill_suidgid(self, node, fuse_in_header *h):
        """Clear set-user-id, and set-group-id where it is one (group
        execute) or the caller is not in the file's group, as the kernel
        does (setattr_should_drop_suidgid) on a write, truncate or
        fallocate by a caller without CAP_FSETID (the kernel asks this
        only of such callers)."""
        st = self.core.getattr(node)
        mode = st.st_mode
        if not S.S_ISREG(mode):
            return
        new = mode & ~S.S_ISUID
        if mode & S.S_ISGID and (mode & S.S_IXGRP or not _in_group(h, st.st_gid)):
            new &= ~S.S_ISGID
        if new != mode:
            self.core.setattr(node, mode=S.S_IMODE(new))

    cdef int _fd(self, _Handle hd) except -1:
        """The fd behind a handle (the caller holds the lock). A handle opened
        on a lower file before it was copied up follows the copy, as the
        kernel overlay's files do: the upper file is put in place of the
        old fd with dup2, so a read running meanwhile sees one or the other."""
        if hd.lower and hd.node.upper >= 0 and not hd.node.metacopy:
            nfd = os.open(f"/proc/self/fd/{hd.node.upper}",
                          hd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY) | os.O_CLOEXEC)
            os.dup2(nfd, hd.fd)
            os.close(nfd)
            hd.lower = False
        return hd.fd

    cdef _release(self, uint64_t fh):
        cdef _Handle hd = self.handles.pop(fh, None)
        if hd is None:
            return
        os.close(hd.fd)
        if hd.backing_key:
            _unback(self, hd.backing_key, hd.flags & os.O_ACCMODE != os.O_RDONLY)
        node = hd.node
        node.pins -= 1
        if not node.pins and self.core.quota_on:
            self.core.quota_closed(node)  # an unlinked file's space given back
        if not node.pins and not self.inodes.contains(node.fuse_id):
            self.core.release(node)       # forgotten while open


include "_ops_tree.pxi"
include "_ops_files.pxi"
include "_ops_dirs.pxi"
