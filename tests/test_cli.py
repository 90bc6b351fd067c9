"""Tests of the command line and mount options (tests/test_cli.py).

* ``overlay.options``: parsing (escapes, empty and generic options, relative
  paths) and validation, in process;
* ``overlay`` / ``overlay-mount``: table-driven bad input -> exact one-line
  message, exit code 1 (2 for usage), nothing mounted;
* the background-mount machinery (fork, readiness pipe, detached stdio) with a
  fake filesystem, so it is tested without FUSE;
* with root and /dev/fuse: a real ``overlay mount``/``umount`` round trip,
  ``overlay demo`` and ``mount -t fuse.overlay-mount``.  These need the real
  filesystem (overlay.fs) and fail, not skip, when it is broken.

Everything mounted here is unmounted in a ``finally``/fixture teardown.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from overlay import cli
from overlay.options import (
    GENERIC_OPTIONS,
    MountConfig,
    OptionError,
    parse_options,
    split_lowerdir,
    split_options,
    validate_mountpoint,
)

log = logging.getLogger(__name__)

PY = sys.executable
BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
HAVE_FUSE = os.path.exists("/dev/fuse")

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (not running as uid 0)")
needs_fuse_mount = pytest.mark.skipif(
    not (IS_ROOT and HAVE_FUSE),
    reason="mounting tests need root and /dev/fuse"
    + ("" if IS_ROOT else " (not root)")
    + ("" if HAVE_FUSE else " (/dev/fuse missing)"),
)

HELPER_CODE = "import sys; from overlay.cli import mount_helper_main; sys.exit(mount_helper_main())"


# --------------------------------------------------------------------------
# helpers


def mounted_at(path: str | os.PathLike) -> bool:
    """Is anything mounted exactly on ``path`` (per /proc/self/mountinfo)?"""
    target = os.path.abspath(path)
    return any(entry.mountpoint == target for entry in cli.iter_mounts())


def mount_options_of(path: str | os.PathLike) -> str:
    """mount and super options of the topmost mount on ``path``."""
    target = os.path.abspath(path)
    found = ""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if cli._unescape_mountinfo(fields[4]) == target:
                sep = fields.index("-", 6)
                found = fields[5] + "," + (fields[sep + 3] if len(fields) > sep + 3 else "")
    return found


def force_unmount(path: str | os.PathLike) -> None:
    """Teardown helper: unmount ``path`` (ours) by any means; never raises."""
    path = os.path.abspath(path)
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not mounted_at(path):
            return
        if shutil.which(cmd[0]) is None:
            continue
        subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
        for _ in range(50):
            if not mounted_at(path):
                return
            time.sleep(0.05)
    if mounted_at(path):
        log.warning("could not unmount %s", path)


def run(cmd: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def overlay_cmd(*args: str) -> list[str]:
    return [PY, "-m", "overlay", *args]


def helper_cmd(*args: str) -> list[str]:
    return [PY, "-c", HELPER_CODE, *args]


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scratch layout: lower layers, upper/work, a file, a mount point."""
    root = Path(os.path.realpath(tmp_path))
    for name in ("l1", "l2", "u", "w", "u/w", "w2", "w2/u", "same", "mp", "x:y", "p,q"):
        (root / name).mkdir()
    (root / "file").write_text("not a directory\n")
    (root / "l1" / "from_l1").write_text("l1\n")
    (root / "l2" / "from_l2").write_text("l2\n")
    (root / "link_to_l1").symlink_to(root / "l1")
    return root


