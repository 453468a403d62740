"""The README's main job, end to end: `lie-detector demo` as a newcomer runs it (short mode)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from detector.cli.demo import DEFAULT_QUESTIONS

pytestmark = pytest.mark.vllm


class _Report(HTMLParser):
    """Collects, per answer block, the heat-map text, outlined text and the spans table."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[dict] = []
        self._in_tok = self._in_flag = self._in_td = self._in_h3 = False
        self._field: str | None = None
        self._row: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("class") == "answer":
            self.answers.append({"question": "", "text": "", "outlined": "", "rows": [],
                                 "truth": "", "verdict": ""})
        elif self.answers and tag == "span" and a.get("class") in ("truth", "verdict"):
            self._field = a["class"]
        elif self.answers and tag == "span" and "tok" in a.get("class", ""):
            self._in_tok, self._in_flag = True, "flag" in a.get("class", "")
        elif self.answers and tag == "h3":
            self._in_h3 = True
        elif self.answers and tag == "tr":
            self._row = []
        elif self.answers and tag == "td":
            self._in_td = True

    def handle_endtag(self, tag) -> None:
        if tag == "span":
            self._in_tok = self._in_flag = False
            self._field = None
        elif tag == "h3":
            self._in_h3 = False
        elif tag == "td":
            self._in_td = False
        elif tag == "tr" and self.answers and self._row:
            self.answers[-1]["rows"].append(self._row)

    def handle_data(self, data) -> None:
        if not self.answers:
            return
        cur = self.answers[-1]
        if self._field:
            cur[self._field] += data
        if self._in_h3:
            cur["question"] += data
        if self._in_tok:
            cur["text"] += data
            if self._in_flag:
                cur["outlined"] += data
        if self._in_td:
            self._row.append(data)


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention the demo's private directory."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or marker in env:
            out.append(cmd)
    return out


def test_demo_runs_end_to_end_and_tells_the_truth(tmp_path, model_dir) -> None:
    """The whole demo as a newcomer runs it: correct answers unflagged, fabrications flagged."""
    report = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "detector.cli", "demo", "--report", str(report)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120", "TERM": "dumb"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for q in DEFAULT_QUESTIONS:
        assert f"Q: {q}" in out
    assert "precision" in out and "recall" in out, "no measured quality line under the summary"
    assert "Summary" in out and f"HTML report: {report}" in out
    # No wall of vLLM log lines without --verbose.
    assert "INFO" not in out and "(EngineCore" not in out + proc.stderr

    parsed = _Report()
    parsed.feed(report.read_text())
    assert [a["question"] for a in parsed.answers] == DEFAULT_QUESTIONS
    verdicts = {a["question"]: (a["truth"], a["verdict"]) for a in parsed.answers}
    correct = {q: v for q, (t, v) in verdicts.items() if t == "correct"}
    made_up = {q: v for q, (t, v) in verdicts.items() if t.startswith(("wrong", "made up"))}
    assert len(correct) >= 3 and len(made_up) >= 3, verdicts  # the model answers as measured
    assert all(v == "ok" for v in correct.values()), f"a correct answer was flagged: {verdicts}"
    assert sum(v == "made up" for v in made_up.values()) >= 2, f"fabrications missed: {verdicts}"
    for answer in parsed.answers:
        assert answer["text"].strip(), f"empty answer for {answer['question']}"
        flagged = [r[0] for r in answer["rows"] if r[-1] == "yes" and r[1] == "claim"]
        # Every flagged claim is outlined in the heat map, a flagged sentence holds a flagged
        # claim, and every span row has a score and the probe's threshold.
        for text in flagged:
            assert text in answer["outlined"]
        for row in answer["rows"]:
            if row[1] == "sentence" and row[-1] == "yes":
                assert any(c in row[0] for c in flagged), row
        for row in answer["rows"]:
            assert float(row[3]) >= 0 and 0 < float(row[4]) < 1

    logs = re.search(r"process logs: (\S+)", out)
    assert logs, out
    assert _leftovers(logs.group(1)) == [], "the demo left processes running"


_CLI_WITH_CTRL_C = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "from detector.cli import main; sys.exit(main(sys.argv[1:]))")


def test_demo_ctrl_c_shuts_everything_down(tmp_path, model_dir) -> None:
    # As from a terminal: a suite started in the background (`cmd &`, nohup) passes SIGINT
    # on ignored, and Python then keeps ignoring it, so Ctrl-C is switched back on first.
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI_WITH_CTRL_C, "demo", "--short", "--report",
         str(tmp_path / "r.html")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    time.sleep(8)  # vLLM is starting
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "shutting down" in out
    deadline = time.monotonic() + 20
    while _leftovers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _leftovers(str(tmp_path)) == []
