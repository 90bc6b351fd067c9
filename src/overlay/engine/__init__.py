"""overlay.engine: the native FUSE engine (the default, engine=native).

Three layers, each in its own module:

* ``wire`` (Cython): the kernel's FUSE protocol on /dev/fuse: the ABI
  (``abi.pxd``, protocol 7.45 negotiated down to 7.34), worker threads that
  each read their own cloned fd with the GIL released, INIT, replies,
  notifications, and the system calls mounting needs;
* ``bridge`` (Cython): requests to overlay nodes: node ids, lookup counts,
  file handles, backing ids; calls into overlay_core;
* ``mount``: mount(2) as root, fusermount3 otherwise, and the watchdog.

run_native() puts them together for one mount.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
from typing import Callable

log = logging.getLogger("overlay.engine")

# How long the kernel may take to send INIT after mount(2).
INIT_TIMEOUT = 30.0
# Worker threads when the options do not say (workers=N). Measured on 2
# CPUs (3 runs each of workers=1, 2, 4, 8; README, "Benchmarks"): 4 is
# 8-15% faster than 2 on untar, cp -a and fresh stat (the kernel sends
# FORGETs, RELEASEs and readahead beside the caller's requests), 8 no
# faster than 4; one create+close alone is 15% slower than with 2.
DEFAULT_WORKERS = 4


def run_native(config, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Mount config on mountpoint and serve until it is unmounted, or until
    SIGTERM, SIGINT or SIGHUP (which unmount). Calls on_ready() once the
    mount answers requests."""
    from overlay import daemon
    from overlay.engine import mount as mnt
    from overlay.engine.bridge import OverlayFS
    from overlay.idmap import IdMap
    from overlay.options import default_flags, vfs_flags

    state = {"stop": False, "fs": None, "mount": None}

    def on_signal(sig, frame):
        log.info("signal %d: unmounting", sig)
        state["stop"] = True
        if state["mount"] is not None:
            state["mount"].unmount(lazy=True)
        if state["fs"] is not None:
            state["fs"].stop()

    old = {}
    if threading.current_thread() is threading.main_thread():
        # before anything is mounted: a signal in the middle of mounting
        # must still end in a clean unmount
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[sig] = signal.signal(sig, on_signal)
    try:
        daemon.raise_fd_limit()
        daemon.presize_fd_table()
        core = daemon.build_core(config)
        try:
            fs = OverlayFS(
                core,
                entry_timeout=config.entry_timeout,
                attr_timeout=config.attr_timeout,
                uidmap=IdMap.parse(config.uidmapping, "uidmapping") if config.uidmapping else None,
                gidmap=IdMap.parse(config.gidmapping, "gidmapping") if config.gidmapping else None,
                squash_to_root=config.squash_to_root,
                squash_to_uid=config.squash_to_uid,
                squash_to_gid=config.squash_to_gid,
                static_nlink=config.static_nlink,
                ino32=config.ino32,
                noxattrs=config.noxattrs,
            )
            fs.no_acl = config.noacl
            fs.want_writeback = config.writeback
            # nfs_export=on: the kernel's file handles (node ids) of our
            # objects are decoded even once it has forgotten them
            fs.want_export = core.nfs_export
            # passthrough needs CAP_SYS_ADMIN (BACKING_OPEN) and excludes
            # the writeback cache
            # (and a quota on bytes, which counts every write)
            fs.want_passthrough = (config.passthrough and not config.writeback
                                   and config.quota_bytes is None and mnt.can_mount())
            fs.stack_depth = _stack_depth(config)
            fs.debug = config.debug
            fs.strictatime = fs.dir_handles = config.atime[0] == "strictatime" and not config.read_only
            fs.want_uring = _want_uring(config)
            fs.uring_depth = config.uring_depth
            fs.mount_info = daemon.mount_info(config, mountpoint)
            flags = vfs_flags(config.ignored, config.read_only, base=default_flags())
            context = None
            if config.context:
                # an SELinux label: the kernel takes it where SELinux runs
                if mnt.selinux_enabled():
                    context = config.context
                else:
                    log.info("context=%s: SELinux is not enabled here, no label applied",
                             config.context)
            m = mnt.mount(mountpoint, fsname=config.fsname, subtype=config.subtype, flags=flags,
                          allow_other=bool(config.allow_other), root_mode=stat.S_IFDIR,
                          context=context)
            state["mount"] = m
            state["fs"] = fs
            _serve(fs, m, config, mountpoint, on_ready, state)
        finally:
            core.close()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


