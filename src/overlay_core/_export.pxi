"""Part of overlay_core._core (included by _core.pyx): file handles of the
merged tree's objects (nfs_export=on), as the kernel's overlay encodes and
decodes them (fs/overlayfs/export.c). Functions of an Overlay and of a
_Stack.

A handle is an ovl_fb (_origin.pxi) of a real object:
* a non-upper object: its lower object's handle (the layer found by uuid);
* an indexed object (every copy-up with nfs_export): its origin's, which
  the index maps to the upper copy;
* an upper object that is not indexed (pure upper, or copied up without
  nfs_export): its upper object's handle, flagged PATH_UPPER;
* the root: b"R".
Decoding follows the kernel's steps: a whiteout in the index means the
object was removed (ESTALE); a dir is found again by its path, so the Node
returned is connected; a non-dir may come back without a parent (the
kernel's disconnected dentry): it can be read and written (a lower one is
then copied up into the index only, and its name finds that copy later),
and gets its parent at the next lookup of a name of it.

The adapter decides what the handles are used for: the native engine keeps
the handle of each node id the kernel forgot, so the kernel's file handles
(node ids) stay good for the life of the mount (_ops_tree.pxi)."""

# deepest dir a handle is decoded for (a loop guard when walking up)
PATH_WALK_MAX = 4096
ROOT_HANDLE = b"R"


cdef bytes _name_in(int dirfd, unsigned long long dev, unsigned long long ino):
    """The name of the dir (dev, ino) in the dir behind (O_PATH) dirfd, or
    None (the kernel's exportfs get_name, by reading the dir)."""
    cdef struct_stat st
    rfd = os.open(b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=dirfd)
    try:
        with os.scandir(rfd) as it:
            for e in it:
                if e.inode() != ino:
                    continue
                nm = os.fsencode(e.name)
                if c_statat(dirfd, nm, &st) == 0 and st.st_ino == ino and st.st_dev == dev:
                    return nm
    finally:
        os.close(rfd)
    return None


