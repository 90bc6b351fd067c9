"""overlay.mounttable: the mount table (/proc/self/mountinfo) and unmounting.

Light helpers shared by the command line (overlay.cli), the walkthrough
(overlay.demo) and the Python API (overlay.api): which mounts exist, the one
on top of a mount point, and unmounting with fusermount3 or umount(8).
Imports nothing of the filesystem.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def unescape_mountinfo(field: str) -> str:
    r"""Undo the octal escapes (``\040`` for a space, ...) of /proc mount tables."""
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class MountEntry:
    """One line of mountinfo (a plain class: dataclasses cost start-up time)."""

    __slots__ = ("mountpoint", "fstype", "source", "mount_id", "dev", "options", "super_options")

    def __init__(self, mountpoint: str, fstype: str, source: str, mount_id: int = -1,
                 dev: str = "", options: str = "", super_options: str = ""):
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.source = source
        self.mount_id = mount_id
        self.dev = dev              # "major:minor" of the mounted filesystem
        self.options = options      # per-mount options ("rw,nosuid,nodev,relatime")
        self.super_options = super_options  # the filesystem's (a kernel overlay's upperdir=...)

    def _key(self):
        return (self.mountpoint, self.fstype, self.source, self.mount_id)

    def __eq__(self, other):
        return isinstance(other, MountEntry) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"MountEntry(mountpoint={self.mountpoint!r}, fstype={self.fstype!r}, "
                f"source={self.source!r}, mount_id={self.mount_id!r})")


def iter_mounts(mountinfo: str = "/proc/self/mountinfo"):
    """Yield the entries of a mountinfo file (see proc(5))."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            yield MountEntry(
                mountpoint=unescape_mountinfo(fields[4]),
                fstype=fields[sep + 1],
                source=unescape_mountinfo(fields[sep + 2]) if len(fields) > sep + 2 else "",
                mount_id=int(fields[0]),
                dev=fields[2],
                options=fields[5],
                super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
            )


def overlay_dirs(entry: MountEntry) -> dict:
    """{"upperdir": path, "workdir": path} of a kernel overlay's entry
    (the paths as given to mount(2), unescaped), as far as it names them."""
    out = {}
    for opt in entry.super_options.split(","):
        key, _, value = opt.partition("=")
        if key in ("upperdir", "workdir") and value:
            out[key] = unescape_mountinfo(value)
    return out


def same_dir(a: str | None, b: str | None) -> bool:
    """Are paths a and b the same dir (st_dev, st_ino)?"""
    if not a or not b:
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def kernel_overlay_using(path: str, key: str) -> MountEntry | None:
    """The live kernel overlay whose key ("upperdir" or "workdir") is the
    dir path (its mount table entry names it), or None."""
    for entry in iter_mounts():
        if entry.fstype == "overlay":
            theirs = overlay_dirs(entry).get(key)
            if theirs and os.path.isabs(theirs) and same_dir(theirs, path):
                return entry
    return None


def read_stats_timeout(mountpoint: str, timeout: float = 2.0) -> dict | None:
    """The stats of a mount of ours, or None (not ours, gone, or a daemon
    that does not answer within timeout: never hangs the caller)."""
    import threading  # noqa: PLC0415

    from overlay.stats import read_stats  # noqa: PLC0415

    out = {}

    def get():
        try:
            out["v"] = read_stats(mountpoint)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=get, daemon=True)
    t.start()
    t.join(timeout)
    return out.get("v")


def our_mounts():
    """(MountEntry, its stats or None) of every live FUSE overlay of ours
    this process sees."""
    for entry in iter_mounts():
        if is_ours(entry):
            yield entry, read_stats_timeout(entry.mountpoint)


def is_ours(entry: MountEntry) -> bool:
    """A FUSE overlay of ours (fuse.overlay, or the type its helper gives)?"""
    return entry.fstype.startswith("fuse.overlay")


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount on ``mountpoint`` (an absolute path), if any."""
    found = None
    for entry in iter_mounts():
        if entry.mountpoint == mountpoint:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def mountpoint_path(path: str) -> str:
    """Absolute, symlink-free path of a mount point without touching the fs below.

    ``realpath`` on a dead FUSE mount would fail, so only the parent is resolved.
    """
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    if not name:
        return absolute
    return os.path.join(os.path.realpath(parent), name)


def unmount(mountpoint: str, lazy: bool = False) -> tuple[bool, str]:
    """Try fusermount3/fusermount, then (as root) umount(8). (ok, error text)."""
    import shutil
    import subprocess

    attempts: list[list[str]] = []
    for tool in ("fusermount3", "fusermount"):
        path = shutil.which(tool)
        if path:
            attempts.append([path, "-u", *(["-z"] if lazy else []), "--", mountpoint])
            break
    if os.geteuid() == 0 and shutil.which("umount"):
        attempts.append(["umount", *(["-l"] if lazy else []), "--", mountpoint])
    error = "no fusermount3 or umount found"
    for cmd in attempts:
        log.debug("running %s", cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            return True, ""
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        error = lines[0] if lines else f"{os.path.basename(cmd[0])} failed ({proc.returncode})"
    return False, error
