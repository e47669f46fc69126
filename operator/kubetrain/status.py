"""What the operator observes, turned into a TrainingRun's status: pure functions, no I/O.

`observe_attempt` reads one attempt's workload (Indexed Job or JobSet) and its pods, as the
API returns them (camelCase dicts), and says whether the attempt is pending, running,
succeeded or failed, and for a failure whether a restart can help: evictions, preemption,
OOM kills, SIGTERM/SIGKILL (exit 143/137), the trainer's own "preempted" exit (75), lost
peers (NCCL, c10d, connection errors) and plain crashes are retriable; a configuration
error (exit 78, or a termination message starting with "config error", which the trainer
writes to /dev/termination-log) is not. `parse_trainer_metrics` reads rank 0's Prometheus
text, `eta_seconds` extrapolates the step rate between two samples the caller timed, and
`next_status` writes phase and conditions the kstatus way: one condition per type, its
`lastTransitionTime` moved only when its status flips, every one stamped with the
generation it was computed from. Clocks are passed in, so every function here is pure.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from kubetrain.api import (
    CONDITION_FAILED,
    CONDITION_READY,
    CONDITION_RECONCILING,
    CONDITION_RUNNING,
    CONDITION_STALLED,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_COMPLETED,
    REASON_CONFIG_ERROR,
    REASON_CREATED,
    REASON_INVALID_SPEC,
    REASON_NO_PROGRESS,
    REASON_PODS_STARTING,
    REASON_PREEMPTED,
    REASON_QUEUED,
    REASON_TRAINING,
    Phase,
    Progress,
)
from kubetrain_trainer import contract
from kubetrain_trainer.contract import (
    EVAL_SUITE_METRICS,
    PREEMPTED_PREFIX,
    DataRecord,
    ExitCode,
    checkpoint_dir_name,
    eval_metric_key,
    is_config_error_message,
    parse_outputs_data,
    parse_outputs_message,
)

# Set while the spec differs from the one the current attempt runs: edits apply only to a
# suspended run (they are rendered when it resumes), never to pods already training.
CONDITION_SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
REASON_RUN_IN_PROGRESS = "RunInProgress"

# Retriable failure causes (used in messages, events and the restarts metric).
CAUSE_EVICTED = "Evicted"
CAUSE_PREEMPTED = REASON_PREEMPTED
CAUSE_OOM_KILLED = "OOMKilled"
CAUSE_SIGNALLED = "Signalled"
CAUSE_NETWORK = "NetworkError"
CAUSE_NODE_LOST = "NodeLost"
CAUSE_CRASHED = "Crashed"
CAUSE_DEVICE_OOM = "DeviceOutOfMemory"  # the trainer caught a CUDA out-of-memory (exit 71)
CAUSE_UNSTABLE = "TrainingUnstable"  # NaN/inf loss or exploding gradients (exit 72)
CAUSE_NO_PROGRESS = REASON_NO_PROGRESS  # the operator ended a hung attempt
# What happened to the pods, not what the run did: always retried, never counted.
DISRUPTION_CAUSES = frozenset({CAUSE_PREEMPTED, CAUSE_EVICTED, CAUSE_NODE_LOST})

SIGTERM_EXIT, SIGKILL_EXIT = 128 + 15, 128 + 9
# Lost peers and rendezvous trouble: the gang cannot go on, a fresh one can.
_NETWORK_ERROR = re.compile(
    r"nccl|c10d|rendezvous|gloo|connection ?(reset|refused|closed|error|aborted)|"
    r"broken pipe|timed out|timeout",
    re.IGNORECASE,
)
# Pod disruption reasons Kubernetes records in the DisruptionTarget condition.
_DISRUPTION_CAUSES = {
    "PreemptionByScheduler": CAUSE_PREEMPTED,
    "PreemptionByKubeScheduler": CAUSE_PREEMPTED,
    "EvictionByEvictionAPI": CAUSE_EVICTED,
    "TerminationByKubelet": CAUSE_EVICTED,
    "DeletionByTaintManager": CAUSE_NODE_LOST,
    "DeletionByPodGC": CAUSE_NODE_LOST,
}
# Container waiting reasons worth showing while pods start (they need a human).
_STUCK_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}
# Both the Job's index annotation and the JobSet's copy of it carry the node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

AttemptState = Literal["pending", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class Observation:
    """One attempt as observed: its state, a condition reason and a message for people.

    For `failed`, `retriable` says whether a new attempt can help and `reason` is the cause
    (CAUSE_* above, or REASON_CONFIG_ERROR); `message` names the pod and what it said.
    """

    state: AttemptState
    reason: str
    message: str = ""
    retriable: bool = False
    running_pods: int = 0
    expected_pods: int = 0
    exit_code: int | None = None  # of the failed container, when one exited


@dataclass(frozen=True)
class PodFailure:
    """Why one pod failed: the cause (CAUSE_* or REASON_CONFIG_ERROR), whether a new attempt
    can help, what to tell people, and the container's exit code if it exited."""

    cause: str
    retriable: bool
    message: str
    exit_code: int | None = None


