"""Load tests on real mounts (tests/test_stress.py); scripts/soak.py runs them long.

* ``test_fsx_stress``: in the manner of fsx, several processes (4) do random
  reads, writes, truncates, appends, renames, unlinks, creates, fsyncs,
  stats, listings and mmap reads over files of their own and files shared by
  all of them, most of which start in one of two lower layers (some hidden
  by whiteouts), while keeping an in-memory model of what every file must
  hold.  After every operation the file(s) it touched are read back whole
  and compared with the model (and through every fd kept open on them:
  fds opened before a copy-up must follow the copy, except, with FUSE
  passthrough, read-only fds opened while the file was still in a lower
  layer: those keep reading the lower file, as the README says).  Shared files are
  changed under one lock (a multiprocessing lock; their model lives in a
  manager dict) so the model stays deterministic.  At the end every file and
  directory listing is checked once more, then the upper dir is mounted by
  the kernel overlay and checked against the model again.  Zero mismatches
  are allowed.  CI-sized: REL_STRESS_SECONDS (default 15) per configuration;
  three configurations: the defaults, ``workers=4,timeout=0`` (requests
  served concurrently, nothing cached by the kernel) and ``passthrough=off``
  (file data through the daemon).
* ``test_lookup_memory_bounded``: lookups and opens over a tree of 20,000
  files (fewer if the hard RLIMIT_NOFILE cannot hold an fd per file) (stat and open/close of random files from 2 processes, mounted with
  ``timeout=0`` so every lookup reaches the daemon): the daemon's peak RSS
  (VmHWM) stays under a generous bound and its RSS does not keep growing
  (after 20% of the operations vs at the end).  REL_MEM_OPS (default
  50,000; the soak script runs 1,000,000).  The daemon gets an
  RLIMIT_NOFILE that holds the tree: it holds an fd per cached inode, which
  ``test_fd_limit_does_not_limit_tree_size`` shows to be a limit of its own
  (a walk over 5,000 files with the common limit of 1024).

Figures (operations, mismatches, RSS) are printed; run with ``-s`` to see
them.  Scratch dirs are /tmp/rel-*.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import resource
import sys
import time
import traceback

import pytest

import mountutil
from relutil import (  # noqa: F401  (fixtures)
    Daemon,
    mkdirs,
    relmounts,
    reltmp,
    vm_status,
)

STRESS_SECONDS = float(os.environ.get("REL_STRESS_SECONDS", "10"))
MEM_OPS = int(os.environ.get("REL_MEM_OPS", "50000"))
NWORKERS = int(os.environ.get("REL_STRESS_WORKERS", "4"))
MAXLEN = 256 * 1024
NPRIV = 10          # candidate names per worker and directory
NSHARED = 8


# ---------------------------------------------------------------------------
# layers


def _rand(rnd, n) -> bytes:
    return rnd.randbytes(n)


def build_stress_layers(base, nworkers, seed=1):
    """Two lower layers, an empty upper; returns (dirs, expected merged
    content {relpath: bytes or None})."""
    l1, l2, u, w = mkdirs(base, "l1", "l2", "u", "w")
    rnd = random.Random(seed)
    expect = {}

    def put(layer, rel, data):
        p = os.path.join(layer, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)

    names = []
    for wid in range(nworkers):
        names += [f"mix/w{wid}-{k}" for k in range(NPRIV)]
        names += [f"own{wid}/a{k}" for k in range(NPRIV)]
    names += [f"shared/s{k}" for k in range(NSHARED)]
    for rel in names:
        r = rnd.random()
        if r < 0.35:            # only in the bottom layer
            data = _rand(rnd, rnd.randrange(0, 96 * 1024))
            put(l2, rel, data)
            expect[rel] = data
        elif r < 0.6:           # top layer over the bottom one
            put(l2, rel, _rand(rnd, rnd.randrange(0, 4096)))
            data = _rand(rnd, rnd.randrange(0, 96 * 1024))
            put(l1, rel, data)
            expect[rel] = data
        elif r < 0.75:          # only in the top layer
            data = _rand(rnd, rnd.randrange(0, 96 * 1024))
            put(l1, rel, data)
            expect[rel] = data
        elif r < 0.85:          # hidden by a whiteout in the top layer
            put(l2, rel, _rand(rnd, 100))
            os.makedirs(os.path.dirname(os.path.join(l1, rel)), exist_ok=True)
            os.mknod(os.path.join(l1, rel), 0o020000, os.makedev(0, 0))
            expect[rel] = None
        else:                   # absent
            expect[rel] = None
    for d in ["mix", "shared"] + [f"own{i}" for i in range(nworkers)]:
        os.makedirs(os.path.join(l2, d), exist_ok=True)
        os.makedirs(os.path.join(l1, d), exist_ok=True)
    return (l1, l2, u, w), expect


# ---------------------------------------------------------------------------
# the worker


class Mismatch(Exception):
    pass


def _read_all(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _pread_all(fd) -> bytes:
    out = []
    off = 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            return b"".join(out)
        out.append(b)
        off += len(b)


def _diff(expected: bytes, actual: bytes) -> str:
    n = min(len(expected), len(actual))
    first = next((i for i in range(n) if expected[i] != actual[i]), n)
    return f"expected {len(expected)} bytes, got {len(actual)}; first difference at {first}"


class Worker:
    """One fsx-like process. Private files: mix/w{id}-* and own{id}/a*."""

    def __init__(self, wid, mp, expect, seed, lock, shared, passthrough=False):
        self.wid = wid
        self.passthrough = passthrough  # read-only fds on lower files keep the lower file
        self.mp = mp
        self.rnd = random.Random(seed)
        self.lock = lock
        self.shared = shared           # manager dict: rel -> bytes (absent: missing)
        self.names = {}                # rel -> obj id
        self.objs = {}                 # obj id -> bytearray
        self.fds = {}                  # fd -> (obj id, writable, frozen content or None)
        self.copied = set()            # obj ids that are (or were created) in the upper layer
        self.next_obj = 0
        self.cands = [f"mix/w{wid}-{k}" for k in range(NPRIV)] + [f"own{wid}/a{k}" for k in range(NPRIV)]
        for rel in self.cands:
            if expect.get(rel) is not None:
                self.names[rel] = self._new_obj(expect[rel], copied=False)
        self.ops = 0
        self.mismatches = []
        self.counts = {}
        self.last = []

    def _new_obj(self, data=b"", copied=True) -> int:
        self.next_obj += 1
        self.objs[self.next_obj] = bytearray(data)
        if copied:
            self.copied.add(self.next_obj)
        return self.next_obj

    def path(self, rel):
        return os.path.join(self.mp, rel)

    def fail(self, what):
        if len(self.mismatches) < 20:
            self.mismatches.append(f"op {self.ops} ({' '.join(self.last[-3:])}): {what}")
        else:
            self.mismatches.append("...")

    # -- checks

    def check_name(self, rel, expected):
        """Read rel whole from the mount and compare with `expected` (None:
        must not exist)."""
        p = self.path(rel)
        if expected is None:
            try:
                os.lstat(p)
            except FileNotFoundError:
                return True
            self.fail(f"{rel} exists, expected it gone")
            return False
        try:
            actual = _read_all(p)
            size = os.stat(p).st_size
        except OSError as e:
            self.fail(f"{rel}: {e}")
            return False
        if actual != expected or size != len(expected):
            self.fail(f"{rel}: {_diff(bytes(expected), actual)} (st_size {size})")
            return False
        return True

    def check_private(self, rel):
        obj = self.names.get(rel)
        ok = self.check_name(rel, None if obj is None else self.objs[obj])
        if not ok:
            self.resync(rel)
        if obj is not None:
            self.check_fds(obj)

    def check_fds(self, obj):
        for fd, (o, _, frozen) in list(self.fds.items()):
            if o != obj:
                continue
            actual = _pread_all(fd)
            want = frozen if frozen is not None else self.objs[obj]
            if actual != want:
                self.fail(f"fd {fd} (obj {obj}{', lower' if frozen is not None else ''}): "
                          f"{_diff(bytes(want), actual)}; {self._fd_facts(fd, obj)}")
                if frozen is None:
                    self.objs[obj] = bytearray(actual)

    def _fd_facts(self, fd, obj) -> str:
        """What a failure message needs to tell a stale fd from a wrong model:
        the fd's flags and attributes beside those of the obj's names."""
        def attrs(st):
            return f"ino {st.st_ino} size {st.st_size} mtime {st.st_mtime_ns}"
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = next(ln.split()[1] for ln in f if ln.startswith("flags:"))
            facts = [f"fd flags {flags} {attrs(os.fstat(fd))}"]
        except OSError as e:
            facts = [f"fd: {e}"]
        for n, o in self.names.items():
            if o == obj:
                try:
                    facts.append(f"{n}: {attrs(os.stat(self.path(n)))}")
                except OSError as e:
                    facts.append(f"{n}: {e}")
        facts.append(f"copied {obj in self.copied}, writable {self.fds[fd][1]}")
        return "; ".join(facts)

    def resync(self, rel):
        try:
            data = _read_all(self.path(rel))
        except FileNotFoundError:
            self.names.pop(rel, None)
            return
        if rel not in self.names:
            self.names[rel] = self._new_obj()
        self.objs[self.names[rel]] = bytearray(data)

    def gc(self):
        live = set(self.names.values()) | {o for o, _, _ in self.fds.values()}
        for o in list(self.objs):
            if o not in live:
                del self.objs[o]

    # -- model helpers

    @staticmethod
    def apply_write(buf: bytearray, off: int, data: bytes):
        if off > len(buf):
            buf.extend(b"\0" * (off - len(buf)))
        buf[off:off + len(data)] = data

    @staticmethod
    def apply_truncate(buf: bytearray, size: int):
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(b"\0" * (size - len(buf)))

    # -- private operations

    def op_private(self):
        r = self.rnd
        rel = r.choice(self.cands)
        exists = rel in self.names
        kinds = (["read"] * 5 + ["write"] * 6 + ["truncate"] * 2 + ["append"] * 2 + ["rename"] * 2
                 + ["unlink"] * 2 + ["create"] * 2 + ["fsync"] + ["stat"] * 2 + ["list"]
                 + ["fdread"] * 2 + ["fdopen"] + ["fdclose"] + ["mmap"] + ["fdwrite"])
        kind = r.choice(kinds)
        self.last.append(f"{kind}:{rel}")
        del self.last[:-5]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        p = self.path(rel)
        if kind in ("create",) or not exists:
            if kind not in ("create", "stat", "list", "fdclose", "fdread"):
                kind = "create"
        if kind == "create":
            data = _rand(r, r.randrange(0, 64 * 1024))
            if exists and r.random() < 0.5:
                fd = os.open(p, os.O_WRONLY | os.O_TRUNC)      # O_TRUNC on an existing file
                obj = self.names[rel]
                self.copied.add(obj)
                self.objs[obj][:] = b""
            else:
                if exists:
                    os.unlink(p)
                    del self.names[rel]
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                obj = self._new_obj()
                self.names[rel] = obj
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.objs[obj][:] = data
            self.check_private(rel)
        elif kind == "read":
            buf = self.objs[self.names[rel]]
            off = r.randrange(0, len(buf) + 1)
            n = r.randrange(1, 64 * 1024)
            fd = os.open(p, os.O_RDONLY)
            try:
                got = os.pread(fd, n, off)
            finally:
                os.close(fd)
            if got != buf[off:off + n]:
                self.fail(f"read {rel} [{off}:+{n}]: {_diff(bytes(buf[off:off + n]), got)}")
                self.resync(rel)
            self.check_private(rel)
        elif kind in ("write", "append"):
            obj = self.names[rel]
            self.copied.add(obj)
            buf = self.objs[obj]
            data = _rand(r, r.randrange(1, 32 * 1024))
            if kind == "append":
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                off = len(buf)
            else:
                fd = os.open(p, os.O_RDWR if r.random() < 0.3 else os.O_WRONLY)
                off = r.randrange(0, min(len(buf) + 64 * 1024, MAXLEN - len(data)))
            try:
                if kind == "append":
                    os.write(fd, data)
                else:
                    os.pwrite(fd, data, off)
            finally:
                os.close(fd)
            self.apply_write(buf, off, data)
            self.check_private(rel)
        elif kind == "truncate":
            obj = self.names[rel]
            self.copied.add(obj)
            size = r.randrange(0, MAXLEN // 2)
            if r.random() < 0.5:
                os.truncate(p, size)
            else:
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            self.apply_truncate(self.objs[obj], size)
            self.check_private(rel)
        elif kind == "rename":
            dst = r.choice(self.cands)
            os.rename(p, self.path(dst))
            if dst != rel:      # rename(p, p) does nothing: no copy-up
                self.copied.add(self.names[rel])
                self.names[dst] = self.names.pop(rel)
            self.check_private(dst)
            self.check_private(rel)
        elif kind == "unlink":
            os.unlink(p)
            del self.names[rel]
            self.check_private(rel)
        elif kind == "fsync":
            self.copied.add(self.names[rel])
            fd = os.open(p, os.O_RDWR)
            try:
                os.fsync(fd) if r.random() < 0.5 else os.fdatasync(fd)
            finally:
                os.close(fd)
            self.check_private(rel)
        elif kind == "stat":
            try:
                st = os.stat(p)
            except FileNotFoundError:
                if exists:
                    self.fail(f"stat {rel}: ENOENT, expected a file")
                    self.resync(rel)
            else:
                if not exists:
                    self.fail(f"stat {rel}: exists, expected ENOENT")
                    self.resync(rel)
                elif st.st_size != len(self.objs[self.names[rel]]):
                    self.fail(f"stat {rel}: size {st.st_size}, expected {len(self.objs[self.names[rel]])}")
                    self.resync(rel)
        elif kind == "list":
            d = os.path.dirname(rel)
            prefix = f"w{self.wid}-" if d == "mix" else ""
            got = sorted(n for n in os.listdir(self.path(d)) if n.startswith(prefix))
            want = sorted(os.path.basename(n) for n in self.names if os.path.dirname(n) == d)
            if got != want:
                self.fail(f"listdir {d}: {got} != {want}")
        elif kind == "fdopen":
            if len(self.fds) < 6:
                writable = r.random() < 0.3
                obj = self.names[rel]
                fd = os.open(p, os.O_RDWR if writable else os.O_RDONLY)
                if writable:
                    self.copied.add(obj)
                frozen = None
                if self.passthrough and not writable and obj not in self.copied:
                    frozen = bytes(self.objs[obj])
                self.fds[fd] = (obj, writable, frozen)
                self.check_fds(obj)
        elif kind == "fdclose":
            if self.fds:
                fd = r.choice(list(self.fds))
                os.close(fd)
                del self.fds[fd]
        elif kind == "fdread":
            if self.fds:
                fd = r.choice(list(self.fds))
                self.check_fds(self.fds[fd][0])
        elif kind == "fdwrite":
            w = [fd for fd, (_, wr, _) in self.fds.items() if wr]
            if w:
                fd = r.choice(w)
                obj = self.fds[fd][0]
                data = _rand(r, r.randrange(1, 16 * 1024))
                off = r.randrange(0, MAXLEN // 2)
                os.pwrite(fd, data, off)
                self.apply_write(self.objs[obj], off, data)
                self.check_fds(obj)
                for n, o in self.names.items():
                    if o == obj:
                        self.check_private(n)
        elif kind == "mmap":
            buf = self.objs[self.names[rel]]
            if buf:
                fd = os.open(p, os.O_RDONLY)
                try:
                    with mmap.mmap(fd, len(buf), prot=mmap.PROT_READ) as m:
                        got = m[:]
                finally:
                    os.close(fd)
                if got != buf:
                    self.fail(f"mmap {rel}: {_diff(bytes(buf), got)}")
                    self.resync(rel)
        self.gc()

    # -- shared operations (under the lock; model in the manager dict)

    def op_shared(self):
        r = self.rnd
        rel = f"shared/s{r.randrange(NSHARED)}"
        kind = r.choice(["read", "write", "write", "truncate", "append", "rename", "unlink",
                         "create", "stat"])
        self.last.append(f"shared-{kind}:{rel}")
        del self.last[:-5]
        self.counts["shared-" + kind] = self.counts.get("shared-" + kind, 0) + 1
        p = self.path(rel)
        with self.lock:
            cur = self.shared.get(rel)
            if cur is None and kind not in ("stat",):
                kind = "create"
            if kind == "create":
                data = _rand(r, r.randrange(0, 48 * 1024))
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                self.shared[rel] = data
                touched = [rel]
            elif kind == "read":
                off = r.randrange(0, len(cur) + 1)
                n = r.randrange(1, 32 * 1024)
                fd = os.open(p, os.O_RDONLY)
                try:
                    got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
                if got != cur[off:off + n]:
                    self.fail(f"read {rel} [{off}:+{n}]: {_diff(cur[off:off + n], got)}")
                touched = [rel]
            elif kind in ("write", "append"):
                buf = bytearray(cur)
                data = _rand(r, r.randrange(1, 16 * 1024))
                if kind == "append":
                    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                    off = len(buf)
                else:
                    fd = os.open(p, os.O_WRONLY)
                    off = r.randrange(0, min(len(buf) + 16 * 1024, MAXLEN - len(data)))
                try:
                    if kind == "append":
                        os.write(fd, data)
                    else:
                        os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
                self.apply_write(buf, off, data)
                self.shared[rel] = bytes(buf)
                touched = [rel]
            elif kind == "truncate":
                buf = bytearray(cur)
                size = r.randrange(0, MAXLEN // 4)
                os.truncate(p, size)
                self.apply_truncate(buf, size)
                self.shared[rel] = bytes(buf)
                touched = [rel]
            elif kind == "rename":
                dst = f"shared/s{r.randrange(NSHARED)}"
                os.rename(p, self.path(dst))
                if dst != rel:
                    self.shared[dst] = cur
                    del self.shared[rel]
                touched = [rel, dst]
            elif kind == "unlink":
                os.unlink(p)
                del self.shared[rel]
                touched = [rel]
            else:   # stat
                try:
                    size = os.stat(p).st_size
                except FileNotFoundError:
                    size = None
                want = None if cur is None else len(cur)
                if size != want:
                    self.fail(f"stat {rel}: size {size}, expected {want}")
                touched = []
            for t in touched:
                want = self.shared.get(t)
                if not self.check_name(t, want):
                    try:
                        self.shared[t] = _read_all(self.path(t))
                    except FileNotFoundError:
                        self.shared.pop(t, None)

    def run(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.rnd.random() < 0.3:
                    self.op_shared()
                else:
                    self.op_private()
            except OSError as e:
                self.fail(f"unexpected {errno.errorcode.get(e.errno, e.errno)}: {e}")
                for rel in self.cands:
                    self.resync(rel)
            self.ops += 1
        for fd in list(self.fds):
            obj = self.fds.pop(fd)[0]
            os.close(fd)
        self.gc()
        final = {rel: hashlib.sha1(bytes(self.objs[o])).hexdigest() for rel, o in self.names.items()}
        return {"ops": self.ops, "mismatches": self.mismatches, "final": final,
                "counts": self.counts, "cands": self.cands}


def _worker_main(wid, mp, expect, seed, seconds, lock, shared, q, passthrough=False):
    try:
        w = Worker(wid, mp, expect, seed, lock, shared, passthrough)
        q.put((wid, w.run(seconds)))
    except BaseException:   # noqa: BLE001
        q.put((wid, {"ops": 0, "mismatches": ["worker crashed: " + traceback.format_exc()],
                     "final": {}, "counts": {}, "cands": []}))


def verify_tree(mp, results, shared_model) -> list[str]:
    """Every file of every worker and every shared file, once more."""
    bad = []
    for res in results:
        for rel in res["cands"]:
            want = res["final"].get(rel)
            p = os.path.join(mp, rel)
            if want is None:
                if os.path.lexists(p):
                    bad.append(f"{rel}: exists, expected gone")
                continue
            try:
                got = hashlib.sha1(_read_all(p)).hexdigest()
            except OSError as e:
                bad.append(f"{rel}: {e}")
                continue
            if got != want:
                bad.append(f"{rel}: content differs")
    for k in range(NSHARED):
        rel = f"shared/s{k}"
        want = shared_model.get(rel)
        p = os.path.join(mp, rel)
        if want is None:
            if os.path.lexists(p):
                bad.append(f"{rel}: exists, expected gone")
        else:
            try:
                if _read_all(p) != want:
                    bad.append(f"{rel}: content differs")
            except OSError as e:
                bad.append(f"{rel}: {e}")
    # listings
    names = set()
    for res in results:
        names |= set(res["final"])
    names |= set(shared_model)
    for d in sorted({os.path.dirname(n) for n in names} | {"mix", "shared"}):
        want = sorted(os.path.basename(n) for n in names if os.path.dirname(n) == d)
        got = sorted(os.listdir(os.path.join(mp, d)))
        if got != want:
            bad.append(f"listdir {d}: {got} != {want}")
    return bad


def run_fsx(base, seconds, nworkers=NWORKERS, opts=(), seed=None, tracker=None, log=print,
            kernel_check=True) -> dict:
    """Build layers under base, mount ours, run the workers for `seconds`,
    verify; returns the figures. Raises AssertionError on a mismatch."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    (l1, l2, u, w), expect = build_stress_layers(base, nworkers, seed)
    mp = os.path.join(base, "m")
    own_tracker = tracker is None
    tracker = tracker or mountutil.MountTracker()
    try:
        tracker.ours([l1, l2], u, w, mp, opts)
        ctx = multiprocessing.get_context("fork")
        mgr = ctx.Manager()
        try:
            shared = mgr.dict({k: v for k, v in expect.items() if k.startswith("shared/") and v is not None})
            lock = ctx.Lock()
            q = ctx.Queue()
            procs = [ctx.Process(target=_worker_main,
                                 args=(i, mp, expect, seed * 100 + i, seconds, lock, shared, q,
                                       mountutil.passthrough(opts)))
                     for i in range(nworkers)]
            t0 = time.monotonic()
            for p in procs:
                p.start()
            results = {}
            for _ in procs:
                wid, res = q.get(timeout=seconds + 300)
                results[wid] = res
            for p in procs:
                p.join(timeout=60)
            elapsed = time.monotonic() - t0
            shared_model = dict(shared)
        finally:
            mgr.shutdown()
        results = [results[i] for i in range(nworkers)]
        mismatches = [m for r in results for m in r["mismatches"]]
        final_bad = verify_tree(mp, results, shared_model)
        tracker.umount(mp)
        work_left = os.listdir(os.path.join(w, "work"))
        kernel_bad = []
        if kernel_check and mountutil._probe_kernel_overlay() is None:
            kmp = os.path.join(base, "km")
            tracker.kernel([l1, l2], u, w, kmp, ("redirect_dir=on",))
            kernel_bad = verify_tree(kmp, results, shared_model)
            tracker.umount(kmp)
        ops = sum(r["ops"] for r in results)
        counts = {}
        for r in results:
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0) + v
        figures = {"seed": seed, "ops": ops, "seconds": round(elapsed, 1),
                   "ops_per_s": round(ops / max(elapsed, 1e-9)), "mismatches": len(mismatches),
                   "final_mismatches": len(final_bad), "kernel_mismatches": len(kernel_bad),
                   "work_left": work_left, "counts": counts}
        log(f"fsx {opts or 'defaults'}: {figures}")
        assert mismatches == [], "\n".join(mismatches[:20])
        assert final_bad == [], "\n".join(final_bad[:20])
        assert kernel_bad == [], "kernel remount of our upper: " + "\n".join(kernel_bad[:20])
        assert work_left == []
        return figures
    finally:
        if own_tracker:
            tracker.close()


