"""Every environment variable is declared, and documented, in detector/settings.py alone.

A variable read somewhere else (``os.environ.get("LIE_DETECTOR_X")``) is one a reader of
the settings module never learns about, with a default and parsing of its own; these tests
find such reads in the source (by its syntax tree, so comments and strings do not count)
and every ``LIE_DETECTOR_*`` name the code and docs mention that no settings class declares.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from detector import settings
from detector.settings import (
    ANNOTATE_ENV_PREFIX,
    ENV_PREFIX,
    HookSettings,
    SidecarSettings,
    StorageSettings,
    cache_dir,
    variables,
)

REPO = Path(__file__).resolve().parents[2]
SETTINGS_FILE = REPO / "detector" / "settings.py"
SOURCE_DIRS = ("detector", "probes", "benchmarks", "tests", "scripts")
# Generated gRPC code reads no environment.
SKIP = ("detector/api/",)
DOC_FILES = ["README.md", *(p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md")),
             *(p.relative_to(REPO).as_posix() for p in (REPO / "deploy").rglob("*")
               if p.is_file() and p.suffix in (".md", ".yaml", ".yml", ".toml"))]
_PREFIXES = (ENV_PREFIX, ENV_PREFIX.rstrip("_"))
_NAME = re.compile(r"LIE_DETECTOR_[A-Z0-9_]*[A-Z0-9]")


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    return [p for p in files
            if p != SETTINGS_FILE and not p.relative_to(REPO).as_posix().startswith(SKIP)]


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``)."""
    return ((isinstance(node, ast.Attribute) and node.attr == "environ"
             and isinstance(node.value, ast.Name) and node.value.id == "os")
            or (isinstance(node, ast.Name) and node.id == "environ"))


def _project_name(node: ast.AST | None, constants: dict[str, str]) -> str | None:
    """The ``LIE_DETECTOR_*`` name ``node`` spells (a literal, an f-string's leading text, or
    a module-level constant), else None."""
    text = None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        text = first.value if isinstance(first, ast.Constant) else None
    elif isinstance(node, ast.Name):
        text = constants.get(node.id)
    return text if text is not None and text.startswith(_PREFIXES) else None


