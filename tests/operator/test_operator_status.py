"""kubetrain.status: pure functions from observed objects and metrics text to status."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kubetrain.status import (
    CONDITION_SPEC_CHANGE_IGNORED,
    checkpoint_uri,
    condition_of,
    eta_seconds,
    format_duration,
    merge_patch,
    next_status,
    observe_attempt,
    parse_trainer_metrics,
    progress_status,
    rank0_pod,
)

JOB: dict[str, Any] = {"metadata": {"name": "sft-1"}, "spec": {"completions": 2}, "status": {}}


def pod(
    index: int,
    phase: str = "Running",
    *,
    exit_code: int | None = None,
    message: str = "",
    reason: str = "Error",
    pod_reason: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}
    elif waiting:
        state = {"waiting": {"reason": waiting, "message": "back-off pulling image"}}
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [{"name": "trainer", "state": state}],
        "conditions": conditions or [],
    }
    if pod_reason:
        status["reason"] = pod_reason
    return {
        "metadata": {
            "name": f"sft-1-{index}-abcde",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": status,
    }


def job_with(*conditions: tuple[str, str, str], suspend: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "sft-1"},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions
            ]
        },
    }


FAILURES = [
    # (pod, expected cause, retriable)
    (
        pod(0, "Failed", exit_code=78, message="config error: data.train: no such file"),
        "ConfigError",
        False,
    ),
    (pod(0, "Failed", exit_code=1, message="config error: bad row"), "ConfigError", False),
    (pod(0, "Failed", exit_code=75, message="preempted: SIGTERM"), "Preempted", True),
    (pod(0, "Failed", exit_code=137, reason="OOMKilled"), "OOMKilled", True),
    # torchrun exits 143 once SIGTERM reached it: a preemption, whoever sent it.
    (pod(0, "Failed", exit_code=143), "Preempted", True),
    (pod(0, "Failed", exit_code=137), "Signalled", True),  # SIGKILL without OOMKilled
    (
        pod(0, "Failed", exit_code=71, message="device out of memory: CUDA out of memory."),
        "DeviceOutOfMemory",
        True,
    ),
    (
        pod(0, "Failed", exit_code=72, message="training unstable: step 5: loss is nan"),
        "TrainingUnstable",
        True,
    ),
    (
        pod(0, "Failed", exit_code=1, message="torch.distributed.DistNetworkError: c10d timed out"),
        "NetworkError",
        True,
    ),
    (
        pod(0, "Failed", exit_code=1, message="RuntimeError: NCCL error in ProcessGroupNCCL"),
        "NetworkError",
        True,
    ),
    (pod(0, "Failed", exit_code=1, message="ValueError: boom"), "Crashed", True),
    (pod(0, "Failed", pod_reason="Evicted"), "Evicted", True),
    (
        pod(
            0,
            "Failed",
            exit_code=143,
            conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
            ],
        ),
        "Preempted",
        True,
    ),
    (
        pod(
            0,
            "Failed",
            conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
            ],
        ),
        "Preempted",
        True,
    ),
    (
        pod(
            0,
            "Failed",
            conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
            ],
        ),
        "NodeLost",
        True,
    ),
]


@pytest.mark.parametrize(("failed_pod", "cause", "retriable"), FAILURES)
def test_a_failed_pod_fails_the_attempt_with_its_cause(
    failed_pod: dict[str, Any], cause: str, retriable: bool
) -> None:
    observation = observe_attempt(JOB, [failed_pod, pod(1)], expected_pods=2)
    assert (observation.state, observation.reason, observation.retriable) == (
        "failed",
        cause,
        retriable,
    )
    assert "sft-1-0-abcde" in observation.message or "error" in observation.message


def test_config_error_message_is_the_trainers_own() -> None:
    said = "config error: /data/train.jsonl line 3: missing field 'output'"
    observation = observe_attempt(JOB, [pod(0, "Failed", exit_code=78, message=said)], 2)
    assert observation.message == said


def test_a_config_error_on_any_pod_wins_over_retriable_failures() -> None:
    pods = [
        pod(0, "Failed", exit_code=1, message="NCCL error"),
        pod(1, "Failed", exit_code=78, message="config error: x"),
    ]
    assert observe_attempt(JOB, pods, 2).reason == "ConfigError"


def test_job_failure_without_pods_reads_the_job_condition() -> None:
    exit78 = job_with(
        (
            "Failed",
            "PodFailurePolicy",
            "Container trainer for pod ns/sft-1-0 failed with exit code 78",
        )
    )
    assert observe_attempt(exit78, [], 2).reason == "ConfigError"
    backoff = job_with(("Failed", "BackoffLimitExceeded", "Job has reached the backoff limit"))
    observation = observe_attempt(backoff, [], 2)
    assert (observation.state, observation.retriable) == ("failed", True)
    assert observation.message == "Job has reached the backoff limit"


@pytest.mark.parametrize(
    ("workload", "pods", "state", "reason"),
    [
        (JOB, [], "pending", "Created"),
        (job_with(suspend=True), [], "pending", "Queued"),
        (JOB, [pod(0), pod(1, "Pending")], "pending", "PodsStarting"),
        (JOB, [pod(0), pod(1)], "running", "Training"),
        # Ranks finish at slightly different times; the Job says when all are done.
        (JOB, [pod(0, "Succeeded", exit_code=0), pod(1)], "running", "Training"),
        (
            job_with(("Complete", "CompletionsReached", "")),
            [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)],
            "succeeded",
            "Completed",
        ),
        (job_with(("Completed", "AllJobsCompleted", "")), [], "succeeded", "Completed"),
    ],
)
def test_attempt_states(
    workload: dict[str, Any], pods: list[dict[str, Any]], state: str, reason: str
) -> None:
    observation = observe_attempt(workload, pods, expected_pods=2)
    assert (observation.state, observation.reason) == (state, reason)


def test_pods_stuck_starting_say_why() -> None:
    stuck = pod(1, "Pending", waiting="ImagePullBackOff")
    observation = observe_attempt(JOB, [pod(0), stuck], 2)
    assert observation.message == (
        "1/2 pods running; pod sft-1-1-abcde: ImagePullBackOff: back-off pulling image"
    )


def test_terminating_pods_do_not_count_as_running() -> None:
    leaving = pod(1)
    leaving["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert observe_attempt(JOB, [pod(0), leaving], 2).state == "pending"


def test_rank0_pod_is_the_running_index_0() -> None:
    assert rank0_pod([pod(1), pod(0, "Pending")]) is None
    assert rank0_pod([pod(1), pod(0)])["metadata"]["name"] == "sft-1-0-abcde"


def trainer_text(**values: float) -> str:
    """/metrics text rendered the way the trainer's prometheus-client renders it."""
    registry = CollectorRegistry()
    for name, value in values.items():
        Gauge(f"kubetrain_trainer_{name}", name, registry=registry).set(value)
    Gauge("kubetrain_trainer_info", "info", ["method"], registry=registry).labels("sft").set(1)
    return generate_latest(registry).decode()


