"""Crashes and faults on real mounts (tests/test_reliability.py).

What is proven here, each on a real FUSE mount of ours (as root):

* kill -9 of the daemon in the middle of the copy-up of a 1 GiB lower file
  (REL_BIG_MIB to change the size): after ``fusermount3 -uz`` and a remount
  the file is the untouched lower content or the complete new content, never
  partial; nothing temporary shows in the merged view or the upper dir; the
  partial copy left in WORKDIR/work is removed by the next mount.  A second
  test kills the daemon at random moments while two writers copy up many
  files (2 rounds each with and without volatile; scripts/soak.py runs it for as long as asked).
* fsync through the mount makes the data durable in the upper file (checked
  right after fsync, before unmount, and the daemon's fsync/fdatasync calls
  are seen with strace); copy-up fsyncs the copy before renaming it into
  place, and does not with ``volatile`` (strace -f -p DAEMON_PID).
* ENOSPC from a full upper (16 MiB tmpfs for upper+work): the copy-up of a
  32 MiB lower file and writing a big new file fail with ENOSPC, nothing
  half-copied is visible (merged view shows the lower content, the upper has
  no partial file, WORKDIR/work is empty, also after a remount); inode
  exhaustion (tmpfs nr_inodes) fails a whiteout with ENOSPC and the lower
  file stays.
* EIO from a layer (tests/faultyfs.py as the lower layer) reaches the caller
  as EIO, exactly where the kernel overlay on the same layer gives EIO, and
  the mount keeps serving.
* A non-OSError exception in a request handler answers that request with EIO
  and is logged; the mount keeps serving (adapter level with a fake core,
  and on a live mount whose core is wrapped by a test script).
* SIGTERM, SIGINT, ``umount`` and ``overlay umount`` end the daemon cleanly:
  exit status 0, mount gone (also with files open in the mount).

Scratch dirs are /tmp/rel-*; daemons started here are ours (``-f`` in a
subprocess, or found by their mount point) and are stopped in teardown.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import shutil
import subprocess
import textwrap
import threading
import time

import pytest

import mountutil
from relutil import (  # noqa: F401  (fixtures)
    MARK,
    PY,
    Daemon,
    Strace,
    find_daemon_pid,
    lazy_umount,
    mkdirs,
    overlay_env,
    relmounts,
    reltmp,
    run_overlay,
    sha1_file,
    tmpfs,
    tree_names,
    write_pattern_file,
)

BIG_MIB = int(os.environ.get("REL_BIG_MIB", "1024"))
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _need_fuse():
    mountutil.require_ours()
    if mountutil.ours_is_kernel():
        pytest.skip("these tests drive our daemon process")


@pytest.fixture
def daemons():
    """Daemons started by a test; stopped (and unmounted) at teardown."""
    started = []
    yield started
    for d in reversed(started):
        d.stop()


def _errno(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_at(path, data: bytes, off: int = 0, flags=os.O_WRONLY):
    fd = os.open(path, flags)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# kill -9 in the middle of a copy-up

WRITER = textwrap.dedent("""
    import os, sys
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY)
        os.pwrite(fd, sys.argv[2].encode(), 0)
        os.fsync(fd)
        os.close(fd)
        print("ok")
    except OSError as e:
        print("errno", e.errno)