@pytest.mark.parametrize("opts", [(), ("workers=4", "timeout=0"), ("passthrough=off",)],
                         ids=["defaults", "workers4-nocache", "no-passthrough"])
def test_fsx_stress(reltmp, relmounts, opts):
    mountutil.require_ours()
    figures = run_fsx(reltmp, STRESS_SECONDS, opts=opts, tracker=relmounts,
                      seed=int(os.environ["REL_SEED"]) if os.environ.get("REL_SEED") else None)
    assert figures["ops"] > 1000


# ---------------------------------------------------------------------------
# memory under many lookups


def build_tree(base, nfiles=20000, per_dir=100):
    """nfiles files in nfiles/per_dir dirs, spread over two lower layers and
    the upper one (dirs merged across all three)."""
    l1, l2, u, w = mkdirs(base, "l1", "l2", "u", "w")
    paths = []
    for i in range(nfiles):
        d, f = divmod(i, per_dir)
        rel = f"d{d:04d}/f{f:03d}"
        layer = (l2, l1, u)[i % 3]
        os.makedirs(os.path.join(layer, f"d{d:04d}"), exist_ok=True)
        with open(os.path.join(layer, rel), "wb") as fh:
            fh.write(b"x" * (i % 64))
        paths.append(rel)
    return (l1, l2, u, w), paths


