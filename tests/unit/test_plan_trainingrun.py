"""Table tests of `plan_trainingrun`: observed state in, actions and status out.

Each case builds what the operator would have read from the API (the run, its workloads,
pods, ConfigMap, Service, claims, rank 0's metrics, an apiserver refusal) and checks the
plan: which actions, in which order, and the phase, reason and fields of the new status.
In the style of Kubeflow's torch plugin tests: one table row per transition.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from kubetrain.render import owner_reference, render_trainingrun
from kubetrain.status import TrainerMetrics, rfc3339
from kubetrain.trainingruns import (
    STARTED_SPEC_ANNOTATION,
    STUCK_TERMINATING_SECONDS,
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

NOW = 1_800_000_000.0
UID = "uid-of-this-run"
NAMESPACE = "team-a"
NAME = "pretrain"

SPEC: dict[str, Any] = {
    "method": "from_scratch",
    "model": {
        "architecture": {
            "modelType": "qwen2",
            "vocabSize": 512,
            "hiddenSize": 64,
            "numHiddenLayers": 2,
            "numAttentionHeads": 4,
            "numKeyValueHeads": 2,
            "intermediateSize": 128,
            "maxPositionEmbeddings": 256,
        }
    },
    "data": {"train": "pvc://datasets/pretrain.jsonl", "format": "text", "maxLength": 128},
    "output": "pvc://models/pretrain",
    "resources": {"nodes": 2},
    "restartPolicy": {"maxRestarts": 2},
}
SHARED = {"spec": {"accessModes": ["ReadWriteMany"]}}
CLAIMS = {"datasets": SHARED, "models": SHARED}


def run_body(
    status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None, started: bool = True
) -> dict[str, Any]:
    spec = spec if spec is not None else SPEC
    meta: dict[str, Any] = {
        "name": NAME,
        "namespace": NAMESPACE,
        "uid": UID,
        "generation": 1,
        "creationTimestamp": rfc3339(NOW - 100),
    }
    if started:
        meta["annotations"] = {STARTED_SPEC_ANNOTATION: json.dumps(spec)}
    body = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun", "metadata": meta}
    body["spec"] = spec
    if status is not None:
        body["status"] = status
    return body


def children(attempt: int, spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What the operator would have created for `attempt`, as the API serves it back."""
    from kubetrain.api import TrainingRun

    run = TrainingRun.model_validate(run_body(spec=spec))
    return render_trainingrun(run, attempt, owner=owner_reference(run))


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind)


def workload(attempt: int, **status: Any) -> dict[str, Any]:
    job = by_kind(children(attempt), "Job")
    if status:
        job["status"] = status
    return job


def pod(
    attempt: int,
    index: int,
    phase: str = "Running",
    *,
    exit_code: int | None = None,
    message: str = "",
    deleted_at: float | None = None,
    waiting: tuple[str, str] | None = None,
    node: str = "node-1",
    finished_at: float | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{NAME}-{attempt}-{index}-abcde",
        "namespace": NAMESPACE,
        "labels": {"kubetrain.dev/run": NAME, "kubetrain.dev/attempt": str(attempt)},
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
    }
    if deleted_at is not None:
        meta["deletionTimestamp"] = rfc3339(deleted_at)
    state: dict[str, Any] = {"running": {}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message}}
        if finished_at is not None:
            state["terminated"]["finishedAt"] = rfc3339(finished_at)
    if waiting is not None:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    return {
        "metadata": meta,
        "spec": {"nodeName": node},
        "status": {
            "phase": phase,
            "podIP": f"10.0.0.{index}",
            "containerStatuses": [{"state": state}],
        },
    }


def running_status(attempt: int = 1, restarts: int = 0, phase: str = "Running") -> dict[str, Any]:
    return {"phase": phase, "attempt": attempt, "restarts": restarts, "conditions": []}


def refused_status() -> dict[str, Any]:
    """Failed InvalidSpec at generation 1 (the apiserver refused attempt 1's Job)."""
    refused = {"type": "Ready", "status": "False", "reason": "InvalidSpec",
               "message": "the apiserver refused Job team-a/pretrain-1 (422)",
               "lastTransitionTime": rfc3339(NOW - 50)}  # fmt: skip
    return {**running_status(phase="Failed"), "observedGeneration": 1, "conditions": [refused]}


def edited(body: dict[str, Any]) -> dict[str, Any]:
    """`body` after a spec edit: the apiserver bumped its generation."""
    return {**body, "metadata": {**body["metadata"], "generation": 2}}


