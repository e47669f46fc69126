"""What only a real cluster shows: admission, refusals, queues, garbage collection, dead nodes.

The finalizers grant is proved by OwnerReferencesPermissionEnforcement itself; refusals by
a ValidatingAdmissionPolicy (422) and a ResourceQuota (403) of the real apiserver; a queue's
preemption by suspending the Job as Kueue does, with the real Job controller stopping its
pods; name collisions by the real garbage collector taking its time; a dead node by a frozen
process kubelet, whose pod the Job controller and garbage collector leave Terminating until
the operator force-deletes it.
"""

from __future__ import annotations

import json

import pytest
from cluster import TestCluster
from e2e_runs import COMPLETION_INDEX, OPERATOR_NAMESPACE, OPERATOR_RELEASE, Runs, tiny_spec
from kubelet import CAPACITY
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from polling import hold, wait_for

pytestmark = pytest.mark.e2e

PRETRAIN = "trainingrun-from-scratch-tiny.yaml"
OPERATOR_ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_RELEASE}"


def short_run(run: str, training: dict | None = None, **changes) -> dict:
    steps = {"maxSteps": 30, "saveSteps": 30, "evalSteps": 30, **(training or {})}
    return tiny_spec(PRETRAIN, run, training=steps, **changes)


def config_map_owned_by(run: dict, owner_uid: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "probe",
            "ownerReferences": [
                {
                    "apiVersion": run["apiVersion"],
                    "kind": "TrainingRun",
                    "name": run["metadata"]["name"],
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }


def test_blocking_owner_deletion_is_admitted_through_the_finalizers_grant(
    cluster: TestCluster, runs: Runs, namespace: str
) -> None:
    runs.create("owned", short_run("owned"))
    run = runs.get("owned")
    probe = json.dumps(config_map_owned_by(run, run["metadata"]["uid"]))
    create = ("create", "--dry-run=server", "-n", namespace, "-f", "-")
    # The chart's ServiceAccount may: it can update trainingruns/finalizers.
    allowed = cluster.kubectl(*create, f"--as={OPERATOR_ACCOUNT}", input=probe, check=False)
    assert allowed.returncode == 0, allowed.stderr
    can = cluster.kubectl(
        "auth", "can-i", "update", "trainingruns.kubetrain.dev", "--subresource=finalizers",
        f"--as={OPERATOR_ACCOUNT}", "-n", namespace, check=False,
    )  # fmt: skip
    assert can.stdout.strip() == "yes"
    # An account that may create ConfigMaps but not update the finalizers may not.
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "stranger"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "configmaps"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "stranger-configmaps"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "configmaps",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "stranger", "namespace": namespace}
                ],
            },
        ],
        namespace=namespace,
    )
    stranger = f"system:serviceaccount:{namespace}:stranger"
    refused = cluster.kubectl(*create, f"--as={stranger}", input=probe, check=False)
    assert refused.returncode != 0
    assert "cannot set blockOwnerDeletion" in refused.stderr, refused.stderr
    # And the operator's own children carry it: the run trains.
    runs.wait_phase("owned", "Succeeded", timeout=240)
    job = runs.batch.read_namespaced_job("owned-1", namespace)
    assert job.metadata.owner_references[0].block_owner_deletion is True
    # A finished run never re-creates children deleted by hand (or by a TTL controller),
    # and keeps its verdict and restart count.
    before = runs.status("owned")
    runs.batch.delete_namespaced_job("owned-1", namespace, propagation_policy="Foreground")
    runs.core.delete_namespaced_config_map("owned-config", namespace)
    wait_for(lambda: runs.jobs() == [], "the Job deleted by hand to be gone", 60)
    hold(lambda: runs.jobs() == [], "no Job re-created for a finished run", seconds=5)
    after = runs.status("owned")
    assert (after["phase"], after["restarts"], after["attempt"]) == (
        before["phase"], before["restarts"], before["attempt"]
    )  # fmt: skip


def refusing_policy(namespace: str) -> list[dict]:
    """A ValidatingAdmissionPolicy that refuses every Job in `namespace` (HTTP 422)."""
    name = f"no-jobs-{namespace}"
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["batch"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["jobs"],
                        }
                    ]
                },
                "validations": [
                    {"expression": "false", "message": "Jobs are not allowed here (e2e policy)"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]


def job_probe(namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "probe", "namespace": namespace},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox"}],
                    }
                }
            },
        }
    )


