# cython: language_level=3
"""overlay_core._core: the layer stack, path resolution, merge and copy-up.

This is the whole overlay logic, with no knowledge of FUSE: the adapter in
src/overlay/fs.py calls these methods with Node objects and turns the
OSError they raise into FUSEError.

Model
-----
A Node is one object of the merged tree. It holds O_PATH file descriptors
on the real objects behind it: `upper` (or -1) and, for directories, the
stack of lower directories merged below it (`lowers`, top first, cut at an
opaque dir); for a non-directory only in a lower layer, `lowers` holds that
one object. Every access to a layer is an *at() call relative to such a
descriptor with a single name component and no-follow flags, or a reopen
of the descriptor through /proc/self/fd, so no symlink or `..` inside a
layer can lead outside it.

On-disk format: the kernel's (whiteouts are 0/0 character devices,
`<prefix>opaque` = "y", `<prefix>redirect` for moved directories, as with
redirect_dir=on). We also write `<prefix>fuse.ino`, holding the inode number
a copied-up object had in its lower layer, so st_ino survives copy-up and
remounts; the kernel ignores that name.

Identity: a Node stands for one real object: its `key` is the (st_dev,
st_ino) of the upper object, else of the top lower one, except for a lower
non-directory with several hard links, where each name is an object of its
own (the kernel without index=on treats them so: the one copied up gets a
new inode number, the others stay). The reported st_ino (`ino`) is the
kernel's: the lower inode number, kept through copy-up where the kernel
keeps it.
"""

import collections
import errno
import logging
import os
import stat as S
import threading

include "_sys.pxi"

log = logging.getLogger(__name__)

cdef int O_PATH = os.O_PATH
cdef int O_NOFOLLOW = os.O_NOFOLLOW
cdef int O_DIRECTORY = os.O_DIRECTORY
cdef int O_CLOEXEC = os.O_CLOEXEC

# redirect xattrs longer than this are refused (kernel: redirect_max)
REDIRECT_MAX = 256
NAME_MAX = 255
# non-directory Nodes whose O_PATH fds stay open (the kernel may keep every
# inode it was told of; the fds of the others are closed and reopened by name)
FD_CACHE_MAX = 4096
EVICTED = -3

# a copy-up of a file bigger than this lets other threads run (set_lock)
COPY_LOCKED_MAX = 256 * 1024
# dirs with this many lower dirs get a name index after a few lookups
INDEX_MIN_LAYERS = 8
# OCI image layers (option oci_whiteouts): .wh.NAME whites out NAME in the
# layers below; .wh..wh..opq makes its dir opaque. Same-layer entries stay.
OCI_WH = b".wh."
OCI_OPQ = b".wh..wh..opq"
INDEX_AFTER_LOOKUPS = 4



cdef inline bytes _proc(int fd):
    return b"/proc/self/fd/%d" % fd


def _listdir(int fd):
    """Names (bytes) in the directory behind (O_PATH) fd."""
    rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=fd)
    try:
        return [os.fsencode(nm) for nm in os.listdir(rfd)]
    finally:
        os.close(rfd)


cdef inline bint _is_whiteout_st(st):
    return S.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _err(int code, name=None):
    if name is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), name)


cdef class Node:
    """One object of the merged tree (see the module docstring)."""
    cdef public object parent      # Node, None for the root
    cdef public bytes name         # name under parent (last known alias)
    cdef public bint is_dir
    cdef int _upper                # O_PATH fd in the upper layer, or -1 (see upper)
    cdef list _lowers              # [(layer index, O_PATH fd)], top first (see lowers)
    cdef public bint evicted       # fds closed by the fd cache, reopened on first use
    cdef public bint busy          # in use by a copy-up: never evicted
    cdef public int pins           # open files on it (the adapter counts): never evicted
    cdef public object ov          # the Overlay that reopens evicted fds
    cdef public object real        # (st_dev, st_ino) of the real object behind the fds
    cdef public list aliases       # other (parent, name) a non-dir is known by
    cdef public list dircache      # [(name, Node, dir fd)] of its last listing, or None
    cdef public bint opaque        # upper dir has <prefix>opaque=y
    cdef public bytes redirect     # upper dir's <prefix>redirect, or None
    cdef public object ino         # st_ino reported for this object
    cdef public object cached      # (size, mtime_ns, ctime_ns) last reported
    cdef public object key         # identity of the real object (see Overlay._intern)
    cdef public object fuse_id     # the adapter's inode number for it, 0 if none
    cdef public bint ghost         # a whiteout that readdir lists (see Overlay.readdir)
    cdef public object st          # Stat found by the lookup that made/refreshed it
    cdef public object lindex      # {name: [positions in lowers]} (see _build_index)
    cdef public int nlookups       # lookups below it before lindex was built

    def __cinit__(self):
        self.fuse_id = 0
        self._upper = -1
        self._lowers = []
        self.aliases = []
        self.redirect = None
        self.cached = None

    def __dealloc__(self):
        if self._upper >= 0:
            try:
                os.close(self._upper)
            except OSError:
                pass
        for _, fd in self._lowers:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    property upper:
        """O_PATH fd of the object in the upper layer, or -1."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            return self._upper

        def __set__(self, int fd):
            self._upper = fd

    property lowers:
        """[(layer index, O_PATH fd)] of the lower objects, top first."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            return self._lowers

        def __set__(self, list v):
            self._lowers = v

    @property
    def fd(self):
        """O_PATH fd of the topmost real object."""
        return self.upper if self.upper >= 0 else self.lowers[0][1]

    @property
    def layer(self):
        """0 for the upper layer, 1 + index for a lower layer."""
        return 0 if self.upper >= 0 else self.lowers[0][0] + 1

    @property
    def merged(self):
        """A directory made of more than one real directory."""
        return self.is_dir and (len(self.lowers) + (self.upper >= 0)) > 1

    def __repr__(self):
        return "<Node %r ino=%s layer=%d>" % (self.name, self.ino, self.layer)


