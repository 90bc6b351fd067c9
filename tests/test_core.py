"""Tests of the Cython core (overlay_core.Overlay) on plain temp dirs, no mount.

Covers path resolution through 1..100 lower layers (shadowing, whiteouts,
xattr whiteouts, opaque dirs, redirects), merged listings, copy-up (data with
holes, mode, owner, times, xattrs, parents first, inode numbers), the work
dir, unlink/rmdir/mkdir/rename with their on-disk marks, read-only stacks and
the security rules (symlinks and `..` never lead outside a layer).

Layers are built by hand in /tmp/core-* dirs.  Everything needs root
(trusted.* xattrs, mknod, chown); tests skip otherwise.  Where convenient the
merged view is compared with the kernel overlay (mounted read-only-ish over
an empty upper; skipped if kernel overlayfs is unavailable).
"""

import errno
import hashlib
import os
import shutil
import stat as S
import tempfile

import pytest

import mountutil

try:
    import overlay_core
    from overlay_core import RENAME_EXCHANGE, RENAME_NOREPLACE, Overlay
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"overlay_core not importable (build it: setup.py build_ext --inplace): {exc}",
                allow_module_level=True)

T1 = 1_111_111_111_123_456_789
T2 = 1_222_222_222_987_654_321
T3 = 1_333_333_333_000_000_001

XO = "trusted.overlay."


# ---------------------------------------------------------------------------
# environment



def _kernel_fh(path):
    """The origin value the kernel writes for the object at path: struct
    ovl_fb (version 0, magic 0xfb, length, flags, handle type, fs uuid) and
    the filesystem's file handle (built here independently of the core)."""
    import ctypes
    import fcntl

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf, 0).value = 128
    mnt = ctypes.c_int()
    AT_FDCWD = -100
    assert libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mnt), 0) == 0
    nbytes = ctypes.c_uint.from_buffer(buf, 0).value
    htype = ctypes.c_int.from_buffer(buf, 4).value
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        u = bytearray(17)
        try:
            fcntl.ioctl(fd, 0x80111500, u)      # FS_IOC_GETFSUUID
            uuid = bytes(u[1:1 + u[0]]).ljust(16, b"\0")
        except OSError:
            uuid = bytes(16)
    finally:
        os.close(fd)
    return bytes((0, 0xFB, 21 + nbytes, 0, htype)) + uuid + buf.raw[8:8 + nbytes]

def _trusted_xattrs_work(d):
    p = os.path.join(d, "probe")
    open(p, "w").close()
    try:
        os.setxattr(p, "trusted.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(p)


@pytest.fixture(autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("core tests need root (trusted.* xattrs, mknod, chown)")


@pytest.fixture
def tmp():
    umask = os.umask(0o022)
    d = tempfile.mkdtemp(prefix="core-", dir="/tmp")
    if not _trusted_xattrs_work(d):
        shutil.rmtree(d)
        pytest.skip("/tmp does not support trusted.* xattrs")
    yield d
    os.umask(umask)          # Overlay() sets the umask to 0; restore ours
    mountutil.remove_tmpdir(d)


class Stack:
    """n lower dirs l0 (top) .. l{n-1}, an upper dir u and a work dir w."""

    def __init__(self, root, n, upper=True):
        self.root = root
        self.lowers = [os.path.join(root, f"l{i}") for i in range(n)]
        for p in self.lowers:
            os.mkdir(p)
        self.upper = os.path.join(root, "u") if upper else None
        self.work = os.path.join(root, "w") if upper else None
        if upper:
            os.mkdir(self.upper)
            os.mkdir(self.work)
        self._open = []

    def L(self, i, *parts):
        return os.path.join(self.lowers[i], *parts)

    def U(self, *parts):
        return os.path.join(self.upper, *parts)

    def overlay(self, **kw):
        """A new Overlay of the stack (as a remount: the ones made before are
        closed first, since an upper dir serves one Overlay at a time)."""
        self.close()
        o = Overlay(self.lowers, self.upper, self.work, **kw)
        self._open.append(o)
        return o

    def work_entries(self):
        return sorted(os.listdir(os.path.join(self.work, "work")))

    def close(self):
        for o in self._open:
            o.close()
        self._open = []


@pytest.fixture
def mkstack(tmp):
    made = []

    def make(n=1, upper=True, sub=None):
        d = os.path.join(tmp, sub or f"s{len(made)}")
        os.mkdir(d)
        s = Stack(d, n, upper)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------------------
# layer building helpers


def mkfile(path, data=b"", mode=0o644, uid=None, gid=None, mtime=None, xattrs=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(path, k, v)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))
    return path


def mkdirp(path, opaque=None, redirect=None):
    os.makedirs(path, exist_ok=True)
    if opaque is not None:
        os.setxattr(path, XO + "opaque", opaque)
    if redirect is not None:
        os.setxattr(path, XO + "redirect", redirect)
    return path


def whiteout(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, S.S_IFCHR | 0o000, os.makedev(0, 0))


def xwhiteout(path):
    """Empty regular file with trusted.overlay.whiteout (its parent must have
    trusted.overlay.opaque=x to count as a whiteout)."""
    mkfile(path)
    os.setxattr(path, XO + "whiteout", b"")


def is_whiteout(path):
    st = os.lstat(path)
    return S.S_ISCHR(st.st_mode) and st.st_rdev == 0


def xattrs_of(path):
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


# ---------------------------------------------------------------------------
# access helpers on the core


def core_open(o, node, flags):
    """o.open() -> fd (the core may return (fd, node) or a bare fd)."""
    r = o.open(node, flags)
    return r[0] if isinstance(r, tuple) else r


def resolve(o, path):
    n = o.root
    for c in path.strip("/").split("/"):
        if c:
            n = o.lookup(n, c.encode())
    return n


def read(o, path):
    fd = core_open(o, resolve(o, path), os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def names(o, path=""):
    return sorted(o.list_names(resolve(o, path)))


def enoent(o, path):
    with pytest.raises(FileNotFoundError):
        resolve(o, path)


def errno_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except OSError as e:
        return e.errno
    return 0


def core_tree(o):
    """{path: description} of the whole merged tree, as seen by the core."""
    out = {}

    def rec(node, prefix):
        for name, child in sorted(o.readdir(node), key=lambda e: e[0]):
            if child.ghost:
                continue        # listed whiteout: not part of the tree
            p = prefix + "/" + name.decode()
            st = o.getattr(child)
            if child.is_dir:
                out[p] = ("dir",)
                rec(child, p)
            elif S.S_ISLNK(st.st_mode):
                out[p] = ("symlink", o.readlink(child))
            elif S.S_ISREG(st.st_mode):
                fd = core_open(o, child, os.O_RDONLY)
                try:
                    out[p] = ("file", os.pread(fd, st.st_size + 1, 0))
                finally:
                    os.close(fd)
            else:
                out[p] = ("other", S.S_IFMT(st.st_mode), st.st_rdev)

    rec(o.root, "")
    return out


def fs_tree(root):
    """The same description of a mounted tree, walked without following symlinks."""
    out = {}

    def rec(d, prefix):
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            rel = prefix + "/" + name
            try:
                st = os.lstat(p)
            except FileNotFoundError:       # listed by readdir, not found by lookup
                out[rel] = ("listed-but-ENOENT",)
                continue
            if S.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
                rec(p, rel)
            elif S.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p).encode() if isinstance(os.readlink(p), str)
                            else os.readlink(p))
            elif S.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("other", S.S_IFMT(st.st_mode), st.st_rdev)

    rec(root, "")
    return out


