"""index=on, compared with the kernel overlay mounted with index=on.

Fixed scenarios on lower hard links (every op's result, the whole trees
with nlink, st_ino and hardlink groups, the upper dirs and the index dirs
after unmount, each upper mounted by the other side: see difftest.pair),
and the kernel's checks at mount: an upper used over other lower layers, an
index of another upper dir, an index entry the kernel cannot read (the
mount refused with the kernel's errno), stale and orphan index entries
(removed), an upper written without index then mounted with it.
"""

import os
import subprocess

import pytest

import mountutil
from difftest.layers import dir as d
from difftest.layers import file, link, symlink
from difftest.ops import RENAME_EXCHANGE

KOPTS = ("redirect_dir=on", "index=on")
OOPTS = ("index=on",)


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def group_stack():
    """A lower file with four names (one in a subdir), a file with one."""
    return [[file("a", "hello\n", mode=0o640, uid=1000), link("b", "a"), link("c", "a"),
             d("d"), file("d/f", "x"), link("d/h", "a"), file("s", "solo"),
             file("p", "pair"), link("q", "p"), symlink("sl", "a"), link("sl2", "sl")]]


def stat_all(p, paths=("a", "b", "c", "d/h", "e", "hh", "p", "q", "sl", "sl2")):
    for path in paths:
        p.op(("lstat", path))