def test_a_child_the_apiserver_refuses_fails_the_run_with_the_apiservers_message(
    cluster: TestCluster, runs: Runs, namespace: str
) -> None:
    cluster.apply(refusing_policy(namespace))
    try:
        # The policy takes effect once the apiserver has compiled it.
        wait_for(
            lambda: "e2e policy" in cluster.kubectl(
                "create", "--dry-run=server", "-f", "-", input=job_probe(namespace), check=False
            ).stderr,
            "the admission policy to refuse Jobs",
            60,
        )  # fmt: skip
        runs.create("refused", short_run("refused"))
        failed = runs.wait_reason("refused", "Ready", "InvalidSpec")
        assert runs.status("refused")["phase"] == "Failed"
        assert f"Job {namespace}/refused-1" in failed["message"], failed
        assert "Jobs are not allowed here (e2e policy)" in failed["message"], failed
        assert any("e2e policy" in e for e in runs.events("refused"))
    finally:
        for document in refusing_policy(namespace):
            cluster.kubectl("delete", document["kind"], document["metadata"]["name"])


def test_a_quota_refusal_waits_with_the_reason_and_goes_on_once_it_is_lifted(
    cluster: TestCluster, runs: Runs, namespace: str
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    cluster.apply(quota, namespace=namespace)
    runs.create("quota", short_run("quota"))
    waiting = runs.wait_reason("quota", "Ready", "Forbidden")
    assert runs.status("quota")["phase"] == "Pending"
    assert f"Job {namespace}/quota-1" in waiting["message"], waiting
    assert "quota" in waiting["message"], waiting
    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", namespace)
    runs.wait_phase("quota", "Succeeded", timeout=240)


def test_a_pod_stuck_terminating_on_a_dead_node_is_force_deleted_and_the_run_goes_on(
    cluster: TestCluster, runs: Runs, namespace: str
) -> None:
    # Each pod asks for more than half a node's cpu, so the real scheduler puts the two
    # ranks on two nodes: one node can die while the other reports the crash.
    cpu = str(int(CAPACITY["cpu"]) // 2 + 1)
    spec = short_run(
        "stuck",
        training={"maxSteps": 300, "saveSteps": 300, "evalSteps": 300},  # still training
        resources={"nodes": 2, "requests": {"cpu": cpu}},
        restartPolicy={"forceDeleteAfterSeconds": 5},
    )
    runs.create("stuck", spec)
    # Both ranks train (the data is tokenized: no rank holds the cache's lock).
    wait_for(
        lambda: (runs.status("stuck").get("progress") or {}).get("step"), "a training step", 240
    )
    ranks = {p["metadata"]["annotations"][COMPLETION_INDEX]: p for p in runs.pods("stuck-1")}
    pod, node = ranks["1"]["metadata"]["name"], ranks["1"]["spec"]["nodeName"]
    assert ranks["0"]["spec"]["nodeName"] != node, ranks
    kubelet = next(k for k in cluster.nodes.kubelets if k.name == node)
    with runs.statuses("stuck") as seen:
        kubelet.freeze()  # rank 1's node stops answering; its container runs on
        try:
            runs.kill("stuck-1", 0)  # rank 0 crashes: the attempt fails, its pods are deleted
            wait_for(
                lambda: runs.core.read_namespaced_pod(pod, namespace).metadata.deletion_timestamp,
                "rank 1's pod to be deleted",
                120,
            )
            # Its deletionTimestamp is 300s ahead (the rendered grace period, which its node
            # would cut short by confirming the stop). A second delete may shorten the grace
            # (never lengthen it): the deadline passes in a second instead of five minutes.
            runs.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=1)
            wait_for(lambda: _pod_gone(runs, pod), "the operator to force-delete rank 1's pod", 120)
            held = kubelet.pods[namespace, pod]  # the dead node still holds its container
        finally:
            kubelet.thaw()
    stuck = [
        c["message"]
        for status in seen
        for c in status.get("conditions", [])
        if c["type"] == "Ready" and c["reason"] == "PodsStuckTerminating"
    ]
    assert stuck and f"pod(s) {pod} on node(s) {node} are still terminating" in stuck[0], seen
    forced = runs.events("stuck", reason="ForceDeleted")
    assert forced and f"Force-deleted pod {namespace}/{pod}" in forced[0], runs.events("stuck")
    # Back, the node lets go of the pod deleted meanwhile: its processes are killed.
    wait_for(lambda: (namespace, pod) not in kubelet.pods, "the node to release the pod", 60)
    assert not held.running()
    status = runs.wait_phase("stuck", "Succeeded", timeout=300)
    assert (status["attempt"], status["restarts"]) == (2, 1)


def test_the_crd_refuses_what_the_apiserver_would_refuse_on_the_pods(
    cluster: TestCluster, namespace: str
) -> None:
    bad_resources = [
        ({"nodes": 1, "requests": {"nvidia.com/gpu": "1"}}, "nvidia.com/gpu"),
        ({"nodes": 1, "tolerations": [{"key": "gpu", "operator": "Exists", "value": "a"}]},
         "tolerations"),
    ]  # fmt: skip
    for resources, field in bad_resources:
        spec = short_run("bad", resources=resources)
        run = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun"}
        document = {**run, "metadata": {"name": "bad", "namespace": namespace}, "spec": spec}
        refused = cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", input=json.dumps(document), check=False
        )
        assert refused.returncode != 0, resources
        assert field in refused.stderr and "spec.resources" in refused.stderr, refused.stderr