def kernel_tree(stack, opts=("redirect_dir=on",)):
    """Mount the kernel overlay over the stack's lowers (and its upper, if
    any, with a separate fresh workdir) and return fs_tree of it."""
    mountutil.require_kernel_overlay()
    d = tempfile.mkdtemp(prefix="core-k-", dir="/tmp")
    try:
        mp = os.path.join(d, "m")
        os.mkdir(mp)
        if stack.upper is not None:
            upper, work = stack.upper, os.path.join(d, "w")
        else:
            upper, work = os.path.join(d, "u"), os.path.join(d, "w")
            os.mkdir(upper)
        os.mkdir(work)
        with mountutil.MountTracker() as t:
            t.kernel(stack.lowers, upper, work, mp, opts)
            return fs_tree(mp)
    finally:
        mountutil.remove_tmpdir(d)


# ---------------------------------------------------------------------------
# resolution


def _build_layers(s, n):
    for i in range(n):
        mkfile(s.L(i, "f"), b"L%d" % i)
        mkfile(s.L(i, f"only{i}"), b"only%d" % i)
        if i >= n // 2:
            mkfile(s.L(i, "s"), b"S%d" % i)
        mkfile(s.L(i, "d", f"x{i}"), b"x%d" % i)
        mkfile(s.L(i, "d", "c"), b"c%d" % i)
        if i % 2 == 0:
            mkfile(s.L(i, "a", "b", f"deep{i}"), b"deep%d" % i)
        else:
            mkdirp(s.L(i, "a"))
        if i % 3 == 0 and i + 1 < n:
            # layer i hides g{i} of layer i+1 (and only that one)
            whiteout(s.L(i, f"g{i}"))
            whiteout(s.L(i, "d", f"x{i + 1}"))
        mkfile(s.L(i, f"g{i - 1}"), b"g")


