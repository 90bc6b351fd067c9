"""The wheel works without the source tree (tests/test_wheel.py).

Runs scripts/wheel_smoke.sh: build the sdist and the wheel from a copy of the
working tree, check that the wheel holds both extension modules
(overlay_core._core, overlay._fuseattr) and the entry points, repair it with
auditwheel (manylinux tag), install it into a fresh venv (pyfuse3 built from
source or from pip's cache), run scripts/wheel_check.py there and mount,
write, unmount and diff with the installed ``overlay`` command.

Slow (a minute or two with a warm pip cache, a few more on a cold one):
marked ``slow``; deselect with ``-m "not slow"`` or set OVERLAY_SKIP_WHEEL=1.
Skipped with the script's reason when the build tools cannot be installed
(exit status 77: no network / no PyPI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "wheel_smoke.sh"
TIMEOUT = float(os.environ.get("OVERLAY_WHEEL_TIMEOUT", "900"))


@pytest.mark.slow
def test_wheel_builds_installs_and_mounts():
    if os.environ.get("OVERLAY_SKIP_WHEEL", "") not in ("", "0"):
        pytest.skip("OVERLAY_SKIP_WHEEL is set")
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON") or sys.executable)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT)],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"wheel_smoke.sh took more than {TIMEOUT:g}s:\n{(exc.stderr or b'')[-3000:]!r}")
    tail = "\n".join(line for line in proc.stderr.splitlines() if "Location 'file:" not in line)[-4000:]
    if proc.returncode == 77:
        reason = [ln for ln in proc.stderr.splitlines() if "SKIP:" in ln]
        pytest.skip(reason[-1].split("SKIP:", 1)[1].strip() if reason else "build tools unavailable")
    assert proc.returncode == 0, f"wheel_smoke.sh failed (rc={proc.returncode}):\n{tail}"
    assert "[wheel-smoke] OK" in proc.stderr
    if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        assert "mounted, wrote, unmounted and diffed with the installed wheel" in proc.stderr
