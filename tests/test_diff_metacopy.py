"""metacopy=on, compared with the kernel overlay mounted with metacopy=on.

Fixed scenarios (every op's result, the whole trees with st_blocks, the
upper dirs with their metacopy and redirect xattrs after unmount, each
upper mounted by the other side: see difftest.pair): metadata changes of
big lower files (the upper files stay sparse), renames and links (redirects
to the data), reads through fds opened before the data copy-up, the lower
file changed behind the mount, security.capability kept over the data
copy-up; then the kernel's refusals: a metacopy upper mounted without
metacopy=on (EPERM) and a metacopy file whose data are gone (EIO).
Data-only lower layers (lowerdir=META::OBJECTS): a composefs-style image
read-only and with an upper, an object missing from its store, and the
lowerdir forms the kernel refuses.
"""

import os
import struct

import pytest

import mountutil
from difftest.layers import dir as d
from difftest.layers import file, link

KOPTS = ("redirect_dir=on", "metacopy=on")
OOPTS = ("metacopy=on",)
BIG = 300_000


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def _data(n, seed):
    return bytes((i * 7 + seed) % 251 for i in range(n))


def stack():
    return [[file("big", _data(BIG, 1), mode=0o644), file("small", "small\n"),
             d("d"), file("d/f", _data(BIG, 2), uid=1000, gid=1000), link("d/hl", "d/f"),
             file("e", _data(BIG, 3)), file("g", _data(70_000, 4))]]


def _upper_blocks(p, path):
    """st_blocks of path in each side's upper dir."""
    return [os.lstat(os.path.join(b.upper, path)).st_blocks for b in (p.built_k, p.built_o)]


def test_metadata_changes_copy_no_data(mk):
    """chmod, chown, utimes, setxattr of big lower files: the uppers hold
    no data (on both sides), the mount reports the lower data's st_blocks,
    reads give the lower data."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("chmod", "big", 0o600), expect="ok")
    p.op(("chown", "d/f", 5, 6, True), expect="ok")
    p.op(("utime", "e", 10**18, 10**18, True), expect="ok")
    p.op(("setxattr", "g", "user.k", b"v", 0, True), expect="ok")
    for path in ("big", "d/f", "d/hl", "e", "g"):
        p.op(("stat", path), expect="ok")
        p.op(("read", path), expect="ok")
    p.check_trees("after the metadata changes")
    for path in ("big", "d/f", "e", "g"):
        assert all(b <= 16 for b in _upper_blocks(p, path)), (path, _upper_blocks(p, path))
    p.finish()


def test_renames_and_links_redirect_to_the_data(mk):
    """A renamed (same dir, other dir) or linked lower file is a metacopy
    with a redirect to its data (absolute where it moved dirs or its lower
    file has several links), on both sides; its data copied up later
    through another name."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("rename", "big", "big2", 0), expect="ok")
    p.op(("rename", "e", "d/e", 0), expect="ok")
    p.op(("rename", "d/hl", "d/hl2", 0), expect="ok")
    p.op(("link", "g", "d/g2"), expect="ok")
    p.op(("rename", "d/e", "e3", 0), expect="ok")       # moved twice
    for path in ("big2", "d/hl2", "d/g2", "e3", "g"):
        p.op(("read", path), expect="ok")
        p.op(("stat", path), expect="ok")
    p.check_trees("after the renames")
    p.op(("append", "d/g2", b"more"), expect="ok")      # data copy-up via the new name
    p.op(("read", "g"), expect="ok")
    p.op(("stat", "g"), expect="ok")
    p.op(("truncate", "big2", 10), expect="ok")
    p.finish()


def test_fd_opened_before_the_data_copy_up(mk):
    """A read-only fd opened on a metacopy file (its data in the lower
    layer) sees the writes made through another fd after the data
    copy-up, as the kernel's stacked files do."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("chmod", "big", 0o640), expect="ok")
    p.op(("ro_then_write", "big", 1000, b"WRITTEN"), expect="ok")
    p.op(("chmod", "g", 0o640), expect="ok")
    p.op(("open", "g", os.O_WRONLY), expect="ok")       # a data copy-up, no write
    p.op(("stat", "g"), expect="ok")
    p.finish()


def test_lower_changed_behind_the_mount(mk):
    """Before the data copy-up a metacopy file's data are the lower file's:
    a change made to it directly shows through, on both sides."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("chmod", "small", 0o600), expect="ok")
    p.op(("read", "small"), expect="ok")
    p.umount()      # what the kernel cached of the old data goes
    for b in (p.built_k, p.built_o):
        with open(os.path.join(b.lowers[0], "small"), "r+b") as f:
            f.write(b"SMALL")
    p.mount()
    p.op(("read", "small"), expect="ok")
    p.op(("stat", "small"), expect="ok")
    p.finish()


