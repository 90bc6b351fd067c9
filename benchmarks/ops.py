"""Per-operation runner: what one request-bound operation costs, in
microseconds, on the kernel overlay, fuse-overlayfs, ours with FUSE over
io_uring and ours through /dev/fuse, and (``--floor PATH``) libfuse's C
example ``passthrough_hp`` with and without io_uring, side by side.

    .venv/bin/python -m benchmarks.ops                  # idle, then busy; 5 repetitions
    .venv/bin/python -m benchmarks.ops --floor /path/to/passthrough_hp
    ./run bench --groups ops [--floor PATH]             # the same, through the runner

Each repetition mounts every system afresh on new layers on a tmpfs (the
disk out of it) and times, per system in turn: ``create`` (create, write
4 KiB, close), ``chown``, ``chmod``, ``utime``, ``open`` (open and close),
``rename``, ``mkdir``, ``unlink`` (of the files made by ``create``), and
``stat`` on a mount with every cache timeout 0 (``timeout=0``; the floor:
``--nocache``), each over ``--count`` objects; then ``untar`` (5,000 small
files as root) and ``create x4`` against ``create x1`` (four processes
creating files in four dirs at once against one process making all of
them). ``busy``: the same while a busy loop per CPU runs at nice 19.
``pinned``: idle, with the runner (the caller) pinned to CPU 0, so the
scheduler never moves it between requests: on an idle VM such moves (each
waking a halted vCPU) dominate io_uring's costs and come and go with the
scheduler's state (the ``caller_cpu_moves_per_op`` row); pinned, what is
left is the cost of the request path itself (``tar`` is pinned too; the
creating processes of ``create x4`` are not).

Also reported: the daemon's CPU per operation (user + system time of the
FUSE daemon from /proc, over the operations of the run), and for ours the
requests per operation (its counters). Writes ``ops.md`` and ``ops.json``
to ``benchmarks/results/`` (``--out``, ``--name``).

The floor is a plain passthrough of one directory (no layers), built by hand
from libfuse's public source (never committed): see DEVELOPERS.md. FUSE over
io_uring needs /sys/module/fuse/parameters/enable_uring on: the runner
switches it on for the io_uring systems and puts it back as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .systems import REPO, SYSTEMS, Ours, daemon_pids, is_mounted

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("create", "chown", "chmod", "utime", "open", "rename", "mkdir", "unlink", "stat")
WORKLOADS = ("untar", "create x1", "create x4")
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
UNTAR_FILES = 5_000
PARALLEL_FILES = 4_000


def say(msg: str) -> None:
    print(f"[ops] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ systems

class _Floor:
    """libfuse's passthrough_hp over one directory (the upper dir)."""

    fuse = True

    def __init__(self, binary: str, uring: bool):
        self.binary = binary
        self.uring = uring
        self.name = "floor-uring" if uring else "floor"
        self.label = "C floor, io_uring" if uring else "C floor"

    def mount(self, lowers, upper, work, mp, *, nocache=False):
        args = [self.binary]
        if nocache:
            args.append("--nocache")
        if self.uring:
            args += ["-o", "io_uring"]
        args += [upper, mp]
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not mounted after 30 s")
            time.sleep(0.005)
        os.stat(mp)

    def umount(self, mp):
        SYSTEMS["ours"].umount(mp)


class _Ours(Ours):
    def __init__(self, uring: bool):
        super().__init__()
        self.uring = uring
        self.name = "ours-uring" if uring else "ours-devfuse"
        self.label = "ours, io_uring" if uring else "ours, /dev/fuse"
        self.extra = ",uring=on" if uring else ",uring=off"


def _systems(names, floor):
    out = {}
    for n in names:
        if n in ("kernel", "fuse-overlayfs"):
            out[n] = SYSTEMS[n]
        elif n in ("ours-uring", "ours-devfuse"):
            out[n] = _Ours(n == "ours-uring")
        elif n in ("floor", "floor-uring"):
            if floor:
                out[n] = _Floor(floor, n == "floor-uring")
        else:
            raise SystemExit(f"unknown system {n!r}")
    return out


def _mount(system, lowers, upper, work, mp, nocache):
    if isinstance(system, _Floor):
        system.mount(lowers, upper, work, mp, nocache=nocache)
        return
    saved = system.extra_options
    if nocache and system.fuse:
        system.extra_options = "timeout=0"
    try:
        system.mount(lowers, upper, work, mp)
    finally:
        system.extra_options = saved


# ------------------------------------------------------------------ measuring

def _cpu(pids) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _requests(mp) -> int | None:
    try:
        st = json.loads(os.getxattr(mp, "user.overlay-fuse.stats"))
    except OSError:
        return None
    return sum(st.get("requests", {}).values())


def _migrations() -> int:
    """How often the scheduler moved this process to another CPU."""
    try:
        with open("/proc/self/sched") as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return 0


def _timed(fn, n) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e6


