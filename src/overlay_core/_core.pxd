# cython: language_level=3
"""Declarations of overlay_core._core: the fields and C-level methods of its
classes, so that other Cython modules (the native FUSE engine's bridge) can
use them without Python dispatch: `from overlay_core._core cimport ...`.

The classes build on each other, one part each (see _core.pyx):
_Stack (layers, identity) <- _Resolver (lookup) <- _Lister (readdir)
<- _Copier (copy-up) <- Overlay (the changes to the tree).
"""

from posix.stat cimport struct_stat


cdef class Stat:
    """The fields of a stat(2) result the overlay reports (_sys.pxi)."""
    cdef readonly unsigned long long st_dev, st_ino, st_rdev, st_nlink
    cdef readonly unsigned int st_mode, st_uid, st_gid
    cdef readonly long long st_size, st_blksize, st_blocks
    cdef readonly long long st_atime_ns, st_mtime_ns, st_ctime_ns


cdef class StatX:
    """A statx(2) result: the fields FUSE_STATX carries (_sys.pxi)."""
    cdef readonly unsigned int stx_mask, stx_blksize, stx_nlink, stx_uid, stx_gid, stx_mode
    cdef readonly unsigned long long stx_attributes, stx_attributes_mask
    cdef readonly unsigned long long stx_ino, stx_size, stx_blocks
    cdef readonly long long stx_atime_sec, stx_btime_sec, stx_ctime_sec, stx_mtime_sec
    cdef readonly unsigned int stx_atime_nsec, stx_btime_nsec, stx_ctime_nsec, stx_mtime_nsec
    cdef readonly unsigned int stx_rdev_major, stx_rdev_minor


cdef class _DirState:
    """What only a directory Node needs (_node.pxi): None on files."""
    cdef list dircache             # [(name, Node, dir fd)] of its last listing, or None
    cdef bytes redirect            # upper dir's <prefix>redirect, or None
    cdef object lindex             # {name: [positions in lowers]} (see _build_index)
    cdef int nlookups              # lookups below it before lindex was built
    cdef bint opaque               # upper dir has <prefix>opaque=y
    cdef bint impure               # upper dir has <prefix>impure=y (known set)
    cdef bint indexed              # nfs_export: its copy-up has an index entry


cdef class Node:
    """One object of the merged tree (_node.pxi). Kept small: a daemon
    holds one per inode the kernel knows (hundreds of thousands), so what
    can be a C field is one, flags are bytes, and what only dirs need is in
    a _DirState (dircache, redirect, lindex, nlookups, opaque: properties)."""
    cdef public object parent      # Node, None for the root (and an unlinked O_TMPFILE)
    cdef public bytes name         # name under parent (last known alias)
    cdef public object key         # identity of the real object (see _Stack._intern)
    cdef public list aliases       # other (parent, name) a non-dir is known by, or None
    cdef public object st          # Stat found by the lookup that made/refreshed it
    cdef _DirState _dir            # dirs only
    cdef list _lowers              # dirs: [(layer index, O_PATH fd)], top first; else None
    cdef Node _lru_prev, _lru_next # the fd cache's list (see _Stack._hold)
    cdef int _upper                # O_PATH fd in the upper layer, or -1 (see upper)
    cdef int _lidx                 # non-dirs: layer index of the lower object, or -1
    cdef int _lfd                  # non-dirs: its O_PATH fd (EVICTED when closed)
    cdef public int pins           # open files on it (the adapter counts): never evicted
    cdef public unsigned char is_dir
    cdef public unsigned char evicted   # fds closed by the fd cache, reopened on first use
    cdef public unsigned char busy      # in use by a copy-up: never evicted
    cdef public unsigned char ghost     # a whiteout that readdir lists (see _Lister.readdir)
    cdef public unsigned char in_lru
    cdef unsigned char _has_real, _has_ino
    cdef unsigned char _bits       # NB_CACHED: cached is set; NB_METACOPY: see metacopy
    cdef public unsigned int kernel_refs   # the adapter's count of kernel lookups
    cdef unsigned int _ovi         # its Overlay, by number (see ov): fills what was padding
    cdef public unsigned long long real_dev, real_ino   # the real object behind the fds
    cdef unsigned long long _ino   # st_ino reported for this object (see ino)
    cdef public unsigned long long fuse_id   # the adapter's node id for it, 0 if none
    cdef unsigned long long _c_print   # fingerprint of what the kernel was told (see cached)
    # No cdef methods: a vtable pointer would cost 8 bytes a Node (and with
    # the allocator's 16-byte steps, 16). The engine's C-level helpers:


