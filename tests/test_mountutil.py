"""Tests of the mount helpers in tests/mountutil.py (kernel overlay only).

Checks that MountTracker unmounts everything even when the body raises, that
umount() of something not mounted is a quiet no-op, that remove_tmpdir()
never deletes below a live mount, and the option-string builder.
"""

import os

import pytest

import mountutil


def test_option_string():
    s = mountutil.overlay_option_string(["/a", "/b"], "/u", "/w", ("redirect_dir=on",))
    assert s == "lowerdir=/a:/b,upperdir=/u,workdir=/w,redirect_dir=on"
    assert mountutil.overlay_option_string(["/a", "/b"], None, None) == "lowerdir=/a:/b"
    with pytest.raises(ValueError):
        mountutil.overlay_option_string(["/a:b"], None, None)


def test_umount_not_mounted_is_quiet(difftmp):
    assert mountutil.umount(os.path.join(difftmp, "nothing-here")) is True
    assert mountutil.umount(difftmp) is True


def _layers(d):
    for sub in ("l1", "l2", "u", "w", "m"):
        os.makedirs(os.path.join(d, sub))
    with open(os.path.join(d, "l1", "f"), "w") as f:
        f.write("x")
    return [os.path.join(d, "l1"), os.path.join(d, "l2")], os.path.join(d, "u"), os.path.join(d, "w"), os.path.join(d, "m")


def test_tracker_unmounts_on_failure(difftmp):
    mountutil.require_kernel_overlay()
    lowers, upper, work, mp = _layers(difftmp)
    with pytest.raises(RuntimeError):
        with mountutil.MountTracker() as t:
            t.kernel(lowers, upper, work, mp)
            assert mountutil.is_mounted(mp)
            assert os.listdir(mp) == ["f"]
            raise RuntimeError("boom")
    assert not mountutil.is_mounted(mp)


def test_remove_tmpdir_unmounts_first():
    mountutil.require_kernel_overlay()
    d = mountutil.make_tmpdir("mu")
    lowers, upper, work, mp = _layers(d)
    mountutil.mount_kernel(lowers, upper, work, mp)
    fd = os.open(os.path.join(mp, "f"), os.O_RDONLY)  # busy: forces the lazy path
    try:
        assert mountutil.remove_tmpdir(d) in (True, False)
    finally:
        os.close(fd)
    assert not mountutil.is_mounted(mp)
    mountutil.remove_tmpdir(d)
    assert not os.path.exists(d)
