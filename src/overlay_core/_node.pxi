"""Part of overlay_core._core (included by _core.pyx): the Node, one object of
the merged tree, and the O_PATH fds it holds on the real objects behind it.
Its fields are declared in _core.pxd."""


cdef inline unsigned long long _fingerprint(long long a, long long b, long long c) noexcept:
    """A 64-bit mix of three values (splitmix64 steps): equal inputs, equal
    prints; a chance change goes unnoticed with odds of 2**-64."""
    cdef unsigned long long h = <unsigned long long>a * 0x9E3779B97F4A7C15ULL
    h ^= (h >> 31) ^ (<unsigned long long>b * 0xBF58476D1CE4E5B9ULL)
    h ^= (h >> 27) ^ (<unsigned long long>c * 0x94D049BB133111EBULL)
    return h ^ (h >> 33)


cdef class _DirState:
    """The fields only a directory Node has (see Node)."""


@cython.no_gc_clear      # __dealloc__ closes the fds in _lowers: keep it for it
cdef class Node:
    """One object of the merged tree (see the module docstring)."""

    def __cinit__(self):
        self._upper = -1
        self._lidx = -1
        self._lfd = -1

    def __dealloc__(self):
        if self._upper >= 0:
            try:
                os.close(self._upper)
            except OSError:
                pass
        if self._lfd >= 0:
            try:
                os.close(self._lfd)
            except OSError:
                pass
        if self._lowers is not None:
            for _, fd in self._lowers:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    property upper:
        """O_PATH fd of the object in the upper layer, or -1."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            return self._upper

        def __set__(self, int fd):
            self._upper = fd

    property lowers:
        """[(layer index, O_PATH fd)] of the lower objects, top first (a new
        list for a non-dir, which has one at most, kept in C fields)."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            if self.is_dir:
                if self._lowers is None:
                    self._lowers = []
                return self._lowers
            if self._lidx >= 0:
                return [(self._lidx, self._lfd)]
            return []

        def __set__(self, list v):
            if self.is_dir or len(v) > 1:
                self._lowers = v
                self._lidx = self._lfd = -1
            else:
                self._lowers = None
                if v:
                    self._lidx, self._lfd = v[0]
                else:
                    self._lidx = self._lfd = -1

    property real:
        """(st_dev, st_ino) of the real object behind the fds, or None."""
        def __get__(self):
            return (self.real_dev, self.real_ino) if self._has_real else None

        def __set__(self, v):
            if v is None:
                self._has_real = False
            else:
                self.real_dev, self.real_ino = v
                self._has_real = True

    property ino:
        """The st_ino reported for this object (None before it is known)."""
        def __get__(self):
            return self._ino if self._has_ino else None

        def __set__(self, v):
            if v is None:
                self._has_ino = False
            else:
                self._ino = v
                self._has_ino = True

    property cached:
        """(size, mtime_ns, ctime_ns) of a lower file as last reported to the
        kernel; kept as a 64-bit fingerprint (reads give that, or None).
        The adapter asks changed() at the next open."""
        def __get__(self):
            return self._c_print if self._has_cached else None

        def __set__(self, v):
            if v is None:
                self._has_cached = False
            else:
                self._c_print = _fingerprint(v[0], v[1], v[2])
                self._has_cached = True

    cdef void note_reported(self, long long size, long long mtime_ns, long long ctime_ns) noexcept:
        """Remember what the kernel was told of a lower file (see cached)."""
        self._c_print = _fingerprint(size, mtime_ns, ctime_ns)
        self._has_cached = True

    cdef bint is_merged(self) noexcept:
        """merged, at C level (dirs are never evicted: their fds are there)."""
        if not self.is_dir:
            return False
        return ((len(self._lowers) if self._lowers is not None else 0) + (self._upper >= 0)) > 1

    def changed(self, long long size, long long mtime_ns, long long ctime_ns):
        """Do these attributes differ from those last reported (cached)?"""
        return self._has_cached and self._c_print != _fingerprint(size, mtime_ns, ctime_ns)

    cdef _DirState _dirstate(self):
        if self._dir is None:
            self._dir = _DirState()
        return self._dir

    property dircache:
        """[(name, Node, dir fd)] of a dir's last listing, or None."""
        def __get__(self):
            return self._dir.dircache if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                self._dirstate().dircache = v

    property redirect:
        """An upper dir's <prefix>redirect, or None."""
        def __get__(self):
            return self._dir.redirect if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                self._dirstate().redirect = v

    property lindex:
        """{name: [positions in lowers]} of a dir of a deep stack, or None."""
        def __get__(self):
            return self._dir.lindex if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                self._dirstate().lindex = v

    property nlookups:
        """Lookups below a dir before its name index was built."""
        def __get__(self):
            return self._dir.nlookups if self._dir is not None else 0

        def __set__(self, int v):
            if v or self._dir is not None:
                self._dirstate().nlookups = v

    property opaque:
        """An upper dir with <prefix>opaque=y."""
        def __get__(self):
            return self._dir.opaque if self._dir is not None else False

        def __set__(self, bint v):
            if v or self._dir is not None:
                self._dirstate().opaque = v

    @property
    def fd(self):
        """O_PATH fd of the topmost real object."""
        if self.evicted:
            self.ov._reopen(self)
        if self._upper >= 0:
            return self._upper
        if self._lowers is not None:
            return self._lowers[0][1]
        return self._lfd

    @property
    def layer(self):
        """0 for the upper layer, 1 + index for a lower layer."""
        return 0 if self.upper >= 0 else self.lowers[0][0] + 1

    @property
    def merged(self):
        """A directory made of more than one real directory."""
        return self.is_dir and (len(self.lowers) + (self.upper >= 0)) > 1

    def __repr__(self):
        return "<Node %r ino=%s layer=%d>" % (self.name, self.ino, self.layer)
