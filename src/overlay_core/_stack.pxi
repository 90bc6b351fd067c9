"""Part of overlay_core._core (included by _core.pyx): _Stack, the layer stack.

The layers' root fds and the work dir (emptied at mount), the overlay's
xattr names, the small helpers every other part uses (xattrs on O_PATH fds,
single-name opens, whiteout tests, the work dir's temporary names), and the
identity of Nodes: the bounded fd cache, reopening evicted fds, the names a
Node is known by, and interning (one Node per real object). Resolution,
listing, copy-up and the namespace changes build on it, each a subclass in
its own part; Overlay is the last of them. Fields: _core.pxd."""


cdef int _open_below(int clone, bytes base, bytes path, dev, ino) except -1:
    """O_PATH fd of the dir at path, opened inside clone (a clone of the
    mount whose root is at base) without crossing a mount or following a
    symlink; it must be the dir (dev, ino) that path names (path itself is
    made canonical first where it is not)."""
    cdef int fd
    cdef bytes prefix = base if base.endswith(b"/") else base + b"/"
    for attempt in range(2):
        cand = path.rstrip(b"/") if attempt == 0 else os.fsencode(os.path.realpath(path))
        if cand == base:
            rel = b"."
        elif cand.startswith(prefix):
            rel = cand[len(prefix):]
        else:
            continue
        try:
            fd = os.dup(clone) if rel == b"." else sys_open_inside(clone, rel, O_PATH | O_DIRECTORY | O_CLOEXEC)
        except OSError:
            continue
        st = os.stat(fd)
        if st.st_dev == dev and st.st_ino == ino:
            return fd
        os.close(fd)
    raise OSError(errno.ESTALE, "%s moved while it was opened" % os.fsdecode(path))


cdef bytes _mount_root(bytes path, unsigned long long mnt):
    """Where the mount mnt that path (absolute, without symlinks) is on
    has its root: the highest dir above path still on that mount."""
    cdef int fd
    while path != b"/":
        parent = os.path.dirname(path)
        fd = os.open(parent, O_PATH | O_DIRECTORY | O_CLOEXEC)
        try:
            if sys_mount_id(fd) != mnt:
                break
        finally:
            os.close(fd)
        path = parent
    return path


cdef unsigned long long _atime_attr(atime, bint read_only):
    """The mount_setattr flags of the upper layer's private mount for the
    overlay mount's atime rules, ("relatime" | "noatime" | "strictatime",
    nodiratime). A read-only mount updates no atime; as the kernel's, it
    still writes the overlay's xattrs (the uuid, the origin of merged
    dirs), so the upper is not made read-only."""
    mode, nodiratime = ("noatime", False) if read_only else atime
    cdef unsigned long long attr = {"relatime": MOUNT_ATTR_RELATIME, "noatime": MOUNT_ATTR_NOATIME,
                                    "strictatime": MOUNT_ATTR_STRICTATIME}[mode]
    if nodiratime:
        attr |= MOUNT_ATTR_NODIRATIME
    return attr


