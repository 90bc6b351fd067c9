"""Security on real mounts (tests/test_security.py).

* Hostile layers: a symlink in a lower layer at a name that is a directory
  in another layer; symlinks to host paths (/etc, /root, a canary dir
  outside the layers) in lower and upper layers; redirect xattrs holding
  ``../..``, ``..``, absolute paths and a relative path with slashes; names
  starting with ``.wh.``; whiteout look-alikes of odd types (char devices
  other than 0/0, a block device 0/0, fifos named like aufs whiteouts);
  xattr whiteouts; stale entries in WORKDIR/work that point at the canary.
  The same operations (walk without following symlinks, copy-up/rename/
  unlink of the symlinks, writes through an absolute redirect, ...) run on
  the kernel overlay and on ours over identical layers; the results must be
  equal.  And the daemon must never read, list, create or change anything
  outside the layers and the work dir: strace -f -y on the daemon (every fd
  it uses and every path it passes to a syscall), its /proc/PID/fd after
  each operation, and a canary dir outside the layers whose atimes (set in
  the past, so any read or listing would update them), mtimes, ctimes and
  content must be untouched and whose content never shows in the mount.
* A corrupt private xattr of ours (``trusted.overlay.fuse.ino``, not a
  number or out of range) must be ignored like the kernel ignores bad
  origin xattrs: the file and its directory stay usable.
* Permissions, as root with allow_other: another user (nobody) gets exactly
  what mode bits, ownership and sticky dirs allow: the errno of each
  operation is compared with the kernel overlay's and with the expected one.
  Without allow_other, that user cannot use the mount at all.
* Reserved names and xattrs: setting ``trusted.overlay.opaque`` (or
  ``.redirect``, ``.whiteout``, ``.fuse.ino``) through the mount stores the
  escaped ``trusted.overlay.overlay.*`` name on the upper (as Linux 6.7+
  does), has no effect on the merged view, also after a remount; getxattr
  and listxattr never show the real private ones; mknod of a 0/0 char
  device (a whiteout) fails with EPERM like on the kernel; rename with
  RENAME_WHITEOUT fails with EINVAL; the same with ``userxattr`` for
  ``user.overlay.*``.

Scratch dirs are /tmp/rel-*; mounts are unmounted and daemons stopped in
teardown.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat as S
import sys

import pytest

import mountutil
from relutil import (  # noqa: F401  (fixtures)
    REPO,
    Daemon,
    Strace,
    mkdirs,
    open_fds,
    relmounts,
    reltmp,
    run_as,
)

NOBODY = 65534
OTHER_UID = 1000


@pytest.fixture(autouse=True)
def _need():
    mountutil.require_ours()
    mountutil.require_kernel_overlay()


def _errno(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    return "ok"


# ---------------------------------------------------------------------------
# canary

OLD_ATIME = 1_000_000_000          # 2001: any read or listing moves it (relatime)
OLD_MTIME = 950_000_000            # 2000


def make_canary(path) -> dict:
    os.makedirs(f"{path}/sub")
    os.makedirs(f"{path}/emptydir")
    files = {"secret": b"CANARY-SECRET-9f2c\n", "sub/inner": b"CANARY-INNER-77ab\n"}
    for name, data in files.items():
        with open(f"{path}/{name}", "wb") as f:
            f.write(data)
    for root, dirs, names in os.walk(path, topdown=False):
        for n in dirs + names:
            os.utime(os.path.join(root, n), (OLD_ATIME, OLD_MTIME), follow_symlinks=False)
    os.utime(path, (OLD_ATIME, OLD_MTIME))
    return files


def canary_state(path) -> dict:
    """Metadata of every object of the canary (no content: reading would
    change the atime)."""
    out = {}
    for root, dirs, names in os.walk(path):
        for n in [""] + dirs + names:
            p = os.path.join(root, n) if n else root
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                            st.st_nlink, st.st_atime_ns, st.st_mtime_ns,
                                            st.st_ctime_ns)
    return out


# ---------------------------------------------------------------------------
# hostile layers


def _set_x(path, name, value):
    os.setxattr(path, name, value, follow_symlinks=False)


def build_hostile(base, canary) -> dict:
    """l1 (top), l2 (bottom), u, w below base; returns the paths."""
    l1, l2, u, w = mkdirs(base, "l1", "l2", "u", "w")
    crel = canary.lstrip("/")
    # --- bottom lower
    os.makedirs(f"{l2}/d")
    with open(f"{l2}/d/inner", "w") as f:
        f.write("l2 inner\n")
    os.makedirs(f"{l2}/d2")
    with open(f"{l2}/d2/inner2", "w") as f:
        f.write("l2 d2 inner\n")
    with open(f"{l2}/wh-xattr", "w") as f:
        f.write("hidden by an xattr whiteout\n")
    os.makedirs(f"{l2}/{crel}")                          # decoy for absolute redirects
    with open(f"{l2}/{crel}/decoy", "w") as f:
        f.write("decoy inside the layer\n")
    os.makedirs(f"{l2}/r6src")
    with open(f"{l2}/r6src/r6file", "w") as f:
        f.write("r6 content\n")
    os.makedirs(f"{l2}/opqx")
    with open(f"{l2}/opqx/xwh", "w") as f:
        f.write("hidden below opqx\n")
    # --- top lower
    os.symlink(canary, f"{l1}/d")                        # symlink over a lower dir
    os.symlink("/etc", f"{l1}/etclink")
    os.symlink("/root", f"{l1}/rootlink")
    os.symlink(f"{canary}/secret", f"{l1}/canlink")
    os.symlink("../" * 12 + crel, f"{l1}/dotdotlink")
    for name in (".wh.d", ".wh..wh..opq", ".wh.plain"):
        with open(f"{l1}/{name}", "w") as f:
            f.write(f"{name} is an ordinary name\n")
    os.mknod(f"{l1}/chr13", S.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(f"{l1}/chr01", S.S_IFCHR | 0o644, os.makedev(0, 1))
    os.mknod(f"{l1}/blk00", S.S_IFBLK | 0o644, os.makedev(0, 0))
    os.mkfifo(f"{l1}/.wh.fifo")
    os.mkfifo(f"{l1}/plainfifo")
    open(f"{l1}/wh-xattr", "w").close()
    _set_x(f"{l1}/wh-xattr", "trusted.overlay.whiteout", b"y")
    os.makedirs(f"{l1}/opqx")
    _set_x(f"{l1}/opqx", "trusted.overlay.opaque", b"x")
    open(f"{l1}/opqx/xwh", "w").close()
    _set_x(f"{l1}/opqx/xwh", "trusted.overlay.whiteout", b"y")
    with open(f"{l1}/opqx/kept", "w") as f:
        f.write("kept\n")
    # --- upper
    os.symlink("/etc", f"{u}/usl")
    os.symlink(canary, f"{u}/ucan")
    os.symlink(canary, f"{u}/d2")                        # upper symlink over a lower dir
    redirects = {
        "r3": ("/" + crel).encode(),                     # absolute: inside the layers
        "r6": b"r6src",                                  # a valid relative one
        "r7": b"/etc",                                   # absolute host path
        # invalid ones, in a dir of their own (see test_invalid_redirects)
        "badredir/r1": ("../../" + crel).encode(),       # relative with slashes
        "badredir/r2": ("/../../" + crel).encode(),      # .. components
        "badredir/r4": b"..",
        "badredir/r5": b"/" + b"a" * 300,                # longer than the kernel's limit
    }
    for name, value in list(redirects.items()):
        if name.startswith("badredir/"):
            redirects["u" + name] = value                # same, in an upper-only dir
    os.mkdir(f"{u}/badredir")
    os.mkdir(f"{u}/ubadredir")
    os.mkdir(f"{l2}/badredir")                           # badredir is a merged dir
    # the redirected lower dirs are whited out at their old names, as after
    # a real rename (else the kernel answers ESTALE for the second name)
    os.mknod(f"{u}/r6src", S.S_IFCHR, os.makedev(0, 0))
    os.mknod(f"{u}/{crel.split('/')[0]}", S.S_IFCHR, os.makedev(0, 0))
    for name, value in redirects.items():
        os.mkdir(f"{u}/{name}")
        _set_x(f"{u}/{name}", "trusted.overlay.redirect", value)
    os.mknod(f"{u}/ghost", S.S_IFCHR, os.makedev(0, 0))  # a plain whiteout
    os.mknod(f"{u}/uchr51", S.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(f"{u}/ublk00", S.S_IFBLK | 0o600, os.makedev(0, 0))
    os.mkfifo(f"{u}/.wh.ufifo")
    # --- stale work dir entries pointing at the canary
    os.makedirs(f"{w}/work/#dead-2")
    os.symlink(canary, f"{w}/work/#dead-1")
    os.symlink(f"{canary}/secret", f"{w}/work/#dead-2/x")
    os.mkfifo(f"{w}/work/#dead-2/fifo")
    return {"l1": l1, "l2": l2, "u": u, "w": w}


def walk(mp, skip=("badredir", "ubadredir")) -> dict:
    """Everything visible below mp, never following a symlink and never
    opening anything but regular files and dirs (not descending into the
    dirs named in `skip`)."""
    out = {}

    def visit(rel):
        p = os.path.join(mp, rel) if rel else mp
        try:
            st = os.lstat(p)
        except OSError as e:
            out[rel] = ("error", errno.errorcode.get(e.errno, e.errno))
            return
        fmt = S.S_IFMT(st.st_mode)
        try:
            xattrs = sorted(x for x in os.listxattr(p, follow_symlinks=False)
                            if not x.startswith("security."))
        except OSError as e:
            xattrs = errno.errorcode.get(e.errno, e.errno)
        info = [S.filemode(st.st_mode), st.st_uid, st.st_gid, xattrs]
        if fmt == S.S_IFLNK:
            info.append(os.readlink(p))
        elif fmt == S.S_IFREG:
            info.append(st.st_size)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    info.append(os.read(fd, 1 << 16))
                finally:
                    os.close(fd)
            except OSError as e:
                info.append(("read error", errno.errorcode.get(e.errno, e.errno)))
        elif fmt in (S.S_IFCHR, S.S_IFBLK):
            info.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
        elif fmt == S.S_IFDIR and rel in skip:
            info.append("not listed")
        elif fmt == S.S_IFDIR:
            try:
                names = sorted(os.listdir(p))
            except OSError as e:
                info.append(("list error", errno.errorcode.get(e.errno, e.errno)))
                names = []
            else:
                info.append(names)
            out[rel] = tuple(info)
            for n in names:
                visit(os.path.join(rel, n))
            return
        out[rel] = tuple(info)

    visit("")
    return out


def hostile_ops(mp, canary):
    """Changes through the mount, none of which follows a symlink on the
    caller's side; returns {op: 'ok' or errno name}."""
    res = {}
    ops = [
        ("lchown etclink", lambda: os.chown(f"{mp}/etclink", 0, 0, follow_symlinks=False)),
        ("lsetxattr canlink", lambda: os.setxattr(f"{mp}/canlink", "trusted.test", b"v",
                                                  follow_symlinks=False)),
        ("rename d", lambda: os.rename(f"{mp}/d", f"{mp}/d-renamed")),
        ("unlink rootlink", lambda: os.unlink(f"{mp}/rootlink")),
        ("lutime ucan", lambda: os.utime(f"{mp}/ucan", ns=(10**18, 10**18), follow_symlinks=False)),
        ("symlink new", lambda: os.symlink(canary, f"{mp}/newlink")),
        ("link canlink", lambda: os.link(f"{mp}/canlink", f"{mp}/canlink-hard",
                                         follow_symlinks=False)),
        ("create .wh.newfile", lambda: open(f"{mp}/.wh.newfile", "w").close()),
        ("mkfifo .wh.newfifo", lambda: os.mkfifo(f"{mp}/.wh.newfifo")),
        ("mkdir .wh..wh..opq2", lambda: os.mkdir(f"{mp}/.wh..wh..opq2")),
        ("write r3/decoy", lambda: _append(f"{mp}/r3/decoy", b"changed\n")),
        ("rename r6", lambda: os.rename(f"{mp}/r6", f"{mp}/r6moved")),
        ("unlink chr13", lambda: os.unlink(f"{mp}/chr13")),
        ("unlink .wh.plain", lambda: os.unlink(f"{mp}/.wh.plain")),
        ("mknod chr13 again", lambda: os.mknod(f"{mp}/chr13", S.S_IFCHR | 0o600, os.makedev(1, 3))),
        ("rmdir opqx", lambda: os.rmdir(f"{mp}/opqx")),
        ("unlink opqx/kept", lambda: os.unlink(f"{mp}/opqx/kept")),
        ("rmdir opqx again", lambda: os.rmdir(f"{mp}/opqx")),
        ("unlink d2", lambda: os.unlink(f"{mp}/d2")),
        ("mkdir d2", lambda: os.mkdir(f"{mp}/d2")),
        ("chmod uchr51", lambda: os.chmod(f"{mp}/uchr51", 0o640)),
        ("rename r3", lambda: os.rename(f"{mp}/r3", f"{mp}/r3moved")),
        ("mkdir ghost", lambda: os.mkdir(f"{mp}/ghost")),
    ]
    for name, fn in ops:
        res[name] = _errno(fn)
    return res


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