@pytest.fixture
def other_fs(tree: Path):
    """A small tmpfs mounted inside ``tree`` (root only); unmounted afterwards."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mp = tree / "tmpfs"
    mp.mkdir()
    proc = run(["mount", "-t", "tmpfs", "-o", "size=1m", "infra-test-tmpfs", str(mp)])
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        (mp / "w").mkdir()
        yield mp
    finally:
        force_unmount(mp)


# --------------------------------------------------------------------------
# overlay.options: parsing


def test_basic_layers_top_first(tree: Path):
    cfg = parse_options(f"lowerdir={tree}/l2:{tree}/l1,upperdir={tree}/u,workdir={tree}/w", "/")
    assert cfg.lowers == [f"{tree}/l2", f"{tree}/l1"]
    assert cfg.upper == f"{tree}/u"
    assert cfg.work == f"{tree}/w"
    assert cfg.redirect_dir is True
    assert not (cfg.userxattr or cfg.volatile or cfg.allow_other or cfg.default_permissions)
    assert cfg.fsname == "overlay"
    assert not cfg.read_only


def test_relative_paths_resolved_against_cwd(tree: Path):
    cfg = parse_options("lowerdir=l2:./l1,upperdir=u,workdir=../" + tree.name + "/w", str(tree))
    assert cfg.lowers == [f"{tree}/l2", f"{tree}/l1"]
    assert cfg.upper == f"{tree}/u"
    assert cfg.work == f"{tree}/w"
    assert all(os.path.isabs(p) for p in [*cfg.lowers, cfg.upper, cfg.work])


def test_symlinked_layer_is_canonicalised(tree: Path):
    cfg = parse_options("lowerdir=link_to_l1", str(tree))
    assert cfg.lowers == [f"{tree}/l1"]


@pytest.mark.parametrize(
    "opts",
    [
        "lowerdir=l1,",
        ",lowerdir=l1",
        "lowerdir=l1,,",
        ",,lowerdir=l1,,,",
        "lowerdir=l1, ,",
    ],
)
def test_empty_options_ignored(tree: Path, opts: str):
    assert parse_options(opts, str(tree)).lowers == [f"{tree}/l1"]


def test_generic_options_ignored(tree: Path):
    generic = "rw,dev,suid,exec,noatime,relatime,nodev,nosuid,noexec,atime,async,sync"
    cfg = parse_options(f"{generic},lowerdir=l1,defaults,nofail,_netdev,x-systemd.automount", str(tree))
    assert cfg.lowers == [f"{tree}/l1"]
    assert cfg.upper is None
    for opt in generic.split(","):
        assert opt in GENERIC_OPTIONS


def test_colon_escape_in_lowerdir(tree: Path):
    cfg = parse_options(r"lowerdir=x\:y:l1", str(tree))
    assert cfg.lowers == [f"{tree}/x:y", f"{tree}/l1"]


def test_comma_escape_in_paths(tree: Path):
    cfg = parse_options(r"lowerdir=p\,q:l1", str(tree))
    assert cfg.lowers == [f"{tree}/p,q", f"{tree}/l1"]


def test_split_helpers():
    assert split_options("a,,b,") == ["a", "b"]
    assert split_options(r"lowerdir=a\,b:c,ro") == [r"lowerdir=a\,b:c", "ro"]
    assert split_lowerdir(r"a\:b:c\\:d") == ["a:b", "c\\", "d"]


def test_flags_and_values(tree: Path):
    cfg = parse_options(
        "lowerdir=l1,upperdir=u,workdir=w,userxattr,volatile,allow_other,"
        "default_permissions,debug,fsname=myfs,index=off,metacopy=off,xino=auto",
        str(tree),
    )
    assert (cfg.userxattr, cfg.volatile, cfg.allow_other, cfg.default_permissions, cfg.debug) == (
        True, True, True, True, True,
    )
    assert cfg.fsname == "myfs"
    assert cfg.index is False
    assert parse_options("lowerdir=l1,xino=off", str(tree)).lowers == [f"{tree}/l1"]
    assert parse_options("lowerdir=l1,index=on", str(tree)).index is True


@pytest.mark.parametrize(
    ("value", "expected"), [("on", True), ("off", False), ("follow", False), ("nofollow", False)]
)
def test_redirect_dir_values(tree: Path, value: str, expected: bool):
    assert parse_options(f"lowerdir=l1,redirect_dir={value}", str(tree)).redirect_dir is expected


def test_ro_keeps_upper_and_work(tree: Path):
    """ro mounts the whole stack read-only, the upper layer included, as
    the kernel's ro (tests/test_diff_conformance.py mounts it)."""
    cfg = parse_options("lowerdir=l1,upperdir=u,workdir=w,ro", str(tree))
    assert cfg.upper == f"{tree}/u" and cfg.work == f"{tree}/w"
    assert cfg.read_only and cfg.ro
    assert cfg.lowers == [f"{tree}/l1"]
    assert cfg.atime == ("relatime", False)
    assert not parse_options("lowerdir=l1,upperdir=u,workdir=w", str(tree)).read_only
    assert parse_options("lowerdir=l1", str(tree)).read_only


@pytest.mark.parametrize(("opts", "rule"), [
    ("", ("relatime", False)),
    ("noatime", ("noatime", False)),
    ("strictatime", ("strictatime", False)),
    ("noatime,strictatime", ("strictatime", False)),
    ("strictatime,noatime", ("strictatime", False)),
    ("relatime,nodiratime", ("relatime", True)),
    ("noatime,atime", ("relatime", False)),
    ("nodiratime,diratime", ("relatime", False)),
])
def test_atime_rules_from_the_options(tree: Path, opts, rule):
    """The kernel's rules: relatime unless noatime, strictatime above both."""
    cfg = parse_options("lowerdir=l1,upperdir=u,workdir=w" + ("," + opts if opts else ""), str(tree))
    assert cfg.atime == rule


