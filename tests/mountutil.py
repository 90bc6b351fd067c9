"""Shared helpers for tests that mount filesystems (kernel overlayfs and ours).

Provides:

* ``require_root()``, ``require_fuse()``, ``require_kernel_overlay()``,
  ``require_ours()``: ``pytest.skip`` with a clear reason when the
  environment cannot run mounted tests.
* ``mount_kernel(lowers, upper, work, mp, opts=())`` and
  ``mount_ours(lowers, upper, work, mp, opts=())``: mount a kernel overlay or
  our FUSE overlay (``upper``/``work`` may be ``None`` for a read-only
  mount).  ``lowers[0]`` is the top lower layer, like the kernel's
  ``lowerdir=A:B``.
* ``umount(mp)``: robust unmount (retries, lazy unmount as a last resort);
  never raises.
* ``is_mounted(mp)``: checks /proc/self/mountinfo.
* ``MountTracker``: context manager remembering every mount made through it
  and unmounting all of them (in reverse order) on exit, even on failure.
  ``tests/conftest.py`` exposes it as the ``mounts`` fixture.
* ``make_tmpdir()`` / ``remove_tmpdir()``: temp dirs under /tmp/diff-* that
  are only removed when nothing is mounted below them.

Environment knobs:

* ``DIFF_IMPL=kernel`` makes ``mount_ours`` mount a *kernel* overlay instead
  of ours (used to prove the differential harness kernel-vs-kernel); it
  adds ``redirect_dir=on`` unless a ``redirect_dir=`` option (or
  ``userxattr``, which the kernel refuses with it) is given, because that is
  our filesystem's default behaviour.
* ``OVERLAY_TEST_ENGINE=pyfuse3`` (or ``native``) adds ``engine=...`` to
  every mount of ours (``engine()`` tells which engine is under test; the
  default is our default, the native engine); ``OVERLAY_TEST_OPTS=a,b``
  adds those options too (e.g. ``passthrough=off``); ``passthrough()``
  tells whether our mounts serve file data with FUSE passthrough;
* ``OVERLAY_PYTHON`` overrides the interpreter used to run ``-m overlay``
  (default: ``sys.executable``); ``OVERLAY_SRC`` the source dir put first on
  its PYTHONPATH (default: this repo's ``src``), e.g. to test a frozen,
  separately built copy while the working tree is being edited.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = float(os.environ.get("OVERLAY_MOUNT_TIMEOUT", "60"))


class MountError(RuntimeError):
    """A mount command failed."""


# ---------------------------------------------------------------------------
# environment checks


def require_root():
    if os.geteuid() != 0:
        pytest.skip("mounted tests need root (not running as uid 0)")


def require_fuse():
    require_root()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("mounted tests need /dev/fuse (missing)")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        pytest.skip(f"mounted tests need a usable /dev/fuse: {e}")
    if shutil.which("fusermount3") is None and shutil.which("umount") is None:
        pytest.skip("no fusermount3/umount binary")


@functools.lru_cache(maxsize=None)
def _probe_kernel_overlay():
    """Return None if `mount -t overlay` works here, else a reason string."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("mount") is None:
        return "no mount binary"
    d = tempfile.mkdtemp(prefix="diff-probe-", dir="/tmp")
    try:
        for sub in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(d, sub))
        try:
            mount_kernel([f"{d}/l"], f"{d}/u", f"{d}/w", f"{d}/m")
        except MountError as e:
            return f"kernel overlay mount failed: {e}"
        umount(f"{d}/m")
        if is_mounted(f"{d}/m"):
            return "could not unmount the probe kernel overlay"
        return None
    finally:
        if not _mounts_below(d):
            shutil.rmtree(d, ignore_errors=True)


def require_kernel_overlay():
    require_root()
    reason = _probe_kernel_overlay()
    if reason:
        pytest.skip(f"kernel overlayfs unavailable: {reason}")


