"""overlay_core: the overlay's layer and path logic, compiled with Cython.

No FUSE here: everything is testable on plain directories. See _core.pyx.
"""
from ._core import (  # noqa: F401
    NAME_MAX,
    PY_RENAME_EXCHANGE as RENAME_EXCHANGE,
    PY_RENAME_NOREPLACE as RENAME_NOREPLACE,
    PY_RENAME_WHITEOUT as RENAME_WHITEOUT,
    Node,
    Overlay,
    sys_copy_data,
    sys_open_inside,
)