# --- strace rules

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FDPATH = re.compile(r'\b\d+<([^<>]*)>')
# a quoted string argument (data written or read): fd annotations are never inside
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"(?:\.\.\.)?')
# syscall -> indexes of its quoted-string arguments that are paths
_PATH_ARGS = {
    "openat": (0,), "openat2": (0,), "open": (0,), "creat": (0,),
    "newfstatat": (0,), "statx": (0,), "stat": (0,), "lstat": (0,), "fstatat64": (0,),
    "mkdirat": (0,), "mkdir": (0,), "mknodat": (0,), "mknod": (0,),
    "unlinkat": (0,), "unlink": (0,), "rmdir": (0,),
    "readlinkat": (0,), "readlink": (0,),
    "fchownat": (0,), "chown": (0,), "lchown": (0,),
    "fchmodat": (0,), "fchmodat2": (0,), "chmod": (0,),
    "utimensat": (0,), "utimes": (0,), "utime": (0,), "futimesat": (0,),
    "faccessat": (0,), "faccessat2": (0,), "access": (0,),
    "truncate": (0,), "statfs": (0,), "chdir": (0,), "chroot": (0,), "execve": (0,),
    "getxattr": (0,), "lgetxattr": (0,), "setxattr": (0,), "lsetxattr": (0,),
    "listxattr": (0,), "llistxattr": (0,), "removexattr": (0,), "lremovexattr": (0,),
    "renameat2": (0, 1), "renameat": (0, 1), "rename": (0, 1),
    "linkat": (0, 1), "link": (0, 1),
    "symlinkat": (1,), "symlink": (1,),
    "name_to_handle_at": (0,), "inotify_add_watch": (0,), "fanotify_mark": (0,),
}
_PROC_FD = re.compile(r"^/proc/self/fd/\d+(/[^/]+)?$")


