"""Rendering a TrainingRun into Kubernetes objects: golden files, official schemas, env.

Regenerate the golden files after an intended change with
`KUBETRAIN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py` and review the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetrain.api import TrainingRun, load_documents
from kubetrain.render import (
    RenderError,
    claims_used,
    config_maps_used,
    render_trainingrun,
    secrets_used,
)
from kubetrain_trainer.config import TrainerConfig

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "golden"
K8S_VERSION = "1.33"
OWNER = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "name": "sft-tiny",
    "uid": "6f1d2c3b-1111-4a5b-9c8d-0123456789ab",
}


def load_fixture(name: str) -> TrainingRun:
    (run,) = load_documents(FIXTURES / name)
    return run


def make_run(**spec_overrides: Any) -> TrainingRun:
    """A small valid run; keyword arguments replace top-level spec fields."""
    spec: dict[str, Any] = {
        "method": "sft",
        "model": {"name": "Qwen/Qwen2.5-0.5B"},
        "data": {"train": "pvc://datasets/train.jsonl"},
        "output": "pvc://outputs/run",
    }
    spec.update(spec_overrides)
    return TrainingRun.model_validate(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "run"},
            "spec": spec,
        }
    )


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objects}


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "JobSet":
        return obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def env_of(obj: dict[str, Any]) -> dict[str, Any]:
    env = pod_spec_of(obj)["containers"][0]["env"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


class GoldenDumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded TrainerConfig) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


GoldenDumper.add_representer(str, _str_representer)


def check_golden(objects: list[dict[str, Any]], golden_name: str) -> None:
    text = yaml.dump_all(objects, Dumper=GoldenDumper, sort_keys=False, width=100)
    # An anchor means two objects share one dict, so patching one would change the other.
    assert "&id" not in text, "rendered objects share a mutable dict"
    path = GOLDEN / golden_name
    if os.environ.get("KUBETRAIN_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with KUBETRAIN_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), (
        f"render output differs from {path}; if the change is intended, regenerate with "
        "KUBETRAIN_UPDATE_GOLDEN=1 and review the diff"
    )


@pytest.mark.parametrize("backend", ["job", "jobset"])
def test_sft_render_matches_golden(backend: str) -> None:
    run = load_fixture("trainingrun-sft.yaml")
    objects = render_trainingrun(run, 0, backend=backend, owner=OWNER)
    check_golden(objects, f"trainingrun-sft-{backend}.yaml")


def validate_official(obj: dict[str, Any]) -> None:
    """Validate against the Kubernetes schemas; JobSet is a CRD, so check its Job instead."""
    if obj["kind"] == "JobSet":
        for replicated in obj["spec"]["replicatedJobs"]:
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{obj['metadata']['name']}-{replicated['name']}-0"},
                "spec": replicated["template"]["spec"],
            }
            kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("trainingrun-*.yaml")))
@pytest.mark.parametrize("backend", ["job", "jobset"])
def test_every_rendered_object_passes_the_official_schema(fixture: str, backend: str) -> None:
    run = load_fixture(fixture)
    for obj in render_trainingrun(run, 2, backend=backend, owner=OWNER):
        validate_official(obj)


@pytest.mark.parametrize("backend", ["job", "jobset"])
@pytest.mark.parametrize("nodes", [1, 4])
def test_rendezvous_environment(nodes: int, backend: str) -> None:
    run = make_run(resources={"nodes": nodes, "procPerNode": 2})
    workload = by_kind(render_trainingrun(run, 3, backend=backend))
    obj = workload["JobSet" if backend == "jobset" else "Job"]
    master = "run-3-node-0-0.run" if backend == "jobset" else "run-3-0.run"
    env = env_of(obj)
    assert env["PET_NNODES"] == str(nodes)
    assert env["PET_NPROC_PER_NODE"] == "2"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["PET_MASTER_ADDR"] == master
    assert env["MASTER_ADDR"] == master
    assert env["PET_MASTER_PORT"] == "29500"
    assert env["MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == str(nodes * 2)
    assert env["PET_RDZV_CONF"] == "timeout=3600"  # restartPolicy.startupTimeoutSeconds
    assert "RANK" not in env
    assert "LOCAL_RANK" not in env
    job_spec = (
        obj["spec"]["replicatedJobs"][0]["template"]["spec"] if backend == "jobset" else obj["spec"]
    )
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == nodes
    assert job_spec["backoffLimit"] == 0


def test_startup_timeout_bounds_the_rendezvous() -> None:
    # torchrun reads PET_RDZV_CONF as --rdzv-conf; tests/trainer/test_launch.py shows that
    # its static rendezvous then waits exactly this long for the other nodes.
    run = make_run(resources={"nodes": 2}, restartPolicy={"startupTimeoutSeconds": 7200})
    assert env_of(by_kind(render_trainingrun(run, 0))["Job"])["PET_RDZV_CONF"] == "timeout=7200"


def test_job_backend_objects_and_dns() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    objects = render_trainingrun(run, 1, owner=OWNER)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    kinds = by_kind(objects)
    service, job = kinds["Service"], kinds["Job"]
    assert service["metadata"]["name"] == "sft-tiny"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "c10d": 29500,
        "metrics": 9400,
    }
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert job["metadata"]["name"] == "sft-tiny-1"
    assert job["spec"]["template"]["spec"]["subdomain"] == "sft-tiny"
    assert pod_labels["kubetrain.dev/run"] == "sft-tiny"
    assert pod_labels["kubetrain.dev/attempt"] == "1"
    assert all(o["metadata"]["namespace"] == "ml" for o in objects)


def test_owner_references_make_every_object_a_child() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    for backend in ("job", "jobset"):
        for obj in render_trainingrun(run, 0, backend=backend, owner=OWNER):
            (ref,) = obj["metadata"]["ownerReferences"]
            assert ref == {**OWNER, "controller": True, "blockOwnerDeletion": True}
    assert all("ownerReferences" not in o["metadata"] for o in render_trainingrun(run, 0))


def test_kueue_label_passes_to_the_workload_only() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    for backend, kind in (("job", "Job"), ("jobset", "JobSet")):
        obj = by_kind(render_trainingrun(run, 0, backend=backend))[kind]
        assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        pod_metadata = (
            obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]
            if kind == "JobSet"
            else obj["spec"]["template"]["metadata"]
        )
        assert "kueue.x-k8s.io/queue-name" not in pod_metadata["labels"]


@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_is_honoured(suspend: bool) -> None:
    run = make_run(suspend=suspend)
    assert by_kind(render_trainingrun(run, 0))["Job"]["spec"]["suspend"] is suspend
    jobset = by_kind(render_trainingrun(run, 0, backend="jobset"))["JobSet"]
    assert jobset["spec"]["suspend"] is suspend


def test_jobset_backend_replaces_job_and_service() -> None:
    run = load_fixture("trainingrun-dpo.yaml")  # spec.backend: jobset
    objects = render_trainingrun(run, 0)
    assert [o["kind"] for o in objects] == ["ConfigMap", "JobSet"]
    jobset = objects[1]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert jobset["metadata"]["name"] == "dpo-tiny-0"
    # The run's own name, never `<run>-<attempt>`: that could be another run's Service.
    assert jobset["spec"]["network"]["subdomain"] == "dpo-tiny"
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 0}
    assert "subdomain" not in pod_spec_of(jobset)
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    assert replicated["replicas"] == 1


def test_pod_security_and_scratch_volumes() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    pod = pod_spec_of(by_kind(render_trainingrun(run, 0))["Job"])
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # fsGroup makes claims writable; only a mismatched root is chowned, not every file.
    assert pod["securityContext"]["fsGroup"] == 1000
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert container["command"] == [
        "python",
        "-m",
        "kubetrain_trainer.launch",
        "--config",
        "/etc/kubetrain/config.yaml",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # The cache (downloads, hub models, an s3:// output's local copy) is an emptyDir by
    # default, named to the trainer in KUBETRAIN_CACHE_DIR, with HF_HOME inside it.
    env = env_of(by_kind(render_trainingrun(run, 0))["Job"])
    assert volumes[mounts[env["KUBETRAIN_CACHE_DIR"]]] == {"name": "cache", "emptyDir": {}}
    assert env["HF_HOME"].startswith(env["KUBETRAIN_CACHE_DIR"] + "/")
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 9400
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }


@pytest.mark.parametrize("backend", ["job", "jobset"])
def test_the_trainer_starts_in_a_writable_working_directory(backend: str) -> None:
    # The image's WORKDIR lies on the read-only root filesystem: relative paths that the
    # trainer or a library writes (caches, compile artifacts) must land on a scratch volume.
    workload = by_kind(render_trainingrun(make_run(), 0, backend=backend))
    pod = pod_spec_of(workload["JobSet" if backend == "jobset" else "Job"])
    (container,) = pod["containers"]
    assert container["workingDir"] == "/tmp"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/tmp"].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]["name"]] == {"name": "tmp", "emptyDir": {}}


def test_hf_token_and_user_env_come_from_secrets() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    env = env_of(by_kind(render_trainingrun(run, 0))["Job"])
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert env["NCCL_DEBUG"] == "WARN"
    assert "HF_TOKEN" not in env_of(by_kind(render_trainingrun(make_run(), 0))["Job"])


def test_claims_become_volumes_and_config_paths() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    objects = by_kind(render_trainingrun(run, 0))
    pod = pod_spec_of(objects["Job"])
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"checkpoints": False, "datasets": True}
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/checkpoints"] is False
    assert mounts["/mnt/pvc/datasets"] is True
    config = TrainerConfig.model_validate(
        yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    )
    assert config.model.name == "Qwen/Qwen2.5-0.5B"
    assert config.data.train == "/mnt/pvc/datasets/sft/train.jsonl"
    assert config.data.eval == "/mnt/pvc/datasets/sft/eval.jsonl"
    assert config.output_dir == "/mnt/pvc/checkpoints/sft-tiny"
    assert config.run_name == "sft-tiny"
    assert config.metrics_port == 9400


def test_a_claim_shared_by_data_and_output_is_mounted_once_read_write() -> None:
    run = load_fixture("trainingrun-lora.yaml")  # model and output on claim `models`
    pod = pod_spec_of(by_kind(render_trainingrun(run, 0))["Job"])
    pvcs = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert [
        (v["persistentVolumeClaim"]["claimName"], v["persistentVolumeClaim"]["readOnly"])
        for v in pvcs
    ] == [("datasets", True), ("models", False)]
    config = yaml.safe_load(by_kind(render_trainingrun(run, 0))["ConfigMap"]["data"]["config.yaml"])
    assert config["model"]["name"] == "/mnt/pvc/models/qwen2.5-0.5b"


def test_dpo_reference_model_path_is_rewritten() -> None:
    run = load_fixture("trainingrun-dpo.yaml")
    config = yaml.safe_load(render_trainingrun(run, 0)[0]["data"]["config.yaml"])
    assert config["dpo"]["referenceModel"]["name"] == "/mnt/pvc/models/sft-tiny"
    assert config["data"]["maxPromptLength"] == 256


def test_what_the_operator_must_find_before_starting() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    assert claims_used(run.spec) == ["checkpoints", "datasets"]
    assert secrets_used(run.spec) == ["hf-token", "wandb"]
    assert config_maps_used(run.spec) == []
    optional = make_run(
        env=[
            {
                "name": "A",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}},
            },
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
        ]
    )
    assert secrets_used(optional.spec) == []
    assert config_maps_used(optional.spec) == ["cm"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"data": {"train": "./data/train.jsonl"}},
            "TrainingRun run: spec.data.train: local path './data/train.jsonl' does not exist "
            "inside the pods; put it on a PersistentVolumeClaim and write pvc://<claim>/<path>",
        ),
        (
            {"model": {"name": "/models/qwen"}},
            "spec.model.name: local path '/models/qwen' does not exist inside the pods; put it "
            "on a PersistentVolumeClaim and write pvc://<claim>/<path> or a Hugging Face hub id",
        ),
        ({"output": "runs/x"}, "spec.output: local path 'runs/x'"),
    ],
)
def test_storage_a_pod_cannot_reach_is_refused(overrides: dict[str, Any], message: str) -> None:
    run = make_run(**overrides)
    with pytest.raises(RenderError) as err:
        render_trainingrun(run, 0)
    assert message in str(err.value)


def test_s3_and_hub_uris_reach_the_trainer_with_credentials_from_the_secret() -> None:
    run = make_run(
        data={"train": "hf://datasets/org/chat@v2/train.jsonl", "eval": "s3://data/eval.jsonl"},
        output="s3://models/runs/x",
        storage={
            "s3": {
                "endpoint": "http://minio.storage:9000",
                "region": "eu-west-1",
                "credentialsSecretRef": {"name": "s3-keys", "secretAccessKeyKey": "secret"},
            }
        },
    )
    objects = by_kind(render_trainingrun(run, 0))
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    assert config["data"]["train"] == "hf://datasets/org/chat@v2/train.jsonl"
    assert config["data"]["eval"] == "s3://data/eval.jsonl"
    assert config["outputDir"] == "s3://models/runs/x"
    # The endpoint and region reach the trainer; the credentials only as Secret references.
    assert config["storage"] == {
        "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1"}
    }
    env = env_of(objects["Job"])
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-keys", "key": "secret"}}
    assert secrets_used(run.spec) == ["s3-keys"]
    # Nothing is mounted for s3:// or hub URIs (no claim), only the cache.
    assert [v["name"] for v in pod_spec_of(objects["Job"])["volumes"]] == [
        "config",
        "cache",
        "tmp",
        "dshm",
    ]


def test_without_a_credentials_secret_the_pods_use_their_own_identity() -> None:
    run = make_run(output="s3://models/runs/x")
    env = env_of(by_kind(render_trainingrun(run, 0))["Job"])
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)


@pytest.mark.parametrize(
    ("cache", "volume", "claims"),
    [
        ({"claimName": "train-cache"}, {"persistentVolumeClaim": {"claimName": "train-cache"}}, [
            "datasets", "outputs", "train-cache"
        ]),
        ({"sizeLimit": "200Gi"}, {"emptyDir": {"sizeLimit": "200Gi"}}, ["datasets", "outputs"]),
    ],
)  # fmt: skip
def test_the_cache_volume_is_a_claim_or_a_bounded_empty_dir(
    cache: dict[str, Any], volume: dict[str, Any], claims: list[str]
) -> None:
    run = make_run(cache=cache)
    pod = pod_spec_of(by_kind(render_trainingrun(run, 0))["Job"])
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache", **volume}
    assert claims_used(run.spec) == claims


def test_render_is_pure() -> None:
    run = load_fixture("trainingrun-sft.yaml")
    before = copy.deepcopy(run.model_dump())
    first = render_trainingrun(run, 0, owner=OWNER)
    assert render_trainingrun(run, 0, owner=OWNER) == first
    assert run.model_dump() == before


def test_unknown_backend_and_negative_attempt_are_refused() -> None:
    run = make_run()
    with pytest.raises(RenderError, match="backend 'pods': use job or jobset"):
        render_trainingrun(run, 0, backend="pods")
    with pytest.raises(RenderError, match="attempt must be 0 or more"):
        render_trainingrun(run, -1)