def observe(run: dict[str, Any], attempt: int | None = None, **fields: Any) -> Observed:
    """An observation of `run` with attempt N's ConfigMap and Service in place."""
    present = children(attempt) if attempt else []
    defaults: dict[str, Any] = {
        "claims": CLAIMS,
        "config_map": next((o for o in present if o["kind"] == "ConfigMap"), None),
        "service": next((o for o in present if o["kind"] == "Service"), None),
    }
    return Observed(run=run, now=NOW, **{**defaults, **fields})


def kinds(plan: TrainingRunPlan) -> list[str]:
    """The plan's actions as short strings: `Create Job`, `Delete pretrain-1`, ..."""
    out = []
    for action in plan.actions:
        if isinstance(action, CreateChild):
            out.append(f"Create {action.obj['kind']}")
        elif isinstance(action, UpdateConfigMap):
            out.append("Update ConfigMap")
        elif isinstance(action, DeleteWorkload):
            out.append(f"Delete {action.workload['metadata']['name']}")
        elif isinstance(action, ForceDeletePod):
            out.append(f"ForceDelete {action.name}")
        elif isinstance(action, RecordStartedSpec):
            out.append("RecordStartedSpec")
    return out


def announced(plan: TrainingRunPlan) -> list[str]:
    return [a.reason for a in plan.actions if isinstance(a, Announce)]


def ready(plan: TrainingRunPlan) -> tuple[str, str]:
    (condition,) = [c for c in plan.status.conditions if c.type == "Ready"]
    return condition.reason, condition.message


# --- the table ----------------------------------------------------------------------------

OLD_OWNER = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun", "name": NAME}


def _owned_by(obj: dict[str, Any], refs: list[dict[str, Any]]) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "ownerReferences": refs}}


