"""The classic overlay walkthrough, step by step, on a real mount.

image1/{a,b}, image2/c, an empty container (upper) and work dir, mounted on
merge as lowerdir=image2:image1. Each step checks the merged tree and the
container (upper) tree. The same steps run on the kernel overlay, so the
expected trees are the kernel's, not ours.
"""

import os
import stat

import pytest

import mountutil


def tree(root):
    """{relative path: description} of everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode):
                out[rel] = ("chr", os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


@pytest.fixture(params=["ours", "kernel"])
def walk(request, tmp_path):
    mountutil.require_root()
    if request.param == "ours":
        mountutil.require_fuse()
        mountutil.require_ours()
    else:
        mountutil.require_kernel_overlay()
    t = tmp_path
    for d in ("image1", "image2", "container", "work", "merge"):
        (t / d).mkdir()
    (t / "image1" / "a").write_bytes(b"a from image1\n")
    (t / "image1" / "b").write_bytes(b"b from image1\n")
    (t / "image2" / "c").write_bytes(b"c from image2\n")
    lowers = [str(t / "image2"), str(t / "image1")]
    mp = str(t / "merge")
    with mountutil.MountTracker() as mounts:
        mount = mounts.ours if request.param == "ours" else mounts.kernel
        mount(lowers, str(t / "container"), str(t / "work"), mp)
        yield t


def test_walkthrough_step_by_step(walk):
    t = walk
    merge, container, image1 = t / "merge", t / "container", t / "image1"

    # 1. the merged view: both images, nothing in the container yet
    assert tree(merge) == {"a": ("file", b"a from image1\n"),
                           "b": ("file", b"b from image1\n"),
                           "c": ("file", b"c from image2\n")}
    assert tree(container) == {}

    # 2. rm merge/a leaves a whiteout (char 0/0) in the container
    os.unlink(merge / "a")
    assert sorted(tree(merge)) == ["b", "c"]
    assert tree(container) == {"a": ("chr", 0, 0)}
    assert (image1 / "a").read_bytes() == b"a from image1\n"   # lower untouched

    # 3. an edit of image1/b (in place) shows through merge/b
    with open(image1 / "b", "ab") as f:
        f.write(b"edited in image1\n")
    assert (merge / "b").read_bytes() == b"b from image1\nedited in image1\n"
    assert os.stat(merge / "b").st_size == len(b"b from image1\nedited in image1\n")

    # 4. a write to merge/b copies it up into the container
    ino = os.stat(merge / "b").st_ino
    with open(merge / "b", "ab") as f:
        f.write(b"written through merge\n")
    expect_b = b"b from image1\nedited in image1\nwritten through merge\n"
    assert tree(container) == {"a": ("chr", 0, 0), "b": ("file", expect_b)}
    assert (merge / "b").read_bytes() == expect_b
    assert (image1 / "b").read_bytes() == b"b from image1\nedited in image1\n"
    assert os.stat(merge / "b").st_ino == ino          # st_ino kept by copy-up

    # 5. a later edit of image1/b no longer shows
    with open(image1 / "b", "ab") as f:
        f.write(b"too late\n")
    assert (merge / "b").read_bytes() == expect_b
    assert tree(merge) == {"b": ("file", expect_b), "c": ("file", b"c from image2\n")}
