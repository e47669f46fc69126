"""The dashboard and the alerts query only metrics and labels that really exist.

The exported names come from the code, not from a list: the operator's collectors in
`kubetrain.opmetrics` and the gauges a real `kubetrain_trainer.metrics.PrometheusCallback`
registers (for a language-modelling and a DPO run, with a GPU pretended so the GPU gauge
exists). Each family becomes the sample names Prometheus stores (`_total` for counters,
`_bucket`/`_sum`/`_count` for histograms). Labels are the metric's own plus those the
scrape adds: prometheus-operator's target labels and the PodMonitor's relabelings, read
from the rendered chart. Every `kubetrain_*` name in a PromQL expression, every label in a
matcher, `by (...)`, `label_values(...)`, legend or alert annotation must be one of them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from chart_render import CHART, one, render
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from kubetrain import opmetrics
from kubetrain_trainer.contract import EVAL_SUITE_METRICS, eval_gauge_name, eval_metric_key

# Labels prometheus-operator puts on every scraped target (besides relabelings).
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "instance", "job"}
SERVICE_TARGET_LABELS = TARGET_LABELS | {"service"}
SUFFIXES = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
METRIC_NAME = re.compile(r"\bkubetrain_[a-z0-9_]+\b")


def _operator_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for the operator's own collectors."""
    exported = {}
    collectors = [v for v in vars(opmetrics).values() if isinstance(v, MetricWrapperBase)]
    assert collectors, "kubetrain.opmetrics defines no metrics"
    for collector in collectors:
        assert collector in REGISTRY._collector_to_names, collector  # served on /metrics
        (family,) = collector.describe()
        labels = set(collector._labelnames) | SERVICE_TARGET_LABELS
        for suffix in SUFFIXES[family.type]:
            exported[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return exported


def _trainer_metrics(monkeypatch, scrape_labels: set[str]) -> dict[str, set[str]]:
    """Sample name -> label names, for every gauge a trainer's rank 0 may serve."""
    from kubetrain_trainer import metrics

    monkeypatch.setattr(metrics, "_cuda_available", lambda: True)
    exported: dict[str, set[str]] = {}
    evaluation = metrics.PrometheusCallback("evaluate", run_name="r")
    evaluation.record_evaluation(
        {
            eval_metric_key(suite, metric): 0.5
            for suite, names in EVAL_SUITE_METRICS.items()
            for metric in names
        }
    )
    callbacks = [metrics.PrometheusCallback(m, run_name="r") for m in ("sft", "dpo")]
    for callback in [*callbacks, evaluation]:
        for family in callback.registry.collect():
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
    return {name: labels | TARGET_LABELS | scrape_labels for name, labels in exported.items()}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render("all-features")


@pytest.fixture
def exported(monkeypatch, rendered) -> dict[str, set[str]]:
    monitor = one(rendered, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    relabelled = {r["targetLabel"] for r in endpoint["relabelings"]}
    return _operator_metrics() | _trainer_metrics(monkeypatch, relabelled)


def _grouping_labels(expr: str) -> set[str]:
    found = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        found |= {label.strip() for label in group.split(",") if label.strip()}
    return found


def _matcher_labels(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names its `{...}` matchers use."""
    found: dict[str, set[str]] = {}
    for metric, matchers in re.findall(r"\b(kubetrain_[a-z0-9_]+)\{([^}]*)\}", expr):
        found.setdefault(metric, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return found


def check_expr(expr: str, exported: dict[str, set[str]], where: str) -> set[str]:
    """Assert `expr` uses only exported names and labels; returns the labels its result has."""
    names = set(METRIC_NAME.findall(expr))
    assert names, f"{where}: no kubetrain metric in {expr!r}"
    unknown = names - exported.keys()
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by the operator or trainer"
    available = set.intersection(*(exported[name] for name in names))
    for metric, labels in _matcher_labels(expr).items():
        unknown = labels - exported[metric]
        assert not unknown, f"{where}: {metric} has no label {unknown}"
    grouping = _grouping_labels(expr)
    assert grouping <= set.union(*(exported[n] for n in names)), f"{where}: by {grouping}"
    return grouping or available


def _legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "files" / "dashboards" / "kubetrain.json").read_text())


def test_dashboard_queries_exported_metrics_and_labels(exported):
    dashboard = _dashboard()
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r}"
            labels = check_expr(target["expr"], exported, where)
            assert _legend_labels(target.get("legendFormat", "")) <= labels, where
            queried |= set(METRIC_NAME.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        metric, label = match.groups()
        check_expr(query, exported, f"variable {variable['name']}")
        assert label in exported[metric], f"variable {variable['name']}: {metric} has no {label}"
    # What the dashboard is for: runs by phase, loss and eval loss per run, tokens/s,
    # restarts, queue wait, every evaluation metric, and sweeps by phase with their trials
    # by state and best objective.
    assert {
        eval_gauge_name(metric) for names in EVAL_SUITE_METRICS.values() for metric in names
    } <= queried
    assert {
        "kubetrain_trainingruns",
        "kubetrain_trainer_loss",
        "kubetrain_trainer_eval_loss",
        "kubetrain_trainer_tokens_per_second",
        "kubetrain_restarts_total",
        "kubetrain_queue_wait_seconds_bucket",
        "kubetrain_sweeps",
        "kubetrain_sweep_trials",
        "kubetrain_sweep_best_value",
    } <= queried


def test_dashboard_is_well_formed():
    dashboard = _dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    cells: dict[tuple[int, int], str] = {}  # (x, y) -> the panel there: none overlap
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"} <= variables


def test_alerts_query_exported_metrics_and_labels(rendered, exported):
    rule = one(rendered, "PrometheusRule")
    alerts = {}
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            where = f"alert {alert['alert']}"
            labels = check_expr(alert["expr"], exported, where)
            assert "{{ ." not in alert["expr"], f"{where}: unrendered Helm template"
            for text in alert["annotations"].values():
                used = set(re.findall(r"\$labels\.(\w+)", text))
                assert used <= labels, f"{where}: annotations use {used - labels}"
            alerts[alert["alert"]] = alert
    assert set(alerts) == {"KubetrainRunFailed", "KubetrainRunStalled", "KubetrainRestartStorm"}
    assert "kubetrain_trainer_step[30m]" in alerts["KubetrainRunStalled"]["expr"]
    assert "[1h]" in alerts["KubetrainRestartStorm"]["expr"]


def test_alert_thresholds_follow_values():
    rule = one(
        render(
            values={
                "prometheusRule.enabled": True,
                "prometheusRule.runStalled": {"minutes": 45, "severity": "critical"},
                "prometheusRule.restartStorm": {"restarts": 5, "window": "2h", "severity": "info"},
            }
        ),
        "PrometheusRule",
    )
    alerts = {a["alert"]: a for a in rule["spec"]["groups"][0]["rules"]}
    stalled = alerts["KubetrainRunStalled"]
    assert "[45m]" in stalled["expr"] and "> 2700" in stalled["expr"]
    assert stalled["labels"]["severity"] == "critical"
    storm = alerts["KubetrainRestartStorm"]
    assert storm["expr"].endswith("[2h])) > 5")
    assert storm["labels"]["severity"] == "info"
