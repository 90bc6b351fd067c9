"""Part of overlay_core._core (included by _core.pyx): the inodes index
(index=on), in the kernel's format. Functions of a _Stack, used by lookup,
copy-up and the namespace changes.

With index=on, a lower file with several hard links is copied up once for
all its names: the copy goes to <work>/index/<hex of its origin file
handle>, and each name that is written to, renamed, linked or removed is
hard-linked from there into the upper dir ("link-up"). A name not linked up
yet still finds the copy through the index at lookup, so every name shows
the same data, st_ino (the lower file's) and nlink. The overlay's nlink is
kept in <prefix>nlink on the copy, "U+d" (the upper inode's nlink plus d)
or "L+d" (the lower one's plus d).

At mount the upper root's <prefix>origin names the top lower layer's root
and the index dir's <prefix>upper names the upper root: a mount of the same
upper over other layers is refused (ESTALE), as the kernel refuses it. The
index is cleaned of leftovers and of entries no name leads to any more.

With nfs_export=on (index_all) every copy-up is indexed: a non-dir as
above (also with one link), a dir gets an index entry of its own, an empty
dir (mode 0) whose <prefix>upper names the upper dir. An object removed
for good leaves a whiteout in the index (so its file handle is known to be
stale), lower dirs found at lookup are checked against the upper dir's
origin, and only indexed objects report their origin's st_ino."""


cdef setup_index(_Stack self):
    """index=on: check the layers can have it (else index=off, as the
    kernel falls back), verify or set the upper root's origin and the
    index dir's upper handle, and clean the index."""
    self._indexed = {}
    self.index_fd = -1
    self.index_all = False
    if self.upper_root < 0:
        self.index = False      # the index lives in the work dir
    if not self.index and not self.nfs_export:
        return
    why = None
    if self.upper_root >= 0:
        try:
            sys_name_to_handle(self.upper_root)
        except OSError:
            why = "upper fs does not support file handles"
    for i, fd in enumerate(self.lower_roots):
        try:
            sys_name_to_handle(fd)
        except OSError:
            why = "fs on '%s' does not support file handles" % os.fsdecode(self.lower_paths[i])
    if self._bad_uuid_layers:
        i = min(self._bad_uuid_layers)
        why = "conflicting uuid detected in lower fs '%s'" % os.fsdecode(self.lower_paths[i])
    if why is not None:
        log.warning("%s, falling back to index=off%s", why, ",nfs_export=off" if self.nfs_export else "")
        self.index = self.nfs_export = False
        return
    if not self.index:
        if self.upper_root >= 0:
            log.warning('NFS export requires "index=on", falling back to nfs_export=off')
            self.nfs_export = False
        return          # nfs_export without upper: lower handles only
    self.index_all = self.nfs_export
    upper = os.fsdecode(self.upper_path)
    hint = ("mount with index=off, or remove %s/index to start a new index"
            % os.fsdecode(self.work_path))
    fh = origin_fh(self, self.lower_roots[0], 0)
    have = self._getx(self.upper_root, self.x_origin)
    if have is None:
        os.setxattr(_proc(self.upper_root), self.x_origin, fh)
    elif have != fh:
        raise OSError(errno.ESTALE, "failed to verify upper root origin: %s was used with"
                      " index=on over other lower layers (%s)" % (upper, hint))
    try:
        os.mkdir(b"index", 0, dir_fd=self._work_base)
    except FileExistsError:
        pass
    self.index_fd = os.open(b"index", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                            dir_fd=self._work_base)
    uuid = NULL_UUID if self.uuid_mode == "off" else fs_uuid_of(self.upper_root)
    self._upper_uuid = uuid
    ufh = encode_fh(self.upper_root, uuid, True)
    have = self._getx(self.index_fd, self.x_upper)
    if have is None:
        os.setxattr(_proc(self.index_fd), self.x_upper, ufh)
    elif have != ufh:
        raise OSError(errno.ESTALE, "failed to verify index dir 'upper' xattr: the index in %s"
                      " belongs to another upper dir than %s (%s)"
                      % (os.fsdecode(self.work_path), upper, hint))
    clean_index(self, hint)


