"""kopf glue for Pipeline: every trigger runs one idempotent, level-based reconcile.

Create, resume (operator start), spec updates and a timer all call `reconcile`, which reads
the pipeline fresh from the API under a per-pipeline lock, lists its stage TrainingRuns and Sweeps
(a stage with `sweep` is a Sweep; by the `kubetrain.dev/pipeline` label, counting only those
this pipeline owns), lets
`kubetrain.pipelines` decide, acts through `kubetrain.k8s` and writes the whole status.
The runs themselves are the only memory: a stage is started once every stage it depends on
succeeded and it has no run yet, and its run is named `<pipeline>-<stage>`, so an operator
restarted at any point creates nothing twice. The TrainingRun handlers then run each stage.

The lifecycle. A pipeline pydantic refuses (a dependsOn cycle, which the CRD's CEL cannot
see, or a stage that is no valid TrainingRun) fails with InvalidSpec naming the stages and
creates nothing; fixing the spec starts it. `spec.suspend` is copied to every unfinished
stage run (each then suspends or resumes itself) and holds back stages not started yet.
Stage runs are owned by the pipeline, so deleting it deletes them (garbage collection).
A finished pipeline (Succeeded, or Failed for any reason but InvalidSpec) keeps its verdict:
edits only advance observedGeneration and never start or re-run a stage; create a new
Pipeline to train again. A run named like a stage but not owned by this pipeline is left
alone, and the stage waits with a message saying so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from kubetrain import k8s, opmetrics
from kubetrain.api import (
    PHASE_FAILED,
    REASON_CREATED,
    REASON_INVALID_SPEC,
    REASON_SUSPENDED,
    SWEEP_KIND,
    Pipeline,
    PipelineStatus,
    StageStatus,
    Sweep,
    TrainingRun,
    stage_run_name,
)
from kubetrain.handlers.passes import ObjectPass, rfc3339
from kubetrain.pipelines import (
    FINISHED_PHASES,
    plan_pipeline,
    stage_run,
    stage_sweep,
    suspend_patch,
    upstream_model_uris,
)
from kubetrain.status import (
    CONDITION_READY,
    condition_of,
    invalid_spec_status,
    merge_patch,
    next_status,
)
from kubetrain_trainer.config import format_validation_error

log = logging.getLogger(__name__)

# Event reason when a stage cannot start because a foreign run holds its name.
REASON_NAME_TAKEN = "NameTaken"


def reconcile(namespace: str, name: str, memo: kopf.Memo) -> None:
    """Bring one Pipeline one step closer to its spec; safe to call any time, any often."""
    # kopf gives each object a memo of its own, so this lock is per pipeline; it keeps the
    # timer and a spec update from deciding at once (and creating from stale reads).
    lock = memo.setdefault("reconcile_lock", threading.Lock())
    with lock:
        body = k8s.get_pipeline(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        PipelinePass(body).run()


class PipelinePass(ObjectPass):
    """One pass over one Pipeline, as read at the start of the pass."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.now = rfc3339(time.time())

    def run(self) -> None:
        ready = condition_of(self.status, CONDITION_READY) or {}
        phase = self.status.get("phase")
        if phase in FINISHED_PHASES and ready.get("reason") != REASON_INVALID_SPEC:
            # A finished pipeline keeps its verdict; only acknowledge the generation (kstatus).
            reason, message = ready.get("reason", ""), ready.get("message", "")
            self.write(
                next_status(
                    self.status,
                    phase=phase,
                    reason=reason,
                    message=message,
                    now=self.now,
                    generation=self.generation,
                )
            )
            return
        try:
            pipeline = self.validated()
        except ValidationError as e:
            self.invalid(format_validation_error(e, f"Pipeline {self.qualified}"))
            return
        runs = self.stage_runs(pipeline)
        plan = plan_pipeline(
            pipeline,
            {stage: run.get("status") or {} for stage, run in runs.items()},
            now=self.now,
        )
        for run in runs.values():
            self.propagate_suspend(pipeline, run)
        model_uris = upstream_model_uris(plan.status)
        for stage in plan.ready:
            try:
                if pipeline.spec.stage(stage).sweep is not None:
                    run = stage_sweep(pipeline, stage, model_uris)
                else:
                    run = stage_run(pipeline, stage, model_uris)
            except ValidationError as e:
                self.invalid(format_validation_error(e, f"Pipeline {self.qualified}"))
                return
            except ValueError as e:
                self.invalid(f"Pipeline {self.qualified}: {e}")
                return
            self.create(run, plan.status.stages)
        self.write(plan.status.model_dump(mode="json", by_alias=True, exclude_none=True))

    # --- steps ---------------------------------------------------------------------------

    def validated(self) -> Pipeline:
        """The pipeline as a model (ValidationError if its spec is bad), with its status."""
        pipeline = Pipeline.model_validate(
            {key: value for key, value in self.body.items() if key != "status"}
        )
        # The status is read apart, so that it can never make the spec look invalid; one
        # that does not parse (edited by hand) is rebuilt from the stage runs.
        try:
            pipeline.status = PipelineStatus.model_validate(self.status) if self.status else None
        except ValidationError as e:
            log.warning("Pipeline %s: rebuilding an unreadable status: %s", self.qualified, e)
            pipeline.status = None
        return pipeline

    def stage_runs(self, pipeline: Pipeline) -> dict[str, dict[str, Any]]:
        """Stage name -> its TrainingRun, for the stages that have one owned by this pipeline."""
        stage_of = {
            (stage_run_name(self.name, s.name), s.sweep is not None): s.name
            for s in pipeline.spec.stages
        }
        runs = {}
        sweeps = [] if not any(s.sweep for s in pipeline.spec.stages) else (
            k8s.list_pipeline_sweeps(self.namespace, self.name)
        )  # fmt: skip
        for run in k8s.list_pipeline_runs(self.namespace, self.name) + sweeps:
            is_sweep = run.get("kind") == SWEEP_KIND
            stage = stage_of.get((run["metadata"]["name"], is_sweep))
            if stage is not None and self.owns(run):
                runs[stage] = run
        return runs

    def owns(self, run: Mapping[str, Any]) -> bool:
        """Whether `run` is this pipeline object's (not a namesake's, nor a user's)."""
        references = run["metadata"].get("ownerReferences") or []
        return any(ref.get("uid") == self.uid for ref in references)

    def propagate_suspend(self, pipeline: Pipeline, run: dict[str, Any]) -> None:
        """Copy spec.suspend to an unfinished stage run; its own handlers stop or resume it."""
        patch = suspend_patch(pipeline, run)
        if patch is None:
            return
        if run.get("kind") == SWEEP_KIND:
            k8s.patch_sweep(self.namespace, run["metadata"]["name"], patch)
        else:
            k8s.patch_trainingrun(self.namespace, run["metadata"]["name"], patch)
        verb = "Suspended" if pipeline.spec.suspend else "Resumed"
        self.announce(
            REASON_SUSPENDED,
            f"{verb} {k8s.describe(run)}: the pipeline's spec.suspend is "
            f"{str(pipeline.spec.suspend).lower()}",
        )

    def create(self, run: TrainingRun | Sweep, stages: list[StageStatus]) -> None:
        """Create a ready stage's run (or sweep); if one not ours holds the name, say so."""
        body = run.model_dump(mode="json", by_alias=True, exclude_none=True)
        stage = next(s for s in stages if s.run_name == run.metadata.name)
        create = k8s.create_sweep if isinstance(run, Sweep) else k8s.create_trainingrun
        if create(body):
            self.announce(REASON_CREATED, f"Created {k8s.describe(body)} for stage {stage.name}")
            return
        stage.message = (
            f"cannot start: {k8s.describe(body)} exists but is not this pipeline's (no "
            "ownerReference to it); delete it or rename the pipeline or stage"
        )
        previous = {s.get("name"): s for s in self.status.get("stages") or []}
        if (previous.get(stage.name) or {}).get("message") != stage.message:
            self.announce(REASON_NAME_TAKEN, f"Stage {stage.name} {stage.message}", warning=True)

    def invalid(self, message: str) -> None:
        ready = condition_of(self.status, CONDITION_READY) or {}
        if (ready.get("reason"), ready.get("message")) != (REASON_INVALID_SPEC, message):
            self.announce(REASON_INVALID_SPEC, f"Failed: {message}", warning=True)
        self.write(
            invalid_spec_status(self.status, message, now=self.now, generation=self.generation)
        )

    # --- helpers -------------------------------------------------------------------------

    def write(self, new: dict[str, Any]) -> None:
        """Patch the status to `new` (only what changed), announce a new phase, count it."""
        patch = merge_patch(self.status, new)
        if patch:
            k8s.patch_pipeline_status(self.namespace, self.name, patch)
        phase = new.get("phase", "")
        ready = condition_of(new, CONDITION_READY) or {}
        reason = ready.get("reason", "")
        # InvalidSpec was announced with its message already.
        if phase != self.status.get("phase") and reason != REASON_INVALID_SPEC:
            self.announce(
                reason, f"{phase}: {ready.get('message', '')}", warning=phase == PHASE_FAILED
            )
        opmetrics.observe_pipeline_phase(self.namespace, self.name, phase)
        self.status = new


def forget(namespace: str, name: str) -> None:
    """A pipeline is gone: drop it from the metrics (its runs go by garbage collection)."""
    opmetrics.forget_pipeline(namespace, name)
