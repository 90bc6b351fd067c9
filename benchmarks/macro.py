"""The mounted (macro) workloads, shared by the comparison runner
(``benchmarks/compare.py``) and the pytest-benchmark file
(``benchmarks/test_macro_mounted.py``).

``Sizes`` holds the data sizes (``FULL``, ``QUICK``); ``Bench`` builds the
data (``benchmarks/data.py``), mounts a system on it (``Bench.mounted``) and
runs the workloads. A ``Workload`` is one measurement cycle on one system
(for example: new mount, drop caches, ``find`` = the fresh time, ``find``
again = the warm time) and returns one value per metric it measures.

Definitions used everywhere:

* fresh: a new mount, then ``sync; echo 3 > /proc/sys/vm/drop_caches``, then
  the measured run; warm: the same run again right after, on that mount.
* every mount has an empty upper and work directory of its own (created
  before, removed after, unmeasured), on the same filesystem as the data.
* writes (write, create, untar) are measured up to the last ``close``, not
  including a later ``sync``; the data are synced after, unmeasured, so they
  do not spill into the next measurement.
* mount time: from starting the mount command until the mount point shows in
  ``/proc/self/mountinfo`` (page cache warm: the layers were mounted before).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import data
from .systems import Missing, System, daemon_pids, drop_caches

CMD_TIMEOUT = 3600
ENV_C = dict(os.environ, LC_ALL="C")


@dataclass
class Sizes:
    files: int = 50_000           # tree: files
    dirs: int = 2_000             # tree: directories
    tree_layers: int = 3
    stat_paths: int = 10_000      # paths stat()ed in the tree
    big: int = 1 << 30            # bytes of the big file
    create: int = 10_000          # 4 KiB files created
    untar: int = 20_000           # files in the tarball
    stacks: tuple = (1, 10, 100, 500)   # layer counts for the bottom-stat rows
    bottom: int = 1_000           # files stat()ed at the bottom of a stack
    mount_layers: int = 500       # layers for the mount-time row
    image_files: int = 10_000     # image for chown -R / chmod -R (metacopy)
    image_bytes: int = 1 << 30

    def describe(self) -> dict:
        d = asdict(self)
        d["stacks"] = list(self.stacks)
        return d


FULL = Sizes()
QUICK = Sizes(files=5_000, dirs=200, stat_paths=1_000, big=64 << 20, create=1_000,
              untar=2_000, stacks=(1, 10, 100, 500), bottom=200, mount_layers=500,
              image_files=1_000, image_bytes=64 << 20)


@dataclass
class Metric:
    id: str
    title: str
    group: str
    kernel_target: float | None = None    # ours/kernel must be <= this
    fuse_target: float | None = 1.0       # ours/fuse-overlayfs must be <= this
    unit: str = "s"                       # "s" (time) or "B" (bytes)
    abs_target: float | None = None       # ours must be <= this, in `unit`


@dataclass
class Workload:
    name: str
    metrics: list[Metric]
    run: Callable[[System], dict]
    tags: set = field(default_factory=set)


def _fmt_bytes(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    return f"{n >> 20} MiB"


def _rm(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            subprocess.run(["rm", "-rf", path], check=False)


def timed_cmd(args, cwd=None) -> float:
    """Seconds taken by a command (output discarded); raises on failure."""
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=ENV_C, timeout=CMD_TIMEOUT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        msg = " / ".join(dict.fromkeys([err[0], err[-1]])) if err else ""
        raise RuntimeError(f"{args[0]} exited {r.returncode}: {msg}")
    return dt


# --------------------------------------------------------------- operations

def op_find(mp: str) -> float:
    return timed_cmd(["find", mp])


def op_ls_lR(mp: str) -> float:
    return timed_cmd(["ls", "-lR", mp])


def op_stat(paths: list[str]) -> float:
    st = os.stat
    t0 = time.perf_counter()
    for p in paths:
        st(p, follow_symlinks=False)
    return time.perf_counter() - t0


def op_read(path: str) -> float:
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return time.perf_counter() - t0


def op_write(path: str, size: int) -> float:
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block if left >= len(block) else block[:left])
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def op_first_write(path: str) -> float:
    """open(O_WRONLY) + a 1-byte write + close of a lower file: the copy-up."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"X", 0)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def op_create(top: str, n: int, per_dir: int = 1000) -> float:
    payload = b"c" * 4096
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    os.mkdir(top)
    d = None
    for i in range(n):
        if i % per_dir == 0:
            d = os.path.join(top, f"d{i // per_dir:03d}")
            os.mkdir(d)
        fd = os.open(f"{d}/f{i:05d}", flags, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return time.perf_counter() - t0


def op_untar(tar: str, dest: str) -> float:
    os.mkdir(dest)
    return timed_cmd(["tar", "-xf", tar, "-C", dest])


def op_stat_each(paths: list[str], reps: int = 3) -> float:
    """Seconds per stat() (the best of reps passes over paths)."""
    best = None
    for _ in range(reps):
        t = op_stat(paths)
        best = t if best is None else min(best, t)
    return best / max(1, len(paths))


def op_create_each(top: str, n: int) -> float:
    """Seconds per create+close of an empty file (one dir)."""
    os.mkdir(top)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(f"{top}/e{i:06d}", flags, 0o644))
    return (time.perf_counter() - t0) / max(1, n)