def test_capability_kept_over_the_data_copy_up(mk):
    """security.capability (cleared by writes) survives the in-place data
    copy-up of a metacopy file opened for write, as in the kernel."""
    cap = struct.pack("<IIIII", 0x02000000, 1 << 13, 0, 0, 0)     # cap_net_raw=p
    p = mk([[file("bin", _data(20_000, 5), mode=0o755, xattrs={"security.capability": cap})]],
           kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("chown", "bin", 0, 0, True), expect="ok")
    p.op(("getxattr", "bin", "security.capability", True))
    p.op(("open", "bin", os.O_WRONLY), expect="ok")
    p.op(("getxattr", "bin", "security.capability", True))
    p.finish()


def _two_metacopies_remounted(mk, change, err, still):
    """A metacopy upper file (chmod) and a renamed one (a redirect); after
    unmount `change` (of the pair) runs; remounted, both give err, `still`
    shows."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("chmod", "big", 0o600), expect="ok")
    p.op(("rename", "e", "d/e", 0), expect="ok")
    p.umount()
    change(p)
    p.mount()
    for path in ("big", "d/e"):
        p.op(("stat", path), expect=err)
        p.op(("read", path), expect=err)
    p.op(("read", still), expect="ok")
    p.umount()


def test_metacopy_upper_without_metacopy_refused(mk):
    """An upper holding metacopy files mounted without metacopy=on: the
    kernel refuses to follow them (EPERM), and so do we."""
    def without_metacopy(p):
        p.kernel_opts = ("redirect_dir=on",)
        p.ours_opts = ()
    _two_metacopies_remounted(mk, without_metacopy, "EPERM", "small")


def test_metacopy_without_data_is_an_error(mk):
    """A metacopy file whose data are gone from the lower layer: EIO."""
    def lose_data(p):
        for b in (p.built_k, p.built_o):
            os.unlink(os.path.join(b.lowers[0], "big"))
            os.unlink(os.path.join(b.lowers[0], "e"))
    _two_metacopies_remounted(mk, lose_data, "EIO", "d/f")


# ------------------------------------------------------------ data-only layers


def composefs_image(files):
    """A composefs-style image: a metadata tree of sparse metacopy files,
    each with an absolute redirect to its content in a content-addressed
    object store (objects/<2 hex>/<rest of its sha256>), as composefs and
    mkcomposefs lay them out. Returns (metadata layer, object layer)."""
    import hashlib

    meta, objects, seen = [d("usr"), d("usr/bin"), d("etc")], [], set()
    for path, data, mode in files:
        h = hashlib.sha256(data).hexdigest()
        obj = f"{h[:2]}/{h[2:]}"
        if h[:2] not in seen:
            objects.append(d(h[:2]))
            seen.add(h[:2])
        if obj not in {e["p"] for e in objects}:
            objects.append(file(obj, data))
        meta.append(file(path, b"", size=len(data), mode=mode,
                         xattrs={"trusted.overlay.metacopy": b"",
                                 "trusted.overlay.redirect": f"/{obj}".encode()}))
    return meta, objects


IMAGE = [("usr/bin/tool", _data(50_000, 7), 0o755), ("usr/bin/same", _data(50_000, 7), 0o755),
         ("etc/conf", b"key=value\n", 0o644), ("etc/empty", b"", 0o600), ("usr/lib", _data(5000, 8), 0o644)]


def _image_pair(mk, missing=(), rw=False):
    from difftest import layers as L
    from difftest.pair import DiffPair

    meta, objects = composefs_image(IMAGE)
    objects = [e for e in objects if e["p"] not in missing]
    stack = L.Stack(lowers=[meta], upper=[], prefix=L.TRUSTED_PREFIX, has_upper=rw,
                    datalayers=[objects])
    return stack


@pytest.mark.parametrize("rw", [False, True], ids=["read-only", "with-upper"])
def test_composefs_style_image(difftmp, mounts, rw):
    """The image mounted as lowerdir=META::OBJECTS, read-only with the
    kernel's defaults and with an upper and metacopy=on: the tree, contents
    and st_blocks of the objects, no object name in the mount; with the
    upper, metadata changes stay metacopies pointing into the store and a
    write copies the object's data up."""
    from difftest.pair import DiffPair

    stack = _image_pair(None, rw=rw)
    opts = (KOPTS, OOPTS) if rw else ((), ())
    p = DiffPair(os.path.join(difftmp, "p"), stack, mounts, label="composefs", kernel_opts=opts[0],
                 ours_opts=opts[1])
    os.makedirs(p.tmp)
    p.mount()
    p.check_trees("initial")
    for path, _, _ in IMAGE:
        p.op(("read", path), expect="ok")
        p.op(("stat", path), expect="ok")
    h = sorted(os.listdir(p.built_k.lowers[-1]))[0]
    p.op(("stat", h), expect="ENOENT")      # the store's names do not show
    if rw:
        p.op(("chmod", "usr/bin/tool", 0o700), expect="ok")
        p.op(("rename", "usr/bin/same", "usr/same2", 0), expect="ok")
        p.op(("append", "etc/conf", b"more=1\n"), expect="ok")
        p.op(("read", "usr/same2"), expect="ok")
        p.finish()
    else:
        p.check_trees("after the reads")
        p.umount()


