"""Part of overlay.engine.bridge (included by bridge.pyx): open files: open,
create and O_TMPFILE (with FUSE passthrough of their data where the kernel
gives it), read and write when the data come through us, release, fsync,
fallocate, lseek and copy_file_range."""

# reads and writes of this many bytes or more through the daemon first give
# the thread's turn at reading requests to another (Session.hand_off)
DEF LONG_IO = 256 * 1024


cdef _backing_flags(OverlayFS self, int flags):
    """With the writeback cache the kernel handles O_APPEND itself and may
    read pages of a file opened write-only: open the real file so."""
    if self.writeback_cache:
        flags &= ~os.O_APPEND
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


cdef int _passthrough(OverlayFS self, uint64_t nodeid, node) except -2:
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
    if node.metacopy:
        dst = os.fstat(node.datafd)
        real = (dst.st_dev, dst.st_ino)     # its data: a lower file
    else:
        real = node.real
    if bk is not None and bk.opens > 0:
        if bk.real == real:
            bk.opens += 1
            return bk.id
        # the old id keeps its kernel references apart (bridge._forget)
        self.old_refs[nodeid] = node.kernel_refs
        node.kernel_refs = 0
        node.fuse_id = 0
        return -1
    st = self.core.getattr(node)
    if not S.S_ISREG(st.st_mode) or st.st_mode & (S.S_ISUID | S.S_ISGID):
        # set-id files: their writes come to us, so the kill hint can
        # clear the bits as the kernel overlay does
        return 0
    from overlay.engine.wire import backing_open
    try:
        bid = backing_open(self.devfd, node.datafd)
    except OSError as e:
        log.warning("passthrough off: BACKING_OPEN failed (%s)", e.strerror)
        self.passthrough_broken = True
        return 0
    bk = _Backing()
    bk.id = bid
    bk.opens = 1
    bk.real = real
    self.backings[nodeid] = bk
    return bid


cdef _unback(OverlayFS self, uint64_t key, bint writer):
    """One passthrough open of node id key is gone."""
    cdef _Backing bk = self.backings.get(key)
    if bk is None:
        return
    bk.opens -= 1
    if writer:
        bk.writers -= 1
    if bk.opens <= 0:
        del self.backings[key]
        from overlay.engine.wire import backing_close
        try:
            backing_close(self.devfd, bk.id)
        except OSError as e:
            log.debug("BACKING_CLOSE %d: %s", bk.id, e.strerror)


cdef int _reply_open(OverlayFS self, int fd, uint64_t unique, uint64_t nodeid, int rfd, node,
                     int flags, fuse_entry_out *entry) except -1:
    """Make a handle for rfd and reply (with entry first for CREATE)."""
    cdef fuse_open_out o
    cdef _Handle hd
    cdef uint64_t fh
    cdef int r, bid
    cdef _Backing bk
    bid = _passthrough(self, nodeid, node)
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
    hd.lower = node.upper < 0 or node.metacopy   # its data may be copied up later
    hd.backing_key = nodeid if bid > 0 else 0
    if bid > 0 and flags & os.O_ACCMODE != os.O_RDONLY:
        # stores through a shared mapping would not reach us: the node's
        # attributes are not cached while it is open for writing
        # (_mapped_writes), starting with what the kernel holds now (a
        # file just created keeps its entry's: its open checks permissions
        # with them, and any write or truncate drops them)
        bk = self.backings[nodeid]
        bk.writers += 1
        if entry == NULL and bk.writers == 1:
            self.notify_inval_inode(nodeid, -1, 0, True)
    self.handles[fh] = hd
    node.pins += 1          # keeps its fds: fstat must work after an unlink
    keep = True
    if node.upper < 0:
        st = os.fstat(rfd)
        now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if node.changed(*now) and node.fuse_id:
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
        # (under strictatime the first read after each open reaches the
        # layer, whose atime it updates, as the kernel overlay's reads do)
        o.open_flags = FOPEN_NOFLUSH | (FOPEN_KEEP_CACHE if keep and not self.strictatime else 0)
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


