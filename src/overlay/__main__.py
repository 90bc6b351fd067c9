"""``python -m overlay ...`` (src/overlay/__main__.py): same as the ``overlay`` command."""

import sys

from overlay.cli import main

if __name__ == "__main__":
    sys.exit(main())
