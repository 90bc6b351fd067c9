"""Keeps the benchmark comparison runner (``python -m benchmarks.compare``)
working: one run on tiny data, checking the files it writes and their
structure. Nothing here is timed or compares speeds.

The mounted run needs root and /dev/fuse (the kernel overlay and
fuse-overlayfs may be missing: the runner must then say so in its output);
the rendering test needs neither.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import compare, macro  # noqa: E402

SYSTEMS = ["kernel", "fuse-overlayfs", "ours", "ours-pyfuse3"]
TINY = ["--quick", "--reps", "1", "--files", "60", "--dirs", "6", "--stat-paths", "20",
        "--big-mib", "1", "--create", "20", "--untar", "30", "--stacks", "1,3",
        "--bottom", "5", "--mount-layers", "4", "--image-files", "20", "--image-mib", "1",
        # (the pyfuse3 engine left out: its own test covers it; suite time)
        "--systems", "kernel,fuse-overlayfs,ours",
        # (the ops group has its own runner: test_ops_runner_tiny)
        "--groups", "tree,big,small,layers,image"]
ROW_IDS = ["find_fresh", "find_warm", "lsR_fresh", "lsR_warm", "stat_fresh", "stat_warm",
           "cpa", "rm_copy", "rm_lower", "git", "lat_stat", "mem_inode",
           "read_fresh", "read_warm", "write", "copyup", "create", "untar", "lat_create",
           "chown_meta", "chmod_meta", "upper_meta", "chown_full", "upper_full",
           "stack_stat_1", "stack_stat_3", "mount_4"]


def _check_structure(res: dict, md: str) -> None:
    assert set(res) >= {"meta", "systems", "rows", "targets", "summary"}
    assert set(res["systems"]) == set(SYSTEMS)
    for s in res["systems"].values():
        assert isinstance(s["available"], bool)
        assert s["available"] or s["reason"]
    for row in res["rows"]:
        assert set(row) >= {"id", "title", "samples", "median", "ours_over_kernel",
                            "ours_over_fuse", "targets", "pass"}
        for s in SYSTEMS:
            med = row["median"][s]
            assert med is None or (isinstance(med, float) and med >= 0)
            if med is None:
                assert row["samples"][s] == []
        for c in row["targets"]:
            assert c["passed"] in (True, False, None)
    for c in res["targets"]:
        assert set(c) >= {"id", "description", "value", "limit", "passed"}
    assert res["summary"]["targets"] == len(res["targets"])
    assert ("| workload | kernel | fuse-overlayfs | ours | ours-pyfuse3 | ours/kernel | ours/fuse | targets | pass |"
            in md)
    assert "## Targets" in md
    for s, st in res["systems"].items():
        if not st["available"]:
            assert f"missing ({st['reason']}" in md


def test_render_without_mounts(tmp_path):
    """Results, ratios and targets from made-up samples; a missing system."""
    metrics = [macro.Metric("find_warm", "find warm", "tree", kernel_target=1.5),
               macro.Metric("stack_stat_1", "stat 1", "layers"),
               macro.Metric("stack_stat_500", "stat 500", "layers"),
               macro.Metric("mount_500", "mount 500", "layers")]
    samples = {"find_warm": {"kernel": [1.0, 2.0, 3.0], "ours": [2.0, 2.0, 9.0]},
               "stack_stat_1": {"kernel": [1.0], "ours": [1.0]},
               "stack_stat_500": {"kernel": [2.0], "ours": [1.1]},
               "mount_500": {"kernel": [0.01], "ours": [0.1]}}
    status = {"kernel": {"available": True, "reason": None, "version": "k"},
              "fuse-overlayfs": {"available": False, "reason": "not installed", "version": ""},
              "ours": {"available": True, "reason": None, "version": "o"},
              "ours-pyfuse3": {"available": False, "reason": "not installed", "version": ""}}
    args = SimpleNamespace(sizes=macro.Sizes(stacks=(1, 500), mount_layers=500))
    meta = {"date": "d", "host": "h", "kernel": "k", "cpus": 2, "quick": True, "reps": 3,
            "sizes": args.sizes.describe(), "command": "c"}
    res = compare.build_results(args, metrics, samples, {}, status, meta)
    md = compare.render_markdown(res)
    _check_structure(res, md)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["find_warm"]["median"] == {"kernel": 2.0, "fuse-overlayfs": None, "ours": 2.0,
                                           "ours-pyfuse3": None}
    assert rows["find_warm"]["ours_over_kernel"] == 1.0
    assert rows["find_warm"]["ours_over_fuse"] is None
    assert rows["find_warm"]["pass"] is None          # fuse-overlayfs target not measurable
    checks = {c["id"]: c for c in res["targets"]}
    assert checks["find_warm:kernel"]["passed"] is True
    assert checks["stack_stat_500:vs1"]["passed"] is True
    assert checks["mount_500:abs"]["passed"] is True
    assert "missing (not installed)" in md
    if importlib.util.find_spec("matplotlib"):
        assert compare.render_png(res, str(tmp_path / "r.png")) is None
        assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the runner mounts: needs root")
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_runner_tiny(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.compare", *TINY, "--data", str(tmp_path / "data"),
           "--out", str(out), "--name", "tiny"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "tiny.json").read_text())
    md = (out / "tiny.md").read_text()
    _check_structure(res, md)
    assert [row["id"] for row in res["rows"]] == ROW_IDS
    assert res["systems"]["ours"]["available"], res["systems"]["ours"]
    for row in res["rows"]:
        for s in SYSTEMS:
            if res["systems"][s]["available"] and not row["missing"].get(s):
                assert len(row["samples"][s]) == 1, (row["id"], s)
    ids = {c["id"] for c in res["targets"]}
    assert {"stack_stat_3:vs1", "mount_4:abs", "copyup:kernel", "find_warm:kernel"} <= ids
    if importlib.util.find_spec("matplotlib"):
        assert (out / "tiny.png").stat().st_size > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the runner mounts: needs root")
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_ops_runner_tiny(tmp_path):
    """benchmarks.ops (compare's ops group), small: one load, 50 objects;
    its table has every op for every system that ran."""
    cmd = [sys.executable, "-m", "benchmarks.ops", "--systems", "kernel,fuse-overlayfs,ours-uring,ours-devfuse",
           "--loads", "idle", "--reps", "1", "--count", "50", "--scratch", str(tmp_path / "s"),
           "--out", str(tmp_path), "--name", "ops"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "ops.md").read_text()
    assert "| op | kernel overlay | fuse-overlayfs | ours, io_uring | ours, /dev/fuse |" in md, md
    for op in ("create", "chown", "chmod", "utime", "open", "rename", "mkdir", "unlink", "stat", "untar"):
        row = next((ln for ln in md.splitlines() if ln.startswith(f"| {op} |")), None)
        assert row is not None and row.count("|") == 6, (op, md)
        assert all(c.strip() for c in row.split("|")[2:5]), row     # kernel, fuse-overlayfs, ours: figures
