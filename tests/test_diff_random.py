"""Randomised differential tests: kernel overlayfs vs ours on seeded random stacks.

For each seed: a random stack (1-4 lower layers with files, dirs, symlinks,
hardlinks, fifos, devices, xattrs, whiteouts and opaque dirs, sometimes a
pre-populated upper) is built twice; the kernel overlay (``redirect_dir=on``,
since ours always renames dirs with redirects) is mounted on one copy and
ours on the other; a seeded random op sequence is applied to both and every
result is compared; whole trees are compared every ``DIFF_CHECK_EVERY`` ops
and at the end; then both are unmounted, the upper dirs compared, ours
remounted (same tree, same st_ino) and the kernel mounted over our upper.
Part of the seeds also run with ``-o userxattr`` (user.overlay.* metadata) and
read-only (no upper: every write gives EROFS, lookups through the stack).

Environment:

* ``DIFF_SEEDS``: seeds to run, e.g. ``17``, ``0-199``, ``3,8,10-12``
  (default ``0-199``);
* ``DIFF_OPS``: ops per seed (default 40);
* ``DIFF_CHECK_EVERY``: whole-tree compare period (default 10);
* ``DIFF_EXTRA_SEEDS``: how many of the seeds also run in ``userxattr`` mode
  and read-only (default 40);
* ``DIFF_IMPL=kernel``: run kernel vs kernel (proves the harness);
* ``DIFF_KEEP=1``: keep the temp dirs (unmounted) for inspection;
* ``DIFF_TOLERATE=...``: mask known differences (see difftest/tolerate.py;
  the default masks only what the README documents; ``none`` = strict).

Reproduce a failure: ``DIFF_SEEDS=<seed> python -m pytest tests/test_diff_random.py``.
"""

import os
import random

import pytest

import mountutil
from difftest import layers as L
from difftest import ops as O
from difftest import tolerate
from difftest.pair import DiffPair


def parse_seeds(spec: str):
    seeds = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    return seeds


SEEDS = parse_seeds(os.environ.get("DIFF_SEEDS", "0-199"))
NOPS = int(os.environ.get("DIFF_OPS", "40"))
CHECK_EVERY = int(os.environ.get("DIFF_CHECK_EVERY", "10"))


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def run_seed(seed, tmp, tracker, nops=NOPS, nlowers=None, label=None, mode="rw"):
    """mode: "rw" (trusted.overlay.*, kernel redirect_dir=on), "userxattr"
    (user.overlay.*, both sides -o userxattr), "ro" (no upper), "xino"
    (rw with the top lower layer on a tmpfs, xino=on on both sides),
    "index", "metacopy", "metacopy-index" or "nfs_export" (rw with those
    options on both sides), or features joined by "+" (index, metacopy,
    xino, nfs_export, data-only: "index+xino"...)."""
    rng = random.Random(seed)
    if mode == "ro" and nlowers is None:
        nlowers = rng.randrange(2, 5)  # the kernel needs 2+ lowers without upper
    stack = L.gen_stack(rng, nlowers=nlowers, no_hardlinks=tolerate.on("lower-hardlinks"))
    kernel_opts, ours_opts = ("redirect_dir=on",), ()
    if mode == "userxattr":
        stack.prefix = L.USER_PREFIX
        kernel_opts = ours_opts = ("userxattr",)
    elif mode == "ro":
        stack.has_upper = False
        stack = L.drop_ghost_whiteouts(stack)
    elif mode == "xino":
        kernel_opts, ours_opts = ("redirect_dir=on", "xino=on"), ("xino=on",)
        _top_layer_on_tmpfs(tmp, tracker)
    elif mode == "index":
        kernel_opts, ours_opts = ("redirect_dir=on", "index=on"), ("index=on",)
    elif mode == "metacopy":
        kernel_opts, ours_opts = ("redirect_dir=on", "metacopy=on"), ("metacopy=on",)
    elif mode in ("data-only", "data-only-ro"):
        # composefs-style: metadata layers over a data-only content store
        stack = L.to_data_only(stack, rng)
        kernel_opts, ours_opts = ("redirect_dir=on", "metacopy=on"), ("metacopy=on",)
        if mode == "data-only-ro":
            stack.has_upper = False
            stack = L.drop_ghost_whiteouts(stack)
            kernel_opts, ours_opts = (), ()
    elif mode == "nfs_export":
        kernel_opts, ours_opts = ("redirect_dir=on", "nfs_export=on"), ("nfs_export=on",)
    elif mode == "metacopy-index":
        kernel_opts = ("redirect_dir=on", "metacopy=on", "index=on")
        ours_opts = ("metacopy=on", "index=on")
    elif "+" in mode:
        feats = mode.split("+")
        if "data-only" in feats:
            stack = L.to_data_only(stack, rng)
            feats.append("metacopy")
        if "xino" in feats:
            _top_layer_on_tmpfs(tmp, tracker)
        ours_opts = tuple(f"{f}=on" for f in ("index", "metacopy", "xino", "nfs_export") if f in feats)
        kernel_opts = ("redirect_dir=on",) + ours_opts
    env = f"DIFF_TOLERATE={','.join(sorted(tolerate.TOLERATE)) or 'none'} "
    if mountutil.ours_is_kernel():
        env += "DIFF_IMPL=kernel "
    test = {"rw": "test_random_seed", "userxattr": "test_random_userxattr", "ro": "test_random_readonly",
            "xino": "test_random_xino", "index": "test_random_index",
            "metacopy": "test_random_metacopy", "metacopy-index": "test_random_metacopy_index",
            "data-only": "test_random_data_only", "data-only-ro": "test_random_data_only",
            "nfs_export": "test_random_nfs_export"}.get(mode, "test_random_combined")
    label = label or (f"{mode} seed={seed} nops={nops}; rerun: {env}DIFF_SEEDS={seed} DIFF_OPS={nops} "
                      f"DIFF_CHECK_EVERY={CHECK_EVERY} python -m pytest tests/test_diff_random.py -k {test}")
    pair = DiffPair(tmp, stack, tracker, label=label, kernel_opts=kernel_opts, ours_opts=ours_opts)
    pair.mount()
    weights = None
    if "nfs_export" in mode and mountutil.engine() != "pyfuse3":
        # (pyfuse3 has no export support: its handles die with the inodes)
        weights = dict(O.OP_WEIGHTS, **O.HANDLE_OP_WEIGHTS)
    if "xino" in mode:
        # copy_file_range between files on two filesystems: EXDEV on the
        # kernel, done on ours (the kernel's FUSE client falls back to a
        # copy through splice on EXDEV: a documented difference)
        weights = {k: w for k, w in (weights or O.OP_WEIGHTS).items() if k != "copy_range"}
    gen = O.OpGenerator(rng, extra_names=L.all_names(stack), resolve_root=pair.mp_k, weights=weights,
                        safe_setxattr=tolerate.on("no-failing-setxattr"),
                        extended=mountutil.engine() != "pyfuse3")
    tree = O.list_tree(pair.mp_k)
    pair.check_trees("initial")
    for i in range(nops):
        op = gen.next(tree)
        pair.op(op)
        if op[0] in O.MUTATING:
            tree = O.list_tree(pair.mp_k)
        if CHECK_EVERY and (i + 1) % CHECK_EVERY == 0 and i + 1 < nops:
            pair.check_trees(f"after op #{i}")
    if "xino" in mode:
        _check_xino_bits(pair)
    pair.finish()
    return pair


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_random_seed(seed, difftmp, mounts):
    run_seed(seed, difftmp, mounts)


