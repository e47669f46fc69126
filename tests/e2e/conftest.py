"""Fixtures for the e2e tests: API server, operator and node, all real but the cluster.

`cluster` is the emulated API server of the operator tests (tests/operator/kube_emulator.py)
with kubetrain's CRDs and the namespace `team-a`; `node` runs the pods of the Jobs created
there as local processes (node.py says how, and which liberties it takes), with the claims
`datasets` (holding examples/data) and `models`; `operator` runs the real operator against
`cluster`, reading rank 0's /metrics where `node` put it; `runs` is e2e_runs.Runs over it.
Every test here is marked e2e and runs alone: `pytest -m e2e tests/e2e/<file>::<test>`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The emulated API server and the operator thread are the operator tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from e2e_runs import Runs, create_claim
from example_specs import EXAMPLES
from kube_emulator import Cluster, serve_emulator
from node import Node
from operator_harness import NAMESPACE, OperatorThread


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
    for data in (EXAMPLES / "data").glob("*.jsonl"):
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
