"""Table tests of the restart policy (`kubetrain.restarts.retry_verdict`) and its advice.

One row per rule of restartPolicy, in the order they apply: config errors, failOn, retryOn,
preemptions and disruptions (free), out of memory (once), instability (never), the rest
(within the budget). Then the advice: the guide's remedies with the run's own values.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetrain.api import AttemptRecord, TrainingRunSpec
from kubetrain.restarts import Verdict, retry_verdict
from kubetrain_trainer.advice import memory_advice, stability_advice

SPEC: dict[str, Any] = {
    "method": "sft",
    "model": {"name": "Qwen/Qwen2.5-0.5B"},
    "data": {"train": "pvc://data/train.jsonl", "maxLength": 2048},
    "training": {"perDeviceTrainBatchSize": 8, "gradientAccumulationSteps": 4},
    "resources": {"limits": {"memory": "64Gi", "nvidia.com/gpu": 1}},
    "output": "pvc://models/out",
}


def spec(**changes: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({**SPEC, **changes})


OOM_BEFORE = [AttemptRecord(attempt=1, cause="OOMKilled", exit_code=137)]
CRASH_BEFORE = [AttemptRecord(attempt=1, cause="Crashed", exit_code=1)]

CASES = [
    # (case, spec, cause, exit code, history, restart, counted, reason)
    ("a config error never restarts", spec(), "ConfigError", 78, [], False, True, "ConfigError"),
    ("a crash restarts within the budget", spec(), "Crashed", 1, [], True, True, ""),
    ("a preemption (75) is free", spec(), "Preempted", 75, [], True, False, ""),
    ("torchrun's 143 is a preemption too", spec(), "Preempted", 143, [], True, False, ""),
    ("an eviction is free", spec(), "Evicted", None, [], True, False, ""),
    ("a lost node is free", spec(), "NodeLost", 137, [], True, False, ""),
    ("a first OOM kill restarts once", spec(), "OOMKilled", 137, [], True, True, ""),
    ("a first CUDA OOM (71) restarts once", spec(), "DeviceOutOfMemory", 71, CRASH_BEFORE,
     True, True, ""),
    ("a second OOM fails with advice", spec(), "DeviceOutOfMemory", 71, OOM_BEFORE,
     False, True, "OutOfMemory"),
    ("instability (72) fails at once", spec(), "TrainingUnstable", 72, [], False, True,
     "InstabilityDetected"),
    ("retryOn 72 retries instability", spec(restartPolicy={"retryOn": [72]}),
     "TrainingUnstable", 72, [], True, True, ""),
    ("failOn fails an exit code at once", spec(restartPolicy={"failOn": [3]}), "Crashed", 3,
     [], False, True, "ExitCodeNotRetried"),
    ("failOn wins over a preemption's freedom", spec(restartPolicy={"failOn": [143]}),
     "Preempted", 143, [], False, True, "ExitCodeNotRetried"),
    ("a hang restarts within the budget", spec(), "NoProgress", None, [], True, True, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec_", "cause", "code", "history", "restart", "counted", "reason"),
    [row[1:] for row in CASES],
    ids=[row[0] for row in CASES],
)
def test_the_restart_policy(
    spec_: TrainingRunSpec,
    cause: str,
    code: int | None,
    history: list[AttemptRecord],
    restart: bool,
    counted: bool,
    reason: str,
) -> None:
    verdict = retry_verdict(spec_, cause, code, "pod p exited", history)
    assert (verdict.restart, verdict.counted, verdict.reason) == (restart, counted, reason)
    if not restart:
        assert verdict.message.startswith("pod p exited")


def test_a_second_oom_names_the_runs_own_values() -> None:
    verdict = retry_verdict(spec(), "OOMKilled", 137, "pod p was OOM-killed (exit 137)", OOM_BEFORE)
    assert verdict == Verdict(False, reason="OutOfMemory", message=verdict.message)
    message = verdict.message
    assert message.startswith("pod p was OOM-killed (exit 137); out of memory again")
    for said in (
        "resources.limits.memory is 64Gi: raise it",
        "perDeviceTrainBatchSize 8 -> try 4 with gradientAccumulationSteps 8 (the same "
        "effective batch)",
        "gradientCheckpointing is off",
        "bf16 is off",
        "data.maxLength 2048 -> try 1024",
        "method sft trains every weight: lora trains a small adapter instead",
    ):
        assert said in message, (said, message)


def test_memory_advice_leaves_out_what_is_already_done() -> None:
    done = spec(
        method="lora",
        lora={"loadIn4Bit": True},
        data={"train": "pvc://data/t.jsonl", "maxLength": 512},
        training={"perDeviceTrainBatchSize": 1, "gradientCheckpointing": True, "bf16": True},
    )
    advice = memory_advice(done)
    assert advice == (
        "Try: perDeviceTrainBatchSize is already 1 (accumulation 1); data.maxLength is 512"
    )
    lora = memory_advice(spec(method="lora"))
    assert "lora.loadIn4Bit is off" in lora and "trains every weight" not in lora
    assert "resources.limits.memory" not in lora  # a device OOM is not the host's memory


def test_stability_advice_lists_the_guides_knobs_with_the_runs_values() -> None:
    advice = stability_advice(spec(training={"learningRate": 1e4, "fp16": True}))
    assert advice == (
        "Try: learningRate 10000 -> try 5000 (or lower); warmupSteps 0 -> at least 100 (or "
        "warmupRatio 0.05); weightDecay 0 -> 0.01; fp16 overflows easily: bf16 has fp32's "
        "range (Ampere or newer)"
    )
    steady = spec(
        training={"learningRate": 2e-5, "warmupRatio": 0.05, "weightDecay": 0.1, "maxGradNorm": 0}
    )
    assert stability_advice(steady) == (
        "Try: learningRate 2e-05 -> try 1e-05 (or lower); maxGradNorm 0 -> 1 (clip gradients)"
    )


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ({"retryOn": [3], "failOn": [3]}, r"exit codes \[3\] are in both retryOn and failOn"),
        ({"retryOn": [78]}, "78 is a config or data error"),
        ({"retryOn": [0]}, "greater than or equal to 1"),
        ({"failOn": [256]}, "less than or equal to 255"),
    ],
)
def test_exit_code_lists_that_cannot_work_are_refused(policy: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        spec(restartPolicy=policy)
