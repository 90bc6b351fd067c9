"""Part of overlay_core._core (included by _core.pyx): the Node, one object of
the merged tree, and the O_PATH fds it holds on the real objects behind it.
Its fields are declared in _core.pxd."""


@cython.no_gc_clear      # __dealloc__ closes the fds in _lowers: keep it for it
cdef class Node:
    """One object of the merged tree (see the module docstring)."""

    def __cinit__(self):
        self.fuse_id = 0
        self._upper = -1
        self._lowers = []
        self.aliases = []
        self.redirect = None
        self.cached = None

    def __dealloc__(self):
        if self._upper >= 0:
            try:
                os.close(self._upper)
            except OSError:
                pass
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
        """[(layer index, O_PATH fd)] of the lower objects, top first."""
        def __get__(self):
            if self.evicted:
                self.ov._reopen(self)
            return self._lowers

        def __set__(self, list v):
            self._lowers = v

    @property
    def fd(self):
        """O_PATH fd of the topmost real object."""
        return self.upper if self.upper >= 0 else self.lowers[0][1]

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
