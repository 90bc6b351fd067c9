"""Comparison runner: the macro workloads on the kernel overlay, fuse-overlayfs
and ours, interleaved, with medians, ratios and the targets.

    .venv/bin/python -m benchmarks.compare              # full, 3 repetitions (~10-15 min)
    .venv/bin/python -m benchmarks.compare --quick      # small data (~1-2 min)
    ./run bench [ARGS]                                  # the same, after setup

Each repetition runs every workload once on each system in turn (kernel,
fuse-overlayfs, ours, then the next workload), so slow drifts of the machine
hit all three alike. Writes ``<name>.md`` (tables), ``<name>.json`` (every
sample, medians, ratios, targets) and ``<name>.png`` (ratios, needs
matplotlib: the ``bench`` extra) to ``benchmarks/results/`` (``--out``);
``<name>`` is ``results`` or ``results-quick``. A system that cannot run (not
installed, not root, a refused mount, the kernel's option-length limit) is
reported as missing with the reason, never replaced by a guess.

``--profile DIR`` runs py-spy (``pip install py-spy``) on our daemon during
every workload and writes the collapsed stacks plus ``DIR/summary.md`` (top
functions per workload); profiled timings are slower, so use it on its own
run (e.g. ``--systems ours --reps 1``).
Needs root (mounting, dropping caches). Data are kept in ``/tmp/bench-data``
(``--data``) and reused by the next run with the same sizes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .macro import FULL, QUICK, Bench, Metric, Sizes
from .systems import ORDER, SYSTEMS, Missing, System, daemon_pids

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("tree", "big", "small", "layers", "image", "ops")   # ops: benchmarks/ops.py
STACK_RATIO_TARGET = 1.2          # up to the kernel's 500 layers
STACK_RATIO_TARGET_DEEP = 1.5     # past them (2,000 layers: lowerdir_file)
MOUNT_TARGET_S = 0.15             # up to 500 layers
MOUNT_TARGET_DEEP_S = 0.5         # past them


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small data, for a 1-2 minute smoke run")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions (default 3, --quick: 2)")
    p.add_argument("--systems", default=",".join(ORDER),
                   help="comma-separated, of: " + ", ".join(ORDER))
    p.add_argument("--groups", default=",".join(GROUPS),
                   help="workload groups to run: " + ", ".join(GROUPS))
    p.add_argument("--only", default="",
                   help="comma-separated workload names (find, lsR, stat, read, write, copyup, "
                        "create, untar, stackN, mountN)")
    p.add_argument("--data", default="/tmp/bench-data", help="where the data are built and kept")
    p.add_argument("--scratch", default=None, help="mount points, upper dirs (default: a new /tmp/bench-run-*)")
    p.add_argument("--out", default=str(RESULTS), help="output directory")
    p.add_argument("--name", default=None, help="output file stem (default results / results-quick)")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="run nothing: write the .md and .png again from a results JSON (next to it)")
    p.add_argument("--floor", default=None, metavar="PATH",
                   help="ops group: libfuse's passthrough_hp built by hand, for the C floor columns")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="py-spy our daemon during every workload, write stacks and a summary to DIR")
    g = p.add_argument_group("sizes (override the --quick or full defaults)")
    g.add_argument("--files", type=int)
    g.add_argument("--dirs", type=int)
    g.add_argument("--stat-paths", type=int)
    g.add_argument("--big-mib", type=int)
    g.add_argument("--create", type=int)
    g.add_argument("--untar", type=int)
    g.add_argument("--stacks", help="layer counts, e.g. 1,10,100,500")
    g.add_argument("--bottom", type=int, help="files stat()ed at the bottom of each stack")
    g.add_argument("--mount-layers", type=int)
    g.add_argument("--image-files", type=int, help="files of the image (chown -R / chmod -R rows)")
    g.add_argument("--image-mib", type=int, help="MiB of the image")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(**base.__dict__)
    for attr in ("files", "dirs", "stat_paths", "create", "untar", "bottom", "mount_layers", "image_files"):
        v = getattr(args, attr)
        if v is not None:
            setattr(sizes, attr, v)
    if args.big_mib is not None:
        sizes.big = args.big_mib << 20
    if args.image_mib is not None:
        sizes.image_bytes = args.image_mib << 20
    if args.stacks:
        sizes.stacks = tuple(int(x) for x in args.stacks.split(",") if x)
    args.sizes = sizes
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    if args.name is None:
        args.name = "results-quick" if args.quick else "results"
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown system(s): {', '.join(bad)}")
    args.groups = [g for g in args.groups.split(",") if g]
    bad = [g for g in args.groups if g not in GROUPS]
    if bad:
        p.error(f"unknown group(s): {', '.join(bad)}")
    args.only = {w for w in args.only.split(",") if w}
    return args


# ------------------------------------------------------------------ probing

def probe(system: System, scratch: str) -> str | None:
    """None if ``system`` mounts here, else why not (a real trial mount)."""
    reason = system.missing_reason()
    if reason:
        return reason
    root = os.path.join(scratch, "probe-" + system.name)
    dirs = {n: os.path.join(root, n) for n in ("l1", "l2", "upper", "work", "mnt")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(dirs["l2"], "f"), "w") as fh:
        fh.write("probe\n")
    try:
        system.mount([dirs["l1"], dirs["l2"]], dirs["upper"], dirs["work"], dirs["mnt"])
    except Exception as e:  # noqa: BLE001 - any failure means "missing"
        return f"trial mount failed: {e}"
    try:
        with open(os.path.join(dirs["mnt"], "f")) as fh:
            if fh.read() != "probe\n":
                return "trial mount shows wrong content"
    finally:
        system.umount(dirs["mnt"])
        shutil.rmtree(root, ignore_errors=True)
    return None


# ------------------------------------------------------------------ profiling

class Profiler:
    """Attaches py-spy to our daemon after each mount (see --profile)."""

    def __init__(self, outdir: str):
        self.outdir = outdir
        self.procs: list[tuple[subprocess.Popen, str, str]] = []
        self.count = Counter()
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(exe):
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.exe = exe
        os.makedirs(outdir, exist_ok=True)

    def on_mounted(self, system: System, mp: str, workload: str) -> None:
        if system.name != "ours":
            return
        pids = daemon_pids(mp)
        if not pids:
            say(f"profile: no daemon found for {mp}")
            return
        self.count[workload] += 1
        out = os.path.join(self.outdir, f"{workload}-{self.count[workload]}.txt")
        proc = subprocess.Popen([self.exe, "record", "--pid", str(pids[0]), "--rate", "250",
                                 "--native", "--format", "raw", "--output", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)       # let py-spy attach before the measured run
        self.procs.append((proc, workload, out))

    def finish(self) -> None:
        for proc, _, _ in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=10)
        by_workload: dict[str, list[str]] = {}
        for _, wl, out in self.procs:
            if os.path.exists(out):
                by_workload.setdefault(wl, []).append(out)
        lines = ["# py-spy profile of our daemon, per workload", "",
                 "Collapsed stacks (py-spy `--native`, 250 Hz) next to this file, one per "
                 "mount. `epoll_wait (from trio)` is the daemon waiting for the next request "
                 "(idle as far as we are concerned); `writev (from pyfuse3 + libfuse)` is "
                 "sending replies. A syscall is charged to the component that called it. "
                 "`self` = samples with the function on top of the stack, `total` = samples "
                 "with it anywhere on the stack.", ""]
        for wl, files in by_workload.items():
            lines += summarize_profile(wl, files)
        with open(os.path.join(self.outdir, "summary.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        say(f"profile summary: {os.path.join(self.outdir, 'summary.md')}")


def _split_frame(frame: str) -> tuple[str, str]:
    """py-spy raw frames are "function (path/file.py:123)" or "symbol (lib.so)"."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if ":" in where:
        where = where.rsplit(":", 1)[0]
    return name, where