def run_ops(mp: str, count: int) -> dict:
    """µs per operation of each op (not stat) on a mounted system."""
    d = os.path.join(mp, "w")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i}") for i in range(count)]
    data = b"x" * 4096
    res = {}

    def create():
        for p in names:
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    res["create"] = _timed(create, count)
    res["chown"] = _timed(lambda: [os.chown(p, 1, 1) for p in names], count)
    res["chmod"] = _timed(lambda: [os.chmod(p, 0o600) for p in names], count)
    res["utime"] = _timed(lambda: [os.utime(p, (1, 1)) for p in names], count)
    res["open"] = _timed(lambda: [os.close(os.open(p, os.O_RDONLY)) for p in names], count)
    moved = [p + "r" for p in names]
    res["rename"] = _timed(lambda: [os.rename(a, b) for a, b in zip(names, moved)], count)
    res["mkdir"] = _timed(lambda: [os.mkdir(p) for p in names], count)
    res["unlink"] = _timed(lambda: [os.unlink(p) for p in moved], count)
    return res


def run_stat(mp: str, count: int) -> float:
    paths = [os.path.join(mp, "s", f"f{i}") for i in range(count)]
    for p in paths[:10]:
        os.stat(p)
    return _timed(lambda: [os.stat(p) for p in paths], count)


