"""Bad mount options and bad layers: the exact message users see (tests/test_bad_input.py).

tests/test_cli.py already covers missing/empty options, a missing lower or
upper layer, a lower layer that is a file, nested upper/work, unknown
options and bad mount points.  This file adds, each row run through the real
command (``python -m overlay mount -o ... MP``) as root:

* table ``REFUSED``: input the kernel overlayfs refuses too (or that can
  never work): a missing workdir, an upperdir that is a file, layers nested
  in each other (lower in upper, lower == upper, lower in work, lower in
  lower, a lower given twice: the kernel says "overlapping/conflicting
  lowerdir path"), an upper on a read-only filesystem (with and without a
  leftover WORKDIR/work) -> exit 1, exactly one line ``overlay: MESSAGE`` on
  stderr, nothing mounted.  Where ours had no message yet, the expected text
  is the proposed one (same style as the existing messages).
* ``UNREADABLE``: a layer (or mount point) below a directory root cannot
  search.  Root bypasses mode bits, so these rows run the command as uid 0
  *without* CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (dropped from the
  capability bounding set before exec); an unprivileged user cannot run the
  command at all on this machine (the interpreter lives under /root, and
  /dev/fuse is 0600).  A layer that is itself mode 000 mounts (the kernel
  does the same) and listing it fails with EACCES.
* table ``ACCEPTED``: input the kernel accepts: 5000 lower layers with long
  names (the kernel's limit is 500; ours has none -> it must work, also
  with the usual soft RLIMIT_NOFILE of 1024), the mount point being a lower
  layer, the upper or the work dir inside a lower layer (the kernel then
  answers ELOOP for the nested dir: it must not be reachable through the
  mount), a leftover non-directory WORKDIR/work (the kernel replaces it).

Scratch dirs are /tmp/rel-*; every mount made here is unmounted in teardown.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import subprocess

import pytest

import mountutil
from relutil import (  # noqa: F401  (fixtures)
    overlay_cmd,
    overlay_env,
    relmounts,
    reltmp,
    remount_ro,
    tmpfs,
)


NLAYERS = 5000


@pytest.fixture
def t(reltmp):
    """A scratch layout below /tmp/rel-*; whatever gets mounted below it is
    unmounted afterwards (by rel_cleanup via reltmp)."""
    mountutil.require_fuse()
    for name in ("l1", "l2", "u", "w", "mp", "u/inner", "w/inner", "l1/sub", "l1/up", "l1/wk",
                 "locked/l", "locked/u", "locked/w", "locked/mp", "open000"):
        os.makedirs(os.path.join(reltmp, name), exist_ok=True)
    with open(os.path.join(reltmp, "file"), "w") as f:
        f.write("not a directory\n")
    with open(os.path.join(reltmp, "l1", "from_l1"), "w") as f:
        f.write("l1\n")
    with open(os.path.join(reltmp, "l2", "from_l2"), "w") as f:
        f.write("l2\n")
    os.chmod(os.path.join(reltmp, "locked"), 0)
    os.chmod(os.path.join(reltmp, "open000"), 0)
    yield reltmp
    os.chmod(os.path.join(reltmp, "locked"), 0o755)
    os.chmod(os.path.join(reltmp, "open000"), 0o755)
    for mp in (f"{reltmp}/mp", f"{reltmp}/l1"):
        mountutil.umount(mp)


def _mount(opts: str, mp: str, cwd: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(overlay_cmd("mount", "-o", opts, mp), cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, env=overlay_env(), timeout=120,
                          preexec_fn=preexec_fn)


def _lines(s: str) -> list[str]:
    return [l for l in s.splitlines() if l.strip()]


def _assert_refused(proc, expected_line: str, mp: str):
    mounted = mountutil.is_mounted(mp)
    if mounted:
        mountutil.umount(mp)
    assert not mounted, f"mounted although it should be refused; stderr={proc.stderr!r}"
    assert proc.returncode == 1, proc.stderr
    assert _lines(proc.stderr) == [expected_line]
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# refused input

REFUSED = [
    # (id, -o options, message after "overlay: ")
    ("workdir-missing", "lowerdir={t}/l1,upperdir={t}/u,workdir={t}/nope",
     "workdir '{t}/nope' does not exist"),
    ("upperdir-is-file", "lowerdir={t}/l1,upperdir={t}/file,workdir={t}/w",
     "upperdir '{t}/file' is not a directory"),
    ("workdir-below-file", "lowerdir={t}/l1,upperdir={t}/u,workdir={t}/file/w",
     "workdir '{t}/file/w' does not exist"),
    # nested layers: the kernel refuses these ("overlapping lowerdir path",
    # "conflicting lowerdir path", ELOOP); the messages are proposed
    ("lower-inside-upper", "lowerdir={t}/u/inner,upperdir={t}/u,workdir={t}/w",
     "lower layer '{t}/u/inner' overlaps upperdir '{t}/u'"),
    ("lower-is-upper", "lowerdir={t}/u,upperdir={t}/u,workdir={t}/w",
     "lower layer '{t}/u' overlaps upperdir '{t}/u'"),
    ("lower-inside-work", "lowerdir={t}/w/inner,upperdir={t}/u,workdir={t}/w",
     "lower layer '{t}/w/inner' overlaps workdir '{t}/w'"),
    ("lower-is-work", "lowerdir={t}/w,upperdir={t}/u,workdir={t}/w",
     "lower layer '{t}/w' overlaps workdir '{t}/w'"),
    ("lower-inside-lower", "lowerdir={t}/l1:{t}/l1/sub",
     "lower layer '{t}/l1/sub' overlaps lower layer '{t}/l1'"),
    ("lower-twice", "lowerdir={t}/l1:{t}/l2:{t}/l1",
     "lower layer '{t}/l1' overlaps lower layer '{t}/l1'"),
]


@pytest.mark.parametrize(("opts", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused(t, opts, message):
    proc = _mount(opts.format(t=t), f"{t}/mp", t)
    _assert_refused(proc, "overlay: " + message.format(t=t), f"{t}/mp")


@pytest.mark.parametrize("work_exists", [False, True], ids=["fresh-work", "leftover-work"])
def test_upper_on_readonly_filesystem(t, work_exists):
    """The kernel refuses an upper layer on a read-only fs ("upper fs is
    r/o"); ours must too, with a readable message, also when WORKDIR/work is
    already there (then nothing at mount time needs a write)."""
    ro = f"{t}/ro"
    with tmpfs(ro, "1m"):
        os.makedirs(f"{ro}/u")
        os.makedirs(f"{ro}/w/work" if work_exists else f"{ro}/w")
        remount_ro(ro)
        proc = _mount(f"lowerdir={t}/l1,upperdir={ro}/u,workdir={ro}/w", f"{t}/mp", t)
        _assert_refused(proc, f"overlay: upperdir '{ro}/u' is on a read-only filesystem", f"{t}/mp")


# ---------------------------------------------------------------------------
# unreadable: root without the capabilities that bypass mode bits

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def _drop_dac_caps():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


UNREADABLE = [
    ("lower", "lowerdir={t}/locked/l", "{t}/mp", "cannot access lower layer '{t}/locked/l': Permission denied"),
    ("upper", "lowerdir={t}/l1,upperdir={t}/locked/u,workdir={t}/w", "{t}/mp",
     "cannot access upperdir '{t}/locked/u': Permission denied"),
    ("work", "lowerdir={t}/l1,upperdir={t}/u,workdir={t}/locked/w", "{t}/mp",
     "cannot access workdir '{t}/locked/w': Permission denied"),
    ("mountpoint", "lowerdir={t}/l1", "{t}/locked/mp",
     "cannot access mountpoint '{t}/locked/mp': Permission denied"),
]


@pytest.mark.parametrize(("opts", "mp", "message"), [r[1:] for r in UNREADABLE], ids=[r[0] for r in UNREADABLE])
def test_unreadable_layer(t, opts, mp, message):
    """'Unreadable' for root: a layer below a mode-000 dir, with the command
    run as uid 0 minus CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (what an
    unprivileged user would get; such a user cannot run the command here at
    all, see the module docstring)."""
    mp = mp.format(t=t)
    proc = _mount(opts.format(t=t), mp, t, preexec_fn=_drop_dac_caps)
    _assert_refused(proc, "overlay: " + message.format(t=t), mp)


def test_layer_mode_000_mounts_and_listing_fails(t):
    """A lower layer that is itself mode 000 can be opened (O_PATH needs no
    permission), so the mount comes up, as the kernel's does; reading it
    fails with EACCES for a daemon without the DAC capabilities."""
    mp = f"{t}/mp"
    proc = _mount(f"lowerdir={t}/open000", mp, t, preexec_fn=_drop_dac_caps)
    try:
        assert proc.returncode == 0, proc.stderr
        assert mountutil.is_mounted(mp)
        with pytest.raises(PermissionError):
            os.listdir(mp)
        # the mount keeps serving
        with pytest.raises(PermissionError):
            os.listdir(mp)
        assert os.stat(mp).st_mode & 0o777 == 0
    finally:
        mountutil.umount(mp)


# ---------------------------------------------------------------------------
# accepted input


@pytest.fixture
def many_layers(t):
    """NLAYERS lower layers with 20-character names (relative, so the -o
    argument stays under the kernel's 128 KiB limit for one argv string)."""
    base = f"{t}/many"
    os.mkdir(base)
    names = [f"lower-layer-no-{i:05d}" for i in range(NLAYERS)]
    for n in names:
        os.mkdir(f"{base}/{n}")
    with open(f"{base}/{names[0]}/top", "w") as f:
        f.write("top\n")
    with open(f"{base}/{names[NLAYERS // 2]}/middle", "w") as f:
        f.write("middle\n")
    with open(f"{base}/{names[-1]}/bottom", "w") as f:
        f.write("bottom\n")
    with open(f"{base}/{names[-1]}/top", "w") as f:
        f.write("hidden by the top layer\n")
    opts = "lowerdir=" + ":".join(names)
    assert len(opts) < 128 * 1024
    return base, opts


def _check_many(mp):
    assert sorted(os.listdir(mp)) == ["bottom", "middle", "top"]
    with open(f"{mp}/top") as f:
        assert f.read() == "top\n"
    with open(f"{mp}/bottom") as f:
        assert f.read() == "bottom\n"


def test_5000_layers_work(t, many_layers):
    """The kernel refuses more than 500 lower layers; ours has no limit of
    its own, so 5000 must simply work."""
    base, opts = many_layers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * NLAYERS:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} too low for {NLAYERS} layers")

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    mp = f"{t}/mp"
    proc = _mount(opts, mp, base, preexec_fn=limits)
    try:
        assert proc.returncode == 0, proc.stderr
        _check_many(mp)
    finally:
        mountutil.umount(mp)


def test_5000_layers_with_default_soft_nofile_limit(t, many_layers):
    """With the usual soft RLIMIT_NOFILE of 1024 (and a high hard limit, as
    systemd and most distributions set it) 5000 layers must mount too: the
    daemon holds an fd per layer (two, currently) and has to raise its soft
    limit, as other FUSE daemons do."""
    base, opts = many_layers
    hard = max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 0)
    want_hard = 4 * NLAYERS
    if hard != resource.RLIM_INFINITY and hard < want_hard:
        with open("/proc/sys/fs/nr_open") as f:
            if int(f.read()) < want_hard:
                pytest.skip("fs.nr_open too low")

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, want_hard))

    mp = f"{t}/mp"
    proc = _mount(opts, mp, base, preexec_fn=limits)
    try:
        assert proc.returncode == 0, proc.stderr
        _check_many(mp)
    finally:
        mountutil.umount(mp)


