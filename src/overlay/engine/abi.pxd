# cython: language_level=3
"""overlay.engine.abi: the FUSE kernel protocol as C declarations.

Our own declarations of the wire format of protocol 7.45 (Linux 6.18), so
the engine does not depend on the system's <linux/fuse.h> (Debian 12 ships
7.38, without passthrough, statx or tmpfile). Every struct is naturally
aligned with explicit padding, as the kernel defines them; the sizes are
checked when overlay.engine.wire is imported.

cimported by wire.pyx (requests, replies, INIT) and bridge.pyx (the
per-operation payloads). Nothing here runs.
"""

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t, uint8_t

cdef enum:
    FUSE_KERNEL_VERSION = 7
    FUSE_KERNEL_MINOR_VERSION = 45
    # the oldest minor we speak: Linux 5.15 (Ubuntu 22.04); Debian 12's 6.1 is 7.37
    FUSE_MIN_MINOR_VERSION = 34
    FUSE_ROOT_ID = 1
    FUSE_MIN_READ_BUFFER = 8192

# ---------------------------------------------------------------- opcodes
cdef enum:
    FUSE_LOOKUP = 1
    FUSE_FORGET = 2
    FUSE_GETATTR = 3
    FUSE_SETATTR = 4
    FUSE_READLINK = 5
    FUSE_SYMLINK = 6
    FUSE_MKNOD = 8
    FUSE_MKDIR = 9
    FUSE_UNLINK = 10
    FUSE_RMDIR = 11
    FUSE_RENAME = 12
    FUSE_LINK = 13
    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_WRITE = 16
    FUSE_STATFS = 17
    FUSE_RELEASE = 18
    FUSE_FSYNC = 20
    FUSE_SETXATTR = 21
    FUSE_GETXATTR = 22
    FUSE_LISTXATTR = 23
    FUSE_REMOVEXATTR = 24
    FUSE_FLUSH = 25
    FUSE_INIT = 26
    FUSE_OPENDIR = 27
    FUSE_READDIR = 28
    FUSE_RELEASEDIR = 29
    FUSE_FSYNCDIR = 30
    FUSE_GETLK = 31
    FUSE_SETLK = 32
    FUSE_SETLKW = 33
    FUSE_ACCESS = 34
    FUSE_CREATE = 35
    FUSE_INTERRUPT = 36
    FUSE_BMAP = 37
    FUSE_DESTROY = 38
    FUSE_IOCTL = 39
    FUSE_POLL = 40
    FUSE_NOTIFY_REPLY = 41
    FUSE_BATCH_FORGET = 42
    FUSE_FALLOCATE = 43
    FUSE_READDIRPLUS = 44
    FUSE_RENAME2 = 45
    FUSE_LSEEK = 46
    FUSE_COPY_FILE_RANGE = 47
    FUSE_SETUPMAPPING = 48
    FUSE_REMOVEMAPPING = 49
    FUSE_SYNCFS = 50
    FUSE_TMPFILE = 51
    FUSE_STATX = 52
    FUSE_COPY_FILE_RANGE_64 = 53
    FUSE_OPCODE_MAX = 54

# ---------------------------------------------------------------- notify codes
cdef enum:
    FUSE_NOTIFY_POLL = 1
    FUSE_NOTIFY_INVAL_INODE = 2
    FUSE_NOTIFY_INVAL_ENTRY = 3
    FUSE_NOTIFY_STORE = 4
    FUSE_NOTIFY_RETRIEVE = 5
    FUSE_NOTIFY_DELETE = 6
    FUSE_NOTIFY_RESEND = 7
    FUSE_NOTIFY_INC_EPOCH = 8
    FUSE_NOTIFY_PRUNE = 9