@pytest.mark.parametrize(("current", "given", "want"), [
    ("rw,nosuid,nodev,relatime", ["ro"], ("ro", "nosuid", "nodev")),
    ("ro,nosuid,nodev,relatime", ["rw", "noatime"], ("nosuid", "nodev", "noatime")),
    ("rw,noatime", ["strictatime"], ("strictatime",)),
    ("rw", ["nodiratime"], ("strictatime", "nodiratime")),     # (no word: strictatime)
    ("rw,relatime,nodiratime", [], ("nodiratime",)),
])
def test_remount_flags_keep_what_is_not_given(current, given, want):
    from overlay import options as O

    flags = O.remount_flags(current, given)
    words = {"ro": O.MS_RDONLY, "nosuid": O.MS_NOSUID, "nodev": O.MS_NODEV, "noatime": O.MS_NOATIME,
             "strictatime": O.MS_STRICTATIME, "nodiratime": O.MS_NODIRATIME}
    assert {w for w, f in words.items() if flags & f} == set(want)


def test_later_option_wins(tree: Path):
    assert parse_options("lowerdir=l1,lowerdir=l2", str(tree)).lowers == [f"{tree}/l2"]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ("upperdir=u,workdir=w", "missing required option 'lowerdir='"),
        ("", "missing required option 'lowerdir='"),
        ("lowerdir=", "empty layer path in lowerdir="),
        ("lowerdir=l1:::l2", "only single ':' or double '::' sequences of unescaped colons are allowed in lowerdir="),
        ("lowerdir=l1::l2:l1", "regular lower layers cannot follow data-only lower layers in lowerdir="),
        ("lowerdir=::l2", "empty layer path in lowerdir="),
        ("lowerdir=l1:nope", "lower layer '{t}/nope' does not exist"),
        ("lowerdir=file", "lower layer '{t}/file' is neither a directory nor a layer blob (tar, tar+gzip, tar+zstd)"),
        ("lowerdir=file/sub", "lower layer '{t}/file/sub' does not exist"),
        ("lowerdir=l1,upperdir=u", "upperdir= given without workdir="),
        ("lowerdir=l1,workdir=w", "workdir= given without upperdir="),
        ("lowerdir=l1,upperdir=nope,workdir=w", "upperdir '{t}/nope' does not exist"),
        ("lowerdir=l1,upperdir=u,workdir=file", "workdir '{t}/file' is not a directory"),
        (
            "lowerdir=l1,upperdir=u,workdir=u/w",
            "upperdir '{t}/u' and workdir '{t}/u/w' must be different, non-nested directories",
        ),
        (
            "lowerdir=l1,upperdir=w2/u,workdir=w2",
            "upperdir '{t}/w2/u' and workdir '{t}/w2' must be different, non-nested directories",
        ),
        (
            "lowerdir=l1,upperdir=same,workdir=same",
            "upperdir '{t}/same' and workdir '{t}/same' must be different, non-nested directories",
        ),
        ("lowerdir=l1,bogus", "unknown mount option 'bogus'"),
        ("lowerdir=l1,colour=blue", "unknown mount option 'colour'"),
        (
            "lowerdir=l1,redirect_dir=maybe",
            "bad value 'maybe' for redirect_dir (expected on, off, follow or nofollow)",
        ),
        ("lowerdir=l1,redirect_dir", "mount option 'redirect_dir' needs a value (redirect_dir=...)"),
        ("lowerdir=l1,volatile=yes", "mount option 'volatile' takes no value"),
        ("lowerdir=l1,index=yes", "bad value 'yes' for index (expected on or off)"),
        ("lowerdir=l1,xino=maybe", "bad value 'maybe' for xino (expected on, off or auto)"),
        ("lowerdir=l1,uuid=x", "bad value 'x' for uuid (expected on, off, null or auto)"),
        ("lowerdir=l1,metacopy=on,redirect_dir=off", "conflicting options: metacopy=on,redirect_dir=follow"),
        ("lowerdir=l1,metacopy=on,redirect_dir=nofollow",
         "conflicting options: metacopy=on,redirect_dir=nofollow"),
        # without upper layer the kernel first falls back to nfs_export=off
        # unless redirect_dir=nofollow: then it checks the combination
        ("lowerdir=l1,nfs_export=on,index=off,redirect_dir=nofollow",
         "conflicting options: nfs_export=on,index=off"),
        ("lowerdir=l1,upperdir=u,workdir=w,nfs_export=on,index=off",
         "conflicting options: nfs_export=on,index=off"),
        ("lowerdir=l1,upperdir=u,workdir=w,nfs_export=on,metacopy=on",
         "conflicting options: nfs_export=on,metacopy=on"),
        ("lowerdir=l1,userxattr,metacopy=on", "conflicting options: userxattr,metacopy=on"),
        ("lowerdir=l1,userxattr,redirect_dir=on", "conflicting options: userxattr,redirect_dir=on"),
        ("lowerdir=l1,userxattr,redirect_dir=off", "conflicting options: userxattr,redirect_dir=follow"),
        ("lowerdir=l1,userxattr,redirect_dir=follow", "conflicting options: userxattr,redirect_dir=follow"),
    ],
)
def test_option_errors(tree: Path, opts: str, message: str):
    with pytest.raises(OptionError) as info:
        parse_options(opts, str(tree))
    assert str(info.value) == message.format(t=tree)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("opts", "nfs_export", "index", "follow"),
    [
        # the kernel's fallback: no upper layer, redirects followed
        ("lowerdir=l1,nfs_export=on", False, False, True),
        ("lowerdir=l1,nfs_export=on,index=off", False, False, True),
        ("lowerdir=l1,nfs_export=on,metacopy=on", False, False, True),
        ("lowerdir=l1,nfs_export=on,redirect_dir=nofollow", True, False, False),
        # with an upper layer nfs_export=on brings index=on
        ("lowerdir=l1,upperdir=u,workdir=w,nfs_export=on", True, True, True),
        ("lowerdir=l1,upperdir=u,workdir=w,nfs_export=on,redirect_dir=on", True, True, True),
        ("lowerdir=l1,upperdir=u,workdir=w,nfs_export=on,userxattr", True, True, False),
        ("lowerdir=l1,upperdir=u,workdir=w,redirect_dir=nofollow", False, False, False),
        ("lowerdir=l1,upperdir=u,workdir=w,userxattr", False, False, False),
        ("lowerdir=l1,upperdir=u,workdir=w,redirect_dir=follow", False, False, True),
    ],
)
def test_nfs_export_and_redirect_follow(tree: Path, opts: str, nfs_export, index, follow):
    for d in ("u", "w"):
        (tree / d).mkdir(exist_ok=True)
    cfg = parse_options(opts, str(tree))
    assert (cfg.nfs_export, cfg.index, cfg.redirect_follow) == (nfs_export, index, follow)