""")


def _temp_entries(work):
    """(name, size) of what is in WORKDIR/work."""
    out = []
    for n in os.listdir(work):
        try:
            out.append((n, os.lstat(os.path.join(work, n)).st_size))
        except FileNotFoundError:
            pass
    return out


def kill9_during_big_copy_up(base, relmounts, daemons, mib=BIG_MIB) -> dict:
    """kill -9 while a `mib` MiB lower file is being copied up; checks that
    it is never partial. Returns what was seen (for scripts/soak.py)."""
    lower, upper, work, mp = mkdirs(base, "l", "u", "w", "m")
    big = os.path.join(lower, "big")
    h_lower, h_new = write_pattern_file(big, mib)
    size = mib << 20
    d = Daemon.for_layers([lower], upper, work, mp, f"{base}/daemon.log")
    daemons.append(d)
    d.start()
    writer = subprocess.Popen([PY, "-c", WRITER, f"{mp}/big", MARK.decode()],
                              stdout=subprocess.PIPE, text=True)
    wwork = os.path.join(work, "work")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = _temp_entries(wwork)
        # kill once the copy is well under way but not finished
        if any(s >= min(64 << 20, size // 4) for _, s in seen):
            break
        if writer.poll() is not None:
            break
        time.sleep(0.001)
    d.kill9()
    at_kill = _temp_entries(wwork)
    out, _ = writer.communicate(timeout=60)
    assert seen, "never saw the copy-up in progress"
    assert "ok" not in out, "the copy-up finished before the kill; make REL_BIG_MIB bigger"
    assert any(0 < s < size for _, s in seen), seen
    lazy_umount(mp)
    assert not mountutil.is_mounted(mp)
    # the dead daemon left its partial copy in the work dir, not in the upper
    assert at_kill, "the partial copy should still be in WORKDIR/work"
    assert all(not n.startswith("#") for n in os.listdir(upper))
    if "big" in os.listdir(upper):      # renamed just before the kill: complete
        assert sha1_file(f"{upper}/big") in (h_lower, h_new)

    relmounts.ours([lower], upper, work, mp)
    assert os.listdir(wwork) == [], "leftovers of the crash not cleaned at mount"
    assert os.listdir(mp) == ["big"]
    assert os.stat(f"{mp}/big").st_size == size
    assert sha1_file(f"{mp}/big", drop_cache=True) in (h_lower, h_new)
    assert all(not n.startswith("#") for n in os.listdir(upper))

    # and the interrupted change can now be made, completely
    _write_at(f"{mp}/big", MARK)
    assert os.listdir(wwork) == []
    with open(f"{mp}/big", "rb") as f:
        assert f.read(len(MARK)) == MARK
    assert os.stat(f"{upper}/big").st_size == size
    assert sha1_file(f"{upper}/big", drop_cache=True) == h_new
    relmounts.umount(mp)
    return {"partial_copy_at_kill": at_kill, "size": size}


def test_kill9_during_big_copy_up(reltmp, relmounts, daemons):
    """kill -9 while a 1 GiB lower file is being copied up: never partial."""
    kill9_during_big_copy_up(reltmp, relmounts, daemons)


TORTURE_WRITER = textwrap.dedent("""
    import os, random, sys
    mp, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    names = sorted(n for n in os.listdir(mp) if not n.startswith("moved-"))
    rnd.shuffle(names)
    for n in names:
        try:
            if n.startswith("rn"):
                os.rename(os.path.join(mp, n), os.path.join(mp, "moved-" + n))
            elif n.startswith("del"):
                os.unlink(os.path.join(mp, n))
            else:
                fd = os.open(os.path.join(mp, n), os.O_WRONLY)
                os.pwrite(fd, b"NEW-CONTENT-MARK", 0)
                os.close(fd)
        except OSError:
            break
