"""Shared pytest fixtures for the test suite.

* ``mounts``: a ``mountutil.MountTracker``; everything mounted through it is
  unmounted at teardown, even when the test fails.
* ``difftmp``: a fresh temp dir under /tmp/diff-* (removed afterwards unless
  something is still mounted inside it, or DIFF_KEEP=1 is set).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mountutil  # noqa: E402


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
