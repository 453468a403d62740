"""Copy the benchmark and evaluation tables into README.md, between their markers.

Each ``<!-- results:NAME:start -->`` ... ``<!-- results:NAME:end -->`` block is replaced by the
file ``SOURCES[NAME]``, so the README's numbers are always those the last run wrote.

    .venv/bin/python -m benchmarks.update_readme
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "overhead": ROOT / "benchmarks/results/overhead.md",
    "scoring": ROOT / "benchmarks/results/scoring-cpu.md",
    "detection": ROOT / "probes/default/smollm2-135m-fabrication/metrics.md",
}


def update(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    changed = []
    for name, source in SOURCES.items():
        pattern = re.compile(rf"(<!-- results:{name}:start -->\n)(.*?)(<!-- results:{name}:end -->)",
                             re.DOTALL)
        if not pattern.search(text):
            continue
        body = source.read_text().strip() + "\n" if source.is_file() else (
            f"(not measured yet: {source.relative_to(ROOT)} is missing)\n")
        text, n = pattern.subn(lambda m: m.group(1) + body + m.group(3), text)
        changed.append(name)
    readme.write_text(text)
    return changed


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
    sys.exit(0)
