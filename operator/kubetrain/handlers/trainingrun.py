"""A visit of one TrainingRun: observe, plan (`kubetrain.trainingruns`), act, write the status.

`kubetrain.handlers.runs` calls `reconcile` for a new run, a run found at the operator's
start, a spec edit, and every interval while the run is not finished. Under a per-run lock
it reads the run (from the runs' informer when that holds the operator's last write of it,
else from the API), observes its children, pods, claims and rank 0's metrics, asks
`plan_trainingrun` what to do and does it, then writes the whole status the plan computed.
Each write of the run states the version it was planned from: a run edited meanwhile is a
409, read again and planned again. Nothing depends on remembering an earlier call: the
attempt lives in `status.attempt`, attempt N's workload is found by its name `<run>-<N>`,
and children are created "if absent", so an operator restarted at any point picks up where
the last one stopped. Children and claims are read from informers too
(`kubetrain.handlers.children`), so following a run costs no API read at all. What the
apiserver refuses goes back into the plan as a `Refusal` and ends in a condition; a create
that meets an object the informers do not show (409: not labelled as ours, or just created)
is read and planned again.
The lifecycle itself is in `kubetrain.trainingruns`' docstring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from kubetrain import k8s, opmetrics
from kubetrain.api import FINISHED_PHASES, LABEL_ATTEMPT
from kubetrain.handlers.children import Children
from kubetrain.handlers.passes import ObjectPass
from kubetrain.render import config_map_name, service_name
from kubetrain.status import (
    TrainerMetrics,
    merge_patch,
    parse_rfc3339,
    parse_trainer_metrics,
    rank0_pod,
)
from kubetrain.trainingruns import (
    PROPAGATION,
    STARTED_SPEC_ANNOTATION,
    Announce,
    CreateChild,
    DeleteWorkload,
    ForceDeletePod,
    Observed,
    RecordStartedSpec,
    Refusal,
    TrainingRunPlan,
    UpdateConfigMap,
    plan_trainingrun,
    status_body,
)

if TYPE_CHECKING:  # runs.py imports this module
    from kubetrain.handlers.runs import RunCache

log = logging.getLogger(__name__)

MetricsAddress = Callable[[Mapping[str, Any]], tuple[str, int]]
# A decision that deleted something or met a conflict looks again at once, this many times.
MAX_PASSES = 3


@dataclass
class RunMemory:
    """What the operator keeps per run between reconciles: its lock and the ETA's sample."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    first_sample: tuple[int, int, float] | None = None


def _memory(memo: kopf.Memo, namespace: str, name: str) -> RunMemory:
    with memo.setdefault("runs_lock", threading.Lock()):
        runs: dict[tuple[str, str], RunMemory] = memo.setdefault("runs", {})
        return runs.setdefault((namespace, name), RunMemory())


def reconcile(
    namespace: str, name: str, memo: kopf.Memo, children: Children, cache: RunCache | None = None
) -> None:
    """Bring one TrainingRun one step closer to its spec; safe to call any time, any often.

    The first pass reads the run from `cache` when it is fresh enough (`RunCache`), a pass
    after a change of the operator's own (a deletion, a conflict) from the API.
    """
    memory = _memory(memo, namespace, name)
    with memory.lock, opmetrics.RECONCILE_DURATION.time():
        refusal: Refusal | None = None
        found: dict[str, dict[str, Any] | None] = {}  # read after a 409: an unlabelled holder
        for visit_pass in range(MAX_PASSES):
            body = cache.fresh((namespace, name)) if cache and visit_pass == 0 else None
            if body is None:
                body = k8s.get_trainingrun(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            observed = observe(body, memo, memory, children, refusal, found)
            plan = plan_trainingrun(observed)
            executor = Executor(body, cache)
            try:
                outcome = executor.act(plan)
                if outcome is None:
                    executor.write(plan, observed)
            except k8s.Conflict:
                continue  # edited since it was read: read it again, plan again
            if isinstance(outcome, Refusal):
                refusal = outcome  # the next plan puts the apiserver's answer in the status
                continue
            if outcome is not None:
                # Created since the informers last heard: whose is it? Ask the API.
                if outcome == "ConfigMap":
                    found[outcome] = k8s.get_config_map(namespace, config_map_name(name))
                elif outcome == "Service":
                    found[outcome] = k8s.get_service(namespace, service_name(name))
                else:
                    return  # a workload: the next pass finds it in the informer
                continue
            memory.first_sample = plan.first_sample
            if not executor.look_again:
                return


def observe(
    body: dict[str, Any],
    memo: kopf.Memo,
    memory: RunMemory,
    children: Children,
    refusal: Refusal | None = None,
    found: Mapping[str, dict[str, Any] | None] | None = None,
) -> Observed:
    """What `plan_trainingrun` needs, from the informers; a finished run needs only itself."""
    now = time.time()
    status = body.get("status") or {}
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if refusal is not None or (status.get("phase") in FINISHED_PHASES and not _cleanup_due(body)):
        return Observed(run=body, now=now, refusal=refusal, first_sample=memory.first_sample)
    found = found or {}
    pods = children.pods(namespace, name)
    attempt = str(status.get("attempt") or "")
    config_map = children.named("run_config_maps", namespace, name, config_map_name(name))
    service = children.named("run_services", namespace, name, service_name(name))
    return Observed(
        run=body,
        now=now,
        workloads=children.workloads(namespace, name),
        pods=pods,
        config_map=found.get("ConfigMap", config_map),
        service=found.get("Service", service),
        claims=children.claims(namespace),
        metrics=_rank0_metrics(body, memo, [p for p in pods if _attempt(p) == attempt]),
        first_sample=memory.first_sample,
    )


def _attempt(pod: Mapping[str, Any]) -> str:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "")