cdef object path_below(int root, int fd):
    """[names] from the dir behind root down to the dir behind fd (both
    O_PATH fds on one filesystem), found by walking up through "..", or
    None where fd's dir is not below root."""
    cdef struct_stat rst, st, pst
    if fstat(root, &rst) != 0:
        raise _err(errno.EIO)
    names = []
    cur = os.dup(fd)
    try:
        for _ in range(PATH_WALK_MAX):
            if fstat(cur, &st) != 0:
                return None
            if st.st_dev == rst.st_dev and st.st_ino == rst.st_ino:
                names.reverse()
                return names
            par = os.open(b"..", O_PATH | O_DIRECTORY | O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = par
            if fstat(par, &pst) != 0 or (pst.st_dev == st.st_dev and pst.st_ino == st.st_ino):
                return None     # the filesystem's root, not passing root
            nm = _name_in(par, st.st_dev, st.st_ino)
            if nm is None:
                return None     # removed meanwhile
            names.append(nm)
        return None
    finally:
        os.close(cur)


cdef int decode_upper(_Stack self, bytes v) except -2:
    """O_PATH fd of the upper object a PATH_UPPER handle v names, or -1
    where it is stale: gone, another filesystem's, or a dir no longer
    below the upper root (the kernel's ovl_acceptable)."""
    fh = parse_fh(v)
    if fh is None or self.upper_root < 0 or not v[3] & FH_FLAG_PATH_UPPER:
        return -1
    htype, uuid, fid = fh
    if uuid != self._upper_uuid:
        return -1
    if self._upper_mount_fd < 0:
        self._upper_mount_fd = os.open(_proc(self.upper_root),
                                       os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        fd = sys_open_by_handle(self._upper_mount_fd, htype, fid, O_PATH | O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ESTALE, errno.ENOENT, errno.EINVAL):
            return -1
        raise
    if S.S_ISDIR(sys_fstat(fd).st_mode) and path_below(self.upper_root, fd) is None:
        os.close(fd)
        return -1
    return fd


cdef object decode_lower(_Stack self, bytes v):
    """(layer, O_PATH fd) of the lower object handle v names, trying each
    layer of its uuid, or None (stale), as the kernel's ovl_check_origin_fh."""
    cdef int i
    fh = parse_fh(v)
    if fh is None or v[3] & FH_FLAG_PATH_UPPER or not self.can_decode:
        return None
    htype, uuid, fid = fh
    for i in range(self.nlower):
        if i in self._bad_uuid_layers:
            continue
        if (uuid != NULL_UUID) if self.uuid_mode == "off" else (uuid != self.layer_uuids[i]):
            continue
        try:
            fd = sys_open_by_handle(mount_fd(self, i), htype, fid, O_PATH | O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ESTALE, errno.ENOENT, errno.EINVAL, errno.EXDEV):
                continue
            raise
        if S.S_ISDIR(sys_fstat(fd).st_mode) and path_below(self.lower_roots[i], fd) is None:
            os.close(fd)
            continue        # a dir of another layer on the same filesystem
        return i, fd
    return None


cdef bytes _encode_handle(Overlay self, Node n):
    """The handle of n, by the kernel's rules (module docstring)."""
    cdef Node d
    if n is self.root:
        return ROOT_HANDLE
    if n.upper >= 0:
        indexed = (n._dir is not None and n._dir.indexed) if n.is_dir else n.key in self._indexed
        if indexed:
            v = self._getx(n.upper, self.x_origin)
            if v and len(v) >= FH_HEADER:
                return bytes(v[:v[2]])
        return encode_fh(n.upper, self._upper_uuid, True)
    layer, fd = n.lowers[0]
    return origin_fh(self, fd, layer)


cdef Node _walk(Overlay self, list names):
    """The Node at names below the root."""
    cdef Node n = self.root
    for nm in names:
        n = self.lookup(n, nm)
    return n


cdef Node _decode_dir(Overlay self, int fd, int layer):
    """The connected Node of the dir behind fd: in the upper layer
    (layer -1), or in lower layer `layer`, where a copied-up ancestor
    (found through the index) may have moved since."""
    if layer < 0:
        names = path_below(self.upper_root, fd)
        if names is None:
            raise _err(errno.ESTALE)
    else:
        names = path_below(self.lower_roots[layer], fd)
        if names is None:
            raise _err(errno.ESTALE)
        if self.index_all and names:
            # the nearest ancestor copied up (and maybe renamed since):
            # its index entry names its upper dir
            base = self.lower_roots[layer]
            anc = [os.dup(base)]
            try:
                for nm in names:
                    anc.append(self._opath(anc[-1], nm, True))
                for k in range(len(names), 0, -1):
                    iname = index_name(self, anc[k], layer)
                    if iname is None:
                        break
                    up = _dir_index_upper(self, iname)
                    if up is None:
                        continue
                    if up < 0:
                        raise _err(errno.ESTALE)       # removed: a whiteout
                    try:
                        head = path_below(self.upper_root, up)
                    finally:
                        os.close(up)
                    if head is None:
                        raise _err(errno.ESTALE)
                    names = head + names[k:]
                    break
            finally:
                for f in anc:
                    os.close(f)
    try:
        n = _walk(self, names)
    except FileNotFoundError:
        raise _err(errno.ESTALE) from None
    cdef struct_stat st
    if fstat(fd, &st) != 0 or not n.is_dir:
        raise _err(errno.ESTALE)
    for f in ([n.upper] if layer < 0 else [f for i, f in n.lowers if i == layer]):
        s2 = sys_fstat(f)
        if s2.st_dev == st.st_dev and s2.st_ino == st.st_ino:
            return n
    raise _err(errno.ESTALE)


cdef object _dir_index_upper(Overlay self, bytes iname):
    """The upper dir fd a dir index entry names, None where there is no
    such entry, -1 where the entry is a whiteout (removed)."""
    cdef struct_stat st
    if self.index_fd < 0 or c_statat(self.index_fd, iname, &st) != 0:
        return None
    if S.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return -1
    if not S.S_ISDIR(st.st_mode):
        return None
    efd = self._opath(self.index_fd, iname, True)
    try:
        v = self._getx(efd, self.x_upper)
    finally:
        os.close(efd)
    if v is None:
        return None
    fd = decode_upper(self, v)
    return fd if fd >= 0 else -1


cdef Node _disconnected(Overlay self, int upper, int layer, int lfd, Stat st, object indexed):
    """A Node for a decoded non-dir that no known Node stands for: no
    parent until a lookup of one of its names finds it (see _intern)."""
    cdef Node n = Node()
    n.parent = None
    n.name = b""
    n.is_dir = False
    n.ov = self
    if upper >= 0:
        n.upper = upper
        n.key = _realkey(st.st_dev, st.st_ino)
        if indexed is not None:
            self._indexed[n.key] = indexed
        n.ino = upper_ino(self, upper, st)
        if lfd >= 0:
            os.close(lfd)
    else:
        n.lowers = [(layer, lfd)]
        n.key = _realkey(st.st_dev, st.st_ino)
        n.ino = self.map_ino(st)
    n.real_dev, n.real_ino = st.st_dev, st.st_ino
    n._has_real = True
    self.nodes[n.key] = n
    return n


cdef Node _decode_handle(Overlay self, bytes h):
    """The Node a handle (_encode_handle) stands for now, or ESTALE."""
    cdef struct_stat st
    self.counters["handles_decoded"] += 1
    if h == ROOT_HANDLE:
        return self.root
    fh = parse_fh(h)
    if fh is None:
        raise _err(errno.ESTALE)
    if h[3] & FH_FLAG_PATH_UPPER:
        fd = decode_upper(self, h)
        if fd < 0:
            raise _err(errno.ESTALE)
        ust = sys_fstat(fd)
        if S.S_ISDIR(ust.st_mode):
            try:
                return _decode_dir(self, fd, -1)
            finally:
                os.close(fd)
        known = self.nodes.get(_realkey(ust.st_dev, ust.st_ino))
        if known is not None and not (<Node>known).is_dir:
            os.close(fd)
            return known
        if ust.st_nlink == 0:
            os.close(fd)
            raise _err(errno.ESTALE)
        return _disconnected(self, fd, -1, -1, ust, None)
    found = decode_lower(self, h)
    if found is None:
        raise _err(errno.ESTALE)
    layer, lfd = found
    try:
        lst = sys_fstat(lfd)
        iname = h[:h[2]].hex().encode()
        if self.index_fd >= 0 and c_statat(self.index_fd, iname, &st) == 0:
            if S.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                raise _err(errno.ESTALE)        # removed since
            if S.S_ISDIR(lst.st_mode):
                up = _dir_index_upper(self, iname)
                if up is None or up < 0:
                    raise _err(errno.ESTALE)
                try:
                    return _decode_dir(self, up, -1)
                finally:
                    os.close(up)
            if S.S_IFMT(st.st_mode) != S.S_IFMT(lst.st_mode):
                raise _err(errno.EIO)
            known = self.nodes.get(_realkey(st.st_dev, st.st_ino))
            if known is not None:
                return known
            ifd = self._opath(self.index_fd, iname, False)
            return _disconnected(self, ifd, layer, -1, _mkstat(&st),
                                 (iname, lst.st_nlink, False))
        if S.S_ISDIR(lst.st_mode):
            return _decode_dir(self, lfd, layer)
        known = self.nodes.get(_realkey(lst.st_dev, lst.st_ino))
        if known is not None:
            return known
        n = _disconnected(self, -1, layer, lfd, lst, None)
        lfd = -1        # the Node owns it now
        return n
    finally:
        if lfd >= 0:
            os.close(lfd)