""")


def _torture_round(base, rnd, n_big, big_mib, n_small, relmounts, daemons, volatile=False):
    """One crash round: returns a short description of what was seen."""
    lower, upper, work, mp = mkdirs(base, "l", "u", "w", "m")
    expect = {}         # name -> set of acceptable sha1s (None: may be gone)
    for i in range(n_big):
        h_old, h_new = write_pattern_file(f"{lower}/big{i}", big_mib, seed=b"%d" % i)
        expect[f"big{i}"] = {h_old, h_new}
    for i in range(n_small):
        h_old, h_new = write_pattern_file(f"{lower}/small{i}", 1, seed=b"s%d" % i)
        expect[f"small{i}"] = {h_old, h_new}
    for i in range(4):
        write_pattern_file(f"{lower}/rn{i}", 2, seed=b"r%d" % i)
        write_pattern_file(f"{lower}/del{i}", 1, seed=b"d%d" % i)
    renamed = {f"rn{i}": sha1_file(f"{lower}/rn{i}") for i in range(4)}
    deleted = {f"del{i}": sha1_file(f"{lower}/del{i}") for i in range(4)}
    opts = ("volatile",) if volatile else ()
    d = Daemon.for_layers([lower], upper, work, mp, f"{base}/daemon.log", opts=opts)
    daemons.append(d)
    d.start()
    writers = [subprocess.Popen([PY, "-c", TORTURE_WRITER, mp, str(rnd.randrange(1 << 30))])
               for _ in range(2)]
    time.sleep(rnd.uniform(0.02, 1.2))
    at_kill = _temp_entries(os.path.join(work, "work"))
    d.kill9()
    for w in writers:
        w.wait(timeout=60)
    lazy_umount(mp)
    assert not mountutil.is_mounted(mp)
    assert all(not n.startswith("#") for n in tree_names(upper)), tree_names(upper)

    if volatile:
        # as the kernel: after a volatile mount the next one is refused
        # until the user clears the marker (here: the files are checked below)
        marker = os.path.join(work, "work", "incompat", "volatile")
        assert os.path.isfile(os.path.join(marker, "dirty"))
        with pytest.raises(mountutil.MountError, match="incompat feature 'volatile'"):
            relmounts.ours([lower], upper, work, mp)
        shutil.rmtree(os.path.join(work, "work", "incompat"))
    relmounts.ours([lower], upper, work, mp)
    assert os.listdir(os.path.join(work, "work")) == []
    names = set(os.listdir(mp))
    assert all(not n.startswith("#") for n in names), names
    for n, ok in expect.items():
        assert n in names
        assert sha1_file(f"{mp}/{n}") in ok, f"{n}: partial or mixed content after the crash"
    for n, h in renamed.items():
        # a rename is atomic: the file is under exactly one of its two names
        there = [x for x in (n, "moved-" + n) if x in names]
        assert len(there) == 1, (n, there)
        assert sha1_file(f"{mp}/{there[0]}") == h
    for n, h in deleted.items():
        assert n not in names or sha1_file(f"{mp}/{n}") == h
    relmounts.umount(mp)
    return f"temp entries at kill: {at_kill}"


@pytest.mark.parametrize("volatile", [False, True], ids=["sync", "volatile"])
def test_kill9_at_random_moments(reltmp, relmounts, daemons, volatile):
    """Two rounds (REL_KILL_ROUNDS) of kill -9 at a random moment while two writers copy up,
    rename and delete lower files; after each, a remount shows every file
    whole (old or new content), renames atomic, no temporary names."""
    rnd = random.Random(int(os.environ.get("REL_SEED", "0")) or None)
    for r in range(int(os.environ.get("REL_KILL_ROUNDS", "2"))):
        base = os.path.join(reltmp, f"round{r}")
        _torture_round(base, rnd, n_big=3, big_mib=24, n_small=20,
                       relmounts=relmounts, daemons=daemons, volatile=volatile)


# ---------------------------------------------------------------------------
# fsync and copy-up syncing


def test_fsync_makes_data_durable_in_upper(reltmp, relmounts):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    with open(f"{lower}/old", "wb") as f:
        f.write(b"o" * 10000)
    relmounts.ours([lower], upper, work, mp)
    # a new file
    fd = os.open(f"{mp}/new", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"durable data\n" * 1000)
    os.fsync(fd)
    assert _read(f"{upper}/new") == b"durable data\n" * 1000
    os.pwrite(fd, b"DATASYNC", 5)
    os.fdatasync(fd)
    assert _read(f"{upper}/new")[5:13] == b"DATASYNC"
    os.close(fd)
    # a copied-up lower file
    fd = os.open(f"{mp}/old", os.O_RDWR)
    os.pwrite(fd, b"changed", 100)
    os.fsync(fd)
    assert _read(f"{upper}/old") == b"o" * 100 + b"changed" + b"o" * (10000 - 107)
    assert _read(f"{lower}/old") == b"o" * 10000
    os.close(fd)


def _strace_ops(mp, lower, big_kib=1024):
    """Copy up a small file, a big one (worker thread path) and a dir; then a
    caller fsync and fdatasync on a new file."""
    _write_at(f"{mp}/small", b"S")
    _write_at(f"{mp}/big", b"B")
    with open(f"{mp}/dir/inner", "ab") as f:
        f.write(b"I")
    fd = os.open(f"{mp}/synced", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)


def _make_strace_layers(reltmp):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.mkdir(f"{lower}/dir")
    for name, size in (("small", 4096), ("big", 1 << 20), ("dir/inner", 100)):
        with open(f"{lower}/{name}", "wb") as f:
            f.write(os.urandom(size))
    return lower, upper, work, mp


def _copy_up_renames(calls, work):
    """{final name: temp name} of renames from WORKDIR/work into the upper."""
    out = {}
    for name, rest in calls:
        if name == "renameat2" and f"<{work}/work>" in rest.split(",")[0]:
            parts = [p.strip() for p in rest.split(",")]
            tmp = parts[1].strip('"')
            final = parts[3].strip('"')
            out[final] = tmp
    return out


@pytest.mark.skipif(not Strace.available(), reason="strace is not installed")
def test_copy_up_fsyncs_before_rename(reltmp, daemons):
    lower, upper, work, mp = _make_strace_layers(reltmp)
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log")
    daemons.append(d)
    d.start()
    st = Strace(d.pid, f"{reltmp}/strace.log", "fsync,fdatasync,renameat2")
    with st:
        _strace_ops(mp, lower)
    calls = st.calls()
    renames = _copy_up_renames(calls, work)
    assert {"small", "big", "inner"} <= set(renames), (renames, st.lines()[:50])
    for final in ("small", "big", "inner"):
        tmp = renames[final]
        synced = [i for i, (n, rest) in enumerate(calls)
                  if n in ("fsync", "fdatasync") and rest.startswith(tuple("0123456789"))
                  and f"/work/{tmp}>" in rest]
        ren = [i for i, (n, rest) in enumerate(calls)
               if n == "renameat2" and f'"{tmp}"' in rest]
        assert synced, f"copy-up of {final} renamed without an fsync of {tmp}"
        assert synced[0] < ren[0]
    # the caller's fsync/fdatasync reach the upper file
    upper_syncs = [(n, rest) for n, rest in calls if n in ("fsync", "fdatasync")
                   and f"<{upper}/synced>" in rest]
    assert {n for n, _ in upper_syncs} == {"fsync", "fdatasync"}, upper_syncs


@pytest.mark.skipif(not Strace.available(), reason="strace is not installed")
def test_volatile_copy_up_does_not_fsync(reltmp, daemons):
    lower, upper, work, mp = _make_strace_layers(reltmp)
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log", opts=("volatile",))
    daemons.append(d)
    d.start()
    st = Strace(d.pid, f"{reltmp}/strace.log", "fsync,fdatasync,renameat2")
    with st:
        _strace_ops(mp, lower)
    calls = st.calls()
    renames = _copy_up_renames(calls, work)
    assert {"small", "big", "inner"} <= set(renames), renames
    work_syncs = [rest for n, rest in calls if n in ("fsync", "fdatasync") and f"<{work}/" in rest]
    assert work_syncs == []


@pytest.mark.skipif(not Strace.available(), reason="strace is not installed")
def test_volatile_ignores_caller_fsync(reltmp, daemons):
    """Kernel docs (overlayfs 'volatile mount'): all forms of sync calls to the
    upper filesystem are omitted; the kernel's ovl_fsync returns 0 at once."""
    lower, upper, work, mp = _make_strace_layers(reltmp)
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log", opts=("volatile",))
    daemons.append(d)
    d.start()
    st = Strace(d.pid, f"{reltmp}/strace.log", "fsync,fdatasync,syncfs")
    with st:
        _strace_ops(mp, lower)
    assert [c for c in st.calls() if c[0] in ("fsync", "fdatasync", "syncfs")] == []


