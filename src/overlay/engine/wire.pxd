# cython: language_level=3
"""Declarations of overlay.engine.wire (see wire.pyx): the Session that
owns the /dev/fuse fds, the worker threads and the reply writers. The
bridge (bridge.pyx) subclasses Session and implements handle()."""

from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t
from overlay.engine.abi cimport fuse_in_header

cdef enum:
    MAX_WORKERS = 64
    # the "fd" a handler answers on when its request came through io_uring:
    # URING_TOKEN + (queue << 16) + entry (see _uring.pxi)
    URING_TOKEN = 1 << 28
    # the biggest WRITE payload we accept (and so READ size we announce)
    MAX_WRITE = 1 << 20
    # a read buffer holds one whole request: header + fuse_write_in + data
    READ_BUFFER = MAX_WRITE + 8192


cdef class Session:
    cdef readonly int devfd             # the /dev/fuse fd the mount was made with
    cdef int wfds[MAX_WORKERS]          # fd each worker reads (devfd, then clones)
    cdef unsigned long tids[MAX_WORKERS]  # pthread_t of each running worker, or 0
    cdef readonly int nworkers
    cdef public int64_t spin_ns         # the reader polls this long before it sleeps (_readers.pxi)
    cdef public int turns               # workers reading /dev/fuse at once
    cdef void *rd                       # _Readers: whose turn it is to read
    cdef readonly uint32_t proto_minor  # negotiated protocol minor, 0 before INIT
    cdef readonly uint32_t max_write
    cdef readonly bint initialized
    cdef readonly bint passthrough      # the kernel granted FUSE_PASSTHROUGH
    cdef readonly bint writeback_cache  # the kernel granted FUSE_WRITEBACK_CACHE
    cdef readonly bint expire_only      # inval_entry may carry FUSE_EXPIRE_ONLY
    cdef readonly bint setxattr_ext     # fuse_setxattr_in is the 16-byte form
    cdef public bint want_passthrough
    cdef public bint want_writeback
    cdef public bint want_export        # FUSE_EXPORT_SUPPORT: LOOKUP of "." and ".."
    cdef public bint no_acl             # do not ask for POSIX ACLs (noacl)
    cdef public int stack_depth         # max_stack_depth for passthrough (1 or 2)
    cdef public bint debug
    cdef readonly bint stopping
    cdef readonly object init_error     # why INIT was refused, or None
    cdef object _notify_q               # (code, bytes) for the notifier thread
    cdef object _threads
    cdef object _notify_thread
    cdef object _done                   # threading.Event: a worker saw the end
    cdef object _ready                  # threading.Event: INIT answered
    # FUSE over io_uring (_uring.pxi)
    cdef public bint want_uring         # ask for FUSE_OVER_IO_URING at INIT
    cdef public int uring_depth         # entries per queue
    cdef readonly bint uring            # the kernel granted it: the queues run
    cdef readonly int nqueues           # one a possible CPU
    cdef void *uq                       # _Queue[nqueues]
    cdef object _uring_threads
    cdef readonly object uring_error    # why the queues stopped early, or None
    cdef readonly uint64_t uring_served # requests answered through the rings

    cdef int _uring_reply(self, int token, uint64_t unique, int err, const void *a, size_t alen,
                          const void *b, size_t blen) noexcept nogil
    cdef _uring_serve(self, int qid)
    cdef int _uring_register(self, void *q) except -1
    cdef int reply_err(self, int fd, uint64_t unique, int err) noexcept nogil
    cdef int reply(self, int fd, uint64_t unique, const void *data, size_t size) noexcept nogil
    cdef int reply2(self, int fd, uint64_t unique, const void *a, size_t alen,
                    const void *b, size_t blen) noexcept nogil
    # h is the start of the worker's READ_BUFFER-byte buffer: once the
    # arguments are read, it may be overwritten to build the reply
    cdef int handle(self, int fd, fuse_in_header *h, char *arg,
                    size_t arglen) except -1
    cdef int _init(self, int fd, const fuse_in_header *h, const char *arg,
                   size_t arglen) except -1
    cdef _serve(self, int index)
