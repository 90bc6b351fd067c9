"""Whole-tree snapshots (of a mount or of an upper dir) and their comparison.

``snapshot_mount(root)`` records, for every object below a mount: type,
mode, uid, gid, size (non-dirs), nlink, rdev, mtime (exact when "old", else
"NEW"), content hash, symlink target and xattrs (not security.*/system.*),
st_blocks of regular files where asked (metacopy), plus the hardlink partition (paths of non-dirs grouped by st_ino) and, kept
aside and not compared across mounts, st_ino per path and the set of st_dev.

``snapshot_upper(upper, prefix)`` does the same on an upper dir after
unmount, normalised: whiteouts are just ``{"type": "whiteout"}``;
``<prefix>opaque`` / ``<prefix>redirect`` keep their values; ``origin``,
``impure`` and ``uuid`` are recorded as far as two copies of the layers can
agree (the shape of the file handle, impure's value, uuid's presence);
other ``<prefix>*`` xattrs (nlink, our fuse.ino...) are ignored, escaped
``<prefix>overlay.*`` xattrs are kept; dirs' nlink is not compared.

``diff_snapshots(a, b, la, lb)`` lists differences as readable lines.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field

from . import tolerate
from .ops import norm_stat, visible_xattr


@dataclass
class Snapshot:
    entries: dict
    groups: list  # hardlink partition: sorted tuples of paths (size > 1)
    inos: dict = field(default_factory=dict)  # path -> st_ino (not compared)
    devs: set = field(default_factory=set)  # st_dev values seen (not compared)


def _hash_file(path: str) -> str:
    h = hashlib.sha1()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def _xattrs(path: str, keep=visible_xattr) -> dict:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {"<listxattr error>": e.errno}
    for n in sorted(names):
        if not keep(n):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            out[n] = f"<getxattr error {e.errno}>"
    return out


def _record(full: str, st: os.stat_result, keep_xattr=visible_xattr) -> dict:
    rec = norm_stat(st)
    t = rec["type"]
    if t == "f":
        try:
            rec["sha"] = _hash_file(full)
        except OSError as e:
            rec["sha"] = f"<read error {e.errno}>"
    elif t == "l":
        rec["target"] = os.readlink(full)
    x = _xattrs(full, keep_xattr)
    if x:
        rec["xattrs"] = x
    return rec


def _walk(root: str):
    """Yield (relpath, fullpath, lstat) for root and everything below."""
    st = os.lstat(root)
    yield "", root, st
    stack = [""]
    while stack:
        d = stack.pop()
        full_d = os.path.join(root, d) if d else root
        try:
            names = sorted(os.listdir(full_d))
        except OSError as e:
            yield (d + "/<listdir error>", None, e)
            continue
        for n in names:
            rel = f"{d}/{n}" if d else n
            full = os.path.join(root, rel)
            try:
                st = os.lstat(full)
            except OSError as e:
                yield rel, None, e
                continue
            yield rel, full, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def _groups(inos: dict, types: dict) -> list:
    by = {}
    for p, ino in inos.items():
        if types[p] not in ("d", "whiteout"):
            by.setdefault(ino, []).append(p)
    return sorted(tuple(sorted(v)) for v in by.values() if len(v) > 1)


def snapshot_mount(root: str, blocks: bool = False) -> Snapshot:
    """blocks: record st_blocks of regular files too (metacopy=on: a
    metacopy file reports its data's)."""
    entries, inos, types, devs = {}, {}, {}, set()
    for rel, full, st in _walk(root):
        if full is None:
            entries[rel] = {"error": getattr(st, "errno", str(st))}
            continue
        rec = _record(full, st)
        if blocks and rec["type"] == "f":
            rec["blocks"] = st.st_blocks
        entries[rel] = rec
        inos[rel] = st.st_ino
        types[rel] = rec["type"]
        devs.add(st.st_dev)
    return Snapshot(entries, _groups(inos, types), inos, devs)


def _fh_shape(v: bytes) -> str:
    """What can be compared of an origin file handle across two copies of
    the layers: its header (version, magic, length, flags, type) and whether
    it carries a filesystem uuid; the handle itself names other inodes."""
    if not v:
        return "null"
    if len(v) < 21:
        return f"short({v.hex()})"
    return f"v{v[0]} magic={v[1]:#x} len={v[2]} flags={v[3]} type={v[4]} uuid={'set' if any(v[5:21]) else 'null'}"


def _identity_xattrs(full: str, prefix: str) -> dict:
    """The kernel's identity xattrs on an upper object, as far as the two
    sides can agree: origin's shape, impure's value, whether uuid is set,
    nlink's and metacopy's values."""
    out = {}
    for name in ("origin", "impure", "uuid", "nlink", "metacopy", "upper"):
        try:
            v = os.getxattr(full, prefix + name, follow_symlinks=False)
        except OSError:
            continue
        if name in ("origin", "upper"):
            out[name] = _fh_shape(v)
        elif name == "uuid":
            out[name] = f"{len(v)} bytes"
        else:
            out[name] = v
    return out


def snapshot_index(work: str, prefix: str = "trusted.overlay.", nlink_xattr: bool = True) -> list:
    """The index dir of an index=on mount, as far as two copies of the
    layers can agree: each entry's type, nlink, size, content, its
    ``<prefix>nlink`` and its origin's shape (a dir's: its ``upper``'s,
    with nfs_export=on); not the names (file handles of other inodes), the
    temporary ``#...`` entries (the kernel's shared whiteout lives there),
    nor the nlink of whiteouts (the kernel's share one inode)."""
    d = os.path.join(work, "index")
    out = []
    if not os.path.isdir(d):
        return out
    for name in os.listdir(d):
        if name.startswith("#"):
            continue
        full = os.path.join(d, name)
        st = os.lstat(full)
        ident = _identity_xattrs(full, prefix)
        whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        out.append((stat.filemode(st.st_mode)[0], 1 if whiteout else st.st_nlink, st.st_size,
                    _hash_file(full) if stat.S_ISREG(st.st_mode) else "",
                    ident.get("nlink", b"").decode() if nlink_xattr else "",
                    ident.get("origin", ident.get("upper", ""))))
    return sorted(out)


def snapshot_upper(upper: str, prefix: str = "trusted.overlay.", nlink_xattr: bool = True) -> Snapshot:
    keep_names = {prefix + "opaque", prefix + "redirect"}

    def keep(n):
        if not visible_xattr(n):
            return False
        if n.startswith(prefix):
            return n in keep_names or n.startswith(prefix + "overlay.")
        return True

    entries, inos, types = {}, {}, {}
    for rel, full, st in _walk(upper):
        if full is None:
            entries[rel] = {"error": getattr(st, "errno", str(st))}
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            entries[rel] = {"type": "whiteout"}
            types[rel] = "whiteout"
            inos[rel] = st.st_ino
            continue
        rec = _record(full, st, keep)
        if rec["type"] == "d":
            rec.pop("nlink", None)
        ident = _identity_xattrs(full, prefix)
        if not nlink_xattr:
            ident.pop("nlink", None)
        if ident:
            rec["identity"] = ident
        entries[rel] = rec
        inos[rel] = st.st_ino
        types[rel] = rec["type"]
    return Snapshot(entries, _groups(inos, types), inos, set())


def _fmt(v) -> str:
    if isinstance(v, bytes) and len(v) > 40:
        return f"<{len(v)} bytes {v[:16]!r}...>"
    s = repr(v)
    return s if len(s) < 300 else s[:297] + "..."


def diff_entries(a: dict, b: dict, la: str, lb: str, upper_prefix=None) -> list:
    """Readable differences; tolerances (DIFF_TOLERATE) are applied here.
    ``upper_prefix`` is set when comparing upper dirs."""
    out = []
    for p in sorted(set(a) | set(b)):
        shown = "/" + p
        if p not in b:
            if upper_prefix and tolerate.on("setxattr-copyup") and a[p].get("type") != "whiteout":
                continue  # an extra copy-up in the kernel's upper
            out.append(f"{shown}: only in {la}: {_fmt(a[p])}")
            continue
        if p not in a:
            out.append(f"{shown}: only in {lb}: {_fmt(b[p])}")
            continue
        ra, rb = tolerate.norm_record(a[p]), tolerate.norm_record(b[p])
        for k in sorted(set(ra) | set(rb)):
            va, vb = ra.get(k, "<absent>"), rb.get(k, "<absent>")
            if va == vb:
                continue
            if k == "blocks" and isinstance(va, int) and isinstance(vb, int) and abs(va - vb) <= 8:
                continue  # a block of metadata (an extent or xattr block) written back meanwhile
            if k == "xattrs":
                va = va if isinstance(va, dict) else {}
                vb = vb if isinstance(vb, dict) else {}
                for n in sorted(set(va) | set(vb)):
                    xa, xb = va.get(n, "<absent>"), vb.get(n, "<absent>")
                    if upper_prefix and tolerate.ignore_upper_xattr(n, xa, xb, upper_prefix):
                        continue
                    if xa != xb:
                        out.append(f"{shown}: xattr {n}: {la}={_fmt(xa)} {lb}={_fmt(xb)}")
                continue
            out.append(f"{shown}: {k}: {la}={_fmt(va)} {lb}={_fmt(vb)}")
    return out


def diff_snapshots(a: Snapshot, b: Snapshot, la: str, lb: str, groups=True, upper_prefix=None) -> list:
    out = diff_entries(a.entries, b.entries, la, lb, upper_prefix)
    if groups and a.groups != b.groups:
        out.append(f"hardlink groups (paths sharing st_ino): {la}={a.groups} {lb}={b.groups}")
    return out