def test_work_on_other_filesystem_in_process(tree: Path, other_fs: Path):
    with pytest.raises(OptionError) as info:
        parse_options(f"lowerdir=l1,upperdir=u,workdir={other_fs}/w", str(tree))
    assert str(info.value) == (
        f"workdir '{other_fs}/w' is not on the same filesystem as upperdir '{tree}/u'"
    )


def test_validate_mountpoint(tree: Path):
    assert validate_mountpoint("mp", str(tree)) == f"{tree}/mp"
    with pytest.raises(OptionError, match=r"^mountpoint '.*/nomp' does not exist$"):
        validate_mountpoint("nomp", str(tree))
    with pytest.raises(OptionError, match=r"^mountpoint '.*/file' is not a directory$"):
        validate_mountpoint("file", str(tree))


def test_mountconfig_defaults():
    cfg = MountConfig(lowers=["/a"], upper=None, work=None)
    assert (cfg.userxattr, cfg.redirect_dir, cfg.volatile, cfg.allow_other) == (False, True, False, None)
    assert (cfg.default_permissions, cfg.debug, cfg.fsname) == (False, False, "overlay")


# --------------------------------------------------------------------------
# overlay-mount argument forms and mountinfo parsing


@pytest.mark.parametrize(
    ("argv", "source", "mountpoint", "options"),
    [
        (["-o", "lowerdir=a", "/mnt"], None, "/mnt", ["lowerdir=a"]),
        (["overlay", "/mnt", "-o", "lowerdir=a,rw"], "overlay", "/mnt", ["lowerdir=a,rw"]),
        (["-o", "lowerdir=a", "overlay", "/mnt", "-o", "ro"], "overlay", "/mnt", ["lowerdir=a", "ro"]),
        (["-olowerdir=a", "/mnt"], None, "/mnt", ["lowerdir=a"]),
        (["-n", "src", "mnt", "-v", "-o", "x"], "src", "mnt", ["x"]),
        (["-o", "a", "--", "-weird"], None, "-weird", ["a"]),
    ],
)
def test_parse_helper_args(argv, source, mountpoint, options):
    args = cli.parse_helper_args(argv)
    assert (args.source, args.mountpoint, args.options) == (source, mountpoint, options)


