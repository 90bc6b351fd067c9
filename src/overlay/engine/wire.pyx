# cython: language_level=3
"""overlay.engine.wire: the FUSE kernel protocol on /dev/fuse.

The lowest layer of the native engine: it owns the /dev/fuse file
descriptors, runs the worker threads, answers INIT and writes replies and
notifications. It knows nothing of overlays: each request other than INIT
goes to Session.handle(), which the bridge (bridge.pyx) implements.

Threads: worker 0 reads the fd the mount was made with; every other worker
opens /dev/fuse anew and clones the connection onto it (FUSE_DEV_IOC_CLONE),
so each reads its own fd, with the GIL released, and answers on that same fd
(the kernel looks a reply up in the queue of the fd that read the request).
A reply that fails with ENOENT found its request gone (interrupted); the
caller undoes what the reply would have handed over.

Notifications (inval_inode, inval_entry) are queued and written by a thread
of their own: written from a request's handler they could deadlock on locks
the kernel holds for that request.

Ending: ENODEV from read() means the connection is gone (unmounted or
aborted); every worker then stops. stop() makes the workers return from a
blocked read() with a signal (SIGUSR2, handled by a no-op, no SA_RESTART).

Also here: the few system calls mounting needs (mount, umount2, the
/dev/fuse ioctls), and the watchdog that unmounts a mount whose daemon died.
"""

import errno as _errno
import logging
import os
import queue
import threading

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno, EINTR, EAGAIN, ENOENT, ENODEV, ENOSYS, EIO, EPROTO, ENOTCONN
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset, memcpy, strlen
from posix.unistd cimport read, write, close, _exit, fork

from overlay.engine.abi cimport *

log = logging.getLogger("overlay.engine")

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags, ...)
    int O_RDWR
    int O_CLOEXEC
    int O_RDONLY
    int O_WRONLY

cdef extern from "<sys/mount.h>" nogil:
    int c_mount "mount"(const char *source, const char *target, const char *fstype,
                        unsigned long flags, const void *data)
    int c_umount2 "umount2"(const char *target, int flags)
    int MNT_DETACH

cdef extern from "<sys/vfs.h>" nogil:
    struct statfs_t "statfs":
        long f_type
    int c_statfs "statfs"(const char *path, statfs_t *buf)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    ctypedef struct sigaction_t "struct sigaction":
        void (*sa_handler)(int)
        int sa_flags
        sigset_t sa_mask
    int sigemptyset(sigset_t *s)
    int c_sigaction "sigaction"(int sig, const sigaction_t *act, sigaction_t *old)
    int SIGUSR2

cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)
    int PR_SET_PDEATHSIG

cdef extern from "<sys/syscall.h>" nogil:
    long syscall(long number, ...)
    long SYS_close_range

cdef extern from "<unistd.h>" nogil:
    int dup2(int oldfd, int newfd)
    unsigned int sleep(unsigned int s)

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_GETFL
    int F_SETFL
    int O_NONBLOCK

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


include "_uring.pxi"
include "_readers.pxi"


# ---------------------------------------------------------------- sizes

def _check_abi():
    """The struct sizes of protocol 7.45; a mismatch is a bug in abi.pxd."""
    sizes = {
        "fuse_in_header": (sizeof(fuse_in_header), 40),
        "fuse_out_header": (sizeof(fuse_out_header), 16),
        "fuse_attr": (sizeof(fuse_attr), 88),
        "fuse_entry_out": (sizeof(fuse_entry_out), 128),
        "fuse_attr_out": (sizeof(fuse_attr_out), 104),
        "fuse_open_out": (sizeof(fuse_open_out), 16),
        "fuse_read_in": (sizeof(fuse_read_in), 40),
        "fuse_write_in": (sizeof(fuse_write_in), 40),
        "fuse_write_out": (sizeof(fuse_write_out), 8),
        "fuse_init_in": (sizeof(fuse_init_in), 64),
        "fuse_init_out": (sizeof(fuse_init_out), 64),
        "fuse_backing_map": (sizeof(fuse_backing_map), 16),
        "fuse_forget_one": (sizeof(fuse_forget_one), 16),
        "fuse_dirent": (sizeof(fuse_dirent), 24),
        "fuse_direntplus": (sizeof(fuse_direntplus), 152),
        "fuse_statfs_out": (sizeof(fuse_statfs_out), 80),
        "fuse_statx_out": (sizeof(fuse_statx_out), 288),
        "fuse_setattr_in": (sizeof(fuse_setattr_in), 88),
        "fuse_lseek_in": (sizeof(fuse_lseek_in), 24),
        "fuse_fallocate_in": (sizeof(fuse_fallocate_in), 32),
        "fuse_copy_file_range_in": (sizeof(fuse_copy_file_range_in), 56),
        "fuse_setxattr_in": (sizeof(fuse_setxattr_in), 16),
        "fuse_create_in": (sizeof(fuse_create_in), 16),
        "fuse_mknod_in": (sizeof(fuse_mknod_in), 16),
        "fuse_lk_in": (sizeof(fuse_lk_in), 48),
        "fuse_statx_in": (sizeof(fuse_statx_in), 24),
    }
    bad = {k: v for k, v in sizes.items() if v[0] != v[1]}
    if bad:
        raise ImportError(f"overlay.engine.abi: struct sizes differ from protocol 7.45: {bad}")


