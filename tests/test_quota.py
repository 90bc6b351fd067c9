"""Upper layer quotas (quota_bytes=, quota_inodes=) on real mounts.

What the quota counts (see overlay_core/_quota.pxi): every inode of the
upper layer but its root, hard links once, whiteouts not; the sizes of
regular files (none for a metacopy file). Checked here:

* option parsing (suffixes, bad values, needs an upper layer, the native
  engine, not writeback=1);
* fixed scenarios with the numbers worked out by hand: EDQUOT at the exact
  limit for create, mkdir, symlink, mknod, copy-up (open for write, chmod,
  link), truncate, fallocate; a write cut at the limit; an unlinked open
  file counted until its last close; O_TMPFILE; renames over files and
  dirs; hard links (counted once); metacopy files (no bytes until their
  data come up); statfs showing the limits and what is left; the count at
  mount equal to the live one; overlay stats showing the usage;
* a random run against a model: before each operation the model works out
  what it needs (copy-ups of the file and its dirs, the growth) and so
  whether it must fail with EDQUOT (or be cut, for a write); after each, the
  live usage (overlay stats) equals a count of the upper dir made here, is
  within the limits, and a failed operation left the upper dir as it was.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import json
import os
import random
import stat
import time

import pytest

import mountutil

STATS = "user.overlay-fuse.stats"


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_fuse()
    mountutil.require_ours()
    if mountutil.engine() != "native":
        pytest.skip("quotas need the native engine")


def usage(mp):
    q = json.loads(os.getxattr(mp, STATS))["quota"]
    return q["bytes"], q["inodes"]


def settled(mp, want, timeout=5.0):
    """usage(mp) once it equals want, or as it is after timeout: the kernel
    sends RELEASE (the last close of a file) after close(2) has returned,
    so an unlinked file's space comes back a moment later."""
    end = time.monotonic() + timeout
    while True:
        got = usage(mp)
        if got == tuple(want) or time.monotonic() > end:
            return got
        time.sleep(0.01)


