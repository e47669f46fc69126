"""The real operator (kopf, in a thread) running Pipelines against the emulated API.

Nothing here calls a handler. Tests create and edit Pipelines through the API and watch the
stage TrainingRuns the operator creates. Those runs are then run the way a cluster runs
them: the same operator's TrainingRun handlers create each run's Job, and the test plays
the Job controller and kubelet (`jobs`: start the pods, let them exit 0, or exit 78 with a
config error), so every stage phase and model URI the pipeline reads was written by the
TrainingRun operator, never by the test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from kube_emulator import Cluster
from operator_harness import (
    NAMESPACE,
    JobController,
    OperatorThread,
    create_shared_claims,
    hold,
    wait_for,
)
from prometheus_client import REGISTRY

from kubetrain.api import GROUP, PIPELINE_PLURAL, PLURAL, VERSION, PipelineStatus

PIPELINE = "chat"
# Three reconcile intervals: long enough for an operator that would act to have acted.
QUIET_SECONDS = 0.75


def stage(name: str, *depends_on: str) -> dict[str, Any]:
    """An sft stage starting from its first dependency's model (else from a hub model)."""
    model = {"fromStage": depends_on[0]} if depends_on else {"name": "Qwen/Qwen2.5-0.5B"}
    spec = {
        "method": "sft",
        "model": model,
        "data": {"train": "pvc://datasets/chat/train.jsonl", "format": "messages"},
        "training": {"maxSteps": 20},
    }
    return {"name": name, "dependsOn": list(depends_on), "spec": spec}


def quiet(check: Callable[[], bool], what: str) -> None:
    """Assert that `check` stays true while the operator has time to do something wrong."""
    hold(check, what, QUIET_SECONDS)


def run_name(stage_name: str) -> str:
    return f"{PIPELINE}-{stage_name}"


class Pipelines:
    """Pipelines and their stage runs through the API, as kubectl would handle them."""

    def __init__(self, cluster: Cluster, jobs: JobController) -> None:
        self.cluster = cluster
        self.jobs = jobs

    # --- the pipeline ---

    def create(self, *stages: dict[str, Any], **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Pipeline",
            "metadata": {"name": PIPELINE, "namespace": NAMESPACE},
            "spec": {"outputRoot": f"pvc://models/{PIPELINE}", "stages": list(stages), **spec},
        }
        return self.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PIPELINE_PLURAL, copy.deepcopy(body)
        )

    def get(self) -> dict[str, Any]:
        return self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PIPELINE_PLURAL, PIPELINE
        )

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def phase_is(self, phase: str) -> bool:
        return self.status().get("phase") == phase

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status()["conditions"] if c["type"] == type_)

    def stages(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.status().get("stages", [])}

    def stage_phases(self) -> dict[str, str]:
        return {name: s.get("phase", "") for name, s in self.stages().items()}

    def patch_spec(self, spec: dict[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PIPELINE_PLURAL, PIPELINE, {"spec": spec}
        )

    def delete(self) -> None:
        self.cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PIPELINE_PLURAL, PIPELINE
        )

    def events(self) -> list[str]:
        events = self.cluster.core.list_namespaced_event(NAMESPACE).items
        return [
            e.message
            for e in events
            if e.involved_object.kind == "Pipeline" and e.involved_object.name == PIPELINE
        ]

    # --- stage runs ---

    def runs(self) -> list[str]:
        """Every TrainingRun in the namespace, by name."""
        listing = self.cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL
        )
        return sorted(r["metadata"]["name"] for r in listing["items"])

    def run(self, stage_name: str) -> dict[str, Any]:
        return self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, run_name(stage_name)
        )

    def run_phase(self, stage_name: str) -> str | None:
        return (self.run(stage_name).get("status") or {}).get("phase")

    def wait_run(self, stage_name: str) -> dict[str, Any]:
        return wait_for(lambda: self.run(stage_name), f"TrainingRun {run_name(stage_name)}")

    def start(self, stage_name: str, attempt: int = 1) -> None:
        """The stage run's pods start (its Job exists once the TrainingRun operator made it)."""
        job = f"{run_name(stage_name)}-{attempt}"
        wait_for(lambda: self.jobs.job(job), f"Job {job}")
        self.jobs.start_pods(job)
        wait_for(lambda: self.run_phase(stage_name) == "Running", f"{job} Running")

    def succeed(self, stage_name: str, attempt: int = 1) -> None:
        """The stage's trainer finishes; its TrainingRun reports Succeeded with its model."""
        self.jobs.succeed(f"{run_name(stage_name)}-{attempt}")
        wait_for(lambda: self.run_phase(stage_name) == "Succeeded", f"{stage_name} Succeeded")

    def fail(self, stage_name: str) -> None:
        """The stage's trainer exits with a config error: its TrainingRun fails at once."""
        self.jobs.terminate_pod(
            f"{run_name(stage_name)}-1", 0, exit_code=78, message="config error: bad data"
        )
        wait_for(lambda: self.run_phase(stage_name) == "Failed", f"{stage_name} Failed")

    def finish(self, stage_name: str) -> None:
        self.start(stage_name)
        self.succeed(stage_name)