def ours_is_kernel() -> bool:
    """True when DIFF_IMPL=kernel: the 'ours' side is a kernel overlay."""
    return os.environ.get("DIFF_IMPL", "").strip().lower() == "kernel"


def engine() -> str:
    """The engine of ours under test: native (the default) or pyfuse3."""
    return os.environ.get("OVERLAY_TEST_ENGINE", "").strip().lower() or "native"


def test_opts() -> tuple:
    """Extra options for every mount of ours (OVERLAY_TEST_OPTS)."""
    return tuple(o for o in os.environ.get("OVERLAY_TEST_OPTS", "").split(",") if o.strip())


def passthrough(opts=()) -> bool:
    """Do mounts of ours with opts use FUSE passthrough for file data? (The
    native engine as root does, unless passthrough=off or writeback.)"""
    opts = tuple(opts) + test_opts()
    return (engine() == "native" and os.geteuid() == 0 and not ours_is_kernel()
            and "passthrough=off" not in opts and "writeback" not in opts)


def require_ours():
    """Skip unless our FUSE filesystem can be mounted (or DIFF_IMPL=kernel)."""
    if ours_is_kernel():
        require_kernel_overlay()
        return
    require_fuse()
    if not (REPO / "src" / "overlay" / "cli.py").exists():
        pytest.skip("our filesystem is not there yet (src/overlay/cli.py missing)")


# ---------------------------------------------------------------------------
# mountinfo


def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountpoints() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount in our namespace."""
    res = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                try:
                    sep = parts.index("-")
                except ValueError:
                    continue
                res.append((_unescape_mountinfo(parts[4]), parts[sep + 1]))
    except OSError:
        pass
    return res


def is_mounted(mp) -> bool:
    mp = os.path.realpath(str(mp))
    return any(m == mp for m, _ in mountpoints())


def _mounts_below(d) -> list[str]:
    d = os.path.realpath(str(d)).rstrip("/") + "/"
    return [m for m, _ in mountpoints() if (m + "/").startswith(d)]


# ---------------------------------------------------------------------------
# mounting


def _check_path(p):
    p = str(p)
    for bad in (",", ":", "\n"):
        if bad in p:
            raise ValueError(f"path not usable in overlay mount options: {p!r}")
    return p


def overlay_option_string(lowers, upper, work, opts=()) -> str:
    if not lowers and not any(str(o).startswith("image=") for o in opts):
        raise ValueError("need at least one lower layer (or image=)")
    # a "::" entry makes the next layers data-only ones (lowerdir=A:B::D)
    lowerdir, sep = "", ""
    for l in lowers:
        if l == "::":
            sep = "::"
            continue
        lowerdir += sep + _check_path(os.path.abspath(str(l)))
        sep = ":"
    parts = ["lowerdir=" + lowerdir] if lowers else []
    if upper is not None:
        if work is None:
            raise ValueError("upper without work")
        parts.append("upperdir=" + _check_path(os.path.abspath(str(upper))))
        parts.append("workdir=" + _check_path(os.path.abspath(str(work))))
    parts.extend(opts)
    return ",".join(parts)


def mount_kernel(lowers, upper, work, mp, opts=()):
    """Mount the kernel overlay; raise MountError on failure."""
    optstr = overlay_option_string(lowers, upper, work, opts)
    if len(optstr) >= 4000:
        raise ValueError(f"kernel option string too long ({len(optstr)} bytes); use shorter paths")
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", optstr, str(mp)],
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
    )
    if r.returncode != 0:
        raise MountError(f"mount -t overlay -o {optstr} {mp}: rc={r.returncode}: {r.stderr.strip()}")


def overlay_cli(args, **kw) -> subprocess.CompletedProcess:
    """Run `python -m overlay ARGS` from this checkout (text output captured)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "overlay", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def ours_python() -> str:
    return os.environ.get("OVERLAY_PYTHON") or sys.executable


