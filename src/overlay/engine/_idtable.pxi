"""Part of overlay.engine.bridge (included by bridge.pyx): IdTable, node id ->
Node, for every inode the kernel knows.

An open-addressing hash table in C (linear probing, tombstones, doubled when
two thirds full): 16 bytes a slot and no Python object per entry, where a
dict would cost a slot plus an int object for the key. With hundreds of
thousands of cached inodes that is what keeps the daemon near 400 bytes an
inode. Ids come from a counter (never 0, never reused); the table holds a
reference on each Node in it.
"""

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdlib cimport calloc, free

cdef struct IdSlot:
    uint64_t id          # 0: empty; ID_GONE: a removed entry
    PyObject *node

DEF ID_GONE = 0xffffffffffffffff


cdef inline size_t _id_hash(uint64_t i, size_t mask) noexcept nogil:
    return <size_t>((i * <uint64_t>0x9E3779B97F4A7C15ULL) >> 17) & mask


@cython.final
cdef class IdTable:
    cdef IdSlot *slots
    cdef size_t cap          # a power of two
    cdef size_t used         # live entries
    cdef size_t filled       # live entries and tombstones

    def __cinit__(self):
        self.cap = 1024
        self.slots = <IdSlot*>calloc(self.cap, sizeof(IdSlot))
        if self.slots == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef size_t k
        if self.slots != NULL:
            for k in range(self.cap):
                if self.slots[k].id != 0 and self.slots[k].id != ID_GONE:
                    Py_DECREF(<object>self.slots[k].node)
            free(self.slots)

    def __len__(self):
        return self.used

    cdef list sweep_dirs(self, size_t *pos, size_t want):
        """Up to `want` (id, Node) of dirs, from slot *pos on, wrapping
        round; *pos is left after the last slot looked at, so successive
        sweeps go round the table."""
        cdef list out = []
        cdef size_t mask = self.cap - 1
        cdef size_t k = pos[0] & mask, seen = 0
        cdef IdSlot *s
        while seen < self.cap and <size_t>len(out) < want:
            s = &self.slots[k]
            if s.id != 0 and s.id != ID_GONE and (<Node>s.node).is_dir:
                out.append((s.id, <object>s.node))
            k = (k + 1) & mask
            seen += 1
        pos[0] = k
        return out

    cdef object get(self, uint64_t i):
        """The Node of id i, or None (0 and ID_GONE are never ids: they mark
        empty and removed slots)."""
        cdef size_t mask = self.cap - 1
        cdef size_t k = _id_hash(i, mask)
        if i == 0 or i == ID_GONE:
            return None
        while True:
            if self.slots[k].id == i:
                return <object>self.slots[k].node
            if self.slots[k].id == 0:
                return None
            k = (k + 1) & mask

    cdef bint contains(self, uint64_t i):
        return self.get(i) is not None

    cdef int put(self, uint64_t i, node) except -1:
        """Add id i -> node (i must not be in the table)."""
        cdef size_t mask, k
        if i == 0 or i == ID_GONE:
            raise ValueError(f"{i} is not a node id")
        if (self.filled + 1) * 3 >= self.cap * 2:
            self._resize(self.cap * 2 if self.used * 3 >= self.cap else self.cap)
        mask = self.cap - 1
        k = _id_hash(i, mask)
        while self.slots[k].id != 0 and self.slots[k].id != ID_GONE:
            k = (k + 1) & mask
        if self.slots[k].id == 0:
            self.filled += 1
        Py_INCREF(node)
        self.slots[k].id = i
        self.slots[k].node = <PyObject*>node
        self.used += 1
        return 0

    cdef object pop(self, uint64_t i):
        """Remove id i; its Node, or None."""
        cdef size_t mask = self.cap - 1
        cdef size_t k = _id_hash(i, mask)
        cdef object node
        if i == 0 or i == ID_GONE:
            return None
        while True:
            if self.slots[k].id == i:
                node = <object>self.slots[k].node
                Py_DECREF(node)         # `node` holds its own reference
                self.slots[k].id = ID_GONE
                self.slots[k].node = NULL
                self.used -= 1
                return node
            if self.slots[k].id == 0:
                return None
            k = (k + 1) & mask

    cdef int _resize(self, size_t cap) except -1:
        cdef IdSlot *old = self.slots
        cdef size_t oldcap = self.cap, k, j, mask
        cdef IdSlot *new = <IdSlot*>calloc(cap, sizeof(IdSlot))
        if new == NULL:
            raise MemoryError()
        mask = cap - 1
        for k in range(oldcap):
            if old[k].id != 0 and old[k].id != ID_GONE:
                j = _id_hash(old[k].id, mask)
                while new[j].id != 0:
                    j = (j + 1) & mask
                new[j] = old[k]
        self.slots = new
        self.cap = cap
        self.filled = self.used
        free(old)
        return 0


def _idtable_selftest(int n=5000):
    """Exercise IdTable from Python (tests/test_engine.py): puts, gets,
    pops, growth past many tombstones, and the ids that never are."""
    cdef IdTable t = IdTable()
    cdef uint64_t i
    objs = [object() for _ in range(n)]
    for i in range(1, n + 1):
        t.put(i, objs[i - 1])
    assert len(t) == n
    for i in range(1, n + 1):
        assert t.get(i) is objs[i - 1]
    assert t.get(0) is None and t.pop(0) is None
    assert t.get(ID_GONE) is None and t.get(n + 1) is None
    for i in range(1, n + 1, 2):
        assert t.pop(i) is objs[i - 1]
        assert t.get(i) is None
    assert len(t) == n // 2
    for i in range(n + 1, 3 * n):      # reuse of tombstones, resizes
        t.put(i, objs[i % n])
    for i in range(2, n + 1, 2):
        assert t.get(i) is objs[i - 1]
    try:
        t.put(0, objs[0])
    except ValueError:
        pass
    else:
        raise AssertionError("put(0) was accepted")
    return True
