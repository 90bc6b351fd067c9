"""Part of overlay_core._core (included by _core.pyx): the kernel overlay's
file-handle xattrs. `<prefix>origin` on a copied-up object names the lower
object it came from by its filesystem's file handle, in the kernel's
struct ovl_fb: version 0, magic 0xfb, total length, flags (endianness,
upper), the handle type, the lower filesystem's uuid (16 bytes), then the
handle itself. An empty value means "copied up, origin unknown" (the lower
filesystem has no file handles). The kernel reports st_ino of a copied-up
non-directory from the object its origin decodes to."""

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
