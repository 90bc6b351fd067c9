"""The core's fd cache under pressure (OVERLAY_FD_CACHE=4 here; in real
use a tree far bigger than the cache, a quarter of RLIMIT_NOFILE): creates
over deleted lower files, held read-only fds (which pin their Nodes),
writes and stats. It used to end with open(O_WRONLY) failing with ENODATA:
with every other Node pinned, holding a Node's fds evicted that very Node
(_Stack._hold), so copy_up saw it without an upper, then with one, and
took it for a metacopy to complete (sendfile of the file onto itself, then
removexattr of trusted.overlay.metacopy -> ENODATA)."""

from __future__ import annotations

import os
import random

import mountutil
from relutil import mkdirs, relmounts, reltmp  # noqa: F401  (fixtures)


def test_writes_and_recreates_under_fd_cache_pressure(reltmp, relmounts, monkeypatch):
    lo, up, wk, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.makedirs(f"{lo}/own")
    for i in range(20):
        with open(f"{lo}/own/a{i}", "wb") as f:
            f.write(b"x" * (1000 * i + 1))
    monkeypatch.setenv("OVERLAY_FD_CACHE", "4")
    relmounts.ours([lo], up, wk, mp)
    m = f"{mp}/own"
    r = random.Random(1)
    model = {f"a{i}": 1000 * i + 1 for i in range(20)}
    held = {}
    try:
        for _step in range(400):
            n = f"a{r.randrange(20)}"
            p = f"{m}/{n}"
            k = r.random()
            if k < 0.3:
                if n in model:
                    os.unlink(p)
                    del model[n]
                size = r.randrange(1, 100000)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, b"c" * size)
                os.close(fd)
                model[n] = size
            elif k < 0.5 and n in model:
                fd = os.open(p, os.O_WRONLY)
                off = r.randrange(1, 100000)
                os.pwrite(fd, b"w" * 10, off)
                os.close(fd)
                model[n] = max(model[n], off + 10)
            elif k < 0.6 and n in model:
                if len(held) < 6:
                    held[os.open(p, os.O_RDONLY)] = n
            elif k < 0.65 and held:
                fd = r.choice(list(held))
                os.close(fd)
                del held[fd]
            elif n in model:
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = len(os.pread(fd, 1 << 20, 0))
                finally:
                    os.close(fd)
                assert (os.stat(p).st_size, got) == (model[n], model[n]), n
    finally:
        for fd in held:
            os.close(fd)
    mountutil.umount(mp)