def op_git(repo: str, paths: list[str]) -> float:
    """git init, add, commit and status twice in repo, on the files under
    paths (relative to repo): many small files read, hashed, written as
    objects, lock files renamed. No dir is renamed (the kernel overlay's
    default and fuse-overlayfs answer EXDEV for lower dirs)."""
    env = dict(ENV_C, GIT_CONFIG_NOSYSTEM="1", HOME=repo, GIT_AUTHOR_NAME="b",
               GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    t0 = time.perf_counter()
    for args in (["init", "-q"], ["add", "-A", "--", *paths], ["commit", "-q", "-m", "bench"],
                 ["status", "--porcelain", "--", *paths], ["status", "--porcelain", "--", *paths]):
        r = subprocess.run(["git", "-C", repo, *args], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                           timeout=CMD_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"git {args[0]} exited {r.returncode}: {r.stderr.decode(errors='replace')[-200:]}")
    return time.perf_counter() - t0


def du_bytes(top: str) -> int:
    """Bytes allocated to everything below top (st_blocks, as du)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return float(total)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# --------------------------------------------------------------- the bench

class Bench:
    """Data, scratch space and workloads for one run."""

    def __init__(self, sizes: Sizes, data_dir: str, scratch: str,
                 on_mounted: Callable[[System, str, str], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.sizes = sizes
        self.data_dir = data_dir
        self.scratch = scratch
        self.on_mounted = on_mounted
        self.log = log or (lambda msg: None)
        self.tree = self.big = self.tar = self.image = None
        self.stacks: dict[int, data.Stack] = {}
        self._stat_paths: list[str] = []
        self.current = ""     # name of the workload running (for on_mounted)

    # ---- data

    def prepare(self, groups=("tree", "big", "small", "layers", "image")) -> None:
        s = self.sizes
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self.scratch, exist_ok=True)
        if "tree" in groups:
            self.log(f"data: tree of {s.files} files in {s.dirs} dirs over {s.tree_layers} layers")
            self.tree = data.tree(os.path.join(self.data_dir, f"tree-{s.files}-{s.dirs}-{s.tree_layers}"),
                                  s.files, s.dirs, s.tree_layers)
            step = max(1, len(self.tree.files) // max(1, s.stat_paths))
            self._stat_paths = self.tree.files[::step][:s.stat_paths]
        if "big" in groups or "small" in groups:
            self.log(f"data: {_fmt_bytes(s.big)} file")
            self.big = data.big_file(os.path.join(self.data_dir, f"big-{s.big}"), s.big)
        if "small" in groups:
            self.log(f"data: tarball of {s.untar} files")
            self.tar = data.tarball(os.path.join(self.data_dir, f"tar-{s.untar}"), s.untar)
        if "image" in groups:
            self.log(f"data: image of {s.image_files} files, {_fmt_bytes(s.image_bytes)}")
            self.image = data.image(os.path.join(self.data_dir, f"image-{s.image_files}-{s.image_bytes}"),
                                    s.image_files, s.image_bytes)
        if "layers" in groups:
            for n in sorted(set(s.stacks) | {s.mount_layers}):
                self.log(f"data: stack of {n} layers")
                bottom = s.bottom if n in s.stacks else 1
                self.stacks[n] = data.layer_stack(
                    os.path.join(self.data_dir, f"stack-{n}-{bottom}"), n, bottom)

    # ---- mounts

    @contextlib.contextmanager
    def mounted(self, system: System, lowers, *, base=None, fresh=True):
        """Mount ``lowers`` with a new empty upper/work; with ``fresh`` drop
        the caches once it is up. Unmounts and removes upper/work after."""
        root = os.path.join(self.scratch, system.name.replace("-", "_"))
        mp, upper, work = (os.path.join(root, n) for n in ("mnt", "upper", "work"))
        os.makedirs(mp, exist_ok=True)
        _rm(upper)
        _rm(work)
        os.makedirs(upper)
        os.makedirs(work)
        system.mount(lowers, upper, work, mp, base=base)
        try:
            if self.on_mounted is not None:
                self.on_mounted(system, mp, self.current)
            if fresh and not drop_caches():
                raise Missing("cannot drop caches (needs root)")
            yield mp
        finally:
            system.umount(mp)
            _rm(upper)
            _rm(work)
            os.sync()

    # ---- workloads

    def workloads(self) -> list[Workload]:
        s = self.sizes
        out = []
        if self.tree is not None:
            files = f"{len(self.tree.files):,} files"
            for key, title, op in (("find", "find", op_find), ("lsR", "ls -lR", op_ls_lR)):
                out.append(Workload(key, [
                    Metric(f"{key}_fresh", f"{title}, {files}, fresh", "tree"),
                    Metric(f"{key}_warm", f"{title}, {files}, warm", "tree", kernel_target=1.5),
                ], self._tree_cmd(key, op), {"tree"}))
            out.append(Workload("stat", [
                Metric("stat_fresh", f"stat {len(self._stat_paths):,} paths, fresh", "tree"),
                Metric("stat_warm", f"stat {len(self._stat_paths):,} paths, warm", "tree",
                       kernel_target=1.5),
            ], self._tree_stat, {"tree"}))
            ncopy = len(self._copy_files())
            out.append(Workload("cpa", [
                Metric("cpa", f"cp -a of {ncopy:,} lower files", "tree"),
                Metric("rm_copy", f"rm -rf of that copy ({ncopy:,} upper files)", "tree"),
                Metric("rm_lower", f"rm -rf of {ncopy:,} lower files (whiteouts)", "tree"),
            ], self._cp_rm, {"tree"}))
            out.append(Workload("git", [
                Metric("git", f"git add, commit, status x2 of {ncopy:,} lower files", "tree")],
                self._git, {"tree"}))
            out.append(Workload("latency", [
                Metric("lat_stat", "µs per stat that reaches the daemon (timeout=0)", "tree"),
            ], self._lat_stat, {"tree"}))
            out.append(Workload("meminode", [
                Metric("mem_inode", f"daemon memory per inode it knows ({len(self.tree.files):,} stat()ed)",
                       "tree", unit="B", abs_target=400),
            ], self._mem_inode, {"tree"}))
        if self.big is not None:
            big = _fmt_bytes(s.big)
            out.append(Workload("read", [
                Metric("read_fresh", f"read {big}, fresh", "big", kernel_target=1.2),
                Metric("read_warm", f"read {big}, warm", "big", kernel_target=1.2),
            ], self._big_read, {"big"}))
            out.append(Workload("write", [Metric("write", f"write new {big} file", "big", kernel_target=1.2)],
                                self._big_write, {"big"}))
            out.append(Workload("copyup", [
                Metric("copyup", f"first write to {big} lower file (copy-up)", "big",
                       kernel_target=1.2)], self._copy_up, {"big"}))
        if self.tar is not None:
            out.append(Workload("create", [Metric("create", f"create {s.create:,} 4 KiB files", "small")],
                                self._create, {"small"}))
            out.append(Workload("untar", [Metric("untar", f"extract tarball of {s.untar:,} files", "small")],
                                self._untar, {"small"}))
            out.append(Workload("latcreate", [
                Metric("lat_create", "µs per create+close of an empty file", "small")],
                self._lat_create, {"small"}))
        if self.image is not None:
            im = f"{self.image.files:,} files, {_fmt_bytes(self.image.size)}"
            out.append(Workload("metacopy", [
                Metric("chown_meta", f"chown -R of an image ({im}), metacopy=on", "image"),
                Metric("chmod_meta", "chmod -R of it next, metacopy=on", "image"),
                Metric("upper_meta", "upper dir size after both, metacopy=on", "image", unit="B"),
                Metric("chown_full", "chown -R of it, metacopy=off", "image", fuse_target=None),
                Metric("upper_full", "upper dir size after it, metacopy=off", "image", unit="B",
                       fuse_target=None),
            ], self._metacopy, {"image"}))
        if self.stacks:
            for n in s.stacks:
                out.append(Workload(f"stack{n}", [Metric(
                    f"stack_stat_{n}", f"stat {s.bottom:,} files at the bottom of {n} layer{'s' * (n > 1)}, fresh",
                    "layers")], self._stack_stat(n), {"layers"}))
            m = s.mount_layers
            out.append(Workload(f"mount{m}", [Metric(f"mount_{m}", f"mount {m} layers", "layers")],
                                self._mount_time(m), {"layers"}))
        return out

    def _tree_cmd(self, key, op):
        def run(system):
            self.current = key
            with self.mounted(system, self.tree.layers) as mp:
                fresh = op(mp)
                warm = op(mp)
            return {f"{key}_fresh": fresh, f"{key}_warm": warm}
        return run

    def _tree_stat(self, system):
        self.current = "stat"
        with self.mounted(system, self.tree.layers) as mp:
            paths = [os.path.join(mp, p) for p in self._stat_paths]
            fresh = op_stat(paths)
            warm = op_stat(paths)
        return {"stat_fresh": fresh, "stat_warm": warm}

    def _copy_files(self) -> list[str]:
        """The tree's files below its first fifth of top dirs (cp -a, git)."""
        tops = sorted({d.split("/")[0] for d in self.tree.dirs})
        chosen = set(tops[:max(1, len(tops) // 5)])
        return [f for f in self.tree.files if f.split("/")[0] in chosen]

    def _copy_tops(self) -> list[str]:
        tops = sorted({d.split("/")[0] for d in self.tree.dirs})
        return tops[:max(1, len(tops) // 5)]

    def _cp_rm(self, system):
        self.current = "cpa"
        with self.mounted(system, self.tree.layers) as mp:
            os.mkdir(f"{mp}/copy")
            cpa = timed_cmd(["cp", "-a", *[f"{mp}/{t}" for t in self._copy_tops()], f"{mp}/copy/"])
            os.sync()
            rm_copy = timed_cmd(["rm", "-rf", f"{mp}/copy"])
            rm_lower = timed_cmd(["rm", "-rf", *[f"{mp}/{t}" for t in self._copy_tops()]])
        return {"cpa": cpa, "rm_copy": rm_copy, "rm_lower": rm_lower}

    def _git(self, system):
        self.current = "git"
        if shutil.which("git") is None:
            raise Missing("git not installed")
        with self.mounted(system, self.tree.layers) as mp:
            # the repo is the mount's root; git works on the top dirs
            # cp -a copies (the first fifth)
            t = op_git(mp, self._copy_tops())
        return {"git": t}

    def _lat_stat(self, system):
        self.current = "latency"
        saved = system.extra_options
        system.extra_options = "timeout=0" if system.fuse else ""
        try:
            with self.mounted(system, self.tree.layers, fresh=False) as mp:
                paths = [os.path.join(mp, p) for p in self._stat_paths[:2000]]
                op_stat(paths)          # warm the layers' page cache
                t = op_stat_each(paths)
        finally:
            system.extra_options = saved
        return {"lat_stat": t}

    def _lat_create(self, system):
        self.current = "latcreate"
        with self.mounted(system, [self.big.layer], fresh=False) as mp:
            t = op_create_each(os.path.join(mp, "empty"), min(5000, self.sizes.create))
        return {"lat_create": t}

    def _mem_inode(self, system):
        self.current = "meminode"
        if not system.fuse:
            raise Missing("the kernel has no daemon")
        with self.mounted(system, self.tree.layers) as mp:
            pids = daemon_pids(mp)
            if not pids:
                raise Missing("daemon not found")
            before = sum(rss_bytes(p) for p in pids)
            op_stat([os.path.join(mp, p) for p in self.tree.files])
            after = sum(rss_bytes(p) for p in pids)
        return {"mem_inode": max(0, after - before) / (len(self.tree.files) + len(self.tree.dirs))}

    def _big_read(self, system):
        self.current = "read"
        with self.mounted(system, [self.big.layer]) as mp:
            path = os.path.join(mp, self.big.name)
            fresh = op_read(path)
            warm = op_read(path)
        return {"read_fresh": fresh, "read_warm": warm}

    def _big_write(self, system):
        self.current = "write"
        with self.mounted(system, [self.big.layer], fresh=False) as mp:
            t = op_write(os.path.join(mp, "new.bin"), self.sizes.big)
        return {"write": t}

    def _copy_up(self, system):
        self.current = "copyup"
        with self.mounted(system, [self.big.layer]) as mp:
            t = op_first_write(os.path.join(mp, self.big.name))
        return {"copyup": t}

    def _create(self, system):
        self.current = "create"
        with self.mounted(system, [self.big.layer], fresh=False) as mp:
            t = op_create(os.path.join(mp, "created"), self.sizes.create)
        return {"create": t}

    def _untar(self, system):
        self.current = "untar"
        with self.mounted(system, [self.big.layer], fresh=False) as mp:
            t = op_untar(self.tar.path, os.path.join(mp, "extracted"))
        return {"untar": t}

    def _metacopy(self, system):
        """chown -R then chmod -R of the image with metacopy=on (where the
        system has it: not fuse-overlayfs), then chown -R with metacopy=off;
        the upper dir's size (allocated bytes) after each."""
        self.current = "metacopy"
        upper = os.path.join(self.scratch, system.name.replace("-", "_"), "upper")
        out = {}
        saved = system.extra_options
        try:
            for mode in ("meta", "full"):
                if system.name == "fuse-overlayfs":
                    system.extra_options = ""
                else:
                    system.extra_options = "metacopy=on" if mode == "meta" else "metacopy=off"
                with self.mounted(system, [self.image.layer]) as mp:
                    top = os.path.join(mp, self.image.top)
                    out[f"chown_{mode}"] = timed_cmd(["chown", "-R", "1234:1234", top])
                    if mode == "meta":
                        out["chmod_meta"] = timed_cmd(["chmod", "-R", "g+w", top])
                    os.sync()
                    out[f"upper_{mode}"] = du_bytes(upper)
        finally:
            system.extra_options = saved
        return out

    def _stack_stat(self, n):
        def run(system):
            self.current = f"stack{n}"
            st = self.stacks[n]
            with self.mounted(system, st.layers, base=st.base) as mp:
                t = op_stat([os.path.join(mp, p) for p in st.bottom_files])
            return {f"stack_stat_{n}": t}
        return run

    def _mount_time(self, n):
        def run(system):
            self.current = f"mount{n}"
            st = self.stacks[n]
            root = os.path.join(self.scratch, system.name.replace("-", "_"))
            mp, upper, work = (os.path.join(root, x) for x in ("mnt", "upper", "work"))
            os.makedirs(mp, exist_ok=True)
            for d in (upper, work):
                _rm(d)
                os.makedirs(d)
            try:
                t0 = time.perf_counter()
                system.mount(st.layers, upper, work, mp, base=st.base)
                t = time.perf_counter() - t0
            finally:
                system.umount(mp)
                _rm(upper)
                _rm(work)
            return {f"mount_{n}": t}
        return run
