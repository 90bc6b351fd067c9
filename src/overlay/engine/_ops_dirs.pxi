"""Part of overlay.engine.bridge (included by bridge.pyx): directories: no
handles (the kernel caches listings), readdir and readdirplus.

Without handles, a listing is made for every read from offset 0 and kept
while it is read: its generation number is in the high half of every
offset cookie handed out, so a reader that goes on (or comes back to an
earlier offset) reads the listing it started, even if another reader of the
same dir started a newer one meanwhile. A few generations are kept per dir.
"""

# listings kept per dir (readers that stopped early leave theirs behind)
DEF LISTINGS_PER_DIR = 4


cdef int op_opendir(OverlayFS self, int fd, fuse_in_header *h, char *arg, size_t n) except -1:
    """No directory handles: ENOSYS makes the kernel open every dir without
    asking (and without RELEASEDIR), keep the listings it reads in its
    page cache (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR) and start over when
    the dir's mtime or version changes, as any change through the mount
    does. Warm find and ls -R then never reach us.

    Except under strictatime, where every listing must read the upper dir
    (its atime, as the kernel overlay's): a handle without caching."""
    cdef fuse_open_out o
    if self.strictatime:
        memset(&o, 0, sizeof(o))
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
    cdef uint64_t gen = start >> 32
    cdef bytes name
    cdef list counted = []
    if size > READ_BUFFER - sizeof(fuse_out_header):
        size = READ_BUFFER - sizeof(fuse_out_header)
    with self.lock:
        kept = self.listings.get(h.nodeid)
        entries = kept.get(gen) if kept is not None and start else None
        if entries is None:
            node = self._node(h.nodeid)
            if not node.is_dir:
                raise OSError(E.ENOTDIR, "not a directory")
            entries = _listing(self, node)
            if kept is None:
                kept = self.listings[h.nodeid] = {}
            elif len(kept) >= LISTINGS_PER_DIR:
                del kept[min(kept)]
            self.next_gen = (self.next_gen % 0x7fffffff) + 1
            gen = self.next_gen
            kept[gen] = entries
        count = len(entries)
        i = start & 0xffffffff
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
                else:
                    self._fill_entry(&dp.entry_out, child, st)
                    counted.append(child)
                de = &dp.dirent
            else:
                reclen = _align8(sizeof(fuse_dirent) + namelen)
                if used + reclen > size:
                    break
                de = <fuse_dirent*>(out + used)
                memset(de, 0, reclen)
            de.ino = self._shown_ino(child.ino)
            de.off = (gen << 32) | <uint64_t>(i + 1)
            de.namelen = namelen
            de.type = (st.st_mode & 0o170000) >> 12
            memcpy((<char*>de) + sizeof(fuse_dirent), PyBytes_AS_STRING(name), namelen)
            used += reclen
            i += 1
        if <Py_ssize_t>(start & 0xffffffff) >= count:
            del kept[gen]                       # read to the end: the kernel has it
        keys = [self._ref(c) for c in counted]
    if self.reply(fd, unique, out, used) == -E.ENOENT and keys:
        with self.lock:
            for k in keys:
                self._forget(k, 1)
    return 0
