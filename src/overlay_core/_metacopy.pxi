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

verity=on|require: <prefix>metacopy may hold the fs-verity digest of the
data (the kernel's struct ovl_metacopy: version 0, length, flags, digest
algorithm, digest); with verity=on a metacopy copy-up of a lower file that
has fs-verity stores it, and opening a metacopy file whose xattr names a
digest checks it against the data's (FS_IOC_MEASURE_VERITY): another
digest, or data without fs-verity, is EIO. verity=require also refuses
(EIO) metacopy files without a digest and copies up the data of lower
files without fs-verity instead of their metadata only.

Data-only lower layers (lowerdir=A:B::C::D: C and D) hold data only: no
name in them shows in the mount; a metacopy file of a lower layer whose
absolute redirect leads nowhere in the regular layers has its data at that
path in the first data-only layer holding a regular file there (how
composefs images keep their content-addressed objects). Where none has it
the file still shows (st_blocks: its size in whole blocks) and opening it
gives ENOENT, as the kernel's lazy lookup. Into data-only layers lower metacopy files are
followed without metacopy=on too (as the kernel: not into the others).
Without metacopy=on a metacopy upper is refused with EPERM (the kernel's
"refusing to follow metacopy origin"); a metacopy file whose data cannot
be found gives EIO."""


cdef bint has_metacopy(_Stack self, int fd):
    """Does the real regular file behind fd carry <prefix>metacopy?"""
    return self._getx(fd, self.x_metacopy) is not None


cdef long long data_blocks(_Stack self, Node n, long long size, long long blksize):
    """st_blocks of a metacopy n: its data's; where they are missing (a
    data-only layer), what the kernel reports then: size in whole blocks."""
    cdef int dfd = n.datafd
    if dfd >= 0:
        return sys_fstat(dfd).st_blocks
    if blksize <= 0:
        blksize = 4096
    return (size + blksize - 1) // blksize * (blksize // 512)


cdef Stat metacopy_stat(_Stack self, Node n, Stat st):
    """st (of n's metadata object, a fresh one) with the st_blocks of its
    data (in place, as indexed_stat does the nlink)."""
    st.st_blocks = data_blocks(self, n, st.st_size, st.st_blksize)
    return st


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
    if data and self.verity != "off":
        check_verity(self, n)
    if not data and size and self.quota_on:
        # a truncate to 0 follows: done first, so that the file's size is
        # what the quota counts from the moment it is not a metacopy
        os.truncate(upath, 0)
    if data and size:
        q_take(self, size, 0)       # the data now in the upper layer (the quota)
    try:
        _data_into_upper(self, n, data, size, upath)
    except BaseException:
        if data and size:
            q_give(self, size, 0)
        raise
    os.removexattr(upath, self.x_metacopy)
    for _, fd in n.lowers:
        os.close(fd)
    n.lowers = []
    n.metacopy = False
    n.redirect = None
    self.counters["data_copy_ups"] += 1
    self.renumbered.append(n)       # st_blocks and mtime changed


cdef _data_into_upper(_Stack self, Node n, bint data, long long size, bytes upath):
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
                let = self._let_go(size > COPY_LOCKED_MAX)
                try:
                    sys_copy_data(rfd, wfd, size, True)
                    if not self.no_sync:
                        sys_fsync(wfd)
                finally:
                    self._take_back(let)
            finally:
                os.close(wfd)
        finally:
            os.close(rfd)
        if cap is not None:
            os.setxattr(upath, b"security.capability", cap)
        self.counters["bytes_copied"] += size


cdef object refuse_metacopy(bytes name):
    """The error of a metacopy file met without metacopy=on (EPERM)."""
    log.warning("refusing to follow metacopy origin for %r (mount with metacopy=on)", name)
    return _err(errno.EPERM, name)


cdef object no_data(bytes name):
    """The error of a metacopy file whose data are nowhere below (EIO)."""
    log.warning("metacopy with no lower data found for %r", name)
    return _err(errno.EIO, name)


cdef tuple data_only(_Stack self, bytes path):
    """(layer, O_PATH fd) of the regular file at the absolute path in the
    first data-only layer holding one (plain names: no whiteouts, redirects
    or symlinks there), or (-1, -1)."""
    cdef int i, fd, nfd
    cdef struct_stat st
    comps = [c for c in path.split(b"/") if c]
    if not comps or any(c in (b".", b"..") for c in comps):
        return (-1, -1)
    for i in range(self.nlower, self.nlower + self.ndata):
        fd = self.lower_roots[i]
        owned = False
        try:
            for comp in comps[:-1]:
                try:
                    nfd = os.open(comp, O_PATH | O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    if owned:
                        os.close(fd)
                    fd, owned = -1, False
                    break
                if owned:
                    os.close(fd)
                fd, owned = nfd, True
            if fd < 0:
                continue
            if c_statat(fd, comps[-1], &st) == 0 and S.S_ISREG(st.st_mode):
                return (i, self._opath(fd, comps[-1], False))
        finally:
            if owned:
                os.close(fd)
    return (-1, -1)


DEF FS_IOC_MEASURE_VERITY = 0xc0046686     # _IOWR('f', 134, struct fsverity_digest)
DEF OVL_METACOPY_MIN = 4                   # version, len, flags, digest_algo


cdef object measure_verity(int fd):
    """(algorithm, digest) of the fs-verity file behind fd, or None where
    it has none (or its filesystem no fs-verity)."""
    import fcntl
    import struct
    buf = bytearray(struct.pack("=HH", 0, 64) + bytes(64))
    try:
        rfd = os.open(_proc(fd), os.O_RDONLY | O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.ioctl(rfd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    finally:
        os.close(rfd)
    algo, size = struct.unpack_from("=HH", buf)
    return algo, bytes(buf[4:4 + size])


cdef bytes metacopy_value(_Stack self, int data_fd):
    """The <prefix>metacopy value of a metacopy copy-up: empty, or with
    verity=on the data's fs-verity digest where they have one."""
    if self.verity == "off":
        return b""
    m = measure_verity(data_fd)
    if m is None:
        return b""
    return bytes([0, OVL_METACOPY_MIN + len(m[1]), 0, m[0]]) + m[1]


cdef check_verity(_Stack self, Node n):
    """verity=on|require: the digest n's metacopy xattr names is its data's
    (else EIO); verity=require: it names one. Checked once a Node."""
    if n._bits & NB_VERIFIED:
        return
    v = self._getx(n.fd, self.x_metacopy)
    if v is None:
        return
    if len(v) < OVL_METACOPY_MIN or v[1] > len(v) or v[0] != 0:
        if v:
            log.warning("metacopy file %r: invalid metacopy xattr", n.name)
            raise _err(errno.EIO, n.name)
    if len(v) <= OVL_METACOPY_MIN or v[3] == 0:
        if self.verity == "require":
            log.warning("metacopy file %r has no digest specified", n.name)
            raise _err(errno.EIO, n.name)
    else:
        if n.datafd < 0:
            return      # no data: opening them gives ENOENT
        m = measure_verity(n.datafd)
        if m is None:
            log.warning("lower file of %r has no fs-verity digest", n.name)
            raise _err(errno.EIO, n.name)
        if m[0] != v[3] or m[1] != v[OVL_METACOPY_MIN:v[1]]:
            log.warning("lower file of %r: fs-verity digest mismatch", n.name)
            raise _err(errno.EIO, n.name)
    n._bits |= NB_VERIFIED
