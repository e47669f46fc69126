"""The operator's metrics: sweep series follow each sweep's status and go with the sweep,
and the served endpoint passes `promtool check metrics`."""

from __future__ import annotations

import requests
from prometheus_client import REGISTRY
from prometheus_tools import check_metrics, needs_promtool

from kubetrain import opmetrics
from kubetrain.status import TrainerMetrics


def value(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


def test_a_sweeps_trials_and_best_value_follow_its_status_and_go_with_it() -> None:
    status = {
        "phase": "Running",
        "trialCounts": {"Running": 2, "Complete": 3, "Pruned": 1, "Failed": 0},
        "bestTrial": {"name": "s-2", "number": 2, "parameters": {}, "value": 0.25},
    }
    opmetrics.observe_sweep("ml", "s", status, "eval_loss")
    assert value("kubetrain_sweeps", phase="Running") == 1
    assert value("kubetrain_sweep_trials", namespace="ml", name="s", state="Complete") == 3
    best = {"namespace": "ml", "name": "s", "objective": "eval_loss"}
    assert value("kubetrain_sweep_best_value", **best) == 0.25
    opmetrics.observe_sweep("ml", "s", {**status, "phase": "Succeeded"}, "eval_loss")
    assert value("kubetrain_sweeps", phase="Running") == 0
    assert value("kubetrain_sweeps", phase="Succeeded") == 1
    opmetrics.forget_sweep("ml", "s")
    assert value("kubetrain_sweeps", phase="Succeeded") == 0
    assert value("kubetrain_sweep_trials", namespace="ml", name="s", state="Complete") is None
    assert value("kubetrain_sweep_best_value", **best) is None


@needs_promtool
def test_the_operators_endpoint_passes_promtool_check_metrics() -> None:
    """Every family served, with samples: runs, a sweep, per-run progress, each histogram."""
    opmetrics.observe_phase("ml", "r", "Running")
    opmetrics.observe_pipeline_phase("ml", "p", "Running")
    opmetrics.observe_sweep("ml", "s", {"phase": "Running", "trialCounts": {"Running": 1},
                                        "bestTrial": {"value": 0.5}}, "eval_loss")  # fmt: skip
    opmetrics.observe_progress("ml", "r", TrainerMetrics(step=3, loss=2.5, tokens_per_second=9.0))
    opmetrics.RESTARTS.labels(cause="Preempted").inc()
    for histogram in (opmetrics.RECONCILE_DURATION, opmetrics.QUEUE_WAIT,
                      opmetrics.TIME_TO_FIRST_STEP):  # fmt: skip
        histogram.observe(1.5)
    server = opmetrics.serve(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = requests.get(url, timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
        opmetrics.forget_run("ml", "r")
        opmetrics.forget_sweep("ml", "s")
        opmetrics.forget_pipeline("ml", "p")
    assert 'kubetrain_run_step{name="r",namespace="ml"} 3.0' in text
    check_metrics(text)
