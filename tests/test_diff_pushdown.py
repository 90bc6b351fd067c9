"""Push-down: a stack remounted again and again with its previous upper
pushed down as the top lower layer, kernel overlay vs ours, at every step.

Each rotation mounts ``lowerdir=U(r-1):...:U0:L...`` with a fresh upper
U(r), applies random ops weighted towards what crosses layers (renames of
dirs and files, hard links, copy-ups), compares every result and the whole
trees, unmounts, compares the two upper dirs, mounts each side's stack by the
other (the kernel over ours, ours over the kernel's: same tree, same
st_ino); the next rotation then also compares, path by path, which st_ino
survived the push-down on each side.
The fixed scenario is the data loss that started it: a dir moved twice
across two push-downs (a redirect in a lower layer followed through the
redirects of the layers below it).
"""

import os
import random

import pytest

import mountutil
from difftest import layers as L
from difftest import ops as O
from difftest import tolerate
from difftest.layers import dir as d
from difftest.layers import file
from difftest.pair import DiffPair
from difftest.snapshot import diff_snapshots, snapshot_mount

ROTATIONS = int(os.environ.get("DIFF_ROTATIONS", "10"))
OPS_PER_ROTATION = int(os.environ.get("DIFF_ROTATION_OPS", "25"))
SEEDS = [int(s) for s in os.environ.get("DIFF_PUSHDOWN_SEEDS", "1,2,3").split(",") if s]

# across-layer work: renames (dirs get redirects), links, copy-ups, deletes
WEIGHTS = dict(O.OP_WEIGHTS)
WEIGHTS.update({"rename": 22, "rename_exchange": 6, "link": 10, "mkdir": 8, "append": 6,
                "chmod": 5, "rmtree": 3, "unlink": 6})
for _k in O.EXTENDED_OPS:
    WEIGHTS.pop(_k, None)


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def _push_down(pair, r):
    """The upper of both sides becomes their top lower; new upper and work."""
    for side, built in (("k", pair.built_k), ("o", pair.built_o)):
        built.lowers = [built.upper] + built.lowers
        built.upper = os.path.join(pair.tmp, side, f"u{r}")
        built.work = os.path.join(pair.tmp, side, f"w{r}")
        os.makedirs(built.upper)
        os.makedirs(built.work)


def _kept(before, after):
    """Paths whose st_ino is the same after the push-down."""
    return {p for p, ino in before.items() if after.get(p) == ino}


def _rotate(pair, r, prev):
    """Mount rotation r; compare st_ino survival with the previous one."""
    if r:
        _push_down(pair, r)
    pair.mount()
    sk, so = pair.check_trees(f"rotation {r} mounted")
    if prev is not None:
        kept_k = _kept(prev[0].inos, sk.inos)
        kept_o = _kept(prev[1].inos, so.inos)
        if kept_k != kept_o:
            pair.fail(f"rotation {r}: st_ino kept across the push-down differ",
                      [f"kept by the kernel only: {sorted(kept_k - kept_o)}",
                       f"kept by ours only: {sorted(kept_o - kept_k)}"])
    return sk, so


def _finish_rotation(pair, r):
    """Compare, unmount, compare the uppers, then mount each side's stack
    by the other (the kernel over ours, ours over the kernel's): the same
    tree and, the dirs being the same, the same st_ino."""
    sk, so = pair.check_trees(f"rotation {r} end")
    pair.umount()
    pair.check_uppers()
    ref_k, ref_o = sk, so
    if pair.remount_reference_kernel:
        # nfs_export: the trees change across a remount (see DiffPair): the
        # reference is each side's own stack mounted again
        ref_k = _snapshot_mounted(pair, "kernel", pair.built_k, pair.mp_k, pair.kernel_opts)
        ref_o = _snapshot_mounted(pair, "ours", pair.built_o, pair.mp_o, pair.ours_opts)
    for who, built, mp, want in (("kernel", pair.built_o, pair.mp_o, ref_o),
                                 ("ours", pair.built_k, pair.mp_k, ref_k)):
        opts = pair.kernel_opts if who == "kernel" else pair.ours_opts
        getattr(pair.tracker, who)(built.lowers, built.upper, built.work, mp, opts)
        try:
            other = snapshot_mount(mp, pair.compare_blocks)
            diff = diff_snapshots(ref_k, other, "kernel-side", f"{who}-over-the-other-stack")
            diff += [f"/{p}: {want.inos.get(p)} there, {other.inos.get(p)} here"
                     for p in sorted(set(want.inos) | set(other.inos))
                     if want.inos.get(p) != other.inos.get(p)]
            if diff:
                pair.fail(f"rotation {r}: {who} over the other side's stack differs", diff)
        finally:
            pair.tracker.umount(mp)
    return sk, so


def _snapshot_mounted(pair, who, built, mp, opts):
    """A snapshot of built's stack mounted by who (kernel or ours)."""
    getattr(pair.tracker, who)(built.lowers, built.upper, built.work, mp, opts)
    try:
        return snapshot_mount(mp, pair.compare_blocks)
    finally:
        pair.tracker.umount(mp)


INDEX_SEEDS = SEEDS[: int(os.environ.get("DIFF_PUSHDOWN_INDEX_SEEDS", "2"))]
METACOPY_SEEDS = SEEDS[: int(os.environ.get("DIFF_PUSHDOWN_METACOPY_SEEDS", "2"))]
NFS_EXPORT_SEEDS = SEEDS[: int(os.environ.get("DIFF_PUSHDOWN_NFS_EXPORT_SEEDS", "1"))]
METACOPY_INDEX_SEEDS = SEEDS[: int(os.environ.get("DIFF_PUSHDOWN_METACOPY_INDEX_SEEDS", "1"))]
MODE_OPTS = {"": (), "index": ("index=on",), "metacopy": ("metacopy=on",),
             "nfs_export": ("nfs_export=on",), "metacopy-index": ("metacopy=on", "index=on")}