def run_untar(mp: str, tarball: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", tarball, "-C", mp], check=True)
    return time.perf_counter() - t0


def _creator(dirpath: str, n: int) -> None:
    os.makedirs(dirpath, exist_ok=True)
    for i in range(n):
        fd = os.open(f"{dirpath}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 512)
        os.close(fd)


def _all_cpus() -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def run_parallel(mp: str, procs: int) -> float:
    code = ("import sys\nfrom benchmarks.ops import _creator\n"
            "_creator(sys.argv[1], int(sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", code, f"{mp}/par{procs}-{k}",
                            str(PARALLEL_FILES // procs)], env=env, preexec_fn=_all_cpus)
          for k in range(procs)]
    for p in ps:
        if p.wait() != 0:
            raise RuntimeError("a creating process failed")
    return time.perf_counter() - t0


class _Busy:
    """A busy loop per CPU at nice 19, for as long as the context lasts."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile True: pass"])
                      for _ in range(os.cpu_count() or 1)]
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


class _Pinned:
    """This process on CPU 0 only, for as long as the context lasts (the
    processes of ``create x4`` run on every CPU; ``tar`` stays pinned: it
is the caller there)."""

    def __enter__(self):
        self.was = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(self.was)})
        return self

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.was)


# ------------------------------------------------------------------ one run

def measure(system, scratch: str, count: int, tarball: str) -> dict:
    """One repetition on one system: fresh layers, mounts, every row."""
    base = tempfile.mkdtemp(prefix=f"{system.name}-", dir=scratch)
    lower, upper, work, mp = (os.path.join(base, n) for n in ("l", "u", "w", "m"))
    for p in (lower, upper, work, mp):
        os.mkdir(p)
    os.mkdir(os.path.join(lower, "s"))
    for i in range(count):
        open(os.path.join(lower, "s", f"f{i}"), "w").close()
    row = {}
    try:
        if isinstance(system, _Floor):
            shutil.copytree(os.path.join(lower, "s"), os.path.join(upper, "s"))
        _mount(system, [lower], upper, work, mp, nocache=False)
        pids = daemon_pids(mp) if system.fuse else []
        if isinstance(system, _Floor):
            pids = _floor_pids(mp)
        cpu0, req0, mig0 = _cpu(pids), _requests(mp), _migrations()
        row.update(run_ops(mp, count))
        cpu1, req1, mig1 = _cpu(pids), _requests(mp), _migrations()
        n = count * 8
        # (a caller moved to another CPU at each request wakes that CPU:
        # what an idle machine costs io_uring, whose queues are per CPU)
        row["caller_cpu_moves_per_op"] = (mig1 - mig0) / n
        if system.fuse:
            row["cpu_us_per_op"] = (cpu1 - cpu0) / n * 1e6
        if req0 is not None and req1 is not None:
            row["requests_per_op"] = (req1 - req0) / n
            if cpu1 > cpu0:
                row["cpu_us_per_request"] = (cpu1 - cpu0) / max(1, req1 - req0) * 1e6
        row["untar"] = run_untar(mp, tarball)
        row["create x1"] = run_parallel(mp, 1)
        row["create x4"] = run_parallel(mp, 4)
        system.umount(mp)
        _mount(system, [lower], upper, work, mp, nocache=True)
        row["stat"] = run_stat(mp, count)
        system.umount(mp)
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return row


def _floor_pids(mp: str) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"passthrough_hp") and os.fsencode(mp) in args:
                out.append(int(e))
    return out


def _tarball(scratch: str) -> str:
    path = os.path.join(scratch, "small.tar")
    if not os.path.exists(path):
        with tarfile.open(path, "w") as tf:
            for i in range(UNTAR_FILES):
                info = tarfile.TarInfo(f"t/d{i // 100}/f{i}")
                info.size = 100
                import io
                tf.addfile(info, io.BytesIO(b"y" * 100))
    return path


# ------------------------------------------------------------------ report

def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: dict) -> dict:
    """{load: {system: {row: median}}}"""
    out = {}
    for load, per in samples.items():
        out[load] = {}
        for sysname, rows in per.items():
            keys = sorted({k for r in rows for k in r})
            out[load][sysname] = {k: _median([r.get(k) for r in rows]) for k in keys}
    return out


TARGETS = [
    ("ours-uring", "floor-uring", 1.2, OPS[:-1], "every op <= 1.2x the C floor with io_uring"),
    ("ours-uring", "floor-uring", 1.5, ("stat",), "uncached stat <= 1.5x the C floor with io_uring"),
    ("ours-devfuse", "fuse-overlayfs", 1.0, OPS, "every op <= 1.0x fuse-overlayfs without io_uring"),
    ("ours-uring", "kernel", 8.0, ("untar",), "untar <= 8x the kernel overlay with io_uring"),
    ("ours-devfuse", "fuse-overlayfs", 0.6, ("untar",), "untar <= 0.6x fuse-overlayfs without io_uring"),
]


def render(res: dict) -> str:
    med = res["medians"]
    systems = res["systems"]
    lines = [f"# Per-operation costs ({res['date']})", "",
             f"{res['reps']} repetitions, medians; {res['count']} objects an op; layers on tmpfs; "
             f"{res['host']}. µs per operation (untar, create: seconds).", ""]
    for load in med:
        lines += [f"## {load}", "",
                  "| op | " + " | ".join(systems[s] for s in med[load]) + " |",
                  "|---|" + "---:|" * len(med[load])]
        for row in OPS + WORKLOADS + ("cpu_us_per_op", "requests_per_op", "cpu_us_per_request",
                                      "caller_cpu_moves_per_op"):
            cells = []
            for s in med[load]:
                v = med[load][s].get(row)
                cells.append("" if v is None else (f"{v:.2f}" if row in WORKLOADS else
                                                   f"{v:.2f}" if row in ("requests_per_op", "caller_cpu_moves_per_op")
                                                   else f"{v:.1f}"))
            if any(cells):
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["Targets:", ""]
        for ours, ref, limit, rows, text in TARGETS:
            if ours not in med[load] or ref not in med[load]:
                continue
            bad = []
            for r in rows:
                a, b = med[load][ours].get(r), med[load][ref].get(r)
                if a is not None and b:
                    if a / b > limit:
                        bad.append(f"{r} {a / b:.2f}x")
            lines.append(f"- {text}: " + ("met" if not bad else "missed: " + ", ".join(bad)))
        if "ours-uring" in med[load] or "ours-devfuse" in med[load]:
            for s in ("ours-uring", "ours-devfuse"):
                m = med[load].get(s, {})
                if m.get("create x1") and m.get("create x4"):
                    lines.append(f"- {systems[s]}: four creating processes "
                                 f"{m['create x1'] / m['create x4']:.2f}x faster than one (target 1.5x)")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="kernel,fuse-overlayfs,ours-uring,ours-devfuse,floor,floor-uring")
    p.add_argument("--floor", default=None, metavar="PATH", help="libfuse's passthrough_hp, built by hand")
    p.add_argument("--loads", default="idle,busy", help="idle, busy (a busy loop per CPU at nice 19), pinned (idle, the caller on one CPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--count", type=int, default=2000, help="objects an op is timed over")
    p.add_argument("--scratch", default="/tmp/bench-ops", help="a tmpfs is mounted here for the layers")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="ops")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    systems = _systems([s for s in args.systems.split(",") if s], args.floor)
    os.makedirs(args.scratch, exist_ok=True)
    own_tmpfs = not is_mounted(args.scratch)
    if own_tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", args.scratch], check=True)
    try:
        was = open(URING_PARAM).read().strip()
    except OSError:
        was = None
    samples = {}
    try:
        tarball = _tarball(args.scratch)
        for load in [x for x in args.loads.split(",") if x]:
            samples[load] = {s: [] for s in systems}
            for rep in range(args.reps):
                for name, system in systems.items():
                    uring = getattr(system, "uring", False)
                    if was is not None:
                        with open(URING_PARAM, "w") as f:
                            f.write("Y" if uring else "N")
                    elif uring:
                        continue
                    say(f"{load} rep {rep + 1}/{args.reps}: {name}")
                    if load == "busy":
                        with _Busy():
                            row = measure(system, args.scratch, args.count, tarball)
                    elif load == "pinned":
                        with _Pinned():
                            row = measure(system, args.scratch, args.count, tarball)
                    else:
                        row = measure(system, args.scratch, args.count, tarball)
                    samples[load][name].append(row)
    finally:
        if was is not None:
            with open(URING_PARAM, "w") as f:
                f.write(was)
        if own_tmpfs:
            subprocess.run(["umount", "-l", args.scratch], capture_output=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "reps": args.reps, "count": args.count,
           "host": f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
           "systems": {n: s.label for n, s in systems.items()},
           "samples": samples, "medians": summarize(samples)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    text = render(res)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
