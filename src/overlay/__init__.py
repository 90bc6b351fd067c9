"""overlay: the Python side of the overlay filesystem.

A thin adapter over the Cython core (overlay_core): option parsing
(options.py), the command line (cli.py), the built-in demo (demo.py) and
the pyfuse3 request handlers (fs.py). No path logic lives here.
"""

__version__ = "0.1.0"
