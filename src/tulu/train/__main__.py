"""``python -m tulu.train CONFIG [KEY=VALUE ...] [--dry-run]``: what ``tulu train`` runs, in the
form torchrun launches (``torchrun --nproc-per-node N -m tulu.train CONFIG``).

The ``__main__`` guard matters: tokenization spawns worker processes that import this module.
"""

import sys

from tulu.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
