# cython: language_level=3
"""overlay_core._core: the layer stack, path resolution, merge and copy-up.

This is the whole overlay logic, with no knowledge of FUSE: the engines
(the native one in src/overlay/engine/, at C level through _core.pxd, and
the pyfuse3 adapter in src/overlay/fs.py) call these methods with Node
objects and turn the OSError they raise into errno replies.

Model
-----
A Node is one object of the merged tree. It holds O_PATH file descriptors
on the real objects behind it: `upper` (or -1) and, for directories, the
stack of lower directories merged below it (`lowers`, top first, cut at an
opaque dir); for a non-directory only in a lower layer, `lowers` holds that
one object. Every access to a layer is an *at() call relative to such a
descriptor with a single name component and no-follow flags, or a reopen
of the descriptor through /proc/self/fd, so no symlink or `..` inside a
layer can lead outside it.

On-disk format: the kernel's (whiteouts are 0/0 character devices,
`<prefix>opaque` = "y", `<prefix>redirect` for moved directories, as with
redirect_dir=on; `<prefix>origin`, the lower object's file handle, on
copied-up objects and merged dirs, `<prefix>impure` on their parents and
`<prefix>uuid` on a new upper root, see _origin.pxi). Only where no origin
the kernel could follow can be written (a lower filesystem without file
handles, no CAP_DAC_READ_SEARCH) we also write `<prefix>fuse.ino`, the inode
number the object had in its lower layer, so st_ino survives copy-up there
too; the kernel ignores that name.

Identity: a Node stands for one real object: its `key` is the (st_dev,
st_ino) of the upper object, else of the top lower one, except for a lower
non-directory with several hard links, where each name is an object of its
own (the kernel without index=on treats them so: the one copied up gets a
new inode number, the others stay). The reported st_ino (`ino`) is the
kernel's: the lower inode number, kept through copy-up where the kernel
keeps it.
"""

cimport cython

import errno
import fcntl
import logging
import os
import stat as S
import threading
import weakref


log = logging.getLogger(__name__)

cdef int O_PATH = os.O_PATH
cdef int O_NOFOLLOW = os.O_NOFOLLOW
cdef int O_DIRECTORY = os.O_DIRECTORY
cdef int O_CLOEXEC = os.O_CLOEXEC

# redirect xattrs longer than this are refused (kernel: redirect_max)
REDIRECT_MAX = 256
NAME_MAX = 255
# non-directory Nodes whose O_PATH fds stay open (the kernel may keep every
# inode it was told of; the fds of the others are closed and reopened by name)
FD_CACHE_MAX = 4096
EVICTED = -3

# a copy-up of a file bigger than this lets other threads run (set_lock)
COPY_LOCKED_MAX = 256 * 1024
# dirs with this many lower dirs get a name index after a few lookups
INDEX_MIN_LAYERS = 8
# OCI image layers (option oci_whiteouts): .wh.NAME whites out NAME in the
# layers below; .wh..wh..opq makes its dir opaque. Same-layer entries stay.
OCI_WH = b".wh."
OCI_OPQ = b".wh..wh..opq"
INDEX_AFTER_LOOKUPS = 4
# ... at the second in dirs with this many lower dirs (a probe of each
# costs more), whose reads are made in parallel (prefetch_layers, c_listdirs)
INDEX_EAGER_LAYERS = 64
# read-only xattr naming the layer that serves an object (Overlay.layer_info)
LAYER_XATTR = b"user.overlay-fuse.layer"
LAYER_XATTR_AT = LAYER_XATTR + b"/"      # + NAME: that of a dir's entry NAME
XFS_MAGIC = 0x58465342
# POSIX ACLs as xattrs (the default ACL of a dir is inherited: _new_mode)
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"



cdef inline bytes _proc(int fd):
    return b"/proc/self/fd/%d" % fd


def _listdir(int fd):
    """Names (bytes) in the directory behind (O_PATH) fd."""
    return c_listdir(fd)


cdef inline bint _is_whiteout_st(st):
    return S.S_ISCHR(st.st_mode) and st.st_rdev == 0


cdef inline object _realkey(unsigned long long dev, unsigned long long ino):
    """The identity of a real object, (st_dev, st_ino), as one int (a tuple
    of two would cost three objects per Node)."""
    return (<object>dev << 64) | <object>ino


def _err(int code, name=None):
    if name is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), name)


include "_sys.pxi"
include "_node.pxi"
include "_stack.pxi"
include "_origin.pxi"
include "_index.pxi"
include "_override.pxi"
include "_metacopy.pxi"
include "_resolve.pxi"
include "_listing.pxi"
include "_copyup.pxi"
include "_quota.pxi"
include "_namespace.pxi"
include "_export.pxi"
