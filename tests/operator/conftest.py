"""Fixtures for the operator tests: an emulated API server, the Job controller, a trainer.

`k8s_api` is a fresh emulated Kubernetes API server per test (kube_emulator.py says what it
emulates and how faithfully), with the CRDs from crds/ installed and the namespaces
`default` and `team-a`. `operator` runs the real operator against it
(`kubetrain.handlers.run_operator`: kopf in a thread, short reconcile interval) with its
metrics scraping pointed at `trainer_metrics`, a stub of rank 0's /metrics; `jobs` plays
the Job controller and the kubelet (operator_harness.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kube_emulator import Cluster, serve_emulator
from operator_harness import NAMESPACE, JobController, OperatorThread, TrainerMetricsStub


@pytest.fixture
def k8s_api() -> Iterator[Cluster]:
    """A fresh emulated API server with kubetrain's CRDs and the test namespace."""
    with serve_emulator(("default", NAMESPACE)) as cluster:
        yield cluster


@pytest.fixture
def trainer_metrics() -> Iterator[TrainerMetricsStub]:
    """Rank 0's /metrics, as the trainer serves it; set values with `.set(step=...)`."""
    stub = TrainerMetricsStub()
    try:
        yield stub
    finally:
        stub.close()


@pytest.fixture
def jobs(k8s_api: Cluster) -> JobController:
    """The Job controller and kubelet, played through the API."""
    return JobController(k8s_api.api, NAMESPACE)


@pytest.fixture
def operator(k8s_api: Cluster, trainer_metrics: TrainerMetricsStub) -> Iterator[OperatorThread]:
    """The kubetrain operator, running against `k8s_api` until the test ends."""
    running = OperatorThread(k8s_api, trainer_metrics)
    running.start()
    try:
        yield running
    finally:
        running.stop()
