"""What the operator decides for a Pipeline: pure functions of the pipeline and its stage runs.

`stage_run` builds the TrainingRun a stage becomes (`<pipeline>-<stage>`, labelled with the
pipeline and stage, owned by the pipeline, suspended with it, its fromStage filled with the
upstream stage's model); `stage_sweep` the Sweep a stage with `sweep` becomes instead, that
run as its template, whose best trial's model (status.outputs.modelUri) is handed on.
`plan_pipeline` is the one scheduler of pipelines: it looks at the stage runs that exist and
says which stages may start now and what the pipeline's status is; the operator's handler
and the local runner (`kubetrain run`) both execute its plan. A stage is ready once every
stage it depends on succeeded and it has no run yet, so an operator restarted at any point
creates nothing twice; after a failure, stopOnFailure starts nothing more while
continueIndependent goes on with the stages that do not need the failed one. Stages that
will never run are Skipped. Phase and conditions follow kstatus through
`kubetrain.status.next_status`; the clock is an argument, so every function here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from kubetrain.api import (
    API_VERSION,
    CONDITION_FAILED,
    CONDITION_READY,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    FAILURE_STOP,
    FINISHED_PHASES,
    KUEUE_QUEUE_LABEL,
    LABEL_PIPELINE,
    LABEL_STAGE,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    PIPELINE_KIND,
    REASON_COMPLETED,
    REASON_GATE_FAILED,
    REASON_STAGE_FAILED,
    REASON_STAGES_PENDING,
    REASON_STAGES_RUNNING,
    REASON_SUSPENDED,
    STAGE_SKIPPED,
    ObjectMeta,
    Phase,
    Pipeline,
    PipelineStatus,
    StageStatus,
    Sweep,
    TrainingRun,
    dependency_order,
    stage_output_uri,
    stage_run_name,
    stage_trainingrun_spec,
)
from kubetrain.status import next_status

# A stage run in one of these phases exists and has not finished.
IN_FLIGHT_PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_SUSPENDED)
# How the message of a stage that will never run begins (the local runner's summary drops it).
NOT_RUN_PREFIX = "not run: "


class PipelinePlan(NamedTuple):
    """What to do now: the stages to start (in dependency order) and the new status."""

    ready: list[str]
    status: PipelineStatus


def pipeline_owner_reference(pipeline: Pipeline) -> dict[str, Any]:
    """The ownerReference that makes a stage run the pipeline's child (needs metadata.uid).

    No blockOwnerDeletion: with the OwnerReferencesPermissionEnforcement admission plugin
    it would need RBAC on pipelines/finalizers, and nothing waits for the runs to go.
    """
    if not pipeline.metadata.uid:
        raise ValueError(f"Pipeline {pipeline.metadata.name}: metadata.uid is not set")
    return {
        "apiVersion": API_VERSION,
        "kind": PIPELINE_KIND,
        "name": pipeline.metadata.name,
        "uid": pipeline.metadata.uid,
        "controller": True,
    }


def stage_run(
    pipeline: Pipeline, stage_name: str, upstream_model_uris: Mapping[str, str]
) -> TrainingRun:
    """The TrainingRun for one stage.

    `upstream_model_uris` maps stage names to their models (`upstream_model_uris(status)`
    on a cluster); each fromStage of this stage must be there, else ValueError names it.
    The run is owned by the pipeline when the pipeline has a uid (read from the API), and
    carries the pipeline's Kueue queue label so Kueue admits every stage the same way.
    """
    name = stage_run_name(pipeline.metadata.name, stage_name)
    labels = {LABEL_PIPELINE: pipeline.metadata.name, LABEL_STAGE: stage_name}
    queue = pipeline.metadata.labels.get(KUEUE_QUEUE_LABEL)
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if pipeline.metadata.namespace:
        metadata["namespace"] = pipeline.metadata.namespace
    if pipeline.metadata.uid:
        metadata["ownerReferences"] = [pipeline_owner_reference(pipeline)]
    spec = stage_trainingrun_spec(pipeline.spec, stage_name, upstream_model_uris)
    return TrainingRun(metadata=ObjectMeta.model_validate(metadata), spec=spec)


def stage_sweep(
    pipeline: Pipeline, stage_name: str, upstream_model_uris: Mapping[str, str]
) -> Sweep:
    """The Sweep a stage with `sweep` becomes: `<pipeline>-<stage>`, its template the
    TrainingRun the stage would otherwise be, labelled and owned like a stage run."""
    stage = pipeline.spec.stage(stage_name)
    if stage.sweep is None:
        raise ValueError(f"stage {stage_name} is no sweep")
    run = stage_run(pipeline, stage_name, upstream_model_uris)
    spec = {
        **stage.sweep.model_dump(mode="json", by_alias=True, exclude_none=True),
        "template": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "suspend": pipeline.spec.suspend,
    }
    metadata = run.metadata.model_dump(mode="json", by_alias=True, exclude_none=True)
    return Sweep.model_validate({"metadata": metadata, "spec": spec})


def upstream_model_uris(status: PipelineStatus | None) -> dict[str, str]:
    """Stage name -> model URI for every stage the status shows as succeeded."""
    if status is None:
        return {}
    return {
        s.name: s.model_uri
        for s in status.stages
        if s.phase == PHASE_SUCCEEDED and s.model_uri is not None
    }


def suspend_patch(pipeline: Pipeline, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes a stage's TrainingRun (`run`, its body) follow spec.suspend.

    None when nothing is to change: the run already agrees, or it has finished (a finished
    run is never touched, so suspending a pipeline cannot disturb its results).
    """
    if ((run.get("status") or {}).get("phase")) in FINISHED_PHASES:
        return None
    if bool((run.get("spec") or {}).get("suspend")) == pipeline.spec.suspend:
        return None
    return {"spec": {"suspend": pipeline.spec.suspend}}