_check_abi()


# ---------------------------------------------------------------- syscalls

cdef object _oserr(int err, what=None):
    if what is None:
        return OSError(err, os.strerror(err))
    return OSError(err, os.strerror(err), what)


def sys_mount(bytes source, bytes target, bytes fstype, unsigned long flags, bytes data):
    """mount(2); raises OSError."""
    cdef int ret
    cdef const char *s = source
    cdef const char *t = target
    cdef const char *f = fstype
    cdef const char *d = data
    with nogil:
        ret = c_mount(s, t, f, flags, d)
    if ret != 0:
        raise _oserr(errno, os.fsdecode(target))


def sys_umount2(bytes target, int flags=0):
    cdef int ret
    cdef const char *t = target
    with nogil:
        ret = c_umount2(t, flags)
    if ret != 0:
        raise _oserr(errno, os.fsdecode(target))


def dev_clone(int master):
    """A new /dev/fuse fd attached to the connection of master."""
    cdef int fd
    cdef uint32_t m = master
    fd = c_open(b"/dev/fuse", O_RDWR | O_CLOEXEC)
    if fd < 0:
        raise _oserr(errno, "/dev/fuse")
    if ioctl(fd, FUSE_DEV_IOC_CLONE, &m) != 0:
        err = errno
        close(fd)
        raise _oserr(err, "FUSE_DEV_IOC_CLONE")
    return fd


def backing_open(int devfd, int fd):
    """Register fd (a regular file, O_PATH is fine) as a passthrough backing
    file; returns its backing id (> 0). Needs CAP_SYS_ADMIN."""
    cdef fuse_backing_map m
    cdef int ret
    memset(&m, 0, sizeof(m))
    m.fd = fd
    with nogil:
        ret = ioctl(devfd, FUSE_DEV_IOC_BACKING_OPEN, &m)
    if ret < 0:
        raise _oserr(errno, "FUSE_DEV_IOC_BACKING_OPEN")
    return ret


def backing_close(int devfd, int backing_id):
    cdef uint32_t bid = backing_id
    cdef int ret
    with nogil:
        ret = ioctl(devfd, FUSE_DEV_IOC_BACKING_CLOSE, &bid)
    if ret < 0:
        raise _oserr(errno, "FUSE_DEV_IOC_BACKING_CLOSE")


def fs_type(path) -> int:
    """statfs(2) f_type of the filesystem holding path."""
    cdef statfs_t st
    p = os.fsencode(path)
    if c_statfs(p, &st) != 0:
        raise _oserr(errno, os.fsdecode(p))
    return st.f_type


# ---------------------------------------------------------------- watchdog

# the watchdog child reads mountinfo into this (no malloc after fork)
cdef char _mountinfo[1 << 20]


cdef bint _mount_is(const char *target, const char *devid) noexcept nogil:
    """Does /proc/self/mountinfo show devid ("MAJ:MIN") on top of target?
    Plain C: runs in a forked child. Paths with escaped characters never
    match (the watchdog then leaves the mount alone)."""
    cdef char *buf = _mountinfo
    cdef ssize_t n, got = 0
    cdef int fd
    cdef char *line
    cdef char *end
    cdef char *f[5]
    cdef char *p
    cdef int i
    cdef bint found = False
    fd = c_open(b"/proc/self/mountinfo", O_RDONLY | O_CLOEXEC)
    if fd < 0:
        return False
    while got < (1 << 20) - 1:
        n = read(fd, buf + got, (1 << 20) - 1 - got)
        if n <= 0:
            break
        got += n
    close(fd)
    buf[got] = 0
    line = buf
    while line[0] != 0:
        end = line
        while end[0] != 0 and end[0] != b'\n':
            end += 1
        # fields: id parent MAJ:MIN root mountpoint ...
        p = line
        for i in range(5):
            f[i] = p
            while p < end and p[0] != b' ':
                p += 1
            if p < end:
                p[0] = 0
                p += 1
        if _streq(f[4], target):
            found = _streq(f[2], devid)     # the last line for target is the top
        if end[0] == 0:
            break
        line = end + 1
    return found


cdef inline bint _streq(const char *a, const char *b) noexcept nogil:
    cdef size_t i = 0
    while a[i] != 0 and a[i] == b[i]:
        i += 1
    return a[i] == b[i]


cdef char _statbuf[4096]


