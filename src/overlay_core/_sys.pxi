"""System-call layer of overlay_core, included by _core.pyx.

Thin `nogil` wrappers around the Linux calls the os module does not offer
(renameat2, utimensat with UTIME_OMIT on /proc paths, FICLONE, copy_file_range
loops with holes kept). Each wrapper raises OSError(c_errno, strerror, name)
on failure; the data copy loop runs without the GIL.
"""

from libc.errno cimport errno as c_errno, EINVAL, EXDEV, ENOSYS, EOPNOTSUPP, ENXIO, EINTR, EBADF, ENOTTY, EPERM
from libc.string cimport strerror, memcpy, memset, strncmp, strlen
from posix.types cimport off_t, mode_t
from posix.unistd cimport lseek, ftruncate, read, write, pread, pwrite, close
from libc.stdlib cimport malloc, free, calloc, realloc
from posix.stat cimport struct_stat, fstatat, fstat

cdef extern from "<stdio.h>" nogil:
    int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)

cdef extern from "<fcntl.h>" nogil:
    int AT_FDCWD
    int AT_SYMLINK_NOFOLLOW
    int AT_EMPTY_PATH
    int SEEK_DATA
    int SEEK_HOLE

cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR
    struct dirent:
        unsigned char d_type
        char d_name[256]
    DIR *fdopendir(int fd)
    dirent *readdir(DIR *d)
    int closedir(DIR *d)
    int dirfd(DIR *d)
    unsigned char DT_DIR
    unsigned char DT_UNKNOWN

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/fs.h>" nogil:
    unsigned long FICLONE
    unsigned int RENAME_NOREPLACE
    unsigned int RENAME_EXCHANGE
    unsigned int RENAME_WHITEOUT

cdef extern from "<unistd.h>" nogil:
    ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t len, unsigned int flags)
    int fdatasync(int fd)
    int fsync(int fd)
    int fchownat(int dirfd, const char *pathname, unsigned int owner, unsigned int group, int flags)

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<sys/stat.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int utimensat(int dirfd, const char *pathname, const timespec *times, int flags)
    long UTIME_OMIT
    long UTIME_NOW

PY_RENAME_NOREPLACE = RENAME_NOREPLACE
PY_RENAME_EXCHANGE = RENAME_EXCHANGE
PY_RENAME_WHITEOUT = RENAME_WHITEOUT

# Copy chunk: large enough to amortise the syscall, small enough that a
# crash or an error loses little work.
DEF CHUNK = 8 * 1024 * 1024


cdef inline object _oserror(int err, object name=None):
    msg = strerror(err).decode("utf-8", "replace")
    if name is None:
        return OSError(err, msg)
    return OSError(err, msg, name)


def sys_renameat2(int olddirfd, bytes oldname, int newdirfd, bytes newname, unsigned int flags=0):
    """renameat2(2); raises OSError on failure."""
    cdef const char *o = oldname
    cdef const char *n = newname
    cdef int ret
    with nogil:
        ret = renameat2(olddirfd, o, newdirfd, n, flags)
    if ret != 0:
        raise _oserror(c_errno, oldname)


cdef int _utimens(int dirfd, const char *p, object atime_ns, object mtime_ns, int flags):
    cdef timespec ts[2]
    cdef int ret
    if atime_ns is None:
        ts[0].tv_sec = 0
        ts[0].tv_nsec = UTIME_OMIT
    else:
        ts[0].tv_sec = atime_ns // 1000000000
        ts[0].tv_nsec = atime_ns % 1000000000
    if mtime_ns is None:
        ts[1].tv_sec = 0
        ts[1].tv_nsec = UTIME_OMIT
    else:
        ts[1].tv_sec = mtime_ns // 1000000000
        ts[1].tv_nsec = mtime_ns % 1000000000
    with nogil:
        ret = utimensat(dirfd, p, ts, flags)
    return c_errno if ret != 0 else 0


def sys_utimens(bytes path, object atime_ns, object mtime_ns, bint nofollow=False):
    """utimensat(2) on *path*; None leaves that time unchanged (UTIME_OMIT)."""
    cdef int err = _utimens(AT_FDCWD, path, atime_ns, mtime_ns,
                            AT_SYMLINK_NOFOLLOW if nofollow else 0)
    if err:
        raise _oserror(err, path)