def _runtime_prefixes():
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    prefixes.add(str(REPO))
    prefixes.add(os.environ.get("OVERLAY_SRC") or str(REPO / "src"))
    return tuple(p.rstrip("/") + "/" for p in prefixes)


# What the daemon itself touches right after mounting (the trace may start
# before it is done): the mount's readahead setting and its own log file.
_STARTUP = ("/sys/class/bdi/", "/sys/devices/virtual/bdi/")
# ...and at any time: the mount table, reread when it changes (a remount
# may change the mount's atime rules)
_PLUMBING = ("/proc/self/mountinfo",)


def check_strace(lines, inside, canary, log=None) -> list[str]:
    """Violations: an fd the daemon used that refers to something outside
    `inside` (layer/work dirs) that is not runtime/kernel plumbing, or a
    path argument that is neither one name nor a /proc/self/fd path."""
    runtime = _runtime_prefixes() + _STARTUP + ((log,) if log else ())
    inside = tuple(p.rstrip("/") + "/" for p in inside)
    bad = []

    def fd_ok(path):
        if path.startswith(("pipe:", "socket:", "anon_inode:", "/dev/fuse", "/dev/null",
                            "/proc/")):
            return True
        p = path.rstrip("/") + "/"
        if p.startswith(inside):
            return True
        if p.startswith(runtime) and not p.startswith(canary + "/"):
            return True
        return False

    for line in lines:
        m = re.match(r"^(?:\d+\s+)?(\w+)\((.*)$", line)
        if not m:
            continue
        call, rest = m.group(1), m.group(2)
        for fdp in _FDPATH.findall(_STRING.sub('""', rest)):
            if not fd_ok(fdp):
                bad.append(f"fd outside the layers: {line}")
        if call in _PATH_ARGS:
            strings = _QUOTED.findall(rest)
            for i in _PATH_ARGS[call]:
                if i >= len(strings):
                    continue
                p = strings[i].encode().decode("unicode_escape")
                if p in ("", "."):
                    continue
                if "/" not in p:
                    if p == "..":
                        bad.append(f"'..' path argument: {line}")
                    continue
                if _PROC_FD.match(p) or p in _PLUMBING:
                    continue
                if p.startswith(runtime) and not p.startswith(canary):
                    continue
                bad.append(f"path argument outside the layers: {line}")
    return bad


