"""Part of overlay.engine.wire (included by wire.pyx): FUSE over io_uring.

With FUSE_OVER_IO_URING granted at INIT (the kernel offers it when root has
written Y to /sys/module/fuse/parameters/enable_uring), the kernel hands a
request to a ring of the CPU its caller runs on, instead of queueing it for
a read() of /dev/fuse. Here: one queue per possible CPU (the kernel uses the
ring only once every queue has an entry), each an io_uring of its own
served by a thread pinned to that CPU. A queue has `depth` entries: a header
buffer and a payload buffer each, registered with the kernel by a
FUSE_IO_URING_CMD_REGISTER command (IORING_OP_URING_CMD, 128-byte SQEs);
the command completes when a request is in the buffers. The thread handles
it inline (Session.handle, as a /dev/fuse worker does) and gives the reply
back in the same buffers with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which
also waits for the entry's next request; the replies of a batch go to the
kernel in one io_uring_enter, which waits for the next completions.

A request's first argument (its struct) comes in the header's op_in, the
rest (names, data) in the payload; the handlers want them one after the
other, after a fuse_in_header: the entry's payload buffer has room before
it, where the header and the struct are copied. Replies: the reply writers
(reply, reply2, reply_err) take, instead of a /dev/fuse fd, a token
(URING_TOKEN + queue << 16 + entry) and write into the entry.

FORGETs, INTERRUPTs and NOTIFY_REPLYs still come through /dev/fuse, as do
the requests made before the ring is complete: the /dev/fuse workers stay.
Notifications are written to /dev/fuse as before.

The structs and system calls are declared here (as the FUSE ABI is in
abi.pxd): no liburing.
"""

cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/syscall.h>
    #include <sys/mman.h>
    #ifndef __NR_io_uring_setup
    #define __NR_io_uring_setup 425
    #endif
    #ifndef __NR_io_uring_enter
    #define __NR_io_uring_enter 426
    #endif
    struct ovl_sq_offsets { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
                            uint64_t resv2; };
    struct ovl_cq_offsets { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
                            uint64_t resv2; };
    struct ovl_uring_params { uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle,
                              features, wq_fd, resv[3];
                              struct ovl_sq_offsets sq_off; struct ovl_cq_offsets cq_off; };
    /* a 128-byte SQE (IORING_SETUP_SQE128) as IORING_OP_URING_CMD reads it */
    struct ovl_sqe128 { uint8_t opcode, flags; uint16_t ioprio; int32_t fd;
                        uint32_t cmd_op, pad1; uint64_t addr; uint32_t len, op_flags;
                        uint64_t user_data; uint16_t buf_index, personality; uint32_t file_index;
                        uint8_t cmd[80]; };
    struct ovl_cqe { uint64_t user_data; int32_t res; uint32_t flags; };
    static inline uint32_t ovl_load_acquire(const uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void ovl_store_release(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline long ovl_uring_setup(unsigned entries, struct ovl_uring_params *p) {
        return syscall(__NR_io_uring_setup, entries, p); }
    static inline long ovl_uring_enter(int fd, unsigned to_submit, unsigned min_complete,
                                       unsigned flags) {
        return syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0); }
    """
    struct ovl_sq_offsets:
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array
    struct ovl_cq_offsets:
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags
    struct ovl_uring_params:
        uint32_t sq_entries, cq_entries, flags, features
        ovl_sq_offsets sq_off
        ovl_cq_offsets cq_off
    struct ovl_sqe128:
        uint8_t opcode, flags
        uint16_t ioprio
        int32_t fd
        uint32_t cmd_op, pad1
        uint64_t addr
        uint32_t len, op_flags
        uint64_t user_data
        uint8_t cmd[80]
    struct ovl_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags
    uint32_t ovl_load_acquire(const uint32_t *p) noexcept nogil
    void ovl_store_release(uint32_t *p, uint32_t v) noexcept nogil
    long ovl_uring_setup(unsigned entries, ovl_uring_params *p) noexcept nogil
    long ovl_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) noexcept nogil

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_POPULATE
    void *MAP_FAILED

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "<string.h>" nogil:
    void *memmove(void *dest, const void *src, size_t n)

DEF IORING_SETUP_CQSIZE = 1 << 3
DEF IORING_SETUP_SUBMIT_ALL = 1 << 7
DEF IORING_SETUP_SQE128 = 1 << 10
DEF IORING_FEAT_SINGLE_MMAP = 1 << 0
DEF IORING_ENTER_GETEVENTS = 1 << 0
DEF IORING_OP_POLL_ADD = 6
DEF IORING_OP_URING_CMD = 46
DEF IORING_OFF_SQ_RING = 0
DEF IORING_OFF_CQ_RING = 0x8000000
DEF IORING_OFF_SQES = 0x10000000
DEF POLLIN = 1
# the header buffer: fuse_uring_req_header (288 bytes) in a page of its own
DEF URING_HEADER_SZ = 4096
# room before an entry's payload for the fuse_in_header and the op's struct
DEF URING_SLACK = 4096
# the user_data of the eventfd poll that wakes a queue's thread to stop
cdef extern from *:
    """
    #define OVL_URING_STOP_TAG ((uint64_t)-1)
    """
    const uint64_t URING_STOP_TAG "OVL_URING_STOP_TAG"


cdef struct _Ring:
    int fd
    char *sq_ptr
    size_t sq_len
    char *cq_ptr
    size_t cq_len
    ovl_sqe128 *sqes
    size_t sqes_len
    uint32_t *sq_head
    uint32_t *sq_tail
    uint32_t sq_mask
    uint32_t *sq_array
    uint32_t *cq_head
    uint32_t *cq_tail
    uint32_t cq_mask
    ovl_cqe *cqes
    uint32_t sq_entries
    uint32_t pending            # SQEs filled since the last io_uring_enter


cdef struct _Ent:
    fuse_uring_req_header *hdr  # the registered header buffer
    char *region                # allocation: URING_SLACK bytes, then the payload
    char *payload               # the registered payload buffer (READ_BUFFER bytes)
    iovec iov[2]
    uint64_t commit_id          # the request the entry holds
    uint32_t last_cmd           # the command to resubmit after EAGAIN


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_destroy(pthread_cond_t *c)


cdef struct _Queue:
    _Ring ring
    int qid
    int depth
    int evfd
    _Ent *ents
    # the threads of a queue: one owns the ring (waits in io_uring_enter,
    # takes the next completion, handles it inline); a handler that starts
    # long work gives the ring up to another (Session.hand_off), so the
    # queue's other requests go on; the others wait on cv
    pthread_mutex_t mu          # the SQ, pending, owner, idle
    pthread_cond_t cv
    unsigned long owner         # pthread_t of the thread owning the ring, or 0
    int idle                    # threads waiting on cv for the ring
    int threads                 # threads serving the queue
    bint stop
    bint inited


cdef int _ring_init(_Ring *r, unsigned entries) noexcept nogil:
    """Set up an io_uring with 128-byte SQEs: 0, or -errno."""
    cdef ovl_uring_params p
    cdef long fd
    memset(r, 0, sizeof(_Ring))
    r.fd = -1
    memset(&p, 0, sizeof(p))
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL
    p.cq_entries = entries * 2
    fd = ovl_uring_setup(entries, &p)
    if fd < 0:
        return -errno
    r.fd = <int>fd
    r.sq_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t)
    r.cq_len = p.cq_off.cqes + p.cq_entries * sizeof(ovl_cqe)
    if p.features & IORING_FEAT_SINGLE_MMAP:
        if r.cq_len > r.sq_len:
            r.sq_len = r.cq_len
        r.cq_len = r.sq_len
    r.sq_ptr = <char*>mmap(NULL, r.sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                           r.fd, IORING_OFF_SQ_RING)
    if <void*>r.sq_ptr == MAP_FAILED:
        r.sq_ptr = NULL
        return -errno
    if p.features & IORING_FEAT_SINGLE_MMAP:
        r.cq_ptr = r.sq_ptr
    else:
        r.cq_ptr = <char*>mmap(NULL, r.cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                               r.fd, IORING_OFF_CQ_RING)
        if <void*>r.cq_ptr == MAP_FAILED:
            r.cq_ptr = NULL
            return -errno
    r.sqes_len = p.sq_entries * sizeof(ovl_sqe128)
    r.sqes = <ovl_sqe128*>mmap(NULL, r.sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                               r.fd, IORING_OFF_SQES)
    if <void*>r.sqes == MAP_FAILED:
        r.sqes = NULL
        return -errno
    r.sq_head = <uint32_t*>(r.sq_ptr + p.sq_off.head)
    r.sq_tail = <uint32_t*>(r.sq_ptr + p.sq_off.tail)
    r.sq_mask = (<uint32_t*>(r.sq_ptr + p.sq_off.ring_mask))[0]
    r.sq_array = <uint32_t*>(r.sq_ptr + p.sq_off.array)
    r.cq_head = <uint32_t*>(r.cq_ptr + p.cq_off.head)
    r.cq_tail = <uint32_t*>(r.cq_ptr + p.cq_off.tail)
    r.cq_mask = (<uint32_t*>(r.cq_ptr + p.cq_off.ring_mask))[0]
    r.cqes = <ovl_cqe*>(r.cq_ptr + p.cq_off.cqes)
    r.sq_entries = p.sq_entries
    return 0


cdef void _ring_free(_Ring *r) noexcept nogil:
    if r.sqes != NULL:
        munmap(r.sqes, r.sqes_len)
    if r.cq_ptr != NULL and r.cq_ptr != r.sq_ptr:
        munmap(r.cq_ptr, r.cq_len)
    if r.sq_ptr != NULL:
        munmap(r.sq_ptr, r.sq_len)
    if r.fd >= 0:
        close(r.fd)
    memset(r, 0, sizeof(_Ring))
    r.fd = -1


cdef ovl_sqe128 *_ring_sqe(_Ring *r) noexcept nogil:
    """The next free SQE (zeroed), or NULL when the ring is full; it goes
    to the kernel at the next _ring_enter."""
    cdef uint32_t tail = r.sq_tail[0]
    cdef uint32_t idx
    cdef ovl_sqe128 *sqe
    if tail - ovl_load_acquire(r.sq_head) >= r.sq_entries:
        return NULL
    idx = tail & r.sq_mask
    sqe = &r.sqes[idx]
    memset(sqe, 0, sizeof(ovl_sqe128))
    r.sq_array[idx] = idx
    ovl_store_release(r.sq_tail, tail + 1)
    r.pending += 1
    return sqe


cdef int _ent_command(_Queue *q, int idx, uint32_t cmd_op, int devfd) noexcept nogil:
    """Queue the entry's REGISTER (its buffers) or COMMIT_AND_FETCH (its
    reply, and the wait for its next request): 0, or -EBUSY (no SQE)."""
    cdef _Ent *e = &q.ents[idx]
    cdef ovl_sqe128 *sqe = _ring_sqe(&q.ring)
    cdef fuse_uring_cmd_req *cmd
    if sqe == NULL:
        return -16
    sqe.opcode = IORING_OP_URING_CMD
    sqe.fd = devfd
    sqe.cmd_op = cmd_op
    sqe.user_data = <uint64_t>idx
    cmd = <fuse_uring_cmd_req*>sqe.cmd
    cmd.qid = <uint16_t>q.qid
    if cmd_op == FUSE_IO_URING_CMD_REGISTER:
        sqe.addr = <uint64_t><size_t>e.iov
        sqe.len = 2
    else:
        cmd.commit_id = e.commit_id
    e.last_cmd = cmd_op
    return 0


cdef int _queue_init(_Queue *q, int qid, int depth) noexcept nogil:
    """The ring and the entries' buffers of queue qid: 0, or -errno."""
    cdef int i, err
    cdef void *p
    cdef _Ent *e
    memset(q, 0, sizeof(_Queue))
    q.qid = qid
    q.depth = depth
    q.evfd = -1
    q.ring.fd = -1
    pthread_mutex_init(&q.mu, NULL)
    pthread_cond_init(&q.cv, NULL)
    q.inited = True
    err = _ring_init(&q.ring, depth + 1)        # (+1: the stop poll)
    if err:
        return err
    q.evfd = eventfd(0, EFD_CLOEXEC)
    if q.evfd < 0:
        return -errno
    q.ents = <_Ent*>calloc(depth, sizeof(_Ent))
    if q.ents == NULL:
        return -12
    for i in range(depth):
        e = &q.ents[i]
        p = NULL
        if posix_memalign(&p, 4096, URING_HEADER_SZ) != 0:
            return -12
        memset(p, 0, URING_HEADER_SZ)
        e.hdr = <fuse_uring_req_header*>p
        p = NULL
        if posix_memalign(&p, 4096, URING_SLACK + READ_BUFFER) != 0:
            return -12
        e.region = <char*>p
        e.payload = e.region + URING_SLACK
        e.iov[0].iov_base = e.hdr
        e.iov[0].iov_len = URING_HEADER_SZ
        e.iov[1].iov_base = e.payload
        e.iov[1].iov_len = READ_BUFFER
    return 0


