"""What the operator decides for a Pipeline: stage runs to create and the pipeline's status.

`plan_pipeline` is fed the stage runs' statuses as the operator would observe them, one
reconcile at a time; each test walks a pipeline through the states a cluster would show.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubetrain.api import (
    KUEUE_QUEUE_LABEL,
    LABEL_PIPELINE,
    LABEL_STAGE,
    Pipeline,
    PipelineStatus,
)
from kubetrain.pipelines import (
    plan_pipeline,
    stage_run,
    suspend_patch,
    upstream_model_uris,
)
from kubetrain.status import invalid_spec_status

T0, T1, T2, T3 = (f"2026-01-01T00:0{i}:00Z" for i in range(4))


def stage(name: str, depends_on: tuple[str, ...] = (), method: str = "sft", **spec: Any):
    """A stage starting from its first dependency's model (or a hub model without one)."""
    body: dict[str, Any] = {"method": method, "data": {"train": "pvc://data/train.jsonl"}}
    body["model"] = {"fromStage": depends_on[0]} if depends_on else {"name": "Qwen/Qwen2.5-0.5B"}
    if method == "dpo":
        body["data"]["format"] = "preference"
    body.update(spec)
    return {"name": name, "dependsOn": list(depends_on), "spec": body}


def pipeline(*stages: dict[str, Any], **spec: Any) -> Pipeline:
    return Pipeline.model_validate(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": {
                "name": "chat",
                "namespace": "team-a",
                "uid": "uid-1",
                "generation": 1,
                "labels": {KUEUE_QUEUE_LABEL: "gpu-queue", "team": "a"},
            },
            "spec": {"outputRoot": "pvc://models/chat", "stages": list(stages), **spec},
        }
    )


CHAIN = (stage("scratch"), stage("sft", ("scratch",)), stage("dpo", ("sft",), "dpo"))
# base -> (left, right) -> join: left and right are independent branches.
DIAMOND = (
    stage("base"),
    stage("left", ("base",)),
    stage("right", ("base",)),
    stage("join", ("left", "right")),
)


def run(phase: str | None, *, message: str = "", model_uri: str | None = None) -> dict:
    """A stage TrainingRun's status as the TrainingRun operator writes it."""
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
        status["startTime"] = T0
        status["conditions"] = [
            {"type": t, "status": "True" if t == phase else "False", "reason": "R",
             "message": message if t == phase else "", "lastTransitionTime": T0}
            for t in ("Running", "Succeeded", "Failed", "Suspended")
        ]  # fmt: skip
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = T1
    if model_uri:
        status["outputs"] = {"modelUri": model_uri}
    return status


def done(name: str) -> dict:
    return run("Succeeded", model_uri=f"pvc://models/chat/{name}")


def advance(p: Pipeline, runs: dict[str, dict | None], now: str = T1):
    """One reconcile: the plan, with the pipeline carrying the new status for the next."""
    plan = plan_pipeline(p, runs, now=now)
    p.status = plan.status
    return plan


def phases(status: PipelineStatus) -> dict[str, str | None]:
    return {s.name: s.phase for s in status.stages}


def condition(status: PipelineStatus, type_: str):
    return next(c for c in status.conditions if c.type == type_)


# ---------------------------------------------------------------- stage runs


def test_stage_run_is_named_labelled_owned_and_fed_the_upstream_model() -> None:
    p = pipeline(*CHAIN, suspend=True)
    # The model comes from the upstream run's status, not from where it was told to write.
    tr = stage_run(p, "sft", {"scratch": "pvc://elsewhere/scratch-final"})
    assert tr.metadata.name == "chat-sft"
    assert tr.metadata.namespace == "team-a"
    assert tr.metadata.labels == {
        LABEL_PIPELINE: "chat",
        LABEL_STAGE: "sft",
        KUEUE_QUEUE_LABEL: "gpu-queue",
    }
    (owner,) = tr.metadata.model_extra["ownerReferences"]
    assert owner == {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Pipeline",
        "name": "chat",
        "uid": "uid-1",
        "controller": True,
    }
    assert tr.spec.model.name == "pvc://elsewhere/scratch-final"
    assert tr.spec.output == "pvc://models/chat/sft"
    assert tr.spec.suspend is True
    body = tr.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert body["metadata"]["ownerReferences"] == [owner]