def _fd_violations(pid, canary) -> list[str]:
    runtime = _runtime_prefixes()
    bad = []
    for target in open_fds(pid):
        t = target.rstrip("/") + "/"
        if t.startswith(canary + "/") or (t.startswith(("/etc/", "/root/")) and not t.startswith(runtime)):
            bad.append(target)
    return bad


def test_hostile_layers(reltmp, relmounts):
    canary = f"{reltmp}/canary"
    canary_files = make_canary(canary)
    before = canary_state(canary)

    ob = build_hostile(f"{reltmp}/o", canary)
    kb = build_hostile(f"{reltmp}/k", canary)
    assert canary_state(canary) == before

    # kernel overlay, same layers (redirect_dir=on: ours follows and makes
    # redirects by default)
    kmp = relmounts.kernel([kb["l1"], kb["l2"]], kb["u"], kb["w"], f"{reltmp}/k/m",
                           opts=("redirect_dir=on",))
    k_before = walk(kmp)
    k_ops = hostile_ops(kmp, canary)
    k_after = walk(kmp)
    relmounts.umount(kmp)

    # ours, started as our child so we can strace it
    omp = f"{reltmp}/o/m"
    d = Daemon.for_layers([ob["l1"], ob["l2"]], ob["u"], ob["w"], omp, f"{reltmp}/daemon.log")
    try:
        d.start()
        assert os.listdir(f"{ob['w']}/work") == [], "stale work entries not cleaned"
        fd_bad = []
        tracer = Strace(d.pid, f"{reltmp}/strace.log", "%file,%desc") if Strace.available() else None
        if tracer:
            tracer.__enter__()
        try:
            o_before = walk(omp)
            fd_bad += _fd_violations(d.pid, canary)
            o_ops = {}
            for name, result in hostile_ops(omp, canary).items():
                o_ops[name] = result
            fd_bad += _fd_violations(d.pid, canary)
            o_after = walk(omp)
            fd_bad += _fd_violations(d.pid, canary)
        finally:
            if tracer:
                tracer.__exit__(None, None, None)
        assert d.alive()
    finally:
        d.stop()

    # the same view and the same answers as the kernel
    assert o_before == k_before
    assert o_ops == k_ops
    assert o_after == k_after
    # the daemon stayed inside its layers
    assert fd_bad == []
    if tracer:
        lines = tracer.lines()
        assert len(lines) > 100, "strace saw nothing"
        bad = check_strace(lines, [ob["l1"], ob["l2"], ob["u"], ob["w"]], canary,
                           f"{reltmp}/daemon.log")
        assert bad == [], "\n".join(bad[:20])
    # the canary: untouched, never read or listed, never visible
    assert canary_state(canary) == before
    for snapshot in (o_before, o_after):
        for info in snapshot.values():
            for part in info:
                if isinstance(part, bytes):
                    assert b"CANARY" not in part
                if isinstance(part, list):
                    assert "secret" not in part and "emptydir" not in part, info
    for name, data in canary_files.items():
        with open(f"{canary}/{name}", "rb") as f:
            assert f.read() == data


