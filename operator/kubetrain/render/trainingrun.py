"""Render one attempt of a TrainingRun into the Kubernetes objects that run it.

Pure functions of the run and the attempt number: no client, no clock, so golden files
pin the output. Backend `job` gives a ConfigMap with the TrainerConfig, a headless Service
for the pods' DNS names and an Indexed Job `<run>-<attempt>`; backend `jobset` swaps the
Job and Service for one JobSet (which makes its own headless Service). Every pod runs the
trainer under torchrun with the rendezvous environment of Kubeflow's PyTorchJob
(`PET_*`, `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`), as a non-root user with nothing
but the volumes it needs. The Job never retries on its own (backoffLimit 0): a failed pod
leaves the gang out of step, so the operator restarts the whole attempt.
"""

from __future__ import annotations

from typing import Any

from kubetrain.api import (
    API_VERSION,
    C10D_PORT,
    KIND,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_RUN,
    METRICS_PORT,
    TrainingRun,
    TrainingRunSpec,
    to_trainer_config,
)
from kubetrain.render.storage import RenderError, claim_mounts, cluster_path, storage_env
from kubetrain_trainer.config import dump_trainer_config
from kubetrain_trainer.contract import CACHE_DIR_ENV

CONFIG_DIR = "/etc/kubetrain"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
# The pods' cache volume (spec.cache: an emptyDir, or a claim kept across attempts): the
# trainer's downloads, hub models (HF_HOME) and the local copy of an s3:// output.
CACHE_DIR = "/var/cache/kubetrain"
HF_HOME = f"{CACHE_DIR}/huggingface"
CONTAINER_NAME = "trainer"
JOBSET_REPLICATED_JOB = "node"
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
RUN_AS_USER = 1000
# Long enough for rank 0 to write a checkpoint of a multi-GB model after SIGTERM
# (preemption); the trainer exits 75 once it is saved.
TERMINATION_GRACE_SECONDS = 300
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Kueue reads these from the workload object; the CR carries them for the user.
PASSTHROUGH_LABELS = (KUEUE_QUEUE_LABEL, "kueue.x-k8s.io/priority-class")
TRAINER_COMMAND = ["python", "-m", "kubetrain_trainer.launch", "--config", CONFIG_PATH]
# The trainer's scratch volume, also its HOME and working directory: the image's WORKDIR
# lies on the read-only root filesystem, where relative writes would fail.
SCRATCH_DIR = "/tmp"


def config_map_name(run_name: str) -> str:
    return f"{run_name}-config"


def service_name(run_name: str) -> str:
    return run_name


def job_name(run_name: str, attempt: int) -> str:
    """Name of an attempt's Job (and of its JobSet with backend jobset)."""
    return f"{run_name}-{attempt}"


def run_labels(run_name: str) -> dict[str, str]:
    """Labels on every child of a run; `{LABEL_RUN: name}` alone selects its pods."""
    return {
        "app.kubernetes.io/name": "kubetrain",
        "app.kubernetes.io/instance": run_name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "kubetrain",
        LABEL_RUN: run_name,
    }


def attempt_labels(run_name: str, attempt: int) -> dict[str, str]:
    """Labels on an attempt's workload and pods."""
    return {**run_labels(run_name), LABEL_ATTEMPT: str(attempt)}


def master_addr(run_name: str, attempt: int, backend: str) -> str:
    """DNS name of the pod with node rank 0, resolvable from its peers."""
    workload = job_name(run_name, attempt)
    if backend == "jobset":
        # JobSet names pods <jobset>-<replicatedJob>-<jobIndex>-<podIndex> in <subdomain>.
        return f"{workload}-{JOBSET_REPLICATED_JOB}-0-0.{service_name(run_name)}"
    return f"{workload}-0.{service_name(run_name)}"


def owner_reference(run: TrainingRun) -> dict[str, Any]:
    """The owner dict for `render_trainingrun`, from a run read from the API (needs uid)."""
    if not run.metadata.uid:
        raise RenderError(f"TrainingRun {run.metadata.name}: metadata.uid is not set")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.metadata.name,
        "uid": run.metadata.uid,
    }