# The object behind an (O_PATH) fd changed through the fd itself
# (AT_EMPTY_PATH), not through a path walk of /proc/self/fd.

cdef sys_utimens_fd(int fd, object atime_ns, object mtime_ns):
    cdef int err = _utimens(fd, b"", atime_ns, mtime_ns, AT_EMPTY_PATH)
    if err:
        raise _oserror(err, _proc(fd))


cdef sys_chown_fd(int fd, int uid, int gid):
    """fchownat(2) of the object behind fd (-1 keeps that id)."""
    cdef int ret
    with nogil:
        ret = fchownat(fd, b"", <unsigned int>uid, <unsigned int>gid, AT_EMPTY_PATH)
    if ret != 0:
        raise _oserror(c_errno, _proc(fd))


cdef bint _fchmodat2_ok = True
DEF SYS_FCHMODAT2 = 452

cdef sys_chmod_fd(int fd, int mode):
    """fchmodat2(2) (Linux 6.6) of the object behind fd; chmod through
    /proc on older kernels."""
    cdef long ret
    global _fchmodat2_ok
    if _fchmodat2_ok:
        with nogil:
            ret = c_syscall(SYS_FCHMODAT2, fd, b"", mode, AT_EMPTY_PATH)
        if ret == 0:
            return
        if c_errno != ENOSYS:
            raise _oserror(c_errno, _proc(fd))
        _fchmodat2_ok = False
    os.chmod(_proc(fd), mode)


# Capability probes, remembered once answered (per process; layers are on
# the same few filesystems for the life of a mount).
cdef bint _reflink_broken = False
cdef bint _cfr_broken = False
cdef bint _sendfile_broken = False


cdef int _copy_range(int src, int dst, off_t start, off_t end) noexcept nogil:
    """Copy [start, end) from src to dst at the same offsets; returns 0 or c_errno."""
    global _cfr_broken, _sendfile_broken
    cdef off_t pin, pout, pos
    cdef ssize_t n
    cdef size_t want
    cdef char *buf
    cdef ssize_t got, done, w
    cdef int err
    pos = start
    while pos < end and not _cfr_broken:
        want = <size_t>(end - pos) if end - pos < CHUNK else CHUNK
        pin = pos
        pout = pos
        n = copy_file_range(src, &pin, dst, &pout, want, 0)
        if n < 0:
            if c_errno == EINTR:
                continue
            if c_errno in (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, EBADF):
                _cfr_broken = True
                break
            return c_errno
        if n == 0:
            return 0      # source shrank under us: stop at its end
        pos += n
    while pos < end and not _sendfile_broken:
        if lseek(dst, pos, 0) < 0:
            return c_errno
        want = <size_t>(end - pos) if end - pos < CHUNK else CHUNK
        pin = pos
        n = sendfile(dst, src, &pin, want)
        if n < 0:
            if c_errno == EINTR:
                continue
            if c_errno in (EINVAL, ENOSYS, EOPNOTSUPP):
                _sendfile_broken = True
                break
            return c_errno
        if n == 0:
            return 0
        pos += n
    if pos >= end:
        return 0
    buf = <char*>malloc(1024 * 1024)
    if buf == NULL:
        return 12  # ENOMEM
    err = 0
    while pos < end:
        want = <size_t>(end - pos) if end - pos < 1024 * 1024 else 1024 * 1024
        got = pread(src, buf, want, pos)
        if got < 0:
            if c_errno == EINTR:
                continue
            err = c_errno
            break
        if got == 0:
            break
        done = 0
        while done < got:
            w = pwrite(dst, buf + done, got - done, pos + done)
            if w < 0:
                if c_errno == EINTR:
                    continue
                err = c_errno
                break
            done += w
        if err:
            break
        pos += got
    free(buf)
    return err


# The kernel overlay copies up in chunks of this size, looking for a hole
# only between chunks (ovl_copy_up_file): we do the same, so an upper file
# we write has the kernel's layout of holes (SEEK_HOLE shows it).
DEF COPY_UP_CHUNK = 1024 * 1024


