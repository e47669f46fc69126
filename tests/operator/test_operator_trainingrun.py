"""The real operator (kopf, in a thread) against the emulated API, one lifecycle per test.

Nothing here calls a handler: tests create and edit TrainingRuns through the API, play the
Job controller (`jobs`) and rank 0's metrics (`trainer_metrics`), and watch what the
operator does to the cluster and to the run's status and events.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from typing import Any

import pytest
import requests
from kube_emulator import Cluster
from operator_harness import (
    NAMESPACE,
    JobController,
    OperatorThread,
    TrainerMetricsStub,
    create_shared_claims,
    hold,
    wait_for,
)
from prometheus_client import REGISTRY

from kubetrain.api import GROUP, PLURAL, VERSION, TrainingRunStatus

RUN = "sft-demo"

SPEC: dict[str, Any] = {
    "method": "sft",
    "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
    "data": {"train": "pvc://datasets/alpaca/train.jsonl", "format": "instruction"},
    "training": {"maxSteps": 200, "saveSteps": 20},
    "output": "pvc://models/sft-demo",
    "resources": {"nodes": 2, "procPerNode": 1},
    "restartPolicy": {"maxRestarts": 2},
}


class Runs:
    """TrainingRuns through the API, as kubectl would handle them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def create(self, name: str = RUN, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": copy.deepcopy(spec or SPEC),
        }
        return self.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, body
        )

    def get(self, name: str = RUN) -> dict[str, Any]:
        return self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name
        )

    def status(self, name: str = RUN) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def condition(self, type_: str, name: str = RUN) -> dict[str, Any]:
        for condition in self.status(name).get("conditions", []):
            if condition["type"] == type_:
                return condition
        return {}

    def patch_spec(self, spec: dict[str, Any], name: str = RUN) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str = RUN) -> None:
        self.cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def events(self, name: str = RUN) -> list[str]:
        events = self.cluster.core.list_namespaced_event(NAMESPACE).items
        return [e.message for e in events if e.involved_object.name == name]

    def jobs(self) -> list[str]:
        return sorted(
            j.metadata.name for j in self.cluster.batch.list_namespaced_job(NAMESPACE).items
        )


@pytest.fixture
def runs(k8s_api: Cluster) -> Runs:
    create_shared_claims(k8s_api)
    return Runs(k8s_api)


def phase_is(runs: Runs, phase: str, name: str = RUN) -> Callable[[], bool]:
    return lambda: runs.status(name).get("phase") == phase


def running_run(runs: Runs, jobs: JobController) -> dict[str, Any]:
    """Create the standard run, start its pods, and wait until it is Running."""
    runs.create()
    wait_for(lambda: "sft-demo-1" in runs.jobs(), "Job sft-demo-1")
    jobs.start_pods("sft-demo-1")
    wait_for(phase_is(runs, "Running"), "phase Running")
    return runs.get()


def test_create_makes_owned_children_and_follows_pods_to_running(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    created = runs.create()
    uid = created["metadata"]["uid"]

    job = wait_for(lambda: k8s_api.batch.read_namespaced_job("sft-demo-1", NAMESPACE), "Job")
    config_map = k8s_api.core.read_namespaced_config_map("sft-demo-config", NAMESPACE)
    service = k8s_api.core.read_namespaced_service("sft-demo", NAMESPACE)
    for child in (job, config_map, service):
        (owner,) = child.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller) == (
            "TrainingRun",
            RUN,
            uid,
            True,
        )
    assert job.spec.completions == job.spec.parallelism == 2
    wait_for(lambda: runs.status().get("attempt") == 1, "status.attempt 1")
    status = runs.status()
    assert status["phase"] == "Pending"
    assert status["restarts"] == 0
    assert runs.condition("Ready")["reason"] == "Created"
    created = (
        "Created ConfigMap team-a/sft-demo-config, Service team-a/sft-demo, Job team-a/sft-demo-1"
    )
    wait_for(lambda: created in runs.events(), "one Created event naming the children")

    jobs.start_pods("sft-demo-1")
    wait_for(phase_is(runs, "Running"), "phase Running")
    status = runs.status()
    assert runs.condition("Running")["status"] == "True"
    assert runs.condition("Running")["reason"] == "Training"
    assert runs.condition("Ready")["status"] == "False"
    assert status["startTime"]
    assert status["observedGeneration"] == runs.get()["metadata"]["generation"]


