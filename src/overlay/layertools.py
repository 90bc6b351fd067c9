"""Layer tools: ``overlay diff`` and ``overlay commit`` (src/overlay/layertools.py).

Both work on an upper directory in the overlayfs on-disk format (whiteouts are
0/0 character devices, ``trusted.overlay.opaque=y`` marks opaque directories,
``trusted.overlay.redirect`` renamed ones; ``user.overlay.*`` with
``--userxattr``), optionally together with the lower layers it was used with.
Use them on an upper dir that is not mounted, or at least not being written.

``overlay diff UPPER [--lower A:B] [--json]``
    Lists what the upper layer adds (``A``), changes (``C``) and deletes
    (``D``), one ``KIND /path`` line per change, like ``podman diff``.

    With ``--lower`` the answer is exact: it is the comparison of the merged
    view of the lower layers alone (before) with the merged view of upper +
    lowers (after), looking only where the upper layer has something.  A path
    that is new is ``A`` (and, if it is a directory, everything in it is ``A``
    too, e.g. every file of a renamed directory); a path that exists in both
    but is a different object is ``C``; a path that is gone is ``D`` (only the
    top of a deleted tree is listed).  Directories are ``C`` when their mode,
    owner, mtime or xattrs changed, or when an entry was added to or deleted from them
    directly (as podman does).  So an *opaque* directory (deleted and made
    again) is ``C`` if a directory was there before, with ``D`` for each old
    entry that is gone and ``A``/``C`` for each entry in it; a *renamed*
    directory is ``D`` at its old path (the whiteout the rename left there)
    and ``A`` at its new path with ``A`` for all its content.

    Without ``--lower`` nothing is known about the layers below, so the upper
    dir is read as is: whiteouts are ``D``; opaque or renamed directories are
    ``A``, and so is everything below them (whiteouts there are not listed);
    other directories are ``C`` (most
    are parents copied up for a change further down); every other entry is
    ``A`` (a new file and a changed one cannot be told apart without the
    lowers).

``overlay commit UPPER -o LAYER.tar[.gz] [--lower A:B] [--progress]``
    Writes the upper layer as an OCI image layer (a PAX tar): entries as they
    are (mode, numeric owner, mtime in ns, xattrs as ``SCHILY.xattr.*``
    records, hard links as tar links, symlinks, fifos, devices; sockets are
    skipped), a whiteout ``NAME`` as an empty file ``.wh.NAME``, an opaque dir
    as the dir followed by ``DIR/.wh..wh..opq``.  The overlay's own xattrs
    (``trusted.overlay.*``, and ``user.overlay.*`` with ``--userxattr``) are
    never written.  A renamed directory (redirect xattr) only has its
    changes in the upper layer, its content lives in the lower layers under
    the old name, so it needs ``--lower``: it is then written in full at its
    new path (from the merged view) with an opaque marker; its old path
    already has a whiteout.  Without ``--lower`` such an upper dir is refused
    with an error naming the directory.  ``-o -`` writes to stdout.  A
    progress line (``entries done/total``) goes to stderr when it is a
    terminal or with ``--progress``.

The Python functions :func:`diff` and :func:`commit` do the same work; the
merged views are computed here from the layer directories (the kernel's lookup
rules: whiteouts, opaque dirs, absolute and relative redirects, xattr
whiteouts in lower layers), no mount needed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

__all__ = [
    "Change",
    "LayerError",
    "LayerStack",
    "commit",
    "diff",
    "add_commands",
    "run_command",
]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class LayerError(Exception):
    """A problem with the layers or the output; ``str(err)`` is one line."""


@dataclass(frozen=True)
class Change:
    """One line of ``overlay diff``: ``kind`` is ``A``, ``C`` or ``D``."""

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


# --------------------------------------------------------------------------
# reading layers


def _prefix(userxattr: bool) -> str:
    return "user.overlay." if userxattr else "trusted.overlay."


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise


def _listdir(path: str) -> list[str]:
    """Names in ``path``, sorted by their bytes (a stable, locale-free order)."""
    return sorted(os.listdir(path), key=os.fsencode)


def _is_chr_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _path_key(path: str) -> list[bytes]:
    return os.fsencode(path).split(b"/")


@dataclass
class Node:
    """An entry of a merged view.

    ``layers``: (layer index, real path) pairs, top first; one pair for a
    non-directory, every merged layer directory for a directory.  ``st`` is the
    lstat of the top one (which gives the merged entry its attributes).
    """

    path: str
    is_dir: bool
    layers: tuple[tuple[int, str], ...]
    st: os.stat_result

    @property
    def top(self) -> str:
        return self.layers[0][1]

    @property
    def reals(self) -> tuple[str, ...]:
        return tuple(real for _, real in self.layers)


_MISSING, _STOP, _NONDIR, _DIR = range(4)


class LayerStack:
    """The merged view of layer directories (top first), read without a mount.

    ``first_lower`` is the index of the first lower layer (1 when
    ``layers[0]`` is an upper dir, else 0): xattr whiteouts only count in lower
    layers, as in the kernel.
    """

    def __init__(self, layers: Sequence[str], *, first_lower: int = 0, userxattr: bool = False):
        self.layers = [os.path.realpath(os.fspath(p)) for p in layers]
        for path in self.layers:
            if not os.path.isdir(path):
                raise LayerError(f"layer '{path}' is not a directory")
        self.first_lower = first_lower
        prefix = _prefix(userxattr)
        self.x_opaque = prefix + "opaque"
        self.x_redirect = prefix + "redirect"
        self.x_whiteout = prefix + "whiteout"

    # -- single entries --------------------------------------------------

    def is_whiteout(self, idx: int, path: str, st: os.stat_result) -> bool:
        if _is_chr_whiteout(st):
            return True
        if idx >= self.first_lower and stat.S_ISREG(st.st_mode) and st.st_size == 0:
            return _getxattr(path, self.x_whiteout) is not None
        return False

    def is_opaque(self, path: str) -> bool:
        return _getxattr(path, self.x_opaque) == b"y"

    def redirect(self, path: str) -> str | None:
        """The redirect of a layer directory, checked like the kernel does."""
        raw = _getxattr(path, self.x_redirect)
        if raw is None:
            return None
        rd = os.fsdecode(raw)
        comps = rd[1:].split("/") if rd.startswith("/") else [rd]
        if not rd or any(c in ("", ".", "..") for c in comps) or (
            not rd.startswith("/") and "/" in rd
        ):
            raise LayerError(f"invalid redirect {rd!r} on '{path}'")
        return rd

    def _walk(self, idx: int, base: str, comps: list[str]):
        """Resolve ``comps`` below ``base`` in layer ``idx``.

        Returns (kind, real path, stat, stop_after): stop_after is set when an
        opaque directory was passed on the way (the layers below then do not
        count for this path).
        """
        cur = base
        stop_after = False
        st = None
        for j, comp in enumerate(comps):
            last = j == len(comps) - 1
            path = os.path.join(cur, comp)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return _MISSING, None, None, False
            if self.is_whiteout(idx, path, st):
                return _STOP, None, None, False
            if not stat.S_ISDIR(st.st_mode):
                if last:
                    return _NONDIR, path, st, False
                return _STOP, None, None, False
            if not last and self.is_opaque(path):
                stop_after = True
            cur = path
        return _DIR, cur, st, stop_after

    # -- the merged tree -------------------------------------------------

    def root(self) -> Node:
        layers = tuple(enumerate(self.layers))
        return Node("/", True, layers, os.lstat(self.layers[0]))

    def lookup(self, parent: Node, name: str) -> Node | None:
        """The merged entry ``name`` in directory ``parent``, or None."""
        if not parent.is_dir:
            return None
        parent_dirs = dict(parent.layers)
        child_path = parent.path.rstrip("/") + "/" + name
        path = name  # what to look up: relative to the parent, or absolute
        found: list[tuple[int, str, os.stat_result]] = []
        for idx in range(len(self.layers)):
            if path.startswith("/"):
                base = self.layers[idx]
                comps = [c for c in path.split("/") if c]
            else:
                base = parent_dirs.get(idx)
                if base is None:
                    continue
                comps = path.split("/")
            kind, real, st, stop_after = self._walk(idx, base, comps)
            if kind == _MISSING:
                continue
            if kind == _STOP:
                break
            if kind == _NONDIR:
                if not found:
                    return Node(child_path, False, ((idx, real),), st)
                break
            found.append((idx, real, st))
            if stop_after or idx == len(self.layers) - 1 or self.is_opaque(real):
                break
            rd = self.redirect(real)
            if rd is not None:
                if rd.startswith("/"):
                    path = rd
                else:
                    head, sep, _ = path.rpartition("/")
                    path = head + sep + rd
        if not found:
            return None
        return Node(child_path, True, tuple((i, r) for i, r, _ in found), found[0][2])

    def lookup_path(self, path: str) -> Node | None:
        node: Node | None = self.root()
        for comp in [c for c in path.split("/") if c]:
            node = self.lookup(node, comp) if node is not None else None
            if node is None:
                return None
        return node

    def children(self, node: Node) -> dict[str, Node]:
        """The merged directory listing of ``node`` (name -> Node), sorted."""
        if not node.is_dir:
            return {}
        names: set[str] = set()
        for _, real in node.layers:
            names.update(os.listdir(real))
        out: dict[str, Node] = {}
        for name in sorted(names, key=os.fsencode):
            child = self.lookup(node, name)
            if child is not None:
                out[name] = child
        return out


# --------------------------------------------------------------------------
# diff


def _check_upper(upper: str) -> str:
    path = os.path.realpath(os.fspath(upper))
    if not os.path.isdir(path):
        raise LayerError(f"upper dir '{path}' is not a directory")
    return path


def upper_warnings(upper: str) -> list[str]:
    """What the user should hear before a diff or commit of upper: that a
    live mount is changing it now, or that it does not look like an upper
    dir at all (no overlay xattr on its root, no whiteout in it)."""
    import fcntl  # noqa: PLC0415

    path = os.path.realpath(upper)
    out = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        out.append(f"'{path}' is the upper dir of a live overlay mount: it may change while it is read")
    finally:
        os.close(fd)
    if not out:
        from overlay.mounttable import kernel_overlay_using  # noqa: PLC0415

        entry = kernel_overlay_using(path, "upperdir")
        if entry is not None:
            out.append(f"'{path}' is the upper dir of the kernel overlay mounted on"
                       f" '{entry.mountpoint}': it may change while it is read")
    try:
        names = os.listxattr(path)
    except OSError:
        names = []
    if not any(n.startswith(("trusted.overlay.", "user.overlay.")) for n in names):
        whiteout = False
        seen = 0
        for _dirpath, dirs, files in os.walk(path):
            seen += len(files) + len(dirs)
            if seen > 20000:
                whiteout = True     # (a big tree: not worth a second walk to warn)
                break
            for n in files + dirs:
                try:
                    if _is_chr_whiteout(os.lstat(os.path.join(_dirpath, n))):
                        whiteout = True
                        break
                except OSError:
                    pass
            if whiteout:
                break
        if not whiteout:
            out.append(f"'{path}' does not look like an upper dir (no overlay xattr on it, no"
                       " whiteout in it): listing it as one")
    return out


def _skip_prefixes(userxattr: bool) -> tuple[str, ...]:
    """Xattr name prefixes that belong to the overlay, never to the content."""
    return ("trusted.overlay.",) + (("user.overlay.",) if userxattr else ())


def _dir_meta_differs(a: Node, b: Node, skip: tuple[str, ...]) -> bool:
    sa, sb = a.st, b.st
    return (
        stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode)
        or sa.st_uid != sb.st_uid
        or sa.st_gid != sb.st_gid
        or sa.st_mtime_ns != sb.st_mtime_ns
        or _xattrs(a.top, skip) != _xattrs(b.top, skip)
    )


def _diff_with_lowers(upper: str, lowers: Sequence[str], userxattr: bool) -> list[Change]:
    old = LayerStack(lowers, first_lower=0, userxattr=userxattr)
    new = LayerStack([upper, *lowers], first_lower=1, userxattr=userxattr)
    skip = _skip_prefixes(userxattr)
    changes: list[Change] = []

    def compare(o: Node | None, n: Node) -> bool:
        """Compare directory n (after) with o (before, None if absent); True
        if an entry was added to or deleted from it directly."""
        before = old.children(o) if o is not None and o.is_dir else {}
        after = new.children(n)
        direct = False
        for name in sorted(set(before) | set(after), key=os.fsencode):
            a, b = before.get(name), after.get(name)
            if b is None:
                changes.append(Change("D", a.path))
                direct = True
            elif a is None:
                changes.append(Change("A", b.path))
                direct = True
                if b.is_dir:
                    compare(None, b)
            elif a.reals == b.reals:
                continue  # the very same lower entry: untouched
            elif a.is_dir and b.is_dir:
                below = compare(a, b)
                if below or _dir_meta_differs(a, b, skip):
                    changes.append(Change("C", b.path))
            else:
                changes.append(Change("C", b.path))
                if b.is_dir:
                    compare(None, b)
        return direct

    compare(old.root(), new.root())
    return changes


def _diff_upper_only(upper: str, userxattr: bool) -> list[Change]:
    stack = LayerStack([upper], first_lower=1, userxattr=userxattr)
    changes: list[Change] = []

    def walk(dirpath: str, merged: str, new_tree: bool) -> None:
        for name in _listdir(dirpath):
            real = os.path.join(dirpath, name)
            path = merged.rstrip("/") + "/" + name
            st = os.lstat(real)
            if _is_chr_whiteout(st):
                if not new_tree:  # nothing below a new tree to delete
                    changes.append(Change("D", path))
            elif stat.S_ISDIR(st.st_mode):
                fresh = new_tree or stack.is_opaque(real) or stack.redirect(real) is not None
                changes.append(Change("A" if fresh else "C", path))
                walk(real, path, fresh)
            else:
                changes.append(Change("A", path))

    walk(upper, "/", False)
    return changes


def diff(
    upper: str | os.PathLike,
    lowers: Sequence[str | os.PathLike] | None = None,
    *,
    userxattr: bool = False,
) -> list[Change]:
    """The changes held by ``upper`` (see the module docstring), sorted by path."""
    up = _check_upper(os.fspath(upper))
    if lowers:
        changes = _diff_with_lowers(up, [os.fspath(p) for p in lowers], userxattr)
    else:
        changes = _diff_upper_only(up, userxattr)
    changes.sort(key=lambda c: _path_key(c.path))
    return changes


def changes_to_json(changes: Sequence[Change]) -> dict[str, list[str]]:
    """``podman diff --format json`` shape: {"added": [...], "changed": [...], "deleted": [...]}."""
    out: dict[str, list[str]] = {"added": [], "changed": [], "deleted": []}
    key = {"A": "added", "C": "changed", "D": "deleted"}
    for change in changes:
        out[key[change.kind]].append(change.path)
    return out


# --------------------------------------------------------------------------
# commit


@dataclass
class _Item:
    """One tar member to write: an entry from ``real``, or a marker."""

    arcname: str
    real: str
    st: os.stat_result
    kind: str = "entry"  # "entry", "whiteout" or "opaque"


class _Planner:
    """Yields the members of the layer tarball in order (parents first)."""

    def __init__(self, upper: str, lowers: Sequence[str] | None, userxattr: bool):
        self.upper = upper
        self.stack = LayerStack([upper], first_lower=1, userxattr=userxattr)
        self.merged = (
            LayerStack([upper, *lowers], first_lower=1, userxattr=userxattr) if lowers else None
        )

    @staticmethod
    def _check_name(name: str, where: str) -> None:
        if name.startswith(WHITEOUT_PREFIX):
            raise LayerError(
                f"'{where}' cannot be stored in an OCI layer (names starting with "
                f"'{WHITEOUT_PREFIX}' mean whiteouts there)"
            )

    def items(self) -> Iterator[_Item]:
        yield from self._walk_upper(self.upper, "")

    def _walk_upper(self, dirpath: str, arc: str) -> Iterator[_Item]:
        for name in _listdir(dirpath):
            real = os.path.join(dirpath, name)
            arcname = arc + name
            st = os.lstat(real)
            if _is_chr_whiteout(st):
                self._check_name(name, "/" + arcname)
                yield _Item(arc + WHITEOUT_PREFIX + name, real, st, "whiteout")
                continue
            self._check_name(name, "/" + arcname)
            if not stat.S_ISDIR(st.st_mode):
                yield _Item(arcname, real, st)
                continue
            if self.stack.redirect(real) is not None:
                yield from self._redirected(real, arcname, st)
                continue
            yield _Item(arcname, real, st)
            if self.stack.is_opaque(real):
                yield _Item(arcname + "/" + OPAQUE_MARKER, real, st, "opaque")
            yield from self._walk_upper(real, arcname + "/")

    def _redirected(self, real: str, arcname: str, st: os.stat_result) -> Iterator[_Item]:
        if self.merged is None:
            rd = self.stack.redirect(real)
            raise LayerError(
                f"'/{arcname}' is a renamed directory (redirect to '{rd}'): its content is in "
                "the lower layers, pass them with --lower to write it out"
            )
        node = self.merged.lookup_path("/" + arcname)
        if node is None or not node.is_dir:
            raise LayerError(f"cannot resolve the renamed directory '/{arcname}' in the layers")
        yield _Item(arcname, real, st)
        yield _Item(arcname + "/" + OPAQUE_MARKER, real, st, "opaque")
        yield from self._walk_merged(node, arcname + "/")

    def _walk_merged(self, node: Node, arc: str) -> Iterator[_Item]:
        assert self.merged is not None
        for name, child in self.merged.children(node).items():
            arcname = arc + name
            self._check_name(name, "/" + arcname)
            yield _Item(arcname, child.top, child.st)
            if child.is_dir:
                yield from self._walk_merged(child, arcname + "/")


class _Progress:
    """``\\rcommit: N/TOTAL entries, X MiB`` on a stream, at most 10 times a second."""

    def __init__(self, stream: IO[str], total: int):
        self.stream = stream
        self.total = total
        self.done = 0
        self.bytes = 0
        self._last = 0.0

    def step(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._show()

    def _show(self) -> None:
        mib = self.bytes / (1024 * 1024)
        self.stream.write(f"\rcommit: {self.done}/{self.total} entries, {mib:.1f} MiB")
        self.stream.flush()

    def finish(self) -> None:
        self._show()
        self.stream.write("\n")
        self.stream.flush()


def _xattrs(path: str, skip_prefixes: tuple[str, ...]) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, str] = {}
    for name in sorted(names):
        if name.startswith(skip_prefixes):
            continue
        value = _getxattr(path, name)
        if value is not None:
            # tarfile writes undecodable values back as the same bytes
            # (with a hdrcharset=BINARY record)
            out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out


class _Writer:
    def __init__(self, tar: tarfile.TarFile, skip_prefixes: tuple[str, ...]):
        self.tar = tar
        self.skip = skip_prefixes
        self.links: dict[tuple[int, int], str] = {}
        self.members = 0
        self.skipped: list[str] = []

    def _base(self, name: str, st: os.stat_result) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        secs, nanos = divmod(st.st_mtime_ns, 10**9)
        info.mtime = secs
        if nanos:
            info.pax_headers["mtime"] = f"{secs}.{nanos:09d}".rstrip("0")
        return info

    def write(self, item: _Item) -> int:
        """Write one member; returns the number of data bytes written."""
        st = item.st
        if item.kind in ("whiteout", "opaque"):
            info = self._base(item.arcname, st)
            info.type = tarfile.REGTYPE
            info.mode = 0o600 if item.kind == "whiteout" else stat.S_IMODE(st.st_mode)
            info.size = 0
            self.tar.addfile(info)
            self.members += 1
            return 0
        info = self._base(item.arcname, st)
        info.pax_headers.update(_xattrs(item.real, self.skip))
        mode = st.st_mode
        data = None
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                info.type = tarfile.LNKTYPE
                info.linkname = self.links[key]
                info.size = 0
            else:
                if st.st_nlink > 1:
                    self.links[key] = item.arcname
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                data = item.real
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(item.real)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:  # sockets cannot be stored in a tar file
            self.skipped.append("/" + item.arcname)
            return 0
        if data is not None:
            with open(data, "rb") as fh:
                self.tar.addfile(info, fh)
        else:
            self.tar.addfile(info)
        self.members += 1
        return info.size


def commit(
    upper: str | os.PathLike,
    output: str | os.PathLike | IO[bytes],
    *,
    lowers: Sequence[str | os.PathLike] | None = None,
    userxattr: bool = False,
    gzip: bool | None = None,
    progress: bool | None = False,
    progress_stream: IO[str] | None = None,
) -> int:
    """Write ``upper`` as an OCI layer tarball; returns the number of members.

    ``output``: a path (``.gz``/``.tgz`` means gzip unless ``gzip`` says
    otherwise; written to a temporary file and renamed into place), ``"-"``
    for stdout, or a binary file object.  ``lowers`` (top first) are needed
    when the upper dir holds renamed directories.  ``progress``: True to show
    progress, None to show it when ``progress_stream`` (default stderr) is a
    terminal.
    """
    up = _check_upper(os.fspath(upper))
    lows = [os.fspath(p) for p in lowers] if lowers else None
    planner = _Planner(up, lows, userxattr)
    skip = _skip_prefixes(userxattr)
    stream = progress_stream if progress_stream is not None else sys.stderr
    if progress is None:
        progress = bool(getattr(stream, "isatty", lambda: False)())

    if isinstance(output, (str, os.PathLike)):
        out_name = os.fspath(output)
        if gzip is None:
            gzip = out_name.endswith((".gz", ".tgz"))
    else:
        out_name = None
        gzip = bool(gzip)

    bar = None
    if progress:
        bar = _Progress(stream, sum(1 for _ in planner.items()))

    def write_all(tar: tarfile.TarFile) -> int:
        writer = _Writer(tar, skip)
        for item in planner.items():
            nbytes = writer.write(item)
            if bar is not None:
                bar.step(nbytes)
        if bar is not None:
            bar.finish()
        for path in writer.skipped:
            print(f"overlay commit: skipped socket '{path}'", file=stream)
        return writer.members

    tar_kw = dict(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    if out_name is None or out_name == "-":
        fileobj = output if out_name is None else sys.stdout.buffer
        with tarfile.open(fileobj=fileobj, mode="w|gz" if gzip else "w|", **tar_kw) as tar:
            return write_all(tar)

    target = check_output(out_name)
    parent = os.path.dirname(target)
    real_parent = os.path.realpath(parent)
    if real_parent == up or real_parent.startswith(up.rstrip("/") + "/"):
        raise LayerError(f"the output '{target}' must not be inside the upper dir '{up}'")
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, mode="w:gz" if gzip else "w", **tar_kw) as tar:
            count = write_all(tar)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename == tmp:
            # (the user named the target, not our temporary file beside it)
            raise OSError(exc.errno, exc.strerror, target) from None
        raise
    return count


def check_output(out_name: str) -> str:
    """The absolute path of commit's output file, or LayerError naming it:
    a dir, a missing dir, another archive format's name."""
    target = os.path.abspath(out_name)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise LayerError(f"the output '{target}' is a directory (name the layer file to write)")
    if not os.path.isdir(parent):
        raise LayerError(f"cannot write '{target}': no directory '{parent}'")
    if target.lower().endswith(_OTHER_ARCHIVES):
        raise LayerError(f"cannot write '{target}': a layer is written as a tar (.tar) or a gzipped"
                         " tar (.tar.gz, .tgz), not another archive format")
    return target


