"""What an ended attempt means for its run: restart (counted or not) or fail, with advice.

`retry_verdict` is `spec.restartPolicy` applied to one failed attempt, in this order:
a config or data error (78) never restarts; an exit code in `failOn` fails the run and one
in `retryOn` restarts it within `maxRestarts`; a preemption (75, torchrun's 143) or a pod
disruption (eviction, node loss) always restarts and costs no restart of the budget; running
out of memory (the kernel's OOMKilled, or the trainer's 71 for the device) restarts once,
then fails with reason OutOfMemory; training that went unstable (72) fails at once with
reason InstabilityDetected; anything else restarts within `maxRestarts`.

The advice is the guide's troubleshooting chapter with the run's own values
(`kubetrain_trainer.advice`, which the trainer's preflight shares), so the condition says
what to change. Pure functions, table-tested in tests/unit/test_restarts.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetrain.api import (
    REASON_CONFIG_ERROR,
    REASON_EXIT_CODE_NOT_RETRIED,
    REASON_INSTABILITY_DETECTED,
    REASON_OUT_OF_MEMORY,
    AttemptRecord,
    TrainingRunSpec,
)
from kubetrain.status import (
    CAUSE_DEVICE_OOM,
    CAUSE_OOM_KILLED,
    CAUSE_UNSTABLE,
    DISRUPTION_CAUSES,
)
from kubetrain_trainer.advice import memory_advice, stability_advice

MEMORY_CAUSES = frozenset({CAUSE_OOM_KILLED, CAUSE_DEVICE_OOM})


@dataclass(frozen=True)
class Verdict:
    """Restart (`counted` against maxRestarts or not), or fail with `reason` and `message`."""

    restart: bool
    counted: bool = True
    reason: str = ""
    message: str = ""


def retry_verdict(
    spec: TrainingRunSpec,
    cause: str,
    exit_code: int | None,
    message: str,
    history: Sequence[AttemptRecord] = (),
) -> Verdict:
    """The restart policy applied to one failed attempt (the module docstring's order)."""
    policy = spec.restart_policy
    if cause == REASON_CONFIG_ERROR:
        return Verdict(False, reason=REASON_CONFIG_ERROR, message=message)
    if exit_code is not None and exit_code in policy.fail_on:
        return Verdict(
            False,
            reason=REASON_EXIT_CODE_NOT_RETRIED,
            message=f"{message}; exit code {exit_code} is in restartPolicy.failOn",
        )
    if exit_code is not None and exit_code in policy.retry_on:
        return Verdict(True)
    if cause in DISRUPTION_CAUSES:
        return Verdict(True, counted=False)
    if cause in MEMORY_CAUSES:
        if any(record.cause in MEMORY_CAUSES for record in history):
            return Verdict(
                False,
                reason=REASON_OUT_OF_MEMORY,
                message=f"{message}; out of memory again after one retry. "
                f"{run_memory_advice(spec, host=cause == CAUSE_OOM_KILLED)}",
            )
        return Verdict(True)
    if cause == CAUSE_UNSTABLE:
        return Verdict(
            False,
            reason=REASON_INSTABILITY_DETECTED,
            message=f"{message}. {stability_advice(spec)}",
        )
    return Verdict(True)


def run_memory_advice(spec: TrainingRunSpec, *, host: bool) -> str:
    """The guide's out-of-memory remedies for a run; for the host, its memory limit first."""
    limit = spec.resources.limits.get("memory")
    if not host:
        return memory_advice(spec)
    return memory_advice(spec, host_memory_limit=str(limit) if limit else "")
