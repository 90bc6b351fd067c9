"""pytest plugin: copy-on-write views of read-only directories (src/overlay/pytest_plugin.py).

Registered through the ``pytest11`` entry point of the overlay-fuse package, so
installing the package is enough (or ``-p overlay.pytest_plugin``).  Fixtures:

``cow_dir``
    A factory: ``cow_dir(path, *more_lowers, **options) -> pathlib.Path``
    mounts an overlay with ``path`` (then ``more_lowers``) as read-only lower
    layers and a fresh temporary upper layer, and returns the mount point.
    The test may change anything below it; the source directory is never
    written, nothing is copied up front, and the view with all its changes
    is unmounted and thrown away when the test ends::

        def test_cleanup_script(cow_dir):
            tree = cow_dir("/srv/big-dataset")
            run_cleanup(tree)                 # deletes and rewrites files
            assert not (tree / "tmp").exists()

``overlay_mount``
    The same factory, returning the :class:`overlay.OverlayMount` itself
    (``.path``, ``.upper`` to look at what the test changed, ``.diff()``).

Both skip the test, with the reason, when FUSE cannot be used here (no
/dev/fuse, not root and no fusermount3, the engine not built).  A mount that fails
for another reason is an error, not a skip.  The ini option ``overlay_tmpdir``
chooses where mount points and upper dirs are made (default: the system's
temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from overlay.api import OverlayMount, fuse_unavailable_reason, mount

__all__ = ["cow_dir", "overlay_mount"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "overlay_tmpdir",
        "directory for the overlay fixtures' mount points and upper dirs (default: system temp dir)",
        default="",
    )


class _Mounts:
    """The overlays one test made; all are unmounted at teardown."""

    def __init__(self, tmpdir: str | None):
        self.tmpdir = tmpdir
        self.mounts: list[OverlayMount] = []

    def make(self, path: str | os.PathLike, *more: str | os.PathLike, **options: Any) -> OverlayMount:
        reason = fuse_unavailable_reason()
        if reason is not None:
            pytest.skip(f"overlay: FUSE is not usable here: {reason}")
        for layer in (path, *more):
            if not os.path.isdir(layer):
                raise NotADirectoryError(f"overlay: lower layer '{os.fspath(layer)}' is not a directory")
        options.setdefault("tmpdir", self.tmpdir)
        m = mount([path, *more], **options)
        self.mounts.append(m)
        return m

    def close(self) -> None:
        errors = []
        while self.mounts:
            m = self.mounts.pop()
            try:
                m.unmount()
            except Exception as exc:  # noqa: BLE001 - report all at the end
                errors.append(f"{m.path}: {exc}")
        if errors:
            raise RuntimeError("overlay fixture could not unmount: " + "; ".join(errors))


def _tmpdir(config: pytest.Config) -> str | None:
    value = config.getini("overlay_tmpdir")
    if not value:
        return None
    path = Path(str(value))
    if not path.is_absolute():
        path = Path(str(config.rootpath)) / path
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.fixture
def overlay_mount(request: pytest.FixtureRequest) -> Callable[..., OverlayMount]:
    """Factory: ``overlay_mount(path, *more_lowers, **options) -> OverlayMount``."""
    mounts = _Mounts(_tmpdir(request.config))
    try:
        yield mounts.make
    finally:
        mounts.close()


@pytest.fixture
def cow_dir(overlay_mount: Callable[..., OverlayMount]) -> Callable[..., Path]:
    """Factory: ``cow_dir(path, *more_lowers, **options) -> Path`` of a writable,
    copy-on-write view of ``path``, discarded after the test."""

    def make(path: str | os.PathLike, *more: str | os.PathLike, **options: Any) -> Path:
        return overlay_mount(path, *more, **options).path

    return make