# ---------------------------------------------------------------------------
# ENOSPC


def _tmpfs_free(path) -> int:
    v = os.statvfs(path)
    return v.f_bfree * v.f_frsize


def test_enospc_on_full_upper(reltmp, relmounts):
    lower, mp = mkdirs(reltmp, "l", "m")
    h32, _ = write_pattern_file(f"{lower}/big32", 32)
    with open(f"{lower}/small", "wb") as f:
        f.write(b"s" * 8192)
    with tmpfs(f"{reltmp}/t", "16m") as t:
        upper, work = mkdirs(t, "u", "w")
        relmounts.ours([lower], upper, work, mp)
        free0 = _tmpfs_free(t)

        # copy-up of a 32 MiB file into a 16 MiB upper
        def open_and_write():
            fd = os.open(f"{mp}/big32", os.O_WRONLY)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
        assert _errno(open_and_write) == errno.ENOSPC
        assert os.listdir(upper) == []
        assert os.listdir(f"{work}/work") == []
        assert _tmpfs_free(t) >= free0 - (64 << 10), "space of the failed copy not given back"
        assert sha1_file(f"{mp}/big32") == h32
        assert os.stat(f"{mp}/big32").st_size == 32 << 20

        # a big new file
        fd = os.open(f"{mp}/newbig", os.O_CREAT | os.O_WRONLY, 0o644)
        err = 0
        try:
            for _ in range(32):
                os.write(fd, b"n" * (1 << 20))
        except OSError as e:
            err = e.errno
        finally:
            try:
                os.close(fd)
            except OSError as e:
                err = err or e.errno
        assert err == errno.ENOSPC
        # the fs is full now: a small copy-up fails cleanly too
        assert _errno(_write_at, f"{mp}/small", b"S") == errno.ENOSPC
        assert _read(f"{mp}/small") == b"s" * 8192
        assert "small" not in os.listdir(upper)
        assert os.listdir(f"{work}/work") == []
        # space back: everything works again
        os.unlink(f"{mp}/newbig")
        _write_at(f"{mp}/small", b"S")
        assert _read(f"{mp}/small") == b"S" + b"s" * 8191
        assert _read(f"{upper}/small") == b"S" + b"s" * 8191

        relmounts.umount(mp)
        relmounts.ours([lower], upper, work, mp)
        assert os.listdir(f"{work}/work") == []
        assert sorted(os.listdir(mp)) == ["big32", "small"]
        assert sha1_file(f"{mp}/big32") == h32
        relmounts.umount(mp)