def mount_ours(lowers, upper, work, mp, opts=()):
    """Mount our FUSE overlay (returns once live); raise MountError on failure.

    With DIFF_IMPL=kernel this mounts a kernel overlay instead (harness
    self-test)."""
    if ours_is_kernel():
        # emulate our defaults: ours renames dirs with redirects unless told
        # redirect_dir=off, i.e. like the kernel with redirect_dir=on
        opts = tuple(opts)
        if not any(o.startswith("redirect_dir=") for o in opts) and "userxattr" not in opts:
            opts += ("redirect_dir=on",)
        return mount_kernel(lowers, upper, work, mp, opts)
    if os.environ.get("OVERLAY_TEST_ENGINE") and not any(o.startswith("engine=") for o in opts):
        opts = tuple(opts) + (f"engine={engine()}",)
    opts = tuple(opts) + test_opts()
    optstr = overlay_option_string(lowers, upper, work, opts)
    env = dict(os.environ)
    src = os.environ.get("OVERLAY_SRC") or str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [ours_python(), "-m", "overlay", "mount", "-o", optstr, str(mp)]
    if os.environ.get("OVERLAY_TEST_LOG"):
        cmd[4:4] = ["--log", os.environ["OVERLAY_TEST_LOG"]]
    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=MOUNT_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        umount(mp)
        raise MountError(f"{' '.join(cmd)}: timed out after {MOUNT_TIMEOUT}s") from e
    if r.returncode != 0:
        umount(mp)
        raise MountError(
            f"{' '.join(cmd)}: rc={r.returncode}\nstdout: {r.stdout.strip()}\nstderr: {r.stderr.strip()}"
        )
    if not is_mounted(mp):
        raise MountError(f"{' '.join(cmd)} exited 0 but {mp} is not a mountpoint")


def umount(mp, attempts: int = 10) -> bool:
    """Unmount mp robustly. Returns True if it ended up unmounted. Never raises."""
    try:
        mp = str(mp)
        if not is_mounted(mp):
            return True
        fstype = dict(mountpoints()).get(os.path.realpath(mp), "")
        for i in range(attempts):
            try:
                r = subprocess.run(["umount", mp], capture_output=True, text=True, timeout=30)
                if r.returncode == 0 and not is_mounted(mp):
                    return True
                if not is_mounted(mp):
                    return True
            except Exception:
                pass
            time.sleep(min(0.05 * (i + 1), 0.3))
        # last resort: lazy unmount
        if fstype.startswith("fuse") and shutil.which("fusermount3"):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, timeout=30)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)
        return not is_mounted(mp)
    except Exception:
        return False


class MountTracker:
    """Remembers mounts and unmounts all of them (reverse order) on close."""

    def __init__(self):
        self._mps: list[str] = []

    def kernel(self, lowers, upper, work, mp, opts=()):
        os.makedirs(mp, exist_ok=True)
        mount_kernel(lowers, upper, work, mp, opts)
        self._mps.append(str(mp))
        return str(mp)

    def ours(self, lowers, upper, work, mp, opts=()):
        os.makedirs(mp, exist_ok=True)
        self._mps.append(str(mp))  # before: a half-done mount still gets cleaned
        mount_ours(lowers, upper, work, mp, opts)
        return str(mp)

    def track(self, mp):
        """Unmount mp (mounted by the caller, e.g. a tmpfs) at close too."""
        self._mps.append(str(mp))
        return str(mp)

    def umount(self, mp) -> bool:
        ok = umount(mp)
        if str(mp) in self._mps:
            self._mps.remove(str(mp))
        return ok

    def close(self):
        while self._mps:
            umount(self._mps.pop())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------
# temp dirs


def make_tmpdir(tag: str = "") -> str:
    return tempfile.mkdtemp(prefix=f"diff-{tag}{'-' if tag else ''}", dir="/tmp")


def remove_tmpdir(d) -> bool:
    """rm -rf d unless something is still mounted below it (then keep it)."""
    below = _mounts_below(d)
    for m in sorted(below, reverse=True):
        umount(m)
    if _mounts_below(d):
        return False
    shutil.rmtree(d, ignore_errors=True)
    return True


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))
