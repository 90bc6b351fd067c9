"""Filesystem operations for the differential tests: interpreter + generator.

An op is a plain tuple ``(name, arg, ...)`` with paths relative to the mount
root (``""`` is the root).  ``execute(root, op)`` applies it below ``root``
and returns a comparable result: ``("ok", value)`` or ``("err", "ENOENT")``.
Values are normalised so that the kernel and our mount can be compared:
stat results keep type/mode/uid/gid/size (not for dirs)/nlink/rdev and the
mtime (exact when it is an "old" time set by the test, else ``"NEW"``), never
st_ino/st_dev/atime/ctime.

``OpGenerator`` draws ops from a ``random.Random``; it looks at the current
tree (as seen through the reference mount) to pick paths that mostly exist
(lower, upper and merged objects), plus new names (often names that exist in
lower layers but are whited out), paths through symlinks and broken paths.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import stat
import subprocess
import time

from .layers import DIR_MODES, FILE_MODES, IDS, NAMES, OLD_BEFORE_NS, rand_time

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
MAX_HANDLE_SZ = 128
# file handles saved by fh_save, per mount root: {root: {slot: handle bytes}}
_HANDLES: dict = {}
AT_EMPTY_PATH = 0x1000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
# the fallocate modes a FUSE server is given (collapse/insert/unshare never
# reach one: see the README); the generator draws from these
FALLOC_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)


def _check(ret: int, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)


def seeks(fd) -> tuple:
    """SEEK_DATA and SEEK_HOLE from the start, the middle and the last byte."""
    size = os.fstat(fd).st_size
    out = []
    for off in (0, size // 2, max(size - 1, 0)):
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            try:
                out.append(os.lseek(fd, off, whence))
            except OSError as e:
                out.append(errno.errorcode.get(e.errno, str(e.errno)))
    return tuple(out)


AT_HANDLE_FID = 0x200


def name_to_handle(path: str, flags: int = 0) -> bytes:
    """name_to_handle_at(2) of path (not following a last symlink): the
    struct file_handle, as bytes. flags AT_HANDLE_FID: an identifier
    only (what fanotify reports), not one to open."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    ctypes.c_uint.from_buffer(buf).value = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), flags), path)
    return buf.raw[:8 + ctypes.c_uint.from_buffer(buf).value]


def open_by_handle(root: str, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) of a handle of a file below mount root."""
    mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = ctypes.create_string_buffer(handle, len(handle))
        fd = _libc.open_by_handle_at(mfd, buf, flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def _saved_handle(root: str, slot: int) -> bytes:
    """The handle fh_save kept in slot (EBADF if none), once the kernel's
    inode caches are dropped."""
    h = _HANDLES.get(root, {}).get(slot)
    if h is None:
        raise OSError(errno.EBADF, "no handle in slot")
    drop_inode_caches()
    return h


def drop_inode_caches():
    """Have the kernel forget the dentries and inodes it can (a FUSE mount
    gets FORGETs): what a file handle is decoded from afterwards is the
    filesystem's own."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def renameat2(src: str, dst: str, flags: int = 0):
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


# ---------------------------------------------------------------------------
# normalisation helpers


