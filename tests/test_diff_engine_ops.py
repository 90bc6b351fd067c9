"""The operations the pyfuse3 engine could not pass on, against the kernel overlay.

fallocate (every mode FUSE passes on), SEEK_DATA/SEEK_HOLE, copy_file_range,
statx with the birth time, syncfs, O_TMPFILE and locks between processes,
each on a kernel overlay and on ours over the same stack (the fixed
differential harness of test_diff_fixed: every result compared, then the
trees, the upper dirs and the remounts). Where FUSE itself differs (collapse
and insert ranges never reach a FUSE server; with passthrough a read-only fd
opened before a copy-up keeps the lower file) the test pins both sides'
behaviour, as the README documents it. The random suite (test_diff_random)
draws the same operations.
"""

import ctypes
import errno
import fcntl
import os
import struct

import pytest

import mountutil
from difftest.layers import dir as d
from difftest.layers import file
from difftest.ops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from test_diff_fixed import _env  # noqa: F401  (fixture; mk is in conftest)

pytestmark = pytest.mark.skipif(mountutil.engine() == "pyfuse3",
                                reason="engine=pyfuse3 has none of these (README)")

MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE = 0x08, 0x20
STATX_BTIME = 0x800
AT_SYMLINK_NOFOLLOW = 0x100


def sparse(name, mib=4):
    """A file with data only in its second MiB (holes around it)."""
    return file(name, b"\0" * MiB + b"D" * MiB + b"\0" * (mib - 2) * MiB)


