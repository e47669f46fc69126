"""plan_sweep: which trials to create and prune, and the sweep's status, from its trial runs.

Table tests feed the planner observed trial runs (TrainingRun bodies as the API returns
them) and check what it decides. The study is rebuilt from the runs each time, so the same
observation must always give the same plan, and a restarted operator (no status) the same
trials; the pruner is judged on recorded evaluation histories.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetrain.api import Sweep
from kubetrain.api.sweep import ANNOTATION_PARAMETERS, ANNOTATION_PRUNED_AT_STEP, TrialStatus
from kubetrain.sweeps import judge_trial, plan_sweep, prune_patch, suspend_patch

NOW = "2026-12-01T12:00:00Z"
GOOD, BAD = 5e-3, 1e-7


def sweep_doc(**spec: Any) -> dict[str, Any]:
    body = {
        "template": {
            "method": "lora",
            "model": {"name": "pvc://models/base"},
            "data": {"train": "pvc://d/train.jsonl", "eval": "pvc://d/eval.jsonl"},
            "training": {"maxSteps": 20, "evalStrategy": "steps", "evalSteps": 5},
            "output": "pvc://models/tune",
        },
        "parameters": [
            {"path": "training.learningRate", "type": "categorical", "choices": [GOOD, BAD]},
            {"path": "lora.r", "type": "categorical", "choices": [4, 8, 16]},
        ],
        "objective": {"metric": "eval_loss"},
        "algorithm": "grid",
        "seed": 8,
        "maxTrials": 6,
        "parallelism": 2,
        "pruner": {"type": "median", "startupTrials": 1},
        **spec,
    }
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": "tune", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": body,
    }


def the_sweep(**spec: Any) -> Sweep:
    return Sweep.model_validate(sweep_doc(**spec))


def trial(
    number: int,
    lr: float = GOOD,
    r: int = 8,
    *,
    phase: str = "Running",
    value: float | None = None,
    history: dict[int, float] | None = None,
    pruned_at: int | None = None,
) -> dict[str, Any]:
    """A trial's TrainingRun body as the API returns it."""
    annotations = {ANNOTATION_PARAMETERS: json.dumps({"training.learningRate": lr, "lora.r": r})}
    if pruned_at is not None:
        annotations[ANNOTATION_PRUNED_AT_STEP] = str(pruned_at)
    status: dict[str, Any] = {
        "phase": phase,
        "evalHistory": [
            {"step": step, "metrics": {"eval_loss": loss, "perplexity": 2.0}}
            for step, loss in (history or {}).items()
        ],
    }
    if value is not None:
        status["outputs"] = {
            "modelUri": f"pvc://models/tune/tune-{number}",
            "metrics": {"eval_loss": value, "train_loss": value},
        }
    return {
        "metadata": {"name": f"tune-{number}", "annotations": annotations},
        "spec": {"suspend": pruned_at is not None},
        "status": status,
    }


def test_a_new_sweep_creates_parallelism_trials_named_by_number() -> None:
    plan = plan_sweep(the_sweep(), {}, now=NOW)
    names = [run.metadata.name for run in plan.create]
    assert names == ["tune-0", "tune-1"]
    run = plan.create[0]
    parameters = json.loads(run.metadata.annotations[ANNOTATION_PARAMETERS])
    assert run.spec.training.learning_rate == parameters["training.learningRate"]
    assert run.spec.lora is not None and run.spec.lora.r == parameters["lora.r"]
    assert run.spec.output == "pvc://models/tune/tune-0"
    assert run.metadata.labels == {"kubetrain.dev/sweep": "tune", "kubetrain.dev/trial": "0"}
    owners = run.metadata.model_dump(by_alias=True)["ownerReferences"]
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Sweep", "tune", "u-1")]
    assert plan.status.progress == "0/6" and plan.status.phase == "Running"
    assert [t.state for t in plan.status.trials] == ["Running", "Running"]


