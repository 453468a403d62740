"""The README a newcomer reads to the end: short, every example run or checked by a test, its
figures generated, no link that leads nowhere and no path of the machine that wrote it.

The examples are read from README.md by name (``tests/readme_examples.py``). Shell examples
are checked here without running what is expensive: ``lie-detector`` commands through the
CLI's own argument parser (and each subcommand's ``--help``), the set-up and test scripts by
existing and being executable, ``curl`` and ``grpcurl`` by their bodies parsing as the API
expects; the integration tests named in ``COVERED`` run the Python, curl and grpcurl examples
against the session's real vLLM server and sidecar.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
from readme_examples import COVERED, FIGURE_LANGS, README, ROOT, blocks, examples, shell_commands

from benchmarks import update_readme

MAX_LINES = 200
MACHINE_PATH = re.compile(r"/(?:work|tmp|home|root|Users)/")
CLI_NAMES = ("lie-detector", ".venv/bin/lie-detector")


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < MAX_LINES, f"README.md has {lines} lines (the limit is {MAX_LINES - 1})"


def test_every_block_is_an_example_a_test_runs() -> None:
    unmarked = [f"line {b.line} ({b.lang or 'no language'})" for b in blocks(README.read_text())
                if b.name is None and b.lang not in FIGURE_LANGS]
    assert not unmarked, f"README blocks without <!-- example: NAME -->: {unmarked}"
    names = set(examples())
    assert names - set(COVERED) == set(), f"examples no test covers: {names - set(COVERED)}"
    assert set(COVERED) - names == set(), f"COVERED names examples the README lost: " \
        f"{set(COVERED) - names}"
    for name, tests in COVERED.items():
        for test in tests:
            path, function = test.split("::")
            tree = ast.parse((ROOT / path).read_text())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert function in defined, f"{name}: {test} does not exist"


def _check_cli(argv: list[str]) -> None:
    from detector.cli.commands import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"lie-detector {' '.join(argv)}: refused by the parser") from exc
    assert callable(getattr(args, "handler", None)), argv
    subcommand = [a for a in argv if not a.startswith("-")][:2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*subcommand[:1 if subcommand[0] != "model" else 2], "--help"])
    assert exit_.value.code == 0 and "usage: lie-detector" in out.getvalue()


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _check_grpcurl(argv: list[str]) -> None:
    from google.protobuf import json_format

    from detector.api.liedetector.v1 import detector_pb2 as pb

    service_name, method_name = argv[-1].rsplit("/", 1)
    assert service_name == pb.DESCRIPTOR.package + ".Detector", argv[-1]
    method = pb.DESCRIPTOR.services_by_name["Detector"].methods_by_name.get(method_name)
    assert method is not None, f"no method {method_name} in the proto"
    request = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
    from google.protobuf.message_factory import GetMessageClass

    json_format.Parse(_option(argv, "-d"), GetMessageClass(request)())
    assert re.fullmatch(r"[\w.]+:\d+", argv[-2]), argv


def _check_curl(argv: list[str]) -> None:
    url = next(a for a in argv[1:] if a.startswith(("localhost", "http")))
    assert re.match(r"(http://)?localhost:8000/v1/(chat/)?completions$", url), url
    body = json.loads(_option(argv, "-d"))
    assert body["model"] and body["max_tokens"] > 0
    headers = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
    assert "X-Lie-Detector: annotate" in headers


def test_shell_examples_parse() -> None:
    checked = 0
    for name, block in examples().items():
        if block.lang != "bash":
            continue
        for argv in shell_commands(block.code):
            program = argv[0]
            if program in CLI_NAMES:
                _check_cli(argv[1:])
            elif program.startswith("./scripts/"):
                script = ROOT / program
                assert script.is_file() and os.access(script, os.X_OK), f"{name}: {program}"
            elif program == "grpcurl":
                _check_grpcurl(argv)
            elif program == "curl":
                _check_curl(argv)
            else:
                raise AssertionError(f"example {name!r}: no check knows {program!r}; add one")
            checked += 1
    assert checked >= 8


def test_python_examples_compile() -> None:
    python = {n: b for n, b in examples().items() if b.lang == "python"}
    assert {"openai-python", "client"} <= set(python)
    for name, block in python.items():
        compile(block.code, f"README.md:{name}", "exec")


def test_another_model_is_the_page_a_test_runs() -> None:
    """tests/integration/test_your_model.py runs docs/your-model.md's first block as written:
    the README's must be the same commands."""
    page = (ROOT / "docs" / "your-model.md").read_text()
    first = next(b for b in blocks(page) if b.lang == "bash")
    assert shell_commands(examples()["another-model"].code) == shell_commands(first.code)


def test_serve_names_the_model_as_the_examples_do(tmp_path: Path) -> None:
    """The OpenAI examples name the model by its folder: ``serve`` must serve that name (and
    still the full path, which the demo and older clients send)."""
    from detector.serving.serve import ServeOptions, vllm_command

    named = {m.group(1) for n in ("openai-curl", "openai-python")
             for m in re.finditer(r'"?model"?\s*[:=]\s*"([^"]+)"', examples()[n].code)}
    assert len(named) == 1, named
    (model,) = named
    model_dir = tmp_path / model
    cmd = vllm_command(ServeOptions(model_dir=model_dir))
    start = cmd.index("--served-model-name") + 1
    names = cmd[start:next((i for i in range(start, len(cmd)) if cmd[i].startswith("--")),
                           len(cmd))]
    assert names == [model, str(model_dir)]
    # A name the user gives vLLM is theirs.
    own = vllm_command(ServeOptions(model_dir=model_dir,
                                    vllm_args=["--served-model-name", "mine"]))
    assert own.count("--served-model-name") == 1 and own[-1] == "mine"


def test_results_page_and_headline_are_generated() -> None:
    """docs/results.md and the README's headline figures are what the committed results
    render to: run ``python -m benchmarks.update_readme`` after a benchmark."""
    assert update_readme.stale() == [], "stale: run python -m benchmarks.update_readme"


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_no_machine_paths(doc: str) -> None:
    text = (ROOT / doc).read_text()
    found = [line.strip()[:160] for line in text.splitlines() if MACHINE_PATH.search(line)]
    assert not found, f"{doc} names paths of the machine that wrote it: {found}"


def test_machine_paths_are_rewritten() -> None:
    text = ("written by `lie-detector train-default --work /work/runs/v3 --out=/tmp/p/x "
            "--no-progress`, on /root/.cache/vllm-lie-detector/models/SmolLM2-135M-Instruct/")
    assert update_readme.machine_free(text) == (
        "written by `lie-detector train-default --work WORK --out=OUT --no-progress`, on "
        "SmolLM2-135M-Instruct")
    assert update_readme.machine_free("ipc:///run/x.sock and benchmarks/results/") == \
        "ipc:///run/x.sock and benchmarks/results/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "deploy" / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    broken = []
    for target in _LINK.findall(re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.is_file():
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links that lead nowhere: {broken}"


def test_readme_paths_exist() -> None:
    """Files and folders the README names in backticks are there."""
    text = README.read_text()
    named = set(re.findall(r"`((?:docs|benchmarks|proto|scripts|deploy|tests)/[\w./-]*)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
