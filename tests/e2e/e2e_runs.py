"""Helpers the cluster tests share: runs through the real API, the operator through Helm.

`Runs` creates and reads TrainingRuns and Pipelines in one namespace as kubectl would (the
admin's credentials), follows a run's statuses through a watch, and finds the pods, logs and
claim folders behind them; `tiny_spec` is a tiny example's spec with its data on the claim
`datasets` and its output on the claim `models`; `install_operator` installs
charts/kubetrain with the real helm binary, and `Operator` stops, starts and reads the
operator's own pod. `wait_for` and `hold` poll for what is expected to happen (or not to
happen), never sleep blindly.
(In a module of its own: `from conftest import` could pick any folder's conftest.py.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3
from cluster import TestCluster
from example_specs import REPO, example, with_spec
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from polling import wait_for

from kubetrain.api import GROUP, PIPELINE_PLURAL, PLURAL, SWEEP_PLURAL, VERSION

sys.path.insert(0, str(REPO / "scripts"))
import fetch_k8s_tools

OPERATOR_NAMESPACE = "kubetrain-system"
OPERATOR_RELEASE = "kubetrain"
# Seconds between the operator's status checks in tests (10 in production).
RECONCILE_INTERVAL_SECONDS = 1
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def answers(url: str) -> str | None:
    """The body at `url`, or None while nothing answers there (yet)."""
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.text if response.ok else None


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


def api_client(cluster: TestCluster) -> k8s_client.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))


class Runs:
    """TrainingRuns and Pipelines in `namespace`, with what the cluster made of them."""

    def __init__(self, cluster: TestCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        api = api_client(cluster)
        self.custom = k8s_client.CustomObjectsApi(api)
        self.core = k8s_client.CoreV1Api(api)
        self.batch = k8s_client.BatchV1Api(api)

    # --- TrainingRuns ------------------------------------------------------------------

    def create(self, name: str, spec: dict[str, Any], kind: str = "TrainingRun") -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": copy.deepcopy(spec),
        }
        plural = {"TrainingRun": PLURAL, "Sweep": SWEEP_PLURAL}.get(kind, PIPELINE_PLURAL)
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def list(self, plural: str = PLURAL) -> list[dict[str, Any]]:
        """Every object of `plural` in the namespace."""
        found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)
        return found["items"]

    def get(self, name: str, plural: str = PLURAL) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )

    def status(self, name: str, plural: str = PLURAL) -> dict[str, Any]:
        return self.get(name, plural).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions", []):
            if condition["type"] == type_:
                return condition
        return {}

    def wait_reason(self, name: str, type_: str, reason: str, timeout: float = 60.0) -> dict:
        """Condition `type_` of run `name` once its reason is `reason`."""

        def reached() -> dict[str, Any] | None:
            condition = self.condition(name, type_)
            return condition if condition.get("reason") == reason else None

        return wait_for(reached, f"{type_} condition with reason {reason} on {name}", timeout)

    def wait_phase(
        self, name: str, phase: str, timeout: float = 180.0, plural: str = PLURAL
    ) -> dict[str, Any]:
        """The status once the object reaches `phase`; fails early if it ends in another."""

        def reached() -> dict[str, Any] | None:
            status = self.status(name, plural)
            ended = status.get("phase") in ("Succeeded", "Failed")
            if ended and status["phase"] != phase:
                raise AssertionError(f"{plural} {name} ended {status['phase']}: {status}")
            return status if status.get("phase") == phase else None

        return wait_for(reached, f"{plural} {self.namespace}/{name} phase {phase}", timeout)

    def patch_spec(self, name: str, spec: dict[str, Any], plural: str = PLURAL) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name, {"spec": spec}
        )

    def delete(self, name: str, plural: str = PLURAL) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    # --- what the cluster made of them -------------------------------------------------

    def events(self, name: str, reason: str | None = None) -> list[str]:
        """Messages of the events about an object (kubectl describe), oldest first; only
        those with `reason` when given."""
        events = self.core.list_namespaced_event(self.namespace).items
        events.sort(key=lambda e: e.metadata.creation_timestamp)
        return [
            e.message
            for e in events
            if e.involved_object.name == name and reason in (None, e.reason)
        ]

    @contextlib.contextmanager
    def statuses(self, name: str) -> Iterator[list[dict[str, Any]]]:
        """Every status TrainingRun `name` has while inside, in order, from a watch: a
        condition that lasts one reconcile pass is in it, where polling can miss it. A CRD
        change restarts the resource's storage, which ends watches: it lists again then."""
        seen: list[dict[str, Any]] = []
        version: str | None = None

        def catch_up() -> None:
            nonlocal version
            listed = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, field_selector=f"metadata.name={name}"
            )
            seen.extend(item.get("status") or {} for item in listed["items"])
            version = listed["metadata"]["resourceVersion"]

        def follow() -> None:
            nonlocal version
            while not stop.is_set():  # short watches, so that leaving ends it soon
                try:
                    if version is None:
                        catch_up()
                    for event in watch.Watch().stream(
                        self.custom.list_namespaced_custom_object,
                        GROUP, VERSION, self.namespace, PLURAL,
                        field_selector=f"metadata.name={name}", resource_version=version,
                        timeout_seconds=2,
                    ):  # fmt: skip
                        seen.append(event["raw_object"].get("status") or {})
                        version = event["raw_object"]["metadata"]["resourceVersion"]
                except ApiException as e:
                    if e.status == 410:  # the storage began anew after `version`
                        version = None
                    elif e.status in (429, 500, 503, 504):  # it is (re)initializing
                        stop.wait(0.5)
                    else:
                        failed.append(e)
                        return
                except urllib3.exceptions.HTTPError:  # the apiserver dropped the watch
                    stop.wait(0.5)
                except Exception as e:  # the watch saw too little: said on leaving
                    failed.append(e)
                    return

        catch_up()
        stop = threading.Event()
        failed: list[Exception] = []
        follower = threading.Thread(target=follow, name=f"statuses-{name}", daemon=True)
        follower.start()
        try:
            yield seen
        finally:
            stop.set()
            follower.join(30)
        if failed:
            raise AssertionError(f"the watch of TrainingRun {name} failed") from failed[0]

    def jobs(self) -> list[str]:
        """Names of the Jobs in the namespace that are not being deleted."""
        return sorted(
            j.metadata.name
            for j in self.batch.list_namespaced_job(self.namespace).items
            if j.metadata.deletion_timestamp is None
        )

    def pods(self, job: str) -> list[dict[str, Any]]:
        answer = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_NAME_LABEL}={job}", _preload_content=False
        )
        return json.loads(answer.data)["items"]

    def log(self, job: str, index: int = 0) -> str:
        """What the container of pod `index` of `job` wrote, even after the pod is gone
        (the kubelet keeps each pod's folder for the session)."""
        return self.cluster.nodes.job_log(self.namespace, job, index)

    def kill(self, job: str, index: int) -> None:
        """Pod `index` of `job`'s container dies at once, every process in it (a crash)."""
        pod = wait_for(
            lambda: next(
                p
                for p in self.pods(job)
                if p["metadata"]["annotations"].get(COMPLETION_INDEX) == str(index)
                and (p.get("status") or {}).get("phase") == "Running"
            ),
            f"a running pod {index} of Job {job}",
        )
        self.cluster.nodes.kill(self.namespace, pod["metadata"]["name"])

    def claim(self, name: str) -> Path:
        """The folder behind claim `name` of this namespace."""
        return self.cluster.claim_folder(self.namespace, name)

    def create_claim(self, name: str) -> Path:
        return self.cluster.create_claim(self.namespace, name)

    def delete_everything(self) -> None:
        """Delete the namespace's runs and pipelines, wait for their pods to stop, then let
        the namespace go (its deletion finishes in the background)."""
        for plural in (PIPELINE_PLURAL, PLURAL):
            for item in self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural
            )["items"]:
                try:
                    self.delete(item["metadata"]["name"], plural)
                except ApiException as e:
                    if e.status != 404:
                        raise
        wait_for(
            lambda: not self.core.list_namespaced_pod(self.namespace).items,
            f"the pods of namespace {self.namespace} to be gone",
            120,
        )
        self.core.delete_namespace(self.namespace)


