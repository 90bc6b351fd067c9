"""fuse-overlayfs's options, as containers pass them, compared with
fuse-overlayfs itself (Debian's 1.10) on the same layers.

For each option set: the same layers are mounted by fuse-overlayfs and by
ours (``overlay-containers-mount``, the program podman is pointed at), the
same operations are made through both, and what the objects show is
compared: owner, mode, nlink, whether st_ino survives a copy-up, xattrs
seen, errnos. Then the ``xattr_permissions`` stores are exchanged: an upper
written by fuse-overlayfs mounted by ours and the reverse, each showing the
owners and modes the other kept in its xattrs.

Where fuse-overlayfs 1.10 differs on purpose from the later releases that
podman's users run (xattr_permissions bugs it fixed in 1.14, options added
after 1.10: ``xino=``, ``ino32_t``), the test says so and checks the later
behaviour; ``plugins=`` is refused by ours with one line (a plugin that
does not load makes fuse-overlayfs fail too).

Needs root, FUSE and /usr/bin/fuse-overlayfs (apt-get install fuse-overlayfs).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

import mountutil

FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")
HELPER = os.path.join(os.path.dirname(sys.executable), "overlay-containers-mount")


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_fuse()
    if FUSE_OVERLAYFS is None:
        pytest.skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")


@pytest.fixture
def tmp(difftmp, mounts):
    yield difftmp


def _layers(base: str) -> dict:
    """Two lower layers (owners 0 and 1000, a symlink, a fifo, an xattr)
    and empty upper/work dirs, for each side."""
    out = {}
    for side in ("fo", "ours"):
        d = os.path.join(base, side)
        l1, l2 = os.path.join(d, "l1"), os.path.join(d, "l2")
        for p in (l1, l2, os.path.join(d, "u"), os.path.join(d, "w"), os.path.join(d, "m")):
            os.makedirs(p)
        os.makedirs(os.path.join(l2, "dir/sub"))
        with open(os.path.join(l2, "dir/f"), "w") as fh:
            fh.write("lower\n")
        os.chown(os.path.join(l2, "dir/f"), 1000, 1000)
        os.chmod(os.path.join(l2, "dir/f"), 0o640)
        with open(os.path.join(l1, "top"), "w") as fh:
            fh.write("top\n")
        os.setxattr(os.path.join(l1, "top"), "user.tag", b"v")
        os.symlink("top", os.path.join(l1, "link"))
        os.mkfifo(os.path.join(l1, "fifo"))
        out[side] = {"l": [l1, l2], "u": os.path.join(d, "u"), "w": os.path.join(d, "w"),
                     "m": os.path.join(d, "m")}
    return out


def _mount_fo(mounts, t, opts):
    optstr = f"lowerdir={':'.join(t['l'])},upperdir={t['u']},workdir={t['w']}"
    if opts:
        optstr += "," + opts
    r = subprocess.run([FUSE_OVERLAYFS, "-o", optstr, t["m"]], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise mountutil.MountError(f"fuse-overlayfs -o {optstr}: {r.stderr.strip()}")
    mounts.track(t["m"])


def _mount_ours(t, opts):
    """Mount through the containers helper, as podman runs it."""
    optstr = f"lowerdir={':'.join(t['l'])},upperdir={t['u']},workdir={t['w']}"
    if opts:
        optstr += "," + opts
    env = dict(os.environ, PYTHONPATH=str(mountutil.REPO / "src"))
    r = subprocess.run([HELPER, "-o", optstr, t["m"]], capture_output=True, text=True, timeout=60,
                       env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise mountutil.MountError(f"overlay-containers-mount -o {optstr}: {r.stderr.strip()}")


def _show(mp: str, paths) -> dict:
    """What each path shows: owner, mode, nlink (dirs), visible xattrs."""
    out = {}
    for p in paths:
        full = os.path.join(mp, p)
        try:
            st = os.lstat(full)
        except OSError as e:
            out[p] = errno.errorcode[e.errno]
            continue
        rec = {"uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode)}
        if stat.S_ISDIR(st.st_mode):
            rec["nlink"] = st.st_nlink
        try:
            rec["xattrs"] = sorted(n for n in os.listxattr(full, follow_symlinks=False)
                                   if n.startswith("user."))
        except OSError as e:
            rec["xattrs"] = errno.errorcode[e.errno]
        out[p] = rec
    return out


# (not the setgid dir: fuse-overlayfs 1.10 shows it without its set-gid bit,
# and so its new subdirs without one; ours shows the bit and inherits it,
# as the kernel overlay: tests/test_diff_* check that)
PATHS = ("", "dir", "dir/f", "dir/sub", "top", "link", "fifo", "new", "newdir")


def _changes(mp: str) -> list:
    """The same changes through either mount; their results."""
    res = []

    def do(what, fn):
        try:
            fn()
            res.append((what, "ok"))
        except OSError as e:
            res.append((what, errno.errorcode[e.errno]))

    do("write", lambda: open(os.path.join(mp, "dir/f"), "a").write("more\n"))
    do("chown", lambda: os.chown(os.path.join(mp, "dir/f"), 7, 8))
    do("chmod", lambda: os.chmod(os.path.join(mp, "top"), 0o600))
    do("create", lambda: open(os.path.join(mp, "new"), "w").write("n\n"))
    do("mkdir", lambda: os.mkdir(os.path.join(mp, "newdir"), 0o750))
    do("setxattr", lambda: os.setxattr(os.path.join(mp, "top"), "user.added", b"1"))
    do("fsync", lambda: _fsync(os.path.join(mp, "new")))
    return res


def _fsync(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _compare(tmp, mounts, opts, fo_opts=None, adjust=None):
    """Mount both sides with opts, make the changes, compare what shows."""
    t = _layers(tmp)
    _mount_fo(mounts, t["fo"], opts if fo_opts is None else fo_opts)
    _mount_ours(t["ours"], opts)
    mounts.track(t["ours"]["m"])
    seen = {}
    for side in ("fo", "ours"):
        mp = t[side]["m"]
        before = os.lstat(os.path.join(mp, "dir/f")).st_ino
        results = _changes(mp)
        after = os.lstat(os.path.join(mp, "dir/f")).st_ino
        seen[side] = {"results": results, "show": _show(mp, PATHS), "ino_kept": before == after}
    if adjust is not None:
        adjust(seen)
    assert seen["ours"] == seen["fo"], _report(seen)
    return t, seen


def _report(seen) -> str:
    lines = []
    for key in ("results", "ino_kept"):
        if seen["fo"][key] != seen["ours"][key]:
            lines.append(f"{key}: fuse-overlayfs={seen['fo'][key]} ours={seen['ours'][key]}")
    for p in PATHS:
        a, b = seen["fo"]["show"].get(p), seen["ours"]["show"].get(p)
        if a != b:
            lines.append(f"/{p}: fuse-overlayfs={a} ours={b}")
    return "\n".join(lines)


def _drop_dir_nlink(seen):
    """fuse-overlayfs counts a dir's subdirs in memory (2 + the subdirs it
    has loaded); ours shows the real upper dir's, or 1 for a merged dir,
    as the kernel overlay: not compared unless static_nlink."""
    for side in seen.values():
        for rec in side["show"].values():
            if isinstance(rec, dict):
                rec.pop("nlink", None)


def test_defaults(tmp, mounts):
    """No option: owners, modes, xattrs, st_ino kept across copy-up."""
    _compare(tmp, mounts, "", adjust=_drop_dir_nlink)


def test_static_nlink(tmp, mounts):
    """static_nlink: every dir shows nlink 1 (for NFS-backed stores)."""
    _, seen = _compare(tmp, mounts, "static_nlink")
    assert {r["nlink"] for r in seen["ours"]["show"].values()
            if isinstance(r, dict) and "nlink" in r} == {1}


@pytest.mark.parametrize("opts", ["squash_to_uid=1234", "squash_to_gid=4321",
                                  "squash_to_uid=1234,squash_to_gid=4321",
                                  "squash_to_root,squash_to_uid=1234"])
def test_squash(tmp, mounts, opts):
    """squash_to_uid/gid (podman's single-id maps): every object shows
    those ids; a chown through the mount is done where it can be, never
    fails, and the ids shown stay."""
    _, seen = _compare(tmp, mounts, opts, adjust=_drop_dir_nlink)
    if "squash_to_uid=1234" in opts:
        assert {r["uid"] for r in seen["ours"]["show"].values() if isinstance(r, dict)} == {1234}


def test_noxattrs(tmp, mounts):
    """noxattrs=1: xattr calls fail with EOPNOTSUPP (listxattr, getxattr,
    setxattr; removexattr too on ours, where fuse-overlayfs 1.10 lets it
    through)."""
    _, seen = _compare(tmp, mounts, "noxattrs=1", adjust=_drop_dir_nlink)
    assert ("setxattr", errno.errorcode[errno.EOPNOTSUPP]) in seen["ours"]["results"]
    m = os.path.join(tmp, "ours", "m")
    with pytest.raises(OSError) as e:
        os.removexattr(os.path.join(m, "top"), "user.tag")
    assert e.value.errno == errno.EOPNOTSUPP


def test_fsync_off(tmp, mounts):
    """fsync=0: fsync succeeds without reaching the upper layer; unlike
    volatile, no marker stops the next mount."""
    t, _ = _compare(tmp, mounts, "fsync=0", adjust=_drop_dir_nlink)
    mounts.umount(t["ours"]["m"])
    assert not os.path.exists(os.path.join(t["ours"]["w"], "work", "incompat"))
    _mount_ours(t["ours"], "fsync=0")
    mounts.track(t["ours"]["m"])


def test_generic_and_tuning_options(tmp, mounts):
    """What containers users put in mountopt: timeout= (fuse-overlayfs's
    default 1e9 s), threaded=, writeback=0, fast_ino=1, noacl, and FUSE's
    generic options: accepted; the objects show the same."""
    opts = "timeout=1000000000,threaded=1,writeback=0,fast_ino=1,noacl,allow_root,nonempty"
    # (fuse-overlayfs 1.10 rejects allow_root without user_allow_other and
    # ignores nonempty; it gets the rest)
    _compare(tmp, mounts, opts, fo_opts="timeout=1000000000,threaded=1,writeback=0,fast_ino=1,noacl",
             adjust=_drop_dir_nlink)


def test_context_label(tmp, mounts):
    """context="..." as containers/storage appends it (double quotes,
    commas inside): mounts, and where SELinux does not run the label is
    noted in the log instead of refusing the mount."""
    opts = 'context="system_u:object_r:container_file_t:s0:c1,c2"'
    _compare(tmp, mounts, opts, adjust=_drop_dir_nlink)


def test_ino32(tmp, mounts):
    """ino32_t (after fuse-overlayfs 1.10): every st_ino fits in 32 bits,
    stable across copy-up; readdir's d_ino agrees with stat."""
    t = _layers(tmp)["ours"]
    _mount_ours(t, "ino32_t")
    mounts.track(t["m"])
    m = t["m"]
    before = {}
    for p in ("dir", "dir/f", "top"):
        before[p] = os.lstat(os.path.join(m, p)).st_ino
        assert before[p] < 2 ** 32
    open(os.path.join(m, "dir/f"), "a").write("x")
    assert os.lstat(os.path.join(m, "dir/f")).st_ino == before["dir/f"]
    with os.scandir(os.path.join(m, "dir")) as it:
        for e in it:
            assert e.inode() == os.lstat(e.path).st_ino < 2 ** 32


def test_plugins_refused(tmp):
    """plugins= has no equivalent: one line, exit 1, nothing mounted."""
    t = _layers(tmp)["ours"]
    with pytest.raises(mountutil.MountError) as e:
        _mount_ours(t, "plugins=/usr/libexec/fuse-overlayfs/x.so")
    assert "plugins= is not supported" in str(e.value)
    assert not mountutil.is_mounted(t["m"])


def test_unknown_option_named(tmp):
    t = _layers(tmp)["ours"]
    with pytest.raises(mountutil.MountError) as e:
        _mount_ours(t, "colour=blue")
    assert "unknown mount option 'colour'" in str(e.value)


# ------------------------------------------------------------ xattr_permissions


def _override_changes(mp: str):
    os.chown(os.path.join(mp, "dir/f"), 7, 8)
    os.chmod(os.path.join(mp, "dir/f"), 0o604)
    with open(os.path.join(mp, "new"), "w") as fh:
        fh.write("n\n")
    os.chown(os.path.join(mp, "new"), 5, 6)
    os.mkdir(os.path.join(mp, "newdir"))
    os.chown(os.path.join(mp, "newdir"), 9, 9)
    os.chmod(os.path.join(mp, "newdir"), 0o750)


OVERRIDE_PATHS = ("dir/f", "new", "newdir", "top", "dir")


def _owners(mp: str) -> dict:
    out = {}
    for p in OVERRIDE_PATHS:
        st = os.lstat(os.path.join(mp, p))
        out[p] = (st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)))
    return out