cdef class _Stack:
    """The layers, the work dir and the identity of the Nodes on them."""

    def __init__(self, lowers, upper=None, work=None, *, userxattr=False,
                 redirect_dir=True, no_sync=False, oci_whiteouts=False, keep_listings=True,
                 uuid="auto", xino="off", index=False, metacopy=False, datadirs=(),
                 verity="off", redirect_follow=True, nfs_export=False, volatile_marker=None,
                 xattr_permissions=0, read_only=False, private_mounts=True,
                 atime=("relatime", False), posix_acl=True):
        """keep_listings: keep each dir's listing until it changes through us
        (for adapters whose kernel side does not cache listings itself).
        uuid: the kernel's uuid= option (on, off, null, auto): whether
        origin file handles carry the lower filesystem's uuid (not with
        off) and whether the upper root keeps an overlay uuid.
        index: the kernel's index=on (_index.pxi).
        metacopy: the kernel's metacopy=on (_metacopy.pxi).
        datadirs: data-only lower layers (the kernel's lowerdir=A::B), below
        the others: only the absolute redirects of metacopy files lead
        there (_metacopy.pxi).
        redirect_follow: False is the kernel's redirect_dir=nofollow (a
        redirect met at lookup is refused, EPERM).
        nfs_export: the kernel's nfs_export=on (needs index with an upper
        layer): every copy-up is indexed, file handles of the mount's
        objects are encoded and decoded (_export.pxi).
        xattr_permissions: fuse-overlayfs's 1 or 2: owners and modes of the
        upper layer kept in an xattr (_override.pxi).
        read_only: a read-only mount (with or without an upper layer): the
        kernel refuses every change through it; as with the kernel's, the
        work dir is set up and the overlay's xattrs are written, but no
        atime.
        private_mounts, atime: see _open_layers.
        posix_acl: new objects get their mode and ACLs from their parent's
        default ACL, as the kernel's POSIX ACLs give them (Overlay._new_mode);
        False (noacl): only the umask counts."""
        if uuid not in ("on", "off", "null", "auto"):
            raise ValueError(f"bad uuid mode {uuid!r}")
        self.uuid_mode = uuid
        if xino not in ("on", "off", "auto"):
            raise ValueError(f"bad xino mode {xino!r}")
        self.keep_listings = keep_listings
        if not lowers:
            raise ValueError("at least one lower layer is needed")
        if (upper is None) != (work is None):
            raise ValueError("upperdir and workdir go together")
        self.lower_paths = [os.fsencode(p) for p in list(lowers) + list(datadirs)]
        self.nlower = len(lowers)
        self.ndata = len(datadirs)
        self.upper_path = os.fsencode(upper) if upper is not None else None
        self.work_path = os.fsencode(work) if work is not None else None
        self.prefix = b"user.overlay." if userxattr else b"trusted.overlay."
        self.x_opaque = self.prefix + b"opaque"
        self.x_redirect = self.prefix + b"redirect"
        self.x_whiteout = self.prefix + b"whiteout"
        self.x_ino = self.prefix + b"fuse.ino"
        self.x_origin = self.prefix + b"origin"
        self.x_impure = self.prefix + b"impure"
        self.x_uuid = self.prefix + b"uuid"
        self.x_nlink = self.prefix + b"nlink"
        self.x_upper = self.prefix + b"upper"
        self.x_metacopy = self.prefix + b"metacopy"
        self.metacopy = metacopy
        if verity not in ("off", "on", "require"):
            raise ValueError(f"bad verity mode {verity!r}")
        self.verity = verity
        self.index = index
        self.index_fd = -1
        self._indexed = {}
        self.redirect_dir = redirect_dir
        self.redirect_follow = redirect_follow
        self.nfs_export = nfs_export
        self.index_all = False
        self._upper_mount_fd = -1
        self._upper_uuid = NULL_UUID
        self.userxattr = userxattr
        self.oci = oci_whiteouts
        self.no_sync = no_sync
        # the kernel's volatile marker (no_sync alone: fuse-overlayfs's fsync=0)
        self._volatile_marker = no_sync if volatile_marker is None else volatile_marker
        self.nodes = {}
        self.counters = {"lookups": 0, "lookups_known": 0, "copy_ups": 0, "bytes_copied": 0,
                         "metacopy_ups": 0, "data_copy_ups": 0,
                         "name_indexes": 0, "name_index_hits": 0, "handles_decoded": 0}
        self.renumbered = []
        self.layer_hits = [0] * (1 + len(self.lower_paths))
        self.quota_on = False
        self.q_bytes_max = self.q_inodes_max = -1
        self._q_orphans = {}
        self.fd_cache_len = 0
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = FD_CACHE_MAX if soft == resource.RLIM_INFINITY else max(32, min(FD_CACHE_MAX, soft // 4))
        self.fd_cache_max = int(os.environ.get("OVERLAY_FD_CACHE", cap))
        self._tmp_counter = 0
        self._lock = threading.Lock()
        self.lower_roots = []
        self.upper_root = -1
        self.work_fd = -1
        self._work_base = -1
        self._clones = []
        self._upper_clone = -1
        self.read_only = read_only
        self.posix_acl = posix_acl
        self.private_mounts = False
        self._inuse = []
        self._open_layers(private_mounts, atime)
        devs = [os.stat(fd).st_dev for fd in self.lower_roots]
        if self.upper_path is not None:
            devs.append(os.stat(self.upper_root).st_dev)
            self._lock_inuse()
        try:
            if self.upper_path is not None:
                self._setup_work()
            self._private_dirs = set()
            for private in [self.upper_root, self.work_fd, self._work_base]:
                # (a list: a loop over a tuple of these C int fields saw wrong
                # values here)
                if private >= 0:
                    st = os.stat(private)
                    self._private_dirs.add((st.st_dev, st.st_ino))
            setup_ino_map(self, devs, xino)
            setup_identity(self, devs)
            setup_index(self)
            setup_override(self, xattr_permissions)
            self.ovi = _register_overlay(self)
            self.root = self._make_root()
        except BaseException:
            for fd in self._inuse:      # (the in-use locks go with a failed mount)
                os.close(fd)
            self._inuse = []
            raise

    # ------------------------------------------------------------ setup

    def _open_layers(self, bint private, atime):
        """Open the layers' root dirs (lower_roots, upper_root, and the
        workdir= dir in _work_base). With private mounts (as the kernel
        overlay, which works through private clones of its layers' mounts)
        they are opened inside detached clones of their mounts: the lower
        ones read-only and noatime (reading a lower file never changes it,
        not even its atime), the upper one (which holds the work dir too:
        renames between them stay on one mount) with the overlay mount's
        atime rules (atime: "relatime", "noatime" or "strictatime", and
        "nodiratime" or not), so that reads through us and through
        passthrough update atime as the mount says. Without the privilege
        to clone mounts the layers are opened where they are."""
        cdef int fd
        if private:
            try:
                self.lower_roots = self._clone_open(self.lower_paths, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOATIME,
                                                    MOUNT_ATTR__ATIME | MOUNT_ATTR_NODIRATIME, False)
                if self.upper_path is not None:
                    self.upper_root, self._work_base = self._clone_open(
                        [self.upper_path, self.work_path], _atime_attr(atime, self.read_only),
                        MOUNT_ATTR__ATIME | MOUNT_ATTR_NODIRATIME, True)
                    self._upper_clone = self._clones[-1]
                self.private_mounts = True
                return
            except OSError as exc:
                log.debug("layers opened where they are (no private mounts: %s)", exc.strerror)
                for fd in self.lower_roots + [self.upper_root, self._work_base] + self._clones:
                    if fd >= 0:
                        os.close(fd)
                self.lower_roots, self._clones = [], []
                self.upper_root = self._work_base = self._upper_clone = -1
        for p in self.lower_paths:
            self.lower_roots.append(os.open(p, O_PATH | O_DIRECTORY | O_CLOEXEC))
        if self.upper_path is not None:
            self.upper_root = os.open(self.upper_path, O_PATH | O_DIRECTORY | O_CLOEXEC)
            self._work_base = os.open(self.work_path, O_PATH | O_DIRECTORY | O_CLOEXEC)

    def set_atime(self, atime, bint read_only):
        """The mount's flags changed (mount -o remount): the upper layer's
        private mount takes its new atime rules (see _open_layers)."""
        if self._upper_clone >= 0:
            sys_mount_setattr(self._upper_clone, _atime_attr(atime, read_only),
                              MOUNT_ATTR__ATIME | MOUNT_ATTR_NODIRATIME)

    def _clone_open(self, list paths, unsigned long long attr_set, unsigned long long attr_clr,
                    bint one):
        """O_PATH fds of the dirs at paths, each opened inside a private
        clone of its mount with attr_set (mount_setattr): one clone per
        mount the dirs are on, of the whole mount (so the daemon's fds show
        the paths they have on that mount, as lsof and strace print them),
        kept in _clones (the last one made last). one: all on one mount,
        else EXDEV (the upper and work dirs)."""
        out = [-1] * len(paths)
        groups = {}
        for i, p in enumerate(paths):
            mnt, dev, ino = sys_mount_id_of(p)
            groups.setdefault(mnt, []).append((i, p, os.makedev(dev >> 32, dev & 0xFFFFFFFF), ino))
        if one and len(groups) > 1:
            raise OSError(errno.EXDEV, "the upper and work dirs are on different mounts")
        try:
            for mnt, members in groups.items():
                base = _mount_root(os.fsencode(os.path.realpath(members[0][1])), mnt)
                clone = sys_clone_mount(base)
                self._clones.append(clone)
                sys_mount_setattr(clone, attr_set, attr_clr)
                for i, p, dev, ino in members:
                    out[i] = _open_below(clone, base, p, dev, ino)
            return out
        except BaseException:
            for fd in out:
                if fd >= 0:
                    os.close(fd)
            raise

    def _lock_inuse(self):
        """The kernel's in-use marks of the upper and work dirs, stricter:
        an exclusive flock(2) on each, held for the life of this Overlay
        (and so of the daemon: it goes with the process, a crash leaves
        nothing to clean up). An upper or work dir already locked (another
        mount of ours uses it) gives EBUSY, before the work dir is touched."""
        for what, path, fd in (("upper dir", self.upper_path, self.upper_root),
                               ("work dir", self.work_path, self._work_base)):
            lfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=fd)
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(lfd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OSError(errno.EBUSY, f"{what} is in use by another mount",
                                  os.fsdecode(path)) from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    log.debug("%s not locked: %s", what, e.strerror)
                    continue
                raise
            self._inuse.append(lfd)

    def _setup_work(self):
        """Prepare <work>/work (as the kernel names it) and empty it of
        leftovers from an earlier run: half-made copy-ups are never visible
        because they are only renamed into the upper dir when complete."""
        wroot = self._work_base
        try:
            os.mkdir(b"work", 0o700, dir_fd=wroot)
        except FileExistsError:
            st = os.stat(b"work", dir_fd=wroot, follow_symlinks=False)
            if not S.S_ISDIR(st.st_mode):
                # a leftover that is not a dir (never followed): replace it
                os.unlink(b"work", dir_fd=wroot)
                os.mkdir(b"work", 0o700, dir_fd=wroot)
        fd = os.open(b"work", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=wroot)
        self.work_fd = fd
        self._check_incompat(fd)
        self._clean_dir(fd)
        if self._volatile_marker:
            self._mark_volatile(fd)

    def _check_incompat(self, int fd):
        """As the kernel: a feature named in work/incompat/ (volatile: a
        volatile mount was here, and whether its changes reached the disk
        is unknown) forbids the mount until the user removes it."""
        cdef struct_stat st
        if c_statat(fd, b"incompat", &st) != 0 or not S.S_ISDIR(st.st_mode):
            return
        sub = self._opath(fd, b"incompat", True)
        try:
            names = _listdir(sub)
        finally:
            os.close(sub)
        if names:
            raise OSError(errno.EINVAL, "overlay with incompat feature '%s' cannot be mounted"
                          " (remove %s/work/incompat/%s once the upper dir is known to be"
                          " sound)" % (os.fsdecode(sorted(names)[0]),
                                       os.fsdecode(self.work_path), os.fsdecode(sorted(names)[0])))

    def _mark_volatile(self, int fd):
        """The kernel's marker of a volatile mount, work/incompat/volatile/
        dirty: the next mount is refused until the user removes it."""
        mode = 0 if os.geteuid() == 0 else 0o700     # the kernel's 0, where we may
        for name in (b"incompat", b"incompat/volatile"):
            try:
                os.mkdir(name, mode, dir_fd=fd)
            except FileExistsError:
                pass
        os.close(os.open(b"incompat/volatile/dirty", os.O_CREAT | os.O_WRONLY | O_CLOEXEC, 0,
                         dir_fd=fd))

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
        n.ov = self
        n.is_dir = True
        if self.upper_root >= 0:
            n.upper = os.dup(self.upper_root)
        for i in range(self.nlower):
            n.lowers.append((i, os.dup(self.lower_roots[i])))
        n.ino = self.map_ino(os.stat(n.fd))
        return n

    def close(self):
        for fd in self.lower_roots + (self._mount_fds or []):
            if fd >= 0:
                os.close(fd)
        self.lower_roots = []
        self._mount_fds = []
        if self.upper_root >= 0:
            os.close(self.upper_root)
            self.upper_root = -1
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1
        if self.index_fd >= 0:
            os.close(self.index_fd)
            self.index_fd = -1
        if self._upper_mount_fd >= 0:
            os.close(self._upper_mount_fd)
            self._upper_mount_fd = -1
        if self._work_base >= 0:
            os.close(self._work_base)
            self._work_base = -1
        for fd in self._clones:
            os.close(fd)
        for fd in self._inuse:
            os.close(fd)
        self._inuse = []
        self._clones = []
        self._upper_clone = -1

    # ------------------------------------------------------------ xattr helpers

    cdef object _getx(self, int fd, bytes name):
        """Value of xattr *name* on the object behind O_PATH fd, or None."""
        return c_getx(fd, name)

    cdef int _opath(self, int dirfd, bytes name, bint directory) except -1:
        cdef int flags = O_PATH | O_NOFOLLOW | O_CLOEXEC
        cdef int fd
        if directory:
            flags |= O_DIRECTORY
        fd = c_openat(dirfd, name, flags)
        if fd < 0:
            raise _oserror(c_errno, name)
        return fd

    cdef bint _oci_whiteout(self, int dirfd, bytes name) except -1:
        """OCI layers: is there a .wh.<name> next to (absent) name?"""
        cdef struct_stat st
        return c_statat(dirfd, OCI_WH + name, &st) == 0

    cdef bint _oci_opaque(self, int dirfd) except -1:
        """OCI layers: does the dir hold the opaque marker .wh..wh..opq, or
        an opaque xattr fuse-overlayfs writes or reads without privilege
        (user.fuseoverlayfs.opaque, user.overlay.opaque)?"""
        cdef struct_stat st
        if c_statat(dirfd, OCI_OPQ, &st) == 0:
            return True
        return (self._getx(dirfd, b"user.fuseoverlayfs.opaque") == b"y"
                or (self.prefix != b"user.overlay." and self._getx(dirfd, b"user.overlay.opaque") == b"y"))

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

    def _map_real(self, Node n):
        """map_ino of n's real object (the upper one once copied up)."""
        return ino_map(self, n.real_dev, n.real_ino)

    def _upper_whiteout(self, int dirfd, bytes name, st):
        """Is this upper entry a whiteout the kernel would create or rename
        over: a 0/0 char device, or an xattr whiteout (never written by
        us, honoured as the kernel honours it)?"""
        if st is None:
            return False
        if S.S_ISCHR(st.st_mode):
            return st.st_rdev == 0
        return S.S_ISREG(st.st_mode) and st.st_size == 0 and \
            self._lower_whiteout_c(dirfd, name, st.st_mode, 0, 0)

    def map_ino(self, st):
        return ino_map(self, st.st_dev, st.st_ino)

    # ------------------------------------------------------------ fd cache

    cdef _hold(self, Node n):
        """n (a non-dir) holds open fds: keep it in the bounded fd cache, a
        list through the Nodes themselves (no object per entry), least
        recently used first. Past fd_cache_max, the oldest Nodes that are
        not busy and not pinned by open files get their fds closed."""
        cdef Node old, nxt
        cdef Py_ssize_t tries
        if n.is_dir or n.ghost or n.parent is None:
            return
        if n.in_lru:
            if self._lru_tail is n:
                return
            self._lru_unlink(n)
        n._lru_prev = self._lru_tail
        n._lru_next = None
        if self._lru_tail is not None:
            self._lru_tail._lru_next = n
        else:
            self._lru_head = n
        self._lru_tail = n
        n.in_lru = True
        self.fd_cache_len += 1
        tries = self.fd_cache_len
        old = self._lru_head
        while self.fd_cache_len > self.fd_cache_max and tries > 0 and old is not None:
            tries -= 1
            nxt = old._lru_next
            # (never n itself: the caller is about to use the fds it holds;
            # with every other Node busy or pinned the walk reaches it)
            if old is not n and not (old.busy or old.pins):
                self._lru_unlink(old)
                if not old.evicted:
                    self._evict(old)
            old = nxt

    cdef _lru_unlink(self, Node n):
        if not n.in_lru:
            return
        if n._lru_prev is not None:
            n._lru_prev._lru_next = n._lru_next
        else:
            self._lru_head = n._lru_next
        if n._lru_next is not None:
            n._lru_next._lru_prev = n._lru_prev
        else:
            self._lru_tail = n._lru_prev
        n._lru_prev = n._lru_next = None
        n.in_lru = False
        self.fd_cache_len -= 1

    cdef bint _let_go(self, bint want):
        """Before long work (want): tell the caller (on_long, see set_lock)
        and let go of its lock, so other requests go on; whether it was let
        go (then _take_back after the work)."""
        if not want or self._cond is None:
            return False
        if self._on_long is not None:
            self._on_long()
        self._cond.release()
        return True

    cdef _take_back(self, bint let):
        if let:
            self._cond.acquire()

    cdef _evict(self, Node n):
        if n._upper >= 0:
            os.close(n._upper)
            n._upper = EVICTED
        if n._lfd >= 0:
            os.close(n._lfd)
        if n._lidx >= 0:
            n._lfd = EVICTED
        if n._lowers is not None:
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
        cdef Node p
        if n.is_dir:
            return self._reopen_dir(n)
        names = [(n.parent, n.name)] + [a for a in (n.aliases or ()) if a != (n.parent, n.name)]
        why = []
        if n._bits & NB_METACOPY:
            # its data may be a chain of redirects away: a lookup finds
            # them again (and hands its fds to n, see _intern)
            for p, name in names:
                try:
                    (<_Resolver>self).lookup(p, name)
                except OSError as e:
                    why.append((p.name, name, e.strerror))
                    continue
                if not n.evicted:
                    return
                why.append((p.name, name, "other object"))
            log.warning("cannot reopen %r (real %s): %s", n.name, n.real, why)
            raise _err(errno.ESTALE, n.name)
        n.evicted = False
        info = self._indexed.get(n.key) if n._upper == EVICTED else None
        if info is not None:
            names.insert(0, (None, info[0]))     # its copy in the index
        for p, name in names:
            try:
                if p is None:
                    fd = self._opath(self.index_fd, name, False)
                elif n._upper == EVICTED:
                    self._sync_upper(p)
                    if p.upper < 0:
                        why.append((p.name, name, "parent not in upper"))
                        continue
                    fd = self._opath(p.upper, name, n.is_dir)
                else:
                    idx = n._lidx
                    dirfd = -1
                    for i, f in p.lowers:
                        if i == idx:
                            dirfd = f
                    if dirfd < 0:
                        why.append((p.name, name, "layer not below parent"))
                        continue
                    fd = self._opath(dirfd, name, n.is_dir)
            except OSError as e:
                why.append((p.name if p is not None else b"<index>", name, e.strerror))
                continue
            st = os.stat(fd)
            if (st.st_dev, st.st_ino) != (n.real_dev, n.real_ino):
                os.close(fd)
                why.append((p.name if p is not None else b"<index>", name,
                            ("other object", st.st_ino)))
                continue
            if n._upper == EVICTED:
                n._upper = fd
            else:
                n._lfd = fd
            if p is not None and (p, name) != (n.parent, n.name):
                n.parent, n.name = p, name
            self._hold(n)
            return
        n.evicted = True
        log.warning("cannot reopen %r (real %s): %s", n.name, n.real, why)
        raise _err(errno.ESTALE, n.name)

    def _reopen_dir(self, Node n):
        """Reopen the fds of an evicted dir: a lookup of its name (which
        finds its layers as any lookup does) hands them over, checked to be
        the same object."""
        cdef Node m
        p = n.parent
        if p is None:
            raise _err(errno.ESTALE, n.name)
        try:
            m = (<_Resolver>self).lookup(p, n.name)
        except OSError as e:
            log.warning("cannot reopen dir %r: %s", n.name, e.strerror)
            raise _err(errno.ESTALE, n.name)
        if m is n and not n.evicted:
            return              # (found as known: _intern handed it the fds)
        if m is n or not m.is_dir or m.key != n.key:
            log.warning("cannot reopen dir %r: another object there now", n.name)
            raise _err(errno.ESTALE, n.name)
        # (copies: m may be another Node of the dir, in use)
        n._upper = os.dup(m._upper) if m._upper >= 0 else -1
        n._lowers = [(idx, os.dup(fd)) for idx, fd in m.lowers]
        n.real_dev, n.real_ino = m.real_dev, m.real_ino
        n._has_real = m._has_real
        n.opaque = m.opaque
        n.redirect = m.redirect
        n.evicted = False

    cdef _sync_upper(self, Node d):
        """d, a dir, may have been copied up through another Node for it (one
        the kernel looked up after forgetting d): find its upper dir."""
        cdef struct_stat st
        if d.is_dir and d.evicted:
            self._reopen(d)     # (finds it)
            return
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
        if n.aliases is None:
            n.aliases = [a]
        elif a not in n.aliases:
            n.aliases.append(a)
            if len(n.aliases) > 16:
                del n.aliases[0]

    cdef _rename_alias(self, Node n, Node op, bytes oname, Node np, bytes nname):
        """n, known as oname under op, is now nname under np: that becomes its
        primary name; its other names stay known."""
        if (n.parent, n.name) != (op, oname):
            self._add_alias(n, n.parent, n.name)
        a = (op, oname)
        if n.aliases and a in n.aliases:
            n.aliases.remove(a)
        n.parent = np
        n.name = nname

    def _drop_alias(self, Node n, Node parent, bytes name):
        """name under parent no longer leads to n (unlinked or renamed away)."""
        a = (parent, name)
        if n.aliases and a in n.aliases:
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
            old._lidx, old._lfd = n._lidx, n._lfd
            n._upper, n._lowers = -1, None
            n._lidx = n._lfd = -1
            old._bits = (old._bits & ~NB_METACOPY) | (n._bits & NB_METACOPY)
            if not old.is_dir:
                old.redirect = n.redirect
            old.evicted = False
            old.real_dev, old.real_ino = n.real_dev, n.real_ino
            old._has_real = n._has_real
            self._hold(old)
            return old
        if old.upper < 0 and n.upper >= 0:
            old.upper = n.upper
            n.upper = -1
            if n._bits & NB_METACOPY:
                # copied up (metadata only) through another Node: its data
                # are where n found them
                old._lidx, old._lfd, n._lidx, n._lfd = n._lidx, n._lfd, old._lidx, old._lfd
                old._lowers, n._lowers = n._lowers, old._lowers
                old._bits |= NB_METACOPY
                old.redirect = n.redirect
            else:
                old._bits &= ~NB_METACOPY
            if n.is_dir:
                old.opaque = n.opaque
                old.redirect = n.redirect
        if n.is_dir and old.upper >= 0 and n.upper >= 0:
            old.opaque = n.opaque
            old.redirect = n.redirect
        return old

    cpdef remember(self, Node n):
        self.nodes[n.key] = n

    cpdef forget(self, Node n):
        """The kernel forgot n: drop it, and close its fds unless in use."""
        if self.nodes.get(n.key) is n:
            del self.nodes[n.key]
        if self._indexed:
            info = self._indexed.get(n.key)
            if info is not None and info[2]:
                # the kernel's overlay nlink of it, kept in memory, is gone
                # with its inode: found again, it is read as at a mount
                self._indexed[n.key] = (info[0], info[1], False)
        self.release(n)
        if n.is_dir:
            self.evict_dir(n)

    cpdef evict_dir(self, Node n):
        """Close the fds of dir n (reopened by a lookup of its name at its
        next use, see _reopen): when the kernel forgot it, or, for a dir a
        listing found, at once. A dir holds a fd in each layer it is in,
        and nothing bounds how many dirs a tree has: the fds of those the
        kernel does not know stay closed. Not the root, nor a dir in use
        (busy, pinned)."""
        if not n.is_dir or n.evicted or n.parent is None or n.busy or n.pins or n.ghost:
            return
        if n._upper < 0 and not n._lowers:
            return
        n.dircache = None       # (it holds n's fds)
        self._evict(n)

    cpdef release(self, Node n):
        """Close the fds of a non-dir n that nothing uses now (an O_PATH fd
        on a deleted file would keep its space)."""
        if n.is_dir or n.pins or n.busy or n.evicted or n.parent is None:
            return
        self._lru_unlink(n)
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
        key = _realkey(st.st_dev, st.st_ino)
        n.real_dev, n.real_ino = st.st_dev, st.st_ino
        n._has_real = True
        if self.nodes.get(n.key) is n:
            del self.nodes[n.key]
            self.nodes[key] = n
        n.key = key
        self._hold(n)

    cpdef Stat getattr(self, Node n):
        """Stat of the real object (the adapter reports n.ino and, for a
        merged dir, nlink 1); an indexed file's nlink is the overlay's."""
        return self.shown_stat(n, sys_fstat(n.fd))

    cdef Stat shown_stat(self, Node n, Stat st):
        """st, a fresh stat of n's real object, made what the mount shows
        (in place): a metacopy file's st_blocks are its data's, an indexed
        file's nlink the overlay's. Every Stat handed to an adapter passes
        here (getattr, lookup, listings)."""
        if n._bits & NB_METACOPY:
            st = metacopy_stat(self, n, st)
        if self._ovr_any:
            override_stat(self, n, st)
        if self._indexed and not n.is_dir:
            return indexed_stat(self, n, st)
        return st

    def statx(self, Node n, unsigned int mask):
        """statx(2) of the real object (birth time included where the
        layer's filesystem records it); nlink as getattr's."""
        cdef StatX x = sys_statx(n.fd, mask)
        if n._bits & NB_METACOPY:
            x.stx_blocks = data_blocks(self, n, x.stx_size, x.stx_blksize)
        if self._indexed and not n.is_dir:
            x.stx_nlink = indexed_nlink(self, n, x.stx_nlink)
        if self._ovr_any:
            override_statx(self, n, x)
        return x

    cdef object _upper_entry(self, Node parent, bytes name):
        """stat of name in parent's upper dir, or None."""
        if parent.upper < 0:
            return None
        try:
            return os.stat(name, dir_fd=parent.upper, follow_symlinks=False)
        except FileNotFoundError:
            return None

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
