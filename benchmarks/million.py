"""A million files: time and memory of `find` and a stat of every file,
then idle while the kernel forgets, on the kernel overlay, fuse-overlayfs
and ours, side by side.

    .venv/bin/python -m benchmarks.million                    # 50,000 and 1,000,000 files
    .venv/bin/python -m benchmarks.million --sizes 50000 --systems ours

The stack: two lower layers holding half of the files each, in the same
dirs of 1,000 names (so every dir is merged), and an empty upper dir. For
each size and system, on a fresh mount (caches dropped): ``find MP`` (names
and dir types), then ``find MP -printf '%s %m'`` (a stat of every file);
then the kernel is made to forget (``echo 2 > drop_caches``: its dentries
and inodes go, FORGET reaches the daemon) and the daemon is left idle for
a few seconds. Reported: the times per file, the daemon's RSS after the
mount, after the walk, its peak (VmHWM) and after forgetting, its fds, and
for ours the inodes it knew at the end of the walk and the bytes of RSS per
known inode. Writes ``benchmarks/results/million.{json,md}``. Root only.
Building the 1,000,000-file data takes a few minutes once (kept in
``/tmp/bench-data/million-N``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .systems import ORDER, SYSTEMS, Missing, daemon_pids, drop_caches

RESULTS = Path(__file__).resolve().parent / "results"
PER_DIR = 1000


def say(msg):
    print(f"[million] {msg}", file=sys.stderr, flush=True)


def build(root: str, n: int) -> list[str]:
    """Two layers of n/2 files each, in n/1000 shared dirs; returns the
    layers (top first). Kept for the next run."""
    layers = [os.path.join(root, "l0"), os.path.join(root, "l1")]
    done = os.path.join(root, ".done")
    if os.path.exists(done):
        return layers
    say(f"building {n} files in {root} (once)")
    t0 = time.monotonic()
    ndirs = max(1, n // PER_DIR)
    for k, layer in enumerate(layers):
        for d in range(ndirs):
            dpath = os.path.join(layer, f"d{d:04d}")
            os.makedirs(dpath, exist_ok=True)
            dfd = os.open(dpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i in range(k, PER_DIR, 2):
                    os.close(os.open(f"f{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
            finally:
                os.close(dfd)
    with open(done, "w") as fh:
        fh.write(str(n))
    say(f"built in {time.monotonic() - t0:.0f} s")
    return layers


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def timed(args) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, check=True, timeout=7200)
    return time.perf_counter() - t0


def run_one(system, layers, n, scratch, idle_s) -> dict:
    mp, upper, work = (os.path.join(scratch, x) for x in ("mnt", "upper", "work"))
    for d in (mp, upper, work):
        subprocess.run(["rm", "-rf", d]) if d != mp else None
        os.makedirs(d, exist_ok=True)
    system.mount(layers, upper, work, mp)
    try:
        pids = daemon_pids(mp) if system.fuse else []
        pid = pids[0] if pids else None
        drop_caches()
        res = {"files": n}
        res["mounted"] = proc_status(pid) if pid else None
        res["find_s"] = timed(["find", mp])
        res["stat_s"] = timed(["find", mp, "-printf", "%s %m\n"])
        res["per_file_us"] = 1e6 * (res["find_s"] + res["stat_s"]) / n
        res["walked"] = proc_status(pid) if pid else None
        if system.name.startswith("ours"):
            st = json.loads(os.getxattr(mp, "user.overlay-fuse.stats"))
            res["inodes_known"] = st.get("inodes_known")
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("2\n")         # dentries and inodes: FORGET reaches the daemon
        time.sleep(idle_s)
        res["idle"] = proc_status(pid) if pid else None
        if system.name.startswith("ours"):
            st = json.loads(os.getxattr(mp, "user.overlay-fuse.stats"))
            res["inodes_known_idle"] = st.get("inodes_known")
        if pid and res.get("inodes_known"):
            grown = res["walked"]["VmRSS"] - res["mounted"]["VmRSS"]
            res["bytes_per_inode"] = grown / res["inodes_known"]
        return res
    finally:
        system.umount(mp)


def render(results: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"   # noqa: E731
    lines = ["# A million files: find and stat of every file, then idle", "",
             f"{results['meta']['date']}, {results['meta']['kernel']}, {results['meta']['cpus']} CPUs. "
             "Two lower layers of n/2 files each in shared dirs of 1,000 names, fresh mounts "
             "(caches dropped); RSS of the FUSE daemon after the mount, after the walk, its "
             "peak, and after the kernel forgot (drop_caches 2, then idle).", "",
             "| files | system | find | stat all | µs/file | RSS mounted | RSS walked | peak | "
             "RSS idle | fds idle | inodes known | B/inode |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["rows"]:
        if "missing" in row:
            lines.append(f"| {row['files']:,} | {row['system']} | {row['missing']} |" + " |" * 10)
            continue
        g = lambda k, f: (row.get(k) or {}).get(f)   # noqa: E731
        known = row.get("inodes_known")
        known_s = "-" if known is None else f"{known:,} → {row.get('inodes_known_idle') or 0:,}"
        bpi = row.get("bytes_per_inode")
        bpi_s = "-" if bpi is None else f"{bpi:.0f}"
        lines.append(
            f"| {row['files']:,} | {row['system']} | {row['find_s']:.2f} s | {row['stat_s']:.2f} s | "
            f"{row['per_file_us']:.1f} | {mib(g('mounted', 'VmRSS'))} | {mib(g('walked', 'VmRSS'))} | "
            f"{mib(g('idle', 'VmHWM'))} | {mib(g('idle', 'VmRSS'))} | {g('idle', 'fds') or '-'} | "
            f"{known_s} | {bpi_s} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.million", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50000,1000000")
    p.add_argument("--systems", default="kernel,fuse-overlayfs,ours")
    p.add_argument("--data", default="/tmp/bench-data")
    p.add_argument("--scratch", default="/tmp/bench-million")
    p.add_argument("--idle", type=float, default=5.0, help="seconds idle after the kernel forgot")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="million")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    systems = [SYSTEMS[s] for s in ORDER if s in args.systems.split(",")]
    rows = []
    for n in sizes:
        layers = build(os.path.join(args.data, f"million-{n}"), n)
        for system in systems:
            why = system.missing_reason()
            if why:
                rows.append({"files": n, "system": system.name, "missing": why})
                continue
            say(f"{n} files, {system.name}")
            try:
                row = run_one(system, layers, n, os.path.join(args.scratch, system.name), args.idle)
            except (Missing, RuntimeError, subprocess.CalledProcessError) as e:
                rows.append({"files": n, "system": system.name, "missing": str(e)})
                continue
            row["system"] = system.name
            rows.append(row)
            say(json.dumps(row))
    results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "kernel": "Linux " + os.uname().release,
                        "cpus": os.cpu_count(), "ours": SYSTEMS["ours"].version()},
               "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as fh:
        json.dump(results, fh, indent=1)
    md = render(results)
    with open(os.path.join(args.out, args.name + ".md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
