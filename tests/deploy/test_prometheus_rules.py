"""The recording and alerting rules, checked and unit-tested with promtool.

promtool comes with Debian's `prometheus` package (scripts/setup.sh --test installs it). Every
alert must have a promtool test case where it fires and one where it stays silent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import (  # noqa: E402
    DOCKER,
    KUBERNETES,
    REPO,
    RULE_FILES,
    RULE_TESTS,
    load_rules,
    require_tool,
    run,
)

HOW = "apt-get install prometheus (scripts/setup.sh --test does it)"


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", HOW)


def test_rule_files_pass_promtool_check(promtool: str) -> None:
    result = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(promtool: str, test_file: Path) -> None:
    result = run([promtool, "test", "rules", test_file.name], cwd=test_file.parent, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in spec["rule_files"]] == RULE_FILES, (
            f"{path.name} must load the real rule files")
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts, "no alerting rule found"
    assert alerts - fired == set(), f"alerts never seen firing in a test: {sorted(alerts - fired)}"
    assert alerts - silent == set(), f"alerts never seen silent in a test: {sorted(alerts - silent)}"
    assert (fired | silent) - alerts == set(), "tests name alerts that do not exist"


def test_alerts_carry_severity_and_text() -> None:
    for rule in load_rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), f"{rule['alert']}: no {key}"
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        readme = (REPO / "deploy" / "README.md").read_text().lower()
        assert f"### {rule['alert'].lower()}" in readme, f"no runbook section for {anchor}"


def test_prometheusrule_object_carries_the_same_rules() -> None:
    """deploy/kubernetes/base/prometheusrule.yaml is generated from the rule file."""
    generated = yaml.safe_load((KUBERNETES / "base" / "prometheusrule.yaml").read_text())
    source = yaml.safe_load(RULE_FILES[0].read_text())
    assert generated["spec"]["groups"] == source["groups"], (
        "out of date: run python deploy/prometheus/sync_prometheusrule.py")
    result = run([sys.executable, "deploy/prometheus/sync_prometheusrule.py", "--check"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """promtool checks the compose Prometheus config, with the rule files where they are."""
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    config["rule_files"] = [str(path) for path in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run([promtool, "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert "lie-detector" in jobs  # the rules select job="lie-detector"
