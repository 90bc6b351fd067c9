"""Part of overlay_core._core (included by _core.pyx): Overlay, the changes to
the merged tree: create, mkdir, mknod, symlink, link, O_TMPFILE, open and
setattr (copying up first), xattrs (the kernel's escaping of overlay.*
names), unlink and rmdir (whiteouts, opaque dirs), rename (RENAME_NOREPLACE,
RENAME_EXCHANGE, redirects), statfs, syncfs, fsync. The class the adapters
use; everything before it is in its base classes."""


# the tags of POSIX ACL entries (the xattr: a version word 2, then entries
# of tag, permissions (u16 each) and id (u32), little-endian)
DEF ACL_USER_OBJ = 0x01
DEF ACL_USER = 0x02
DEF ACL_GROUP_OBJ = 0x04
DEF ACL_GROUP = 0x08
DEF ACL_MASK = 0x10
DEF ACL_OTHER = 0x20


def acl_create_masq(bytes dflt, int mode):
    """The kernel's posix_acl_create_masq: the mode of a new object asked
    for with mode under the default ACL dflt, and the access ACL it gets
    (None where the ACL says no more than the mode)."""
    import struct
    if len(dflt) < 4 or (len(dflt) - 4) % 8 or struct.unpack_from("<I", dflt)[0] != 2:
        raise _err(errno.EINVAL, b"bad default ACL")
    entries = [list(struct.unpack_from("<HHI", dflt, off)) for off in range(4, len(dflt), 8)]
    cdef int m = mode
    group_obj = mask_obj = None
    not_equiv = False
    for e in entries:
        if e[0] == ACL_USER_OBJ:
            e[1] &= (m >> 6) | ~7
            m &= (e[1] << 6) | ~0o700
        elif e[0] == ACL_USER or e[0] == ACL_GROUP:
            not_equiv = True
        elif e[0] == ACL_GROUP_OBJ:
            group_obj = e
        elif e[0] == ACL_OTHER:
            e[1] &= m | ~7
            m &= e[1] | ~7
        elif e[0] == ACL_MASK:
            mask_obj = e
            not_equiv = True
        else:
            raise _err(errno.EINVAL, b"bad default ACL")
    if mask_obj is not None:
        mask_obj[1] &= (m >> 3) | ~7
        m &= (mask_obj[1] << 3) | ~0o70
    elif group_obj is not None:
        group_obj[1] &= (m >> 3) | ~7
        m &= (group_obj[1] << 3) | ~0o70
    else:
        raise _err(errno.EINVAL, b"bad default ACL")
    mode = (mode & ~0o777) | (m & 0o777)
    if not not_equiv:
        return mode, None
    return mode, struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p & 0xFFFF, i)
                                                 for t, p, i in entries)


