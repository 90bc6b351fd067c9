"""The kernel overlay's on-disk identity format, byte for byte: origin file
handles, impure and uuid marks, the volatile marker; each written by one
side and read by the other on the same directories.

Both sides mount the very same lower dir here (one after the other), so the
origin file handle each writes for a copied-up file must be the same bytes.
"""

import os
import subprocess

import pytest

import mountutil
from relutil import mkdirs

X = "trusted.overlay."


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def _getx(path, name):
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _fresh(upper, work):
    subprocess.run(["rm", "-rf", upper, work], check=True)
    os.makedirs(upper)
    os.makedirs(work)


def _lower(base):
    (lower,) = mkdirs(base, "l")
    os.makedirs(f"{lower}/d/sub")
    for p in ("f", "d/g", "d/sub/h"):
        with open(f"{lower}/{p}", "w") as f:
            f.write("data")
    os.link(f"{lower}/f", f"{lower}/f2")
    os.symlink("f", f"{lower}/s")
    return lower


def _touch_all(mp):
    for p in ("d/g", "d/sub/h", "s"):
        os.utime(os.path.join(mp, p), follow_symlinks=False)
    with open(f"{mp}/f", "a") as f:
        f.write("more")


IDENT = ("", "d", "d/sub", "d/g", "d/sub/h", "s", "f")


def _ino_source(mp, upper, lower, p):
    """st_ino of p on the mount, as comparable across two fresh uppers: the
    lower object's number (mapped), or "upper" where it is the upper one's."""
    ino = os.lstat(os.path.join(mp, p)).st_ino
    if ino == os.lstat(os.path.join(upper, p)).st_ino:
        return "upper"
    return ino


def _identity(upper):
    return {p: {x: _getx(os.path.join(upper, p), X + x) for x in ("origin", "impure")}
            for p in IDENT}


@pytest.mark.parametrize("fs", ["ext4-or-tmp", "tmpfs"])
def test_origin_bytes_and_marks_match_the_kernel(difftmp, mounts, fs):
    """The same copy-ups on the same lower dir: the same origin bytes (the
    lower filesystem's file handle and uuid), impure marks and uuid."""
    base = difftmp
    if fs == "tmpfs":
        base = os.path.join(difftmp, "t")
        os.makedirs(base)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", base], check=True)
        mounts.track(base)
    try:
        lower = _lower(base)
        upper, work, mp = mkdirs(difftmp, "u", "w", "m")
        seen = {}
        # layers on two filesystems: st_ino is the kernel's with xino=on
        opts = ("xino=on",) if fs == "tmpfs" else ()
        for side in ("kernel", "ours"):
            _fresh(upper, work)
            getattr(mounts, side)([lower], upper, work, mp, opts)
            _touch_all(mp)
            inos = {p: _ino_source(mp, upper, lower, p) for p in IDENT}
            mounts.umount(mp)
            seen[side] = (_identity(upper), inos, _getx(upper, X + "uuid"))
        k, o = seen["kernel"], seen["ours"]
        assert k[0] == o[0]
        assert k[1] == o[1]
        assert k[2] is not None and o[2] is not None and len(k[2]) == len(o[2]) == 16
        origin = k[0]["d/g"]["origin"]
        assert origin[:2] == b"\x00\xfb" and origin[2] == len(origin)
        uuid = origin[5:21]
        assert any(uuid) == (fs == "tmpfs")     # this ext4 has a null uuid, tmpfs has one
        assert k[0]["f"]["origin"] is None      # one name of a lower hard link: no origin
    finally:
        if fs == "tmpfs":
            mounts.umount(base)


