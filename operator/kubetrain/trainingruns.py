"""What the operator decides for a TrainingRun: one pure function of what it observed.

`plan_trainingrun(observed)` takes the run as read, the Jobs/JobSets and pods labelled with
its name, its ConfigMap and Service as they exist under their names, the claims it mounts,
rank 0's metrics and the clock, and returns a `TrainingRunPlan`: the actions to take (create,
update or delete children, record the spec an attempt starts from, announce) and the whole
new status. The kopf handler executes plans (`kubetrain.handlers.trainingrun`); nothing here
talks to the API, so every transition is a table test (tests/unit/test_plan_trainingrun.py).

The lifecycle. A new run is validated (InvalidSpec names the field), waits while a claim it
mounts is missing or cannot be shared by its nodes (WaitingForDependencies), then gets
attempt 1: ConfigMap, headless Service and Indexed Job (or a JobSet), owned by the run.
A child whose name is held by something else waits with NameTaken; one still owned by a
deleted run of the same name waits for garbage collection; one the apiserver refuses ends
in a condition with the apiserver's message (Failed InvalidSpec for 400/422, Pending for
403/404). While the attempt runs, its ConfigMap and Service are ensured every pass, and pods
waiting on a missing Secret or ConfigMap are named (the operator reads no Secrets). A
retriable failure deletes the attempt's workload and, once its pods are gone (two gangs
must never write one output), starts attempt N+1 from the newest checkpoint, within
restartPolicy.maxRestarts; a workload suspended by a queue (Kueue) is waiting, not failing,
and costs no restart. Pods of an old attempt stuck terminating (a dead node never confirms)
are named after a while and force-deleted when restartPolicy.forceDeleteAfterSeconds says.
A config error fails the run at once. `spec.suspend: true` deletes the workload; false
starts a new attempt. Other spec edits after the start are ignored (SpecChangeIgnored,
compared after a round trip through the model, so fields a CRD upgrade defaults are no
edit) and apply on the next resume: each attempt's spec is kept in the
`kubetrain.dev/started-spec` annotation. A finished run keeps its verdict: nothing is
re-created, no restart budget is reset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetrain.api import (
    CONDITION_READY,
    FINISHED_PHASES,
    GROUP,
    KIND,
    LABEL_ATTEMPT,
    MAX_ATTEMPT_HISTORY,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_CLEANED_UP,
    REASON_COMPLETED,
    REASON_CONFIG_ERROR,
    REASON_CREATED,
    REASON_DEADLINE_EXCEEDED,
    REASON_INVALID_SPEC,
    REASON_NO_PROGRESS,
    REASON_RESTARTING,
    REASON_RESTARTS_EXHAUSTED,
    REASON_SUSPENDED,
    REASON_WAITING_FOR_DEPENDENCIES,
    AttemptRecord,
    Condition,
    DataStatus,
    EvalPoint,
    Outputs,
    Phase,
    Progress,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
    parse_pvc_uri,
    uri_refs,
)
from kubetrain.render import (
    RenderError,
    job_name,
    owner_reference,
    render_trainingrun,
)
from kubetrain.restarts import retry_verdict
from kubetrain.status import (
    CAUSE_NO_PROGRESS,
    Observation,
    TrainerMetrics,
    checkpoint_uri,
    eta_seconds,
    eval_history_status,
    finished_data,
    finished_metrics,
    format_duration,
    headline_metric,
    next_status,
    observe_attempt,
    parse_rfc3339,
    progress_status,
    rfc3339,
)
from kubetrain_trainer.config import format_validation_error

STARTED_SPEC_ANNOTATION = f"{GROUP}/started-spec"
# Old pods must be gone before the next attempt starts, so deletion waits for them.
PROPAGATION = "Foreground"
# A pod still terminating this long past its grace period is on a node that does not answer.
STUCK_TERMINATING_SECONDS = 300

REASON_NAME_TAKEN = "NameTaken"  # a child's name is held by an object that is not ours
REASON_FORBIDDEN = "Forbidden"  # the apiserver refused a child with 403 (RBAC, quota, policy)
REASON_API_NOT_INSTALLED = "APINotInstalled"  # 404 on create: the kind is not served
REASON_PODS_STUCK_TERMINATING = "PodsStuckTerminating"
MAX_RECORD_MESSAGE = 500  # characters of a pod's message kept in status.attempts

# How the kubelet says a pod's env names an object that does not exist.
_MISSING_REFERENCE = re.compile(r'(secret|configmap) "([^"]+)" not found', re.IGNORECASE)


# --- What was observed ------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """The apiserver refused to create a child: which one, the HTTP code and its message."""

    object: str  # `Kind namespace/name`
    api_version: str
    code: int
    message: str


@dataclass(frozen=True)
class Observed:
    """Everything one decision reads, as the API serves it (camelCase dicts).

    `workloads` and `pods` are every Job/JobSet and pod labelled with the run's name, of
    any attempt and any owner; `config_map` and `service` are what exists under the names
    the run's children take (None: nothing); `claims` maps each claim the spec mounts to
    the PVC (None: missing). `metrics` is rank 0's sample of the current attempt;
    `first_sample` the (attempt, step, time) the ETA extrapolates from; `refusal` what the
    apiserver said to the previous plan's creations.
    """

    run: Mapping[str, Any]
    now: float
    workloads: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    config_map: Mapping[str, Any] | None = None
    service: Mapping[str, Any] | None = None
    claims: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)
    metrics: TrainerMetrics | None = None
    first_sample: tuple[int, int, float] | None = None
    refusal: Refusal | None = None


# --- What to do -------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateChild:
    """Create `obj` (ConfigMap, Service, Job or JobSet) if absent; announce it if created."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class UpdateConfigMap:
    """Bring the run's ConfigMap's data up to date (it holds the attempt's TrainerConfig)."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class DeleteWorkload:
    """Delete a Job or JobSet and, first, its pods."""

    workload: Mapping[str, Any]
    why: str


@dataclass(frozen=True)
class ForceDeletePod:
    """Delete a pod with grace period 0: its node no longer answers for it."""

    namespace: str
    name: str
    why: str


@dataclass(frozen=True)
class RecordStartedSpec:
    """Keep the spec an attempt starts from in the run's started-spec annotation."""

    spec: str


