"""OCI image layers as lower layers (option oci_whiteouts).

Layers as extracted from image tarballs mark deletions with an empty file
`.wh.NAME` (NAME is gone in the layers below) and opaque dirs with
`.wh..wh..opq`. Our mount reads them as they are; the same stack converted to
the kernel's format (0/0 whiteouts, trusted.overlay.opaque=y) is mounted with
the kernel overlay, and both merged trees must be the same, also after
changes made through the mount.
"""

import os
import shutil
import stat

import pytest

import mountutil


def oci_layers(root):
    """Three OCI layers, top first; returns their paths."""
    top, mid, bottom = (os.path.join(root, n) for n in ("top", "mid", "bottom"))
    files = {
        bottom: {"a": b"bottom a", "b": b"bottom b", "d/x": b"bottom x", "d/y": b"bottom y",
                 "o/old": b"old", "keep/k": b"k", "gone/g": b"g"},
        mid: {".wh.a": b"", "d/.wh.x": b"", "d/z": b"mid z", "o/.wh..wh..opq": b"",
              "o/new": b"new", ".wh.gone": b"", "b": b"mid b"},
        # a whiteout next to a same-layer entry hides only the layers below
        top: {"c": b"top c", ".wh.b": b"", "b": b"top b", "d/.wh.y": b""},
    }
    for layer, entries in files.items():
        for rel, data in entries.items():
            p = os.path.join(layer, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
    return [top, mid, bottom]


def to_kernel_format(layers, root):
    """The same layers with kernel whiteouts and opaque xattrs."""
    out = []
    for layer in layers:
        dst = os.path.join(root, "k-" + os.path.basename(layer))
        shutil.copytree(layer, dst, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(dst):
            for fn in filenames:
                if not fn.startswith(".wh."):
                    continue
                os.unlink(os.path.join(dirpath, fn))
                if fn == ".wh..wh..opq":
                    os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                    continue
                target = os.path.join(dirpath, fn[len(".wh."):])
                if not os.path.lexists(target):     # same-layer entry wins
                    os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        out.append(dst)
    return out


def tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def stacks(tmp_path):
    mountutil.require_root()
    mountutil.require_fuse()
    mountutil.require_ours()
    mountutil.require_kernel_overlay()
    root = str(tmp_path)
    layers = oci_layers(root)
    klayers = to_kernel_format(layers, root)
    with mountutil.MountTracker() as mounts:
        mps = {}
        for side, lw, opts in (("ours", layers, ("oci_whiteouts",)), ("kernel", klayers, ())):
            d = os.path.join(root, side)
            for sub in ("u", "w", "m"):
                os.makedirs(os.path.join(d, sub))
            mount = mounts.ours if side == "ours" else mounts.kernel
            mount(lw, os.path.join(d, "u"), os.path.join(d, "w"), os.path.join(d, "m"), opts)
            mps[side] = os.path.join(d, "m")
        yield mps


def test_oci_whiteouts_read_like_the_kernel_format(stacks):
    ours, kern = tree(stacks["ours"]), tree(stacks["kernel"])
    assert ours == kern
    assert ours == {"b": b"top b", "c": b"top c", "d": "dir", "d/z": b"mid z",
                    "o": "dir", "o/new": b"new", "keep": "dir", "keep/k": b"k"}
    # the markers are never entries
    for name in (".wh.a", ".wh.b", ".wh.gone", "d/.wh.x", "o/.wh..wh..opq"):
        assert not os.path.lexists(os.path.join(stacks["ours"], name))


def test_changes_over_oci_layers(stacks):
    for mp in stacks.values():
        with open(os.path.join(mp, "a"), "wb") as f:      # over a lower .wh.a
            f.write(b"new a")
        os.mkdir(os.path.join(mp, "gone"))                 # over a lower .wh.gone
        os.unlink(os.path.join(mp, "b"))
        os.rename(os.path.join(mp, "d", "z"), os.path.join(mp, "d", "x"))
        shutil.rmtree(os.path.join(mp, "o"))
    assert tree(stacks["ours"]) == tree(stacks["kernel"])
    assert sorted(os.listdir(os.path.join(stacks["ours"], "gone"))) == []


def test_without_the_option_markers_are_plain_files(tmp_path):
    mountutil.require_root()
    mountutil.require_fuse()
    mountutil.require_ours()
    layers = oci_layers(str(tmp_path))
    mp = tmp_path / "m"
    mp.mkdir()
    with mountutil.MountTracker() as mounts:
        mounts.ours(layers, None, None, str(mp))
        names = set(os.listdir(mp))
    assert {".wh.a", ".wh.b", ".wh.gone", "a"} <= names