def test_stage_run_takes_the_merged_model_of_a_lora_stage() -> None:
    p = pipeline(
        stage("lora", method="lora", lora={"merge": True}),
        stage("dpo", ("lora",), "dpo", model={"fromStage": "lora", "fromStageOutput": "merged"}),
    )
    tr = stage_run(p, "dpo", {"lora": "pvc://models/chat/lora"})
    assert tr.spec.model.name == "pvc://models/chat/lora/merged"


def test_stage_run_refuses_to_start_before_its_upstream_model_exists() -> None:
    with pytest.raises(ValueError, match=r"stage sft: model\.fromStage scratch has no model yet"):
        stage_run(pipeline(*CHAIN), "sft", {})


# ---------------------------------------------------------------- ordering


def test_stages_start_in_dependency_order() -> None:
    p = pipeline(*CHAIN)
    plan = advance(p, {}, now=T0)
    assert plan.ready == ["scratch"]
    assert plan.status.phase == "Pending"
    assert plan.status.progress == "0/3"
    assert plan.status.current_stage == "scratch"
    assert plan.status.start_time == T0
    assert phases(plan.status) == {"scratch": "Pending", "sft": "Pending", "dpo": "Pending"}
    assert plan.status.stages[1].message == "waiting for scratch"

    plan = advance(p, {"scratch": {}})  # created; the TrainingRun operator has not reported
    assert plan.ready == [] and plan.status.phase == "Pending"
    plan = advance(p, {"scratch": run("Running", message="1/1 pods running")})
    assert plan.ready == []
    assert plan.status.phase == "Running" and plan.status.current_stage == "scratch"
    assert plan.status.stages[0].message == "1/1 pods running"
    assert plan.status.stages[0].run_name == "chat-scratch"

    plan = advance(p, {"scratch": done("scratch")})
    assert plan.ready == ["sft"]
    assert plan.status.progress == "1/3" and plan.status.current_stage == "sft"
    assert upstream_model_uris(plan.status) == {"scratch": "pvc://models/chat/scratch"}

    plan = advance(p, {"scratch": done("scratch"), "sft": run("Running")})
    assert plan.ready == []
    plan = advance(p, {"scratch": done("scratch"), "sft": done("sft")})
    assert plan.ready == ["dpo"]


def test_a_succeeded_pipeline_is_ready_and_keeps_its_times() -> None:
    p = pipeline(*CHAIN)
    advance(p, {}, now=T0)
    runs = {name: done(name) for name in ("scratch", "sft", "dpo")}
    plan = advance(p, runs, now=T2)
    status = plan.status
    assert plan.ready == []
    assert status.phase == "Succeeded" and status.progress == "3/3"
    assert status.current_stage is None
    assert status.start_time == T0 and status.completion_time == T2
    assert status.observed_generation == 1
    assert condition(status, "Ready").status == "True"
    assert condition(status, "Succeeded").reason == "Completed"
    assert condition(status, "Failed").status == "False"
    assert [s.model_uri for s in status.stages] == [
        "pvc://models/chat/scratch",
        "pvc://models/chat/sft",
        "pvc://models/chat/dpo",
    ]
    assert status.stages[2].start_time == T0 and status.stages[2].completion_time == T1
    # Later observations change nothing: not the times, not the conditions' transitions.
    again = advance(p, runs, now=T3).status
    assert again.completion_time == T2
    assert condition(again, "Ready").last_transition_time == T2


