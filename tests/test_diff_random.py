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
    (user.overlay.*, both sides -o userxattr) or "ro" (no upper)."""
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
    env = f"DIFF_TOLERATE={','.join(sorted(tolerate.TOLERATE)) or 'none'} "
    if mountutil.ours_is_kernel():
        env += "DIFF_IMPL=kernel "
    test = {"rw": "test_random_seed", "userxattr": "test_random_userxattr", "ro": "test_random_readonly"}[mode]
    label = label or (f"{mode} seed={seed} nops={nops}; rerun: {env}DIFF_SEEDS={seed} DIFF_OPS={nops} "
                      f"DIFF_CHECK_EVERY={CHECK_EVERY} python -m pytest tests/test_diff_random.py -k {test}")
    pair = DiffPair(tmp, stack, tracker, label=label, kernel_opts=kernel_opts, ours_opts=ours_opts)
    pair.mount()
    gen = O.OpGenerator(rng, extra_names=L.all_names(stack), resolve_root=pair.mp_k,
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
