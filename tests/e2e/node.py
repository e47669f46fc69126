"""The node of the e2e tests: runs the pods of the operator's Jobs as local processes.

There is no kubelet here. `Node` polls the emulated API and does, through the API, what the
Job controller, the kubelet and the container runtime would: it creates each Job's pods
(with `JobController` from tests/operator), runs each pod's container command as a local
process with the pod's environment, reports exit codes and termination messages as pod
status, fails the Job when a pod fails (backoffLimit 0: the rest of the gang is deleted) or
completes it when all pods exit 0, and on a pod's deletion sends SIGTERM to its main
process and, after the grace period (capped for tests), SIGKILLs all it started. A
finalizer keeps a pod in the API until its process is gone, and its Job until its pods
are, as a cluster keeps terminating pods and a Job deleted with propagationPolicy
Foreground: the operator sees old gangs linger. For a JobSet it plays the JobSet
controller first: one Indexed Job per replicated job, named as JobSet names them, and
the JobSet's Completed or Failed condition from theirs.

One machine is not a cluster, so the node takes these liberties, and only these:
- volumes are local folders: a claim is `<root>/pvc/<claim>` (shared, like ReadWriteMany),
  an emptyDir a folder of the pod's own, a ConfigMap files written out. Pod paths under a
  mount are rewritten to the local folder in the command, in env values and in the string
  values of a mounted YAML file (the TrainerConfig); in the termination message read back,
  local folders become the pod's paths again;
- the pods share 127.0.0.1: env values naming a pod of the Job by DNS
  (`<job>-<index>.<subdomain>`) become 127.0.0.1, and each port the container declares gets
  a free host port per Job, replacing env values equal to it and `...Port` settings in a
  mounted YAML file (only rank 0 listens on the rendezvous and metrics ports, so a gang
  never collides); `metrics_address(pod)` tells the operator where rank 0's /metrics is;
- the image is this Python environment: PATH leads to it, the trainer Dockerfile's ENV is
  set, HF_HUB_OFFLINE=1 (no internet), KUBETRAIN_TERMINATION_LOG (the trainer's override of
  /dev/termination-log) names a file of the pod's own, and OMP_NUM_THREADS gives each pod
  its share of the CPUs, as if it had a node of its own.
Nothing else (securityContext, resources, readOnly) is enforced. Only tests import this.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from kube_emulator import Cluster
from kubernetes.client.exceptions import ApiException
from operator_harness import COMPLETION_INDEX, JobController

log = logging.getLogger(__name__)

NODE_FINALIZER = "e2e.kubetrain.dev/node"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TERMINATION_LOG_ENV = "KUBETRAIN_TERMINATION_LOG"
# The trainer image's ENV (trainer_image/Dockerfile).
IMAGE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
    "HF_HOME": "/tmp/hf-home",
}
# Pods ask for 300s to checkpoint a large model after SIGTERM; a tiny one needs a second.
GRACE_CAP_SECONDS = 20.0
POLL_SECONDS = 0.1

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"

Mounts = list[tuple[str, Path]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def map_path(value: str, mounts: Mounts) -> str:
    """A pod path under one of `mounts` (longest first) as its local folder's path."""
    for mount, local in mounts:
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount) :]
    return value


