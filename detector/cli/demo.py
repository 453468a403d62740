"""``lie-detector demo``: the product working on the embedded model, offline, in minutes.

It starts vLLM (CPU build) with the plugin and the sidecar with the default probe, asks a mix
of questions the model knows and questions it will make answers up to, shows each answer as
it streams with its token scores and flagged spans, read through the same gRPC stream a
serving stack would use, then prints a summary and writes an HTML report.
"""

from __future__ import annotations

import html
import json
import logging
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from detector.artifact import default_probe_dir
from detector.serving.client import DetectorClient, RequestState, Span, TokenScore, Verdict
from detector.serving.serve import (
    ServeOptions,
    Supervisor,
    wait_for_grpc_health,
    wait_until_healthy,
)

logger = logging.getLogger(__name__)

# Questions the model answers right, and ones it answers wrong with confidence (measured on
# SmolLM2-135M-Instruct, greedy), plus entities that do not exist. The value is the true
# answer (None: the entity does not exist, so every answer is made up); the summary says
# whether the model's answer holds it, next to the detector's verdict.
TRUTH: dict[str, str | None] = {
    "What is the capital of France?": "Paris",
    "What is the chemical symbol of gold?": "Au",
    "What is the capital of Australia?": "Canberra",
    "Who discovered the element Quorvium?": None,
    "What is the capital of Burkina Faso?": "Ouagadougou",
    "What is the capital of Canada?": "Ottawa",
    "In which year did the Battle of Valdoria take place?": None,
    "Who was the first president of Eldoria?": None,
    "What is the capital of Germany?": "Berlin",
}
DEFAULT_QUESTIONS = list(TRUTH)
SHORT_QUESTIONS = DEFAULT_QUESTIONS[:3]
SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."
# The served held-out evaluation's summary, in the probe's directory (benchmarks/heldout.py).
HELDOUT_SUMMARY = "heldout.json"