cdef int _copy_data(int src, int dst, off_t size, bint try_reflink) noexcept nogil:
    """Copy file data as the kernel overlay does: a reflink where the
    filesystem can, else 1 MiB chunks, skipping a hole that starts where a
    chunk would (holes inside a copied chunk are written as zeros)."""
    global _reflink_broken
    cdef off_t pos = 0, data_pos = -1, left = size, this_len
    cdef bint skip_hole = True
    cdef int err
    cdef struct_stat dst_st
    if try_reflink and not _reflink_broken:
        if ioctl(dst, FICLONE, src) == 0:
            return 0
        if c_errno in (EOPNOTSUPP, EINVAL, EXDEV, ENOTTY, ENOSYS, EPERM):
            if c_errno != EXDEV:
                _reflink_broken = True
        else:
            return c_errno
    while left > 0:
        this_len = left if left < COPY_UP_CHUNK else COPY_UP_CHUNK
        if skip_hole and data_pos < pos:
            data_pos = lseek(src, pos, SEEK_DATA)
            if data_pos > pos:
                left -= data_pos - pos
                pos = data_pos
                continue
            elif data_pos < 0:
                if c_errno == ENXIO:
                    break          # only a hole remains
                skip_hole = False  # no SEEK_DATA here: copy everything
        err = _copy_range(src, dst, pos, pos + this_len)
        if err:
            return err
        pos += this_len
        left -= this_len
    # the size a trailing hole leaves (not where it is already: a truncate
    # would change the times of a metacopy file's data copy-up)
    if fstat(dst, &dst_st) != 0:
        return c_errno
    if dst_st.st_size != size and ftruncate(dst, size) != 0:
        return c_errno
    return 0


def sys_copy_data(int src, int dst, off_t size, bint try_reflink=True):
    """Copy *size* bytes of data from fd *src* to fd *dst*, GIL released."""
    cdef int err
    with nogil:
        err = _copy_data(src, dst, size, try_reflink)
    if err:
        raise _oserror(err)


cdef extern from "<unistd.h>" nogil:
    int c_syncfs "syncfs"(int fd)


def sys_syncfs(int fd):
    cdef int ret
    with nogil:
        ret = c_syncfs(fd)
    if ret != 0:
        raise _oserror(c_errno)


def sys_fsync(int fd, bint datasync=False):
    cdef int ret
    with nogil:
        ret = fdatasync(fd) if datasync else fsync(fd)
    if ret != 0:
        raise _oserror(c_errno)


cdef extern from "<sys/xattr.h>" nogil:
    ssize_t c_getxattr "getxattr"(const char *path, const char *name, void *value, size_t size)
    ssize_t c_listxattr "listxattr"(const char *path, char *names, size_t size)

cdef extern from "<fcntl.h>" nogil:
    int c_openat "openat"(int dirfd, const char *pathname, int flags, ...)

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *s, size_t n, const char *fmt, ...)

cdef extern from "<errno.h>" nogil:
    int ENOENT, ENOTDIR, ENAMETOOLONG, ENODATA, ERANGE


cdef class Stat:
    """The fields of a stat(2) result that the overlay reports; built from a
    C struct without the cost of an os.stat_result (fields: _core.pxd)."""


cdef Stat _mkstat(struct_stat *s):
    cdef Stat r = Stat.__new__(Stat)
    r.st_dev = s.st_dev
    r.st_ino = s.st_ino
    r.st_rdev = s.st_rdev
    r.st_nlink = s.st_nlink
    r.st_mode = s.st_mode
    r.st_uid = s.st_uid
    r.st_gid = s.st_gid
    r.st_size = s.st_size
    r.st_blksize = s.st_blksize
    r.st_blocks = s.st_blocks
    r.st_atime_ns = s.st_atim.tv_sec * 1000000000LL + s.st_atim.tv_nsec
    r.st_mtime_ns = s.st_mtim.tv_sec * 1000000000LL + s.st_mtim.tv_nsec
    r.st_ctime_ns = s.st_ctim.tv_sec * 1000000000LL + s.st_ctim.tv_nsec
    return r


cdef inline int c_statat(int dirfd, const char *name, struct_stat *st) noexcept nogil:
    """fstatat without following symlinks: 0 or an errno."""
    if fstatat(dirfd, name, st, AT_SYMLINK_NOFOLLOW) != 0:
        return c_errno
    return 0


def sys_fstat(int fd):
    """fstat(2) as a Stat (works on O_PATH fds)."""
    cdef struct_stat st
    cdef int ret
    with nogil:
        ret = fstat(fd, &st)
    if ret != 0:
        raise _oserror(c_errno)
    return _mkstat(&st)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_getdents64

DEF PREFETCH_THREADS = 16

