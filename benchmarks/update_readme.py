"""Write ``docs/results.md`` and the README's headline figures from ``benchmarks/results/``.

Every number a reader sees about performance or detection quality comes from a file a
benchmark wrote, never typed: this module renders each results file into a section of
``docs/results.md`` (saying which file and which command produced it) and the few headline
figures into the README block ``<!-- results:headline:start -->`` ... ``end -->``. A test
(``tests/unit/test_readme.py``) renders both again from the committed files and fails when
the committed page differs, so a table cannot go stale.

Results files record the commands and paths of the machine that ran them (a cache folder, a
work folder under ``/work``); a reader's machine has neither, so those are rewritten
(``--out /work/runs/x`` becomes ``--out OUT``, a bare path its last component) and the page
is refused if any machine path is left. ``benchmarks.run_all`` and ``benchmarks.heldout``
call :func:`update` after a full run; it can also be run on its own:

    .venv/bin/python -m benchmarks.update_readme            # write the page and the headline
    .venv/bin/python -m benchmarks.update_readme --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
GENERATOR = "python -m benchmarks.update_readme"

# A path that names one machine's folders: never in a page a reader follows.
MACHINE_PATH = re.compile(r"(?<![\w.:/])/(?:work|tmp|home|root|Users|var/folders)/[^\s`'\"),\]]*")
_OPTION_PATH = re.compile(r"(--[A-Za-z][\w-]*)([ =])(" + MACHINE_PATH.pattern + ")")
_HEADLINE = re.compile(r"(<!-- results:headline:start -->\n)(.*?)(<!-- results:headline:end -->)",
                       re.DOTALL)


def machine_free(text: str) -> str:
    """``text`` without machine paths: an option's path value becomes the option's name in
    capitals (``--work /work/runs/v3`` -> ``--work WORK``), any other path its last component.
    Raises ValueError when one is still left (the page is refused rather than leak one)."""
    text = _OPTION_PATH.sub(lambda m: f"{m.group(1)}{m.group(2)}"
                            f"{m.group(1).lstrip('-').replace('-', '_').upper()}", text)
    text = MACHINE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    left = MACHINE_PATH.search(text)
    if left:
        raise ValueError(f"machine path left in generated text: {left.group(0)!r}")
    return text


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _file(name: str) -> Callable[[], str]:
    def read() -> str:
        path = RESULTS / name
        return path.read_text() if path.is_file() else f"(not measured yet: {name} is missing)"
    return read


def _detection() -> str:
    from benchmarks import detection

    return detection.markdown(detection.summarise(detection.METRICS))


def _heldout() -> str:
    from benchmarks.heldout_report import markdown

    if not (RESULTS / "heldout.json").is_file():
        return "(not measured yet: heldout.json is missing)"
    return markdown(_load("heldout.json"))


def _soak() -> str:
    """The last soak run (tests/reliability/test_soak.py writes soak.json)."""
    if not (RESULTS / "soak.json").is_file():
        return "(not measured yet: soak.json is missing)"
    d = _load("soak.json")
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


_STALE_DETECTION = re.compile(r"#### Detection quality\n.*?(?=\nRuntime:)", re.DOTALL)


def _benchmarks() -> str:
    """The side-by-side run, less its detection table: that one measured the probe shipped
    when the run was made, and the page shows the shipped probe's own figures instead."""
    text = _file("benchmarks.md")()
    note = ("#### Detection quality\n\nThis run's detection table measured the probe shipped "
            "at its commit; the shipped probe's figures are in "
            "[Detection quality of the shipped probe](#detection-quality-of-the-shipped-probe).\n")
    return _STALE_DETECTION.sub(lambda _m: note, text)


@dataclass(frozen=True)
class Section:
    """One block of the page: what produced it, and how to render it from its file."""

    title: str
    source: str  # the results file(s), relative to the repository
    command: str  # the command that writes them
    render: Callable[[], str]
    intro: str = ""
    after: str = ""


