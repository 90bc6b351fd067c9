"""The native FUSE engine's own tests (src/overlay/engine/), on real mounts.

* 8 processes hammer one mount for 20 s (ENGINE_HAMMER_SECONDS), each
  op checked against a model (the fsx workers of test_stress);
* SIGKILL of the daemon: the mount is gone within a second (the watchdog
  child, or fusermount3's auto_unmount), nothing half-written in the upper;
* unmount while requests are in flight; a reader killed in the middle of a
  read; an opener killed while its copy-up runs;
* a long copy-up does not stall other requests;
* a directory listed while others rename in it lists each name once;
* fds and RSS stay bounded over 400,000 lookups (ENGINE_LOOKUPS);
* set-id bits cleared on writes and truncates by other users (the
  handle_killpriv_v2 hints), as on the kernel overlay;
* mounting through fusermount3 (what non-root users get), and the one-line
  errors for a missing /dev/fuse or fusermount3.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import subprocess
import textwrap
import threading
import time

import pytest

import mountutil
from relutil import (  # noqa: F401  (fixtures)
    PY,
    Daemon,
    mkdirs,
    open_fds,
    overlay_env,
    relmounts,
    reltmp,
    run_overlay,
    vm_status,
    write_pattern_file,
)

HAMMER_SECONDS = float(os.environ.get("ENGINE_HAMMER_SECONDS", "20"))
LOOKUPS = int(os.environ.get("ENGINE_LOOKUPS", "400000"))

pytestmark = pytest.mark.skipif(mountutil.engine() != "native", reason="native engine tests")


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_ours()


@pytest.fixture
def daemons():
    ds = []
    yield ds
    for d in ds:
        d.stop()


def _wait(cond, timeout, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _watchdog_of(mp):
    """PIDs of the watchdog children of our daemons for mount point mp."""
    want = b"overlay-watchdog for " + os.fsencode(os.path.realpath(mp)) + b" ["
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if f.read().startswith(want):
                        out.append(int(p))
            except OSError:
                pass
    return out


# ---------------------------------------------------------------------------
# the bridge's node id table (no mount)


def test_id_table():
    """The C table of node ids: get(0) once crashed the daemon (a release of
    a node whose id had just been reset) since 0 marks an empty slot."""
    from overlay.engine.bridge import _idtable_selftest

    assert _idtable_selftest()


# ---------------------------------------------------------------------------
# load


def test_hammer_eight_processes(reltmp, relmounts):
    """8 fsx-like processes on one mount, a model checked after every op."""
    from test_stress import run_fsx

    figures = run_fsx(reltmp, HAMMER_SECONDS, nworkers=8, tracker=relmounts,
                      opts=("workers=4",))
    assert figures["ops"] > 1000 and figures["mismatches"] == 0


def _mounted_dir_of(reltmp, relmounts, names) -> str:
    """Our mount over a lower layer whose dir d holds these empty files:
    its mount point."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.makedirs(f"{lower}/d")
    for n in names:
        open(f"{lower}/d/{n}", "w").close()
    relmounts.ours([lower], upper, work, mp)
    return mp


def test_listing_while_others_rename(reltmp, relmounts):
    """readdir of a dir that others change: every name that stays is listed
    exactly once (listings have generations, see _ops_dirs.pxi)."""
    stable = [f"s{i:03d}" for i in range(300)]
    mp = _mounted_dir_of(reltmp, relmounts, stable)
    stop = threading.Event()

    def churn(k):
        i = 0
        while not stop.is_set():
            p = f"{mp}/d/x{k}-{i % 20}"
            with open(p, "w"):
                pass
            os.rename(p, f"{mp}/d/y{k}-{i % 20}")
            i += 1

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            names = os.listdir(f"{mp}/d")
            dups = {n for n in names if names.count(n) > 1}
            assert not dups, dups
            assert set(stable) <= set(names)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_listing_then_stat_of_each_entry_needs_no_lookup(reltmp, relmounts):
    """Every READDIR is a READDIRPLUS: a dir listed whole, then each entry
    stat'ed (ls -l, du, os.walk and open) costs no LOOKUP, also past the
    first buffer of a big dir (READDIRPLUS_AUTO would give the kernel names
    only there: one LOOKUP for each later entry)."""
    import json

    names = [f"file-with-a-longish-name-{i:05d}" for i in range(1500)]
    mp = _mounted_dir_of(reltmp, relmounts, names)

    def lookups():
        return json.loads(os.getxattr(mp, "user.overlay-fuse.stats"))["requests"].get("lookup", 0)

    os.stat(f"{mp}/d")
    before = lookups()
    listed = os.listdir(f"{mp}/d")
    for n in listed:
        os.stat(f"{mp}/d/{n}")
    assert sorted(listed) == names
    assert lookups() - before == 0


