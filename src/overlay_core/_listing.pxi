"""Part of overlay_core._core (included by _core.pyx): _Lister, the merged
listing of a directory (readdir), as the kernel lists it, kept until the
directory changes through us; the names that make a dir non-empty; readlink."""


cdef class _Lister(_Resolver):
    """Directory listings."""

    # ------------------------------------------------------------ readdir

    def list_names(self, Node n):
        """Names visible in merged directory n (whiteouts left out)."""
        return [name for name, _ in self._list(n, True)]

    def nonempty_names(self, Node n):
        """Names that make directory n non-empty, for rmdir and rename: like
        the kernel's emptiness check, this counts xattr whiteouts of lower
        layers, which readdir hides."""
        return [name for name, _ in self._list(n, False)]

    cdef list _list(self, Node n, bint xwhiteouts=True):
        """[(name, fd of the real dir it comes from)] of merged directory n;
        xwhiteouts: hide xattr whiteouts in lower dirs marked opaque=x."""
        if not n.is_dir:
            raise _err(errno.ENOTDIR)
        names = []
        seen = set()
        srcs = []
        if n.upper >= 0:
            srcs.append((True, n.upper))
        for _, fd in n.lowers:
            srcs.append((False, fd))
        for is_upper, fd in srcs:
            xwh = xwhiteouts and (not is_upper) and self._getx(fd, self.x_opaque) == b"x"
            oci_hidden = []
            rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=fd)
            try:
                with os.scandir(rfd) as it:
                    for e in it:
                        name = os.fsencode(e.name)
                        if self.oci and not is_upper and name.startswith(OCI_WH):
                            if name != OCI_OPQ:
                                oci_hidden.append(name[len(OCI_WH):])
                            continue
                        if name in seen:
                            continue
                        seen.add(name)
                        if e.is_dir(follow_symlinks=False) or e.is_symlink():
                            names.append((name, fd))
                            continue
                        isreg = e.is_file(follow_symlinks=False)
                        if not isreg or xwh:
                            try:
                                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            if is_upper:
                                if _is_whiteout_st(st):
                                    continue
                            elif self._lower_whiteout(fd, name, st):
                                continue
                        names.append((name, fd))
            finally:
                os.close(rfd)
            # an OCI whiteout hides its name in the layers below this one
            seen.update(oci_hidden)
        return names

    def readdir(self, Node n):
        """[(name, Node)] of directory n (without . and ..), as the kernel
        lists it: a merged dir as merged; a dir made of one real dir as that
        dir is, whiteouts included. Such whiteouts (and xattr whiteouts in a
        lower dir not marked opaque=x) come as ghost Nodes: listed, but a
        lookup of the name fails with ENOENT.

        The listing is kept until something changes in n through us (the
        kernel asks again for every pass of find or ls -R); every entry is
        stat'ed afresh through the real dir holding it, and an entry that is
        no longer the object it was makes the listing start over."""
        cdef struct_stat st
        cdef Node child, cur
        if n.dircache is not None:
            out = []
            for i, (name, child, dfd) in enumerate(n.dircache):
                if (c_statat(dfd, name, &st) != 0 or not child._has_real
                        or st.st_dev != child.real_dev or st.st_ino != child.real_ino):
                    n.dircache = None
                    break
                cur = self.nodes.get(child.key)
                if cur is not None and cur is not child:
                    child = cur
                    n.dircache[i] = (name, child, dfd)
                child.st = self.shown_stat(child, _mkstat(&st))
                out.append((name, child))
            else:
                return out
        if n.merged:
            entries = self._list(n)
        else:
            fd = n.fd
            entries = [(nm, fd) for nm in _listdir(fd)]
            if self.oci and n.upper < 0:
                entries = [e for e in entries if not e[0].startswith(OCI_WH)]
        out = []
        cache = []
        known = {}      # one Node per object, also for names not yet known
        # the kernel looks up every upper entry of an impure merged dir (for
        # its d_ino), which hides the xattr whiteouts of the upper layer
        recheck = (n.merged and n.upper >= 0
                   and (self._xino_bits > 0 or self._getx(n.upper, self.x_impure) == b"y"))
        for name, fd in entries:
            try:
                child = self.lookup(n, name)
                child = known.setdefault(child.key, child)
                if (child.is_dir and self.nodes.get(child.key) is not child
                        and node_top_fd(child) >= self.fd_cache_max):
                    # unknown to the kernel, and fds are many already (open()
                    # gives the lowest free number): see evict_dir
                    self.evict_dir(child)
            except FileNotFoundError:
                if recheck and fd == n.upper:
                    continue
                try:
                    child = self._ghost(fd, name)
                except OSError:
                    child = self._blind_ghost(fd, name)
            except OSError:
                if recheck and fd == n.upper:
                    continue    # the kernel's lookup for d_ino failed: not listed
                # a whiteout, or an entry whose lookup fails (bad redirect,
                # EIO...): listed, and only its lookup fails, as the kernel
                try:
                    child = self._ghost(fd, name)
                except OSError:
                    child = self._blind_ghost(fd, name)
            out.append((name, child))
            cache.append((name, child, fd))
        if self.keep_listings:
            n.dircache = cache
        if n.upper >= 0 and not n.lowers and (self._samefs or self._xino_bits > 0):
            # (where the kernel lists a real dir through its d_ino cache)
            self._drop_stale_impure(n, out)
        return out

    def _drop_stale_impure(self, Node n, list out):
        """A dir of the upper layer only, marked impure, none of whose
        entries now reports another st_ino than its own: drop the mark, as
        the kernel does when it lists such a dir."""
        if self._getx(n.upper, self.x_impure) is None:
            return
        for _, child in out:
            if not child.ghost and child.ino != child.real_ino:
                return
        try:
            os.removexattr(_proc(n.upper), self.x_impure)
        except OSError as e:
            log.debug("impure not removed from %r: %s", n.name, e)
            return
        if n._dir is not None:
            n._dir.impure = False

    cdef Node _blind_ghost(self, int dirfd, bytes name):
        """An entry even a stat fails on (EIO from a layer): listed with what
        the directory itself says of it, like the kernel lists it."""
        cdef Node g = Node()
        mode = S.S_IFREG
        ino = 0
        rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=dirfd)
        try:
            with os.scandir(rfd) as it:
                for e in it:
                    if e.name == os.fsdecode(name):
                        ino = e.inode()
                        if e.is_dir(follow_symlinks=False):
                            mode = S.S_IFDIR
                        elif e.is_symlink():
                            mode = S.S_IFLNK
                        break
        finally:
            os.close(rfd)
        g.name = name
        g.ghost = True
        g.key = ("ghost", name, ino)
        g.real = None
        g.ino = ino or 1
        g.st = blind_stat(mode, g.ino)
        return g

    cdef Node _ghost(self, int dirfd, bytes name):
        cdef Node g = Node()
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        g.name = name
        g.ghost = True
        g.is_dir = S.S_ISDIR(st.st_mode)
        g.lowers = [(0, self._opath(dirfd, name, False))]
        g.key = ("ghost", st.st_dev, st.st_ino)
        g.real = (st.st_dev, st.st_ino)
        g.ino = self.map_ino(st)
        return g

    def readlink(self, Node n):
        # readlinkat(fd, "") reads the symlink an O_PATH fd refers to
        return os.readlink(b"", dir_fd=n.fd)