ctypedef void *(*_worker_fn)(void *) noexcept nogil


cdef void _run_threads(_worker_fn fn, void **jobs, int nthreads) noexcept nogil:
    """fn(jobs[t]) for each t, on nthreads threads (in this one if 1, or
    where a thread cannot be made)."""
    cdef pthread_t tids[PREFETCH_THREADS]
    cdef bint started[PREFETCH_THREADS]
    cdef int t
    if nthreads == 1:
        fn(jobs[0])
        return
    for t in range(nthreads):
        started[t] = pthread_create(&tids[t], NULL, fn, jobs[t]) == 0
    for t in range(nthreads):
        if started[t]:
            pthread_join(tids[t], NULL)
        else:
            fn(jobs[t])


cdef struct _Prefetch:
    const int *fds
    Py_ssize_t n
    int step
    int first
    const char *name


cdef void *_prefetch_worker(void *arg) noexcept nogil:
    cdef _Prefetch *job = <_Prefetch*>arg
    cdef struct_stat st
    cdef Py_ssize_t i = job.first
    while i < job.n:
        fstatat(job.fds[i], job.name, &st, AT_SYMLINK_NOFOLLOW)
        i += job.step
    return NULL


cdef void prefetch_layers(list fds, bytes name) noexcept:
    """Stat name in each of many lower dirs in parallel, just before a
    walk does it one by one: cold, the disk then serves many reads at a
    time instead of one after another; warm, it costs a syscall a layer."""
    cdef Py_ssize_t n = len(fds), i
    cdef int t, nthreads = PREFETCH_THREADS
    cdef int *arr
    cdef _Prefetch jobs[PREFETCH_THREADS]
    cdef void *ptrs[PREFETCH_THREADS]
    cdef const char *cname = name
    if n < 2 * nthreads:
        return
    arr = <int*>malloc(n * sizeof(int))
    if arr == NULL:
        return
    for i in range(n):
        arr[i] = fds[i]
    with nogil:
        for t in range(nthreads):
            jobs[t].fds = arr
            jobs[t].n = n
            jobs[t].step = nthreads
            jobs[t].first = t
            jobs[t].name = cname
            ptrs[t] = &jobs[t]
        _run_threads(_prefetch_worker, ptrs, nthreads)
    free(arr)


cdef struct _ListJob:
    const int *fds
    Py_ssize_t n
    int step
    int first
    char **bufs         # per dir: its getdents64 records (malloc), or NULL
    size_t *lens        # bytes of records
    int *errs           # per dir: an errno, or 0


cdef void *_list_worker(void *arg) noexcept nogil:
    cdef _ListJob *job = <_ListJob*>arg
    cdef Py_ssize_t i = job.first
    cdef int d
    cdef size_t cap, used
    cdef long r
    cdef char *buf
    cdef char *nbuf
    while i < job.n:
        d = c_openat(job.fds[i], ".", O_DIRECTORY | O_CLOEXEC)     # (O_RDONLY)
        if d < 0:
            job.errs[i] = c_errno
            i += job.step
            continue
        cap = 4096         # (most lower dirs of deep stacks are small)
        used = 0
        buf = <char*>malloc(cap)
        while buf != NULL:
            if cap - used < 2048:
                nbuf = <char*>realloc(buf, cap * 2)
                if nbuf == NULL:
                    free(buf)
                    buf = NULL
                    job.errs[i] = 12        # ENOMEM
                    break
                buf = nbuf
                cap *= 2
            r = c_syscall(SYS_getdents64, d, buf + used, cap - used)
            if r < 0:
                job.errs[i] = c_errno
                break
            if r == 0:
                break
            used += r
        if buf == NULL and job.errs[i] == 0:
            job.errs[i] = 12
        close(d)
        job.bufs[i] = buf
        job.lens[i] = used
        i += job.step
    return NULL