def render_trainingrun(
    run: TrainingRun,
    attempt: int,
    *,
    backend: str | None = None,
    owner: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every object one attempt needs, in creation order (ConfigMap first).

    `backend` overrides `spec.backend`; `owner` ({apiVersion, kind, name, uid}) makes the
    objects children of the TrainingRun so deleting it deletes them. Raises RenderError,
    naming the run and the field, for specs a cluster cannot run.
    """
    backend = backend or run.spec.backend
    if backend not in ("job", "jobset"):
        raise RenderError(f"backend {backend!r}: use job or jobset")
    if attempt < 0:
        raise RenderError(f"attempt must be 0 or more, got {attempt}")
    try:
        config_map = render_config_map(run)
        pod_spec = render_pod_spec(run, attempt, backend)
    except RenderError as e:
        raise RenderError(f"TrainingRun {_qualified(run)}: {e}") from e
    if backend == "jobset":
        objects = [config_map, render_jobset(run, attempt, pod_spec)]
    else:
        objects = [config_map, render_service(run), render_job(run, attempt, pod_spec)]
    for obj in objects:
        obj["metadata"] = _child_metadata(obj["metadata"], run.metadata.namespace, owner)
    return objects


def _child_metadata(
    metadata: dict[str, Any], namespace: str | None, owner: dict[str, Any] | None
) -> dict[str, Any]:
    """Make it our child: the run's namespace and a controller owner reference."""
    out: dict[str, Any] = {"name": metadata["name"]}
    if namespace:
        out["namespace"] = namespace
    out["labels"] = metadata["labels"]
    if owner is not None:
        out["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["name"],
                "uid": owner["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return out


def _qualified(run: TrainingRun) -> str:
    ns = run.metadata.namespace
    return f"{ns}/{run.metadata.name}" if ns else run.metadata.name


def render_trainer_config(run: TrainingRun) -> str:
    """The TrainerConfig YAML the pods read, with storage URIs rewritten to mount paths."""
    try:
        config = to_trainer_config(
            run.metadata.name, run.spec, cluster_path, metrics_port=METRICS_PORT
        )
    except ValueError as e:
        if isinstance(e, RenderError):
            raise
        raise RenderError(str(e)) from e
    return dump_trainer_config(config)


def render_config_map(run: TrainingRun) -> dict[str, Any]:
    """ConfigMap `<run>-config` holding the TrainerConfig under `config.yaml`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(run.metadata.name),
            "labels": run_labels(run.metadata.name),
        },
        "data": {CONFIG_KEY: render_trainer_config(run)},
    }


def render_service(run: TrainingRun) -> dict[str, Any]:
    """Headless Service `<run>`: gives each pod the DNS name `<job>-<index>.<run>`."""
    name = run.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "labels": run_labels(name)},
        "spec": {
            "clusterIP": "None",
            # Peers must resolve each other before any is Ready: rendezvous comes first.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: name},
            "ports": [
                {"name": "c10d", "port": C10D_PORT, "targetPort": C10D_PORT, "protocol": "TCP"},
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": METRICS_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


def _workload_labels(run: TrainingRun, attempt: int) -> dict[str, str]:
    labels = attempt_labels(run.metadata.name, attempt)
    for key in PASSTHROUGH_LABELS:
        if key in run.metadata.labels:
            labels[key] = run.metadata.labels[key]
    return labels


def _job_spec(
    spec: TrainingRunSpec, pod_template: dict[str, Any], *, suspend: bool | None = None
) -> dict[str, Any]:
    nodes = spec.resources.nodes
    job: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # The gang fails as one: the operator restarts every pod, never the Job one pod.
        "backoffLimit": 0,
    }
    if suspend is not None:
        job["suspend"] = suspend
    job["template"] = pod_template
    return job


def render_job(run: TrainingRun, attempt: int, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Indexed Job `<run>-<attempt>`: one pod per node, index = node rank."""
    name = run.metadata.name
    # The pods' hostnames <job>-<index> resolve under the headless Service's name.
    pod_spec = {"subdomain": service_name(name), **pod_spec}
    template = {"metadata": {"labels": attempt_labels(name, attempt)}, "spec": pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(name, attempt), "labels": _workload_labels(run, attempt)},
        "spec": _job_spec(run.spec, template, suspend=run.spec.suspend),
    }


def render_jobset(run: TrainingRun, attempt: int, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """JobSet `<run>-<attempt>` with one replicated Indexed Job of `nodes` pods."""
    name = run.metadata.name
    workload = job_name(name, attempt)
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": {"name": workload, "labels": _workload_labels(run, attempt)},
        "spec": {
            "suspend": run.spec.suspend,
            "network": {
                "enableDNSHostnames": True,
                "publishNotReadyAddresses": True,
                # The run's own name, as with backend job: `<run>-<attempt>` could be the
                # Service of another run (run `llama` attempt 3 against run `llama-3`).
                "subdomain": service_name(name),
            },
            # Restarts are the operator's (it counts them against maxRestarts and never
            # restarts after a config error), so the JobSet must not restart by itself.
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [
                {
                    "name": JOBSET_REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        "metadata": {"labels": attempt_labels(name, attempt)},
                        "spec": _job_spec(
                            run.spec,
                            {
                                "metadata": {"labels": attempt_labels(name, attempt)},
                                "spec": pod_spec,
                            },
                        ),
                    },
                }
            ],
        },
    }


def rendezvous_env(spec: TrainingRunSpec, master: str) -> list[dict[str, Any]]:
    """torchrun's environment, PyTorchJob names (PET_* are torchrun's flags as env)."""
    nodes = spec.resources.nodes
    procs = spec.resources.proc_per_node
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(C10D_PORT)},
        # With PET_MASTER_ADDR torchrun uses the static rendezvous, whose deadline for every
        # node to join is --rdzv-conf timeout= (c10d's join_timeout does not apply to it).
        {
            "name": "PET_RDZV_CONF",
            "value": f"timeout={spec.restart_policy.startup_timeout_seconds}",
        },
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(C10D_PORT)},
        # Processes in the whole gang; RANK is torchrun's to set per process, never ours.
        {"name": "WORLD_SIZE", "value": str(nodes * procs)},
    ]