@pytest.fixture
def pipelines(k8s_api: Cluster, jobs: JobController) -> Pipelines:
    create_shared_claims(k8s_api)
    return Pipelines(k8s_api, jobs)


# base -> (left, right) -> join: left and right are independent branches.
DIAMOND = (
    stage("base"),
    stage("left", "base"),
    stage("right", "base"),
    stage("join", "left", "right"),
)


def test_stages_start_in_dependency_order_side_by_side_and_hand_on_their_models(
    operator: OperatorThread, pipelines: Pipelines
) -> None:
    uid = pipelines.create(*DIAMOND)["metadata"]["uid"]

    base = pipelines.wait_run("base")
    assert base["metadata"]["labels"] == {
        "kubetrain.dev/pipeline": PIPELINE,
        "kubetrain.dev/stage": "base",
    }
    (owner,) = base["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Pipeline",
        PIPELINE,
        uid,
        True,
    )
    quiet(lambda: pipelines.runs() == [run_name("base")], "no stage starts before base succeeds")
    assert pipelines.stages()["left"]["message"] == "waiting for base"

    pipelines.finish("base")
    # Both branches get their runs at once and train side by side.
    left, right = pipelines.wait_run("left"), pipelines.wait_run("right")
    base_model = pipelines.run("base")["status"]["outputs"]["modelUri"]
    assert left["spec"]["model"]["name"] == right["spec"]["model"]["name"] == base_model
    pipelines.start("left")
    pipelines.start("right")
    both_running = {"base": "Succeeded", "left": "Running", "right": "Running", "join": "Pending"}
    wait_for(lambda: pipelines.stage_phases() == both_running, "both branches running")
    assert pipelines.status()["currentStage"] == "left, right"
    assert pipelines.phase_is("Running")

    pipelines.succeed("left")
    quiet(lambda: run_name("join") not in pipelines.runs(), "join waits for right as well")
    pipelines.succeed("right")
    join = pipelines.wait_run("join")
    assert join["spec"]["model"]["name"] == pipelines.run("left")["status"]["outputs"]["modelUri"]
    pipelines.finish("join")

    wait_for(lambda: pipelines.phase_is("Succeeded"), "pipeline Succeeded")
    status = pipelines.status()
    assert [s["name"] for s in status["stages"]] == ["base", "left", "right", "join"]
    for name, entry in pipelines.stages().items():
        run_status = pipelines.run(name)["status"]
        assert entry["phase"] == "Succeeded"
        assert entry["runName"] == run_name(name)
        assert entry["startTime"] == run_status["startTime"]
        assert entry["completionTime"] == run_status["completionTime"]
        assert entry["modelUri"] == run_status["outputs"]["modelUri"] == f"pvc://models/chat/{name}"
    assert status["progress"] == "4/4"
    assert status["startTime"] and status["completionTime"]
    assert status["observedGeneration"] == pipelines.get()["metadata"]["generation"]
    assert pipelines.condition("Ready")["status"] == "True"
    assert pipelines.condition("Reconciling")["status"] == "False"
    # Everything written is in the CRD's status schema (a real API server prunes the rest).
    fields = {f.alias or name for name, f in PipelineStatus.model_fields.items()}
    assert set(status) <= fields
    PipelineStatus.model_validate(status)
    assert pipelines.runs() == sorted(run_name(s["name"]) for s in DIAMOND)
    events = wait_for(
        lambda: [m for m in pipelines.events() if m.startswith("Succeeded")] and pipelines.events(),
        "Succeeded event",
    )
    assert sum(m.startswith("Created TrainingRun") for m in events) == 4
    assert REGISTRY.get_sample_value("kubetrain_pipelines", {"phase": "Succeeded"}) >= 1