# ---------------------------------------------------------------- INIT flags
# bits 0..31 go in fuse_init_{in,out}.flags, bits 32..63 in flags2 (only
# read by the kernel when the reply also sets FUSE_INIT_EXT)
cdef enum:
    FUSE_ASYNC_READ = 1 << 0
    FUSE_POSIX_LOCKS = 1 << 1
    FUSE_FILE_OPS = 1 << 2
    FUSE_ATOMIC_O_TRUNC = 1 << 3
    FUSE_EXPORT_SUPPORT = 1 << 4
    FUSE_BIG_WRITES = 1 << 5
    FUSE_DONT_MASK = 1 << 6
    FUSE_SPLICE_WRITE = 1 << 7
    FUSE_SPLICE_MOVE = 1 << 8
    FUSE_SPLICE_READ = 1 << 9
    FUSE_FLOCK_LOCKS = 1 << 10
    FUSE_HAS_IOCTL_DIR = 1 << 11
    FUSE_AUTO_INVAL_DATA = 1 << 12
    FUSE_DO_READDIRPLUS = 1 << 13
    FUSE_READDIRPLUS_AUTO = 1 << 14
    FUSE_ASYNC_DIO = 1 << 15
    FUSE_WRITEBACK_CACHE = 1 << 16
    FUSE_NO_OPEN_SUPPORT = 1 << 17
    FUSE_PARALLEL_DIROPS = 1 << 18
    FUSE_HANDLE_KILLPRIV = 1 << 19
    FUSE_POSIX_ACL = 1 << 20
    FUSE_ABORT_ERROR = 1 << 21
    FUSE_MAX_PAGES = 1 << 22
    FUSE_CACHE_SYMLINKS = 1 << 23
    FUSE_NO_OPENDIR_SUPPORT = 1 << 24
    FUSE_EXPLICIT_INVAL_DATA = 1 << 25
    FUSE_MAP_ALIGNMENT = 1 << 26
    FUSE_SUBMOUNTS = 1 << 27
    FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
    FUSE_SETXATTR_EXT = 1 << 29
    FUSE_INIT_EXT = 1 << 30

# flags2 bits (the 64-bit flag's bit number minus 32)
cdef enum:
    FUSE2_SECURITY_CTX = 1 << 0
    FUSE2_HAS_INODE_DAX = 1 << 1
    FUSE2_CREATE_SUPP_GROUP = 1 << 2
    FUSE2_HAS_EXPIRE_ONLY = 1 << 3
    FUSE2_DIRECT_IO_ALLOW_MMAP = 1 << 4
    FUSE2_PASSTHROUGH = 1 << 5
    FUSE2_NO_EXPORT_SUPPORT = 1 << 6
    FUSE2_HAS_RESEND = 1 << 7
    FUSE2_ALLOW_IDMAP = 1 << 8
    FUSE2_OVER_IO_URING = 1 << 9
    FUSE2_REQUEST_TIMEOUT = 1 << 10

# ---------------------------------------------------------------- other flags
cdef enum:
    # fuse_setattr_in.valid
    FATTR_MODE = 1 << 0
    FATTR_UID = 1 << 1
    FATTR_GID = 1 << 2
    FATTR_SIZE = 1 << 3
    FATTR_ATIME = 1 << 4
    FATTR_MTIME = 1 << 5
    FATTR_FH = 1 << 6
    FATTR_ATIME_NOW = 1 << 7
    FATTR_MTIME_NOW = 1 << 8
    FATTR_LOCKOWNER = 1 << 9
    FATTR_CTIME = 1 << 10
    FATTR_KILL_SUIDGID = 1 << 11
    # fuse_open_out.open_flags
    FOPEN_DIRECT_IO = 1 << 0
    FOPEN_KEEP_CACHE = 1 << 1
    FOPEN_NONSEEKABLE = 1 << 2
    FOPEN_CACHE_DIR = 1 << 3
    FOPEN_STREAM = 1 << 4
    FOPEN_NOFLUSH = 1 << 5
    FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
    FOPEN_PASSTHROUGH = 1 << 7
    # fuse_getattr_in.getattr_flags
    FUSE_GETATTR_FH = 1 << 0
    # fuse_write_in.write_flags
    FUSE_WRITE_CACHE = 1 << 0
    FUSE_WRITE_LOCKOWNER = 1 << 1
    FUSE_WRITE_KILL_SUIDGID = 1 << 2
    # fuse_open_in.open_flags / fuse_create_in.open_flags
    FUSE_OPEN_KILL_SUIDGID = 1 << 0
    # fuse_setxattr_in.setxattr_flags
    FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
    # fuse_fsync_in.fsync_flags
    FUSE_FSYNC_FDATASYNC = 1 << 0
    # fuse_release_in.release_flags
    FUSE_RELEASE_FLUSH = 1 << 0
    FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
    # fuse_notify_inval_entry_out.flags
    FUSE_EXPIRE_ONLY = 1 << 0

# ---------------------------------------------------------------- structs
cdef struct fuse_attr:
    uint64_t ino
    uint64_t size
    uint64_t blocks
    uint64_t atime
    uint64_t mtime
    uint64_t ctime
    uint32_t atimensec
    uint32_t mtimensec
    uint32_t ctimensec
    uint32_t mode
    uint32_t nlink
    uint32_t uid
    uint32_t gid
    uint32_t rdev
    uint32_t blksize
    uint32_t flags

cdef struct fuse_sx_time:
    int64_t tv_sec
    uint32_t tv_nsec
    int32_t reserved