# a share of the seeds also runs in userxattr mode and read-only (no upper)
EXTRA_SEEDS = SEEDS[: int(os.environ.get("DIFF_EXTRA_SEEDS", "40"))]


@pytest.mark.parametrize("seed", EXTRA_SEEDS, ids=[f"seed{s}" for s in EXTRA_SEEDS])
def test_random_userxattr(seed, difftmp, mounts):
    run_seed(seed, difftmp, mounts, mode="userxattr")


@pytest.mark.parametrize("seed", EXTRA_SEEDS, ids=[f"seed{s}" for s in EXTRA_SEEDS])
def test_random_readonly(seed, difftmp, mounts):
    run_seed(seed, difftmp, mounts, mode="ro")


@pytest.mark.parametrize("nlowers,seed", [(10, 1010), (10, 1011), (100, 10100)])
def test_random_many_layers(nlowers, seed, difftmp, mounts):
    run_seed(seed, difftmp, mounts, nlowers=nlowers,
             label=f"many-layers nlowers={nlowers} seed={seed}; rerun: python -m pytest "
                   f"tests/test_diff_random.py -k 'many_layers and {seed}'")


def test_generation_is_deterministic():
    for seed in (0, 1, 99):
        a = L.gen_stack(random.Random(seed))
        b = L.gen_stack(random.Random(seed))
        assert a == b


XINO_SEEDS = SEEDS[: int(os.environ.get("DIFF_XINO_SEEDS", "12"))]


@pytest.mark.parametrize("seed", XINO_SEEDS, ids=[f"seed{s}" for s in XINO_SEEDS])
def test_random_xino_two_filesystems(seed, difftmp, mounts):
    """Layers on two filesystems (the top lower layer on a tmpfs, the rest
    and the upper on the test dir's fs) with xino=on on both sides: the
    kernel's st_ino layout (checked path by path, and by every remount of
    finish())."""
    run_seed(seed, difftmp, mounts, nlowers=random.Random(seed).randrange(1, 3), mode="xino")


INDEX_SEEDS = SEEDS[: int(os.environ.get("DIFF_INDEX_SEEDS", "40"))]