OVERLAYFS_MAGIC = 0x794C7630
FUSE_MAGIC = 0x65735546


def _stack_depth(config) -> int:
    """max_stack_depth for passthrough: 2 when a layer is itself on an
    overlay or FUSE filesystem (then this mount cannot be a layer of a
    kernel overlay), else 1."""
    from overlay.engine.wire import fs_type

    for path in [*config.lowers, *config.datadirs, *([config.upper] if config.upper else [])]:
        try:
            if fs_type(path) in (OVERLAYFS_MAGIC, FUSE_MAGIC):
                return 2
        except OSError:
            pass
    return 1


def _follow_remounts(fs, mountpoint) -> None:
    """A thread that keeps the atime rules of the layers as the mount's
    flags say after `mount -o remount,...` (ro, noatime, strictatime,
    nodiratime): it waits for changes of the mount table (poll on
    /proc/self/mountinfo) and rereads this mount's flags."""
    import select
    import threading

    from overlay.mounttable import find_mount, iter_mounts
    from overlay.options import mountinfo_atime

    entry = find_mount(mountpoint)
    if entry is None:
        return
    mount_id, state = entry.mount_id, mountinfo_atime(entry.options)

    def watch():
        nonlocal state
        try:
            f = open("/proc/self/mountinfo", "rb")
        except OSError:
            return
        with f:
            p = select.poll()
            p.register(f, select.POLLPRI | select.POLLERR)
            while not fs.stopping:
                if not p.poll(1000):
                    continue
                f.seek(0)
                f.read()        # (rearms the event)
                now = next((mountinfo_atime(e.options) for e in iter_mounts() if e.mount_id == mount_id),
                           None)
                if now is None:
                    return      # unmounted
                if now != state:
                    state = now
                    read_only, atime = now
                    log.info("mount flags changed: %s%s%s", "ro, " if read_only else "", atime[0],
                             ", nodiratime" if atime[1] else "")
                    fs.core.set_atime(atime, read_only)
                    fs.strictatime = atime[0] == "strictatime" and not read_only

    threading.Thread(target=watch, name="remounts", daemon=True).start()


def _want_uring(config) -> bool:
    """Ask the kernel for FUSE over io_uring? auto: where it is switched on;
    on: always, switching it on as root (with a line in the log), an error
    where this kernel has none."""
    from overlay.engine.wire import enable_uring, uring_enabled

    if config.uring == "off":
        return False
    on = uring_enabled()
    if config.uring == "auto":
        return bool(on)
    if on is None:
        raise OSError(95, "uring=on: this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING)")
    if not on:
        if not enable_uring():
            raise OSError(1, "uring=on: FUSE over io_uring is off and cannot be switched on here"
                          " (as root: echo Y > /sys/module/fuse/parameters/enable_uring)")
        log.info("uring=on: switched FUSE over io_uring on (/sys/module/fuse/parameters/enable_uring)")
    return True


def _serve(fs, m, config, mountpoint, on_ready, state) -> None:
    from overlay import daemon

    clean = False
    try:
        m.start_watchdog()
        fs.start(m.fd, config.workers or DEFAULT_WORKERS)
        if state["stop"]:
            return
        if not fs.wait_init(INIT_TIMEOUT):
            raise OSError(110, f"the kernel sent no INIT within {INIT_TIMEOUT:g} s")
        if fs.init_error:
            raise OSError(71, fs.init_error)
        if config.uring == "on" and not fs.uring:
            raise OSError(95, "uring=on: the kernel did not take FUSE over io_uring"
                          + (f" ({fs.uring_error})" if fs.uring_error else ""))
        os.statvfs(mountpoint)          # a request answered: the mount is live
        daemon.set_readahead(mountpoint)
        if state["stop"]:
            return
        on_ready()
        _follow_remounts(fs, mountpoint)
        while not fs.wait(1.0):
            pass
        clean = True
    finally:
        if not clean or state["stop"]:
            m.unmount(lazy=True)
        fs.stop()
        fs.close()
        m.finish()