def _conditions_true(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def _pod_name(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def _terminated_containers(pod: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            yield terminated


def classify_pod_failure(pod: Mapping[str, Any]) -> PodFailure:
    """Why a pod failed, from its status alone."""
    name = _pod_name(pod)
    status = pod.get("status") or {}
    for terminated in _terminated_containers(pod):
        code = terminated.get("exitCode")
        said = (terminated.get("message") or "").strip()
        if code == ExitCode.CONFIG_ERROR or is_config_error_message(said):
            return PodFailure(REASON_CONFIG_ERROR, False, said or f"pod {name} exited {code}", code)
        if code == 0:
            continue
        detail = f"pod {name} exited {code}" + (f": {said}" if said else "")
        if code == ExitCode.PREEMPTED or said.startswith(PREEMPTED_PREFIX):
            return PodFailure(CAUSE_PREEMPTED, True, detail, code)
        # By the kernel's reason, never by exit 137, which any SIGKILL gives.
        if terminated.get("reason") == "OOMKilled":
            return PodFailure(
                CAUSE_OOM_KILLED, True, f"pod {name} was OOM-killed (exit {code})", code
            )
        if code == ExitCode.DEVICE_OUT_OF_MEMORY:
            return PodFailure(CAUSE_DEVICE_OOM, True, detail, code)
        if code == ExitCode.TRAINING_UNSTABLE:
            return PodFailure(CAUSE_UNSTABLE, True, detail, code)
        if said and _NETWORK_ERROR.search(said):
            return PodFailure(CAUSE_NETWORK, True, detail, code)
        disruption = _disruption_cause(pod)  # the signal's sender, when Kubernetes says
        if disruption:
            return PodFailure(disruption, True, detail, code)
        if code == SIGTERM_EXIT:  # torchrun's own exit once SIGTERM reached it: preempted
            return PodFailure(CAUSE_PREEMPTED, True, detail, code)
        cause = CAUSE_SIGNALLED if code == SIGKILL_EXIT else CAUSE_CRASHED
        return PodFailure(cause, True, detail, code)
    if status.get("reason") == "Evicted":
        message = f"pod {name} was evicted: {status.get('message', '')}".strip()
        return PodFailure(CAUSE_EVICTED, True, message)
    disruption = _disruption_cause(pod)
    if disruption:
        return PodFailure(disruption, True, f"pod {name}: {status.get('message') or disruption}")
    return PodFailure(
        CAUSE_CRASHED, True, f"pod {name} failed: {status.get('reason') or 'no reason given'}"
    )


_FAILURE_RANK = {
    REASON_CONFIG_ERROR: 0,
    CAUSE_UNSTABLE: 1,
    CAUSE_OOM_KILLED: 2,
    CAUSE_DEVICE_OOM: 2,
}


def _failure_rank(failure: PodFailure) -> int:
    return _FAILURE_RANK.get(failure.cause, 3)


def _disruption_cause(pod: Mapping[str, Any]) -> str | None:
    disruption = _conditions_true(pod).get("DisruptionTarget")
    if disruption is None:
        return None
    return _DISRUPTION_CAUSES.get(disruption.get("reason", ""), CAUSE_EVICTED)


def _waiting_problem(pod: Mapping[str, Any]) -> str | None:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_WAITING:
            message = waiting.get("message") or ""
            return f"pod {_pod_name(pod)}: {waiting['reason']}" + (
                f": {message}" if message else ""
            )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"pod {_pod_name(pod)} is not scheduled: {condition.get('message', '')}".strip()
    return None


def _is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _ended_before(pod: Mapping[str, Any], moment: str | None) -> bool:
    """Whether every container of the pod finished before `moment` (RFC 3339)."""
    finished = [t.get("finishedAt") for t in _terminated_containers(pod)]
    # RFC 3339 times in UTC compare as text.
    return bool(moment and finished and all(f and f < moment for f in finished))


def observe_attempt(
    workload: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], expected_pods: int
) -> Observation:
    """The state of one attempt from its Job (or JobSet) and the pods it made.

    Any failed pod fails the whole attempt: the ranks of a torchrun gang cannot go on
    without it, and a fresh gang resumes from the newest checkpoint. A config error on
    any pod wins over other failures, since no restart can fix it. A workload suspended by
    a queue (Kueue preempts by suspending it, which stops its pods) is waiting, whatever its
    pods say; once admitted again, pods that ended before the Job's (re)start are not its.
    """
    pods = list(pods)
    conditions = _conditions_true(workload)
    complete = "Complete" in conditions or "Completed" in conditions
    if not complete and ((workload.get("spec") or {}).get("suspend") or "Suspended" in conditions):
        return Observation(
            "pending",
            REASON_QUEUED,
            "the workload is suspended, waiting for a queue to admit it",
            expected_pods=expected_pods,
        )
    admitted = (workload.get("status") or {}).get("startTime")
    failures = [
        classify_pod_failure(p)
        for p in pods
        if (p.get("status") or {}).get("phase") == "Failed" and not _ended_before(p, admitted)
    ]
    config_errors = [f for f in failures if not f.retriable]
    if complete and not config_errors:
        return Observation(
            "succeeded", REASON_COMPLETED, "all pods finished", expected_pods=expected_pods
        )
    if failures:
        # A config error wins (no restart can fix it), then what the trainer itself said
        # (instability, out of memory) over the peers that failed because it did.
        first = min(failures, key=_failure_rank)
        return Observation(
            "failed",
            first.cause,
            first.message,
            retriable=first.retriable,
            expected_pods=expected_pods,
            exit_code=first.exit_code,
        )
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        said = failed.get("message") or failed.get("reason") or "the workload failed"
        if f"exit code {int(ExitCode.CONFIG_ERROR)}" in said:
            return Observation("failed", REASON_CONFIG_ERROR, said, expected_pods=expected_pods)
        return Observation(
            "failed", CAUSE_CRASHED, said, retriable=True, expected_pods=expected_pods
        )
    live = [p for p in pods if not _is_terminating(p)]
    running = sum(
        1 for p in live if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")
    )
    if running >= expected_pods and any(
        (p.get("status") or {}).get("phase") == "Running" for p in live
    ):
        return Observation(
            "running",
            REASON_TRAINING,
            f"{running}/{expected_pods} pods running",
            running_pods=running,
            expected_pods=expected_pods,
        )
    problems = [problem for p in live if (problem := _waiting_problem(p))]
    if not live:
        return Observation(
            "pending",
            REASON_CREATED,
            "waiting for the pods to be created",
            expected_pods=expected_pods,
        )
    message = f"{running}/{expected_pods} pods running" + (f"; {problems[0]}" if problems else "")
    return Observation(
        "pending", REASON_PODS_STARTING, message, running_pods=running, expected_pods=expected_pods
    )


def _completion_index(pod: Mapping[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(
        COMPLETION_INDEX
    )


def rank0_pod(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The running pod of node rank 0 (completion index 0), which serves the metrics."""
    for pod in pods:
        if _completion_index(pod) == "0" and (pod.get("status") or {}).get("phase") == "Running":
            return pod
    return None


def _rank0_last_words(pods: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The termination messages of rank 0's containers once it succeeded.

    The trainer's last words (`outputs: {...}`, contract.outputs_message) are the only way
    its metrics.json reaches the operator, which does not mount the run's output.
    """
    for pod in pods:
        if _completion_index(pod) != "0" or (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        for terminated in _terminated_containers(pod):
            yield terminated.get("message") or ""


def finished_metrics(pods: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """The metrics rank 0 left in its termination message when it succeeded, if any."""
    parsed = (parse_outputs_message(message) for message in _rank0_last_words(pods))
    return next((metrics for metrics in parsed if metrics is not None), None)


def finished_data(pods: Iterable[Mapping[str, Any]]) -> DataRecord | None:
    """The data record rank 0 left in its termination message when it succeeded, if any."""
    parsed = (parse_outputs_data(message) for message in _rank0_last_words(pods))
    return next((data for data in parsed if data is not None), None)


def headline_metric(suite: str, metrics: Mapping[str, float] | None) -> str | None:
    """`<suite>.<metric>=<value>` of `suite`'s headline metric (an evaluate run's first
    suite), None when the run did not report it."""
    key = eval_metric_key(suite, EVAL_SUITE_METRICS[suite][0])
    value = (metrics or {}).get(key)
    return f"{key}={value:.4g}" if value is not None else None


@dataclass(frozen=True)
class TrainerMetrics:
    """The `kubetrain_trainer_*` values the status shows; None where the trainer has none."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint_step: int | None = None
    heartbeat: float | None = None  # unix time, the trainer's clock
    # Every evaluation so far, oldest first: (step, {metric: value}) with metrics.json names.
    eval_history: tuple[tuple[int, dict[str, float]], ...] = ()


_METRIC_FIELDS = {
    contract.STEP: "step",
    contract.TOTAL_STEPS: "total_steps",
    contract.EPOCH: "epoch",
    contract.LOSS: "loss",
    contract.EVAL_LOSS: "eval_loss",
    contract.TOKENS_PER_SECOND: "tokens_per_second",
    contract.CHECKPOINT_STEP: "checkpoint_step",
    contract.HEARTBEAT: "heartbeat",
}
_INTEGER_FIELDS = {"step", "total_steps", "checkpoint_step"}


def parse_trainer_metrics(text: str) -> TrainerMetrics:
    """Read rank 0's /metrics text. Gauges still at NaN (nothing measured yet) become None.

    Raises ValueError when the text is not Prometheus exposition format.
    """
    values: dict[str, Any] = {}
    history: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == contract.EVAL_HISTORY and math.isfinite(sample.value):
                step = sample.labels.get(contract.EVAL_HISTORY_STEP_LABEL, "")
                metric = sample.labels.get(contract.EVAL_HISTORY_METRIC_LABEL, "")
                if step.isdigit() and metric:
                    history.setdefault(int(step), {})[metric] = sample.value
                continue
            field = _METRIC_FIELDS.get(sample.name)
            if field is None or sample.labels or not math.isfinite(sample.value):
                continue
            values[field] = int(sample.value) if field in _INTEGER_FIELDS else sample.value
    if values.get("total_steps") == 0:  # the trainer has not planned its steps yet
        values.pop("total_steps")
    values["eval_history"] = tuple((step, history[step]) for step in sorted(history))
    return TrainerMetrics(**values)


def eval_history_status(metrics: TrainerMetrics) -> list[dict[str, Any]]:
    """status.evalHistory from a metrics sample: [{step, metrics}] oldest first."""
    return [{"step": step, "metrics": values} for step, values in metrics.eval_history]


def eta_seconds(
    first: tuple[int, float] | None, latest: tuple[int, float], total_steps: int | None
) -> float | None:
    """Seconds left at the mean step rate between two (step, unix time) samples."""
    if first is None or not total_steps:
        return None
    steps = latest[0] - first[0]
    elapsed = latest[1] - first[1]
    if steps <= 0 or elapsed <= 0:
        return None
    return max(total_steps - latest[0], 0) * elapsed / steps


def format_duration(seconds: float) -> str:
    """A Go duration (`1h2m3s`, `45s`), the form Kubernetes tools print."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return text + f"{secs}s"


def progress_status(metrics: TrainerMetrics, eta: float | None) -> dict[str, Any]:
    """status.progress (camelCase) from a metrics sample and an ETA in seconds."""
    percent = None
    if metrics.step is not None and metrics.total_steps:
        percent = min(100, int(100 * metrics.step / metrics.total_steps))
    progress = Progress(
        step=metrics.step,
        total_steps=metrics.total_steps,
        epoch=metrics.epoch,
        loss=metrics.loss,
        eval_loss=metrics.eval_loss,
        tokens_per_second=metrics.tokens_per_second,
        eta=format_duration(eta) if eta is not None else None,
        percent=percent,
        heartbeat_time=rfc3339(metrics.heartbeat) if metrics.heartbeat is not None else None,
    )
    return progress.model_dump(mode="json", by_alias=True, exclude_none=True)


def checkpoint_uri(output: str, checkpoint_step: int | None) -> str | None:
    """URI of the checkpoint the trainer saved at `checkpoint_step` (HF's checkpoint-N)."""
    if not checkpoint_step:
        return None
    return f"{output.rstrip('/')}/{checkpoint_dir_name(checkpoint_step)}"


# Which condition is True in each phase; the others are False with the phase's reason.
_TRUE_IN_PHASE = {
    PHASE_RUNNING: CONDITION_RUNNING,
    PHASE_SUCCEEDED: CONDITION_SUCCEEDED,
    PHASE_FAILED: CONDITION_FAILED,
    PHASE_SUSPENDED: CONDITION_SUSPENDED,
}


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    type_: str,
    true: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> dict[str, Any]:
    status = "True" if true else "False"
    before = previous.get(type_)
    moved = before is None or before.get("status") != status
    condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if moved else before.get("lastTransitionTime", now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def next_status(
    previous: Mapping[str, Any] | None,
    *,
    phase: Phase,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
    spec_change_ignored: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The whole new status: `previous` with phase, conditions and `fields` (camelCase) set.

    Ready is True only once the run Succeeded (kstatus: desired state reached); Running,
    Succeeded, Failed and Suspended mirror the phase; kstatus' Reconciling is True while
    Pending or Running and Stalled once Failed. `spec_change_ignored`, when given, is
    the message of a True SpecChangeIgnored condition; otherwise that condition is dropped.
    A field given as None is removed.
    """
    status = dict(previous or {})
    before = {c.get("type", ""): c for c in status.get("conditions") or []}
    true_type = _TRUE_IN_PHASE.get(phase)
    conditions = [
        _condition(
            before, CONDITION_READY, phase == PHASE_SUCCEEDED, reason, message, now, generation
        )
    ]
    for type_ in (CONDITION_RUNNING, CONDITION_SUCCEEDED, CONDITION_FAILED, CONDITION_SUSPENDED):
        conditions.append(
            _condition(before, type_, type_ == true_type, reason, message, now, generation)
        )
    conditions.append(
        _condition(
            before,
            CONDITION_RECONCILING,
            phase in (PHASE_PENDING, PHASE_RUNNING),
            reason,
            message,
            now,
            generation,
        )
    )
    conditions.append(
        _condition(
            before, CONDITION_STALLED, phase == PHASE_FAILED, reason, message, now, generation
        )
    )
    if spec_change_ignored:
        conditions.append(
            _condition(
                before,
                CONDITION_SPEC_CHANGE_IGNORED,
                True,
                REASON_RUN_IN_PROGRESS,
                spec_change_ignored,
                now,
                generation,
            )
        )
    status.update(phase=phase, conditions=conditions)
    if generation is not None:
        status["observedGeneration"] = generation
    for key, value in fields.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return status


def invalid_spec_status(
    previous: Mapping[str, Any] | None, message: str, *, now: str, generation: int | None
) -> dict[str, Any]:
    """Status (camelCase dict) for a Pipeline or Sweep pydantic refuses where the CRD's CEL
    cannot (a dependsOn cycle; a choice its template's field does not take): Failed with
    InvalidSpec. The operator validates each one itself and writes this, creating nothing."""
    return next_status(
        previous,
        phase=PHASE_FAILED,
        reason=REASON_INVALID_SPEC,
        message=message,
        now=now,
        generation=generation,
    )


def condition_of(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of a type in a status, or None."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`; {} when equal."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, Mapping) and isinstance(old[key], Mapping):
            nested = merge_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif old[key] != value:
            patch[key] = value
    return patch


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # RFC 3339 in UTC, as the API server writes it


def rfc3339(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_rfc3339(text: str) -> float:
    moment = datetime.datetime.strptime(text, TIMESTAMP_FORMAT)
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()
