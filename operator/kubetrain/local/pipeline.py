"""Run a Pipeline on this machine: its stages one after another, each stage's model handed on.

The operator's scheduler decides here too: `kubetrain.pipelines.plan_pipeline` is fed the
stages finished so far (as Succeeded or Failed runs) and says which may start, so readiness
and the failurePolicy (stopOnFailure, continueIndependent) have one home. Each ready stage
runs through `run_locally`, one at a time, as the same TrainingRun the operator would create
(`kubetrain.pipelines.stage_run`), fromStage filled with the upstream stage's output folder.
A ready stage whose output already holds a finished model (the trainer writes metrics.json
last) is reused, not trained, unless `rerun` is set or a stage it depends on was trained in
this invocation: its model would be stale. Retraining a stage first removes the finished
run's checkpoints, metrics.json and merged model from its output, or the trainer would
resume from the final checkpoint and train nothing. A failed stage is named, and the
stages the plan will not start are "not run" with its reason. At the end a table sums up
every stage: status, runtime, final loss, eval metric and output; the pipeline's report.html
(kubetrain_trainer.report) puts the stages' metrics side by side in its outputRoot, or in
the folder the stage outputs share, and links each stage's own report.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kubetrain.api import (
    CONDITION_READY,
    PHASE_FAILED,
    PHASE_SUCCEEDED,
    REASON_GATE_FAILED,
    Pipeline,
    dependency_order,
    stage_output_uri,
    to_trainer_config,
)
from kubetrain.local.runner import (
    LocalRun,
    clear_previous_run,
    clearable_output_dir,
    finished_metrics,
    local_output_dir,
    resolve_local_uri,
    run_locally,
)
from kubetrain.pipelines import (
    NOT_RUN_PREFIX,
    plan_pipeline,
    stage_run,
    stage_sweep,
    upstream_model_uris,
)
from kubetrain.status import condition_of, format_duration, headline_metric
from kubetrain_trainer.config import ConfigError
from kubetrain_trainer.contract import (
    TrainerMetricsFile,
    output_metrics,
)
from kubetrain_trainer.report import PipelineStage, write_pipeline_report

# How each stage of a local pipeline run ended.
TRAINED = "trained"
REUSED = "reused"  # its output kept the finished model of an earlier run; not trained again
FAILED = "failed"
INTERRUPTED = "interrupted"  # stopped by a signal with a checkpoint; the next run resumes it
NOT_RUN = "not run"  # the plan never started it: a stage failed first (or one it needs did)
GATE_FAILED_EXIT = 1  # no stage failed, but a gate's metric was out of bounds


@dataclass
class StageOutcome:
    """One stage of a local pipeline run."""

    stage: str
    method: str
    status: str
    output_dir: Path
    metrics: dict = field(default_factory=dict)
    exit_code: int = 0
    note: str = ""
    first_suite: str | None = None  # an evaluate stage's first suite, whose headline it shows
    model_uri: str | None = None  # a sweep stage's model: its best trial's output


@dataclass
class LocalPipelineRun:
    """What a local pipeline run did, stage by stage in the order they were considered."""

    name: str
    stages: list[StageOutcome]
    report: Path | None = None  # the pipeline's report.html, unless it could not be written
    gate_failure: str | None = None  # the pipeline's message when a gate held a stage back

    @property
    def failed(self) -> list[StageOutcome]:
        return [s for s in self.stages if s.status == FAILED]

    @property
    def exit_code(self) -> int:
        """128 + the signal that interrupted a stage; 0; the exit code of the first stage
        that failed (78 config, 75 preempted); or GATE_FAILED_EXIT when a gate held a stage
        back and no stage failed."""
        interrupted = [s for s in self.stages if s.status == INTERRUPTED]
        if interrupted:
            return interrupted[0].exit_code
        if self.failed:
            return self.failed[0].exit_code
        return GATE_FAILED_EXIT if self.gate_failure else 0


def check_runs_here(pipeline: Pipeline) -> None:
    """Refuse, before anything trains, a stage whose paths only exist on a cluster."""
    outputs = {s.name: stage_output_uri(pipeline.spec, s.name) for s in pipeline.spec.stages}
    for stage in pipeline.spec.stages:
        run = stage_run(pipeline, stage.name, outputs)
        try:
            to_trainer_config(run.metadata.name, run.spec, resolve_local_uri)
        except ValueError as e:
            raise ConfigError(f"Pipeline {pipeline.metadata.name}: stage {stage.name}: {e}") from e


def run_pipeline_locally(
    pipeline: Pipeline,
    *,
    rerun: bool = False,
    metrics_port: int | None = None,
    out: TextIO | None = None,
    train: Callable[..., LocalRun] | None = None,
) -> LocalPipelineRun:
    """Run every stage here in dependency order; prints progress and a summary table.

    `train` runs one TrainingRun (default `run_locally`; tests pass a stand-in); the
    trainer's own output goes straight to the terminal. Raises ConfigError for a stage that
    cannot run on this machine (pvc:// or s3:// paths) before any stage trains.
    """
    train = train or run_locally
    check_runs_here(pipeline)
    # spec.suspend holds a pipeline back on a cluster; `kubetrain run` is asked to run it now.
    pipeline = pipeline.model_copy(
        update={"spec": pipeline.spec.model_copy(update={"suspend": False})}
    )
    order = dependency_order(pipeline.spec.stages)
    outcomes: dict[str, StageOutcome] = {}
    # What the planner observes: the finished stages, as their runs' statuses would read.
    observed: dict[str, dict] = {}

    def say(message: str) -> None:
        # sys.stdout is looked up now, not at import, so redirections (pytest's too) apply.
        print(message, file=out or sys.stdout, flush=True)

    while True:
        plan = plan_pipeline(pipeline, observed, now=_now())
        if not plan.ready:
            break
        # One stage at a time, then plan again: a failure changes what may start next.
        name = plan.ready[0]
        method = pipeline.spec.stage(name).spec.method
        header = f"==> [{order.index(name) + 1}/{len(order)}] stage {name} ({method})"
        outcome = run_stage(
            pipeline, name, upstream_model_uris(plan.status), outcomes, header,
            rerun=rerun, metrics_port=metrics_port, train=train, say=say,
        )  # fmt: skip
        outcomes[name] = outcome
        if outcome.status == INTERRUPTED:
            break  # a person stopped it: no other stage starts
        # Finished stages as their runs' statuses read on a cluster, metrics for the gates.
        observed[name] = {
            "phase": PHASE_FAILED if outcome.status == FAILED else PHASE_SUCCEEDED,
            "outputs": {"metrics": output_metrics(outcome.metrics or {})},
        }
        if outcome.model_uri is not None:  # a sweep stage: its best trial's model
            observed[name]["outputs"]["modelUri"] = outcome.model_uri

    for planned in plan.status.stages:
        if planned.name not in outcomes:
            stage = pipeline.spec.stage(planned.name)
            outcomes[planned.name] = StageOutcome(
                planned.name,
                stage.spec.method,
                NOT_RUN,
                local_output_dir(stage_output_uri(pipeline.spec, planned.name)),
                note="interrupted"
                if any(o.status == INTERRUPTED for o in outcomes.values())
                else (planned.message or "").removeprefix(NOT_RUN_PREFIX),
            )

    result = LocalPipelineRun(pipeline.metadata.name, [outcomes[n] for n in order])
    say(f"\nPipeline {pipeline.metadata.name}:\n{summary_table(result.stages)}")
    ready = condition_of(plan.status.model_dump(mode="json"), CONDITION_READY) or {}
    if plan.status.phase == PHASE_FAILED and ready.get("reason") == REASON_GATE_FAILED:
        result.gate_failure = ready.get("message") or ""
        say(f"{REASON_GATE_FAILED}: {result.gate_failure}")
    result.report = write_report(pipeline, result.stages, say)
    return result


def pipeline_report_dir(pipeline: Pipeline) -> Path:
    """Where a pipeline's report goes: its outputRoot, else the folder its stages' outputs share."""
    spec = pipeline.spec
    if spec.output_root is not None:
        return local_output_dir(spec.output_root)
    parents = [local_output_dir(stage_output_uri(spec, s.name)).parent for s in spec.stages]
    shared = Path(os.path.commonpath(parents))
    # Outputs with nothing in common but the filesystem's root: beside the first stage's.
    return parents[0] if shared == Path(shared.anchor) else shared


def write_report(
    pipeline: Pipeline, stages: list[StageOutcome], say: Callable[[str], None]
) -> Path | None:
    """The pipeline's report.html; failing to write it is a warning, never a failed run."""
    shown = [
        PipelineStage(
            s.stage,
            s.method,
            s.status,
            s.output_dir,
            finished=s.status in (TRAINED, REUSED),
            note=f"exit {s.exit_code}" if s.status == FAILED else s.note,
        )
        for s in stages
    ]
    try:
        return write_pipeline_report(pipeline_report_dir(pipeline), pipeline.metadata.name, shown)
    except Exception as e:
        say(f"warning: the pipeline's report could not be written: {e!r}")
        return None


def run_stage(
    pipeline: Pipeline,
    name: str,
    model_uris: dict[str, str],
    done: dict[str, StageOutcome],
    header: str,
    *,
    rerun: bool,
    metrics_port: int | None,
    train: Callable[..., LocalRun],
    say: Callable[[str], None],
) -> StageOutcome:
    """Reuse or train one stage the plan made ready; `done` holds the stages finished before."""
    stage = pipeline.spec.stage(name)
    output_dir = local_output_dir(stage_output_uri(pipeline.spec, name))
    outcome = StageOutcome(name, stage.spec.method, NOT_RUN, output_dir)
    if stage.spec.evaluate is not None:
        outcome.first_suite = stage.spec.evaluate.suites[0].name
    # A model trained on an upstream model that has just been replaced is stale.
    stale_because = [d for d in stage.depends_on if done[d].status == TRAINED]
    finished = finished_metrics(output_dir) if stage.sweep is None else None
    if finished is not None and not rerun and not stale_because:
        outcome.status, outcome.metrics = REUSED, finished
        say(
            f"{header}: reused, {display_path(output_dir)} holds its finished "
            "model (--rerun trains it again)"
        )
        return outcome
    if rerun or stale_because:
        why = "--rerun" if rerun else f"stage {name} after {', '.join(stale_because)}"
        clearable_output_dir(stage_output_uri(pipeline.spec, name), why)
    if (rerun or stale_because) and clear_previous_run(output_dir):
        why = "--rerun" if rerun else f"{', '.join(stale_because)} was trained again"
        say(f"{header}: {why}, so the previous run's checkpoints were removed")
    if stage.sweep is not None:
        return run_sweep_stage(pipeline, name, model_uris, outcome, header, say)
    run = stage_run(pipeline, name, model_uris)
    say(f"{header}: TrainingRun {run.metadata.name} -> {display_path(output_dir)}")
    result = train(run, metrics_port=metrics_port)
    outcome.exit_code, outcome.metrics = result.exit_code, result.metrics
    outcome.status = TRAINED if result.succeeded else FAILED
    if result.interrupted_by is not None:
        outcome.status = INTERRUPTED  # the runner said where its checkpoint is
    elif not result.succeeded:
        say(
            f"==> stage {name} failed (exit {result.exit_code}); run again to resume from "
            f"its newest checkpoint in {output_dir}"
        )
    return outcome


def run_sweep_stage(
    pipeline: Pipeline,
    name: str,
    model_uris: dict[str, str],
    outcome: StageOutcome,
    header: str,
    say: Callable[[str], None],
) -> StageOutcome:
    """Run a sweep stage's trials here; its model is the best trial's (always searched
    again: a sweep's result is its trials, not one folder to reuse)."""
    from kubetrain.local.sweep import run_sweep_locally

    sweep = stage_sweep(pipeline, name, model_uris)
    say(f"{header}: Sweep {sweep.metadata.name} -> {display_path(outcome.output_dir)}")
    result = run_sweep_locally(sweep)
    say(f"==> stage {name}: Sweep {result.phase}: {result.message}")
    if result.best is None or result.phase != PHASE_SUCCEEDED:
        outcome.status, outcome.exit_code = FAILED, result.exit_code
        return outcome
    outcome.status = TRAINED
    outcome.metrics = finished_metrics(Path(result.best.model_uri or "")) or {}
    outcome.model_uri = result.best.model_uri
    outcome.note = f"best {result.best.name}"
    return outcome


def _now() -> str:
    """This moment in RFC 3339 (the planner stamps its conditions with it)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _runtime(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def eval_metric(method: str, metrics: dict, first_suite: str | None = None) -> str:
    """The metric that says how a stage did: the first suite's headline for evaluate,
    rewards accuracy for DPO, else eval loss."""
    summary = TrainerMetricsFile.model_validate(metrics)
    if first_suite is not None:
        return headline_metric(first_suite, metrics) or "-"
    if method == "dpo" and summary.rewards_accuracy is not None:
        return f"rewards acc {summary.rewards_accuracy:.3f}"
    if summary.eval_loss is not None:
        return f"eval loss {_format_number(summary.eval_loss)}"
    return "-"


def summary_table(stages: list[StageOutcome]) -> str:
    """The end-of-run table: stage, status, runtime, final loss, eval metric, output."""
    header = ("STAGE", "STATUS", "RUNTIME", "FINAL LOSS", "EVAL", "OUTPUT")
    rows = [header]
    for s in stages:
        status = f"{s.status} ({s.note})" if s.note else s.status
        if s.status == FAILED:
            status = f"failed (exit {s.exit_code})"
        summary = TrainerMetricsFile.model_validate(s.metrics)
        rows.append(
            (
                s.stage,
                status,
                _runtime(summary.runtime_seconds),
                _format_number(summary.train_loss),
                eval_metric(s.method, s.metrics, s.first_suite),
                display_path(s.output_dir),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
