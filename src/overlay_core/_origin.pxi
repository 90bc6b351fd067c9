"""Part of overlay_core._core (included by _core.pyx): identity, as the
kernel overlay keeps it: the inode numbers the overlay reports (xino), the
file-handle xattrs, the impure marks and the overlay uuid. Functions of a
_Stack (its fields: _core.pxd), used by lookup, copy-up and renames.

`<prefix>origin` on a copied-up object names the lower object it came from
by its filesystem's file handle, in the kernel's struct ovl_fb: version 0,
magic 0xfb, total length, flags (endianness, upper), the handle type, the
lower filesystem's uuid (16 bytes), then the handle itself. An empty value
means "copied up, origin unknown" (the lower filesystem has no file
handles). The kernel reports st_ino of a copied-up non-directory from the
object its origin decodes to."""

import sys as _sys


cdef int FH_HEADER = 21             # version, magic, len, flags, type, uuid[16]
cdef int FH_MAGIC = 0xfb
cdef int FH_FLAG_BIG_ENDIAN = 1
cdef int FH_FLAG_ANY_ENDIAN = 2
cdef int FH_FLAG_PATH_UPPER = 4
cdef int FH_FLAG_CPU_ENDIAN = FH_FLAG_BIG_ENDIAN if _sys.byteorder == "big" else 0
NULL_UUID = bytes(16)


cdef bytes encode_fh(int fd, bytes uuid, bint upper=False):
    """The ovl_fb of the object behind fd, on a filesystem of that uuid;
    b"" (a null origin, as the kernel stores it) where the filesystem has
    no file handles."""
    try:
        htype, fid = sys_name_to_handle(fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EOVERFLOW,
                       errno.EINVAL, errno.EPERM):
            return b""
        raise
    if not 0 <= htype <= 255 or FH_HEADER + len(fid) > 255:
        return b""
    flags = FH_FLAG_CPU_ENDIAN | (FH_FLAG_PATH_UPPER if upper else 0)
    return bytes((0, FH_MAGIC, FH_HEADER + len(fid), flags, htype)) + uuid + fid


cdef object parse_fh(object v):
    """(handle type, uuid, handle) of an ovl_fb value, or None where the
    kernel reads "origin unknown" (empty, a newer version, unknown flags,
    the other endianness) or refuses it as invalid."""
    if v is None or len(v) < FH_HEADER:
        return None
    ver, magic, ln, flags, htype = v[0], v[1], v[2], v[3], v[4]
    if magic != FH_MAGIC or ln < FH_HEADER or ln > len(v):
        return None
    if ver > 0 or flags & ~(FH_FLAG_BIG_ENDIAN | FH_FLAG_ANY_ENDIAN | FH_FLAG_PATH_UPPER):
        return None
    if not (flags & FH_FLAG_ANY_ENDIAN) and (flags & FH_FLAG_BIG_ENDIAN) != FH_FLAG_CPU_ENDIAN:
        return None
    return htype, bytes(v[5:21]), bytes(v[21:ln])