CASES: list[tuple[str, Observed, str, str, list[str]]] = [
    # (case, observed, phase, Ready reason, actions)
    (
        "a new run starts attempt 1: spec recorded, then ConfigMap, Service, Job",
        observe(run_body(started=False)),
        "Pending",
        "Created",
        ["RecordStartedSpec", "Create ConfigMap", "Create Service", "Create Job"],
    ),
    (
        "a missing claim waits, naming it",
        observe(run_body(started=False), claims={"datasets": SHARED, "models": None}),
        "Pending",
        "WaitingForDependencies",
        [],
    ),
    (
        "a claim two nodes cannot share waits, naming it",
        observe(
            run_body(started=False),
            claims={"datasets": SHARED, "models": {"spec": {"accessModes": ["ReadWriteOnce"]}}},
        ),
        "Pending",
        "WaitingForDependencies",
        [],
    ),
    (
        "a ConfigMap of that name owned by another object: NameTaken",
        observe(
            run_body(started=False),
            config_map=_owned_by(
                by_kind(children(1), "ConfigMap"),
                [{"kind": "Deployment", "name": "web", "uid": "other"}],
            ),
        ),
        "Pending",
        "NameTaken",
        [],
    ),
    (
        "a Service of that name owned by nobody: NameTaken",
        observe(run_body(started=False), service=_owned_by(by_kind(children(1), "Service"), [])),
        "Pending",
        "NameTaken",
        [],
    ),
    (
        "a ConfigMap of a deleted run of the same name: wait for garbage collection",
        observe(
            run_body(started=False),
            config_map=_owned_by(
                by_kind(children(1), "ConfigMap"), [{**OLD_OWNER, "uid": "dead-uid"}]
            ),
        ),
        "Pending",
        "Restarting",
        [],
    ),
    (
        "following: all pods running",
        observe(
            run_body(running_status(phase="Pending")),
            1,
            workloads=[workload(1)],
            pods=[pod(1, 0), pod(1, 1)],
        ),
        "Running",
        "Training",
        [],
    ),
    (
        "following: a ConfigMap and Service deleted by hand are ensured again",
        observe(
            run_body(running_status()),
            workloads=[workload(1)],
            pods=[pod(1, 0), pod(1, 1)],
        ),
        "Running",
        "Training",
        ["Create ConfigMap", "Create Service"],
    ),
    (
        "following: a ConfigMap whose data drifted is brought back",
        observe(
            run_body(running_status()),
            1,
            config_map={**by_kind(children(1), "ConfigMap"), "data": {"config.yaml": "x"}},
            workloads=[workload(1)],
            pods=[pod(1, 0), pod(1, 1)],
        ),
        "Running",
        "Training",
        ["Update ConfigMap"],
    ),
    (
        "the Job completed: Succeeded",
        observe(
            run_body(running_status()),
            1,
            workloads=[workload(1, conditions=[{"type": "Complete", "status": "True"}])],
            pods=[pod(1, 0, "Succeeded", exit_code=0), pod(1, 1, "Succeeded", exit_code=0)],
        ),
        "Succeeded",
        "Completed",
        [],
    ),
    (
        "a retriable failure deletes the attempt and moves to the next",
        observe(
            run_body(running_status()),
            1,
            workloads=[workload(1)],
            pods=[pod(1, 0), pod(1, 1, "Failed", exit_code=137)],
        ),
        "Pending",
        "Restarting",
        ["Delete pretrain-1"],
    ),
    (
        "a failure after maxRestarts restarts fails the run",
        observe(
            run_body(running_status(attempt=3, restarts=2)),
            3,
            workloads=[workload(3)],
            pods=[pod(3, 0), pod(3, 1, "Failed", exit_code=137)],
        ),
        "Failed",
        "RestartsExhausted",
        [],
    ),
    (
        "a config error fails the run at once",
        observe(
            run_body(running_status()),
            1,
            workloads=[workload(1)],
            pods=[pod(1, 0, "Failed", exit_code=78, message="config error: data.train: bad")],
        ),
        "Failed",
        "ConfigError",
        [],
    ),
    (
        "attempt 2 waits while attempt 1's Job is being deleted",
        observe(
            run_body(running_status(attempt=2, restarts=1, phase="Pending")),
            workloads=[
                {
                    **workload(1),
                    "metadata": {**workload(1)["metadata"], "deletionTimestamp": rfc3339(NOW)},
                }
            ],
            pods=[pod(1, 0, deleted_at=NOW)],
        ),
        "Pending",
        "Restarting",
        [],
    ),
    (
        "attempt 2 starts once attempt 1 is gone",
        observe(run_body(running_status(attempt=2, restarts=1, phase="Pending"))),
        "Pending",
        "Created",
        ["Create ConfigMap", "Create Service", "Create Job"],
    ),
    (
        "pods of the old attempt stuck terminating on a dead node are named",
        observe(
            run_body(running_status(attempt=2, restarts=1, phase="Pending")),
            workloads=[
                {
                    **workload(1),
                    "metadata": {**workload(1)["metadata"], "deletionTimestamp": rfc3339(NOW)},
                }
            ],
            pods=[pod(1, 1, deleted_at=NOW - STUCK_TERMINATING_SECONDS - 1, node="node-7")],
        ),
        "Pending",
        "PodsStuckTerminating",
        [],
    ),
    (
        "spec.suspend deletes the workload",
        observe(
            run_body(running_status(), spec={**SPEC, "suspend": True}),
            1,
            workloads=[workload(1)],
            pods=[pod(1, 0), pod(1, 1)],
        ),
        "Suspended",
        "Suspended",
        ["Delete pretrain-1"],
    ),
    (
        "resuming starts the next attempt with the current spec",
        observe(run_body(running_status(phase="Suspended"), started=False)),
        "Pending",
        "Created",
        ["RecordStartedSpec", "Create ConfigMap", "Create Service", "Create Job"],
    ),
    (
        "a Job suspended by a queue (Kueue preemption) waits; its stopped pods are no failure",
        observe(
            run_body(running_status()),
            1,
            workloads=[{**workload(1), "spec": {**workload(1)["spec"], "suspend": True}}],
            pods=[pod(1, 0, "Failed", exit_code=143), pod(1, 1, "Failed", exit_code=143)],
        ),
        "Pending",
        "Queued",
        [],
    ),
    (
        "re-admitted by the queue: pods that ended before the Job's restart are not failures",
        observe(
            run_body(running_status(phase="Pending")),
            1,
            workloads=[workload(1, startTime=rfc3339(NOW - 10))],
            pods=[pod(1, 0, "Failed", exit_code=143, finished_at=NOW - 60)],
        ),
        "Pending",
        "PodsStarting",
        [],
    ),
    (
        "a pod waiting on a missing Secret names it and the field",
        observe(
            run_body(
                running_status(phase="Pending"),
                spec={
                    **SPEC,
                    "env": [
                        {
                            "name": "WANDB_API_KEY",
                            "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
                        },
                    ],
                },
            ),
            1,
            workloads=[workload(1)],
            pods=[
                pod(
                    1,
                    0,
                    "Pending",
                    waiting=("CreateContainerConfigError", 'secret "wandb" not found'),
                )
            ],
        ),
        "Pending",
        "WaitingForDependencies",
        [],
    ),
    (
        "a status that lost its attempt adopts the newest workload",
        observe(run_body({}), 2, workloads=[workload(2)], pods=[pod(2, 0), pod(2, 1)]),
        "Running",
        "Training",
        [],
    ),
    (
        "a Job of an older run with the same name is not ours",
        observe(
            run_body(started=False),
            workloads=[_owned_by(workload(1), [{**OLD_OWNER, "uid": "dead-uid"}])],
        ),
        "Pending",
        "Created",
        ["RecordStartedSpec", "Create ConfigMap", "Create Service", "Create Job"],
    ),
    (
        "a Succeeded run whose children were deleted creates nothing again",
        observe(run_body({**running_status(phase="Succeeded"), "conditions": []})),
        "Succeeded",
        "",
        [],
    ),
    (
        "a run Failed after its restarts creates nothing again",
        observe(run_body({**running_status(attempt=3, restarts=2, phase="Failed")})),
        "Failed",
        "",
        [],
    ),
    (
        "the apiserver refused a child with 422: Failed InvalidSpec with its message",
        observe(
            run_body(started=False),
            refusal=Refusal("Job team-a/pretrain-1", "batch/v1", 422, "denied by policy"),
        ),
        "Failed",
        "InvalidSpec",
        [],
    ),
    (
        "the apiserver refused a child with 403 (quota): Pending Forbidden",
        observe(
            run_body(started=False),
            refusal=Refusal("Job team-a/pretrain-1", "batch/v1", 403, "exceeded quota"),
        ),
        "Pending",
        "Forbidden",
        [],
    ),
    (
        "404 on create: the kind is not installed",
        observe(
            run_body(started=False, spec={**SPEC, "backend": "jobset"}),
            refusal=Refusal(
                "JobSet team-a/pretrain-1", "jobset.x-k8s.io/v1alpha2", 404, "not found"
            ),
        ),
        "Pending",
        "APINotInstalled",
        [],
    ),
    (
        "a spec refused as invalid stays Failed while it is unchanged (no retry loop)",
        observe(run_body(refused_status(), started=False)),
        "Failed",
        "InvalidSpec",
        [],
    ),
    (
        "a spec refused as invalid is tried again once edited (generation 2, observed 1)",
        observe(edited(run_body(refused_status(), started=False))),
        "Pending",
        "Created",
        ["RecordStartedSpec", "Create ConfigMap", "Create Service", "Create Job"],
    ),
    (
        "an invalid spec fails naming the field",
        observe(run_body(started=False, spec={**SPEC, "method": "dpo"})),
        "Failed",
        "InvalidSpec",
        [],
    ),
]