cdef class Overlay:
    """The layer stack and every operation on the merged tree."""
    cdef readonly list lower_paths
    cdef readonly object upper_path
    cdef readonly object work_path
    cdef readonly list lower_roots     # O_PATH fds of lower layer roots
    cdef readonly int upper_root       # O_PATH fd of upper root or -1
    cdef readonly int work_fd          # O_PATH fd of our dir inside work, or -1
    cdef readonly bytes prefix         # b"trusted.overlay." or b"user.overlay."
    cdef readonly bytes x_opaque, x_redirect, x_whiteout, x_ino
    cdef readonly bint redirect_dir
    cdef readonly bint userxattr
    cdef readonly bint oci             # lower layers use OCI .wh. whiteouts
    cdef readonly bint no_sync
    cdef readonly Node root
    cdef public dict nodes             # key -> Node (owned by the adapter's lookups)
    cdef public dict counters          # copy-ups, bytes copied, lookups... (overlay stats)
    cdef public list renumbered        # Nodes whose attributes changed behind the
                                       # kernel's back: copied up (the adapter drains it)
    cdef object _dev_index             # st_dev -> small int, when layers span filesystems
    cdef bint _samefs
    cdef object _tmp_counter
    cdef object _lock
    cdef object _fdcache               # OrderedDict id -> non-dir Node holding fds
    cdef public int fd_cache_max
    cdef bint _walk_stop               # set by _walk_lower: an opaque dir on the way
    cdef object _private_dirs          # {(st_dev, st_ino)} of the upper and work dirs
    cdef object _cond                  # threading.Condition on the callers' lock, or None

    def __init__(self, lowers, upper=None, work=None, *, userxattr=False,
                 redirect_dir=True, no_sync=False, oci_whiteouts=False):
        if not lowers:
            raise ValueError("at least one lower layer is needed")
        if (upper is None) != (work is None):
            raise ValueError("upperdir and workdir go together")
        self.lower_paths = [os.fsencode(p) for p in lowers]
        self.upper_path = os.fsencode(upper) if upper is not None else None
        self.work_path = os.fsencode(work) if work is not None else None
        self.prefix = b"user.overlay." if userxattr else b"trusted.overlay."
        self.x_opaque = self.prefix + b"opaque"
        self.x_redirect = self.prefix + b"redirect"
        self.x_whiteout = self.prefix + b"whiteout"
        self.x_ino = self.prefix + b"fuse.ino"
        self.redirect_dir = redirect_dir
        self.userxattr = userxattr
        self.oci = oci_whiteouts
        self.no_sync = no_sync
        self.nodes = {}
        self.counters = {"lookups": 0, "lookups_known": 0, "copy_ups": 0, "bytes_copied": 0,
                         "name_indexes": 0, "name_index_hits": 0}
        self.renumbered = []
        self._fdcache = collections.OrderedDict()
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = FD_CACHE_MAX if soft == resource.RLIM_INFINITY else max(32, min(FD_CACHE_MAX, soft // 4))
        self.fd_cache_max = int(os.environ.get("OVERLAY_FD_CACHE", cap))
        self._tmp_counter = 0
        self._lock = threading.Lock()
        self.lower_roots = []
        devs = []
        for p in self.lower_paths:
            fd = os.open(p, O_PATH | O_DIRECTORY | O_CLOEXEC)
            self.lower_roots.append(fd)
            devs.append(os.stat(fd).st_dev)
        self.upper_root = -1
        self.work_fd = -1
        if self.upper_path is not None:
            self.upper_root = os.open(self.upper_path, O_PATH | O_DIRECTORY | O_CLOEXEC)
            devs.append(os.stat(self.upper_root).st_dev)
            self._setup_work()
        self._private_dirs = set()
        for fd in (self.upper_root, self.work_fd):
            if fd >= 0:
                st = os.stat(fd)
                self._private_dirs.add((st.st_dev, st.st_ino))
        if self.work_path is not None:
            st = os.stat(self.work_path)
            self._private_dirs.add((st.st_dev, st.st_ino))
        self._dev_index = {}
        for d in devs:
            self._dev_index.setdefault(d, len(self._dev_index))
        self._samefs = len(self._dev_index) == 1
        self.root = self._make_root()

    # ------------------------------------------------------------ setup

    def _setup_work(self):
        """Prepare <work>/work (as the kernel names it) and empty it of
        leftovers from an earlier run: half-made copy-ups are never visible
        because they are only renamed into the upper dir when complete."""
        wroot = os.open(self.work_path, O_PATH | O_DIRECTORY | O_CLOEXEC)
        try:
            try:
                os.mkdir(b"work", 0o700, dir_fd=wroot)
            except FileExistsError:
                st = os.stat(b"work", dir_fd=wroot, follow_symlinks=False)
                if not S.S_ISDIR(st.st_mode):
                    # a leftover that is not a dir (never followed): replace it
                    os.unlink(b"work", dir_fd=wroot)
                    os.mkdir(b"work", 0o700, dir_fd=wroot)
            fd = os.open(b"work", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=wroot)
        finally:
            os.close(wroot)
        self.work_fd = fd
        self._clean_dir(fd)

    def _clean_dir(self, int dirfd):
        """Remove everything below dirfd (never following symlinks)."""
        for bname in _listdir(dirfd):
            st = os.stat(bname, dir_fd=dirfd, follow_symlinks=False)
            if S.S_ISDIR(st.st_mode):
                sub = os.open(bname, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=dirfd)
                try:
                    self._clean_dir(sub)
                finally:
                    os.close(sub)
                os.rmdir(bname, dir_fd=dirfd)
            else:
                os.unlink(bname, dir_fd=dirfd)

    def _make_root(self):
        cdef Node n = Node()
        n.parent = None
        n.name = b""
        n.is_dir = True
        if self.upper_root >= 0:
            n.upper = os.dup(self.upper_root)
        for i, fd in enumerate(self.lower_roots):
            n.lowers.append((i, os.dup(fd)))
        n.ino = os.stat(n.fd).st_ino
        return n

    def close(self):
        for fd in self.lower_roots:
            os.close(fd)
        self.lower_roots = []
        if self.upper_root >= 0:
            os.close(self.upper_root)
            self.upper_root = -1
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1

    # ------------------------------------------------------------ xattr helpers

    cdef object _getx(self, int fd, bytes name):
        """Value of xattr *name* on the object behind O_PATH fd, or None."""
        return c_getx(fd, name)

    cdef int _opath(self, int dirfd, bytes name, bint directory) except -1:
        cdef int flags = O_PATH | O_NOFOLLOW | O_CLOEXEC
        if directory:
            flags |= O_DIRECTORY
        return os.open(name, flags, dir_fd=dirfd)

    cdef bint _oci_whiteout(self, int dirfd, bytes name) except -1:
        """OCI layers: is there a .wh.<name> next to (absent) name?"""
        cdef struct_stat st
        return c_statat(dirfd, OCI_WH + name, &st) == 0

    cdef bint _oci_opaque(self, int dirfd) except -1:
        """OCI layers: does the dir hold the opaque marker .wh..wh..opq?"""
        cdef struct_stat st
        return c_statat(dirfd, OCI_OPQ, &st) == 0

    cdef bint _lower_whiteout(self, int dirfd, bytes name, st) except -1:
        return self._lower_whiteout_c(dirfd, name, st.st_mode, st.st_rdev, st.st_size)

    cdef bint _lower_whiteout_c(self, int dirfd, bytes name, unsigned int mode,
                                unsigned long long rdev, long long size) except -1:
        """Is this lower entry a whiteout? 0/0 char devices, and empty
        regular files with <prefix>whiteout. (The parent's opaque=x mark only
        tells readdir to look for the latter; lookup always does, as the
        kernel's.)"""
        if S.S_ISCHR(mode):
            return rdev == 0
        if S.S_ISREG(mode) and size == 0:
            fd = self._opath(dirfd, name, False)
            try:
                return self._getx(fd, self.x_whiteout) is not None
            finally:
                os.close(fd)
        return False

    # ------------------------------------------------------------ resolution

    def map_ino(self, st):
        if self._samefs:
            return st.st_ino
        return st.st_ino ^ (self._dev_index.get(st.st_dev, 0) << 56)

    cdef _walk_lower(self, int base, list comps):
        """Resolve comps below base in one lower layer.
        Returns (kind, fd, st): kind 0 missing, 1 stop (whiteout or a
        non-directory on the way), 2 non-directory, 3 directory; st a Stat."""
        cdef int fd = base
        cdef int nfd, err
        cdef Py_ssize_t j, n = len(comps)
        cdef struct_stat st
        cdef bytes comp
        cdef bint last
        owned = False
        self._walk_stop = False
        try:
            for j in range(n):
                comp = comps[j]
                last = j == n - 1
                if self.oci and comp.startswith(OCI_WH):
                    return 0, -1, None      # markers are never entries
                err = c_statat(fd, comp, &st)
                if err:
                    if err == ENOENT or err == ENOTDIR or err == ENAMETOOLONG:
                        if self.oci and err == ENOENT and self._oci_whiteout(fd, comp):
                            return 1, -1, None
                        return 0, -1, None
                    raise _err(err, comp)
                if (S.S_ISCHR(st.st_mode) or (S.S_ISREG(st.st_mode) and st.st_size == 0)) \
                        and self._lower_whiteout_c(fd, comp, st.st_mode, st.st_rdev, st.st_size):
                    return 1, -1, None
                if not S.S_ISDIR(st.st_mode):
                    if last:
                        return 2, self._opath(fd, comp, False), _mkstat(&st)
                    return 1, -1, None
                if (st.st_dev, st.st_ino) in self._private_dirs:
                    raise _err(errno.ELOOP, comp)   # the upper or work dir
                nfd = self._opath(fd, comp, True)
                if owned:
                    os.close(fd)
                fd = nfd
                owned = True
                if not last and (self._getx(fd, self.x_opaque) == b"y"
                                 or (self.oci and self._oci_opaque(fd))):
                    # an opaque dir on the way: the layers below do not
                    # count for this path (the kernel stops there too)
                    self._walk_stop = True
            owned = False
            return 3, fd, _mkstat(&st)
        finally:
            if owned:
                os.close(fd)

    cdef _check_redirect(self, bytes rd, bytes name, bint follow=True):
        """The kernel's checks on a redirect xattr: an absolute one is
        /-separated non-empty names, a relative one a single name; `.` and
        `..` are refused at lookup (EACCES)."""
        if rd.startswith(b"/"):
            comps = rd[1:].split(b"/")
        else:
            comps = [rd]
        if not rd or any(not c for c in comps) or (not rd.startswith(b"/") and b"/" in rd):
            log.warning("invalid redirect %r on %r", rd, name)
            raise _err(errno.EINVAL, name)
        if follow and any(c in (b".", b"..") for c in comps):
            raise _err(errno.EACCES, name)

    cdef _lookup_lowers(self, Node parent, bytes name, object redirect, bint have_upper_dir):
        """Search the lower layers for name below parent, following redirects.
        Returns (nondir, dirs, st): nondir is (layer, fd, st) or None; dirs a
        list of (layer, fd) of directories to merge, top first; st the Stat of
        the top one."""
        cdef int n = len(self.lower_roots)
        cdef int idx
        cdef Py_ssize_t j = 0
        cdef list plan
        path = redirect if redirect is not None else name
        dirs = []
        topst = None
        # which layers to probe: (layer index, dir fd) in order
        if path.startswith(b"/"):
            plan = [(i, self.lower_roots[i]) for i in range(n)]
        else:
            plan = parent.lowers
            if redirect is None and len(plan) >= INDEX_MIN_LAYERS:
                if parent.lindex is None:
                    parent.nlookups += 1
                    if parent.nlookups >= INDEX_AFTER_LOOKUPS:
                        self._build_index(parent)
                if parent.lindex is not None:
                    self.counters["name_index_hits"] += 1
                    positions = parent.lindex.get(name)
                    if positions is None:
                        return None, dirs, None
                    plan = [parent.lowers[k] for k in positions]
        while j < len(plan):
            idx, base = plan[j]
            j += 1
            if path.startswith(b"/"):
                comps = [c for c in path.split(b"/") if c]
                if not comps:
                    break
            else:
                comps = path.split(b"/")
            if any(c in (b"", b".", b"..") for c in comps):
                log.warning("ignoring invalid redirect %r", path)
                break
            kind, fd, st = self._walk_lower(base, comps)
            if kind == 0:
                if self._walk_stop:
                    break       # an opaque dir on the way: nothing below counts
                continue
            if kind == 1:
                break
            if kind == 2:
                if not dirs and not have_upper_dir:
                    return (idx, fd, st), dirs, st
                os.close(fd)
                break
            if not dirs:
                topst = st
            dirs.append((idx, fd))
            if idx == n - 1 or self._walk_stop:
                break
            op = self._getx(fd, self.x_opaque)
            if op == b"y" or (self.oci and self._oci_opaque(fd)):
                break
            rd = self._getx(fd, self.x_redirect)
            if rd is not None:
                self._check_redirect(rd, name)
                if rd.startswith(b"/"):
                    path = rd
                else:
                    head, sep, _ = path.rpartition(b"/")
                    path = head + sep + rd
                # the rest of the search follows the new path
                if path.startswith(b"/"):
                    plan = [(i, self.lower_roots[i]) for i in range(idx + 1, n)]
                else:
                    plan = [(i, f) for i, f in parent.lowers if i > idx]
                j = 0
        return None, dirs, topst

    cdef _build_index(self, Node d):
        """Which of d's lower dirs hold each name: {name: [positions in
        d.lowers]}. Lets lookups in a dir of a deep stack probe only the
        layers that have the name. Like the kernel's caches, it does not see
        lower dirs changed behind the mount."""
        index = {}
        cdef Py_ssize_t pos
        for pos in range(len(d.lowers)):
            for b in _listdir(d.lowers[pos][1]):
                if self.oci and b.startswith(OCI_WH):
                    if b == OCI_OPQ:
                        continue
                    b = b[len(OCI_WH):]     # a whiteout of b in this layer
                where = index.setdefault(b, [])
                if not where or where[-1] != pos:
                    where.append(pos)
        d.lindex = index
        self.counters["name_indexes"] += 1

    def lookup(self, Node parent, bytes name):
        """Resolve name in the merged directory parent; returns the Node
        (the same object for the same inode while it is known) or raises.
        The Node's `st` holds the Stat found on the way (for the reply)."""
        cdef struct_stat ust
        cdef int err
        cdef bint have_ust = False, have_upper_dir = False
        if not parent.is_dir:
            raise _err(errno.ENOTDIR, name)
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, name)
        cdef Node n = Node()
        n.parent = parent
        n.name = name
        redirect = None
        st = None
        if parent.upper >= 0:
            err = c_statat(parent.upper, name, &ust)
            if err == 0:
                have_ust = True
            elif err != ENOENT:
                raise _err(err, name)
            if have_ust:
                if S.S_ISCHR(ust.st_mode) and ust.st_rdev == 0:
                    raise _err(errno.ENOENT, name)
                st = _mkstat(&ust)
                if S.S_ISDIR(ust.st_mode):
                    n.is_dir = True
                    n.upper = self._opath(parent.upper, name, True)
                    have_upper_dir = True
                    n.opaque = self._getx(n.upper, self.x_opaque) == b"y"
                    redirect = self._getx(n.upper, self.x_redirect)
                    if redirect is not None:
                        # its form is always checked; it is followed (and
                        # its . and .. refused) only where there is a lower
                        # layer to follow it into, as in the kernel
                        follow = redirect.startswith(b"/") or bool(parent.lowers)
                        self._check_redirect(redirect, name, follow)
                        if not follow:
                            redirect = None
                    n.redirect = redirect
                else:
                    n.upper = self._opath(parent.upper, name, False)
        if not have_ust or (have_upper_dir and not n.opaque):
            nondir, dirs, lst = self._lookup_lowers(parent, name, redirect, have_upper_dir)
            if nondir is not None:
                n.is_dir = False
                n.lowers = [(nondir[0], nondir[1])]
            elif dirs:
                n.is_dir = True
                n.lowers = dirs
            elif not have_ust:
                raise _err(errno.ENOENT, name)
        # identity and inode number
        if n.upper >= 0:
            n.key = (ust.st_dev, ust.st_ino)
            x = self._getx(n.upper, self.x_ino)
            if x is not None and x.isdigit() and 0 < len(x) < 20 and 1 < int(x) < 2**63:
                n.ino = int(x)
            else:
                n.ino = self.map_ino(st)
        else:
            st = lst
            n.ino = self.map_ino(lst)
            if not n.is_dir and lst.st_nlink > 1:
                n.key = ("alias", parent.ino, name)
            else:
                n.key = (lst.st_dev, lst.st_ino)
        n.st = st
        n.ov = self
        if n.upper >= 0:
            n.real = (ust.st_dev, ust.st_ino)
        else:
            n.real = (lst.st_dev, lst.st_ino)
        return self._intern(n)

    # ------------------------------------------------------------ fd cache

    cdef _hold(self, Node n):
        """n (a non-dir) holds open fds: keep it in the bounded fd cache."""
        if n.is_dir or n.ghost or n.parent is None:
            return
        c = self._fdcache
        k = id(n)
        if k in c:
            c.move_to_end(k)
            return
        c[k] = n
        cdef Py_ssize_t tries = len(c)
        cdef Node old
        while len(c) > self.fd_cache_max and tries > 0:
            tries -= 1
            _, old = c.popitem(last=False)
            if old.busy or old.pins or old.evicted:
                if old.busy or old.pins:
                    c[id(old)] = old
                continue
            self._evict(old)

    cdef _evict(self, Node n):
        if n._upper >= 0:
            os.close(n._upper)
            n._upper = EVICTED
        lowers = []
        for idx, fd in n._lowers:
            if fd >= 0:
                os.close(fd)
            lowers.append((idx, EVICTED))
        n._lowers = lowers
        n.evicted = True

    def _reopen(self, Node n):
        """Reopen the fds of an evicted Node by name, under its parent dir or
        one of its other names, checking it is still the same object."""
        n.evicted = False
        cdef Node p
        names = [(n.parent, n.name)] + [a for a in n.aliases if a != (n.parent, n.name)]
        why = []
        for p, name in names:
            try:
                if n._upper == EVICTED:
                    self._sync_upper(p)
                    if p.upper < 0:
                        why.append((p.name, name, "parent not in upper"))
                        continue
                    fd = self._opath(p.upper, name, n.is_dir)
                else:
                    idx = n._lowers[0][0]
                    dirfd = -1
                    for i, f in p.lowers:
                        if i == idx:
                            dirfd = f
                    if dirfd < 0:
                        why.append((p.name, name, "layer not below parent"))
                        continue
                    fd = self._opath(dirfd, name, n.is_dir)
            except OSError as e:
                why.append((p.name, name, e.strerror))
                continue
            st = os.stat(fd)
            if (st.st_dev, st.st_ino) != n.real:
                os.close(fd)
                why.append((p.name, name, ("other object", st.st_ino)))
                continue
            if n._upper == EVICTED:
                n._upper = fd
            else:
                n._lowers = [(n._lowers[0][0], fd)]
            if (p, name) != (n.parent, n.name):
                n.parent, n.name = p, name
            self._hold(n)
            return
        n.evicted = True
        log.warning("cannot reopen %r (real %s): %s", n.name, n.real, why)
        raise _err(errno.ESTALE, n.name)

    cdef _sync_upper(self, Node d):
        """d, a dir, may have been copied up through another Node for it (one
        the kernel looked up after forgetting d): find its upper dir."""
        cdef struct_stat st
        if d._upper >= 0 or d.parent is None or not d.is_dir:
            return
        self._sync_upper(d.parent)
        pu = (<Node>d.parent)._upper
        if pu < 0:
            return
        if c_statat(pu, d.name, &st) == 0 and S.S_ISDIR(st.st_mode):
            d._upper = self._opath(pu, d.name, True)

    cdef _add_alias(self, Node n, Node parent, bytes name):
        if n.is_dir:
            return
        a = (parent, name)
        if a not in n.aliases:
            n.aliases.append(a)
            if len(n.aliases) > 16:
                del n.aliases[0]

    cdef _rename_alias(self, Node n, Node op, bytes oname, Node np, bytes nname):
        """n, known as oname under op, is now nname under np: that becomes its
        primary name; its other names stay known."""
        if (n.parent, n.name) != (op, oname):
            self._add_alias(n, n.parent, n.name)
        a = (op, oname)
        if a in n.aliases:
            n.aliases.remove(a)
        n.parent = np
        n.name = nname

    def _drop_alias(self, Node n, Node parent, bytes name):
        """name under parent no longer leads to n (unlinked or renamed away)."""
        a = (parent, name)
        if a in n.aliases:
            n.aliases.remove(a)
        if (n.parent, n.name) == a and n.aliases:
            n.parent, n.name = n.aliases.pop()

    cdef Node _intern(self, Node n):
        """Return the known Node for n's object, refreshed from n, or n."""
        cdef Node old = self.nodes.get(n.key)
        self.counters["lookups"] += 1
        if old is None or old is n:
            self._hold(n)
            return n
        self.counters["lookups_known"] += 1
        if old.is_dir != n.is_dir:
            return n
        # Same object seen again (maybe under another name): keep the
        # known Node, which may carry state (copy-up done elsewhere).
        if old.parent is not None and (old.parent, old.name) != (n.parent, n.name):
            self._add_alias(old, old.parent, old.name)
        old.parent = n.parent
        old.name = n.name
        old.st = n.st
        if old.evicted:
            # take the fds this lookup just opened instead of reopening
            old._upper, old._lowers = n._upper, n._lowers
            n._upper, n._lowers = -1, []
            old.evicted = False
            old.real = n.real
            self._hold(old)
            return old
        if old.upper < 0 and n.upper >= 0:
            old.upper = n.upper
            n.upper = -1
            if n.is_dir:
                old.opaque = n.opaque
                old.redirect = n.redirect
        if n.is_dir and old.upper >= 0 and n.upper >= 0:
            old.opaque = n.opaque
            old.redirect = n.redirect
        return old

    def remember(self, Node n):
        self.nodes[n.key] = n

    def forget(self, Node n):
        """The kernel forgot n: drop it, and close its fds unless in use."""
        if self.nodes.get(n.key) is n:
            del self.nodes[n.key]
        self.release(n)

    def release(self, Node n):
        """Close the fds of a non-dir n that nothing uses now (an O_PATH fd
        on a deleted file would keep its space)."""
        if n.is_dir or n.pins or n.busy or n.evicted or n.parent is None:
            return
        self._fdcache.pop(id(n), None)
        self._evict(n)

    cdef _adopt_upper(self, Node n, int fd, bint keep_ino):
        """n now lives in the upper layer at O_PATH fd: re-key it."""
        st = os.stat(fd)
        n.upper = fd
        if not keep_ino and n.ino != self.map_ino(st):
            n.ino = self.map_ino(st)
        # what the adapter told the kernel may be stale: st_ino (a split
        # hard link), nlink (a dir now merged), the birth time (a new file)
        self.renumbered.append(n)
        key = (st.st_dev, st.st_ino)
        n.real = key
        if self.nodes.get(n.key) is n:
            del self.nodes[n.key]
            self.nodes[key] = n
        n.key = key
        self._hold(n)

    # ------------------------------------------------------------ attributes

    def getattr(self, Node n):
        """Stat of the real object (the adapter reports n.ino and, for a
        merged dir, nlink 1)."""
        return sys_fstat(n.fd)

    def lower_positive(self, Node parent, bytes name):
        """Would a lower entry show at name if the upper had nothing there?"""
        if self.oci and name.startswith(OCI_WH):
            return False
        for idx, fd in parent.lowers:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                if self.oci and self._oci_whiteout(fd, name):
                    return False
                continue
            except OSError:
                return True
            return not self._lower_whiteout(fd, name, st)
        return False

    cdef object _upper_entry(self, Node parent, bytes name):
        """stat of name in parent's upper dir, or None."""
        if parent.upper < 0:
            return None
        try:
            return os.stat(name, dir_fd=parent.upper, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ readdir

    def list_names(self, Node n):
        """Names visible in merged directory n (whiteouts left out)."""
        return [name for name, _ in self._list(n, True)]

    def nonempty_names(self, Node n):
        """Names that make directory n non-empty, for rmdir and rename: like
        the kernel's emptiness check, this counts xattr whiteouts of lower
        layers, which readdir hides."""
        return [name for name, _ in self._list(n, False)]

    cdef list _list(self, Node n, bint xwhiteouts=True):
        """[(name, fd of the real dir it comes from)] of merged directory n;
        xwhiteouts: hide xattr whiteouts in lower dirs marked opaque=x."""
        if not n.is_dir:
            raise _err(errno.ENOTDIR)
        names = []
        seen = set()
        srcs = []
        if n.upper >= 0:
            srcs.append((True, n.upper))
        for _, fd in n.lowers:
            srcs.append((False, fd))
        for is_upper, fd in srcs:
            xwh = xwhiteouts and (not is_upper) and self._getx(fd, self.x_opaque) == b"x"
            oci_hidden = []
            rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=fd)
            try:
                with os.scandir(rfd) as it:
                    for e in it:
                        name = os.fsencode(e.name)
                        if self.oci and not is_upper and name.startswith(OCI_WH):
                            if name != OCI_OPQ:
                                oci_hidden.append(name[len(OCI_WH):])
                            continue
                        if name in seen:
                            continue
                        seen.add(name)
                        if e.is_dir(follow_symlinks=False) or e.is_symlink():
                            names.append((name, fd))
                            continue
                        isreg = e.is_file(follow_symlinks=False)
                        if not isreg or xwh:
                            try:
                                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            if is_upper:
                                if _is_whiteout_st(st):
                                    continue
                            elif self._lower_whiteout(fd, name, st):
                                continue
                        names.append((name, fd))
            finally:
                os.close(rfd)
            # an OCI whiteout hides its name in the layers below this one
            seen.update(oci_hidden)
        return names

    def readdir(self, Node n):
        """[(name, Node)] of directory n (without . and ..), as the kernel
        lists it: a merged dir as merged; a dir made of one real dir as that
        dir is, whiteouts included. Such whiteouts (and xattr whiteouts in a
        lower dir not marked opaque=x) come as ghost Nodes: listed, but a
        lookup of the name fails with ENOENT.

        The listing is kept until something changes in n through us (the
        kernel asks again for every pass of find or ls -R); every entry is
        stat'ed afresh through the real dir holding it, and an entry that is
        no longer the object it was makes the listing start over."""
        cdef struct_stat st
        cdef Node child, cur
        if n.dircache is not None:
            out = []
            for i, (name, child, dfd) in enumerate(n.dircache):
                if c_statat(dfd, name, &st) != 0 or (st.st_dev, st.st_ino) != child.real:
                    n.dircache = None
                    break
                cur = self.nodes.get(child.key)
                if cur is not None and cur is not child:
                    child = cur
                    n.dircache[i] = (name, child, dfd)
                child.st = _mkstat(&st)
                out.append((name, child))
            else:
                return out
        if n.merged:
            entries = self._list(n)
        else:
            fd = n.fd
            entries = [(nm, fd) for nm in _listdir(fd)]
            if self.oci and n.upper < 0:
                entries = [e for e in entries if not e[0].startswith(OCI_WH)]
        out = []
        cache = []
        known = {}      # one Node per object, also for names not yet known
        for name, fd in entries:
            try:
                child = self.lookup(n, name)
                child = known.setdefault(child.key, child)
            except OSError:
                # a whiteout, or an entry whose lookup fails (bad redirect,
                # EIO...): listed, and only its lookup fails, as the kernel
                try:
                    child = self._ghost(fd, name)
                except OSError:
                    child = self._blind_ghost(fd, name)
            out.append((name, child))
            cache.append((name, child, fd))
        n.dircache = cache
        return out

    cdef Node _blind_ghost(self, int dirfd, bytes name):
        """An entry even a stat fails on (EIO from a layer): listed with what
        the directory itself says of it, like the kernel lists it."""
        cdef Node g = Node()
        mode = S.S_IFREG
        ino = 0
        rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=dirfd)
        try:
            with os.scandir(rfd) as it:
                for e in it:
                    if e.name == os.fsdecode(name):
                        ino = e.inode()
                        if e.is_dir(follow_symlinks=False):
                            mode = S.S_IFDIR
                        elif e.is_symlink():
                            mode = S.S_IFLNK
                        break
        finally:
            os.close(rfd)
        g.name = name
        g.ghost = True
        g.key = ("ghost", name, ino)
        g.real = None
        g.ino = ino or 1
        g.st = blind_stat(mode, g.ino)
        return g

    cdef Node _ghost(self, int dirfd, bytes name):
        cdef Node g = Node()
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        g.name = name
        g.ghost = True
        g.is_dir = S.S_ISDIR(st.st_mode)
        g.lowers = [(0, self._opath(dirfd, name, False))]
        g.key = ("ghost", st.st_dev, st.st_ino)
        g.real = (st.st_dev, st.st_ino)
        g.ino = self.map_ino(st)
        return g

    def readlink(self, Node n):
        # readlinkat(fd, "") reads the symlink an O_PATH fd refers to
        return os.readlink(b"", dir_fd=n.fd)

    # ------------------------------------------------------------ work dir

    cdef bytes _tmpname(self):
        with self._lock:
            self._tmp_counter += 1
            return b"#%x-%x" % (os.getpid(), self._tmp_counter)

    def _need_upper(self):
        if self.upper_root < 0:
            raise _err(errno.EROFS)

    def _make_whiteout(self):
        """Create a whiteout in the work dir; returns its temporary name."""
        t = self._tmpname()
        os.mknod(t, S.S_IFCHR | 0, os.makedev(0, 0), dir_fd=self.work_fd)
        return t

    def _copy_xattrs(self, int src_fd, bytes dst_path, bint nofollow=False):
        """Copy every xattr except our own from the object behind src_fd."""
        try:
            names = os.listxattr(_proc(src_fd))
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        for nm in names:
            b = os.fsencode(nm)
            if b.startswith(self.prefix) and not b.startswith(self.prefix + b"overlay."):
                continue        # private; escaped user xattrs are copied
            try:
                v = os.getxattr(_proc(src_fd), b)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                raise
            try:
                os.setxattr(dst_path, b, v, follow_symlinks=not nofollow)
            except OSError as e:
                # security.* may be refused by the upper fs; the kernel
                # skips such names too when the fs does not support them
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or b.startswith(b"security."):
                    log.debug("copy-up: xattr %r not copied: %s", b, e)
                    continue
                raise

    # ------------------------------------------------------------ copy-up

    def copy_up(self, Node n, bint data=True):
        """Make n exist in the upper layer (parents first), preparing it in
        the work dir and renaming it into place. Returns the Node to use from
        now on: n itself, except for a lower file with several hard links,
        where the copy gets a new inode number, as in the kernel without
        index=on (each name of such a file is a Node of its own)."""
        if n.upper >= 0:
            return n
        self._wait_idle(n)      # another thread copies it up: use its copy
        if n.upper >= 0:
            return n
        n.busy = True           # the fd cache must not close its fds meanwhile
        try:
            return self._copy_up(n, data)
        finally:
            n.busy = False
            if self._cond is not None:
                self._cond.notify_all()

    def set_lock(self, lock):
        """Callers from several threads: they hold `lock` (a threading.Lock)
        around every call. The core then lets go of it while it copies the
        data of a big file up (other requests go on meanwhile) and makes
        changes to a Node being copied up wait for that copy."""
        self._cond = threading.Condition(lock)

    def _wait_idle(self, Node n):
        """Wait (letting go of the lock) while n is being copied up."""
        if self._cond is not None:
            while n.busy:
                self._cond.wait()

    cdef _copy_up(self, Node n, bint data):
        cdef Node p
        self._need_upper()
        p = n.parent
        if p is None:
            raise _err(errno.EROFS)
        self.copy_up(p)
        # Someone (another Node of the same dir) may have done it already.
        ust = self._upper_entry(p, n.name)
        if ust is not None and not _is_whiteout_st(ust):
            src_st = os.stat(n.fd)
            if S.S_IFMT(ust.st_mode) == S.S_IFMT(src_st.st_mode):
                self._adopt_upper(n, self._opath(p.upper, n.name, n.is_dir),
                                  n.is_dir or src_st.st_nlink == 1)
                return n
            raise _err(errno.EEXIST, n.name)
        src = n.lowers[0][1]
        st = os.stat(src)
        # the kernel keeps the parent's times across a copy-up into it
        pst = os.stat(p.upper)
        wd = self.work_fd
        t = self._tmpname()
        tpath = b"/proc/self/fd/%d/%s" % (wd, t)
        fmt = S.S_IFMT(st.st_mode)
        created = False
        try:
            if fmt == S.S_IFDIR:
                os.mkdir(t, 0o700, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, True)
            elif fmt == S.S_IFREG:
                wfd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600, dir_fd=wd)
                created = True
                try:
                    # a big file: other threads go on while its data are copied
                    # (n is busy: changes to it wait, see _wait_idle)
                    unlock = self._cond is not None and data and st.st_size > COPY_LOCKED_MAX
                    if unlock:
                        self._cond.release()
                    try:
                        if data and st.st_size:
                            rfd = os.open(_proc(src), os.O_RDONLY | O_CLOEXEC)
                            try:
                                sys_copy_data(rfd, wfd, st.st_size, True)
                            finally:
                                os.close(rfd)
                        if not self.no_sync:
                            sys_fsync(wfd)
                    finally:
                        if unlock:
                            self._cond.acquire()
                finally:
                    os.close(wfd)
                tfd = self._opath(wd, t, False)
            elif fmt == S.S_IFLNK:
                target = os.readlink(b"", dir_fd=src)
                os.symlink(target, t, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, False)
            else:
                os.mknod(t, fmt | 0o600, st.st_rdev, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, False)
            try:
                self._copy_xattrs(src, _proc(tfd))
                ino_kept = False
                if n.ino is not None and (fmt == S.S_IFDIR or st.st_nlink == 1):
                    try:
                        os.setxattr(_proc(tfd), self.x_ino, b"%d" % n.ino)
                        ino_kept = True
                    except OSError as e:
                        # user.* xattrs are refused on symlinks and special
                        # files (userxattr); the kernel then has no origin
                        # either and reports the upper inode number
                        if fmt == S.S_IFREG or fmt == S.S_IFDIR:
                            raise
                        log.debug("copy-up: no inode xattr on %r: %s", n.name, e)
                os.chown(t, st.st_uid, st.st_gid, dir_fd=wd, follow_symlinks=False)
                if fmt != S.S_IFLNK:
                    os.chmod(_proc(tfd), S.S_IMODE(st.st_mode))
                sys_utimens(tpath, st.st_atime_ns, st.st_mtime_ns, True)
                sys_renameat2(wd, t, p.upper, n.name, RENAME_NOREPLACE)
            except BaseException:
                os.close(tfd)
                raise
            try:
                sys_utimens(_proc(p.upper), pst.st_atime_ns, pst.st_mtime_ns, False)
            except OSError as e:
                log.debug("copy-up: parent times not restored: %s", e)
        except BaseException:
            if created:
                try:
                    if fmt == S.S_IFDIR:
                        os.rmdir(t, dir_fd=wd)
                    else:
                        os.unlink(t, dir_fd=wd)
                except OSError:
                    pass
            raise
        if n.upper >= 0:
            os.close(tfd)     # a concurrent lookup already found the copy
        else:
            self._adopt_upper(n, tfd, ino_kept)
        if not n.is_dir:
            # the lower object is no longer needed once the copy is in place
            for _, fd in n.lowers:
                os.close(fd)
            n.lowers = []
        self.counters["copy_ups"] += 1
        if fmt == S.S_IFREG and data:
            self.counters["bytes_copied"] += st.st_size
        log.debug("copied up %r (ino %s)", n.name, n.ino)
        return n

    # ------------------------------------------------------------ create

    cdef object _parent_owner(self, Node parent, int uid, int gid):
        pst = os.stat(parent.fd)
        if pst.st_mode & S.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    def _check_new(self, Node parent, bytes name):
        """EEXIST if name shows in parent; returns whether the upper holds a whiteout."""
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, name)
        try:
            self.lookup(parent, name)
        except FileNotFoundError:
            pass
        else:
            raise _err(errno.EEXIST, name)
        ust = self._upper_entry(parent, name)
        return ust is not None and _is_whiteout_st(ust)

    def _create(self, Node parent, bytes name, int kind, int mode, int rdev, bytes target,
                int uid, int gid, Node link_src=None, int open_flags=-1):
        """Create an object in the upper dir of parent: directly when no
        whiteout is in the way, else prepared in the work dir and exchanged
        with the whiteout (dirs made there are opaque)."""
        self._need_upper()
        if not parent.is_dir:
            raise _err(errno.ENOTDIR, name)
        over_whiteout = self._check_new(parent, name)
        self.copy_up(parent)
        parent.dircache = None
        uid, gid, sgid = self._parent_owner(parent, uid, gid)
        if kind == S.S_IFDIR and sgid:
            mode |= S.S_ISGID
        if over_whiteout:
            dfd, dname = self.work_fd, self._tmpname()
        else:
            dfd, dname = parent.upper, name
        ofd = -1
        if link_src is not None:
            link_src = self.copy_up(link_src)
            os.link(_proc(link_src.upper), dname, dst_dir_fd=dfd, follow_symlinks=True)
        elif kind == S.S_IFDIR:
            os.mkdir(dname, mode & 0o7777, dir_fd=dfd)
        elif kind == S.S_IFREG and open_flags >= 0:
            ofd = os.open(dname, (open_flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | O_CLOEXEC,
                          mode & 0o7777, dir_fd=dfd)
        elif kind == S.S_IFLNK:
            os.symlink(target, dname, dir_fd=dfd)
        else:
            os.mknod(dname, kind | (mode & 0o7777), rdev, dir_fd=dfd)
        try:
            if link_src is None:
                os.chown(dname, uid, gid, dir_fd=dfd, follow_symlinks=False)
                if kind != S.S_IFLNK:
                    # chown may clear set-id bits: apply the mode after it
                    os.chmod(b"/proc/self/fd/%d/%s" % (dfd, dname), mode & 0o7777)
            if kind == S.S_IFDIR and (over_whiteout or (parent.lowers and not self.userxattr)):
                # over a whiteout it must be opaque; in a merged parent the
                # kernel marks it too (not with userxattr), so lookups skip
                # the lower layers
                os.setxattr(b"/proc/self/fd/%d/%s" % (dfd, dname), self.x_opaque, b"y")
            if over_whiteout:
                sys_renameat2(dfd, dname, parent.upper, name, RENAME_EXCHANGE)
                os.unlink(dname, dir_fd=dfd)   # the whiteout, now in work
        except BaseException:
            if ofd >= 0:
                os.close(ofd)
            try:
                if kind == S.S_IFDIR:
                    os.rmdir(dname, dir_fd=dfd)
                else:
                    os.unlink(dname, dir_fd=dfd)
            except OSError:
                pass
            raise
        node = self.lookup(parent, name)
        return ofd, node

    def mkdir(self, Node parent, bytes name, int mode, int uid, int gid):
        return self._create(parent, name, S.S_IFDIR, mode, 0, None, uid, gid)[1]

    def mknod(self, Node parent, bytes name, int mode, int rdev, int uid, int gid):
        if S.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM, name)   # a whiteout cannot be made (as the kernel)
        return self._create(parent, name, S.S_IFMT(mode), S.S_IMODE(mode), rdev, None, uid, gid)[1]

    def symlink(self, Node parent, bytes name, bytes target, int uid, int gid):
        return self._create(parent, name, S.S_IFLNK, 0o777, 0, target, uid, gid)[1]

    def create(self, Node parent, bytes name, int flags, int mode, int uid, int gid):
        """Create and open a regular file: (fd, Node)."""
        return self._create(parent, name, S.S_IFREG, S.S_IMODE(mode), 0, None, uid, gid,
                            open_flags=flags & ~(os.O_CREAT | os.O_EXCL))

    def tmpfile(self, Node parent, int flags, int mode, int uid, int gid):
        """An unnamed regular file in parent's upper dir (O_TMPFILE), opened
        with flags: (fd, Node). The Node has no name (parent None, so the fd
        cache never closes its fd) until link() gives it one."""
        cdef Node n
        self._need_upper()
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        self.copy_up(parent)
        uid, gid, _ = self._parent_owner(parent, uid, gid)
        f = (flags & ~(os.O_CREAT | os.O_TRUNC | os.O_NOCTTY | O_NOFOLLOW)) | os.O_TMPFILE | O_CLOEXEC
        fd = os.open(_proc(parent.upper), f, mode & 0o7777)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode & 0o7777)    # chown may clear set-id bits
            opath = os.open(_proc(fd), O_PATH | O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        st = sys_fstat(opath)
        n = Node()
        n.parent = None
        n.name = b""
        n.is_dir = False
        n.upper = opath
        n.key = (st.st_dev, st.st_ino)
        n.real = n.key
        n.ino = self.map_ino(st)
        n.st = st
        n.ov = self
        return fd, n

    def statx(self, Node n, unsigned int mask):
        """statx(2) of the real object (birth time included where the
        layer's filesystem records it)."""
        return sys_statx(n.fd, mask)

    def link(self, Node src, Node parent, bytes name):
        if src.is_dir:
            raise _err(errno.EPERM, name)
        return self._create(parent, name, 0, 0, 0, None, 0, 0, link_src=src)[1]

    # ------------------------------------------------------------ open / setattr

    def open(self, Node n, int flags):
        """Open the real object; write access copies it up first.
        Returns (fd, node): node differs from n after the copy-up of a
        hard-linked lower file."""
        acc = flags & os.O_ACCMODE
        if acc != os.O_RDONLY or flags & os.O_TRUNC:
            self._need_upper()
            n = self.copy_up(n, data=not (flags & os.O_TRUNC))
        f = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | O_NOFOLLOW) | O_CLOEXEC
        return os.open(_proc(n.fd), f), n

    def setattr(self, Node n, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None, fh=None):
        self._need_upper()
        n = self.copy_up(n, data=size is None or size != 0)
        path = _proc(n.upper)
        if size is not None:
            if fh is not None:
                os.ftruncate(fh, size)
            else:
                os.truncate(path, size)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(path, S.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            sys_utimens(path, atime_ns, mtime_ns, False)
        return n

    # ------------------------------------------------------------ xattrs

    def _own(self, bytes name):
        """One of the overlay's own xattr names (trusted.overlay.*, or
        user.overlay.* with userxattr)."""
        return name.startswith(self.prefix)

    cdef bytes _escape(self, bytes name):
        """The kernel's escaping (Linux 6.7): <prefix>X as seen through the
        mount is stored as <prefix>overlay.X, so users can neither read nor
        change the overlay's own <prefix>X."""
        if name.startswith(self.prefix):
            return self.prefix + b"overlay." + name[len(self.prefix):]
        return name

    cdef object _unescape(self, bytes stored):
        """The name shown for a stored xattr, or None for a private one."""
        if stored.startswith(self.prefix):
            esc = self.prefix + b"overlay."
            if stored.startswith(esc):
                return self.prefix + stored[len(esc):]
            return None
        return stored

    def getxattr(self, Node n, bytes name):
        return os.getxattr(_proc(n.fd), self._escape(name))

    def listxattr(self, Node n):
        out = []
        for nm in os.listxattr(_proc(n.fd)):
            shown = self._unescape(os.fsencode(nm))
            if shown is not None:
                out.append(shown)
        return out

    def setxattr(self, Node n, bytes name, bytes value, int flags=0):
        self._need_upper()
        n = self.copy_up(n)
        os.setxattr(_proc(n.upper), self._escape(name), value, flags)
        return n

    def removexattr(self, Node n, bytes name):
        self._need_upper()
        name = self._escape(name)
        if n.upper < 0:
            os.getxattr(_proc(n.fd), name)      # ENODATA without copy-up
            n = self.copy_up(n)
        os.removexattr(_proc(n.upper), name)
        return n

    # ------------------------------------------------------------ remove

    cdef _only_whiteouts(self, int dirfd, bytes name):
        """ENOTEMPTY unless the dir holds nothing but whiteouts: it is about to be
        cleared, and a visible entry there would be lost."""
        fd = self._opath(dirfd, name, True)
        try:
            for nm in _listdir(fd):
                st = os.stat(nm, dir_fd=fd, follow_symlinks=False)
                if not _is_whiteout_st(st):
                    log.error("refusing to clear %r: it holds %r", name, nm)
                    raise _err(errno.ENOTEMPTY, name)
        finally:
            os.close(fd)

    def _clear_in_work(self, bytes tname):
        """Remove a directory that was moved into the work dir."""
        fd = self._opath(self.work_fd, tname, True)
        try:
            self._clean_dir(fd)
        finally:
            os.close(fd)
        os.rmdir(tname, dir_fd=self.work_fd)

    def _whiteout_over(self, Node parent, bytes name, bint exists_in_upper, bint is_dir):
        """Replace name in parent's upper dir by a whiteout, atomically."""
        if exists_in_upper and is_dir:
            self._only_whiteouts(parent.upper, name)
        t = self._make_whiteout()
        try:
            if exists_in_upper:
                sys_renameat2(self.work_fd, t, parent.upper, name, RENAME_EXCHANGE)
            else:
                sys_renameat2(self.work_fd, t, parent.upper, name, RENAME_NOREPLACE)
        except BaseException:
            os.unlink(t, dir_fd=self.work_fd)
            raise
        if exists_in_upper:
            if is_dir:
                self._clear_in_work(t)
            else:
                os.unlink(t, dir_fd=self.work_fd)

    def unlink(self, Node parent, bytes name):
        self._need_upper()
        n = self.lookup(parent, name)
        if n.is_dir:
            raise _err(errno.EISDIR, name)
        self._wait_idle(n)
        self._remove(parent, name, n)
        self._drop_alias(n, parent, name)
        if (n.parent, n.name) == (parent, name):
            self.release(n)         # no name left: give its space back
        return n

    def rmdir(self, Node parent, bytes name):
        self._need_upper()
        n = self.lookup(parent, name)
        if not n.is_dir:
            raise _err(errno.ENOTDIR, name)
        if self.nonempty_names(n):
            raise _err(errno.ENOTEMPTY, name)
        self._remove(parent, name, n)
        return n

    def _remove(self, Node parent, bytes name, Node n):
        parent.dircache = None
        if n.upper >= 0:
            lp = self.lower_positive(parent, name)
        else:
            lp = True
        self.copy_up(parent)
        if not lp:
            if n.is_dir and n.lowers:
                # a merged dir under a new name: move it out, then clean it
                self._only_whiteouts(parent.upper, name)
                t = self._tmpname()
                sys_renameat2(parent.upper, name, self.work_fd, t, RENAME_NOREPLACE)
                self._clear_in_work(t)
            elif n.is_dir:
                os.rmdir(name, dir_fd=parent.upper)
            else:
                os.unlink(name, dir_fd=parent.upper)
        else:
            self._whiteout_over(parent, name, n.upper >= 0, n.is_dir)

    # ------------------------------------------------------------ rename

    cdef bint _merge_or_lower(self, Node n):
        return n.is_dir and (n.upper < 0 or len(n.lowers) > 0)

    cdef bint _can_move(self, Node n):
        return self.redirect_dir or not n.is_dir or not self._merge_or_lower(n)

    cdef bytes _abs_redirect(self, Node n):
        parts = []
        cdef Node d = n
        while d.parent is not None:
            nm = d.redirect if d.redirect else d.name
            parts.append(nm)
            if nm.startswith(b"/"):
                break
            d = d.parent
        else:
            parts.append(b"")
        s = b"/".join(reversed(parts))
        if not s.startswith(b"/"):
            s = b"/" + s
        return s

    cdef _set_redirect(self, Node n, bint samedir):
        absolute = not samedir
        if n.redirect and (not absolute or n.redirect.startswith(b"/")):
            return
        rd = self._abs_redirect(n) if absolute else n.name
        if len(rd) > REDIRECT_MAX:
            raise _err(errno.EXDEV, n.name)
        try:
            os.setxattr(_proc(n.upper), self.x_redirect, rd)
        except OSError as e:
            log.warning("failed to set redirect on %r: %s", n.name, e)
            raise _err(errno.EXDEV, n.name)
        n.redirect = rd

    def rename(self, Node op, bytes oname, Node np, bytes nname, unsigned int flags=0):
        """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE, as the kernel does it."""
        cdef Node old, new
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        if (flags & RENAME_NOREPLACE) and (flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        self._need_upper()
        if len(nname) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, nname)
        old = self.lookup(op, oname)
        self._wait_idle(old)
        try:
            new = self.lookup(np, nname)
        except FileNotFoundError:
            new = None
        if new is not None:
            self._wait_idle(new)
        exchange = bool(flags & RENAME_EXCHANGE)
        overwrite = not exchange
        if new is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST, nname)
        if exchange and new is None:
            raise _err(errno.ENOENT, nname)
        if new is old:
            return
        if overwrite and new is not None:
            if old.is_dir and not new.is_dir:
                raise _err(errno.ENOTDIR, nname)
            if not old.is_dir and new.is_dir:
                raise _err(errno.EISDIR, nname)
        if not self._can_move(old):
            raise _err(errno.EXDEV, oname)
        if not overwrite and not self._can_move(new):
            raise _err(errno.EXDEV, nname)
        need_clear = False
        if overwrite and new is not None and new.is_dir and new.lowers:
            if self.nonempty_names(new):
                raise _err(errno.ENOTEMPTY, nname)
            need_clear = new.upper >= 0
            if need_clear:
                self._only_whiteouts(np.upper, nname)
        samedir = op is np
        new_is_whiteout = False
        if new is None:
            ust = self._upper_entry(np, nname)
            new_is_whiteout = ust is not None and _is_whiteout_st(ust)
        rflags = RENAME_EXCHANGE if exchange else 0
        cleanup_whiteout = False
        if overwrite:
            old_lp = self.lower_positive(op, oname) if old.upper >= 0 else True
            if old_lp:
                if not new_is_whiteout:
                    rflags |= RENAME_WHITEOUT
                else:
                    rflags |= RENAME_EXCHANGE
            elif old.is_dir and new_is_whiteout:
                rflags |= RENAME_EXCHANGE
                cleanup_whiteout = True
        op.dircache = None
        np.dircache = None
        old = self.copy_up(old)
        self.copy_up(np)
        if not overwrite:
            new = self.copy_up(new)
        if need_clear:
            # make the target an empty opaque dir first, as the kernel does
            t = self._tmpname()
            os.mkdir(t, 0o700, dir_fd=self.work_fd)
            os.setxattr(b"/proc/self/fd/%d/%s" % (self.work_fd, t), self.x_opaque, b"y")
            sys_renameat2(self.work_fd, t, np.upper, nname, RENAME_EXCHANGE)
            self._clear_in_work(t)
        if self._merge_or_lower(old):
            self._set_redirect(old, samedir)
        elif old.is_dir and not old.opaque and np.merged:
            os.setxattr(_proc(old.upper), self.x_opaque, b"y")
            old.opaque = True
        if not overwrite:
            if self._merge_or_lower(new):
                self._set_redirect(new, samedir)
            elif new.is_dir and not new.opaque and op.merged:
                os.setxattr(_proc(new.upper), self.x_opaque, b"y")
                new.opaque = True
        if rflags & RENAME_WHITEOUT:
            try:
                sys_renameat2(op.upper, oname, np.upper, nname, rflags)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # no RENAME_WHITEOUT on this fs: rename, then whiteout the source
                sys_renameat2(op.upper, oname, np.upper, nname, rflags & ~RENAME_WHITEOUT)
                self._whiteout_over(op, oname, False, False)
        else:
            sys_renameat2(op.upper, oname, np.upper, nname, rflags)
        if cleanup_whiteout:
            os.unlink(oname, dir_fd=op.upper)
        self._rename_alias(old, op, oname, np, nname)
        if exchange:
            self._rename_alias(new, np, nname, op, oname)
        elif new is not None:
            self._drop_alias(new, np, nname)
            if (new.parent, new.name) == (np, nname):
                self.release(new)

    # ------------------------------------------------------------ misc

    def syncfs(self):
        """syncfs(2) of the upper layer's filesystem (not with volatile)."""
        if self.no_sync or self.upper_root < 0:
            return
        fd = os.open(_proc(self.upper_root), os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        try:
            sys_syncfs(fd)
        finally:
            os.close(fd)

    def statfs(self):
        fd = self.upper_root if self.upper_root >= 0 else self.lower_roots[0]
        return os.statvfs(_proc(fd))

    def fsync(self, int fd, bint datasync):
        if self.no_sync:
            return          # volatile: no sync reaches the upper fs (as the kernel)
        sys_fsync(fd, datasync)
