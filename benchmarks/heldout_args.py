"""Command-line arguments of the served held-out evaluation, shared by
``python -m benchmarks.heldout`` and ``lie-detector evaluate-served`` (one set of flags).

Light on purpose: the CLI builds its parser on every call, so nothing heavy is imported
here; the run itself, and the :class:`~benchmarks.heldout_eval.EvalConfig` these flags
become (:func:`~benchmarks.heldout_eval.config_from_args`), live in
:mod:`benchmarks.heldout_eval`, which imports this module and not the other way round.
"""

from __future__ import annotations

import argparse
from pathlib import Path
STYLES = ("plain", "chat", "longform")
DEFAULT_OUT = Path("benchmarks/results/heldout.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m benchmarks.heldout`` and ``lie-detector evaluate-served``."""
    p.add_argument("--base-url", help="a running vLLM with the plugin (with --grpc); default: "
                   "start `lie-detector serve` for the run")
    p.add_argument("--grpc", help="the running sidecar's gRPC address (with --base-url)")
    p.add_argument("--model", help="model folder to serve (default: the embedded model)")
    p.add_argument("--probe", type=Path, help="probe to serve (default: the shipped probe)")
    p.add_argument("--probe-name", help="which served probe to read (default: the first "
                   "active one)")
    p.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES))
    p.add_argument("--topics", nargs="+", help="held-out topics, e.g. heldout_region_country "
                   "heldout_region_country_invented, or domains, e.g. time_zones units "
                   "(default: all; probes/datasets/heldout.py)")
    p.add_argument("--limit-per-topic", type=int, help="at most this many questions per topic")
    p.add_argument("--invented-per-topic", type=int, default=24)
    p.add_argument("--longform-real", type=int, help="real countries asked in long form "
                   "(default: every held-out country)")
    p.add_argument("--longform-invented", type=int, default=30)
    p.add_argument("--longform-cities", type=int, default=30, help="real and as many invented "
                   "cities asked about their time zone in long form (0: none)")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--enforce-eager", action="store_true", help="start serve without "
                   "torch.compile (a faster start when the machine is busy)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--save-to-probe", action="store_true", help="also write the summary "
                   "`lie-detector demo` prints into the probe's folder (heldout.json)")
    p.add_argument("--no-progress", action="store_true")


__all__ = ["DEFAULT_OUT", "STYLES", "add_arguments"]