def test_write_right_after_read_of_lower_files(reltmp, relmounts):
    """Read a lower file, close it, write it at once: the RELEASE of the read
    may still be on its way, so the write open meets the lower file's
    passthrough backing and takes the new-id path (ESTALE, revalidate).
    This crashed the daemon once; the walkthrough does it too."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    for i in range(100):
        with open(f"{lower}/f{i}", "w") as f:
            f.write(f"lower {i}\n")
    relmounts.ours([lower], upper, work, mp)
    for i in range(100):
        with open(f"{mp}/f{i}") as f:
            assert f.read() == f"lower {i}\n"
        with open(f"{mp}/f{i}", "a") as f:
            f.write("more\n")
        with open(f"{mp}/f{i}") as f:
            assert f.read() == f"lower {i}\nmore\n"
    assert sorted(os.listdir(upper)) == sorted(f"f{i}" for i in range(100))


@pytest.mark.parametrize("metacopy", [False, True], ids=["copy-up", "metacopy-data-copy-up"])
def test_long_copy_up_does_not_stall_other_requests(reltmp, relmounts, metacopy):
    """With metacopy=on the data of a file whose metadata were copied up
    (chmod) are copied in place at the first open for write: that too
    runs while other requests go on."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    write_pattern_file(f"{lower}/big", 512)
    os.makedirs(f"{lower}/d")
    for i in range(20):
        open(f"{lower}/d/f{i}", "w").close()
    relmounts.ours([lower], upper, work, mp, ("metacopy=on",) if metacopy else ())
    if metacopy:
        os.chmod(f"{mp}/big", 0o600)
        assert os.stat(f"{upper}/big").st_blocks < 64, "chmod copied the data up"
    done = threading.Event()
    took = []

    def copy_up():
        t = time.monotonic()
        os.close(os.open(f"{mp}/big", os.O_WRONLY))
        took.append(time.monotonic() - t)
        done.set()

    th = threading.Thread(target=copy_up)
    th.start()
    if metacopy:
        _wait(lambda: os.stat(f"{upper}/big").st_blocks >= 64 or done.is_set(), 10, 0.001)
    else:
        _wait(lambda: os.listdir(f"{work}/work") or done.is_set(), 10, 0.001)
    worst, ops = 0.0, 0
    while not done.is_set():
        t = time.monotonic()
        os.stat(f"{mp}/d/f{ops % 20}")
        os.listdir(f"{mp}/d")
        with open(f"{mp}/d/n{ops}", "w") as f:      # a change in another dir
            f.write("x")
        worst = max(worst, time.monotonic() - t)
        ops += 1
    th.join()
    print(f"copy-up of 512 MiB: {took[0]:.2f} s; {ops} ops meanwhile, slowest {worst * 1000:.0f} ms")
    assert ops >= 5, "the copy-up was too quick to measure anything"
    assert worst < max(0.3, took[0] / 4)
    if metacopy:
        with open(f"{mp}/big", "rb") as f, open(f"{lower}/big", "rb") as g:
            assert f.read() == g.read()
        assert "trusted.overlay.metacopy" not in os.listxattr(f"{upper}/big")


# ---------------------------------------------------------------------------
# ending