@dataclass(frozen=True)
class Announce:
    """An event on the run and the same line in the operator's log."""

    reason: str
    message: str
    warning: bool = False


Action = (
    CreateChild | UpdateConfigMap | DeleteWorkload | ForceDeletePod | RecordStartedSpec | Announce
)


@dataclass(frozen=True)
class TrainingRunPlan:
    """The actions to take, in order, and the status to write once they are done.

    `restart_cause` is set when the plan starts a restart (for the restarts metric);
    `first_sample` is what the next decision's ETA extrapolates from.
    """

    actions: tuple[Action, ...]
    status: TrainingRunStatus
    restart_cause: str | None = None
    first_sample: tuple[int, int, float] | None = None


# --- The decision -----------------------------------------------------------------------


def plan_trainingrun(observed: Observed) -> TrainingRunPlan:
    """Decide the next step for one TrainingRun (module docstring: the lifecycle)."""
    return _Decision(observed).plan()


class _Decision:
    """One decision: read-only views of the observation, and helpers that build plans."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        body = observed.run
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.generation: int | None = meta.get("generation")
        self.spec: Mapping[str, Any] = body.get("spec") or {}
        self.status = TrainingRunStatus.model_validate(body.get("status") or {})
        started = (meta.get("annotations") or {}).get(STARTED_SPEC_ANNOTATION)
        self.started_spec: dict[str, Any] | None = json.loads(started) if started else None
        self.announcements: list[Announce] = []

    @property
    def qualified(self) -> str:
        return f"{self.namespace}/{self.name}"

    # --- plans -------------------------------------------------------------------------

    def plan(self) -> TrainingRunPlan:
        status = self.status
        ready = _condition(status, CONDITION_READY)
        # An invalid spec fails for good until it is edited (a new generation): only then is
        # it tried again. Trying the same spec every pass would loop on the refusal, and a
        # pass in between could show another verdict (waiting on a claim) for a while.
        refused_spec = status.phase == PHASE_FAILED and ready is not None
        refused_spec = refused_spec and ready.reason == REASON_INVALID_SPEC
        refused_spec = refused_spec and status.observed_generation != self.generation
        if self.observed.refusal is not None:
            return self.refused(self.observed.refusal)
        if status.phase in FINISHED_PHASES and not refused_spec:
            return self.finished(status.phase, ready)
        past_deadline = self.past_deadline()
        if past_deadline is not None:
            return past_deadline
        if self.spec.get("suspend"):
            return self.suspend()
        attempt = status.attempt or 0
        if attempt == 0:
            # A status that lost its attempt (restored from a backup, replaced) must not
            # cost the running gang: adopt the newest attempt's workload if there is one.
            newest = self.newest_attempt()
            return self.follow(newest) if newest else self.start(1)
        if status.phase in (PHASE_SUSPENDED, PHASE_FAILED):
            return self.start(attempt + 1)
        return self.follow(attempt)

    def done(
        self,
        phase: Phase,
        reason: str,
        message: str,
        actions: Sequence[Action] = (),
        *,
        spec_change_ignored: str | None = None,
        restart_cause: str | None = None,
        first_sample: tuple[int, int, float] | None = None,
        **changes: Any,
    ) -> TrainingRunPlan:
        """The plan: `actions`, then the status in `phase` with `changes` (snake_case)."""
        status = _with_phase(
            self.status,
            phase,
            reason,
            message,
            now=self.observed.now,
            generation=self.generation,
            spec_change_ignored=spec_change_ignored,
        )
        status = status.model_copy(update=changes)
        return TrainingRunPlan(
            actions=(*self.announcements, *actions),
            status=status,
            restart_cause=restart_cause,
            first_sample=first_sample if first_sample is not None else self.observed.first_sample,
        )

    def announce(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.announcements.append(Announce(reason, message, warning))

    def announce_once(self, reason: str, message: str, *, prefix: str = "", warn: bool = True):
        """Announce unless the status already says this reason and message."""
        ready = _condition(self.status, CONDITION_READY)
        if ready is None or (ready.reason, ready.message) != (reason, message):
            self.announce(reason, prefix + message, warning=warn)

    def fail(
        self, reason: str, message: str, actions: Sequence[Action] = (), **changes: Any
    ) -> TrainingRunPlan:
        self.announce_once(reason, message, prefix="Failed: ")
        return self.done(
            PHASE_FAILED, reason, message, actions, completion_time=self.now_text, **changes
        )

    def wait(self, reason: str, message: str, actions: Sequence[Action] = ()) -> TrainingRunPlan:
        """Pending for a reason a person may have to act on: announced once, as a warning."""
        self.announce_once(reason, message)
        return self.done(PHASE_PENDING, reason, message, actions)

    @property
    def now_text(self) -> str:
        return rfc3339(self.observed.now)

    def refused(self, refusal: Refusal) -> TrainingRunPlan:
        said = f"the apiserver refused {refusal.object} ({refusal.code}): {refusal.message}"
        if refusal.code in (400, 422):
            return self.fail(REASON_INVALID_SPEC, f"{said}; fix the spec")
        if refusal.code == 404:
            return self.wait(
                REASON_API_NOT_INSTALLED,
                f"{refusal.api_version} is not served by this cluster ({refusal.object} "
                "cannot be created): install it (the JobSet CRD and controller for "
                "spec.backend: jobset) or use spec.backend: job",
            )
        return self.wait(REASON_FORBIDDEN, f"{said}; retried every interval")

    def finished(self, phase: Phase, ready: Condition | None) -> TrainingRunPlan:
        """A finished run keeps its verdict; only acknowledge the generation (kstatus).

        Its children are never re-created, its restart budget never reset. With
        ttlSecondsAfterFinished, its workload (and so its pods) is deleted that long after
        the verdict was recorded; the run, its status and outputs stay.
        """
        reason, message = (ready.reason, ready.message) if ready else ("", "")
        ttl = self.spec.get("ttlSecondsAfterFinished")
        completed = self.status.completion_time
        if ttl is None or self.status.cleaned_up_time or not completed:
            return self.done(phase, reason, message)
        if self.observed.now < parse_rfc3339(completed) + ttl:
            return self.done(phase, reason, message)
        workloads = self.owned_workloads()
        if workloads:
            why = f"ttlSecondsAfterFinished ({ttl}s) passed since the run finished"
            return self.done(phase, reason, message, self.delete(workloads, why)[1])
        self.announce(
            REASON_CLEANED_UP,
            f"Deleted the workload and pods: ttlSecondsAfterFinished ({ttl}s) passed since "
            f"the run finished at {completed}; the run and its outputs stay",
        )
        return self.done(phase, reason, message, cleaned_up_time=self.now_text)

    def past_deadline(self) -> TrainingRunPlan | None:
        """Fail with DeadlineExceeded once spec.activeDeadlineSeconds passed since startTime."""
        limit = self.spec.get("activeDeadlineSeconds")
        started = self.status.start_time
        if not limit or not started:
            return None
        ran = self.observed.now - parse_rfc3339(started)
        if ran < limit:
            return None
        _, actions = self.delete(self.owned_workloads(), "spec.activeDeadlineSeconds passed")
        checkpoint = self.status.latest_checkpoint
        message = (
            f"ran {format_duration(ran)} since it started at {started}, past "
            f"spec.activeDeadlineSeconds ({limit}s); its pods were stopped (the trainer saves "
            "a checkpoint on SIGTERM) and checkpoints are kept"
            + (f" (newest seen: {checkpoint})" if checkpoint else "")
        )
        return self.fail(REASON_DEADLINE_EXCEEDED, message, actions)

    def suspend(self) -> TrainingRunPlan:
        deleting, actions = self.delete(self.owned_workloads(), "the run is suspended")
        message = "spec.suspend is true; set it to false to resume from the newest checkpoint"
        if deleting:
            message += f" (stopping {', '.join(deleting)})"
        if self.status.phase != PHASE_SUSPENDED:
            self.announce(REASON_SUSPENDED, "Suspended: spec.suspend is true")
        return self.done(PHASE_SUSPENDED, REASON_SUSPENDED, message, actions)

    def start(self, attempt: int) -> TrainingRunPlan:
        """Start `attempt` with the current spec (new run, resume, or fixed InvalidSpec)."""
        try:
            run = self.validated(self.spec)
        except ValidationError as e:
            return self.fail(
                REASON_INVALID_SPEC, format_validation_error(e, f"TrainingRun {self.qualified}")
            )
        waiting = self.wait_for_older(attempt, run)
        if waiting is not None:
            return waiting
        missing = self.missing_claims(run)
        if missing:
            return self.wait(REASON_WAITING_FOR_DEPENDENCIES, "; ".join(missing))
        try:
            children = render_trainingrun(run, attempt, owner=owner_reference(run))
        except RenderError as e:
            return self.fail(REASON_INVALID_SPEC, str(e))
        blocked = self.names_blocked(children)
        if blocked is not None:
            return blocked
        # Record the spec first: restarts of this run render from it, whatever edits follow.
        started = RecordStartedSpec(json.dumps(self.spec, sort_keys=True, separators=(",", ":")))
        actions = [started, *self.ensure(children)]
        return self.done(
            PHASE_PENDING,
            REASON_CREATED,
            f"attempt {attempt}: waiting for {run.spec.resources.nodes} pod(s) to run",
            actions,
            attempt=attempt,
            restarts=self.status.restarts or 0,
            completion_time=None,
            # The progress is the attempt's own (a resumed run's was the last attempt's).
            progress=None,
            last_progress_time=None,
        )

    def follow(self, attempt: int) -> TrainingRunPlan:
        """Follow attempt N's workload and pods; restart or finish as they say."""
        try:
            run = self.validated(self.started_spec if self.started_spec is not None else self.spec)
        except ValidationError as e:
            return self.fail(
                REASON_INVALID_SPEC, format_validation_error(e, f"TrainingRun {self.qualified}")
            )
        ignored = self.spec_change_ignored(run, attempt)
        common = {"attempt": attempt, "restarts": self.status.restarts or 0}
        waiting = self.wait_for_older(attempt, run, common)
        if waiting is not None:
            return waiting
        try:
            children = render_trainingrun(run, attempt, owner=owner_reference(run))
        except RenderError as e:
            return self.fail(REASON_INVALID_SPEC, str(e))
        blocked = self.names_blocked(children, **common)
        if blocked is not None:
            return blocked
        workload = self.workload(job_name(self.name, attempt))
        ensure = self.ensure(children)
        if workload is None:
            # After a restart, or deleted by someone: (re)create the attempt's children.
            return self.done(
                PHASE_PENDING,
                REASON_CREATED,
                f"attempt {attempt}: waiting for {run.spec.resources.nodes} pod(s) to run",
                ensure,
                spec_change_ignored=ignored,
                **common,
            )
        if workload["metadata"].get("deletionTimestamp"):
            # Deleted by someone else; re-created once it is gone.
            return TrainingRunPlan((), self.status, first_sample=self.observed.first_sample)
        pods = self.attempt_pods(attempt)
        observation = observe_attempt(workload, pods, run.spec.resources.nodes)
        if observation.state == "succeeded":
            outputs = finished_outputs(run, pods)
            what = "results are" if run.spec.method == "evaluate" else "model is"
            message = f"attempt {attempt} completed; the {what} in {run.spec.output}"
            if outputs.headline:
                message += f" ({outputs.headline})"
            self.announce(REASON_COMPLETED, f"Succeeded: {message}")
            return self.done(
                PHASE_SUCCEEDED,
                REASON_COMPLETED,
                message,
                ensure,
                spec_change_ignored=ignored,
                completion_time=self.now_text,
                outputs=outputs,
                data=finished_data_status(pods),
                **common,
            )
        if observation.state == "failed":
            return self.after_failure(run, attempt, workload, observation, ignored)
        return self.progress(run, attempt, workload, observation, pods, ensure, ignored)

    def progress(
        self,
        run: TrainingRun,
        attempt: int,
        workload: Mapping[str, Any],
        observation: Observation,
        pods: Sequence[Mapping[str, Any]],
        ensure: Sequence[Action],
        ignored: str | None,
    ) -> TrainingRunPlan:
        running = observation.state == "running"
        changes: dict[str, Any] = {"attempt": attempt, "restarts": self.status.restarts or 0}
        if running and not self.status.start_time:
            changes["start_time"] = self.now_text
        first_sample = self.observed.first_sample
        metrics = self.observed.metrics if running else None
        if metrics is not None and metrics.step is not None:
            # The ETA extrapolates from the first sample this operator took of the attempt.
            first = first_sample
            if first is None or first[0] != attempt or first[1] > metrics.step:
                first = first_sample = (attempt, metrics.step, self.observed.now)
            eta = eta_seconds(first[1:], (metrics.step, self.observed.now), metrics.total_steps)
            changes["progress"] = Progress.model_validate(progress_status(metrics, eta))
        if metrics is not None:
            checkpoint = checkpoint_uri(run.spec.output, metrics.checkpoint_step)
            if checkpoint:
                changes["latest_checkpoint"] = checkpoint
            if metrics.eval_history:
                history = eval_history_status(metrics)
                changes["eval_history"] = [EvalPoint.model_validate(p) for p in history]
        if running:
            before = self.status.progress
            progress = changes.get("progress") or before
            advanced = "progress" in changes and (
                before is None
                or (before.step, before.heartbeat_time) != (progress.step, progress.heartbeat_time)
            )
            last = self.status.last_progress_time
            if last is None or advanced:
                last = changes["last_progress_time"] = self.now_text
            stalled = self.stalled(run, progress, last, answered=metrics is not None)
            if stalled is not None:
                hung = Observation("failed", CAUSE_NO_PROGRESS, stalled, retriable=True)
                return self.after_failure(run, attempt, workload, hung, ignored)
        phase = PHASE_RUNNING if running else PHASE_PENDING
        reason, message = observation.reason, observation.message
        missing = _missing_references(run, pods, self.namespace)
        if missing and not running:
            reason, message = REASON_WAITING_FOR_DEPENDENCIES, "; ".join(missing)
            self.announce_once(reason, message)
        elif phase != self.status.phase:
            self.announce(observation.reason, f"Attempt {attempt}: {observation.message}")
        return self.done(
            phase,
            reason,
            message,
            ensure,
            spec_change_ignored=ignored,
            first_sample=first_sample,
            **changes,
        )

    def stalled(
        self, run: TrainingRun, progress: Progress | None, last: str, *, answered: bool
    ) -> str | None:
        """Why a running attempt counts as hung (NoProgress), None while it is not.

        Until the trainer's first sample of training (a heartbeat, or a step past 0) the
        bound is startupTimeoutSeconds, which covers loading the model and data; then it is
        stallTimeoutSeconds without the step or the heartbeat advancing.
        """
        policy = run.spec.restart_policy
        if not policy.stall_timeout_seconds:
            return None
        trained = progress is not None and bool(progress.heartbeat_time or progress.step)
        limit = policy.stall_timeout_seconds if trained else policy.startup_timeout_seconds
        quiet = self.observed.now - parse_rfc3339(last)
        if quiet < limit:
            return None
        if not trained:
            said = "does not answer on its metrics port" if not answered else (
                "answers but has not begun training (loading the model or data?)"
            )  # fmt: skip
            return (
                f"no training step within restartPolicy.startupTimeoutSeconds ({limit}s) "
                f"of the attempt's pods running; rank 0's trainer {said}"
            )
        if not answered:
            return (
                f"rank 0's trainer stopped answering on its metrics port: no sign of life for "
                f"{format_duration(quiet)} (restartPolicy.stallTimeoutSeconds {limit}s); the "
                "process is frozen or gone"
            )
        return (
            f"step {progress.step} has not advanced and the trainer's heartbeat stopped: no "
            f"progress for {format_duration(quiet)} (restartPolicy.stallTimeoutSeconds "
            f"{limit}s); the training loop hangs (a collective waiting for a lost peer, a "
            "deadlock, storage that does not answer)"
        )

    def after_failure(
        self,
        run: TrainingRun,
        attempt: int,
        workload: Mapping[str, Any],
        observation: Observation,
        ignored: str | None,
    ) -> TrainingRunPlan:
        """Restart or fail as restartPolicy says (kubetrain.restarts); record the attempt."""
        history = list(self.status.attempts or [])
        cause = observation.reason if observation.retriable else REASON_CONFIG_ERROR
        verdict = retry_verdict(
            run.spec, cause, observation.exit_code, observation.message, history
        )
        record = AttemptRecord(
            attempt=attempt,
            cause=observation.reason,
            exit_code=observation.exit_code,
            message=observation.message[:MAX_RECORD_MESSAGE],
            counted=verdict.restart and verdict.counted,
            finished_at=self.now_text,
        )
        history = [*history, record][-MAX_ATTEMPT_HISTORY:]
        if not verdict.restart:
            return self.fail(verdict.reason, verdict.message, attempts=history)
        restarts = self.status.restarts or 0
        max_restarts = run.spec.restart_policy.max_restarts
        what = f"attempt {attempt} failed ({observation.reason}): {observation.message}"
        if verdict.counted and restarts >= max_restarts:
            return self.fail(
                REASON_RESTARTS_EXHAUSTED,
                f"{what}; restartPolicy.maxRestarts ({max_restarts}) restarts used",
                attempts=history,
            )
        following = attempt + 1
        budget = (
            f"restart {restarts + 1} of {max_restarts}"
            if verdict.counted
            else "not counted against restartPolicy.maxRestarts"
        )
        self.announce(
            REASON_NO_PROGRESS if observation.reason == CAUSE_NO_PROGRESS else REASON_RESTARTING,
            f"{what}; starting attempt {following} ({budget})",
            warning=True,
        )
        # Status with the deletion: should the operator stop right after, the next one sees
        # attempt N+1, deletes the old workload (no longer the attempt's) and goes on. The
        # progress is the attempt's own: the next one starts without it.
        return self.done(
            PHASE_PENDING,
            REASON_RESTARTING,
            f"{what}; attempt {following} starts once its pods are gone ({budget})",
            [DeleteWorkload(workload, f"attempt {following} replaces it")],
            spec_change_ignored=ignored,
            restart_cause=observation.reason,
            attempt=following,
            restarts=restarts + 1 if verdict.counted else restarts,
            attempts=history,
            progress=None,
            last_progress_time=None,
        )

    # --- what the observation says -----------------------------------------------------

    def validated(self, spec: Mapping[str, Any]) -> TrainingRun:
        """The run as a model with `spec`; ValidationError if it is bad."""
        raw = {key: value for key, value in self.observed.run.items() if key != "status"}
        return TrainingRun.model_validate({**raw, "spec": spec})

    def owns(self, obj: Mapping[str, Any]) -> bool:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(ref.get("uid") == self.uid for ref in refs)

    def owned_workloads(self) -> list[Mapping[str, Any]]:
        """Jobs and JobSets of this run object (not of an older run with the same name)."""
        return [w for w in self.observed.workloads if self.owns(w)]

    def workload(self, name: str) -> Mapping[str, Any] | None:
        return next((w for w in self.owned_workloads() if w["metadata"]["name"] == name), None)

    def newest_attempt(self) -> int:
        """The highest attempt number among this run's workloads; 0 if it has none."""
        labels = [w["metadata"].get("labels") or {} for w in self.owned_workloads()]
        attempts = [int(a) for a in (lb.get(LABEL_ATTEMPT, "") for lb in labels) if a.isdigit()]
        return max(attempts, default=0)

    def attempt_pods(self, attempt: int) -> list[Mapping[str, Any]]:
        return [p for p in self.observed.pods if _attempt_of(p) == str(attempt)]

    def delete(
        self, workloads: Sequence[Mapping[str, Any]], why: str
    ) -> tuple[list[str], list[Action]]:
        """Deletions of the workloads not yet being deleted, and the names of all of them."""
        names = [describe(w) for w in workloads]
        actions: list[Action] = [
            DeleteWorkload(w, why) for w in workloads if not w["metadata"].get("deletionTimestamp")
        ]
        return names, actions

    def wait_for_older(
        self, attempt: int, run: TrainingRun, changes: Mapping[str, Any] | None = None
    ) -> TrainingRunPlan | None:
        """While older attempts' workloads exist: delete them and wait (None: none left)."""
        current = job_name(self.name, attempt)
        older = [w for w in self.owned_workloads() if w["metadata"]["name"] != current]
        if not older:
            return None
        deleting, actions = self.delete(older, f"attempt {attempt} replaces it")
        message = f"waiting for {', '.join(deleting)} to be deleted before attempt {attempt} starts"
        changes = changes or {}
        # Past this long, a pod's node is not answering for it (force-delete, or say so).
        force_after = run.spec.restart_policy.force_delete_after_seconds
        patience = STUCK_TERMINATING_SECONDS if force_after is None else force_after
        stuck = [
            p
            for p in self.observed.pods
            if _attempt_of(p) != str(attempt) and self.terminating_for(p) > patience
        ]
        if not stuck:
            return self.done(PHASE_PENDING, REASON_RESTARTING, message, actions, **changes)
        nodes = sorted({(p.get("spec") or {}).get("nodeName") or "no node" for p in stuck})
        names = ", ".join(p["metadata"]["name"] for p in stuck)
        message = (
            f"{message}: pod(s) {names} on node(s) {', '.join(nodes)} are still terminating "
            f"more than {int(patience)}s past their grace period; the node may be down. "
        )
        if force_after is None:
            message += (
                "Delete them with `kubectl delete pod --force --grace-period=0` once the node "
                "is known to be gone, or set spec.restartPolicy.forceDeleteAfterSeconds"
            )
        else:
            message += "Force-deleting them (spec.restartPolicy.forceDeleteAfterSeconds)"
            for pod in stuck:
                meta = pod["metadata"]
                why = f"terminating {int(self.terminating_for(pod))}s past its grace period"
                actions.append(ForceDeletePod(meta["namespace"], meta["name"], why))
        self.announce_once(REASON_PODS_STUCK_TERMINATING, message)
        return self.done(PHASE_PENDING, REASON_PODS_STUCK_TERMINATING, message, actions, **changes)

    def terminating_for(self, pod: Mapping[str, Any]) -> float:
        """Seconds since a deleted pod's grace period ended (deletionTimestamp is its end)."""
        deadline = (pod.get("metadata") or {}).get("deletionTimestamp")
        return self.observed.now - parse_rfc3339(deadline) if deadline else 0.0

    def missing_claims(self, run: TrainingRun) -> list[str]:
        """Claims the pods would mount that are missing or that its nodes cannot share."""
        uses: dict[str, tuple[str, bool]] = {}  # claim -> (where it is named, written to)
        for ref in uri_refs(run.spec):
            if ref.kind == "pvc":
                claim = parse_pvc_uri(ref.uri).claim
                uses.setdefault(claim, (f"{ref.field}: {ref.uri}", ref.field == "spec.output"))
        cache = run.spec.cache.claim_name if run.spec.cache is not None else None
        if cache:
            uses.setdefault(cache, ("spec.cache.claimName", True))
        return [
            problem
            for claim, (where, writes) in uses.items()
            if (problem := self.claim_problem(run, claim, where, writes))
        ]

    def claim_problem(self, run: TrainingRun, claim: str, where: str, writes: bool) -> str:
        """Why the pods cannot mount `claim` (missing, or not shareable by its nodes), or ""."""
        pvc = self.observed.claims.get(claim)
        what = f"PersistentVolumeClaim {self.namespace}/{claim} ({where})"
        if pvc is None:
            return f"{what} does not exist; create it or fix the reference"
        modes = set((pvc.get("spec") or {}).get("accessModes") or [])
        shared = {"ReadWriteMany"} if writes else {"ReadWriteMany", "ReadOnlyMany"}
        if run.spec.resources.nodes > 1 and not modes & shared:
            need = "ReadWriteMany" if writes else "ReadOnlyMany or ReadWriteMany"
            return (
                f"{what} has access modes {', '.join(sorted(modes)) or 'none'}, but "
                f"{run.spec.resources.nodes} nodes mount it at once: use a claim with "
                f"{need} (a shared filesystem such as NFS, CephFS or a cloud file store)"
            )
        return ""

    def names_blocked(
        self, children: Sequence[Mapping[str, Any]], **changes: Any
    ) -> TrainingRunPlan | None:
        """A plan that waits when the ConfigMap's or Service's name is held by another."""
        existing = {"ConfigMap": self.observed.config_map, "Service": self.observed.service}
        for child in children:
            found = existing.get(child["kind"])
            if found is None or self.owns(found):
                continue
            what = describe(child)
            refs = (found.get("metadata") or {}).get("ownerReferences") or []
            earlier = [r for r in refs if r.get("kind") == KIND and r.get("name") == self.name]
            if earlier:
                # A run deleted and re-created under this name: its child goes by garbage
                # collection, then this run creates its own.
                return self.done(
                    PHASE_PENDING,
                    REASON_RESTARTING,
                    f"waiting for {what} of an earlier TrainingRun {self.qualified} "
                    f"(uid {earlier[0].get('uid')}) to be garbage-collected",
                    **changes,
                )
            holder = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in refs) or "nobody"
            return self.wait(
                REASON_NAME_TAKEN,
                f"{what} already exists and is not this run's (owned by {holder}); "
                "delete it or rename the run",
            )
        return None

    def ensure(self, children: Sequence[dict[str, Any]]) -> list[Action]:
        """Create the children that are missing; bring the ConfigMap's data up to date."""
        actions: list[Action] = []
        for child in children:
            kind = child["kind"]
            if kind == "ConfigMap":
                found = self.observed.config_map
                if found is None:
                    actions.append(CreateChild(child))
                elif found.get("data") != child.get("data"):
                    actions.append(UpdateConfigMap(child))
            elif kind == "Service":
                if self.observed.service is None:
                    actions.append(CreateChild(child))
            elif self.workload(child["metadata"]["name"]) is None:
                actions.append(CreateChild(child))
        return actions

    def spec_change_ignored(self, run: TrainingRun, attempt: int) -> str | None:
        """The SpecChangeIgnored message while the spec differs from the started one."""
        if self.started_spec is None:
            return None
        try:
            current = TrainingRunSpec.model_validate(self.spec)
        except ValidationError:
            current = None  # an invalid edit is an edit all the same
        if current is not None and _without_suspend(current) == _without_suspend(run.spec):
            return None
        return (
            f"spec changed (generation {self.generation}) after attempt {attempt} "
            "started; the running attempt and its restarts keep the spec they started "
            "with. Suspend and resume the run to apply the change"
        )