def _component(where: str) -> str | None:
    """Which part of the daemon a frame belongs to; None for libc (a syscall
    is charged to its caller's component)."""
    base = os.path.basename(where)
    if "libfuse" in base:
        return "pyfuse3 + libfuse"
    if not base.endswith((".py", ".pyx", ".pxi", ">")) and base != "__init__.c":
        return None     # libc, libpython, extension modules: charged to the caller
    if base in ("_core.pyx", "_sys.pxi") or "overlay_core" in where:
        return "core (overlay_core)"
    if base in ("fs.py", "_fuseattr.pyx") and ("overlay/" in where or base == "_fuseattr.pyx"):
        return "adapter (overlay/fs.py)"
    if base in ("__init__.pyx", "handlers.pxi", "internal.pxi", "_pyfuse3.py", "__init__.c") \
            or "libfuse" in base or "pyfuse3" in where:
        return "pyfuse3 + libfuse"
    if "trio/" in where or "outcome" in where or "attrs generated" in where or "sniffio" in where:
        return "trio"
    return "other (python, interpreter)"


def summarize_profile(workload: str, files: list[str], top: int = 15) -> list[str]:
    leaf_c, comp_c, ours_c = Counter(), Counter(), Counter()
    n = 0
    for path in files:
        with open(path, errors="replace") as fh:
            for line in fh:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                c = int(count)
                frames = [_split_frame(f) for f in stack.split(";") if f]
                if not frames:
                    continue
                n += c
                comp = next((_component(w) for _, w in reversed(frames)
                             if _component(w) is not None), "other (python, interpreter)")
                leaf_name, leaf_where = frames[-1]
                if _component(leaf_where) is None:
                    kind = "syscall" if os.path.basename(leaf_where).startswith("libc.so") else "native"
                    comp_c[f"{comp}: {kind}"] += c
                    leaf_c[f"{leaf_name} ({kind}, from {comp})"] += c
                else:
                    comp_c[comp] += c
                    leaf_c[f"{leaf_name} ({os.path.basename(leaf_where)})"] += c
                seen = set()
                for name, where in frames:
                    k = _component(where)
                    if k and k.startswith(("core", "adapter")) and name != "run_fs":
                        label = f"{name} ({os.path.basename(where)})"
                        if label not in seen:
                            seen.add(label)
                            ours_c[label] += c
    out = [f"## {workload}", "", f"{n} samples", ""]
    if not n:
        return out + ["(no samples)", ""]
    out += ["| % of samples | where the time goes (by the code running, syscalls charged to their caller) |",
            "|---:|---|"]
    out += [f"| {100 * c / n:.1f} | {k} |" for k, c in comp_c.most_common()]
    out += ["", "| self % | function on top of the stack |", "|---:|---|"]
    out += [f"| {100 * c / n:.1f} | `{f}` |" for f, c in leaf_c.most_common(top)]
    out += ["", "| total % | our function anywhere on the stack (core, adapter) |", "|---:|---|"]
    out += [f"| {100 * c / n:.1f} | `{f}` |" for f, c in ours_c.most_common(top)]
    return out + [""]