def test_the_same_trials_ask_the_same_and_grid_points_never_repeat() -> None:
    sweep, runs = the_sweep(), {}
    asked = []
    for _ in range(6):
        plan = plan_sweep(sweep, runs, now=NOW)
        again = plan_sweep(sweep, runs, now=NOW)
        assert [r.model_dump() for r in plan.create] == [r.model_dump() for r in again.create]
        for run in plan.create:
            number = int(run.metadata.name.rsplit("-", 1)[1])
            body = run.model_dump(mode="json", by_alias=True, exclude_none=True)
            body["status"] = {"phase": "Succeeded", "outputs": {"metrics": {"eval_loss": 1.0}}}
            runs[number] = body
            asked.append(run.metadata.annotations[ANNOTATION_PARAMETERS])
        sweep.status = plan.status
    assert len(asked) == 6 and len(set(asked)) == 6  # every grid point once
    # With seed 8 the grid starts with both good learning rates (the cluster tests rely on it).
    assert [json.loads(a)["training.learningRate"] for a in asked[:2]] == [GOOD, GOOD]


def test_a_restarted_operator_rebuilds_the_study_from_the_runs_alone() -> None:
    runs = {0: trial(0, history={5: 1.0}), 1: trial(1, r=16)}
    plan = plan_sweep(the_sweep(), runs, now=NOW)  # no status: the operator just started
    assert plan.create == [] and plan.prune == []
    assert [(t.name, t.parameters["lora.r"]) for t in plan.status.trials] == [
        ("tune-0", 8),
        ("tune-1", 16),
    ]
    # The next trial is numbered after every trial seen, never reusing a number.
    runs[0] = trial(0, phase="Succeeded", value=1.0, history={5: 1.0})
    plan = plan_sweep(the_sweep(), runs, now=NOW)
    assert [r.metadata.name for r in plan.create] == ["tune-2"]


# (id, complete trials' histories, the judged trial's history, startupTrials, pruned at)
PRUNING: list[tuple[str, list[dict[int, float]], dict[int, float], int, int | None]] = [
    ("worse-than-the-median-at-its-first-eval", [{5: 1.0, 10: 0.5}], {5: 3.0}, 1, 5),
    ("better-goes-on", [{5: 1.0, 10: 0.5}], {5: 0.9}, 1, None),
    ("falls-behind-later", [{5: 1.0, 10: 0.5}], {5: 0.9, 10: 3.0}, 1, 10),
    ("too-few-complete-trials", [{5: 1.0, 10: 0.5}], {5: 3.0}, 2, None),
    ("median-of-three", [{5: 1.0}, {5: 2.0}, {5: 9.0}], {5: 2.5}, 1, 5),
    ("at-the-median-goes-on", [{5: 1.0}, {5: 2.0}, {5: 9.0}], {5: 2.0}, 1, None),
]


@pytest.mark.parametrize(
    ("complete", "judged", "startup", "pruned_at"),
    [case[1:] for case in PRUNING],
    ids=[case[0] for case in PRUNING],
)
def test_median_pruning_on_recorded_histories(
    complete: list[dict[int, float]], judged: dict[int, float], startup: int, pruned_at: int | None
) -> None:
    sweep = the_sweep(pruner={"type": "median", "startupTrials": startup})
    runs = {
        n: trial(n, phase="Succeeded", value=min(h.values()), history=h)
        for n, h in enumerate(complete)
    }
    runs[len(complete)] = trial(len(complete), BAD, history=judged)
    plan = plan_sweep(sweep, runs, now=NOW)
    judged_status = plan.status.trials[len(complete)]
    if pruned_at is None:
        assert plan.prune == [] and judged_status.state == "Running"
        assert judged_status.judged_step == max(judged)
    else:
        assert plan.prune == [(f"tune-{len(complete)}", pruned_at)]
        assert (judged_status.state, judged_status.pruned_at_step) == ("Pruned", pruned_at)


def test_the_verdict_does_not_depend_on_how_often_the_operator_looked() -> None:
    search = the_sweep().spec
    done = TrialStatus.model_validate(
        {
            "name": "tune-0",
            "number": 0,
            "state": "Complete",
            "value": 0.5,
            "parameters": {"training.learningRate": GOOD, "lora.r": 8},
            "intermediate": [{"step": 5, "value": 1.0}, {"step": 10, "value": 0.5}],
        }
    )
    history = [{"step": 5, "value": 0.9}, {"step": 10, "value": 3.0}, {"step": 15, "value": 0.1}]
    running = TrialStatus.model_validate(
        {"name": "tune-1", "number": 1, "state": "Running", "parameters": done.parameters}
    )

    # Seen once, with its whole history ...
    def seen(trial: TrialStatus, points: list[dict[str, Any]]) -> TrialStatus:
        return TrialStatus.model_validate({**trial.model_dump(), "intermediate": points})

    at_once = judge_trial(search, "tune", [done], seen(running, history))
    # ... or at every evaluation as it happened.
    stepwise = running
    for count in range(1, len(history) + 1):
        stepwise = judge_trial(search, "tune", [done], seen(stepwise, history[:count]))
        if stepwise.state == "Pruned":
            break
    assert (at_once.state, at_once.pruned_at_step) == ("Pruned", 10)
    assert (stepwise.state, stepwise.pruned_at_step) == ("Pruned", 10)