def count_upper(upper, work=None):
    """The quota's rules, counted independently: (bytes, inodes)."""
    seen = set()
    nbytes = inodes = 0

    def one(path, st):
        nonlocal nbytes, inodes
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            if st.st_ino in seen:
                return
            seen.add(st.st_ino)
        inodes += 1
        if stat.S_ISREG(st.st_mode):
            try:
                os.getxattr(path, "trusted.overlay.metacopy", follow_symlinks=False)
            except OSError:
                nbytes += st.st_size

    for root, dirs, files in os.walk(upper):
        for name in dirs + files:
            p = os.path.join(root, name)
            one(p, os.lstat(p))
    index = os.path.join(work, "index") if work else None
    if index and os.path.isdir(index):
        for name in os.listdir(index):
            p = os.path.join(index, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                one(p, st)
    return nbytes, inodes


def _layers(b, files):
    lower = os.path.join(b, "l")
    for rel, data in files.items():
        p = os.path.join(lower, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if data is None:
            os.makedirs(p, exist_ok=True)
        else:
            with open(p, "wb") as fh:
                fh.write(data)
    for d in ("u", "w", "m"):
        os.makedirs(os.path.join(b, d), exist_ok=True)
    return lower, os.path.join(b, "u"), os.path.join(b, "w"), os.path.join(b, "m")


def _fails(code, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, (fn, args, e.value)


_run = mountutil.overlay_cli


def test_quota_options(difftmp):
    b = difftmp
    lower, up, work, mp = _layers(b, {"f": b"x"})
    base = f"lowerdir={lower},upperdir={up},workdir={work}"
    for opts, message in (
            (f"{base},quota_bytes=10X", "bad value '10X' for quota_bytes"),
            (f"{base},quota_inodes=-1", "bad value '-1' for quota_inodes"),
            (f"{base},quota_bytes=", "'quota_bytes' needs a value"),
            (f"lowerdir={lower},quota_bytes=1M", "quota_bytes needs an upper layer"),
            (f"{base},quota_inodes=5,engine=pyfuse3", "quota_inodes needs the native engine"),
            (f"{base},quota_bytes=1G,writeback=1", "quota_bytes cannot go with writeback=1")):
        r = _run(["mount", "-o", opts, mp])
        assert r.returncode != 0 and message in r.stderr and r.stderr.count("\n") == 1, (opts, r.stderr)
    from overlay.options import parse_options
    cfg = parse_options(f"{base},quota_bytes=3k,quota_inodes=2M", "/")
    assert (cfg.quota_bytes, cfg.quota_inodes) == (3 << 10, 2 << 20)
    cfg = parse_options(f"{base},quota_bytes=5G", "/")
    assert (cfg.quota_bytes, cfg.quota_inodes) == (5 << 30, None)


def test_quota_scenarios(difftmp, mounts):
    b = difftmp
    lower, up, work, mp = _layers(b, {"d/f": b"a" * 1000, "big": b"b" * 5000, "e": None,
                                      "e/g": b"g" * 10})
    opts = ("quota_bytes=8000", "quota_inodes=8")
    mounts.ours([lower], up, work, mp, opts)
    m = lambda p: os.path.join(mp, p)      # noqa: E731
    assert usage(mp) == (0, 0)
    v = os.statvfs(mp)
    assert v.f_blocks * v.f_frsize <= 8000 and v.f_files == 8 and v.f_ffree == 8
    # a write cut at the limit; then nothing fits
    fd = os.open(m("new"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.pwrite(fd, b"n" * 10000, 0) == 8000
    _fails(errno.EDQUOT, os.pwrite, fd, b"n", 8000)
    assert os.pwrite(fd, b"N" * 100, 0) == 100          # inside the size: free
    assert usage(mp) == (8000, 1)
    v = os.statvfs(mp)
    assert v.f_bavail == 0 and v.f_ffree == 7
    # copy-ups need room for the data: open for write, chmod, link
    _fails(errno.EDQUOT, os.open, m("big"), os.O_WRONLY)
    _fails(errno.EDQUOT, os.chmod, m("big"), 0o600)
    _fails(errno.EDQUOT, os.link, m("big"), m("big2"))
    assert not os.path.exists(os.path.join(up, "big")) and usage(mp) == (8000, 1)
    # a truncate frees
    os.ftruncate(fd, 2000)
    assert usage(mp) == (2000, 1)
    _fails(errno.EDQUOT, os.ftruncate, fd, 8001)        # all or nothing
    os.truncate(m("new"), 3000)
    assert usage(mp) == (3000, 1)
    os.close(fd)
    # the copy-up of d/f: its dir and itself (2 inodes, 1000 bytes)
    with open(m("d/f"), "ab") as fh:
        fh.write(b"+")
    assert usage(mp) == (4001, 3)
    os.mkdir(m("e/sub"))                                 # e copied up, then sub
    os.symlink("x", m("ln"))
    os.mknod(m("fifo"), 0o600 | stat.S_IFIFO)
    assert usage(mp) == (4001, 7)
    os.mkdir(m("last"))
    assert usage(mp) == (4001, 8)
    for fn, args in ((os.mkdir, (m("more"),)), (os.symlink, ("x", m("ln2"))),
                     (os.mknod, (m("fifo2"), 0o600 | stat.S_IFIFO)),
                     (os.open, (m("f2"), os.O_CREAT | os.O_WRONLY, 0o644)),
                     (os.open, (m("e/g"), os.O_WRONLY))):     # a copy-up needs an inode too
        _fails(errno.EDQUOT, fn, *args)
    # O_TMPFILE needs an inode as well
    _fails(errno.EDQUOT, os.open, mp, os.O_TMPFILE | os.O_WRONLY, 0o600)
    # deleting never fails: a whiteout costs nothing
    os.unlink(m("big"))
    os.rmdir(m("last"))
    assert usage(mp) == (4001, 7)
    # a hard link is the same inode; removing one name frees nothing
    os.link(m("new"), m("new2"))
    assert usage(mp) == (4001, 7)
    os.unlink(m("new"))
    assert usage(mp) == (4001, 7)
    # an unlinked open file counts until its last close, writes included
    fd = os.open(m("new2"), os.O_WRONLY)
    os.unlink(m("new2"))
    assert usage(mp) == (4001, 7)
    assert os.pwrite(fd, b"w" * 500, 3000) == 500
    assert usage(mp) == (4501, 7)
    os.close(fd)
    assert settled(mp, (1001, 6)) == (1001, 6)
    # O_TMPFILE: counted while open, kept if linked
    fd = os.open(mp, os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"t" * 300)
    assert usage(mp) == (1301, 7)
    os.close(fd)
    assert settled(mp, (1001, 6)) == (1001, 6)
    fd = os.open(mp, os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"t" * 300)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.linkat(fd, b"", -100, os.fsencode(m("kept")), 0x1000) == 0   # AT_EMPTY_PATH
    os.close(fd)
    assert usage(mp) == (1301, 7)
    # rename over a file frees it; over an empty upper dir frees it
    with open(m("r1"), "wb") as fh:
        fh.write(b"r" * 200)
    assert usage(mp) == (1501, 8)
    os.rename(m("r1"), m("kept"))
    assert usage(mp) == (1201, 7)
    os.rename(m("e/sub"), m("d/sub"))
    assert usage(mp) == (1201, 7)
    os.mkdir(m("e/sub"))
    os.rename(m("d/sub"), m("e/sub"))
    assert usage(mp) == (1201, 7)
    # fallocate grows the size (all or nothing), past the end with
    # KEEP_SIZE is refused under quota_bytes
    fd = os.open(m("kept"), os.O_RDWR)
    assert os.fstat(fd).st_size == 200
    os.posix_fallocate(fd, 0, 1500)
    assert usage(mp) == (2501, 7)
    _fails(errno.EDQUOT, os.posix_fallocate, fd, 0, 9000)
    # copy_file_range: a write, cut at the limit
    dst = os.open(m("cfr"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.copy_file_range(fd, dst, 1500, 0, 5000) == 8000 - 2501 - 5000
    assert usage(mp) == (8000, 8)
    _fails(errno.EDQUOT, os.copy_file_range, fd, dst, 10, 0, 5499)
    os.close(dst)
    os.close(fd)
    live = usage(mp)
    assert live == count_upper(up, work)
    out = _run(["stats", mp]).stdout
    assert f"quota bytes     {live[0]} of 8000 (" in out and f"quota inodes    {live[1]} of 8 (" in out, out
    v = os.statvfs(mp)
    assert v.f_files - v.f_ffree == live[1]
    assert v.f_bavail == (8000 - live[0]) // v.f_frsize
    # the count at mount is the live one
    assert mounts.umount(mp)
    mounts.ours([lower], up, work, mp, opts)
    assert usage(mp) == live


def test_quota_index_and_metacopy(difftmp, mounts):
    """Hard links kept whole (index=on) count once, in the index too; a
    metacopy file has no bytes until its data come up."""
    b = difftmp
    lower, up, work, mp = _layers(b, {"h1": b"h" * 700, "meta": b"m" * 3000})
    os.link(os.path.join(lower, "h1"), os.path.join(lower, "h2"))
    opts = ("index=on", "metacopy=on", "redirect_dir=on", "quota_bytes=4000", "quota_inodes=10")
    mounts.ours([lower], up, work, mp, opts)
    os.chmod(os.path.join(mp, "meta"), 0o600)          # metadata only
    assert usage(mp) == (0, 1)
    os.chmod(os.path.join(mp, "h1"), 0o600)            # to the index, metadata only
    assert usage(mp) == (0, 2) == count_upper(up, work)
    with open(os.path.join(mp, "h2"), "ab") as fh:     # its data come up (one inode)
        fh.write(b"+")
    assert usage(mp) == (701, 2) == count_upper(up, work)
    os.unlink(os.path.join(mp, "h1"))                  # h2 still a name of it
    assert usage(mp) == (701, 2) == count_upper(up, work)
    os.unlink(os.path.join(mp, "h2"))
    assert usage(mp) == (0, 1) == count_upper(up, work)
    with open(os.path.join(mp, "meta"), "ab") as fh:   # its data come up
        fh.write(b"+")
    assert usage(mp) == (3001, 1) == count_upper(up, work)
    os.truncate(os.path.join(mp, "meta"), 0)
    assert usage(mp) == (0, 1)
    live = usage(mp)
    assert mounts.umount(mp)
    mounts.ours([lower], up, work, mp, opts)
    assert usage(mp) == live


# ----------------------------------------------------------------- the model

NAMES = ["d/f", "d/e/g", "top", "n1", "n2", "d/n3", "d/e/n4", "x", "x/n5", "d/e"]
BYTES, INODES = 20000, 14


class Model:
    """What an operation needs of the quota, from the upper dir and the
    merged view before it: (bytes, inodes) it adds before anything else
    can fail."""

    def __init__(self, mp, up):
        self.mp, self.up = mp, up

    def in_upper(self, rel):
        return os.path.lexists(os.path.join(self.up, rel)) and not _is_whiteout(
            os.path.join(self.up, rel))

    def dirs_needed(self, rel):
        """Inodes to copy up rel's dirs (those not in the upper yet)."""
        parts = rel.split("/")[:-1]
        need = 0
        for i in range(len(parts)):
            if not os.path.isdir(os.path.join(self.up, *parts[:i + 1])):
                need += 1
        return need

    def copy_up(self, rel, data=True):
        """(bytes, inodes) of copying rel up (0, 0 if it is there)."""
        if self.in_upper(rel):
            return 0, 0
        st = os.lstat(os.path.join(self.mp, rel))
        nbytes = st.st_size if stat.S_ISREG(st.st_mode) and data else 0
        return nbytes, 1 + self.dirs_needed(rel)


def _is_whiteout(p):
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _fits(used, need):
    return used[0] + need[0] <= BYTES and used[1] + need[1] <= INODES


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_quota_random_model(difftmp, mounts, seed):
    b = difftmp
    lower, up, work, mp = _layers(b, {"d/f": b"f" * 3000, "d/e/g": b"g" * 6000, "top": b"t" * 500,
                                      "x": None})
    opts = (f"quota_bytes={BYTES}", f"quota_inodes={INODES}")
    mounts.ours([lower], up, work, mp, opts)
    model = Model(mp, up)
    rng = random.Random(seed)
    m = lambda p: os.path.join(mp, p)      # noqa: E731
    checked = {"EDQUOT": 0, "cut": 0, "ok": 0}
    history = []
    applied = []
    for step in range(1500):
        used = usage(mp)
        before = count_upper(up, work)
        assert used == before, (step, used, before)
        assert used[0] <= BYTES and used[1] <= INODES
        op = rng.choice(["write", "write", "truncate", "create", "mkdir", "symlink", "unlink",
                         "rmdir", "rename", "link", "chmod", "open_unlink"])
        files = [n for n in NAMES if os.path.isfile(m(n)) and not os.path.islink(m(n))]
        absent = [n for n in NAMES if not os.path.lexists(m(n))]
        if op in ("write", "truncate", "link", "open_unlink") and files:
            p = rng.choice(files)
        elif op in ("create", "mkdir", "symlink") and absent:
            p = rng.choice(absent)
        else:
            p = rng.choice(NAMES)
        linkable = [n for n in absent if os.path.isdir(os.path.dirname(m(n)))]
        q = rng.choice(linkable) if op == "link" and linkable else rng.choice(NAMES)
        exists = os.path.lexists(m(p))
        isfile = exists and os.path.isfile(m(p)) and not os.path.islink(m(p))
        expect = None           # EDQUOT expected (True/False), None: not worked out
        desc = (step, op, p, q)
        history.append(desc)
        try:
            if op == "write" and isfile:
                size = os.lstat(m(p)).st_size
                off = rng.randrange(0, size + 2000)
                n = rng.randrange(1, 4000) if rng.random() < 0.6 else rng.randrange(4000, 16000)
                cu = model.copy_up(p)
                if not _fits(used, cu):
                    expect = True
                    _fails(errno.EDQUOT, os.open, m(p), os.O_WRONLY)
                    checked["EDQUOT"] += 1
                else:
                    fd = os.open(m(p), os.O_WRONLY)
                    try:
                        room = BYTES - used[0] - cu[0]
                        grow = max(0, off + n - size)
                        if grow <= room:
                            assert os.pwrite(fd, b"w" * n, off) == n, desc
                            checked["ok"] += 1
                        elif size + room <= off:
                            _fails(errno.EDQUOT, os.pwrite, fd, b"w" * n, off)
                            checked["EDQUOT"] += 1
                        else:
                            assert os.pwrite(fd, b"w" * n, off) == size + room - off, desc
                            checked["cut"] += 1
                    finally:
                        os.close(fd)
            elif op == "truncate" and isfile:
                size = os.lstat(m(p)).st_size
                new = rng.choice([0, rng.randrange(0, size + 1), size + rng.randrange(1, 9000)])
                cu = model.copy_up(p, data=new != 0)
                need = (cu[0] + max(0, new - size), cu[1])
                expect = not _fits(used, need)
                if expect:
                    _fails(errno.EDQUOT, os.truncate, m(p), new)
                else:
                    os.truncate(m(p), new)
            elif op in ("create", "mkdir", "symlink") and not exists and os.path.isdir(
                    os.path.dirname(m(p))):
                need = (0, 1 + model.dirs_needed(p))
                expect = not _fits(used, need)
                call = {"create": lambda: os.close(os.open(m(p), os.O_CREAT | os.O_WRONLY, 0o644)),
                        "mkdir": lambda: os.mkdir(m(p)),
                        "symlink": lambda: os.symlink("t", m(p))}[op]
                if expect:
                    _fails(errno.EDQUOT, call)
                else:
                    call()
            elif op == "unlink" and exists and not os.path.isdir(m(p)):
                os.unlink(m(p))             # never EDQUOT
                expect = False
            elif op == "rmdir" and exists and os.path.isdir(m(p)) and not os.listdir(m(p)):
                os.rmdir(m(p))
                expect = False
            elif op == "chmod" and exists and not os.path.islink(m(p)):
                cu = model.copy_up(p)
                expect = not _fits(used, cu)
                if expect:
                    _fails(errno.EDQUOT, os.chmod, m(p), 0o700)
                else:
                    os.chmod(m(p), 0o700)
            elif op == "link" and isfile and not os.path.lexists(m(q)) and os.path.isdir(
                    os.path.dirname(m(q))):
                cu = model.copy_up(p)
                need = (cu[0], cu[1] + model.dirs_needed(q))
                expect = not _fits(used, need)
                if expect:
                    _fails(errno.EDQUOT, os.link, m(p), m(q))
                else:
                    os.link(m(p), m(q))
            elif op == "rename" and exists and p != q and not q.startswith(p + "/") and \
                    not p.startswith(q + "/") and os.path.isdir(os.path.dirname(m(q))):
                try:
                    os.rename(m(p), m(q))
                except OSError as e:
                    # EXDEV (a lower dir, no redirect_dir), ENOTEMPTY, EISDIR,
                    # ENOTDIR, or EDQUOT from a copy-up
                    assert e.errno in (errno.EXDEV, errno.ENOTEMPTY, errno.EISDIR,
                                       errno.ENOTDIR, errno.EDQUOT), (desc, e)
                    if e.errno == errno.EDQUOT:
                        expect = True
            elif op == "open_unlink" and isfile and model.in_upper(p):
                fd = os.open(m(p), os.O_WRONLY)
                try:
                    os.unlink(m(p))
                    try:
                        os.pwrite(fd, b"o" * 100, 0)
                    except OSError as e:
                        assert e.errno == errno.EDQUOT
                finally:
                    os.close(fd)
        except OSError as e:
            raise AssertionError(f"{desc}: {e} (after {history[-12:]})") from e
        after = count_upper(up, work)
        if after != before or expect is not None:
            applied.append(desc)
        if expect:
            assert after == before, (desc, before, after)   # nothing half-made
            if op != "write":
                checked["EDQUOT"] += 1
        assert settled(mp, after) == after, (desc, usage(mp), after, history[-8:])
    print("applied", sorted(collections.Counter(h[1] for h in applied).items()))
    assert checked["EDQUOT"] >= 3 and checked["cut"] >= 3 and checked["ok"] >= 8, checked
    live = usage(mp)
    assert mounts.umount(mp)
    mounts.ours([lower], up, work, mp, opts)
    assert usage(mp) == live