cdef struct fuse_statx:
    uint32_t mask
    uint32_t blksize
    uint64_t attributes
    uint32_t nlink
    uint32_t uid
    uint32_t gid
    uint16_t mode
    uint16_t spare0
    uint64_t ino
    uint64_t size
    uint64_t blocks
    uint64_t attributes_mask
    fuse_sx_time atime
    fuse_sx_time btime
    fuse_sx_time ctime
    fuse_sx_time mtime
    uint32_t rdev_major
    uint32_t rdev_minor
    uint32_t dev_major
    uint32_t dev_minor
    uint64_t spare2[14]

cdef struct fuse_kstatfs:
    uint64_t blocks
    uint64_t bfree
    uint64_t bavail
    uint64_t files
    uint64_t ffree
    uint32_t bsize
    uint32_t namelen
    uint32_t frsize
    uint32_t padding
    uint32_t spare[6]

cdef struct fuse_file_lock:
    uint64_t start
    uint64_t end
    uint32_t type
    uint32_t pid

cdef struct fuse_in_header:
    uint32_t len
    uint32_t opcode
    uint64_t unique
    uint64_t nodeid
    uint32_t uid
    uint32_t gid
    uint32_t pid
    uint16_t total_extlen      # extensions after the payload, in 8-byte units
    uint16_t padding

cdef struct fuse_out_header:
    uint32_t len
    int32_t error
    uint64_t unique

cdef struct fuse_entry_out:
    uint64_t nodeid
    uint64_t generation
    uint64_t entry_valid
    uint64_t attr_valid
    uint32_t entry_valid_nsec
    uint32_t attr_valid_nsec
    fuse_attr attr

cdef struct fuse_forget_in:
    uint64_t nlookup

cdef struct fuse_forget_one:
    uint64_t nodeid
    uint64_t nlookup

cdef struct fuse_batch_forget_in:
    uint32_t count
    uint32_t dummy

cdef struct fuse_getattr_in:
    uint32_t getattr_flags
    uint32_t dummy
    uint64_t fh

cdef struct fuse_attr_out:
    uint64_t attr_valid
    uint32_t attr_valid_nsec
    uint32_t dummy
    fuse_attr attr

cdef struct fuse_statx_in:
    uint32_t getattr_flags
    uint32_t reserved
    uint64_t fh
    uint32_t sx_flags
    uint32_t sx_mask

cdef struct fuse_statx_out:
    uint64_t attr_valid
    uint32_t attr_valid_nsec
    uint32_t flags
    uint64_t spare[2]
    fuse_statx stat

cdef struct fuse_mknod_in:
    uint32_t mode
    uint32_t rdev
    uint32_t umask
    uint32_t padding

cdef struct fuse_mkdir_in:
    uint32_t mode
    uint32_t umask

cdef struct fuse_rename_in:
    uint64_t newdir

cdef struct fuse_rename2_in:
    uint64_t newdir
    uint32_t flags
    uint32_t padding

cdef struct fuse_link_in:
    uint64_t oldnodeid

cdef struct fuse_setattr_in:
    uint32_t valid
    uint32_t padding
    uint64_t fh
    uint64_t size
    uint64_t lock_owner
    uint64_t atime
    uint64_t mtime
    uint64_t ctime
    uint32_t atimensec
    uint32_t mtimensec
    uint32_t ctimensec
    uint32_t mode
    uint32_t unused4
    uint32_t uid
    uint32_t gid
    uint32_t unused5

cdef struct fuse_open_in:
    uint32_t flags
    uint32_t open_flags

cdef struct fuse_create_in:
    uint32_t flags
    uint32_t mode
    uint32_t umask
    uint32_t open_flags

cdef struct fuse_open_out:
    uint64_t fh
    uint32_t open_flags
    int32_t backing_id

cdef struct fuse_release_in:
    uint64_t fh
    uint32_t flags
    uint32_t release_flags
    uint64_t lock_owner

cdef struct fuse_flush_in:
    uint64_t fh
    uint32_t unused
    uint32_t padding
    uint64_t lock_owner

cdef struct fuse_read_in:
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t read_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct fuse_write_in:
    uint64_t fh
    uint64_t offset
    uint32_t size
    uint32_t write_flags
    uint64_t lock_owner
    uint32_t flags
    uint32_t padding

cdef struct fuse_write_out:
    uint32_t size
    uint32_t padding

cdef struct fuse_statfs_out:
    fuse_kstatfs st

cdef struct fuse_fsync_in:
    uint64_t fh
    uint32_t fsync_flags
    uint32_t padding

cdef struct fuse_setxattr_in:
    uint32_t size
    uint32_t flags
    uint32_t setxattr_flags     # only with FUSE_SETXATTR_EXT (else 8 bytes)
    uint32_t padding