def test_a_pruned_trial_is_done_and_stays_stopped() -> None:
    runs = {
        0: trial(0, phase="Succeeded", value=0.5, history={5: 1.0}),
        1: trial(1, BAD, phase="Suspended", history={5: 6.0}, pruned_at=5),
    }
    sweep = the_sweep()
    plan = plan_sweep(sweep, runs, now=NOW)
    assert plan.status.trials[1].state == "Pruned" and plan.status.trials[1].pruned_at_step == 5
    assert plan.status.progress == "2/6"
    assert [r.metadata.name for r in plan.create] == ["tune-2", "tune-3"]
    assert suspend_patch(sweep, runs[1]) is None  # resuming the sweep never resumes it
    assert prune_patch(5) == {
        "metadata": {"annotations": {ANNOTATION_PRUNED_AT_STEP: "5"}},
        "spec": {"suspend": True},
    }


@pytest.mark.parametrize(("direction", "best"), [("minimize", "tune-1"), ("maximize", "tune-2")])
def test_a_finished_sweep_names_its_best_trial_and_hands_its_model_on(
    direction: str, best: str
) -> None:
    values = [0.7, 0.3, 0.9, 0.5]
    runs = {n: trial(n, phase="Succeeded", value=v) for n, v in enumerate(values)}
    runs[4] = trial(4, BAD, phase="Suspended", pruned_at=5)
    runs[5] = trial(5, phase="Failed")
    sweep = the_sweep(objective={"metric": "eval_loss", "direction": direction})
    plan = plan_sweep(sweep, runs, now=NOW)
    status = plan.status
    assert plan.create == [] and status.phase == "Succeeded"
    assert status.trial_counts == {"Running": 0, "Complete": 4, "Pruned": 1, "Failed": 1}
    assert status.best_trial is not None and status.best_trial.name == best
    assert status.outputs is not None
    assert status.outputs.model_uri == f"pvc://models/tune/{best}"
    assert status.completion_time == NOW


def test_too_many_failed_trials_fail_the_sweep_and_start_no_more() -> None:
    runs = {0: trial(0, phase="Failed"), 1: trial(1, phase="Failed")}
    plan = plan_sweep(the_sweep(maxFailedTrials=1), runs, now=NOW)
    assert plan.create == []
    assert plan.status.phase == "Failed"
    ready = next(c for c in plan.status.conditions if c.type == "Ready")
    assert ready.reason == "TooManyFailedTrials"


def test_a_trial_that_reports_no_objective_failed() -> None:
    run = trial(0, phase="Succeeded", value=1.0)
    del run["status"]["outputs"]["metrics"]["eval_loss"]
    plan = plan_sweep(the_sweep(), {0: run}, now=NOW)
    assert plan.status.trials[0].state == "Failed"
    assert "reported no eval_loss" in (plan.status.trials[0].message or "")


def test_a_suspended_sweep_starts_nothing_and_suspends_its_trials() -> None:
    sweep = the_sweep(suspend=True)
    runs = {0: trial(0, history={5: 1.0})}
    plan = plan_sweep(sweep, runs, now=NOW)
    assert plan.create == [] and plan.status.phase == "Suspended"
    assert suspend_patch(sweep, runs[0]) == {"spec": {"suspend": True}}


def test_hyperband_prunes_statelessly_with_its_rungs_in_the_status() -> None:
    sweep = the_sweep(
        pruner={"type": "hyperband", "minResource": 5, "reductionFactor": 2}, algorithm="random"
    )
    runs = {0: trial(0, phase="Succeeded", value=0.5, history={5: 1.0, 10: 0.5})}
    runs |= {n: trial(n, history={5: 1.0 + n}) for n in (1, 2)}
    plan = plan_sweep(sweep, runs, now=NOW)
    sweep.status = plan.status
    again = plan_sweep(sweep, runs, now=NOW)
    assert again.prune == plan.prune
    recorded = plan.status.trials[1].system_attributes or {}
    assert recorded.get("completed_rung_0") == 2.0  # its value at the first rung, kept
