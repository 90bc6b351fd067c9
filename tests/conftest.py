"""Shared pytest fixtures for the test suite.

* ``mounts``: a ``mountutil.MountTracker``; everything mounted through it is
  unmounted at teardown, even when the test fails.
* ``difftmp``: a fresh temp dir under /tmp/diff-* (removed afterwards unless
  something is still mounted inside it, or DIFF_KEEP=1 is set).
* ``mk``: builds a hand-written stack twice and mounts the kernel overlay
  and ours on the copies (a mounted difftest DiffPair; the fixed
  differential scenarios use it).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mountutil  # noqa: E402
from difftest import layers as L  # noqa: E402
from difftest.pair import DiffPair  # noqa: E402


@pytest.fixture
def difftmp():
    d = mountutil.make_tmpdir()
    yield d
    if os.environ.get("DIFF_KEEP", "") not in ("", "0"):
        return
    mountutil.remove_tmpdir(d)


@pytest.fixture
def mounts(difftmp):
    # depends on difftmp so that unmounting happens before the dir is removed
    with mountutil.MountTracker() as t:
        yield t


@pytest.fixture
def mk(difftmp, mounts, request):
    """mk(lowers, upper=None, ro=False, userxattr=False, kernel_opts=..., ours_opts=...) -> mounted DiffPair"""
    made = []

    def make(lowers, upper=None, ro=False, userxattr=False, kernel_opts=None, ours_opts=None, sub=None):
        prefix = L.USER_PREFIX if userxattr else L.TRUSTED_PREFIX
        stack = L.Stack(lowers=lowers, upper=upper or [], prefix=prefix, has_upper=not ro)
        if kernel_opts is None:
            kernel_opts = ("userxattr",) if userxattr else ("redirect_dir=on",)
        if ours_opts is None:
            ours_opts = ("userxattr",) if userxattr else ()
        tmp = os.path.join(difftmp, sub or f"p{len(made)}")
        os.makedirs(tmp)
        p = DiffPair(tmp, stack, mounts, label=f"{request.node.nodeid}", kernel_opts=kernel_opts, ours_opts=ours_opts)
        p.mount()
        p.check_trees("initial")
        made.append(p)
        return p

    return make