def test_composefs_missing_object(difftmp, mounts):
    """An object missing from the store: the file shows (st_blocks from
    its size), opening it gives ENOENT, on both sides."""
    import hashlib

    from difftest.pair import DiffPair

    h = hashlib.sha256(IMAGE[2][1]).hexdigest()
    stack = _image_pair(None, missing={f"{h[:2]}/{h[2:]}"})
    p = DiffPair(os.path.join(difftmp, "p"), stack, mounts, label="composefs-missing",
                 kernel_opts=(), ours_opts=())
    os.makedirs(p.tmp)
    p.mount()
    p.op(("stat", "etc/conf"), expect="ok")
    p.op(("read", "etc/conf"), expect="ENOENT")
    p.op(("read", "usr/lib"), expect="ok")
    p.check_trees("with the object missing")
    p.umount()


@pytest.mark.parametrize("lowerdir,word", [
    ("M::", "trailing"), (":::D", "empty layer path"), ("M:::D", "single ':' or double '::'"),
    ("M::D:N", "regular lower layers cannot follow"),
])
def test_data_only_syntax_refused(difftmp, mounts, lowerdir, word):
    """lowerdir forms the kernel refuses are refused by us too, in one line."""
    dirs = {k: os.path.join(difftmp, k) for k in "MDN"}
    for v in dirs.values():
        os.makedirs(v)
    spec = "".join(dirs.get(c, c) for c in lowerdir)
    mp = os.path.join(difftmp, "mp")
    os.makedirs(mp)
    import subprocess

    k = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={spec}", mp],
                       capture_output=True, text=True)
    if k.returncode == 0:
        mounts.track(mp)
        mounts.umount(mp)
    assert k.returncode != 0, "the kernel mounted it"
    env = dict(os.environ, PYTHONPATH=str(mountutil.REPO / "src"))
    o = subprocess.run([mountutil.ours_python(), "-m", "overlay", "mount", "-o", f"lowerdir={spec}", mp],
                       capture_output=True, text=True, env=env, timeout=60)
    if mountutil.is_mounted(mp):
        mounts.track(mp)
    assert o.returncode != 0, "ours mounted it"
    err = o.stderr.strip()
    assert word in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------ verity


def _verity_stack():
    """Metacopy files over their data (no fs-verity: this kernel has no
    CONFIG_FS_VERITY): one whose metacopy xattr names a sha256 digest,
    one with none; a plain lower file."""
    digest = bytes([0, 4 + 32, 0, 1]) + bytes(range(32))
    mc = {"trusted.overlay.redirect": b"/data"}
    return [[file("dg", b"", size=9000, xattrs=dict(mc, **{"trusted.overlay.metacopy": digest})),
             file("nodg", b"", size=9000, xattrs=dict(mc, **{"trusted.overlay.metacopy": b""}))],
            [file("data", _data(9000, 9)), file("pl", "plain\n")]]


@pytest.mark.parametrize("verity,dg,nodg", [("off", "ok", "ok"), ("on", "EIO", "ok"),
                                            ("require", "EIO", "EIO")])
def test_verity_modes(mk, verity, dg, nodg):
    """verity=on checks the digest a metacopy file names against its data
    (none here: EIO), verity=require also refuses metacopy files naming
    none and copies up the data of files without fs-verity on chmod; stat
    works in every mode, as in the kernel."""
    opts = ("metacopy=on",) + ((f"verity={verity}",) if verity != "off" else ())
    p = mk(_verity_stack(), kernel_opts=("redirect_dir=on",) + opts, ours_opts=opts)
    for path, want in (("dg", dg), ("nodg", nodg)):
        p.op(("stat", path), expect="ok")
        p.op(("read", path), expect=want)
    p.op(("chmod", "pl", 0o600), expect="ok")
    p.op(("chmod", "nodg", 0o600), expect=nodg)      # the copy-up checks it too
    p.op(("chmod", "dg", 0o600), expect=dg)
    p.finish()
    pl = [os.listxattr(os.path.join(b.upper, "pl")) for b in (p.built_k, p.built_o)]
    assert ("trusted.overlay.metacopy" in pl[1]) == (verity != "require"), pl