@pytest.mark.parametrize("argv", [[], ["a", "b", "c"], ["-o"], ["--bogus", "/mnt"]])
def test_parse_helper_args_usage_errors(argv):
    with pytest.raises(cli.HelperUsageError):
        cli.parse_helper_args(argv)


def test_mountinfo_unescape(tmp_path: Path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.overlay-mount my\\040src rw\n"
        "37 35 98:0 / /plain rw - ext4 /dev/sda1 rw\n"
    )
    entries = list(cli.iter_mounts(str(info)))
    first = entries[0]
    assert (first.mountpoint, first.fstype, first.source, first.mount_id) == (
        "/mnt/with space", "fuse.overlay-mount", "my src", 36,
    )
    assert entries[1].mountpoint == "/plain"
    assert entries[1].mount_id == 37


# --------------------------------------------------------------------------
# the commands: bad input -> one line, exit 1, nothing mounted

BAD_MOUNTS = [
    # (id, -o options, mount point, message after "PROG: ")
    ("missing-lowerdir", "upperdir={t}/u,workdir={t}/w", "{t}/mp", "missing required option 'lowerdir='"),
    ("nonexistent-layer", "lowerdir={t}/l1:{t}/nope", "{t}/mp", "lower layer '{t}/nope' does not exist"),
    ("relative-nonexistent-layer", "lowerdir=l1:nope", "mp", "lower layer '{t}/nope' does not exist"),
    ("layer-is-file", "lowerdir={t}/file", "{t}/mp",
     "lower layer '{t}/file' is neither a directory nor a layer blob (tar, tar+gzip, tar+zstd)"),
    (
        "work-inside-upper",
        "lowerdir={t}/l1,upperdir={t}/u,workdir={t}/u/w",
        "{t}/mp",
        "upperdir '{t}/u' and workdir '{t}/u/w' must be different, non-nested directories",
    ),
    (
        "upper-inside-work",
        "lowerdir={t}/l1,upperdir={t}/w2/u,workdir={t}/w2",
        "{t}/mp",
        "upperdir '{t}/w2/u' and workdir '{t}/w2' must be different, non-nested directories",
    ),
    (
        "upper-equals-work",
        "lowerdir={t}/l1,upperdir={t}/same,workdir={t}/same",
        "{t}/mp",
        "upperdir '{t}/same' and workdir '{t}/same' must be different, non-nested directories",
    ),
    ("work-without-upper", "lowerdir={t}/l1,workdir={t}/w", "{t}/mp", "workdir= given without upperdir="),
    ("upper-without-work", "lowerdir={t}/l1,upperdir={t}/u", "{t}/mp", "upperdir= given without workdir="),
    ("unknown-option", "lowerdir={t}/l1,frobnicate", "{t}/mp", "unknown mount option 'frobnicate'"),
    ("unknown-option-value", "lowerdir={t}/l1,colour=blue", "{t}/mp", "unknown mount option 'colour'"),
    (
        "bad-redirect-dir",
        "lowerdir={t}/l1,redirect_dir=sometimes",
        "{t}/mp",
        "bad value 'sometimes' for redirect_dir (expected on, off, follow or nofollow)",
    ),
    ("nonexistent-mountpoint", "lowerdir={t}/l1", "{t}/nomp", "mountpoint '{t}/nomp' does not exist"),
    ("mountpoint-is-file", "lowerdir={t}/l1", "{t}/file", "mountpoint '{t}/file' is not a directory"),
]


@pytest.mark.parametrize("frontend", ["overlay", "overlay-mount"])
@pytest.mark.parametrize(("opts", "mp", "message"), [c[1:] for c in BAD_MOUNTS], ids=[c[0] for c in BAD_MOUNTS])
def test_bad_mount_input(tree: Path, frontend: str, opts: str, mp: str, message: str):
    opts, mp, message = (s.format(t=tree) for s in (opts, mp, message))
    if frontend == "overlay":
        proc = run(overlay_cmd("mount", "-o", opts, mp), cwd=tree)
    else:  # the way mount.fuse3 calls it: SOURCE MOUNTPOINT -o OPTS
        proc = run(helper_cmd("overlay", mp, "-o", opts), cwd=tree)
    assert proc.returncode == 1, proc.stderr
    assert stderr_lines(proc) == [f"{frontend}: {message}"]
    assert proc.stdout == ""
    assert not mounted_at(tree / "mp")
    assert not mounted_at(tree / "nomp")


