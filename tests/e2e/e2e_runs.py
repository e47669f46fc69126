"""Helpers the e2e tests share: TrainingRuns through the API, tiny specs on the claims.

`Runs` creates and reads TrainingRuns in namespace team-a as kubectl would; `tiny_spec`
is a tiny example's spec with its data on the claim `datasets` and its output on the claim
`models`; `create_claim` makes a PersistentVolumeClaim as an admin would.
(In a module of its own: `from conftest import` could pick any folder's conftest.py.)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from example_specs import example, with_spec
from kube_emulator import Cluster
from operator_harness import NAMESPACE, wait_for

from kubetrain.api import GROUP, PLURAL, VERSION


def tiny_spec(example_name: str, run: str, **changes: Any) -> dict[str, Any]:
    """The spec of examples/<example_name> with data on pvc://datasets, output on pvc://models.

    `changes` replace spec fields; dict values are merged one level deep (training: {...}).
    """
    doc = example(example_name)
    data = doc["spec"]["data"]
    for key in ("train", "eval"):
        if key in data:
            data[key] = f"pvc://datasets/{Path(data[key]).name}"
    return with_spec(doc, output=f"pvc://models/{run}", **changes)["spec"]


class Runs:
    """TrainingRuns in namespace team-a, through the API."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": copy.deepcopy(spec),
        }
        self.cluster.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions", []):
            if condition["type"] == type_:
                return condition
        return {}

    def wait_phase(self, name: str, phase: str, timeout: float = 180.0) -> dict[str, Any]:
        """The status once the run reaches `phase`; fails early if it ends in another."""

        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            ended = status.get("phase") in ("Succeeded", "Failed")
            if ended and status["phase"] != phase:
                raise AssertionError(f"TrainingRun {name} ended {status['phase']}: {status}")
            return status if status.get("phase") == phase else None

        return wait_for(reached, f"TrainingRun {name} phase {phase}", timeout)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": spec}
        )

    def events(self, name: str) -> list[str]:
        """Messages of the events about a run (kubectl describe), oldest first."""
        events = self.cluster.core.list_namespaced_event(NAMESPACE).items
        return [e.message for e in events if e.involved_object.name == name]

    def jobs(self) -> list[str]:
        return sorted(
            j.metadata.name for j in self.cluster.batch.list_namespaced_job(NAMESPACE).items
        )


def create_claim(cluster: Cluster, name: str) -> None:
    """A PersistentVolumeClaim, as an admin would make it (the node backs it by a folder)."""
    cluster.core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
