"""Part of overlay_core._core (included by _core.pyx): owners and modes kept
in an xattr (fuse-overlayfs's xattr_permissions=1|2, what rootless
containers on NFS use: the daemon may not chown there). Functions of a
_Stack.

The value is fuse-overlayfs's: "UID:GID:MODE", ids in decimal, the mode in
octal (file type bits may be there), an optional fourth field (its later
"extended" form, ignored here). A layer uses such xattrs when its root dir
carries one; which name it uses is found there, in fuse-overlayfs's order:
security.fuseoverlayfs.override_stat (xattr_permissions=1),
user.containers.override_stat (=2, fuse-overlayfs 1.14 and later),
user.fuseoverlayfs.override_stat (=2, before 1.14). What an object shows
is its xattr's owner and permission bits over its real file type; an
object without one shows what it is.

With xattr_permissions (or an upper dir that carries one), objects created
or copied up in the upper layer stay owned by the daemon, with the mode
bits the daemon needs added on disk, and their owner and mode go in the
xattr; chown and chmod change the xattr. With 2, both user.* names are
written: user.containers.override_stat is what containers/storage reads
(podman commit, diff) and fuse-overlayfs 1.14 writes, the other is what
fuse-overlayfs before 1.14 reads in its upper dir. The names are hidden
from the users of the mount and cannot be set through it."""

OVR_SECURITY = b"security.fuseoverlayfs.override_stat"
OVR_CONTAINERS = b"user.containers.override_stat"
OVR_FUSEOVERLAYFS = b"user.fuseoverlayfs.override_stat"
OVR_NAMES = (OVR_SECURITY, OVR_CONTAINERS, OVR_FUSEOVERLAYFS)


cdef object override_name_of(_Stack self, int root_fd):
    """The override xattr name a layer (by its root dir) uses, or None (a
    root dir we may not read xattrs of uses none)."""
    if not c_has_xattr_prefix(root_fd, b"", True):
        return None         # no xattr at all: one call for the many layers so
    for name in OVR_NAMES:
        try:
            if self._getx(root_fd, name) is not None:
                return name
        except OSError as e:
            log.debug("layer xattr %s not read: %s", os.fsdecode(name), e)
            return None
    return None


cdef setup_override(_Stack self, int xattr_permissions):
    """Which layers keep owners in xattrs, and the names the upper writes."""
    self._ovr_lower = [override_name_of(self, fd) for fd in self.lower_roots]
    self._ovr_upper = None
    self._ovr_write = []
    if self.upper_root >= 0:
        have = override_name_of(self, self.upper_root)
        if xattr_permissions == 0 and have is not None:
            xattr_permissions = 1 if have == OVR_SECURITY else 2
            log.info("the upper dir keeps owners and modes in %s: as xattr_permissions=%d",
                     os.fsdecode(have), xattr_permissions)
        if xattr_permissions == 1:
            self._ovr_write = [OVR_SECURITY]
        elif xattr_permissions == 2:
            self._ovr_write = [OVR_CONTAINERS, OVR_FUSEOVERLAYFS]
        if self._ovr_write:
            if have is None:
                # as fuse-overlayfs: the root says which name the layer uses
                # (a store made before keeps what it says: another name
                # there would make fuse-overlayfs read that one)
                st = sys_fstat(self.upper_root)
                for name in self._ovr_write:
                    os.setxattr(_proc(self.upper_root), name,
                                b"%d:%d:%o" % (st.st_uid, st.st_gid, st.st_mode))
            self._ovr_upper = have or self._ovr_write[0]
            log.info("owners and modes of the upper layer are kept in %s",
                     " and ".join(os.fsdecode(n) for n in self._ovr_write))
    self._ovr_any = self._ovr_upper is not None or any(n is not None for n in self._ovr_lower)


cdef object override_parse(object v):
    """(uid, gid, mode bits) of an override value, or None if malformed."""
    if v is None:
        return None
    parts = bytes(v).split(b":")
    if len(parts) < 3:
        return None
    try:
        return int(parts[0]), int(parts[1]), int(parts[2], 8) & 0o7777
    except ValueError:
        return None


cdef object override_name_for(_Stack self, Node n):
    """The override xattr name of the layer n's real object is in."""
    if n._upper >= 0 or n._upper == EVICTED:
        return self._ovr_upper
    if n._lowers:
        return self._ovr_lower[n._lowers[0][0]]
    if n._lidx >= 0:
        return self._ovr_lower[n._lidx]
    return None


cdef object override_of(_Stack self, Node n):
    """(uid, gid, mode bits) n's xattr gives, or None."""
    name = override_name_for(self, n)
    if name is None:
        return None
    return override_parse(self._getx(n.fd, name))


cdef Stat override_stat(_Stack self, Node n, Stat st):
    """st with the owner and mode n's xattr gives (in place)."""
    ov = override_of(self, n)
    if ov is not None:
        st.st_uid, st.st_gid = ov[0], ov[1]
        st.st_mode = S.S_IFMT(st.st_mode) | ov[2]
    return st


cdef override_statx(_Stack self, Node n, StatX x):
    ov = override_of(self, n)
    if ov is not None:
        x.stx_uid, x.stx_gid = ov[0], ov[1]
        x.stx_mode = S.S_IFMT(x.stx_mode) | ov[2]


cdef bint override_write(_Stack self, bytes path, int uid, int gid, unsigned int mode,
                         bint fdpath) except -1:
    """Keep owner and mode of the upper object at path in its xattr
    (fdpath: path is /proc/self/fd/N, the object itself, else a name
    under such a dir, not followed); False where the object cannot carry
    it (user.* xattrs on a symlink or a device)."""
    v = b"%d:%d:%o" % (uid, gid, mode)
    try:
        for name in self._ovr_write:
            os.setxattr(path, name, v, follow_symlinks=fdpath)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            log.debug("no %s on %r: %s", os.fsdecode(self._ovr_upper), path, e)
            return False
        raise
    return True


cdef unsigned int override_disk_mode(unsigned int mode):
    """The mode bits kept on disk for an object whose real mode is in the
    xattr: the daemon must be able to read, write and search it."""
    if S.S_ISDIR(mode):
        return (mode & 0o7777) | 0o700
    return (mode & 0o7777) | 0o600


cdef _chown_or_not(bytes name, int dirfd, int uid, int gid):
    """chown of an object that cannot carry the override xattr (a symlink,
    a device): done where the daemon may, else it stays the daemon's."""
    try:
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
