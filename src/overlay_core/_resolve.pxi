"""Part of overlay_core._core (included by _core.pyx): _Resolver, the lookup of
a name in a merged directory, as the kernel overlay does it: the upper
entry, then the lower layers top first, stopped by whiteouts (0/0 char
devices, xattr whiteouts, OCI .wh. names), opaque dirs and non-directories,
following redirects (relative and absolute, checked as the kernel checks
them), with a name index for dirs of deep stacks."""


cdef refuse_redirect(bytes name):
    """redirect_dir=nofollow: a redirect the lookup would follow (the
    kernel's "refusing to follow redirect")."""
    log.warning("refusing to follow redirect for %r", name)
    return _err(errno.EPERM, name)


cdef class _Resolver(_Stack):
    """Name lookup through the layers."""

    cdef _walk_lower(self, int base, list comps):
        """Resolve comps below base in one lower layer.
        Returns (kind, fd, st): kind 0 missing, 1 stop (whiteout or a
        non-directory on the way), 2 non-directory, 3 directory; st a Stat.
        Sets _walk_stop (an opaque dir on the way) and _walk_redirect (the
        path the layers below are to be searched for, where a dir on the
        way carries a redirect), as the kernel's ovl_lookup_layer."""
        cdef int fd = base
        cdef int nfd, err
        cdef Py_ssize_t j, n = len(comps)
        cdef struct_stat st
        cdef bytes comp
        cdef bint last
        owned = False
        self._walk_stop = False
        self._walk_redirect = None
        try:
            for j in range(n):
                comp = comps[j]
                last = j == n - 1
                if self.oci and comp.startswith(OCI_WH):
                    return 0, -1, None      # markers are never entries
                err = c_statat(fd, comp, &st)
                if err:
                    if err == ENOENT or err == ENOTDIR or err == ENAMETOOLONG:
                        if self.oci and err == ENOENT and self._oci_whiteout(fd, comp):
                            return 1, -1, None
                        return 0, -1, None
                    raise _err(err, comp)
                if (S.S_ISCHR(st.st_mode) or (S.S_ISREG(st.st_mode) and st.st_size == 0)) \
                        and self._lower_whiteout_c(fd, comp, st.st_mode, st.st_rdev, st.st_size):
                    return 1, -1, None
                if not S.S_ISDIR(st.st_mode):
                    if last:
                        return 2, self._opath(fd, comp, False), _mkstat(&st)
                    return 1, -1, None
                if (st.st_dev, st.st_ino) in self._private_dirs:
                    raise _err(errno.ELOOP, comp)   # the upper or work dir
                nfd = self._opath(fd, comp, True)
                if owned:
                    os.close(fd)
                fd = nfd
                owned = True
                if last:
                    continue
                if (self._getx(fd, self.x_opaque) == b"y"
                        or (self.oci and self._oci_opaque(fd))):
                    # an opaque dir on the way: the layers below do not
                    # count for this path (the kernel stops there too)
                    self._walk_stop = True
                    continue
                rd = self._getx(fd, self.x_redirect)
                if rd is not None:
                    # a dir on the way was moved here from elsewhere (a
                    # pushed-down upper): the layers below hold the rest
                    # of the path under its old place, as the kernel reads
                    self._check_redirect(rd, comp)
                    rest = comps[j + 1:]
                    if rd.startswith(b"/"):
                        new = [c for c in rd.split(b"/") if c] + rest
                        self._walk_stop = False     # the kernel resets it too
                    else:
                        new = comps[:j] + [rd] + rest
                    self._walk_redirect = b"/" + b"/".join(new)
            owned = False
            return 3, fd, _mkstat(&st)
        finally:
            if owned:
                os.close(fd)

    cdef _check_redirect(self, bytes rd, bytes name, bint follow=True):
        """The kernel's checks on a redirect xattr: an absolute one is
        /-separated non-empty names, a relative one a single name; `.` and
        `..` are refused at lookup (EACCES)."""
        if rd.startswith(b"/"):
            comps = rd[1:].split(b"/")
        else:
            comps = [rd]
        if not rd or any(not c for c in comps) or (not rd.startswith(b"/") and b"/" in rd):
            log.warning("invalid redirect %r on %r", rd, name)
            raise _err(errno.EINVAL, name)
        if follow and any(c in (b".", b"..") for c in comps):
            raise _err(errno.EACCES, name)

    cdef _lookup_lowers(self, Node parent, bytes name, object redirect, bint have_upper_dir,
                        int below=-1):
        """Search the lower layers for name below parent, following redirects
        (only the layers after `below`).
        Returns (nondir, dirs, st): nondir is (layer, fd, st, data) or None;
        dirs a list of (layer, fd) of directories to merge, top first; st the
        Stat of the top one. With metacopy=on a metacopy file is followed to
        its data in the layers below (_metacopy.pxi): nondir is the top one
        and data the (layer, fd) of the data (None: nondir holds them)."""
        cdef int n = self.nlower     # data-only layers: see below
        cdef int idx
        cdef Py_ssize_t j = 0
        cdef list plan
        cdef bint follow_mc = self.metacopy or self.ndata > 0
        path = redirect if redirect is not None else name
        dirs = []
        topst = None
        top = None      # the top metacopy file of a chain: (layer, fd, st)
        # which layers to probe: (layer index, dir fd) in order
        if path.startswith(b"/"):
            plan = [(i, self.lower_roots[i]) for i in range(below + 1, n)]
        else:
            plan = parent.lowers
            if redirect is None and below < 0 and len(plan) >= INDEX_MIN_LAYERS:
                if parent.lindex is None:
                    parent.nlookups += 1
                    deep = len(plan) >= INDEX_EAGER_LAYERS
                    if parent.nlookups >= (2 if deep else INDEX_AFTER_LOOKUPS):
                        self._build_index(parent)
                    elif deep:
                        prefetch_layers([e[1] for e in plan], name)
                if parent.lindex is not None:
                    self.counters["name_index_hits"] += 1
                    positions = parent.lindex.get(name)
                    if positions is None:
                        return None, dirs, None
                    plan = [parent.lowers[k] for k in positions]
            if below >= 0:
                plan = [e for e in plan if e[0] > below]
        while j < len(plan):
            idx, base = plan[j]
            j += 1
            if path.startswith(b"/"):
                comps = [c for c in path.split(b"/") if c]
                if not comps:
                    break
            else:
                comps = path.split(b"/")
            if any(c in (b"", b".", b"..") for c in comps):
                log.warning("ignoring invalid redirect %r", path)
                break
            if len(comps) > 1 and self.providers and idx in self.providers:
                # an image layer made lazily: the dirs on the way, made first
                self.providers[idx].ensure_path(base, comps)
            kind, fd, st = self._walk_lower(base, comps)
            if self._walk_redirect is not None:
                path = self._walk_redirect      # the layers below: the old place
            if kind == 0:
                if self._walk_stop:
                    break       # an opaque dir on the way: nothing below counts
                continue
            if kind == 1:
                break
            if kind == 2:
                if dirs or have_upper_dir:
                    os.close(fd)
                    break
                if follow_mc and S.S_ISREG(st.st_mode) and has_metacopy(self, fd):
                    # a metacopy file (a pushed-down upper): its data are
                    # below, at its redirect or at the same path
                    rd = self._getx(fd, self.x_redirect)
                    if top is None:
                        top = (idx, fd, st)
                    else:
                        os.close(fd)    # the kernel keeps only the top one
                    if rd is not None:
                        try:
                            path = self._redirected(path, rd, name)
                        except BaseException:
                            os.close(top[1])
                            raise
                    plan = self._plan_below(parent, path, idx)
                    j = 0
                    if plan and not self.metacopy:
                        # following it into the layers below needs
                        # metacopy=on (not into data-only ones: see below)
                        os.close(top[1])
                        raise refuse_metacopy(name)
                    continue
                if top is not None:
                    if not S.S_ISREG(st.st_mode):
                        os.close(fd)
                        break
                    return (top[0], top[1], top[2], (idx, fd)), dirs, top[2]
                return (idx, fd, st, None), dirs, st
            if top is not None:
                os.close(fd)
                break
            if self.providers and idx in self.providers:
                # an image layer made lazily (overlay.images): a dir's
                # entries are made before anything looks into it
                try:
                    self.providers[idx].ensure_dir(fd)
                except BaseException:
                    os.close(fd)
                    for _, dfd in dirs:
                        os.close(dfd)
                    raise
            if not dirs:
                topst = st
            dirs.append((idx, fd))
            if idx == n - 1:
                break
            if not self.oci and not c_has_xattr_prefix(fd, self.prefix, True):
                # (most lower dirs have no overlay xattr: one call, not two)
                if self._walk_stop:
                    break
                continue
            op = self._getx(fd, self.x_opaque)
            if op == b"y" or (self.oci and self._oci_opaque(fd)):
                break
            rd = self._getx(fd, self.x_redirect)
            if rd is not None:
                # the rest of the search follows the new path
                path = self._redirected(path, rd, name)
                plan = self._plan_below(parent, path, idx)
                j = 0
                if plan and not self.redirect_follow:
                    for _, fd in dirs:
                        os.close(fd)
                    raise refuse_redirect(name)
            if self._walk_stop:
                break       # an opaque dir on the way: nothing below counts
        if top is not None:
            if self.ndata and path.startswith(b"/"):
                # its data in a data-only layer (an image's content store);
                # not there: its metadata show, opening it gives ENOENT, as
                # the kernel's lazy lookup of them
                return (top[0], top[1], top[2], data_only(self, path)), dirs, top[2]
            os.close(top[1])
            if not self.metacopy:
                raise refuse_metacopy(name)
            raise no_data(name)
        return None, dirs, topst

    cdef bytes _redirected(self, bytes path, bytes rd, bytes name):
        """The path searched for in the layers below after a redirect rd (of
        a dir, or of a metacopy file) met on the way to path (rd checked as
        the kernel checks it)."""
        self._check_redirect(rd, name)
        if rd.startswith(b"/"):
            # as the kernel: an absolute redirect goes on below an opaque
            # dir met on the way to it
            self._walk_stop = False
            return rd
        head, sep, _ = path.rpartition(b"/")
        return head + sep + rd

    cdef list _plan_below(self, Node parent, bytes path, int idx):
        """The (layer, dir fd) to search for path in after layer idx: the
        regular layers' roots for an absolute path, else parent's dirs."""
        if path.startswith(b"/"):
            return [(i, self.lower_roots[i]) for i in range(idx + 1, self.nlower)]
        return [(i, f) for i, f in parent.lowers if i > idx]

    cdef _find_data(self, Node parent, bytes name, object path, int below):
        """The lower objects of a metacopy upper file known as name under
        parent, found at path (its redirect) or name: [(layer, fd)] of its
        data, or of the top lower file and the data where that is a
        metacopy one too (as the kernel keeps them); EIO where there are no
        data (the kernel's "metacopy with no lower data found")."""
        nondir, dirs, _ = self._lookup_lowers(parent, name, path, False, below)
        for _, fd in dirs:
            os.close(fd)
        if nondir is None or not S.S_ISREG(nondir[2].st_mode):
            if nondir is not None:
                os.close(nondir[1])
            raise no_data(name)
        if nondir[3] is not None:
            return [(nondir[0], nondir[1]), nondir[3]]
        return [(nondir[0], nondir[1])]

    cdef _build_index(self, Node d):
        """Which of d's lower dirs hold each name: {name: [positions in
        d.lowers]}. Lets lookups in a dir of a deep stack probe only the
        layers that have the name. Like the kernel's caches, it does not see
        lower dirs changed behind the mount."""
        index = {}
        cdef Py_ssize_t pos
        listings = c_listdirs([e[1] for e in d.lowers])
        for pos in range(len(d.lowers)):
            for b in listings[pos]:
                if self.oci and b.startswith(OCI_WH):
                    if b == OCI_OPQ:
                        continue
                    b = b[len(OCI_WH):]     # a whiteout of b in this layer
                where = index.setdefault(b, [])
                if not where or where[-1] != pos:
                    where.append(pos)
        d.lindex = index
        self.counters["name_indexes"] += 1

    cdef Node _known_upper(self, Node parent, bytes name, struct_stat *ust, Stat st):
        """The known Node of an upper non-dir found again at the name it is
        known by (unlink, rename and setattr look their target up again):
        what the full lookup would return, without opening it and reading
        its xattrs again. None where the full lookup must run."""
        cdef Node old = self.nodes.get(_realkey(ust.st_dev, ust.st_ino))
        if (old is None or old.is_dir or old.evicted or old._upper < 0
                or not old._has_real or old.real_dev != ust.st_dev or old.real_ino != ust.st_ino
                or old.parent is not parent or old.name != name):
            return None
        self.counters["lookups"] += 1
        self.counters["lookups_known"] += 1
        old.st = self.shown_stat(old, st)
        return old

    cpdef Node lookup(self, Node parent, bytes name):
        """Resolve name in the merged directory parent; returns the Node
        (the same object for the same inode while it is known) or raises.
        The Node's `st` holds the Stat found on the way (for the reply)."""
        cdef struct_stat ust
        cdef int err
        cdef bint have_ust = False, have_upper_dir = False
        cdef bint xo = True     # the upper entry may have overlay xattrs
        if not parent.is_dir:
            raise _err(errno.ENOTDIR, name)
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, name)
        cdef Node n = Node()
        n.parent = parent
        n.name = name
        redirect = None
        st = None
        if parent.upper >= 0:
            err = c_statat(parent.upper, name, &ust)
            if err == 0:
                have_ust = True
            elif err != ENOENT:
                raise _err(err, name)
            if have_ust:
                if S.S_ISCHR(ust.st_mode) and ust.st_rdev == 0:
                    raise _err(errno.ENOENT, name)
                st = _mkstat(&ust)
                if S.S_ISDIR(ust.st_mode):
                    n.is_dir = True
                    n.upper = self._opath(parent.upper, name, True)
                    have_upper_dir = True
                    # (most have no overlay xattr: one call, not two or three)
                    xo = c_has_xattr_prefix(n.upper, self.prefix, True)
                    if xo:
                        n.opaque = c_getx_dir(n.upper, self.x_opaque) == b"y"
                        redirect = c_getx_dir(n.upper, self.x_redirect)
                    if redirect is not None:
                        # its form is always checked; it is followed (and
                        # its . and .. refused) only where there is a lower
                        # layer to follow it into, as in the kernel
                        follow = redirect.startswith(b"/") or bool(parent.lowers)
                        self._check_redirect(redirect, name, follow)
                        if not follow:
                            redirect = None
                        elif not self.redirect_follow and not n.opaque:
                            raise refuse_redirect(name)
                    n.redirect = redirect
                else:
                    known = self._known_upper(parent, name, &ust, st)
                    if known is not None:
                        return known
                    n.upper = self._opath(parent.upper, name, False)
                    # (most have no overlay xattr: one call, not three)
                    xo = c_has_xattr_prefix_at(parent.upper, name, self.prefix)
                    if (xo and S.S_ISREG(ust.st_mode) and ust.st_size == 0
                            and self._getx(n.upper, self.x_whiteout) is not None):
                        # an xattr whiteout in the upper layer: never written
                        # by us (or the kernel), but honoured at lookup as the
                        # kernel does (a listing shows its name, as the kernel's)
                        raise _err(errno.ENOENT, name)
        if not have_ust or (have_upper_dir and not n.opaque):
            nondir, dirs, lst = self._lookup_lowers(parent, name, redirect, have_upper_dir)
            if nondir is not None:
                n.is_dir = False
                if nondir[3] is not None:
                    n.lowers = [(nondir[0], nondir[1]), nondir[3]]
                    n.metacopy = True
                else:
                    n.lowers = [(nondir[0], nondir[1])]
            elif dirs:
                n.is_dir = True
                n.lowers = dirs
            elif not have_ust:
                raise _err(errno.ENOENT, name)
        # identity and inode number
        if n.upper >= 0:
            n.key = _realkey(ust.st_dev, ust.st_ino)
            if not n.is_dir:
                if xo:
                    n.ino = upper_ino(self, n.upper, st)
                else:
                    self._origin_seen = False
                    n.ino = self.map_ino(st)
                if (xo and S.S_ISREG(st.st_mode) and (self.metacopy or self.ndata or self._origin_seen)
                        and has_metacopy(self, n.upper)):
                    self._metacopy_upper(parent, n)
                    st = metacopy_stat(self, n, st)
                if self._indexed and n.key in self._indexed:
                    st = indexed_stat(self, n, st)
            elif n.lowers:
                # a merged dir: the kernel reports its top lower dir's
                # number, and names that dir in the upper's origin
                n.ino = self.map_ino(lst)
                v = c_getx_dir(n.upper, self.x_origin) if xo else None
                if v is None:
                    self._fix_origin(parent, n)
                if self.index_all:
                    self._verify_merged(n, v, st)
            else:
                n.ino = self.map_ino(st)
        else:
            st = metacopy_stat(self, n, lst) if n._bits & NB_METACOPY else lst
            n.ino = self.map_ino(lst)
            if self.index_all:
                # nfs_export: an index entry for a dir only in a lower layer
                # is an error; a non-dir's is its copy (as with hard links)
                n.key = _realkey(lst.st_dev, lst.st_ino)
                if n.is_dir:
                    iname = index_name(self, n.lowers[0][1], n.lowers[0][0])
                    if iname is not None:
                        dir_index_state(self, iname, -1)
                else:
                    self._lower_indexed(n, nondir, lst)
                    if n.upper >= 0:
                        st = n.st
                        ust.st_dev, ust.st_ino = st.st_dev, st.st_ino
            elif n.is_dir or lst.st_nlink == 1:
                n.key = _realkey(lst.st_dev, lst.st_ino)
            elif not self.index:
                # without index, a copy-up breaks a lower hard link: each
                # name is an object of its own (as the kernel's inodes)
                n.key = ("alias", parent.ino, name)
            else:
                # with index, its names are one object, copied up or not
                n.key = _realkey(lst.st_dev, lst.st_ino)
                self._lower_indexed(n, nondir, lst)
                if n.upper >= 0:
                    st = n.st
                    ust.st_dev, ust.st_ino = st.st_dev, st.st_ino
        if self._ovr_any:
            st = override_stat(self, n, st)
        n.st = st
        n.ov = self
        if n.upper >= 0:
            n.real_dev, n.real_ino = ust.st_dev, ust.st_ino
            self.layer_hits[0] += 1
        else:
            n.real_dev, n.real_ino = lst.st_dev, lst.st_ino
            self.layer_hits[1 + n.lowers[0][0]] += 1
        n._has_real = True
        return self._intern(n)

    cdef _lower_indexed(self, Node n, tuple nondir, Stat lst):
        """A lower non-dir found by name (with several links, or any with
        nfs_export): where its copy is in the index, n becomes that copy
        (n.upper, key, n.st its Stat)."""
        ist = find_index(self, n, nondir[1], nondir[0], lst)
        if ist is None:
            return
        if (self.metacopy and S.S_ISREG(ist.st_mode)
                and has_metacopy(self, n.upper)):
            # a metacopy in the index: the lower file (or the
            # end of its metacopy chain) has the data
            n.metacopy = True
            ist = metacopy_stat(self, n, ist)
        else:
            for _, fd in n.lowers:
                os.close(fd)    # the copy in the index stands for it
            n.lowers = []
            n.metacopy = False
        n.st = indexed_stat(self, n, ist)

    cdef _verify_merged(self, Node n, object origin, Stat st):
        """nfs_export, a merged dir n: its upper's origin must name its top
        lower dir, else that is not merged (the kernel's verify_lower); an
        index entry must name its upper dir (else EIO). Only an indexed
        one reports the lower dir's st_ino."""
        idx, fd = n.lowers[0]
        top = origin_fh(self, fd, idx)
        if origin is not None and origin != top:
            log.warning("failed to verify origin of %r: not merged with its lower dir", n.name)
            for _, f in n.lowers:
                os.close(f)
            n.lowers = []
            n.ino = self.map_ino(st)
            return
        if top and dir_index_state(self, top.hex().encode(), n.upper) == 1:
            _dirstate(n).indexed = True
        else:
            n.ino = self.map_ino(st)

    def _metacopy_upper(self, Node parent, Node n):
        """n's upper file carries <prefix>metacopy: find its data in the
        lower layers (by its redirect, else its name), or refuse it without
        metacopy=on (EPERM), as the kernel does."""
        if not self.metacopy:
            raise refuse_metacopy(n.name)
        rd = self._getx(n.upper, self.x_redirect)
        if rd is not None:
            self._check_redirect(rd, n.name, rd.startswith(b"/") or bool(parent.lowers))
        n.lowers = self._find_data(parent, n.name, rd, -1)
        n.metacopy = True
        n.redirect = rd

    def _fix_origin(self, Node parent, Node n):
        """A merged upper dir without origin (made before origin was, or by
        a mkdir over a lower dir's place... as the kernel, which writes it
        at lookup): name its top lower dir, and mark the parent impure."""
        idx, fd = n.lowers[0]
        try:
            os.setxattr(_proc(n.upper), self.x_origin, origin_fh(self, fd, idx))
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EPERM):
                raise
            log.debug("origin not set on %r: %s", n.name, e)
            return
        set_impure(self, parent)

    def lower_positive(self, Node parent, bytes name):
        """Would a lower entry show at name if the upper had nothing there?"""
        if self.oci and name.startswith(OCI_WH):
            return False
        for idx, fd in parent.lowers:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                if self.oci and self._oci_whiteout(fd, name):
                    return False
                continue
            except OSError:
                return True
            return not self._lower_whiteout(fd, name, st)
        return False
