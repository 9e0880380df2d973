"""``python -m vlforge.cli``: the ``vlforge`` command (``vlforge --help``)."""

import sys

from vlforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