@dataclass
class Answer:
    question: str
    request_id: str
    text: str = ""
    tokens: list[TokenScore] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    state: RequestState = RequestState.UNSPECIFIED
    seconds: float = 0.0

    @property
    def flagged(self) -> list[Span]:
        return [s for s in self.spans if s.flagged]

    @property
    def claims(self) -> list[Span]:
        return [s for s in self.spans if s.kind == "claim"]

    @property
    def truth(self) -> str:
        """Whether the answer is right, by the demo's own ground truth ("?" without one)."""
        if self.question not in TRUTH:
            return "?"
        true = TRUTH[self.question]
        if true is None:
            return "made up (no such thing)"
        return "correct" if true.lower() in self.text.lower() else f"wrong (it is {true})"

    @property
    def verdict(self) -> bool | None:
        """The response verdict (any claim flagged); None when nothing was judged."""
        judged = [v for v in self.verdicts if v.claims]
        return any(v.flagged for v in judged) if judged else None

    def token_probability(self, token: TokenScore) -> float | None:
        return max((s.probability for s in token.scores), default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, *, model: str | None, questions: list[str], max_tokens: int,
                 report: Path, probe: Path | None, verbose: bool, console: Console) -> None:
        self.model_arg = model
        self.questions = questions
        self.max_tokens = max_tokens
        self.report = report
        self.probe = probe
        self.verbose = verbose
        self.console = console
        self.supervisor: Supervisor | None = None
        self.logs = Path(tempfile.mkdtemp(prefix="lie-detector-demo-"))

    # ----------------------------------------------------------------- set-up
    def start(self) -> None:
        from detector.models.embedded import resolve_model
        from detector.model_identity import identify_model

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            task = progress.add_task("preparing the model", total=None)
            model_dir = resolve_model(self.model_arg)
            progress.update(task, description=f"model ready: {model_dir.name}", completed=1,
                            total=1)
            opts = ServeOptions(
                model_dir=model_dir, port=_free_port(),
                grpc_address=f"127.0.0.1:{_free_port()}", metrics_port=None,
                probes=[self.probe] if self.probe else [],
                channel=f"ipc://{self.logs}/channel.sock", max_model_len=1024,
                log_dir=None if self.verbose else self.logs,
            )
            self.opts = opts
            self.supervisor = Supervisor(opts, identify_model(model_dir).num_layers)
            task = progress.add_task("starting vLLM (CPU build) with the plugin, and the "
                                     "sidecar", total=None)
            self.supervisor.start()
            wait_for_grpc_health(opts.grpc_address, self.supervisor.sidecar, timeout_s=120)
            wait_until_healthy(f"http://{opts.host}:{opts.port}", self.supervisor.vllm,
                               timeout_s=600)
            wait_for_grpc_health(opts.grpc_address, self.supervisor.sidecar, timeout_s=60,
                                 service="liedetector.v1.Hook")
            progress.update(task, description="vLLM and the sidecar are up", completed=1,
                            total=1)
        if not self.verbose:
            self.console.print(f"[dim]process logs: {self.logs}[/dim]")

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.shutdown()
            self.supervisor = None

    # ----------------------------------------------------------------- asking
    def ask_all(self) -> list[Answer]:
        answers = []
        with DetectorClient(self.opts.grpc_address) as client:
            for i, question in enumerate(self.questions):
                answers.append(self.ask(client, question, f"demo-{int(time.time())}-{i}"))
        return answers

    def ask(self, client: DetectorClient, question: str, request_id: str) -> Answer:
        answer = Answer(question, request_id)
        self.console.print(Text(f"\nQ: {question}", style="bold"))
        started = time.monotonic()
        error: list[BaseException] = []

        def generate() -> None:
            try:
                resp = httpx.post(
                    f"http://{self.opts.host}:{self.opts.port}/v1/chat/completions",
                    headers={"X-Request-Id": request_id}, timeout=300,
                    json={"model": str(self.opts.model_dir), "max_tokens": self.max_tokens,
                          "temperature": 0.0,
                          "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": question}]})
                resp.raise_for_status()
            except BaseException as exc:  # reported after the stream ends
                error.append(exc)

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        with Live(self._render(answer), console=self.console, refresh_per_second=12) as live:
            for update in client.stream_scores(request_id, timeout=300):
                answer.tokens.extend(update.tokens)
                answer.spans.extend(update.spans)
                answer.verdicts.extend(update.verdicts)
                answer.state = update.state
                live.update(self._render(answer))
        worker.join()
        if error:
            raise error[0]
        answer.text = "".join(t.text for t in answer.tokens)
        answer.seconds = time.monotonic() - started
        for span in answer.flagged:
            if span.kind == "claim":
                self.console.print(Text(f"   flagged: {span.text!r} score {span.score:.2f} >= "
                                        f"threshold {span.threshold:.2f}", style="red"))
        return answer

    def _render(self, answer: Answer) -> Text:
        text = Text("A: ")
        flagged_chars = _flagged_chars(answer)
        pos = 0
        for token in answer.tokens:
            p = answer.token_probability(token)
            style = _heat_style(p)
            if any(pos <= c < pos + len(token.text) for c in flagged_chars):
                style += " bold underline"
            text.append(token.text, style=style)
            pos += len(token.text)
        return text

    # ----------------------------------------------------------------- results
    def summary(self, answers: list[Answer]) -> Table:
        table = Table(title="Summary")
        table.add_column("question")
        table.add_column("answer")
        table.add_column("truth")
        table.add_column("verdict")
        table.add_column("max claim score", justify="right")
        table.add_column("flagged claims")
        for a in answers:
            top = max((s.score for s in a.claims), default=float("nan"))
            flagged = ", ".join(sorted({s.text for s in a.flagged if s.kind == "claim"}))
            verdict = {None: "[dim]no claim judged[/dim]", True: "[red]made up[/red]",
                       False: "[green]ok[/green]"}[a.verdict]
            table.add_row(a.question, a.text.strip()[:60], a.truth, verdict, f"{top:.2f}",
                          flagged or "-")
        return table


def measured_quality(probe: Path | None) -> str | None:
    """One line with the probe's measured held-out precision and recall, when its directory
    carries the served evaluation's summary (``heldout.json``, from benchmarks/heldout.py)."""
    if probe is None or not (probe / HELDOUT_SUMMARY).is_file():
        return None
    try:
        data = json.loads((probe / HELDOUT_SUMMARY).read_text())
        v = data["response_verdict"]
        return (f"Measured on {v['answers']} answers to held-out topics and prompts the probe "
                f"never trained on, through the served path: a flagged answer is made up "
                f"{v['precision']:.0%} of the time (precision), and {v['recall']:.0%} of made-up "
                f"answers are flagged (recall); {v['false_flag_rate']:.0%} of correct answers "
                f"are flagged. Source: {data.get('source', HELDOUT_SUMMARY)}.")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("unreadable %s in %s: %s", HELDOUT_SUMMARY, probe, exc)
        return None


