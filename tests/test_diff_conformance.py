"""Differential tests of what the standard suites (fstests, pjdfstest) found
different from the kernel overlay: read-only mounts with an upper layer, the
atime mount options, default ACLs, the clearing of set-id bits, O_DIRECT on
set-id files, times after stores through a shared mapping, chown(-1, -1),
directory offsets and file handles.

Each builds one stack twice, mounts the kernel overlay and ours with the same
options and applies the same ops to both, comparing every result (``expect=``
pins what the kernel does, so a test cannot quietly stop testing it), then the
trees and the upper dirs (DiffPair.finish). Ops run by another user or under
another umask go through the ``as_user`` and ``umask`` ops (a forked child).
"""

import os
import shutil

import pytest

import mountutil
from difftest import layers as L
from difftest.layers import dir as d
from difftest.layers import file, symlink, whiteout
from difftest.ops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, acl_value
from difftest.pair import DiffPair

T = 1_262_304_000 * 10**9        # 2010: the layers' times (atime <= mtime: relatime updates)
USER, GROUP = 1000, 1000         # an unprivileged caller
OTHER_GROUP = 2000


@pytest.fixture(autouse=True)
def _env():
    mountutil.require_root()
    mountutil.require_kernel_overlay()
    mountutil.require_ours()


def _reachable(p):
    """Let other users walk down to both mount points (the test dirs are 0700)."""
    for mp in (p.mp_k, p.mp_o):
        path = mp
        while path.startswith(p.tmp) or p.tmp.startswith(path + "/"):
            if len(path) <= len("/tmp"):
                break
            os.chmod(path, os.stat(path).st_mode | 0o755)
            path = os.path.dirname(path)
    return p


@pytest.fixture
def mk_unread(difftmp, mounts, request):
    """mk without its first look at both trees (which reads every file, so
    sets every atime): for the atime tests."""
    made = []

    def make(lowers, upper, kernel_opts, ours_opts):
        stack = L.Stack(lowers=lowers, upper=upper)
        tmp = os.path.join(difftmp, f"p{len(made)}")
        made.append(tmp)
        os.makedirs(tmp)
        return DiffPair(tmp, stack, mounts, label=request.node.nodeid, kernel_opts=kernel_opts,
                        ours_opts=ours_opts).mount()
    return make


def user(op, uid=USER, gid=GROUP):
    return ("as_user", uid, gid, op)


# ---------------------------------------------------------------------------
# 1. ro with an upper layer: the whole stack, read-only


def test_ro_with_upper_shows_the_upper_layer(mk):
    p = mk([[file("a", b"lower a"), file("b", b"lower b"), d("d"), file("d/x", b"x")]],
           upper=[file("a", b"upper a"), whiteout("b"), file("u", b"upper only", atime=T, mtime=T),
                  d("d"), file("d/y", b"y")],
           kernel_opts=("redirect_dir=on", "ro"), ours_opts=("ro",))
    p.op(("readdir", ""), expect="ok")
    p.op(("readdir", "d"), expect="ok")
    assert p.op(("read", "a"), expect="ok")[1] == b"upper a"
    p.op(("stat", "b"), expect="ENOENT")
    p.op(("read", "u"), expect="ok")
    # nothing changes, not even an atime (strictatime or not)
    p.op(("atime_reads", "u", 2), expect="ok")
    p.op(("create", "n", 0o644, b"new"), expect="EROFS")
    p.op(("unlink", "a"), expect="EROFS")
    p.op(("mkdir", "d/new", 0o755), expect="EROFS")
    p.op(("write", "d/x", 0, b"X"), expect="EROFS")
    p.op(("chmod", "u", 0o600), expect="EROFS")
    p.op(("setxattr", "u", "user.k", b"v", 0, True), expect="EROFS")
    p.op(("rename", "a", "z", 0), expect="EROFS")
    p.finish()


def test_ro_strictatime_touches_no_atime(mk_unread):
    p = mk_unread([[file("l", b"lower", atime=T, mtime=T), d("ld")]],
           upper=[file("u", b"upper", atime=T, mtime=T), d("ud", atime=T, mtime=T), file("ud/f")],
           kernel_opts=("redirect_dir=on", "ro", "strictatime"), ours_opts=("ro", "strictatime"))
    assert p.op(("atime_reads", "u", 2), expect="ok")[1] == "--"
    p.op(("atime_lists", "ud", 2), expect="ok")
    p.op(("atime_reads", "l", 1), expect="ok")
    p.finish()