@pytest.mark.parametrize(
    ("observed", "phase", "reason", "actions"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(observed: Observed, phase: str, reason: str, actions: list[str]) -> None:
    plan = plan_trainingrun(observed)
    assert plan.status.phase == phase
    if reason:
        assert ready(plan)[0] == reason, ready(plan)
    assert kinds(plan) == actions


# --- what the rows above do not show ------------------------------------------------------


def test_a_new_attempt_records_the_spec_before_creating_anything() -> None:
    plan = plan_trainingrun(observe(run_body(started=False)))
    assert isinstance(plan.actions[0], RecordStartedSpec)
    assert json.loads(plan.actions[0].spec) == SPEC
    assert plan.status.attempt == 1 and plan.status.restarts == 0


def test_a_restart_counts_and_names_its_cause() -> None:
    observed = observe(
        run_body(running_status()),
        1,
        workloads=[workload(1)],
        pods=[pod(1, 0), pod(1, 1, "Failed", exit_code=137)],
    )
    plan = plan_trainingrun(observed)
    assert (plan.status.attempt, plan.status.restarts) == (2, 1)
    assert plan.restart_cause == "Signalled"
    assert "Restarting" in announced(plan)


def test_progress_eta_and_checkpoint_come_from_the_metrics() -> None:
    base = observe(
        run_body(running_status()), 1, workloads=[workload(1)], pods=[pod(1, 0), pod(1, 1)]
    )
    metrics = TrainerMetrics(step=10, total_steps=110, loss=2.5, checkpoint_step=10)
    first = plan_trainingrun(replace(base, metrics=metrics))
    assert first.first_sample == (1, 10, NOW)
    assert first.status.progress.step == 10 and first.status.progress.percent == 9
    assert first.status.latest_checkpoint == "pvc://models/pretrain/checkpoint-10"
    assert first.status.start_time == rfc3339(NOW)
    later = replace(
        base,
        now=NOW + 10,
        metrics=replace(metrics, step=20),
        first_sample=first.first_sample,
    )
    plan = plan_trainingrun(later)
    assert plan.status.progress.eta == "1m30s"  # 90 steps left at one step per second


def test_a_missing_secret_is_named_with_the_field_that_references_it() -> None:
    (case,) = [c for c in CASES if "missing Secret" in c[0]]
    _, message = ready(plan_trainingrun(case[1]))
    assert message.startswith("Secret team-a/wandb (spec.env WANDB_API_KEY) does not exist")


def test_a_missing_s3_credentials_secret_is_named_with_its_field() -> None:
    (case,) = [c for c in CASES if "missing Secret" in c[0]]
    storage = {"s3": {"credentialsSecretRef": {"name": "s3-keys"}}}
    body = run_body(running_status(phase="Pending"), spec={**SPEC, "storage": storage})
    missing = pod(
        1, 0, "Pending", waiting=("CreateContainerConfigError", 'secret "s3-keys" not found')
    )
    plan = plan_trainingrun(replace(case[1], run=body, pods=[missing]))
    reason, message = ready(plan)
    assert reason == "WaitingForDependencies"
    assert message.startswith(
        "Secret team-a/s3-keys (spec.storage.s3.credentialsSecretRef) does not exist"
    )


@pytest.mark.parametrize(
    ("modes", "problem"),
    [
        (None, "PersistentVolumeClaim team-a/cache (spec.cache.claimName) does not exist"),
        (["ReadWriteOnce"], "PersistentVolumeClaim team-a/cache (spec.cache.claimName) has "
                            "access modes ReadWriteOnce, but 2 nodes mount it at once: use a "
                            "claim with ReadWriteMany"),
        (["ReadWriteMany"], None),
    ],
)  # fmt: skip
def test_the_cache_claim_must_exist_and_be_writable_by_every_node(
    modes: list[str] | None, problem: str | None
) -> None:
    claims = {**CLAIMS, "cache": None if modes is None else {"spec": {"accessModes": modes}}}
    body = run_body(spec={**SPEC, "cache": {"claimName": "cache"}}, started=False)
    plan = plan_trainingrun(observe(body, claims=claims))
    reason, message = ready(plan)
    if problem is None:
        assert reason == "Created" and "Create Job" in kinds(plan)
    else:
        assert reason == "WaitingForDependencies" and problem in message, message


def test_a_claim_that_cannot_be_shared_is_named_with_the_mode_it_needs() -> None:
    (case,) = [c for c in CASES if "cannot share" in c[0]]
    _, message = ready(plan_trainingrun(case[1]))
    assert "PersistentVolumeClaim team-a/models (spec.output: pvc://models/pretrain)" in message
    assert "ReadWriteOnce" in message and "ReadWriteMany" in message


def test_name_taken_names_the_object_and_its_owner() -> None:
    (case,) = [c for c in CASES if "another object" in c[0]]
    _, message = ready(plan_trainingrun(case[1]))
    assert message.startswith("ConfigMap team-a/pretrain-config already exists")
    assert "Deployment web" in message


def test_stuck_pods_are_named_with_their_node_and_force_deleted_when_asked() -> None:
    (case,) = [c for c in CASES if "stuck terminating" in c[0]]
    _, message = ready(plan_trainingrun(case[1]))
    assert "pretrain-1-1-abcde" in message and "node-7" in message
    assert kinds(plan_trainingrun(case[1])) == []  # a person decides, unless told to
    spec = {**SPEC, "restartPolicy": {"maxRestarts": 2, "forceDeleteAfterSeconds": 60}}
    body = run_body(running_status(attempt=2, restarts=1, phase="Pending"), spec=spec)
    plan = plan_trainingrun(replace(case[1], run=body))
    assert kinds(plan) == ["ForceDelete pretrain-1-1-abcde"]
    # forceDeleteAfterSeconds also sets the patience: 60 s past the grace period is enough.
    recent = [pod(1, 1, deleted_at=NOW - 61, node="node-7")]
    plan = plan_trainingrun(replace(case[1], run=body, pods=recent))
    assert kinds(plan) == ["ForceDelete pretrain-1-1-abcde"]
    waiting = plan_trainingrun(replace(case[1], run=body, pods=[pod(1, 1, deleted_at=NOW - 30)]))
    assert kinds(waiting) == [] and ready(waiting)[0] == "Restarting"


def test_refusals_name_the_object_and_the_apiservers_message() -> None:
    for case in CASES:
        if case[1].refusal is not None:
            reason, message = ready(plan_trainingrun(case[1]))
            assert case[1].refusal.object in message, (reason, message)
    (quota,) = [c for c in CASES if "quota" in c[0]]
    assert "exceeded quota" in ready(plan_trainingrun(quota[1]))[1]


def test_a_waiting_reason_is_announced_once() -> None:
    (case,) = [c for c in CASES if "missing claim" in c[0]]
    first = plan_trainingrun(case[1])
    assert announced(first) == ["WaitingForDependencies"]
    again = replace(case[1], run={**case[1].run, "status": first.status.model_dump(by_alias=True)})
    assert announced(plan_trainingrun(again)) == []


def test_a_finished_run_keeps_its_budget_and_acknowledges_the_generation() -> None:
    body = run_body({**running_status(attempt=3, restarts=2, phase="Failed")})
    body["metadata"]["generation"] = 5
    plan = plan_trainingrun(observe(body))
    assert (plan.status.attempt, plan.status.restarts) == (3, 2)
    assert plan.status.observed_generation == 5


def test_an_edit_while_running_is_ignored_with_a_condition() -> None:
    body = run_body(running_status())
    body["spec"] = {**SPEC, "training": {"learningRate": 0.5}}
    plan = plan_trainingrun(observe(body, 1, workloads=[workload(1)], pods=[pod(1, 0), pod(1, 1)]))
    assert "SpecChangeIgnored" in [c.type for c in plan.status.conditions]
    assert kinds(plan) == []  # the running gang keeps the spec it started with


def test_fields_a_crd_upgrade_defaults_are_no_edit() -> None:
    # The started spec was recorded before the CRD knew restartPolicy.startupTimeoutSeconds;
    # the apiserver now serves the spec with the default filled in.
    body = run_body(running_status())
    body["spec"] = {**SPEC, "restartPolicy": {"maxRestarts": 2, "startupTimeoutSeconds": 3600}}
    plan = plan_trainingrun(observe(body, 1, workloads=[workload(1)], pods=[pod(1, 0), pod(1, 1)]))
    assert "SpecChangeIgnored" not in [c.type for c in plan.status.conditions]


EVALUATE_SPEC: dict[str, Any] = {
    "method": "evaluate",
    "model": {"name": "pvc://models/sft"},
    "evaluate": {
        "suites": [
            {"name": "qa", "data": "pvc://datasets/qa.jsonl"},
            {"name": "perplexity", "data": "pvc://datasets/chat.jsonl"},
        ]
    },
    "output": "pvc://models/eval",
}


FINGERPRINT = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("spec", "message", "outputs"),
    [
        (
            SPEC,
            'outputs: {"train_loss":1.25,"eval_loss":1.5,"global_step":150,'
            f'"data":{{"fingerprint":"{FINGERPRINT}","train_rows":400,"eval_rows":40,'
            '"train_rows_dropped":3,"eval_rows_dropped":1}}',
            {
                "modelUri": "pvc://models/pretrain",
                "metrics": {"train_loss": 1.25, "eval_loss": 1.5, "global_step": 150.0},
            },
        ),
        (
            EVALUATE_SPEC,
            'outputs: {"qa.exact_match":0.75,"qa.f1":0.8,"perplexity.perplexity":3.5}',
            {
                "metrics": {"qa.exact_match": 0.75, "qa.f1": 0.8, "perplexity.perplexity": 3.5},
                "headline": "qa.exact_match=0.75",
            },
        ),
        # An older trainer left no metrics: the run still succeeds, with its model only.
        (SPEC, "", {"modelUri": "pvc://models/pretrain"}),
    ],
    ids=["training", "evaluate", "no-message"],
)
def test_a_succeeded_run_reports_rank_0s_metrics(
    spec: dict[str, Any], message: str, outputs: dict[str, Any]
) -> None:
    single = {**spec, "resources": {"nodes": 1}}
    observed = observe(
        run_body(running_status(), spec=single),
        1,
        workloads=[workload(1, conditions=[{"type": "Complete", "status": "True"}])],
        pods=[pod(1, 0, "Succeeded", exit_code=0, message=message)],
    )
    plan = plan_trainingrun(observed)
    assert plan.status.phase == "Succeeded"
    assert status_body(plan.status)["outputs"] == outputs
    # The data it trained on, where the trainer said (training methods do).
    expected_data = {"fingerprint": FINGERPRINT, "trainRows": 400, "evalRows": 40,
                     "trainRowsDropped": 3, "evalRowsDropped": 1}  # fmt: skip
    assert status_body(plan.status).get("data") == (expected_data if "data" in message else None)
    if "headline" in outputs:
        assert outputs["headline"] in next(
            c.message for c in plan.status.conditions if c.type == "Succeeded"
        )


# --- safety nets: hangs, deadlines, cleanup, the restart policy ---------------------------

RUNNING_PODS = [pod(1, 0), pod(1, 1)]


def hung_run(quiet: float, spec: dict[str, Any] | None = None, **progress: Any) -> dict[str, Any]:
    """A running attempt 1 that last advanced `quiet` seconds ago, at step 40."""
    status = {
        **running_status(),
        "startTime": rfc3339(NOW - 5000),
        "lastProgressTime": rfc3339(NOW - quiet),
        "progress": {"step": 40, "heartbeatTime": rfc3339(NOW - quiet), **progress},
    }
    return run_body(status, spec=spec)


def following(run: dict[str, Any], metrics: TrainerMetrics | None, **fields: Any) -> Observed:
    return observe(run, 1, workloads=[workload(1)], pods=RUNNING_PODS, metrics=metrics, **fields)


STUCK = TrainerMetrics(step=40, heartbeat=NOW - 1801)  # the heartbeat the status holds


@pytest.mark.parametrize(
    ("case", "run", "metrics", "hung", "said"),
    [
        ("quiet for less than the stall timeout", hung_run(1700), TrainerMetrics(
            step=40, heartbeat=NOW - 1700), False, ""),
        ("quiet past the stall timeout", hung_run(1801), STUCK, True,
         "step 40 has not advanced and the trainer's heartbeat stopped"),
        ("no answer past the stall timeout", hung_run(1801), None, True,
         "stopped answering on its metrics port"),
        ("no training yet, within the startup timeout", hung_run(3000, step=0, heartbeatTime=None),
         TrainerMetrics(step=0), False, ""),
        ("no training past the startup timeout", hung_run(3601, step=0, heartbeatTime=None),
         TrainerMetrics(step=0), True, "no training step within restartPolicy.startupTimeout"),
        ("hang detection off", hung_run(99999, spec={**SPEC, "restartPolicy": {
            "stallTimeoutSeconds": 0}}), STUCK, False, ""),
    ],
)  # fmt: skip
def test_a_hung_attempt_restarts_with_no_progress(
    case: str, run: dict[str, Any], metrics: TrainerMetrics | None, hung: bool, said: str
) -> None:
    plan = plan_trainingrun(following(run, metrics))
    if not hung:
        assert plan.status.phase == "Running" and kinds(plan) == [], case
        return
    assert kinds(plan) == ["Delete pretrain-1"], case
    assert plan.restart_cause == "NoProgress"
    assert "NoProgress" in announced(plan)
    assert (plan.status.attempt, plan.status.restarts) == (2, 1)
    assert plan.status.phase == "Pending" and plan.status.progress is None
    (record,) = plan.status.attempts
    assert (record.attempt, record.cause, record.counted) == (1, "NoProgress", True)
    assert said in record.message and said in ready(plan)[1], ready(plan)


def test_a_heartbeat_or_a_step_is_progress_and_moves_the_stall_clock() -> None:
    quiet = hung_run(4000)
    beating = plan_trainingrun(following(quiet, TrainerMetrics(step=40, heartbeat=NOW - 2)))
    assert beating.status.phase == "Running"
    assert beating.status.last_progress_time == rfc3339(NOW)
    stepping = plan_trainingrun(following(quiet, TrainerMetrics(step=41, heartbeat=NOW - 4000)))
    assert stepping.status.last_progress_time == rfc3339(NOW)
    # The first pass that sees the attempt running starts the clock.
    fresh = plan_trainingrun(following(run_body(running_status(phase="Pending")), None))
    assert fresh.status.phase == "Running" and fresh.status.last_progress_time == rfc3339(NOW)


def test_a_run_past_its_deadline_fails_and_stops_its_pods() -> None:
    spec = {**SPEC, "activeDeadlineSeconds": 3600}
    status = {**running_status(), "startTime": rfc3339(NOW - 3600),
              "latestCheckpoint": "pvc://models/pretrain/checkpoint-40"}  # fmt: skip
    plan = plan_trainingrun(following(run_body(status, spec=spec), STUCK))
    assert plan.status.phase == "Failed" and ready(plan)[0] == "DeadlineExceeded"
    assert kinds(plan) == ["Delete pretrain-1"]
    assert plan.status.completion_time == rfc3339(NOW)
    assert "past spec.activeDeadlineSeconds (3600s)" in ready(plan)[1]
    assert "checkpoint-40" in ready(plan)[1]
    # A suspended run's clock runs on: it fails too, with nothing left to stop.
    suspended = {**status, "phase": "Suspended"}
    plan = plan_trainingrun(observe(run_body(suspended, spec={**spec, "suspend": True}), 1))
    assert ready(plan)[0] == "DeadlineExceeded" and kinds(plan) == []
    # Within the deadline nothing happens.
    early = {**status, "startTime": rfc3339(NOW - 3599)}
    assert plan_trainingrun(following(run_body(early, spec=spec), STUCK)).status.phase == "Running"


def finished_status(ago: float, **fields: Any) -> dict[str, Any]:
    return {
        "phase": "Succeeded",
        "attempt": 1,
        "restarts": 0,
        "completionTime": rfc3339(NOW - ago),
        "conditions": [{"type": "Ready", "status": "True", "reason": "Completed",
                        "message": "attempt 1 completed",
                        "lastTransitionTime": rfc3339(NOW - ago)}],
        **fields,
    }  # fmt: skip


def test_ttl_deletes_the_workload_after_the_verdict_and_never_recreates_it() -> None:
    spec = {**SPEC, "ttlSecondsAfterFinished": 60}
    done = workload(1, conditions=[{"type": "Complete", "status": "True"}])
    early = plan_trainingrun(observe(run_body(finished_status(59), spec=spec), workloads=[done]))
    assert kinds(early) == [] and early.status.cleaned_up_time is None
    due = plan_trainingrun(observe(run_body(finished_status(60), spec=spec), workloads=[done]))
    assert kinds(due) == ["Delete pretrain-1"]
    assert due.status.phase == "Succeeded" and ready(due) == ("Completed", "attempt 1 completed")
    gone = plan_trainingrun(observe(run_body(finished_status(90), spec=spec), workloads=[]))
    assert kinds(gone) == [] and "CleanedUp" in announced(gone)
    assert gone.status.cleaned_up_time == rfc3339(NOW) and gone.status.phase == "Succeeded"
    cleaned = finished_status(900, cleanedUpTime=rfc3339(NOW - 800))
    later = plan_trainingrun(observe(run_body(cleaned, spec=spec), workloads=[]))
    assert kinds(later) == [] and announced(later) == []
    # Without a TTL, a finished run's workload stays.
    kept = plan_trainingrun(observe(run_body(finished_status(99999)), workloads=[done]))
    assert kinds(kept) == []


def oom_killed(attempt: int, index: int) -> dict[str, Any]:
    failed = pod(attempt, index, "Failed", exit_code=137)
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    return failed


def test_out_of_memory_is_retried_once_then_fails_with_the_runs_values() -> None:
    first = plan_trainingrun(
        observe(run_body(running_status()), 1, workloads=[workload(1)],
                pods=[pod(1, 0), oom_killed(1, 1)])
    )  # fmt: skip
    assert (first.status.attempt, first.status.restarts) == (2, 1)
    assert first.restart_cause == "OOMKilled"
    again = {**running_status(attempt=2, restarts=1),
             "attempts": status_body(first.status)["attempts"]}  # fmt: skip
    second = plan_trainingrun(
        observe(run_body(again), 2, workloads=[workload(2)], pods=[oom_killed(2, 0), pod(2, 1)])
    )
    assert second.status.phase == "Failed" and ready(second)[0] == "OutOfMemory"
    assert "out of memory again after one retry" in ready(second)[1]
    assert "perDeviceTrainBatchSize 8 -> try 4 with gradientAccumulationSteps 2" in ready(second)[1]
    assert [r.cause for r in second.status.attempts] == ["OOMKilled", "OOMKilled"]


def test_a_preemption_restarts_without_using_the_budget() -> None:
    spent = running_status(restarts=2)  # maxRestarts is 2: a crash now would fail the run
    plan = plan_trainingrun(
        observe(run_body(spent), 1, workloads=[workload(1)],
                pods=[pod(1, 0, "Failed", exit_code=75, message="preempted: step 40"), pod(1, 1)])
    )  # fmt: skip
    assert (plan.status.attempt, plan.status.restarts) == (2, 2)
    assert plan.restart_cause == "Preempted"
    assert "not counted against restartPolicy.maxRestarts" in ready(plan)[1]
    assert plan.status.attempts[0].counted is False
    crash = plan_trainingrun(
        observe(run_body(spent), 1, workloads=[workload(1)],
                pods=[pod(1, 0, "Failed", exit_code=1), pod(1, 1)])
    )  # fmt: skip
    assert ready(crash)[0] == "RestartsExhausted"


def test_instability_fails_at_once_with_the_stability_knobs() -> None:
    said = "training unstable: step 5: loss is nan; step 6: loss is nan; step 7: loss is nan"
    plan = plan_trainingrun(
        observe(run_body(running_status()), 1, workloads=[workload(1)],
                pods=[pod(1, 0, "Failed", exit_code=72, message=said), pod(1, 1)])
    )  # fmt: skip
    assert plan.status.phase == "Failed" and ready(plan)[0] == "InstabilityDetected"
    assert said in ready(plan)[1] and "learningRate 2e-05 -> try 1e-05" in ready(plan)[1]
    assert kinds(plan) == []


def test_a_resumed_run_starts_its_stall_clock_afresh() -> None:
    # Suspended for hours: the old attempt's progress and clock must not count as a hang.
    suspended = {**running_status(phase="Suspended"), "lastProgressTime": rfc3339(NOW - 9999),
                 "progress": {"step": 40, "heartbeatTime": rfc3339(NOW - 9999)}}  # fmt: skip
    resumed = plan_trainingrun(observe(run_body(suspended, started=False)))
    assert resumed.status.attempt == 2
    assert resumed.status.progress is None and resumed.status.last_progress_time is None
    body = status_body(resumed.status)
    running = plan_trainingrun(
        observe(run_body({**body, "phase": "Pending"}), 2, workloads=[workload(2)],
                pods=[pod(2, 0), pod(2, 1)])
    )  # fmt: skip
    assert running.status.phase == "Running" and kinds(running) == []
    assert running.status.last_progress_time == rfc3339(NOW)
