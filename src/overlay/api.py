"""Python API for mounting an overlay (src/overlay/api.py).

``overlay.mount(lower=[...], upper=None, work=None, **options)`` mounts an
overlay and returns an :class:`OverlayMount` once the mount is live.  Use it
as a context manager so that the overlay is unmounted at the end of the block,
also when the block raises::

    import overlay

    with overlay.mount(lower=["/data/set"]) as mp:     # a writable view
        (mp.path / "new.txt").write_text("hello")       # lands in mp.upper
        os.remove(os.path.join(mp, "old.txt"))          # a whiteout in mp.upper
    # unmounted; the temporary mountpoint, upper and work dirs are gone

How it works: the mount is made by the ``overlay mount`` command run as
``sys.executable -m overlay mount -o ... MOUNTPOINT`` (it forks a background
filesystem process and exits once the mount is live), and undone with
``overlay umount``.  Nothing of the filesystem is imported in the caller's
process.

Temporary directories: when no ``mountpoint=`` is given, an empty directory is
made for it; when neither ``upper`` nor ``work`` is given, one temporary
directory holding ``u/`` (upper) and ``w/`` (work) is made, so both are on the
same filesystem as the kernel requires.  With ``upper=`` but no ``work=``, a
temporary work dir is made next to the upper dir (same filesystem).  Everything
this module created is removed at exit; directories the caller passed in are
left alone.  ``ro=True`` mounts read-only: the lower layers, or with ``upper`` the whole stack.

Extra mount options are keyword arguments: ``True`` adds a flag option
(``userxattr=True`` -> ``userxattr``), ``False``/``None`` leaves it out, any
other value becomes ``name=value`` (``redirect_dir="off"``).

:func:`fuse_unavailable_reason` tells whether FUSE mounts can work here (used
by the pytest plugin to skip with a clear reason).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["MountError", "OverlayMount", "mount", "fuse_unavailable_reason"]

StrPath = str | os.PathLike

DEFAULT_TIMEOUT = 60.0


class MountError(RuntimeError):
    """Mounting or unmounting failed; the message says why (one paragraph)."""


# --------------------------------------------------------------------------
# environment


def fuse_unavailable_reason() -> str | None:
    """``None`` if FUSE mounts should work here, otherwise a short reason.

    Checks /dev/fuse (present, a character device and openable), the
    ``fusermount3`` helper when not root, and that the native engine (the
    compiled ``overlay.engine`` modules) is installed.
    """
    dev = "/dev/fuse"
    try:
        st = os.stat(dev)
    except OSError:
        return "/dev/fuse is missing (load the fuse module or pass --device /dev/fuse)"
    if not stat.S_ISCHR(st.st_mode):
        return "/dev/fuse is not a character device"
    if os.geteuid() != 0:
        if shutil.which("fusermount3") is None:
            return "not root and no fusermount3 on PATH (install the fuse3 package)"
    else:
        try:
            os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            return f"cannot open /dev/fuse: {exc.strerror}"
    if importlib.util.find_spec("overlay.engine.bridge") is None:
        return "the native engine (overlay.engine.bridge) is not built"
    return None


def _is_mountpoint(path: str) -> bool:
    """True if ``path`` (absolute, canonical) is a mount point in our namespace."""
    from overlay.mounttable import find_mount  # noqa: PLC0415 - light module, lazy anyway

    return find_mount(path) is not None


def _mounts_below(path: str) -> list[str]:
    from overlay.mounttable import iter_mounts  # noqa: PLC0415

    prefix = path.rstrip("/") + "/"
    return [m.mountpoint for m in iter_mounts() if (m.mountpoint + "/").startswith(prefix)]


# --------------------------------------------------------------------------
# option string


def _escape(path: str, *, lower: bool) -> str:
    """Escape a path for the option string (``\\``, ``,`` and, in lowerdir, ``:``)."""
    out = path.replace("\\", "\\\\").replace(",", "\\,")
    if lower:
        out = out.replace(":", "\\:")
    return out


def _option_items(options: Mapping[str, Any]) -> list[str]:
    items: list[str] = []
    for name, value in options.items():
        if name in ("lowerdir", "upperdir", "workdir"):
            raise TypeError(f"pass {name} as lower=/upper=/work=, not as an option")
        if value is None or value is False:
            continue
        if value is True:
            items.append(name)
        else:
            text = str(value)
            if "," in text:
                raise ValueError(f"option {name}={text!r}: values cannot contain ','")
            items.append(f"{name}={text}")
    return items


def _as_lowers(lower: StrPath | Iterable[StrPath]) -> list[str]:
    if isinstance(lower, (str, bytes, os.PathLike)):
        lowers = [lower]
    else:
        lowers = list(lower)
    if not lowers:
        raise ValueError("need at least one lower layer")
    return [os.path.abspath(os.fsdecode(p)) for p in lowers]


def _rmtree(path: str) -> None:
    """rm -rf that also copes with directories without write/search permission."""

    def fix(func, p, _exc):  # noqa: ANN001
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=fix)


# --------------------------------------------------------------------------
# the mount object


class OverlayMount:
    """A live overlay mount; ``os.fspath(m)`` / ``str(m)`` is the mount point.

    Attributes: ``path`` (``pathlib.Path`` of the mount point), ``upper`` and
    ``work`` (``Path`` or ``None`` for a read-only mount), ``lowers`` (list of
    ``Path``, top first), ``options`` (the option string passed to
    ``overlay mount``).  ``unmount()`` may be called more than once.
    """

    def __init__(
        self,
        *,
        lowers: list[str],
        upper: str | None,
        work: str | None,
        mountpoint: str,
        optstring: str,
        owned: list[str],
        python: str,
        env: dict[str, str],
        timeout: float,
    ) -> None:
        self.lowers = [Path(p) for p in lowers]
        self.upper = Path(upper) if upper is not None else None
        self.work = Path(work) if work is not None else None
        self.path = Path(mountpoint)
        self.options = optstring
        self._owned = owned  # temp dirs we made, removed after unmounting
        self._python = python
        self._env = env
        self._timeout = timeout
        self._mounted = False

    # -- protocol --------------------------------------------------------

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        state = "mounted" if self._mounted else "unmounted"
        return f"<OverlayMount {str(self.path)!r} upper={self.upper} ({state})>"

    def __truediv__(self, other: StrPath) -> Path:
        return self.path / other

    def __enter__(self) -> "OverlayMount":
        return self

    def __exit__(self, *exc_info: object) -> bool:
        self.unmount()
        return False

    def __del__(self) -> None:  # last resort; the context manager is the way
        try:
            if self._mounted:
                self.unmount()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass

    # -- state -----------------------------------------------------------

    @property
    def mounted(self) -> bool:
        """Is the overlay still mounted (as far as /proc/self/mountinfo says)?"""
        return self._mounted and _is_mountpoint(str(self.path))

    def _run_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self._python, "-m", "overlay", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=self._env,
            timeout=self._timeout + 30,
        )

    def _start(self) -> None:
        proc = self._run_cli(
            "mount", "--timeout", f"{self._timeout:g}", "-o", self.options, str(self.path)
        )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            raise MountError(f"overlay mount on {self.path} failed: {detail}")
        self._mounted = True
        if not _is_mountpoint(str(self.path)):
            self._mounted = False
            raise MountError(f"overlay mount exited 0 but {self.path} is not a mount point")

    def unmount(self, *, timeout: float = 30.0) -> None:
        """Unmount (retrying while busy, lazily as a last resort) and clean up.

        Raises :class:`MountError` if the mount could not be removed; the
        temporary directories are then kept (something still lives in them).
        """
        mp = str(self.path)
        if self._mounted:
            deadline = time.monotonic() + timeout
            error = ""
            while _is_mountpoint(mp):
                proc = self._run_cli("umount", mp)
                if proc.returncode == 0 or not _is_mountpoint(mp):
                    break
                error = (proc.stderr or proc.stdout).strip()
                if time.monotonic() >= deadline:
                    self._run_cli("umount", "--lazy", mp)
                    break
                time.sleep(0.1)
            if _is_mountpoint(mp):
                raise MountError(f"cannot unmount {mp}: {error or 'still mounted'}")
            self._mounted = False
        self._cleanup()

    def _cleanup(self) -> None:
        while self._owned:
            d = self._owned.pop()
            if _mounts_below(os.path.realpath(d)):
                continue  # never delete into something mounted
            _rmtree(d)

    # -- layer tools -----------------------------------------------------

    def diff(self) -> list:
        """The changes the upper layer holds (see overlay.layertools.diff)."""
        from overlay import layertools  # noqa: PLC0415

        if self.upper is None:
            return []
        return layertools.diff(self.upper, [str(p) for p in self.lowers], userxattr=self._userxattr)

    def commit(self, output: StrPath, **kwargs: Any) -> int:
        """Write the upper layer as an OCI layer tarball (overlay.layertools.commit)."""
        from overlay import layertools  # noqa: PLC0415

        if self.upper is None:
            raise MountError("a read-only mount has no upper layer to commit")
        kwargs.setdefault("lowers", [str(p) for p in self.lowers])
        kwargs.setdefault("userxattr", self._userxattr)
        return layertools.commit(self.upper, output, **kwargs)

    @property
    def _userxattr(self) -> bool:
        return "userxattr" in self.options.split(",")


# --------------------------------------------------------------------------
# mount()


def _child_env() -> dict[str, str]:
    """Environment for ``python -m overlay``: the same overlay package as ours."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH", "")
    parts = [p for p in old.split(os.pathsep) if p]
    if pkg_parent not in parts:
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *parts])
    return env


