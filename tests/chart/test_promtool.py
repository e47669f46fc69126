"""The chart's PrometheusRule passes `promtool check rules`, and its alerts behave as meant.

The rules are the rendered chart's (default thresholds), written as a plain rule file
beside a copy of promtool/alerts_test.yaml, whose `promtool test rules` cases feed
synthetic series: a failed run, a stuck step and a restart storm fire, with their labels
and rendered annotations; running, moving, finished and calm series do not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from chart_render import one, render
from prometheus_tools import needs_promtool, promtool

ALERT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"

pytestmark = needs_promtool


def write_rule_file(folder: Path) -> Path:
    rule = one(render(values={"prometheusRule.enabled": True}), "PrometheusRule")
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_the_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    output = promtool("check", "rules", str(write_rule_file(tmp_path)))
    assert "SUCCESS: 3 rules found" in output, output


def test_each_alert_fires_on_trouble_and_not_on_healthy_series(tmp_path: Path) -> None:
    write_rule_file(tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    output = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert "SUCCESS" in output, output