cdef void _retitle(const char *title) noexcept nogil:
    """Overwrite this process's command line (the arg area /proc/PID/stat
    names as fields 48 and 49) with title, so the watchdog child is not
    mistaken for the daemon by pgrep or a test. Plain C, after fork."""
    cdef int fd = c_open(b"/proc/self/stat", O_RDONLY | O_CLOEXEC)
    cdef ssize_t n
    cdef char *p
    cdef int field = 2
    cdef unsigned long start = 0, end = 0, v
    cdef size_t i, tl
    if fd < 0:
        return
    n = read(fd, _statbuf, sizeof(_statbuf) - 1)
    close(fd)
    if n <= 0:
        return
    _statbuf[n] = 0
    p = _statbuf + n - 1
    while p > _statbuf and p[0] != b')':      # comm may hold spaces: skip it
        p -= 1
    p += 1
    while p[0] != 0 and field < 49:
        if p[0] == b' ':
            field += 1
            p += 1
            v = 0
            while p[0] >= c'0' and p[0] <= c'9':
                v = v * 10 + (p[0] - c'0')
                p += 1
            if field == 48:
                start = v
            elif field == 49:
                end = v
        else:
            p += 1
    if start == 0 or end <= start:
        return
    tl = strlen(title)
    for i in range(end - start):
        (<char*>start)[i] = title[i] if i < tl else 0
    cdef const char *comm = "ovl-watchdog"
    prctl(15, <unsigned long>comm, 0, 0, 0)     # PR_SET_NAME


def start_watchdog(bytes target, bytes devid):
    """Fork a child that lazily unmounts target if this process dies without
    saying goodbye (SIGKILL), so no "Transport endpoint is not connected"
    mount stays behind. Returns (pid, fd): write b"x" to fd before a clean
    exit, which lets the child go without touching the mount.

    The child keeps no other fd open (so it holds no layer), gets SIGKILL
    when we die (PR_SET_PDEATHSIG is not used: it fires on the death of the
    forking thread, not the process), and runs only system calls."""
    cdef int rfd, wfd, pid
    cdef char c
    cdef ssize_t n
    cdef const char *t = target
    cdef const char *d = devid
    cdef statfs_t st
    cdef bytes title = b"overlay-watchdog for %s [daemon %d]" % (target, os.getpid())
    cdef const char *ti = title
    major, _, minor = devid.partition(b":")
    # the connection's abort switch (fusectl): with FUSE over io_uring the
    # dead daemon's rings are torn down asynchronously, and a request made
    # meanwhile (our statfs) would wait for them
    cdef bytes abort = b"/sys/fs/fuse/connections/%d/abort" % ((int(major) << 20) | int(minor))
    cdef const char *ab = abort
    cdef int afd
    rfd, wfd = os.pipe()
    os.set_inheritable(rfd, False)
    # (fork and the whole child in one nogil block: the child never takes
    # the GIL back, which another thread of ours may hold at the fork, as a
    # thread making an image layer's tree does: the child would wait for it
    # forever, and the daemon for the child)
    with nogil:
        pid = fork()
        if pid == 0:
            _retitle(ti)
            dup2(rfd, 0)
            syscall(SYS_close_range, 1, <unsigned int>0xffffffff, 0)
            n = -1
            while True:
                n = read(0, &c, 1)
                if n < 0 and errno == EINTR:
                    continue
                break
            if n == 1:
                _exit(0)        # clean exit: the daemon unmounted itself
            if _mount_is(t, d):
                afd = c_open(ab, O_WRONLY | O_CLOEXEC)
                if afd >= 0:
                    write(afd, b"1", 1)
                    close(afd)
            # the daemon is gone: unmount if the dead mount is still ours.
            # A dead connection answers ENOTCONN, or ECONNABORTED (with
            # FUSE_ABORT_ERROR) to a request that was queued before it died.
            if c_statfs(t, &st) != 0 and (errno == 107 or errno == 103) and _mount_is(t, d):
                c_umount2(t, MNT_DETACH)
            _exit(0)
    os.close(rfd)
    if pid < 0:
        os.close(wfd)
        raise OSError(_errno.EAGAIN, "fork failed")
    return pid, wfd


# ---------------------------------------------------------------- stopping

cdef void _wakeup(int sig) noexcept nogil:
    pass


cdef bint _wakeup_installed = False


cdef _install_wakeup():
    global _wakeup_installed
    cdef sigaction_t sa
    if _wakeup_installed:
        return
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = _wakeup
    sa.sa_flags = 0             # no SA_RESTART: a blocked read() returns EINTR
    sigemptyset(&sa.sa_mask)
    if c_sigaction(SIGUSR2, &sa, NULL) != 0:
        raise _oserr(errno, "sigaction")
    _wakeup_installed = True


# ---------------------------------------------------------------- the session

OPCODE_NAMES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK",
    14: "OPEN", 15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC",
    21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH",
    26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR",
    31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT",
    37: "BMAP", 38: "DESTROY", 39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY",
    42: "BATCH_FORGET", 43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK",
    47: "COPY_FILE_RANGE", 48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS",
    51: "TMPFILE", 52: "STATX", 53: "COPY_FILE_RANGE_64",
}


cdef inline bint _no_reply(uint32_t opcode) noexcept nogil:
    return opcode == FUSE_FORGET or opcode == FUSE_BATCH_FORGET or opcode == FUSE_NOTIFY_REPLY