cdef list c_listdirs(list fds):
    """The names (bytes) in each dir behind the (O_PATH) fds: a list per
    dir. Many dirs are read by 16 threads at once (a cold disk then serves
    them together), few in this thread."""
    cdef Py_ssize_t n = len(fds), i
    cdef int t, nthreads = PREFETCH_THREADS if n >= 4 * PREFETCH_THREADS else 1
    cdef int *arr = <int*>calloc(n + 1, sizeof(int))
    cdef char **bufs = <char**>calloc(n + 1, sizeof(char*))
    cdef size_t *lens = <size_t*>calloc(n + 1, sizeof(size_t))
    cdef int *errs = <int*>calloc(n + 1, sizeof(int))
    cdef _ListJob jobs[PREFETCH_THREADS]
    cdef void *ptrs[PREFETCH_THREADS]
    cdef size_t off
    cdef unsigned short reclen
    cdef const char *nm
    try:
        if arr == NULL or bufs == NULL or lens == NULL or errs == NULL:
            raise MemoryError()
        for i in range(n):
            arr[i] = fds[i]
        with nogil:
            for t in range(nthreads):
                jobs[t].fds = arr
                jobs[t].n = n
                jobs[t].step = nthreads
                jobs[t].first = t
                jobs[t].bufs = bufs
                jobs[t].lens = lens
                jobs[t].errs = errs
                ptrs[t] = &jobs[t]
            _run_threads(_list_worker, ptrs, nthreads)
        out = []
        for i in range(n):
            if errs[i]:
                raise _oserror(errs[i])
            names = []
            off = 0
            while off < lens[i]:
                # struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, name
                reclen = (<unsigned short*>(bufs[i] + off + 16))[0]
                nm = bufs[i] + off + 19
                if not (nm[0] == b'.' and (nm[1] == 0 or (nm[1] == b'.' and nm[2] == 0))):
                    names.append(<bytes>nm)
                off += reclen
            out.append(names)
        return out
    finally:
        if bufs != NULL:
            for i in range(n):
                free(bufs[i])
        free(arr)
        free(bufs)
        free(lens)
        free(errs)


cdef bint _listxattrat_ok = True
DEF SYS_LISTXATTRAT = 465

cdef extern from "<unistd.h>" nogil:
    long c_syscall "syscall"(long number, ...)


cdef bint _listed_prefix(const char *buf, ssize_t n, bytes prefix) noexcept:
    """Does the list of xattr names a listxattr call put in buf (n bytes,
    or n < 0 with errno) hold one starting with prefix? True when that
    cannot be told: the caller then reads the ones it wants."""
    cdef ssize_t i = 0
    cdef Py_ssize_t plen = len(prefix)
    cdef const char *p = prefix
    if n < 0:
        return c_errno != ENODATA and c_errno != EOPNOTSUPP
    while i < n:
        if strncmp(buf + i, p, plen) == 0:
            return True
        i += strlen(buf + i) + 1
    return False


cdef bint c_has_xattr_prefix(int fd, bytes prefix, bint dir=False) noexcept:
    """Does the object behind (O_PATH) fd have an xattr whose name starts
    with prefix? (True when that cannot be told: the caller then reads
    the ones it wants.) One listxattr instead of a getxattr per name."""
    cdef char path[48]
    cdef char buf[1024]
    cdef ssize_t n
    global _listxattrat_ok
    n = -1
    if dir and _listxattrat_ok:
        # listxattrat(2) (Linux 6.13) at "." of the dir: no walk of /proc
        n = c_syscall(SYS_LISTXATTRAT, fd, b".", AT_SYMLINK_NOFOLLOW, buf, sizeof(buf))
        if n < 0 and c_errno == ENOSYS:
            _listxattrat_ok = False
    if n < 0 and not (dir and _listxattrat_ok):
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd)
        n = c_listxattr(path, buf, sizeof(buf))
    return _listed_prefix(buf, n, prefix)


cdef bint _getxattrat_ok = True
DEF SYS_GETXATTRAT = 464

cdef struct xattr_args:
    unsigned long long value
    unsigned int size
    unsigned int flags


cdef bint c_has_xattr_prefix_at(int dirfd, const char *path, bytes prefix) noexcept:
    """Has the entry path in (O_PATH) dir dirfd (not followed) an xattr whose
    name starts with prefix? One listxattrat(2) (Linux 6.13), no walk of
    /proc; True when that cannot be told (the caller reads what it wants)."""
    cdef char buf[1024]
    cdef ssize_t n
    global _listxattrat_ok
    if not _listxattrat_ok:
        return True
    n = c_syscall(SYS_LISTXATTRAT, dirfd, path, AT_SYMLINK_NOFOLLOW, buf, sizeof(buf))
    if n < 0 and c_errno == ENOSYS:
        _listxattrat_ok = False
        return True
    return _listed_prefix(buf, n, prefix)


