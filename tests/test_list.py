"""`overlay list` (every live mount of ours: mount point, daemon PID, engine,
uptime, layers, options; --json) and `overlay umount` (refuses what is not
a mount of ours unless --force; follows a symlink as umount(8) does).
Everything mounted here is unmounted in teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from relutil import mkdirs, overlay_cmd, overlay_env, relmounts, reltmp  # noqa: F401  (fixtures)


def _run(*args, timeout=60):
    return subprocess.run(overlay_cmd(*args), capture_output=True, text=True, env=overlay_env(),
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _mounted(mp):
    from overlay.mounttable import find_mount
    return find_mount(os.path.realpath(mp)) is not None


def _pid(mp):
    from overlay.stats import read_stats
    return read_stats(mp)["mount"]["pid"]


def test_list_shows_every_mount_of_ours(reltmp, relmounts):
    l1, l2, up, wk, a, b = mkdirs(reltmp, "l1", "l2", "u", "w", "a", "b")
    relmounts.ours([l1, l2], up, wk, a, opts=("index=on", "uring=off"))
    relmounts.ours([l2], None, None, b)
    r = _run("list", "--json")
    assert r.returncode == 0, r.stderr
    mounts = {m["mountpoint"]: m for m in json.loads(r.stdout)}
    ma, mb = mounts[a], mounts[b]
    assert ma["pid"] == _pid(a) and mb["pid"] == _pid(b) and ma["pid"] != mb["pid"]
    assert ma["lowers"] == [l1, l2] and ma["upper"] == up and ma["work"] == wk
    assert ma["options"]["index"] is True and ma["options"]["uring"] == "off"
    assert ma["engine"] == "native" and ma["answering"]
    assert 0 <= ma["uptime_s"] < 600
    assert mb["lowers"] == [l2] and mb["upper"] is None
    r = _run("list")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert f"{a}  pid {ma['pid']}  native  up " in text
    assert f"  lower    {l1}:{l2}" in text and f"  upper    {up}" in text
    assert "index=True" not in text and "index" in text


def test_list_does_not_hang_on_a_stopped_daemon(reltmp, relmounts):
    lo, a = mkdirs(reltmp, "l", "a")
    relmounts.ours([lo], None, None, a)
    pid = _pid(a)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = _run("list", timeout=30)
        assert time.monotonic() - t0 < 15
        assert f"{a}  (its daemon does not answer)" in r.stdout
    finally:
        os.kill(pid, signal.SIGCONT)


def test_umount_refuses_what_is_not_ours(reltmp, relmounts):
    (t,) = mkdirs(reltmp, "tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", t], check=True)
    relmounts.track(t)
    r = _run("umount", t)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"'{t}' is not an overlay of ours (it is tmpfs)" in lines[0]
    assert _mounted(t)
    r = _run("umount", "--force", t)
    assert r.returncode == 0, r.stderr
    assert not _mounted(t)


def test_umount_follows_a_symlink_to_the_mount_point(reltmp, relmounts):
    lo, a = mkdirs(reltmp, "l", "a")
    relmounts.ours([lo], None, None, a)
    link = os.path.join(reltmp, "link")
    os.symlink(a, link)
    r = _run("umount", link)
    assert r.returncode == 0, r.stderr
    assert not _mounted(a)
    assert os.path.islink(link)