# x -> x2 and y -> y2: two independent branches; x fails while y still runs.
BRANCHES = (stage("x"), stage("x2", "x"), stage("y"), stage("y2", "y"))


@pytest.mark.parametrize(
    ("policy", "y2_runs"), [("stopOnFailure", False), ("continueIndependent", True)]
)
def test_a_failed_stage_stops_the_rest_or_only_what_needs_it(
    operator: OperatorThread, pipelines: Pipelines, policy: str, y2_runs: bool
) -> None:
    pipelines.create(*BRANCHES, failurePolicy=policy)
    pipelines.wait_run("x")
    pipelines.wait_run("y")
    pipelines.start("x")
    pipelines.start("y")
    pipelines.fail("x")

    # The running branch finishes either way; a failure never stops a running stage.
    wait_for(lambda: pipelines.stage_phases()["x"] == "Failed", "stage x Failed")
    assert pipelines.phase_is("Running")
    assert pipelines.condition("Ready")["reason"] == "StageFailed"
    assert pipelines.stage_phases()["x2"] == "Skipped"
    pipelines.succeed("y")

    if y2_runs:
        pipelines.wait_run("y2")
        pipelines.finish("y2")
    else:
        quiet(lambda: run_name("y2") not in pipelines.runs(), "no stage starts after a failure")
    wait_for(lambda: pipelines.phase_is("Failed"), "pipeline Failed")
    assert pipelines.runs() == sorted(run_name(s) for s in ("x", "y", "y2")[: 3 if y2_runs else 2])
    assert pipelines.stage_phases() == {
        "x": "Failed",
        "x2": "Skipped",
        "y": "Succeeded",
        "y2": "Succeeded" if y2_runs else "Skipped",
    }
    failed = pipelines.condition("Failed")
    assert (failed["status"], failed["reason"]) == ("True", "StageFailed")
    assert failed["message"].startswith("stage x failed: config error: bad data")
    assert pipelines.condition("Stalled")["status"] == "True"
    assert pipelines.status()["currentStage"] == "x"
    skipped = pipelines.stages()["x2"]["message"]
    assert skipped == "not run: it needs x, which did not succeed"
    if not y2_runs:
        assert "stopOnFailure" in pipelines.stages()["y2"]["message"]


def test_an_operator_restart_mid_pipeline_duplicates_nothing(
    operator: OperatorThread, pipelines: Pipelines, k8s_api: Cluster
) -> None:
    pipelines.create(stage("a"), stage("b", "a"))
    first = pipelines.wait_run("a")
    pipelines.start("a")

    operator.stop()
    # While no operator runs, stage a's trainer finishes (the Job controller goes on).
    pipelines.jobs.succeed(run_name("a") + "-1")
    operator.start()

    pipelines.wait_run("b")
    pipelines.finish("b")
    wait_for(lambda: pipelines.phase_is("Succeeded"), "pipeline Succeeded")
    assert pipelines.runs() == [run_name("a"), run_name("b")]
    assert pipelines.run("a")["metadata"]["uid"] == first["metadata"]["uid"]
    jobs = sorted(j.metadata.name for j in k8s_api.batch.list_namespaced_job(NAMESPACE).items)
    assert jobs == ["chat-a-1", "chat-b-1"]

    def created() -> list[str]:
        return sorted(m for m in pipelines.events() if m.startswith("Created TrainingRun"))

    wait_for(lambda: len(created()) >= 2, "Created events")
    assert created() == [
        f"Created TrainingRun {NAMESPACE}/chat-a for stage a",
        f"Created TrainingRun {NAMESPACE}/chat-b for stage b",
    ]


