"""Served, held-out evaluation of the shipped probe: the benchmark entry point.

    .venv/bin/python -m benchmarks.heldout                 # start serve, run, write results
    .venv/bin/python -m benchmarks.heldout --base-url http://127.0.0.1:8000 --grpc 127.0.0.1:50051
    .venv/bin/python -m benchmarks.heldout --markdown      # print the results table only

It starts `lie-detector serve` (vLLM + sidecar, the product), sends held-out questions in
three prompt styles through the OpenAI API and reads every verdict back with gRPC
``GetScores``, then writes ``benchmarks/results/heldout.json``, ``heldout-answers.jsonl``
and ``heldout.png``, and regenerates ``docs/results.md`` and the README's headline. The
implementation lives in :mod:`benchmarks.heldout_eval` (shared with ``lie-detector
evaluate-served``); this module only adds the results-page step.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "heldout.json"


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import heldout_eval
    from benchmarks.heldout_report import markdown

    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout",
                                     description=__doc__.split("\n", 1)[0])
    heldout_eval.add_arguments(parser)
    parser.add_argument("--markdown", action="store_true",
                        help="print the results table from --out and exit")
    parser.add_argument("--no-readme", action="store_true", help="leave docs/results.md and README.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "detector.serving.serve", "detector.models.embedded"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    cfg = heldout_eval.config_from_args(args)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    result = heldout_eval.run(
        cfg, command=" ".join([".venv/bin/python -m benchmarks.heldout",
                               *map(shlex.quote, argv_list)]))
    print(markdown(result))
    if not args.no_readme and Path(cfg.out).resolve() == RESULTS.resolve():
        from benchmarks import update_readme

        print("results page updated:", ", ".join(update_readme.update()) or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
