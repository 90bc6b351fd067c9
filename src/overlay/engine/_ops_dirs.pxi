"""Part of overlay.engine.bridge (included by bridge.pyx): directories: no
handles (the kernel caches listings), readdir and readdirplus.

Directory offsets are stable per name, as tmpfs makes them: the entries of
a dir get offsets 1, 2, 3... in the order first listed, a name keeps its
offset while it is there, a new name gets the next one. A listing is made
at every read from offset 0 and kept while it is read, sorted by offset; a
read from offset k gives the entries with offsets above k. So a seek to
any offset gives the entries that follow it (an unchanged dir reads as
the kernel overlay's merged dirs, whose offset k is the k-th entry), and a
reader that goes on while the dir changes, or while another reader starts
a newer listing, gets every entry that stayed exactly once.
"""

# dirs with more entries than this forget their names' offsets once read to
# the end (the next listing numbers them again in its order): the memory of
# a name each is kept for smaller dirs only
DEF STABLE_OFFSETS_MAX = 65536


cdef class _DirOffsets:
    """The offsets of one dir's names and the listing being read."""
    cdef dict offset        # name -> offset (1, 2... in the order first listed)
    cdef uint64_t next      # the offset a new name gets
    cdef list entries       # [(name, Node, Stat)] being read, by offset, or None
    cdef list offsets       # their offsets, ascending

    def __cinit__(self):
        self.offset = {}
        self.next = 1


cdef _relist(OverlayFS self, Node node, _DirOffsets d):
    """A new listing of node in d, the offsets of the names that stayed kept."""
    entries = _listing(self, node)
    old = d.offset
    new = {}
    keyed = []
    for e in entries:
        name = e[0]
        off = old.get(name, 0)
        if not off:
            off = d.next
            d.next += 1
        new[name] = off
        keyed.append((off, e))
    keyed.sort(key=lambda oe: oe[0])
    d.offset = new
    d.offsets = [oe[0] for oe in keyed]
    d.entries = [oe[1] for oe in keyed]


cdef int op_opendir(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    """No directory handles: ENOSYS makes the kernel open every dir without
    asking (and without RELEASEDIR), keep the listings it reads in its
    page cache (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR) and start over when
    the dir's mtime or version changes, as any change through the mount
    does. Warm find and ls -R then never reach us.

    Except on a mount made with strictatime, where every listing must read
    the upper dir (its atime, as the kernel overlay's): dirs get (empty)
    handles, without caching while the mount is strictatime (a remount
    may change that); once ENOSYS is answered the kernel asks no more."""
    cdef fuse_open_out o
    if self.dir_handles:
        memset(&o, 0, sizeof(o))
        if not self.strictatime:
            o.open_flags = FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR
        self.reply(fd, h.unique, &o, sizeof(o))
        return 0
    self.reply_err(fd, h.unique, E.ENOSYS)
    return 0


cdef list _listing(OverlayFS self, node):
    """[(name, Node, Stat)] of the dir, with . and .. first."""
    parent = node.parent if node.parent is not None else node
    core = self.core
    entries = [(b".", node, core.getattr(node)), (b"..", parent, core.getattr(parent))]
    for name, child in core.readdir(node):
        st, child.st = child.st, None
        if st is None:
            try:
                st = core.getattr(child)
            except FileNotFoundError:
                continue
        entries.append((name, child, st))
    return entries


cdef int op_readdir(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n, bint plus) except -1:
    cdef fuse_read_in *a = <fuse_read_in*>arg
    cdef uint64_t unique = h.unique
    cdef uint64_t start = a.offset
    cdef size_t size = a.size
    cdef char *out = (<char*>h) + sizeof(fuse_out_header)
    cdef size_t used = 0, reclen, namelen
    cdef fuse_direntplus *dp
    cdef fuse_dirent *de
    cdef Py_ssize_t i, count
    cdef bytes name
    cdef list counted = []
    cdef _DirOffsets d
    cdef Py_ssize_t dir_budget
    if size > READ_BUFFER - sizeof(fuse_out_header):
        size = READ_BUFFER - sizeof(fuse_out_header)
    with self.lock:
        d = self.listings.get(h.nodeid)
        if d is None or start == 0 or d.entries is None:
            node = self._node(h.nodeid)
            if not node.is_dir:
                raise OSError(E.ENOTDIR, "not a directory")
            if d is None:
                d = self.listings[h.nodeid] = _DirOffsets()
            _relist(self, node, d)
        entries, offsets = d.entries, d.offsets
        count = len(entries)
        i = bisect_right(offsets, start)
        done = i >= count
        # (a dir the kernel knows holds O_PATH fds here: past half of
        # fd_high, a listing's dirs go as plain entries, no node id, as
        # READDIR gives them; the kernel looks one up when it is used)
        dir_budget = self.fd_high // 2 - self.kdirs
        while i < count:
            name, child, st = entries[i]
            namelen = len(name)
            if plus:
                reclen = _align8(sizeof(fuse_direntplus) + namelen)
                if used + reclen > size:
                    break
                dp = <fuse_direntplus*>(out + used)
                memset(dp, 0, reclen)
                dot = name == b"." or name == b".."
                if dot:
                    self._fill_attr(&dp.entry_out.attr, child, st)
                elif not (<Node>child).is_dir or dir_budget > 0:
                    self._fill_entry(&dp.entry_out, child, st)
                    counted.append(child)
                    if (<Node>child).is_dir:
                        dir_budget -= 1
                de = &dp.dirent
            else:
                reclen = _align8(sizeof(fuse_dirent) + namelen)
                if used + reclen > size:
                    break
                de = <fuse_dirent*>(out + used)
                memset(de, 0, reclen)
            de.ino = self._shown_ino(child.ino)
            de.off = <uint64_t>offsets[i]       # where a reader goes on: after this one
            de.namelen = namelen
            de.type = (st.st_mode & 0o170000) >> 12
            memcpy((<char*>de) + sizeof(fuse_dirent), PyBytes_AS_STRING(name), namelen)
            used += reclen
            i += 1
        if done:
            # read to the end: the kernel has it; the listing goes, the
            # names' offsets stay (for a small dir)
            if count > STABLE_OFFSETS_MAX:
                del self.listings[h.nodeid]
            else:
                d.entries = d.offsets = None
        keys = [self._ref(c) for c in counted]
    if self.reply(fd, unique, out, used) == -E.ENOENT and keys:
        with self.lock:
            for k in keys:
                self._forget(k, 1)
    return 0