def test_independent_branches_are_ready_at_once() -> None:
    p = pipeline(*DIAMOND)
    plan = advance(p, {"base": done("base")})
    assert plan.ready == ["left", "right"]
    assert plan.status.current_stage == "left, right"
    plan = advance(p, {"base": done("base"), "left": run("Running"), "right": run("Running")})
    assert plan.ready == [] and plan.status.current_stage == "left, right"
    plan = advance(p, {"base": done("base"), "left": done("left"), "right": run("Running")})
    assert plan.ready == []  # join needs both branches
    assert plan.status.stages[3].message == "waiting for right"
    plan = advance(p, {"base": done("base"), "left": done("left"), "right": done("right")})
    assert plan.ready == ["join"]


def test_a_restarted_operator_creates_nothing_twice() -> None:
    """The plan depends only on what exists, so the same observation gives the same plan."""
    p = pipeline(*DIAMOND)
    runs = {"base": done("base"), "left": {}}  # left was created just before the restart
    first = plan_pipeline(p, runs, now=T1)
    fresh = pipeline(*DIAMOND)  # a new operator knows nothing but the objects
    fresh.status = first.status
    assert first.ready == ["right"]
    assert plan_pipeline(fresh, runs, now=T2).ready == ["right"]
    assert plan_pipeline(pipeline(*DIAMOND), runs, now=T2).ready == ["right"]


# ---------------------------------------------------------------- failures


def test_stop_on_failure_starts_nothing_more_and_fails_once_nothing_runs() -> None:
    p = pipeline(*DIAMOND)
    runs: dict[str, dict | None] = {
        "base": done("base"),
        "left": run("Failed", message="pod chat-left-1-0 exited 78: config error: data.train"),
        "right": run("Running"),
    }
    plan = advance(p, runs)
    assert plan.ready == []
    assert plan.status.phase == "Running"  # right is still training
    assert condition(plan.status, "Running").reason == "StageFailed"
    assert phases(plan.status)["join"] == "Skipped"
    assert "still running: right" in plan.status.conditions[0].message

    runs["right"] = done("right")
    plan = advance(p, runs, now=T2)
    assert plan.status.phase == "Failed"
    assert plan.status.current_stage == "left"
    assert plan.status.completion_time == T2
    failed = condition(plan.status, "Failed")
    assert failed.status == "True" and failed.reason == "StageFailed"
    assert "stage left failed: pod chat-left-1-0 exited 78" in failed.message
    assert "not run: join" in failed.message
    assert plan.status.stages[3].message == "not run: it needs left, which did not succeed"


def test_stop_on_failure_skips_independent_stages_not_yet_started() -> None:
    p = pipeline(*DIAMOND)
    plan = advance(p, {"base": done("base"), "left": run("Failed")})
    assert plan.ready == []
    assert phases(plan.status) == {
        "base": "Succeeded",
        "left": "Failed",
        "right": "Skipped",
        "join": "Skipped",
    }
    assert plan.status.stages[2].message == (
        "not run: stage left failed and the failurePolicy is stopOnFailure"
    )
    assert plan.status.phase == "Failed"


def test_continue_independent_runs_the_other_branch() -> None:
    p = pipeline(*DIAMOND, stage("report", ("right",)), failurePolicy="continueIndependent")
    plan = advance(p, {"base": done("base"), "left": run("Failed")})
    assert plan.ready == ["right"]
    assert plan.status.phase == "Running"
    assert phases(plan.status)["join"] == "Skipped"
    plan = advance(p, {"base": done("base"), "left": run("Failed"), "right": done("right")})
    assert plan.ready == ["report"]
    runs = {"base": done("base"), "left": run("Failed"), "right": done("right")}
    plan = advance(p, {**runs, "report": done("report")})
    assert plan.ready == []
    assert plan.status.phase == "Failed" and plan.status.progress == "3/5"