CASES = ([(s, "") for s in SEEDS] + [(s, "index") for s in INDEX_SEEDS]
         + [(s, "metacopy") for s in METACOPY_SEEDS] + [(s, "nfs_export") for s in NFS_EXPORT_SEEDS]
         + [(s, "metacopy-index") for s in METACOPY_INDEX_SEEDS])


@pytest.mark.parametrize("seed,mode", CASES, ids=[f"seed{s}" + (f"-{m}" if m else "") for s, m in CASES])
def test_pushdown_rotations(seed, mode, difftmp, mounts):
    """With index=on (both sides) the pushed-down uppers hold indexed copies
    whose names were linked up in some rotations and not in others; with
    metacopy=on they hold metacopy files (chains of them, through
    redirects, across the rotations) whose data are layers below; with
    nfs_export=on every copy-up of each rotation was indexed (its files
    have a link more, in the index of a work dir now gone from the stack);
    with metacopy=on and index=on, metacopy files that are hard links."""
    rng = random.Random(seed)
    stack = L.gen_stack(rng, nlowers=2, upper=False, no_hardlinks=tolerate.on("lower-hardlinks"))
    label = (f"pushdown seed={seed} mode={mode or 'default'}; rerun: DIFF_PUSHDOWN_SEEDS={seed} "
             f"python -m pytest tests/test_diff_pushdown.py -k rotations")
    pair = DiffPair(os.path.join(difftmp, "p"), stack, mounts, label=label,
                    kernel_opts=("redirect_dir=on",) + MODE_OPTS[mode], ours_opts=MODE_OPTS[mode])
    os.makedirs(pair.tmp)
    pair.build()
    gen = O.OpGenerator(rng, extra_names=L.all_names(stack), weights=WEIGHTS,
                        resolve_root=pair.mp_k, safe_setxattr=tolerate.on("no-failing-setxattr"))
    prev = None
    for r in range(ROTATIONS):
        _rotate(pair, r, prev)
        tree = O.list_tree(pair.mp_k)
        for _ in range(OPS_PER_ROTATION):
            op = gen.next(tree)
            pair.op(op)
            if op[0] in O.MUTATING:
                tree = O.list_tree(pair.mp_k)
        prev = _finish_rotation(pair, r)


def _fixed_pair(difftmp, mounts, label, lower):
    """A built (not mounted) pair over one hand-written lower layer."""
    stack = L.Stack(lowers=[lower], upper=[], prefix=L.TRUSTED_PREFIX, has_upper=True)
    pair = DiffPair(os.path.join(difftmp, "p"), stack, mounts, label=label,
                    kernel_opts=("redirect_dir=on",))
    os.makedirs(pair.tmp)
    return pair.build()


def test_pushdown_nested_redirect(difftmp, mounts):
    """A populated lower dir moved under another, pushed down, its subdir
    moved out, pushed down again: the subdir keeps its files (found through
    the redirect of the middle layer's dir on the way), st_ino as the kernel."""
    pair = _fixed_pair(difftmp, mounts, "pushdown nested redirect",
                       [d("a"), d("a/dir"), d("a/dir/pop"), file("a/dir/pop/f1", b"one"),
                        file("a/dir/t", b"top"), d("a/empty")])
    prev = _rotate(pair, 0, None)
    pair.op(("rename", "a/dir", "a/empty/dir", 0), expect="ok")
    prev = _finish_rotation(pair, 0)
    _rotate(pair, 1, prev)
    pair.op(("rename", "a/empty/dir/pop", "a/empty/pop", 0), expect="ok")
    prev = _finish_rotation(pair, 1)
    sk, so = _rotate(pair, 2, prev)
    assert sk.entries["a/empty/pop/f1"]["sha"] == so.entries["a/empty/pop/f1"]["sha"]
    assert "a/empty/dir/t" in so.entries and "a/empty/dir/pop" not in so.entries
    pair.op(("read", "a/empty/pop/f1"), expect="ok")
    _finish_rotation(pair, 2)


def test_pushdown_redirect_below_opaque_dir(difftmp, mounts):
    """A moved dir whose redirect leads through an opaque dir of a middle
    layer to a dir that itself was moved (absolute redirect): the kernel
    goes on below the opaque dir (found by the random rotations, seed 38)."""
    pair = _fixed_pair(difftmp, mounts, "pushdown redirect below opaque",
                       [d("a"), file("a/f", b"one"), d("b")])
    prev = _rotate(pair, 0, None)
    pair.op(("mkdir", "b/x", 0o755), expect="ok")        # opaque: its parent is merged
    pair.op(("rename", "a", "b/x/h", 0), expect="ok")    # redirect /a
    prev = _finish_rotation(pair, 0)
    _rotate(pair, 1, prev)
    pair.op(("mkdir", "b/c", 0o755), expect="ok")
    pair.op(("rename", "b/x/h", "b/c/x", 0), expect="ok")  # redirect /b/x/h, through opaque b/x
    prev = _finish_rotation(pair, 1)
    sk, so = _rotate(pair, 2, prev)
    assert sk.entries["b/c/x/f"]["sha"] == so.entries["b/c/x/f"]["sha"]
    _finish_rotation(pair, 2)
