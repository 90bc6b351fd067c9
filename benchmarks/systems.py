"""The three overlay implementations the benchmarks compare, behind one API.

``SYSTEMS`` maps a name to a ``System``:

* ``kernel``: the kernel overlayfs (``mount -t overlay``; root only). Its
  option string is limited to one page, so ``mount(..., base=DIR)`` passes
  every layer relative to ``DIR`` (run from there); a string that is still too
  long raises ``Missing("limit ...")``.
* ``fuse-overlayfs``: the ``fuse-overlayfs`` binary.
* ``ours``: ``python -m overlay mount`` (the native engine, our default), with
  the interpreter of the repo's ``.venv`` (or ``$OVERLAY_PYTHON``);
  ``$OVERLAY_SRC`` puts another source tree first on its ``PYTHONPATH`` (e.g.
  a frozen copy, so a run is not disturbed by edits to ``src/``);
* ``ours-pyfuse3``: the same with ``engine=pyfuse3`` (the older adapter).

Every ``mount`` returns once the mount is live; ``umount`` unmounts (lazily as
a last resort) and waits for the FUSE daemon to exit. ``drop_caches()`` is
``sync; echo 3 > /proc/sys/vm/drop_caches``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 120.0


class Missing(Exception):
    """A system cannot run this workload (the message says why)."""


def _mountpoints() -> set[str]:
    out = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            field = line.split()[4]
            out.add(field.replace("\\040", " ").replace("\\011", "\t")
                    .replace("\\012", "\n").replace("\\134", "\\"))
    return out


def is_mounted(mp: str) -> bool:
    return os.path.realpath(mp) in _mountpoints()


def daemon_pids(mp: str) -> list[int]:
    """PIDs of processes whose command line names mountpoint ``mp`` (the FUSE
    daemons this module started for it)."""
    mp = os.path.realpath(mp)
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mp) in args:
            pids.append(int(entry))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().split(b") ")[-1][:1] != b"Z"
    except OSError:
        return False


def drop_caches() -> bool:
    """Write back dirty data and drop the page, dentry and inode caches."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class System:
    """One overlay implementation."""

    name = ""
    label = ""
    fuse = True

    def missing_reason(self) -> str | None:
        """None when the system can be tried here, else why not."""
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def command(self, opts: str, mp: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict | None:
        return None

    extra_options = ""      # set by a workload for one mount (e.g. "timeout=0")

    def options(self, lowers, upper, work) -> str:
        opts = "lowerdir=" + ":".join(lowers)
        if upper is not None:
            opts += f",upperdir={upper},workdir={work}"
        if self.extra_options:
            opts += "," + self.extra_options
        if self.fuse and self.name.startswith("ours") and os.environ.get("BENCH_OURS_OPTIONS"):
            # e.g. BENCH_OURS_OPTIONS=workers=4: our mounts only, every workload
            opts += "," + os.environ["BENCH_OURS_OPTIONS"]
        return opts

    def mount(self, lowers, upper, work, mp, *, base=None) -> None:
        """Mount ``lowers`` (top first) with ``upper``/``work`` (or None) on
        ``mp``; returns once it is live. ``base`` matters to the kernel only."""
        if is_mounted(mp):
            raise RuntimeError(f"{mp} is already a mount point")
        opts = self.options(lowers, upper, work)
        proc = subprocess.run(self.command(opts, mp), env=self.env(), cwd=base,
                              stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=MOUNT_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} mount failed ({proc.returncode}): "
                               f"{_last_line(proc.stderr) or _last_line(proc.stdout)}")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mp):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {mp} not mounted after {MOUNT_TIMEOUT} s")
            time.sleep(0.002)

    def umount(self, mp) -> None:
        """Unmount ``mp`` and wait for its FUSE daemon to exit."""
        pids = daemon_pids(mp) if self.fuse else []
        for attempt in range(20):
            if not is_mounted(mp):
                break
            r = subprocess.run(["umount", mp], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            subprocess.run(["umount", "-l", mp], capture_output=True)
        deadline = time.monotonic() + 30
        for pid in pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)


