"""Every metric the dashboard and the rules query is one the sidecar really exports.

No server: names come from ``detector.sidecar.metrics.SidecarMetrics().registry``. A renamed
metric would otherwise leave a dashboard panel empty and an alert silently unable to fire.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import (  # noqa: E402
    DASHBOARD,
    METRIC_RE,
    RECORD_RE,
    RULE_FILES,
    exported_metrics,
    load_rules,
    recorded_names,
    require_tool,
    rules_text,
    run,
)

# Labels Prometheus attaches to every scraped series (static configs, pod discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
MATCHER_RE = re.compile(r"\b(lie_detector_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
LABEL_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _dashboard_queries() -> list[str]:
    """PromQL of every panel target and of every templating variable."""
    dash = _dashboard()
    queries = []
    panels = list(dash["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries.extend(t["expr"] for t in panel.get("targets", []))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append(query)
    return queries


def _check_names(text: str, where: str) -> set[str]:
    exported = exported_metrics()
    used = set(METRIC_RE.findall(text))
    unknown = sorted(used - set(exported))
    assert not unknown, (f"{where} names metrics the sidecar does not export: {unknown}; "
                         f"exported: {sorted(exported)}")
    return used


def _check_labels(text: str, where: str) -> None:
    exported = exported_metrics()
    all_labels = {label for _, labels in exported.values() for label in labels} | TARGET_LABELS
    for name, body in MATCHER_RE.findall(text):
        allowed = set(exported[name][1]) | TARGET_LABELS
        for label in LABEL_RE.findall(body):
            assert label in allowed, f"{where}: {name} has no label {label!r} (has {sorted(allowed)})"
    for group in GROUPING_RE.findall(text):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in all_labels, f"{where}: no metric has a label {label!r} to group by"


def test_registry_lists_every_sidecar_metric_with_its_suffixes() -> None:
    names = exported_metrics()
    assert "lie_detector_steps_received_total" in names
    assert "lie_detector_score_delay_seconds_bucket" in names
    assert names["lie_detector_spans_flagged_total"][1] == ("probe", "kind")
    assert "lie_detector_steps_received" not in names  # counters are only seen as _total
    assert "lie_detector_hook_connected" in names


def test_dashboard_queries_name_only_exported_metrics() -> None:
    text = DASHBOARD.read_text()
    used = _check_names(text, DASHBOARD.name)
    for query in _dashboard_queries():
        _check_labels(query, DASHBOARD.name)
    # The dashboard covers what on-call needs: every sidecar metric family shows somewhere.
    families = {family for family, _ in exported_metrics().values()}
    shown = {exported_metrics()[name][0] for name in used}
    assert families - shown == set(), f"metrics with no panel: {sorted(families - shown)}"


def test_dashboard_recording_rule_series_are_recorded() -> None:
    used = set(RECORD_RE.findall(DASHBOARD.read_text()))
    assert used, "the dashboard shows no recording rule (flag ratio, SLO burn)"
    missing = sorted(used - recorded_names())
    assert not missing, f"{DASHBOARD.name} reads series no rule records: {missing}"


def test_rules_name_only_exported_metrics() -> None:
    text = rules_text()
    used = _check_names(text, "deploy/prometheus/rules")
    for rule in load_rules():
        _check_labels(rule["expr"], rule.get("alert") or rule.get("record"))
    # The metrics the issue names for alerting are all used.
    for name in ("lie_detector_hook_connected", "lie_detector_spans_flagged_total",
                 "lie_detector_channel_dropped_steps_total",
                 "lie_detector_score_delay_seconds_bucket",
                 "lie_detector_probe_load_failures_total"):
        assert name in used, name
    missing = sorted(set(RECORD_RE.findall(text)) - recorded_names())
    assert not missing, f"rules read series no rule records: {missing}"


def test_score_delay_slo_threshold_is_a_real_bucket_bound() -> None:
    """{le="0.25"} only selects something if 0.25 is one of the histogram's bucket bounds."""
    from detector.sidecar.metrics import SidecarMetrics

    bounds = SidecarMetrics().score_delay_seconds._upper_bounds
    for le in re.findall(r'lie_detector_score_delay_seconds_bucket\{[^}]*le="([^"]+)"', rules_text()):
        assert float(le) in bounds, f"le={le} is not a bucket bound of {bounds}"


def test_dashboard_is_well_formed() -> None:
    dash = _dashboard()
    ids = []
    panels = list(dash["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        ids.append(panel["id"])
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target["refId"], panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "probe"} <= variables
    assert dash["uid"] and dash["title"]


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every query, as recording rules, once Grafana's variables are filled."""
    promtool = require_tool("promtool", "apt-get install prometheus (scripts/setup.sh --test)")
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$job": "lie-detector", "$instance": ".*", "$probe": ".*"}
    rules = []
    for i, query in enumerate(_dashboard_queries()):
        if query.startswith("label_values("):
            # Grafana's own function: its argument is a series selector.
            query = re.match(r"label_values\((.*),\s*\w+\)$", query).group(1)
        for var, value in substitutions.items():
            query = query.replace(var, value)
        assert "$" not in query, f"unknown Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_files_are_found(path: Path) -> None:
    assert yaml.safe_load(path.read_text())["groups"]