def ftype(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    if stat.S_ISCHR(mode):
        return "c"
    if stat.S_ISBLK(mode):
        return "b"
    if stat.S_ISSOCK(mode):
        return "s"
    return "?"


def norm_time(ns: int):
    return ns if ns < OLD_BEFORE_NS else "NEW"


def norm_stat(st: os.stat_result) -> dict:
    t = ftype(st.st_mode)
    d = {
        "type": t,
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "mtime": norm_time(st.st_mtime_ns),
    }
    if t != "d":
        d["size"] = st.st_size
    if t in ("c", "b"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d


def visible_xattr(name: str) -> bool:
    return not name.startswith("security.") and not name.startswith("system.")


def _p(root: str, path: str) -> str:
    return os.path.join(root, path) if path else root


# ---------------------------------------------------------------------------
# interpreter


def _write_all(fd, data):
    n = 0
    while n < len(data):
        n += os.write(fd, data[n:])
    return n


def _do(root: str, op: tuple):
    name = op[0]
    P = lambda p: _p(root, p)  # noqa: E731
    if name == "create":
        _, path, mode, data = op
        fd = os.open(P(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            return _write_all(fd, data)
        finally:
            os.close(fd)
    if name == "open_trunc":
        _, path, data = op
        fd = os.open(P(path), os.O_WRONLY | os.O_TRUNC)
        try:
            return _write_all(fd, data)
        finally:
            os.close(fd)
    if name == "write":
        _, path, off, data = op
        fd = os.open(P(path), os.O_WRONLY)
        try:
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    if name == "append":
        _, path, data = op
        fd = os.open(P(path), os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, data)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    if name == "rw":
        # one O_RDWR fd: read, write at offset, read back through the same fd
        _, path, off, data = op
        fd = os.open(P(path), os.O_RDWR)
        try:
            before = os.pread(fd, 1 << 20, 0)
            os.pwrite(fd, data, off)
            after = os.pread(fd, 1 << 20, 0)
            return (before, after)
        finally:
            os.close(fd)
    if name == "open":
        # open with the given flags (O_CREAT gets mode 0o644) and close
        _, path, flags = op
        os.close(os.open(P(path), flags, 0o644))
        return None
    if name == "ro_then_write":
        # fd opened read-only before another fd writes (copy-up): what does
        # the first fd see afterwards?
        _, path, off, data = op
        fd1 = os.open(P(path), os.O_RDONLY)
        try:
            first = os.pread(fd1, 1 << 20, 0)
            fd2 = os.open(P(path), os.O_WRONLY)
            try:
                os.pwrite(fd2, data, off)
            finally:
                os.close(fd2)
            return (first, os.pread(fd1, 1 << 20, 0))
        finally:
            os.close(fd1)
    if name == "truncate":
        _, path, size = op
        os.truncate(P(path), size)
        return None
    if name == "read":
        _, path = op
        fd = os.open(P(path), os.O_RDONLY)
        try:
            chunks = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)
    if name == "chmod":
        _, path, mode = op
        os.chmod(P(path), mode)
        return None
    if name == "chown":
        _, path, uid, gid, follow = op
        os.chown(P(path), uid, gid, follow_symlinks=follow)
        return None
    if name == "utime":
        _, path, at, mt, follow = op
        os.utime(P(path), ns=(at, mt), follow_symlinks=follow)
        return None
    if name == "setxattr":
        _, path, xname, value, flags, follow = op
        os.setxattr(P(path), xname, value, flags, follow_symlinks=follow)
        return None
    if name == "removexattr":
        _, path, xname, follow = op
        os.removexattr(P(path), xname, follow_symlinks=follow)
        return None
    if name == "getxattr":
        _, path, xname, follow = op
        return os.getxattr(P(path), xname, follow_symlinks=follow)
    if name == "listxattr":
        _, path, follow = op
        return sorted(n for n in os.listxattr(P(path), follow_symlinks=follow) if visible_xattr(n))
    if name == "mkdir":
        _, path, mode = op
        os.mkdir(P(path), mode)
        return None
    if name == "rmdir":
        os.rmdir(P(op[1]))
        return None
    if name == "unlink":
        os.unlink(P(op[1]))
        return None
    if name == "rmtree":
        # remove a whole subtree bottom-up (unlink/rmdir through the mount);
        # returns the list of (relpath, result) of every step
        steps = []

        def rm(rel):
            full = P(rel)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                for n in sorted(os.listdir(full)):
                    rm(f"{rel}/{n}" if rel else n)
                try:
                    os.rmdir(full)
                    steps.append((rel, "ok"))
                except OSError as e:
                    steps.append((rel, errno.errorcode.get(e.errno, str(e.errno))))
            else:
                try:
                    os.unlink(full)
                    steps.append((rel, "ok"))
                except OSError as e:
                    steps.append((rel, errno.errorcode.get(e.errno, str(e.errno))))

        rm(op[1])
        return steps
    if name == "rename":
        _, src, dst, flags = op
        renameat2(P(src), P(dst), flags)
        return None
    if name == "link":
        _, src, dst = op
        os.link(P(src), P(dst), follow_symlinks=False)
        return None
    if name == "symlink":
        _, target, path = op
        os.symlink(target, P(path))
        return None
    if name == "mkfifo":
        _, path, mode = op
        os.mkfifo(P(path), mode)
        return None
    if name == "mknod":
        _, path, mode, major, minor = op
        os.mknod(P(path), stat.S_IFCHR | mode, os.makedev(major, minor))
        return None
    if name == "readdir":
        res = []
        with os.scandir(P(op[1])) as it:
            for e in it:
                if e.is_symlink():
                    t = "l"
                elif e.is_dir(follow_symlinks=False):
                    t = "d"
                elif e.is_file(follow_symlinks=False):
                    t = "f"
                else:
                    t = "o"
                res.append((e.name, t))
        return sorted(res)
    if name == "stat":
        return norm_stat(os.stat(P(op[1])))
    if name == "lstat":
        return norm_stat(os.lstat(P(op[1])))
    if name == "readlink":
        return os.readlink(P(op[1]))
    if name == "access":
        _, path, amode = op
        return os.access(P(path), amode)
    if name == "seek":
        # SEEK_DATA / SEEK_HOLE: the real file's holes (lower, or upper)
        fd = os.open(P(op[1]), os.O_RDONLY)
        try:
            return seeks(fd)
        finally:
            os.close(fd)
    if name == "fallocate":
        _, path, mode, off, length = op
        fd = os.open(P(path), os.O_RDWR)
        try:
            _check(_libc.fallocate(fd, mode, off, length), path)
            # (no read here: pages cached over unwritten extents count as data
            # for SEEK_HOLE, and FUSE's readahead caches other pages than the
            # kernel overlay's; the content is compared by read ops and trees)
            return (os.fstat(fd).st_size, seeks(fd))
        finally:
            os.close(fd)
    if name == "copy_range":
        # copy_file_range(2) from src to dst (dst opened for writing: copy-up)
        _, src, dst, off_in, off_out, length = op
        fi = os.open(P(src), os.O_RDONLY)
        try:
            fo = os.open(P(dst), os.O_WRONLY)
            try:
                n = os.copy_file_range(fi, fo, length, off_in, off_out)
                return (n, os.fstat(fo).st_size)
            finally:
                os.close(fo)
        finally:
            os.close(fi)
    if name == "tmpfile":
        # O_TMPFILE in a dir, written, then linked at a name (or not)
        _, path, data, link = op
        fd = os.open(P(path), os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            _write_all(fd, data)
            st = os.fstat(fd)
            res = (st.st_nlink, oct(stat.S_IMODE(st.st_mode)), st.st_size)
            if link is not None:
                _check(_libc.linkat(fd, b"", AT_FDCWD, os.fsencode(P(link)), AT_EMPTY_PATH), link)
                res += (os.fstat(fd).st_nlink,)
            return res
        finally:
            os.close(fd)
    if name == "fh_save":
        # a file handle of path, kept in slot for fh_open / fh_write
        _, path, slot = op
        handles = _HANDLES.setdefault(root, {})
        handles.pop(slot, None)
        handles[slot] = name_to_handle(P(path))
        return None
    if name == "fh_fid":
        # can path be named by a file identifier (AT_HANDLE_FID)?
        name_to_handle(P(op[1]), AT_HANDLE_FID)
        return None
    if name == "fh_open":
        # caches dropped, then the handle in slot opened: what it names now
        h = _saved_handle(root, op[1])
        fd = open_by_handle(root, h, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            res = norm_stat(st)
            if stat.S_ISREG(st.st_mode):
                rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
                try:
                    res["data"] = os.pread(rfd, 1 << 20, 0)
                finally:
                    os.close(rfd)
            return res
        finally:
            os.close(fd)
    if name == "fh_write":
        # caches dropped, then the file of the handle in slot written
        _, slot, off, data = op
        h = _saved_handle(root, slot)
        pfd = open_by_handle(root, h, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                return ("not a file", ftype(st.st_mode))    # (a fifo would block)
            fd = open_by_handle(root, h, os.O_WRONLY)
        finally:
            os.close(pfd)
        try:
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    if name == "as_user":
        # ("as_user", uid, gid, op): op run by a child with those ids (no
        # supplementary groups, no capabilities)
        _, uid, gid, sub = op
        return _in_child(root, sub, ids=(uid, gid))
    if name == "umask":
        # ("umask", mask, op): op run by a child with that umask
        _, mask, sub = op
        return _in_child(root, sub, umask=mask)
    if name == "acl":
        # mode and POSIX ACLs (access, default) of path, as entries
        p = P(op[1])
        out = [oct(stat.S_IMODE(os.lstat(p).st_mode))]
        for xname in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                out.append(acl_entries(os.getxattr(p, xname, follow_symlinks=False)))
            except OSError as e:
                out.append(errno.errorcode.get(e.errno, str(e.errno)))
        return tuple(out)
    if name == "atime_reads":
        # ("atime_reads", path, n): read path n times (open, read, close):
        # did each read change its atime? ("U" or "-")
        _, path, n = op
        marks = ""
        for _ in range(n):
            before = os.stat(P(path)).st_atime_ns
            time.sleep(TICK)
            fd = os.open(P(path), os.O_RDONLY)
            try:
                while os.read(fd, 1 << 16):
                    pass
            finally:
                os.close(fd)
            marks += "U" if os.stat(P(path)).st_atime_ns != before else "-"
        return marks
    if name == "atime_rereads":
        # ("atime_rereads", path, n): one open, n reads from offset 0: did
        # each change the atime?
        _, path, n = op
        marks = ""
        fd = os.open(P(path), os.O_RDONLY)
        try:
            for _ in range(n):
                before = os.stat(P(path)).st_atime_ns
                time.sleep(TICK)
                os.pread(fd, 1 << 16, 0)
                marks += "U" if os.stat(P(path)).st_atime_ns != before else "-"
        finally:
            os.close(fd)
        return marks
    if name == "atime_lists":
        # ("atime_lists", path, n): the same for n listings of a dir
        _, path, n = op
        marks = ""
        for _ in range(n):
            before = os.stat(P(path)).st_atime_ns
            time.sleep(TICK)
            os.listdir(P(path))
            marks += "U" if os.stat(P(path)).st_atime_ns != before else "-"
        return marks
    if name == "atime_exec":
        # ("atime_exec", path): run the program at path: did its atime change?
        before = os.stat(P(op[1])).st_atime_ns
        time.sleep(TICK)
        r = subprocess.run([P(op[1])], capture_output=True, timeout=60)
        return (r.returncode, "U" if os.stat(P(op[1])).st_atime_ns != before else "-")
    if name == "ctime_by":
        # ("ctime_by", path, op): op applied: its result, and whether the
        # ctime (and mtime) of path changed
        _, path, sub = op
        before = statx_times(P(path), STATX_MTIME | STATX_CTIME, False)
        time.sleep(TICK)
        r = execute(root, sub)
        after = statx_times(P(path), STATX_MTIME | STATX_CTIME, False)
        return (r, "ctime " + ("U" if after["ctime"] != before["ctime"] else "-"),
                "mtime " + ("U" if after["mtime"] != before["mtime"] else "-"))
    if name == "mmap_write":
        # ("mmap_write", path, data, close_first): data stored through a
        # shared mapping (no msync), unmapped (after closing the fd when
        # close_first): did stat see new mtime and ctime, with the fd
        # still open and once closed?
        _, path, data, close_first = op
        mask = STATX_MTIME | STATX_CTIME
        before = statx_times(P(path), mask)
        time.sleep(TICK)
        fd = os.open(P(path), os.O_RDWR)
        seen = []
        try:
            m = mmap.mmap(fd, len(data))
            m[:len(data)] = data
            if close_first:
                os.close(fd)
                fd = -1
            m.close()
            if fd >= 0:
                seen.append(statx_times(P(path), mask))
        finally:
            if fd >= 0:
                os.close(fd)
        seen.append(statx_times(P(path), mask))
        return tuple(("m" if t["mtime"] != before["mtime"] else "-")
                     + ("c" if t["ctime"] != before["ctime"] else "-") for t in seen)
    if name == "mmap_store_after_close":
        # ("mmap_store_after_close", path, data): map, close the fd, stat,
        # store through the mapping, unmap: did stat see the new mtime?
        _, path, data = op
        mask = STATX_MTIME | STATX_CTIME
        fd = os.open(P(path), os.O_RDWR)
        m = mmap.mmap(fd, len(data))
        os.close(fd)
        time.sleep(0.2)         # (a FUSE RELEASE follows close(2): let it land)
        try:
            before = statx_times(P(path), mask)
            time.sleep(TICK)
            m[:len(data)] = data
        finally:
            m.close()
        return "m" if statx_times(P(path), mask)["mtime"] != before["mtime"] else "-"
    if name == "direct_rw":
        # ("direct_rw", path, off, nblocks): O_DIRECT write of nblocks 4 KiB
        # blocks at off, then read back with O_DIRECT
        _, path, off, nblocks = op
        fd = os.open(P(path), os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096 * nblocks)
            buf.write(bytes(range(256)) * 16 * nblocks)
            n = os.pwritev(fd, [buf], off)
            back = mmap.mmap(-1, 4096 * nblocks)
            got = os.preadv(fd, [back], off)
            return (n, got, back[:] == buf[:])
        finally:
            os.close(fd)
    if name == "dir_seek_counts":
        # ("dir_seek_counts", path, offsets): for each offset, lseek the dir
        # there: how many entries follow (getdents64, "." and ".." counted:
        # where they come differs)
        _, path, offsets = op
        fd = os.open(P(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            out = []
            for off in offsets:
                os.lseek(fd, off, os.SEEK_SET)
                out.append(len(getdents(fd, dots=True)))
            return tuple(out)
        finally:
            os.close(fd)
    if name == "dir_offsets_hold":
        # ("dir_offsets_hold", path): read the dir entry by entry; then, for
        # every offset handed out, and for every number below the largest,
        # lseek there and read on: does each handed-out offset give exactly
        # the entries after it, and does no number below the largest give
        # end-of-directory early? (as telldir/seekdir rely on)
        # (a big dir: 300 of its offsets, each checked for the entry that
        # follows, a few for all of them, and 600 numbers below the largest)
        fd = os.open(P(op[1]), os.O_RDONLY | os.O_DIRECTORY)
        try:
            seq = getdents(fd, one=True)
            bad = []
            step = max(1, len(seq) // 300)
            for i in range(0, len(seq), step):
                off = seq[i][1]
                os.lseek(fd, off, os.SEEK_SET)
                if i % (step * 60) == 0:
                    ok = getdents(fd) == seq[i + 1:]
                else:
                    ok = getdents(fd, one=True, limit=1) == seq[i + 1:i + 2]
                if not ok:
                    bad.append(("after", seq[i][0]))
            # (below the offset handed out with the last entry but one: the
            # last entry's own place, with the layer filesystem's hashes too)
            last = seq[-2][1] if len(seq) > 1 else 0
            for off in range(0, last, max(1, last // 600)):
                os.lseek(fd, off, os.SEEK_SET)
                if not getdents(fd, one=True, limit=1):
                    bad.append(("early end at", off))
            return (len(seq), tuple(bad))
        finally:
            os.close(fd)
    if name == "dir_read_while_changing":
        # ("dir_read_while_changing", path, nread, gone, new): read nread
        # entries one at a time, then unlink the names gone and create the
        # names new (others than those read), list the dir from the start
        # through another fd (a new listing), and read on: the names that
        # stayed, each seen exactly once? (None where so, else the
        # differences)
        _, path, nread, gone, new = op
        fd = os.open(P(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = getdents(fd, one=True, limit=nread)
            for n in gone:
                os.unlink(os.path.join(P(path), n))
            for n in new:
                os.close(os.open(os.path.join(P(path), n), os.O_CREAT | os.O_WRONLY, 0o644))
            os.listdir(P(path))
            rest = getdents(fd)
            seen = [n for n, _ in first + rest]
            stayed = set(os.listdir(P(path))) - set(new)
            dup = sorted({n for n in seen if seen.count(n) > 1})
            missing = sorted(stayed - set(seen))
            return None if not dup and not missing else ("dup", dup, "missing", missing)
        finally:
            os.close(fd)
    if name == "syncfs":
        fd = os.open(P(op[1]), os.O_RDONLY)
        try:
            _check(_libc.syncfs(fd), op[1])
            return None
        finally:
            os.close(fd)
    raise ValueError(f"unknown op {name!r}")


# between a time read and the change it is compared with: more than the
# kernel's coarse clock step (a jiffy)
TICK = 0.02
STATX_ATIME, STATX_MTIME, STATX_CTIME = 0x20, 0x40, 0x80
AT_SYMLINK_NOFOLLOW = 0x100


def statx_times(path: str, mask: int, follow: bool = True) -> dict:
    """{"atime"|"mtime"|"ctime": ns} of path by statx(2) asking only for
    the times in mask, as stat(1) does (stat -c %Y asks for the mtime
    alone): a FUSE mount answers from its cache what it holds as valid."""
    import struct

    buf = ctypes.create_string_buffer(256)
    _check(_libc.statx(AT_FDCWD, os.fsencode(path), 0 if follow else AT_SYMLINK_NOFOLLOW,
                       mask, buf), path)
    out = {}
    for name, bit, off in (("atime", STATX_ATIME, 64), ("mtime", STATX_MTIME, 112),
                           ("ctime", STATX_CTIME, 96)):
        if mask & bit:
            sec, nsec = struct.unpack_from("<qI", buf.raw, off)
            out[name] = sec * 10**9 + nsec
    return out


def _in_child(root: str, sub: tuple, ids=None, umask=None):
    """execute(root, sub) in a forked child (with ids (uid, gid) and no
    supplementary groups, or with umask): its result."""
    import pickle

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            if umask is not None:
                os.umask(umask)
            if ids is not None:
                os.setgroups([])
                os.setresgid(ids[1], ids[1], ids[1])
                os.setresuid(ids[0], ids[0], ids[0])
            data = pickle.dumps(execute(root, sub))
            with os.fdopen(wfd, "wb") as f:
                f.write(data)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise RuntimeError(f"child running {sub!r} failed")
    kind, value = pickle.loads(data)
    if kind == "err":
        raise OSError(getattr(errno, value, 0) or errno.EIO, value)
    return value


ACL_TAGS = {1: "u", 2: "u", 4: "g", 8: "g", 0x10: "m", 0x20: "o"}


def acl_entries(value: bytes) -> tuple:
    """A POSIX ACL xattr as (tag:id:perms, ...), e.g. ("u::rw-", "m::r--")."""
    import struct

    out = []
    for off in range(4, len(value), 8):
        tag, perm, eid = struct.unpack_from("<HHI", value, off)
        qual = str(eid) if tag in (2, 8) else ""
        out.append(f"{ACL_TAGS.get(tag, tag)}:{qual}:" + "".join(
            c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1))))
    return tuple(out)


def acl_value(*entries: str) -> bytes:
    """The xattr value of a POSIX ACL given as "u::rw-", "u:1000:r--",
    "g::r--", "m::rw-", "o::---" (the inverse of acl_entries)."""
    import struct

    tags = {"u": (1, 2), "g": (4, 8), "m": (0x10, 0x10), "o": (0x20, 0x20)}
    out = struct.pack("<I", 2)
    for e in entries:
        kind, qual, perms = e.split(":")
        perm = sum(b for c, b in (("r", 4), ("w", 2), ("x", 1)) if c in perms)
        tag = tags[kind][1 if qual else 0]
        out += struct.pack("<HHI", tag, perm, int(qual) if qual else 0xFFFFFFFF)
    return out


def getdents(fd, one: bool = False, limit: int = -1, dots: bool = False) -> list:
    """[(name, d_off)] read with getdents64 from where fd is ("." and ".."
    left out unless dots): to the end, or limit entries; one: a buffer of
    one entry at a time (as readdir(3) past a seekdir)."""
    import struct

    buf = ctypes.create_string_buffer(280 if one else 32768)
    out = []
    while limit < 0 or len(out) < limit:
        n = _libc.syscall(217, fd, buf, len(buf))
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        if n == 0:
            return out
        off = 0
        while off < n:
            _ino, doff, reclen = struct.unpack_from("<QqH", buf.raw, off)
            name = buf.raw[off + 19:off + reclen].split(b"\0", 1)[0]
            if dots or name not in (b".", b".."):
                out.append((os.fsdecode(name), doff))
            off += reclen
            if one:
                os.lseek(fd, doff, os.SEEK_SET)
                if len(out) == limit:
                    return out
    return out


def execute(root: str, op: tuple):
    """Apply op below mount root; return ("ok", value) or ("err", ERRNAME)."""
    try:
        return ("ok", _do(root, op))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


MUTATING = {
    "open", "create", "open_trunc", "write", "append", "rw", "ro_then_write", "truncate", "chmod", "chown", "utime",
    "setxattr", "removexattr", "mkdir", "rmdir", "rmtree", "unlink", "rename", "link", "symlink",
    "mkfifo", "mknod", "fallocate", "copy_range", "tmpfile", "fh_write",
}


def fmt_val(v, limit=160) -> str:
    """Short readable form of an op result value (long bytes as length+hash)."""
    import hashlib

    def f(x):
        if isinstance(x, bytes) and len(x) > 40:
            return f"<{len(x)} bytes sha1={hashlib.sha1(x).hexdigest()[:12]} head={x[:16]!r}>"
        if isinstance(x, tuple):
            return "(" + ", ".join(f(y) for y in x) + ("," if len(x) == 1 else "") + ")"
        return repr(x)

    s = f(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_MODE_ARG = {"create": 2, "chmod": 2, "mkdir": 2, "mkfifo": 2, "mknod": 2}


def fmt_op(op: tuple) -> str:
    args = []
    for i, a in enumerate(op[1:], 1):
        if _MODE_ARG.get(op[0]) == i:
            args.append(oct(a))
        elif isinstance(a, bytes) and len(a) > 24:
            args.append(f"<{len(a)} bytes>")
        else:
            args.append(repr(a))
    return f"{op[0]}({', '.join(args)})"


# ---------------------------------------------------------------------------
# tree listing used by the generator


def list_tree(root: str) -> dict:
    """{relpath: (type, st)} for everything below root (lstat, no follow)."""
    out = {"": ("d", os.lstat(root))}
    stack = [""]
    while stack:
        d = stack.pop()
        try:
            it = list(os.scandir(_p(root, d)))
        except OSError:
            continue
        for e in it:
            rel = f"{d}/{e.name}" if d else e.name
            try:
                st = os.lstat(_p(root, rel))
            except OSError:
                continue
            t = ftype(st.st_mode)
            out[rel] = (t, st)
            if t == "d":
                stack.append(rel)
    return out


# ---------------------------------------------------------------------------
# generator

OP_WEIGHTS = {
    "create": 8, "open_trunc": 4, "write": 7, "append": 4, "rw": 2, "ro_then_write": 2, "truncate": 4, "read": 6,
    "chmod": 4, "chown": 3, "utime": 4, "setxattr": 5, "removexattr": 3, "getxattr": 3,
    "listxattr": 3, "mkdir": 6, "rmdir": 5, "rmtree": 2, "unlink": 6, "rename": 9, "rename_noreplace": 3,
    "rename_exchange": 4, "link": 4, "symlink": 3, "mkfifo": 2, "mknod": 2, "readdir": 5,
    "stat": 4, "lstat": 3, "readlink": 2,
    # the operations the pyfuse3 engine could not pass on (EXTENDED_OPS)
    "seek": 2, "fallocate": 3, "copy_range": 3, "tmpfile": 2, "syncfs": 1,
}
EXTENDED_OPS = ("seek", "fallocate", "copy_range", "tmpfile", "syncfs")
# file handles (nfs_export=on runs): saved, then decoded after the kernel
# forgot the inodes, across whatever ops came between
HANDLE_OP_WEIGHTS = {"fh_save": 5, "fh_open": 5, "fh_write": 2}

XATTR_NAMES = ["user.k0", "user.k1", "user.k2", "user.new", "trusted.foo", "trusted.bar"]


class OpGenerator:
    """Draw random ops; ``next(tree)`` needs the current tree listing."""

    def __init__(self, rng: random.Random, extra_names=(), weights=None, resolve_root=None,
                 safe_setxattr=False, extended=True):
        self.rng = rng
        self.safe_setxattr = safe_setxattr
        self.names = sorted(set(NAMES) | set(extra_names) | {"n1", "n2", "x"})
        w = dict(weights or OP_WEIGHTS)
        if not extended:
            # pyfuse3 cannot pass these on (its differences are documented)
            for k in EXTENDED_OPS:
                w.pop(k, None)
        self.kinds = list(w)
        self.cum = []
        tot = 0
        for k in self.kinds:
            tot += w[k]
            self.cum.append(tot)
        self.total = tot
        self.resolve_root = resolve_root  # mount used to resolve symlinks

    def _kind(self):
        x = self.rng.random() * self.total
        for k, c in zip(self.kinds, self.cum):
            if x < c:
                return k
        return self.kinds[-1]

    # -- path pickers -------------------------------------------------------
    def _resolved_type(self, path):
        """Type of what path resolves to (following symlinks) or None."""
        if self.resolve_root is None:
            return None
        try:
            return ftype(os.stat(_p(self.resolve_root, path)).st_mode)
        except OSError:
            return None

    def existing(self, tree, types=None, allow_root=False):
        """A random existing path; ``types`` is a sequence of type letters
        (repeat a letter to weight it): first a type is drawn among those
        present, then a path of that type."""
        cands = [p for p, (t, _) in tree.items() if allow_root or p]
        if types is not None:
            present = [t for t in types if any(tree[p][0] == t for p in cands)]
            if not present:
                return None
            t = self.rng.choice(present)
            cands = [p for p in cands if tree[p][0] == t]
        if not cands:
            return None
        return self.rng.choice(sorted(cands))

    def new_path(self, tree):
        dirs = sorted(p for p, (t, _) in tree.items() if t == "d")
        for _ in range(10):
            d = self.rng.choice(dirs)
            n = self.rng.choice(self.names)
            p = f"{d}/{n}" if d else n
            if p not in tree:
                return p
        return p

    def via_symlink(self, tree):
        links = sorted(p for p, (t, _) in tree.items() if t == "l")
        self.rng.shuffle(links)
        for l in links[:5]:
            if self._resolved_type(l) == "d":
                return f"{l}/{self.rng.choice(self.names)}"
        return None

    def broken(self, tree):
        r = self.rng.random()
        files = sorted(p for p, (t, _) in tree.items() if t == "f")
        if r < 0.5 and files:
            return self.rng.choice(files) + "/" + self.rng.choice(self.names)
        return "nonexistent-dir/" + self.rng.choice(self.names)

    def path(self, tree, types=None, p_exist=0.7, p_new=0.17, p_link=0.08, allow_root=False):
        r = self.rng.random()
        p = None
        if r < p_exist:
            p = self.existing(tree, types, allow_root)
        elif r < p_exist + p_new:
            p = self.new_path(tree)
        elif r < p_exist + p_new + p_link:
            p = self.via_symlink(tree)
        else:
            p = self.broken(tree)
        if p is None:
            p = self.new_path(tree)
        return p

    def openable(self, tree, p_exist=0.75):
        """A path that does not resolve to a fifo/device (opening would block)."""
        for _ in range(20):
            p = self.path(tree, types=("f", "f", "f", "l", "d"), p_exist=p_exist)
            if p in tree and tree[p][0] in ("p", "c", "b"):
                continue
            if self._resolved_type(p) in ("p", "c", "b"):
                continue
            return p
        return "nonexistent-file"

    def file_like(self, tree, p_exist=0.9):
        """Mostly a regular file (or a symlink to one): for seek, fallocate and
        copy_range, whose results on a directory are no one's business."""
        for _ in range(20):
            p = self.path(tree, types=("f", "f", "f", "f", "l"), p_exist=p_exist)
            if self._resolved_type(p) in ("p", "c", "b", "d"):
                continue
            return p
        return "nonexistent-file"

    def data(self, maxlen=300, big=True):
        choices = [0, 1, 5, 17, self.rng.randrange(1, maxlen)]
        if big:
            choices += [100, 4096 + 3]
        return self.rng.randbytes(self.rng.choice(choices))

    def xattr_name(self, path):
        """Half of the time a name the object really has (seen through the
        reference mount), else one from XATTR_NAMES."""
        if self.resolve_root is not None and self.rng.random() < 0.5:
            try:
                names = sorted(n for n in os.listxattr(_p(self.resolve_root, path), follow_symlinks=False)
                               if visible_xattr(n))
            except OSError:
                names = []
            if names:
                return self.rng.choice(names)
        return self.rng.choice(XATTR_NAMES)

    # -- ops ------------------------------------------------------------------
    def next(self, tree) -> tuple:
        rng = self.rng
        k = self._kind()
        if k == "create":
            return ("create", self.path(tree, p_exist=0.15, p_new=0.7), rng.choice(FILE_MODES), self.data())
        if k == "open_trunc":
            return ("open_trunc", self.openable(tree), self.data())
        if k == "write":
            p = self.openable(tree)
            size = tree[p][1].st_size if p in tree else 0
            off = rng.choice([0, size, rng.randrange(0, size + 200), size + rng.randrange(1, 9000)])
            return ("write", p, off, self.data())
        if k == "append":
            return ("append", self.openable(tree), self.data())
        if k == "rw":
            p = self.openable(tree, p_exist=0.9)
            size = tree[p][1].st_size if p in tree else 0
            return ("rw", p, rng.randrange(0, size + 50), self.data(50))
        if k == "ro_then_write":
            p = self.openable(tree, p_exist=0.9)
            size = tree[p][1].st_size if p in tree else 0
            return ("ro_then_write", p, rng.randrange(0, size + 50), self.data(50))
        if k == "truncate":
            p = self.path(tree, types=("f", "f", "f", "f", "l", "d", "p"))
            size = tree[p][1].st_size if p in tree else 0
            return ("truncate", p, rng.choice([0, max(0, size // 2), size + 10, size + rng.randrange(1, 100000)]))
        if k == "read":
            return ("read", self.openable(tree, p_exist=0.85))
        if k == "chmod":
            return ("chmod", self.path(tree, allow_root=True), rng.choice(FILE_MODES + DIR_MODES))
        if k == "chown":
            return ("chown", self.path(tree, allow_root=True), rng.choice(IDS), rng.choice(IDS + [-1]), rng.random() < 0.7)
        if k == "utime":
            return ("utime", self.path(tree, allow_root=True), rand_time(rng), rand_time(rng), rng.random() < 0.7)
        if k == "setxattr":
            flags = rng.choice([0, 0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            p = self.path(tree, allow_root=True)
            name = self.xattr_name(p)
            follow = rng.random() < 0.7
            if self.safe_setxattr:
                flags = 0
                t = tree[p][0] if p in tree else None
                if follow and t == "l":
                    t = self._resolved_type(p)
                if t not in ("f", "d") and name.startswith("user."):
                    name = "trusted.foo"
            return ("setxattr", p, name, self.data(60, big=False), flags, follow)
        if k == "removexattr":
            p = self.path(tree)
            return ("removexattr", p, self.xattr_name(p), rng.random() < 0.7)
        if k == "getxattr":
            p = self.path(tree)
            return ("getxattr", p, self.xattr_name(p), rng.random() < 0.7)
        if k == "listxattr":
            return ("listxattr", self.path(tree, allow_root=True), rng.random() < 0.7)
        if k == "mkdir":
            return ("mkdir", self.path(tree, p_exist=0.15, p_new=0.7), rng.choice(DIR_MODES))
        if k == "rmdir":
            empty = sorted(p for p, (t, _) in tree.items()
                           if p and t == "d" and not any(q.startswith(p + "/") for q in tree))
            if empty and rng.random() < 0.4:
                return ("rmdir", rng.choice(empty))
            return ("rmdir", self.path(tree, types=("d", "d", "d", "d", "f", "l"), p_exist=0.85))
        if k == "rmtree":
            return ("rmtree", self.path(tree, types=("d",), p_exist=0.9))
        if k == "unlink":
            return ("unlink", self.path(tree, types=("f", "f", "l", "p", "c", "d"), p_exist=0.85))
        if k in ("rename", "rename_noreplace", "rename_exchange"):
            flags = {"rename": 0, "rename_noreplace": RENAME_NOREPLACE, "rename_exchange": RENAME_EXCHANGE}[k]
            src = self.path(tree, p_exist=0.85)
            if flags == RENAME_EXCHANGE:
                dst = self.path(tree, p_exist=0.9, p_new=0.07)
            elif rng.random() < 0.5 and src in tree:
                # same type target, often existing
                dst = self.path(tree, types=(tree[src][0],), p_exist=0.5, p_new=0.4)
            else:
                dst = self.path(tree, p_exist=0.4, p_new=0.5)
            return ("rename", src, dst, flags)
        if k == "link":
            return ("link", self.path(tree, types=("f", "f", "l", "p", "d"), p_exist=0.9), self.path(tree, p_exist=0.1, p_new=0.8))
        if k == "symlink":
            target = rng.choice(
                [rng.choice(self.names), "../" + rng.choice(self.names), "nowhere", rng.choice(self.names) + "/" + rng.choice(self.names)]
            )
            return ("symlink", target, self.path(tree, p_exist=0.1, p_new=0.8))
        if k == "mkfifo":
            return ("mkfifo", self.path(tree, p_exist=0.1, p_new=0.8), rng.choice([0o644, 0o600]))
        if k == "mknod":
            return ("mknod", self.path(tree, p_exist=0.1, p_new=0.8), rng.choice([0o644, 0o600]), 1, rng.choice([3, 5, 7]))
        if k == "readdir":
            return ("readdir", self.path(tree, types=("d", "d", "d", "l", "f"), allow_root=True))
        if k == "stat":
            return ("stat", self.path(tree, allow_root=True))
        if k == "lstat":
            return ("lstat", self.path(tree, allow_root=True))
        if k == "readlink":
            return ("readlink", self.path(tree, types=("l", "l", "l", "f")))
        if k == "seek":
            return ("seek", self.file_like(tree))
        if k == "fallocate":
            p = self.file_like(tree, p_exist=0.85)
            size = tree[p][1].st_size if p in tree else 0
            off = rng.choice([0, 4096, size, rng.randrange(0, size + 8192)])
            return ("fallocate", p, rng.choice(FALLOC_MODES), off, rng.choice([1, 4096, 3 * 4096 + 7, 70000]))
        if k == "copy_range":
            src = self.file_like(tree)
            dst = self.file_like(tree)
            size = tree[src][1].st_size if src in tree else 0
            return ("copy_range", src, dst, rng.randrange(0, size + 10), rng.choice([0, 100, 5000]),
                    rng.choice([1, 100, 70000]))
        if k == "tmpfile":
            d = self.path(tree, types=("d", "d", "d", "f"), allow_root=True)
            link = self.path(tree, p_exist=0.1, p_new=0.8) if rng.random() < 0.7 else None
            return ("tmpfile", d, self.data(), link)
        if k == "syncfs":
            return ("syncfs", self.openable(tree, p_exist=0.9))
        if k == "fh_save":
            # not of dirs: the kernel copies a lower dir up when a handle of
            # it is taken (to find it again under a redirect), and a FUSE
            # daemon is not asked for handles: a documented difference
            p = self.path(tree, types=("f", "f", "f", "l", "p"), p_exist=0.95)
            return ("fh_save", p, rng.randrange(4))
        if k == "fh_open":
            return ("fh_open", rng.randrange(4))
        if k == "fh_write":
            return ("fh_write", rng.randrange(4), rng.choice([0, 7, 5000]), self.data(50))
        raise AssertionError(k)
