"""One mount per upper and work dir (issue 22): a second mount of ours on an
upper or work dir a live mount uses is refused with one line naming that
mount and its daemon's PID (index=on or not, the same command twice on one
mount point too); the lock goes with the daemon (SIGKILL leaves nothing to
clean); an upper a kernel overlay uses is refused too; mounts sharing lower
layers stay allowed. Everything mounted here is unmounted in teardown.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

import mountutil
from relutil import mkdirs, overlay_cmd, overlay_env, relmounts, reltmp  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.usefixtures("relmounts")]


def _mount(lowers, upper, work, mp, *opts):
    o = f"lowerdir={':'.join(lowers)}"
    if upper:
        o += f",upperdir={upper},workdir={work}"
    for x in opts:
        o += "," + x
    return subprocess.run(overlay_cmd("mount", "-o", o, mp), capture_output=True, text=True,
                          env=overlay_env(), stdin=subprocess.DEVNULL, timeout=120)


def _daemon_pid(mp):
    from overlay.stats import read_stats
    return read_stats(mp)["mount"]["pid"]


def _mounts_on(mp):
    from overlay.mounttable import iter_mounts
    return sum(1 for e in iter_mounts() if e.mountpoint == os.path.realpath(mp))


@pytest.fixture
def layout(reltmp, relmounts):
    lower, upper, work, a, b = mkdirs(reltmp, "l", "u", "w", "a", "b")
    with open(f"{lower}/f", "w") as f:
        f.write("lower\n")
    relmounts.track(a)
    relmounts.track(b)
    return lower, upper, work, a, b


@pytest.mark.parametrize("index", [False, True], ids=["default", "index=on"])
def test_second_mount_of_an_upper_in_use_is_refused(layout, index):
    lower, upper, work, a, b = layout
    opts = ("index=on",) if index else ()
    r = _mount([lower], upper, work, a, *opts)
    assert r.returncode == 0, r.stderr
    with open(f"{a}/new", "w") as f:
        f.write("through a\n")
    pid = _daemon_pid(a)
    r = _mount([lower], upper, work, b, *opts)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert f"upper dir '{upper}' is in use by the overlay mounted on '{a}' (PID {pid})" in lines[0]
    assert _mounts_on(b) == 0
    # the first mount is untouched (its work dir was not emptied) and serves on
    assert open(f"{a}/new").read() == "through a\n"
    with open(f"{a}/f", "a") as f:
        f.write("copied up\n")
    assert open(f"{upper}/f").read() == "lower\ncopied up\n"


def test_same_command_twice_on_one_mount_point(layout):
    lower, upper, work, a, _ = layout
    assert _mount([lower], upper, work, a).returncode == 0
    pid = _daemon_pid(a)
    r = _mount([lower], upper, work, a)
    assert r.returncode != 0
    assert f"in use by the overlay mounted on '{a}' (PID {pid})" in r.stderr
    assert _mounts_on(a) == 1
    assert os.listdir(a) == ["f"]


def test_shared_work_dir_is_refused(layout, reltmp):
    lower, upper, work, a, b = layout
    (upper2,) = mkdirs(reltmp, "u2")
    assert _mount([lower], upper, work, a).returncode == 0
    r = _mount([lower], upper2, work, b)
    assert r.returncode != 0
    assert f"work dir '{work}' is in use by the overlay mounted on '{a}'" in r.stderr
    assert os.listdir(upper2) == []


def test_lock_goes_with_a_killed_daemon(layout):
    lower, upper, work, a, b = layout
    assert _mount([lower], upper, work, a).returncode == 0
    pid = _daemon_pid(a)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _mounts_on(a) and time.monotonic() < deadline:     # (the watchdog unmounts it)
        time.sleep(0.05)
    assert _mounts_on(a) == 0
    r = _mount([lower], upper, work, b)
    assert r.returncode == 0, r.stderr
    assert os.listdir(b) == ["f"]


def test_upper_of_a_kernel_overlay_is_refused(layout, reltmp, relmounts):
    if mountutil._probe_kernel_overlay() is not None:
        pytest.skip("no kernel overlay here")
    lower, upper, work, a, b = layout
    (k,) = mkdirs(reltmp, "k")
    relmounts.kernel([lower], upper, work, k)
    r = _mount([lower], upper, work, a)
    assert r.returncode != 0
    assert f"upper dir '{upper}' is in use by the kernel overlay mounted on '{k}'" in r.stderr
    assert _mounts_on(a) == 0


def test_shared_lower_layers_stay_allowed(layout, reltmp, relmounts):
    lower, upper, work, a, b = layout
    c, d, u2, w2 = mkdirs(reltmp, "c", "d", "u2", "w2")
    relmounts.track(c)
    relmounts.track(d)
    # two read-only mounts of one lower layer, and two writable ones over it
    # with uppers of their own
    for mp, up, wk in ((a, None, None), (b, None, None), (c, upper, work), (d, u2, w2)):
        r = _mount([lower], up, wk, mp)
        assert r.returncode == 0, r.stderr
    for mp in (a, b, c, d):
        assert open(f"{mp}/f").read() == "lower\n"


def test_core_refuses_an_upper_another_core_holds(reltmp):
    from overlay_core import Overlay

    lower, upper, work = mkdirs(reltmp, "l", "u", "w")
    o = Overlay([lower], upper, work)
    try:
        with pytest.raises(OSError) as ei:
            Overlay([lower], upper, work)
        assert ei.value.errno == errno.EBUSY
    finally:
        o.close()
    Overlay([lower], upper, work).close()     # free again once closed
