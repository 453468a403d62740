"""The README's examples, by name, and the tests that run them.

Every fenced block in README.md comes right after a marker ``<!-- example: NAME -->``
(figures, fenced as ```text, excepted). ``COVERED`` names, for each example, the tests that
run or check it; ``tests/unit/test_readme.py`` fails when a block has no marker, when a name
is not in ``COVERED`` (or ``COVERED`` names one the README lost), or when a named test does
not exist. So a new example cannot go in untested, and the tests read the examples from the
README itself rather than from a copy that could drift.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!-- example: ([\w-]+) -->\n$")
FIGURE_LANGS = ("text",)

UNIT = "tests/unit/test_readme.py"
DEMO = "tests/integration/test_demo.py::test_demo_runs_end_to_end_and_tells_the_truth"
ANNOTATIONS = "tests/integration/test_openai_annotations.py::test_readme_openai_examples_run"
COVERED: dict[str, tuple[str, ...]] = {
    "setup-and-demo": (f"{UNIT}::test_shell_examples_parse", DEMO),
    "tests": (f"{UNIT}::test_shell_examples_parse",),
    "serve": (f"{UNIT}::test_shell_examples_parse",
              f"{UNIT}::test_serve_names_the_model_as_the_examples_do"),
    "openai-curl": (f"{UNIT}::test_shell_examples_parse", ANNOTATIONS),
    "openai-python": (f"{UNIT}::test_python_examples_compile", ANNOTATIONS),
    "client": (f"{UNIT}::test_python_examples_compile",
               "tests/integration/test_client.py::test_readme_example_runs"),
    "grpc": (f"{UNIT}::test_shell_examples_parse",
             "tests/integration/test_client.py::test_readme_grpc_example_runs"),
    "another-model": (f"{UNIT}::test_another_model_is_the_page_a_test_runs",
                      "tests/integration/test_your_model.py::"
                      "test_the_three_documented_commands_take_a_model_to_a_served_probe"),
    "sidecar": (f"{UNIT}::test_shell_examples_parse",),
}


@dataclass(frozen=True)
class Block:
    """A fenced block: its marker's name (None without one), language, text and line."""

    name: str | None
    lang: str
    code: str
    line: int


def blocks(text: str) -> list[Block]:
    out = []
    for m in _BLOCK.finditer(text):
        mark = _MARK.search(text, 0, m.start())
        name = mark.group(1) if mark and mark.end() == m.start() else None
        out.append(Block(name, m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return out


def examples(path: Path = README) -> dict[str, Block]:
    """The marked blocks of ``path`` by name (a name used twice is an error)."""
    found: dict[str, Block] = {}
    for b in blocks(path.read_text()):
        if b.name is not None:
            if b.name in found:
                raise ValueError(f"{path.name}: example {b.name!r} appears twice")
            found[b.name] = b
    return found


def example(name: str) -> str:
    return examples()[name].code


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell example as argument lists: continuation lines joined, quotes
    spanning lines kept whole, ``&&`` chains split, comments dropped."""
    commands: list[list[str]] = []
    pending = ""
    for line in code.splitlines():
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        pending = ""
        current: list[str] = []
        for word in words:
            if word == "&&":
                commands.append(current)
                current = []
            else:
                current.append(word)
        if current:
            commands.append(current)
    assert not pending.strip(), f"unterminated shell command: {pending!r}"
    return commands
