"""What the operator tests run besides the API server: the operator, Job controller, trainer.

`OperatorThread` runs the real operator (`kubetrain.handlers.run_operator`) in a thread
against an emulated API server, and can restart it. `JobController` does, through the API
and nothing else, what kube-controller-manager's Job controller and the kubelet would: it
creates an Indexed Job's pods (named, labelled, annotated and owned as Kubernetes does),
moves them through phases with container states (exit codes, termination messages, OOM
kills, evictions) and sets the Job's conditions.
`TrainerMetricsStub` serves rank 0's /metrics with the `kubetrain_trainer_*` gauges,
rendered by prometheus-client exactly as the trainer renders them. `wait_for` and `hold`
poll the API for what the operator is expected to do (or not to do) within a few intervals.
"""

from __future__ import annotations

import datetime
import http.server
import json
import secrets
import threading
from collections.abc import Sequence
from typing import Any

from kube_emulator import Cluster
from kubernetes import client as k8s_client
from polling import hold, wait_for  # noqa: F401 (the operator tests import them from here)
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kubetrain import k8s
from kubetrain.handlers import run_operator

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The namespace the operator tests put their TrainingRuns in.
NAMESPACE = "team-a"
# Seconds between the operator's status checks in tests (10 in production).
RECONCILE_INTERVAL = 0.25


def create_shared_claims(cluster: Cluster, names: Sequence[str] = ("datasets", "models")) -> None:
    """The claims the standard specs mount, as an admin would have made them."""
    for claim in names:
        cluster.core.create_namespaced_persistent_volume_claim(
            NAMESPACE,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            },
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _raw(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


class JobController:
    """Plays the Job controller and the kubelet for the Jobs the operator creates."""

    def __init__(self, api: k8s_client.ApiClient, namespace: str) -> None:
        self.core = k8s_client.CoreV1Api(api)
        self.batch = k8s_client.BatchV1Api(api)
        self.namespace = namespace

    def job(self, name: str) -> dict[str, Any]:
        return _raw(self.batch.read_namespaced_job(name, self.namespace, _preload_content=False))

    def pods(self, job_name: str) -> list[dict[str, Any]]:
        return _raw(
            self.core.list_namespaced_pod(
                self.namespace,
                label_selector=f"batch.kubernetes.io/job-name={job_name}",
                _preload_content=False,
            )
        )["items"]

    def pod(self, job_name: str, index: int) -> dict[str, Any]:
        for pod in self.pods(job_name):
            if pod["metadata"]["annotations"][COMPLETION_INDEX] == str(index):
                return pod
        raise LookupError(f"no pod with index {index} for Job {job_name}")

    def start_pods(
        self, job_name: str, pod_ip: str = "127.0.0.1", finalizers: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Create the Job's pods, one per completion index, and run them.

        `finalizers` hold each pod in the API after its deletion until removed (the e2e
        node keeps a pod there while its process terminates, as a kubelet would).
        """
        job = self.job(job_name)
        template = job["spec"]["template"]
        pods = []
        for index in range(job["spec"]["completions"]):
            labels = {
                **template["metadata"].get("labels", {}),
                "batch.kubernetes.io/job-name": job_name,
                "job-name": job_name,
                "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                "controller-uid": job["metadata"]["uid"],
                COMPLETION_INDEX: str(index),
            }
            spec = {**template["spec"], "hostname": f"{job_name}-{index}"}
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job_name}-{index}-{secrets.token_hex(3)[:5]}",
                    "namespace": self.namespace,
                    "labels": labels,
                    "annotations": {COMPLETION_INDEX: str(index)},
                    "finalizers": list(finalizers),
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": job_name,
                            "uid": job["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": spec,
            }
            pod = _raw(
                self.core.create_namespaced_pod(self.namespace, body, _preload_content=False)
            )
            self._set_pod_status(
                pod,
                {
                    "phase": "Running",
                    "podIP": pod_ip,
                    "startTime": _now(),
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "ready": True,
                            "restartCount": 0,
                            "image": spec["containers"][0]["image"],
                            "imageID": "",
                            "state": {"running": {"startedAt": _now()}},
                        }
                    ],
                },
            )
            pods.append(pod)
        self._set_job_status(job_name, {"active": len(pods), "ready": len(pods)})
        return pods

    def terminate_pod(
        self,
        job_name: str,
        index: int,
        *,
        exit_code: int,
        message: str = "",
        reason: str = "Error",
        pod_reason: str | None = None,
        disruption: str | None = None,
    ) -> None:
        """End one pod's trainer container; with backoffLimit 0 a failure fails the Job."""
        pod = self.pod(job_name, index)
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}
        if message:
            terminated["message"] = message
        status: dict[str, Any] = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": False,
                    "restartCount": 0,
                    "image": "trainer",
                    "imageID": "",
                    "state": {"terminated": terminated},
                }
            ],
        }
        if pod_reason:
            status["reason"] = pod_reason
        if disruption:
            status["conditions"] = [
                {"type": "DisruptionTarget", "status": "True", "reason": disruption}
            ]
        self._set_pod_status(pod, status)
        if exit_code != 0:
            self.fail_job(job_name, "BackoffLimitExceeded", "Job has reached the backoff limit")

    def evict_pod(self, job_name: str, index: int) -> None:
        """The kubelet evicts a pod under node pressure (no container exit of its own)."""
        pod = self.pod(job_name, index)
        self._set_pod_status(
            pod,
            {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "TerminationByKubelet",
                    }
                ],
            },
        )
        self.fail_job(job_name, "BackoffLimitExceeded", "Job has reached the backoff limit")

    def succeed(self, job_name: str) -> None:
        """Every pod exits 0 and the Job completes."""
        job = self.job(job_name)
        for index in range(job["spec"]["completions"]):
            self.terminate_pod(job_name, index, exit_code=0, reason="Completed")
        self._set_job_status(
            job_name,
            {
                "active": 0,
                "ready": 0,
                "succeeded": job["spec"]["completions"],
                "completionTime": _now(),
                "conditions": [
                    self._condition("SuccessCriteriaMet", "CompletionsReached"),
                    self._condition("Complete", "CompletionsReached"),
                ],
            },
        )

    def fail_job(self, job_name: str, reason: str, message: str) -> None:
        self._set_job_status(
            job_name,
            {
                "active": 0,
                "failed": 1,
                "conditions": [
                    self._condition("FailureTarget", reason, message),
                    self._condition("Failed", reason, message),
                ],
            },
        )

    @staticmethod
    def _condition(type_: str, reason: str, message: str = "") -> dict[str, Any]:
        return {
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": _now(),
            "lastTransitionTime": _now(),
        }

    def _set_pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            pod["metadata"]["name"], self.namespace, {"status": status}, _preload_content=False
        )

    def _set_job_status(self, job_name: str, status: dict[str, Any]) -> None:
        """Set the Job's status, as the Job controller would; a Job the operator has
        deleted meanwhile (it reacts to the pod's failure first) has none to set."""
        try:
            self.batch.patch_namespaced_job_status(
                job_name, self.namespace, {"status": status}, _preload_content=False
            )
        except k8s_client.exceptions.ApiException as e:
            if e.status != 404:
                raise