_OTHER_ARCHIVES = (".zip", ".xz", ".txz", ".bz2", ".tbz", ".tbz2", ".zst", ".tzst", ".lz4", ".7z",
                   ".rar", ".lzma", ".cpio")


# --------------------------------------------------------------------------
# command line (wired into overlay.cli)


def _parse_lowers(value: str | None) -> list[str] | None:
    if not value:
        return None
    from overlay.options import split_lowerdir  # noqa: PLC0415 - light module

    lowers = split_lowerdir(value)
    if any(not p for p in lowers):
        raise LayerError("empty layer path in --lower")
    return [os.path.abspath(p) for p in lowers]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``diff`` and ``commit`` subcommands to the ``overlay`` parser."""
    d = sub.add_parser(
        "diff",
        help="list what an upper dir adds (A), changes (C) and deletes (D)",
        description="List the changes an overlay upper dir holds, like 'podman diff': "
        "'A /path' added, 'C /path' changed, 'D /path' deleted. Without --lower, files "
        "cannot be told apart from changed ones and are shown as added.",
    )
    d.add_argument("upper", metavar="UPPER")
    d.add_argument("--lower", metavar="A:B", help="the lower layers, top first (exact A/C/D)")
    d.add_argument("--json", action="store_true", help='JSON: {"added": [...], "changed": [...], "deleted": [...]}')
    d.add_argument("--userxattr", action="store_true", help="the layers use user.overlay.* xattrs")

    c = sub.add_parser(
        "commit",
        help="write an upper dir as an OCI layer tarball",
        description="Write an overlay upper dir as an OCI image layer (tar, or tar.gz for "
        "a .gz/.tgz name): whiteouts as .wh.NAME, opaque dirs with .wh..wh..opq. "
        "Renamed directories need --lower.",
    )
    c.add_argument("upper", metavar="UPPER")
    c.add_argument("-o", "--output", required=True, metavar="LAYER.tar[.gz]", help="output file, - for stdout")
    c.add_argument("--lower", metavar="A:B", help="the lower layers, top first (needed for renamed dirs)")
    c.add_argument("--gzip", action="store_true", default=None, help="gzip even without a .gz name")
    c.add_argument("--userxattr", action="store_true", help="the layers use user.overlay.* xattrs")
    c.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )
    c.add_argument("--no-progress", dest="progress", action="store_false")


def _emit(text: str) -> None:
    sys.stdout.buffer.write(os.fsencode(text) + b"\n")


def run_command(args: argparse.Namespace, prog: str = "overlay") -> int:
    """Run ``overlay diff`` or ``overlay commit``; returns the exit status."""
    try:
        lowers = _parse_lowers(args.lower)
        if args.command == "commit" and args.output != "-":
            check_output(args.output)
        if os.path.isdir(args.upper):
            for line in upper_warnings(args.upper):
                print(f"{prog} {args.command}: warning: {line}", file=sys.stderr)
        if args.command == "diff":
            changes = diff(args.upper, lowers, userxattr=args.userxattr)
            if args.json:
                text = json.dumps(changes_to_json(changes), indent=2)
                sys.stdout.write(text + "\n")
            else:
                for change in changes:
                    _emit(str(change))
            sys.stdout.flush()
            return 0
        if args.command == "commit":
            commit(
                args.upper,
                args.output,
                lowers=lowers,
                userxattr=args.userxattr,
                gzip=args.gzip,
                progress=args.progress,
            )
            return 0
    except LayerError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": '{exc.filename}'" if exc.filename else ""
        print(f"{prog} {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    raise ValueError(f"not a layer tool command: {args.command!r}")