def test_deleting_a_failed_stage_run_runs_the_stage_again() -> None:
    p = pipeline(*CHAIN)
    assert advance(p, {"scratch": run("Failed")}).status.phase == "Failed"
    plan = advance(p, {"scratch": None}, now=T2)
    assert plan.ready == ["scratch"]
    assert plan.status.phase == "Pending" and plan.status.completion_time is None


# ---------------------------------------------------------------- suspend and edits


def test_suspend_holds_new_stages_and_running_runs() -> None:
    p = pipeline(*CHAIN, suspend=True)
    plan = advance(p, {"scratch": done("scratch")})
    assert plan.ready == []
    assert plan.status.phase == "Suspended"
    assert condition(plan.status, "Suspended").status == "True"
    assert plan.status.stages[1].message == "ready; the pipeline is suspended"

    running = {"spec": {"suspend": False}, "status": run("Running")}
    assert suspend_patch(p, running) == {"spec": {"suspend": True}}
    assert suspend_patch(p, {"spec": {"suspend": True}, "status": run("Running")}) is None
    finished = {"spec": {"suspend": False}, "status": done("scratch")}
    assert suspend_patch(p, finished) is None  # finished runs are never touched

    resumed = pipeline(*CHAIN)
    assert suspend_patch(resumed, {"spec": {"suspend": True}, "status": run("Suspended")}) == {
        "spec": {"suspend": False}
    }
    assert advance(resumed, {"scratch": done("scratch")}).ready == ["sft"]


def test_editing_a_finished_pipeline_reruns_nothing_but_starts_new_stages() -> None:
    runs = {name: done(name) for name in ("scratch", "sft", "dpo")}
    edited = pipeline(
        *CHAIN[:2],
        stage("dpo", ("sft",), "dpo", training={"learningRate": 1e-6}),
        stage("eval", ("dpo",)),
    )
    edited.metadata.generation = 2
    plan = advance(edited, runs)
    assert plan.ready == ["eval"]
    assert plan.status.observed_generation == 2 and plan.status.progress == "3/4"
    unchanged = pipeline(*CHAIN[:2], stage("dpo", ("sft",), "dpo", training={"learningRate": 1e-6}))
    assert advance(unchanged, runs).ready == []


def test_an_invalid_pipeline_is_reported_failed() -> None:
    status = invalid_spec_status(
        None, "dependsOn forms a cycle: a needs b, b needs a", now=T0, generation=3
    )
    assert status["phase"] == "Failed" and status["observedGeneration"] == 3
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "a needs b" in failed["message"]
    PipelineStatus.model_validate(status)


# ---------------------------------------------------------------- promotion gates


def evaluated(metrics: dict[str, float]) -> dict:
    """A succeeded evaluate stage's run status, with the metrics the trainer reported."""
    return {**run("Succeeded"), "outputs": {"metrics": metrics}}


def gated_pipeline(*gates: dict[str, Any], **spec: Any) -> Pipeline:
    evaluate = {
        "name": "eval",
        "dependsOn": ["sft"],
        "spec": {
            "method": "evaluate",
            "model": {"fromStage": "sft"},
            "evaluate": {
                "suites": [
                    {"name": "qa", "data": "pvc://data/qa.jsonl"},
                    {"name": "perplexity", "data": "pvc://data/chat.jsonl"},
                ]
            },
        },
    }
    promote = stage("dpo", ("sft", "eval"), "dpo")
    promote["gate"] = list(gates)
    after = stage("after", ("dpo",))
    side = stage("side", ("sft",))
    return pipeline(stage("sft"), evaluate, promote, after, side, **spec)