@pytest.mark.parametrize("seed", INDEX_SEEDS, ids=[f"seed{s}" for s in INDEX_SEEDS])
def test_random_index(seed, difftmp, mounts):
    """index=on on both sides: lower hard links stay one inode across
    copy-up (nlink, st_ino and the hardlink groups compared at every
    check), the upper and the index dir compared after unmount, and each
    side's upper mounted by the other (both with index=on)."""
    run_seed(seed, difftmp, mounts, mode="index")


NFS_EXPORT_SEEDS = SEEDS[: int(os.environ.get("DIFF_NFS_EXPORT_SEEDS", "30"))]


@pytest.mark.parametrize("seed", NFS_EXPORT_SEEDS, ids=[f"seed{s}" for s in NFS_EXPORT_SEEDS])
def test_random_nfs_export(seed, difftmp, mounts):
    """nfs_export=on on both sides: every copy-up indexed (files with one
    link too, dirs with an index entry of their own), removed objects
    leaving whiteouts in the index, st_ino and nlink of indexed objects;
    the index dirs compared after unmount, and each upper mounted by the
    other side with nfs_export=on."""
    run_seed(seed, difftmp, mounts, mode="nfs_export")


# the other option sets the kernel allows among index, metacopy, xino,
# nfs_export and data-only layers (each seed takes one in turn)
COMBINED = ("index+xino", "metacopy+xino", "metacopy+index+xino", "nfs_export+xino",
            "data-only+index", "data-only+xino")
COMBINED_SEEDS = SEEDS[: int(os.environ.get("DIFF_COMBINED_SEEDS", "24"))]


@pytest.mark.parametrize("seed", COMBINED_SEEDS,
                         ids=[f"seed{s}-{COMBINED[s % len(COMBINED)]}" for s in COMBINED_SEEDS])
def test_random_combined(seed, difftmp, mounts):
    """The option sets not run above, one per seed in turn (COMBINED),
    xino ones with the top lower layer on a tmpfs."""
    mode = COMBINED[seed % len(COMBINED)]
    nlowers = random.Random(seed).randrange(1, 3) if "xino" in mode else None
    run_seed(seed, difftmp, mounts, nlowers=nlowers, mode=mode)


METACOPY_SEEDS = SEEDS[: int(os.environ.get("DIFF_METACOPY_SEEDS", "40"))]


@pytest.mark.parametrize("seed", METACOPY_SEEDS, ids=[f"seed{s}" for s in METACOPY_SEEDS])
def test_random_metacopy(seed, difftmp, mounts):
    """metacopy=on on both sides: chmod, chown, utimes, xattr changes,
    renames and links of lower files copy their metadata only (the upper
    files, with their metacopy and redirect xattrs, compared after
    unmount), data read from the lower files (contents and st_blocks
    compared) until a write or truncate copies them up; each upper
    mounted by the other side."""
    run_seed(seed, difftmp, mounts, mode="metacopy")


METACOPY_INDEX_SEEDS = SEEDS[: int(os.environ.get("DIFF_METACOPY_INDEX_SEEDS", "12"))]


@pytest.mark.parametrize("seed", METACOPY_INDEX_SEEDS, ids=[f"seed{s}" for s in METACOPY_INDEX_SEEDS])
def test_random_metacopy_index(seed, difftmp, mounts):
    """metacopy=on and index=on together: metadata-only copies of lower
    hard links go to the index."""
    run_seed(seed, difftmp, mounts, mode="metacopy-index")


DATA_ONLY_SEEDS = SEEDS[: int(os.environ.get("DIFF_DATA_ONLY_SEEDS", "24"))]


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("seed", DATA_ONLY_SEEDS, ids=[f"seed{s}" for s in DATA_ONLY_SEEDS])
def test_random_data_only(seed, ro, difftmp, mounts):
    """Data-only lower layers (lowerdir=A:B::D), composefs-style: most
    plain lower files are metacopy files with absolute redirects into a
    content store below (difftest.layers.to_data_only); writable with
    metacopy=on, and read-only with the kernel's defaults (which follow
    them too)."""
    run_seed(seed, difftmp, mounts, mode="data-only-ro" if ro else "data-only")


def _top_layer_on_tmpfs(tmp, tracker):
    import subprocess

    for side in ("k", "o"):
        top = os.path.join(tmp, side, "0")
        os.makedirs(top)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", top], check=True)
        tracker.track(top)


def _check_xino_bits(pair):
    """The filesystem bits of st_ino (above bit 32) are the kernel's."""
    sk, so = pair.snapshots()
    diff = [f"/{p}: kernel {sk.inos[p]:#x} ours {so.inos.get(p, 0):#x}" for p in sorted(sk.inos)
            if sk.inos[p] >> 33 != so.inos.get(p, 0) >> 33]
    if diff:
        pair.fail("xino: the filesystem bits of st_ino differ", diff)