cdef int op_open(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_open_in *a = <fuse_open_in*>arg
    cdef int flags = _backing_flags(self, a.flags)
    cdef uint32_t oflags = a.open_flags
    with self.lock:
        node = self._node(h.nodeid)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            try:
                self.core._need_upper()
                node = self._copy_up(node, not flags & os.O_TRUNC)
                rfd, node = self.core.open(node, flags)
                if oflags & FUSE_OPEN_KILL_SUIDGID:
                    self._kill_suidgid(node, h)
            finally:
                self._renumbered()
        else:
            rfd, node = self.core.open(node, flags)
        _reply_open(self, fd, h.unique, h.nodeid, rfd, node, flags, NULL)
    return 0


cdef int op_create(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_create_in *a = <fuse_create_in*>arg
    cdef int flags = _backing_flags(self, a.flags)
    cdef fuse_entry_out e
    name = _cstr(arg + sizeof(fuse_create_in), n - sizeof(fuse_create_in))
    with self.lock:
        uid, gid = self._ids(h.uid, h.gid)
        try:
            rfd, node = self.core.create(self._node(h.nodeid), name, flags,
                                         S.S_IMODE(a.mode), uid, gid, a.umask)
        finally:
            self._renumbered()
        st, node.st = node.st, None
        self._fill_entry(&e, node, st)
        self._ref(node)
        _reply_open(self, fd, h.unique, e.nodeid, rfd, node, flags, &e)
    return 0


cdef int op_read(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    cdef fuse_read_in *a = <fuse_read_in*>arg
    cdef uint64_t unique = h.unique
    cdef uint64_t off = a.offset
    cdef size_t size = a.size
    cdef ssize_t got, r
    cdef size_t done = 0
    cdef int rfd, err = 0
    cdef char *out = (<char*>h) + sizeof(fuse_out_header)
    hd = self.handles[a.fh]
    if (<_Handle>hd).lower:
        with self.lock:
            rfd = self._fd(hd)
    else:
        rfd = (<_Handle>hd).fd
    if size > READ_BUFFER - sizeof(fuse_out_header):
        size = READ_BUFFER - sizeof(fuse_out_header)
    if size >= LONG_IO:
        self.hand_off()
    cdef char *buf = out
    if (<_Handle>hd).flags & os.O_DIRECT:
        buf = _direct_buffer(size)      # (the real file is read O_DIRECT too)
        if buf == NULL:
            raise MemoryError()
    with nogil:
        # a short read is EOF to the kernel: read until size or EOF
        while done < size:
            r = pread(rfd, buf + done, size - done, off + done)
            if r < 0:
                if errno == 4:      # EINTR
                    continue
                err = errno
                break
            if r == 0:
                break
            done += r
        if buf != out:
            memcpy(out, buf, done)
            free(buf)
        if err == 0 or done > 0:
            self.reply(fd, unique, out, done)
    if err and done == 0:
        self.reply_err(fd, unique, err)
    return 0


cdef int op_write(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
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
            self._kill_suidgid((<_Handle>hd).node, h)
    if size >= LONG_IO:
        self.hand_off()
    cdef char *buf = NULL
    if (<_Handle>hd).flags & os.O_DIRECT:
        buf = _direct_buffer(size)      # (the real file is written O_DIRECT too)
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, data, size)
        data = buf
    try:
        if self.core.quota_on:
            err = _quota_write(self, rfd, data, &size, off, &done)
        else:
            with nogil:
                err = _pwrite_all(rfd, data, size, off, &done)
    finally:
        free(buf)
    if err and done == 0:
        self.reply_err(fd, h.unique, err)
        return 0
    o.size = done
    o.padding = 0
    self.reply(fd, h.unique, &o, sizeof(o))
    return 0


cdef int _pwrite_all(int rfd, const char *data, size_t size, uint64_t off, size_t *done) noexcept nogil:
    """pwrite until size bytes are written or an error (its errno, else 0)."""
    cdef ssize_t r
    while done[0] < size:
        r = pwrite(rfd, data + done[0], size - done[0], off + done[0])
        if r < 0:
            if errno == 4:      # EINTR
                continue
            return errno
        done[0] += r
    return 0


cdef int _quota_write(OverlayFS self, int rfd, const char *data, size_t *size, uint64_t off,
                      size_t *done) except -1:
    """A write under quota_bytes: the growth of the file counted first, the
    write cut where the quota ends (EDQUOT if nothing fits), what was not
    written given back; one write at a time (qlock), as each reads the
    size the other changes."""
    cdef int err
    cdef size_t n
    with self.core.qlock:
        try:
            before, end = self.core.quota_grow(rfd, off, off + size[0], True)
        except OSError as e:
            return e.errno
        n = end - off
        with nogil:
            err = _pwrite_all(rfd, data, n, off, done)
        self.core.quota_settle(before, end, off + done[0])
    return err


cdef int op_release(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    with self.lock:
        self._release((<fuse_release_in*>arg).fh)
    self.reply_err(fd, h.unique, 0)
    return 0


cdef int op_fsync(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n, bint isdir) except -1:
    cdef fuse_fsync_in *a = <fuse_fsync_in*>arg
    cdef bint datasync = a.fsync_flags & FUSE_FSYNC_FDATASYNC
    self.hand_off()
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


cdef int op_fallocate(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    """fallocate(2) on the real file (the handle is open for writing, so
    the file is in the upper layer already)."""
    cdef fuse_fallocate_in *a = <fuse_fallocate_in*>arg
    cdef int rfd, ret, mode = a.mode
    cdef long long off = a.offset, length = a.length
    with self.lock:
        rfd = self._fd(self.handles[a.fh])
    self.hand_off()
    if self.core.quota_on:
        _quota_fallocate(self, rfd, mode, off, length)
        self.reply_err(fd, h.unique, 0)
        return 0
    with nogil:
        ret = c_fallocate(rfd, mode, off, length)
    if ret != 0:
        raise OSError(errno, os.strerror(errno))
    self.reply_err(fd, h.unique, 0)
    return 0


cdef int _quota_fallocate(OverlayFS self, int rfd, int mode, long long off, long long length) except -1:
    """fallocate under a quota: a growth of the size counted whole or
    EDQUOT, a shrink (COLLAPSE_RANGE) given back. Space kept past the end
    (FALLOC_FL_KEEP_SIZE) is not a size the quota sees: refused under
    quota_bytes (EOPNOTSUPP: posix_fallocate then writes zeros, which are
    counted)."""
    cdef int ret, err
    cdef struct_stat st
    cdef long long cur, target
    with self.core.qlock:
        if fstat(rfd, &st) != 0:
            raise OSError(errno, os.strerror(errno))
        cur = st.st_size
        if (mode & FALLOC_FL_KEEP_SIZE and not mode & FALLOC_FL_PUNCH_HOLE
                and off + length > cur and self.core.q_bytes_max >= 0):
            raise OSError(E.EOPNOTSUPP, os.strerror(E.EOPNOTSUPP))
        if mode & FALLOC_FL_INSERT_RANGE:
            target = cur + length
        elif mode & (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE):
            target = cur
        else:
            target = max(cur, off + length)
        before, end = self.core.quota_grow(rfd, off, target, False)
        with nogil:
            ret = c_fallocate(rfd, mode, off, length)
        if ret != 0:
            err = errno
            self.core.quota_settle(before, end, before)
            raise OSError(err, os.strerror(err))
        if fstat(rfd, &st) != 0:
            raise OSError(errno, os.strerror(errno))
        self.core.quota_settle(before, end, st.st_size)
        self.core.quota_truncated(before, st.st_size)
    return 0


cdef int op_lseek(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
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


cdef int op_copy_file_range(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n,
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
    cdef size_t qlen
    cdef long long start
    with self.lock:
        fin = self._fd(self.handles[a.fh_in])
        fout = self._fd(self.handles[a.fh_out])
    self.hand_off()
    if not wide and length > 0xfffff000:
        length = 0xfffff000
    if self.core.quota_on:
        with self.core.qlock:
            # counted as a write of length bytes at off_out, cut at the quota
            before, end = self.core.quota_grow(fout, oout, oout + length, True)
            start = oout
            qlen = <size_t>(<long long>end - start)
            with nogil:
                r = c_copy_file_range(fin, &oin, fout, &oout, qlen, flags)
            self.core.quota_settle(before, end, start + (r if r > 0 else 0))
            if r < 0:
                err = errno
                raise OSError(err, os.strerror(err))
    else:
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


cdef int op_tmpfile(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    """O_TMPFILE: an unnamed file in the upper dir, linked by a later
    linkat(2) (LINK) if at all."""
    cdef fuse_create_in *a = <fuse_create_in*>arg
    cdef int flags = _backing_flags(self, a.flags)
    cdef fuse_entry_out e
    with self.lock:
        uid, gid = self._ids(h.uid, h.gid)
        try:
            rfd, node = self.core.tmpfile(self._node(h.nodeid), flags,
                                          S.S_IMODE(a.mode), uid, gid, a.umask)
        finally:
            self._renumbered()
        st, node.st = node.st, None
        self._fill_entry(&e, node, st)
        self._ref(node)
        _reply_open(self, fd, h.unique, e.nodeid, rfd, node, flags, &e)
    return 0