cdef clean_index(_Stack self, str hint):
    """The kernel's index cleanup at mount: leftovers (#...) go, entries
    whose origin no longer matches their name (stale) go, entries that no
    name leads to (orphans) go, or become whiteouts with nfs_export (their
    file handles stay known as stale); an entry the kernel could not read
    refuses the mount, as it does (the index must not be corrupted further).
    Dir entries are checked with nfs_export only."""
    cdef struct_stat st
    cdef int fd = self.index_fd
    for name in _listdir(fd):
        if c_statat(fd, name, &st) != 0:
            continue
        if name.startswith(b"#"):
            if S.S_ISDIR(st.st_mode):
                sub = self._opath(fd, name, True)
                try:
                    self._clean_dir(sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
            continue
        try:
            key = bytes.fromhex(name.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if parse_fh(key) is None:      # too short, no magic, bad length or version
            raise OSError(errno.EINVAL, "failed to verify index entry %r in %s/index (%s)"
                          % (os.fsdecode(name), os.fsdecode(self.work_path), hint))
        if S.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            continue    # whiteouts stay
        if S.S_ISDIR(st.st_mode):
            verdict = check_dir_index(self, name, key, hint) if self.index_all else 0
        else:
            verdict = check_file_index(self, name, key, &st, hint)
        if verdict == 1 or (verdict == 2 and not self.index_all):
            log.info("removing stale or orphan index entry %r", os.fsdecode(name))
            if S.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        elif verdict == 2:
            log.info("whiting out orphan index entry %r", os.fsdecode(name))
            index_whiteout(self, name, S.S_ISDIR(st.st_mode))


cdef int check_file_index(_Stack self, bytes name, bytes key, struct_stat *st, str hint) except -1:
    """0: a good non-dir index entry, 1: stale (its origin is not its
    name, or is gone), 2: an orphan (no name leads to it)."""
    efd = self._opath(self.index_fd, name, False)
    try:
        v = self._getx(efd, self.x_origin)
        if v is None:
            raise OSError(errno.ENODATA, "failed to verify index entry %r in %s/index: it has"
                          " no origin (%s)" % (os.fsdecode(name), os.fsdecode(self.work_path), hint))
        if len(v) < FH_HEADER or v[:v[2]] != key[:key[2]]:
            return 1
        if st.st_nlink == 1 and self.can_decode:
            what, ost = origin_stat(self, efd, st.st_mode)
            if what == 1:
                return 1
            if what == 2 and nlink_value(self, efd, 1, ost.st_nlink, 0, False) <= 0:
                return 2
        return 0
    finally:
        os.close(efd)


cdef int check_dir_index(_Stack self, bytes name, bytes key, str hint) except -1:
    """nfs_export: 0 a good dir index entry, 1 stale (no upper xattr, or
    its upper dir has another origin), 2 an orphan (its upper dir is gone);
    an upper that is not a dir or has no origin refuses the mount, as the
    kernel's ovl_verify_index."""
    efd = self._opath(self.index_fd, name, True)
    try:
        v = self._getx(efd, self.x_upper)
    finally:
        os.close(efd)
    if v is None:
        return 1
    ufd = decode_upper(self, v)
    if ufd < 0:
        return 2
    try:
        if not S.S_ISDIR(sys_fstat(ufd).st_mode):
            raise OSError(errno.EIO, "invalid index upper of %r in %s/index (%s)"
                          % (os.fsdecode(name), os.fsdecode(self.work_path), hint))
        o = self._getx(ufd, self.x_origin)
    finally:
        os.close(ufd)
    if o is None:
        raise OSError(errno.ENODATA, "failed to verify index entry %r in %s/index: its upper"
                      " dir has no origin (%s)" % (os.fsdecode(name), os.fsdecode(self.work_path), hint))
    return 0 if o[:o[2]] == key[:key[2]] and len(o) >= FH_HEADER else 1


cdef index_whiteout(_Stack self, bytes name, bint is_dir):
    """Replace index entry name by a whiteout (nfs_export: the object is
    gone for good, its file handle must not be decoded any more), as the
    kernel's ovl_cleanup_and_whiteout: a dir entry is exchanged, then
    removed."""
    t = self._make_whiteout()
    try:
        sys_renameat2(self.work_fd, t, self.index_fd, name, RENAME_EXCHANGE if is_dir else 0)
    except BaseException:
        os.unlink(t, dir_fd=self.work_fd)
        raise
    if is_dir:
        sub = self._opath(self.work_fd, t, True)
        try:
            self._clean_dir(sub)
        finally:
            os.close(sub)
        os.rmdir(t, dir_fd=self.work_fd)


cdef make_dir_index(_Stack self, bytes iname, int upper_fd):
    """nfs_export: the index entry of a copied-up dir: an empty dir
    (mode 0) whose <prefix>upper names the upper dir (the kernel's
    ovl_create_index), made in the work dir and renamed into place."""
    t = self._tmpname()
    os.mkdir(t, 0, dir_fd=self.work_fd)
    try:
        os.setxattr(b"/proc/self/fd/%d/%s" % (self.work_fd, t), self.x_upper,
                    encode_fh(upper_fd, self._upper_uuid, True))
        sys_renameat2(self.work_fd, t, self.index_fd, iname, 0)
    except BaseException:
        os.rmdir(t, dir_fd=self.work_fd)
        raise


cdef int dir_index_state(_Stack self, bytes iname, int upper_fd) except -2:
    """nfs_export: what the index says of a dir whose origin gives iname:
    0 no entry, 1 an entry naming upper_fd (indexed); EIO for anything
    else (a whiteout, another type, another upper dir, an entry for a
    dir not in the upper layer), as the kernel's ovl_lookup_index."""
    cdef struct_stat st
    err = c_statat(self.index_fd, iname, &st)
    if err == ENOENT:
        return 0
    if err:
        raise _err(err, iname)
    if S.S_ISDIR(st.st_mode) and upper_fd >= 0:
        efd = self._opath(self.index_fd, iname, True)
        try:
            v = self._getx(efd, self.x_upper)
        finally:
            os.close(efd)
        if v is not None and v == encode_fh(upper_fd, self._upper_uuid, True):
            return 1
        log.warning("suspected multiply redirected dir found (index %r)", os.fsdecode(iname))
    elif S.S_ISDIR(st.st_mode):
        log.warning("suspected uncovered redirected dir found (index %r)", os.fsdecode(iname))
    else:
        log.warning("bad index found (index %r, mode %o)", os.fsdecode(iname), st.st_mode)
    raise _err(errno.EIO, iname)


cdef bytes index_name(_Stack self, int lower_fd, int layer):
    """The index entry name of a lower object (hex of its file handle), or
    None where it has no handle."""
    fh = origin_fh(self, lower_fd, layer)
    return fh.hex().encode() if fh else None


cdef long nlink_value(_Stack self, int upper_fd, unsigned long long upper_nlink,
                      unsigned long long lower_nlink, long fallback, bint fresh):
    """The overlay nlink <prefix>nlink gives (0 or less: no name is left),
    or fallback where it is missing or malformed, or where the lower file
    has one link, as the kernel's ovl_get_nlink. fresh: copied up by this
    mount, where the kernel counts in memory what the xattr says, also for
    a lower file of one link (nfs_export)."""
    if lower_nlink == 1 and not fresh:
        return fallback
    v = self._getx(upper_fd, self.x_nlink)
    if v is None or len(v) < 3 or v[0:1] not in (b"U", b"L") or v[1:2] not in (b"+", b"-"):
        return fallback
    try:
        d = int(v[1:])
    except ValueError:
        return fallback
    return (upper_nlink if v[0:1] == b"U" else lower_nlink) + d


cdef unsigned long long indexed_nlink(_Stack self, Node n, unsigned long long real_nlink):
    """The nlink to report for n whose upper inode has real_nlink links:
    the overlay's where n is indexed."""
    info = self._indexed.get(n.key)
    if info is None:
        return real_nlink
    cdef long nl = nlink_value(self, n.upper, real_nlink, info[1], real_nlink, info[2])
    return nl if nl > 0 else real_nlink


cdef Stat indexed_stat(_Stack self, Node n, Stat st):
    """st (of n's upper inode) with the overlay nlink where n is indexed."""
    st.st_nlink = indexed_nlink(self, n, st.st_nlink)
    return st


cdef Stat find_index(_Stack self, Node n, int lower_fd, int layer, Stat lst):
    """A lower file with several links (n, found by name): is its copy in
    the index? Then n is that copy (n.upper, key, real), and its Stat is
    returned; else None. A whiteout or an entry of another type in the
    index is an error (EIO), as in the kernel."""
    cdef struct_stat st
    name = index_name(self, lower_fd, layer)
    if name is None:
        return None
    err = c_statat(self.index_fd, name, &st)
    if err == ENOENT:
        return None
    if err:
        raise _err(err, n.name)
    if S.S_IFMT(st.st_mode) != S.S_IFMT(lst.st_mode):
        log.warning("bad index entry %r (mode %o, origin mode %o)", os.fsdecode(name),
                    st.st_mode, lst.st_mode)
        raise _err(errno.EIO, n.name)
    n.upper = self._opath(self.index_fd, name, False)
    n.key = _realkey(st.st_dev, st.st_ino)
    if n.key not in self._indexed:      # (a copy made by this mount stays fresh)
        self._indexed[n.key] = (name, lst.st_nlink, False)
    return _mkstat(&st)


cdef bint check_indexed(_Stack self, int upper_fd, Stat st, Stat ost):
    """An upper file whose origin (ost) has several links: is it the copy
    in the index (then every name of the origin is this inode)?"""
    cdef struct_stat ist
    v = self._getx(upper_fd, self.x_origin)
    if not v or len(v) < FH_HEADER or v[2] > len(v):
        return False
    name = v[:v[2]].hex().encode()
    if c_statat(self.index_fd, name, &ist) != 0:
        return False
    if ist.st_dev != st.st_dev or ist.st_ino != st.st_ino:
        return False        # copied up without index, or an index made anew since
    key = _realkey(st.st_dev, st.st_ino)
    if key not in self._indexed:        # (a copy made by this mount stays fresh)
        self._indexed[key] = (name, ost.st_nlink, False)
    return True


cdef set_nlink_upper(_Stack self, Node n, long overlay_nlink):
    """Store the overlay nlink relative to the upper inode's ("U+d"), as
    the kernel does before every change of it and after a link-up."""
    cdef long d = overlay_nlink - sys_fstat(n.upper).st_nlink
    v = b"U%+d" % d
    if self._getx(n.upper, self.x_nlink) != v:
        os.setxattr(_proc(n.upper), self.x_nlink, v)


cdef long overlay_nlink(_Stack self, Node n):
    """The overlay nlink of an indexed n now (0 or less: no name left)."""
    cdef unsigned long long unl = sys_fstat(n.upper).st_nlink
    info = self._indexed[n.key]
    return nlink_value(self, n.upper, unl, info[1], unl, info[2])
