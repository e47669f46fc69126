"""kopf glue for TrainingRun: every trigger runs one idempotent, level-based reconcile.

Create, resume (operator start), spec updates and a timer all call `reconcile`, which
reads the run fresh from the API under a per-run lock, looks at its children and pods, acts
(`kubetrain.k8s`) and writes the whole status (`kubetrain.status`). Nothing depends on
remembering an earlier call: the attempt number lives in `status.attempt`, attempt N's
workload is found by its name `<run>-<N>`, and children are created "if absent", so an
operator restarted at any point picks up where the last one stopped without duplicates.

The lifecycle. A new run is validated (InvalidSpec names the field), waits while a claim,
Secret or ConfigMap it mounts is missing (WaitingForDependencies, re-checked every
interval), then gets attempt 1: ConfigMap, headless Service and Indexed Job (or a JobSet),
owned by the run so deleting it deletes them (outputs on the claims stay). The timer
follows the pods: phase, conditions, startTime and, while running, progress and the latest
checkpoint read from rank 0's /metrics. A retriable failure deletes the attempt's workload
and, once its pods are gone (two gangs must never write one output), starts attempt N+1,
which resumes from the newest checkpoint, until restartPolicy.maxRestarts; a config error
fails the run at once with the trainer's message. `spec.suspend: true` deletes the
workload (ConfigMap and outputs stay); false starts a new attempt. Other spec edits after
the start are ignored, shown by the SpecChangeIgnored condition, and applied on the next
resume: the spec each attempt runs is kept in the `kubetrain.dev/started-spec` annotation
so restarts render the same gang even after an edit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from kubetrain import k8s, opmetrics
from kubetrain.api import (
    GROUP,
    LABEL_ATTEMPT,
    LABEL_RUN,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_COMPLETED,
    REASON_CONFIG_ERROR,
    REASON_CREATED,
    REASON_INVALID_SPEC,
    REASON_RESTARTING,
    REASON_RESTARTS_EXHAUSTED,
    REASON_SUSPENDED,
    REASON_WAITING_FOR_DEPENDENCIES,
    Phase,
    TrainingRun,
    parse_pvc_uri,
    uri_refs,
)
from kubetrain.handlers.passes import ObjectPass, parse_rfc3339, rfc3339
from kubetrain.render import (
    RenderError,
    config_maps_used,
    job_name,
    owner_reference,
    render_trainingrun,
    secrets_used,
)
from kubetrain.status import (
    CONDITION_READY,
    Observation,
    checkpoint_uri,
    condition_of,
    eta_seconds,
    merge_patch,
    next_status,
    observe_attempt,
    parse_trainer_metrics,
    progress_status,
    rank0_pod,
)
from kubetrain_trainer.config import format_validation_error

log = logging.getLogger(__name__)

STARTED_SPEC_ANNOTATION = f"{GROUP}/started-spec"
TERMINAL_PHASES = (PHASE_SUCCEEDED, PHASE_FAILED)
# Old pods must be gone before the next attempt starts, so deletion waits for them.
PROPAGATION = "Foreground"

MetricsAddress = Callable[[Mapping[str, Any]], tuple[str, int]]


def reconcile(namespace: str, name: str, memo: kopf.Memo) -> None:
    """Bring one TrainingRun one step closer to its spec; safe to call any time, any often."""
    lock = memo.setdefault("reconcile_lock", threading.Lock())
    with lock, opmetrics.RECONCILE_DURATION.time():
        # A restart decision deletes the old workload; a second pass starts the next
        # attempt at once when the deletion is already complete.
        for _ in range(2):
            body = k8s.get_trainingrun(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            if not ReconcilePass(body, memo).run():
                return


class ReconcilePass(ObjectPass):
    """One pass over one TrainingRun, as read at the start of the pass."""

    def __init__(self, body: dict[str, Any], memo: kopf.Memo) -> None:
        super().__init__(body)
        self.memo = memo
        meta = body["metadata"]
        self.phase: str | None = self.status.get("phase")
        self.attempt: int = self.status.get("attempt") or 0
        self.restarts: int = self.status.get("restarts") or 0
        self.now = time.time()
        self.spec_change_ignored: str | None = None
        started = (meta.get("annotations") or {}).get(STARTED_SPEC_ANNOTATION)
        self.started_spec: dict[str, Any] | None = json.loads(started) if started else None

    # --- helpers -------------------------------------------------------------------------

    def write(self, phase: Phase, reason: str, message: str, **fields: Any) -> None:
        """Patch the status to this phase (only what changed) and keep the metrics current."""
        fields = {"attempt": self.attempt or None, "restarts": self.restarts, **fields}
        new = next_status(
            self.status,
            phase=phase,
            reason=reason,
            message=message,
            now=rfc3339(self.now),
            generation=self.generation,
            spec_change_ignored=self.spec_change_ignored,
            **fields,
        )
        patch = merge_patch(self.status, new)
        if patch:
            k8s.patch_trainingrun_status(self.namespace, self.name, patch)
        opmetrics.observe_phase(self.namespace, self.name, phase)
        self.status = new

    def announce_once(
        self, reason: str, message: str, *, prefix: str = "", warning: bool = False
    ) -> None:
        """Announce `prefix + message` unless the status already says reason and message."""
        ready = condition_of(self.status, CONDITION_READY) or {}
        if (ready.get("reason"), ready.get("message")) != (reason, message):
            self.announce(reason, prefix + message, warning=warning)

    def validated(self, spec: Mapping[str, Any] | None = None) -> TrainingRun:
        """The run as a model, with `spec` (default: the current one); ValidationError if bad."""
        raw = {key: value for key, value in self.body.items() if key != "status"}
        if spec is not None:
            raw["spec"] = spec
        return TrainingRun.model_validate(raw)

    def owned_workloads(self) -> list[dict[str, Any]]:
        """Jobs and JobSets of this run object (not of an older run with the same name)."""
        return [
            w
            for w in k8s.list_workloads(self.namespace, self.name)
            if any(ref.get("uid") == self.uid for ref in w["metadata"].get("ownerReferences") or [])
        ]

    def delete_workloads(self, workloads: list[dict[str, Any]], why: str) -> list[str]:
        """Ask for deletion of each workload not yet being deleted; returns their names."""
        deleting = []
        for workload in workloads:
            deleting.append(k8s.describe(workload))
            if workload["metadata"].get("deletionTimestamp"):
                continue
            if k8s.delete_workload(workload, PROPAGATION):
                self.announce("Deleted", f"Deleted {k8s.describe(workload)}: {why}")
        return deleting

    # --- the pass ------------------------------------------------------------------------

    def run(self) -> bool:
        """Reconcile; True asks for another pass right away (the state moved on)."""
        ready = condition_of(self.status, CONDITION_READY) or {}
        if self.phase in TERMINAL_PHASES and not (
            self.phase == PHASE_FAILED and ready.get("reason") == REASON_INVALID_SPEC
        ):
            # Finished runs keep their verdict; only acknowledge the generation (kstatus).
            self.write(self.phase, ready.get("reason", ""), ready.get("message", ""))
            return False
        if (self.body.get("spec") or {}).get("suspend"):
            self.suspend()
            return False
        if self.attempt == 0:
            # A status that lost its attempt (restored from a backup, replaced) must not
            # cost the running gang: adopt the newest attempt's workload if there is one.
            self.attempt = self.newest_attempt()
            return self.follow_attempt() if self.attempt else self.start_attempt(1)
        if self.phase in (PHASE_SUSPENDED, PHASE_FAILED):
            return self.start_attempt(self.attempt + 1)
        return self.follow_attempt()

    def newest_attempt(self) -> int:
        """The highest attempt number among this run's workloads; 0 if it has none."""
        labels = [w["metadata"].get("labels") or {} for w in self.owned_workloads()]
        attempts = [int(a) for a in (lb.get(LABEL_ATTEMPT, "") for lb in labels) if a.isdigit()]
        return max(attempts, default=0)

    def suspend(self) -> None:
        deleting = self.delete_workloads(self.owned_workloads(), "the run is suspended")
        message = "spec.suspend is true; set it to false to resume from the newest checkpoint"
        if deleting:
            message += f" (stopping {', '.join(deleting)})"
        if self.phase != PHASE_SUSPENDED:
            self.announce(REASON_SUSPENDED, "Suspended: spec.suspend is true")
        self.write(PHASE_SUSPENDED, REASON_SUSPENDED, message)

    def start_attempt(self, attempt: int) -> bool:
        """Start `attempt` with the current spec (new run, resume, or fixed InvalidSpec)."""
        try:
            run = self.validated()
        except ValidationError as e:
            self.fail(
                REASON_INVALID_SPEC, format_validation_error(e, f"TrainingRun {self.qualified}")
            )
            return False
        workload_name = job_name(self.name, attempt)
        workloads = self.owned_workloads()
        older = [w for w in workloads if w["metadata"]["name"] != workload_name]
        if older:
            deleting = self.delete_workloads(older, f"attempt {attempt} replaces it")
            self.write(
                PHASE_PENDING,
                REASON_RESTARTING,
                f"waiting for {', '.join(deleting)} to be deleted before attempt {attempt} starts",
            )
            return False
        missing = self.missing_dependencies(run)
        if missing:
            message = "; ".join(missing)
            self.announce_once(REASON_WAITING_FOR_DEPENDENCIES, message, warning=True)
            self.write(PHASE_PENDING, REASON_WAITING_FOR_DEPENDENCIES, message)
            return False
        try:
            children = render_trainingrun(run, attempt, owner=owner_reference(run))
        except RenderError as e:
            self.fail(REASON_INVALID_SPEC, str(e))
            return False
        # Record the spec first: restarts of this run render from it, whatever edits follow.
        started = json.dumps(self.body["spec"], sort_keys=True, separators=(",", ":"))
        k8s.annotate_trainingrun(self.namespace, self.name, {STARTED_SPEC_ANNOTATION: started})
        for created in k8s.apply_children(children):
            self.announce(REASON_CREATED, f"Created {created}")
        self.attempt = attempt
        self.write(
            PHASE_PENDING,
            REASON_CREATED,
            f"attempt {attempt}: waiting for {run.spec.resources.nodes} pod(s) to run",
            completionTime=None,
        )
        return False

    def missing_dependencies(self, run: TrainingRun) -> list[str]:
        """What the pods would mount but the namespace lacks, each with the fix."""
        missing = []
        claims_seen = set()
        for ref in uri_refs(run.spec):
            if ref.kind != "pvc":
                continue
            claim = parse_pvc_uri(ref.uri).claim
            if claim in claims_seen:
                continue
            claims_seen.add(claim)
            if not k8s.pvc_exists(self.namespace, claim):
                missing.append(
                    f"PersistentVolumeClaim {self.namespace}/{claim} ({ref.field}: {ref.uri}) "
                    "does not exist; create it or fix the URI"
                )
        for secret in secrets_used(run.spec):
            if not k8s.secret_exists(self.namespace, secret):
                missing.append(
                    f"Secret {self.namespace}/{secret} ({_referenced_by(run, 'secret', secret)}) "
                    "does not exist; create it or fix the reference"
                )
        for config_map in config_maps_used(run.spec):
            if not k8s.config_map_exists(self.namespace, config_map):
                missing.append(
                    f"ConfigMap {self.namespace}/{config_map} "
                    f"({_referenced_by(run, 'configMap', config_map)}) does not exist; "
                    "create it or fix the reference"
                )
        return missing

    def follow_attempt(self) -> bool:
        """Follow attempt N's workload and pods; restart or finish as they say."""
        try:
            run = self.started_run()
        except ValidationError as e:
            self.fail(
                REASON_INVALID_SPEC, format_validation_error(e, f"TrainingRun {self.qualified}")
            )
            return False
        workload_name = job_name(self.name, self.attempt)
        workloads = self.owned_workloads()
        older = [w for w in workloads if w["metadata"]["name"] != workload_name]
        deleting = self.delete_workloads(older, f"attempt {self.attempt} replaces it")
        workload = next((w for w in workloads if w["metadata"]["name"] == workload_name), None)
        if workload is None:
            if deleting:
                self.write(
                    PHASE_PENDING,
                    REASON_RESTARTING,
                    f"waiting for {', '.join(deleting)} to be deleted before attempt "
                    f"{self.attempt} starts",
                )
                return False
            return self.create_attempt(run)
        if workload["metadata"].get("deletionTimestamp"):
            return False  # deleted by someone else; recreated once it is gone
        pods = k8s.list_pods(
            self.namespace, f"{LABEL_RUN}={self.name},{LABEL_ATTEMPT}={self.attempt}"
        )
        observation = observe_attempt(workload, pods, run.spec.resources.nodes)
        if observation.state == "succeeded":
            self.succeed(run, observation)
            return False
        if observation.state == "failed":
            return self.after_failure(run, workload, observation)
        self.progress(run, observation, pods)
        return False

    def started_run(self) -> TrainingRun:
        """The run with the spec its attempts were started from (edits since are ignored)."""
        current = self.body.get("spec") or {}
        if self.started_spec is None:
            return self.validated()
        if _without_suspend(current) != _without_suspend(self.started_spec):
            self.spec_change_ignored = (
                f"spec changed (generation {self.generation}) after attempt {self.attempt} "
                "started; the running attempt and its restarts keep the spec they started "
                "with. Suspend and resume the run to apply the change"
            )
        return self.validated(self.started_spec)

    def create_attempt(self, run: TrainingRun) -> bool:
        """(Re)create attempt N's children: after a restart, or if someone deleted them."""
        try:
            children = render_trainingrun(run, self.attempt, owner=owner_reference(run))
        except RenderError as e:
            self.fail(REASON_INVALID_SPEC, str(e))
            return False
        for created in k8s.apply_children(children):
            self.announce(REASON_CREATED, f"Created {created}")
        self.write(
            PHASE_PENDING,
            REASON_CREATED,
            f"attempt {self.attempt}: waiting for {run.spec.resources.nodes} pod(s) to run",
        )
        return False

    def progress(self, run: TrainingRun, observation: Observation, pods: list[dict]) -> None:
        fields: dict[str, Any] = {}
        running = observation.state == "running"
        if running and not self.status.get("startTime"):
            fields["startTime"] = rfc3339(self.now)
            created = self.body["metadata"].get("creationTimestamp")
            if created:
                opmetrics.QUEUE_WAIT.observe(max(0.0, self.now - parse_rfc3339(created)))
        if running:
            fields.update(self.read_progress(run, pods))
        phase = PHASE_RUNNING if running else PHASE_PENDING
        if phase != self.phase:
            self.announce(observation.reason, f"Attempt {self.attempt}: {observation.message}")
        self.write(phase, observation.reason, observation.message, **fields)

    def read_progress(self, run: TrainingRun, pods: list[dict]) -> dict[str, Any]:
        """status.progress and latestCheckpoint from rank 0's /metrics ({} if unreachable)."""
        pod = rank0_pod(pods)
        if pod is None:
            return {}
        address: MetricsAddress = self.memo.get("metrics_address") or k8s.pod_metrics_address
        text = k8s.read_pod_metrics(*address(pod))
        if text is None:
            return {}
        try:
            metrics = parse_trainer_metrics(text)
        except ValueError as e:
            log.warning("TrainingRun %s: unreadable metrics from rank 0: %s", self.qualified, e)
            return {}
        opmetrics.observe_progress(self.namespace, self.name, metrics)
        fields: dict[str, Any] = {}
        if metrics.step is not None:
            # The ETA extrapolates from the first sample this operator took of the attempt.
            first = self.memo.get("first_sample")
            if first is None or first[0] != self.attempt or first[1] > metrics.step:
                first = self.memo["first_sample"] = (self.attempt, metrics.step, self.now)
            eta = eta_seconds(first[1:], (metrics.step, self.now), metrics.total_steps)
            fields["progress"] = progress_status(metrics, eta)
            previous_step = (self.status.get("progress") or {}).get("step")
            created = self.body["metadata"].get("creationTimestamp")
            if metrics.step > 0 and not previous_step and created:
                opmetrics.TIME_TO_FIRST_STEP.observe(max(0.0, self.now - parse_rfc3339(created)))
        checkpoint = checkpoint_uri(run.spec.output, metrics.checkpoint_step)
        if checkpoint:
            fields["latestCheckpoint"] = checkpoint
        return fields

    def succeed(self, run: TrainingRun, observation: Observation) -> None:
        message = f"attempt {self.attempt} completed; the model is in {run.spec.output}"
        self.announce(REASON_COMPLETED, f"Succeeded: {message}")
        self.write(
            PHASE_SUCCEEDED,
            REASON_COMPLETED,
            message,
            completionTime=rfc3339(self.now),
            outputs={"modelUri": run.spec.output},
        )

    def after_failure(
        self, run: TrainingRun, workload: dict[str, Any], observation: Observation
    ) -> bool:
        if not observation.retriable:
            self.fail(REASON_CONFIG_ERROR, observation.message)
            return False
        max_restarts = run.spec.restart_policy.max_restarts
        what = f"attempt {self.attempt} failed ({observation.reason}): {observation.message}"
        if self.restarts >= max_restarts:
            self.fail(
                REASON_RESTARTS_EXHAUSTED,
                f"{what}; restartPolicy.maxRestarts ({max_restarts}) restarts used",
            )
            return False
        restarts = self.restarts + 1
        following = self.attempt + 1
        self.announce(
            REASON_RESTARTING,
            f"{what}; starting attempt {following} (restart {restarts} of {max_restarts})",
            warning=True,
        )
        # Status first: should the operator stop right here, the next one deletes the old
        # workload (it is no longer attempt N) and starts attempt N+1 all the same.
        self.attempt, self.restarts = following, restarts
        self.write(
            PHASE_PENDING,
            REASON_RESTARTING,
            f"{what}; attempt {following} starts once its pods are gone",
        )
        opmetrics.RESTARTS.labels(cause=observation.reason).inc()
        self.delete_workloads([workload], f"attempt {following} replaces it")
        return True

    def fail(self, reason: str, message: str) -> None:
        self.announce_once(reason, message, prefix="Failed: ", warning=True)
        self.write(PHASE_FAILED, reason, message, completionTime=rfc3339(self.now))


def _referenced_by(run: TrainingRun, kind: str, name: str) -> str:
    """The spec fields that name a Secret or ConfigMap, for messages."""
    fields = []
    token = run.spec.model.token_secret_ref
    if kind == "secret" and token is not None and token.name == name:
        fields.append("spec.model.tokenSecretRef")
    for env in run.spec.env:
        source = env.value_from
        ref = None
        if source is not None:
            ref = source.secret_key_ref if kind == "secret" else source.config_map_key_ref
        if ref is not None and ref.name == name:
            fields.append(f"spec.env {env.name}")
    return ", ".join(fields)


def _without_suspend(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in spec.items() if key != "suspend"}


def forget(namespace: str, name: str) -> None:
    """A run is gone: drop its per-run metrics (its children go by garbage collection)."""
    opmetrics.forget_run(namespace, name)


def is_unfinished(status: Mapping[str, Any], **_: Any) -> bool:
    """kopf `when` filter: finished runs need no timer (spec edits still reach them)."""
    return status.get("phase") not in TERMINAL_PHASES
