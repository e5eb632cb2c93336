"""The chart's alerts: valid Prometheus rules (`promtool check rules`) that fire when they should
(`promtool test rules` on alerts_test.yaml). promtool missing is a failure: run hack/install-system-deps."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from kubetune_dashboard.alerts import render_rules

from tests.chart.conftest import run, tool

HERE = Path(__file__).resolve().parent


def _write_rules(tmp_path: Path, values: tuple[str, ...] = ()) -> Path:
    path = tmp_path / "kubetune.rules.yaml"
    path.write_text(yaml.safe_dump(render_rules(values=values), sort_keys=False))
    return path


def test_promtool_check_rules(tmp_path):
    rules = _write_rules(tmp_path)
    out = run(tool("promtool"), "check", "rules", str(rules)).stdout
    assert "SUCCESS: 4 rules found" in out


def test_promtool_check_rules_with_custom_values(tmp_path):
    custom = ("prometheusRule.trainingStalledFor=30m", "prometheusRule.alertLabels.team=ml")
    rules = _write_rules(tmp_path, custom)
    run(tool("promtool"), "check", "rules", str(rules))
    groups = yaml.safe_load(rules.read_text())["groups"]
    stalled = next(r for r in groups[0]["rules"] if r["alert"] == "KubetuneTrainingStalled")
    assert stalled["for"] == "30m" and stalled["labels"]["team"] == "ml"


def test_promtool_unit_tests_every_alert(tmp_path):
    _write_rules(tmp_path)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    tested = {t["alertname"] for case in yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in render_rules()["groups"] for r in g["rules"]}
    assert alerts <= tested, f"alerts without a promtool unit test: {alerts - tested}"
    proc = run(tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert "SUCCESS" in proc.stdout