def test_parse_trainer_metrics_reads_the_gauges() -> None:
    metrics = parse_trainer_metrics(
        trainer_text(
            step=120,
            total_steps=400,
            epoch=1.5,
            loss=0.75,
            eval_loss=0.8,
            tokens_per_second=5000.5,
            checkpoint_step=100,
            learning_rate=1e-5,
        )
    )
    assert (metrics.step, metrics.total_steps, metrics.checkpoint_step) == (120, 400, 100)
    assert (metrics.epoch, metrics.loss, metrics.eval_loss) == (1.5, 0.75, 0.8)
    assert metrics.tokens_per_second == 5000.5


def test_metrics_not_measured_yet_are_none() -> None:
    nan = float("nan")
    metrics = parse_trainer_metrics(
        trainer_text(step=0, total_steps=0, loss=nan, eval_loss=nan, checkpoint_step=nan)
    )
    assert metrics.step == 0
    assert (metrics.total_steps, metrics.loss, metrics.eval_loss) == (None, None, None)
    assert metrics.checkpoint_step is None
    assert parse_trainer_metrics("") == parse_trainer_metrics("# nothing\n")


def test_unparseable_metrics_raise_value_error() -> None:
    with pytest.raises(ValueError):
        parse_trainer_metrics("kubetrain_trainer_step one hundred\n")