def _redirect_view(mp, d) -> dict:
    res = {}
    try:
        res["list"] = sorted(os.listdir(f"{mp}/{d}"))
    except OSError as e:
        res["list"] = errno.errorcode.get(e.errno, e.errno)
    for n in ("r1", "r2", "r4", "r5"):
        res[f"stat {n}"] = _errno(os.stat, f"{mp}/{d}/{n}")
        res[f"list {n}"] = _errno(os.listdir, f"{mp}/{d}/{n}")
    return res


def test_invalid_redirects(reltmp, relmounts):
    """Invalid redirect xattrs (relative with '/', '..' components, too
    long): each lookup fails as on the kernel (no further), and the
    directory holding them still lists (the kernel lists names without
    looking them up)."""
    canary = f"{reltmp}/canary"
    make_canary(canary)
    before = canary_state(canary)
    ob = build_hostile(f"{reltmp}/o", canary)
    kb = build_hostile(f"{reltmp}/k", canary)
    kmp = relmounts.kernel([kb["l1"], kb["l2"]], kb["u"], kb["w"], f"{reltmp}/k/m",
                           opts=("redirect_dir=on",))
    omp = relmounts.ours([ob["l1"], ob["l2"]], ob["u"], ob["w"], f"{reltmp}/o/m")
    for d in ("badredir", "ubadredir"):
        # merged dir: the kernel follows (and checks) redirects; upper-only
        # dir: it reads them but has no lower layer to look '..' up in
        k = _redirect_view(kmp, d)
        o = _redirect_view(omp, d)
        assert k["list"] == ["r1", "r2", "r4", "r5"]
        assert o == k, d
    assert canary_state(canary) == before


def test_hostile_work_dir_symlink(reltmp):
    """WORKDIR/work itself a symlink to the canary: whatever the mount does
    (the kernel replaces the link), the canary is not emptied or read."""
    canary = f"{reltmp}/canary"
    make_canary(canary)
    before = canary_state(canary)
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.symlink(canary, f"{work}/work")
    d = Daemon.for_layers([lower], upper, work, mp, f"{reltmp}/daemon.log")
    try:
        try:
            d.start()
        except mountutil.MountError:
            pass
        if mountutil.is_mounted(mp):
            with open(f"{mp}/f", "w") as f:
                f.write("x")
            os.unlink(f"{mp}/f")
    finally:
        d.stop()
    assert canary_state(canary) == before


@pytest.mark.parametrize("value", [b"9" * 30, b"abc", b"-5", b"", b"18446744073709551616"])
def test_corrupt_private_inode_xattr_is_ignored(reltmp, relmounts, value):
    """trusted.overlay.fuse.ino is ours; a value that is not a valid inode
    number (garbage, negative, > 2**64-1) must be ignored (the kernel ignores
    an invalid origin xattr): the file and its directory stay usable."""
    lower, upper, work, mp = mkdirs(reltmp, "l", "u", "w", "m")
    os.mkdir(f"{upper}/dir")
    with open(f"{upper}/dir/victim", "w") as f:
        f.write("victim\n")
    with open(f"{upper}/dir/other", "w") as f:
        f.write("other\n")
    _set_x(f"{upper}/dir/victim", "trusted.overlay.fuse.ino", value)
    relmounts.ours([lower], upper, work, mp)
    assert sorted(os.listdir(f"{mp}/dir")) == ["other", "victim"]
    st = os.stat(f"{mp}/dir/victim")
    assert st.st_size == len("victim\n")
    with open(f"{mp}/dir/victim") as f:
        assert f.read() == "victim\n"


# ---------------------------------------------------------------------------
# permissions for another user (allow_other)