cdef int mount_fd(_Stack self, int i) except -1:
    """An O_RDONLY fd of lower layer i's root, for open_by_handle_at(2)."""
    if self._mount_fds[i] < 0:
        self._mount_fds[i] = os.open(_proc(self.lower_roots[i]), os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    return self._mount_fds[i]


cdef bytes fs_uuid_of(int opath_fd):
    """The uuid of the filesystem holding the dir behind an O_PATH fd."""
    try:
        fd = os.open(_proc(opath_fd), os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    except OSError:
        return NULL_UUID
    try:
        return sys_fs_uuid(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- inode numbers


cdef setup_ino_map(_Stack self, list devs, xino):
    """How real inode numbers become the overlay's, as the kernel's
    xino: each filesystem has an fsid (0 the upper one's, even when
    there is none; the lower ones 1, 2... in layer order). With all
    layers on one filesystem the numbers are used as they are; else,
    with xino=on or auto, the fsid goes in the high bits (above 32 when
    every layer's filesystem has 32-bit file handles, else in as few
    bits as the count of filesystems needs). Where the kernel would
    give st_dev per filesystem instead (xino=off, or a number using the
    high bits), a FUSE mount has only one st_dev: we keep the numbers
    apart with the fsid in bits 56 and up."""
    cdef int n = len(self.lower_roots)
    upper_dev = devs[n] if self.upper_root >= 0 else None
    fsids = {}
    if upper_dev is not None:
        fsids[upper_dev] = 0
    nxt = 1
    for d in devs[:n]:
        if d not in fsids:
            fsids[d] = nxt
            nxt += 1
    self._dev_index = fsids
    self._samefs = nxt - (upper_dev is None) == 1
    if self._samefs:
        self._xino_bits = 0
        return
    roots = list(self.lower_roots) + ([self.upper_root] if upper_dev is not None else [])
    ino32 = []
    for fd in roots:
        try:
            htype, fh = sys_name_to_handle(fd)
        except OSError:
            ino32.append(None)
            continue
        # the kernel counts a filesystem as one of 32-bit inode numbers
        # when it uses the generic file handle (FILEID_INO32_GEN: inode
        # and generation, 8 bytes); XFS makes the same bytes its own way
        ino32.append(htype == 1 and len(fh) == 8 and sys_fs_type(fd) != XFS_MAGIC)
    if xino == "auto" and None in ino32:
        xino = "off"        # as the kernel: no persistent st_ino without handles
    if xino == "off":
        self._xino_bits = -1
    elif all(ino32):
        self._xino_bits = 32
    else:
        self._xino_bits = (nxt - 1).bit_length() - 1 + 2


cdef unsigned long long ino_map(_Stack self, unsigned long long dev, unsigned long long ino):
    """The overlay's st_ino for a real (st_dev, st_ino); see setup_ino_map."""
    cdef int shift
    if self._samefs:
        return ino
    f = self._dev_index.get(dev, 0)
    if self._xino_bits > 0:
        shift = 64 - self._xino_bits
        if not (ino >> shift):
            return ino | (<unsigned long long>f << (shift + 1))
    return ino ^ (<unsigned long long>f << 56)


cdef setup_identity(_Stack self, list devs):
    """What origin file handles need: each lower layer's filesystem
    uuid (a uuid two filesystems share names neither: the kernel skips
    such layers), whether handles can be opened here (CAP_DAC_READ_SEARCH),
    and the upper root's overlay uuid, set on the first mount of a new
    upper as the kernel does with uuid=auto or on."""
    cdef int i, n = len(self.lower_roots)
    uuids = {}      # st_dev -> uuid: asked once per filesystem
    self.layer_uuids = []
    for i in range(n):
        if devs[i] not in uuids:
            uuids[devs[i]] = fs_uuid_of(self.lower_roots[i])
        self.layer_uuids.append(uuids[devs[i]])
    upper_dev = devs[n] if self.upper_root >= 0 else None
    owners = {}
    for i in range(n):
        owners.setdefault(self.layer_uuids[i], set()).add(devs[i])
    self._bad_uuid_layers = {i for i in range(n)
                             if len(owners[self.layer_uuids[i]]) > 1 and devs[i] != upper_dev}
    self.can_decode = False
    # open_by_handle_at(2) wants a real fd on the filesystem: opened when a
    # layer's first handle is decoded (mount_fd), not thousands at mount
    self._mount_fds = [-1] * len(self.lower_roots)
    try:
        htype, fid = sys_name_to_handle(self.lower_roots[0])
        os.close(sys_open_by_handle(mount_fd(self, 0), htype, fid, O_PATH | O_CLOEXEC))
        self.can_decode = True
    except OSError as e:
        log.info("origin file handles cannot be followed here (%s): st_ino of"
                 " copied-up files is kept in %s", e.strerror, os.fsdecode(self.x_ino))
    if self.upper_root < 0 or self.uuid_mode in ("off", "null"):
        return
    have = self._getx(self.upper_root, self.x_uuid)
    if have is not None:
        return
    if self.uuid_mode == "auto" and self._getx(self.upper_root, self.x_impure) is not None:
        return      # an upper used before: the kernel reads uuid=null for it
    u = bytearray(os.urandom(16))
    u[6] = (u[6] & 0x0F) | 0x40     # a random (version 4) uuid
    u[8] = (u[8] & 0x3F) | 0x80
    try:
        os.setxattr(_proc(self.upper_root), self.x_uuid, bytes(u))
    except OSError as e:
        log.warning("cannot store the overlay uuid on the upper dir: %s", e)


# ---------------------------------------------------------------- origin, impure, uuid


cdef bytes origin_fh(_Stack self, int fd, int layer):
    """The <prefix>origin value for the object behind fd in lower
    layer `layer` (b"" where its filesystem has no file handles)."""
    uuid = NULL_UUID if self.uuid_mode == "off" else self.layer_uuids[layer]
    return encode_fh(fd, uuid)


cdef object origin_stat(_Stack self, int upper_fd, unsigned int mode):
    """(what, Stat) for the upper object behind upper_fd: what is 0 (no
    origin xattr), 1 (origin unknown: stale, another type, another
    filesystem, a format we do not read), 2 (decoded: Stat is the
    origin's) or 3 (a null origin, or one that cannot be decoded here: no
    CAP_DAC_READ_SEARCH; fuse.ino may hold the number)."""
    cdef int i
    v = self._getx(upper_fd, self.x_origin)
    if v is None:
        return 0, None
    if not v:
        return 3, None      # a null origin: the lower fs has no file handles
    fh = parse_fh(v)
    if fh is None:
        return 1, None
    if not self.can_decode:
        return 3, None
    htype, uuid, fid = fh
    for i in range(len(self.lower_roots)):
        if i in self._bad_uuid_layers:
            continue
        if (uuid != NULL_UUID) if self.uuid_mode == "off" else (uuid != self.layer_uuids[i]):
            continue
        try:
            fd = sys_open_by_handle(mount_fd(self, i), htype, fid, O_PATH | O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ESTALE, errno.ENOENT, errno.EINVAL, errno.EXDEV):
                continue
            if e.errno == errno.EPERM:
                return 3, None
            raise
        try:
            st = sys_fstat(fd)
        finally:
            os.close(fd)
        if S.S_IFMT(st.st_mode) != S.S_IFMT(mode):
            return 1, None      # the kernel: "invalid origin", ignored
        return 2, st
    return 1, None


cdef object upper_ino(_Stack self, int upper_fd, Stat st):
    """st_ino the kernel reports for an upper non-dir: its origin's
    (while that has one link: without index=on the kernel cannot tell
    the names of a lower hard link apart; or where it is the index's copy
    of its origin), else its own. Uppers written
    before origin was (or where it cannot be decoded) keep theirs in
    <prefix>fuse.ino."""
    what, ost = origin_stat(self, upper_fd, st.st_mode)
    self._origin_seen = what != 0
    if what == 2:
        if self.index_all:
            # nfs_export: only an indexed copy stands for its origin (the
            # kernel's ovl_verify_lower)
            return self.map_ino(ost if check_indexed(self, upper_fd, st, ost) else st)
        if ost.st_nlink == 1 or (self.index and check_indexed(self, upper_fd, st, ost)):
            return self.map_ino(ost)
        return self.map_ino(st)
    if what == 0 or what == 3:
        x = self._getx(upper_fd, self.x_ino)
        if x is not None and x.isdigit() and 0 < len(x) < 20 and 1 < int(x) < 2**63:
            return int(x)
    return self.map_ino(st)


cdef set_impure(_Stack self, Node d):
    """Mark the upper dir of d "impure" (it holds copied-up or moved
    entries), as the kernel does on copy-up and rename into it."""
    if d._dir is not None and d._dir.impure:
        return
    if d.upper < 0:
        return
    if c_getx_dir(d.upper, self.x_impure) != b"y":
        try:
            os.setxattr(_proc(d.upper), self.x_impure, b"y")
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EPERM):
                raise
            log.debug("impure not set on %r: %s", d.name, e)
            return
    _dirstate(d).impure = True