@pytest.mark.parametrize("level", [1, 2])
def test_xattr_permissions_on_disk(tmp, mounts, level):
    """xattr_permissions: owners and modes go to fuse-overlayfs's xattrs
    in its text format, the files stay the daemon's; what shows is the
    xattr's."""
    t = _layers(tmp)["ours"]
    _mount_ours(t, f"xattr_permissions={level}")
    mounts.track(t["m"])
    _override_changes(t["m"])
    shown = _owners(t["m"])
    assert shown["dir/f"] == (7, 8, "0o604") and shown["new"] == (5, 6, "0o644")
    assert shown["newdir"] == (9, 9, "0o750")
    # hidden through the mount, and not settable
    names = ("security.fuseoverlayfs.override_stat",) if level == 1 else (
        "user.containers.override_stat", "user.fuseoverlayfs.override_stat")
    assert not set(names) & set(os.listxattr(os.path.join(t["m"], "new")))
    with pytest.raises(OSError) as e:
        os.setxattr(os.path.join(t["m"], "new"), names[0], b"0:0:777")
    assert e.value.errno == errno.EPERM
    mounts.umount(t["m"])
    for name in names:
        assert os.getxattr(os.path.join(t["u"], "new"), name) == b"5:6:100644"
        assert os.getxattr(os.path.join(t["u"], "dir/f"), name) == b"7:8:100604"
        assert os.getxattr(os.path.join(t["u"], "newdir"), name) == b"9:9:40750"
    st = os.lstat(os.path.join(t["u"], "new"))
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_xattr_permissions_stores_exchanged(tmp, mounts):
    """A store written by fuse-overlayfs with xattr_permissions=2 mounted
    by ours, and one written by ours mounted by fuse-overlayfs (as upper,
    and pushed down as a lower layer): the same owners and modes."""
    t = _layers(tmp)
    fo, ours = t["fo"], t["ours"]
    # fuse-overlayfs writes, ours reads (and writes on)
    _mount_fo(mounts, fo, "xattr_permissions=2")
    os.chown(os.path.join(fo["m"], "dir/f"), 7, 8)
    with open(os.path.join(fo["m"], "new"), "w") as fh:
        fh.write("n\n")
    os.mkdir(os.path.join(fo["m"], "newdir"))
    os.chown(os.path.join(fo["m"], "newdir"), 9, 9)
    fo_view = _owners_some(fo["m"], ("dir/f", "new", "newdir", "top"))
    mounts.umount(fo["m"])
    _mount_ours(fo, "xattr_permissions=2")
    mounts.track(fo["m"])
    assert _owners_some(fo["m"], ("dir/f", "new", "newdir", "top")) == fo_view
    os.chown(os.path.join(fo["m"], "new"), 3, 4)
    mounts.umount(fo["m"])
    _mount_fo(mounts, fo, "xattr_permissions=2")
    assert os.lstat(os.path.join(fo["m"], "new"))[4:6] == (3, 4)
    mounts.umount(fo["m"])
    # ours writes, fuse-overlayfs reads it as its upper...
    _mount_ours(ours, "xattr_permissions=2")
    mounts.track(ours["m"])
    _override_changes(ours["m"])
    ours_view = _owners(ours["m"])
    mounts.umount(ours["m"])
    _mount_fo(mounts, ours, "xattr_permissions=2")
    assert _owners(ours["m"]) == ours_view
    mounts.umount(ours["m"])
    # ...and as a lower layer under a new upper
    up2, w2 = os.path.join(tmp, "u2"), os.path.join(tmp, "w2")
    os.makedirs(up2)
    os.makedirs(w2)
    pushed = {"l": [ours["u"]] + ours["l"], "u": up2, "w": w2, "m": ours["m"]}
    _mount_fo(mounts, pushed, "xattr_permissions=2")
    assert _owners(ours["m"]) == ours_view
    mounts.umount(ours["m"])


