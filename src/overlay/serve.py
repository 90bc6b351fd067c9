"""overlay.serve: run a mount with the engine its options name.

run_fs(), which the command line calls with a config and a mount point and
which returns once the mount is gone:

* ``engine=native`` (the default): overlay.engine, our own FUSE protocol
  engine on /dev/fuse (no libfuse, no trio);
* ``engine=pyfuse3``: overlay.fs, the pyfuse3 + trio adapter (the
  ``overlay-fuse[pyfuse3]`` extra).

What both engines set up is in overlay.daemon. Importing this module loads
neither engine nor the core.
"""

from __future__ import annotations

from typing import Callable


def run_fs(config, mountpoint: str, on_ready: Callable[[], None]) -> None:
    """Mount config on mountpoint with its engine and serve until unmounted."""
    if config.engine == "pyfuse3":
        from overlay.fs import run_fs as run  # noqa: PLC0415 - optional extra
    else:
        from overlay.engine import run_native as run  # noqa: PLC0415
    run(config, mountpoint, on_ready)