# ---------------------------------------------------------------------------
# 2. atime mount options


def _true_binary() -> bytes:
    with open(shutil.which("true"), "rb") as f:
        return f.read()


ATIME_OPTS = [(), ("noatime",), ("relatime",), ("strictatime",), ("nodiratime",),
              ("strictatime", "nodiratime"), ("noatime", "strictatime"), ("strictatime", "noatime")]


# (without passthrough the daemon reads the files itself: the default and
# strictatime, where the kernel's page cache is kept out, are tried so too)
ATIME_CASES = [(o, "on") for o in ATIME_OPTS] + [((), "off"), (("strictatime",), "off")]


@pytest.mark.parametrize(("opts", "passthrough"), ATIME_CASES,
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "default")
def test_atime_options(mk_unread, opts, passthrough):
    prog = _true_binary()
    p = mk_unread([[file("lf", b"lower data", atime=T, mtime=T), d("ld", atime=T, mtime=T), file("ld/x"),
             file("lprog", prog, mode=0o755, atime=T, mtime=T), d("md", atime=T, mtime=T), file("md/l")]],
           upper=[file("uf", b"upper data", atime=T, mtime=T), d("ud", atime=T, mtime=T), file("ud/y"),
                  file("uprog", prog, mode=0o755, atime=T, mtime=T), d("md", atime=T, mtime=T), file("md/u")],
           kernel_opts=("redirect_dir=on",) + opts, ours_opts=opts + (f"passthrough={passthrough}",))
    lower = p.built_o.lowers[0]
    before = {n: os.lstat(os.path.join(lower, n)).st_atime_ns for n in ("lf", "ld", "lprog", "md")}
    strict = "strictatime" in opts          # (above noatime, whatever the order)
    noatime = "noatime" in opts and not strict
    r = p.op(("atime_reads", "uf", 3), expect="ok")[1]
    # (pins the kernel: strictatime every read, noatime none, relatime the first)
    assert r == ("UUU" if strict else "---" if noatime else "U--")
    p.op(("atime_reads", "lf", 2), expect="ok")
    p.op(("atime_lists", "ud", 3), expect="ok")
    p.op(("atime_lists", "md", 2), expect="ok")
    p.op(("atime_lists", "ld", 2), expect="ok")
    p.op(("atime_exec", "uprog"), expect="ok")
    p.op(("atime_exec", "lprog"), expect="ok")
    # a file made through the mount: its atime follows the same rules
    p.op(("create", "ud/new", 0o644, b"fresh"), expect="ok")
    p.op(("atime_reads", "ud/new", 2), expect="ok")
    p.finish()
    # reading a lower file never changes it, not even its atime
    after = {n: os.lstat(os.path.join(lower, n)).st_atime_ns for n in before}
    assert after == before


