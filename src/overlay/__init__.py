"""overlay: the Python side of the overlay filesystem.

A thin adapter over the Cython core (overlay_core): option parsing
(options.py), the command line (cli.py), the built-in demo (demo.py) and
the pyfuse3 request handlers (fs.py). No path logic here.

The public Python API (api.py) is re-exported here:
``overlay.mount(lower=[...], upper=None, work=None, **options)`` mounts an
overlay (a context manager that unmounts at exit); see also layertools.py
(``overlay diff`` / ``overlay commit``) and pytest_plugin.py (the ``cow_dir``
fixture).
"""

__version__ = "0.1.0"

from overlay.api import MountError, OverlayMount, fuse_unavailable_reason, mount  # noqa: E402

__all__ = ["mount", "MountError", "OverlayMount", "fuse_unavailable_reason", "__version__"]
