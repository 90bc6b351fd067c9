"""Part of overlay.engine.bridge (included by bridge.pyx): the requests on
names and attributes: lookup, forget, getattr, setattr, mknod, mkdir,
symlink, link, unlink, rmdir, rename, statfs, statx and the xattrs. Each
handler takes the request as the wire gives it and calls into the core."""


cdef int op_lookup(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_entry_out e
    name = _cstr(arg, n)
    if name == b"." or name == b"..":
        # the kernel decodes a file handle (export support): "." in a
        # node id it may have forgotten, ".." the parent of a dir
        return op_lookup_handle(self, fd, h, name == b"..")
    with self.lock:
        try:
            node = self.core.lookup(self._node(h.nodeid), name)
        except FileNotFoundError:
            # a negative entry (node id 0) the kernel may keep for
            # entry_timeout, as it keeps a missing name on the kernel
            # overlay: every create through the mount replaces it
            memset(&e, 0, sizeof(e))
            e.entry_valid = self.entry_sec
            e.entry_valid_nsec = self.entry_nsec
            self.reply(fd, h.unique, &e, sizeof(e))
            return 0
        self._reply_entry(fd, h.unique, node)
    return 0


cdef int op_lookup_handle(OverlayFS self, int fd, fuse_in_header *h, bint parent) except -1:
    """LOOKUP of "." or ".." (FUSE_EXPORT_SUPPORT): the node of a node id
    the kernel got from a file handle, found again from the core handle
    kept when the kernel forgot it (ESTALE where the object is gone), or
    the parent of a dir."""
    cdef Node node
    with self.lock:
        found = self.inodes.get(h.nodeid)
        if parent:
            if found is None:
                self.reply_err(fd, h.unique, E.ESTALE)
                return 0
            node = <Node>found
            if node.parent is not None:
                node = <Node>node.parent
            self._reply_entry(fd, h.unique, node)
            return 0
        if found is not None:
            node = <Node>found
            if node.fuse_id != h.nodeid:
                self._reply_old_id(fd, h.unique, node, h.nodeid)
            else:
                self._reply_entry(fd, h.unique, node)
            return 0
        handle = self.forgotten.get(h.nodeid)
        if handle is None:
            self.reply_err(fd, h.unique, E.ESTALE)
            return 0
        node = self.core.decode_handle(handle)      # OSError: ESTALE (removed)
        if node.fuse_id == 0 or node.fuse_id == h.nodeid:
            node.fuse_id = h.nodeid
            self._reply_entry(fd, h.unique, node)
        elif self.inodes.contains(node.fuse_id):
            # known under another id meanwhile: that id's inode and this one
            # stand for the same object
            self._reply_old_id(fd, h.unique, node, h.nodeid)
        else:
            node.fuse_id = h.nodeid
            self._reply_entry(fd, h.unique, node)
    return 0


cdef int op_batch_forget(OverlayFS self, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_batch_forget_in *b = <fuse_batch_forget_in*>arg
    cdef fuse_forget_one *one = <fuse_forget_one*>(arg + sizeof(fuse_batch_forget_in))
    cdef uint32_t i, count = b.count
    if sizeof(fuse_batch_forget_in) + count * sizeof(fuse_forget_one) > n:
        count = (n - sizeof(fuse_batch_forget_in)) // sizeof(fuse_forget_one)
    with self.lock:
        for i in range(count):
            self._forget(one[i].nodeid, one[i].nlookup)
    return 0


cdef int op_getattr(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    with self.lock:
        node = self._node(h.nodeid)
        self._reply_attr(fd, h.unique, node)
    return 0


cdef int op_setattr(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
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
                node = self._copy_up(node, kw.get("size", 1) != 0, "size" not in kw)
                if (self.squash or self.squash_uid >= 0 or self.squash_gid >= 0) and (
                        "uid" in kw or "gid" in kw):
                    # as fuse-overlayfs: with the ids squashed, a chown the
                    # layer refuses is not an error (the ids shown stay)
                    ids = {k: kw.pop(k) for k in ("uid", "gid") if k in kw}
                    try:
                        self.core.setattr(node, **ids)
                    except OSError as exc:
                        log.debug("chown under squash ignored: %s", exc)
                self.core.setattr(node, **kw)
                if valid & FATTR_KILL_SUIDGID and "mode" not in kw:
                    self._kill_suidgid(node, h)
            finally:
                self._renumbered()
        else:
            # nothing to change: chown(path, -1, -1), or the kernel taking
            # set-id bits away after an unprivileged fallocate (the kernel
            # overlay copies up and updates ctime for both)
            try:
                node = self.core.touch(node)
                # (chown(-1, -1) as root kept a set-group-id without group
                # execute: the caller's own rule decides)
                st = self.core.getattr(node)
                if S.S_ISREG(st.st_mode) and st.st_mode & S.S_ISGID and not _in_group(h, st.st_gid):
                    self.core.setattr(node, mode=S.S_IMODE(st.st_mode) & ~S.S_ISGID)
            finally:
                self._renumbered()
        self._reply_attr(fd, h.unique, node)
    return 0


cdef int op_mknod(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_mknod_in *a = <fuse_mknod_in*>arg
    name = _cstr(arg + sizeof(fuse_mknod_in), n - sizeof(fuse_mknod_in))
    with self.lock:
        uid, gid = self._ids(h.uid, h.gid)
        try:
            node = self.core.mknod(self._node(h.nodeid), name, a.mode,
                                   _decode_dev(a.rdev), uid, gid, a.umask)
        finally:
            self._renumbered()
        self._reply_entry(fd, h.unique, node)
    return 0


cdef int op_mkdir(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_mkdir_in *a = <fuse_mkdir_in*>arg
    name = _cstr(arg + sizeof(fuse_mkdir_in), n - sizeof(fuse_mkdir_in))
    with self.lock:
        uid, gid = self._ids(h.uid, h.gid)
        try:
            node = self.core.mkdir(self._node(h.nodeid), name,
                                   S.S_IMODE(a.mode), uid, gid, a.umask)
        finally:
            self._renumbered()
        self._reply_entry(fd, h.unique, node)
    return 0


cdef int op_symlink(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
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


cdef int op_link(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_link_in *a = <fuse_link_in*>arg
    name = _cstr(arg + sizeof(fuse_link_in), n - sizeof(fuse_link_in))
    with self.lock:
        try:
            src = self._copy_up(self._node(a.oldnodeid), True, True)
            node = self.core.link(src, self._node(h.nodeid), name)
        finally:
            self._renumbered()
        self._reply_entry(fd, h.unique, node)
    return 0


cdef int op_remove(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n, bint isdir) except -1:
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


cdef int op_rename(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n, bint v2) except -1:
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
        except OSError:
            # a rename refused by the upper filesystem (ENOTEMPTY...) may
            # have changed its dirs' times (ext4 makes the whiteout first):
            # the kernel keeps the attributes it has unless told
            for nid in (h.nodeid, newdir):
                if self.inodes.contains(nid):
                    self.notify_inval_inode(nid, -1, 0, True)
            raise
        finally:
            self._renumbered()
    self.reply_err(fd, h.unique, 0)
    return 0


cdef int op_statx(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    """statx(2): the real object's, birth time included, with the
    overlay's st_ino, nlink and ids, as for GETATTR."""
    cdef fuse_statx_in *a = <fuse_statx_in*>arg
    cdef fuse_statx_out o
    cdef uint32_t mask = a.sx_mask
    memset(&o, 0, sizeof(o))
    with self.lock:
        node = self._node(h.nodeid)
        x = self.core.statx(node, mask | 0x7ff)       # STATX_BASIC_STATS too
        o.stat.nlink = self._shown_nlink(node, x.stx_nlink)
        o.stat.ino = self._shown_ino(node.ino)
        ghost = node.ghost
    o.attr_valid = 0 if ghost else self.attr_sec
    o.attr_valid_nsec = 0 if ghost else self.attr_nsec
    o.stat.mask = x.stx_mask
    o.stat.blksize = x.stx_blksize
    o.stat.attributes = x.stx_attributes
    o.stat.attributes_mask = x.stx_attributes_mask
    o.stat.uid = self._shown_uid(x.stx_uid)
    o.stat.gid = self._shown_gid(x.stx_gid)
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


cdef int op_statfs(OverlayFS self, int fd, fuse_in_header *h) except -1:
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


cdef int _reply_sized(OverlayFS self, int fd, uint64_t unique, uint32_t size, bytes value) except -1:
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


cdef int op_getxattr(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n, bint listing) except -1:
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
    _reply_sized(self, fd, h.unique, size, value)
    return 0


cdef int op_setxattr(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
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
            node = self._copy_up(node, True, True)
            node = self.core.setxattr(node, name, value, xflags)
            if self.setxattr_ext and a.setxattr_flags & FUSE_SETXATTR_ACL_KILL_SGID:
                # an access ACL set by a caller outside the file's group
                # and without CAP_FSETID: S_ISGID goes, as with chmod
                mode = self.core.getattr(node).st_mode
                if mode & S.S_ISGID:
                    self.core.setattr(node, mode=S.S_IMODE(mode) & ~S.S_ISGID)
        finally:
            self._renumbered()
    self.reply_err(fd, h.unique, 0)
    return 0


cdef int op_removexattr(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    name = _cstr(arg, n)
    with self.lock:
        try:
            self.core.removexattr(self._node(h.nodeid), name)
        finally:
            self._renumbered()
    self.reply_err(fd, h.unique, 0)
    return 0