def test_suspend_propagates_to_unfinished_stage_runs(
    operator: OperatorThread, pipelines: Pipelines
) -> None:
    pipelines.create(stage("done"), stage("a"), stage("b", "a"))
    pipelines.wait_run("a")
    pipelines.finish("done")
    pipelines.start("a")

    pipelines.patch_spec({"suspend": True})
    wait_for(lambda: pipelines.run_phase("a") == "Suspended", "stage run a Suspended")
    wait_for(lambda: pipelines.phase_is("Suspended"), "pipeline Suspended")
    assert pipelines.condition("Suspended")["status"] == "True"
    assert pipelines.run("a")["spec"]["suspend"] is True
    # A finished stage is never touched: its result stays as it was.
    assert pipelines.run("done")["spec"]["suspend"] is False
    assert pipelines.run_phase("done") == "Succeeded"

    pipelines.patch_spec({"suspend": False})
    # The run resumes as a new attempt (from its newest checkpoint) and the pipeline goes on.
    pipelines.start("a", attempt=2)
    wait_for(lambda: pipelines.phase_is("Running"), "pipeline Running again")
    pipelines.succeed("a", attempt=2)
    assert pipelines.wait_run("b")["spec"]["suspend"] is False


def test_editing_a_finished_pipeline_creates_nothing_new(
    operator: OperatorThread, pipelines: Pipelines
) -> None:
    pipelines.create(stage("a"))
    pipelines.wait_run("a")
    pipelines.finish("a")
    wait_for(lambda: pipelines.phase_is("Succeeded"), "pipeline Succeeded")
    before = pipelines.run("a")

    edited = stage("a")
    edited["spec"]["training"]["maxSteps"] = 500
    pipelines.patch_spec({"stages": [edited, stage("b", "a")]})
    wait_for(lambda: pipelines.status()["observedGeneration"] == 2, "generation 2 observed")
    quiet(lambda: pipelines.runs() == [run_name("a")], "no stage runs again, none is added")
    after = pipelines.run("a")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"] == before["spec"]
    assert pipelines.phase_is("Succeeded")


def test_an_invalid_pipeline_fails_naming_its_stages_until_fixed(
    operator: OperatorThread, pipelines: Pipelines
) -> None:
    # The CRD's CEL cannot see a cycle, so the API server takes this pipeline.
    pipelines.create(stage("a", "b"), stage("b", "a"))

    wait_for(lambda: pipelines.phase_is("Failed"), "pipeline Failed")
    failed = pipelines.condition("Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "dependsOn forms a cycle" in failed["message"]
    assert "a needs b" in failed["message"] and "b needs a" in failed["message"]
    assert pipelines.condition("Stalled")["status"] == "True"
    wait_for(
        lambda: any("dependsOn forms a cycle" in m for m in pipelines.events()), "a Warning event"
    )
    quiet(lambda: pipelines.runs() == [], "an invalid pipeline creates nothing")

    pipelines.patch_spec({"stages": [stage("a"), stage("b", "a")]})
    pipelines.wait_run("a")
    wait_for(lambda: pipelines.phase_is("Pending"), "pipeline Pending")
    assert pipelines.condition("Ready")["reason"] == "StagesPending"


def test_a_run_holding_a_stages_name_is_left_alone(
    operator: OperatorThread, pipelines: Pipelines, k8s_api: Cluster
) -> None:
    foreign = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": run_name("a"), "namespace": NAMESPACE},
        "spec": {**stage("a")["spec"], "output": "pvc://models/mine", "suspend": True},
    }
    k8s_api.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, foreign)
    pipelines.create(stage("a"))

    wait_for(
        lambda: "is not this pipeline's" in pipelines.stages()["a"].get("message", ""),
        "stage a saying its name is taken",
    )
    quiet(lambda: not pipelines.run("a")["metadata"].get("ownerReferences"), "no adoption")
    assert pipelines.run("a")["spec"]["output"] == "pvc://models/mine"

    k8s_api.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "chat-a")
    wait_for(lambda: pipelines.run("a")["metadata"].get("ownerReferences"), "the stage's own run")


def test_deleting_the_pipeline_deletes_its_runs(
    operator: OperatorThread, pipelines: Pipelines, k8s_api: Cluster
) -> None:
    pipelines.create(stage("a"), stage("b"))
    pipelines.wait_run("a")
    pipelines.wait_run("b")
    pipelines.start("a")

    # Owner references do it; the emulated API server collects garbage as Kubernetes does.
    pipelines.delete()
    wait_for(lambda: pipelines.runs() == [], "stage runs deleted")
    wait_for(lambda: not k8s_api.batch.list_namespaced_job(NAMESPACE).items, "Jobs deleted")
    assert not k8s_api.custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PIPELINE_PLURAL
    )["items"]
