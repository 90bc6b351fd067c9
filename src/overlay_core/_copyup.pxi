"""Part of overlay_core._core (included by _core.pyx): _Copier, copy-up. A
lower object is prepared in the work dir (data, xattrs, owner, mode, times)
and renamed into the upper dir when complete, parents first; big files are
copied without the callers' lock (set_lock), so other threads go on."""


cdef class _Copier(_Lister):
    """Copy-up."""

    def _copy_xattrs(self, int src_fd, bytes dst_path, bint nofollow=False):
        """Copy every xattr except our own from the object behind src_fd."""
        try:
            names = os.listxattr(_proc(src_fd))
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise
        for nm in names:
            b = os.fsencode(nm)
            if b.startswith(self.prefix) and not b.startswith(self.prefix + b"overlay."):
                continue        # private; escaped user xattrs are copied
            if self._ovr_any and b in OVR_NAMES:
                continue        # owners kept in xattrs: written anew below
            try:
                v = os.getxattr(_proc(src_fd), b)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                raise
            try:
                os.setxattr(dst_path, b, v, follow_symlinks=not nofollow)
            except OSError as e:
                # security.* may be refused by the upper fs; the kernel
                # skips such names too when the fs does not support them
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or b.startswith(b"security."):
                    log.debug("copy-up: xattr %r not copied: %s", b, e)
                    continue
                raise

    # ------------------------------------------------------------ copy-up

    def copy_up(self, Node n, bint data=True, bint meta=False):
        """Make n exist in the upper layer (parents first), preparing it in
        the work dir and renaming it into place. Returns the Node to use from
        now on (n itself). With index=on, a lower file with several hard
        links goes to the index, and the name n is known by is linked to it
        (as is the name of an indexed n copied up before: link-up).
        data=False: its data are about to be truncated away (not copied).
        meta: only its metadata are to change (chmod, chown, utimes, xattrs,
        rename, link): with metacopy=on a regular file's data stay in the
        lower layer (_metacopy.pxi); without meta, a metacopy file's data
        are copied up."""
        if n.upper < 0 or n._bits & NB_METACOPY:
            self._wait_idle(n)      # another thread copies it up: use its copy
        if n.upper >= 0 and (meta or not n._bits & NB_METACOPY):
            if self._indexed and not n.is_dir and n.key in self._indexed:
                self._link_up(n)
            return n
        n.busy = True           # the fd cache must not close its fds meanwhile
        try:
            if n.upper < 0:
                return self._copy_up(n, data, meta)
            if not n._bits & NB_METACOPY:
                return n            # (copied up meanwhile, data and all)
            copy_data_up(self, n, data)
            if self._indexed and n.key in self._indexed:
                self._link_up(n)
            return n
        finally:
            n.busy = False
            if self._cond is not None:
                self._cond.notify_all()

    def provider_of(self, int k):
        """The data provider of lower layer k (an image layer), or None."""
        return self.providers.get(k) if self.providers else None

    def provide_data(self, Node n, bint mine=False):
        """n's data lie in a lower layer with a provider (an image layer:
        overlay.images): have it put them in place first. The lock is let
        go meanwhile (n is busy: changes to it wait), as for a big copy-up.
        mine: the caller (a copy-up of n) has made n busy itself."""
        lowers = n.lowers
        if not lowers or n.is_dir:
            return
        idx, fd = lowers[-1] if n._bits & NB_METACOPY else lowers[0]
        prov = self.provider_of(idx)
        if prov is None:
            return
        # (a lower file's own identity is n's; a metacopy's data are another's)
        ino = n.real_ino if n._has_real and not n._bits & NB_METACOPY else os.fstat(fd).st_ino
        if not prov.needs(ino):
            return
        if not mine:
            self._wait_idle(n)
            n.busy = True
        let = self._let_go(True)
        try:
            prov.ensure(ino)
        except OSError:
            raise
        except Exception as e:
            log.error("data of %r from layer %d: %s", n.name, idx, e)
            raise _err(errno.EIO, n.name)
        finally:
            self._take_back(let)
            if not mine:
                n.busy = False
                if self._cond is not None:
                    self._cond.notify_all()

    def set_lock(self, lock, on_long=None):
        """Callers from several threads: they hold `lock` (a threading.Lock)
        around every call. The core then lets go of it while it copies the
        data of a big file up (other requests go on meanwhile) and makes
        changes to a Node being copied up wait for that copy. on_long: called
        (with the lock held) when the calling thread is about to spend long
        there, so that its caller can have other threads serve meanwhile."""
        self._cond = threading.Condition(lock)
        self._on_long = on_long

    def _wait_idle(self, Node n):
        """Wait (letting go of the lock) while n is being copied up."""
        if self._cond is not None:
            if n.busy and self._on_long is not None:
                self._on_long()
            while n.busy:
                self._cond.wait()

    cdef _copy_up(self, Node n, bint data, bint meta):
        cdef Node p
        self._need_upper()
        p = n.parent
        # (the name it is known by now: a lookup of another name of an
        # indexed file may rename n while a big copy runs unlocked)
        name = n.name
        if p is None and not (self.index_all and not n.is_dir):
            raise _err(errno.EROFS)
        if p is not None:
            self.copy_up(p)
            # Someone (another Node of the same dir) may have done it already.
            ust = self._upper_entry(p, n.name)
        else:
            # a non-dir decoded from a file handle, with no name known
            # (nfs_export): copied up into the index only, as the kernel
            # does; a lookup of its name finds it there
            ust = None
        if ust is not None and not self._upper_whiteout(p.upper, n.name, ust):
            src_st = os.stat(n.fd)
            if S.S_IFMT(ust.st_mode) == S.S_IFMT(src_st.st_mode):
                self._adopt_upper(n, self._opath(p.upper, n.name, n.is_dir),
                                  n.is_dir or src_st.st_nlink == 1)
                # its data: still below (a metacopy), else in the copy
                n.metacopy = (self.metacopy and S.S_ISREG(ust.st_mode)
                              and has_metacopy(self, n.upper))
                if n.metacopy and not meta:
                    copy_data_up(self, n, data)
                return n
            raise _err(errno.EEXIST, n.name)
        if n._bits & NB_METACOPY and self.verity != "off":
            check_verity(self, n)   # a lower metacopy file: as the kernel, before copying it
        if self.providers and data and not n.is_dir:
            self.provide_data(n, True)      # (copy_up made n busy)
        src = n.lowers[0][1]
        dsrc = n.datafd         # src, or the data of a metacopy chain
        st = os.stat(src)
        # metadata only: the upper file has no data (a sparse file of the
        # same size), the lower keeps them (the kernel's metacopy)
        mc = meta and self.metacopy and S.S_ISREG(st.st_mode)
        mcval = b""
        if mc and self.verity != "off":
            mcval = metacopy_value(self, dsrc)
            if self.verity == "require" and not mcval:
                mc = False      # data without fs-verity: copied up (the kernel's fallback)
        iname = None
        if self.index and ((not n.is_dir and st.st_nlink > 1) or self.index_all):
            # (a dir's own index entry is made once it is in place)
            iname = index_name(self, src, n.lowers[0][0])
        if p is None and iname is None:
            raise _err(errno.EROFS)
        # the kernel keeps the parent's times across a copy-up into it
        pst = os.stat(p.upper) if p is not None else None
        wd = self.work_fd
        t = self._tmpname()
        tpath = b"/proc/self/fd/%d/%s" % (wd, t)
        fmt = S.S_IFMT(st.st_mode)
        created = False
        # the quota: a new inode, and the data copied (not a metacopy's)
        qbytes = st.st_size if fmt == S.S_IFREG and data and not mc else 0
        q_take(self, qbytes, 1)
        try:
            if fmt == S.S_IFDIR:
                os.mkdir(t, 0o700, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, True)
            elif fmt == S.S_IFREG:
                wfd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600, dir_fd=wd)
                created = True
                try:
                    # a big file: other threads go on while its data are copied
                    # (n is busy: changes to it wait, see _wait_idle)
                    let = self._let_go(data and not mc and st.st_size > COPY_LOCKED_MAX)
                    try:
                        if mc:
                            os.ftruncate(wfd, st.st_size)
                        elif data and st.st_size:
                            rfd = os.open(_proc(dsrc), os.O_RDONLY | O_CLOEXEC)
                            try:
                                sys_copy_data(rfd, wfd, st.st_size, True)
                            finally:
                                os.close(rfd)
                        if not self.no_sync and not mc:
                            # (no data, nothing to flush first: the journal
                            # keeps the metadata in order, as the kernel's
                            # metadata-only copy-up relies on)
                            sys_fsync(wfd)
                    finally:
                        self._take_back(let)
                finally:
                    os.close(wfd)
                tfd = self._opath(wd, t, False)
            elif fmt == S.S_IFLNK:
                target = os.readlink(b"", dir_fd=src)
                os.symlink(target, t, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, False)
            else:
                os.mknod(t, fmt | 0o600, st.st_rdev, dir_fd=wd)
                created = True
                tfd = self._opath(wd, t, False)
            try:
                self._copy_xattrs(src, _proc(tfd))
                ino_kept = False
                if fmt == S.S_IFDIR or st.st_nlink == 1 or iname is not None:
                    # the kernel's origin: the lower object's file handle
                    # (not for one name of a lower hard link, without index)
                    origin = origin_fh(self, src, n.lowers[0][0])
                    try:
                        os.setxattr(_proc(tfd), self.x_origin, origin)
                        if fmt != S.S_IFDIR and n.ino is not None and (
                                not origin or not self.can_decode):
                            # no handle the kernel could follow: keep st_ino
                            # in our own xattr (the kernel would change it)
                            os.setxattr(_proc(tfd), self.x_ino, b"%d" % n.ino)
                    except OSError as e:
                        # user.* xattrs are refused on symlinks and special
                        # files (userxattr); the kernel then has no origin
                        # either: it keeps st_ino until the next mount, then
                        # reports the upper inode number
                        if fmt == S.S_IFREG or fmt == S.S_IFDIR:
                            raise
                        log.debug("copy-up: no origin xattr on %r: %s", n.name, e)
                    ino_kept = True
                if mc:
                    os.setxattr(_proc(tfd), self.x_metacopy, mcval)
                if self._ovr_upper is not None:
                    # the owner and mode shown (the lower's xattr, or its
                    # own) go in the upper's xattr; the daemon keeps the file
                    ov = override_of(self, n) or (st.st_uid, st.st_gid, S.S_IMODE(st.st_mode))
                    if fmt != S.S_IFLNK:
                        os.chmod(_proc(tfd), override_disk_mode(fmt | ov[2]))
                    if not override_write(self, _proc(tfd), ov[0], ov[1], fmt | ov[2], True):
                        _chown_or_not(t, wd, st.st_uid, st.st_gid)
                else:
                    os.chown(t, st.st_uid, st.st_gid, dir_fd=wd, follow_symlinks=False)
                    if fmt != S.S_IFLNK:
                        os.chmod(_proc(tfd), S.S_IMODE(st.st_mode))
                sys_utimens(tpath, st.st_atime_ns, st.st_mtime_ns, True)
                if p is not None:
                    set_impure(self, p)     # as the kernel, before the copy lands
                if iname is not None and fmt != S.S_IFDIR:
                    # the copy of all the names goes to the index (the
                    # overlay nlink is the lower's); this name is linked
                    # to it below, as the others will be (link-up)
                    os.setxattr(_proc(tfd), self.x_nlink, b"U%+d" % (st.st_nlink - 1))
                    sys_renameat2(wd, t, self.index_fd, iname, RENAME_NOREPLACE)
                else:
                    sys_renameat2(wd, t, p.upper, name, RENAME_NOREPLACE)
            except BaseException:
                os.close(tfd)
                raise
            if iname is not None and fmt == S.S_IFDIR:
                # nfs_export: its index entry names the upper dir
                try:
                    make_dir_index(self, iname, tfd)
                    _dirstate(n).indexed = True
                except OSError as e:
                    log.warning("copy-up: no index entry for dir %r: %s", n.name, e)
            if p is not None:
                try:
                    sys_utimens(_proc(p.upper), pst.st_atime_ns, pst.st_mtime_ns, False)
                except OSError as e:
                    log.debug("copy-up: parent times not restored: %s", e)
        except BaseException:
            q_give(self, qbytes, 1)
            if created:
                try:
                    if fmt == S.S_IFDIR:
                        os.rmdir(t, dir_fd=wd)
                    else:
                        os.unlink(t, dir_fd=wd)
                except OSError:
                    pass
            raise
        if n.upper >= 0:
            os.close(tfd)     # a concurrent lookup already found the copy
        else:
            self._adopt_upper(n, tfd, ino_kept)
        if mc:
            # the data stay where they are: the lower object, or the last
            # of a metacopy chain (its top one kept too, as the kernel does)
            n.metacopy = True
            self.counters["metacopy_ups"] += 1
        elif not n.is_dir:
            # the lower object is no longer needed once the copy is in place
            for _, fd in n.lowers:
                os.close(fd)
            n.lowers = []
            n.metacopy = False
        self.counters["copy_ups"] += 1
        if fmt == S.S_IFREG and data and not mc:
            self.counters["bytes_copied"] += st.st_size
        log.debug("copied up %r (ino %s)", n.name, n.ino)
        if iname is not None and fmt != S.S_IFDIR:
            # (fresh: the overlay nlink is the one kept in the xattr, as the
            # kernel's in-memory count, also for a lower file of one link)
            self._indexed[n.key] = (iname, st.st_nlink, True)
            self._link_up(n, p, name)
        return n

    def _link_up(self, Node n, Node p=None, bytes name=None):
        """The kernel's link-up: n, indexed (its copy is in the index), is
        known by a name (name under p, default its own) that is not in the
        upper dir yet; link it there (parents copied up first), with the
        overlay nlink kept."""
        if p is None:
            p, name = n.parent, n.name
        if p is None:
            return
        self.copy_up(p)
        ust = self._upper_entry(p, name)
        if ust is not None:
            if (ust.st_dev, ust.st_ino) == (n.real_dev, n.real_ino):
                return
            if not self._upper_whiteout(p.upper, name, ust):
                raise _err(errno.EEXIST, name)
        nl = overlay_nlink(self, n)
        iname = self._indexed[n.key][0]
        pst = os.stat(p.upper)
        set_impure(self, p)
        set_nlink_upper(self, n, nl)
        if ust is not None:
            # a whiteout in the way (a name that came back): exchange it
            t = self._tmpname()
            os.link(iname, t, src_dir_fd=self.index_fd, dst_dir_fd=self.work_fd,
                    follow_symlinks=False)
            sys_renameat2(self.work_fd, t, p.upper, name, RENAME_EXCHANGE)
            os.unlink(t, dir_fd=self.work_fd)
        else:
            os.link(iname, name, src_dir_fd=self.index_fd, dst_dir_fd=p.upper,
                    follow_symlinks=False)
        set_nlink_upper(self, n, nl)
        p.dircache = None
        try:
            sys_utimens(_proc(p.upper), pst.st_atime_ns, pst.st_mtime_ns, False)
        except OSError as e:
            log.debug("link-up: parent times not restored: %s", e)