cdef class Session:
    """One FUSE connection: its fds, workers, INIT and replies."""

    def __cinit__(self):
        self.devfd = -1
        self.nworkers = 0
        self.uq = NULL
        self.nqueues = 0
        self.uring_depth = 8
        self.stack_depth = 1
        self.spin_ns = SPIN_NS
        self.turns = 1
        self.rd = NULL
        for i in range(MAX_WORKERS):
            self.wfds[i] = -1
            self.tids[i] = 0

    def __dealloc__(self):
        free(self.rd)

    def __init__(self):
        self._uring_threads = []
        self.uring_error = None
        self._notify_q = queue.SimpleQueue()
        self._threads = []
        self._done = threading.Event()
        self._ready = threading.Event()
        self.init_error = None

    # ------------------------------------------------------------ replies

    cdef int reply_err(self, int fd, uint64_t unique, int err) noexcept nogil:
        """An error reply (err > 0 is an errno); 0 or -errno of the write."""
        cdef fuse_out_header oh
        if fd >= URING_TOKEN:
            return self._uring_reply(fd, unique, err, NULL, 0, NULL, 0)
        oh.len = sizeof(fuse_out_header)
        oh.error = -err
        oh.unique = unique
        if write(fd, &oh, sizeof(oh)) < 0:
            return -errno
        return 0

    cdef int reply(self, int fd, uint64_t unique, const void *data, size_t size) noexcept nogil:
        return self.reply2(fd, unique, data, size, NULL, 0)

    cdef int reply2(self, int fd, uint64_t unique, const void *a, size_t alen,
                    const void *b, size_t blen) noexcept nogil:
        """A success reply of a then b; 0 or -errno of the write."""
        cdef fuse_out_header oh
        cdef iovec iov[3]
        cdef int cnt = 1
        if fd >= URING_TOKEN:
            return self._uring_reply(fd, unique, 0, a, alen, b, blen)
        oh.len = sizeof(fuse_out_header) + alen + blen
        oh.error = 0
        oh.unique = unique
        iov[0].iov_base = &oh
        iov[0].iov_len = sizeof(oh)
        if alen:
            iov[cnt].iov_base = <void*>a
            iov[cnt].iov_len = alen
            cnt += 1
        if blen:
            iov[cnt].iov_base = <void*>b
            iov[cnt].iov_len = blen
            cnt += 1
        if writev(fd, iov, cnt) < 0:
            return -errno
        return 0

    # ------------------------------------------------------------ io_uring

    cdef int _uring_reply(self, int token, uint64_t unique, int err, const void *a, size_t alen,
                          const void *b, size_t blen) noexcept nogil:
        """A reply to a request that came through io_uring: into its entry's
        buffers, and the entry's COMMIT_AND_FETCH queued: the ring's owner
        submits it with its next wait; a thread that gave the ring up for
        long work (hand_off) submits it at once."""
        cdef int qid = (token - URING_TOKEN) >> 16
        cdef int idx = (token - URING_TOKEN) & 0xFFFF
        cdef _Queue *q = &(<_Queue*>self.uq)[qid]
        cdef _Ent *e = &q.ents[idx]
        cdef fuse_out_header *oh = <fuse_out_header*>e.hdr.in_out
        cdef size_t n = alen + blen
        cdef int ret
        cdef uint32_t todo = 0
        if err or n > READ_BUFFER:
            n = 0
            if not err:
                err = EIO
        else:
            if alen:
                memmove(e.payload, a, alen)
            if blen:
                memmove(e.payload + alen, b, blen)
        oh.len = sizeof(fuse_out_header) + n
        oh.error = -err
        oh.unique = unique
        e.hdr.ring_ent_in_out.payload_sz = <uint32_t>n
        pthread_mutex_lock(&q.mu)
        ret = _ent_command(q, idx, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, self.devfd)
        if q.owner != pthread_self():
            todo = q.ring.pending
            q.ring.pending = 0
        pthread_mutex_unlock(&q.mu)
        if todo:
            ovl_uring_enter(q.ring.fd, todo, 0, 0)
        return ret

    def _uring_start(self):
        """Set up a queue a possible CPU and start their threads (from INIT)."""
        cdef int n = possible_cpus()
        cdef int qid, err
        cdef _Queue *qs = <_Queue*>calloc(n, sizeof(_Queue))
        if qs == NULL:
            raise MemoryError()
        self.uq = qs
        self.nqueues = n
        for qid in range(n):
            err = _queue_init(&qs[qid], qid, self.uring_depth)
            if not err:
                err = self._uring_register(&qs[qid])
            if err:
                self.uring_error = f"setting up queue {qid}: {os.strerror(-err)}"
                log.warning("FUSE over io_uring not used (%s); requests through /dev/fuse",
                            self.uring_error)
                self._uring_free()
                return
        self.uring = True
        for qid in range(n):
            self._uring_thread(qid)
        log.info("FUSE over io_uring: %d queues of %d entries", n, self.uring_depth)

    cdef int _uring_register(self, void *qp) except -1:
        """Queue the REGISTER of every entry and the stop poll (submitted by
        the first wait of the queue's thread): 0, or -errno."""
        cdef _Queue *q = <_Queue*>qp
        cdef int i
        cdef ovl_sqe128 *sqe
        for i in range(q.depth):
            if _ent_command(q, i, FUSE_IO_URING_CMD_REGISTER, self.devfd):
                return -16
        sqe = _ring_sqe(&q.ring)
        if sqe == NULL:
            return -16
        sqe.opcode = IORING_OP_POLL_ADD
        sqe.fd = q.evfd
        sqe.op_flags = POLLIN
        sqe.user_data = URING_STOP_TAG
        return 0

    def _uring_thread(self, int qid):
        """Another thread for queue qid (it waits for the ring until the one
        owning it gives it up)."""
        t = threading.Thread(target=self._uring_worker, args=(qid,),
                             name=f"fuse-ring-{qid}", daemon=True)
        self._uring_threads.append(t)
        t.start()

    def _uring_worker(self, int qid):
        cdef bytes name = b"fuse-ring-%d" % qid
        prctl(15, <unsigned long><const char*>name, 0, 0, 0)     # PR_SET_NAME: ps and top show it
        try:
            os.sched_setaffinity(0, {qid})
        except OSError:
            pass        # (a CPU this process may not run on: the queue still serves)
        try:
            self._uring_serve(qid)
        except BaseException:
            log.exception("io_uring queue %d failed", qid)

    def hand_off(self):
        """The calling request starts long work (a big copy-up, fsync, a wait
        for another's copy-up): the thread gives what it reads requests from
        to another, so the next requests do not wait behind it: its turn at
        /dev/fuse (_readers.pxi) or its queue's ring."""
        cdef int qid, k
        cdef bint spawn = False
        cdef _Queue *qs = <_Queue*>self.uq
        cdef unsigned long me = pthread_self()
        cdef _Readers *rd = <_Readers*>self.rd
        cdef long long t
        if qs == NULL:
            for k in range(self.nworkers):
                if self.tids[k] == me:
                    t = ovl_load(&rd.state[k])
                    if t > 1 and ovl_cas(&rd.state[k], t, 0):
                        with nogil:
                            _give_turn(rd)
                    return
            return
        for qid in range(self.nqueues):
            if qs[qid].owner == me:
                pthread_mutex_lock(&qs[qid].mu)
                qs[qid].owner = 0
                if qs[qid].idle:
                    pthread_cond_signal(&qs[qid].cv)
                elif not qs[qid].stop:
                    spawn = True
                pthread_mutex_unlock(&qs[qid].mu)
                if spawn:
                    self._uring_thread(qid)
                return

    cdef _uring_serve(self, int qid):
        """A thread of queue qid: while it owns the ring, take its next
        request and handle it inline; else wait for the ring (_uring_next
        keeps the queue's lock and the GIL apart: never both at once)."""
        cdef _Queue *q = &(<_Queue*>self.uq)[qid]
        cdef int token, what, err = 0, devfd = self.devfd
        cdef uint64_t ud = 0
        cdef int32_t res = 0
        cdef _Ent *e
        cdef fuse_in_header *ih
        cdef fuse_in_header *h
        cdef size_t s, psz, ext, arglen
        cdef char *start
        cdef unsigned long me = pthread_self()
        with nogil:
            pthread_mutex_lock(&q.mu)
            q.threads += 1
            pthread_mutex_unlock(&q.mu)
        try:
            while True:
                with nogil:
                    what = _uring_next(q, me, devfd, &ud, &res, &err)
                if what == NEXT_STOP:
                    break
                if what == NEXT_ENTER_FAILED:
                    self.uring_error = f"io_uring_enter: {os.strerror(err)}"
                    log.error("io_uring queue %d: %s", qid, self.uring_error)
                    break
                if what == NEXT_REFUSED:
                    # a registration the kernel refused: it falls back to
                    # /dev/fuse for the requests (and so do we)
                    self.uring_error = f"entry {ud}: {os.strerror(-res)}"
                    log.warning("FUSE over io_uring queue %d: %s; requests through /dev/fuse",
                                qid, self.uring_error)
                    break
                e = &q.ents[ud]
                ih = <fuse_in_header*>e.hdr.in_out
                e.commit_id = e.hdr.ring_ent_in_out.commit_id
                psz = e.hdr.ring_ent_in_out.payload_sz
                s = _op_in_size(ih.opcode, self.setxattr_ext)
                start = e.payload - s - sizeof(fuse_in_header)
                memcpy(start, ih, sizeof(fuse_in_header))
                if s:
                    memcpy(e.payload - s, e.hdr.op_in, s)
                h = <fuse_in_header*>start
                ext = h.total_extlen * 8
                if ext > psz:
                    ext = 0
                arglen = s + psz - ext
                token = URING_TOKEN + (qid << 16) + <int>ud
                self.uring_served += 1
                if self.debug:
                    log.debug("<= %s unique=%d node=%d queue=%d", OPCODE_NAMES.get(h.opcode, h.opcode),
                              h.unique, h.nodeid, qid)
                try:
                    self.handle(token, h, e.payload - s, arglen)
                except BaseException:
                    log.error("unexpected error in request handler (%s)",
                              OPCODE_NAMES.get(h.opcode, h.opcode), exc_info=True)
                    self.reply_err(token, h.unique, EIO)
        finally:
            with nogil:
                pthread_mutex_lock(&q.mu)
                if q.owner == me:
                    q.owner = 0
                q.threads -= 1
                pthread_cond_broadcast(&q.cv)
                pthread_mutex_unlock(&q.mu)

    def _uring_stop(self):
        """Wake the queues' threads (the owners through their eventfd poll,
        the others on their condition) and wait for them."""
        cdef int qid
        cdef uint64_t one = 1
        cdef _Queue *qs = <_Queue*>self.uq
        if qs == NULL:
            return
        for qid in range(self.nqueues):
            pthread_mutex_lock(&qs[qid].mu)
            qs[qid].stop = True
            pthread_cond_broadcast(&qs[qid].cv)
            pthread_mutex_unlock(&qs[qid].mu)
            if qs[qid].evfd >= 0:
                write(qs[qid].evfd, &one, sizeof(one))
        me = threading.current_thread()
        for t in list(self._uring_threads):
            if t is not me:
                t.join(5)

    def uring_threads(self):
        """The threads serving the queues now (a queue has more than one
        after a request gave its ring up for long work)."""
        return sum(1 for t in self._uring_threads if t.is_alive())

    def _uring_free(self):
        cdef int qid
        cdef _Queue *qs = <_Queue*>self.uq
        if qs == NULL:
            return
        if any(t.is_alive() for t in self._uring_threads):
            return      # (a thread still in the ring: leave the memory to the exit)
        for qid in range(self.nqueues):
            _queue_free(&qs[qid])
        free(qs)
        self.uq = NULL
        self.nqueues = 0
        self.uring = False

    # ------------------------------------------------------------ notifications

    def notify_inval_inode(self, uint64_t nodeid, int64_t off=-1, int64_t length=0,
                           bint now=False):
        """Drop what the kernel caches of nodeid: its attributes, and with
        off >= 0 its pages from off (length 0: to the end).

        now=True writes the notification at once, from the calling thread
        (attributes only: that takes no lock a request could hold, so the
        reply to the request that made the change can follow it); else it
        is queued for the notifier thread."""
        cdef fuse_notify_inval_inode_out o
        cdef fuse_out_header oh
        cdef iovec iov[2]
        cdef ssize_t n
        o.ino = nodeid
        o.off = off
        o.len = length
        if now and off < 0:
            oh.len = sizeof(oh) + sizeof(o)
            oh.error = FUSE_NOTIFY_INVAL_INODE
            oh.unique = 0
            iov[0].iov_base = &oh
            iov[0].iov_len = sizeof(oh)
            iov[1].iov_base = &o
            iov[1].iov_len = sizeof(o)
            with nogil:
                n = writev(self.devfd, iov, 2)
            if n < 0 and errno != ENOENT and errno != ENODEV:
                log.debug("inval_inode(%d) failed: %s", nodeid, os.strerror(errno))
            return
        self._notify_q.put((FUSE_NOTIFY_INVAL_INODE, (<char*>&o)[:sizeof(o)]))

    def notify_inval_entry(self, uint64_t parent, bytes name):
        """Drop the kernel's dentry of name under parent."""
        cdef fuse_notify_inval_entry_out o
        o.parent = parent
        o.namelen = len(name)
        o.flags = 0
        self._notify_q.put((FUSE_NOTIFY_INVAL_ENTRY, (<char*>&o)[:sizeof(o)] + name + b"\0"))

    def _notifier(self):
        cdef fuse_out_header oh
        cdef iovec iov[2]
        cdef bytes body
        cdef ssize_t n
        while True:
            item = self._notify_q.get()
            if item is None:
                return
            code, body = item
            oh.len = sizeof(oh) + len(body)
            oh.error = code
            oh.unique = 0
            iov[0].iov_base = &oh
            iov[0].iov_len = sizeof(oh)
            iov[1].iov_base = PyBytes_AS_STRING(body)
            iov[1].iov_len = PyBytes_GET_SIZE(body)
            with nogil:
                n = writev(self.devfd, iov, 2)
            if n < 0:
                err = errno
                # ENOENT: the kernel no longer knows that inode or entry
                if err == ENODEV:
                    return
                if err != ENOENT:
                    log.debug("notification %d failed: %s", code, os.strerror(err))

    # ------------------------------------------------------------ INIT

    cdef int _init(self, int fd, const fuse_in_header *h, const char *arg,
                   size_t arglen) except -1:
        cdef const fuse_init_in *i = <const fuse_init_in*>arg
        cdef fuse_init_out o
        cdef uint32_t want, want2, flags2 = 0
        memset(&o, 0, sizeof(o))
        o.major = FUSE_KERNEL_VERSION
        o.minor = FUSE_KERNEL_MINOR_VERSION
        if arglen < 16:
            self.init_error = "short INIT request"
            self.reply_err(fd, h.unique, EPROTO)
            self._ready.set()
            return 0
        if i.major != FUSE_KERNEL_VERSION:
            self.init_error = (f"the kernel speaks FUSE protocol {i.major}.{i.minor}; "
                               f"this engine speaks {FUSE_KERNEL_VERSION}.x")
            self.reply_err(fd, h.unique, EPROTO)
            self._ready.set()
            return 0
        if i.minor < FUSE_MIN_MINOR_VERSION:
            self.init_error = (f"the kernel's FUSE protocol 7.{i.minor} is too old: "
                               f"the native engine needs 7.{FUSE_MIN_MINOR_VERSION} "
                               f"(Linux 5.15) or newer (try engine=pyfuse3)")
            self.reply_err(fd, h.unique, EPROTO)
            self._ready.set()
            return 0
        if i.minor < FUSE_KERNEL_MINOR_VERSION:
            o.minor = i.minor
        if i.minor >= 36 and arglen >= sizeof(fuse_init_in) and i.flags & FUSE_INIT_EXT:
            flags2 = i.flags2
        want = (FUSE_ASYNC_READ | FUSE_PARALLEL_DIROPS | FUSE_DO_READDIRPLUS
                | FUSE_MAX_PAGES | FUSE_BIG_WRITES
                | FUSE_CACHE_SYMLINKS | FUSE_ATOMIC_O_TRUNC | FUSE_HANDLE_KILLPRIV_V2
                | FUSE_SETXATTR_EXT | FUSE_POSIX_ACL | FUSE_DONT_MASK | FUSE_ABORT_ERROR)
        # (every READDIR a READDIRPLUS, not READDIRPLUS_AUTO's first buffer
        # of a dir only: a listing and then a stat or open of each entry,
        # as ls -l, du, find's tests, os.walk and tar do, costs no LOOKUP
        # after the first 32 KiB of a dir; measured on 20 dirs of 500
        # files, caches dropped: reading every file 299 -> 216 us a file,
        # du 300 -> 200 ms, find -name (names only) 175 -> 190 ms)
        # (DONT_MASK: the mode of a new object comes unmasked, with the
        # umask beside it: the core applies a default ACL or the umask)
        want2 = 0
        if self.no_acl:
            want &= ~FUSE_POSIX_ACL
        if self.want_uring:
            want2 |= FUSE2_OVER_IO_URING
        if self.want_export:
            want |= FUSE_EXPORT_SUPPORT
        else:
            # as the kernel overlay without nfs_export: no file handles
            # (name_to_handle_at gives EOPNOTSUPP; fanotify's FIDs stay)
            want2 |= FUSE2_NO_EXPORT_SUPPORT
        if self.want_writeback:
            want |= FUSE_WRITEBACK_CACHE
        elif self.want_passthrough:
            want2 |= FUSE2_PASSTHROUGH
        if flags2:
            want |= FUSE_INIT_EXT
        o.flags = want & i.flags
        if o.flags & FUSE_INIT_EXT:
            o.flags |= FUSE_INIT_EXT
            o.flags2 = want2 & flags2
        o.max_readahead = i.max_readahead
        o.max_background = 64
        o.congestion_threshold = 48
        o.max_write = MAX_WRITE
        o.time_gran = 1
        o.max_pages = MAX_WRITE // 4096
        if o.flags2 & FUSE2_PASSTHROUGH:
            o.max_stack_depth = self.stack_depth
        self.proto_minor = o.minor
        self.max_write = MAX_WRITE if o.flags & FUSE_MAX_PAGES else 32 * 4096
        o.max_write = self.max_write
        self.passthrough = bool(o.flags2 & FUSE2_PASSTHROUGH)
        self.writeback_cache = bool(o.flags & FUSE_WRITEBACK_CACHE)
        self.expire_only = bool(flags2 & FUSE2_HAS_EXPIRE_ONLY)
        self.setxattr_ext = bool(o.flags & FUSE_SETXATTR_EXT)
        log.debug("INIT: kernel 7.%d flags %#x flags2 %#x -> 7.%d flags %#x flags2 %#x",
                  i.minor, i.flags, flags2, o.minor, o.flags, o.flags2)
        self.initialized = True
        self.reply(fd, h.unique, &o, sizeof(o))
        if o.flags2 & FUSE2_OVER_IO_URING:
            # (after the reply: the kernel takes ring entries only once
            # the connection is initialized)
            self._uring_start()
        elif self.want_uring:
            log.info("FUSE over io_uring: not offered by the kernel; requests through /dev/fuse")
        self._ready.set()
        return 0

    # ------------------------------------------------------------ the loop

    cdef int handle(self, int fd, fuse_in_header *h, char *arg,
                    size_t arglen) except -1:
        """Answer one request (the bridge overrides this)."""
        if not _no_reply(h.opcode):
            self.reply_err(fd, h.unique, ENOSYS)
        return 0

    cdef _serve(self, int index):
        cdef int fd = self.wfds[index]
        cdef char *buf = <char*>malloc(READ_BUFFER)
        cdef ssize_t n
        cdef int err
        cdef fuse_in_header *h
        cdef size_t arglen, ext
        cdef _Readers *rd = <_Readers*>self.rd
        cdef int64_t spin_ns
        cdef long long since
        cdef bint nonblock = False, ok
        if buf == NULL:
            raise MemoryError()
        self.tids[index] = pthread_self()
        try:
            while not self.stopping:
                if rd.state[index] == 0:
                    with nogil:
                        ok = _take_turn(rd, index, self.nworkers)
                    if not ok:
                        break
                # (with io_uring only INIT, FORGET and INTERRUPT come here)
                spin_ns = 0 if self.uring else self.spin_ns
                with nogil:
                    n = _read_turn(rd, fd, buf, spin_ns, &nonblock)
                    err = errno
                if n < 0:
                    if err == EINTR or err == EAGAIN or err == ENOENT:
                        continue
                    if err != ENODEV:
                        log.error("reading /dev/fuse: %s", os.strerror(err))
                    break
                if n < <ssize_t>sizeof(fuse_in_header):
                    log.error("short request (%d bytes) ignored", n)
                    continue
                h = <fuse_in_header*>buf
                if h.len != <uint32_t>n:
                    log.error("request length %d differs from the read (%d)", h.len, n)
                    continue
                ext = h.total_extlen * 8
                if ext > n - sizeof(fuse_in_header):
                    ext = 0
                arglen = n - sizeof(fuse_in_header) - ext
                if self.debug:
                    log.debug("<- %s unique=%d node=%d len=%d", OPCODE_NAMES.get(h.opcode, h.opcode),
                              h.unique, h.nodeid, h.len)
                since = _now_ns()
                ovl_store(&rd.state[index], since)
                try:
                    if h.opcode == FUSE_INIT:
                        self._init(fd, h, buf + sizeof(fuse_in_header), arglen)
                    elif h.opcode == FUSE_DESTROY:
                        self.reply_err(fd, h.unique, 0)
                    else:
                        self.handle(fd, h, buf + sizeof(fuse_in_header), arglen)
                except BaseException:
                    log.error("unexpected error in request handler (%s)",
                              OPCODE_NAMES.get(h.opcode, h.opcode), exc_info=True)
                    if not _no_reply(h.opcode):
                        self.reply_err(fd, h.unique, EIO)
                # the turn is kept unless given away meanwhile (then 0)
                ovl_cas(&rd.state[index], since, 1)
        finally:
            free(buf)
            self.tids[index] = 0
            if ovl_load(&rd.state[index]) != 0:
                ovl_store(&rd.state[index], 0)
                _give_turn(rd)
            _readers_close(rd)
            self._done.set()

    def _worker(self, int index):
        try:
            self._serve(index)
        except BaseException:
            log.exception("worker %d failed", index)
            self._done.set()

    def start(self, int devfd, int nworkers):
        """Serve the connection on devfd with nworkers threads."""
        if not 1 <= nworkers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1 to {MAX_WORKERS}")
        _install_wakeup()
        if self.rd == NULL:
            self.rd = calloc(1, sizeof(_Readers))
            if self.rd == NULL:
                raise MemoryError()
        _readers_init(<_Readers*>self.rd, self.turns)
        self.devfd = devfd
        self.wfds[0] = devfd
        for k in range(1, nworkers):
            self.wfds[k] = dev_clone(devfd)
        self.nworkers = nworkers
        t = threading.Thread(target=self._notifier, name="fuse-notify", daemon=True)
        t.start()
        self._notify_thread = t
        for k in range(nworkers):
            t = threading.Thread(target=self._worker, args=(k,), name=f"fuse-{k}", daemon=True)
            self._threads.append(t)
            t.start()

    def wait_init(self, timeout):
        """Wait for INIT to be answered; True once it has been."""
        return self._ready.wait(timeout)

    def wait(self, timeout=None):
        """Wait until a worker saw the end of the connection (or stop())."""
        return self._done.wait(timeout)

    def stop(self):
        """Make every worker return (a signal wakes those blocked in read)."""
        self.stopping = True
        self._done.set()
        if self.rd != NULL:
            _readers_close(<_Readers*>self.rd)
        self._uring_stop()
        cdef int k
        me = threading.current_thread()
        for _ in range(200):
            alive = [t for t in self._threads if t.is_alive() and t is not me]
            if not alive:
                break
            for k in range(self.nworkers):
                if self.tids[k]:
                    pthread_kill(self.tids[k], SIGUSR2)
            for t in alive:
                t.join(0.01)
        self._notify_q.put(None)

    def close(self):
        """Close the fds (after stop()): the kernel ends the connection."""
        cdef int k
        self._uring_free()
        for k in range(self.nworkers):
            if self.wfds[k] >= 0:
                close(self.wfds[k])
                self.wfds[k] = -1
        self.devfd = -1


cdef class PlainSession(Session):
    """A Session whose requests are answered in Python, for a small
    filesystem where speed does not matter (overlay.engine.plain):
    on_request(opcode, nodeid, uid, gid, pid, arg) gives the reply's
    payload (bytes), an errno (int; 0: success without payload) or None
    (no reply: FORGET and its kind)."""

    cdef public object on_request

    cdef int handle(self, int fd, fuse_in_header *h, char *arg,
                    size_t arglen) except -1:
        cdef bytes payload
        r = self.on_request(h.opcode, h.nodeid, h.uid, h.gid, h.pid, arg[:arglen])
        if _no_reply(h.opcode) or r is None:
            return 0
        if isinstance(r, int):
            self.reply_err(fd, h.unique, r)
            return 0
        payload = r
        self.reply(fd, h.unique, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        return 0
