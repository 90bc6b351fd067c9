"""overlay.daemon: what a serving process sets up, whichever its engine.

The core built from a MountConfig, the fd limit and the fd table, and the
mount's readahead. Both engines (overlay.engine, the native one, and
overlay.fs, the pyfuse3 adapter) call these; overlay.serve picks the
engine. Importing this module loads neither engine nor the core.
"""

from __future__ import annotations

import logging
import os
import resource

from overlay.mounttable import find_mount

log = logging.getLogger(__name__)

# Readahead of the FUSE mount (KiB); the kernel's default is 128.
READAHEAD_KIB = 1024


def build_core(config):
    """The Overlay core for a MountConfig."""
    from overlay_core import Overlay  # noqa: PLC0415 - the compiled core

    return Overlay(
        config.lowers,
        config.upper,
        config.work,
        userxattr=config.userxattr,
        redirect_dir=config.redirect_dir,
        redirect_follow=config.redirect_follow,
        no_sync=config.volatile,
        oci_whiteouts=config.oci_whiteouts,
        uuid=config.uuid,
        xino=config.xino,
        index=config.index,
        metacopy=config.metacopy,
        datadirs=config.datadirs,
        verity=config.verity,
        nfs_export=config.nfs_export,
        # the native engine has the kernel cache listings (CACHE_DIR):
        # keeping them here too would cost memory for every inode
        keep_listings=config.engine == "pyfuse3",
    )


def raise_fd_limit() -> None:
    """Directories keep their O_PATH fds open (the fds of other objects live
    in a bounded cache, see overlay_core): allow as many as we may."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.debug("RLIMIT_NOFILE not raised: %s", exc)


# How many fds the table is grown to at start (see presize_fd_table).
FD_TABLE_SIZE = 32768


def presize_fd_table(size: int = FD_TABLE_SIZE) -> None:
    """Grow this process's fd table once, while it is single-threaded.

    The daemon holds an O_PATH fd per known node. Each time the fd table has
    to grow (at 64, 128, 256... fds) a multi-threaded process waits for an
    RCU grace period, several milliseconds: lookups stalled 5-15 ms at those
    points. Grown before the worker threads start, it costs nothing."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        top = min(size, soft if soft != resource.RLIM_INFINITY else size) - 1
        if top > 64:
            os.close(os.dup2(0, top, inheritable=False))
    except OSError as exc:
        log.debug("fd table not grown: %s", exc)


def set_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Raise the readahead of the FUSE mount (the kernel default is 128 KiB):
    streaming reads then reach the daemon as bigger requests, several in
    flight."""
    entry = find_mount(mountpoint)  # not stat(): that would ask our own filesystem
    if entry is None:
        return
    dev = entry.dev
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("readahead not set for %s: %s", dev, exc)
