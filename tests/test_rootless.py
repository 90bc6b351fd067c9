"""Rootless: mounts made by an unprivileged user, as rootless containers do.

A real unprivileged user is made for the tests (``useradd``), given what
Debian gives users by default (a world-usable /dev/fuse, Debian's python3,
ranges in /etc/subuid and /etc/subgid), and runs our code from a
world-readable copy of the installed package:

* ``test_fusermount3``: the user mounts through fusermount3 with the
  options podman passes (plain layers, ``volatile``); writes to a lower
  file (copy-up), deletes, mkdir, renames; the overlay's own xattrs are
  ``user.overlay.*`` (trusted.* cannot be written without privilege; the
  log says which names it uses); ``fusermount3 -u`` ends the daemon.
* ``test_user_namespace``: the same in a user namespace (``unshare -Urm``,
  as rootless podman runs its mount program), where the user's process
  mounts with /dev/fuse directly; passthrough is simply off.
* ``test_podman_rootless``: rootless podman with our mount program (ids
  mapped through newuidmap), plain and with ``force_mask`` (owners and
  modes in xattrs): ``podman run`` writing, deleting and renaming,
  ``podman diff``, ``podman commit``, a container of the committed image,
  ``podman rm``, buildah ``from``/``run``/``commit`` where installed, and
  no daemon left.

Skipped with the reason when not root (the user cannot be made), without
FUSE, without a Debian python3 of the build's version, or (podman) without
podman, runc or newuidmap.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import mountutil
from relutil import reltmp  # noqa: F401  (a fixture: the registry's)
from test_images import registry  # noqa: F401  (a fixture)

USER = "ovl-rootless"
SYSTEM_PYTHON = "/usr/bin/python3"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (to make the unprivileged user)"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    v = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                       capture_output=True, text=True).stdout.strip()
    if v != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is {v}, the build is for {tuple(sys.version_info[:2])}"
    if shutil.which("fusermount3") is None or shutil.which("unshare") is None:
        return "fusermount3 or unshare is missing"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def user():
    """The unprivileged user, /dev/fuse usable by it, our package readable
    by it; undone afterwards (its processes stopped, by their pids)."""
    mountutil.require_fuse()
    made = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
        made = True
    pw = pwd.getpwnam(USER)
    for f in ("/etc/subuid", "/etc/subgid"):
        text = open(f).read() if os.path.exists(f) else ""
        if not any(line.startswith(USER + ":") for line in text.splitlines()):
            with open(f, "a") as fh:
                fh.write(f"{USER}:200000:65536\n")
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)        # (Debian's default)
    pkg = tempfile.mkdtemp(prefix="rl-pkg-", dir="/tmp")
    os.chmod(pkg, 0o755)
    import overlay
    import overlay_core
    for mod in (overlay, overlay_core):
        src = os.path.dirname(mod.__file__)
        shutil.copytree(src, os.path.join(pkg, os.path.basename(src)),
                        ignore=shutil.ignore_patterns("*.c", "__pycache__"))
    for root, dirs, files in os.walk(pkg):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    try:
        yield {"name": USER, "uid": pw.pw_uid, "gid": pw.pw_gid, "home": pw.pw_dir, "pkg": pkg}
    finally:
        _stop_processes_of(pw.pw_uid)
        os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(pkg, ignore_errors=True)
        if made:
            subprocess.run(["userdel", "-r", USER], capture_output=True)


def _stop_processes_of(uid: int) -> None:
    """The test user's processes (started by these tests): stopped by pid."""
    for _ in range(50):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 15)
            except OSError:
                pass
        time.sleep(0.1)