# Node._bits
cdef enum:
    NB_CACHED = 1       # Node.cached holds a fingerprint
    NB_METACOPY = 2     # Node.metacopy: its data are in its last lower object
    NB_VERIFIED = 4     # its data's fs-verity digest was checked (verity=on)


cdef inline bint node_metacopy(Node n) noexcept:
    """Node.metacopy, at C level."""
    return (n._bits & NB_METACOPY) != 0


cdef inline void node_note_reported(Node n, long long size, long long mtime_ns,
                                    long long ctime_ns) noexcept:
    """Remember what the kernel was told of a lower file (see Node.cached)."""
    n._c_print = _fingerprint(size, mtime_ns, ctime_ns)
    n._bits |= NB_CACHED


cdef inline bint node_is_merged(Node n) noexcept:
    """Node.merged, at C level (an evicted dir keeps its layers' entries,
    and an evicted upper fd is -3, EVICTED)."""
    if not n.is_dir:
        return False
    return ((len(n._lowers) if n._lowers is not None else 0) + (n._upper >= 0 or n._upper == -3)) > 1


cdef inline int node_top_fd(Node n) except -2:
    """The fd n opened last (-1: none): its upper one, then its lower ones
    in order, so the last of those. open() gives the lowest free number, so
    one this high says that many fds are open. (Not a walk of the lowers:
    the engine asks for every dir it hands out, in stacks of thousands.)"""
    cdef int top = n._upper
    if n._lowers and n._lowers[-1][1] > top:
        top = n._lowers[-1][1]
    return top


cdef inline unsigned long long _fingerprint(long long a, long long b, long long c) noexcept:
    """A 64-bit mix of three values (splitmix64 steps): equal inputs, equal
    prints; a chance change goes unnoticed with odds of 2**-64."""
    cdef unsigned long long h = <unsigned long long>a * 0x9E3779B97F4A7C15ULL
    h ^= (h >> 31) ^ (<unsigned long long>b * 0xBF58476D1CE4E5B9ULL)
    h ^= (h >> 27) ^ (<unsigned long long>c * 0x94D049BB133111EBULL)
    return h ^ (h >> 33)