class KernelOverlay(System):
    name = "kernel"
    label = "kernel overlay"
    fuse = False

    def missing_reason(self):
        if os.geteuid() != 0:
            return "needs root"
        if shutil.which("modprobe"):
            subprocess.run(["modprobe", "overlay"], capture_output=True)
        with open("/proc/filesystems") as fh:
            if not any(line.split()[-1] == "overlay" for line in fh if line.strip()):
                return "no overlay in /proc/filesystems"
        return None

    def version(self):
        return "Linux " + os.uname().release

    def command(self, opts, mp):
        return ["mount", "-t", "overlay", "overlay", "-o", opts, mp]

    def mount(self, lowers, upper, work, mp, *, base=None):
        if base is not None:
            rel = lambda p: None if p is None else os.path.relpath(p, base)  # noqa: E731
            lowers = [rel(p) for p in lowers]
            upper, work = rel(upper), rel(work)
            mp = os.path.abspath(mp)
        opts = self.options(lowers, upper, work)
        limit = os.sysconf("SC_PAGE_SIZE") - 1
        if len(opts) > limit:
            raise Missing(f"limit: option string of {len(opts)} bytes > {limit}")
        super().mount(lowers, upper, work, mp, base=base)


class FuseOverlayfs(System):
    name = "fuse-overlayfs"
    label = "fuse-overlayfs"

    def missing_reason(self):
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs not installed"
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        return None

    def version(self):
        try:
            out = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("fuse-overlayfs"):
                return line.strip()
        return ""

    def command(self, opts, mp):
        return ["fuse-overlayfs", "-o", opts, mp]


class Ours(System):
    name = "ours"
    label = "ours (overlay-fuse)"

    def python(self) -> str:
        env = os.environ.get("OVERLAY_PYTHON")
        if env:
            return env
        venv = REPO / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable

    def env(self):
        env = dict(os.environ)
        src = os.environ.get("OVERLAY_SRC")
        if src:
            env["PYTHONPATH"] = src + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    module = "overlay.engine.bridge"
    extra = ""

    def options(self, lowers, upper, work) -> str:
        opts = super().options(lowers, upper, work) + self.extra
        if len(opts) >= os.sysconf("SC_PAGE_SIZE"):
            # past one page (what mount(2) takes): the layers from a file,
            # as a user of thousands of layers gives them
            path = os.path.join(tempfile.gettempdir(), f"bench-lowers-{os.getpid()}.txt")
            with open(path, "w") as fh:
                fh.write("".join(p + "\n" for p in lowers))
            opts = opts.replace("lowerdir=" + ":".join(lowers), "lowerdir_file=" + path, 1)
        return opts

    def missing_reason(self):
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        r = subprocess.run([self.python(), "-c", f"import {self.module}, overlay_core"],
                           env=self.env(), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return f"cannot import {self.module}: " + _last_line(r.stderr)
        return None

    def version(self):
        if os.environ.get("OVERLAY_SRC"):
            return f"OVERLAY_SRC={os.environ['OVERLAY_SRC']}"
        src = str(REPO / "src")
        try:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return src
        return f"{head}{'+dirty src' if dirty else ''} ({src})"

    def command(self, opts, mp):
        return [self.python(), "-m", "overlay", "mount", "-o", opts, mp]


class OursPyfuse3(Ours):
    name = "ours-pyfuse3"
    label = "ours (engine=pyfuse3)"
    module = "overlay.fs"
    extra = ",engine=pyfuse3"


SYSTEMS: dict[str, System] = {s.name: s for s in (KernelOverlay(), FuseOverlayfs(), Ours(), OursPyfuse3())}
ORDER = ["kernel", "fuse-overlayfs", "ours", "ours-pyfuse3"]
