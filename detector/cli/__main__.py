"""``python -m detector.cli``: the same commands as the ``lie-detector`` script."""

from __future__ import annotations

import sys

from detector.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
