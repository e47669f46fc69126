"""The operator's cluster behaviour that needs no long training: limits, deletion, waiting,
pipelines failing and going away, and its own metrics, on the real control plane.

Deletion is the real garbage collector's work (asynchronous, as on a cluster), a stage
run's failure comes from the real Job controller; the tests only create, delete and look,
as a user would. (Out of memory and the other restart rules: test_e2e_safety_nets.py.)
"""

from __future__ import annotations

import pytest
from e2e_runs import Operator, Runs, answers, tiny_spec
from kubernetes.client.exceptions import ApiException
from polling import wait_for

from kubetrain.api import PIPELINE_PLURAL

pytestmark = pytest.mark.e2e

PRETRAIN = "trainingrun-from-scratch-tiny.yaml"


def long_run(run: str, **changes) -> dict:
    """A run that trains long enough to be looked at while it runs."""
    return tiny_spec(
        PRETRAIN, run, training={"maxSteps": 2000, "saveSteps": 2000, "evalSteps": 2000}, **changes
    )


def test_deleting_a_run_lets_the_garbage_collector_take_its_children(runs: Runs) -> None:
    runs.create("doomed", long_run("doomed"))
    wait_for(lambda: (runs.status("doomed").get("progress") or {}).get("step"), "training", 120)
    namespace = runs.namespace
    assert runs.jobs() == ["doomed-1"]
    assert runs.core.read_namespaced_config_map("doomed-config", namespace)
    runs.delete("doomed")

    def children_gone() -> bool:
        left = [*runs.jobs(), *(p["metadata"]["name"] for p in runs.pods("doomed-1"))]
        left += [
            name
            for read, name in (
                (runs.core.read_namespaced_config_map, "doomed-config"),
                (runs.core.read_namespaced_service, "doomed"),
            )
            if exists(lambda read=read, name=name: read(name, namespace))
        ]
        return not left

    wait_for(children_gone, "the run's Job, pods, ConfigMap and Service to be collected", 120)


def exists(read) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status != 404:
            raise
        return False
    return True


def test_a_missing_secret_keeps_the_run_pending_naming_it(runs: Runs) -> None:
    spec = tiny_spec("trainingrun-sft-tiny.yaml", "gated")
    spec["model"] = {
        "name": "Qwen/Qwen2.5-0.5B",
        "tokenSecretRef": {"name": "hf-token", "key": "token"},
    }
    runs.create("gated", spec)
    # The operator may not read Secrets: it learns of the missing one from the kubelet's
    # CreateContainerConfigError on the pod, and names the field that references it.
    ready = runs.wait_reason("gated", "Ready", "WaitingForDependencies", timeout=120)
    assert ready["message"].startswith(
        f"Secret {runs.namespace}/hf-token (spec.model.tokenSecretRef) does not exist"
    ), ready
    assert runs.status("gated")["phase"] == "Pending" and runs.jobs() == ["gated-1"]


def test_a_failed_stage_stops_the_pipeline_and_deleting_it_deletes_its_runs(runs: Runs) -> None:
    broken = tiny_spec(PRETRAIN, "unused", training={"maxSteps": 10, "evalStrategy": "no"})
    broken.pop("output")
    broken["data"] = {"train": "pvc://datasets/sft-messages.jsonl", "format": "messages"}
    later = tiny_spec("trainingrun-sft-tiny.yaml", "unused", training={"maxSteps": 5})
    later.pop("output")
    later["model"] = {"fromStage": "pretrain"}
    pipeline = {
        "outputRoot": "pvc://models/chain",
        "failurePolicy": "stopOnFailure",
        "stages": [
            {"name": "pretrain", "spec": broken},
            {"name": "sft", "dependsOn": ["pretrain"], "spec": later},
        ],
    }
    runs.create("chain", pipeline, kind="Pipeline")
    status = runs.wait_phase("chain", "Failed", timeout=180, plural=PIPELINE_PLURAL)
    stages = {s["name"]: s for s in status["stages"]}
    assert stages["pretrain"]["phase"] == "Failed"
    assert stages["sft"]["phase"] != "Succeeded"
    names = [
        r["metadata"]["name"]
        for r in runs.custom.list_namespaced_custom_object(
            "kubetrain.dev", "v1alpha1", runs.namespace, "trainingruns"
        )["items"]
    ]
    assert names == ["chain-pretrain"], names

    runs.delete("chain", PIPELINE_PLURAL)
    wait_for(
        lambda: (
            not runs.custom.list_namespaced_custom_object(
                "kubetrain.dev", "v1alpha1", runs.namespace, "trainingruns"
            )["items"]
        ),
        "the stage runs to be collected with their pipeline",
        120,
    )


def test_the_operator_serves_its_metrics_from_its_pod(operator: Operator, runs: Runs) -> None:
    runs.create("counted", long_run("counted"))
    runs.wait_phase("counted", "Running", timeout=120)
    pod = operator.wait_running()

    def scraped() -> str | None:
        text = answers(f"http://{pod.status.pod_ip}:8080/metrics") or ""
        return text if 'kubetrain_trainingruns{phase="Running"} 1.0' in text else None

    text = wait_for(scraped, "the operator's /metrics to count the running run", 60)
    assert "kubetrain_reconcile_duration_seconds" in text