cdef bint _setxattrat_ok = True
DEF SYS_SETXATTRAT = 463

cdef c_setx_at(int dirfd, bytes path, bytes name, bytes value):
    """setxattr(2) of name on the entry path in dir dirfd (not followed):
    setxattrat(2) (Linux 6.13), else through /proc."""
    cdef xattr_args a
    cdef long n
    global _setxattrat_ok
    if _setxattrat_ok:
        a.value = <unsigned long long><size_t><const char*>value
        a.size = len(value)
        a.flags = 0
        n = c_syscall(SYS_SETXATTRAT, dirfd, <const char*>path, AT_SYMLINK_NOFOLLOW,
                      <const char*>name, &a, sizeof(a))
        if n == 0:
            return
        if c_errno != ENOSYS:
            raise _oserror(c_errno, path)
        _setxattrat_ok = False
    os.setxattr(b"/proc/self/fd/%d/%s" % (dirfd, path), name, value)


cdef object c_getx_dir(int fd, const char *name):
    """c_getx of a dir: getxattrat(2) (Linux 6.13) of "." in it, no walk
    of /proc."""
    cdef char buf[256]
    cdef xattr_args a
    cdef long n
    global _getxattrat_ok
    if _getxattrat_ok:
        a.value = <unsigned long long><size_t>buf
        a.size = sizeof(buf)
        a.flags = 0
        n = c_syscall(SYS_GETXATTRAT, fd, b".", AT_SYMLINK_NOFOLLOW, name, &a, sizeof(a))
        if n >= 0:
            return buf[:n]
        if c_errno == ENODATA or c_errno == EOPNOTSUPP or c_errno == EPERM:
            return None
        if c_errno == ENOSYS:
            _getxattrat_ok = False
    return c_getx(fd, name)


cdef object c_getx(int fd, const char *name):
    """Value of xattr name on the object behind (O_PATH) fd, or None when it
    has none (or the fs has no xattrs)."""
    cdef char path[48]
    cdef char buf[256]
    cdef ssize_t n
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd)
    n = c_getxattr(path, name, buf, sizeof(buf))
    if n >= 0:
        return buf[:n]
    if c_errno == ENODATA or c_errno == EOPNOTSUPP or c_errno == EPERM:
        return None
    if c_errno == ERANGE:
        import os as _os
        try:
            return _os.getxattr(path[:], name)
        except OSError as e:
            if e.errno == ENODATA:
                return None
            raise
    raise _oserror(c_errno, name)


cdef list c_listdir(int fd):
    """Names (bytes, without . and ..) in the dir behind (O_PATH) fd."""
    return c_listdirs([fd])[0]


def blind_stat(unsigned int mode, unsigned long long ino):
    """A Stat for an entry that cannot be stat'ed (listed, its lookup fails)."""
    cdef Stat r = Stat.__new__(Stat)
    r.st_mode = mode
    r.st_ino = ino
    r.st_nlink = 1
    r.st_blksize = 4096
    return r


cdef extern from "<sys/stat.h>" nogil:
    struct statx_timestamp:
        long long tv_sec
        unsigned int tv_nsec
    struct statx:
        unsigned int stx_mask
        unsigned int stx_blksize
        unsigned long long stx_attributes
        unsigned int stx_nlink
        unsigned int stx_uid
        unsigned int stx_gid
        unsigned short stx_mode
        unsigned long long stx_ino
        unsigned long long stx_size
        unsigned long long stx_blocks
        unsigned long long stx_attributes_mask
        statx_timestamp stx_atime
        statx_timestamp stx_btime
        statx_timestamp stx_ctime
        statx_timestamp stx_mtime
        unsigned int stx_rdev_major
        unsigned int stx_rdev_minor
        unsigned int stx_dev_major
        unsigned int stx_dev_minor
    int c_statx "statx"(int dirfd, const char *path, int flags, unsigned int mask, statx *buf)


cdef class StatX:
    """A statx(2) result: the fields FUSE_STATX carries (fields: _core.pxd)."""