def test_uuid_modes(difftmp, mounts):
    """uuid=off and uuid=null: no overlay uuid on the upper root, origin
    still written; auto on an upper used before (impure) without a uuid:
    none written either."""
    lower = _lower(difftmp)
    upper, work, mp = mkdirs(difftmp, "u", "w", "m")
    for opts in (("uuid=off",), ("uuid=null",)):
        for side in ("kernel", "ours"):
            _fresh(upper, work)
            getattr(mounts, side)([lower], upper, work, mp, opts)
            _touch_all(mp)
            mounts.umount(mp)
            # neither writes an overlay uuid with these
            assert _getx(upper, X + "uuid") is None, side
            fh = _getx(f"{upper}/d/g", X + "origin")
            assert fh is not None and fh[:2] == b"\x00\xfb", side
    # an upper used before, without uuid: auto keeps it without one
    _fresh(upper, work)
    mounts.ours([lower], upper, work, mp, ("uuid=null",))
    _touch_all(mp)
    mounts.umount(mp)
    assert _getx(upper, X + "impure") == b"y" and _getx(upper, X + "uuid") is None
    mounts.ours([lower], upper, work, mp)
    mounts.umount(mp)
    assert _getx(upper, X + "uuid") is None


def test_st_ino_from_the_kernels_origin(difftmp, mounts):
    """An upper the kernel wrote: ours reports the st_ino the kernel reports
    (the origin's for copied-up files and merged dirs), and the reverse; an
    upper written before origin existed (fuse.ino only) keeps its numbers."""
    lower = _lower(difftmp)
    upper, work, mp = mkdirs(difftmp, "u", "w", "m")
    for writer, reader in (("kernel", "ours"), ("ours", "kernel")):
        _fresh(upper, work)
        getattr(mounts, writer)([lower], upper, work, mp)
        _touch_all(mp)
        want = {p: os.lstat(os.path.join(mp, p)).st_ino for p in IDENT}
        mounts.umount(mp)
        getattr(mounts, reader)([lower], upper, work, mp)
        got = {p: os.lstat(os.path.join(mp, p)).st_ino for p in IDENT}
        mounts.umount(mp)
        assert got == want, f"written by {writer}, read by {reader}"
    # the older format: fuse.ino and no origin
    lino = os.lstat(f"{lower}/d/g").st_ino
    os.removexattr(f"{upper}/d/g", X + "origin")
    os.setxattr(f"{upper}/d/g", X + "fuse.ino", b"%d" % lino)
    mounts.ours([lower], upper, work, mp)
    assert os.lstat(f"{mp}/d/g").st_ino == lino
    mounts.umount(mp)
    # a null origin (a lower fs without file handles) beside fuse.ino, as
    # ours writes it there: the number kept too
    os.setxattr(f"{upper}/d/g", X + "origin", b"")
    mounts.ours([lower], upper, work, mp)
    assert os.lstat(f"{mp}/d/g").st_ino == lino
    mounts.umount(mp)


def test_volatile_marker(difftmp, mounts):
    """A volatile mount leaves work/incompat/volatile: the next mount, ours
    or the kernel's, is refused (ours in one line naming the feature) until
    the user removes it; the kernel's marker stops ours the same way."""
    lower = _lower(difftmp)
    upper, work, mp = mkdirs(difftmp, "u", "w", "m")
    marker = os.path.join(work, "work", "incompat", "volatile")
    for writer in ("ours", "kernel"):
        _fresh(upper, work)
        getattr(mounts, writer)([lower], upper, work, mp, ("volatile",))
        _touch_all(mp)
        mounts.umount(mp)
        assert os.path.isfile(os.path.join(marker, "dirty")), writer
        with pytest.raises(mountutil.MountError):
            mounts.kernel([lower], upper, work, mp)
        with pytest.raises(mountutil.MountError) as err:
            mounts.ours([lower], upper, work, mp)
        msg = str(err.value)
        assert "incompat feature 'volatile'" in msg, msg
        assert len([ln for ln in msg.split("stderr:")[-1].strip().splitlines() if ln.strip()]) == 1, msg
        subprocess.run(["rm", "-rf", marker], check=True)
        mounts.ours([lower], upper, work, mp)
        assert open(f"{mp}/f").read() == "datamore"
        mounts.umount(mp)
        mounts.kernel([lower], upper, work, mp)
        mounts.umount(mp)
