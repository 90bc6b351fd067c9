"""FUSE over io_uring (uring=auto|on|off): the requests go through the rings,
and what the engine does through /dev/fuse it does through them too.

The rest of the suite runs in whichever mode the machine gives (auto: the
rings where /sys/module/fuse/parameters/enable_uring is on, which it is not
after a boot); here it is switched on for the module (and put back as it
was), and the engine tests that matter most for a transport (long work
beside short requests, SIGKILL, unmount in flight, killed callers, a model
checked under load, setid clearing, a differential subset) run again.
"""

import os
import subprocess
import sys

import pytest

import mountutil
from overlay.stats import read_stats
from relutil import Daemon, mkdirs, relmounts, reltmp  # noqa: F401  (fixtures)
from test_engine import _wait, daemons  # noqa: F401  (fixture)
from test_engine import test_clean_unmount_with_requests_in_flight as _unmount_in_flight
from test_engine import test_long_copy_up_does_not_stall_other_requests as _no_stall
from test_engine import test_opener_killed_during_its_copy_up as _opener_killed
from test_engine import test_reader_killed_mid_read as _reader_killed
from test_engine import test_setid_bits_cleared_like_the_kernel as _setid
from test_engine import test_sigkill_leaves_no_dead_mount as _sigkill
from test_engine import test_write_right_after_read_of_lower_files as _write_after_read
from test_stress import run_fsx

PARAM = "/sys/module/fuse/parameters/enable_uring"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _param():
    try:
        with open(PARAM) as f:
            return f.read().strip()
    except OSError:
        return None


def _set(value):
    with open(PARAM, "w") as f:
        f.write(value)


@pytest.fixture(autouse=True, scope="module")
def uring_on():
    """enable_uring on for this module, as it was afterwards."""
    mountutil.require_root()
    mountutil.require_fuse()
    was = _param()
    if was is None:
        pytest.skip("this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING)")
    _set("Y")
    try:
        yield
    finally:
        _set(was)


def _ring_threads(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(n for n in names if n.startswith("fuse-ring-"))


def _cpus():
    from overlay.engine.wire import possible_cpus

    return possible_cpus()


def test_requests_go_through_the_rings(reltmp, daemons):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    for i in range(20):
        with open(f"{lower}/f{i}", "w") as f:
            f.write(f"lower {i}")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log", opts=("uring=on",))
    daemons.append(d)
    d.start()
    for i in range(20):
        assert open(f"{mp}/f{i}").read() == f"lower {i}"
        with open(f"{mp}/n{i}", "w") as f:
            f.write("new")
        os.chmod(f"{mp}/f{i}", 0o600)
    os.mkdir(f"{mp}/d")
    os.rename(f"{mp}/n0", f"{mp}/d/n0")
    os.unlink(f"{mp}/n1")
    st = read_stats(mp)
    assert st["uring"] is not None, st
    assert st["uring"]["queues"] == _cpus()
    assert st["uring"]["requests"] > 100, st["uring"]
    # one thread a queue, each on its CPU
    assert _ring_threads(d.pid) == sorted(f"fuse-ring-{q}" for q in range(_cpus()))
    assert "FUSE over io_uring: " in d.log_text()
    assert sorted(os.listdir(upper)) == sorted(["d", "f0"] + [f"f{i}" for i in range(1, 20)]
                                               + [f"n{i}" for i in range(2, 20)])


def test_auto_follows_the_kernel_switch_and_on_turns_it_on(reltmp, daemons):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    try:
        _set("N")
        d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/auto.log")
        daemons.append(d)
        d.start()
        os.listdir(mp)
        assert read_stats(mp)["uring"] is None      # auto, switched off: /dev/fuse
        assert _ring_threads(d.pid) == []
        d.stop()
        # uring=on: as root it switches the kernel's parameter on, and says so
        d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/on.log", opts=("uring=on",))
        daemons.append(d)
        d.start()
        os.listdir(mp)
        assert _param() == "Y"
        assert read_stats(mp)["uring"]["requests"] > 0
        assert "switched FUSE over io_uring on" in d.log_text()
        d.stop()
        # uring=off: /dev/fuse, the switch on or not
        d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/off.log", opts=("uring=off",))
        daemons.append(d)
        d.start()
        os.listdir(mp)
        assert read_stats(mp)["uring"] is None
    finally:
        _set("Y")


def test_queue_depth_option(reltmp, daemons):
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log",
                          opts=("uring=on", "uring_depth=2"))
    daemons.append(d)
    d.start()
    # more callers at once than entries: they wait for one, none is lost
    procs = [subprocess.Popen([sys.executable, "-c",
                               f"import os\nfor i in range(200):\n"
                               f"    open('{mp}/p{k}_%d' % i, 'w').write('x')\n"
                               f"    os.stat('{mp}/p{k}_%d' % i)"]) for k in range(6)]
    assert all(p.wait(120) == 0 for p in procs)
    assert len(os.listdir(upper)) == 1200
    assert read_stats(mp)["uring"]["depth"] == 2