def env_reads(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every read of a project variable in ``source``: through
    ``os.environ`` / ``os.getenv``, or a pydantic-settings class with the project's
    ``env_prefix``."""
    tree = ast.parse(source)
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            reader = ((isinstance(func, ast.Attribute) and _is_environ(func.value)
                       and func.attr in ("get", "pop", "setdefault"))
                      or (isinstance(func, ast.Attribute) and func.attr == "getenv"
                          and isinstance(func.value, ast.Name) and func.value.id == "os")
                      or (isinstance(func, ast.Name) and func.id == "getenv"))
            name = _project_name(node.args[0] if node.args else None, constants)
            if reader and name:
                found.append((node.lineno, name))
            for kw in node.keywords:
                prefix = _project_name(kw.value, constants)
                if kw.arg == "env_prefix" and prefix:
                    found.append((node.lineno, f"env_prefix={prefix}"))
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) \
                and isinstance(node.ctx, ast.Load):
            name = _project_name(node.slice, constants)
            if name:
                found.append((node.lineno, name))
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            name = _project_name(node.left, constants)
            if name:
                found.append((node.lineno, name))
    return found


def test_the_scanner_finds_each_kind_of_read() -> None:
    source = '''
import os
from os import environ, getenv
from pydantic_settings import SettingsConfigDict
KEY = "LIE_DETECTOR_CACHE"
a = os.environ.get("LIE_DETECTOR_CACHE")
b = os.environ["LIE_DETECTOR_LAYERS"]
c = os.getenv(KEY, "x")
d = environ.get(f"LIE_DETECTOR_{a}")
e = "LIE_DETECTOR_DISABLE" in os.environ
f = getenv("LIE_DETECTOR_CHANNEL")
g = SettingsConfigDict(env_prefix="LIE_DETECTOR_X_")
ok1 = os.environ.get("HOME")
os.environ["LIE_DETECTOR_LAYERS"] = "1"
ok2 = {k: v for k, v in os.environ.items() if not k.startswith("LIE_DETECTOR_")}
ok3 = env_like.get("LIE_DETECTOR_CACHE")
'''
    assert [line for line, _ in env_reads(source)] == [6, 7, 8, 9, 10, 11, 12]


def test_no_module_outside_settings_reads_a_project_variable() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}: {what}"
                 for path in _sources() for line, what in env_reads(path.read_text())]
    assert not offenders, ("read these through detector/settings.py:\n"
                           + "\n".join(offenders))


def test_the_settings_module_is_what_the_scanner_would_flag() -> None:
    # The scan skips detector/settings.py because it is where the reads are: it must see them.
    assert any(what.startswith("env_prefix=") for _, what in env_reads(SETTINGS_FILE.read_text()))


def test_every_variable_is_documented_once_with_its_default() -> None:
    declared: dict[str, set[str]] = defaultdict(set)
    for cls in settings.SETTINGS_CLASSES:
        for field, info in cls.model_fields.items():
            declared[settings.env_name(cls, field)].add(info.description or "")
    shared = {name: docs for name, docs in declared.items() if len(docs) > 1}
    assert not shared, f"declared more than once, with different text: {sorted(shared)}"
    for var in variables():
        assert var.description.strip(), f"{var.name} has no description"
        if var.default == "computed":  # a factory's default must be said in words
            assert "default" in var.description or "unset" in var.description, var.name
    names = [v.name for v in variables()]
    assert len(names) == len(set(names)) == len(declared)


def test_every_variable_the_code_and_docs_mention_is_declared() -> None:
    declared = {v.name for v in variables()}
    ignored = {ANNOTATE_ENV_PREFIX.rstrip("_")}  # "LIE_DETECTOR_ANNOTATE_*", the family
    unknown: dict[str, set[str]] = defaultdict(set)
    for path in [*(_sources()), *(REPO / p for p in DOC_FILES)]:
        if path == Path(__file__).resolve():  # the scanner's own examples
            continue
        for name in _NAME.findall(path.read_text()):
            if name not in declared and name not in ignored:
                unknown[name].add(str(path.relative_to(REPO)))
    assert not unknown, f"mentioned but not declared in detector/settings.py: {dict(unknown)}"


# ---------------------------------------------------------------------------- behaviour kept


def test_cache_dir_default_env_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LIE_DETECTOR_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "vllm-lie-detector"
    monkeypatch.setenv("LIE_DETECTOR_CACHE", "")  # empty: as unset
    assert cache_dir() == Path.home() / ".cache" / "vllm-lie-detector"
    monkeypatch.setenv("LIE_DETECTOR_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("LIE_DETECTOR_CACHE", "~/elsewhere")
    assert cache_dir() == Path.home() / "elsewhere"
    assert StorageSettings().cache == Path("~/elsewhere")


def test_launch_check_cache_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    # It alone did not expand "~" (it wrote under a folder named "~" in the working dir).
    from detector.serving.launch_checks import _cache_file

    monkeypatch.setenv("LIE_DETECTOR_CACHE", "~/lie-cache")
    assert _cache_file() == Path.home() / "lie-cache" / "capture-methods.json"


def test_the_three_cache_users_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from detector.models.embedded import default_model_dir
    from detector.serving.launch_checks import _cache_file
    from probes.pipeline import default_work_dir

    monkeypatch.setenv("LIE_DETECTOR_CACHE", str(tmp_path))
    assert default_model_dir().parent.parent == _cache_file().parent == tmp_path
    assert default_work_dir("p") == tmp_path / "training" / "p"


def test_empty_key_file_is_no_key_in_the_engine_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIE_DETECTOR_CHANNEL_KEY_FILE", "")
    assert HookSettings().channel_key_file is None
    assert SidecarSettings(probes=[]).channel_key_file == Path("")  # refused when read


def test_default_channel_is_per_user_under_the_runtime_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("LIE_DETECTOR_CHANNEL", raising=False)
    import os

    expected = f"ipc://{tmp_path}/lie-detector-{os.getuid()}/channel.sock"
    assert HookSettings().channel == SidecarSettings(probes=[]).channel == expected


def test_the_old_import_paths_still_work() -> None:
    from detector.config import HookSettings as FromConfig
    from detector.serving.openai_middleware import AnnotateSettings as FromMiddleware
    from detector.sidecar.app import SidecarSettings as FromApp

    assert FromConfig is HookSettings and FromApp is SidecarSettings
    assert FromMiddleware is settings.AnnotateSettings