def test_a_queue_suspending_the_job_costs_no_restart(runs: Runs) -> None:
    long = {"maxSteps": 400, "saveSteps": 50, "evalSteps": 400}
    runs.create("queued", short_run("queued", training=long))
    runs.wait_phase("queued", "Running", timeout=120)
    # What Kueue does to preempt a workload: suspend it; the Job controller stops the pods.
    runs.batch.patch_namespaced_job("queued-1", runs.namespace, {"spec": {"suspend": True}})
    queued = runs.wait_reason("queued", "Ready", "Queued", timeout=120)
    assert runs.status("queued")["restarts"] == 0, queued
    wait_for(lambda: not runs.pods("queued-1"), "the suspended Job's pods to be gone", 120)
    runs.batch.patch_namespaced_job("queued-1", runs.namespace, {"spec": {"suspend": False}})
    status = runs.wait_phase("queued", "Succeeded", timeout=300)
    assert (status["attempt"], status["restarts"]) == (1, 0)
    assert runs.jobs() == ["queued-1"]


def test_a_claim_two_nodes_cannot_share_is_named_until_it_can(runs: Runs, namespace: str) -> None:
    runs.cluster.create_claim(namespace, "solo", access_modes=("ReadWriteOnce",))
    spec = short_run("pair", resources={"nodes": 2})
    runs.create("pair", {**spec, "output": "pvc://solo/pair"})
    waiting = runs.wait_reason("pair", "Ready", "WaitingForDependencies")
    assert (
        f"PersistentVolumeClaim {namespace}/solo (spec.output: pvc://solo/pair)"
        in (waiting["message"])
    )
    assert "ReadWriteMany" in waiting["message"]
    assert runs.jobs() == []


def test_a_recreated_run_does_not_adopt_the_deleted_runs_children(
    runs: Runs, namespace: str
) -> None:
    core = runs.core
    runs.create(
        "again", short_run("again", training={"maxSteps": 400, "saveSteps": 400, "evalSteps": 400})
    )
    runs.wait_phase("again", "Running", timeout=120)
    # The old children linger while the garbage collector works, as under load: an admin's
    # finalizer holds the ConfigMap until the new run has been created.
    hold_it = {"metadata": {"finalizers": ["e2e.kubetrain.dev/hold"]}}
    core.patch_namespaced_config_map("again-config", namespace, hold_it)
    old_uid = runs.get("again")["metadata"]["uid"]
    runs.delete("again")
    wait_for(lambda: _gone(runs, "again"), "the old run to be gone", 120)
    runs.create("again", short_run("again"))
    new_uid = runs.get("again")["metadata"]["uid"]
    waiting = runs.wait_reason("again", "Ready", "Restarting")
    assert "garbage-collected" in waiting["message"] and old_uid in waiting["message"], waiting
    # Release it: a JSON patch, as a strategic merge patch merges finalizer lists (an empty
    # list there would remove nothing); the garbage collector's deletion then completes.
    release = [{"op": "remove", "path": "/metadata/finalizers"}]
    core.patch_namespaced_config_map("again-config", namespace, release)
    wait_for(lambda: _gone_config_map(core, namespace, old_uid), "the old ConfigMap to go", 60)
    config_map = wait_for(
        lambda: core.read_namespaced_config_map("again-config", namespace),
        "the new run's own ConfigMap",
        60,
    )
    assert config_map.metadata.owner_references[0].uid == new_uid
    runs.wait_phase("again", "Succeeded", timeout=240)


def test_a_config_map_of_that_name_held_by_another_is_named(runs: Runs, namespace: str) -> None:
    runs.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "taken-config"}, "data": {"mine": "yes"}}
    )
    runs.create("taken", short_run("taken"))
    waiting = runs.wait_reason("taken", "Ready", "NameTaken")
    assert f"ConfigMap {namespace}/taken-config already exists" in waiting["message"], waiting
    assert runs.jobs() == []
    assert runs.core.read_namespaced_config_map("taken-config", namespace).data == {"mine": "yes"}


def _pod_gone(runs: Runs, pod: str) -> bool:
    try:
        runs.core.read_namespaced_pod(pod, runs.namespace)
    except ApiException as e:
        return e.status == 404
    return False


def _gone(runs: Runs, name: str) -> bool:
    try:
        runs.get(name)
    except ApiException as e:
        return e.status == 404
    return False


def _gone_config_map(core: k8s_client.CoreV1Api, namespace: str, owner_uid: str) -> bool:
    try:
        config_map = core.read_namespaced_config_map("again-config", namespace)
    except ApiException as e:
        return e.status == 404
    return all(ref.uid != owner_uid for ref in config_map.metadata.owner_references or [])