def sys_statx(int fd, unsigned int mask):
    """statx(2) of the object behind (O_PATH) fd, without following it."""
    cdef statx b
    cdef int ret
    with nogil:
        ret = c_statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, mask, &b)
    if ret != 0:
        raise _oserror(c_errno)
    cdef StatX r = StatX.__new__(StatX)
    r.stx_mask = b.stx_mask
    r.stx_blksize = b.stx_blksize
    r.stx_nlink = b.stx_nlink
    r.stx_uid = b.stx_uid
    r.stx_gid = b.stx_gid
    r.stx_mode = b.stx_mode
    r.stx_attributes = b.stx_attributes
    r.stx_attributes_mask = b.stx_attributes_mask
    r.stx_ino = b.stx_ino
    r.stx_size = b.stx_size
    r.stx_blocks = b.stx_blocks
    r.stx_atime_sec = b.stx_atime.tv_sec
    r.stx_atime_nsec = b.stx_atime.tv_nsec
    r.stx_btime_sec = b.stx_btime.tv_sec
    r.stx_btime_nsec = b.stx_btime.tv_nsec
    r.stx_ctime_sec = b.stx_ctime.tv_sec
    r.stx_ctime_nsec = b.stx_ctime.tv_nsec
    r.stx_mtime_sec = b.stx_mtime.tv_sec
    r.stx_mtime_nsec = b.stx_mtime.tv_nsec
    r.stx_rdev_major = b.stx_rdev_major
    r.stx_rdev_minor = b.stx_rdev_minor
    return r


# ---------------------------------------------------------------- file handles
# The kernel overlay names the lower object a copy-up came from by its
# filesystem's file handle (name_to_handle_at(2), as exportfs encodes it)
# and decodes it again (open_by_handle_at(2), CAP_DAC_READ_SEARCH).

cdef extern from "<fcntl.h>" nogil:
    int name_to_handle_at(int dirfd, const char *pathname, void *handle, int *mount_id, int flags)
    int open_by_handle_at(int mount_fd, void *handle, int flags)

DEF MAX_HANDLE_SZ = 128
# FS_IOC_GETFSUUID: _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]}), Linux 6.5
DEF FS_IOC_GETFSUUID = 0x80111500


def sys_name_to_handle(int fd):
    """(handle type, handle bytes) of the object behind fd (an O_PATH fd
    will do). OSError EOPNOTSUPP where the filesystem has no file handles."""
    cdef unsigned char buf[8 + MAX_HANDLE_SZ]
    cdef unsigned int *nbytes = <unsigned int *>buf
    cdef int *htype = <int *>(buf + 4)
    cdef int mnt, ret
    nbytes[0] = MAX_HANDLE_SZ
    with nogil:
        ret = name_to_handle_at(fd, "", buf, &mnt, AT_EMPTY_PATH)
    if ret != 0:
        raise _oserror(c_errno)
    return htype[0], (<char *>buf)[8:8 + nbytes[0]]


def sys_open_by_handle(int mount_fd, int htype, bytes handle, int flags):
    """open_by_handle_at(2) of (htype, handle) on mount_fd's filesystem."""
    cdef unsigned char buf[8 + MAX_HANDLE_SZ]
    cdef Py_ssize_t n = len(handle)
    cdef int ret
    if n > MAX_HANDLE_SZ:
        raise _oserror(EINVAL)
    (<unsigned int *>buf)[0] = <unsigned int>n
    (<int *>(buf + 4))[0] = htype
    memcpy(buf + 8, <const char *>handle, n)
    with nogil:
        ret = open_by_handle_at(mount_fd, buf, flags)
    if ret < 0:
        raise _oserror(c_errno)
    return ret


def sys_fs_uuid(int fd):
    """The uuid (16 bytes) of the filesystem of fd (not an O_PATH fd), as
    the kernel keeps it (s_uuid): zeros where it has none."""
    cdef unsigned char buf[17]
    cdef int ret
    memset(buf, 0, sizeof(buf))
    with nogil:
        ret = ioctl(fd, FS_IOC_GETFSUUID, buf)
    if ret != 0 or buf[0] > 16:
        return bytes(16)
    return (<char *>buf)[1:1 + buf[0]] + bytes(16 - buf[0])


cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)


def sys_fs_type(int fd):
    """The filesystem type (statfs f_type, its magic number) behind fd."""
    cdef statfs sb
    cdef int ret
    with nogil:
        ret = fstatfs(fd, &sb)
    if ret != 0:
        raise _oserror(c_errno)
    return <unsigned long>sb.f_type