def _remount(p, opts, how):
    """mount -o remount,OPTS of both mounts (ours through its mount
    helper's remount, or by mount(8) itself, without a helper), then a
    moment for our daemon to see its new flags."""
    import subprocess
    import time

    r = subprocess.run(["mount", "-o", "remount," + opts, p.mp_k], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if how == "helper":
        r = mountutil.overlay_cli(["mount", "-o", "remount," + opts, p.mp_o])
    else:
        r = subprocess.run(["mount", "-i", "-o", "remount," + opts, p.mp_o], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)


@pytest.mark.parametrize("how", ["helper", "mount-i"])
def test_remount_changes_atime_rules_and_read_only(mk_unread, how):
    p = mk_unread([[file("lf", b"lower", atime=T, mtime=T)]],
                  upper=[file("uf", b"upper", atime=T, mtime=T), d("ud", atime=T, mtime=T), file("ud/x")],
                  kernel_opts=("redirect_dir=on", "strictatime"), ours_opts=("strictatime",))
    assert p.op(("atime_reads", "uf", 2), expect="ok")[1] == "UU"
    _remount(p, "noatime", how)
    assert p.op(("atime_reads", "uf", 2), expect="ok")[1] == "--"
    p.op(("atime_lists", "ud", 2), expect="ok")
    _remount(p, "ro", how)
    p.op(("create", "n", 0o644, b"x"), expect="EROFS")
    p.op(("atime_reads", "uf", 2), expect="ok")
    _remount(p, "rw,strictatime", how)
    p.op(("create", "n", 0o644, b"x"), expect="ok")
    assert p.op(("atime_reads", "uf", 2), expect="ok")[1] == "UU"
    p.op(("atime_lists", "ud", 2), expect="ok")
    _remount(p, "relatime,nodiratime", how)
    p.op(("atime_lists", "ud", 2), expect="ok")
    p.op(("atime_reads", "n", 2), expect="ok")
    p.finish()


def test_strictatime_reread_in_one_open_without_passthrough_pinned(mk_unread):
    """What FUSE cannot do, pinned: the kernel gives FUSE inodes S_NOATIME
    (fs/fuse/inode.c, fuse_iget) and serves a re-read from its page cache
    without a request, so without passthrough only the first read of an
    open reaches the upper file. With passthrough every read does, as on
    the kernel overlay."""
    for pt, want in (("off", "U-"), ("on", "UU")):
        p = mk_unread([[file("x")]], upper=[file(f"u{pt}", b"data", atime=T, mtime=T)],
                      kernel_opts=("redirect_dir=on", "strictatime"),
                      ours_opts=("strictatime", f"passthrough={pt}"))
        rk, ro = p.run(("atime_rereads", f"u{pt}", 2))
        assert rk == ("ok", "UU")
        assert ro == ("ok", want)
        p.umount()


# ---------------------------------------------------------------------------
# 3. default ACLs

DEFAULT_ACL = acl_value("u::rw-", "g::r--", "o::---")
NAMED_ACL = acl_value("u::rwx", "u:1234:rwx", "g::r-x", "g:4321:r--", "m::rwx", "o::r--")
ACL_X = "system.posix_acl_default"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_default_acl_gives_mode_and_acls_of_new_objects(mk, umask):
    p = mk([[d("ad", xattrs={ACL_X: DEFAULT_ACL}), file("ad/gone"), d("nd", xattrs={ACL_X: NAMED_ACL}),
             d("plain")]])

    def um(op):
        return ("umask", umask, op)

    for base in ("ad", "nd", "plain"):
        p.op(um(("create", f"{base}/f", 0o666, b"x")), expect="ok")
        p.op(um(("mkdir", f"{base}/sd", 0o777)), expect="ok")
        p.op(um(("mkfifo", f"{base}/fifo", 0o666)), expect="ok")
        p.op(um(("mknod", f"{base}/cdev", 0o666, 1, 3)), expect="ok")
        p.op(um(("symlink", "f", f"{base}/sym")), expect="ok")
        p.op(um(("tmpfile", base, b"tmp", f"{base}/linked")), expect="ok")
        for name in ("f", "sd", "fifo", "cdev", "linked"):
            p.op(("acl", f"{base}/{name}"), expect="ok")
        # a dir made there inherits the default ACL, and passes it on
        p.op(um(("create", f"{base}/sd/deeper", 0o640, b"y")), expect="ok")
        p.op(("acl", f"{base}/sd/deeper"), expect="ok")
    # the mode 0640 the issue names: default u::rw,g::r,o::-, mode 0666, umask 022
    if umask == 0o022:
        assert p.op(("acl", "ad/f"), expect="ok")[1][0] == "0o640"
        assert p.op(("acl", "ad/sd"), expect="ok")[1][0] == "0o640"
    # over a whiteout (the object is prepared in the work dir)
    p.op(("unlink", "ad/gone"), expect="ok")
    p.op(um(("create", "ad/gone", 0o666, b"back")), expect="ok")
    p.op(("acl", "ad/gone"), expect="ok")
    p.op(("rmdir", "ad/sd"), expect="ENOTEMPTY")
    p.finish()


def test_default_acl_in_setgid_dir_by_another_user(mk):
    p = _reachable(mk([[d("sg", mode=0o2777, gid=OTHER_GROUP, xattrs={ACL_X: acl_value(
        "u::rwx", "g::rwx", "o::r-x")})]], ours_opts=("allow_other",)))
    p.op(user(("umask", 0o022, ("create", "sg/f", 0o666, b"x"))), expect="ok")
    p.op(user(("umask", 0o022, ("mkdir", "sg/d", 0o777))), expect="ok")
    p.op(user(("umask", 0o022, ("create", "sg/d/f2", 0o777, b"x"))), expect="ok")
    for name in ("sg/f", "sg/d", "sg/d/f2"):
        p.op(("stat", name), expect="ok")
        p.op(("acl", name), expect="ok")
    p.finish()


def test_acls_across_rename_and_copy_up(mk):
    p = mk([[d("ad", xattrs={ACL_X: DEFAULT_ACL}),
             file("withacl", b"data", mode=0o640,
                  xattrs={"system.posix_acl_access": acl_value("u::rw-", "u:1234:rw-", "g::r--",
                                                               "m::rw-", "o::---")}),
             file("plainfile", b"p", mode=0o666), d("acldir", xattrs={ACL_X: NAMED_ACL})]])
    # renamed into a dir with a default ACL: the ACL is not applied
    p.op(("rename", "plainfile", "ad/moved", 0), expect="ok")
    p.op(("acl", "ad/moved"), expect="ok")
    # copy-up keeps a file's and a dir's ACLs
    p.op(("append", "withacl", b" more"), expect="ok")
    p.op(("acl", "withacl"), expect="ok")
    p.op(("chmod", "withacl", 0o600), expect="ok")
    p.op(("acl", "withacl"), expect="ok")
    p.op(("create", "acldir/f", 0o600, b"x"), expect="ok")
    p.op(("acl", "acldir"), expect="ok")
    p.op(("acl", "acldir/f"), expect="ok")
    p.finish()


# ---------------------------------------------------------------------------
# 4. set-id bits: cleared where the kernel clears them


def _setid_files(names, mode=0o6666):
    return [file(n, b"\0" * 16384, mode=mode, uid=USER, gid=GROUP) for n in names]


FALLOC_CASES = {"alloc": 0, "keep_size": FALLOC_FL_KEEP_SIZE,
                "punch": FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, "zero": FALLOC_FL_ZERO_RANGE}


@pytest.mark.parametrize("mode", [0o6666, 0o6777, 0o2666, 0o4755])
def test_fallocate_by_owner_clears_setid_as_the_kernel(mk, mode):
    names = list(FALLOC_CASES)
    p = _reachable(mk([[d("", mode=0o777)] + _setid_files([f"u_{n}" for n in names], mode)
                       + _setid_files([f"r_{n}" for n in names], mode)], ours_opts=("allow_other",)))
    for n, fmode in FALLOC_CASES.items():
        p.op(user(("fallocate", f"u_{n}", fmode, 0, 8192)), expect="ok")
        p.op(("stat", f"u_{n}"), expect="ok")
        # root (CAP_FSETID) keeps them
        p.op(("fallocate", f"r_{n}", fmode, 0, 8192), expect="ok")
        p.op(("stat", f"r_{n}"), expect="ok")
    if mode == 0o6666:
        assert p.op(("stat", "u_alloc"))[1]["mode"] == "0o2666"      # the case
    p.finish()


@pytest.mark.parametrize("mode", [0o6666, 0o6676, 0o6766, 0o6777, 0o2666])
def test_setid_cleared_for_a_caller_outside_the_group(mk, mode):
    """fstests generic/683-685 and 355: a root-owned world-writable set-id
    file changed by another user, not in its group: set-group-id goes even
    without group execute (the kernel's setattr_should_drop_sgid)."""
    names = ["f_" + n for n in FALLOC_CASES] + ["w", "t", "direct"]
    p = _reachable(mk([[d("", mode=0o777)] + [file(n, b"\0" * 16384, mode=mode) for n in names]],
                      ours_opts=("allow_other",)))
    for n, fmode in FALLOC_CASES.items():
        p.op(user(("fallocate", f"f_{n}", fmode, 0, 8192)), expect="ok")
    p.op(user(("write", "w", 0, b"data")), expect="ok")
    p.op(user(("truncate", "t", 100)), expect="ok")
    p.op(user(("direct_rw", "direct", 0, 1)), expect="ok")
    for n in names:
        p.op(("stat", n), expect="ok")
    if mode == 0o6666:
        assert p.op(("stat", "f_alloc"))[1]["mode"] == "0o666"     # fstests' expectation
    p.finish()


def test_other_setid_clearing_paths(mk):
    p = _reachable(mk([[d("", mode=0o777)] + _setid_files(
        ["w", "t", "o", "c", "cr", "cf", "rootw", "root_chown"], 0o6777)
        + [file("src", b"s" * 4096, mode=0o644)]], ours_opts=("allow_other",)))
    p.op(user(("write", "w", 0, b"data")), expect="ok")
    p.op(user(("truncate", "t", 100)), expect="ok")
    p.op(user(("open_trunc", "o", b"new")), expect="ok")
    p.op(user(("chown", "c", USER, GROUP, True)), expect="ok")
    p.op(user(("chown", "cf", -1, -1, True)), expect="ok")
    p.op(user(("copy_range", "src", "cr", 0, 0, 4096)), expect="ok")
    p.op(("write", "rootw", 0, b"root"), expect="ok")
    p.op(("chown", "root_chown", -1, -1, True), expect="ok")
    for n in ("w", "t", "o", "c", "cf", "cr", "rootw", "root_chown"):
        p.op(("stat", n), expect="ok")
    p.finish()


def test_setfacl_by_owner_outside_the_group_clears_setgid(mk):
    acl = acl_value("u::rwx", "u:1234:rw-", "g::rwx", "m::rwx", "o::r-x")
    p = _reachable(mk([[d("", mode=0o777), file("f", b"x", mode=0o2775, uid=USER, gid=OTHER_GROUP),
                        d("dd", mode=0o2775, uid=USER, gid=OTHER_GROUP),
                        file("ingroup", b"x", mode=0o2775, uid=USER, gid=GROUP)]],
                      ours_opts=("allow_other",)))
    for n in ("f", "dd", "ingroup"):
        p.op(user(("setxattr", n, "system.posix_acl_access", acl, 0, True)), expect="ok")
        p.op(("stat", n), expect="ok")
        p.op(("acl", n), expect="ok")
    assert p.op(("stat", "f"))[1]["mode"] == "0o775"
    assert p.op(("stat", "ingroup"))[1]["mode"] == "0o2775"
    p.finish()


# ---------------------------------------------------------------------------
# 5. O_DIRECT


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_o_direct_by_the_owner_of_setid_and_plain_files(mk, passthrough):
    p = _reachable(mk([[d("", mode=0o777)] + _setid_files(["s6", "s2"], 0o6666)
                       + _setid_files(["s4x"], 0o4755) + _setid_files(["plain"], 0o666)],
                      ours_opts=("allow_other", f"passthrough={passthrough}")))
    for n in ("s6", "s2", "s4x", "plain"):
        assert p.op(user(("direct_rw", n, 4096, 2)), expect="ok")[1] == (8192, 8192, True)
        p.op(("stat", n), expect="ok")
        p.op(("read", n), expect="ok")
    # unaligned: the layer's filesystem refuses it as under the kernel overlay
    p.op(("direct_rw", "plain", 100, 1))
    p.finish()


# ---------------------------------------------------------------------------
# 6. times after stores through a shared mapping


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_times_after_stores_through_a_shared_mapping(mk, passthrough):
    p = mk([[file("lower", b"\0" * 8192), file("lower2", b"\0" * 8192)]],
           upper=[file("upper", b"\0" * 8192)], ours_opts=(f"passthrough={passthrough}",))
    p.op(("create", "made", 0o644, b"\0" * 8192), expect="ok")
    p.op(("stat", "made"), expect="ok")          # the kernel caches what it is told
    for name in ("made", "upper", "lower"):
        assert p.op(("mmap_write", name, b"hello", False), expect="ok")[1] == ("mc", "mc")
    assert p.op(("mmap_write", "lower2", b"bye", True), expect="ok")[1] == ("mc",)
    assert p.op(("mmap_write", "made", b"again", True), expect="ok")[1] == ("mc",)
    p.finish()


def test_store_through_a_mapping_kept_after_close(mk):
    """A mapping outlives close(2): the kernel sends the RELEASE only when
    it goes (munmap), so the file counts as open for writing until then and
    stat sees the stores made meanwhile."""
    p = mk([[file("x")]], upper=[file("f", b"\0" * 4096)])
    p.op(("stat", "f"))
    assert p.op(("mmap_store_after_close", "f", b"stored"), expect="ok")[1] == "m"
    p.finish()


def test_mmap_store_the_way_fstests_215_makes_it(mk):
    """dd creates the file, stat, then xfs_io-style open, map, store, exit."""
    p = mk([[file("x")]])
    p.op(("create", "f", 0o644, b"\0" * 4096 * 4), expect="ok")
    p.op(("stat", "f"), expect="ok")
    p.op(("ctime_by", "f", ("mmap_write", "f", b"Z" * 16, False)), expect="ok")
    p.finish()


# ---------------------------------------------------------------------------
# 7. chown(path, -1, -1)


def test_chown_minus_one_copies_up_and_updates_ctime(mk):
    p = mk([[file("f", b"data"), d("dd"), file("dd/in"), symlink("sym", "f"),
             file("suid", b"s", mode=0o6755), file("sgid_noexec", b"s", mode=0o2644)]])
    for path, follow in (("f", True), ("dd", True), ("sym", False), ("suid", True), ("sgid_noexec", True)):
        assert p.op(("ctime_by", path, ("chown", path, -1, -1, follow)), expect="ok")[1][1] == "ctime U"
    p.op(("stat", "suid"), expect="ok")
    p.op(("stat", "sgid_noexec"), expect="ok")
    p.finish()       # (the upper dirs: each of them copied up)


# ---------------------------------------------------------------------------
# 8. directory offsets


def _many(prefix, n, **kw):
    return [file(f"{prefix}{i:03d}", **kw) for i in range(n)]


def test_dir_offsets_seek_like_the_kernels(mk):
    p = mk([[d("m")] + _many("m/l", 40) + [d("low")] + _many("low/x", 30)],
           upper=[d("m")] + _many("m/u", 25) + [d("up")] + _many("up/y", 20))
    # merged (upper and lower), lower only, upper only, the root
    for path in ("m", "low", "up", ""):
        r = p.op(("dir_offsets_hold", path), expect="ok")[1]
        assert r[1] == ()
    # a merged dir: the k-th offset gives what follows the k-th entry
    # (the kernel's are indexes; both count "." and ".."). (In a dir of one
    # layer the kernel hands out that filesystem's offsets, hashes on ext4:
    # there ours stay indexes, see the README.)
    p.op(("dir_seek_counts", "m", tuple(range(0, 75)) + (100, 1000, 1 << 31)), expect="ok")
    p.finish()


def test_dir_reader_going_on_while_the_dir_changes(mk):
    p = mk([[d("m")] + _many("m/l", 60)], upper=[d("m")] + _many("m/u", 60))
    gone = tuple(f"l{i:03d}" for i in range(30, 60, 3)) + tuple(f"u{i:03d}" for i in range(1, 60, 7))
    new = tuple(f"new{i}" for i in range(15))
    # (the names read first are not among those removed: which names come
    # first differs, so only the result, every name that stayed exactly
    # once, is compared)
    assert p.op(("dir_read_while_changing", "m", 5, (), new)) == ("ok", None)
    p.op(("dir_read_while_changing", "m", 0, gone, ()), expect="ok")
    p.finish()


def test_t_readdir_3_of_fstests_676(mk):
    """fstests generic/676 (src/t_readdir_3): 4,000 files made in a dir,
    read entry by entry with telldir/seekdir and with lseek/getdents64,
    then read at the offsets handed out and at random numbers below the
    largest: never an early end of the dir."""
    p = mk([[d("big")] + _many("big/lower", 100)], upper=[d("big")] + _many("big/upper", 3000))
    for i in range(20):
        p.op(("create", f"big/made{i:04d}", 0o644, b""), expect="ok")
    r = p.op(("dir_offsets_hold", "big"), expect="ok")[1]
    assert r == (3120, ())
    p.finish(remount=False, kernel_over_ours=False, ours_over_kernel=False)


# ---------------------------------------------------------------------------
# 9. file handles


def test_no_file_handles_without_nfs_export(mk):
    """The kernel overlay without nfs_export encodes no file handles
    (EOPNOTSUPP); nfs_export=on: tests/test_diff_nfs_export.py."""
    p = mk([[file("f", b"x"), d("dd")]], upper=[file("u")])
    for path in ("f", "dd", "u", ""):
        p.op(("fh_save", path, 0), expect="ENOTSUP")
        # (but file identifiers, as fanotify reports them)
        p.op(("fh_fid", path), expect="ok")
    p.finish()