# --- Small pure helpers -----------------------------------------------------------------


def finished_outputs(run: TrainingRun, pods: Sequence[Mapping[str, Any]]) -> Outputs:
    """What a succeeded run leaves: its model (evaluate runs write none) and metrics."""
    metrics = finished_metrics(pods)
    if run.spec.evaluate is None:
        return Outputs(model_uri=run.spec.output, metrics=metrics)
    headline = headline_metric(run.spec.evaluate.suites[0].name, metrics)
    return Outputs(metrics=metrics, headline=headline)


def finished_data_status(pods: Sequence[Mapping[str, Any]]) -> DataStatus | None:
    """status.data: the fingerprint and row counts rank 0 reported (training methods)."""
    data = finished_data(pods)
    if data is None:
        return None
    return DataStatus(
        fingerprint=data.fingerprint,
        train_rows=data.train_rows,
        eval_rows=data.eval_rows,
        train_rows_dropped=data.train_rows_dropped,
        eval_rows_dropped=data.eval_rows_dropped,
    )


def describe(obj: Mapping[str, Any]) -> str:
    """`Kind namespace/name`, the way log lines and events name an object."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


def _attempt_of(pod: Mapping[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT)


def _condition(status: TrainingRunStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _without_suspend(spec: TrainingRunSpec) -> dict[str, Any]:
    """A spec as data, after a round trip through the model (defaults filled in)."""
    dumped = spec.model_dump(mode="json", by_alias=True)
    dumped.pop("suspend", None)
    return dumped


def _missing_references(
    run: TrainingRun, pods: Sequence[Mapping[str, Any]], namespace: str
) -> list[str]:
    """Secrets and ConfigMaps the pods wait for, as the kubelet reports them, with the fix."""
    missing: list[str] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            found = _MISSING_REFERENCE.search(waiting.get("message") or "")
            if waiting.get("reason") != "CreateContainerConfigError" or found is None:
                continue
            kind = "Secret" if found.group(1).lower() == "secret" else "ConfigMap"
            name = found.group(2)
            fields = _referenced_by(run, kind, name)
            line = (
                f"{kind} {namespace}/{name}" + (f" ({fields})" if fields else "")
                + " does not exist; create it or fix the reference"
            )  # fmt: skip
            if line not in missing:
                missing.append(line)
    return missing


def _referenced_by(run: TrainingRun, kind: str, name: str) -> str:
    """The spec fields that name a Secret or ConfigMap, for messages."""
    fields = []
    token = run.spec.model.token_secret_ref
    if kind == "Secret" and token is not None and token.name == name:
        fields.append("spec.model.tokenSecretRef")
    s3 = run.spec.storage.s3 if run.spec.storage is not None else None
    credentials = s3.credentials_secret_ref if s3 is not None else None
    if kind == "Secret" and credentials is not None and credentials.name == name:
        fields.append("spec.storage.s3.credentialsSecretRef")
    for env in run.spec.env:
        source = env.value_from
        ref = None
        if source is not None:
            ref = source.secret_key_ref if kind == "Secret" else source.config_map_key_ref
        if ref is not None and ref.name == name:
            fields.append(f"spec.env {env.name}")
    return ", ".join(fields)


def _with_phase(
    status: TrainingRunStatus,
    phase: Phase,
    reason: str,
    message: str,
    *,
    now: float,
    generation: int | None,
    spec_change_ignored: str | None,
) -> TrainingRunStatus:
    """`status` in `phase`: conditions the kstatus way (`kubetrain.status.next_status`)."""
    previous = {"conditions": [c.model_dump(by_alias=True) for c in status.conditions]}
    conditions = next_status(
        previous,
        phase=phase,
        reason=reason,
        message=message,
        now=rfc3339(now),
        generation=generation,
        spec_change_ignored=spec_change_ignored,
    )["conditions"]
    return status.model_copy(
        update={
            "phase": phase,
            "conditions": [Condition.model_validate(c) for c in conditions],
            "observed_generation": generation
            if generation is not None
            else status.observed_generation,
        }
    )


def status_body(status: TrainingRunStatus) -> dict[str, Any]:
    """The status as the API stores it (camelCase, unset fields left out)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