def _run_message(run_status: Mapping[str, Any]) -> str:
    """The message of the condition that tells what the run is doing (its phase's own)."""
    conditions = {c.get("type"): c for c in run_status.get("conditions") or []}
    phase_condition = {
        PHASE_RUNNING: CONDITION_RUNNING,
        PHASE_SUCCEEDED: CONDITION_SUCCEEDED,
        PHASE_FAILED: CONDITION_FAILED,
        PHASE_SUSPENDED: CONDITION_SUSPENDED,
    }.get(run_status.get("phase") or "", CONDITION_READY)
    chosen = conditions.get(phase_condition) or conditions.get(CONDITION_READY) or {}
    return str(chosen.get("message") or "")


def _observed_stage(pipeline: Pipeline, name: str, run_status: Mapping[str, Any]) -> StageStatus:
    """A stage whose TrainingRun exists, as that run's status shows it."""
    phase = run_status.get("phase") or PHASE_PENDING
    model_uri = metrics = None
    if phase == PHASE_SUCCEEDED:
        outputs = run_status.get("outputs") or {}
        metrics = outputs.get("metrics")
        if pipeline.spec.stage(name).spec.method != "evaluate":
            model_uri = outputs.get("modelUri") or stage_output_uri(pipeline.spec, name)
    return StageStatus(
        name=name,
        phase=phase,
        run_name=stage_run_name(pipeline.metadata.name, name),
        start_time=run_status.get("startTime"),
        completion_time=run_status.get("completionTime"),
        model_uri=model_uri,
        metrics=metrics,
        message=_run_message(run_status) or None,
    )


def _unstarted_stage(
    pipeline: Pipeline, name: str, stages: Mapping[str, StageStatus], failed: list[str]
) -> tuple[StageStatus, bool]:
    """(status, ready) for a stage without a TrainingRun; `stages` holds those before it.

    `failed` names the stages that failed or were held back by a gate so far.
    """
    stage = pipeline.spec.stage(name)
    blocked = [d for d in stage.depends_on if stages[d].phase in (PHASE_FAILED, STAGE_SKIPPED)]
    waiting = [d for d in stage.depends_on if stages[d].phase != PHASE_SUCCEEDED]
    skipped = StageStatus(name=name, phase=STAGE_SKIPPED)
    if blocked:
        skipped.message = f"{NOT_RUN_PREFIX}it needs {', '.join(blocked)}, which did not succeed"
        return skipped, False
    if failed and pipeline.spec.failure_policy == FAILURE_STOP:
        skipped.message = (
            f"{NOT_RUN_PREFIX}stage {', '.join(failed)} failed and the failurePolicy is "
            "stopOnFailure"
        )
        return skipped, False
    pending = StageStatus(name=name, phase=PHASE_PENDING)
    if waiting:
        pending.message = f"waiting for {', '.join(waiting)}"
        return pending, False
    held = [
        why
        for gate in stage.gate
        if (why := gate.verdict((stages[gate.stage].metrics or {}).get(gate.metric)))
    ]
    if held:
        skipped.reason = REASON_GATE_FAILED
        skipped.message = f"{NOT_RUN_PREFIX}gate failed: {'; '.join(held)}"
        return skipped, False
    if pipeline.spec.suspend:
        pending.message = "ready; the pipeline is suspended"
        return pending, False
    pending.run_name = stage_run_name(pipeline.metadata.name, name)
    pending.message = f"starting TrainingRun {pending.run_name}"
    return pending, True


