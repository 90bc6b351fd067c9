"""Layer-stack specs: declarative entries, a seeded random generator, a builder.

A *stack* is ``Stack(lowers=[layer, ...], upper=layer_or_None)`` where
``lowers[0]`` is the top lower layer (kernel ``lowerdir=A:B`` order) and a
*layer* is a list of entries (dicts) created in order.  Entry kinds:

* ``dir(path, opaque=None)``: ``opaque`` is ``"y"`` / ``"x"`` / None and is
  stored as ``<prefix>opaque`` (prefix ``trusted.overlay.`` or, for
  userxattr stacks, ``user.overlay.``);
* ``file(path, data=b"", size=None, chunks=None)``: ``chunks`` is a list of
  ``(offset, bytes)``; ``size`` truncates at the end (holes);
* ``symlink(path, target)``, ``link(path, src)`` (hardlink within the layer),
  ``fifo(path)``, ``chr(path, major, minor)``;
* ``whiteout(path)`` (char device 0/0), ``xwhiteout(path)`` (empty regular
  file with ``<prefix>whiteout``; its parent must be opaque ``"x"``).

Every entry may carry ``mode``, ``uid``, ``gid``, ``mtime``/``atime`` (ns)
and ``xattrs`` ({name: bytes}).  The layer root itself is the entry with
path ``""`` (optional).  ``build_stack`` materialises a stack below a
directory; building the same spec twice gives identical trees (except inode
numbers and ctimes).
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field

# All generated timestamps lie before this; anything at/after it is "new"
# (set by the filesystem at op time) and compared only as "NEW".
OLD_BEFORE_NS = 1_600_000_000 * 10**9  # 2020-09-13
T_MIN_NS = 978_307_200 * 10**9  # 2001-01-01
T_MAX_NS = 1_577_836_800 * 10**9  # 2020-01-01
DEFAULT_TIME_NS = 1_262_304_000 * 10**9 + 123_456_789  # 2010-01-01

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."


@dataclass
class Stack:
    lowers: list
    upper: list | None = None
    prefix: str = TRUSTED_PREFIX
    has_upper: bool = True  # False -> read-only mount (no upper/work)
    datalayers: list = field(default_factory=list)  # data-only lower layers (lowerdir=A::D)

    def describe(self) -> str:
        n = [len(l) for l in self.lowers]
        u = len(self.upper) if self.upper else 0
        dl = f", {len(self.datalayers)} data-only" if self.datalayers else ""
        return f"{len(self.lowers)} lower layers (entries {n}){dl}, upper entries {u}, rw={self.has_upper}"


def _e(kind, path, **kw):
    d = {"t": kind, "p": path.strip("/")}
    d.update({k: v for k, v in kw.items() if v is not None})
    return d


def dir(path, opaque=None, **kw):  # noqa: A001 - mirrors the entry kind
    return _e("dir", path, opaque=opaque, **kw)


def file(path, data=b"", size=None, chunks=None, **kw):
    if isinstance(data, str):
        data = data.encode()
    return _e("file", path, data=data, size=size, chunks=chunks, **kw)


def symlink(path, target, **kw):
    return _e("symlink", path, target=target, **kw)


def link(path, src, **kw):
    return _e("link", path, src=src.strip("/"), **kw)


def fifo(path, **kw):
    return _e("fifo", path, **kw)


def chr(path, major=1, minor=3, **kw):  # noqa: A001
    return _e("chr", path, rdev=(major, minor), **kw)


def whiteout(path):
    return _e("whiteout", path)


def xwhiteout(path):
    return _e("xwhiteout", path)


def root(**kw):
    return _e("dir", "", **kw)


# ---------------------------------------------------------------------------
# builder


def _parent(p):
    return p.rsplit("/", 1)[0] if "/" in p else ""


def build_layer(base: str, entries, prefix: str = TRUSTED_PREFIX):
    """Create the entries of one layer below ``base`` (which must exist)."""
    os.makedirs(base, exist_ok=True)
    meta = []  # (path, entry) needing attrs
    made = {""}

    def full(p):
        return os.path.join(base, p) if p else base

    def ensure_parent(p):
        par = _parent(p)
        if par and par not in made and not os.path.lexists(full(par)):
            ensure_parent(par)
            os.mkdir(full(par), 0o755)
            made.add(par)
            meta.append((par, {"t": "dir", "p": par}))

    for e in entries:
        p, t = e["p"], e["t"]
        fp = full(p)
        if p:
            ensure_parent(p)
        if t == "dir":
            if p and not os.path.isdir(fp):
                os.mkdir(fp, 0o755)
            made.add(p)
            if e.get("opaque"):
                os.setxattr(fp, prefix + "opaque", e["opaque"].encode())
        elif t == "file":
            fd = os.open(fp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if e.get("data"):
                    os.write(fd, e["data"])
                for off, chunk in e.get("chunks") or ():
                    os.pwrite(fd, chunk, off)
                if e.get("size") is not None:
                    os.ftruncate(fd, e["size"])
            finally:
                os.close(fd)
        elif t == "symlink":
            os.symlink(e["target"], fp)
        elif t == "link":
            os.link(full(e["src"]), fp)
        elif t == "fifo":
            os.mkfifo(fp, 0o644)
        elif t == "chr":
            os.mknod(fp, stat.S_IFCHR | 0o644, os.makedev(*e["rdev"]))
        elif t == "whiteout":
            os.mknod(fp, stat.S_IFCHR, os.makedev(0, 0))
            continue  # no attrs
        elif t == "xwhiteout":
            os.close(os.open(fp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.setxattr(fp, prefix + "whiteout", b"")
            continue
        else:
            raise ValueError(f"unknown entry kind {t!r}")
        if t != "link":
            meta.append((p, e))
        made.add(p)

    # attributes: xattrs, owner, mode (after chown: chown clears suid), times
    for p, e in meta:
        fp = full(p)
        for name, value in (e.get("xattrs") or {}).items():
            os.setxattr(fp, name, value, follow_symlinks=False)
        os.chown(fp, e.get("uid", 0), e.get("gid", 0), follow_symlinks=False)
        if e["t"] != "symlink":
            mode = e.get("mode")
            if mode is None:
                mode = 0o755 if e["t"] == "dir" else 0o644
            os.chmod(fp, mode)
    # times last, deepest first so that dirs keep theirs
    for p, e in sorted(meta, key=lambda pe: -pe[0].count("/") - (1 if pe[0] else 0)):
        mt = e.get("mtime", DEFAULT_TIME_NS)
        at = e.get("atime", mt)
        os.utime(full(p), ns=(at, mt), follow_symlinks=False)
    rootmeta = next((e for p, e in meta if p == ""), None)
    if rootmeta is None:
        os.chmod(base, 0o755)
        os.utime(base, ns=(DEFAULT_TIME_NS, DEFAULT_TIME_NS))


@dataclass
class BuiltStack:
    lowers: list
    upper: str | None
    work: str | None


def build_stack(stack: Stack, base: str, lower_names=None) -> BuiltStack:
    """Materialise ``stack`` below ``base``: lowers in base/0..N-1 (0 = top),
    upper in base/u, work in base/w.  Paths are short on purpose (the kernel
    mount option string is limited to one page)."""
    os.makedirs(base, exist_ok=True)
    lowers = []
    for i, layer in enumerate(stack.lowers):
        d = os.path.join(base, str(i) if lower_names is None else lower_names[i])
        build_layer(d, layer, stack.prefix)
        lowers.append(d)
    for i, layer in enumerate(stack.datalayers):
        # a "::" before each: mountutil writes lowerdir=A:B::D
        d = os.path.join(base, f"d{i}")
        build_layer(d, layer, stack.prefix)
        lowers += ["::", d]
    upper = work = None
    if stack.has_upper:
        upper = os.path.join(base, "u")
        work = os.path.join(base, "w")
        build_layer(upper, stack.upper or [], stack.prefix)
        os.makedirs(work, exist_ok=True)
    return BuiltStack(lowers, upper, work)


# ---------------------------------------------------------------------------
# random generator

NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o640, 0o444, 0o666, 0o700, 0o4755, 0o2755, 0o1644]
DIR_MODES = [0o755, 0o755, 0o700, 0o775, 0o555, 0o1777, 0o2775, 0o711]
IDS = [0, 0, 0, 1000, 1001, 65534]


def rand_time(rng: random.Random) -> int:
    return rng.randrange(T_MIN_NS // 10**9, T_MAX_NS // 10**9) * 10**9 + rng.randrange(10**9)


def rand_data(rng: random.Random) -> dict:
    """Keyword args for ``file()``: contents (empty, random, text, sparse)."""
    r = rng.random()
    if r < 0.15:
        return {}
    if r < 0.6:
        return {"data": rng.randbytes(rng.randrange(1, 2500))}
    if r < 0.8:
        return {"data": ("line %d\n" % rng.randrange(1000)).encode() * rng.randrange(1, 20)}
    size = rng.randrange(4096, 70000)
    chunks = [(rng.randrange(size), rng.randbytes(rng.randrange(1, 300))) for _ in range(rng.randrange(0, 3))]
    return {"chunks": chunks, "size": size}


def rand_xattrs(rng: random.Random, kind: str) -> dict:
    x = {}
    if kind in ("file", "dir") and rng.random() < 0.3:
        for _ in range(rng.randrange(1, 3)):
            x[f"user.k{rng.randrange(3)}"] = rng.choice([b"", b"v", rng.randbytes(rng.randrange(1, 40))])
    if rng.random() < 0.15:
        x["trusted.foo"] = rng.choice([b"1", b"trusted value", rng.randbytes(8)])
    return x


def rand_meta(rng: random.Random, kind: str) -> dict:
    m = {"uid": rng.choice(IDS), "gid": rng.choice(IDS), "mtime": rand_time(rng), "atime": rand_time(rng)}
    if kind == "dir":
        m["mode"] = rng.choice(DIR_MODES)
    elif kind == "file":
        m["mode"] = rng.choice(FILE_MODES)
    elif kind in ("fifo", "chr"):
        m["mode"] = rng.choice([0o644, 0o600, 0o666])
    x = rand_xattrs(rng, kind)
    if x:
        m["xattrs"] = x
    return m


def rand_symlink_target(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(NAMES)
    if r < 0.55 and depth > 0:
        ups = rng.randrange(1, depth + 1)
        return "../" * ups + rng.choice(NAMES)
    if r < 0.7:
        return rng.choice(NAMES) + "/" + rng.choice(NAMES)
    if r < 0.8:
        return "."
    if r < 0.9:
        return "missing" + str(rng.randrange(3))
    return "/nonexistent-diff-dir/x"


class _TypePrefs:
    """Per-path preferred entry kind, so that layers mostly agree on types."""

    def __init__(self, rng):
        self.rng = rng
        self.prefs = {}

    def get(self, path, depth):
        if path not in self.prefs:
            r = self.rng.random()
            if depth < 3 and r < 0.45:
                k = "dir"
            elif r < 0.82:
                k = "file"
            elif r < 0.93:
                k = "symlink"
            elif r < 0.97:
                k = "fifo"
            else:
                k = "chr"
            self.prefs[path] = k
        return self.prefs[path]


def gen_layer(rng: random.Random, prefs: _TypePrefs, bottom: bool, budget: int = 45, root_meta=True,
              no_hardlinks=False) -> list:
    entries = []
    if root_meta:
        entries.append(root(**rand_meta(rng, "dir")))
    files = []
    count = [0]

    def gen_dir(dpath: str, depth: int):
        names = NAMES[: rng.randrange(3, 7)]
        p_present = [0.6, 0.45, 0.35, 0.3][depth]
        for name in names:
            if count[0] >= budget:
                return
            if rng.random() >= p_present:
                continue
            path = f"{dpath}/{name}" if dpath else name
            count[0] += 1
            if not bottom and rng.random() < 0.12:
                entries.append(whiteout(path))
                continue
            kind = prefs.get(path, depth)
            if rng.random() < 0.12:
                kind = rng.choice(["dir", "file", "file", "symlink", "fifo"] if depth < 3 else ["file", "symlink"])
            meta = rand_meta(rng, kind)
            if kind == "dir":
                opaque = "y" if (not bottom and rng.random() < 0.12) else None
                entries.append(dir(path, opaque=opaque, **meta))
                gen_dir(path, depth + 1)
            elif kind == "file":
                entries.append(file(path, **rand_data(rng), **meta))
                files.append(path)
            elif kind == "symlink":
                meta.pop("mode", None)
                entries.append(symlink(path, rand_symlink_target(rng, depth), **meta))
            elif kind == "fifo":
                entries.append(fifo(path, **meta))
            else:
                entries.append(chr(path, 1, rng.choice([3, 5, 7]), **meta))

    gen_dir("", 0)
    # hardlinks within this layer
    used = {e["p"] for e in entries}
    nlinks = rng.randrange(0, 3) if files else 0
    if no_hardlinks:
        nlinks = 0
    for _ in range(nlinks):
        src = rng.choice(files)
        d = _parent(src) if rng.random() < 0.6 else ""
        cand = [f"{d}/{n}" if d else n for n in NAMES + ["l1", "l2"]]
        cand = [c for c in cand if c not in used and not any(u.startswith(c + "/") for u in used)]
        if cand:
            dst = rng.choice(cand)
            entries.append(link(dst, src))
            used.add(dst)
    return entries


def dir_layers(stack: Stack) -> dict:
    """Simulate the kernel's lookup on the initial stack: for every dir path
    of the merged view, the list of layers (0 = upper if any, then the
    lowers top-down) whose dir is part of it."""
    layers = ([stack.upper or []] if stack.has_upper else []) + list(stack.lowers)
    idx = [{e["p"]: e for e in layer} for layer in layers]
    memo = {"": list(range(len(layers)))}

    def contrib(path):
        if path in memo:
            return memo[path]
        res = []
        parent = contrib(_parent(path))
        for li in parent:
            e = idx[li].get(path)
            if e is None:
                continue
            if e["t"] == "whiteout" or e["t"] == "xwhiteout":
                break
            if e["t"] == "dir":
                res.append(li)
                if e.get("opaque"):
                    break
                continue
            break  # a non-dir ends the stack (hides the rest, or is the object)
        memo[path] = res
        return res

    for layer in layers:
        for e in layer:
            if e["t"] == "dir":
                contrib(e["p"])
    return {p: ls for p, ls in memo.items() if ls}


def drop_ghost_whiteouts(stack: Stack) -> Stack:
    """Remove whiteouts that sit in a directory which is not merged (only one
    layer makes up that dir).  The kernel's readdir of such a "real" dir shows
    the whiteout as a name that lstat cannot find (a quirk covered by a fixed
    test); whiteouts there hide nothing, so dropping them changes nothing
    else."""
    n_up = 1 if stack.has_upper else 0
    dl = dir_layers(stack)
    layers = ([stack.upper or []] if stack.has_upper else []) + list(stack.lowers)
    new = []
    for li, layer in enumerate(layers):
        keep = []
        for e in layer:
            if e["t"] == "whiteout" and dl.get(_parent(e["p"])) == [li]:
                continue
            keep.append(e)
        new.append(keep)
    return Stack(lowers=new[n_up:], upper=new[0] if n_up else stack.upper, prefix=stack.prefix,
                 has_upper=stack.has_upper, datalayers=stack.datalayers)


def gen_stack(rng: random.Random, nlowers: int | None = None, upper: bool | None = None,
              no_hardlinks: bool = False) -> Stack:
    """Random stack: 1..4 lower layers (or ``nlowers``), optionally a
    pre-populated upper layer (with whiteouts/opaque dirs).  Whiteouts in
    non-merged dirs are dropped (see ``drop_ghost_whiteouts``)."""
    if nlowers is None:
        nlowers = rng.randrange(1, 5)
    prefs = _TypePrefs(rng)
    layers_bottom_up = [gen_layer(rng, prefs, bottom=(i == 0), no_hardlinks=no_hardlinks) for i in range(nlowers)]
    lowers = list(reversed(layers_bottom_up))
    if upper is None:
        upper = rng.random() < 0.3
    up = gen_layer(rng, prefs, bottom=False, budget=15, no_hardlinks=no_hardlinks) if upper else [root(mode=0o755, mtime=DEFAULT_TIME_NS)]
    return drop_ghost_whiteouts(Stack(lowers=lowers, upper=up))


def all_names(stack: Stack) -> set:
    """Every basename used anywhere in the stack (including whited-out ones)."""
    names = set()
    for layer in list(stack.lowers) + [stack.upper or []]:
        for e in layer:
            if e["p"]:
                names.add(e["p"].rsplit("/", 1)[-1])
    return names


def to_data_only(stack: Stack, rng: random.Random, share: float = 0.6) -> Stack:
    """A composefs-style stack from ``stack``: a share of the plain files of
    its lower layers become metacopy files (no data, their size, the
    kernel's metacopy xattr and an absolute redirect to /objs/<n>) whose
    data are in a new data-only layer below them."""
    objects = [dir("objs")]
    lowers = []
    k = 0
    for layer in stack.lowers:
        out = []
        for e in layer:
            if (e["t"] == "file" and not e.get("chunks") and e.get("size") is None
                    and e.get("data") and rng.random() < share):
                name = f"objs/{k:03d}"
                k += 1
                objects.append(file(name, e["data"]))
                x = dict(e.get("xattrs") or {})
                x[stack.prefix + "metacopy"] = b""
                x[stack.prefix + "redirect"] = ("/" + name).encode()
                e = dict(e, data=b"", size=len(e["data"]), xattrs=x)
            out.append(e)
        lowers.append(out)
    return Stack(lowers=lowers, upper=stack.upper, prefix=stack.prefix, has_upper=stack.has_upper,
                 datalayers=[objects])