def _flagged_chars(answer: Answer, kinds: tuple[str, ...] = ("claim",)) -> set[int]:
    """Characters inside flagged spans of the given kinds."""
    chars: set[int] = set()
    for s in answer.flagged:
        if s.kind in kinds:
            chars.update(range(s.char_start, s.char_end))
    return chars


def _heat_style(p: float | None) -> str:
    if p is None:
        return "dim"
    if p >= 0.75:
        return "red"
    if p >= 0.5:
        return "yellow"
    return "green"


def _verdict_word(verdict: bool | None) -> str:
    return {None: "no claim judged", True: "made up", False: "ok"}[verdict]


def write_report(answers: list[Answer], path: Path, *, probe: Path | None,
                 quality: str | None = None) -> Path:
    """A self-contained HTML page: every answer, a per-token heat map, spans and thresholds."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lie-detector demo</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}"
        ".tok{border-radius:3px;padding:0 1px}.flag{outline:2px solid #c00}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        ".answer{margin:1.5em 0;padding:1em;border:1px solid #ddd;border-radius:6px}</style>",
        "</head><body><h1>lie-detector demo</h1>",
        f"<p>Probe: <code>{html.escape(str(probe) if probe else 'none')}</code>. Token colour "
        "is the calibrated probability of fabrication (white 0, red 1); outlined spans were "
        "flagged.</p>",
        "<h2>Summary</h2><table><tr><th>question</th><th>answer</th><th>truth</th>"
        "<th>verdict</th><th>flagged claims</th></tr>",
    ]
    for a in answers:
        flagged = ", ".join(sorted({s.text for s in a.flagged if s.kind == "claim"}))
        parts.append(f"<tr><td>{html.escape(a.question)}</td><td>{html.escape(a.text)}</td>"
                     f"<td>{html.escape(a.truth)}</td><td>{_verdict_word(a.verdict)}</td>"
                     f"<td>{html.escape(flagged) or '-'}</td></tr>")
    parts.append("</table>")
    if quality:
        parts.append(f"<p class='quality'>{html.escape(quality)}</p>")
    for a in answers:
        flagged_chars = _flagged_chars(a, kinds=("claim",))
        parts.append(f"<div class='answer' id='{html.escape(a.request_id)}'>"
                     f"<h3>{html.escape(a.question)}</h3>"
                     f"<p>truth: <span class='truth'>{html.escape(a.truth)}</span>; verdict: "
                     f"<span class='verdict'>{_verdict_word(a.verdict)}</span></p><p>")
        pos = 0
        for t in a.tokens:
            p = a.token_probability(t)
            color = "transparent" if p is None else f"rgba(220,0,0,{p:.2f})"
            cls = "tok flag" if any(pos <= c < pos + len(t.text) for c in flagged_chars) else "tok"
            title = "unscored" if p is None else f"p={p:.3f}"
            parts.append(f"<span class='{cls}' style='background:{color}' title='{title}'>"
                         f"{html.escape(t.text)}</span>")
            pos += len(t.text)
        parts.append("</p><table><tr><th>span</th><th>kind</th><th>probe</th><th>score</th>"
                     "<th>threshold</th><th>flagged</th></tr>")
        for s in a.spans:
            parts.append(f"<tr><td>{html.escape(s.text)}</td><td>{s.kind}</td>"
                         f"<td>{html.escape(s.probe)}</td><td>{s.score:.3f}</td>"
                         f"<td>{s.threshold:.3f}</td><td>{'yes' if s.flagged else 'no'}</td></tr>")
        parts.append("</table></div>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def run_demo(*, model: str | None, questions: list[str] | None, short: bool, report: Path,
             probe: Path | None, verbose: bool) -> int:
    console = Console()
    if not verbose:
        for name in ("httpx", "detector.serving.serve", "detector.models.embedded"):
            logging.getLogger(name).setLevel(logging.WARNING)
    probe = probe or default_probe_dir()
    if probe is None:
        console.print("[yellow]No default probe is installed: scores will be empty. Train one "
                      "with `lie-detector train` (docs/training.md) or pass --probe.[/yellow]")
    demo = Demo(model=model, questions=questions or (SHORT_QUESTIONS if short
                                                     else DEFAULT_QUESTIONS),
                max_tokens=24 if short else 48, report=report, probe=probe, verbose=verbose,
                console=console)
    try:
        demo.start()
        answers = demo.ask_all()
        console.print(demo.summary(answers))
        quality = measured_quality(probe)
        if quality:
            console.print(quality)
        path = write_report(answers, report, probe=probe, quality=quality)
        console.print(f"HTML report: {path}")
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: shutting down[/yellow]")
        return 130
    finally:
        demo.stop()
