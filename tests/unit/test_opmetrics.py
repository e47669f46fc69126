"""The operator's sweep metrics follow each sweep's status and go with the sweep."""

from __future__ import annotations

from prometheus_client import REGISTRY

from kubetrain import opmetrics


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