def build_perm(base) -> dict:
    l, u, w = mkdirs(base, "l", "u", "w")
    files = {
        "secret": (0o600, 0, 0, b"secret\n"),
        "pub": (0o644, 0, 0, b"pub\n"),
        "groupw": (0o664, 0, NOBODY, b"group writable\n"),
        "rootdir/file": (0o644, 0, 0, b"in rootdir\n"),
        "private/x": (0o644, 0, 0, b"x\n"),
        "sticky/other": (0o644, OTHER_UID, OTHER_UID, b"other's\n"),
        "sticky/rootfile": (0o666, 0, 0, b"root's, world-writable\n"),
        "sticky/mine": (0o644, NOBODY, NOBODY, b"nobody's\n"),
    }
    dirs = {"rootdir": 0o755, "private": 0o700, "sticky": 0o1777}
    for dname, mode in dirs.items():
        os.mkdir(f"{l}/{dname}")
        os.chmod(f"{l}/{dname}", mode)
    for name, (mode, uid, gid, data) in files.items():
        with open(f"{l}/{name}", "wb") as f:
            f.write(data)
        os.chown(f"{l}/{name}", uid, gid)
        os.chmod(f"{l}/{name}", mode)
    # objects only in the upper layer
    with open(f"{u}/usecret", "wb") as f:
        f.write(b"upper secret\n")
    os.chmod(f"{u}/usecret", 0o600)
    os.mkdir(f"{u}/usticky")
    os.chmod(f"{u}/usticky", 0o1777)
    with open(f"{u}/usticky/other", "wb") as f:
        f.write(b"other's\n")
    os.chown(f"{u}/usticky/other", OTHER_UID, OTHER_UID)
    return {"l": l, "u": u, "w": w}


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _open_w(p):
    os.close(os.open(p, os.O_WRONLY))


def _create(p):
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


PERM_OPS = [
    # (name, function(mp), expected for nobody)
    ("read 0600 root file", lambda m: _read(f"{m}/secret"), "EACCES"),
    ("read 0600 upper-only root file", lambda m: _read(f"{m}/usecret"), "EACCES"),
    ("open 0644 root file for writing", lambda m: _open_w(f"{m}/pub"), "EACCES"),
    ("truncate 0644 root file", lambda m: os.truncate(f"{m}/pub", 0), "EACCES"),
    ("create in root 0755 dir", lambda m: _create(f"{m}/rootdir/new"), "EACCES"),
    ("mkdir in root 0755 dir", lambda m: os.mkdir(f"{m}/rootdir/newdir"), "EACCES"),
    ("symlink in root 0755 dir", lambda m: os.symlink("x", f"{m}/rootdir/sl"), "EACCES"),
    ("unlink in root 0755 dir", lambda m: os.unlink(f"{m}/rootdir/file"), "EACCES"),
    ("rename in the root dir", lambda m: os.rename(f"{m}/pub", f"{m}/pub2"), "EACCES"),
    ("list 0700 root dir", lambda m: os.listdir(f"{m}/private"), "EACCES"),
    ("stat in 0700 root dir", lambda m: os.stat(f"{m}/private/x"), "EACCES"),
    ("delete other user's file in sticky dir", lambda m: os.unlink(f"{m}/sticky/other"), "EPERM"),
    ("delete root's file in sticky dir", lambda m: os.unlink(f"{m}/sticky/rootfile"), "EPERM"),
    ("rename other user's file in sticky dir",
     lambda m: os.rename(f"{m}/sticky/other", f"{m}/sticky/moved"), "EPERM"),
    ("delete other's file in upper sticky dir", lambda m: os.unlink(f"{m}/usticky/other"), "EPERM"),
    ("hardlink other user's file (protected_hardlinks)",
     lambda m: os.link(f"{m}/sticky/other", f"{m}/sticky/hl"), "EPERM"),
    ("chmod root file", lambda m: os.chmod(f"{m}/pub", 0o777), "EPERM"),
    ("chown root file", lambda m: os.chown(f"{m}/pub", NOBODY, NOBODY), "EPERM"),
    ("set times of root file", lambda m: os.utime(f"{m}/pub", (1, 1)), "EPERM"),
    ("touch root file", lambda m: os.utime(f"{m}/pub", None), "EACCES"),
    ("user xattr on root file", lambda m: os.setxattr(f"{m}/pub", "user.x", b"1"), "EACCES"),
    ("trusted.overlay.opaque on root dir",
     lambda m: os.setxattr(f"{m}/rootdir", "trusted.overlay.opaque", b"y"), "EPERM"),
    # what is allowed
    ("read 0644 root file", lambda m: _read(f"{m}/pub"), "ok"),
    ("write group-writable file", lambda m: _open_w(f"{m}/groupw"), "ok"),
    ("list root 0755 dir", lambda m: os.listdir(f"{m}/rootdir"), "ok"),
    ("create in sticky dir", lambda m: _create(f"{m}/sticky/nobody-new"), "ok"),
    ("delete own new file in sticky dir", lambda m: os.unlink(f"{m}/sticky/nobody-new"), "ok"),
    ("delete own lower file in sticky dir", lambda m: os.unlink(f"{m}/sticky/mine"), "ok"),
]


