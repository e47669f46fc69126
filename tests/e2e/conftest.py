"""Fixtures of the cluster tier: one real control plane per test session, a namespace per test.

`cluster` starts tests/cluster's TestCluster once: etcd, kube-apiserver (RBAC, PodSecurity,
OwnerReferencesPermissionEnforcement), kube-controller-manager, kube-scheduler, JobSet and
two process kubelets. `operator` installs charts/kubetrain with the real helm binary; the
operator runs as the chart's Deployment pod, with the chart's ServiceAccount and RBAC.
`namespace` is a fresh namespace labelled PodSecurity `restricted` with the claims
`datasets` (holding examples/data) and `models`; `runs` is e2e_runs.Runs in it.
`s3_server` here is the real S3 server of tests/s3_server.py listening on the pod network's
gateway as well as loopback, so pods reach it at `s3_server.endpoint_for_pods`.
Every test here is marked e2e and runs alone: `pytest -m e2e tests/e2e/<file>::<test>`.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from cluster import TestCluster
from e2e_runs import Operator, Runs, install_operator
from example_specs import EXAMPLES
from s3_server import S3Server

_names = itertools.count(1)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    if os.geteuid() != 0:
        pytest.fail("the cluster tier needs root: the process kubelet gives pods namespaces")
    logging.getLogger("kubelet").setLevel(logging.INFO)
    running = TestCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def s3_server(cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """tests/conftest.py's S3 server, also on the pod network's gateway: the one address of
    this machine a pod's network namespace reaches (the bridge this session made)."""
    server = S3Server(tmp_path_factory.mktemp("s3"), pod_gateway=cluster.network.gateway)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def operator(cluster: TestCluster) -> Operator:
    return install_operator(cluster)


@pytest.fixture
def namespace(
    cluster: TestCluster, operator: Operator, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A namespace of its own for each test, with the claims datasets and models."""
    name = f"t{next(_names)}-{request.node.name.split('[')[0].removeprefix('test_')[:40]}".replace(
        "_", "-"
    ).rstrip("-")
    cluster.create_namespace(name)
    datasets = cluster.create_claim(name, "datasets")
    for data in (EXAMPLES / "data").glob("*.jsonl"):
        shutil.copy(data, datasets)
    cluster.create_claim(name, "models")
    yield name
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # Shown with the failure: the objects, the pods' logs, what the kubelets and the
        # operator said of this namespace, and the stacks of processes that still run.
        print(cluster.failure_report(name, operator_log=operator_log(operator)))
    Runs(cluster, name).delete_everything()
    cluster.check_alive()


def operator_log(operator: Operator) -> str:
    try:
        return "\n".join(operator.log(pod.metadata.name) for pod in operator.pods())
    except (LookupError, OSError) as e:  # the operator's pod is gone (a test scaled it)
        return f"(no operator log: {e})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)  # the namespace fixture reads rep_call
    return report


@pytest.fixture
def runs(cluster: TestCluster, namespace: str) -> Runs:
    return Runs(cluster, namespace)