cdef void _queue_free(_Queue *q) noexcept nogil:
    cdef int i
    if q.inited:
        pthread_mutex_destroy(&q.mu)
        pthread_cond_destroy(&q.cv)
        q.inited = False
    _ring_free(&q.ring)
    if q.evfd >= 0:
        close(q.evfd)
        q.evfd = -1
    if q.ents != NULL:
        for i in range(q.depth):
            free(q.ents[i].hdr)
            free(q.ents[i].region)
        free(q.ents)
        q.ents = NULL


cdef size_t _op_in_size(uint32_t opcode, bint setxattr_ext) noexcept nogil:
    """The size of the struct an opcode's request starts with, which the
    kernel puts in the header's op_in (0: the request has none; its first
    argument is a name, in the payload)."""
    if opcode == FUSE_GETATTR:
        return sizeof(fuse_getattr_in)
    if opcode == FUSE_SETATTR:
        return sizeof(fuse_setattr_in)
    if opcode == FUSE_MKNOD:
        return sizeof(fuse_mknod_in)
    if opcode == FUSE_MKDIR:
        return sizeof(fuse_mkdir_in)
    if opcode == FUSE_RENAME:
        return sizeof(fuse_rename_in)
    if opcode == FUSE_RENAME2:
        return sizeof(fuse_rename2_in)
    if opcode == FUSE_LINK:
        return sizeof(fuse_link_in)
    if opcode == FUSE_OPEN or opcode == FUSE_OPENDIR:
        return sizeof(fuse_open_in)
    if opcode == FUSE_READ or opcode == FUSE_READDIR or opcode == FUSE_READDIRPLUS:
        return sizeof(fuse_read_in)
    if opcode == FUSE_WRITE:
        return sizeof(fuse_write_in)
    if opcode == FUSE_RELEASE or opcode == FUSE_RELEASEDIR:
        return sizeof(fuse_release_in)
    if opcode == FUSE_FSYNC or opcode == FUSE_FSYNCDIR:
        return sizeof(fuse_fsync_in)
    if opcode == FUSE_SETXATTR:
        return sizeof(fuse_setxattr_in) if setxattr_ext else 8
    if opcode == FUSE_GETXATTR or opcode == FUSE_LISTXATTR:
        return sizeof(fuse_getxattr_in)
    if opcode == FUSE_FLUSH:
        return sizeof(fuse_flush_in)
    if opcode == FUSE_GETLK or opcode == FUSE_SETLK or opcode == FUSE_SETLKW:
        return sizeof(fuse_lk_in)
    if opcode == FUSE_ACCESS:
        return sizeof(fuse_access_in)
    if opcode == FUSE_CREATE or opcode == FUSE_TMPFILE:
        return sizeof(fuse_create_in)
    if opcode == FUSE_FALLOCATE:
        return sizeof(fuse_fallocate_in)
    if opcode == FUSE_LSEEK:
        return sizeof(fuse_lseek_in)
    if opcode == FUSE_COPY_FILE_RANGE or opcode == FUSE_COPY_FILE_RANGE_64:
        return sizeof(fuse_copy_file_range_in)
    if opcode == FUSE_SYNCFS:
        return sizeof(fuse_syncfs_in)
    if opcode == FUSE_STATX:
        return sizeof(fuse_statx_in)
    if opcode == FUSE_IOCTL:
        return 32           # fuse_ioctl_in
    if opcode == FUSE_POLL:
        return 24           # fuse_poll_in
    if opcode == FUSE_BMAP:
        return 16           # fuse_bmap_in
    return 0                # LOOKUP, UNLINK, RMDIR, SYMLINK, REMOVEXATTR, READLINK, STATFS...


