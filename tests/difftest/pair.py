"""DiffPair: the same layer stack mounted twice (kernel overlay vs ours), compared.

Layout below ``tmp``::

    tmp/k/0 .. tmp/k/N-1   kernel side lower layers (0 = top)
    tmp/k/u, tmp/k/w       kernel side upper and work dir
    tmp/k/s/s/s/s/mp       kernel side mount point
    tmp/o/...              the same for our side

The mount points sit four levels deep in a per-side sandbox so that a
relative symlink with ``..`` that escapes the mount (possible after renames)
lands in identical, harmless places on both sides.

``op(op)`` applies one op to both mounts (kernel first) and raises
``Mismatch`` with a full report (label/seed, op index, op, both results, op
log) when the results differ.  Ops that change an object in place also
compare whether st_ino stayed the same on each side (copy-up keeps st_ino).
``check_trees()`` compares whole-tree snapshots.  ``finish()`` compares the
final trees, unmounts both, compares the two upper dirs, remounts ours over
its upper (same tree, same st_ino per path), mounts the kernel overlay
over our upper + lowers (same tree as the kernel side had, the same st_ino
as ours remounted) and ours over the kernel's upper (same tree and st_ino
as the kernel showed).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading

import mountutil

from . import layers as L
from . import ops as O
from . import tolerate
from .snapshot import diff_snapshots, snapshot_index, snapshot_mount, snapshot_upper

OP_TIMEOUT = float(os.environ.get("DIFF_OP_TIMEOUT", "30"))


class Mismatch(AssertionError):
    pass


def _nlink_off_by_one(rk, ro) -> bool:
    """Two op results equal but for the nlink of a non-dir, one apart."""
    if rk[0] != "ok" or ro[0] != "ok" or len(rk) != len(ro):
        return False
    a, b = rk[1], ro[1]
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.get("type") == "d":
        return False
    if abs(a.get("nlink", 0) - b.get("nlink", 0)) != 1:
        return False
    return dict(a, nlink=0) == dict(b, nlink=0) and rk[2:] == ro[2:]


def _nlink_line_off_by_one(line: str, before) -> bool:
    """A snapshot difference line saying a non-dir's nlink is one apart."""
    m = re.match(r"^/(.*): nlink: \S+=(\d+) \S+=(\d+)$", line)
    if not m or abs(int(m.group(2)) - int(m.group(3))) != 1:
        return False
    return before.entries.get(m.group(1), {}).get("type") != "d"


