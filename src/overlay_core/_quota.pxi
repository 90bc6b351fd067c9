"""Part of overlay_core._core (included by _core.pyx): upper layer quotas
(quota_bytes=, quota_inodes=).

What is counted: every inode of the upper layer but its root (hard links
once; whiteouts not: removing never fails for the quota), the index's
inodes that no upper name leads to any more, and the size (st_size) of
regular files, but none for a metacopy file, whose data are still below.
Recounted at mount (walk of the upper dir and the index, by dir fds),
then kept by the operations that add or free space: create, mkdir, mknod,
symlink, O_TMPFILE (inodes); copy-up (an inode, the data); write,
truncate, fallocate, copy_file_range (the growth of the size: the caller
holds qlock around the size it reads, the change and the settling);
unlink, rmdir, rename over (the inode and its data once its last name is
gone and no open file holds it: an unlinked open file's are given back at
its last close, quota_closed). An operation that would pass a limit fails
with EDQUOT before anything is written; a write is cut at the limit."""

import time


cdef int _q_walk(_Stack self, int dfd, set seen, long long *acc, bint files_only) except -1:
    """Count below the dir open (O_RDONLY) at dfd, which is closed here:
    acc[0] bytes, acc[1] inodes. files_only (the index): no dirs, no
    descent."""
    cdef DIR *d = fdopendir(dfd)
    cdef dirent *e
    cdef struct_stat st
    cdef int sub, err
    cdef const char *nm
    if d == NULL:
        err = c_errno
        os.close(dfd)
        raise _oserror(err)
    try:
        while True:
            e = readdir(d)
            if e == NULL:
                break
            nm = e.d_name
            if nm[0] == b'.' and (nm[1] == 0 or (nm[1] == b'.' and nm[2] == 0)):
                continue
            if e.d_type != DT_DIR:
                err = c_statat(dirfd(d), nm, &st)
                if err == ENOENT:
                    continue
                if err:
                    raise _oserror(err, <bytes>nm)
                if S.S_ISDIR(st.st_mode):
                    pass
                elif S.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    continue            # a whiteout
                else:
                    if st.st_nlink > 1:
                        if st.st_ino in seen:
                            continue
                        seen.add(st.st_ino)
                    acc[1] += 1
                    if S.S_ISREG(st.st_mode) and not (
                            st.st_blocks == 0 and st.st_size > 0
                            and _q_metacopy(self, dirfd(d), <bytes>nm)):
                        acc[0] += st.st_size
                    continue
            if files_only:
                continue
            acc[1] += 1
            sub = c_openat(dirfd(d), nm, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if sub < 0:
                err = c_errno
                if err == ENOENT:
                    continue
                raise _oserror(err, <bytes>nm)
            _q_walk(self, sub, seen, acc, False)
    finally:
        closedir(d)
    return 0


cdef bint _q_metacopy(_Stack self, int dfd, bytes name):
    """A sparse file with no blocks: is it a metacopy file (its data below)?"""
    try:
        os.getxattr(b"/proc/self/fd/%d/%s" % (dfd, name), self.x_metacopy, follow_symlinks=False)
    except OSError:
        return False
    return True


cdef int q_take(_Stack self, long long nbytes, long long inodes) except -1:
    """Count nbytes and inodes more, or EDQUOT (nothing counted) if that
    would pass a limit."""
    if not self.quota_on:
        return 0
    if nbytes > 0 and self.q_bytes_max >= 0 and self.q_bytes + nbytes > self.q_bytes_max:
        raise _err(errno.EDQUOT)
    if inodes > 0 and self.q_inodes_max >= 0 and self.q_inodes + inodes > self.q_inodes_max:
        raise _err(errno.EDQUOT)
    self.q_bytes += nbytes
    self.q_inodes += inodes
    return 0


cdef inline void q_give(_Stack self, long long nbytes, long long inodes) noexcept:
    if self.quota_on:
        self.q_bytes -= nbytes
        self.q_inodes -= inodes


cdef long long q_charged(_Stack self, Node n, struct_stat *st) noexcept:
    """The bytes counted for n's upper inode (stat st)."""
    if S.S_ISREG(st.st_mode) and not n.metacopy:
        return st.st_size
    return 0


cdef int q_hold_fd(_Stack self, Node n) except -2:
    """Before a name of non-dir n is removed: a dup of its upper fd, to
    see afterwards whether that was its last (q_gone), or -1."""
    if not self.quota_on or n.is_dir or n.upper < 0:
        return -1
    return os.dup(n.upper)


cdef int q_gone(_Stack self, Node n, int fd) except -1:
    """After a name of non-dir n was removed (fd from q_hold_fd): its
    inode and data are given back once no name is left, or at the last
    close of an open file (quota_closed)."""
    cdef struct_stat st
    if fd < 0:
        return 0
    try:
        if fstat(fd, &st) != 0:
            raise _oserror(c_errno)
    finally:
        os.close(fd)
    if st.st_nlink > 0:
        return 0
    if n.pins > 0 or n.busy:
        self._q_orphans[n.key] = n
        return 0
    q_give(self, q_charged(self, n, &st), 1)
    return 0


cdef class _Quota(_Copier):
    """The quota methods the adapters call (see the module docstring)."""

    def set_quota(self, nbytes=None, inodes=None):
        """Limit the upper layer to nbytes and inodes (None: no limit) and
        count what it holds now. Returns the seconds the count took."""
        cdef long long acc[2]
        if self.upper_root < 0:
            raise ValueError("a quota needs an upper layer")
        t0 = time.monotonic()
        acc[0] = acc[1] = 0
        seen = set()
        _q_walk(self, os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=self.upper_root),
                seen, acc, False)
        if self.index_fd >= 0:
            _q_walk(self, os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=self.index_fd),
                    seen, acc, True)
        self.q_bytes, self.q_inodes = acc[0], acc[1]
        self.q_bytes_max = -1 if nbytes is None else nbytes
        self.q_inodes_max = -1 if inodes is None else inodes
        self.quota_on = nbytes is not None or inodes is not None
        self._q_orphans = {}
        self.qlock = threading.Lock()
        return time.monotonic() - t0

    def quota_usage(self):
        """{bytes, bytes_limit, inodes, inodes_limit} (limits None if
        none), or None without a quota."""
        if not self.quota_on:
            return None
        return {"bytes": self.q_bytes, "bytes_limit": None if self.q_bytes_max < 0 else self.q_bytes_max,
                "inodes": self.q_inodes,
                "inodes_limit": None if self.q_inodes_max < 0 else self.q_inodes_max}

    cpdef tuple quota_grow(self, int fd, long long off, long long end, bint partial):
        """Before the file open at fd grows to end (a write at off): count
        the growth, cut at the limit where partial (a write), else all or
        EDQUOT. Returns (size before, the end allowed); the caller holds
        qlock until quota_settle."""
        cdef struct_stat st
        cdef long long room
        if fstat(fd, &st) != 0:
            raise _oserror(c_errno)
        if end <= st.st_size or not self.quota_on:
            return st.st_size, end
        if self.q_bytes_max >= 0:
            room = self.q_bytes_max - self.q_bytes
            if end - st.st_size > room:
                if not partial or st.st_size + room <= off:
                    raise _err(errno.EDQUOT)
                end = st.st_size + room
        self.q_bytes += end - st.st_size
        return st.st_size, end

    cpdef quota_settle(self, long long before, long long allowed_end, long long done_end):
        """After the change quota_grow allowed: give back what it did not
        use (done_end: where the file ends now, as far as this change
        goes)."""
        cdef long long used = done_end if done_end > before else before
        if allowed_end > used:
            q_give(self, allowed_end - used, 0)

    cpdef quota_truncated(self, long long before, long long after):
        """A file shrank (before > after) or grew by a truncate counted
        with quota_grow."""
        if after < before:
            q_give(self, before - after, 0)

    def quota_closed(self, Node n):
        """The last open file of n is closed: an unlinked one gives its
        inode and data back."""
        cdef struct_stat st
        if not self.quota_on or self._q_orphans.pop(n.key, None) is None:
            return
        if n._upper >= 0 and fstat(n._upper, &st) == 0 and st.st_nlink == 0:
            q_give(self, q_charged(self, n, &st), 1)

    def quota_statfs(self, v):
        """statvfs of the upper with the limits applied: (blocks, bfree,
        bavail, files, ffree)."""
        blocks, bfree, bavail, files, ffree = v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree
        if self.quota_on and self.q_bytes_max >= 0:
            frsize = v.f_frsize or v.f_bsize or 4096
            blocks = self.q_bytes_max // frsize
            left = max(0, self.q_bytes_max - self.q_bytes) // frsize
            bfree, bavail = min(bfree, left), min(bavail, left)
        if self.quota_on and self.q_inodes_max >= 0:
            files = self.q_inodes_max
            ffree = min(ffree, max(0, self.q_inodes_max - self.q_inodes))
        return blocks, bfree, bavail, files, ffree