# --- the operator --------------------------------------------------------------------


def helm(cluster: TestCluster, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(fetch_k8s_tools.tool_path("helm")), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=cluster.plane.env(),
    )
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def install_operator(cluster: TestCluster) -> Operator:
    """helm install charts/kubetrain into a restricted namespace, waiting for the pod."""
    cluster.create_namespace(OPERATOR_NAMESPACE)
    helm(
        cluster,
        "install",
        OPERATOR_RELEASE,
        str(REPO / "charts" / "kubetrain"),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--set",
        f"reconcileIntervalSeconds={RECONCILE_INTERVAL_SECONDS}",
        "--wait",
        "--timeout",
        "3m",
    )
    operator = Operator(cluster)
    operator.wait_running()
    return operator


class Operator:
    """The chart's operator Deployment, as a cluster admin handles it."""

    def __init__(self, cluster: TestCluster) -> None:
        self.cluster = cluster
        api = api_client(cluster)
        self.core = k8s_client.CoreV1Api(api)
        self.apps = k8s_client.AppsV1Api(api)

    def pods(self) -> list[k8s_client.V1Pod]:
        return [
            p
            for p in self.core.list_namespaced_pod(
                OPERATOR_NAMESPACE, label_selector="app.kubernetes.io/component=operator"
            ).items
            if p.metadata.deletion_timestamp is None
        ]

    def wait_running(self) -> k8s_client.V1Pod:
        def running() -> k8s_client.V1Pod | None:
            pods = [p for p in self.pods() if p.status.phase == "Running"]
            return pods[0] if len(pods) == 1 else None

        pod = wait_for(running, "the operator's pod to run", 120)
        # kopf's liveness endpoint answers once the operator runs (the chart's probe).
        wait_for(
            lambda: answers(f"http://{pod.status.pod_ip}:8081/healthz"),
            "the operator's /healthz",
            120,
        )
        return pod

    def log(self, pod: str | None = None) -> str:
        pod = pod or self.pods()[0].metadata.name
        return self.cluster.nodes.pod_log(OPERATOR_NAMESPACE, pod)

    def scale(self, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(
            OPERATOR_RELEASE, OPERATOR_NAMESPACE, {"spec": {"replicas": replicas}}
        )
        if replicas == 0:
            wait_for(
                lambda: (
                    not self.core.list_namespaced_pod(
                        OPERATOR_NAMESPACE, label_selector="app.kubernetes.io/component=operator"
                    ).items
                ),
                "the operator's pod to be gone",
                60,
            )
        else:
            self.wait_running()
