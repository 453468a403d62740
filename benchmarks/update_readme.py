"""Copy the benchmark and evaluation tables into README.md, between their markers.

Each ``<!-- results:NAME:start -->`` ... ``<!-- results:NAME:end -->`` block is replaced by what
``SOURCES[NAME]`` gives: a results file written by a benchmark, or a function that renders a
table from one (the shipped probe's ``metrics.json``). The README's numbers are therefore
always those the last run wrote, never typed. ``benchmarks.run_all`` calls this after a full
run; it can also be run on its own:

    .venv/bin/python -m benchmarks.update_readme
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _detection() -> str:
    from benchmarks import detection

    return detection.markdown(detection.summarise(detection.METRICS))


def _soak() -> str:
    """The last soak run (tests/reliability/test_soak.py writes soak.json)."""
    import json

    path = ROOT / "benchmarks/results/soak.json"
    if not path.is_file():
        return "(not measured yet: benchmarks/results/soak.json is missing)"
    d = json.loads(path.read_text())
    rss = d["rss_mib"]
    unhealthy = d.get("unhealthy_outcomes", {})
    return "\n".join([
        f"Soak of {d['soak_s']:.0f} s on {d['machine']['cpus']} CPU cores: {d['concurrency']} "
        f"concurrent generations, {d['stream_clients']} streaming gRPC clients attaching and "
        "detaching at random (`tests/reliability/test_soak.py`).",
        "",
        "| requests | tokens | tokens/s | steps dropped | fully scored | not seen whole "
        "(incomplete / not found / finished) | sidecar RSS growth after warm-up | "
        "vLLM worker RSS growth after warm-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {d['requests']} | {d['tokens']} | {d['tokens_per_s']:.0f} | {d['dropped_steps']:.0f} "
        f"| {d['healthy_fully_scored']} | {d['unhealthy']} ({unhealthy.get('incomplete', 0)} / "
        f"{unhealthy.get('not_found', 0)} / {unhealthy.get('finished', 0)}) | "
        f"{rss['sidecar']['growth_after_warmup']:.1f} MiB | "
        f"{rss['worker']['growth_after_warmup']:.1f} MiB |",
    ])


def _heldout() -> str:
    """The served held-out evaluation (benchmarks/heldout.py writes heldout.json)."""
    import json

    from benchmarks.heldout_report import markdown

    path = ROOT / "benchmarks/results/heldout.json"
    if not path.is_file():
        return "(not measured yet: benchmarks/results/heldout.json is missing)"
    return markdown(json.loads(path.read_text()))


SOURCES: dict[str, Path | Callable[[], str]] = {
    "overhead": ROOT / "benchmarks/results/overhead.md",
    "scoring": ROOT / "benchmarks/results/scoring-cpu.md",
    # Rendered from the probe's own evaluation, so it appears as soon as the probe ships.
    "detection": _detection,
    "heldout": _heldout,
    "benchmarks": ROOT / "benchmarks/results/benchmarks.md",
    "soak": _soak,
    "stall": ROOT / "benchmarks/results/stall.md",
    "watchers": ROOT / "benchmarks/results/watchers.md",
    "annotation": ROOT / "benchmarks/results/annotation.md",
}


def _body(source: Path | Callable[[], str]) -> str:
    if callable(source):
        return source().strip() + "\n"
    if source.is_file():
        return source.read_text().strip() + "\n"
    return f"(not measured yet: {source.relative_to(ROOT)} is missing)\n"


def update(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    changed = []
    for name, source in SOURCES.items():
        pattern = re.compile(rf"(<!-- results:{name}:start -->\n)(.*?)(<!-- results:{name}:end -->)",
                             re.DOTALL)
        if not pattern.search(text):
            continue
        body = _body(source)
        text, n = pattern.subn(lambda m: m.group(1) + body + m.group(3), text)
        changed.append(name)
    readme.write_text(text)
    return changed


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
    sys.exit(0)