SECTIONS: tuple[Section, ...] = (
    Section(
        "Served, held-out evaluation", "benchmarks/results/heldout.json",
        ".venv/bin/python -m benchmarks.heldout", _heldout,
        intro="`lie-detector evaluate-served` runs the same evaluation. Topics, question templates and entities the probe never trains on "
        "(`probes/datasets/heldout.py`; `tests/unit/test_heldout_leakage.py` fails if any "
        "reaches a training set), asked through `lie-detector serve` in three prompt styles "
        "and judged from `GetScores` exactly as a client reads it. Every configuration tried, "
        "won or lost: [judgement.md](judgement.md). Plot: `benchmarks/results/heldout.png`; "
        "every answer: `benchmarks/results/heldout-answers.jsonl`."),
    Section(
        "Detection quality of the shipped probe",
        "detector/default_probe/smollm2-135m-fabrication/metrics.json",
        ".venv/bin/lie-detector train-default", _detection,
        intro="The probe's own evaluation, written when it was trained "
        "([training.md](training.md)), on held-out spans of the training topics."),
    Section(
        "Decode throughput with three captured layers", "benchmarks/results/overhead.md",
        ".venv/bin/python -m benchmarks.overhead", _file("overhead.md"),
        after="This run captures three layers and uses non-streaming requests. On the shared "
        "machine (other jobs using 0.4-0.7 cores) repeated runs gave losses between -1% and "
        "+6%; on a quiet machine (other processes 0.01 cores) it gives the table above, and the "
        "side-by-side run puts plugin + sidecar at 1.005-1.022 of plugin off. The "
        "plugin's own time per engine step (0.1-0.2 ms, under 0.5%) is the stable figure; the "
        "spreads are part of the result."),
    Section(
        "All benchmarks side by side", "benchmarks/results/benchmarks.md",
        ".venv/bin/python -m benchmarks.run_all", _benchmarks,
        intro="Overhead next to plain vLLM and the peer `vllm-lens`, score delay and scoring "
        "throughput, measured in one run on one machine (`--quick` is CI's smoke run of the "
        "same command: one concurrency level, short rounds, every server eager; its numbers are "
        "not the table's). Raw numbers and plots: `benchmarks/results/benchmarks.json` and "
        "`benchmarks/results/*.png`."),
    Section(
        "Verdicts in the OpenAI response: what they cost", "benchmarks/results/annotation.md",
        ".venv/bin/python -m benchmarks.annotation", _file("annotation.md"),
        intro="Time to last byte of the same greedy requests with and without "
        "`X-Lie-Detector: annotate`, through one server. The extra time is the wait, after "
        "vLLM finished, for the sidecar's final scores; on the shared 2-core machine it was "
        "within the rounds' noise at 16 concurrent requests, and about 0.1-0.2 s at 1."),
    Section(
        "A stalled sidecar does not slow vLLM", "benchmarks/results/stall.md",
        ".venv/bin/python -m benchmarks.stall", _file("stall.md")),
    Section(
        "The API under many watched streams", "benchmarks/results/watchers.md",
        ".venv/bin/python -m benchmarks.watchers", _file("watchers.md"),
        intro="Every streamed request watched by its own `StreamScores`, a health check every "
        "0.1 s, vLLM throughput compared with unwatched rounds of the same run. The goals "
        "(issue 24): score delay p99 <= 50 ms, health p99 <= 100 ms and throughput >= 0.95 at "
        "64 and 256 streams on 2 cores. The last column is the part of the delay before the "
        "sidecar had the step's scores at all (its own histogram, unwatched rounds too): at 256 "
        "requests it alone reaches 100-250 ms at p99 on this machine, where vLLM's engine keeps "
        "both cores busy.",
        after="Measured on a quiet machine (nothing else running), 2 ABBA pairs. The same "
        "benchmark at the commit before issue 24's read path (one pair, same machine, minutes "
        "earlier) is below, and 1,024 streams in one round after it."),
    Section(
        "Watched streams before issue 24's read path",
        "benchmarks/results/watchers-before-issue24.md",
        "PYTHONPATH=<checkout of ec73ba4> .venv/bin/python -m benchmarks.watchers "
        "--concurrency 1,16,64,256 --pairs 1", _file("watchers-before-issue24.md"),
        intro="Each update copied the record and re-analysed the whole answer; a thread per "
        "stream. Sidecar CPU per token is the figure to compare; latencies swing from run to "
        "run by tens of ms."),
    Section(
        "1,024 watched streams", "benchmarks/results/watchers-1024.md",
        ".venv/bin/python -m benchmarks.watchers --concurrency 1024 --pairs 1",
        _file("watchers-1024.md"),
        intro="Every stream completes with every token scored; the sidecar's memory stays "
        "bounded (peak RSS in the table). Latency is not a goal at this load on 2 cores."),
    Section(
        "Sidecar threads under a burst of streams", "benchmarks/results/grpc_threads.md",
        ".venv/bin/python -m benchmarks.grpc_threads", _file("grpc_threads.md"),
        intro="Thread counts (not timings) of the sidecar at rest, with 256 streams open and "
        "after, on the server as it is now."),
    Section(
        "Sidecar threads: the thread-per-call server before it",
        "benchmarks/results/grpc_threads-thread-per-call.md",
        ".venv/bin/python -m benchmarks.grpc_threads --name grpc_threads-thread-per-call",
        _file("grpc_threads-thread-per-call.md"),
        intro="Run at the commit the table names, before the asyncio server."),
    Section(
        "Soak", "benchmarks/results/soak.json",
        "LIE_DETECTOR_SOAK_S=600 LIE_DETECTOR_SOAK_RESULTS=benchmarks/results/soak.json "
        "scripts/test.sh -k test_soak", _soak,
        after="The soak keeps every request's results until it has read them all at the end, "
        "so the sidecar's growth is those results (about 18 KiB of RSS per request), not a "
        "leak; in service they expire after `LIE_DETECTOR_FINISHED_TTL_S`. A plain test run "
        "keeps its report in pytest's temporary folder and leaves the committed file alone."),
)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def page() -> str:
    """The whole of docs/results.md."""
    out = ["# Results", "",
           f"Generated by `{GENERATOR}` from the files in `benchmarks/results/` (and the shipped "
           "probe's `metrics.json`); do not edit by hand: run the benchmark, then the generator. "
           "Figures measured on one machine compare within a table, not across tables.", ""]
    out += [f"- [{s.title}](#{_anchor(s.title)})" for s in SECTIONS]
    for s in SECTIONS:
        out += ["", f"## {s.title}", "",
                f"From `{s.source}`, written by `{s.command}`.", ""]
        if s.intro:
            out += [s.intro, ""]
        out.append(s.render().strip())
        if s.after:
            out += ["", s.after]
    return machine_free("\n".join(out) + "\n")