@pytest.mark.parametrize("how", ["unlink", "rename-over", "truncate"])
def test_removing_a_file_frees_its_space(reltmp, relmounts, how):
    """rm (or replacing a file by rename, or truncating it) through the
    mount gives the space back at once, as on any filesystem: the daemon
    must not keep a deleted upper file open once nothing uses it."""
    lower, mp = mkdirs(reltmp, "l", "m")
    with tmpfs(f"{reltmp}/t", "64m") as t:
        upper, work = mkdirs(t, "u", "w")
        relmounts.ours([lower], upper, work, mp)
        free0 = _tmpfs_free(t)
        with open(f"{mp}/big", "wb") as f:
            f.write(b"b" * (24 << 20))
        with open(f"{mp}/small", "wb") as f:
            f.write(b"s")
        assert _tmpfs_free(t) < free0 - (20 << 20)
        os.stat(f"{mp}/big")
        if how == "unlink":
            os.unlink(f"{mp}/big")
        elif how == "rename-over":
            os.rename(f"{mp}/small", f"{mp}/big")
        else:
            os.truncate(f"{mp}/big", 0)
        deadline = time.monotonic() + 5
        while _tmpfs_free(t) < free0 - (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _tmpfs_free(t) >= free0 - (1 << 20), \
            f"{(free0 - _tmpfs_free(t)) >> 20} MiB still used after {how}"
        relmounts.umount(mp)


def test_enospc_out_of_inodes(reltmp, relmounts):
    """No inode left for a whiteout: unlink fails with ENOSPC, the lower
    file stays visible and whole; create fails with ENOSPC too."""
    lower, mp = mkdirs(reltmp, "l", "m")
    with open(f"{lower}/f", "wb") as f:
        f.write(b"lower")
    os.mkdir(f"{lower}/d")
    with tmpfs(f"{reltmp}/t", "4m,nr_inodes=64") as t:
        upper, work, fill = mkdirs(t, "u", "w", "fill")
        relmounts.ours([lower], upper, work, mp)
        # use up every inode (directly on the tmpfs, not through the mount)
        i = 0
        while True:
            try:
                os.mkdir(f"{fill}/{i}")
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            i += 1
        assert _errno(os.unlink, f"{mp}/f") == errno.ENOSPC
        assert _read(f"{mp}/f") == b"lower"
        assert _errno(os.rmdir, f"{mp}/d") == errno.ENOSPC
        assert os.path.isdir(f"{mp}/d")
        assert _errno(os.open, f"{mp}/g", os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENOSPC
        assert _errno(os.mkdir, f"{mp}/h") == errno.ENOSPC
        assert not os.path.exists(f"{mp}/g")
        assert os.listdir(f"{work}/work") == []
        assert sorted(os.listdir(mp)) == ["d", "f"]
        assert os.listdir(upper) == []
        # inodes back: it all works
        os.rmdir(f"{fill}/0")
        os.rmdir(f"{fill}/1")
        os.unlink(f"{mp}/f")
        assert sorted(os.listdir(mp)) == ["d"]
        relmounts.umount(mp)


# ---------------------------------------------------------------------------
# EIO from a layer


@pytest.fixture
def faulty_lower(reltmp):
    """tests/faultyfs.py mounted over a source dir: read of bad* -> EIO,
    lookup of eio* -> EIO, opendir of baddir* -> EIO."""
    src, fmp = mkdirs(reltmp, "src", "faulty")
    for name, data in (("good", b"good\n"), ("bad1", b"bad\n"), ("eio1", b"eio\n"),
                       ("dir/good2", b"good2\n"), ("baddir1/x", b"x\n"),
                       ("slow1", b"slow\n")):
        os.makedirs(os.path.dirname(f"{src}/{name}"), exist_ok=True)
        with open(f"{src}/{name}", "wb") as f:
            f.write(data)
    with open(f"{reltmp}/faulty.log", "wb") as log:
        proc = subprocess.Popen([PY, os.path.join(HERE, "faultyfs.py"), src, fmp],
                                stdout=subprocess.PIPE, stderr=log, env=overlay_env())
    try:
        line = proc.stdout.readline()
        assert line.strip() == b"ready", line
        deadline = time.monotonic() + 20
        while not mountutil.is_mounted(fmp) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mountutil.is_mounted(fmp)
        yield fmp
    finally:
        mountutil.umount(fmp)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lazy_umount(fmp)


def _listdir_names_only(path):
    """readdir without stat (like ls -f)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


EIO_OPS = [
    ("read bad1", lambda m: _read(f"{m}/bad1")),
    ("copy-up bad1", lambda m: _write_at(f"{m}/bad1", b"x")),
    ("stat eio1", lambda m: os.stat(f"{m}/eio1")),
    ("list baddir1", lambda m: os.listdir(f"{m}/baddir1")),
    ("read good", lambda m: _read(f"{m}/good")),
    ("stat bad1", lambda m: os.stat(f"{m}/bad1")),
    ("list root", lambda m: _listdir_names_only(m)),
    ("list dir", lambda m: os.listdir(f"{m}/dir")),
    ("copy-up good2", lambda m: _write_at(f"{m}/dir/good2", b"G")),
    ("create new", lambda m: _write_at(f"{m}/new", b"n", flags=os.O_WRONLY | os.O_CREAT)),
]


def _run_eio_ops(mp):
    res = {}
    for name, op in EIO_OPS:
        try:
            out = op(mp)
            res[name] = ("ok", out if isinstance(out, (bytes, list)) else None)
        except OSError as e:
            res[name] = ("err", errno.errorcode.get(e.errno, e.errno))
    return res


def test_eio_from_a_lower_layer(reltmp, faulty_lower, relmounts):
    upper, work, mp = mkdirs(reltmp, "u", "w", "m")
    relmounts.ours([faulty_lower], upper, work, mp)
    ours = _run_eio_ops(mp)
    assert ours["read bad1"] == ("err", "EIO")
    assert ours["copy-up bad1"] == ("err", "EIO")
    assert ours["stat eio1"] == ("err", "EIO")
    assert ours["list baddir1"] == ("err", "EIO")
    # nothing half-copied
    assert "bad1" not in os.listdir(upper)
    assert os.listdir(f"{work}/work") == []
    # the mount keeps serving
    assert ours["read good"] == ("ok", b"good\n")
    assert ours["copy-up good2"][0] == "ok"
    assert _read(f"{mp}/dir/good2") == b"Good2\n"
    assert ours["create new"][0] == "ok"
    assert os.stat(f"{mp}/bad1").st_size == 4
    assert _read(f"{mp}/good") == b"good\n"
    # same answers as the kernel overlay on the same layer
    if mountutil._probe_kernel_overlay() is None:
        ku, kw, km = mkdirs(reltmp, "ku", "kw", "km")
        relmounts.kernel([faulty_lower], ku, kw, km)
        kernel = _run_eio_ops(km)
        assert ours == kernel


def slow_read_beside_others(mp):
    """Read mp/slow1 (answered by the slow layer after seconds) in a thread
    and, while it waits, create, stat, rename and remove files in the mount;
    returns whether the slow read was still waiting once all of them had
    been answered."""
    got = {}

    def slow():
        got["data"] = _read(f"{mp}/slow1")

    th = threading.Thread(target=slow, daemon=True)
    os.stat(f"{mp}/slow1")
    th.start()
    time.sleep(0.3)
    for i in range(40):
        p = f"{mp}/d/f{i}" if i else f"{mp}/d"
        if i:
            _write_at(p, b"x", flags=os.O_WRONLY | os.O_CREAT)
            os.stat(p)
            os.rename(p, p + ".r")
        else:
            os.mkdir(p)
    for i in range(1, 40):
        os.unlink(f"{mp}/d/f{i}.r")
    os.rmdir(f"{mp}/d")
    waiting = th.is_alive()
    th.join(30)
    assert got.get("data") == b"slow\n"
    return waiting


def test_slow_layer_read_does_not_stall_other_requests(reltmp, faulty_lower, relmounts):
    """A read waiting seconds on a slow lower layer (too small to give its
    worker's turn at /dev/fuse away) holds only its own worker: another
    takes the turn over and every other request is answered meanwhile."""
    upper, work, mp = mkdirs(reltmp, "u", "w", "m")
    relmounts.ours([faulty_lower], upper, work, mp, opts=("passthrough=off", "uring=off"))
    assert slow_read_beside_others(mp)


# ---------------------------------------------------------------------------
# exceptions in request handlers


class _RaisingCore:
    """Wraps an Overlay core; the methods in `fail` raise `exc`."""

    def __init__(self, core, fail, exc):
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "_fail", fail)
        object.__setattr__(self, "_exc", exc)

    def __getattr__(self, name):
        attr = getattr(self._core, name)
        if name in self._fail:
            def boom(*a, **kw):
                raise self._exc
            return boom
        return attr


def test_exception_in_handler_answers_eio_and_is_logged(reltmp, caplog):
    import pyfuse3
    import trio

    from overlay.fs import OverlayOperations
    from overlay_core import Overlay

    lower, upper, work = mkdirs(reltmp, "l", "u", "w")
    with open(f"{lower}/f", "w") as f:
        f.write("f")
    core = Overlay([lower], upper, work)
    try:
        ops = OverlayOperations(_RaisingCore(core, {"lookup", "getattr", "listxattr"},
                                             RuntimeError("injected")))
        for call in (lambda: ops.lookup(pyfuse3.ROOT_INODE, b"f", None),
                     lambda: ops.getattr(pyfuse3.ROOT_INODE, None),
                     lambda: ops.listxattr(pyfuse3.ROOT_INODE, None)):
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="overlay.fs"):
                with pytest.raises(pyfuse3.FUSEError) as info:
                    trio.run(call)
            assert info.value.errno == errno.EIO
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors, "the exception was not logged"
            assert errors[0].exc_info and errors[0].exc_info[0] is RuntimeError
        # the same handlers work with a sound core: nothing was left broken
        ops2 = OverlayOperations(core)
        attrs = trio.run(lambda: ops2.lookup(pyfuse3.ROOT_INODE, b"f", None))
        assert attrs.st_size == 1
        # OSError is not logged as an error, it becomes its errno
        ops3 = OverlayOperations(_RaisingCore(core, {"lookup"}, OSError(errno.ENOENT, "x")))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="overlay.fs"):
            with pytest.raises(pyfuse3.FUSEError) as info:
                trio.run(lambda: ops3.lookup(pyfuse3.ROOT_INODE, b"f", None))
        assert info.value.errno == errno.ENOENT
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        core.close()


WRAPPER = textwrap.dedent('''
    """Test wrapper: our CLI, with a core whose readlink of boom* raises."""
    import sys
    import overlay.daemon as daemon
    from overlay_core import Overlay

    class Boom(Overlay):
        # a subclass: the native engine calls the core at C level, and
        # Python overrides of its def methods still take effect
        def readlink(self, node):
            if node.name.startswith(b"boom"):
                raise RuntimeError("injected failure for " + node.name.decode())
            return super().readlink(node)

    def build(config):
        return Boom(config.lowers, config.upper, config.work, userxattr=config.userxattr,
                    redirect_dir=config.redirect_dir, no_sync=config.volatile,
                    oci_whiteouts=config.oci_whiteouts)

    daemon.build_core = build

    from overlay.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_exception_on_live_mount_keeps_serving(reltmp, daemons):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.symlink("target-ok", f"{lower}/oklink")
    os.symlink("target-boom", f"{lower}/boomlink")
    with open(f"{lower}/f", "w") as f:
        f.write("data")
    script = f"{reltmp}/wrapper.py"
    with open(script, "w") as f:
        f.write(WRAPPER)
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log", argv=[PY, script])
    daemons.append(d)
    d.start()
    for _ in range(20):
        assert _errno(os.readlink, f"{mp}/boomlink") == errno.EIO
        assert os.readlink(f"{mp}/oklink") == "target-ok"
    assert d.alive()
    assert _read(f"{mp}/f") == b"data"
    with open(f"{mp}/new", "w") as f:
        f.write("still serving")
    assert _read(f"{upper}/new") == b"still serving"
    log = d.log_text()
    assert log.count("unexpected error in request handler") >= 1
    assert "RuntimeError: injected failure for boomlink" in log
    assert run_overlay("umount", mp).returncode == 0
    assert d.wait(30) == 0
    assert not mountutil.is_mounted(mp)


# ---------------------------------------------------------------------------
# clean shutdown


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "umount", "overlay-umount"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "open-files"])
def test_daemon_ends_cleanly(reltmp, daemons, how, busy):
    """With files open, a signal makes the daemon detach the mount (lazily)
    and exit at once; a lazy umount leaves it serving the open files until
    they are closed (the kernel keeps the connection), then it exits."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    with open(f"{lower}/f", "w") as f:
        f.write("data")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log")
    daemons.append(d)
    d.start()
    held = []
    if busy:
        held.append(os.open(f"{mp}/f", os.O_RDONLY))
        held.append(os.open(f"{mp}/w", os.O_CREAT | os.O_WRONLY, 0o644))
        os.write(held[-1], b"written")
    try:
        if how.startswith("SIG"):
            d.proc.send_signal(getattr(signal, how))
        elif how == "umount":
            cmd = ["umount", "-l", mp] if busy else ["umount", mp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        else:
            r = run_overlay("umount", *(["-l"] if busy else []), mp)
            assert r.returncode == 0, r.stderr
        if busy and not how.startswith("SIG"):
            # detached, but the open files are still served
            assert not mountutil.is_mounted(mp)
            time.sleep(0.3)
            assert d.alive()
            assert os.pread(held[0], 10, 0) == b"data"
            os.write(held[1], b" more")
    finally:
        for fd in held:
            try:
                os.close(fd)
            except OSError:
                pass
    rc = d.wait(30)
    assert rc == 0, d.log_text()
    assert not mountutil.is_mounted(mp)
    assert "Traceback" not in d.log_text()
    if busy:
        assert _read(f"{upper}/w") in (b"written", b"written more")
    assert os.listdir(f"{work}/work") == []


def test_background_daemon_ends_on_umount_and_sigterm(reltmp):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    opts = mountutil.overlay_option_string([lower], upper, work)
    log = f"{reltmp}/bg.log"
    try:
        for how in ("overlay-umount", "SIGTERM"):
            r = run_overlay("mount", "--log", log, "-o", opts, mp)
            assert r.returncode == 0, r.stderr
            pid = find_daemon_pid(mp)
            if how == "SIGTERM":
                os.kill(pid, signal.SIGTERM)
            else:
                assert run_overlay("umount", mp).returncode == 0
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} still running after {how}"
            assert not mountutil.is_mounted(mp)
        text = open(log).read()
        assert text.count(f"{mp} unmounted") == 2, text
        assert "ERROR" not in text and "Traceback" not in text
    finally:
        mountutil.umount(mp)