def test_write_unlink_link_rename_of_lower_hard_links(mk):
    """The kernel's life of a lower hard link with index=on: one copy in
    the index for all names, names linked up as they are used, the
    overlay nlink kept in <prefix>nlink, the index entry gone with the
    last name."""
    p = mk(group_stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    stat_all(p)
    p.op(("append", "a", b"more\n"), expect="ok")
    for path in ("a", "b", "c", "d/h"):
        p.op(("read", path), expect="ok")
    stat_all(p)
    p.op(("unlink", "b"), expect="ok")
    stat_all(p)
    p.op(("link", "c", "e"), expect="ok")
    p.op(("rename", "d/h", "hh", 0), expect="ok")
    p.op(("chmod", "q", 0o600), expect="ok")
    p.op(("rename", "p", "sl2", 0), expect="ok")       # over another group's name
    stat_all(p)
    p.check_trees("after the changes")
    for path in ("a", "c", "e", "hh", "q", "sl", "sl2"):
        p.op(("unlink", path), expect="ok")
    p.finish()


def test_names_not_linked_up_survive_remount(mk):
    """Only the name written to is in the upper dir; the others find the
    copy through the index after a remount, on both sides."""
    p = mk(group_stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("write", "d/h", 0, b"H"), expect="ok")
    p.op(("truncate", "c", 3), expect="ok")
    stat_all(p)
    p.finish()


def test_aliases_coherent_while_open(mk):
    """Write through one name, read and stat through another right away."""
    p = mk(group_stack(), kernel_opts=KOPTS, ours_opts=OOPTS)
    p.op(("stat", "a"), expect="ok")
    p.op(("stat", "c"), expect="ok")
    p.op(("append", "c", b"APPENDED"), expect="ok")
    p.op(("read", "a"), expect="ok")
    p.op(("stat", "a"), expect="ok")
    p.op(("truncate", "a", 3), expect="ok")
    p.op(("read", "c"), expect="ok")
    p.op(("chown", "b", 7, 8, True), expect="ok")
    p.op(("stat", "d/h"), expect="ok")
    p.op(("rename", "a", "c", RENAME_EXCHANGE), expect="ok")
    p.op(("rename", "s", "b", 0), expect="ok")
    stat_all(p, ("a", "b", "c", "d/h", "s"))
    p.finish()


def test_upper_written_without_index(mk):
    """An upper whose lower hard link was copied up without index (a broken
    link, its own st_ino) mounted with index=on: the copy stays apart, the
    names not copied up become one indexed inode."""
    p = mk(group_stack(), kernel_opts=("redirect_dir=on",), ours_opts=())
    p.op(("append", "a", b"without index\n"), expect="ok")
    p.umount()
    p.kernel_opts = p.remount_kernel_opts = KOPTS
    p.ours_opts = OOPTS
    p.mount()
    stat_all(p)
    p.op(("append", "b", b"with index\n"), expect="ok")
    stat_all(p)
    p.finish()


# ---------------------------------------------------------------- mount checks


def _mount_both_ways(tmp, tracker, lowers, upper, work, opts):
    """Mount the kernel, then ours, on the same dirs: their outcomes."""
    mp = os.path.join(tmp, "mp")
    os.makedirs(mp, exist_ok=True)
    out = []
    for side in ("kernel", "ours"):
        try:
            if side == "kernel":
                tracker.kernel(lowers, upper, work, mp, ("redirect_dir=on",) + opts)
            else:
                tracker.ours(lowers, upper, work, mp, opts)
        except mountutil.MountError as e:
            out.append(("refused", str(e)))
            continue
        tracker.umount(mp)
        out.append(("mounted", ""))
    return out


def _dirs(tmp):
    dirs = {k: os.path.join(tmp, k) for k in ("l1", "l2", "u", "u2", "w")}
    for v in dirs.values():
        os.makedirs(v)
    with open(os.path.join(dirs["l1"], "f"), "w") as f:
        f.write("x")
    os.link(os.path.join(dirs["l1"], "f"), os.path.join(dirs["l1"], "g"))
    return dirs


def test_upper_used_over_other_lowers_refused(difftmp, mounts):
    t = _dirs(difftmp)
    assert _mount_both_ways(difftmp, mounts, [t["l1"]], t["u"], t["w"], ("index=on",)) == [
        ("mounted", ""), ("mounted", "")]
    res = _mount_both_ways(difftmp, mounts, [t["l2"]], t["u"], t["w"], ("index=on",))
    assert [r[0] for r in res] == ["refused", "refused"], res
    assert "Stale file handle" in res[0][1]
    assert "failed to verify upper root origin" in res[1][1] and "index=off" in res[1][1], res[1][1]
    # index=off mounts it, on both sides
    assert [r[0] for r in _mount_both_ways(difftmp, mounts, [t["l2"]], t["u"], t["w"], ())] == [
        "mounted", "mounted"]


def test_index_of_another_upper_refused(difftmp, mounts):
    t = _dirs(difftmp)
    _mount_both_ways(difftmp, mounts, [t["l1"]], t["u"], t["w"], ("index=on",))
    res = _mount_both_ways(difftmp, mounts, [t["l1"]], t["u2"], t["w"], ("index=on",))
    assert [r[0] for r in res] == ["refused", "refused"], res
    assert "failed to verify index dir 'upper' xattr" in res[1][1], res[1][1]


def test_unreadable_index_entry_refused(difftmp, mounts):
    t = _dirs(difftmp)
    _mount_both_ways(difftmp, mounts, [t["l1"]], t["u"], t["w"], ("index=on",))
    open(os.path.join(t["w"], "index", "zz"), "w").close()
    res = _mount_both_ways(difftmp, mounts, [t["l1"]], t["u"], t["w"], ("index=on",))
    assert [r[0] for r in res] == ["refused", "refused"], res
    assert "Invalid argument" in res[0][1] or "wrong fs type" in res[0][1], res[0][1]
    assert "index entry 'zz'" in res[1][1], res[1][1]


def _index_entries(work):
    """The index dir's names, file handles shown as FH (they name inodes)."""
    return sorted("FH" if not e.startswith("#") else e for e in os.listdir(os.path.join(work, "index")))


@pytest.mark.parametrize("kind", ["kept", "stale", "orphan", "leftover"])
def test_index_cleanup_at_mount(difftmp, mounts, kind):
    """What the kernel removes from the index at mount: an entry whose
    origin is not its name (stale), one no name leads to (orphan: only the
    index holds the copy and the lower file has one link left), a #...
    leftover; what it keeps. The same stack is made twice (the index entry
    by the kernel both times), mounted by the kernel and by ours."""
    seen = {}
    for side in ("kernel", "ours"):
        tmp = os.path.join(difftmp, side)
        t = _dirs(tmp)
        mp = os.path.join(tmp, "mp")
        os.makedirs(mp)
        mounts.kernel([t["l1"]], t["u"], t["w"], mp, KOPTS)
        with open(os.path.join(mp, "f"), "a") as fh:
            fh.write("y")
        mounts.umount(mp)
        (entry,) = os.listdir(os.path.join(t["w"], "index"))
        ent = os.path.join(t["w"], "index", entry)
        if kind == "stale":
            v = os.getxattr(ent, "trusted.overlay.origin")
            os.setxattr(ent, "trusted.overlay.origin", v[:-1] + bytes([v[-1] ^ 1]))
        elif kind == "orphan":
            os.unlink(os.path.join(t["u"], "f"))
            os.unlink(os.path.join(t["l1"], "g"))
        elif kind == "leftover":
            os.mkdir(os.path.join(t["w"], "index", "#1f"))
            open(os.path.join(t["w"], "index", "#1f", "x"), "w").close()
        if side == "kernel":
            mounts.kernel([t["l1"]], t["u"], t["w"], mp, KOPTS)
        else:
            mounts.ours([t["l1"]], t["u"], t["w"], mp, OOPTS)
        view = {}
        for name in sorted(os.listdir(mp)):
            with open(os.path.join(mp, name)) as fh:
                view[name] = (fh.read(), os.stat(os.path.join(mp, name)).st_nlink)
        mounts.umount(mp)
        seen[side] = (_index_entries(t["w"]), view)
    assert seen["ours"] == seen["kernel"], seen
    expect_entries = {"kept": ["FH"], "stale": [], "orphan": [], "leftover": ["FH"]}[kind]
    assert seen["kernel"][0] == expect_entries, seen


def test_index_falls_back_without_file_handles(difftmp, mounts):
    """A lower layer on a filesystem without file handles: index=off, as
    the kernel falls back (it says so in its log; ours in its own)."""
    pytest.importorskip("overlay_core")
    from overlay_core import Overlay

    t = _dirs(difftmp)
    proc = "/proc/self"     # procfs has no file handles
    ov = Overlay([proc, t["l1"]], t["u"], t["w"], index=True)
    try:
        assert ov.index is False
        assert not os.path.exists(os.path.join(t["w"], "index"))
    finally:
        ov.close()
    ov = Overlay([t["l1"]], t["u"], t["w"], index=True)
    try:
        assert ov.index is True
        assert os.path.isdir(os.path.join(t["w"], "index"))
        assert os.getxattr(os.path.join(t["w"], "index"), "trusted.overlay.upper")[3] & 4
    finally:
        ov.close()