cdef class Overlay(_Quota):
    """The layer stack and every operation on the merged tree."""

    # ------------------------------------------------------------ create

    cdef object _parent_owner(self, Node parent, int uid, int gid):
        pst = self.getattr(parent) if self._ovr_any else os.stat(parent.fd)
        if pst.st_mode & S.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    def _check_new(self, Node parent, bytes name):
        """EEXIST if name shows in parent; returns whether the upper holds a
        whiteout. One stat of the upper entry: a whiteout there hides the
        layers below, any other entry shows; only when there is none are
        the lower layers probed (as lookup would)."""
        cdef struct_stat sst
        cdef int err
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, name)
        if parent.upper >= 0:
            err = c_statat(parent.upper, name, &sst)
            if err == 0:
                if self._lower_whiteout_c(parent.upper, name, sst.st_mode, sst.st_rdev, sst.st_size):
                    return True
                raise _err(errno.EEXIST, name)
            if err != ENOENT:
                raise _err(err, name)
            if not parent.lowers:
                return False    # nothing below to look up, nothing in the upper
            nondir, dirs, _ = self._lookup_lowers(parent, name, None, False)
            if nondir is not None or dirs:
                raise _err(errno.EEXIST, name)
            return False
        try:
            self.lookup(parent, name)
        except FileNotFoundError:
            return False
        raise _err(errno.EEXIST, name)

    cdef tuple _new_mode(self, Node parent, int kind, int mode, int umask):
        """(mode, access ACL, default ACL) of a new object in parent (copied
        up) asked for with mode under umask, as the kernel's
        posix_acl_create gives them: a default ACL of parent masks the
        mode (the umask then does not count) and is inherited (its access
        ACL only where it says more than the mode, its default ACL by
        dirs); without one, the umask masks the mode. The ACLs are xattr
        values, or None."""
        if not self.posix_acl or kind == S.S_IFLNK:
            return mode & ~umask, None, None
        cdef bytes xname = ACL_DEFAULT
        dflt = c_getx_dir(parent.upper, xname)
        if not dflt:
            return mode & ~umask, None, None
        mode, access = acl_create_masq(dflt, mode)
        return mode, access, (dflt if kind == S.S_IFDIR else None)

    def _create(self, Node parent, bytes name, int kind, int mode, int rdev, bytes target,
                int uid, int gid, Node link_src=None, int open_flags=-1, int umask=0):
        """Create an object in the upper dir of parent: directly when no
        whiteout is in the way, else prepared in the work dir and exchanged
        with the whiteout (dirs made there are opaque). mode is masked by
        umask or by parent's default ACL (_new_mode)."""
        self._need_upper()
        if not parent.is_dir:
            raise _err(errno.ENOTDIR, name)
        over_whiteout = self._check_new(parent, name)
        self.copy_up(parent)
        parent.dircache = None
        uid, gid, sgid = self._parent_owner(parent, uid, gid)
        acl = dacl = None
        if link_src is None:
            mode, acl, dacl = self._new_mode(parent, kind, mode, umask)
        if kind == S.S_IFDIR and sgid:
            mode |= S.S_ISGID
        if over_whiteout:
            dfd, dname = self.work_fd, self._tmpname()
        else:
            dfd, dname = parent.upper, name
        ofd = -1
        cdef struct_stat cst
        if link_src is not None:
            link_src = self._index_start(self.copy_up(link_src, meta=True))
            if link_src.metacopy:
                # its data are found by its path: one that stays (the kernel's
                # ovl_set_link_redirect)
                self._set_redirect(link_src, False)
            if link_src.parent is not None and self._has_origin(link_src):
                set_impure(self, parent)    # a name of a copied-up object: as the kernel
            os.link(_proc(link_src.upper), dname, dst_dir_fd=dfd, follow_symlinks=True)
            if self.quota_on:
                self._q_orphans.pop(link_src.key, None)     # an O_TMPFILE file named now
        else:
            q_take(self, 0, 1)          # a new inode (the quota)
            try:
                if kind == S.S_IFDIR:
                    os.mkdir(dname, mode & 0o7777, dir_fd=dfd)
                elif kind == S.S_IFREG and open_flags >= 0:
                    ofd = os.open(dname, (open_flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | O_CLOEXEC,
                                  mode & 0o7777, dir_fd=dfd)
                elif kind == S.S_IFLNK:
                    os.symlink(target, dname, dir_fd=dfd)
                else:
                    os.mknod(dname, kind | (mode & 0o7777), rdev, dir_fd=dfd)
            except BaseException:
                q_give(self, 0, 1)
                raise
        try:
            if link_src is None and self._ovr_upper is not None:
                # owner and mode in the xattr; the daemon keeps the object
                dpath = b"/proc/self/fd/%d/%s" % (dfd, dname)
                if kind != S.S_IFLNK:
                    os.chmod(dpath, override_disk_mode(kind | (mode & 0o7777)))
                if not override_write(self, dpath, uid, gid, kind | (mode & 0o7777), False):
                    _chown_or_not(dname, dfd, uid, gid)
            elif link_src is None:
                # (made by us: owned by us, mode under our umask; changed
                # only where that is not what was asked)
                if c_statat(dfd, dname, &cst) != 0:
                    raise _oserror(c_errno, dname)
                chmod = kind != S.S_IFLNK and (cst.st_mode & 0o7777) != (mode & 0o7777)
                if cst.st_uid != <unsigned>uid or cst.st_gid != <unsigned>gid:
                    os.chown(dname, uid, gid, dir_fd=dfd, follow_symlinks=False)
                    # chown may clear set-id bits: apply the mode after it
                    chmod = kind != S.S_IFLNK and (mode & 0o6000 or chmod)
                if chmod and ofd >= 0:
                    os.fchmod(ofd, mode & 0o7777)
                elif chmod:
                    os.chmod(b"/proc/self/fd/%d/%s" % (dfd, dname), mode & 0o7777)
            if acl is not None:
                c_setx_at(dfd, dname, ACL_ACCESS, acl)
            if dacl is not None:
                c_setx_at(dfd, dname, ACL_DEFAULT, dacl)
            if kind == S.S_IFDIR and (over_whiteout or (parent.lowers and not self.userxattr)):
                # over a whiteout it must be opaque; in a merged parent the
                # kernel marks it too (not with userxattr), so lookups skip
                # the lower layers
                c_setx_at(dfd, dname, self.x_opaque, b"y")
            if over_whiteout:
                sys_renameat2(dfd, dname, parent.upper, name, RENAME_EXCHANGE)
                os.unlink(dname, dir_fd=dfd)   # the whiteout, now in work
        except BaseException:
            if link_src is None:
                q_give(self, 0, 1)
            if ofd >= 0:
                os.close(ofd)
            try:
                if kind == S.S_IFDIR:
                    os.rmdir(dname, dir_fd=dfd)
                else:
                    os.unlink(dname, dir_fd=dfd)
            except OSError:
                pass
            raise
        node = self.lookup(parent, name)
        return ofd, node

    def mkdir(self, Node parent, bytes name, int mode, int uid, int gid, int umask=0):
        return self._create(parent, name, S.S_IFDIR, mode, 0, None, uid, gid, umask=umask)[1]

    def mknod(self, Node parent, bytes name, int mode, int rdev, int uid, int gid, int umask=0):
        if S.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM, name)   # a whiteout cannot be made (as the kernel)
        return self._create(parent, name, S.S_IFMT(mode), S.S_IMODE(mode), rdev, None, uid, gid,
                            umask=umask)[1]

    def symlink(self, Node parent, bytes name, bytes target, int uid, int gid):
        return self._create(parent, name, S.S_IFLNK, 0o777, 0, target, uid, gid)[1]

    def create(self, Node parent, bytes name, int flags, int mode, int uid, int gid, int umask=0):
        """Create and open a regular file: (fd, Node)."""
        return self._create(parent, name, S.S_IFREG, S.S_IMODE(mode), 0, None, uid, gid,
                            open_flags=flags & ~(os.O_CREAT | os.O_EXCL), umask=umask)

    def tmpfile(self, Node parent, int flags, int mode, int uid, int gid, int umask=0):
        """An unnamed regular file in parent's upper dir (O_TMPFILE), opened
        with flags: (fd, Node). The Node has no name (parent None, so the fd
        cache never closes its fd) until link() gives it one."""
        cdef Node n
        self._need_upper()
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        self.copy_up(parent)
        uid, gid, _ = self._parent_owner(parent, uid, gid)
        mode, acl, _ = self._new_mode(parent, S.S_IFREG, mode, umask)
        f = (flags & ~(os.O_CREAT | os.O_TRUNC | os.O_NOCTTY | O_NOFOLLOW)) | os.O_TMPFILE | O_CLOEXEC
        q_take(self, 0, 1)
        try:
            fd = os.open(_proc(parent.upper), f, mode & 0o7777)
        except BaseException:
            q_give(self, 0, 1)
            raise
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode & 0o7777)    # chown may clear set-id bits
            if acl is not None:
                os.setxattr(fd, ACL_ACCESS, acl)
            opath = os.open(_proc(fd), O_PATH | O_CLOEXEC)
        except BaseException:
            os.close(fd)
            q_give(self, 0, 1)
            raise
        st = sys_fstat(opath)
        n = Node()
        n.parent = None
        n.name = b""
        n.is_dir = False
        n.upper = opath
        n.key = _realkey(st.st_dev, st.st_ino)
        n.real = (st.st_dev, st.st_ino)
        n.ino = self.map_ino(st)
        n.st = st
        n.ov = self
        if self.quota_on:
            self._q_orphans[n.key] = n      # counted until named (link) or closed
        return fd, n

    def link(self, Node src, Node parent, bytes name):
        if src.is_dir:
            raise _err(errno.EPERM, name)
        return self._create(parent, name, 0, 0, 0, None, 0, 0, link_src=src)[1]

    # ------------------------------------------------------------ open / setattr

    def open(self, Node n, int flags):
        """Open the real object; write access copies it up first.
        Returns (fd, node): node differs from n after the copy-up of a
        hard-linked lower file."""
        acc = flags & os.O_ACCMODE
        if acc != os.O_RDONLY or flags & os.O_TRUNC:
            self._need_upper()
            n = self.copy_up(n, data=not (flags & os.O_TRUNC))
        f = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | O_NOFOLLOW) | O_CLOEXEC
        if self.providers and (n.upper < 0 or n._bits & NB_METACOPY):
            self.provide_data(n)
        if n._bits & NB_METACOPY and self.verity != "off":
            check_verity(self, n)
        if flags & os.O_TRUNC and self.quota_on and n.upper >= 0:
            with self.qlock:
                ust = sys_fstat(n.upper)
                before = ust.st_size if S.S_ISREG(ust.st_mode) else 0
                fd = os.open(_proc(n.datafd), f)
                self.quota_truncated(before, 0)
            return fd, n
        return os.open(_proc(n.datafd), f), n

    def setattr(self, Node n, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None, fh=None):
        self._need_upper()
        n = self.copy_up(n, data=size is None or size != 0, meta=size is None)
        path = _proc(n.upper)
        if size is not None:
            if self.quota_on:
                with self.qlock:
                    before, end = self.quota_grow(n.upper if fh is None else fh, size, size, False)
                    try:
                        if fh is not None:
                            os.ftruncate(fh, size)
                        else:
                            os.truncate(path, size)
                    except BaseException:
                        self.quota_settle(before, end, before)
                        raise
                    self.quota_truncated(before, size)
            elif fh is not None:
                os.ftruncate(fh, size)
            else:
                os.truncate(path, size)
        if self._ovr_upper is not None and (uid is not None or gid is not None or mode is not None):
            st = self.getattr(n)        # the owner and mode shown
            new_mode = S.S_IMODE(st.st_mode) if mode is None else S.S_IMODE(mode)
            if override_write(self, path, st.st_uid if uid is None else uid,
                              st.st_gid if gid is None else gid, S.S_IFMT(st.st_mode) | new_mode,
                              True):
                if not S.S_ISLNK(st.st_mode):
                    os.chmod(path, override_disk_mode(S.S_IFMT(st.st_mode) | new_mode))
                uid = gid = mode = None     # done: the xattr holds them
        if uid is not None or gid is not None:
            sys_chown_fd(n.upper, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            sys_chmod_fd(n.upper, S.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            sys_utimens_fd(n.upper, atime_ns, mtime_ns)
        return n

    def touch(self, Node n):
        """chown(path, -1, -1): n copied up and its upper object chowned to
        the same ids, which updates its ctime and, on a regular file,
        clears S_ISUID (and S_ISGID with group execute), as the kernel
        overlay's notify_change of the upper object does. The kernel's
        removal of set-id bits after a write-like call (fallocate) by a
        caller without CAP_FSETID reaches FUSE as the same empty change,
        with the same effect on the bits. Returns the node to use next."""
        self._need_upper()
        n = self.copy_up(n, data=True, meta=True)
        sys_chown_fd(n.upper, -1, -1)
        return n

    # ------------------------------------------------------------ xattrs

    def _own(self, bytes name):
        """One of the overlay's own xattr names (trusted.overlay.*, or
        user.overlay.* with userxattr)."""
        return name.startswith(self.prefix)

    cdef bytes _escape(self, bytes name):
        """The kernel's escaping (Linux 6.7): <prefix>X as seen through the
        mount is stored as <prefix>overlay.X, so users can neither read nor
        change the overlay's own <prefix>X."""
        if name.startswith(self.prefix):
            return self.prefix + b"overlay." + name[len(self.prefix):]
        return name

    cdef object _unescape(self, bytes stored):
        """The name shown for a stored xattr, or None for a private one."""
        if stored.startswith(self.prefix):
            esc = self.prefix + b"overlay."
            if stored.startswith(esc):
                return self.prefix + stored[len(esc):]
            return None
        return stored

    def getxattr(self, Node n, bytes name):
        if name == LAYER_XATTR or name.startswith(LAYER_XATTR_AT):
            return self._layer_xattr(n, name)
        if self._ovr_any and name in OVR_NAMES:
            raise _err(errno.ENODATA, name)     # owners kept in xattrs: not shown
        return os.getxattr(_proc(n.fd), self._escape(name))

    def _layer_xattr(self, Node n, bytes name):
        """user.overlay-fuse.layer of n; user.overlay-fuse.layer/NAME of a
        dir n is that of its entry NAME (the kernel answers user.* reads of
        symlinks, fifos, sockets and devices itself, with ENODATA)."""
        if name == LAYER_XATTR:
            return self.layer_info(n).encode()
        if not n.is_dir:
            raise _err(errno.ENODATA, name)
        child = name[len(LAYER_XATTR_AT):]
        if not child or b"/" in child or child in (b".", b".."):
            raise _err(errno.ENODATA, name)
        return self.layer_info(self.lookup(n, child)).encode()

    def layer_stats(self, int most=200):
        """[{layer, path, lookups}]: how many lookups each layer served, the
        upper layer first, then the lower ones that served any, the most
        used first (at most `most` of them: a stats reply must fit in an
        xattr)."""
        out = []
        if self.upper_path is not None:
            out.append({"layer": "upper", "path": os.fsdecode(self.upper_path),
                        "lookups": self.layer_hits[0]})
        used = sorted((k for k in range(len(self.lower_paths)) if self.layer_hits[1 + k]),
                      key=lambda k: -self.layer_hits[1 + k])[:most]
        for k in used:
            name = "lower %d" % k if k < self.nlower else "data-only %d" % (k - self.nlower)
            prov = self.provider_of(k)
            out.append({"layer": name, "path": os.fsdecode(self.lower_paths[k]) if prov is None else prov.path,
                        "lookups": self.layer_hits[1 + k]})
        return out

    def provider_stats(self):
        """[{layer, ...}] of the lower layers with a data provider (image
        layers: blob, files filled, bytes, seconds spent), for overlay stats."""
        if not self.providers:
            return []
        return [dict(layer="lower %d" % k, **prov.stats()) for k, prov in sorted(self.providers.items())]

    def layer_info(self, Node n):
        """Which layer serves n, for people: "upper: PATH" (with where a
        copy came from, or where a metacopy's data are), "lower K: PATH",
        a merged dir's layers joined by " + ". Read as the xattr
        user.overlay-fuse.layer; never stored."""
        def lower(int k):
            kind = "lower" if k < self.nlower else "data-only layer"
            prov = self.provider_of(k)
            where = os.fsdecode(self.lower_paths[k]) if prov is None else prov.describe()
            return "%s %d: %s" % (kind, k if k < self.nlower else k - self.nlower, where)
        up = "upper: %s" % os.fsdecode(self.upper_path or b"")
        if n.is_dir:
            parts = ([up] if n.upper >= 0 else []) + [lower(k) for k, _ in n.lowers]
            return " + ".join(parts)
        if n.upper < 0:
            if n.metacopy and len(n.lowers) > 1:
                return lower(n.lowers[0][0]) + " (metadata only; data in %s)" % lower(n.lowers[-1][0])
            k, fd = n.lowers[0]
            prov = self.provider_of(k)
            if prov is not None:
                return lower(k) + prov.describe_entry(os.fstat(fd).st_ino)
            return lower(k)
        if self._indexed and n.key in self._indexed and n.parent is not None:
            up += " (a hard link's copy in the index)" if self._upper_entry(
                n.parent, n.name) is None else ""
        if n.metacopy and n.lowers:
            return up + " (metadata only; data in %s)" % lower(n.lowers[-1][0])
        v = self._getx(n.upper, self.x_origin)
        if v:
            k = self._origin_layer(n, bytes(v))
            if k >= 0:
                return up + " (copied up from %s)" % lower(k)
            return up + " (copied up)"
        return up

    cdef int _origin_layer(self, Node n, bytes v) except -2:
        """The lower layer a copied-up n's origin handle names, or -1. Layers
        on one filesystem all decode it: the one holding that object at n's
        path (or an alias's) is it, else the first that decodes it."""
        cdef struct_stat st
        if not self.can_decode:
            return -1
        found = decode_lower(self, v)
        if found is None:
            return -1
        k, fd = found
        try:
            ost = sys_fstat(fd)
        finally:
            os.close(fd)
        for p, name in [(n.parent, n.name)] + list(n.aliases or ()):
            if p is None:
                continue
            for idx, dfd in (<Node>p).lowers:
                if c_statat(dfd, name, &st) == 0 and st.st_ino == ost.st_ino and st.st_dev == ost.st_dev:
                    return idx
        return k

    def listxattr(self, Node n):
        out = []
        for nm in os.listxattr(_proc(n.fd)):
            shown = self._unescape(os.fsencode(nm))
            if shown is not None and not (self._ovr_any and shown in OVR_NAMES):
                out.append(shown)
        return out

    def setxattr(self, Node n, bytes name, bytes value, int flags=0):
        if name == LAYER_XATTR or name.startswith(LAYER_XATTR_AT) or (self._ovr_any and name in OVR_NAMES):
            raise _err(errno.EPERM, name)
        self._need_upper()
        if n.upper < 0:
            # not for a name of an indexed file: the kernel sets it on the
            # copy without linking that name up
            n = self.copy_up(n, meta=True)
        os.setxattr(_proc(n.upper), self._escape(name), value, flags)
        return n

    def removexattr(self, Node n, bytes name):
        if name == LAYER_XATTR or name.startswith(LAYER_XATTR_AT) or (self._ovr_any and name in OVR_NAMES):
            raise _err(errno.EPERM, name)
        self._need_upper()
        name = self._escape(name)
        if n.upper < 0:
            os.getxattr(_proc(n.fd), name)      # ENODATA without copy-up
            n = self.copy_up(n, meta=True)
        os.removexattr(_proc(n.upper), name)
        return n

    # ------------------------------------------------------------ remove

    cdef _only_whiteouts(self, int dirfd, bytes name):
        """ENOTEMPTY unless the dir holds nothing but whiteouts: it is about to be
        cleared, and a visible entry there would be lost."""
        fd = self._opath(dirfd, name, True)
        try:
            for nm in _listdir(fd):
                st = os.stat(nm, dir_fd=fd, follow_symlinks=False)
                if not self._upper_whiteout(fd, nm, st):
                    log.error("refusing to clear %r: it holds %r", name, nm)
                    raise _err(errno.ENOTEMPTY, name)
        finally:
            os.close(fd)

    def _clear_in_work(self, bytes tname):
        """Remove a directory that was moved into the work dir."""
        fd = self._opath(self.work_fd, tname, True)
        try:
            self._clean_dir(fd)
        finally:
            os.close(fd)
        os.rmdir(tname, dir_fd=self.work_fd)

    def _whiteout_over(self, Node parent, bytes name, bint exists_in_upper, bint is_dir):
        """Replace name in parent's upper dir by a whiteout, atomically."""
        if exists_in_upper and is_dir:
            self._only_whiteouts(parent.upper, name)
        t = self._make_whiteout()
        try:
            if exists_in_upper:
                sys_renameat2(self.work_fd, t, parent.upper, name, RENAME_EXCHANGE)
            else:
                sys_renameat2(self.work_fd, t, parent.upper, name, RENAME_NOREPLACE)
        except BaseException:
            os.unlink(t, dir_fd=self.work_fd)
            raise
        if exists_in_upper:
            if is_dir:
                self._clear_in_work(t)
            else:
                os.unlink(t, dir_fd=self.work_fd)

    def unlink(self, Node parent, bytes name):
        self._need_upper()
        n = self.lookup(parent, name)
        if n.is_dir:
            raise _err(errno.EISDIR, name)
        self._wait_idle(n)
        n = self._index_start(n)
        qfd = q_hold_fd(self, n)
        try:
            self._remove(parent, name, n)
            self._index_end(n)
        except BaseException:
            if qfd >= 0:
                os.close(qfd)
            raise
        q_gone(self, n, qfd)
        self._drop_alias(n, parent, name)
        if (n.parent, n.name) == (parent, name):
            if self._still_linked(n):
                # a hard link this Node does not know of remains: the same
                # object, disconnected (its file handle still names it)
                # until a lookup of that name finds it again (_intern)
                self._lru_unlink(n)
                n.parent = None
                n.name = b""
            else:
                self._unname(n)
        return n

    cdef bint _still_linked(self, Node n) except -1:
        """Has the upper file of n (not an indexed one) another name, after
        one was removed?"""
        cdef struct_stat st
        if n.is_dir or n.evicted or n._upper < 0 or n.key in self._indexed:
            return False
        return fstat(n._upper, &st) == 0 and st.st_nlink > 0

    def _index_start(self, Node n):
        """Before a change of n's overlay nlink (unlink, link, rename over
        it), as the kernel's ovl_nlink_start: with index=on, a lower file
        with several links is copied up to the index first, with the name
        it is known by linked up, and the overlay nlink of an indexed n is
        stored relative to its upper inode's. With nfs_export any lower
        object, dirs too, is copied up (and so indexed) first, so that its
        index entry can say it is gone. Returns the Node to use."""
        if not self.index:
            return n
        if n.is_dir:
            if self.index_all and n.upper < 0:
                n = self.copy_up(n)
            return n
        if n.key in self._indexed or (n.upper < 0 and (self.index_all
                                                       or self.getattr(n).st_nlink > 1)):
            n = self.copy_up(n, meta=True)  # to the index, or just its name linked up
        if n.key in self._indexed:
            set_nlink_upper(self, n, overlay_nlink(self, n))
        return n

    def _index_end(self, Node n):
        """After such a change: an indexed n that no name leads to any more
        leaves the index (the kernel's ovl_cleanup_index)."""
        info = self._indexed.get(n.key)
        if info is None or overlay_nlink(self, n) > 0:
            return
        unl = sys_fstat(n.upper).st_nlink
        if unl == 1:
            if self.index_all:
                # its file handle must not be decoded any more
                index_whiteout(self, info[0], False)
            else:
                os.unlink(info[0], dir_fd=self.index_fd)
            del self._indexed[n.key]
        else:
            # as the kernel: a link made in the upper dir behind our back
            log.warning("index entry %r still has %d links", os.fsdecode(info[0]), unl)
            set_nlink_upper(self, n, unl - 1)

    cdef bytes _dir_index_name(self, Node n):
        """nfs_export: the index entry name of an indexed dir n, else None."""
        if not self.index_all or n._dir is None or not n._dir.indexed or not n.lowers:
            return None
        return index_name(self, n.lowers[0][1], n.lowers[0][0])

    cdef _dir_index_end(self, bytes iname):
        """An indexed dir removed (rmdir, renamed over): its index entry
        becomes a whiteout, as the kernel's ovl_cleanup_index."""
        cdef struct_stat st
        if iname is None or c_statat(self.index_fd, iname, &st) != 0 or not S.S_ISDIR(st.st_mode):
            return
        index_whiteout(self, iname, True)

    cdef _unname(self, Node n):
        """n lost its last known name: it is no longer the Node of its
        (st_dev, st_ino), which a new file may soon have (the filesystem
        reuses the numbers of freed inodes); give its space back."""
        if self.nodes.get(n.key) is n:
            del self.nodes[n.key]
        self.release(n)

    def rmdir(self, Node parent, bytes name):
        self._need_upper()
        n = self.lookup(parent, name)
        if not n.is_dir:
            raise _err(errno.ENOTDIR, name)
        if self.nonempty_names(n):
            raise _err(errno.ENOTEMPTY, name)
        n = self._index_start(n)
        iname = self._dir_index_name(n)
        had_upper = n.upper >= 0
        self._remove(parent, name, n)
        if had_upper:
            q_give(self, 0, 1)
        self._dir_index_end(iname)
        self._unname(n)
        return n

    def _remove(self, Node parent, bytes name, Node n):
        parent.dircache = None
        if n.upper >= 0:
            lp = self.lower_positive(parent, name)
        else:
            lp = True
        self.copy_up(parent)
        if not lp:
            if n.is_dir and n.lowers:
                # a merged dir under a new name: move it out, then clean it
                self._only_whiteouts(parent.upper, name)
                t = self._tmpname()
                sys_renameat2(parent.upper, name, self.work_fd, t, RENAME_NOREPLACE)
                self._clear_in_work(t)
            elif n.is_dir:
                os.rmdir(name, dir_fd=parent.upper)
            else:
                os.unlink(name, dir_fd=parent.upper)
        else:
            self._whiteout_over(parent, name, n.upper >= 0, n.is_dir)

    # ------------------------------------------------------------ rename

    cdef bint _merge_or_lower(self, Node n):
        """The kernel's ovl_type_merge_or_lower: a dir from a lower layer, or
        a file whose data are still there (metacopy)."""
        if n.is_dir:
            return n.upper < 0 or len(n.lowers) > 0
        return n.metacopy

    cdef bint _can_move(self, Node n):
        return self.redirect_dir or not n.is_dir or not self._merge_or_lower(n)

    cdef bytes _abs_redirect(self, Node n):
        parts = []
        cdef Node d = n
        while d.parent is not None:
            nm = d.redirect if d.redirect else d.name
            parts.append(nm)
            if nm.startswith(b"/"):
                break
            d = d.parent
        else:
            parts.append(b"")
        s = b"/".join(reversed(parts))
        if not s.startswith(b"/"):
            s = b"/" + s
        return s

    def _has_origin(self, Node n):
        """Does n (in the upper layer) stand for a lower object too: a
        merged dir, or a non-dir copied up from one (the kernel's origin)?"""
        if n.is_dir:
            return bool(n.lowers)
        # the st_ino of its lower object (copied up with one link, or its
        # origin decoded at lookup), as the kernel's "origin" inodes
        return n.ino != self._map_real(n)

    cdef _set_redirect(self, Node n, bint samedir):
        # a file (metacopy) whose lower object has several links gets an
        # absolute one even in its own dir: its other names may be
        # elsewhere (the kernel's ovl_need_absolute_redirect)
        absolute = not samedir or (not n.is_dir and sys_fstat(n.lowers[0][1]).st_nlink > 1)
        if n.redirect and (not absolute or n.redirect.startswith(b"/")):
            return
        rd = self._abs_redirect(n) if absolute else n.name
        if len(rd) > REDIRECT_MAX:
            raise _err(errno.EXDEV, n.name)
        try:
            os.setxattr(_proc(n.upper), self.x_redirect, rd)
        except OSError as e:
            log.warning("failed to set redirect on %r: %s", n.name, e)
            raise _err(errno.EXDEV, n.name)
        n.redirect = rd

    def rename(self, Node op, bytes oname, Node np, bytes nname, unsigned int flags=0):
        """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE, as the kernel does it."""
        cdef Node old, new
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        if (flags & RENAME_NOREPLACE) and (flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        self._need_upper()
        if len(nname) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, nname)
        old = self.lookup(op, oname)
        self._wait_idle(old)
        try:
            new = self.lookup(np, nname)
        except FileNotFoundError:
            new = None
        if new is not None:
            self._wait_idle(new)
        exchange = bool(flags & RENAME_EXCHANGE)
        overwrite = not exchange
        if new is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST, nname)
        if exchange and new is None:
            raise _err(errno.ENOENT, nname)
        if new is old:
            return
        if overwrite and new is not None:
            if old.is_dir and not new.is_dir:
                raise _err(errno.ENOTDIR, nname)
            if not old.is_dir and new.is_dir:
                raise _err(errno.EISDIR, nname)
        if not self._can_move(old):
            raise _err(errno.EXDEV, oname)
        if not overwrite and not self._can_move(new):
            raise _err(errno.EXDEV, nname)
        need_clear = False
        if overwrite and new is not None and new.is_dir and new.lowers:
            if self.nonempty_names(new):
                raise _err(errno.ENOTEMPTY, nname)
            need_clear = new.upper >= 0
            if need_clear:
                self._only_whiteouts(np.upper, nname)
        samedir = op is np
        new_is_whiteout = False
        if new is None:
            ust = self._upper_entry(np, nname)
            new_is_whiteout = self._upper_whiteout(np.upper, nname, ust)
        rflags = RENAME_EXCHANGE if exchange else 0
        cleanup_whiteout = False
        if overwrite:
            old_lp = self.lower_positive(op, oname) if old.upper >= 0 else True
            if old_lp:
                if not new_is_whiteout:
                    rflags |= RENAME_WHITEOUT
                else:
                    rflags |= RENAME_EXCHANGE
            elif old.is_dir and new_is_whiteout:
                rflags |= RENAME_EXCHANGE
                cleanup_whiteout = True
        op.dircache = None
        np.dircache = None
        old = self.copy_up(old, meta=True)
        self.copy_up(np)
        new_iname = None
        if not overwrite:
            new = self.copy_up(new, meta=True)
        qfd = -1
        qdir = False
        if overwrite and new is not None:
            new = self._index_start(new)
            new_iname = self._dir_index_name(new)
            qfd = q_hold_fd(self, new)
            qdir = new.is_dir and new.upper >= 0
            if new.is_dir and new.lowers and new.upper >= 0 and not need_clear:
                need_clear = True       # copied up just now (nfs_export)
        try:
            if need_clear:
                # make the target an empty opaque dir first, as the kernel does
                t = self._tmpname()
                os.mkdir(t, 0o700, dir_fd=self.work_fd)
                os.setxattr(b"/proc/self/fd/%d/%s" % (self.work_fd, t), self.x_opaque, b"y")
                sys_renameat2(self.work_fd, t, np.upper, nname, RENAME_EXCHANGE)
                self._clear_in_work(t)
            if self._merge_or_lower(old):
                self._set_redirect(old, samedir)
            elif old.is_dir and not old.opaque and np.merged:
                os.setxattr(_proc(old.upper), self.x_opaque, b"y")
                old.opaque = True
            if not overwrite:
                if self._merge_or_lower(new):
                    self._set_redirect(new, samedir)
                elif new.is_dir and not new.opaque and op.merged:
                    os.setxattr(_proc(new.upper), self.x_opaque, b"y")
                    new.opaque = True
            if not samedir:
                # a copied-up or moved entry in a new parent: mark it impure
                if self._has_origin(old):
                    set_impure(self, np)
                if exchange and self._has_origin(new):
                    set_impure(self, op)
            if rflags & RENAME_WHITEOUT:
                try:
                    sys_renameat2(op.upper, oname, np.upper, nname, rflags)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # no RENAME_WHITEOUT on this fs: rename, then whiteout the source
                    sys_renameat2(op.upper, oname, np.upper, nname, rflags & ~RENAME_WHITEOUT)
                    self._whiteout_over(op, oname, False, False)
            else:
                sys_renameat2(op.upper, oname, np.upper, nname, rflags)
            if cleanup_whiteout:
                os.unlink(oname, dir_fd=op.upper)
        except BaseException:
            if qfd >= 0:
                os.close(qfd)
            raise
        if qdir:
            q_give(self, 0, 1)
        self._rename_alias(old, op, oname, np, nname)
        if exchange:
            self._rename_alias(new, np, nname, op, oname)
        elif new is not None:
            try:
                if not new.is_dir:
                    self._index_end(new)
                else:
                    self._dir_index_end(new_iname)
            finally:
                q_gone(self, new, qfd)      # (its last name gone: its space back)
            self._drop_alias(new, np, nname)
            if (new.parent, new.name) == (np, nname):
                self._unname(new)

    # ------------------------------------------------------------ file handles

    cpdef bytes encode_handle(self, Node n):
        """nfs_export: a file handle of n that stays good while n exists,
        whatever renames and copy-ups it goes through (_export.pxi)."""
        return _encode_handle(self, n)

    cpdef Node decode_handle(self, bytes h):
        """The Node a handle of encode_handle stands for, or ESTALE where
        the object was removed (_export.pxi)."""
        return _decode_handle(self, h)

    # ------------------------------------------------------------ misc

    def syncfs(self):
        """syncfs(2) of the upper layer's filesystem (not with volatile)."""
        if self.no_sync or self.upper_root < 0:
            return
        fd = os.open(_proc(self.upper_root), os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        try:
            sys_syncfs(fd)
        finally:
            os.close(fd)

    def statfs(self):
        """statvfs of the upper layer (the top lower one without): with a
        quota, an os.statvfs_result-like tuple with its limits applied."""
        fd = self.upper_root if self.upper_root >= 0 else self.lower_roots[0]
        v = os.statvfs(_proc(fd))
        if not self.quota_on:
            return v
        f = list(v)
        f[2:7] = list(self.quota_statfs(v))
        return os.statvfs_result(f)

    def fsync(self, int fd, bint datasync):
        if self.no_sync:
            return          # volatile: no sync reaches the upper fs (as the kernel)
        sys_fsync(fd, datasync)
