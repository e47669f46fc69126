"""Fixtures for the e2e tests: API server, operator and node, all real but the cluster.

`cluster` is the emulated API server of the operator tests (tests/operator/kube_emulator.py)
with kubetrain's CRDs and the namespace `team-a`; `node` runs the pods of the Jobs created
there as local processes (node.py says how, and which liberties it takes); `operator` runs
the real operator against `cluster`, reading rank 0's /metrics where `node` put it. The
claims `datasets` (holding examples/data) and `models` exist. `Runs` creates and reads
TrainingRuns through the API, as kubectl would; `tiny_spec` is a tiny example's spec with
its data and output on those claims. Every test here is marked e2e and runs alone with
`pytest -m e2e tests/e2e/<file>::<test>`.
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

# The emulated API server and the operator thread are the operator tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kube_emulator import Cluster, serve_emulator
from kubernetes.client.exceptions import ApiException
from node import Node
from operator_harness import NAMESPACE, OperatorThread

from kubetrain.api import GROUP, PLURAL, VERSION

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def tiny_spec(example: str, run: str, **changes: Any) -> dict[str, Any]:
    """The spec of examples/<example> with data on pvc://datasets and output on pvc://models.

    `changes` replace spec fields; dict values are merged one level deep (training: {...}).
    """
    spec = yaml.safe_load((REPO / "examples" / example).read_text())["spec"]
    for key in ("train", "eval"):
        if key in spec["data"]:
            spec["data"][key] = f"pvc://datasets/{Path(spec['data'][key]).name}"
    spec["output"] = f"pvc://models/{run}"
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def wait_for(check: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (ApiException, KeyError, LookupError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw: {last!r}")


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

    def status(self, name: str) -> dict[str, Any]:
        run = self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name
        )
        return run.get("status") or {}

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


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with serve_emulator(("default", NAMESPACE)) as api:
        yield api


@pytest.fixture
def node(cluster: Cluster, tmp_path: Path) -> Iterator[Node]:
    """The node, with the claims datasets (examples/data copied in) and models."""
    running = Node(cluster, NAMESPACE, tmp_path / "node")
    for claim in ("datasets", "models"):
        create_claim(cluster, claim)
    for data in (REPO / "examples" / "data").glob("*.jsonl"):
        shutil.copy(data, running.claim_dir("datasets"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def operator(cluster: Cluster, node: Node) -> Iterator[OperatorThread]:
    running = OperatorThread(cluster, None, metrics_address=node.metrics_address)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def runs(cluster: Cluster, operator: OperatorThread) -> Runs:
    return Runs(cluster)