def make_holes(path):
    """Punch the zero MiBs of a file made by sparse() in the real layer."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, MiB):
            if off != MiB:
                assert _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, MiB) == 0
    finally:
        os.close(fd)


def statx_btime(path):
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(-100, os.fsencode(path), AT_SYMLINK_NOFOLLOW, STATX_BTIME, buf) != 0:
        raise OSError(ctypes.get_errno(), "statx")
    mask = struct.unpack_from("I", buf.raw, 0)[0]
    sec, nsec = struct.unpack_from("qI", buf.raw, 80)
    return (sec, nsec) if mask & STATX_BTIME else None


def both(p):
    """(kernel mount, our mount) of a DiffPair."""
    return p.mp_k, p.mp_o


def test_seek_data_hole_lower_then_upper(mk):
    p = mk([[sparse("sp"), d("dd"), sparse("dd/s2", 3)]])
    for lower in (p.built_k.lowers[0], p.built_o.lowers[0]):
        make_holes(os.path.join(lower, "sp"))
        make_holes(os.path.join(lower, "dd/s2"))
    r = p.op(("seek", "sp"), expect="ok")
    # data0, hole0, data/hole from the middle (2 MiB: a hole), from the end
    assert r[1] == (MiB, 0, "ENXIO", 2 * MiB, "ENXIO", 4 * MiB - 1), r
    p.op(("seek", "dd/s2"), expect="ok")
    # copy-up keeps the holes the kernel keeps (1 MiB chunks): same answers after
    p.op(("write", "sp", 3 * MiB + 5, b"E"), expect="ok")
    p.op(("seek", "sp"), expect="ok")
    p.op(("truncate", "dd/s2", 6 * MiB), expect="ok")
    p.op(("seek", "dd/s2"), expect="ok")
    p.finish()


def test_fallocate_modes(mk):
    p = mk([[file("low", b"x" * 20000), d("dir"), file("dir/f", b"abc")]])
    p.op(("create", "new", 0o644, b""), expect="ok")
    p.op(("fallocate", "new", 0, 0, MiB), expect="ok")
    p.op(("fallocate", "new", FALLOC_FL_KEEP_SIZE, 0, 2 * MiB), expect="ok")
    p.op(("write", "new", 0, b"y" * 16384), expect="ok")
    p.op(("fallocate", "new", FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 4096), expect="ok")
    p.op(("fallocate", "new", FALLOC_FL_ZERO_RANGE, 8000, 100), expect="ok")
    p.op(("fallocate", "new", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 * MiB, 4096), expect="ok")
    p.op(("read", "new"), expect="ok")
    # on lower files: the open for writing copies up first
    p.op(("fallocate", "low", 0, 30000, 70000), expect="ok")
    p.op(("fallocate", "dir/f", FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 2), expect="ok")
    p.op(("read", "dir/f"), expect="ok")
    p.op(("fallocate", "dir", 0, 0, 10), expect="EISDIR")
    p.op(("fallocate", "nothere", 0, 0, 10), expect="ENOENT")
    p.op(("fallocate", "low", FALLOC_FL_PUNCH_HOLE, 0, 10), expect="ENOTSUP")   # = EOPNOTSUPP
    p.finish()


def test_fallocate_collapse_and_insert_never_reach_fuse(mk):
    """Documented difference (README): the kernel's FUSE client refuses
    FALLOC_FL_COLLAPSE_RANGE and FALLOC_FL_INSERT_RANGE itself (EOPNOTSUPP);
    the kernel overlay passes them to the upper filesystem."""
    p = mk([[file("f", b"z" * 3 * 4096)]])
    p.op(("open", "f", os.O_WRONLY), expect="ok")      # copy it up on both sides
    got = {}
    for side, mp in zip(("kernel", "ours"), both(p)):
        fd = os.open(os.path.join(mp, "f"), os.O_RDWR)
        try:
            got[side] = []
            for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
                r = _libc.fallocate(fd, mode, 0, 4096)
                got[side].append(0 if r == 0 else ctypes.get_errno())
        finally:
            os.close(fd)
    assert got["kernel"] == [0, 0]
    assert got["ours"] == [errno.EOPNOTSUPP, errno.EOPNOTSUPP]


def test_copy_file_range(mk):
    p = mk([[file("a", b"A" * 70000), d("dd"), file("dd/b", b"B" * 100), file("ro", b"r")]])
    p.op(("create", "n", 0o644, b"n" * 10), expect="ok")
    p.op(("copy_range", "a", "n", 0, 0, 70000), expect="ok")
    p.op(("copy_range", "a", "dd/b", 50, 10, 30), expect="ok")      # copy-up of dd/b
    p.op(("copy_range", "dd/b", "a", 0, 69990, 1000), expect="ok")   # grows a (copy-up)
    p.op(("copy_range", "n", "n", 0, 70000, 100), expect="ok")        # within one file
    p.op(("copy_range", "a", "dd", 0, 0, 1), expect="EISDIR")
    p.op(("copy_range", "a", "missing", 0, 0, 1), expect="ENOENT")
    for path in ("n", "a", "dd/b"):
        p.op(("read", path), expect="ok")
    p.finish()


def test_tmpfile(mk):
    p = mk([[d("low"), file("low/f", b"f"), d("merged")], [d("merged"), file("merged/g", b"g")]])
    r = p.op(("tmpfile", "", b"root tmp", "linked"), expect="ok")
    assert r[1] == (0, "0o640", 8, 1), r
    p.op(("tmpfile", "low", b"in a lower dir", "low/t"), expect="ok")          # copies low up
    p.op(("tmpfile", "merged", b"never linked", None), expect="ok")
    p.op(("tmpfile", "merged", b"linked", "merged/g"), expect="EEXIST")
    p.op(("tmpfile", "low/f", b"x", None), expect="ENOTDIR")
    p.op(("tmpfile", "nothere", b"x", None), expect="ENOENT")
    for path in ("linked", "low/t"):
        p.op(("read", path), expect="ok")
        p.op(("stat", path), expect="ok")
    p.op(("readdir", "merged"), expect="ok")
    p.finish()


@pytest.mark.parametrize("opts", [(), ("attr_timeout=0",)], ids=["defaults", "attr_timeout0"])
def test_statx_birth_time(mk, opts):
    """statx shows the real file's birth time: the lower file's before a
    copy-up, the upper copy's after, as the kernel overlay does. Documented
    difference (README): the kernel's FUSE client keeps a birth time it has
    until attr_timeout expires (an attribute invalidation does not cover
    it), so with the default timeout ours may still show the lower file's
    right after the copy-up (or the copy's, when something else made the
    kernel fetch the attributes again meanwhile)."""
    p = mk([[file("f", b"data"), d("dd")]], ours_opts=opts)
    lower_bt = {}
    for side, mp, lower in (("kernel", p.mp_k, p.built_k.lowers[0]), ("ours", p.mp_o, p.built_o.lowers[0])):
        real = statx_btime(os.path.join(lower, "f"))
        if real is None:
            pytest.skip("the layers' filesystem records no birth time")
        lower_bt[side] = real
        assert statx_btime(os.path.join(mp, "f")) == real, side
        assert statx_btime(os.path.join(mp, "dd")) == statx_btime(os.path.join(lower, "dd")), side
    p.op(("append", "f", b"more"), expect="ok")
    assert statx_btime(os.path.join(p.mp_k, "f")) == statx_btime(os.path.join(p.built_k.upper, "f"))
    ours = statx_btime(os.path.join(p.mp_o, "f"))
    copy_bt = statx_btime(os.path.join(p.built_o.upper, "f"))
    if opts:
        assert ours == copy_bt
    else:
        assert ours in (lower_bt["ours"], copy_bt)
    p.finish()


def test_syncfs(mk):
    p = mk([[file("f", b"x")]])
    p.op(("create", "n", 0o644, b"y"), expect="ok")
    p.op(("syncfs", "n"), expect="ok")
    p.op(("syncfs", "f"), expect="ok")
    p.finish()


def _lock_results(mp):
    """Take locks in one process, try them from another: what it gets."""
    path = os.path.join(mp, "f")
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)          # POSIX lock on bytes 0-9
    fcntl.flock(fd, fcntl.LOCK_SH)                 # BSD lock, shared
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = []
        f2 = os.open(path, os.O_RDWR)
        for what, call in (("posix-overlap", lambda: fcntl.lockf(f2, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 5)),
                           ("posix-free", lambda: fcntl.lockf(f2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10)),
                           ("flock-sh", lambda: fcntl.flock(f2, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                           ("flock-ex", lambda: fcntl.flock(os.open(path, os.O_RDONLY),
                                                            fcntl.LOCK_EX | fcntl.LOCK_NB))):
            try:
                call()
                out.append(f"{what}:ok")
            except OSError as e:
                out.append(f"{what}:{errno.errorcode[e.errno]}")
        os.write(w, " ".join(out).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    res = os.read(r, 4096).decode()
    os.close(r)
    os.close(fd)
    return res


def test_locks_between_processes(mk):
    p = mk([[file("f", b"x" * 100)]])
    assert _lock_results(p.mp_k) == _lock_results(p.mp_o) == \
        "posix-overlap:EAGAIN posix-free:ok flock-sh:ok flock-ex:EAGAIN"     # = EWOULDBLOCK
    p.finish()


def test_old_reader_across_copy_up(mk):
    """A read-only fd opened on a lower file before another fd writes it.
    Kernel overlay: the old fd then reads the copy. Ours with passthrough
    (documented in the README): it keeps reading the lower file as it was;
    the writer gets the upper file, the lower layer never changes, nothing
    fails. Ours with passthrough=off: as the kernel."""
    p = mk([[file("f", b"0123456789")]])
    opened = {}
    for side, mp in zip(("kernel", "ours"), both(p)):
        opened[side] = os.open(os.path.join(mp, "f"), os.O_RDONLY)
    try:
        for mp in both(p):
            fd = os.open(os.path.join(mp, "f"), os.O_WRONLY)
            os.pwrite(fd, b"AB", 2)
            os.close(fd)
        assert os.pread(opened["kernel"], 100, 0) == b"01AB456789"
        expected_old = b"0123456789" if mountutil.passthrough() else b"01AB456789"
        assert os.pread(opened["ours"], 100, 0) == expected_old
        assert os.fstat(opened["ours"]).st_size == 10
        for mp in both(p):
            with open(os.path.join(mp, "f"), "rb") as f:
                assert f.read() == b"01AB456789"
        assert open(os.path.join(p.built_o.lowers[0], "f"), "rb").read() == b"0123456789"
    finally:
        for fd in opened.values():
            os.close(fd)
    p.finish()


def test_old_reader_follows_without_passthrough(mk):
    p = mk([[file("f", b"0123456789")]], ours_opts=("passthrough=off",))
    fds = [os.open(os.path.join(mp, "f"), os.O_RDONLY) for mp in both(p)]
    try:
        for mp in both(p):
            fd = os.open(os.path.join(mp, "f"), os.O_WRONLY)
            os.pwrite(fd, b"AB", 2)
            os.close(fd)
        assert [os.pread(fd, 100, 0) for fd in fds] == [b"01AB456789"] * 2
    finally:
        for fd in fds:
            os.close(fd)
    p.finish()