def test_5000_layers_beyond_hard_nofile_limit_message(t, many_layers):
    """When the hard limit really is too low, the user gets one clear line
    (no Python bytes repr such as 'b'/tmp/...''), exit 1, nothing mounted."""
    base, opts = many_layers

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    mp = f"{t}/mp"
    proc = _mount(opts, mp, base, preexec_fn=limits)
    mounted = mountutil.is_mounted(mp)
    mountutil.umount(mp)
    assert not mounted
    assert proc.returncode == 1
    lines = _lines(proc.stderr)
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"overlay: cannot mount on '{re.escape(mp)}': "
                        r"(Too many open files|too many lower layers).*", lines[0]), lines
    assert "b'" not in lines[0], lines


def test_mountpoint_is_a_lower_layer(t):
    """Mounting over the (top) lower layer itself, as people do with the
    kernel overlay: the layer was opened before the mount hid it."""
    mp = f"{t}/l1"
    proc = _mount(f"lowerdir={t}/l1:{t}/l2,upperdir={t}/u,workdir={t}/w", mp, t)
    try:
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(mp)) == ["from_l1", "from_l2", "inner", "sub", "up", "wk"]
        with open(f"{mp}/new", "w") as f:
            f.write("n")
        assert os.path.exists(f"{t}/u/new")
    finally:
        mountutil.umount(mp)