def localize_yaml(value: Any, mounts: Mounts, ports: dict[int, int], key: str = "") -> Any:
    """A mounted YAML document with pod paths and declared ports made local."""
    if isinstance(value, dict):
        return {k: localize_yaml(v, mounts, ports, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [localize_yaml(v, mounts, ports, key) for v in value]
    if isinstance(value, str):
        return map_path(value, mounts)
    if type(value) is int and key.lower().endswith("port"):
        return ports.get(value, value)
    return value


@dataclass
class PodProcess:
    """One pod's container: a local process and all it starts, files in `folder`."""

    job: str
    index: int
    pod: str
    folder: Path  # holds `log` (stdout and stderr), `termination-log` and the volumes
    mounts: Mounts
    popen: subprocess.Popen
    sigterm_at: float | None = None
    exit_code: int | None = None  # set once the exit is reported

    def termination_message(self) -> str:
        path = self.folder / "termination-log"
        text = path.read_text() if path.is_file() else ""
        for mount, local in self.mounts:  # say what the pod would have said
            text = text.replace(str(local), mount)
        return text


class Node:
    """Runs the pods of every Job in `namespace` on this machine (see the module doc)."""

    def __init__(self, cluster: Cluster, namespace: str, root: Path) -> None:
        self.root = root
        self.namespace = namespace
        self.jobs = JobController(cluster.api, namespace)
        self.jobsets = cluster.custom
        self.jobset_path = (*JOBSET_API.split("/"), namespace, "jobsets")
        self.processes: dict[tuple[str, int], PodProcess] = {}  # by Job and pod index
        self.ports: dict[str, dict[int, int]] = {}  # by Job: container port -> host port
        self.jobsets_started: set[str] = set()
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    # --- what tests call ---------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="e2e-node", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop following the API and SIGKILL every process still running."""
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(30)
        for process in self.processes.values():
            self._kill_container(process)
            process.popen.wait(30)
        if self.error is not None:
            raise self.error

    def claim_dir(self, claim: str) -> Path:
        """The local folder behind PersistentVolumeClaim `claim`."""
        folder = self.root / "pvc" / claim
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def metrics_address(self, pod: dict[str, Any]) -> tuple[str, int]:
        """Where the pod's container port named `metrics` is (the operator's metrics_address)."""
        ports = self.ports[pod["metadata"]["labels"][JOB_NAME_LABEL]]
        for port in pod["spec"]["containers"][0].get("ports", []):
            if port.get("name") == "metrics":
                return "127.0.0.1", ports[port["containerPort"]]
        raise LookupError(f"pod {pod['metadata']['name']} declares no port named metrics")

    def log(self, job: str, index: int = 0) -> str:
        """What the pod's container wrote to stdout and stderr."""
        return (self.processes[job, index].folder / "log").read_text(errors="replace")

    def kill(self, job: str, index: int) -> None:
        """The pod's container dies at once, every process in it (a crash, an OOM kill)."""
        self._kill_container(self.processes[job, index])

    # --- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stop_flag.wait(POLL_SECONDS):
            try:
                self.sync()
            except Exception as e:
                if isinstance(e, ApiException) and e.status in (404, 409):
                    continue  # an object went away or changed under us: look again
                log.exception("the e2e node failed")
                self.error = e  # stop() raises it, so it fails the test
                return

    def sync(self) -> None:
        """One look at the API and at the processes, acting on what changed."""
        jobs = self._items(self.jobs.batch.list_namespaced_job)
        for job in jobs:
            meta = job["metadata"]
            if meta.get("deletionTimestamp"):
                self._delete_job(job)
            elif meta["name"] not in self.ports and not job["spec"].get("suspend"):
                self._start_job(job)
        self._sync_jobsets(jobs)
        pods = {p["metadata"]["name"]: p for p in self._items(self.jobs.core.list_namespaced_pod)}
        for process in list(self.processes.values()):
            pod = pods.get(process.pod)
            if process.exit_code is None and process.popen.poll() is not None:
                self._report_exit(process, pod)
            if pod is not None and pod["metadata"].get("deletionTimestamp"):
                self._terminate(process, pod)

    def _items(self, list_call: Any) -> list[dict[str, Any]]:
        return json.loads(list_call(self.namespace, _preload_content=False).data)["items"]

    # --- the Job controller ------------------------------------------------------------

    def _start_job(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        self.ports[name] = {p["containerPort"]: free_port() for p in container.get("ports", [])}
        self._hold("Job", job, held=True)
        for pod in self.jobs.start_pods(name, finalizers=[NODE_FINALIZER]):
            self._start_process(job, pod)

    def _report_exit(self, process: PodProcess, pod: dict[str, Any] | None) -> None:
        code = process.popen.returncode
        process.exit_code = code if code >= 0 else 128 - code  # killed by N: 128 + N
        log.info("pod %s exited %d", process.pod, process.exit_code)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return  # a deleted pod's status is nobody's concern any more
        if process.exit_code == 0:
            self.jobs.terminate_pod(process.job, process.index, exit_code=0, reason="Completed")
            gang = [p for p in self.processes.values() if p.job == process.job]
            completions = self.jobs.job(process.job)["spec"]["completions"]
            if len(gang) == completions and all(p.exit_code == 0 for p in gang):
                self.jobs.succeed(process.job)
            return
        # With backoffLimit 0 one failed pod fails the Job, which deletes the others.
        self.jobs.terminate_pod(
            process.job,
            process.index,
            exit_code=process.exit_code,
            message=process.termination_message(),
        )
        for other in self.processes.values():
            if other.job == process.job and other.exit_code is None:
                self._delete_pod(other.pod)

    def _delete_job(self, job: dict[str, Any]) -> None:
        """A Job being deleted: delete its pods, and let it go once they are gone."""
        name = job["metadata"]["name"]
        pods = self.jobs.pods(name)
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp"):
                self._delete_pod(pod["metadata"]["name"])
        if not pods:
            self._hold("Job", job, held=False)

    def _delete_pod(self, name: str) -> None:
        try:
            self.jobs.core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    def _hold(self, kind: str, obj: dict[str, Any], *, held: bool) -> None:
        """Add (held) or remove the node's finalizer on a Pod, Job or JobSet."""
        finalizers = obj["metadata"].get("finalizers") or []
        if (NODE_FINALIZER in finalizers) == held:
            return
        others = [f for f in finalizers if f != NODE_FINALIZER]
        body = {"metadata": {"finalizers": [*others, NODE_FINALIZER] if held else others}}
        name = obj["metadata"]["name"]
        if kind == "Pod":
            self.jobs.core.patch_namespaced_pod(name, self.namespace, body)
        elif kind == "Job":
            self.jobs.batch.patch_namespaced_job(name, self.namespace, body)
        else:
            self.jobsets.patch_namespaced_custom_object(*self.jobset_path, name, body)

    # --- the JobSet controller ---------------------------------------------------------

    def _sync_jobsets(self, jobs: list[dict[str, Any]]) -> None:
        """One Indexed Job per replicated job; the JobSet fails or completes with them."""
        for jobset in self.jobsets.list_namespaced_custom_object(*self.jobset_path)["items"]:
            meta = jobset["metadata"]
            children = [
                j for j in jobs if j["metadata"]["labels"].get(JOBSET_LABEL) == meta["name"]
            ]
            if meta.get("deletionTimestamp"):
                for child in children:  # their pods go first, then they, then the JobSet
                    if not child["metadata"].get("deletionTimestamp"):
                        self.jobs.batch.delete_namespaced_job(
                            child["metadata"]["name"],
                            self.namespace,
                            propagation_policy="Background",
                        )
                if not children:
                    self._hold("JobSet", jobset, held=False)
            elif meta["name"] not in self.jobsets_started and not jobset["spec"].get("suspend"):
                self._start_jobset(jobset)
            elif children:
                self._jobset_status(jobset, children)

    def _start_jobset(self, jobset: dict[str, Any]) -> None:
        meta, spec = jobset["metadata"], jobset["spec"]
        self.jobsets_started.add(meta["name"])
        self._hold("JobSet", jobset, held=True)
        owner = {"apiVersion": JOBSET_API, "kind": "JobSet", "name": meta["name"]}
        for replicated in spec["replicatedJobs"]:
            for index in range(replicated.get("replicas", 1)):
                job = copy.deepcopy(replicated["template"])
                # Pods are <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>.
                job["spec"]["template"]["spec"]["subdomain"] = spec["network"]["subdomain"]
                job["metadata"] = {
                    "name": f"{meta['name']}-{replicated['name']}-{index}",
                    "labels": {**job["metadata"]["labels"], JOBSET_LABEL: meta["name"]},
                    "ownerReferences": [{**owner, "uid": meta["uid"], "controller": True}],
                }
                self.jobs.batch.create_namespaced_job(self.namespace, job)

    def _jobset_status(self, jobset: dict[str, Any], children: list[dict[str, Any]]) -> None:
        said = [
            {c["type"] for c in (j.get("status") or {}).get("conditions", [])} for j in children
        ]
        verdict = "Failed" if any("Failed" in s for s in said) else None
        if all("Complete" in s for s in said):
            verdict = "Completed"
        before = (jobset.get("status") or {}).get("conditions") or []
        if verdict and not any(c["type"] == verdict for c in before):
            condition = {"type": verdict, "status": "True", "reason": f"Jobs{verdict}"}
            self.jobsets.patch_namespaced_custom_object_status(
                *self.jobset_path,
                jobset["metadata"]["name"],
                {"status": {"conditions": [condition]}},
            )

    # --- the kubelet -------------------------------------------------------------------

    def _terminate(self, process: PodProcess, pod: dict[str, Any]) -> None:
        """A deleted pod: SIGTERM, SIGKILL after the grace period, release once exited."""
        if process.exit_code is not None:
            self._hold("Pod", pod, held=False)
            return
        grace = min(pod["spec"].get("terminationGracePeriodSeconds", 30), GRACE_CAP_SECONDS)
        if process.sigterm_at is None:
            process.sigterm_at = time.monotonic()
            log.info("pod %s deleted: SIGTERM", process.pod)
            os.kill(process.popen.pid, signal.SIGTERM)  # the container's main process
        elif time.monotonic() - process.sigterm_at > grace:
            log.info("pod %s: grace period over, SIGKILL", process.pod)
            self._kill_container(process)

    @staticmethod
    def _kill_container(process: PodProcess) -> None:
        """SIGKILL the main process and all it started (torchrun's workers have sessions
        of their own, so a process group is not enough; a container's cgroup is)."""
        if process.popen.poll() is not None:
            return  # its workers went with it (torchrun stops them)
        with contextlib.suppress(psutil.NoSuchProcess):
            main = psutil.Process(process.popen.pid)
            for member in [*main.children(recursive=True), main]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()

    def _start_process(self, job: dict[str, Any], pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        pod_dir = self.root / "pods" / meta["name"]
        mounts = self._mount_volumes(pod, pod_dir)
        ports = self.ports[job["metadata"]["name"]]
        hosts = {
            f"{job['metadata']['name']}-{i}.{spec.get('subdomain')}"
            for i in range(job["spec"]["completions"])
        }
        # The image's and the pod's env are localized; this machine's PATH is not (it may
        # well lie under a folder a pod mounts, such as a checkout under /tmp).
        pod_env = {
            **IMAGE_ENV,
            **{v["name"]: self._env_value(v, pod) for v in container.get("env", [])},
        }
        for name, value in pod_env.items():
            if value in hosts or any(value.startswith(f"{host}.") for host in hosts):
                pod_env[name] = "127.0.0.1"
            elif value.isdigit() and int(value) in ports:
                pod_env[name] = str(ports[int(value)])
            else:
                pod_env[name] = map_path(value, mounts)
        env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1",
            # OpenMP threads of pods that each take every core spin against each other.
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(hosts))),
            **pod_env,
        }
        env[TERMINATION_LOG_ENV] = str(pod_dir / "termination-log")
        command = [map_path(a, mounts) for a in container["command"] + container.get("args", [])]
        with (pod_dir / "log").open("wb") as out:
            popen = subprocess.Popen(command, env=env, cwd=pod_dir, stdout=out, stderr=out)
        key = (job["metadata"]["name"], int(meta["annotations"][COMPLETION_INDEX]))
        self.processes[key] = PodProcess(*key, meta["name"], pod_dir, mounts, popen)
        log.info("pod %s started: %s", meta["name"], " ".join(command))

    @staticmethod
    def _env_value(var: dict[str, Any], pod: dict[str, Any]) -> str:
        if "value" in var:
            return var["value"]
        field = (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
        keyed = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", field)
        if keyed:
            return pod["metadata"][keyed.group(1)][keyed.group(2)]
        if field in ("metadata.name", "metadata.namespace"):
            return pod["metadata"][field.removeprefix("metadata.")]
        raise ValueError(f"env {var['name']}: the e2e node supports values and fieldRefs only")

    def _mount_volumes(self, pod: dict[str, Any], pod_dir: Path) -> Mounts:
        """Make a local folder for each volume mount; ConfigMaps written out last."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: Mounts = []
        config_maps: list[tuple[str, Path]] = []
        for mount in pod["spec"]["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            local = pod_dir / "volumes" / mount["name"]
            if "persistentVolumeClaim" in volume:
                local = self.claim_dir(volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume:
                config_maps.append((volume["configMap"]["name"], local))
            elif "emptyDir" not in volume:
                raise ValueError(f"volume {mount['name']}: the e2e node cannot mount {volume}")
            local.mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"], local))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        ports = self.ports[pod["metadata"]["labels"][JOB_NAME_LABEL]]
        for name, local in config_maps:
            config_map = self.jobs.core.read_namespaced_config_map(name, self.namespace)
            for key, text in (config_map.data or {}).items():
                if key.endswith((".yaml", ".yml")):  # the TrainerConfig
                    document = localize_yaml(yaml.safe_load(text), mounts, ports)
                    text = yaml.safe_dump(document, sort_keys=False)
                (local / key).write_text(text)
        return mounts
