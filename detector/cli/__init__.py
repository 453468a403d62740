"""The ``lie-detector`` commands: the top floor, on top of the runtime and of ``probes/``.

Nothing below imports this package (``tests/unit/test_import_graph.py``). ``main`` is the
console script's target; :mod:`detector.cli.commands` holds the parser and the commands.
"""

from __future__ import annotations

from detector.cli.commands import main

__all__ = ["main"]
