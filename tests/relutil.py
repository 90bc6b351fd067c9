"""Helpers shared by the reliability, security, stress and bad-input tests.

(tests/test_reliability.py, tests/test_security.py, tests/test_stress.py,
tests/test_bad_input.py and scripts/soak.py.)

* ``rel_tmpdir(tag)`` / ``rel_cleanup(d)``: scratch dirs under ``/tmp/rel-*``
  (mode 0755, so an unprivileged uid can reach mounts inside them); a dir is
  only removed when nothing is mounted below it.
* fixtures ``reltmp`` (a scratch dir) and ``relmounts`` (a
  ``mountutil.MountTracker`` that unmounts before ``reltmp`` is removed);
  import them into a test module to use them.
* ``Daemon``: our filesystem started with ``-f`` in a subprocess, so the test
  owns its PID (for kill -9, SIGTERM, strace, RSS) and its exit status.
* ``find_daemon_pid(mp)``: the PID of a *background* mount's daemon (the
  process whose command line ends with the mount point).
* ``vm_status(pid)``: VmRSS / VmHWM (kB) from /proc/PID/status.
* ``tmpfs(path, size)``: mount a size-limited tmpfs (context manager).
* ``Strace``: ``strace -f -p PID`` attached to a daemon, its log parsed.
* ``lazy_umount(mp)``: detach a (dead) FUSE mount.
* ``run_as(uid, gid, fn)``: run a Python callable in a child process with
  that uid/gid, returning its result or ``OSError`` errno.

Nothing here unmounts or kills anything it did not start itself.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mountutil  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SRC = os.environ.get("OVERLAY_SRC") or str(REPO / "src")
if os.environ.get("OVERLAY_SRC"):
    # in-process imports (overlay.fs, overlay_core) from the same copy the
    # mounts run
    sys.path.insert(0, SRC)
PY = mountutil.ours_python()


# ---------------------------------------------------------------------------
# scratch dirs


def rel_tmpdir(tag: str = "") -> str:
    d = tempfile.mkdtemp(prefix=f"rel-{tag}{'-' if tag else ''}", dir="/tmp")
    os.chmod(d, 0o755)
    return d


def rel_cleanup(d) -> bool:
    if os.environ.get("REL_KEEP", "") not in ("", "0"):
        return False
    return mountutil.remove_tmpdir(d)


@pytest.fixture
def reltmp():
    d = rel_tmpdir()
    yield d
    rel_cleanup(d)


@pytest.fixture
def relmounts(reltmp):
    with mountutil.MountTracker() as t:
        yield t


def mkdirs(base, *names) -> list[str]:
    out = []
    for n in names:
        p = os.path.join(base, n)
        os.makedirs(p, exist_ok=True)
        out.append(p)
    return out


# ---------------------------------------------------------------------------
# running our filesystem


def overlay_env(extra=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def overlay_cmd(*args) -> list[str]:
    return [PY, "-m", "overlay", *args]


def run_overlay(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", overlay_env())
    return subprocess.run(overlay_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


class Daemon:
    """Our filesystem in the foreground (``overlay mount -f``) as our child.

    ``optstr`` is the full -o string; the log (stderr+stdout) goes to
    ``log``.  ``argv0`` lets a test run a wrapper script instead of
    ``-m overlay`` (it gets the same arguments)."""

    def __init__(self, optstr: str, mp: str, log: str, *, argv=None, preexec_fn=None, env=None):
        self.optstr = optstr
        self.env = env          # extra environment variables
        self.mp = os.path.realpath(mp)
        self.log = log
        self.argv = argv or [PY, "-m", "overlay"]
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None

    @classmethod
    def for_layers(cls, lowers, upper, work, mp, log, opts=(), **kw):
        return cls(mountutil.overlay_option_string(lowers, upper, work, opts), mp, log, **kw)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> "Daemon":
        os.makedirs(self.mp, exist_ok=True)
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                [*self.argv, "mount", "-f", "-o", self.optstr, self.mp],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=overlay_env(self.env), preexec_fn=self.preexec_fn,
            )
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while not mountutil.is_mounted(self.mp):
            if self.proc.poll() is not None:
                raise mountutil.MountError(
                    f"daemon exited {self.proc.returncode} before mounting: {self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise mountutil.MountError(f"daemon did not mount within {timeout}s")
            time.sleep(0.02)
        # the mount shows in mountinfo a moment before the first request is
        # answered; one stat makes sure it serves
        os.stat(self.mp)
        return self

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self):
        """Unmount (lazily if the daemon is dead) and end the process."""
        if self.proc is None:
            return
        if mountutil.is_mounted(self.mp):
            if self.alive():
                mountutil.umount(self.mp, attempts=5)
            if mountutil.is_mounted(self.mp):
                lazy_umount(self.mp)
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if mountutil.is_mounted(self.mp):
            lazy_umount(self.mp)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def lazy_umount(mp):
    """Detach a FUSE mount even if its daemon is dead (fusermount3 -uz, umount -l)."""
    if shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, timeout=30)
    if mountutil.is_mounted(mp):
        subprocess.run(["umount", "-l", str(mp)], capture_output=True, timeout=30)


def find_daemon_pid(mp) -> int:
    """PID of the background daemon serving mp (its cmdline ends with mp)."""
    mp = os.path.realpath(str(mp))
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args if a]
        if len(args) >= 3 and "overlay" in args and "mount" in args and args[-1] == mp:
            found.append(int(d))
    if len(found) != 1:
        raise RuntimeError(f"expected one daemon for {mp}, found {found}")
    return found[0]


def vm_status(pid) -> dict:
    """{'VmRSS': kB, 'VmHWM': kB, ...} of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def open_fds(pid) -> list[str]:
    """Targets of the fds a process holds (readlink of /proc/PID/fd/*)."""
    out = []
    base = f"/proc/{pid}/fd"
    for n in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{n}"))
        except OSError:
            pass
    return out