def _perm_ops(mp) -> dict:
    res = {}
    for name, fn, _ in PERM_OPS:
        kind, val = run_as(NOBODY, NOBODY, _call, fn, mp)
        res[name] = "ok" if kind == "ok" else (errno.errorcode.get(val, val) if kind == "err" else val)
    return res


def _call(fn, mp):
    fn(mp)
    return None


def test_permissions_for_another_user(reltmp, relmounts):
    kb = build_perm(f"{reltmp}/k")
    ob = build_perm(f"{reltmp}/o")
    kmp = relmounts.kernel([kb["l"]], kb["u"], kb["w"], f"{reltmp}/k/m")
    omp = relmounts.ours([ob["l"]], ob["u"], ob["w"], f"{reltmp}/o/m", opts=("allow_other",))
    kernel = _perm_ops(kmp)
    ours = _perm_ops(omp)
    expected = {name: want for name, _, want in PERM_OPS}
    assert kernel == expected, "the kernel reference disagrees with the expectation"
    assert ours == kernel
    # nothing changed in the layers by the refused operations
    assert _read(f"{ob['l']}/pub") == b"pub\n"
    assert sorted(os.listdir(f"{ob['u']}")) == sorted(os.listdir(f"{kb['u']}"))


def test_without_allow_other_other_users_are_shut_out(reltmp, relmounts):
    # (root's mounts have allow_other unless told noallow_other)
    ob = build_perm(f"{reltmp}/o")
    omp = relmounts.ours([ob["l"]], ob["u"], ob["w"], f"{reltmp}/o/m", opts=("noallow_other",))
    assert run_as(NOBODY, NOBODY, _call, lambda m: os.stat(f"{m}/pub"), omp) == ("err", errno.EACCES)
    assert run_as(NOBODY, NOBODY, _call, lambda m: os.listdir(m), omp) == ("err", errno.EACCES)
    assert run_as(0, 0, _call, lambda m: os.stat(f"{m}/pub"), omp) == ("ok", None)


# ---------------------------------------------------------------------------
# reserved xattrs and names

RENAME_WHITEOUT = 4


def _renameat2(old, new, flags):
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    r = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def build_reserved(base) -> dict:
    l, u, w = mkdirs(base, "l", "u", "w")
    os.makedirs(f"{l}/d")
    with open(f"{l}/d/lf", "w") as f:
        f.write("lower file in d\n")
    with open(f"{l}/f", "w") as f:
        f.write("f\n")
    os.makedirs(f"{l}/gone")
    with open(f"{l}/gone/old", "w") as f:
        f.write("old\n")
    os.makedirs(f"{l}/mv")
    with open(f"{l}/mv/m1", "w") as f:
        f.write("m1\n")
    with open(f"{l}/g", "w") as f:
        f.write("g\n")
    with open(f"{l}/h", "w") as f:
        f.write("h\n")
    return {"l": l, "u": u, "w": w}


def _getx(p, name):
    try:
        return os.getxattr(p, name, follow_symlinks=False)
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def _upper_xattrs(p) -> dict:
    return {n: os.getxattr(p, n, follow_symlinks=False)
            for n in os.listxattr(p, follow_symlinks=False) if n.startswith(("trusted.", "user."))}


def reserved_scenario(mp, prefix) -> dict:
    """Set the overlay's own names through the mount; returns what was seen."""
    P = prefix
    res = {}
    res["set opaque"] = _errno(os.setxattr, f"{mp}/d", P + "opaque", b"y")
    res["get opaque"] = _getx(f"{mp}/d", P + "opaque")
    res["list d"] = sorted(os.listdir(f"{mp}/d"))
    res["listxattr d"] = sorted(x for x in os.listxattr(f"{mp}/d") if x.startswith(P))
    res["set whiteout"] = _errno(os.setxattr, f"{mp}/f", P + "whiteout", b"y")
    os.mkdir(f"{mp}/d2")
    res["set redirect"] = _errno(os.setxattr, f"{mp}/d2", P + "redirect", b"/d")
    res["set nested"] = _errno(os.setxattr, f"{mp}/h", P + "overlay.opaque", b"y")
    res["get nested"] = _getx(f"{mp}/h", P + "overlay.opaque")
    res["listxattr h"] = sorted(x for x in os.listxattr(f"{mp}/h") if x.startswith(P))
    # make the overlay write private xattrs of its own
    for n in os.listdir(f"{mp}/gone"):
        os.unlink(f"{mp}/gone/{n}")
    os.rmdir(f"{mp}/gone")
    os.mkdir(f"{mp}/gone")                       # opaque (over a whiteout)
    # a redirect (EXDEV with userxattr, where the kernel has no redirect_dir)
    res["rename mv"] = _errno(os.rename, f"{mp}/mv", f"{mp}/mv2")
    if res["rename mv"] != "ok":
        os.mkdir(f"{mp}/mvnew")
        os.rename(f"{mp}/mvnew", f"{mp}/mv2")
    with open(f"{mp}/g", "a") as f:              # copy-up
        f.write("more\n")
    for name in ("gone", "mv2", "g", "d", "f", "d2"):
        res[f"private hidden {name}"] = sorted(
            x for x in os.listxattr(f"{mp}/{name}", follow_symlinks=False) if x.startswith(P))
    for name, x in (("gone", "opaque"), ("mv2", "redirect"), ("g", "origin"), ("g", "fuse.ino")):
        res[f"get {name} {x}"] = _getx(f"{mp}/{name}", P + x)
    res["mknod whiteout"] = _errno(os.mknod, f"{mp}/wh", S.S_IFCHR | 0o600, os.makedev(0, 0))
    res["mknod whiteout over deleted name"] = _errno(
        os.mknod, f"{mp}/gone/old", S.S_IFCHR | 0o600, os.makedev(0, 0))
    res["rename whiteout flag"] = _errno(_renameat2, f"{mp}/f", f"{mp}/f2", RENAME_WHITEOUT)
    return res