def _rank0_metrics(
    body: Mapping[str, Any], memo: kopf.Memo, pods: list[dict[str, Any]]
) -> TrainerMetrics | None:
    """Rank 0's /metrics sample, None while it does not answer."""
    pod = rank0_pod(pods)
    if pod is None:
        return None
    address: MetricsAddress = memo.get("metrics_address") or k8s.pod_metrics_address
    text = k8s.read_pod_metrics(*address(pod))
    if text is None:
        return None
    try:
        return parse_trainer_metrics(text)
    except ValueError as e:
        meta = body["metadata"]
        log.warning(
            "TrainingRun %s/%s: unreadable metrics from rank 0: %s",
            meta["namespace"],
            meta["name"],
            e,
        )
        return None


class Executor(ObjectPass):
    """Performs one plan's actions on the API and writes its status.

    Writes of the run itself state the version the plan was made from (`k8s.Conflict` when
    it has changed since) and tell `cache` the version they leave.
    """

    def __init__(self, body: dict[str, Any], cache: RunCache | None = None) -> None:
        super().__init__(body)
        self.cache = cache
        self.resource_version: str = body["metadata"]["resourceVersion"]
        self.look_again = False

    def wrote(self, resource_version: str) -> None:
        self.resource_version = resource_version
        if self.cache is not None:
            self.cache.wrote((self.namespace, self.name), resource_version)

    def act(self, plan: TrainingRunPlan) -> Refusal | str | None:
        """Do the plan's actions in order; a refusal or a conflict (409) stops them.

        Returns the refusal, or the kind of a creation that met an existing object. What was
        created is announced in one event (one API call, not one per child).
        """
        created: list[str] = []
        try:
            return self._act(plan, created)
        finally:
            if created:
                self.announce("Created", f"Created {', '.join(created)}")

    def _act(self, plan: TrainingRunPlan, created: list[str]) -> Refusal | str | None:
        for action in plan.actions:
            if isinstance(action, Announce):
                self.announce(action.reason, action.message, warning=action.warning)
            elif isinstance(action, RecordStartedSpec):
                self.wrote(
                    k8s.annotate_trainingrun(
                        self.namespace,
                        self.name,
                        {STARTED_SPEC_ANNOTATION: action.spec},
                        self.resource_version,
                    )
                )
            elif isinstance(action, CreateChild):
                try:
                    if not k8s.create(action.obj):
                        return action.obj["kind"]
                except k8s.Refused as e:
                    return Refusal(e.object, e.api_version, e.code, e.message)
                created.append(k8s.describe(action.obj))
            elif isinstance(action, UpdateConfigMap):
                k8s.update_config_map(action.obj)
            elif isinstance(action, DeleteWorkload):
                self.look_again = True
                if k8s.delete_workload(dict(action.workload), PROPAGATION):
                    described = k8s.describe(dict(action.workload))
                    self.announce("Deleted", f"Deleted {described}: {action.why}")
            elif isinstance(action, ForceDeletePod):
                self.look_again = True
                if k8s.force_delete_pod(action.namespace, action.name):
                    self.announce(
                        "ForceDeleted",
                        f"Force-deleted pod {action.namespace}/{action.name}: {action.why}",
                        warning=True,
                    )
        return None

    def write(self, plan: TrainingRunPlan, observed: Observed) -> None:
        """Patch the status to the plan's (only what changed); keep the metrics current."""
        new = status_body(plan.status)
        patch = merge_patch(self.status, new)
        if patch:
            version = self.resource_version
            self.wrote(k8s.patch_trainingrun_status(self.namespace, self.name, patch, version))
        status = plan.status
        if status.phase is not None:
            opmetrics.observe_phase(self.namespace, self.name, status.phase)
        if plan.restart_cause:
            opmetrics.RESTARTS.labels(cause=plan.restart_cause).inc()
        if observed.metrics is not None:
            opmetrics.observe_progress(self.namespace, self.name, observed.metrics)
        created = self.body["metadata"].get("creationTimestamp")
        since_created = observed.now - parse_rfc3339(created) if created else None
        if since_created is not None and status.start_time and not self.status.get("startTime"):
            opmetrics.QUEUE_WAIT.observe(max(0.0, since_created))
        step = status.progress.step if status.progress else None
        previous_step = (self.status.get("progress") or {}).get("step")
        if since_created is not None and step and not previous_step:
            opmetrics.TIME_TO_FIRST_STEP.observe(max(0.0, since_created))
        self.status = new


def forget(namespace: str, name: str, memo: kopf.Memo | None = None) -> None:
    """A run is gone: drop its per-run metrics and memory (its children go by GC)."""
    opmetrics.forget_run(namespace, name)
    if memo is not None:
        with memo.setdefault("runs_lock", threading.Lock()):
            memo.setdefault("runs", {}).pop((namespace, name), None)


def is_unfinished(spec: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> bool:
    """Whether an object is still followed every interval (kopf `when` filter of the
    Pipeline and Sweep timers; the runs' clock): finished ones are not (spec edits still
    reach them), but for the deletion of their workload that ttlSecondsAfterFinished asks."""
    return status.get("phase") not in FINISHED_PHASES or _cleanup_due(
        {"spec": spec, "status": status}
    )


def _cleanup_due(body: Mapping[str, Any]) -> bool:
    """Whether a finished run's workload is still to be deleted (ttlSecondsAfterFinished)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    return spec.get("ttlSecondsAfterFinished") is not None and not status.get("cleanedUpTime")
