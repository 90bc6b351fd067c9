"""Layer lists of any length and which layer serves a file, on real mounts.

* ``lowerdir_file=PATH`` (one layer a line, top first) and
  ``lowerdir_file=-`` (the mount helper's standard input): 2,000 layers,
  past the kernel's 500 and the one page mount(2) takes (what the kernel
  overlay and fuse-overlayfs cannot be given); the top and the bottom
  layer's files show; bad files give one line.
* the read-only xattr ``user.overlay-fuse.layer`` on every kind of entry
  (a file of the upper layer, one copied up, from which layer, one of a
  lower layer, a merged dir, a metacopy file and where its data are, a file
  of a data-only layer, a hard link, an opaque dir, a symlink, a fifo, a
  socket, a device: the last four through their dir, as the kernel answers
  user.* reads of those kinds itself): never stored, not settable, not
  listed; ``overlay which`` prints it;
* ``overlay stats`` counts the lookups each layer served.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import mountutil

LAYER = "user.overlay-fuse.layer"


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_fuse()
    mountutil.require_ours()


_run = mountutil.overlay_cli


def _stack(base, n):
    layers = []
    for i in range(n):
        d = os.path.join(base, "layers", f"layer-with-a-long-name-{i:05d}")
        os.makedirs(d)
        layers.append(d)
    with open(os.path.join(layers[0], "top"), "w") as fh:
        fh.write("top\n")
    with open(os.path.join(layers[-1], "bottom"), "w") as fh:
        fh.write("bottom\n")
    for d in ("u", "w", "m"):
        os.makedirs(os.path.join(base, d))
    return layers


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_two_thousand_layers(difftmp, mounts, how):
    layers = _stack(difftmp, 2000)
    listing = "\n".join(layers) + "\n"
    assert len(listing) > 3 * 4096           # far past one page of mount options
    mp = os.path.join(difftmp, "m")
    upper = f"upperdir={difftmp}/u,workdir={difftmp}/w"
    if how == "file":
        path = os.path.join(difftmp, "layers.txt")
        with open(path, "w") as fh:
            fh.write(listing)
        r = _run(["mount", "-o", f"lowerdir_file={path},{upper}", mp])
    else:
        helper = os.path.join(os.path.dirname(sys.executable), "overlay-mount")
        env = dict(os.environ, PYTHONPATH=str(mountutil.REPO / "src"))
        r = subprocess.run([helper, "-o", f"lowerdir_file=-,{upper}", mp], input=listing,
                           capture_output=True, text=True, env=env, timeout=120)
    mounts.track(mp)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(mp, "bottom")) as fh:
        assert fh.read() == "bottom\n"
    with open(os.path.join(mp, "top")) as fh:
        assert fh.read() == "top\n"
    with open(os.path.join(mp, "bottom"), "a") as fh:
        fh.write("more\n")
    assert os.getxattr(os.path.join(mp, "bottom"), LAYER).decode() == (
        f"upper: {difftmp}/u (copied up from lower 1999: {layers[-1]})")


@pytest.mark.parametrize("content,message", [
    ("", "lists no layer"),
    ("::\n/x\n", "data-only layers need a regular one first"),
    (None, "cannot read lowerdir_file"),
])
def test_bad_layer_files(difftmp, content, message):
    os.makedirs(os.path.join(difftmp, "m"))
    path = os.path.join(difftmp, "layers.txt")
    if content is not None:
        with open(path, "w") as fh:
            fh.write(content)
    r = _run(["mount", "-o", f"lowerdir_file={path}", os.path.join(difftmp, "m")])
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _run(["mount", "-o", f"lowerdir={difftmp},lowerdir_file={path}", os.path.join(difftmp, "m")])
    assert r.returncode == 1 and "either lowerdir= or lowerdir_file=" in r.stderr, r.stderr


def test_which_layer(difftmp, mounts):
    b = difftmp
    l0, l1, data = os.path.join(b, "l0"), os.path.join(b, "l1"), os.path.join(b, "data")
    for d in (l0, l1, data, f"{l0}/dir", f"{l1}/dir", f"{l1}/only", f"{data}/objects"):
        os.makedirs(d, exist_ok=True)
    for path, text in ((f"{l0}/top", "t"), (f"{l1}/low", "l"), (f"{l1}/copied", "c"),
                       (f"{l1}/meta", "m"), (f"{l1}/dir/in1", "x"), (f"{data}/objects/ab", "D")):
        with open(path, "w") as fh:
            fh.write(text)
    # a composefs-style metacopy file in l0 whose data are in the data-only layer
    with open(f"{l0}/cfs", "w") as fh:
        fh.truncate(1)
    os.setxattr(f"{l0}/cfs", "trusted.overlay.metacopy", b"")
    os.setxattr(f"{l0}/cfs", "trusted.overlay.redirect", b"/objects/ab")
    os.symlink("top", f"{l0}/link")
    os.mkfifo(f"{l1}/fifo")
    os.mknod(f"{l1}/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    socket.socket(socket.AF_UNIX).bind(f"{l0}/sock")
    os.link(f"{l1}/low", f"{l1}/low-link")
    for d in ("u", "w", "m"):
        os.makedirs(os.path.join(b, d))
    mp = os.path.join(b, "m")
    mounts.ours([l0, l1, "::", data], f"{b}/u", f"{b}/w", mp, ("metacopy=on",))
    with open(f"{mp}/new", "w") as fh:
        fh.write("n")
    with open(f"{mp}/copied", "a") as fh:
        fh.write("+")
    os.chmod(f"{mp}/meta", 0o600)               # metadata only (metacopy=on)
    os.mkdir(f"{mp}/newdir")
    os.rmdir(f"{mp}/only")
    os.mkdir(f"{mp}/only")                      # opaque now
    up = f"upper: {b}/u"
    want = {
        "new": up,
        "copied": f"{up} (copied up from lower 1: {l1})",
        "meta": f"{up} (metadata only; data in lower 1: {l1})",
        "top": f"lower 0: {l0}",
        "low": f"lower 1: {l1}",
        "cfs": f"lower 0: {l0} (metadata only; data in data-only layer 0: {data})",
        "link": f"lower 0: {l0}",
        "fifo": f"lower 1: {l1}",
        "null": f"lower 1: {l1}",
        "sock": f"lower 0: {l0}",
        "low-link": f"lower 1: {l1}",
        "dir": f"lower 0: {l0} + lower 1: {l1}",
        "dir/in1": f"lower 1: {l1}",
        "newdir": up,
        "only": up,
        "": f"{up} + lower 0: {l0} + lower 1: {l1}",
    }
    # regular files and dirs answer it themselves; the kernel answers user.*
    # reads of the other kinds with ENODATA before asking us: their dir does
    got = {}
    for p in want:
        path = os.path.join(mp, p)
        if p in ("link", "fifo", "null", "sock"):
            with pytest.raises(OSError) as e:
                os.getxattr(path, LAYER, follow_symlinks=False)
            assert e.value.errno == errno.ENODATA
            got[p] = os.getxattr(mp, f"{LAYER}/{p}").decode()
        else:
            got[p] = os.getxattr(path, LAYER, follow_symlinks=False).decode()
    assert got == want
    for bad in (f"{LAYER}/missing", f"{LAYER}/top/x", f"{LAYER}/"):
        with pytest.raises(OSError) as e:
            os.getxattr(mp, bad)
        assert e.value.errno in (errno.ENOENT, errno.ENODATA), bad
    with pytest.raises(OSError) as e:
        os.getxattr(f"{mp}/top", f"{LAYER}/x")       # not a dir
    assert e.value.errno == errno.ENODATA
    r = _run(["which", f"{mp}/copied", f"{mp}/top", f"{mp}/link", f"{mp}/dir/in1"])
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"{mp}/{p}: {want[p]}" for p in ("copied", "top", "link", "dir/in1")], r.stdout + r.stderr
    # read-only, never stored, not listed
    for call in (lambda: os.setxattr(f"{mp}/new", LAYER, b"x"),
                 lambda: os.removexattr(f"{mp}/new", LAYER)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPERM
    assert LAYER not in os.listxattr(f"{mp}/new")
    assert LAYER not in os.listxattr(f"{b}/u/new")
    r = _run(["which", f"{b}/u/new"])
    assert r.returncode == 1 and "not on an overlay mount of ours" in r.stderr
    st = json.loads(_run(["stats", "--json", mp]).stdout)
    served = {lay["layer"]: lay["lookups"] for lay in st["layers"]}
    assert served["upper"] >= 3 and served["lower 0"] >= 4 and served["lower 1"] >= 3, served