@pytest.mark.parametrize(
    ("gate", "metrics", "held"),
    [
        ({"metric": "qa.exact_match", "min": 0.6}, {"qa.exact_match": 0.8}, None),
        ({"metric": "qa.exact_match", "min": 0.6}, {"qa.exact_match": 0.6}, None),
        (
            {"metric": "qa.exact_match", "min": 0.6},
            {"qa.exact_match": 0.25},
            "qa.exact_match of stage eval is 0.25, below the minimum 0.6",
        ),
        (
            {"metric": "perplexity.perplexity", "max": 12},
            {"perplexity.perplexity": 30.5},
            "perplexity.perplexity of stage eval is 30.5, above the maximum 12",
        ),
        (
            {"metric": "perplexity.perplexity", "min": 1, "max": 12},
            {"perplexity.perplexity": 3},
            None,
        ),
        (
            {"metric": "qa.f1", "min": 0.5},
            {"qa.exact_match": 1.0},
            "qa.f1 of stage eval was not reported",
        ),
    ],
)
def test_a_gate_lets_its_stage_start_or_fails_the_pipeline(
    gate: dict[str, Any], metrics: dict[str, float], held: str | None
) -> None:
    spec = gated_pipeline({"stage": "eval", **gate}, failurePolicy="continueIndependent")
    observed = {"sft": run("Succeeded"), "eval": evaluated(metrics), "side": run("Succeeded")}
    plan = plan_pipeline(spec, observed, now=T2)
    stages = {s.name: s for s in plan.status.stages}
    if held is None:
        assert plan.ready == ["dpo"]
        assert stages["dpo"].phase == "Pending" and stages["dpo"].reason is None
        return
    assert plan.ready == []
    assert stages["dpo"].phase == "Skipped" and stages["dpo"].reason == "GateFailed"
    assert held in stages["dpo"].message
    # What needs the held stage does not run either; the pipeline ends Failed, GateFailed.
    assert stages["after"].phase == "Skipped" and "it needs dpo" in stages["after"].message
    assert plan.status.phase == "Failed"
    ready = next(c for c in plan.status.conditions if c.type == "Ready")
    assert ready.reason == "GateFailed" and held in ready.message
    assert stages["eval"].metrics == metrics  # shown side by side in the pipeline's status


def test_a_failed_gate_under_stop_on_failure_starts_nothing_more() -> None:
    spec = gated_pipeline({"stage": "eval", "metric": "qa.exact_match", "min": 0.9})
    observed = {"sft": run("Succeeded"), "eval": evaluated({"qa.exact_match": 0.1})}
    plan = plan_pipeline(spec, observed, now=T2)
    stages = {s.name: s for s in plan.status.stages}
    assert plan.ready == []
    assert stages["side"].phase == "Skipped" and "stopOnFailure" in stages["side"].message
    assert plan.status.phase == "Failed"


def test_a_gate_waits_while_its_evaluation_runs() -> None:
    spec = gated_pipeline({"stage": "eval", "metric": "qa.exact_match", "min": 0.6})
    plan = plan_pipeline(spec, {"sft": run("Succeeded"), "eval": run("Running")}, now=T2)
    stages = {s.name: s for s in plan.status.stages}
    assert stages["dpo"].phase == "Pending" and stages["dpo"].message == "waiting for eval"
    assert plan.status.phase == "Running"


@pytest.mark.parametrize(
    ("gate", "problem"),
    [
        (
            {"stage": "sft", "metric": "qa.exact_match", "min": 1},
            "gate on stage sft, which is method sft; gates read the metrics of evaluate stages",
        ),
        (
            {"stage": "eval", "metric": "summarization.rouge1", "min": 0.2},
            "gate metric summarization.rouge1 is not one stage eval reports",
        ),
        ({"stage": "eval", "metric": "qa.exact_match"}, "a gate needs min, max or both"),
    ],
)
def test_a_gate_that_cannot_be_judged_is_refused(gate: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        gated_pipeline(gate)


def test_a_gate_on_a_stage_not_depended_on_is_refused() -> None:
    spec = gated_pipeline({"stage": "eval", "metric": "qa.exact_match", "min": 1})
    body = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["spec"]["stages"][2]["dependsOn"] = ["sft"]
    with pytest.raises(ValueError, match="gate on stage eval must also be listed in dependsOn"):
        Pipeline.model_validate(body)
