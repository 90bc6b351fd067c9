"""overlay.daemon: what a serving process sets up, whichever its engine.

The core built from a MountConfig, the fd limit and the fd table, and the
mount's readahead. Both engines (overlay.engine, the native one, and
overlay.fs, the pyfuse3 adapter) call these; overlay.serve picks the
engine. Importing this module loads neither engine nor the core.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time

from overlay.mounttable import find_mount, kernel_overlay_using, our_mounts, same_dir

log = logging.getLogger(__name__)

# Readahead of the FUSE mount (KiB); the kernel's default is 128.
READAHEAD_KIB = 1024


def trusted_xattrs_work(workdir: str) -> bool:
    """Can this process set trusted.* xattrs on the upper layer's
    filesystem (CAP_SYS_ADMIN in the initial user namespace)?"""
    probe = os.path.join(workdir, ".overlay-xattr-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(probe, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return True         # (the core reports what is wrong with the work dir)
    try:
        os.setxattr(fd, "trusted.overlay.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def mount_info(config, mountpoint: str) -> dict:
    """What `overlay list` (and a mount refused for an upper in use) shows
    of this mount: part of its stats."""
    from overlay.options import MountConfig  # noqa: PLC0415

    fields = config._fields()
    options = {k: v for k, v in fields.items()
               if k not in ("lowers", "upper", "work", "datadirs") and v != MountConfig.DEFAULTS.get(k)}
    return {"pid": os.getpid(), "mountpoint": mountpoint, "lowers": list(config.lowers),
            "datadirs": list(config.datadirs), "upper": config.upper, "work": config.work,
            "engine": config.engine, "options": options, "started": time.time()}


def _lock_holder(path: str) -> int | None:
    """PID holding the flock of dir path (/proc/locks), or None."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as fh:
            for line in fh:
                parts = [p for p in line.split() if p != "->"]
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def check_dirs_free(config) -> None:
    """Refuse (EBUSY, one line naming the other mount) an upper or work dir
    that a live kernel overlay uses (its mountinfo names them). Mounts of
    ours are refused by the core's in-use locks (in_use_error)."""
    if config.upper is None:
        return
    for key, what, ours in (("upperdir", "upper dir", config.upper), ("workdir", "work dir", config.work)):
        entry = kernel_overlay_using(ours, key)
        if entry is not None:
            raise OSError(errno.EBUSY, f"{what} '{ours}' is in use by the kernel overlay"
                                       f" mounted on '{entry.mountpoint}'")


def in_use_error(exc: OSError, config) -> OSError:
    """The core's EBUSY for a locked upper or work dir, made one line naming
    the mount of ours that holds it and its daemon's PID."""
    if "work dir" in str(exc):
        what, key, path = "work dir", "work", config.work
    else:
        what, key, path = "upper dir", "upper", config.upper
    pid = _lock_holder(path)
    for entry, st in our_mounts():
        info = (st or {}).get("mount") or {}
        if (pid is not None and info.get("pid") == pid) or same_dir(info.get(key), path):
            return OSError(errno.EBUSY, f"{what} '{path}' is in use by the overlay mounted on"
                                        f" '{entry.mountpoint}' (PID {info.get('pid', pid)})")
    holder = f" (PID {pid})" if pid is not None else ""
    return OSError(errno.EBUSY, f"{what} '{path}' is in use by another overlay of ours{holder}")


def build_core(config):
    """The Overlay core for a MountConfig. Without the privilege to write
    trusted.* xattrs (rootless containers: a user namespace, or a plain
    user through fusermount3) the overlay's own xattrs are user.overlay.*,
    as the kernel's userxattr, with its rules."""
    from overlay_core import Overlay  # noqa: PLC0415 - the compiled core

    userxattr, redirect_dir, redirect_follow = config.userxattr, config.redirect_dir, config.redirect_follow
    if not userxattr and config.upper is not None and not trusted_xattrs_work(config.work):
        if config.metacopy or config.index or config.nfs_export:
            raise OSError(errno.EPERM, "metacopy, index and nfs_export need trusted.* xattrs,"
                          " which this process may not write (not privileged)")
        log.warning("trusted.* xattrs cannot be written here (not privileged): the overlay's own"
                    " xattrs are user.overlay.* (opaque, origin, impure...), as the kernel's"
                    " userxattr; renaming a lower dir gives EXDEV")
        userxattr, redirect_dir, redirect_follow = True, False, False
    check_dirs_free(config)
    lowers, providers = prepare_blob_layers(config, userxattr)
    if any(p.unprivileged for p in providers.values()):
        userxattr = True        # (a read-only mount too: the skeleton's opaque marks are user.*)
    try:
        core = _new_core(Overlay, config, lowers, userxattr, redirect_dir, redirect_follow)
    except OSError as exc:
        if exc.errno == errno.EBUSY and "in use" in str(exc):
            raise in_use_error(exc, config) from None
        raise
    if providers:
        core.providers = providers
        if getattr(config, "prefetch", None) == "all":
            start_prefetch(providers.values())
    return _with_quota(core, config)


def start_prefetch(layers) -> None:
    """prefetch=all: each blob layer's data filled by a thread of its own,
    in the background (opens meanwhile are served as without it)."""
    import threading  # noqa: PLC0415

    for layer in layers:
        threading.Thread(target=layer.prefetch, name="prefetch", daemon=True).start()