@pytest.mark.parametrize("method", ["mount", "fusermount3"])
def test_sigkill_leaves_no_dead_mount(reltmp, daemons, method):
    """kill -9 of the daemon in the middle of writes: the mount is gone
    within a second, and the upper holds no half-written file."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    write_pattern_file(f"{lower}/big", 256)
    for i in range(50):
        with open(f"{lower}/f{i}", "w") as f:
            f.write("lower")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log",
                          env={"OVERLAY_MOUNT_METHOD": method})
    daemons.append(d)
    d.start()
    writer = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import os
        for i in range(50):
            with open("{mp}/f%d" % i, "a") as f:
                f.write("upper" * 1000)
        fd = os.open("{mp}/big", os.O_WRONLY)
        os.pwrite(fd, b"X", 0)
    """)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: os.listdir(f"{work}/work") != [], 20, 0.001)
    t = time.monotonic()
    d.kill9()
    assert _wait(lambda: not mountutil.is_mounted(mp), 1.0), "a dead mount stayed behind"
    gone = time.monotonic() - t
    writer.wait(timeout=60)
    print(f"{method}: mount gone {gone * 1000:.0f} ms after SIGKILL")
    assert all(not n.startswith("#") for n in os.listdir(upper))
    for n in os.listdir(upper):
        if n.startswith("f"):
            with open(f"{upper}/{n}") as f:
                data = f.read()
            assert data.startswith("lower") and set(data[5:]) <= set("upper"), n
    if "big" in os.listdir(upper):
        assert os.stat(f"{upper}/big").st_size == 256 << 20
    assert _wait(lambda: not _watchdog_of(mp), 5), "the watchdog did not end"


def test_clean_unmount_with_requests_in_flight(reltmp, daemons):
    """umount -l while readers and a copy-up are busy: the daemon finishes
    what it was doing, exits 0, logs no error and holds no layer open (the
    layers' own mount can be unmounted at once)."""
    base = f"{reltmp}/fs"
    os.makedirs(base)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700m", "tmpfs", base], check=True)
    try:
        lower, upper, work, mp = mkdirs(base, "l", "u", "w", "m")
        write_pattern_file(f"{lower}/big", 300)
        for i in range(200):
            with open(f"{lower}/s{i}", "w") as f:
                f.write("small")
        d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log",
                          opts=("passthrough=off",))
        daemons.append(d)
        d.start()
        busy = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
            import os, threading
            def reader():
                for r in range(20):
                    for i in range(200):
                        try:
                            open("{mp}/s%d" % i).read()
                        except OSError:
                            return
            ts = [threading.Thread(target=reader) for _ in range(3)]
            [t.start() for t in ts]
            try:
                fd = os.open("{mp}/big", os.O_WRONLY)
                os.close(fd)
            except OSError:
                pass
            [t.join() for t in ts]
        """)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: os.listdir(f"{work}/work") != [], 20, 0.001)
        r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        busy.wait(timeout=120)
        assert d.wait(60) == 0
        log = d.log_text()
        assert "Traceback" not in log and " ERROR" not in log, log
        assert not mountutil.is_mounted(mp)
        assert _wait(lambda: not _watchdog_of(mp), 5)
    finally:
        r = subprocess.run(["umount", base], capture_output=True, text=True)
    assert r.returncode == 0, f"the layers' tmpfs is still busy: {r.stderr}"


def test_reader_killed_mid_read(reltmp, daemons):
    """A process reading a big file through the daemon (no passthrough) is
    killed in the middle: the mount goes on serving, nothing is logged."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    h, _ = write_pattern_file(f"{lower}/big", 256)
    with open(f"{lower}/small", "w") as f:
        f.write("small")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log",
                          opts=("passthrough=off", "workers=4"))
    daemons.append(d)
    d.start()
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGKILL):
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
        p = subprocess.Popen(["dd", f"if={mp}/big", "of=/dev/null", "bs=1M", "iflag=direct"],
                             stderr=subprocess.DEVNULL)
        time.sleep(0.15)
        p.send_signal(sig)
        p.wait(timeout=30)
    assert d.alive()
    with open(f"{mp}/small") as f:
        assert f.read() == "small"
    from relutil import sha1_file
    assert sha1_file(f"{mp}/big", drop_cache=True) == h
    assert "Traceback" not in d.log_text() and " ERROR" not in d.log_text()


