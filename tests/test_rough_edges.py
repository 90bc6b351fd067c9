"""The command line's rough edges a new user met (issue 22), each fixed:
output piped into head ends quietly, every error is one line naming the
user's path, and the options' messages agree. Mounts made here are
unmounted in teardown."""

from __future__ import annotations

import os
import subprocess

import pytest

from overlay import cli
from overlay.options import OptionError, parse_options, parse_size
from overlay.stats import format_stats
from relutil import mkdirs, overlay_cmd, overlay_env, relmounts, reltmp  # noqa: F401  (fixtures)


def _run(*args, timeout=60):
    return subprocess.run(overlay_cmd(*args), capture_output=True, text=True, env=overlay_env(),
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _sh(cmd, timeout=60):
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=overlay_env(),
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture
def mounted(reltmp, relmounts):
    lo, up, wk, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.makedirs(f"{lo}/sub/deeper")
    for i in range(300):
        with open(f"{lo}/f{i}", "w") as f:
            f.write("x" * 1000)
    relmounts.ours([lo], up, wk, mp)
    for i in range(300):
        with open(f"{mp}/f{i}", "a") as f:      # 300 copy-ups: a diff of 300 lines
            f.write("y")
    return lo, up, wk, mp


def test_stats_watch_must_be_positive(mounted):
    mp = mounted[3]
    r = _run("stats", "--watch", "-1", mp)
    assert r.returncode == 2
    assert _lines(r.stderr) == ["overlay: --watch takes a positive number of seconds, not -1"]


def test_piping_into_head_ends_quietly(mounted, reltmp):
    lo, up, wk, mp = mounted
    py = " ".join(overlay_cmd())
    for cmd in (f"{py} stats --watch 0.1 {mp} | head -1",
                f"{py} diff {up} | head -1",
                f"{py} commit {up} -o - --no-progress | head -c1",
                f"{py} list | head -1"):
        r = _sh(cmd)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr, (cmd, r.stderr)
        assert r.stdout, cmd


def test_stats_of_a_path_inside_the_mount(mounted):
    mp = mounted[3]
    r = _run("stats", f"{mp}/sub/deeper")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("requests")


def test_commit_output_errors_name_the_users_path(mounted, reltmp):
    up = mounted[1]
    (outdir,) = mkdirs(reltmp, "out")
    r = _run("commit", up, "-o", outdir)
    assert r.returncode == 1 and len(_lines(r.stderr)) == 1
    assert f"'{outdir}' is a directory" in r.stderr and ".tmp" not in r.stderr
    r = _run("commit", up, "-o", "/missing/x.tar")
    assert r.returncode == 1 and len(_lines(r.stderr)) == 1
    assert "'/missing/x.tar'" in r.stderr and ".tmp" not in r.stderr
    r = _run("commit", up, "-o", f"{outdir}/x.zip")
    assert r.returncode == 1 and "not another archive format" in r.stderr
    assert os.listdir(outdir) == []


def test_demo_dir_must_exist(reltmp):
    missing = os.path.join(reltmp, "missing", "deeper")
    r = _run("demo", "--dir", missing)
    assert r.returncode == 2
    assert _lines(r.stderr) == [f"overlay demo: --dir {missing}: no such directory"]
    assert not os.path.exists(os.path.join(reltmp, "missing"))


def test_diff_warns_about_a_plain_dir_and_a_mounted_upper(mounted, reltmp):
    up = mounted[1]
    (plain,) = mkdirs(reltmp, "plain")
    with open(f"{plain}/passwd", "w") as f:
        f.write("root\n")
    r = _run("diff", plain)
    assert r.returncode == 0
    assert "does not look like an upper dir" in r.stderr
    assert r.stdout.strip() == "A /passwd"
    r = _run("diff", up)
    assert r.returncode == 0
    assert f"'{up}' is the upper dir of a live overlay mount" in r.stderr
    assert len(_lines(r.stdout)) == 300


def test_workers_messages_agree(tmp_path):
    lo = tmp_path / "l"
    lo.mkdir()
    msgs = []
    for v in ("0", "100"):
        with pytest.raises(OptionError) as ei:
            parse_options(f"lowerdir={lo},workers={v}", str(tmp_path))
        msgs.append(str(ei.value).replace(f"'{v}'", "N"))
    assert msgs[0] == msgs[1]
    assert "expected 1 to 64" in msgs[0]


def test_quota_sizes_with_a_fraction():
    assert parse_size("1.5G", "quota_bytes") == 1536 * 1024 * 1024
    assert parse_size("0.5k", "quota_bytes") == 512
    for bad in ("1.G", ".5G", "1.5.1G", "1,5G"):
        with pytest.raises(OptionError):
            parse_size(bad, "quota_bytes")


def test_stats_over_a_quota_limit():
    text = format_stats({"quota": {"bytes": 10, "bytes_limit": None, "inodes": 6, "inodes_limit": 0}})
    assert "quota inodes    6 of 0 (over the limit)" in text
    assert "100.0%" not in text


def test_helpers_help_and_version(capsys):
    assert cli.containers_mount_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: overlay-containers-mount") and "overlay-mount [" not in out
    assert cli.mount_helper_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("overlay-mount ")