def _errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("nested", ["upper", "work"])
def test_layer_nested_in_lower_is_not_reachable(t, relmounts, nested):
    """upperdir (or workdir) inside a lower layer: the kernel mounts but
    answers ELOOP for the nested dir ('overlapping layers'), so the upper
    layer / the work dir's temporary files can never be seen or changed
    through the mount. Ours must do the same."""
    kt = f"{t}/k"
    for d in ("l/up/x", "l/wk", "u", "w", "mp"):
        os.makedirs(f"{kt}/{d}", exist_ok=True)
    mountutil.require_kernel_overlay()
    if nested == "upper":
        layers = ([f"{t}/l1"], f"{t}/l1/up", f"{t}/w")
        klayers = ([f"{kt}/l"], f"{kt}/l/up", f"{kt}/w")
        name = "up"
    else:
        layers = ([f"{t}/l1"], f"{t}/u", f"{t}/l1/wk")
        klayers = ([f"{kt}/l"], f"{kt}/u", f"{kt}/l/wk")
        name = "wk"
    relmounts.kernel(*klayers, f"{kt}/mp")
    relmounts.ours(*layers, f"{t}/mp")
    kerr = _errno_of(os.listdir, f"{kt}/mp/{name}")
    oerr = _errno_of(os.listdir, f"{t}/mp/{name}")
    assert kerr == errno.ELOOP
    assert oerr == kerr, f"ours: {errno.errorcode.get(oerr, oerr)}, kernel: {errno.errorcode[kerr]}"
    assert _errno_of(os.mkdir, f"{t}/mp/{name}/x") != 0


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_leftover_work_entry_not_a_directory(t, kind):
    """WORKDIR/work left as a file or a symlink (say to a dir outside): the
    kernel removes it and makes a fresh dir; ours must mount as well,
    without following the symlink (the target stays untouched)."""
    canary = f"{t}/canary"
    os.mkdir(canary)
    with open(f"{canary}/keep", "w") as f:
        f.write("keep\n")
    if kind == "file":
        with open(f"{t}/w/work", "w") as f:
            f.write("junk\n")
    else:
        os.symlink(canary, f"{t}/w/work")
    mp = f"{t}/mp"
    proc = _mount(f"lowerdir={t}/l1,upperdir={t}/u,workdir={t}/w", mp, t)
    try:
        assert os.listdir(canary) == ["keep"]
        assert proc.returncode == 0, proc.stderr
        assert mountutil.is_mounted(mp)
        st = os.lstat(f"{t}/w/work")
        assert (st.st_mode & 0o170000) == 0o040000
        assert os.listdir(f"{t}/w/work") == []
    finally:
        mountutil.umount(mp)
    assert os.listdir(canary) == ["keep"]
