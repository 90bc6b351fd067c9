"""overlay.engine.mount: mounting a FUSE filesystem without libfuse.

As root (CAP_SYS_ADMIN): open /dev/fuse and call mount(2) with `fd=N` in
the data string; a watchdog child (wire.start_watchdog) lazily unmounts the
mount if the daemon dies without unmounting (SIGKILL), so no dead
"Transport endpoint is not connected" mount stays behind.

Otherwise: run `fusermount3 -o OPTS,auto_unmount MOUNTPOINT` with one end of
a socket pair in _FUSE_COMMFD; it mounts and hands the /dev/fuse fd back
over the socket (SCM_RIGHTS), then stays to unmount when our end of the
socket closes (our death). `OVERLAY_MOUNT_METHOD=fusermount3` takes this
path as root too (the tests use it).

Mount() returns a Mounted: the fd, how to unmount, and cleanup.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import stat
import subprocess

from overlay.engine import wire
from overlay.mounttable import find_mount
from overlay.options import (MS_DIRSYNC, MS_NOATIME, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY,
                             MS_SYNCHRONOUS)

log = logging.getLogger("overlay.engine")

MNT_DETACH = 2


class MountFailed(OSError):
    """Mounting failed; str() is one line for the user."""


def _flag_words(flags: int) -> list[str]:
    words = ["ro" if flags & MS_RDONLY else "rw"]
    words.append("nosuid" if flags & MS_NOSUID else "suid")
    words.append("nodev" if flags & MS_NODEV else "dev")
    words.append("noexec" if flags & MS_NOEXEC else "exec")
    if flags & MS_NOATIME:
        words.append("noatime")
    if flags & MS_SYNCHRONOUS:
        words.append("sync")
    if flags & MS_DIRSYNC:
        words.append("dirsync")
    return words


def _escape(value: str) -> str:
    """fusermount3 splits its -o on commas: escape them (and backslashes)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class Mounted:
    """A live mount: the /dev/fuse fd and how to take it down."""

    def __init__(self, mountpoint: str, fd: int, method: str, sock=None, helper=None):
        self.mountpoint = mountpoint
        self.fd = fd
        self.method = method
        self._sock = sock            # fusermount3's auto_unmount watches it
        self._helper = helper        # that fusermount3 (it stays until the socket closes)
        self._watchdog = None        # (pid, fd) of our watchdog child

    def start_watchdog(self) -> None:
        """The child that unmounts if we die (see wire.start_watchdog). With
        fusermount3 its auto_unmount unmounts (the child may not, without
        root): the child aborts the dead connection, which io_uring's
        teardown could otherwise keep up for a while."""
        entry = find_mount(self.mountpoint)  # the top mount there: ours
        if entry is None:
            return
        dev = entry.dev
        self._watchdog = wire.start_watchdog(os.fsencode(self.mountpoint), dev.encode())

    def unmount(self, lazy: bool = True) -> None:
        """Take the mount away (the daemon then sees ENODEV and stops)."""
        try:
            if self.method == "mount":
                wire.sys_umount2(os.fsencode(self.mountpoint), MNT_DETACH if lazy else 0)
            else:
                tool = shutil.which("fusermount3") or shutil.which("fusermount")
                if tool:
                    subprocess.run([tool, "-u", *(["-z"] if lazy else []), "--", self.mountpoint],
                                   capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            if getattr(exc, "errno", None) not in (errno.EINVAL, errno.ENOENT):
                log.debug("unmount of %s: %s", self.mountpoint, exc)

    def finish(self) -> None:
        """After a clean stop: let the watchdog go, close the socket."""
        if self._watchdog is not None:
            pid, wfd = self._watchdog
            try:
                os.write(wfd, b"x")
            except OSError:
                pass
            os.close(wfd)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._helper is not None:
            try:
                self._helper.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("fusermount3 (pid %d) did not exit", self._helper.pid)
            self._helper = None


def can_mount() -> bool:
    """Do we have CAP_SYS_ADMIN (mount(2) works)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 21))
    except OSError:
        pass
    return os.geteuid() == 0


def selinux_enabled() -> bool:
    """Does an SELinux policy run here (so the kernel takes context=)?"""
    return os.path.exists("/sys/fs/selinux/enforce")


def mount(mountpoint: str, *, fsname: str, subtype: str, flags: int,
          allow_other: bool, root_mode: int, context: str | None = None) -> Mounted:
    """Mount a FUSE filesystem on mountpoint; returns the Mounted. context:
    an SELinux label for the kernel (its context= mount option)."""
    method = os.environ.get("OVERLAY_MOUNT_METHOD", "")
    if method not in ("", "mount", "fusermount3"):
        raise MountFailed(errno.EINVAL, f"OVERLAY_MOUNT_METHOD={method}: expected mount or fusermount3")
    if not method:
        method = "mount" if can_mount() else "fusermount3"
    if method == "mount":
        return _mount_direct(mountpoint, fsname, subtype, flags, allow_other, root_mode, context)
    return _mount_fusermount(mountpoint, fsname, subtype, flags, allow_other, context)


def _open_dev() -> int:
    try:
        st = os.stat("/dev/fuse")
    except FileNotFoundError:
        raise MountFailed(errno.ENOENT, "/dev/fuse is missing (load the fuse module: modprobe fuse)") from None
    if not stat.S_ISCHR(st.st_mode):
        raise MountFailed(errno.ENODEV, "/dev/fuse is not a character device")
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MountFailed(exc.errno, f"cannot open /dev/fuse: {exc.strerror}") from None


def _mount_direct(mountpoint, fsname, subtype, flags, allow_other, root_mode, context) -> Mounted:
    fd = _open_dev()
    data = f"fd={fd},rootmode={root_mode:o},user_id={os.getuid()},group_id={os.getgid()}"
    data += ",default_permissions"
    if allow_other:
        data += ",allow_other"
    if context:
        data += f",context={context}"
    try:
        wire.sys_mount(os.fsencode(fsname), os.fsencode(mountpoint),
                       f"fuse.{subtype}".encode(), flags, data.encode())
    except OSError as exc:
        os.close(fd)
        raise MountFailed(exc.errno, f"mount(2) failed: {exc.strerror}") from None
    log.debug("mounted %s with mount(2), fd %d", mountpoint, fd)
    return Mounted(mountpoint, fd, "mount")


def _mount_fusermount(mountpoint, fsname, subtype, flags, allow_other, context) -> Mounted:
    tool = shutil.which("fusermount3")
    if tool is None:
        raise MountFailed(errno.ENOENT, "mounting without root needs fusermount3 "
                          "(install the fuse3 package)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opts = _flag_words(flags) + ["default_permissions", f"fsname={_escape(fsname)}",
                                 f"subtype={_escape(subtype)}", "auto_unmount"]
    if allow_other:
        opts.append("allow_other")
    if context:
        opts.append(f"context={context}")
    env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
    try:
        proc = subprocess.Popen([tool, "-o", ",".join(opts), "--", mountpoint],
                                env=env, pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        ours.close()
        theirs.close()
        raise MountFailed(exc.errno, f"cannot run fusermount3: {exc.strerror}") from None
    theirs.close()
    fd = -1
    try:
        msg, fds, _, _ = socket.recv_fds(ours, 16, 1)
        if fds:
            fd = fds[0]
    except OSError as exc:
        log.debug("receiving the fd from fusermount3: %s", exc)
    if fd < 0:
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        proc.wait()
        ours.close()
        line = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        raise MountFailed(errno.EIO, f"fusermount3 failed: {line}")
    os.set_inheritable(fd, False)
    # with auto_unmount fusermount3 stays, waiting for our end of the socket
    # to close (at our exit or death), then unmounts if the mount is still there
    if proc.stderr:
        proc.stderr.close()
    log.debug("mounted %s with fusermount3 (pid %d), fd %d", mountpoint, proc.pid, fd)
    return Mounted(mountpoint, fd, "fusermount3", ours, proc)