def render_pod_spec(run: TrainingRun, attempt: int, backend: str) -> dict[str, Any]:
    """The trainer pod (without the Job's subdomain): container, volumes, security."""
    spec = run.spec
    master = master_addr(run.metadata.name, attempt, backend)
    mounts = claim_mounts(spec)

    env = rendezvous_env(spec, master)
    env.append({"name": CACHE_DIR_ENV, "value": CACHE_DIR})
    env.append({"name": "HF_HOME", "value": HF_HOME})
    # A read-only root filesystem leaves $HOME unwritable; caches (torch, triton) go there.
    env.append({"name": "HOME", "value": SCRATCH_DIR})
    if spec.model.token_secret_ref is not None:
        ref = spec.model.token_secret_ref
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    env += storage_env(spec)
    env += [e.model_dump(by_alias=True, exclude_none=True) for e in spec.env]

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": list(TRAINER_COMMAND),
        "workingDir": SCRATCH_DIR,
        "env": env,
        "ports": [
            {"name": "c10d", "containerPort": C10D_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]
        + [{"name": m.volume, "mountPath": m.mount_path, "readOnly": m.read_only} for m in mounts],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy

    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer never calls the Kubernetes API; a token would only be a liability.
        "automountServiceAccountToken": False,
        # Service links inject *_PORT variables; a Service named "master" would clobber
        # MASTER_PORT with tcp://... and break the rendezvous.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            # Makes freshly provisioned claims writable by the trainer's group.
            "fsGroup": RUN_AS_USER,
            # Only when the volume's root differs: a recursive chown of a claim full of
            # checkpoints would hold every start (and its peers at the rendezvous) for minutes.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(run.metadata.name)}},
            _cache_volume(spec),
            {"name": "tmp", "emptyDir": {}},
            # NCCL and DataLoader workers share tensors through /dev/shm, which is 64Mi
            # by default in a container.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ]
        + [
            {
                "name": m.volume,
                "persistentVolumeClaim": {"claimName": m.claim, "readOnly": m.read_only},
            }
            for m in mounts
        ],
    }
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.priority_class_name:
        pod["priorityClassName"] = spec.resources.priority_class_name
    return pod


def _cache_volume(spec: TrainingRunSpec) -> dict[str, Any]:
    cache = spec.cache
    if cache is not None and cache.claim_name:
        return {"name": "cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}
    if cache is not None and cache.size_limit is not None:
        return {"name": "cache", "emptyDir": {"sizeLimit": str(cache.size_limit)}}
    return {"name": "cache", "emptyDir": {}}


def _resources(spec: TrainingRunSpec) -> dict[str, dict[str, str]]:
    resources: dict[str, dict[str, str]] = {}
    if spec.resources.requests:
        resources["requests"] = {k: str(v) for k, v in spec.resources.requests.items()}
    if spec.resources.limits:
        resources["limits"] = {k: str(v) for k, v in spec.resources.limits.items()}
    return resources