# ---------------------------------------------------------------- private mounts
# The kernel overlay reaches its layers through private clones of their
# mounts: the lower ones read-only and noatime, the upper one with no atime
# flags of its own (the overlay mount's decide). We do the same with the new
# mount API (Linux 5.12): a detached clone of a layer's mount (open_tree),
# its flags set (mount_setattr), and the layer dirs opened inside it
# (openat2 without crossing mounts or following symlinks).

cdef extern from *:
    """
    #include <sys/syscall.h>
    #ifndef SYS_open_tree
    #define SYS_open_tree 428
    #endif
    #ifndef SYS_openat2
    #define SYS_openat2 437
    #endif
    #ifndef SYS_mount_setattr
    #define SYS_mount_setattr 442
    #endif
    struct ovl_mount_attr { unsigned long long attr_set, attr_clr, propagation, userns_fd; };
    struct ovl_open_how { unsigned long long flags, mode, resolve; };
    """
    long SYS_open_tree
    long SYS_openat2
    long SYS_mount_setattr
    struct ovl_mount_attr:
        unsigned long long attr_set, attr_clr, propagation, userns_fd
    struct ovl_open_how:
        unsigned long long flags, mode, resolve

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_NODIRATIME = 0x80
DEF OPEN_TREE_CLONE = 1
DEF AT_RECURSIVE = 0x8000
# RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
DEF RESOLVE_INSIDE = 0x01 | 0x02 | 0x04 | 0x08
DEF STATX_MNT_ID = 0x1000


def sys_clone_mount(bytes path):
    """An O_PATH fd of a detached clone of the mount at path (open_tree(2)
    with OPEN_TREE_CLONE, not recursive: the mounts below path are not in
    it). EPERM without CAP_SYS_ADMIN over the mount namespace."""
    cdef long fd
    cdef const char *p = path
    with nogil:
        fd = c_syscall(SYS_open_tree, AT_FDCWD, p, OPEN_TREE_CLONE | O_CLOEXEC)
    if fd < 0:
        raise _oserror(c_errno, path)
    return fd


def sys_mount_setattr(int fd, unsigned long long attr_set, unsigned long long attr_clr):
    """mount_setattr(2) on the mount whose root fd is."""
    cdef ovl_mount_attr a
    cdef long ret
    memset(&a, 0, sizeof(a))
    a.attr_set = attr_set
    a.attr_clr = attr_clr
    with nogil:
        ret = c_syscall(SYS_mount_setattr, fd, b"", AT_EMPTY_PATH, &a, sizeof(a))
    if ret != 0:
        raise _oserror(c_errno)


def sys_open_inside(int dirfd, bytes path, int flags):
    """openat2(2) of the relative path below dirfd, neither crossing a
    mount nor following a symlink on the way."""
    cdef ovl_open_how how
    cdef long fd
    cdef const char *p = path
    memset(&how, 0, sizeof(how))
    how.flags = <unsigned long long>flags
    how.resolve = RESOLVE_INSIDE
    with nogil:
        fd = c_syscall(SYS_openat2, dirfd, p, &how, sizeof(how))
    if fd < 0:
        raise _oserror(c_errno, path)
    return fd


def sys_mount_id_of(bytes path):
    """(mount id, st_dev, st_ino) of the dir at path (followed), by one
    statx(2)."""
    cdef unsigned long long buf[32]
    cdef int ret
    cdef const char *p = path
    memset(buf, 0, sizeof(buf))
    with nogil:
        ret = c_statx(AT_FDCWD, p, 0, STATX_MNT_ID | 0x100, <statx *>buf)   # | STATX_INO
    if ret != 0:
        raise _oserror(c_errno, path)
    cdef statx *sx = <statx *>buf
    if not sx.stx_mask & STATX_MNT_ID:
        raise _oserror(ENOSYS)
    return buf[18], (<unsigned long long>sx.stx_dev_major << 32) | sx.stx_dev_minor, sx.stx_ino


def sys_mount_id(int fd):
    """The id of the mount the object behind fd is on (statx STATX_MNT_ID)."""
    cdef unsigned long long buf[32]     # struct statx: 256 bytes
    cdef int ret
    memset(buf, 0, sizeof(buf))
    with nogil:
        ret = c_statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, <statx *>buf)
    if ret != 0:
        raise _oserror(c_errno)
    if not (<unsigned int *>buf)[0] & STATX_MNT_ID:
        raise _oserror(ENOSYS)
    return buf[18]                      # stx_mnt_id, at byte 144
