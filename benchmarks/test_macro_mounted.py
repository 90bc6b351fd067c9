"""Mounted macro-benchmarks (pytest-benchmark): every workload of
``benchmarks/macro.py`` on the kernel overlay, fuse-overlayfs and ours, on the
same data.

Run with ``.venv/bin/python -m pytest benchmarks/test_macro_mounted.py --benchmark-only``
(as root). ``BENCH_QUICK=1`` uses the small ``--quick`` sizes,
``BENCH_ROUNDS=N`` sets the rounds (default 3), ``BENCH_SYSTEMS=ours,kernel``
picks systems. Tests are grouped per metric (``--benchmark-group-by=group``
is the default), so pytest-benchmark's table compares the three systems
directly. For medians, ratios and targets over interleaved runs use the
comparison runner instead (``python -m benchmarks.compare``).

Fresh rounds get a new mount and dropped caches in the (untimed) setup; warm
rounds run on one mount after an untimed warm-up run; write rounds get a new
mount with an empty upper dir each. Mount time is measured with warm caches
(as in the runner).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from . import macro
from .systems import ORDER, SYSTEMS, Missing

SIZES = macro.QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else macro.FULL
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PICK = [s for s in os.environ.get("BENCH_SYSTEMS", ",".join(ORDER)).split(",") if s]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounted benchmarks need root")


@pytest.fixture(scope="session")
def bench():
    scratch = tempfile.mkdtemp(prefix="bench-run-", dir="/tmp")
    b = macro.Bench(SIZES, os.environ.get("BENCH_DATA", "/tmp/bench-data"), scratch)
    b.prepare()
    yield b
    shutil.rmtree(scratch, ignore_errors=True)


_available: dict[str, str | None] = {}


def system_or_skip(name: str):
    if name not in PICK:
        pytest.skip(f"{name}: not in BENCH_SYSTEMS")
    if name not in _available:
        _available[name] = SYSTEMS[name].missing_reason()
    if _available[name]:
        pytest.skip(f"{name}: missing ({_available[name]})")
    return SYSTEMS[name]


class Mounts:
    """Mount/unmount on demand around pedantic rounds."""

    def __init__(self, bench, system, lowers, base=None):
        self.bench, self.system, self.lowers, self.base = bench, system, lowers, base
        self.stack = contextlib.ExitStack()
        self.mp = None

    def remount(self, fresh=True):
        self.close()
        self.mp = self.stack.enter_context(
            self.bench.mounted(self.system, self.lowers, base=self.base, fresh=fresh))
        return self.mp

    def close(self):
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self.mp = None


def _run(benchmark, bench, system_name, group, lowers, op, *, warm=False, fresh=True, base=None):
    """op(mp) -> None is timed per round (the measured part)."""
    system = system_or_skip(system_name)
    benchmark.group = group
    m = Mounts(bench, system, lowers, base)
    try:
        if warm:
            try:
                mp = m.remount(fresh=False)
            except Missing as e:
                pytest.skip(f"{system_name}: missing ({e})")
            op(mp)
            benchmark.pedantic(op, args=(mp,), rounds=ROUNDS, iterations=1)
        else:
            def setup():
                try:
                    return (m.remount(fresh=fresh),), {}
                except Missing as e:
                    pytest.skip(f"{system_name}: missing ({e})")
            benchmark.pedantic(op, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        m.close()


SYS = pytest.mark.parametrize("system", ORDER)


@SYS
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
@pytest.mark.parametrize("cmd", ["find", "ls-lR"])
def test_tree_walk(benchmark, bench, system, cmd, warm):
    op = macro.op_find if cmd == "find" else macro.op_ls_lR
    _run(benchmark, bench, system, f"tree {cmd} {'warm' if warm else 'fresh'}",
         bench.tree.layers, op, warm=warm)


@SYS
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_tree_stat(benchmark, bench, system, warm):
    paths = bench._stat_paths
    _run(benchmark, bench, system, f"tree stat {'warm' if warm else 'fresh'}", bench.tree.layers,
         lambda mp: macro.op_stat([os.path.join(mp, p) for p in paths]), warm=warm)


@SYS
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_big_read(benchmark, bench, system, warm):
    _run(benchmark, bench, system, f"big read {'warm' if warm else 'fresh'}", [bench.big.layer],
         lambda mp: macro.op_read(os.path.join(mp, bench.big.name)), warm=warm)


@SYS
def test_big_write(benchmark, bench, system):
    _run(benchmark, bench, system, "big write new", [bench.big.layer],
         lambda mp: macro.op_write(os.path.join(mp, "new.bin"), bench.sizes.big), fresh=False)


@SYS
def test_big_copy_up(benchmark, bench, system):
    _run(benchmark, bench, system, "big copy-up", [bench.big.layer],
         lambda mp: macro.op_first_write(os.path.join(mp, bench.big.name)))


@SYS
def test_create_files(benchmark, bench, system):
    _run(benchmark, bench, system, "create 4 KiB files", [bench.big.layer],
         lambda mp: macro.op_create(os.path.join(mp, "created"), bench.sizes.create), fresh=False)


@SYS
def test_untar(benchmark, bench, system):
    _run(benchmark, bench, system, "untar", [bench.big.layer],
         lambda mp: macro.op_untar(bench.tar.path, os.path.join(mp, "extracted")), fresh=False)


@SYS
@pytest.mark.parametrize("n", SIZES.stacks)
def test_stat_bottom_of_stack(benchmark, bench, system, n):
    st = bench.stacks[n]
    _run(benchmark, bench, system, f"stat bottom of {n} layers", st.layers,
         lambda mp: macro.op_stat([os.path.join(mp, p) for p in st.bottom_files]), base=st.base)


@SYS
def test_mount_many_layers(benchmark, bench, system):
    sysobj = system_or_skip(system)
    n = SIZES.mount_layers
    st = bench.stacks[n]
    root = os.path.join(bench.scratch, "mount-" + system)
    mp, upper, work = (os.path.join(root, x) for x in ("mnt", "upper", "work"))
    os.makedirs(mp, exist_ok=True)

    def setup():
        if os.path.ismount(mp):
            sysobj.umount(mp)
        for d in (upper, work):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        return (), {}

    def mount():
        sysobj.mount(st.layers, upper, work, mp, base=st.base)

    benchmark.group = f"mount {n} layers"
    try:
        setup()
        try:
            mount()     # warm-up; also finds the kernel's option limit
        except Missing as e:
            pytest.skip(f"{system}: missing ({e})")
        benchmark.pedantic(mount, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        if os.path.ismount(mp):
            sysobj.umount(mp)
        shutil.rmtree(root, ignore_errors=True)
