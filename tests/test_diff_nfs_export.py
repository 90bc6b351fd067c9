"""nfs_export=on (and redirect_dir=nofollow), compared with the kernel
overlay mounted with the same options.

Fixed scenarios: file handles of every kind of object taken through the
mount (name_to_handle_at), the kernel's caches dropped so the inodes are
forgotten, then opened again (open_by_handle_at) across copy-ups, renames
and removals (ESTALE once an object is gone); a write through the handle
of a file no name was looked up for (copied up into the index only, as the
kernel does, and lost at the next mount as on the kernel); the index
entries of dirs, whiteouts in the index; the kernel's checks of the index
at mount with nfs_export; a merged dir whose lower dir is not its origin
any more (not merged); an upper written without nfs_export; a read-only
mount (redirect_dir=nofollow); redirects refused with nofollow (EPERM).
Every op's result, the trees, the upper and index dirs and each upper
mounted by the other side are compared (see difftest.pair).
"""

import os

import pytest

import mountutil
from difftest.layers import dir as d
from difftest.layers import file, link, symlink
from overlay.stats import read_stats

KOPTS = ("redirect_dir=on", "nfs_export=on")
OOPTS = ("nfs_export=on",)


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def stack():
    return [[file("f", "one link\n", mode=0o640, uid=1000), file("h", "two links\n"), link("h2", "h"),
             d("d"), file("d/x", "x\n"), d("d/sub"), file("d/sub/y", "y\n"), d("e"), d("g"),
             file("g/z", "z\n"), symlink("s", "f")],
            [d("d"), file("d/lowest", "lowest\n"), file("low", "from the bottom layer\n"),
             d("m"), file("m/deep", "deep\n")]]


PATHS = ("", "f", "h", "h2", "d", "d/x", "d/sub", "d/sub/y", "e", "g", "g/z", "s", "low", "m",
         "m/deep")


def save_all(p, paths=PATHS):
    for slot, path in enumerate(paths):
        p.op(("fh_save", path, slot), expect="ok")


def open_all(p, paths=PATHS):
    for slot in range(len(paths)):
        p.op(("fh_open", slot))


