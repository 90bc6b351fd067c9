# cython: language_level=3
"""overlay._fuseattr: give an EntryAttributes a FUSE node id of its own.

pyfuse3 sets the node id the kernel uses for an inode and the st_ino it
reports from the same field (EntryAttributes.st_ino). The kernel overlay
shows one st_ino for several distinct inodes (the names of a hard-linked
lower file before copy-up), so the adapter needs them apart. An
EntryAttributes object is a PyObject header followed by libfuse's
`struct fuse_entry_param`, whose first member is the node id: set_nodeid()
writes that member only. `supported` is True once a self-test at import has
checked this layout on the installed pyfuse3; where it is False the adapter
uses st_ino as the node id.
"""

from cpython.object cimport PyObject

import pyfuse3


cdef inline unsigned long long *_ino_field(object obj):
    return <unsigned long long *>(<char *><PyObject *>obj + sizeof(PyObject))


def set_nodeid(obj, unsigned long long nodeid):
    """Set the node id of EntryAttributes *obj*, leaving its st_ino."""
    if type(obj) is not pyfuse3.EntryAttributes:
        raise TypeError("EntryAttributes expected")
    _ino_field(obj)[0] = nodeid


def _selftest():
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0x1234567887654321
    if _ino_field(e)[0] != 0x1234567887654321:
        return False
    _ino_field(e)[0] = 42
    # st_ino reads the node id field; the stat copy must be untouched
    if e.st_ino != 42:
        return False
    e.st_ino = 7
    return _ino_field(e)[0] == 7


supported = _selftest()