@pytest.mark.parametrize("frontend", ["overlay", "overlay-mount"])
def test_several_o_options_are_joined(tree: Path, frontend: str):
    mp = str(tree / "mp")
    if frontend == "overlay":
        proc = run(overlay_cmd("mount", "-o", "lowerdir=l1", "-o", "rw,,", "-o", "frobnicate", mp), cwd=tree)
    else:
        proc = run(helper_cmd("-o", "lowerdir=l1", "overlay", mp, "-o", "frobnicate"), cwd=tree)
    assert proc.returncode == 1
    assert stderr_lines(proc) == [f"{frontend}: unknown mount option 'frobnicate'"]
    assert not mounted_at(mp)


@pytest.mark.parametrize("frontend", ["overlay", "overlay-mount"])
def test_work_on_other_filesystem(tree: Path, other_fs: Path, frontend: str):
    opts = f"lowerdir={tree}/l1,upperdir={tree}/u,workdir={other_fs}/w"
    if frontend == "overlay":
        proc = run(overlay_cmd("mount", "-o", opts, str(tree / "mp")))
    else:
        proc = run(helper_cmd("overlay", str(tree / "mp"), "-o", opts))
    assert proc.returncode == 1
    assert stderr_lines(proc) == [
        f"{frontend}: workdir '{other_fs}/w' is not on the same filesystem as upperdir '{tree}/u'"
    ]
    assert not mounted_at(tree / "mp")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["mount"],
        ["mount", "-o", "lowerdir=/"],
        ["mount", "-o", "lowerdir=/", "a", "b"],
        ["umount"],
    ],
)
def test_overlay_usage_errors(args):
    proc = run(overlay_cmd(*args))
    assert proc.returncode == 2
    assert proc.stderr.strip()


@pytest.mark.parametrize("args", [[], ["a", "b", "c"], ["--bogus", "/mnt"], ["/mnt", "-o"]])
def test_helper_usage_errors(args):
    proc = run(helper_cmd(*args))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("overlay-mount: error: ")