cdef class _Stack:
    """The layers, the work dir and the identity of the Nodes (_stack.pxi)."""
    cdef readonly list lower_paths
    cdef readonly object upper_path
    cdef readonly object work_path
    cdef readonly list lower_roots     # O_PATH fds of lower layer roots (data-only ones last)
    cdef readonly int nlower           # regular lower layers (lower_roots[:nlower])
    cdef readonly int ndata            # data-only lower layers (lowerdir=A::B: _metacopy.pxi)
    cdef readonly int upper_root       # O_PATH fd of upper root or -1
    cdef readonly int work_fd          # O_PATH fd of our dir inside work, or -1
    cdef int _work_base                # O_PATH fd of the workdir= dir, or -1
    cdef list _clones                  # O_PATH fds of the private mounts' roots (_open_layers)
    cdef list _inuse                   # fds holding the in-use locks of upper and work (_lock_inuse)
    cdef int _upper_clone              # the upper's private mount (one of _clones), or -1
    cdef readonly bint private_mounts  # the layers are reached through private mounts
    cdef readonly bint read_only       # a read-only mount (an upper layer is not written)
    cdef readonly bint posix_acl       # new objects inherit default ACLs (not noacl)
    cdef readonly bytes prefix         # b"trusted.overlay." or b"user.overlay."
    cdef readonly bytes x_opaque, x_redirect, x_whiteout, x_ino
    cdef readonly bytes x_origin, x_impure, x_uuid, x_nlink, x_upper, x_metacopy
    cdef readonly bint metacopy        # metacopy=on: metadata-only copy-up (_metacopy.pxi)
    cdef readonly object verity        # "off", "on" or "require" (the kernel's verity=)
    cdef bint _origin_seen             # set by upper_ino: the upper had an origin xattr
    cdef readonly bint index           # index=on (after the kernel's fallbacks: _index.pxi)
    cdef readonly int index_fd         # O_PATH fd of <work>/index, or -1
    cdef object _indexed               # key -> (index entry name, origin's nlink) of indexed Nodes
    cdef readonly object uuid_mode     # "on", "off", "null" or "auto" (the kernel's uuid=)
    cdef readonly list layer_uuids     # uuid of each lower layer's filesystem (16 bytes)
    cdef readonly bint can_decode      # origin file handles can be opened here
    cdef list _mount_fds               # O_RDONLY fds of the lower roots (open_by_handle_at)
    cdef int _upper_mount_fd           # O_RDONLY fd of the upper root (opened when needed), or -1
    cdef object _bad_uuid_layers       # lower layers whose fs uuid is not unique
    cdef readonly bint redirect_dir
    cdef readonly bint redirect_follow # False: redirect_dir=nofollow (a redirect is EPERM)
    cdef readonly bint nfs_export      # nfs_export=on (after the kernel's fallbacks)
    cdef readonly bint index_all       # nfs_export with index: every copy-up indexed
    cdef bytes _upper_uuid             # uuid in handles of upper objects (index upper xattrs)
    cdef list _ovr_lower               # per lower layer: its override_stat xattr name, or None
    cdef readonly object _ovr_upper    # the upper's override_stat xattr name (read), or None
    cdef list _ovr_write               # the names written in the upper ([] none)
    cdef bint _ovr_any                 # some layer keeps owners and modes in xattrs
    cdef readonly bint userxattr
    cdef readonly bint oci             # lower layers use OCI .wh. whiteouts
    cdef readonly bint no_sync
    cdef bint _volatile_marker         # work/incompat/volatile written at mount
    cdef readonly Node root
    cdef readonly unsigned int ovi     # this Overlay's number, kept by its Nodes (Node.ov)
    cdef object __weakref__            # Node.ov finds the Overlay through a weak reference
    cdef public dict nodes             # key -> Node (owned by the adapter's lookups)
    cdef public dict counters          # copy-ups, bytes copied, lookups... (overlay stats)
    cdef public list layer_hits        # lookups each layer served: [upper, lower 0, lower 1...]
    cdef public list renumbered        # Nodes whose attributes changed behind the
                                       # kernel's back: copied up (the adapter drains it)
    cdef object _dev_index             # st_dev -> the kernel's fsid (0: the upper fs)
    cdef bint _samefs
    cdef int _xino_bits                # the kernel's xino_mode: 0 one fs, -1 off, else bits
    cdef object _tmp_counter
    cdef object _lock
    cdef Node _lru_head, _lru_tail     # the fd cache: non-dir Nodes holding fds, oldest first
    cdef public int fd_cache_len
    cdef public int fd_cache_max
    cdef bint _walk_stop               # set by _walk_lower: an opaque dir on the way
    cdef bytes _walk_redirect          # set by _walk_lower: a redirect on the way, or None
    cdef object _private_dirs          # {(st_dev, st_ino)} of the upper and work dirs
    cdef object _cond                  # threading.Condition on the callers' lock, or None
    cdef object _on_long               # called before long work (set_lock), or None
    cdef public bint keep_listings     # readdir keeps listings (dircache)
    cdef public dict providers         # lower layer index -> its data provider (an image
                                       # layer: ensure(st_ino) before data are read,
                                       # ensure_dir(fd) / ensure_path(fd, comps) before a
                                       # dir of it is looked into), or None
    cdef readonly bint quota_on        # quota_bytes= or quota_inodes= (_quota.pxi)
    cdef readonly long long q_bytes_max, q_inodes_max   # the limits, -1: none
    cdef public long long q_bytes, q_inodes             # what the upper holds
    cdef readonly object qlock         # held around a size read, its change and the settling
    cdef dict _q_orphans               # key -> Node: unlinked, counted until the last close

    cdef object _getx(self, int fd, bytes name)
    cdef int _opath(self, int dirfd, bytes name, bint directory) except -1
    cdef bint _oci_whiteout(self, int dirfd, bytes name) except -1
    cdef bint _oci_opaque(self, int dirfd) except -1
    cdef bint _lower_whiteout(self, int dirfd, bytes name, st) except -1
    cdef bint _lower_whiteout_c(self, int dirfd, bytes name, unsigned int mode,
                                unsigned long long rdev, long long size) except -1
    cdef _hold(self, Node n)
    cdef _lru_unlink(self, Node n)
    cdef _evict(self, Node n)
    cdef bint _let_go(self, bint want)
    cdef _take_back(self, bint let)
    cdef _sync_upper(self, Node d)
    cdef _add_alias(self, Node n, Node parent, bytes name)
    cdef _rename_alias(self, Node n, Node op, bytes oname, Node np, bytes nname)
    cdef Node _intern(self, Node n)
    cdef _adopt_upper(self, Node n, int fd, bint keep_ino)
    cdef object _upper_entry(self, Node parent, bytes name)
    cdef bytes _tmpname(self)
    # the C-level interface the native engine calls (also callable from Python)
    cpdef remember(self, Node n)
    cpdef forget(self, Node n)
    cpdef release(self, Node n)
    cpdef evict_dir(self, Node n)
    cpdef Stat getattr(self, Node n)
    cdef Stat shown_stat(self, Node n, Stat st)