def _owners_some(mp, paths):
    out = {}
    for p in paths:
        st = os.lstat(os.path.join(mp, p))
        out[p] = (st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)))
    return out


# ------------------------------------------------------------ unmounting as podman does


def _daemons_of(mp: str) -> list:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "overlay-containers-mount" in cmd and mp in cmd:
                out.append(int(pid))
    return out


def _syncfs_and_detach(mp: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert libc.syncfs(fd) == 0
    finally:
        os.close(fd)
    assert libc.umount2(os.fsencode(mp), 2) == 0      # MNT_DETACH


@pytest.mark.parametrize("how", ["fusermount3", "umount", "syncfs-detach"])
def test_podman_unmount_ways(tmp, mounts, how):
    """containers/storage recognises the mount by its statfs type (FUSE's
    magic) and unmounts with fusermount3 -u, else umount, else syncfs and
    a lazy umount2: each ends our daemon, with the data written."""
    t = _layers(tmp)["ours"]
    _mount_ours(t, "")
    mounts.track(t["m"])
    r = subprocess.run(["stat", "-f", "-c", "%t", t["m"]], capture_output=True, text=True)
    assert r.stdout.strip() == "65735546", r.stdout     # FUSE_SUPER_MAGIC
    with open(os.path.join(t["m"], "written"), "w") as fh:
        fh.write("data\n")
    assert _daemons_of(t["m"])
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", t["m"]], check=True)
    elif how == "umount":
        subprocess.run(["umount", t["m"]], check=True)
    else:
        _syncfs_and_detach(t["m"])
    for _ in range(100):
        if not _daemons_of(t["m"]):
            break
        time.sleep(0.05)
    assert not _daemons_of(t["m"]), "the daemon is still running"
    assert not mountutil.is_mounted(t["m"])
    with open(os.path.join(t["u"], "written")) as fh:
        assert fh.read() == "data\n"
