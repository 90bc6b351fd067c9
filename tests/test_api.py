"""Tests of the Python API, ``overlay.mount(...)`` (tests/test_api.py).

Real mounts (skipped with the reason when FUSE is not usable): the context
manager returns once the mount is live, writes through the view never reach
the lower dir, the view is gone after the ``with`` block (also when the block
raises), temporary mountpoint/upper/work dirs are removed while the caller's
own dirs are kept, ``ro=True``, several lowers, extra options, escaping of
``,`` and ``:`` in paths, and a failing mount raising MountError without
leaving anything behind.  Scratch dirs are /tmp/eco-api-*.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest

import overlay
from overlay.api import MountError, OverlayMount, fuse_unavailable_reason


def is_mounted(path):
    path = os.path.realpath(str(path))
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == path for line in fh)


@pytest.fixture
def eco():
    """(scratch dir, lower dir, dir for the API's temporary dirs)."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE not usable: {reason}")
    d = tempfile.mkdtemp(prefix="eco-api-", dir="/tmp")
    lower = os.path.join(d, "lower")
    os.makedirs(os.path.join(lower, "sub"))
    with open(os.path.join(lower, "a.txt"), "w") as fh:
        fh.write("alpha\n")
    with open(os.path.join(lower, "sub", "b.txt"), "w") as fh:
        fh.write("beta\n")
    tmp = os.path.join(d, "tmp")
    os.mkdir(tmp)
    yield d, lower, tmp
    with open("/proc/self/mountinfo") as fh:
        left = [ln.split()[4] for ln in fh if ln.split()[4].startswith(d + "/")]
    for mp in reversed(left):  # only ours: they are below our scratch dir
        os.system(f"umount -l '{mp}'")
    assert not left, f"left mounted: {left}"
    shutil.rmtree(d)


def lower_snapshot(lower):
    out = {}
    for dirpath, _, files in os.walk(lower):
        for name in files:
            with open(os.path.join(dirpath, name)) as fh:
                out[os.path.relpath(os.path.join(dirpath, name), lower)] = fh.read()
    return out


def test_fuse_is_usable_here():
    # informative: the suite runs as root with /dev/fuse
    if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        assert fuse_unavailable_reason() is None


def test_context_manager_temporary_layers(eco):
    d, lower, tmp = eco
    before = lower_snapshot(lower)
    with overlay.mount(lower=[lower], tmpdir=tmp) as mp:
        assert isinstance(mp, OverlayMount)
        assert is_mounted(mp.path) and mp.mounted
        assert os.fspath(mp) == str(mp.path) == str(mp)
        assert str(mp.path.parent) == tmp
        # one temp dir holds the upper and work dirs (same filesystem)
        assert mp.upper.parent == mp.work.parent and mp.upper.parent.parent == mp.path.parent
        assert sorted(os.listdir(mp)) == ["a.txt", "sub"]
        (mp / "a.txt").write_text("changed\n")
        (mp / "new.txt").write_text("new\n")
        os.remove(mp / "sub" / "b.txt")
        os.rename(mp / "sub", mp / "sub2")
        assert (mp.upper / "new.txt").read_text() == "new\n"
        assert (mp.upper / "a.txt").read_text() == "changed\n"
        path, upper, work = mp.path, mp.upper, mp.work
    assert not is_mounted(path) and not mp.mounted
    assert not path.exists() and not upper.exists() and not work.exists()
    assert os.listdir(tmp) == []
    assert lower_snapshot(lower) == before
    assert sorted(os.listdir(lower)) == ["a.txt", "sub"]


def test_root_mounts_have_the_defaults_of_every_entry_point(eco):
    """The API's mounts have overlay mount's defaults (as root: allow_other,
    devices and set-id files allowed, type fuse.overlay)."""
    if os.geteuid() != 0:
        pytest.skip("root's defaults")
    from overlay.mounttable import find_mount

    d, lower, tmp = eco
    with overlay.mount(lower=[lower], tmpdir=tmp) as mp:
        entry = find_mount(str(mp.path))
        assert entry.fstype == "fuse.overlay"
        opts = entry.options.split(",") + entry.super_options.split(",")
        assert "allow_other" in opts and "nosuid" not in opts and "nodev" not in opts


def test_unmounted_on_exception(eco):
    d, lower, tmp = eco
    with pytest.raises(KeyError, match="boom"):
        with overlay.mount(lower=lower, tmpdir=tmp) as mp:
            (mp / "x").write_text("x")
            raise KeyError("boom")
    assert not is_mounted(mp.path)
    assert os.listdir(tmp) == []
    mp.unmount()  # a second unmount is fine


def test_caller_dirs_are_kept(eco):
    d, lower, tmp = eco
    upper, work, mnt = (os.path.join(d, n) for n in ("upper", "work", "mnt"))
    for p in (upper, work, mnt):
        os.mkdir(p)
    with overlay.mount(lower=[lower], upper=upper, work=work, mountpoint=mnt) as mp:
        assert str(mp.path) == mnt and str(mp.upper) == upper and str(mp.work) == work
        (mp / "kept.txt").write_text("kept\n")
    assert not is_mounted(mnt)
    assert os.path.isdir(mnt) and os.listdir(mnt) == []
    with open(os.path.join(upper, "kept.txt")) as fh:
        assert fh.read() == "kept\n"
    # the upper dir can be mounted again: the change is still there
    with overlay.mount(lower=[lower], upper=upper, work=work, tmpdir=tmp) as mp:
        assert (mp / "kept.txt").read_text() == "kept\n"
    assert os.listdir(tmp) == []


def test_upper_without_work_gets_a_temporary_work_dir(eco):
    d, lower, tmp = eco
    upper = os.path.join(d, "upper")
    os.mkdir(upper)
    with overlay.mount(lower=lower, upper=upper, tmpdir=tmp) as mp:
        assert mp.work.parent == mp.upper.parent and mp.work.name.startswith(".overlay-work-")
        (mp / "f").write_text("f")
        work = mp.work
    assert not work.exists()
    assert sorted(os.listdir(d)) == ["lower", "tmp", "upper"]
    assert os.listdir(upper) == ["f"]


def test_read_only(eco):
    d, lower, tmp = eco
    with overlay.mount(lower=lower, ro=True, tmpdir=tmp) as mp:
        assert mp.upper is None and mp.work is None
        with pytest.raises(OSError) as info:
            (mp / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        assert (mp / "a.txt").read_text() == "alpha\n"
    assert os.listdir(tmp) == []


def test_several_lowers_and_options(eco):
    d, lower, tmp = eco
    top = os.path.join(d, "top")
    os.mkdir(top)
    with open(os.path.join(top, "a.txt"), "w") as fh:
        fh.write("from top\n")
    with overlay.mount(lower=[top, lower], tmpdir=tmp, redirect_dir="off") as mp:
        assert "redirect_dir=off" in mp.options.split(",")
        assert (mp / "a.txt").read_text() == "from top\n"
        assert (mp / "sub" / "b.txt").read_text() == "beta\n"
        with pytest.raises(OSError) as info:
            os.rename(mp / "sub", mp / "sub2")  # lower dir, no redirects
        assert info.value.errno == errno.EXDEV


def test_paths_with_commas_and_colons(eco):
    d, lower, tmp = eco
    odd = os.path.join(d, "a,b:c")
    shutil.copytree(lower, odd)
    upper_base = os.path.join(d, "u,1:2")
    os.mkdir(upper_base)
    with overlay.mount(lower=[odd], tmpdir=upper_base) as mp:
        assert (mp / "a.txt").read_text() == "alpha\n"
        (mp / "z").write_text("z")
        assert (mp.upper / "z").exists()
    assert os.listdir(upper_base) == []


def test_mount_failure_raises_and_cleans_up(eco):
    d, lower, tmp = eco
    with pytest.raises(MountError, match="lower layer '.*/missing' does not exist"):
        overlay.mount(lower=[os.path.join(d, "missing")], tmpdir=tmp)
    assert os.listdir(tmp) == []
    with pytest.raises(MountError, match="unknown mount option 'bogus'"):
        overlay.mount(lower=lower, tmpdir=tmp, bogus=True)
    assert os.listdir(tmp) == []


def test_argument_errors(eco):
    d, lower, tmp = eco
    with pytest.raises(ValueError, match="at least one lower"):
        overlay.mount(lower=[])
    with pytest.raises(ValueError, match="work= given without upper="):
        overlay.mount(lower=lower, work=tmp)
    with pytest.raises(TypeError, match="lower=/upper=/work="):
        overlay.mount(lower=lower, upperdir=tmp)
    assert os.listdir(tmp) == []


def test_without_context_manager(eco):
    d, lower, tmp = eco
    mp = overlay.mount(lower=lower, tmpdir=tmp)
    try:
        assert mp.mounted and "mounted" in repr(mp)
        assert [str(c) for c in mp.diff()] == []
        (mp / "n").write_text("n")
        assert [str(c) for c in mp.diff()] == ["A /n"]
        layer = os.path.join(d, "layer.tar")
        assert mp.commit(layer) >= 1
    finally:
        mp.unmount()
    assert not mp.mounted and os.listdir(tmp) == []