def plan_pipeline(
    pipeline: Pipeline,
    stage_runs: Mapping[str, Mapping[str, Any] | None],
    *,
    now: str,
) -> PipelinePlan:
    """The stages to create now and the pipeline's new status.

    `stage_runs` maps stage names to the status of their TrainingRun: None (or no entry)
    when the stage has no run yet, {} for a run the operator has not reported on.
    `pipeline.status` is the previous status (kept: condition transition times, startTime,
    completionTime); `now` is the RFC 3339 time of this observation.
    """
    order = dependency_order(pipeline.spec.stages)
    stages: dict[str, StageStatus] = {}
    for name in order:
        run_status = stage_runs.get(name)
        if run_status is not None:
            stages[name] = _observed_stage(pipeline, name, run_status)
    failed = [n for n in order if n in stages and stages[n].phase == PHASE_FAILED]
    ready = []
    for name in order:
        if name not in stages:
            stages[name], is_ready = _unstarted_stage(pipeline, name, stages, failed)
            if is_ready:
                ready.append(name)
            elif stages[name].reason == REASON_GATE_FAILED:
                failed.append(name)
    listed = [stages[n] for n in order]

    in_flight = [
        s.name for s in listed if stage_runs.get(s.name) is not None and s.phase in IN_FLIGHT_PHASES
    ]
    phase, reason, message, current = _pipeline_phase(pipeline, listed, in_flight, ready)
    previous = (
        pipeline.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        if pipeline.status
        else {}
    )
    started = any(stage_runs.get(s.name) is not None for s in listed)
    start_time = previous.get("startTime") or (now if started or ready else None)
    finished = phase in FINISHED_PHASES
    completion_time = (previous.get("completionTime") or now) if finished else None
    succeeded = sum(s.phase == PHASE_SUCCEEDED for s in listed)
    status = next_status(
        previous,
        phase=phase,
        reason=reason,
        message=message,
        now=now,
        generation=pipeline.metadata.generation,
        startTime=start_time,
        completionTime=completion_time,
        progress=f"{succeeded}/{len(listed)}",
        currentStage=current,
        stages=[s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in listed],
    )
    return PipelinePlan(ready=ready, status=PipelineStatus.model_validate(status))


def _pipeline_phase(
    pipeline: Pipeline, stages: list[StageStatus], in_flight: list[str], ready: list[str]
) -> tuple[Phase, str, str, str | None]:
    """(phase, reason, message, currentStage) from the stages' phases.

    `in_flight` are the stages whose runs exist and have not finished, `ready` those about
    to be created. A failure fails the pipeline only once nothing runs or starts any more,
    so `kubectl wait --for=condition=Failed` returns when the pipeline is really done.
    """
    total = len(stages)
    succeeded = sum(s.phase == PHASE_SUCCEEDED for s in stages)
    failed = [s for s in stages if s.phase == PHASE_FAILED]
    skipped = [s.name for s in stages if s.phase == STAGE_SKIPPED]
    active = ", ".join(in_flight + ready) or None
    if succeeded == total:
        return PHASE_SUCCEEDED, REASON_COMPLETED, f"all {total} stages succeeded", None
    gated = [s for s in stages if s.reason == REASON_GATE_FAILED]
    if failed or gated:
        detail = "; ".join(
            [f"stage {s.name} failed" + (f": {s.message}" if s.message else "") for s in failed]
            + [f"stage {s.name}: {(s.message or '').removeprefix(NOT_RUN_PREFIX)}" for s in gated]
        )
        reason = REASON_STAGE_FAILED if failed else REASON_GATE_FAILED
        if active is None:
            others = [name for name in skipped if name not in {s.name for s in gated}]
            not_run = f"; not run: {', '.join(others)}" if others else ""
            failed_names = ", ".join(s.name for s in failed + gated)
            return PHASE_FAILED, reason, detail + not_run, failed_names
        return PHASE_RUNNING, reason, f"{detail}; still running: {active}", active
    if pipeline.spec.suspend:
        return PHASE_SUSPENDED, REASON_SUSPENDED, "spec.suspend is true", active
    if succeeded or any(s.phase == PHASE_RUNNING for s in stages):
        message = f"{succeeded}/{total} stages succeeded; running: {active or 'none'}"
        return PHASE_RUNNING, REASON_STAGES_RUNNING, message, active
    return PHASE_PENDING, REASON_STAGES_PENDING, f"starting: {active or 'none'}", active