# ------------------------------------------------------------------ results

def fmt_time(v) -> str:
    if v is None:
        return "missing"
    if v >= 100:
        return f"{v:.0f} s"
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 0.001:
        return f"{v * 1000:.1f} ms"
    return f"{v * 1e6:.0f} µs"


def fmt_value(v, unit: str = "s") -> str:
    if unit == "B":
        if v is None:
            return "missing"
        return f"{v:.0f} B" if v < 10000 else f"{v / 1024:.0f} KiB"
    return fmt_time(v)


def fmt_ratio(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def build_results(args, metrics: list[Metric], samples, missing, status, meta) -> dict:
    rows = []
    for m in metrics:
        med = {}
        for s in ORDER:
            vals = samples.get(m.id, {}).get(s, [])
            med[s] = statistics.median(vals) if vals else None
        r_k = _ratio(med["ours"], med["kernel"])
        r_f = _ratio(med["ours"], med["fuse-overlayfs"])
        checks = []
        if m.fuse_target is not None:
            checks.append({"id": f"{m.id}:fuse", "description": f"{m.title}: ours ≤ {m.fuse_target}× fuse-overlayfs",
                           "value": r_f, "limit": m.fuse_target, "unit": "×",
                           "passed": None if r_f is None else r_f <= m.fuse_target})
        if m.kernel_target is not None:
            checks.append({"id": f"{m.id}:kernel", "description": f"{m.title}: ours ≤ {m.kernel_target}× kernel",
                           "value": r_k, "limit": m.kernel_target, "unit": "×",
                           "passed": None if r_k is None else r_k <= m.kernel_target})
        if m.abs_target is not None:
            v = med["ours"]
            checks.append({"id": f"{m.id}:abs", "description": f"{m.title}: ours ≤ {fmt_value(m.abs_target, m.unit)}",
                           "value": v, "limit": m.abs_target, "unit": m.unit,
                           "passed": None if v is None else v <= m.abs_target})
        rows.append({
            "id": m.id, "title": m.title, "group": m.group, "unit": m.unit,
            "samples": {s: samples.get(m.id, {}).get(s, []) for s in ORDER},
            "missing": {s: missing.get(m.id, {}).get(s) for s in ORDER
                        if missing.get(m.id, {}).get(s)},
            "median": med, "ours_over_kernel": r_k, "ours_over_fuse": r_f, "targets": checks,
        })
    by_id = {r["id"]: r for r in rows}
    extra = []
    stacks = sorted(args.sizes.stacks)
    if stacks and stacks[0] == 1 and max(stacks) > 1:
        top = max(stacks)
        lo, hi = (by_id.get(f"stack_stat_{n}") for n in (1, top))
        v = _ratio(hi and hi["median"]["ours"], lo and lo["median"]["ours"])
        limit = STACK_RATIO_TARGET if top <= 500 else STACK_RATIO_TARGET_DEEP
        c = {"id": f"stack_stat_{top}:vs1", "description": f"ours: stat at {top} layers ≤ "
             f"{limit}× the time at 1 layer", "value": v, "limit": limit,
             "unit": "×", "passed": None if v is None else v <= limit}
        extra.append(c)
        if hi:
            hi["targets"].append(c)
    mrow = by_id.get(f"mount_{args.sizes.mount_layers}")
    if mrow:
        v = mrow["median"]["ours"]
        limit = MOUNT_TARGET_S if args.sizes.mount_layers <= 500 else MOUNT_TARGET_DEEP_S
        c = {"id": f"{mrow['id']}:abs", "description": f"ours: mount {args.sizes.mount_layers} layers < "
             f"{fmt_time(limit)}", "value": v, "limit": limit, "unit": "s",
             "passed": None if v is None else v < limit}
        extra.append(c)
        mrow["targets"].append(c)
    for r in rows:
        res = [c["passed"] for c in r["targets"]]
        r["pass"] = None if not res or any(x is None for x in res) else all(res)
    targets = [c for r in rows for c in r["targets"]]
    return {"meta": meta, "systems": status, "rows": rows, "targets": targets,
            "summary": {"targets": len(targets),
                        "passed": sum(1 for c in targets if c["passed"]),
                        "failed": sum(1 for c in targets if c["passed"] is False),
                        "unknown": sum(1 for c in targets if c["passed"] is None)},
            "extra_targets": [c["id"] for c in extra]}


def _target_text(c) -> str:
    d = c["description"]
    if c["unit"] == "s":
        return f"< {fmt_time(c['limit'])}"
    if c["unit"] == "B":
        return f"≤ {fmt_value(c['limit'], 'B')}"
    if d.endswith("fuse-overlayfs"):
        return f"≤{c['limit']:g}× fuse"
    if d.endswith("kernel"):
        return f"≤{c['limit']:g}× kernel"
    return f"≤{c['limit']:g}× 1 layer"


def _short(reason: str, width: int = 90) -> str:
    """A missing-reason for a table cell: mount paths dropped, length capped
    (the JSON keeps the whole message)."""
    reason = " ".join(w for w in reason.split() if "/bench-run-" not in w)
    return reason if len(reason) <= width else reason[:width - 1] + "…"


def _pass_text(p) -> str:
    return {True: "pass", False: "**FAIL**", None: "n/a"}[p]


def render_markdown(res: dict) -> str:
    meta, systems = res["meta"], res["systems"]
    out = [f"# Benchmark results ({'quick' if meta['quick'] else 'full'})", "",
           f"{meta['date']} on {meta['host']} ({meta['cpus']} CPUs, {meta['kernel']}); "
           f"{meta['reps']} repetitions, interleaved; medians. Command: `{meta['command']}`", "",
           "| system | version | status |", "|---|---|---|"]
    for s in ORDER:
        st = systems.get(s, {})
        out.append(f"| {s} | {st.get('version', '')} | "
                   f"{'ok' if st.get('available') else 'missing (' + str(st.get('reason')) + ')'} |")
    out += ["", "Sizes: " + ", ".join(f"{k}={v}" for k, v in meta["sizes"].items()), "",
            "| workload | " + " | ".join(ORDER) + " | ours/kernel | ours/fuse | targets | pass |",
            "|---|" + "---:|" * len(ORDER) + "---:|---:|---|---|"]
    for r in res["rows"]:
        cells = []
        for s in ORDER:
            if r["median"][s] is None:
                why = r["missing"].get(s) or systems.get(s, {}).get("reason") or "not run"
                cells.append(f"missing ({_short(why)})")
            else:
                cells.append(fmt_value(r["median"][s], r.get("unit", "s")))
        tg = "; ".join(_target_text(c) for c in r["targets"])
        out.append(f"| {r['title']} | {' | '.join(cells)} | {fmt_ratio(r['ours_over_kernel'])} | "
                   f"{fmt_ratio(r['ours_over_fuse'])} | {tg} | {_pass_text(r['pass'])} |")
    out += ["", "## Targets", "", "| target | measured | result |", "|---|---:|---|"]
    for c in res["targets"]:
        v = c["value"]
        mv = "–" if v is None else (fmt_value(v, c["unit"]) if c["unit"] in ("s", "B") else f"{v:.2f}×")
        out.append(f"| {c['description']} | {mv} | {_pass_text(c['passed'])} |")
    s = res["summary"]
    out += ["", f"{s['passed']} of {s['targets']} targets pass, {s['failed']} fail, "
            f"{s['unknown']} not measurable.", "",
            "Fresh: new mount and `echo 3 > /proc/sys/vm/drop_caches` before the run; warm: the "
            "same run again on that mount. Writes are timed up to the last close (no sync). "
            "Every mount has an empty upper dir of its own.", ""]
    return "\n".join(out)


def render_png(res: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]')"
    rows = res["rows"]
    labels = [r["title"] for r in rows]
    rk = [r["ours_over_kernel"] or 0 for r in rows]
    rf = [r["ours_over_fuse"] or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.8))
    ys = range(len(rows))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], rk, h, label="ours / kernel overlay", color="#4c72b0")
    ax.barh([y + h / 2 for y in ys], rf, h, label="ours / fuse-overlayfs", color="#dd8452")
    for y, a, b in zip(ys, rk, rf):
        for off, v in ((-h / 2, a), (h / 2, b)):
            ax.text(v if v else 1.0, y + off, f" {v:.2f}×" if v else " missing",
                    va="center", fontsize=6.5)
    ax.axvline(1.0, color="black", linewidth=0.8)
    positive = [v for v in rk + rf if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio (lower is better; 1 = same speed; missing = no bar)")
    ax.set_title(f"overlay-fuse vs kernel overlay and fuse-overlayfs ({res['meta']['date']})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------ main

def rerender(path: str, png: bool = True) -> int:
    """Write <stem>.md and <stem>.png again from <stem>.json."""
    with open(path) as fh:
        res = json.load(fh)
    stem = path[:-5] if path.endswith(".json") else path
    md = render_markdown(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    if png:
        why = render_png(res, stem + ".png")
        if why:
            say(f"no chart: {why}")
    print(md)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args.render, not args.no_png)
    if "ops" in args.groups:
        # the per-operation group: its own runner (systems in both io_uring
        # modes, the C floor, idle and busy)
        from . import ops

        rc = ops.main(["--reps", str(args.reps or 5), "--out", args.out]
                      + (["--floor", args.floor] if args.floor else []))
        args.groups = [g for g in args.groups if g != "ops"]
        if not args.groups or rc:
            return rc
    if os.geteuid() != 0:
        say("warning: not root: the kernel overlay and fresh (cache-dropping) runs will be missing")
    own_scratch = args.scratch is None
    scratch = args.scratch or tempfile.mkdtemp(prefix="bench-run-", dir="/tmp")
    os.makedirs(scratch, exist_ok=True)
    status = {}
    for s in ORDER:
        system = SYSTEMS[s]
        if s not in args.systems:
            status[s] = {"available": False, "reason": "not selected", "version": ""}
            continue
        reason = probe(system, scratch)
        status[s] = {"available": reason is None, "reason": reason, "version": system.version()}
        say(f"{s}: {'ok' if reason is None else 'missing: ' + reason}")
    profiler = Profiler(args.profile) if args.profile else None
    bench = Bench(args.sizes, args.data, scratch, log=say,
                  on_mounted=profiler.on_mounted if profiler else None)
    t_start = time.monotonic()
    samples: dict[str, dict[str, list[float]]] = {}
    missing: dict[str, dict[str, str]] = {}
    try:
        bench.prepare(tuple(args.groups))
        workloads = [w for w in bench.workloads()
                     if w.tags & set(args.groups) and (not args.only or w.name in args.only)]
        metrics = [m for w in workloads for m in w.metrics]
        say(f"data ready after {time.monotonic() - t_start:.0f} s; "
            f"{len(workloads)} workloads x {args.reps} repetitions")
        for rep in range(args.reps):
            for w in workloads:
                for s in ORDER:
                    if not status[s]["available"]:
                        continue
                    if any(missing.get(m.id, {}).get(s, "").startswith("limit") for m in w.metrics):
                        continue
                    try:
                        vals = w.run(SYSTEMS[s])
                    except Missing as e:
                        for m in w.metrics:
                            missing.setdefault(m.id, {})[s] = str(e)
                        say(f"rep {rep + 1}/{args.reps} {w.name} {s}: missing ({e})")
                        continue
                    except Exception as e:  # noqa: BLE001 - report, go on with the rest
                        for m in w.metrics:
                            missing.setdefault(m.id, {}).setdefault(s, f"error: {e}")
                        say(f"rep {rep + 1}/{args.reps} {w.name} {s}: ERROR {e}")
                        continue
                    for k, v in vals.items():
                        samples.setdefault(k, {}).setdefault(s, []).append(v)
                    units = {m.id: m.unit for m in w.metrics}
                    say(f"rep {rep + 1}/{args.reps} {w.name:8s} {s:15s} "
                        + "  ".join(f"{k}={fmt_value(v, units.get(k, 's'))}" for k, v in vals.items()))
    finally:
        if profiler:
            profiler.finish()
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    # errors only count as missing when no sample at all was taken
    for mid, per in missing.items():
        for s in list(per):
            if samples.get(mid, {}).get(s):
                del per[s]
    meta = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick, "reps": args.reps,
        "sizes": args.sizes.describe(), "groups": args.groups,
        "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.monotonic() - t_start, 1), "profiled": bool(profiler),
    }
    res = build_results(args, metrics, samples, missing, status, meta)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1, ensure_ascii=False)
    md = render_markdown(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    if not args.no_png:
        why = render_png(res, stem + ".png")
        if why:
            say(f"no chart: {why}")
    print(md)
    say(f"wrote {stem}.md, {stem}.json" + ("" if args.no_png else f", {stem}.png")
        + f" in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