def test_opener_killed_during_its_copy_up(reltmp, daemons):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    h, _ = write_pattern_file(f"{lower}/big", 512)
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log")
    daemons.append(d)
    d.start()
    p = subprocess.Popen([PY, "-c", f"import os; os.open('{mp}/big', os.O_WRONLY); input()"],
                         stdin=subprocess.PIPE)
    _wait(lambda: os.listdir(f"{work}/work") != [], 20, 0.001)
    p.kill()
    p.wait(timeout=60)
    # the copy-up was finished (or is): the file is whole, and usable
    fd = os.open(f"{mp}/big", os.O_WRONLY)
    os.pwrite(fd, b"Z", 0)
    os.close(fd)
    with open(f"{mp}/big", "rb") as f:
        assert f.read(1) == b"Z"
    assert os.stat(f"{upper}/big").st_size == 512 << 20
    assert os.listdir(f"{work}/work") == []
    assert d.alive() and "Traceback" not in d.log_text()


# ---------------------------------------------------------------------------
# bounds


def test_many_lookups_bounded_fds_and_rss(reltmp, daemons):
    """ENGINE_LOOKUPS (400,000; ENGINE_LOOKUPS=1000000 for more) lookups
    over 20,000 files with timeout=0 (every one reaches the daemon): fds
    and RSS stay bounded (the last 80% add nothing to the first 20%'s)."""
    from test_stress import build_tree

    (l1, l2, u, w), paths = build_tree(reltmp, 20000)
    mp = f"{reltmp}/m"
    d = Daemon.for_layers([l1, l2], u, w, mp, f"{reltmp}/daemon.log", opts=("timeout=0",))
    daemons.append(d)
    d.start()
    script = textwrap.dedent(f"""
        import os, random, sys
        paths = sys.stdin.read().split()
        rnd = random.Random(int(sys.argv[1]))
        n = int(sys.argv[2])
        for i in range(n):
            os.stat("{mp}/" + paths[rnd.randrange(len(paths))])
    """)
    nproc = 2
    per = LOOKUPS // nproc // 2        # each stat of a file = 2 lookups (dir, file)
    samples = []

    def run(k):
        procs = [subprocess.Popen([PY, "-c", script, str(seed), str(k)], stdin=subprocess.PIPE,
                                  text=True) for seed in range(nproc)]
        for p in procs:
            p.stdin.write("\n".join(paths))
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=3600) == 0

    t = time.monotonic()
    run(per // 5)
    samples.append((vm_status(d.pid)["VmRSS"], len(open_fds(d.pid))))
    run(per - per // 5)
    samples.append((vm_status(d.pid)["VmRSS"], len(open_fds(d.pid))))
    peak = vm_status(d.pid)["VmHWM"]
    elapsed = time.monotonic() - t
    print(f"{LOOKUPS} lookups in {elapsed:.0f} s; RSS kB at 20%/end {samples}; peak {peak} kB")
    (rss20, fds20), (rss_end, fds_end) = samples
    assert peak < 400 * 1024
    assert rss_end < rss20 * 1.2 + 4096, "RSS keeps growing"
    assert fds_end <= fds20 + 64, "fds keep growing"
    assert fds_end < 8192


# ---------------------------------------------------------------------------
# set-id bits (handle_killpriv_v2)


def _kernel_and_ours(reltmp, relmounts, opts=()):
    pairs = []
    for side in ("k", "o"):
        lower, upper, work, mp = mkdirs(reltmp, f"{side}l", f"{side}u", f"{side}w", f"{side}m")
        for name in ("w", "t", "o"):
            with open(f"{lower}/{name}", "w") as f:
                f.write("data")
            os.chmod(f"{lower}/{name}", 0o6777)
        if side == "k":
            relmounts.kernel([lower], upper, work, mp)
        else:
            relmounts.ours([lower], upper, work, mp, ("allow_other",) + opts)
        pairs.append(mp)
    return pairs


@pytest.mark.parametrize("opts", [(), ("passthrough=off",)], ids=["defaults", "no-passthrough"])
def test_setid_bits_cleared_like_the_kernel(reltmp, relmounts, opts):
    """A write, a truncate and an O_TRUNC open by another user clear the
    set-user-id and set-group-id bits (set-group-id here with group execute),
    on the kernel overlay and on ours."""
    mountutil.require_kernel_overlay()
    from relutil import run_as

    modes = {}
    for mp in _kernel_and_ours(reltmp, relmounts, opts):
        def change(mp=mp):
            fd = os.open(f"{mp}/w", os.O_WRONLY)
            os.write(fd, b"x")
            os.close(fd)
            os.truncate(f"{mp}/t", 1)
            os.close(os.open(f"{mp}/o", os.O_WRONLY | os.O_TRUNC))
        assert run_as(65534, 65534, change) == ("ok", None)
        modes[mp] = [oct(stat.S_IMODE(os.stat(f"{mp}/{n}").st_mode)) for n in ("w", "t", "o")]
    k, o = modes.values()
    assert k == o, modes
    assert all(m == "0o777" for m in o), o


# ---------------------------------------------------------------------------
# mounting


def test_fusermount3_mount_and_unmount(reltmp, daemons):
    """The path non-root users take: fusermount3 mounts and hands the fd
    back; fusermount3 -u ends the daemon with status 0."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    with open(f"{lower}/f", "w") as f:
        f.write("lower")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log",
                          env={"OVERLAY_MOUNT_METHOD": "fusermount3"})
    daemons.append(d)
    d.start()
    with open(f"{mp}/f") as f:
        assert f.read() == "lower"
    with open(f"{mp}/n", "w") as f:
        f.write("new")
    # (fusermount3's auto_unmount unmounts after a crash; the watchdog
    # aborts the dead daemon's connection, which io_uring's teardown could
    # keep up, and goes when the daemon ends cleanly)
    assert _watchdog_of(mp)
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert d.wait(30) == 0
    assert _wait(lambda: not _watchdog_of(mp), 5)
    assert open(f"{upper}/n").read() == "new"


def test_missing_dev_fuse_is_one_line(reltmp):
    lower, mp = mkdirs(reltmp, "l", "m")
    # a private /dev without fuse (but with null, which the daemon's stdio needs)
    script = (f"mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
              f"exec {PY} -m overlay mount -o lowerdir={lower} {mp}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, env=overlay_env(), timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/fuse is missing" in lines[0], r.stderr
    assert not mountutil.is_mounted(mp)


def test_missing_fusermount3_is_one_line(reltmp):
    lower, mp, bindir = mkdirs(reltmp, "l", "m", "bin")
    r = run_overlay("mount", "-o", f"lowerdir={lower}", mp,
                    env=overlay_env({"OVERLAY_MOUNT_METHOD": "fusermount3", "PATH": bindir}))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs fusermount3" in lines[0], r.stderr
    assert not mountutil.is_mounted(mp)


@pytest.mark.parametrize("opt,msg", [
    ("engine=fuse", "bad value 'fuse' for engine"),
    ("passthrough=maybe", "bad value 'maybe' for passthrough"),
    ("workers=0", "bad value '0' for workers"),
    ("workers=65", "bad value '65' for workers (expected 1 to 64; 1 to 1000 with engine=pyfuse3)"),
])
def test_bad_engine_options(reltmp, opt, msg):
    lower, mp = mkdirs(reltmp, "l", "m")
    r = run_overlay("mount", "-o", f"lowerdir={lower},{opt}", mp)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
    assert not mountutil.is_mounted(mp)


def test_watchdog_forked_while_another_thread_holds_the_gil(tmp_path):
    """The watchdog is forked while another thread of the daemon runs
    Python (as one making an image layer's tree does): the child must not
    need the GIL (it would wait forever for a thread that does not exist in
    it, and the daemon, at its clean exit, for the child)."""
    import threading
    from overlay.engine import wire
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass
    t = threading.Thread(target=spin)
    t.start()
    try:
        pid, wfd = wire.start_watchdog(str(tmp_path).encode(), b"0:0")
    finally:
        stop.set()
        t.join()
    os.write(wfd, b"x")
    os.close(wfd)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the watchdog child did not end when told to (stuck on the GIL)")