cdef struct fuse_getxattr_in:
    uint32_t size
    uint32_t padding

cdef struct fuse_getxattr_out:
    uint32_t size
    uint32_t padding

cdef struct fuse_lk_in:
    uint64_t fh
    uint64_t owner
    fuse_file_lock lk
    uint32_t lk_flags
    uint32_t padding

cdef struct fuse_access_in:
    uint32_t mask
    uint32_t padding

cdef struct fuse_init_in:
    uint32_t major
    uint32_t minor
    uint32_t max_readahead
    uint32_t flags
    uint32_t flags2
    uint32_t unused[11]

cdef struct fuse_init_out:
    uint32_t major
    uint32_t minor
    uint32_t max_readahead
    uint32_t flags
    uint16_t max_background
    uint16_t congestion_threshold
    uint32_t max_write
    uint32_t time_gran
    uint16_t max_pages
    uint16_t map_alignment
    uint32_t flags2
    uint32_t max_stack_depth
    uint16_t request_timeout
    uint16_t unused[11]

cdef struct fuse_interrupt_in:
    uint64_t unique

cdef struct fuse_fallocate_in:
    uint64_t fh
    uint64_t offset
    uint64_t length
    uint32_t mode
    uint32_t padding

cdef struct fuse_dirent:
    uint64_t ino
    uint64_t off
    uint32_t namelen
    uint32_t type
    # followed by the name, the record padded to 8 bytes

cdef struct fuse_direntplus:
    fuse_entry_out entry_out
    fuse_dirent dirent

cdef struct fuse_notify_inval_inode_out:
    uint64_t ino
    int64_t off
    int64_t len

cdef struct fuse_notify_inval_entry_out:
    uint64_t parent
    uint32_t namelen
    uint32_t flags

cdef struct fuse_notify_delete_out:
    uint64_t parent
    uint64_t child
    uint32_t namelen
    uint32_t padding

cdef struct fuse_backing_map:
    int32_t fd
    uint32_t flags
    uint64_t padding

cdef struct fuse_lseek_in:
    uint64_t fh
    uint64_t offset
    uint32_t whence
    uint32_t padding

cdef struct fuse_lseek_out:
    uint64_t offset

cdef struct fuse_copy_file_range_in:
    uint64_t fh_in
    uint64_t off_in
    uint64_t nodeid_out
    uint64_t fh_out
    uint64_t off_out
    uint64_t len
    uint64_t flags

cdef struct fuse_copy_file_range_out:
    uint64_t bytes_copied

cdef struct fuse_syncfs_in:
    uint64_t padding

# ---------------------------------------------------------------- /dev/fuse ioctls
# _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t):
# above INT_MAX, so not enum members
cdef extern from *:
    """
    #define OVL_FUSE_DEV_IOC_CLONE 0x8004e500UL
    #define OVL_FUSE_DEV_IOC_BACKING_OPEN 0x4010e501UL
    #define OVL_FUSE_DEV_IOC_BACKING_CLOSE 0x4004e502UL
    """
    const unsigned long FUSE_DEV_IOC_CLONE "OVL_FUSE_DEV_IOC_CLONE"
    const unsigned long FUSE_DEV_IOC_BACKING_OPEN "OVL_FUSE_DEV_IOC_BACKING_OPEN"
    const unsigned long FUSE_DEV_IOC_BACKING_CLOSE "OVL_FUSE_DEV_IOC_BACKING_CLOSE"

# ---------------------------------------------------------------- FUSE over io_uring
# (7.42: the commands of IORING_OP_URING_CMD on a /dev/fuse fd, and what an
# entry's header buffer holds; the request's and the reply's data go in its
# payload buffer)
cdef enum:
    FUSE_URING_IN_OUT_HEADER_SZ = 128
    FUSE_URING_OP_IN_OUT_SZ = 128
    FUSE_IO_URING_CMD_REGISTER = 1
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2

cdef struct fuse_uring_ent_in_out:
    uint64_t flags
    uint64_t commit_id          # the request's unique, given back with its reply
    uint32_t payload_sz         # bytes in the payload buffer (request, then reply)
    uint32_t padding
    uint64_t reserved

cdef struct fuse_uring_req_header:
    char in_out[FUSE_URING_IN_OUT_HEADER_SZ]    # fuse_in_header, then fuse_out_header
    char op_in[FUSE_URING_OP_IN_OUT_SZ]         # the op's first argument (its struct)
    fuse_uring_ent_in_out ring_ent_in_out

cdef struct fuse_uring_cmd_req:            # in the 80-byte command area of the SQE
    uint64_t flags
    uint64_t commit_id
    uint16_t qid
    uint8_t padding[6]