@pytest.mark.parametrize(
    ("first", "latest", "total", "eta"),
    [
        ((100, 1000.0), (150, 1100.0), 400, 500.0),  # 0.5 step/s, 250 steps left
        ((100, 1000.0), (100, 1100.0), 400, None),  # no steps yet: no rate
        ((100, 1000.0), (150, 1000.0), 400, None),  # no time passed
        (None, (150, 1100.0), 400, None),
        ((100, 1000.0), (150, 1100.0), None, None),
        ((0, 1000.0), (500, 1100.0), 400, 0.0),  # past the plan: nothing left
    ],
)
def test_eta_seconds(first: Any, latest: Any, total: Any, eta: float | None) -> None:
    assert eta_seconds(first, latest, total) == eta


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.6, "1m0s"), (61, "1m1s"), (3723, "1h2m3s"), (7200, "2h0m0s")],
)
def test_format_duration_is_a_go_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_progress_status_is_camel_case_with_percent_and_eta() -> None:
    metrics = parse_trainer_metrics(trainer_text(step=50, total_steps=200, loss=1.0))
    assert progress_status(metrics, 90.0) == {
        "step": 50,
        "totalSteps": 200,
        "loss": 1.0,
        "eta": "1m30s",
        "percent": 25,
    }
    assert "eta" not in progress_status(metrics, None)


def test_checkpoint_uri_follows_the_trainers_layout() -> None:
    assert checkpoint_uri("pvc://models/run/", 40) == "pvc://models/run/checkpoint-40"
    assert checkpoint_uri("pvc://models/run", None) is None
    assert checkpoint_uri("pvc://models/run", 0) is None


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_next_status_sets_one_condition_per_type_from_the_phase() -> None:
    status = next_status(
        None,
        phase="Running",
        reason="Training",
        message="2/2 pods running",
        now="2025-01-01T00:00:00Z",
        generation=3,
        attempt=1,
    )
    assert status["phase"] == "Running"
    assert status["observedGeneration"] == 3
    assert status["attempt"] == 1
    assert conditions(status) == {
        "Ready": ("False", "Training"),
        "Running": ("True", "Training"),
        "Succeeded": ("False", "Training"),
        "Failed": ("False", "Training"),
        "Suspended": ("False", "Training"),
        "Reconciling": ("True", "Training"),
        "Stalled": ("False", "Training"),
    }
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])

    done = next_status(
        status,
        phase="Succeeded",
        reason="Completed",
        message="done",
        now="2025-01-01T01:00:00Z",
        generation=3,
    )
    assert conditions(done)["Ready"] == ("True", "Completed")
    assert conditions(done)["Succeeded"] == ("True", "Completed")
    assert conditions(done)["Running"] == ("False", "Completed")
    assert conditions(done)["Reconciling"] == ("False", "Completed")

    failed = next_status(
        status, phase="Failed", reason="ConfigError", message="x", now="T", generation=3
    )
    assert conditions(failed)["Stalled"] == ("True", "ConfigError")
    assert conditions(failed)["Reconciling"] == ("False", "ConfigError")


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = next_status(None, phase="Pending", reason="Created", message="", now="T1", generation=1)
    second = next_status(
        first, phase="Pending", reason="PodsStarting", message="1/2", now="T2", generation=1
    )
    running = next_status(
        second, phase="Running", reason="Training", message="", now="T3", generation=1
    )
    assert condition_of(second, "Running")["lastTransitionTime"] == "T1"
    assert condition_of(second, "Running")["reason"] == "PodsStarting"
    assert condition_of(running, "Running")["lastTransitionTime"] == "T3"
    assert condition_of(running, "Ready")["lastTransitionTime"] == "T1"


def test_spec_change_ignored_condition_comes_and_goes() -> None:
    ignored = next_status(
        None,
        phase="Running",
        reason="Training",
        message="",
        now="T1",
        generation=2,
        spec_change_ignored="spec changed after attempt 1 started",
    )
    condition = condition_of(ignored, CONDITION_SPEC_CHANGE_IGNORED)
    assert (condition["status"], condition["reason"]) == ("True", "RunInProgress")
    cleared = next_status(
        ignored, phase="Suspended", reason="Suspended", message="", now="T2", generation=3
    )
    assert condition_of(cleared, CONDITION_SPEC_CHANGE_IGNORED) is None


def test_next_status_removes_fields_given_as_none() -> None:
    status = next_status(
        {"completionTime": "T0", "attempt": 1},
        phase="Pending",
        reason="Created",
        message="",
        now="T1",
        generation=1,
        completionTime=None,
    )
    assert "completionTime" not in status
    assert status["attempt"] == 1


def test_merge_patch_turns_old_into_new() -> None:
    old = {"phase": "Running", "progress": {"step": 1, "loss": 2.0}, "startTime": "T"}
    new = {"phase": "Running", "progress": {"step": 2}, "attempt": 2}
    assert merge_patch(old, new) == {
        "progress": {"step": 2, "loss": None},
        "startTime": None,
        "attempt": 2,
    }
    assert merge_patch(new, new) == {}