cdef class _Resolver(_Stack):
    """Name lookup through the layers (_resolve.pxi)."""
    cdef _walk_lower(self, int base, list comps)
    cdef _check_redirect(self, bytes rd, bytes name, bint follow=*)
    cdef _lookup_lowers(self, Node parent, bytes name, object redirect, bint have_upper_dir,
                        int below=*)
    cdef bytes _redirected(self, bytes path, bytes rd, bytes name)
    cdef list _plan_below(self, Node parent, bytes path, int idx)
    cdef _find_data(self, Node parent, bytes name, object path, int below)
    cdef _build_index(self, Node d)
    cdef Node _known_upper(self, Node parent, bytes name, struct_stat *ust, Stat st)
    cdef _lower_indexed(self, Node n, tuple nondir, Stat lst)
    cdef _verify_merged(self, Node n, object origin, Stat st)
    cpdef Node lookup(self, Node parent, bytes name)


cdef class _Lister(_Resolver):
    """Directory listings (_listing.pxi)."""
    cdef list _list(self, Node n, bint xwhiteouts=*)
    cdef Node _blind_ghost(self, int dirfd, bytes name)
    cdef Node _ghost(self, int dirfd, bytes name)


cdef class _Copier(_Lister):
    """Copy-up (_copyup.pxi)."""
    cdef _copy_up(self, Node n, bint data, bint meta)


cdef class _Quota(_Copier):
    """Upper layer quotas (_quota.pxi)."""
    cpdef tuple quota_grow(self, int fd, long long off, long long end, bint partial)
    cpdef quota_settle(self, long long before, long long allowed_end, long long done_end)
    cpdef quota_truncated(self, long long before, long long after)


cdef class Overlay(_Quota):
    """The changes to the merged tree (_namespace.pxi)."""
    cdef object _parent_owner(self, Node parent, int uid, int gid)
    cdef tuple _new_mode(self, Node parent, int kind, int mode, int umask)
    cdef bytes _escape(self, bytes name)
    cdef object _unescape(self, bytes stored)
    cdef _only_whiteouts(self, int dirfd, bytes name)
    cdef _unname(self, Node n)
    cdef bint _still_linked(self, Node n) except -1
    cdef bytes _dir_index_name(self, Node n)
    cdef _dir_index_end(self, bytes iname)
    cdef bint _merge_or_lower(self, Node n)
    cdef bint _can_move(self, Node n)
    cdef bytes _abs_redirect(self, Node n)
    cdef _set_redirect(self, Node n, bint samedir)
    cdef int _origin_layer(self, Node n, bytes v) except -2
    cpdef bytes encode_handle(self, Node n)
    cpdef Node decode_handle(self, bytes h)