def prepare_blob_layers(config, userxattr: bool = False):
    """Lower layers given as layer blobs (regular files: overlay.images):
    (the lower dirs, with each blob's skeleton dir in its place, {layer
    index: its BlobLayer}). The first mount of a blob builds its index.
    userxattr: the core's own xattrs are user.overlay.* (a skeleton's
    opaque marks too); without privilege, a skeleton keeps owners and
    modes in xattrs (overlay.images.layer.OWNER_XATTR)."""
    lowers = list(config.lowers)
    providers = {}
    unprivileged = None
    image = getattr(config, "image", None)
    if image is not None:
        from overlay.images.blob import BlobError  # noqa: PLC0415 - only for images
        from overlay.images.layer import default_cache  # noqa: PLC0415
        from overlay.images.registry import Ref, layers_of  # noqa: PLC0415
        try:
            lowers = layers_of(Ref(image), getattr(config, "blob_cache", None) or default_cache(),
                               getattr(config, "tls_verify", True), getattr(config, "authfile", None))
        except BlobError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        if not lowers:
            raise OSError(errno.EINVAL, f"image={image}: the image has no layers")
    remote = _remote_layers(config, lowers)
    for i, path in enumerate(lowers):
        local = isinstance(path, str)       # (else a zstd:chunked or eStargz blob in a registry)
        if local and os.path.isdir(path):
            if os.path.basename(path) == "tree" and os.geteuid() == 0:
                _store_layer(config, lowers, providers, i)
            continue
        from overlay.images.blob import BlobError  # noqa: PLC0415 - only for blobs
        from overlay.images.layer import BlobLayer  # noqa: PLC0415
        try:
            layer = remote[i] if not local else BlobLayer(path, getattr(config, "blob_cache", None))
            # (a registry's table of contents: the tree is made as it is
            # looked into, the first file readable before all of it is)
            layer.lazy = not local
            if unprivileged is None:
                os.makedirs(layer.cache, exist_ok=True)
                unprivileged = not trusted_xattrs_work(layer.cache)
            layer.userxattr = userxattr or unprivileged
            layer.unprivileged = unprivileged
            lowers[i] = layer.prepare()
        except BlobError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        providers[i] = layer
    limit = getattr(config, "blob_cache_max", None)
    if providers and limit is not None:
        from overlay.images.cache import trim  # noqa: PLC0415 - only for images
        from overlay.images.layer import default_cache  # noqa: PLC0415

        trim(getattr(config, "blob_cache", None) or default_cache(), limit)
    return lowers, providers


def _remote_layers(config, lowers) -> dict:
    """{index: ChunkedLayer} of the lowers that are blobs in a registry,
    their tables of contents fetched side by side (fetch_ahead) while the
    first is read."""
    if all(isinstance(p, str) for p in lowers):
        return {}
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only for images

    from overlay.images.blob import BlobError  # noqa: PLC0415
    from overlay.images.chunked import ChunkedLayer  # noqa: PLC0415
    try:
        remote = {i: ChunkedLayer(p, getattr(config, "blob_cache", None))
                  for i, p in enumerate(lowers) if not isinstance(p, str)}
    except BlobError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
    pool = ThreadPoolExecutor(4, thread_name_prefix="toc")
    for layer in remote.values():
        layer.fetch_ahead(pool)
    pool.shutdown(wait=False)       # (its threads end with the last table)
    return remote


def _store_layer(config, lowers, providers, i) -> None:
    """A lower dir that is a link to a layer skeleton made by our layer
    store (podman passes links to it, resolved by then): its files are
    filled when opened (overlay.images.store)."""
    from overlay.images.store import provider_for  # noqa: PLC0415 - only for images

    layer = provider_for(lowers[i])
    if layer is not None:
        try:
            lowers[i] = layer.prepare()
        except Exception as exc:  # noqa: BLE001 - one line for any failure
            raise OSError(errno.EIO, f"lower layer '{lowers[i]}' (a layer store's): {exc}") from None
        providers[i] = layer


def _new_core(Overlay, config, lowers, userxattr, redirect_dir, redirect_follow):
    return Overlay(
        lowers,
        config.upper,
        config.work,
        userxattr=userxattr,
        redirect_dir=redirect_dir,
        redirect_follow=redirect_follow,
        no_sync=config.volatile or config.no_fsync,
        volatile_marker=config.volatile,
        oci_whiteouts=config.oci_whiteouts,
        uuid=config.uuid,
        xino=config.xino,
        index=config.index,
        metacopy=config.metacopy,
        datadirs=config.datadirs,
        verity=config.verity,
        nfs_export=config.nfs_export,
        xattr_permissions=config.xattr_permissions,
        read_only=config.read_only,
        posix_acl=not config.noacl,
        atime=config.atime,
        # the native engine has the kernel cache listings (CACHE_DIR):
        # keeping them here too would cost memory for every inode
        keep_listings=config.engine == "pyfuse3",
    )


def _with_quota(core, config):
    if config.quota_bytes is not None or config.quota_inodes is not None:
        try:
            took = core.set_quota(config.quota_bytes, config.quota_inodes)
        except BaseException:
            core.close()
            raise
        log.info("quota: the upper layer holds %d bytes in %d inodes (counted in %.2f s);"
                 " limits: %s bytes, %s inodes", core.q_bytes, core.q_inodes, took,
                 config.quota_bytes if config.quota_bytes is not None else "no",
                 config.quota_inodes if config.quota_inodes is not None else "no")
    return core


def raise_fd_limit() -> None:
    """Directories keep their O_PATH fds open while the kernel knows them
    (the fds of other objects live in a bounded cache, see overlay_core):
    allow as many as we may. Where the dirs still need more, the engine has
    the kernel drop some (OverlayFS._relieve)."""
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
