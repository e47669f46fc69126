"""The emulated API server (conftest.FaithfulEmulator) behaves as the operator expects.

These pin the gaps the fixture fills in kmock, so a kmock upgrade that changes them
shows up here rather than as a puzzling operator test failure.
"""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import Cluster, labels_match
from kubernetes.client.exceptions import ApiException
from operator_harness import NAMESPACE

from kubetrain.api import GROUP, PLURAL, VERSION


def config_map(name: str, labels: dict[str, str] | None = None, owner: Any = None) -> dict:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": owner.kind or "ConfigMap",
                "name": owner.metadata.name,
                "uid": owner.metadata.uid,
            }
        ]
    return {"metadata": meta, "data": {"k": "v"}}


def job(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "c", "image": "i"}], "restartPolicy": "Never"}
            }
        },
        "status": {"active": 9},
    }


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("app=a", True),
        ("app==a", True),
        ("app!=a", False),
        ("app in (a, b)", True),
        ("app notin (a,b)", False),
        ("tier", True),
        ("!tier", False),
        ("app=a,tier=x", True),
        ("app=a,tier=y", False),
        ("missing!=x", True),
        ("missing", False),
    ],
)
def test_label_selectors(selector: str, matches: bool) -> None:
    assert labels_match({"app": "a", "tier": "x"}, selector) is matches


def test_metadata_is_assigned_and_generation_follows_the_spec(k8s_api: Cluster) -> None:
    created = k8s_api.batch.create_namespaced_job(NAMESPACE, job("j"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation == 1
    assert created.status is None, "create ignores status (status subresource)"

    labelled = k8s_api.batch.patch_namespaced_job(
        "j", NAMESPACE, {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled.metadata.generation == 1
    assert int(labelled.metadata.resource_version) > int(created.metadata.resource_version)
    resized = k8s_api.batch.patch_namespaced_job("j", NAMESPACE, {"spec": {"parallelism": 3}})
    assert resized.metadata.generation == 2

    status = k8s_api.batch.patch_namespaced_job_status(
        "j", NAMESPACE, {"status": {"active": 1}, "spec": {"parallelism": 9}}
    )
    assert (status.status.active, status.spec.parallelism) == (1, 3)


def test_create_twice_is_a_conflict(k8s_api: Cluster) -> None:
    k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("a"))
    with pytest.raises(ApiException) as raised:
        k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("a"))
    assert raised.value.status == 409


def test_a_stale_resource_version_is_a_conflict(k8s_api: Cluster) -> None:
    created = k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("a"))
    k8s_api.core.patch_namespaced_config_map("a", NAMESPACE, {"data": {"k": "2"}})
    with pytest.raises(ApiException) as raised:
        k8s_api.core.patch_namespaced_config_map(
            "a",
            NAMESPACE,
            {"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {}},
        )
    assert raised.value.status == 409


def test_lists_filter_by_label_selector(k8s_api: Cluster) -> None:
    k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("a", {"run": "x"}))
    k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("b", {"run": "y"}))
    listed = k8s_api.core.list_namespaced_config_map(NAMESPACE, label_selector="run=y")
    assert [c.metadata.name for c in listed.items] == ["b"]


def test_generate_name(k8s_api: Cluster) -> None:
    for _ in range(2):
        k8s_api.core.create_namespaced_config_map(
            NAMESPACE, {"metadata": {"generateName": "ev-"}, "data": {}}
        )
    names = [c.metadata.name for c in k8s_api.core.list_namespaced_config_map(NAMESPACE).items]
    assert len(names) == 2 and all(n.startswith("ev-") for n in names)


@pytest.mark.parametrize(
    ("policy", "pods_left"), [(None, 1), ("Orphan", 1), ("Background", 0), ("Foreground", 0)]
)
def test_deleting_a_job_collects_its_pods_by_policy(
    k8s_api: Cluster, policy: str | None, pods_left: int
) -> None:
    owner = k8s_api.batch.create_namespaced_job(NAMESPACE, job("j"))
    owner.kind = "Job"
    pod = config_map("j-0", owner=owner)
    pod["spec"] = {"containers": [{"name": "c", "image": "i"}]}
    pod.pop("data")
    k8s_api.core.create_namespaced_pod(NAMESPACE, pod)

    kwargs = {"propagation_policy": policy} if policy else {}
    k8s_api.batch.delete_namespaced_job("j", NAMESPACE, **kwargs)

    pods = k8s_api.core.list_namespaced_pod(NAMESPACE).items
    assert len(pods) == pods_left
    if pods:  # orphaned: the reference to the gone owner is dropped, as Kubernetes does
        assert not pods[0].metadata.owner_references


def test_garbage_collection_cascades_and_spares_objects_with_a_live_owner(
    k8s_api: Cluster,
) -> None:
    root = k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("root"))
    other = k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("other"))
    child = k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("child", owner=root))
    k8s_api.core.create_namespaced_config_map(NAMESPACE, config_map("grandchild", owner=child))
    shared = config_map("shared", owner=root)
    shared["metadata"]["ownerReferences"] += config_map("x", owner=other)["metadata"][
        "ownerReferences"
    ]
    k8s_api.core.create_namespaced_config_map(NAMESPACE, shared)

    k8s_api.core.delete_namespaced_config_map("root", NAMESPACE)

    left = sorted(c.metadata.name for c in k8s_api.core.list_namespaced_config_map(NAMESPACE).items)
    assert left == ["other", "shared"]


def test_custom_resources_refuse_strategic_merge_patches(k8s_api: Cluster) -> None:
    k8s_api.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": "r"},
            "spec": {},
        },
    )
    with pytest.raises(ApiException) as raised:
        k8s_api.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            PLURAL,
            "r",
            {"spec": {"a": 1}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert raised.value.status == 415
    patched = k8s_api.custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "r", {"spec": {"a": 1}}
    )
    assert patched["metadata"]["generation"] == 2
