"""overlay: the Python side of the overlay filesystem.

Over the Cython core (overlay_core): the native FUSE engine (engine/), the
older pyfuse3 adapter (fs.py), option parsing (options.py), the command
line (cli.py), the built-in demo (demo.py). No path logic here.

The public Python API (api.py) is re-exported here:
``overlay.mount(lower=[...], upper=None, work=None, **options)`` mounts an
overlay (a context manager that unmounts at exit); see also layertools.py
(``overlay diff`` / ``overlay commit``) and pytest_plugin.py (the ``cow_dir``
fixture).
"""

__version__ = "0.1.0"

__all__ = ["mount", "MountError", "OverlayMount", "fuse_unavailable_reason", "__version__"]


def __getattr__(name):
    # the API is loaded on first use: `overlay mount` (this package's
    # command line) starts faster without it
    if name in ("mount", "MountError", "OverlayMount", "fuse_unavailable_reason"):
        from overlay import api

        return getattr(api, name)
    raise AttributeError(f"module 'overlay' has no attribute {name!r}")