@pytest.mark.parametrize("metacopy", [False, True], ids=["copy-up", "metacopy-data-copy-up"])
def test_long_copy_up_does_not_stall_other_requests(reltmp, relmounts, metacopy):
    """A handler in long work gives its queue's ring to another thread."""
    _no_stall(reltmp, relmounts, metacopy)


@pytest.mark.parametrize("method", ["mount", "fusermount3"])
def test_sigkill_leaves_no_dead_mount(reltmp, daemons, method):
    _sigkill(reltmp, daemons, method)


def test_clean_unmount_with_requests_in_flight(reltmp, daemons):
    _unmount_in_flight(reltmp, daemons)


def test_reader_killed_mid_read(reltmp, daemons):
    _reader_killed(reltmp, daemons)


def test_opener_killed_during_its_copy_up(reltmp, daemons):
    _opener_killed(reltmp, daemons)


def test_write_right_after_read_of_lower_files(reltmp, relmounts):
    _write_after_read(reltmp, relmounts)


@pytest.mark.parametrize("opts", [(), ("passthrough=off",)], ids=["defaults", "no-passthrough"])
def test_setid_bits_cleared_like_the_kernel(reltmp, relmounts, opts):
    _setid(reltmp, relmounts, opts)


@pytest.mark.parametrize("opts", [("workers=4",), ("passthrough=off", "timeout=0")],
                         ids=["defaults", "no-passthrough-nocache"])
def test_hammer_through_the_rings(reltmp, relmounts, opts):
    """8 fsx-like processes, a model checked after every op."""
    figures = run_fsx(reltmp, 8, nworkers=8, tracker=relmounts, opts=opts + ("uring=on",))
    assert figures["ops"] > 1000 and figures["mismatches"] == 0


def test_differential_subset_through_the_rings():
    """Random differential runs (seeds 0-3) against the kernel overlay, every
    mount of ours made with uring=on."""
    mountutil.require_kernel_overlay()
    env = dict(os.environ, OVERLAY_TEST_OPTS="uring=on", DIFF_SEEDS="0-3", DIFF_EXTRA_SEEDS="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "tests/test_diff_random.py"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_ring_given_up_during_long_work_comes_back(reltmp, daemons):
    """After long work (here fsyncs of a big file) the extra thread of a
    queue waits for the ring; requests keep being answered by the rings."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log", opts=("uring=on",))
    daemons.append(d)
    d.start()
    fd = os.open(f"{mp}/big", os.O_CREAT | os.O_WRONLY, 0o644)
    for _ in range(5):
        os.write(fd, b"x" * (1 << 20))
        os.fsync(fd)
    os.close(fd)
    before = read_stats(mp)["uring"]
    for i in range(50):
        os.stat(f"{mp}/big")
        open(f"{mp}/s{i}", "w").close()
    after = read_stats(mp)["uring"]
    assert after["requests"] > before["requests"] + 50
    assert after["threads"] >= _cpus()