def _mem_worker(mp, paths, nops, seed, q):
    rnd = random.Random(seed)
    n = len(paths)
    errors = []
    for i in range(nops):
        p = os.path.join(mp, paths[rnd.randrange(n)])
        try:
            if i & 1:
                os.stat(p)
            else:
                os.close(os.open(p, os.O_RDONLY))
        except OSError as e:
            errors.append(f"{'stat' if i & 1 else 'open'} {p}: "
                          f"{errno.errorcode.get(e.errno, e.errno)} at {time.strftime('%H:%M:%S')}")
    q.put(errors)


def run_lookups(mp, paths, nops, nproc=2, seed=0) -> list[str]:
    """nops stats and open/closes of random paths from nproc processes;
    returns the errors seen."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    per = nops // nproc
    procs = [ctx.Process(target=_mem_worker, args=(mp, paths, per, seed * 10 + i, q)) for i in range(nproc)]
    for p in procs:
        p.start()
    errors = [e for _ in procs for e in q.get(timeout=3600)]
    for p in procs:
        p.join()
    return errors


def _nofile(n):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return set_limit


def _fd_budget(nfiles):
    """(RLIMIT_NOFILE for the daemon, files in the tree): the daemon holds an
    fd per inode the kernel knows (see test_fd_limit_does_not_limit_tree_size),
    so the tree is made smaller when the hard limit (which needs
    CAP_SYS_RESOURCE to raise) cannot hold it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = int(nfiles * 1.1) + 2000
    if hard == resource.RLIM_INFINITY or hard >= want:
        return want, nfiles
    return hard, max(1000, int((hard - 2000) / 1.1) // 100 * 100)


def run_memory(base, nops, daemons, log=print, nfiles=20000) -> dict:
    """The daemon runs as our child with an RLIMIT_NOFILE that holds the tree
    (or the tree is cut to the hard limit) and ``timeout=0`` (every lookup
    reaches it)."""
    limit, nfiles = _fd_budget(nfiles)
    (l1, l2, u, w), paths = build_tree(base, nfiles)
    mp = os.path.join(base, "m")
    d = Daemon.for_layers([l1, l2], u, w, mp, os.path.join(base, "daemon.log"), opts=("timeout=0",),
                          preexec_fn=_nofile(limit))
    daemons.append(d)
    d.start()
    pid = d.pid
    start = vm_status(pid)
    t0 = time.monotonic()
    # every file once (the tree's own cost), then 20%, then the rest
    errors = run_lookups(mp, paths, len(paths), seed=1)
    warm = vm_status(pid)
    first = nops // 5
    errors += run_lookups(mp, paths, first, seed=2)
    at20 = vm_status(pid)
    errors += run_lookups(mp, paths, nops - first, seed=3)
    end = vm_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    elapsed = time.monotonic() - t0
    d.stop()
    figures = {"files": len(paths), "ops": len(paths) + nops, "errors": len(errors),
               "first_errors": errors[:5],
               "seconds": round(elapsed, 1), "ops_per_s": round((len(paths) + nops) / elapsed),
               "rss_start_kb": start["VmRSS"], "rss_after_tree_kb": warm["VmRSS"],
               "rss_at_20pct_kb": at20["VmRSS"], "rss_end_kb": end["VmRSS"],
               "peak_rss_kb": end["VmHWM"], "daemon_fds_end": fds, "daemon_nofile": limit}
    log(f"lookup memory: {figures}")
    return figures


PEAK_BOUND_KB = 400 * 1024
GROWTH_BOUND_KB = 24 * 1024


def check_memory(f):
    assert f["errors"] == 0, f["first_errors"]
    assert f["peak_rss_kb"] < PEAK_BOUND_KB, f
    growth = f["rss_end_kb"] - f["rss_at_20pct_kb"]
    assert growth < max(GROWTH_BOUND_KB, f["rss_at_20pct_kb"] // 10), f


@pytest.fixture
def daemons():
    started = []
    yield started
    for d in reversed(started):
        d.stop()


def test_lookup_memory_bounded(reltmp, daemons):
    mountutil.require_ours()
    if mountutil.ours_is_kernel():
        pytest.skip("measures our daemon")
    f = run_memory(reltmp, MEM_OPS, daemons)
    check_memory(f)


@pytest.mark.parametrize("hard", ["high", "1024"])
def test_fd_limit_does_not_limit_tree_size(reltmp, daemons, hard):
    """The kernel overlay serves any number of files. Ours keeps O_PATH fds
    for the inodes the kernel knows; with the common soft RLIMIT_NOFILE of
    1024 a walk over 5,000 files must still work, whether the hard limit is
    high (the daemon may raise its soft limit) or 1024 too (then what it
    keeps open must fit under the limit)."""
    mountutil.require_ours()
    if mountutil.ours_is_kernel():
        pytest.skip("about our daemon")
    (l1, l2, u, w), paths = build_tree(reltmp, 5000, per_dir=100)
    mp = os.path.join(reltmp, "m")
    cur_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = (1024, cur_hard) if hard == "high" else (1024, 1024)

    def set_limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    d = Daemon.for_layers([l1, l2], u, w, mp, os.path.join(reltmp, "daemon.log"),
                          preexec_fn=set_limits)
    daemons.append(d)
    d.start()
    errors = []
    seen = 0
    for root, dirs, files in os.walk(mp, onerror=lambda e: errors.append(str(e))):
        for n in files:
            try:
                os.stat(os.path.join(root, n))
                with open(os.path.join(root, n), "rb") as f:
                    f.read()
                seen += 1
            except OSError as e:
                errors.append(str(e))
    assert errors == [], f"{len(errors)} errors, first: {errors[:3]}"
    assert seen == len(paths)


def test_more_dirs_than_the_fd_limit(reltmp, daemons):
    """Each directory the kernel knows holds O_PATH fds in the daemon (the
    fds of other objects are a bounded cache). With a limit of 1024 fds,
    3,000 new dirs, each checked, and a walk over 1,500 lower dirs work:
    when a dir's fd is numbered past 3/4 of the limit, the daemon has the
    kernel drop the dentries of half the dirs it knows, and their FORGETs
    close the fds (before: EMFILE from then on, and dirs made then
    invisible)."""
    mountutil.require_ours()
    if mountutil.ours_is_kernel():
        pytest.skip("about our daemon")
    lo, up, wk, mp = mkdirs(reltmp, "l", "u", "w", "m")
    for i in range(1500):
        os.makedirs(f"{lo}/t{i // 50}/d{i}")

    def set_limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    d = Daemon.for_layers([lo], up, wk, mp, os.path.join(reltmp, "daemon.log"),
                          preexec_fn=set_limits)
    daemons.append(d)
    d.start()
    for i in range(3000):
        os.mkdir(f"{mp}/n{i}")
        assert os.path.isdir(f"{mp}/n{i}")
    assert sum(1 for e in os.scandir(mp) if e.name.startswith("n") and e.is_dir()) == 3000
    walked = sum(len(dirs) for _, dirs, _ in os.walk(mp))
    assert walked == 3000 + 30 + 1500
    assert len(os.listdir(f"/proc/{d.pid}/fd")) < 1024
    st = json.loads(os.getxattr(mp, "user.overlay-fuse.stats"))
    assert st["fd_reliefs"] >= 1 and st["dirs_known"] < 1024, st


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
