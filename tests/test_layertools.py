"""Tests of ``overlay diff`` and ``overlay commit`` (tests/test_layertools.py).

The upper dirs are made for real: a scenario of changes (write, delete, rm -rf,
rmdir + mkdir = opaque dir, renames of lower dirs to another dir and in the
same dir = redirects, a rename inside a renamed dir, hard link, symlink, fifo,
device, chmod, chown, xattrs, a renamed file) is run through a mounted overlay,
ours and, where it can be mounted, the kernel's, so the upper format is what a
real mount writes.  Then:

* ``overlay diff`` (with and without ``--lower``, text and ``--json``) must
  print exactly the expected change lists;
* ``overlay commit`` must write the expected tar members (``.wh.`` files,
  ``.wh..wh..opq`` markers, hard links, no overlay xattrs), refuse renamed dirs
  without ``--lower`` and ``.wh.*`` names;
* extracting the layer over a flat copy of the lower layers, applying the
  whiteouts the OCI way (an independent implementation in this file), must
  reproduce the merged view that was seen through the mount.

Temp dirs are /tmp/eco-lt-*; every mount is undone in teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile

import pytest

import mountutil

from overlay import layertools

PY = sys.executable
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


# --------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def eco(request):
    """A scratch dir /tmp/eco-lt-*, with a tracker that unmounts in teardown."""
    d = tempfile.mkdtemp(prefix="eco-lt-", dir="/tmp")
    with mountutil.MountTracker() as tracker:
        yield d, tracker
    mountutil.remove_tmpdir(d)


def write(path, data="", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)


def make_lowers(d):
    """Two plain lower layers: l1 (top) and l2."""
    l1, l2 = os.path.join(d, "l1"), os.path.join(d, "l2")
    for path, data in {
        "etc/passwd": "top\n",
        "etc/hosts": "hosts\n",
        "etc/hosts2": "hosts2\n",
        "etc/group": "group\n",
        "data/sub/f": "data\n",
        "gone/deep/g": "g\n",
        "rn/inner/file": "inner\n",
        "sib/f": "sib\n",
    }.items():
        write(os.path.join(l1, path), data, 0o644)
    for path, data in {
        "etc/passwd": "base\n",
        "opq/x/y": "y\n",
        "opq/keep": "keep\n",
        "onlyl2/z": "z\n",
    }.items():
        write(os.path.join(l2, path), data, 0o644)
    return [l1, l2]


def run_scenario(mp):
    """The changes, made through the mounted overlay at mp."""
    j = lambda *p: os.path.join(mp, *p)  # noqa: E731
    with open(j("etc/passwd"), "a") as fh:  # copy-up + write
        fh.write("more\n")
    os.remove(j("etc/hosts"))  # whiteout
    shutil.rmtree(j("gone"))  # whiteout for a whole tree
    shutil.rmtree(j("opq"))  # rmdir + mkdir: an opaque dir
    os.mkdir(j("opq"))
    write(j("opq/new"), "new\n")
    os.rename(j("rn"), j("data/moved"))  # absolute redirect
    os.rename(j("data/moved/inner"), j("data/moved/inner2"))  # relative, inside
    os.rename(j("sib"), j("sib2"))  # relative redirect
    os.rename(j("etc/hosts2"), j("renamed_file"))
    os.mkdir(j("newdir"))
    write(j("newdir/f"), "f\n")
    os.link(j("newdir/f"), j("newdir/hl"))
    os.setxattr(j("newdir/f"), "user.test", b"\xff\x00binary")
    os.symlink("etc/passwd", j("link"))
    os.mkfifo(j("fifo"))
    os.mknod(j("nod"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(j("data/sub/f"), 0o600)
    os.chown(j("etc/group"), 1234, 5678)
    os.setxattr(j("data/sub"), "user.dirattr", b"v")


EXPECTED_WITH_LOWERS = """\
C /data
A /data/moved
A /data/moved/inner2
A /data/moved/inner2/file
C /data/sub
C /data/sub/f
C /etc
C /etc/group
D /etc/hosts
D /etc/hosts2
C /etc/passwd
A /fifo
D /gone
A /link
A /newdir
A /newdir/f
A /newdir/hl
A /nod
C /opq
D /opq/keep
A /opq/new
D /opq/x
A /renamed_file
D /rn
D /sib
A /sib2
A /sib2/f
"""

EXPECTED_UPPER_ONLY = """\
C /data
A /data/moved
A /data/moved/inner2
C /data/sub
A /data/sub/f
C /etc
A /etc/group
D /etc/hosts
D /etc/hosts2
A /etc/passwd
A /fifo
D /gone
A /link
A /newdir
A /newdir/f
A /newdir/hl
A /nod
A /opq
A /opq/new
A /renamed_file
D /rn
D /sib
A /sib2
"""


def snapshot(root):
    """A comparable description of a tree: path -> attributes (no dir mtimes)."""
    out = {}
    inodes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            st = os.lstat(full)
            xattrs = {}
            for x in sorted(os.listxattr(full, follow_symlinks=False)):
                if not x.startswith(OVERLAY_XATTRS):
                    xattrs[x] = os.getxattr(full, x, follow_symlinks=False)
            info = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": xattrs,
            }
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    info["sha"] = hashlib.sha256(fh.read()).hexdigest()
                info["mtime"] = st.st_mtime_ns
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
            out[rel] = info
    links = sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1)
    return out, links


def apply_oci_layer(tar_path, root):
    """Apply a layer tarball over root the OCI way (independent of layertools)."""
    dirs = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            name = m.name.rstrip("/")
            parent, base = posixpath.split(name)
            pdir = os.path.join(root, parent)
            if base == ".wh..wh..opq":
                for child in os.listdir(pdir):
                    _rm(os.path.join(pdir, child))
                continue
            if base.startswith(".wh."):
                _rm(os.path.join(pdir, base[len(".wh.") :]))
                continue
            dest = os.path.join(root, name)
            if os.path.lexists(dest) and not (m.isdir() and os.path.isdir(dest) and not os.path.islink(dest)):
                _rm(dest)
            tar.extract(m, root, numeric_owner=True, filter="fully_trusted")
            for key, value in m.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(
                        dest,
                        key[len("SCHILY.xattr.") :],
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
            if "mtime" in m.pax_headers and not m.issym():  # links: tarfile set a float time
                secs, _, frac = m.pax_headers["mtime"].partition(".")
                ns = int(secs) * 10**9 + int((frac + "000000000")[:9])
                if m.isdir():
                    dirs.append((dest, ns))
                else:
                    os.utime(dest, ns=(ns, ns), follow_symlinks=False)
    for dest, ns in reversed(dirs):
        os.utime(dest, ns=(ns, ns))


def _rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def overlay_cli(*args, check=True):
    proc = subprocess.run(
        [PY, "-m", "overlay", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"overlay {' '.join(args)}: rc={proc.returncode}\n{proc.stderr}")
    return proc


def build(eco, impl):
    """Lowers + an upper dir made by running the scenario on a real mount.

    Returns (lowers, upper, merged snapshot seen through the mount)."""
    d, tracker = eco
    if impl == "ours":
        mountutil.require_ours()
    else:
        mountutil.require_kernel_overlay()
    lowers = make_lowers(d)
    upper, work, mp = (os.path.join(d, n) for n in ("u", "w", "m"))
    os.mkdir(upper)
    os.mkdir(work)
    if impl == "ours":
        tracker.ours(lowers, upper, work, mp)
    else:
        tracker.kernel(lowers, upper, work, mp, ("redirect_dir=on",))
    try:
        run_scenario(mp)
        merged = snapshot(mp)
    finally:
        assert tracker.umount(mp)
    return lowers, upper, merged


IMPLS = ["ours", "kernel"]


# --------------------------------------------------------------------------
# diff


@pytest.mark.parametrize("impl", IMPLS)
def test_diff_with_lowers(eco, impl):
    lowers, upper, _ = build(eco, impl)
    out = overlay_cli("diff", upper, "--lower", ":".join(lowers)).stdout
    assert out == EXPECTED_WITH_LOWERS


@pytest.mark.parametrize("impl", IMPLS)
def test_diff_upper_only(eco, impl):
    _, upper, _ = build(eco, impl)
    assert overlay_cli("diff", upper).stdout == EXPECTED_UPPER_ONLY


def test_diff_json_and_api(eco):
    lowers, upper, _ = build(eco, "ours")
    data = json.loads(overlay_cli("diff", "--json", upper, "--lower", ":".join(lowers)).stdout)
    expected = {"added": [], "changed": [], "deleted": []}
    key = {"A": "added", "C": "changed", "D": "deleted"}
    for line in EXPECTED_WITH_LOWERS.splitlines():
        kind, path = line.split(" ", 1)
        expected[key[kind]].append(path)
    assert data == expected
    changes = layertools.diff(upper, lowers)
    assert "".join(f"{c}\n" for c in changes) == EXPECTED_WITH_LOWERS


def test_diff_errors(eco):
    d, _ = eco
    proc = overlay_cli("diff", os.path.join(d, "missing"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"overlay diff: upper dir '{d}/missing' is not a directory"


def test_diff_empty_upper(eco):
    d, _ = eco
    lowers = make_lowers(d)
    os.mkdir(os.path.join(d, "u"))
    assert overlay_cli("diff", os.path.join(d, "u"), "--lower", ":".join(lowers)).stdout == ""


# --------------------------------------------------------------------------
# commit


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: m for m in tar.getmembers()}


@pytest.mark.parametrize("impl", IMPLS)
def test_commit_members(eco, impl):
    d, _ = eco
    lowers, upper, _ = build(eco, impl)
    out = os.path.join(d, "layer.tar.gz")
    overlay_cli("commit", upper, "-o", out, "--lower", ":".join(lowers))
    with open(out, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # gzip
    ms = members(out)
    names = set(ms)
    # whiteouts and opaque markers
    for wh in ("etc/.wh.hosts", "etc/.wh.hosts2", ".wh.gone", ".wh.rn", ".wh.sib"):
        assert wh in names and ms[wh].isreg() and ms[wh].size == 0
    assert "opq/.wh..wh..opq" in names and "newdir/.wh..wh..opq" in names
    assert "opq/keep" not in names and "opq/x" not in names
    # renamed dirs written in full at the new path, with an opaque marker
    for name in ("data/moved", "data/moved/inner2", "sib2"):
        assert ms[name].isdir()
    assert "data/moved/.wh..wh..opq" in names and "sib2/.wh..wh..opq" in names
    assert ms["data/moved/inner2/file"].size == len("inner\n")
    assert ms["sib2/f"].size == len("sib\n")
    assert not any(n.startswith("data/moved/inner/") or n == "data/moved/inner" for n in names)
    # entry types and metadata
    assert ms["newdir/hl"].islnk() and ms["newdir/hl"].linkname == "newdir/f"
    assert ms["link"].issym() and ms["link"].linkname == "etc/passwd"
    assert ms["fifo"].isfifo()
    assert ms["nod"].ischr() and (ms["nod"].devmajor, ms["nod"].devminor) == (1, 3)
    assert (ms["etc/group"].uid, ms["etc/group"].gid) == (1234, 5678)
    assert ms["data/sub/f"].mode == 0o600
    assert ms["newdir/f"].pax_headers["SCHILY.xattr.user.test"].encode(
        "utf-8", "surrogateescape"
    ) == b"\xff\x00binary"
    assert ms["data/sub"].pax_headers["SCHILY.xattr.user.dirattr"] == "v"
    # never the overlay's own xattrs
    for m in ms.values():
        for key in m.pax_headers:
            assert not key.startswith(("SCHILY.xattr.trusted.overlay.", "SCHILY.xattr.user.overlay.")), (
                m.name,
                key,
            )
    # untouched lower content is not in the layer
    assert "onlyl2/z" not in names and "onlyl2" not in names and "etc/hosts" not in names
    # parents come before their entries
    order = [m.rstrip("/") for m in ms]
    for i, name in enumerate(order):
        parent = posixpath.dirname(name)
        if parent:
            assert parent in order[:i], name


@pytest.mark.parametrize("impl", IMPLS)
def test_commit_applied_reproduces_merged_view(eco, impl):
    d, tracker = eco
    lowers, upper, merged = build(eco, impl)
    layer = os.path.join(d, "layer.tar")
    overlay_cli("commit", upper, "-o", layer, "--lower", ":".join(lowers))
    # a flat copy of the lower layers, taken through a read-only mount
    ro, flat = os.path.join(d, "ro"), os.path.join(d, "flat")
    tracker.ours(lowers, None, None, ro)
    try:
        subprocess.run(["cp", "-a", ro, flat], check=True)
    finally:
        assert tracker.umount(ro)
    apply_oci_layer(layer, flat)
    applied = snapshot(flat)
    merged_tree, merged_links = merged
    applied_tree, applied_links = applied
    assert sorted(applied_tree) == sorted(merged_tree)
    for path in merged_tree:
        assert applied_tree[path] == merged_tree[path], path
    assert applied_links == merged_links


def test_commit_needs_lowers_for_renamed_dirs(eco):
    d, _ = eco
    _, upper, _ = build(eco, "ours")
    out = os.path.join(d, "layer.tar")
    proc = overlay_cli("commit", upper, "-o", out, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("overlay commit: '/data/moved' is a renamed directory")
    assert "--lower" in proc.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(d) if n.startswith(".layer.tar.tmp")]


def test_commit_without_lowers_no_redirects(eco):
    """An upper dir without renamed dirs needs no lowers; stdout works; progress."""
    d, tracker = eco
    mountutil.require_ours()
    lowers = make_lowers(d)
    upper, work, mp = (os.path.join(d, n) for n in ("u", "w", "m"))
    os.mkdir(upper)
    os.mkdir(work)
    tracker.ours(lowers, upper, work, mp)
    try:
        os.remove(os.path.join(mp, "etc/hosts"))
        write(os.path.join(mp, "big/a"), "x" * 100)
        for i in range(300):
            write(os.path.join(mp, f"big/f{i:03d}"), str(i))
    finally:
        assert tracker.umount(mp)
    proc = subprocess.run(
        [PY, "-m", "overlay", "commit", upper, "-o", "-", "--progress"], capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    # etc, etc/.wh.hosts, big, big/.wh..wh..opq (a new dir in a merged dir is
    # opaque, as with the kernel), big/*
    total = 1 + 1 + 1 + 1 + 301
    path = os.path.join(d, "stdout.tar")
    with open(path, "wb") as fh:
        fh.write(proc.stdout)
    ms = members(path)
    assert len(ms) == total, sorted(ms)[:5]
    assert f"{total}/{total} entries".encode() in proc.stderr
    assert "etc/.wh.hosts" in ms and ms["big/f299"].size == 3
    # no progress when stderr is not a terminal and --progress is not given
    proc = subprocess.run(
        [PY, "-m", "overlay", "commit", upper, "-o", os.path.join(d, "q.tar")], capture_output=True
    )
    assert proc.returncode == 0 and proc.stderr == b""


def test_commit_refuses_whiteout_names(eco):
    d, tracker = eco
    mountutil.require_ours()
    lowers = make_lowers(d)
    upper, work, mp = (os.path.join(d, n) for n in ("u", "w", "m"))
    os.mkdir(upper)
    os.mkdir(work)
    tracker.ours(lowers, upper, work, mp)
    try:
        write(os.path.join(mp, "etc/.wh.sneaky"), "x")
    finally:
        assert tracker.umount(mp)
    proc = overlay_cli("commit", upper, "-o", os.path.join(d, "l.tar"), check=False)
    assert proc.returncode == 1
    assert "'/etc/.wh.sneaky' cannot be stored in an OCI layer" in proc.stderr


def test_commit_output_inside_upper_refused(eco):
    d, _ = eco
    upper = os.path.join(d, "u")
    os.mkdir(upper)
    proc = overlay_cli("commit", upper, "-o", os.path.join(upper, "x.tar"), check=False)
    assert proc.returncode == 1 and "must not be inside the upper dir" in proc.stderr


def test_layer_stack_follows_redirect_chains(tmp_path):
    """LayerStack on hand-made layers (needs root for trusted.* xattrs)."""
    if os.geteuid() != 0:
        pytest.skip("trusted.* xattrs need root")
    up, l1, l2 = (tmp_path / n for n in ("u", "l1", "l2"))
    (l2 / "a" / "b").mkdir(parents=True)
    (l2 / "a" / "b" / "f").write_text("deep")
    (l1 / "x").mkdir(parents=True)  # l1/x redirects to /a (absolute)
    os.setxattr(l1 / "x", "trusted.overlay.redirect", b"/a")
    (l1 / "x" / "c").write_text("l1")
    (up / "y").mkdir(parents=True)  # upper y redirects to x (relative)
    os.setxattr(up / "y", "trusted.overlay.redirect", b"x")
    os.mknod(up / "x", stat.S_IFCHR, 0)  # whiteout at the old name
    stack = layertools.LayerStack([up, l1, l2], first_lower=1)
    y = stack.lookup_path("/y")
    assert y is not None and y.is_dir and [i for i, _ in y.layers] == [0, 1, 2]
    assert sorted(stack.children(y)) == ["b", "c"]
    assert stack.lookup_path("/y/b/f").top == str(l2 / "a" / "b" / "f")
    assert stack.lookup_path("/x") is None
    # an invalid redirect is an error, like the kernel's EINVAL
    os.setxattr(up / "y", "trusted.overlay.redirect", b"a/b")
    with pytest.raises(layertools.LayerError):
        stack.lookup_path("/y")


def test_userxattr_layers(eco):
    """A mount with userxattr keeps its marks in user.overlay.*: --userxattr reads them
    and commit leaves them out."""
    d, tracker = eco
    mountutil.require_ours()
    lowers = make_lowers(d)
    upper, work, mp = (os.path.join(d, n) for n in ("u", "w", "m"))
    os.mkdir(upper)
    os.mkdir(work)
    tracker.ours(lowers, upper, work, mp, ("userxattr",))
    try:
        shutil.rmtree(os.path.join(mp, "opq"))
        os.mkdir(os.path.join(mp, "opq"))
        os.remove(os.path.join(mp, "etc/hosts"))
    finally:
        assert tracker.umount(mp)
    assert os.getxattr(os.path.join(upper, "opq"), "user.overlay.opaque") == b"y"
    lower_arg = ":".join(lowers)
    out = overlay_cli("diff", "--userxattr", upper, "--lower", lower_arg).stdout
    assert out == "C /etc\nD /etc/hosts\nC /opq\nD /opq/keep\nD /opq/x\n"
    layer = os.path.join(d, "l.tar")
    overlay_cli("commit", "--userxattr", upper, "-o", layer)
    ms = members(layer)
    assert "opq/.wh..wh..opq" in ms and "etc/.wh.hosts" in ms
    for m in ms.values():
        assert not any(k.startswith("SCHILY.xattr.user.overlay.") for k in m.pax_headers), m.name
