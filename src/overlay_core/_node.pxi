"""Part of overlay_core._core (included by _core.pyx): the Node, one object of
the merged tree, and the O_PATH fds it holds on the real objects behind it.
Its fields are declared in _core.pxd."""


# The Overlays Nodes belong to, by number: a Node keeps its Overlay's number
# in 4 bytes that would otherwise be padding, where a pointer would cost 16
# bytes a Node. The table holds weak references (the Overlay owns its Nodes,
# not the reverse) and numbers are never reused, so a Node that outlives its
# Overlay finds nothing rather than another stack.
cdef dict _OVERLAYS = {}
cdef unsigned int _next_ovi = 0


cdef unsigned int _register_overlay(ov) except 0:
    global _next_ovi
    if _next_ovi == 0xffffffff:
        raise RuntimeError("too many Overlay objects in one process")
    _next_ovi += 1
    i = _next_ovi
    _OVERLAYS[i] = weakref.ref(ov, lambda _r, i=i: _OVERLAYS.pop(i, None))
    return i


cdef _DirState _dirstate(Node n):
    if n._dir is None:
        n._dir = _DirState()
    return n._dir


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

    property ov:
        """The Overlay this Node belongs to (it reopens evicted fds)."""
        def __get__(self):
            r = _OVERLAYS.get(self._ovi)
            ov = r() if r is not None else None
            if ov is None:
                raise RuntimeError("this Node's Overlay is gone")
            return ov

        def __set__(self, _Stack ov):
            self._ovi = ov.ovi

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
        list for a non-dir, which has one, kept in C fields, or two: the top
        and the data of a metacopy chain)."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            if self.is_dir:
                if self._lowers is None:
                    self._lowers = []
                return self._lowers
            if self._lowers is not None:
                return list(self._lowers)   # a metacopy chain: its top and its data
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
            return self._c_print if self._bits & NB_CACHED else None

        def __set__(self, v):
            if v is None:
                self._bits &= ~NB_CACHED
            else:
                self._c_print = _fingerprint(v[0], v[1], v[2])
                self._bits |= NB_CACHED

    def changed(self, long long size, long long mtime_ns, long long ctime_ns):
        """Do these attributes differ from those last reported (cached)?"""
        return bool(self._bits & NB_CACHED) and self._c_print != _fingerprint(size, mtime_ns, ctime_ns)

    property metacopy:
        """A regular file whose object (upper, or top lower) holds only its
        metadata (the kernel's metacopy xattr): its data are in the last of
        its lower objects (lowers[-1], see datafd) until a data copy-up."""
        def __get__(self):
            return bool(self._bits & NB_METACOPY)

        def __set__(self, bint v):
            if v:
                self._bits |= NB_METACOPY
            else:
                self._bits &= ~NB_METACOPY

    @property
    def datafd(self):
        """O_PATH fd of the object holding the data: fd, or for a metacopy
        file the lower object its data are read from."""
        if self.evicted:
            self.ov._reopen(self)
        if self._bits & NB_METACOPY:
            if self._lowers is not None:
                return self._lowers[-1][1]
            return self._lfd
        return self.fd

    property dircache:
        """[(name, Node, dir fd)] of a dir's last listing, or None."""
        def __get__(self):
            return self._dir.dircache if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                _dirstate(self).dircache = v

    property redirect:
        """An upper dir's <prefix>redirect, or None."""
        def __get__(self):
            return self._dir.redirect if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                _dirstate(self).redirect = v

    property lindex:
        """{name: [positions in lowers]} of a dir of a deep stack, or None."""
        def __get__(self):
            return self._dir.lindex if self._dir is not None else None

        def __set__(self, v):
            if v is not None or self._dir is not None:
                _dirstate(self).lindex = v

    property nlookups:
        """Lookups below a dir before its name index was built."""
        def __get__(self):
            return self._dir.nlookups if self._dir is not None else 0

        def __set__(self, int v):
            if v or self._dir is not None:
                _dirstate(self).nlookups = v

    property opaque:
        """An upper dir with <prefix>opaque=y."""
        def __get__(self):
            return self._dir.opaque if self._dir is not None else False

        def __set__(self, bint v):
            if v or self._dir is not None:
                _dirstate(self).opaque = v

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