# ---------------------------------------------------------------------------
# tmpfs


@contextlib.contextmanager
def tmpfs(path, size="16m", ro=False):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield str(path)
    finally:
        mountutil.umount(path)


def remount_ro(path):
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


# ---------------------------------------------------------------------------
# strace

_SYSCALL_RE = re.compile(r'^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(\w+)\((.*)$')


class Strace:
    """``strace -f -p PID`` writing to a file; ``calls()`` parses it."""

    def __init__(self, pid: int, out: str, trace: str = "all", extra=("-y",)):
        self.pid = pid
        self.out = out
        self.trace = trace
        self.extra = list(extra)
        self.proc = None

    @staticmethod
    def available() -> bool:
        return shutil.which("strace") is not None

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-s", "4096", *self.extra, "-e", f"trace={self.trace}",
             "-o", self.out, "-p", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        # wait until it is attached to every thread of the daemon
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    tracer = [l for l in f if l.startswith("TracerPid:")]
                if tracer and int(tracer[0].split()[1]) == self.proc.pid:
                    break
            except OSError:
                break
            time.sleep(0.02)
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return False

    def lines(self) -> list[str]:
        try:
            with open(self.out, errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            return []

    def calls(self) -> list[tuple[str, str]]:
        """[(syscall name, rest of the line)] of completed calls."""
        out = []
        for line in self.lines():
            m = _SYSCALL_RE.match(line.strip())
            if m:
                out.append((m.group(3), m.group(4)))
        return out


# ---------------------------------------------------------------------------
# running code as another user


def _child(q, uid, gid, fn, args):
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        q.put(("ok", fn(*args)))
    except OSError as e:
        q.put(("err", e.errno))
    except BaseException as e:  # noqa: BLE001
        q.put(("exc", repr(e)))


def run_as(uid: int, gid: int, fn, *args):
    """Run fn(*args) in a forked child with that uid/gid.

    Returns ("ok", result), ("err", errno) or ("exc", repr)."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, uid, gid, fn, args))
    p.start()
    try:
        res = q.get(timeout=30)
    finally:
        p.join(timeout=30)
    return res


def errname(e) -> str:
    return errno.errorcode.get(e, str(e)) if isinstance(e, int) else str(e)


# ---------------------------------------------------------------------------
# big data files

import hashlib  # noqa: E402
import struct  # noqa: E402

MARK = b"NEW-CONTENT-MARK"


def write_pattern_file(path, mib: int, seed: bytes = b"") -> tuple[str, str]:
    """Write a real (non-sparse) file of `mib` MiB, fsync it and drop it from
    the page cache (so a copy of it runs at disk speed).

    Returns (sha1 of the content, sha1 of the content with MARK written at
    offset 0), i.e. the two states a copy-up plus that write may leave."""
    base = bytearray(hashlib.sha512(seed or os.urandom(16)).digest() * (1 << 20 >> 6))
    h, hn = hashlib.sha1(), hashlib.sha1()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(mib):
            base[:8] = struct.pack("<Q", i)
            blk = bytes(base)
            os.write(fd, blk)
            h.update(blk)
            hn.update(MARK + blk[len(MARK):] if i == 0 else blk)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return h.hexdigest(), hn.hexdigest()


def sha1_file(path, drop_cache: bool = False) -> str:
    h = hashlib.sha1()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return h.hexdigest()


def tree_names(path) -> list[str]:
    """Every path below `path` (relative), without following symlinks."""
    out = []
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(root, n), path))
    return sorted(out)