class TrainerMetricsStub:
    """A tiny HTTP server standing in for rank 0's :9400/metrics."""

    GAUGES = (
        "step",
        "total_steps",
        "epoch",
        "loss",
        "eval_loss",
        "tokens_per_second",
        "checkpoint_step",
    )

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {
            name: Gauge(f"kubetrain_trainer_{name}", name, registry=self.registry)
            for name in self.GAUGES
        }
        for name in ("loss", "eval_loss", "tokens_per_second", "checkpoint_step"):
            self.gauges[name].set(float("nan"))  # as the trainer starts them
        self.requests = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests += 1
                body = generate_latest(stub.registry)
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self.gauges[name].set(value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OperatorThread:
    """The real operator (kopf), run in a thread against the emulated API."""

    def __init__(
        self, cluster: Cluster, metrics: TrainerMetricsStub | None, **options: Any
    ) -> None:
        self.cluster = cluster
        self.metrics = metrics
        # run_operator's options; by default no metrics server, no liveness endpoint and
        # every pod's /metrics at the stub (the e2e tests pass their node's metrics_address).
        self.options = {"metrics_port": None, "liveness_port": None, **options}
        if metrics is not None:
            self.options.setdefault("metrics_address", lambda pod: ("127.0.0.1", metrics.port))
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        self.stop_flag = threading.Event()
        ready = threading.Event()

        def run() -> None:
            try:
                run_operator(
                    [NAMESPACE],
                    reconcile_interval=RECONCILE_INTERVAL,
                    api_server=self.cluster.url,
                    standalone=True,
                    stop_flag=self.stop_flag,
                    ready_flag=ready,
                    **self.options,
                )
            except BaseException as e:  # shown by stop(), so a crash fails the test
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=run, name="kubetrain-operator", daemon=True)
        self.thread.start()
        assert ready.wait(20), "the operator did not start within 20s"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the operator did not stop within 20s"
        self.thread = None
        k8s.configure(None)  # forget this API server: it goes away with the test
        if self.error is not None:
            raise self.error

    def restart(self) -> None:
        self.stop()
        self.start()