def mount(
    lower: StrPath | Sequence[StrPath],
    upper: StrPath | None = None,
    work: StrPath | None = None,
    *,
    mountpoint: StrPath | None = None,
    tmpdir: StrPath | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    python: str | None = None,
    **options: Any,
) -> OverlayMount:
    """Mount an overlay and return an :class:`OverlayMount` once it is live.

    ``lower``: one layer or a list of layers, top first (like ``lowerdir=A:B``).
    ``upper``/``work``: the writable layer and its work dir; when both are
    ``None`` temporary ones are made (and removed after unmounting).
    ``mountpoint``: where to mount (an existing empty dir); a temporary dir
    by default.  ``tmpdir``: where temporary dirs go (default: ``tempfile``'s).
    ``timeout``: seconds to wait for the mount.  ``python``: interpreter that
    runs ``-m overlay`` (default ``sys.executable``).  Other keyword arguments
    are mount options, see the module docstring; ``ro=True`` gives a
    read-only mount: of the lower layers only, or, with ``upper``, of the
    whole stack, the upper layer included (as the kernel's ``ro``).

    Raises :class:`MountError` if the mount fails (temporary dirs removed).
    """
    lowers = _as_lowers(lower)
    read_only = bool(options.get("ro"))
    if work is not None and upper is None:
        raise ValueError("work= given without upper=")
    base_tmp = os.fspath(tmpdir) if tmpdir is not None else None

    owned: list[str] = []
    try:
        upper_path = os.path.abspath(os.fspath(upper)) if upper is not None else None
        work_path = os.path.abspath(os.fspath(work)) if work is not None else None
        if not read_only and upper_path is None:
            layers = tempfile.mkdtemp(prefix="overlay-layers-", dir=base_tmp)
            owned.append(layers)
            upper_path = os.path.join(layers, "u")
            work_path = os.path.join(layers, "w")
            os.mkdir(upper_path, 0o755)
            os.mkdir(work_path, 0o700)
        elif upper_path is not None and work_path is None:
            # same filesystem as the upper dir: a sibling of it
            work_path = tempfile.mkdtemp(
                prefix=".overlay-work-", dir=os.path.dirname(upper_path.rstrip("/")) or "/"
            )
            owned.append(work_path)

        if mountpoint is None:
            mp = tempfile.mkdtemp(prefix="overlay-mnt-", dir=base_tmp)
            owned.insert(0, mp)  # removed last (cleanup pops from the end)
        else:
            mp = os.path.abspath(os.fspath(mountpoint))

        parts = ["lowerdir=" + ":".join(_escape(p, lower=True) for p in lowers)]
        if upper_path is not None:
            parts.append("upperdir=" + _escape(upper_path, lower=False))
            parts.append("workdir=" + _escape(os.fspath(work_path), lower=False))
        parts.extend(_option_items(options))
        optstring = ",".join(parts)

        m = OverlayMount(
            lowers=lowers,
            upper=upper_path,
            work=work_path,
            mountpoint=mp,
            optstring=optstring,
            owned=owned,
            python=python or sys.executable,
            env=_child_env(),
            timeout=timeout,
        )
        m._start()
        return m
    except BaseException:
        for d in reversed(owned):
            if not _mounts_below(os.path.realpath(d)):
                _rmtree(d)
        owned.clear()
        raise