@pytest.mark.parametrize("n", [1, 2, 10, 100])
def test_resolution_through_layers(mkstack, n):
    s = mkstack(n, upper=(n == 1))
    _build_layers(s, n)
    o = s.overlay()
    assert read(o, "f") == b"L0"
    assert read(o, "s") == b"S%d" % (n // 2)
    assert read(o, "d/c") == b"c0"
    for i in range(n):
        assert read(o, f"only{i}") == b"only%d" % i
    hidden = {f"x{i + 1}" for i in range(n) if i % 3 == 0 and i + 1 < n}
    assert set(names(o, "d")) == {b"c"} | {b"x%d" % i for i in range(n) if f"x{i}" not in hidden}
    for h in hidden:
        enoent(o, "d/" + h)
    for i in range(n):
        if i % 3 == 0 and i + 1 < n:
            enoent(o, f"g{i}")
    assert set(names(o, "a/b")) == {b"deep%d" % i for i in range(0, n, 2)}
    d = resolve(o, "d")
    assert d.is_dir and d.merged == (n > 1)
    assert len(d.lowers) == n
    assert [i for i, _ in d.lowers] == list(range(n))
    assert resolve(o, "f").lowers[0][0] == 0
    if n > 1:
        assert core_tree(o) == kernel_tree(s)


def test_whiteouts_and_opaque_in_lowers(mkstack):
    s = mkstack(3)
    # whiteout in l0 hides a file and a dir of l1/l2
    whiteout(s.L(0, "gone"))
    mkfile(s.L(1, "gone"), b"x")
    whiteout(s.L(0, "gdir"))
    mkfile(s.L(2, "gdir", "in"), b"x")
    # whiteout in l1 hides l2, but l0's entry above it shows
    mkfile(s.L(0, "back"), b"top")
    whiteout(s.L(1, "back"))
    mkfile(s.L(2, "back"), b"bottom")
    # whiteout in l1 stops l2's dir from merging into l0's
    mkfile(s.L(0, "m", "a"), b"a")
    whiteout(s.L(1, "m"))
    mkfile(s.L(2, "m", "b"), b"b")
    # opaque dir in l0 hides l1/l2 content, opaque in l1 hides l2
    mkdirp(s.L(0, "o"), opaque=b"y")
    mkfile(s.L(0, "o", "top"), b"t")
    mkfile(s.L(1, "o", "mid"), b"m")
    mkfile(s.L(2, "o", "bot"), b"b")
    mkfile(s.L(0, "p", "top"), b"t")
    mkdirp(s.L(1, "p"), opaque=b"y")
    mkfile(s.L(1, "p", "mid"), b"m")
    mkfile(s.L(2, "p", "bot"), b"b")
    # a file in l1 stops l2's dir from merging
    mkfile(s.L(0, "q", "top"), b"t")
    mkfile(s.L(1, "q"), b"file")
    mkfile(s.L(2, "q", "bot"), b"b")
    # a whiteout in a lower dir with no lower below
    whiteout(s.L(2, "lonely"))
    o = s.overlay()
    enoent(o, "gone")
    enoent(o, "gdir")
    enoent(o, "lonely")
    assert read(o, "back") == b"top"
    assert names(o, "m") == [b"a"]
    assert names(o, "o") == [b"top"]
    enoent(o, "o/mid")
    enoent(o, "o/bot")
    assert len(resolve(o, "o").lowers) == 1
    assert names(o, "p") == [b"mid", b"top"]
    enoent(o, "p/bot")
    assert names(o, "q") == [b"top"]
    assert names(o) == sorted([b"back", b"m", b"o", b"p", b"q"])
    assert core_tree(o) == kernel_tree(s)


def test_xattr_whiteouts(mkstack):
    s = mkstack(2)
    mkdirp(s.L(0, "d"), opaque=b"x")       # "x": has xattr whiteouts, NOT opaque
    xwhiteout(s.L(0, "d", "w"))
    mkfile(s.L(0, "d", "own"), b"own")
    mkfile(s.L(1, "d", "w"), b"hidden")
    mkfile(s.L(1, "d", "other"), b"shown")
    # the same file in a dir without opaque=x: lookup still takes it for a
    # whiteout (as the kernel does), readdir lists it (it only looks in
    # marked dirs)
    xwhiteout(s.L(0, "e", "w"))
    mkfile(s.L(1, "e", "w"), b"below")
    # a non-empty file with the xattr is not a whiteout either
    mkfile(s.L(0, "d", "big"), b"data", xattrs={XO + "whiteout": b""})
    mkfile(s.L(1, "d", "big"), b"below")
    o = s.overlay()
    enoent(o, "d/w")
    assert names(o, "d") == [b"big", b"other", b"own"]
    assert read(o, "d/other") == b"shown"
    assert read(o, "d/big") == b"data"
    assert not resolve(o, "d").opaque
    enoent(o, "e/w")
    e = resolve(o, "e")
    listed = o.readdir(e)
    assert [nm for nm, _ in listed] == [b"w"] and listed[0][1].ghost
    ours, kern = core_tree(o), kernel_tree(s)
    assert kern.pop("/e/w") in (("listed-but-ENOENT",), ("file", b""))
    ours.pop("/e/w", None)
    assert ours == kern


def test_redirects_in_upper(mkstack):
    s = mkstack(2)
    mkfile(s.L(1, "a", "sub", "file"), b"deep")
    mkfile(s.L(1, "a", "afile"), b"A")
    mkfile(s.L(0, "a", "top"), b"T")
    mkfile(s.L(1, "c", "sub", "file"), b"deep-c")
    # relative redirect: upper b was renamed from a
    mkdirp(s.U("b"), redirect=b"a")
    mkfile(s.U("b", "new"), b"new")
    whiteout(s.U("a"))
    # absolute redirect: upper x/y was moved from /a/sub
    mkdirp(s.U("x"))
    # (not /a/sub: a lower dir merged into two places is refused by the kernel)
    mkdirp(s.U("x", "y"), redirect=b"/c/sub")
    whiteout(s.U("c"))        # the origin is hidden, as after a real rename
    o = s.overlay()
    enoent(o, "a")
    assert names(o, "b") == [b"afile", b"new", b"sub", b"top"]
    assert read(o, "b/sub/file") == b"deep"
    assert read(o, "b/top") == b"T"
    b = resolve(o, "b")
    assert b.redirect == b"a" and b.merged
    assert names(o, "x/y") == [b"file"]
    assert read(o, "x/y/file") == b"deep-c"
    assert resolve(o, "x/y").redirect == b"/c/sub"
    assert core_tree(o) == kernel_tree(s)


def test_redirect_in_lower_layer(mkstack):
    s = mkstack(2)
    mkdirp(s.L(0, "b"), redirect=b"a")
    mkfile(s.L(0, "b", "own"), b"own")
    mkfile(s.L(1, "a", "old"), b"old")
    mkfile(s.L(1, "b", "notme"), b"x")
    o = s.overlay()
    assert names(o, "b") == [b"old", b"own"]
    assert core_tree(o) == kernel_tree(s)


def test_merged_listing_with_whiteouts(mkstack):
    s = mkstack(3)
    for i in range(3):
        for j in range(5):
            mkfile(s.L(i, "d", f"f{i}{j}"), b"%d%d" % (i, j))
        mkfile(s.L(i, "d", "same"), b"%d" % i)
    whiteout(s.L(0, "d", "f10"))
    whiteout(s.L(1, "d", "f20"))
    whiteout(s.L(1, "d", "f00"))      # below l0's f00: no effect
    mkdirp(s.U("d"))
    whiteout(s.U("d", "f21"))
    whiteout(s.U("d", "same"))
    mkfile(s.U("d", "f22"), b"up")
    mkfile(s.U("d", "uonly"), b"u")
    o = s.overlay()
    want = {f"f{i}{j}" for i in range(3) for j in range(5)} - {"f10", "f20", "f21"}
    want |= {"uonly"}
    got = o.list_names(resolve(o, "d"))
    assert len(got) == len(set(got)), "duplicate names in a merged listing"
    assert {n.decode() for n in got} == want
    assert read(o, "d/f22") == b"up"
    assert read(o, "d/f00") == b"00"
    enoent(o, "d/same")
    assert {n.decode() for n, _ in o.readdir(resolve(o, "d"))} == want
    assert core_tree(o) == kernel_tree(s)


# ---------------------------------------------------------------------------
# copy-up


def test_copy_up_file_metadata_and_xattrs(mkstack):
    s = mkstack(1)
    p = mkfile(s.L(0, "f"), b"hello" * 1000, mode=0o2754, uid=1234, gid=5678,
               xattrs={"user.a": b"1", "trusted.b": b"2", XO + "origin": b"junk",
                       XO + "foo": b"bar"},
               mtime=T1)
    os.utime(p, ns=(T2, T1))
    lst = os.lstat(p)
    o = s.overlay()
    n = resolve(o, "f")
    ino = n.ino
    assert ino == lst.st_ino and n.upper < 0
    o.copy_up(n)
    assert n.upper >= 0 and n.ino == ino
    ust = os.lstat(s.U("f"))
    assert S.S_IMODE(ust.st_mode) == 0o2754
    assert (ust.st_uid, ust.st_gid) == (1234, 5678)
    assert ust.st_mtime_ns == T1
    assert ust.st_atime_ns == T2
    with open(s.U("f"), "rb") as f:
        assert f.read() == b"hello" * 1000
    xs = xattrs_of(s.U("f"))
    assert xs["user.a"] == b"1"
    assert xs["trusted.b"] == b"2"
    # the kernel's origin: the lower file's handle (with its fs uuid); no
    # fuse.ino where the kernel's origin can be followed
    assert {k for k in xs if k.startswith(XO)} == {XO + "origin"}
    assert xs[XO + "origin"] == _kernel_fh(p)
    assert xattrs_of(s.upper)[XO + "impure"] == b"y"
    # the core's view of the copy
    st = o.getattr(n)
    assert st.st_mtime_ns == T1 and S.S_IMODE(st.st_mode) == 0o2754
    assert sorted(o.listxattr(n)) == [b"trusted.b", b"user.a"]
    assert s.work_entries() == []
    # lower untouched
    assert xattrs_of(p)[XO + "foo"] == b"bar"


def test_copy_up_sparse_file(mkstack):
    s = mkstack(1)
    p = s.L(0, "sparse")
    with open(p, "wb") as f:
        f.write(b"A" * (1 << 20))
        f.seek(8 << 20)
        f.write(b"B" * (1 << 20))
        f.truncate(32 << 20)
    lst = os.stat(p)
    assert lst.st_blocks * 512 < (4 << 20), "test fs does not keep holes"
    o = s.overlay()
    n = resolve(o, "sparse")
    fd = core_open(o, n, os.O_RDWR)       # write access copies up
    os.close(fd)
    assert n.upper >= 0
    ust = os.stat(s.U("sparse"))
    assert ust.st_size == 32 << 20
    assert ust.st_blocks <= lst.st_blocks + 256, (ust.st_blocks, lst.st_blocks)

    def digest(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        return h.digest()

    assert digest(s.U("sparse")) == digest(p)
    fd = os.open(s.U("sparse"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 << 20
        assert os.lseek(fd, 1 << 20, os.SEEK_DATA) == 8 << 20
    finally:
        os.close(fd)
    assert s.work_entries() == []


def test_copy_up_dir_symlink_fifo_device(mkstack):
    s = mkstack(1)
    d = mkdirp(s.L(0, "d"))
    os.chown(d, 11, 12)
    os.chmod(d, 0o1750)
    os.setxattr(d, "user.d", b"dx")
    os.setxattr(d, "trusted.d", b"dt")
    os.setxattr(d, XO + "opaque", b"y")      # a lower opaque mark: never copied
    mkfile(s.L(0, "d", "inside"), b"i")
    os.utime(d, ns=(T2, T2))
    os.symlink("some/where", s.L(0, "sl"))
    os.chown(s.L(0, "sl"), 21, 22, follow_symlinks=False)
    os.setxattr(s.L(0, "sl"), "trusted.s", b"st", follow_symlinks=False)
    os.utime(s.L(0, "sl"), ns=(T3, T3), follow_symlinks=False)
    os.mkfifo(s.L(0, "fifo"), 0o640)
    os.chown(s.L(0, "fifo"), 31, 32)
    os.utime(s.L(0, "fifo"), ns=(T1, T1))
    os.mknod(s.L(0, "null"), S.S_IFCHR | 0o620, os.makedev(1, 3))
    os.chmod(s.L(0, "null"), 0o620)
    os.utime(s.L(0, "null"), ns=(T1, T1))
    inos = {nm: os.lstat(s.L(0, nm)).st_ino for nm in ("d", "sl", "fifo", "null")}
    o = s.overlay()
    for nm in ("d", "sl", "fifo", "null"):
        n = resolve(o, nm)
        o.copy_up(n)
        assert n.upper >= 0 and n.ino == inos[nm]
    st = os.lstat(s.U("d"))
    assert S.S_ISDIR(st.st_mode) and S.S_IMODE(st.st_mode) == 0o1750
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (11, 12, T2)
    xs = xattrs_of(s.U("d"))
    assert xs["user.d"] == b"dx" and xs["trusted.d"] == b"dt"
    assert XO + "opaque" not in xs
    assert os.listdir(s.U("d")) == []           # a dir copy-up copies no children
    assert names(o, "d") == [b"inside"]
    st = os.lstat(s.U("sl"))
    assert S.S_ISLNK(st.st_mode) and os.readlink(s.U("sl")) == "some/where"
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (21, 22, T3)
    assert xattrs_of(s.U("sl")).get("trusted.s") == b"st"
    st = os.lstat(s.U("fifo"))
    assert S.S_ISFIFO(st.st_mode) and S.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (31, 32, T1)
    st = os.lstat(s.U("null"))
    assert S.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert S.S_IMODE(st.st_mode) == 0o620 and st.st_mtime_ns == T1
    assert s.work_entries() == []


def test_copy_up_parents_first_with_metadata(mkstack):
    s = mkstack(1)
    mkdirp(s.L(0, "d1", "d2"))
    os.chown(s.L(0, "d1"), 5, 6)
    os.chmod(s.L(0, "d1"), 0o751)
    os.setxattr(s.L(0, "d1"), "user.p", b"1")
    os.chown(s.L(0, "d1", "d2"), 7, 8)
    os.chmod(s.L(0, "d1", "d2"), 0o705)
    mkfile(s.L(0, "d1", "d2", "f"), b"data", mtime=T3)
    inos = [os.stat(s.L(0, "d1")).st_ino, os.stat(s.L(0, "d1", "d2")).st_ino]
    o = s.overlay()
    n = resolve(o, "d1/d2/f")
    o.copy_up(n)
    st1, st2 = os.lstat(s.U("d1")), os.lstat(s.U("d1", "d2"))
    assert (S.S_IMODE(st1.st_mode), st1.st_uid, st1.st_gid) == (0o751, 5, 6)
    assert (S.S_IMODE(st2.st_mode), st2.st_uid, st2.st_gid) == (0o705, 7, 8)
    assert xattrs_of(s.U("d1"))["user.p"] == b"1"
    assert xattrs_of(s.U("d1"))[XO + "origin"] == _kernel_fh(s.L(0, "d1"))
    assert xattrs_of(s.U("d1", "d2"))[XO + "origin"] == _kernel_fh(s.L(0, "d1", "d2"))
    assert xattrs_of(s.U("d1"))[XO + "impure"] == b"y"     # d2 was copied up into it
    assert resolve(o, "d1").ino == inos[0]
    assert os.lstat(s.U("d1", "d2", "f")).st_mtime_ns == T3
    assert s.work_entries() == []


def test_copy_up_keeps_parent_times(mkstack):
    """The kernel restores the parent dirs' atime/mtime after linking the
    copied-up child into them (copy_up.c: "Restore timestamps on parent")."""
    s = mkstack(1)
    mkfile(s.L(0, "d1", "d2", "f"), b"data")
    for p in ("d1/d2", "d1"):
        os.utime(s.L(0, p), ns=(T1, T2))
    o = s.overlay()
    o.copy_up(resolve(o, "d1/d2/f"))
    assert os.lstat(s.U("d1", "d2")).st_mtime_ns == T2
    assert os.lstat(s.U("d1")).st_mtime_ns == T2


def test_copy_up_keeps_ino_across_instances(mkstack):
    s = mkstack(2)
    mkfile(s.L(1, "f"), b"x")
    mkfile(s.L(0, "d", "g"), b"y")
    mkfile(s.L(1, "d", "h"), b"z")
    lino = os.stat(s.L(1, "f")).st_ino
    dino = os.stat(s.L(0, "d")).st_ino
    o = s.overlay()
    assert resolve(o, "f").ino == lino
    fd = core_open(o, resolve(o, "f"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"more")
    os.close(fd)
    assert resolve(o, "f").ino == lino
    o.setattr(resolve(o, "d"), mode=0o700)      # copies the merged dir up
    assert resolve(o, "d").ino == dino
    o2 = s.overlay()
    assert resolve(o2, "f").ino == lino
    assert resolve(o2, "d").ino == dino
    assert read(o2, "f") == b"xmore"


def test_work_leftovers_removed_at_init(mkstack):
    s = mkstack(1)
    w = os.path.join(s.work, "work")
    os.makedirs(os.path.join(w, "#dead-1", "sub"))
    mkfile(os.path.join(w, "#dead-1", "sub", "f"), b"x")
    mkfile(os.path.join(w, "#dead-2"), b"half a copy")
    whiteout(os.path.join(w, "#dead-3"))
    os.symlink("/etc", os.path.join(w, "#dead-4"))
    os.symlink("/etc", os.path.join(w, "#dead-1", "etc"))
    os.chmod(os.path.join(w, "#dead-1", "sub"), 0o000)
    s.overlay()
    assert os.listdir(w) == []
    assert os.path.exists("/etc/passwd")


def test_no_work_leftovers_after_operations(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "a"), b"a")
    mkfile(s.L(0, "d", "x"), b"x")
    mkfile(s.L(0, "e", "y"), b"y")
    o = s.overlay()
    o.copy_up(resolve(o, "a"))
    o.unlink(o.root, b"a")
    o.unlink(resolve(o, "d"), b"x")
    o.rmdir(o.root, b"d")
    o.mkdir(o.root, b"d", 0o755, 0, 0)
    fd, _ = o.create(resolve(o, "d"), b"new", os.O_WRONLY, 0o644, 0, 0)
    os.close(fd)
    o.rename(o.root, b"e", resolve(o, "d"), b"e2", 0)
    o.symlink(o.root, b"e", b"target", 0, 0)
    o.rename(resolve(o, "d"), b"e2", o.root, b"e", RENAME_EXCHANGE)
    assert o.readlink(resolve(o, "d/e2")) == b"target"
    assert names(o, "e") == [b"y"]
    o.unlink(resolve(o, "d"), b"e2")
    assert errno_of(o.rmdir, o.root, b"e") == errno.ENOTEMPTY
    o.unlink(resolve(o, "e"), b"y")
    o.rmdir(o.root, b"e")
    assert names(o) == [b"d"] and names(o, "d") == [b"new"]
    assert s.work_entries() == []


# ---------------------------------------------------------------------------
# removal and creation


def test_unlink_whiteouts(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "low"), b"l")
    mkfile(s.L(0, "cu"), b"c")
    o = s.overlay()
    o.unlink(o.root, b"low")
    assert is_whiteout(s.U("low"))
    enoent(o, "low")
    fd, _ = o.create(o.root, b"up", os.O_WRONLY, 0o644, 0, 0)
    os.close(fd)
    o.unlink(o.root, b"up")
    assert not os.path.lexists(s.U("up")), "no whiteout for an upper-only file"
    o.copy_up(resolve(o, "cu"))
    o.unlink(o.root, b"cu")
    assert is_whiteout(s.U("cu"))
    assert names(o) == []
    # recreating over a whiteout replaces it
    fd, n = o.create(o.root, b"low", os.O_WRONLY, 0o600, 0, 0)
    os.write(fd, b"again")
    os.close(fd)
    assert read(o, "low") == b"again"
    assert S.S_ISREG(os.lstat(s.U("low")).st_mode)
    assert s.work_entries() == []


def test_removed_object_is_not_found_again_by_a_new_one(mkstack):
    """A Node whose last name is gone stops standing for its (st_dev,
    st_ino): the filesystem reuses freed inode numbers, and a new file with
    the old number must not get the old Node and its st_ino (engine=pyfuse3
    showed the copied-up file's st_ino on a file created over its whiteout,
    when the RELEASE of its fd came after the UNLINK)."""
    s = mkstack(1)
    mkfile(s.L(0, "a"), b"lower")
    mkdirp(s.L(0, "d"))
    o = s.overlay()
    lower_ino = os.lstat(s.L(0, "a")).st_ino
    n = resolve(o, "a")
    o.copy_up(n)
    assert n.ino == lower_ino
    n.pins += 1                     # an open fd, released after the unlink
    o.unlink(o.root, b"a")
    assert o.nodes.get(n.key) is not n
    n.pins -= 1
    o.release(n)                    # the RELEASE: its fd closes, the inode is freed
    fd, m = o.create(o.root, b"a", os.O_WRONLY, 0o600, 0, 0)
    os.close(fd)
    o.remember(m)
    again = resolve(o, "a")
    assert again is not n and again.ino == os.lstat(s.U("a")).st_ino != lower_ino
    # the same for a dir, and for a rename's overwritten target
    d = resolve(o, "d")
    o.copy_up(d)
    o.rmdir(o.root, b"d")
    assert o.nodes.get(d.key) is not d
    fd, t = o.create(o.root, b"t", os.O_WRONLY, 0o600, 0, 0)
    os.close(fd)
    o.remember(t)
    fd, src = o.create(o.root, b"src", os.O_WRONLY, 0o600, 0, 0)
    os.close(fd)
    o.rename(o.root, b"src", o.root, b"t")
    assert o.nodes.get(t.key) is not t


def test_rmdir_then_mkdir_gives_opaque_dir(mkstack):
    s = mkstack(2)
    mkfile(s.L(0, "d", "x"), b"x")
    mkfile(s.L(1, "d", "y"), b"y")
    o = s.overlay()
    assert errno_of(o.rmdir, o.root, b"d") == errno.ENOTEMPTY
    d = resolve(o, "d")
    o.unlink(d, b"x")
    o.unlink(d, b"y")
    assert names(o, "d") == []
    o.rmdir(o.root, b"d")
    assert is_whiteout(s.U("d"))
    enoent(o, "d")
    o.mkdir(o.root, b"d", 0o750, 0, 0)
    assert os.getxattr(s.U("d"), XO + "opaque") == b"y"
    assert names(o, "d") == []
    enoent(o, "d/x")
    enoent(o, "d/y")
    assert resolve(o, "d").opaque
    assert S.S_IMODE(os.lstat(s.U("d")).st_mode) == 0o750
    assert s.work_entries() == []
    assert core_tree(o) == kernel_tree(s)


def test_enotempty(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "low", "f"), b"x")
    mkfile(s.U("up", "f"), b"x")
    mkfile(s.L(0, "mer", "a"), b"a")
    mkdirp(s.U("mer"))
    o = s.overlay()
    for nm in (b"low", b"up", b"mer"):
        assert errno_of(o.rmdir, o.root, nm) == errno.ENOTEMPTY
    assert errno_of(o.rmdir, o.root, b"nope") == errno.ENOENT
    fd, _ = o.create(o.root, b"file", os.O_WRONLY, 0o644, 0, 0)
    os.close(fd)
    assert errno_of(o.rmdir, o.root, b"file") == errno.ENOTDIR
    assert errno_of(o.unlink, o.root, b"low") == errno.EISDIR
    assert errno_of(o.mkdir, o.root, b"low", 0o755, 0, 0) == errno.EEXIST
    assert s.work_entries() == []


def test_wh_prefix_names_are_plain(mkstack):
    s = mkstack(2)
    mkfile(s.L(0, ".wh.foo"), b"w")
    mkfile(s.L(1, "foo"), b"foo")
    mkfile(s.L(0, "d", ".wh..wh..opq"), b"o")
    mkfile(s.L(1, "d", "below"), b"b")
    o = s.overlay()
    assert names(o) == [b".wh.foo", b"d", b"foo"]
    assert names(o, "d") == [b".wh..wh..opq", b"below"]
    fd, _ = o.create(o.root, b".wh.bar", os.O_WRONLY, 0o644, 0, 0)
    os.close(fd)
    assert S.S_ISREG(os.lstat(s.U(".wh.bar")).st_mode)
    assert read(o, "foo") == b"foo"
    assert core_tree(o) == kernel_tree(s)


# ---------------------------------------------------------------------------
# rename


def test_rename_lower_dir_sets_redirect(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "a", "f"), b"af")
    mkfile(s.L(0, "c", "g"), b"cg")
    o = s.overlay()
    o.rename(o.root, b"a", o.root, b"b", 0)
    assert os.getxattr(s.U("b"), XO + "redirect") == b"a"
    assert is_whiteout(s.U("a"))
    assert read(o, "b/f") == b"af"
    enoent(o, "a")
    o.mkdir(o.root, b"x", 0o755, 0, 0)
    o.rename(o.root, b"c", resolve(o, "x"), b"c2", 0)
    assert os.getxattr(s.U("x", "c2"), XO + "redirect") == b"/c"
    assert read(o, "x/c2/g") == b"cg"
    # a dir already redirected and moved again keeps pointing at the origin
    o.rename(o.root, b"b", resolve(o, "x"), b"b2", 0)
    assert os.getxattr(s.U("x", "b2"), XO + "redirect") == b"/a"
    assert read(o, "x/b2/f") == b"af"
    assert s.work_entries() == []
    o2 = s.overlay()
    assert core_tree(o2) == {
        "/x": ("dir",), "/x/b2": ("dir",), "/x/b2/f": ("file", b"af"),
        "/x/c2": ("dir",), "/x/c2/g": ("file", b"cg"),
    }
    assert core_tree(o2) == kernel_tree(s)


def test_redirect_dir_off_gives_exdev(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "low", "f"), b"x")
    mkfile(s.L(0, "mer", "f"), b"x")
    mkdirp(s.U("mer"))
    mkfile(s.L(0, "file"), b"x")
    mkdirp(s.L(0, "empty"))
    o = s.overlay(redirect_dir=False)
    assert errno_of(o.rename, o.root, b"low", o.root, b"low2", 0) == errno.EXDEV
    assert errno_of(o.rename, o.root, b"mer", o.root, b"mer2", 0) == errno.EXDEV
    assert errno_of(o.rename, o.root, b"empty", o.root, b"e2", 0) == errno.EXDEV
    o.mkdir(o.root, b"new", 0o755, 0, 0)
    o.rename(o.root, b"new", o.root, b"new2", 0)        # upper-only dir: fine
    o.rename(o.root, b"file", o.root, b"file2", 0)      # files: fine
    assert names(o) == [b"empty", b"file2", b"low", b"mer", b"new2"]
    assert s.work_entries() == []


