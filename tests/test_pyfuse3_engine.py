"""The older engine (engine=pyfuse3) keeps working: a subset of the suite on it.

The whole suite runs on the native engine (the default). This file runs the
walkthrough and the fixed differential scenarios again with every mount of
ours made with ``engine=pyfuse3`` (``OVERLAY_TEST_ENGINE=pyfuse3``, see
mountutil), in a pytest subprocess, and fails with its report when anything
there fails; ``PYFUSE3_DIFF_SEEDS=0-9`` adds those random differential
seeds in each of their modes. Skipped when pyfuse3 (the
``overlay-fuse[pyfuse3]`` extra) is not installed.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import mountutil

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.environ.get("PYFUSE3_DIFF_SEEDS", "")


def test_subset_on_pyfuse3_engine():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_fuse()
    if importlib.util.find_spec("pyfuse3") is None:
        pytest.skip("pyfuse3 is not installed (pip install 'overlay-fuse[pyfuse3]')")
    env = dict(os.environ, OVERLAY_TEST_ENGINE="pyfuse3", DIFF_SEEDS=SEEDS, DIFF_EXTRA_SEEDS="1")
    env.pop("DIFF_TOLERATE", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           os.path.join(HERE, "test_walkthrough.py"),
           os.path.join(HERE, "test_diff_fixed.py")]
    if SEEDS:
        cmd.append(os.path.join(HERE, "test_diff_random.py"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE),
                          timeout=1200)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, f"the subset failed on engine=pyfuse3:\n{tail}\n{proc.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) >= 50, tail