def _fuse_abort(mp_dev: int):
    """Abort a hung FUSE connection (unblocks syscalls with ENOTCONN)."""
    conn = "/sys/fs/fuse/connections"
    if os.path.isdir(conn) and not os.listdir(conn):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", conn], capture_output=True)
    cid = (os.major(mp_dev) << 20) | os.minor(mp_dev)
    try:
        with open(f"{conn}/{cid}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


def _ino_checks(op):
    """[(path_before, path_after, follow)] whose st_ino must be kept by op."""
    n = op[0]
    if n == "open":
        return [(op[1], op[1], True)]
    if n in ("open_trunc", "write", "append", "rw", "ro_then_write", "truncate", "chmod"):
        return [(op[1], op[1], True)]
    if n in ("chown", "utime"):
        return [(op[1], op[1], op[-1])]
    if n in ("setxattr", "removexattr"):
        return [(op[1], op[1], op[-1])]
    if n == "link":
        return [(op[1], op[1], False), (op[1], op[2], False)]
    if n == "rename":
        if op[3] == O.RENAME_EXCHANGE:
            return [(op[1], op[2], False), (op[2], op[1], False)]
        return [(op[1], op[2], False)]
    return []


def _ino(root, path, follow):
    try:
        p = os.path.join(root, path) if path else root
        return (os.stat if follow else os.lstat)(p).st_ino
    except OSError:
        return None


class DiffPair:
    def __init__(self, tmp, stack: L.Stack, tracker: mountutil.MountTracker, label: str = "",
                 kernel_opts=("redirect_dir=on",), ours_opts=(), remount_kernel_opts=None):
        self.tmp = str(tmp)
        self.stack = stack
        self.tracker = tracker
        self.label = label
        self.kernel_opts = tuple(kernel_opts)
        self.ours_opts = tuple(ours_opts)
        self.remount_kernel_opts = tuple(remount_kernel_opts if remount_kernel_opts is not None else kernel_opts)
        self.log = []  # (index, op, kernel result, ours result)
        self.nops = 0
        self.mp_k = os.path.join(self.tmp, "k", "s", "s", "s", "s", "mp")
        self.mp_o = os.path.join(self.tmp, "o", "s", "s", "s", "s", "mp")
        self.built_k = self.built_o = None
        self.ours_dev = None
        self.mounted = False
        self.upper_k = self.upper_o = None  # upper snapshots, set by check_uppers()
        # st_ino must survive a remount of ours (the kernel in userxattr mode
        # does not keep them, so the DIFF_IMPL=kernel self-test turns it off)
        self.check_ino_persistence = not (mountutil.ours_is_kernel() and stack.prefix == L.USER_PREFIX)
        # ...except, in userxattr mode, for objects that cannot carry user.*
        # xattrs (symlinks, special files): no origin can be stored on them,
        # so, as the kernel, ours keeps their st_ino until the next mount only
        self.no_origin_types = ("l", "p", "c", "b", "s") if stack.prefix == L.USER_PREFIX else ()
        # the kernel's hardlink partition (paths sharing st_ino) is only
        # meaningful with trusted xattrs; in userxattr mode a new link name
        # gets its own st_ino there
        self.compare_groups = stack.prefix == L.TRUSTED_PREFIX
        # with metacopy=on a metacopy file reports the st_blocks of its data
        self.compare_blocks = "metacopy=on" in self.kernel_opts
        # nfs_export=on: the kernel's tree changes across a remount (a file
        # copied up with one lower link shows the overlay nlink the kernel
        # counted in memory, then its upper inode's, the index's link
        # included; a copy made through a file handle only is whited out
        # in the index at the next mount): the remounts are compared with
        # the kernel's own remount of its upper
        self.remount_reference_kernel = "nfs_export=on" in self.kernel_opts
        # ...and once the file handle ops have dropped the inode caches,
        # which of the two kernels still keeps such an inode (and so the
        # count in memory) is a matter of the moment: one off either way
        self.nlink_fuzz = "nfs_export=on" in self.kernel_opts
        # for the same reason the <prefix>nlink values written, and whether
        # an unlink left an orphan or a whiteout in the index (the next
        # mount whites orphans out), follow the kernel's inode cache: the
        # index dirs are compared once each side's mount has cleaned them

    # -- setup ----------------------------------------------------------------
    def build(self):
        self.built_k = L.build_stack(self.stack, os.path.join(self.tmp, "k"))
        self.built_o = L.build_stack(self.stack, os.path.join(self.tmp, "o"))
        os.makedirs(self.mp_k, exist_ok=True)
        os.makedirs(self.mp_o, exist_ok=True)
        return self

    def _mount_kernel(self, built, mp, opts):
        self.tracker.kernel(built.lowers, built.upper, built.work, mp, opts)

    def _mount_ours(self, built, mp, opts):
        self.tracker.ours(built.lowers, built.upper, built.work, mp, opts)
        self.ours_dev = os.stat(mp).st_dev

    def mount(self):
        if self.built_k is None:
            self.build()
        self._mount_kernel(self.built_k, self.mp_k, self.kernel_opts)
        self._mount_ours(self.built_o, self.mp_o, self.ours_opts)
        self.mounted = True
        return self

    def umount(self):
        ok_k = self.tracker.umount(self.mp_k)
        ok_o = self.tracker.umount(self.mp_o)
        self.mounted = False
        if not (ok_k and ok_o):
            self.fail("unmount failed", [f"kernel unmounted={ok_k} ours unmounted={ok_o}"])

    # -- reporting ------------------------------------------------------------
    def report(self, title: str, lines=(), limit_log=400) -> str:
        out = [f"[{self.label}] {title}", f"stack: {self.stack.describe()}",
               f"kernel opts={self.kernel_opts} ours opts={self.ours_opts}"
               + (f" DIFF_TOLERATE={','.join(sorted(tolerate.TOLERATE))}" if tolerate.TOLERATE else "")
               + (" (DIFF_IMPL=kernel: 'ours' is a kernel overlay)" if mountutil.ours_is_kernel() else "")]
        lines = list(lines)
        if lines:
            out.append("differences:")
            out.extend("  " + l for l in lines[:80])
            if len(lines) > 80:
                out.append(f"  ... {len(lines) - 80} more")
        if self.log:
            out.append(f"op log ({len(self.log)} ops):")
            for i, op, rk, ro in self.log[-limit_log:]:
                line = f"  #{i} {O.fmt_op(op)} -> {self._fmt_res(rk)}"
                if rk != ro:
                    line += f"   OURS: {self._fmt_res(ro)}"
                out.append(line)
        out.append(f"tmp dir: {self.tmp}")
        return "\n".join(out)

    @staticmethod
    def _fmt_res(r):
        if r is None:
            return "-"
        return r[0] + ("" if len(r) < 2 or r[1] is None else " " + O.fmt_val(r[1])) + (
            "" if len(r) < 3 else " " + str(r[2]))

    def fail(self, title, lines=()):
        raise Mismatch(self.report(title, lines))

    # -- ops ------------------------------------------------------------------
    def _exec_ours(self, op):
        if self.ours_dev is None or mountutil.ours_is_kernel():
            return O.execute(self.mp_o, op)
        timer = threading.Timer(OP_TIMEOUT, _fuse_abort, args=(self.ours_dev,))
        timer.daemon = True
        timer.start()
        try:
            return O.execute(self.mp_o, op)
        finally:
            fired = timer.finished.is_set()  # set only by firing before cancel()
            timer.cancel()
            if fired:
                self.log.append((self.nops - 1, op, None, ("err", f"HANG>{OP_TIMEOUT}s, FUSE connection aborted")))

    def run(self, op):
        """Apply op on both sides; return (kernel result, ours result)."""
        # in userxattr mode the kernel's st_ino are not stable (e.g. a new
        # hardlink name gets another st_ino than its source), so no tags there
        checks = _ino_checks(op) if self.stack.prefix == L.TRUSTED_PREFIX else []
        before_k = [_ino(self.mp_k, a, f) for a, _, f in checks]
        before_o = [_ino(self.mp_o, a, f) for a, _, f in checks]
        rk = O.execute(self.mp_k, op)
        ro = self._exec_ours(op)
        if checks:
            after_k = [_ino(self.mp_k, b, f) for _, b, f in checks]
            after_o = [_ino(self.mp_o, b, f) for _, b, f in checks]
            sk = tuple("ino-kept" if x is not None and x == y else ("ino-changed" if x and y else "-")
                       for x, y in zip(before_k, after_k))
            so = tuple("ino-kept" if x is not None and x == y else ("ino-changed" if x and y else "-")
                       for x, y in zip(before_o, after_o))
            if rk[0] == "ok":
                rk = rk + (sk,)
            if ro[0] == "ok":
                ro = ro + (so,)
        return rk, ro

    def op(self, op, expect=None):
        """Apply op on both sides and compare. ``expect`` (optional) is the
        expected kernel result kind, "ok" or an errno name (checks the test
        itself)."""
        i = self.nops
        self.nops += 1
        rk, ro = self.run(op)
        self.log.append((i, op, rk, ro))
        if tolerate.norm_result(op, rk) != tolerate.norm_result(op, ro) and not (
                self.nlink_fuzz and _nlink_off_by_one(rk, ro)):
            self.fail(f"op #{i} {O.fmt_op(op)} differs",
                      [f"kernel: {self._fmt_res(rk)}", f"ours:   {self._fmt_res(ro)}"])
        if expect is not None:
            got = rk[0] if rk[0] == "ok" else rk[1]
            if got != expect:
                self.fail(f"op #{i} {O.fmt_op(op)}: kernel gave {got}, the test expected {expect}")
        return rk

    # -- trees ----------------------------------------------------------------
    def snapshots(self):
        return (snapshot_mount(self.mp_k, self.compare_blocks),
                snapshot_mount(self.mp_o, self.compare_blocks))

    def check_trees(self, where="tree"):
        sk, so = self.snapshots()
        d = diff_snapshots(sk, so, "kernel", "ours", groups=self.compare_groups)
        if self.nlink_fuzz:
            d = [line for line in d if not _nlink_line_off_by_one(line, sk)]
        if len(sk.devs) == 1 and len(so.devs) != 1:
            d.append(f"st_dev not uniform in ours: {len(so.devs)} distinct values (kernel: 1)")
        if d:
            self.fail(f"{where}: whole-tree snapshots differ after {self.nops} ops", d)
        return sk, so

    def check_uppers(self, index=None):
        prefix = self.stack.prefix
        fuzz = self.nlink_fuzz
        uk = self.upper_k = snapshot_upper(self.built_k.upper, prefix, nlink_xattr=not fuzz)
        uo = self.upper_o = snapshot_upper(self.built_o.upper, prefix, nlink_xattr=not fuzz)
        d = diff_snapshots(uk, uo, "kernel-upper", "ours-upper", upper_prefix=prefix)
        if index is None:
            index = ("index=on" in self.kernel_opts or "nfs_export=on" in self.kernel_opts) and not fuzz
        if index:
            d += self._index_diff()
        if d:
            self.fail(f"upper dirs differ after unmount ({self.nops} ops)", d)
        return uk, uo

    def _index_diff(self):
        prefix = self.stack.prefix
        ik = snapshot_index(self.built_k.work, prefix, nlink_xattr=not self.nlink_fuzz)
        io = snapshot_index(self.built_o.work, prefix, nlink_xattr=not self.nlink_fuzz)
        if ik == io:
            return []
        d = ["index dirs (type, nlink, size, content, nlink xattr, origin):"]
        d += [f"  kernel {e}" for e in ik if e not in io]
        d += [f"  ours   {e}" for e in io if e not in ik]
        return d

    def _remount_diff(self, before, after, la, lb):
        """diff_snapshots of a tree and the same tree mounted again."""
        return diff_snapshots(before, after, la, lb, groups=self.compare_groups)

    def finish(self, remount=True, kernel_over_ours=True, ours_over_kernel=True):
        """Final compare, unmount, compare uppers, remount checks."""
        if os.environ.get("DIFF_VERBOSE", "") not in ("", "0"):
            print("\n" + self.report("op log (DIFF_VERBOSE)"))
        sk, so = self.check_trees("final")
        self.umount()
        if self.stack.has_upper:
            self.check_uppers()
        if self.remount_reference_kernel and self.stack.has_upper:
            self._mount_kernel(self.built_k, self.mp_k, self.remount_kernel_opts)
            try:
                sk = snapshot_mount(self.mp_k, self.compare_blocks)
            finally:
                self.tracker.umount(self.mp_k)
        s2 = None
        if remount:
            self._mount_ours(self.built_o, self.mp_o, self.ours_opts)
            try:
                s2 = snapshot_mount(self.mp_o, self.compare_blocks)
                d = self._remount_diff(sk, s2, "kernel-before-unmount", "ours-remounted")
                if d:
                    self.fail("remounted ours shows a different tree", d)
                changed = [f"/{p}: st_ino {so.inos[p]} -> {s2.inos.get(p)}"
                           for p in sorted(so.inos) if s2.inos.get(p) != so.inos[p]
                           and so.entries[p].get("type") not in self.no_origin_types
                           and p in sk.inos]
                if not self.check_ino_persistence:
                    changed = []
                if changed:
                    self.fail("st_ino not stable across remount of ours", changed)
            finally:
                self.tracker.umount(self.mp_o)
            if self.remount_reference_kernel and self.stack.has_upper:
                d = self._index_diff()
                if d:
                    self.fail("index dirs differ once each side's mount cleaned them", d)
        if kernel_over_ours and self.stack.has_upper:
            self._mount_kernel(self.built_o, self.mp_o, self.remount_kernel_opts)
            try:
                s3 = snapshot_mount(self.mp_o, self.compare_blocks)
                # in userxattr mode the kernel's st_ino are not persistent (no
                # origin), so its hardlink partition after a remount is noise
                d = self._remount_diff(sk, s3, "kernel-side", "kernel-over-our-upper")
                if d:
                    self.fail("kernel overlay over OUR upper shows a different tree", d)
                if s2 is not None:
                    # the same dirs mounted twice: the same inode numbers
                    d = [f"/{p}: ours {s2.inos.get(p)} kernel {s3.inos.get(p)}"
                         for p in sorted(set(s2.inos) | set(s3.inos)) if s2.inos.get(p) != s3.inos.get(p)]
                    if d:
                        self.fail("st_ino: ours remounted and the kernel over our upper differ", d)
            finally:
                self.tracker.umount(self.mp_o)
        if ours_over_kernel and self.stack.has_upper:
            # the other way round: ours over the upper the kernel wrote
            self._mount_ours(self.built_k, self.mp_k, self.ours_opts)
            try:
                s4 = snapshot_mount(self.mp_k, self.compare_blocks)
                d = self._remount_diff(sk, s4, "kernel-side", "ours-over-the-kernel's-upper")
                d += [f"/{p}: kernel {sk.inos.get(p)} ours {s4.inos.get(p)}"
                      for p in sorted(set(sk.inos) | set(s4.inos)) if sk.inos.get(p) != s4.inos.get(p)
                      and sk.entries.get(p, {}).get("type") not in self.no_origin_types
                      and self.check_ino_persistence]
                if d:
                    self.fail("ours over the KERNEL's upper shows another tree or st_ino", d)
            finally:
                self.tracker.umount(self.mp_k)
        return sk