def after_remount(mp, prefix) -> dict:
    res = {}
    res["list d"] = sorted(os.listdir(f"{mp}/d"))
    res["f visible"] = os.path.exists(f"{mp}/f")
    res["list d2"] = sorted(os.listdir(f"{mp}/d2"))
    res["list gone"] = sorted(os.listdir(f"{mp}/gone"))
    res["list mv2"] = sorted(os.listdir(f"{mp}/mv2"))
    res["list root"] = sorted(os.listdir(mp))
    res["get opaque"] = _getx(f"{mp}/d", prefix + "opaque")
    return res


@pytest.mark.parametrize("userxattr", [False, True], ids=["trusted", "userxattr"])
def test_reserved_xattrs_and_names(reltmp, relmounts, userxattr):
    P = "user.overlay." if userxattr else "trusted.overlay."
    kopts = ("userxattr",) if userxattr else ("redirect_dir=on",)
    oopts = ("userxattr",) if userxattr else ()
    kb = build_reserved(f"{reltmp}/k")
    ob = build_reserved(f"{reltmp}/o")
    kmp = relmounts.kernel([kb["l"]], kb["u"], kb["w"], f"{reltmp}/k/m", opts=kopts)
    omp = relmounts.ours([ob["l"]], ob["u"], ob["w"], f"{reltmp}/o/m", opts=oopts)
    try:
        k = reserved_scenario(kmp, P)
    finally:
        relmounts.umount(kmp)
    o = reserved_scenario(omp, P)
    relmounts.umount(omp)

    # the escaping, as on Linux 6.7+
    assert o["set opaque"] == "ok"
    assert o["get opaque"] == b"y"
    assert o["list d"] == ["lf"]
    assert o["listxattr d"] == [P + "opaque"]
    ux = _upper_xattrs(f"{ob['u']}/d")
    assert ux.get(P + "overlay.opaque") == b"y"
    assert P + "opaque" not in ux
    assert _upper_xattrs(f"{ob['u']}/d2").get(P + "overlay.redirect") == b"/d"
    assert P + "redirect" not in _upper_xattrs(f"{ob['u']}/d2")
    assert _upper_xattrs(f"{ob['u']}/f").get(P + "overlay.whiteout") == b"y"
    assert _upper_xattrs(f"{ob['u']}/h").get(P + "overlay.overlay.opaque") == b"y"
    assert o["listxattr h"] == [P + "overlay.opaque"]
    # private ones never shown
    for name in ("gone", "mv2", "g"):
        assert o[f"private hidden {name}"] == [], name
    assert o["get gone opaque"] == "ENODATA"
    assert o["get g fuse.ino"] == "ENODATA"
    # reserved names cannot be created
    assert o["mknod whiteout"] == "EPERM"
    assert o["mknod whiteout over deleted name"] == "EPERM"
    assert not os.path.lexists(f"{ob['u']}/wh")
    assert o["rename whiteout flag"] == "EINVAL"
    # and the same answers as the kernel
    assert o == k

    # no effect after a remount either (both sides)
    relmounts.kernel([kb["l"]], kb["u"], kb["w"], f"{reltmp}/k/m", opts=kopts)
    relmounts.ours([ob["l"]], ob["u"], ob["w"], f"{reltmp}/o/m", opts=oopts)
    ka = after_remount(f"{reltmp}/k/m", P)
    oa = after_remount(f"{reltmp}/o/m", P)
    assert oa["list d"] == ["lf"]
    assert oa["f visible"] is True
    assert oa["list d2"] == []
    assert oa["list gone"] == []
    assert oa == ka
