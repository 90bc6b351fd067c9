"""Part of overlay_core._core (included by _core.pyx): metacopy=on, as the
kernel overlay writes and reads it (Documentation/filesystems/overlayfs.rst,
"Metadata only copy up").

A change of a lower regular file's metadata only (chmod, chown, utimes,
xattrs, a rename or a hard link) copies up its metadata: the upper file
has the lower's size but no data (a sparse file) and carries
<prefix>metacopy (empty: no verity digest); its data are read from the
lower file, found by its name in the layers below or by its
<prefix>redirect (a renamed or linked file: absolute, or its old name in
the same dir), until the first open for write or truncate copies them
up in place and drops the xattr (the kernel then updates the file's
mtime, as the write does here). A lower file with <prefix>metacopy (an
upper pushed down) is a link of such a chain: the top one gives the
metadata, the last one (without the xattr) the data.

st_blocks of a metacopy file are its data's, as the kernel reports them.
Without metacopy=on a metacopy upper is refused with EPERM (the kernel's
"refusing to follow metacopy origin"); a metacopy file whose data cannot
be found gives EIO."""


cdef bint has_metacopy(_Stack self, int fd):
    """Does the real regular file behind fd carry <prefix>metacopy?"""
    return self._getx(fd, self.x_metacopy) is not None


cdef Stat metacopy_stat(_Stack self, Node n, Stat st):
    """st (of n's metadata object) with the st_blocks of its data."""
    cdef Stat r = Stat.__new__(Stat)
    cdef Stat d = sys_fstat(n.datafd)
    r.st_dev, r.st_ino, r.st_rdev, r.st_nlink = st.st_dev, st.st_ino, st.st_rdev, st.st_nlink
    r.st_mode, r.st_uid, r.st_gid = st.st_mode, st.st_uid, st.st_gid
    r.st_size, r.st_blksize, r.st_blocks = st.st_size, st.st_blksize, d.st_blocks
    r.st_atime_ns, r.st_mtime_ns, r.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return r


cdef copy_data_up(_Stack self, Node n, bint data):
    """The data copy-up of a metacopy upper n, in place as the kernel does
    it (ovl_copy_up_meta_inode_data): its data copied from the lower file
    into the upper one (not with data=False: a truncate to 0 follows),
    security.capability kept (a write clears it), then <prefix>metacopy
    removed. A crash before the end leaves a metacopy file reading the
    lower data, as before. A big file is copied without the callers' lock
    (n is busy: changes to it wait)."""
    upath = _proc(n.upper)
    size = sys_fstat(n.upper).st_size
    cap = None
    if data and size:
        try:
            cap = os.getxattr(upath, b"security.capability")
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        rfd = os.open(_proc(n.datafd), os.O_RDONLY | O_CLOEXEC)
        try:
            wfd = os.open(upath, os.O_WRONLY | O_CLOEXEC)
            try:
                unlock = self._cond is not None and size > COPY_LOCKED_MAX
                if unlock:
                    self._cond.release()
                try:
                    sys_copy_data(rfd, wfd, size, True)
                    if not self.no_sync:
                        sys_fsync(wfd)
                finally:
                    if unlock:
                        self._cond.acquire()
            finally:
                os.close(wfd)
        finally:
            os.close(rfd)
        if cap is not None:
            os.setxattr(upath, b"security.capability", cap)
        self.counters["bytes_copied"] += size
    os.removexattr(upath, self.x_metacopy)
    for _, fd in n.lowers:
        os.close(fd)
    n.lowers = []
    n.metacopy = False
    n.redirect = None
    self.counters["data_copy_ups"] += 1
    self.renumbered.append(n)       # st_blocks and mtime changed


cdef object no_data(bytes name):
    """The error of a metacopy file whose data are nowhere below (EIO)."""
    log.warning("metacopy with no lower data found for %r", name)
    return _err(errno.EIO, name)