def run_sample(metric: str, name: str = RUN) -> float | None:
    return REGISTRY.get_sample_value(metric, {"namespace": NAMESPACE, "name": name})


def test_progress_and_checkpoint_come_from_rank0_metrics(
    operator: OperatorThread, runs: Runs, jobs: JobController, trainer_metrics: TrainerMetricsStub
) -> None:
    trainer_metrics.set(step=40, total_steps=200, epoch=0.4, loss=1.75, tokens_per_second=1234.5)
    trainer_metrics.set(checkpoint_step=40)
    waits = REGISTRY.get_sample_value("kubetrain_queue_wait_seconds_count") or 0
    firsts = REGISTRY.get_sample_value("kubetrain_time_to_first_step_seconds_count") or 0
    running_run(runs, jobs)

    progress = wait_for(lambda: runs.status().get("progress"), "status.progress")
    assert progress["step"] == 40
    assert progress["totalSteps"] == 200
    assert progress["percent"] == 20
    assert progress["loss"] == 1.75
    assert progress["tokensPerSecond"] == 1234.5
    assert "evalLoss" not in progress  # still NaN in the trainer: no eval yet
    assert runs.status()["latestCheckpoint"] == "pvc://models/sft-demo/checkpoint-40"

    trainer_metrics.set(step=120, eval_loss=1.5, checkpoint_step=120)
    progress = wait_for(
        lambda: (p := runs.status()["progress"])["step"] == 120 and "eta" in p and p, "step 120"
    )
    assert progress["evalLoss"] == 1.5
    assert progress["eta"].endswith("s")
    assert runs.status()["latestCheckpoint"] == "pvc://models/sft-demo/checkpoint-120"
    assert run_sample("kubetrain_run_step") == 120
    assert run_sample("kubetrain_run_loss") == 1.75
    assert run_sample("kubetrain_run_tokens_per_second") == 1234.5
    # Observed once per run: created -> all pods running, created -> first step.
    assert REGISTRY.get_sample_value("kubetrain_queue_wait_seconds_count") == waits + 1
    assert REGISTRY.get_sample_value("kubetrain_time_to_first_step_seconds_count") == firsts + 1


def test_success_sets_outputs_and_ready(
    operator: OperatorThread, runs: Runs, jobs: JobController
) -> None:
    running_run(runs, jobs)
    jobs.succeed("sft-demo-1")

    wait_for(phase_is(runs, "Succeeded"), "phase Succeeded")
    status = runs.status()
    assert status["outputs"] == {"modelUri": "pvc://models/sft-demo"}
    assert status["completionTime"]
    assert runs.condition("Ready")["status"] == "True"
    assert runs.condition("Succeeded")["status"] == "True"
    assert runs.condition("Running")["status"] == "False"
    wait_for(lambda: any(m.startswith("Succeeded") for m in runs.events()), "Succeeded event")
    # Everything written is in the CRD's status schema (a real API server prunes the rest).
    schema_fields = {f.alias or name for name, f in TrainingRunStatus.model_fields.items()}
    assert set(status) <= schema_fields
    TrainingRunStatus.model_validate(status)
    assert runs.jobs() == ["sft-demo-1"]


