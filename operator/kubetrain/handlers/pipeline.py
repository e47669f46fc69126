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
from typing import Any

import kopf
from pydantic import ValidationError

from kubetrain import k8s, opmetrics
from kubetrain.api import (
    REASON_CREATED,
    REASON_SUSPENDED,
    SWEEP_KIND,
    Pipeline,
    PipelineStatus,
    StageStatus,
    Sweep,
    TrainingRun,
    stage_run_name,
)
from kubetrain.handlers.passes import OwnerPass
from kubetrain.pipelines import (
    plan_pipeline,
    stage_run,
    stage_sweep,
    suspend_patch,
    upstream_model_uris,
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


class PipelinePass(OwnerPass):
    """One pass over one Pipeline, as read at the start of the pass."""

    def run(self) -> None:
        if self.keeps_verdict():
            return
        try:
            pipeline = self.validated(Pipeline, PipelineStatus)
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

    # --- status ------------------------------------------------------------------------

    def patch_status(self, patch: dict[str, Any]) -> None:
        k8s.patch_pipeline_status(self.namespace, self.name, patch)

    def observe(self, status: dict[str, Any]) -> None:
        opmetrics.observe_pipeline_phase(self.namespace, self.name, status.get("phase", ""))


def forget(namespace: str, name: str) -> None:
    """A pipeline is gone: drop it from the metrics (its runs go by garbage collection)."""
    opmetrics.forget_pipeline(namespace, name)
