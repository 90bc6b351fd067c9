# Taking turns at /dev/fuse (included by wire.pyx).
#
# On a virtual machine most of what a request costs is waking a sleeping
# thread on another vCPU. So the workers do not all sleep in read(2): one
# at a time holds the turn to read. After answering a request it polls
# the (non-blocking) fd for SPIN_NS before it sleeps, so the next request
# of a caller doing one operation after another is taken on a CPU that is
# still awake; and the other workers wait on a condition variable, where
# the kernel's wake-up of a reader cannot reach them (a blocked read would
# be woken for every request and find it taken).
#
# Concurrency is kept two ways:
# - a handler that starts long work (a big copy-up, fsync: Session.hand_off)
#   gives its turn up at once, and a standby reads on;
# - one standby, the watcher, wakes when the request being handled has
#   taken STEAL_NS (a slow disk, a lookup in a big dir): it takes the turn
#   over, and the slow request's worker queues for a turn when it is done.
#   The watcher sleeps without a timeout while the reader sleeps in read:
#   the reader wakes it when a request arrives.
#
# state[w] of worker w: 0 it has no turn; 1 it has the turn and is reading;
# T > 1 it has the turn and is handling a request since T (CLOCK_MONOTONIC
# ns). A turn changes hands only by compare-and-swap on state: the handler
# finishing (T -> 1), the watcher stealing (T -> 0) and hand_off (T -> 0).

cdef extern from *:
    """
    static inline int ovl_cas(long long *p, long long expect, long long val) {
        return __atomic_compare_exchange_n(p, &expect, val, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline long long ovl_load(long long *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void ovl_store(long long *p, long long v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int ovl_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void ovl_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void ovl_set_errno(int e) { errno = e; }
    """
    bint ovl_cas(long long *p, long long expect, long long val) nogil
    long long ovl_load(long long *p) nogil
    void ovl_store(long long *p, long long v) nogil
    int ovl_load_int(int *p) nogil
    void ovl_store_int(int *p, int v) nogil
    void ovl_set_errno(int e) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_condattr_init(pthread_condattr_t *a)
    int pthread_condattr_setclock(pthread_condattr_t *a, int clk)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *ts)

cdef enum:
    SPIN_NS = 50000         # the reader polls this long after a request before it sleeps
    STEAL_NS = 2000000      # a request handled this long lets a standby read on


cdef struct _Readers:
    pthread_mutex_t mu
    pthread_cond_t cv           # standbys wait here for a free turn
    pthread_cond_t wcv          # the watcher waits here
    int max                     # turns (workers reading at once)
    int active                  # turns held
    int watcher                 # a standby is the watcher
    int watcher_idle            # ... and sleeps without a timeout
    int blocked                 # the reader sleeps in read(2)
    int closed                  # the session ends: standbys return
    long long state[MAX_WORKERS]


cdef int _readers_init(_Readers *r, int turns) noexcept nogil:
    cdef pthread_condattr_t ca
    memset(r, 0, sizeof(_Readers))
    pthread_condattr_init(&ca)
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC)
    pthread_mutex_init(&r.mu, NULL)
    pthread_cond_init(&r.cv, &ca)
    pthread_cond_init(&r.wcv, &ca)
    r.max = turns
    return 0


cdef void _readers_close(_Readers *r) noexcept nogil:
    """The session ends: every standby returns from _take_turn."""
    pthread_mutex_lock(&r.mu)
    r.closed = 1
    pthread_cond_broadcast(&r.cv)
    pthread_cond_broadcast(&r.wcv)
    pthread_mutex_unlock(&r.mu)


cdef bint _take_turn(_Readers *r, int w, int nworkers) noexcept nogil:
    """Wait as a standby until worker w may read: a free turn, or one taken
    over from a request handled for STEAL_NS. False once the session ends."""
    cdef long long t, oldest, now, until
    cdef int k
    cdef bint got = False, watching = False
    cdef timespec ts
    pthread_mutex_lock(&r.mu)
    while not r.closed:
        if r.active < r.max:
            r.active += 1
            got = True
            break
        now = _now_ns()
        oldest = 0
        for k in range(nworkers):
            t = ovl_load(&r.state[k])
            if t > 1:
                if now - t >= STEAL_NS and ovl_cas(&r.state[k], t, 0):
                    got = True      # its turn is ours (active unchanged)
                    break
                if oldest == 0 or t < oldest:
                    oldest = t
        if got:
            break
        if r.watcher and not watching:
            pthread_cond_wait(&r.cv, &r.mu)
            continue
        watching = True
        r.watcher = 1
        if oldest == 0:
            # nothing handled now: sleep while the reader sleeps in read
            # (it wakes us: _read_turn); else look again in STEAL_NS
            ovl_store_int(&r.watcher_idle, 1)
            if ovl_load_int(&r.blocked):
                pthread_cond_wait(&r.wcv, &r.mu)
                ovl_store_int(&r.watcher_idle, 0)
                continue
            ovl_store_int(&r.watcher_idle, 0)
            until = now + STEAL_NS
        else:
            until = oldest + STEAL_NS
        ts.tv_sec = until // 1000000000
        ts.tv_nsec = until % 1000000000
        pthread_cond_timedwait(&r.wcv, &r.mu, &ts)
    if watching:
        r.watcher = 0
        pthread_cond_signal(&r.cv)      # another standby watches
    if got:
        ovl_store(&r.state[w], 1)
    pthread_mutex_unlock(&r.mu)
    return got


cdef void _give_turn(_Readers *r) noexcept nogil:
    """A turn was given up (hand_off, or a worker ending): a standby takes it."""
    pthread_mutex_lock(&r.mu)
    r.active -= 1
    pthread_cond_signal(&r.cv)
    pthread_cond_signal(&r.wcv)
    pthread_mutex_unlock(&r.mu)


cdef ssize_t _read_turn(_Readers *r, int fd, char *buf, int64_t spin_ns,
                        bint *nonblock) noexcept nogil:
    """read(2) of the next request by the worker holding the turn: first
    polling for spin_ns (the fd non-blocking), then one blocking read; a
    request arriving while it slept wakes the watcher."""
    cdef ssize_t n
    cdef int fl, err
    cdef int64_t end
    if spin_ns > 0:
        end = _now_ns() + spin_ns
        if not nonblock[0]:
            fl = fcntl(fd, F_GETFL)
            fcntl(fd, F_SETFL, fl | O_NONBLOCK)
            nonblock[0] = True
        while True:
            n = read(fd, buf, READ_BUFFER)
            if n >= 0 or errno != EAGAIN:
                return n
            if _now_ns() >= end:
                break
    if nonblock[0]:
        fl = fcntl(fd, F_GETFL)
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK)
        nonblock[0] = False
    ovl_store_int(&r.blocked, 1)
    n = read(fd, buf, READ_BUFFER)
    err = errno
    ovl_store_int(&r.blocked, 0)
    if ovl_load_int(&r.watcher_idle):
        pthread_mutex_lock(&r.mu)
        pthread_cond_signal(&r.wcv)
        pthread_mutex_unlock(&r.mu)
    ovl_set_errno(err)
    return n