def test_handles_across_copy_up_rename_and_removal(mk):
    """Handles of lower files, hard links, dirs (merged and not), a
    symlink and the root, opened after the kernel forgot the inodes:
    before any change, then after copy-ups, renames of files and dirs
    (with redirects), removals and renames over (ESTALE from then on)."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    save_all(p)
    open_all(p)
    p.op(("append", "f", b"more\n"), expect="ok")
    p.op(("chmod", "h2", 0o600), expect="ok")
    p.op(("rename", "d", "dd", 0), expect="ok")
    p.op(("rename", "g/z", "e/z", 0), expect="ok")
    p.op(("rename", "m", "e/m", 0), expect="ok")
    p.op(("unlink", "low"), expect="ok")
    p.op(("rmdir", "dd/sub/y"), expect="ENOTDIR")
    p.op(("unlink", "dd/sub/y"), expect="ok")
    p.op(("rmdir", "dd/sub"), expect="ok")
    p.op(("rename", "h", "s", 0), expect="ok")
    open_all(p)
    p.op(("create", "new", 0o644, b"new\n"), expect="ok")
    p.op(("mkdir", "e/nd", 0o755), expect="ok")
    p.op(("fh_save", "new", 20), expect="ok")
    p.op(("fh_save", "e/nd", 21), expect="ok")
    p.op(("fh_save", "e/m/deep", 22), expect="ok")
    p.op(("rename", "e", "ee", 0), expect="ok")
    for slot in (20, 21, 22):
        p.op(("fh_open", slot), expect="ok")
    p.op(("unlink", "new"), expect="ok")
    p.op(("fh_open", 20), expect="ESTALE")
    open_all(p)
    # the handles were decoded by the daemon, after the kernel forgot them
    st = read_stats(p.mp_o)
    assert st["core"]["handles_decoded"] >= 10, st
    assert st["handles_kept"] > 0, st
    p.finish()


def test_write_through_a_handle(mk):
    """Files written through their handles once the kernel forgot them: a
    lower file no name leads to (copied up into the index only, as the
    kernel's disconnected copy-up: its name finds the copy), a lower hard
    link, a copied-up file. At the next mount the kernel whites out the
    index-only copy (an orphan) and its name gives EIO: so does ours."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("fh_save", "f", 0), expect="ok")
    p.op(("fh_save", "h2", 1), expect="ok")
    p.op(("fh_save", "g/z", 2), expect="ok")
    p.op(("append", "g/z", b"copied up\n"), expect="ok")
    p.op(("fh_write", 0, 2, b"XY"), expect="ok")
    p.op(("fh_write", 1, 0, b"H"), expect="ok")
    p.op(("fh_write", 2, 0, b"Z"), expect="ok")
    for path in ("f", "h", "h2", "g/z"):
        p.op(("read", path), expect="ok")
        p.op(("lstat", path), expect="ok")
    p.check_trees("written through handles")
    p.umount()
    p.check_uppers()
    p.mount()
    p.op(("read", "f"), expect="EIO")
    p.op(("read", "h"), expect="ok")
    p.finish()


def test_dirs_indexed_and_whited_out(mk):
    """Copy-ups of dirs (a file created in a lower dir, a chmod, a rename
    with redirect) give them index entries naming their upper dirs; rmdir
    of a lower dir, and a dir renamed over, leave whiteouts in the index."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("create", "g/new", 0o644, b"n"), expect="ok")
    p.op(("chmod", "d/sub", 0o700), expect="ok")
    p.op(("rename", "m", "mm", 0), expect="ok")
    p.op(("rmdir", "e"), expect="ok")
    p.op(("mkdir", "e", 0o755), expect="ok")
    p.op(("rename", "e", "mm", 0), expect="ENOTEMPTY")
    p.op(("unlink", "mm/deep"), expect="ok")
    p.op(("rename", "e", "mm", 0), expect="ok")
    for path in ("d", "d/sub", "g", "mm", "e"):
        p.op(("lstat", path))
    p.finish()


def test_upper_written_without_nfs_export(mk):
    """An upper whose copies were made without nfs_export (no index
    entries), mounted with it: those copies show their upper st_ino (the
    kernel's verify_lower), new copy-ups are indexed."""
    p = mk(stack(), kernel_opts=("redirect_dir=on",), ours_opts=())
    p.op(("append", "f", b"before\n"), expect="ok")
    p.op(("create", "d/new", 0o644, b"n"), expect="ok")
    p.umount()
    p.kernel_opts = p.remount_kernel_opts = KOPTS
    p.ours_opts = OOPTS
    p.mount()
    p.op(("append", "g/z", b"after\n"), expect="ok")
    p.op(("fh_save", "f", 0), expect="ok")
    p.op(("fh_save", "d", 1), expect="ok")
    p.op(("fh_open", 0), expect="ok")
    p.op(("fh_open", 1), expect="ok")
    p.finish()


def test_lower_dir_not_its_origin_is_not_merged(mk, difftmp):
    """A merged dir whose lower dir was replaced behind the overlay (another
    inode at the same path): with nfs_export the kernel no longer merges
    it (its origin does not match), nor does ours."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("create", "d/new", 0o644, b"n"), expect="ok")
    p.umount()
    for built in (p.built_k, p.built_o):
        top = built.lowers[0]
        os.rename(os.path.join(top, "d"), os.path.join(top, "d.old"))
        os.mkdir(os.path.join(top, "d"))
        with open(os.path.join(top, "d", "replaced"), "w") as fh:
            fh.write("r")
    p.mount()
    p.op(("readdir", "d"), expect="ok")
    p.op(("lstat", "d/replaced"), expect="ENOENT")
    p.finish(kernel_over_ours=False, ours_over_kernel=False)


def test_read_only_mount_with_nofollow(mk):
    """No upper layer: nfs_export=on needs redirect_dir=nofollow (else the
    kernel falls back to nfs_export=off); lower handles decode."""
    p = mk(stack(), ro=True, kernel_opts=("nfs_export=on", "redirect_dir=nofollow"),
           ours_opts=("nfs_export=on", "redirect_dir=nofollow"))
    # (not the root: on a mount without upper the kernel gives ESTALE for
    # the root's handle; FUSE never forgets its root: a documented difference)
    save_all(p, PATHS[1:])
    open_all(p, PATHS[1:])
    p.finish()


def test_redirects_refused_with_nofollow(mk):
    """redirect_dir=nofollow: a dir whose redirect would be followed (in
    the upper dir, or in a lower layer with layers below) gives EPERM, as
    the kernel's "refusing to follow redirect"; an opaque one does not."""
    p = mk(stack(), kernel_opts=("redirect_dir=on",), ours_opts=())
    p.op(("rename", "d", "dd", 0), expect="ok")
    p.op(("mkdir", "n", 0o755), expect="ok")
    p.op(("rename", "n", "nn", 0), expect="ok")
    p.umount()
    p.kernel_opts = p.remount_kernel_opts = ("redirect_dir=nofollow",)
    p.ours_opts = ("redirect_dir=nofollow",)
    p.mount()
    for path in ("dd", "dd/x", "nn", "g", "d"):
        p.op(("lstat", path))
    p.op(("readdir", ""), expect="ok")
    p.finish(kernel_over_ours=False, ours_over_kernel=False)


# ---------------------------------------------------------------- mount checks


def _index_view(work):
    """The index dir as far as two copies can agree: kind of each entry
    (f, d, w for whiteouts) and, for dirs, whether they name an upper."""
    out = []
    idx = os.path.join(work, "index")
    for name in sorted(os.listdir(idx)):
        if name.startswith("#"):
            continue
        full = os.path.join(idx, name)
        st = os.lstat(full)
        if os.path.stat.S_ISDIR(st.st_mode):
            try:
                os.getxattr(full, "trusted.overlay.upper")
                out.append("d+upper")
            except OSError:
                out.append("d")
        elif os.path.stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out.append("w")
        else:
            out.append("f")
    return sorted(out)


@pytest.mark.parametrize("kind", ["kept", "dir-no-upper", "dir-orphan", "dir-stale", "file-orphan",
                                  "dir-upper-no-origin"])
def test_index_cleanup_at_mount(difftmp, mounts, kind):
    """The kernel's index checks at mount with nfs_export: a dir entry
    without an upper xattr goes, one whose upper dir is gone becomes a
    whiteout, one whose upper has another origin goes; an orphan file entry
    becomes a whiteout (with index=on alone it goes); an upper dir without
    origin refuses the mount. Made by the kernel on two copies, mounted by
    the kernel and by ours: the same index after, the same outcome."""
    seen = {}
    for side in ("kernel", "ours"):
        tmp = os.path.join(difftmp, side)
        t = {k: os.path.join(tmp, k) for k in ("l1", "u", "w", "mp")}
        for v in t.values():
            os.makedirs(v)
        os.makedirs(os.path.join(t["l1"], "dir"))
        os.makedirs(os.path.join(t["l1"], "dir2"))
        with open(os.path.join(t["l1"], "f"), "w") as fh:
            fh.write("x")
        mounts.kernel([t["l1"]], t["u"], t["w"], t["mp"], KOPTS)
        for name in ("dir", "dir2"):
            open(os.path.join(t["mp"], name, "new"), "w").close()
        with open(os.path.join(t["mp"], "f"), "a") as fh:
            fh.write("y")
        mounts.umount(t["mp"])
        idx = os.path.join(t["w"], "index")
        dirents = [os.path.join(idx, e) for e in os.listdir(idx)
                   if os.path.isdir(os.path.join(idx, e))]
        ents = {os.getxattr(os.path.join(t["u"], n), "trusted.overlay.origin").hex(): n
                for n in ("dir", "dir2")}
        dir_entry = os.path.join(idx, [e for e, n in ents.items() if n == "dir"][0])
        assert dir_entry in dirents
        if kind == "dir-no-upper":
            os.removexattr(dir_entry, "trusted.overlay.upper")
        elif kind == "dir-orphan":
            os.unlink(os.path.join(t["u"], "dir", "new"))
            os.rmdir(os.path.join(t["u"], "dir"))
        elif kind == "dir-stale":
            v = os.getxattr(os.path.join(t["u"], "dir2"), "trusted.overlay.origin")
            os.setxattr(os.path.join(t["u"], "dir"), "trusted.overlay.origin", v)
        elif kind == "file-orphan":
            os.unlink(os.path.join(t["u"], "f"))
        elif kind == "dir-upper-no-origin":
            os.removexattr(os.path.join(t["u"], "dir"), "trusted.overlay.origin")
        try:
            if side == "kernel":
                mounts.kernel([t["l1"]], t["u"], t["w"], t["mp"], KOPTS)
            else:
                mounts.ours([t["l1"]], t["u"], t["w"], t["mp"], OOPTS)
        except mountutil.MountError as e:
            why = str(e)
            seen[side] = ("refused", _index_view(t["w"]),
                          ("No data available" in why or "wrong fs type" in why) if side == "kernel"
                          else "its upper dir has no origin" in why)
            continue
        mounts.umount(t["mp"])
        seen[side] = ("mounted", _index_view(t["w"]))
    assert seen["ours"] == seen["kernel"], seen
    expect = {"kept": ("mounted", ["d+upper", "d+upper", "f"]),
              "dir-no-upper": ("mounted", ["d+upper", "f"]),
              "dir-orphan": ("mounted", ["d+upper", "f", "w"]),
              "dir-stale": ("mounted", ["d+upper", "f"]),
              "file-orphan": ("mounted", ["d+upper", "d+upper", "w"]),
              "dir-upper-no-origin": ("refused", ["d+upper", "d+upper", "f"], True)}[kind]
    assert seen["kernel"] == expect, seen


def test_fallback_without_file_handles(difftmp):
    """A lower layer without file handles: index=off and nfs_export=off, as
    the kernel falls back."""
    pytest.importorskip("overlay_core")
    from overlay_core import Overlay

    t = {k: os.path.join(difftmp, k) for k in ("l1", "u", "w")}
    for v in t.values():
        os.makedirs(v)
    ov = Overlay(["/proc/self", t["l1"]], t["u"], t["w"], index=True, nfs_export=True)
    try:
        assert (ov.index, ov.nfs_export, ov.index_all) == (False, False, False)
    finally:
        ov.close()
    ov = Overlay([t["l1"]], t["u"], t["w"], index=True, nfs_export=True)
    try:
        assert (ov.index, ov.nfs_export, ov.index_all) == (True, True, True)
    finally:
        ov.close()


def test_handle_of_a_file_whose_name_was_removed_while_another_stays(mk):
    """fstests generic/426 and 467 (-u): a file made through the mount,
    hard-linked, its first name removed: its handle still opens it (through
    the name that stays), once the kernel forgot it too; and the same for
    a lower file with several links, indexed."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("create", "made", 0o644, b"made through the mount\n"), expect="ok")
    p.op(("link", "made", "e/other"), expect="ok")
    p.op(("fh_save", "made", 0), expect="ok")
    p.op(("fh_open", 0), expect="ok")        # (the kernel forgets it here)
    p.op(("fh_save", "made", 1), expect="ok")
    p.op(("unlink", "made"), expect="ok")
    p.op(("fh_open", 0), expect="ok")
    p.op(("fh_open", 1), expect="ok")
    p.op(("fh_save", "h", 2), expect="ok")
    p.op(("unlink", "h"), expect="ok")
    p.op(("fh_open", 2), expect="ok")
    p.op(("unlink", "e/other"), expect="ok")
    p.op(("fh_open", 0), expect="ESTALE")
    p.finish()


def test_handles_across_a_remount_pinned(mk):
    """What FUSE cannot do, pinned: a FUSE file handle is the node id the
    daemon gave the object (the kernel's FUSE client encodes it, fs/fuse/
    inode.c fuse_encode_fh; the daemon is never asked), so the next mount's
    daemon cannot decode it: ESTALE (fstests generic/477). The kernel
    overlay's handles are the layers' own and outlive a remount."""
    p = mk(stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("fh_save", "f", 0), expect="ok")
    p.op(("fh_save", "d/x", 1), expect="ok")
    p.umount()
    p.mount()
    for slot in (0, 1):
        rk, ro = p.run(("fh_open", slot))
        assert rk[0] == "ok"
        assert ro == ("err", "ESTALE")
    p.umount()