def test_retriable_failure_starts_the_next_attempt(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    running_run(runs, jobs)
    before = REGISTRY.get_sample_value("kubetrain_restarts_total", {"cause": "Preempted"}) or 0
    old_pods = [p["metadata"]["name"] for p in jobs.pods("sft-demo-1")]

    # SIGTERM from a preemption: the trainer saved a checkpoint and exited 75.
    jobs.terminate_pod("sft-demo-1", 1, exit_code=75, message="preempted: SIGTERM at step 60")

    wait_for(lambda: runs.jobs() == ["sft-demo-2"], "attempt 2 replacing attempt 1")
    status = wait_for(lambda: (s := runs.status()).get("attempt") == 2 and s, "status.attempt 2")
    # A preemption is not the run's fault: it costs none of the restart budget.
    assert status["restarts"] == 0
    assert status["phase"] == "Pending"
    assert status["attempts"][0]["cause"] == "Preempted" and not status["attempts"][0]["counted"]
    live_pods = [p.metadata.name for p in k8s_api.core.list_namespaced_pod(NAMESPACE).items]
    assert not set(old_pods) & set(live_pods), "attempt 1's pods must be gone"
    after = REGISTRY.get_sample_value("kubetrain_restarts_total", {"cause": "Preempted"})
    assert after == before + 1
    wait_for(
        lambda: any(
            "starting attempt 2 (not counted against restartPolicy.maxRestarts)" in m
            for m in runs.events()
        ),
        "a restart event",
    )

    jobs.start_pods("sft-demo-2")
    wait_for(phase_is(runs, "Running"), "attempt 2 Running")


def test_restart_limit_fails_the_run(
    operator: OperatorThread, runs: Runs, jobs: JobController
) -> None:
    runs.create(spec={**SPEC, "restartPolicy": {"maxRestarts": 1}})
    wait_for(lambda: "sft-demo-1" in runs.jobs(), "Job sft-demo-1")
    jobs.start_pods("sft-demo-1")
    jobs.evict_pod("sft-demo-1", 0)  # a disruption: restarted, and free
    wait_for(lambda: runs.jobs() == ["sft-demo-2"], "attempt 2")
    jobs.start_pods("sft-demo-2")
    jobs.terminate_pod("sft-demo-2", 1, exit_code=1, message="ValueError: boom")  # counted
    wait_for(lambda: runs.jobs() == ["sft-demo-3"], "attempt 3")
    jobs.start_pods("sft-demo-3")
    jobs.terminate_pod(
        "sft-demo-3", 0, exit_code=1, message="RuntimeError: NCCL error: unhandled system error"
    )

    wait_for(phase_is(runs, "Failed"), "phase Failed")
    failed = runs.condition("Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "RestartsExhausted"
    assert "NCCL error" in failed["message"]
    assert "maxRestarts (1)" in failed["message"]
    assert runs.status()["restarts"] == 1
    causes = [(a["cause"], a["counted"]) for a in runs.status()["attempts"]]
    assert causes == [("Evicted", False), ("Crashed", True), ("NetworkError", True)]
    hold(lambda: runs.jobs() == ["sft-demo-3"], "no attempt 4 after the limit")


def test_config_error_fails_at_once_with_the_trainers_message(
    operator: OperatorThread, runs: Runs, jobs: JobController
) -> None:
    running_run(runs, jobs)
    message = "config error: /mnt/pvc/datasets/alpaca/train.jsonl line 3: missing field 'output'"
    jobs.terminate_pod("sft-demo-1", 0, exit_code=78, message=message)

    wait_for(phase_is(runs, "Failed"), "phase Failed")
    failed = runs.condition("Failed")
    assert failed["reason"] == "ConfigError"
    assert failed["message"] == message
    assert runs.status()["restarts"] == 0
    hold(lambda: runs.jobs() == ["sft-demo-1"], "no attempt 2 after a config error")
    assert any(message in m for m in runs.events())


def test_suspend_stops_the_pods_and_resume_starts_a_new_attempt(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    running_run(runs, jobs)

    runs.patch_spec({"suspend": True})
    wait_for(phase_is(runs, "Suspended"), "phase Suspended")
    assert runs.jobs() == []
    assert k8s_api.core.list_namespaced_pod(NAMESPACE).items == []
    assert k8s_api.core.read_namespaced_config_map("sft-demo-config", NAMESPACE)
    assert runs.condition("Suspended")["status"] == "True"

    # Edits while suspended are taken by the next attempt.
    runs.patch_spec({"suspend": False, "training": {"maxSteps": 300, "saveSteps": 20}})
    wait_for(lambda: runs.jobs() == ["sft-demo-2"], "attempt 2 after resuming")
    status = wait_for(lambda: (s := runs.status()).get("attempt") == 2 and s, "attempt 2")
    assert status["restarts"] == 0, "a resume is not a restart"
    assert status["phase"] == "Pending"
    config = k8s_api.core.read_namespaced_config_map("sft-demo-config", NAMESPACE)
    assert "maxSteps: 300" in config.data["config.yaml"]
    assert runs.condition("SpecChangeIgnored") == {}


def test_spec_edits_while_running_are_ignored_with_a_condition(
    operator: OperatorThread, runs: Runs, jobs: JobController
) -> None:
    running_run(runs, jobs)
    runs.patch_spec({"resources": {"nodes": 4, "procPerNode": 1}})

    ignored = wait_for(lambda: runs.condition("SpecChangeIgnored"), "SpecChangeIgnored")
    assert ignored["status"] == "True"
    assert "Suspend and resume" in ignored["message"]
    assert runs.status()["observedGeneration"] == 2
    assert runs.status()["phase"] == "Running"

    # A restart keeps the spec the run started with (2 nodes), not the edit (4).
    jobs.terminate_pod("sft-demo-1", 0, exit_code=137, reason="OOMKilled")
    job = wait_for(lambda: jobs.job("sft-demo-2"), "attempt 2")
    assert job["spec"]["parallelism"] == 2


def test_deleting_the_run_deletes_its_children(
    operator: OperatorThread,
    runs: Runs,
    jobs: JobController,
    k8s_api: Cluster,
    trainer_metrics: TrainerMetricsStub,
) -> None:
    trainer_metrics.set(step=5, total_steps=200, loss=2.0)
    running_run(runs, jobs)
    wait_for(lambda: run_sample("kubetrain_run_step") == 5, "per-run metrics")

    runs.delete()

    wait_for(
        lambda: (
            not k8s_api.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)[
                "items"
            ]
        ),
        "the TrainingRun gone",
    )
    assert runs.jobs() == []
    assert k8s_api.core.list_namespaced_pod(NAMESPACE).items == []
    assert k8s_api.core.list_namespaced_config_map(NAMESPACE).items == []
    assert [s.metadata.name for s in k8s_api.core.list_namespaced_service(NAMESPACE).items] == []
    # The claims holding data and outputs are not the run's: they stay.
    claims = k8s_api.core.list_namespaced_persistent_volume_claim(NAMESPACE).items
    assert sorted(c.metadata.name for c in claims) == ["datasets", "models"]
    wait_for(lambda: run_sample("kubetrain_run_step") is None, "per-run metrics removed")


def test_operator_restart_mid_run_makes_no_duplicates(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    running_run(runs, jobs)

    operator.restart()

    # Give the new operator several reconcile intervals to (not) do anything.
    hold(lambda: runs.jobs() == ["sft-demo-1"], "still exactly one Job", seconds=1.5)
    status = runs.status()
    assert (status["attempt"], status["restarts"], status["phase"]) == (1, 0, "Running")
    assert len(k8s_api.core.list_namespaced_pod(NAMESPACE).items) == 2
    assert len(k8s_api.core.list_namespaced_config_map(NAMESPACE).items) == 1
    # One Created event (ConfigMap, Service, Job), none from the new operator.
    assert sum(m.startswith("Created") for m in runs.events()) == 1

    # ... and it still follows the run.
    jobs.succeed("sft-demo-1")
    wait_for(phase_is(runs, "Succeeded"), "phase Succeeded after the restart")


CLAIM = {
    "metadata": {"name": "scratch"},
    "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
}


# A missing Secret is learnt from the pods' CreateContainerConfigError, which only a
# kubelet reports: tests/e2e/test_e2e_operator.py shows it on the real control plane.
def test_a_missing_claim_waits_with_a_condition_naming_it(
    operator: OperatorThread, runs: Runs, k8s_api: Cluster
) -> None:
    runs.create(spec={**SPEC, "output": "pvc://scratch/sft-demo"})
    expected = "PersistentVolumeClaim team-a/scratch (spec.output: pvc://scratch/sft-demo)"

    ready = wait_for(
        lambda: (c := runs.condition("Ready")).get("reason") == "WaitingForDependencies" and c,
        "WaitingForDependencies",
    )
    assert expected in ready["message"]
    assert runs.status()["phase"] == "Pending"
    hold(lambda: runs.jobs() == [], "no Job while it is missing", seconds=0.6)
    warnings = [m for m in runs.events() if expected in m]
    assert len(warnings) == 1, "one event, not one per reconcile"

    k8s_api.core.create_namespaced_persistent_volume_claim(NAMESPACE, CLAIM)
    wait_for(lambda: runs.jobs() == ["sft-demo-1"], "the Job once it exists")


def test_invalid_spec_fails_naming_the_field(operator: OperatorThread, runs: Runs) -> None:
    # The CRD's CEL rules refuse this on a real API server; the emulator admits anything,
    # so this is the operator's own check (e.g. a run admitted by an older CRD).
    runs.create(spec={**SPEC, "model": {}})

    wait_for(phase_is(runs, "Failed"), "phase Failed")
    failed = runs.condition("Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "TrainingRun team-a/sft-demo" in failed["message"]
    assert "model.name" in failed["message"]
    assert runs.jobs() == []

    runs.patch_spec({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}})
    wait_for(lambda: runs.jobs() == ["sft-demo-1"], "the Job once the spec is fixed")


def test_a_new_operator_adopts_children_the_status_does_not_know_of(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    running_run(runs, jobs)
    jobs.terminate_pod("sft-demo-1", 0, exit_code=143)
    wait_for(lambda: runs.jobs() == ["sft-demo-2"], "attempt 2")
    jobs.start_pods("sft-demo-2")
    wait_for(phase_is(runs, "Running"), "attempt 2 Running")
    operator.stop()
    # As if the status was lost (a restore from a backup without status, a replace).
    k8s_api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, RUN, {"status": {"attempt": None, "phase": None}}
    )

    operator.start()

    wait_for(lambda: runs.status().get("attempt") == 2, "attempt 2 adopted")
    wait_for(phase_is(runs, "Running"), "phase Running again")
    hold(lambda: runs.jobs() == ["sft-demo-2"], "the running Job kept, no other")


def test_a_new_operator_finishes_a_restart_the_last_one_began(
    operator: OperatorThread, runs: Runs, jobs: JobController, k8s_api: Cluster
) -> None:
    running_run(runs, jobs)
    operator.stop()
    # As if the last operator died right after deciding on a restart.
    k8s_api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, RUN, {"status": {"attempt": 2, "restarts": 1}}
    )

    operator.start()

    wait_for(lambda: runs.jobs() == ["sft-demo-2"], "attempt 2 replacing attempt 1")
    assert jobs.pods("sft-demo-1") == []
    hold(lambda: runs.status()["restarts"] == 1, "the restart counted once")


def test_jobset_backend_creates_one_owned_jobset(
    operator: OperatorThread, runs: Runs, k8s_api: Cluster
) -> None:
    uid = runs.create(spec={**SPEC, "backend": "jobset"})["metadata"]["uid"]

    jobset = wait_for(
        lambda: k8s_api.custom.get_namespaced_custom_object(
            "jobset.x-k8s.io", "v1alpha2", NAMESPACE, "jobsets", "sft-demo-1"
        ),
        "JobSet sft-demo-1",
    )
    assert jobset["metadata"]["ownerReferences"][0]["uid"] == uid
    assert runs.jobs() == []
    wait_for(lambda: runs.status().get("attempt") == 1, "status.attempt 1")

    k8s_api.custom.patch_namespaced_custom_object_status(
        "jobset.x-k8s.io",
        "v1alpha2",
        NAMESPACE,
        "jobsets",
        "sft-demo-1",
        {
            "status": {
                "conditions": [
                    {
                        "type": "Completed",
                        "status": "True",
                        "reason": "AllJobsCompleted",
                        "message": "jobset completed successfully",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ]
            }
        },
    )
    wait_for(phase_is(runs, "Succeeded"), "phase Succeeded")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_operator_serves_its_metrics_and_liveness(
    k8s_api: Cluster, runs: Runs, trainer_metrics: TrainerMetricsStub
) -> None:
    metrics_port, liveness_port = free_port(), free_port()
    operator = OperatorThread(
        k8s_api,
        trainer_metrics,
        metrics_port=metrics_port,
        liveness_port=liveness_port,
    )
    operator.start()
    try:
        runs.create()
        wait_for(phase_is(runs, "Pending"), "phase Pending")
        assert requests.get(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5).ok
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    finally:
        operator.stop()
    pending = next(
        line
        for line in text.splitlines()
        if line.startswith('kubetrain_trainingruns{phase="Pending"}')
    )
    assert float(pending.split()[-1]) >= 1
    for name in (
        "kubetrain_reconcile_duration_seconds_count",
        "kubetrain_queue_wait_seconds_bucket",
    ):
        assert name in text