def test_help_is_fast_and_does_not_load_the_filesystem(tree: Path):
    code = textwrap.dedent(
        f"""
        import sys
        from overlay.cli import main
        assert main(["mount", "-o", "lowerdir={tree}/nope", "{tree}/mp"]) == 1
        heavy = [m for m in ("pyfuse3", "trio", "overlay.fs", "overlay.engine.bridge", "overlay.engine.wire",
                     "overlay_core._core") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    proc = run([PY, "-c", code])
    assert proc.returncode == 0, proc.stderr
    proc = run(overlay_cmd("--help"))
    assert proc.returncode == 0 and "mount" in proc.stdout and "umount" in proc.stdout


def test_umount_not_mounted(tree: Path):
    proc = run(overlay_cmd("umount", str(tree / "mp")))
    assert proc.returncode == 1
    assert stderr_lines(proc) == [f"overlay: '{tree}/mp' is not mounted"]


def test_console_scripts_installed():
    if not (BIN / "activate").exists():
        pytest.skip("not running from a virtualenv, console scripts not expected next to python")
    for name in ("overlay", "overlay-mount"):
        script = BIN / name
        assert script.exists(), f"{script} missing: is the project installed (pip install -e .)?"
    proc = run([str(BIN / "overlay"), "--help"])
    assert proc.returncode == 0
    proc = run([str(BIN / "overlay-mount"), "--help"])
    assert proc.returncode == 0 and "usage: overlay-mount" in proc.stdout


# --------------------------------------------------------------------------
# background mounts: fork + readiness pipe, with a fake filesystem

FAKE_DRIVER = textwrap.dedent(
    """
    import errno, os, sys, time
    from overlay.cli import run_background
    from overlay.options import MountConfig

    mode, mountpoint, flag, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    log_file = sys.argv[5] if len(sys.argv) > 5 else None

    def fake_run_fs(config, mp, on_ready):
        with open(flag + ".pid", "w") as fh:
            fh.write(str(os.getpid()))
        if mode == "ready":
            print("child stdout noise")
            on_ready()
            deadline = time.monotonic() + 60
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.02)
            return
        if mode == "oserror":
            raise OSError(errno.EACCES, "Permission denied")
        if mode == "runtimeerror":
            raise RuntimeError("fusermount3 said no\\nsecond line")
        if mode == "die":
            os._exit(3)
        if mode == "hang":
            time.sleep(120)
        if mode == "return":
            return

    config = MountConfig(lowers=["/"], upper=None, work=None)
    sys.exit(run_background(config, mountpoint, "overlay", log_file=log_file,
                            timeout=timeout, loader=lambda: fake_run_fs))
    """
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; look at its state
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_fake(tmp_path: Path, mode: str, timeout: float = 20, log_file: str | None = None):
    flag = tmp_path / f"flag-{mode}"
    cmd = [PY, "-c", FAKE_DRIVER, mode, str(tmp_path / "mp"), str(flag), str(timeout)]
    if log_file:
        cmd.append(log_file)
    started = time.monotonic()
    proc = run(cmd, timeout=30)  # would hang here if the child kept our pipes open
    return proc, flag, time.monotonic() - started


def test_background_ready_detaches(tmp_path: Path):
    logf = tmp_path / "fs.log"
    proc, flag, elapsed = _run_fake(tmp_path, "ready", log_file=str(logf))
    pid = int(Path(str(flag) + ".pid").read_text())
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "" and proc.stdout == ""
        assert elapsed < 20
        assert _pid_alive(pid), "the filesystem process should still be running"
        # new session: not in our process group or session
        assert os.getsid(pid) == pid
        log_text = logf.read_text()
        assert "mounted overlay on" in log_text
        assert "child stdout noise" in log_text
    finally:
        flag.write_text("stop")
        for _ in range(200):
            if not _pid_alive(pid):
                break
            time.sleep(0.05)
    assert not _pid_alive(pid)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("oserror", "overlay: cannot mount on '{mp}': Permission denied"),
        ("runtimeerror", "overlay: cannot mount on '{mp}': fusermount3 said no second line"),
        ("die", "overlay: the filesystem process ended (exit status 3) before '{mp}' was mounted"),
        ("return", "overlay: filesystem stopped before the mount was ready"),
    ],
)
def test_background_errors_reported(tmp_path: Path, mode: str, message: str):
    proc, _flag, _ = _run_fake(tmp_path, mode)
    assert proc.returncode == 1
    assert stderr_lines(proc) == [message.format(mp=tmp_path / "mp")]


def test_background_timeout_kills_child(tmp_path: Path):
    proc, flag, elapsed = _run_fake(tmp_path, "hang", timeout=1)
    pid = int(Path(str(flag) + ".pid").read_text())
    assert proc.returncode == 1
    assert stderr_lines(proc) == [
        f"overlay: the filesystem did not come up on '{tmp_path / 'mp'}' within 1 seconds"
    ]
    assert elapsed < 15
    for _ in range(100):
        if not _pid_alive(pid):
            break
        time.sleep(0.05)
    assert not _pid_alive(pid)


# --------------------------------------------------------------------------
# real mounts (need root, /dev/fuse and the real overlay.fs)


@pytest.fixture
def layers(tree: Path):
    """image1/image2/container/work/merge below ``tree``; ``merge`` unmounted at teardown."""
    for name in ("image1", "image2", "container", "work", "merge"):
        (tree / name).mkdir()
    (tree / "image1" / "a").write_text("a from image1\n")
    (tree / "image2" / "c").write_text("c from image2\n")
    try:
        yield tree
    finally:
        force_unmount(tree / "merge")


@needs_fuse_mount
def test_mount_and_umount_roundtrip(layers: Path):
    t = layers
    opts = f"lowerdir={t}/image2:{t}/image1,upperdir={t}/container,workdir={t}/work"
    proc = run(overlay_cmd("mount", "-o", opts, str(t / "merge")), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert mounted_at(t / "merge")
    assert sorted(os.listdir(t / "merge")) == ["a", "c"]
    assert (t / "merge" / "a").read_text() == "a from image1\n"
    (t / "merge" / "new").write_text("new\n")
    assert (t / "container" / "new").read_text() == "new\n"
    proc = run(overlay_cmd("umount", str(t / "merge")))
    assert proc.returncode == 0, proc.stderr
    assert not mounted_at(t / "merge")
    assert os.listdir(t / "merge") == []


@needs_fuse_mount
def test_demo_runs_clean():
    proc = run(overlay_cmd("demo"), timeout=300)
    from overlay.demo import PASSED_LINE, STEP_TITLES

    assert proc.returncode == 0, proc.stdout + proc.stderr
    for title in STEP_TITLES:
        assert title in proc.stdout
    assert "(whiteout c 0/0)" in proc.stdout
    assert "[FAIL]" not in proc.stdout
    assert PASSED_LINE in proc.stdout
    # the demo cleans up after itself
    root_line = proc.stdout.splitlines()[0]
    assert root_line.startswith("overlay demo in ")
    assert not os.path.exists(root_line[len("overlay demo in "):])


# mount(8) runs mount.fuse3 without PATH in its environment, and mount.fuse3
# runs the helper through /bin/sh -c, so "overlay-mount" is looked up in the
# shell's default search path, never in a virtualenv's bin.
SH_DEFAULT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _helper_script() -> Path:
    helper = BIN / "overlay-mount"
    if not helper.exists():
        pytest.fail(f"{helper} is missing: install the project (pip install -e .) to get the helper")
    if shutil.which("mount.fuse3") is None and not os.path.exists("/sbin/mount.fuse3"):
        pytest.skip("mount.fuse3 is not installed (Debian package fuse3)")
    return helper


@pytest.fixture
def helper_on_default_path():
    """Make ``overlay-mount`` findable by mount.fuse3's /bin/sh.

    If no ``overlay-mount`` is on the shell's default path, link this venv's
    script as /usr/local/sbin/overlay-mount for the test and remove the link
    afterwards (only if it is still ours).
    """
    helper = _helper_script()
    for directory in SH_DEFAULT_PATH:
        if os.path.exists(os.path.join(directory, "overlay-mount")):
            yield os.path.join(directory, "overlay-mount")
            return
    link = Path("/usr/local/sbin/overlay-mount")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(helper)
    try:
        yield str(link)
    finally:
        if link.is_symlink() and os.readlink(link) == str(helper):
            link.unlink()


def _check_helper_mount(t: Path) -> None:
    assert mounted_at(t / "merge")
    entry = cli.find_mount(str(t / "merge"))
    assert entry is not None and entry.fstype.startswith("fuse")
    # as root, the helper forces allow_other and default_permissions
    options = mount_options_of(t / "merge")
    assert "allow_other" in options and "default_permissions" in options, options
    assert (t / "merge" / "c").read_text() == "c from image2\n"
    (t / "merge" / "written").write_text("via mount -t\n")
    assert (t / "container" / "written").read_text() == "via mount -t\n"
    proc = run(["umount", str(t / "merge")])
    assert proc.returncode == 0, proc.stderr
    assert not mounted_at(t / "merge")


@needs_fuse_mount
def test_mount_t_fuse_overlay_mount(layers: Path, helper_on_default_path: str):
    t = layers
    opts = f"lowerdir={t}/image2:{t}/image1,upperdir={t}/container,workdir={t}/work"
    proc = run(["mount", "-t", "fuse.overlay-mount", "demo-src", str(t / "merge"), "-o", opts],
               cwd=t, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_helper_mount(t)


@needs_fuse_mount
def test_fstab_line(layers: Path, helper_on_default_path: str, tmp_path: Path):
    """The fstab line from the README, read by mount(8) from an fstab file
    (mount --fstab FILE MOUNTPOINT)."""
    t = layers
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# test fstab\n"
        f"overlay  {t}/merge  fuse.overlay-mount  "
        f"lowerdir={t}/image2:{t}/image1,upperdir={t}/container,workdir={t}/work,nofail  0  0\n"
    )
    proc = run(["mount", "--fstab", str(fstab), str(t / "merge")], cwd=t, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_helper_mount(t)


@needs_fuse_mount
def test_mount_t_fuse_with_helper_path(layers: Path):
    """The legacy form with an absolute helper path works from a venv, no link needed."""
    t = layers
    helper = _helper_script()
    opts = "lowerdir=image2:image1,upperdir=container,workdir=work"
    proc = run(["mount", "-t", "fuse", f"{helper}#demo-src", str(t / "merge"), "-o", opts],
               cwd=t, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_helper_mount(t)


@needs_fuse_mount
def test_mount_t_fuse_overlay_mount_bad_options(layers: Path, helper_on_default_path: str):
    t = layers
    proc = run(["mount", "-t", "fuse.overlay-mount", "overlay", str(t / "merge"),
                "-o", f"lowerdir={t}/nope"], timeout=60)
    assert proc.returncode != 0
    assert f"overlay-mount: lower layer '{t}/nope' does not exist" in proc.stderr
    assert not mounted_at(t / "merge")


@needs_fuse_mount
def test_mount_relative_paths_from_cwd(layers: Path):
    t = layers
    proc = run(overlay_cmd("mount", "-o", "lowerdir=image2:image1,upperdir=container,workdir=work", "merge"),
               cwd=t, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert mounted_at(t / "merge")
    assert sorted(os.listdir(t / "merge")) == ["a", "c"]