def possible_cpus():
    """How many CPUs the kernel may ever run (its queues are these)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    top = 0
    for part in spec.split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


def uring_enabled():
    """Is FUSE over io_uring switched on (the fuse module's enable_uring)?
    None where this kernel has no such parameter (no CONFIG_FUSE_IO_URING)."""
    try:
        with open("/sys/module/fuse/parameters/enable_uring") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return None


def enable_uring():
    """Switch FUSE over io_uring on (root): True if it is on now."""
    try:
        with open("/sys/module/fuse/parameters/enable_uring", "w") as f:
            f.write("Y")
    except OSError as e:
        log.debug("enable_uring not set: %s", e)
        return False
    return bool(uring_enabled())


# what _uring_next found
cdef enum:
    NEXT_REQUEST = 0        # a request in entry *ud
    NEXT_STOP = 1           # the queue stops (stop(), unmounted, aborted)
    NEXT_ENTER_FAILED = 2   # io_uring_enter failed with *err
    NEXT_REFUSED = 3        # the kernel refused entry *ud's command with *res


cdef int _uring_next(_Queue *q, unsigned long me, int devfd, uint64_t *ud, int32_t *res,
                     int *err) noexcept nogil:
    """For a thread of q: wait for the ring (another thread owns it) or take
    it, then take its next completion, waiting in io_uring_enter (which
    first submits the replies queued meanwhile) when there is none. Plain
    C, without the GIL: the queue's lock is never held with the GIL."""
    cdef _Ring *r = &q.ring
    cdef uint32_t head, todo
    cdef long got
    cdef int e
    cdef ovl_cqe *cqe
    pthread_mutex_lock(&q.mu)
    while True:
        if q.stop:
            pthread_mutex_unlock(&q.mu)
            return NEXT_STOP
        if q.owner != me:
            if q.owner == 0:
                q.owner = me
            else:
                q.idle += 1
                pthread_cond_wait(&q.cv, &q.mu)
                q.idle -= 1
                continue
        head = r.cq_head[0]
        if head == ovl_load_acquire(r.cq_tail):
            todo = r.pending
            r.pending = 0
            pthread_mutex_unlock(&q.mu)
            got = ovl_uring_enter(r.fd, todo, 1, IORING_ENTER_GETEVENTS)
            e = errno
            pthread_mutex_lock(&q.mu)
            if got < 0 and e != EINTR and e != EAGAIN and e != 16:     # (16: EBUSY)
                q.stop = True
                pthread_cond_broadcast(&q.cv)
                pthread_mutex_unlock(&q.mu)
                err[0] = e
                return NEXT_ENTER_FAILED
            if got < 0:
                r.pending += todo
            elif <uint32_t>got < todo:
                r.pending += todo - <uint32_t>got      # (submitted with the next)
            continue
        cqe = &r.cqes[head & r.cq_mask]
        ud[0] = cqe.user_data
        res[0] = cqe.res
        ovl_store_release(r.cq_head, head + 1)
        if ud[0] == URING_STOP_TAG:
            q.stop = True
            pthread_cond_broadcast(&q.cv)
            pthread_mutex_unlock(&q.mu)
            return NEXT_STOP
        if res[0] == -EINTR or res[0] == -EAGAIN:
            _ent_command(q, <int>ud[0], q.ents[ud[0]].last_cmd, devfd)
            continue
        if res[0] != 0:
            q.stop = True
            pthread_cond_broadcast(&q.cv)
            pthread_mutex_unlock(&q.mu)
            # (unmounted, aborted or cancelled: the end; else a refusal)
            if res[0] == -ENOTCONN or res[0] == -103 or res[0] == -ENODEV or res[0] == -125:
                return NEXT_STOP
            return NEXT_REFUSED
        pthread_mutex_unlock(&q.mu)
        return NEXT_REQUEST
