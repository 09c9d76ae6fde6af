"""``python -m tulu ...``: the same as the ``tulu`` command (for environments whose scripts
directory is not on PATH)."""

import sys

from tulu.cli import main

if __name__ == "__main__":
    sys.exit(main())