def headline() -> str:
    """The README's few figures, each with the section of the page it comes from."""
    h = _load("heldout.json")
    styles, verdicts = h["styles"], h["verdicts"]

    def auc(style: str, key: str) -> str:
        return f"{styles[style]['auroc'][key]['point']:.2f}"

    margin = styles["plain"]["probe_minus_baseline"]
    plain = verdicts["plain"]
    overhead = _load("overhead.json")["summary"]["ratio_a_over_b"]
    stall = _load("stall.json")["ratio_stalled_over_running"]
    link = "docs/results.md#"
    lines = [
        f"- Held-out topics, through `lie-detector serve`: fabrications ranked above correct "
        f"answers with AUROC {auc('plain', 'probe')} against {auc('plain', 'neg_min_logprob')} "
        f"for the answer's lowest token log-probability (plain prompts, margin "
        f"{margin['point']:+.2f}, 95% interval {margin['lo']:+.2f}..{margin['hi']:+.2f}); long "
        f"answers {auc('longform', 'probe')} against {auc('longform', 'neg_min_logprob')}; chat "
        f"{auc('chat', 'probe')} against {auc('chat', 'neg_min_logprob')} "
        f"([held-out evaluation]({link}{_anchor(SECTIONS[0].title)})).",
        f"- At the shipped threshold it flagged {100 * plain['false_flag_rate']:.0f}% of correct "
        f"plain answers and caught {100 * plain['recall']:.0f}% of fabrications.",
        f"- vLLM decode throughput with the plugin and sidecar on / off: {overhead['median']:.3f} "
        f"(median of {overhead['pairs']} pairs; [overhead]({link}{_anchor(SECTIONS[2].title)})).",
        f"- Throughput with the sidecar stalled / running: {stall['median']:.3f} "
        f"([stall]({link}{_anchor(SECTIONS[5].title)})).",
    ]
    return machine_free("\n".join(lines) + "\n")


def stale(readme: Path = README, results_page: Path = PAGE) -> list[str]:
    """The files whose committed text differs from what the results render to."""
    out = []
    if not results_page.is_file() or results_page.read_text() != page():
        out.append(str(results_page.relative_to(ROOT)))
    m = _HEADLINE.search(readme.read_text())
    if m is None or m.group(2) != headline():
        out.append(str(readme.relative_to(ROOT)))
    return out


def update(readme: Path = README, results_page: Path = PAGE) -> list[str]:
    """Write the page and the README's headline block; returns what was rewritten."""
    changed = stale(readme, results_page)
    results_page.write_text(page())
    text = readme.read_text()
    if not _HEADLINE.search(text):
        raise ValueError(f"{readme} has no <!-- results:headline:start/end --> block")
    readme.write_text(_HEADLINE.sub(lambda m: m.group(1) + headline() + m.group(3), text))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the page or the README is stale")
    args = parser.parse_args(argv)
    if args.check:
        late = stale()
        print("stale: " + ", ".join(late) if late else "up to date")
        return 1 if late else 0
    print("updated:", ", ".join(update()) or "nothing (already up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