def test_rename_exchange_and_noreplace(mkstack):
    s = mkstack(1)
    mkfile(s.L(0, "p"), b"P")
    mkfile(s.U("q"), b"Q")
    mkfile(s.L(0, "dl", "inl"), b"l")
    mkfile(s.U("du", "inu"), b"u")
    o = s.overlay()
    o.rename(o.root, b"p", o.root, b"q", RENAME_EXCHANGE)
    assert read(o, "p") == b"Q" and read(o, "q") == b"P"
    o.rename(o.root, b"dl", o.root, b"du", RENAME_EXCHANGE)
    assert names(o, "du") == [b"inl"] and names(o, "dl") == [b"inu"]
    assert os.getxattr(s.U("du"), XO + "redirect") == b"dl"
    assert errno_of(o.rename, o.root, b"p", o.root, b"zz", RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(o.rename, o.root, b"p", o.root, b"q", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(o.rename, o.root, b"p", o.root, b"q",
                    RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL
    o.rename(o.root, b"q", o.root, b"r", RENAME_NOREPLACE)
    assert read(o, "r") == b"P"
    enoent(o, "q")
    assert not os.path.lexists(s.U("q"))  # no lower q: nothing to white out
    o.rename(o.root, b"p", o.root, b"r", 0)
    assert is_whiteout(s.U("p"))          # the lower p is hidden
    assert read(o, "r") == b"Q"
    assert s.work_entries() == []
    o2 = s.overlay()
    assert core_tree(o2) == kernel_tree(s)


def test_read_only_gives_erofs(mkstack):
    s = mkstack(1, upper=False)
    mkfile(s.L(0, "f"), b"x")
    mkfile(s.L(0, "d", "g"), b"y")
    o = s.overlay()
    r, f, d = o.root, resolve(o, "f"), resolve(o, "d")
    calls = [
        lambda: o.create(r, b"new", os.O_WRONLY, 0o644, 0, 0),
        lambda: o.mkdir(r, b"nd", 0o755, 0, 0),
        lambda: o.mknod(r, b"fifo", S.S_IFIFO | 0o644, 0, 0, 0),
        lambda: o.symlink(r, b"sl", b"t", 0, 0),
        lambda: o.link(f, r, b"f2"),
        lambda: o.unlink(r, b"f"),
        lambda: o.rmdir(d, b"g"),
        lambda: o.rmdir(r, b"d"),
        lambda: o.rename(r, b"f", r, b"f3", 0),
        lambda: o.setattr(f, mode=0o600),
        lambda: o.setattr(f, size=0),
        lambda: o.setxattr(f, b"user.x", b"1"),
        lambda: o.removexattr(f, b"user.x"),
        lambda: o.open(f, os.O_WRONLY),
        lambda: o.open(f, os.O_RDWR),
        lambda: o.open(f, os.O_RDONLY | os.O_TRUNC),
        lambda: o.copy_up(f),
    ]
    for i, c in enumerate(calls):
        assert errno_of(c) == errno.EROFS, f"call #{i}"
    assert read(o, "f") == b"x"
    assert names(o) == [b"d", b"f"]


# ---------------------------------------------------------------------------
# security: nothing outside the layers is reachable


def e_node(o):
    return resolve(o, "e")


@pytest.fixture
def outside(tmp):
    d = os.path.join(tmp, "outside")
    mkfile(os.path.join(d, "secret"), b"SECRET")
    mkfile(os.path.join(d, "sub", "secret2"), b"SECRET2")
    return d


def test_symlink_named_like_dir_is_not_followed(mkstack, outside):
    s = mkstack(3)
    mkfile(s.L(0, "d", "own"), b"own")
    os.symlink(outside, s.L(1, "d"))           # a symlink where l0 has a dir
    mkfile(s.L(2, "d", "deep"), b"deep")
    os.symlink(outside, s.L(0, "e"))           # a symlink above a dir
    mkfile(s.L(1, "e", "below"), b"b")
    mkfile(s.U("u", "own"), b"u")              # an upper dir over a lower symlink
    os.symlink(outside, s.L(0, "u"))
    o = s.overlay()
    assert names(o, "u") == [b"own"]
    enoent(o, "u/secret")
    assert errno_of(o.mkdir, e_node(o), b"x", 0o755, 0, 0) == errno.ENOTDIR
    fd, _ = o.create(resolve(o, "u"), b"new", os.O_WRONLY, 0o644, 0, 0)
    os.close(fd)
    assert not os.path.exists(os.path.join(outside, "new"))
    assert names(o, "d") == [b"own"]
    enoent(o, "d/secret")
    enoent(o, "d/sub")
    enoent(o, "d/deep")
    e = resolve(o, "e")
    assert not e.is_dir
    assert o.readlink(e) == outside.encode()
    assert errno_of(o.lookup, e, b"secret") == errno.ENOTDIR
    assert errno_of(o.list_names, e) == errno.ENOTDIR
    assert core_tree(o) == kernel_tree(s)


def test_symlink_to_etc_never_traversed(mkstack):
    s = mkstack(1)
    os.symlink("/etc", s.L(0, "etc"))
    os.symlink("/etc", s.U("uetc"))
    mkfile(s.L(0, "uetc", "passwd"), b"fake")   # lower dir under the upper symlink
    o = s.overlay()
    for nm in ("etc", "uetc"):
        n = resolve(o, nm)
        assert not n.is_dir and o.readlink(n) == b"/etc"
        assert errno_of(o.lookup, n, b"passwd") == errno.ENOTDIR
    assert names(o) == [b"etc", b"uetc"]
    # an absolute redirect through the symlink finds nothing
    mkdirp(s.U("r"), redirect=b"/etc")
    o2 = s.overlay()
    assert names(o2, "r") == []
    enoent(o2, "r/passwd")


@pytest.mark.parametrize("redirect", [b"../../etc", b"/../..", b"/../../etc", b"..",
                                      b"a/../../..", b"/a/../..", b"/", b"//", b"/etc"])
def test_redirect_cannot_escape(mkstack, outside, redirect):
    s = mkstack(1)
    mkfile(s.L(0, "a", "x"), b"x")
    os.symlink(outside, s.L(0, "lnk"))
    mkdirp(s.U("r"), redirect=redirect)
    mkfile(s.U("r", "own"), b"own")
    o = s.overlay()
    try:
        got = names(o, "r")
    except OSError:
        return      # refusing the dir altogether is safe too (the kernel does)
    assert got == [b"own"]
    for nm in ("passwd", "secret", "etc", "x", "l0", "u", "outside"):
        enoent(o, "r/" + nm)


def test_redirect_through_lower_symlink_stops(mkstack, outside):
    s = mkstack(1)
    os.symlink(outside, s.L(0, "s"))
    mkdirp(s.U("r"), redirect=b"/s/sub")
    mkdirp(s.U("q"), redirect=b"s")
    o = s.overlay()
    assert names(o, "r") == []
    enoent(o, "r/secret2")
    assert names(o, "q") == []
    enoent(o, "q/secret")


def _opaque(path):
    try:
        return os.getxattr(path, XO + "opaque")
    except OSError:
        return None


def test_mkdir_opaque_marks_like_kernel(mkstack):
    """New dirs in a merged parent are marked opaque (the kernel does it so
    lookups skip the lower layers); in an upper-only parent they are not."""
    results = {}
    for impl in ("ours", "kernel"):
        s = mkstack(1, sub=impl)
        mkfile(s.L(0, "m", "x"), b"x")          # m: merged once copied up
        mkdirp(s.U("m"))
        mkdirp(s.U("pure"))
        if impl == "ours":
            o = s.overlay()
            o.mkdir(resolve(o, "m"), b"new", 0o755, 0, 0)
            o.mkdir(resolve(o, "pure"), b"new", 0o755, 0, 0)
            o.mkdir(o.root, b"top", 0o755, 0, 0)
        else:
            mountutil.require_kernel_overlay()
            mp = os.path.join(s.root, "mp")
            os.mkdir(mp)
            with mountutil.MountTracker() as t:
                t.kernel(s.lowers, s.upper, s.work, mp, ("redirect_dir=on",))
                for p in ("m/new", "pure/new", "top"):
                    os.mkdir(os.path.join(mp, p))
        results[impl] = {p: _opaque(s.U(p)) for p in ("m/new", "pure/new", "top")}
    assert results["ours"] == results["kernel"]
    assert results["ours"]["m/new"] == b"y"


def test_rmdir_of_upper_dir_over_lower_file_keeps_its_entries(mkstack):
    """A non-empty upper dir that hides a lower *file* is not merged; rmdir
    must still fail with ENOTEMPTY and lose nothing (it once swapped in a
    whiteout and cleared the dir)."""
    s = mkstack(1)
    mkfile(s.L(0, "a"), b"lower file")
    os.mkdir(s.U("a"))
    mkfile(s.U("a", "keep"), b"precious")
    o = s.overlay()
    assert errno_of(o.rmdir, o.root, b"a") == errno.ENOTEMPTY
    with open(s.U("a", "keep"), "rb") as f:
        assert f.read() == b"precious"
    assert names(o, "a") == [b"keep"]
    # once emptied, rmdir leaves a whiteout over the lower file
    o.unlink(resolve(o, "a"), b"keep")
    o.rmdir(o.root, b"a")
    assert is_whiteout(s.U("a"))
    assert s.work_entries() == []


@pytest.mark.parametrize("redirect,expected", [
    (b"../../etc", errno.EINVAL), (b"a/../../..", errno.EINVAL), (b"a/b", errno.EINVAL),
    (b"/", errno.EINVAL), (b"//", errno.EINVAL), (b"/a//b", errno.EINVAL),
    (b"/../..", errno.EACCES), (b"/../../etc", errno.EACCES), (b"..", errno.EACCES),
    (b"/a/../..", errno.EACCES), (b"/etc", 0),
])
def test_invalid_redirect_errno_as_kernel(mkstack, redirect, expected):
    """Values observed on the kernel overlay (redirect_dir=on) of this
    machine: a malformed redirect fails the lookup with EINVAL, `.`/`..`
    components with EACCES; a well-formed one to nowhere just finds nothing."""
    s = mkstack(1)
    os.mkdir(s.L(0, "a"))
    mkdirp(s.U("r"), redirect=redirect)
    o = s.overlay()
    if expected:
        assert errno_of(o.lookup, o.root, b"r") == expected
    else:
        assert names(o, "r") == []


@pytest.mark.parametrize("nlayers", [12, 100])
def test_name_index_agrees_with_probing(mkstack, nlayers):
    """Dirs with many lower layers get a name index after a few lookups
    (at the second with 64 or more, whose reads are prefetched in
    parallel); lookups through it must give what probing every layer
    gives (a new overlay for each name: its first lookups probe)."""
    import random
    rng = random.Random(7)
    s = mkstack(nlayers)
    names = [f"n{i}" for i in range(40)]
    for i in range(nlayers):
        os.makedirs(s.L(i, "d"), exist_ok=True)
        for nm in rng.sample(names, 15):
            kind = rng.choice(["file", "file", "dir", "whiteout"])
            p = s.L(i, "d", nm)
            if kind == "file":
                mkfile(p, f"{i}:{nm}".encode())
            elif kind == "dir":
                os.mkdir(p)
                mkfile(os.path.join(p, f"in{i}"), b"x")
            else:
                whiteout(p)

    def describe(o, d, nm):
        try:
            n = o.lookup(d, nm)
        except FileNotFoundError:
            return None
        if n.is_dir:
            return ("dir", sorted(o.list_names(n)))
        return ("file", read(o, "d/" + nm.decode()))

    expect = {}
    for nm in names:
        plain = s.overlay()
        expect[nm] = describe(plain, resolve(plain, "d"), nm.encode())
        assert resolve(plain, "d").lindex is None
        plain.close()
    indexed = s.overlay()
    d = resolve(indexed, "d")
    for _ in range(3):
        got = {nm: describe(indexed, d, nm.encode()) for nm in names}
    assert d.lindex is not None            # the index was built and used
    assert got == expect
    assert describe(indexed, d, b"not-there") is None


# ---------------------------------------------------------------------------
# metacopy=on (the differential tests compare it with the kernel: test_diff_metacopy)


def _read(ov, node):
    fd, _ = ov.open(node, os.O_RDONLY)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_metacopy_nodes_evicted_and_reopened(mkstack):
    """Metacopy files hold two fds (the upper file and their data): the fd
    cache closes them like any other and a later use finds the data again,
    through the redirect of a renamed one too."""
    s = mkstack(1)
    for i in range(60):
        mkfile(s.L(0, f"f{i}"), b"data %d\n" % i)
    ov = s.overlay(metacopy=True)
    ov.fd_cache_max = 8
    r = ov.root
    nodes = []
    for i in range(60):
        n = ov.lookup(r, b"f%d" % i)
        ov.remember(n)
        ov.setattr(n, mode=0o600)
        assert n.metacopy and os.getxattr(s.U(f"f{i}"), XO + "metacopy") == b""
        nodes.append(n)
    ov.rename(r, b"f0", r, b"moved")
    assert os.getxattr(s.U("moved"), XO + "redirect") == b"f0"
    assert sum(n.evicted for n in nodes) > 40
    for i, n in enumerate(nodes):
        assert _read(ov, n) == b"data %d\n" % i
        assert n.metacopy and ov.getattr(n).st_mode & 0o777 == 0o600
    fd, n = ov.open(nodes[5], os.O_WRONLY)      # the data copy-up, in place
    os.close(fd)
    assert not n.metacopy and XO + "metacopy" not in os.listxattr(s.U("f5"))
    assert open(s.U("f5"), "rb").read() == b"data 5\n"


def test_metacopy_chain_through_pushed_down_layers(mkstack):
    """A metacopy file in a lower layer (an upper pushed down) with a
    redirect: its metadata from there, its data from the end of the chain;
    without data below, EIO; in a stack without metacopy=on an upper
    metacopy file is refused (EPERM)."""
    s = mkstack(3)
    mkfile(s.L(2, "data"), b"the data\n" * 100, mode=0o644)
    mkfile(s.L(1, "mid"), mode=0o600, xattrs={XO + "metacopy": b"", XO + "redirect": b"/data"})
    os.truncate(s.L(1, "mid"), 900)
    mkfile(s.L(0, "top"), mode=0o640, xattrs={XO + "metacopy": b"", XO + "redirect": b"/mid"})
    os.truncate(s.L(0, "top"), 900)
    mkfile(s.L(0, "lost"), mode=0o640, xattrs={XO + "metacopy": b"", XO + "redirect": b"/nowhere"})
    ov = s.overlay(metacopy=True)
    r = ov.root
    n = ov.lookup(r, b"top")
    assert n.metacopy and n.st.st_mode & 0o777 == 0o640
    assert n.st.st_blocks == os.stat(s.L(2, "data")).st_blocks
    assert _read(ov, n) == b"the data\n" * 100
    ov.setattr(n, uid=7, gid=7)     # metadata copy-up of a lower metacopy file
    assert n.upper >= 0 and n.metacopy and _read(ov, n) == b"the data\n" * 100
    with pytest.raises(OSError) as e:
        ov.lookup(r, b"lost")
    assert e.value.errno == errno.EIO
    ov.close()
    ov2 = s.overlay()
    with pytest.raises(OSError) as e:
        ov2.lookup(ov2.root, b"top")
    assert e.value.errno == errno.EPERM


def test_nfs_export_handles_decoded_after_forget(mkstack):
    """nfs_export: a handle of each kind of object (lower file, lower dir,
    merged dir, upper-only file, the root) finds the object again once its
    Node is forgotten: through a copy-up, a rename of its dir (redirect and
    index entry) and a rename of the file; ESTALE once it is removed (the
    index holds a whiteout for it)."""
    s = mkstack(1)
    mkfile(s.L(0, "d/f"), b"lower file\n")
    mkfile(s.L(0, "d/g"), b"other\n")
    mkdirp(s.L(0, "d/sub"))
    mkfile(s.L(0, "top"), b"top\n")
    ov = s.overlay(nfs_export=True, index=True)
    assert (ov.nfs_export, ov.index_all) == (True, True)
    r = ov.root
    d = ov.lookup(r, b"d")
    f = ov.lookup(d, b"f")
    sub = ov.lookup(d, b"sub")
    up = ov.create(r, b"new", os.O_WRONLY, 0o644, 0, 0)
    os.close(up[0])
    handles = {name: ov.encode_handle(n) for name, n in
               (("root", r), ("d", d), ("f", f), ("sub", sub), ("new", up[1]))}
    assert handles["new"][3] & 4            # an upper handle (PATH_UPPER)
    assert not handles["f"][3] & 4          # a lower one
    for n in (f, sub, up[1]):
        ov.forget(n)
    assert ov.decode_handle(handles["root"]) is r
    n = ov.decode_handle(handles["f"])
    assert _read(ov, n) == b"lower file\n"
    assert ov.decode_handle(handles["sub"]).name == b"sub"
    # a copy-up (indexed), then the dir renamed (redirect + index entry)
    fd, n = ov.open(ov.lookup(d, b"f"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"more\n")
    os.close(fd)
    ov.rename(r, b"d", r, b"dd")
    ov.rename(ov.lookup(r, b"dd"), b"f", r, b"moved")
    for n in list(ov.nodes.values()):
        if n is not r:
            ov.forget(n)
    n = ov.decode_handle(handles["f"])
    assert _read(ov, n) == b"lower file\nmore\n"
    n = ov.decode_handle(handles["sub"])
    assert (n.name, n.parent.name) == (b"sub", b"dd")
    assert ov.decode_handle(handles["d"]).name == b"dd"
    n = ov.decode_handle(handles["new"])     # (a non-dir may come back without a name)
    assert _read(ov, n) == b"" and n.upper >= 0
    # removed: ESTALE (a whiteout in the index for the lower-origin ones)
    g = ov.lookup(ov.lookup(r, b"dd"), b"g")
    handles["g"] = ov.encode_handle(g)
    ov.setattr(g, mode=0o600)               # copied up (indexed), then removed
    ov.unlink(ov.lookup(r, b"dd"), b"g")
    ov.unlink(r, b"new")
    ov.rmdir(ov.lookup(r, b"dd"), b"sub")
    for n in list(ov.nodes.values()):
        if n is not r:
            ov.forget(n)
    for name in ("g", "new", "sub"):
        with pytest.raises(OSError) as e:
            ov.decode_handle(handles[name])
        assert e.value.errno == errno.ESTALE, name
    index = os.path.join(s.work, "index")
    kinds = sorted("w" if S.S_ISCHR(os.lstat(os.path.join(index, e)).st_mode) else
                   "d" if S.S_ISDIR(os.lstat(os.path.join(index, e)).st_mode) else "f"
                   for e in os.listdir(index))
    assert kinds == ["d", "f", "w", "w"]    # dd's entry, f's copy; g's and sub's whiteouts


def test_nfs_export_write_through_disconnected_handle(mkstack):
    """A lower file decoded from its handle with no name known (no parent)
    and opened for writing is copied up into the index only, as the
    kernel's disconnected copy-up; a lookup of its name finds that copy."""
    s = mkstack(1)
    mkfile(s.L(0, "a/f"), b"hello\n")
    ov = s.overlay(nfs_export=True, index=True)
    h = ov.encode_handle(ov.lookup(ov.lookup(ov.root, b"a"), b"f"))
    for n in list(ov.nodes.values()):
        ov.forget(n)
    n = ov.decode_handle(h)
    assert n.parent is None
    fd, n2 = ov.open(n, os.O_WRONLY)
    os.pwrite(fd, b"J", 0)
    os.close(fd)
    assert not os.path.exists(s.U("a/f"))
    assert n2.upper >= 0
    again = ov.lookup(ov.lookup(ov.root, b"a"), b"f")
    assert again is n2 and again.parent is not None
    assert _read(ov, again) == b"Jello\n"


# ---------------------------------------------------------------------------
# upper layer quotas (mounted: tests/test_quota.py)


def test_quota_counts_in_the_core(mkstack):
    """The count at mount and the core's operations keep the usage; EDQUOT
    before anything is made."""
    s = mkstack(1)
    mkfile(s.L(0, "low"), b"L" * 100)
    os.mkdir(s.U("old"))
    mkfile(s.U("old", "f"), b"x" * 40)
    os.link(s.U("old", "f"), s.U("old", "g"))           # one inode
    os.mknod(s.U("wh"), S.S_IFCHR, 0)                    # a whiteout: not counted
    o = s.overlay()
    o.set_quota(200, 4)
    assert (o.q_bytes, o.q_inodes) == (40, 2)
    assert o.quota_usage() == {"bytes": 40, "bytes_limit": 200, "inodes": 2, "inodes_limit": 4}
    o.mkdir(o.root, b"d", 0o755, 0, 0)
    assert (o.q_bytes, o.q_inodes) == (40, 3)
    n = o.lookup(o.root, b"low")
    o.setattr(n, mode=0o600)                            # a copy-up: data and inode
    assert (o.q_bytes, o.q_inodes) == (140, 4)
    with pytest.raises(OSError) as e:
        o.symlink(o.root, b"ln", b"t", 0, 0)
    assert e.value.errno == errno.EDQUOT and not os.path.lexists(s.U("ln"))
    with pytest.raises(OSError) as e:
        o.setattr(o.lookup(o.root, b"low"), size=101)     # 140 - 100 + 101 <= 200: fits
        o.setattr(o.lookup(o.root, b"low"), size=161)     # 40 + 161 > 200
    assert e.value.errno == errno.EDQUOT and os.path.getsize(s.U("low")) == 101
    o.unlink(o.root, b"low")
    assert (o.q_bytes, o.q_inodes) == (40, 3)
    o.unlink(o.lookup(o.root, b"old"), b"f")
    assert (o.q_bytes, o.q_inodes) == (40, 3)            # g is still a name of it
    o.unlink(o.lookup(o.root, b"old"), b"g")
    o.rmdir(o.root, b"d")
    assert (o.q_bytes, o.q_inodes) == (0, 1)
    v = o.statfs()
    assert v.f_files == 4 and v.f_ffree == 3


# ---------------------------------------------------------------------------
# dirs' fds: closed when nothing needs them, reopened by name


def _fds_on(*paths):
    """How many of this process's fds are open on these objects (by
    identity: the core reaches its layers through private mounts)."""
    want = {(st.st_dev, st.st_ino) for st in map(os.stat, paths)}
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += (st.st_dev, st.st_ino) in want
    return n


def test_evicted_dirs_reopen_by_name(mkstack):
    """A dir holds an O_PATH fd in each layer it is in. The fds of a dir the
    kernel forgot, or that only a listing found, are closed (evict_dir) and
    reopened by a lookup of its name at the next use: a merged dir finds its
    layers again, an opaque one stays opaque, one renamed meanwhile is found
    under its new name, and one removed behind the core gives ESTALE."""
    s = mkstack(2)
    for i in range(2):
        mkfile(s.L(i, "m", f"f{i}"), b"%d" % i)
    mkfile(s.L(1, "o", "hidden"), b"h")
    mkdirp(s.U("o"), opaque=b"y")
    mkfile(s.U("o", "seen"), b"s")
    o = s.overlay()
    m = resolve(o, "m")
    od = resolve(o, "o")
    m_dirs = (s.L(0, "m"), s.L(1, "m"))
    assert _fds_on(*m_dirs) == 2 and _fds_on(s.U("o")) == 1
    o.evict_dir(m)
    o.evict_dir(od)
    assert m.evicted and od.evicted and _fds_on(*m_dirs, s.U("o")) == 0
    assert [i for i, _ in m.lowers] == [0, 1] and not m.evicted
    assert _fds_on(*m_dirs) == 2 and _fds_on(s.U("o")) == 0
    assert set(names(o, "m")) == {b"f0", b"f1"}
    assert read(o, "m/f1") == b"1"
    o.evict_dir(od)
    assert o.lookup(od, b"seen").name == b"seen" and not od.evicted and od.opaque
    with pytest.raises(FileNotFoundError):
        o.lookup(od, b"hidden")
    # renamed while evicted: its Node follows the name
    o.mkdir(o.root, b"n", 0o755, 0, 0)
    n = resolve(o, "n")
    o.remember(n)           # (known to the kernel, as the engine says)
    mkfile(s.U("n", "x"), b"x")
    o.evict_dir(n)
    o.rename(o.root, b"n", o.root, b"n2")
    assert n.name == b"n2" and o.lookup(n, b"x").name == b"x"
    # removed behind the core
    o.evict_dir(n)
    shutil.rmtree(s.U("n2"))
    with pytest.raises(OSError) as e:
        n.upper
    assert e.value.errno == errno.ESTALE
    # the root and a dir in use keep theirs
    o.evict_dir(o.root)
    assert not o.root.evicted
    m.pins += 1
    o.evict_dir(m)
    assert not m.evicted
    m.pins -= 1


def test_listing_keeps_no_fds_of_the_dirs_it_found(mkstack):
    """A listing looks every entry up; once fds are many (a dir's fd
    numbered past the fd cache's size), the dirs among them keep none
    (3,000 subdirs listed with a few fds more than before)."""
    s = mkstack(1)
    for i in range(3000):
        os.makedirs(s.L(0, "big", f"d{i}"))
    o = s.overlay()
    big = resolve(o, "big")
    o.fd_cache_max = 16
    assert len(names(o, "big")) == 3000
    assert _fds_on(*(s.L(0, "big", f"d{i}") for i in range(3000))) < 10
    child = o.lookup(big, b"d2999")
    assert child.is_dir and o.list_names(child) == []
