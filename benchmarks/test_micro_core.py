"""Micro-benchmarks of the Cython core (``overlay_core.Overlay``), no mount.

Run with ``.venv/bin/python -m pytest benchmarks/test_micro_core.py --benchmark-only``.

* ``test_overlay_open``: building an ``Overlay`` over 1/10/100/500 layers
  (what a mount pays before serving).
* ``test_resolve_cold``: resolving ``a/b/c/file`` (directories in every
  layer, the file only in the bottom one) on a new ``Overlay`` each round
  (built in the untimed setup), so no Node is known yet.
* ``test_resolve_cached``: the same walk repeated through the same, remembered
  Node objects (what the core can reuse between lookups).
* ``test_merge_list_names`` / ``test_merge_readdir``: a directory of 10,000
  visible entries over 5 layers with 800 whiteouts.
* ``test_copy_up_1g``: ``copy_up`` of a 1 GiB lower file, on ext4 (``/tmp``,
  no reflink) and on an XFS loop image made with ``reflink=1`` (root and
  mkfs.xfs needed, else skipped). The reflink case runs first: the core
  remembers per process that FICLONE failed once (``_reflink_broken`` in
  ``_sys.pxi``) and would not try it again after the ext4 case.
  ``extra_info["reflinked"]`` says whether the copy shared the extents
  (free space hardly changed).

Data live under ``/tmp/bench-micro`` (kept for the next run; the XFS image is
removed at the end).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from . import data

overlay_core = pytest.importorskip("overlay_core")
Overlay = overlay_core.Overlay

BASE = os.environ.get("BENCH_MICRO_DIR", "/tmp/bench-micro")
LAYERS = [1, 10, 100, 500]
GIB = 1 << 30
COPY_SIZE = int(os.environ.get("BENCH_COPY_MIB", "1024")) << 20


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _walk(ov, comps):
    node = ov.root
    for c in comps:
        node = ov.lookup(node, c)
    return node


@pytest.fixture(scope="module")
def stacks():
    return {n: data.deep_stack(os.path.join(BASE, f"deep-{n}"), n) for n in LAYERS}


@pytest.mark.parametrize("n", LAYERS)
def test_overlay_open(benchmark, stacks, n):
    st = stacks[n]

    def build():
        ov = Overlay(st.layers)
        ov.close()

    benchmark.group = "overlay-open"
    benchmark.pedantic(build, rounds=20 if n < 500 else 10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", LAYERS)
def test_resolve_cold(benchmark, stacks, n):
    st = stacks[n]
    made = []

    def setup():
        while made:
            made.pop().close()
        ov = Overlay(st.layers)
        made.append(ov)
        return (ov,), {}

    def walk(ov):
        return _walk(ov, st.path)

    benchmark.group = "resolve-cold"
    benchmark.extra_info["layers"] = n
    node = benchmark.pedantic(walk, setup=setup, rounds=30 if n < 500 else 10, iterations=1)
    assert node.lowers[0][0] == n - 1
    while made:
        made.pop().close()


@pytest.mark.parametrize("n", LAYERS)
def test_resolve_cached(benchmark, stacks, n):
    st = stacks[n]
    ov = Overlay(st.layers)
    try:
        node = ov.root
        for c in st.path:
            node = ov.lookup(node, c)
            ov.remember(node)
        benchmark.group = "resolve-cached"
        benchmark.extra_info["layers"] = n
        again = benchmark(_walk, ov, st.path)
        assert again is node
    finally:
        ov.close()


@pytest.fixture(scope="module")
def merge():
    return data.merge_dir(os.path.join(BASE, "merge"))


def test_merge_list_names(benchmark, merge):
    ov = Overlay(merge.layers)
    try:
        node = ov.lookup(ov.root, merge.name)
        benchmark.group = "merge-10k"
        benchmark.extra_info.update(visible=merge.visible, whiteouts=merge.whiteouts)
        names = benchmark.pedantic(ov.list_names, args=(node,), rounds=10, iterations=1,
                                   warmup_rounds=1)
        assert len(names) == merge.visible
    finally:
        ov.close()


def test_merge_readdir(benchmark, merge):
    ov = Overlay(merge.layers)
    try:
        node = ov.lookup(ov.root, merge.name)
        benchmark.group = "merge-10k"
        benchmark.extra_info.update(visible=merge.visible, whiteouts=merge.whiteouts)
        def listing():
            # count only: keeping a round's 10,000 Nodes (each with an O_PATH
            # fd) alive during the next round could run out of descriptors
            return sum(1 for _, n in ov.readdir(node) if not n.ghost)

        visible = benchmark.pedantic(listing, rounds=5, iterations=1, warmup_rounds=1)
        assert visible == merge.visible
    finally:
        ov.close()


# ----------------------------------------------------------------- copy-up

def _xfs_reflink_dir():
    """Mount a sparse XFS image with reflink=1 under BASE/xfs; yields the
    mount point, or skips with the reason."""
    if os.geteuid() != 0:
        pytest.skip("reflink case: needs root (loop mount)")
    mkfs = shutil.which("mkfs.xfs") or shutil.which("mkfs.btrfs")
    if mkfs is None:
        pytest.skip("reflink case: neither mkfs.xfs (xfsprogs) nor mkfs.btrfs (btrfs-progs) installed")
    img = os.path.join(BASE, "reflink.img")
    mp = os.path.join(BASE, "reflink")
    os.makedirs(mp, exist_ok=True)
    if os.path.ismount(mp):
        subprocess.run(["umount", mp], check=False)
    with open(img, "wb") as fh:
        fh.truncate(max(4 * GIB, 3 * COPY_SIZE))
    if mkfs.endswith("xfs"):
        cmd = [mkfs, "-q", "-f", "-m", "reflink=1", img]
    else:
        cmd = [mkfs, "-q", "-f", img]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(img)
        pytest.skip(f"reflink case: {os.path.basename(mkfs)} failed: {r.stderr.strip()}")
    r = subprocess.run(["mount", "-o", "loop", img, mp], capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(img)
        pytest.skip(f"reflink case: loop mount failed: {r.stderr.strip()}")
    return img, mp


@pytest.fixture(scope="module")
def reflink_fs():
    img, mp = _xfs_reflink_dir()
    try:
        yield mp
    finally:
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], check=False)
        os.unlink(img)


def _copy_up_bench(benchmark, root: str, lower: str, name: str):
    upper, work = os.path.join(root, "upper"), os.path.join(root, "work")
    made = []

    def setup():
        while made:
            made.pop().close()
        _fresh(upper)
        _fresh(work)
        os.sync()
        ov = Overlay([lower], upper, work)
        made.append(ov)
        node = ov.lookup(ov.root, os.fsencode(name))
        return (ov, node), {}

    free = []

    def copy(ov, node):
        free.append(os.statvfs(upper))
        ov.copy_up(node)
        free.append(os.statvfs(upper))

    benchmark.group = "copy-up-1g"
    benchmark.pedantic(copy, setup=setup, rounds=3, iterations=1)
    before, after = free[-2], free[-1]
    used = (before.f_bfree - after.f_bfree) * before.f_frsize
    benchmark.extra_info["bytes"] = COPY_SIZE
    benchmark.extra_info["reflinked"] = used < COPY_SIZE // 4
    assert os.path.getsize(os.path.join(upper, name)) == COPY_SIZE
    while made:
        made.pop().close()
    shutil.rmtree(upper, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return used


def test_copy_up_1g_reflink(benchmark, reflink_fs):
    big = data.big_file(os.path.join(reflink_fs, "big"), COPY_SIZE)
    _copy_up_bench(benchmark, reflink_fs, big.layer, big.name)


def test_copy_up_1g_ext4(benchmark):
    big = data.big_file(os.path.join("/tmp/bench-data", f"big-{COPY_SIZE}"), COPY_SIZE)
    root = _fresh(os.path.join(BASE, "copy-ext4"))
    try:
        _copy_up_bench(benchmark, root, big.layer, big.name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
