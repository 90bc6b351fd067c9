"""The blob cache's size limit (blob_cache_max=): whole layers that no
mount uses are removed, least recently used first, until the cache holds
no more than the limit.

Every layer in use is held: a mount (and the layer store) keeps a shared
flock on CACHE/locks/HEX from before it prepares the layer until it ends;
its mtime is the layer's last use. trim() removes a layer only when it
gets that lock exclusively (no one uses it), and with it what belongs to
it: CACHE/sha256/HEX (skeleton, index, data) and CACHE/blobs/sha256/HEX (a
blob fetched whole). The layers being used are never touched: their data
may take the cache past the limit while they are mounted (one line in the
log says so).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil

log = logging.getLogger("overlay.images")


def hold(cache: str, hexd: str) -> int:
    """A shared hold on the layer HEX for as long as the fd stays open
    (marks it used now)."""
    d = os.path.join(cache, "locks")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, hexd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.utime(fd)
    return fd


def _usage(path: str) -> int:
    """Bytes on disk under path (a file or a tree; links not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total = st.st_blocks * 512
    if os.path.isdir(path) and not os.path.islink(path):
        for dp, dn, fn in os.walk(path):
            for n in dn + fn:
                try:
                    total += os.lstat(os.path.join(dp, n)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def _parts(cache: str, hexd: str) -> list[str]:
    return [os.path.join(cache, "sha256", hexd), os.path.join(cache, "blobs", "sha256", hexd)]


def trim(cache: str, limit: int) -> int:
    """Remove unused layers, least recently used first, until the cache
    holds at most limit bytes; returns the bytes it holds then."""
    layers = {}
    for sub in ("sha256", os.path.join("blobs", "sha256")):
        try:
            names = os.listdir(os.path.join(cache, sub))
        except FileNotFoundError:
            continue
        for n in names:
            if len(n) == 64 and all(c in "0123456789abcdef" for c in n):
                layers.setdefault(n, 0)
    for hexd in layers:
        layers[hexd] = sum(_usage(p) for p in _parts(cache, hexd))
    total = sum(layers.values())
    if total <= limit:
        return total

    def last_use(hexd):
        try:
            return os.stat(os.path.join(cache, "locks", hexd)).st_mtime
        except FileNotFoundError:
            return 0.0
    for hexd in sorted(layers, key=last_use):
        if total <= limit:
            break
        lock = os.path.join(cache, "locks", hexd)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue            # in use
            for p in _parts(cache, hexd):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.lexists(p):
                    os.unlink(p)
            # (the lock file stays: one waiting for it holds that one)
            log.info("blob cache: removed layer sha256:%s (%d bytes, unused)", hexd, layers[hexd])
            total -= layers[hexd]
        finally:
            os.close(fd)
    if total > limit:
        log.warning("blob cache %s holds %d bytes, over blob_cache_max=%d: the rest is in use", cache, total, limit)
    return total