def _owner(pid: str):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def run_as(user, script: str, cwd: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    """A shell script run by the user (runuser), with our package on the
    path of Debian's python3 (as `overlay` in the script)."""
    e = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": user["home"],
         "PYTHONPATH": user["pkg"], "LANG": "C.UTF-8"}
    e.update(env or {})
    prelude = f'overlay() {{ {SYSTEM_PYTHON} -m overlay "$@"; }}\n'
    return subprocess.run(["runuser", "-u", user["name"], "--", "env", *[f"{k}={v}" for k, v in e.items()],
                           "sh", "-c", prelude + script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _layers(user) -> str:
    base = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    os.chmod(base, 0o755)
    for d in ("l/dir", "u", "w", "m"):
        os.makedirs(os.path.join(base, d))
    with open(os.path.join(base, "l/f"), "w") as fh:
        fh.write("lower\n")
    with open(os.path.join(base, "l/gone"), "w") as fh:
        fh.write("x\n")
    with open(os.path.join(base, "l/dir/inner"), "w") as fh:
        fh.write("inner\n")
    for root, dirs, files in os.walk(base):
        for n in dirs + files:
            os.chown(os.path.join(root, n), user["uid"], user["gid"])
    os.chown(base, user["uid"], user["gid"])
    return base


CHANGES = """
set -e
echo more >> m/f
rm m/gone
mkdir m/newdir
echo n > m/newdir/n
cat m/f
{python} -c 'import errno, os
try:
    os.rename("m/dir", "m/dir2")
    print("renamed")
except OSError as e:
    print(errno.errorcode[e.errno])'
ls m
"""


def _check_upper(base: str, user) -> None:
    u = os.path.join(base, "u")
    st = os.lstat(os.path.join(u, "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "the removed lower file is not whited out"
    names = os.listxattr(os.path.join(u, "f"))
    assert "user.overlay.origin" in names, names
    assert not any(n.startswith("trusted.") for n in names), names
    with open(os.path.join(u, "f")) as fh:
        assert fh.read() == "lower\nmore\n"
    assert os.lstat(os.path.join(u, "f")).st_uid == user["uid"]


def test_fusermount3(user):
    base = _layers(user)
    try:
        r = run_as(user, "overlay mount --log log -o lowerdir=l,upperdir=u,workdir=w,volatile m"
                         " && " + CHANGES.format(python=SYSTEM_PYTHON)
                   + "\nawk -v mp=\"$PWD/m\" '$2 == mp {print $3}' /proc/mounts\nfusermount3 -u m", cwd=base)
        assert r.returncode == 0, r.stderr + r.stdout
        out = r.stdout.splitlines()
        assert out[:2] == ["lower", "more"], r.stdout
        # as the kernel's userxattr: a lower dir cannot be renamed (redirects
        # need trusted.* xattrs); mv(1) copies it instead
        assert "EXDEV" in out, r.stdout
        assert "fuse.overlay" in out, r.stdout
        _check_upper(base, user)
        with open(os.path.join(base, "log")) as fh:
            log = fh.read()
        assert "user.overlay.*" in log and "trusted.* xattrs cannot be written" in log, log
        assert not mountutil.is_mounted(os.path.join(base, "m"))
        _wait_no_daemon(base)
    finally:
        mountutil.umount(os.path.join(base, "m"))
        shutil.rmtree(base, ignore_errors=True)


def test_user_namespace(user):
    base = _layers(user)
    try:
        script = (f'overlay() {{ {SYSTEM_PYTHON} -m overlay "$@"; }}\n'
                  "overlay mount --log log -o lowerdir=l,upperdir=u,workdir=w m && "
                  + CHANGES.format(python=SYSTEM_PYTHON)
                  + "\noverlay stats --json m\noverlay umount m")
        r = run_as(user, f"unshare -Urm sh -c {_quote(script)}", cwd=base,
                   env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr + r.stdout
        assert r.stdout.startswith("lower\nmore\n"), r.stdout
        stats = json.loads(r.stdout[r.stdout.index("{"):])
        assert stats.get("passthrough") is False, stats
        _check_upper(base, user)
        with open(os.path.join(base, "log")) as fh:
            assert "user.overlay.*" in fh.read()
        _wait_no_daemon(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _wait_no_daemon(base: str) -> None:
    for _ in range(100):
        left = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except OSError:
                    continue
                if "overlay" in cmd and base in cmd:
                    left.append(cmd)
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"daemons left running: {left}")


# ------------------------------------------------------------ rootless podman


def _podman_skip() -> str | None:
    for tool in ("podman", "runc", "newuidmap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc uidmap)"
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        return "no busybox (apt-get install busybox-static)"
    return None


@pytest.mark.parametrize("force_mask", [None, "shared"], ids=["plain", "force_mask"])
def test_podman_rootless(user, force_mask):
    """force_mask (rootless storage on NFS): the layers' files are stored
    with a fixed mode, their own modes and owners in
    user.containers.override_stat, and the mount program gets
    xattr_permissions=2."""
    reason = _podman_skip()
    if reason:
        pytest.skip(reason)
    from test_podman import make_rootfs, write_containers_conf

    base = tempfile.mkdtemp(prefix="rl-podman-", dir="/tmp")
    os.chmod(base, 0o755)
    home = os.path.join(base, "home")
    conf = os.path.join(home, ".config", "containers")
    os.makedirs(conf)
    helper = os.path.join(base, "mount-program")
    with open(helper, "w") as fh:
        fh.write("#!/bin/sh\n"
                 f"echo \"$@\" >> {base}/argv.log\n"
                 f"PYTHONPATH={user['pkg']} exec {SYSTEM_PYTHON} -c "
                 "'import sys; from overlay.cli import containers_mount_main; "
                 "sys.exit(containers_mount_main())' \"$@\" --log " + f"{base}/fs.log\n")
    os.chmod(helper, 0o755)
    with open(os.path.join(conf, "storage.conf"), "w") as fh:
        fh.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{home}/storage"\n'
                 f'runroot = "{base}/runroot"\n[storage.options.overlay]\n'
                 f'mount_program = "{helper}"\n'
                 + (f'force_mask = "{force_mask}"\n' if force_mask else ""))
    write_containers_conf(os.path.join(conf, "containers.conf"))
    tarball = make_rootfs(base)
    for root, dirs, files in os.walk(base):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), user["uid"], user["gid"])
    os.chown(base, user["uid"], user["gid"])
    env = {"HOME": home, "XDG_RUNTIME_DIR": os.path.join(base, "xdg"),
           "XDG_CONFIG_HOME": os.path.join(home, ".config")}
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    os.chown(env["XDG_RUNTIME_DIR"], user["uid"], user["gid"])
    run = "podman --events-backend file --network none"
    try:
        r = run_as(user, f"podman import {tarball} localhost/rl:base >/dev/null && "
                         "podman unshare cat /proc/self/uid_map", cwd=base, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        maps = [line.split() for line in r.stdout.splitlines()]
        assert len(maps) >= 2, f"no subordinate ids mapped: {r.stdout}"
        script = ("cat /etc/motd; echo written > /tmp/x; rm /etc/motd; mv /data /data.moved; "
                  "echo more >> /log; ls -n /tmp/x; busybox stat -c '%a %u:%g' /etc/passwd /log")
        r = run_as(user, f"podman run --name rl1 --network none localhost/rl:base /bin/sh -c {_quote(script)}",
                   cwd=base, env=env, timeout=300)
        assert r.returncode == 0, r.stderr + _text(os.path.join(base, "fs.log"))
        lines = r.stdout.splitlines()
        assert lines[0] == "hello", r.stdout
        assert lines[1].split()[2:4] == ["0", "0"], r.stdout    # root in the container
        # the image's modes and owners, whatever force_mask put on disk
        assert lines[2:4] == ["644 0:0", "644 0:0"], r.stdout
        r = run_as(user, "podman diff rl1", cwd=base, env=env)
        diff = set(r.stdout.splitlines())
        want = {"D /etc/motd", "A /data.moved", "D /data", "C /log", "A /tmp/x"}
        assert want <= diff, f"missing {want - diff} in {sorted(diff)}"
        r = run_as(user, "podman commit rl1 localhost/rl:ran >/dev/null && "
                         "podman run --rm --network none localhost/rl:ran /bin/sh -c "
                         "'cat /tmp/x /log; ls /etc' && podman rm rl1", cwd=base, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("written\nbase\nmore\n") and "motd" not in r.stdout, r.stdout
        if shutil.which("buildah"):
            r = run_as(user, "c=$(buildah from localhost/rl:base | tail -1) && "
                             "buildah run $c -- /bin/sh -c 'echo b > /b; rm /log' && "
                             "buildah commit $c localhost/rl:b >/dev/null && buildah rm $c >/dev/null && "
                             "podman run --rm --network none localhost/rl:b /bin/sh -c 'cat /b; ls /'",
                       cwd=base, env=env, timeout=300)
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("b\n") and "log" not in r.stdout.split(), r.stdout
        argv = _text(os.path.join(base, "argv.log"))
        assert "upperdir=" in argv, argv
        assert ("xattr_permissions=2" in argv) == bool(force_mask), argv
        assert "user.overlay.*" in _text(os.path.join(base, "fs.log"))
        _wait_no_daemon(base)
    finally:
        run_as(user, "podman rm -a -f >/dev/null 2>&1; podman system reset -f >/dev/null 2>&1",
               cwd=base, env=env, timeout=300)
        for mp in sorted(mountutil._mounts_below(base), key=len, reverse=True):
            mountutil.umount(mp)
        shutil.rmtree(base, ignore_errors=True)


def _text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


# ------------------------------------------------------------ blob layers

_WALK = r"""
import hashlib, json, os, stat, sys
root, out = sys.argv[1], {}
for dp, dn, fn in os.walk(root):
    for n in dn + fn:
        p = os.path.join(dp, n)
        st = os.lstat(p)
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns, "size": st.st_size}
        if stat.S_ISLNK(st.st_mode):
            e["link"] = os.readlink(p)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            e["user_xattrs"] = sorted((k, os.getxattr(p, k).hex()) for k in os.listxattr(p) if k.startswith("user."))
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o004:
            with open(p, "rb") as f:
                e["sha256"] = hashlib.sha256(f.read()).hexdigest()
        out[os.path.relpath(p, root)] = e
print(json.dumps(out))
"""


def _purelib_for_others() -> str | None:
    """This interpreter's site-packages (the images extra's libraries) if
    every user may read it, else None."""
    import sysconfig
    path = sysconfig.get_paths()["purelib"]
    p = path
    while p != "/":
        if os.stat(p).st_mode & 0o005 != 0o005:
            return None
        p = os.path.dirname(p)
    return path


@pytest.mark.parametrize("source", ["disk", "registry"])
def test_blob_layers_rootless(user, source, request):
    """Layer blobs mounted by the unprivileged user (fusermount3), from
    disk (lowerdir=) or from a registry (image=, zstd:chunked, the tree
    made as it is looked into): the skeleton keeps owners and modes in
    user.containers.override_stat and its opaque marks in
    user.overlay.opaque (no chown, no trusted.* xattr), and the merged tree
    is the one root's mount of the same layers shows, but for what a
    rootless extraction cannot make either: devices (not made), owners of
    symlinks and fifos (the user's), xattrs other than user.* (not set)."""
    import tarfile

    from relutil import overlay_env
    from test_images import _member, layer_tar, oci_layout, push
    env = None
    if source == "registry":
        purelib = _purelib_for_others()
        if purelib is None:
            pytest.skip("the images extra's libraries are not readable by other users here")
        env = {"PYTHONPATH": f"{user['pkg']}:{purelib}"}
        host, _proc = request.getfixturevalue("registry")
    base = _layers(user)
    try:
        top, bottom = os.path.join(base, "top.tar"), os.path.join(base, "bottom.tar")
        layer_tar(top)
        with tarfile.open(bottom, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in [("old/gone", b"gone\n"), ("old/kept", b"kept\n"), ("olddir/x", b"x\n"),
                               ("opq/hidden", b"hidden\n"), ("etc/hostname", b"below\n"), ("etc/passwd", b"old\n")]:
                _member(tf, name, data=data)
        for t in (top, bottom):
            os.chmod(t, 0o644)
        walker = os.path.join(base, "walk.py")
        with open(walker, "w") as f:
            f.write(_WALK)
        layers = "lowerdir=top.tar:bottom.tar"
        if source == "registry":
            push(oci_layout(base, [bottom, top]), f"{host}/test/rootless:v1", "zstd:chunked")
            layers = f"image={host}/test/rootless:v1,tls_verify=false"
        r = run_as(user, f"overlay mount --log log -o {layers},upperdir=u,workdir=w,"
                         f"blob_cache=cache m && {SYSTEM_PYTHON} walk.py m && echo new > m/run/new"
                         " && fusermount3 -u m", cwd=base, env=env)
        assert r.returncode == 0, r.stderr + r.stdout + open(os.path.join(base, "log")).read()
        theirs = json.loads(r.stdout)
        _wait_no_daemon(base)
        rm = os.path.join(base, "rm")
        for d in ("ru", "rw", "rm"):
            os.makedirs(os.path.join(base, d))
        layers = layers.replace("top.tar", top).replace("bottom.tar", bottom)
        subprocess.run([sys.executable, "-m", "overlay", "mount", "-o",
                        f"{layers},upperdir={base}/ru,workdir={base}/rw,"
                        f"blob_cache={base}/rcache", rm], check=True, env=overlay_env(), capture_output=True,
                       timeout=60)
        try:
            ours = json.loads(subprocess.run([sys.executable, walker, rm], check=True, capture_output=True,
                                             text=True).stdout)
        finally:
            mountutil.umount(rm)
        assert stat.S_ISCHR(ours.pop("dev/null")["mode"])
        listed = set()      # (a dir no tar lists is made at the build: its own time)
        for t in (top, bottom):
            with tarfile.open(t) as tf:
                listed |= {m.name.rstrip("/") for m in tf.getmembers() if m.isdir()}
        for rel, e in ours.items():
            if stat.S_ISLNK(e["mode"]) or stat.S_ISFIFO(e["mode"]):
                e["uid"], e["gid"] = user["uid"], user["gid"]
            if stat.S_ISDIR(e["mode"]) and rel not in listed:
                del e["mtime"], theirs[rel]["mtime"]
        assert theirs == ours
        assert "old/gone" not in ours and "opq/hidden" not in ours and ours["usr/bin/tool"]["mode"] == 0o104755
        # the skeleton: the user's, owners in xattrs, no trusted.* xattr
        tree = [os.path.join(base, "cache", "sha256", d, "tree") for d in os.listdir(os.path.join(base, "cache",
                                                                                                   "sha256"))]
        assert len(tree) == 2
        for t in tree:
            for dp, dn, fn in os.walk(t):
                for n in dn + fn + ["."]:
                    p = os.path.join(dp, n)
                    assert os.lstat(p).st_uid == user["uid"], p
                    if not os.path.islink(p):
                        assert not [x for x in os.listxattr(p, follow_symlinks=False) if x.startswith("trusted.")], p
        tool = [os.path.join(t, "usr/bin/tool") for t in tree if os.path.exists(os.path.join(t, "usr/bin/tool"))][0]
        assert os.getxattr(tool, "user.containers.override_stat") == b"0:0:104755"
        opq = [os.path.join(t, "opq") for t in tree if os.path.exists(os.path.join(t, "opq/new"))][0]
        assert os.getxattr(opq, "user.overlay.opaque") == b"y"
        with open(os.path.join(base, "u", "run", "new")) as f:
            assert f.read() == "new\n"
    finally:
        mountutil.umount(os.path.join(base, "m"))
        mountutil.umount(os.path.join(base, "rm"))
        shutil.rmtree(base, ignore_errors=True)
