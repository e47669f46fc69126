"""The TrainingRun API types: loading files, field rules, URIs and the trainer config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetrain.api import (
    API_VERSION,
    CONDITION_READY,
    GROUP,
    KIND,
    KIND_MODELS,
    PLURAL,
    SHORT_NAMES,
    VERSION,
    ManifestError,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
    UriRef,
    classify_uri,
    is_reserved_env_name,
    load_documents,
    parse_pvc_uri,
    to_trainer_config,
    uri_refs,
)
from kubetrain_trainer.config import ConfigError, TrainerConfig

FIXTURES = Path(__file__).parent / "fixtures"

HEADER = """apiVersion: kubetrain.dev/v1alpha1
kind: TrainingRun
metadata:
  name: sft-tiny
"""


def spec(**overrides: Any) -> TrainingRunSpec:
    fields: dict[str, Any] = {
        "method": "sft",
        "model": {"name": "Qwen/Qwen2.5-0.5B"},
        "data": {"train": "pvc://datasets/train.jsonl"},
        "output": "pvc://outputs/run",
    }
    fields.update(overrides)
    return TrainingRunSpec.model_validate(fields)


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loader


def test_constants() -> None:
    assert (GROUP, VERSION, API_VERSION) == ("kubetrain.dev", "v1alpha1", "kubetrain.dev/v1alpha1")
    assert (KIND, PLURAL, SHORT_NAMES) == ("TrainingRun", "trainingruns", ["tr"])
    assert KIND_MODELS["TrainingRun"] == (API_VERSION, TrainingRun)


def test_load_every_fixture() -> None:
    for path in sorted(FIXTURES.glob("trainingrun-*.yaml")):
        (run,) = load_documents(path)
        assert isinstance(run, TrainingRun)
        assert run.metadata.name.endswith("-tiny")


def test_multiple_documents_and_empty_ones(tmp_path: Path) -> None:
    one = (FIXTURES / "trainingrun-lora.yaml").read_text()
    two = (FIXTURES / "trainingrun-dpo.yaml").read_text()
    path = write(tmp_path, f"---\n{one}\n---\n# nothing here\n---\n{two}\n---\n")
    runs = load_documents(path)
    assert [r.metadata.name for r in runs] == ["lora-tiny", "dpo-tiny"]


def test_error_names_file_object_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + """spec:
  method: sft
  model: {name: Qwen/Qwen2.5-0.5B}
  data: {train: pvc://d/train.jsonl}
  training: {learningRate: 0}
  output: pvc://o/sft
""",
    )
    with pytest.raises(ManifestError) as err:
        load_documents(path)
    assert str(err.value) == (
        f"{path}: TrainingRun sft-tiny: spec.training.learningRate: Input should be greater than 0"
    )
    assert isinstance(err.value, ConfigError)


def test_unknown_field_and_cross_field_rule_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + """spec:
  method: sft
  model: {name: m, tokenSecret: hf}
  data: {train: pvc://d/train.jsonl}
  output: pvc://o/sft
""",
    )
    with pytest.raises(ManifestError, match=r"spec\.model\.tokenSecret: unknown field"):
        load_documents(path)
    path = write(
        tmp_path,
        HEADER
        + """spec:
  method: sft
  model: {name: m}
  data: {train: pvc://d/train.jsonl}
  lora: {r: 8}
  output: pvc://o/sft
""",
    )
    with pytest.raises(ManifestError) as err:
        load_documents(path)
    assert str(err.value) == (
        f"{path}: TrainingRun sft-tiny: spec: lora block given but method is sft; use method "
        "lora (or dpo.useLora)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "apiVersion: kubetrain.dev/v1alpha1\nkind: TrainJob\nmetadata: {name: a}\n",
            "unknown kind 'TrainJob'; kubetrain reads Pipeline, Sweep, TrainingRun",
        ),
        (
            "apiVersion: kubetrain.dev/v1\nkind: TrainingRun\nmetadata: {name: a}\nspec: {}\n",
            "TrainingRun a: apiVersion is 'kubetrain.dev/v1'; TrainingRun is "
            "kubetrain.dev/v1alpha1",
        ),
        ("- just\n- a list\n", "expected a mapping (a Kubernetes object)"),
        ("", "no objects found (the file is empty)"),
        ("spec: [unclosed\n", "cannot read"),
        (
            "apiVersion: kubetrain.dev/v1alpha1\nkind: TrainingRun\nspec: {}\n",
            "TrainingRun (no metadata.name): metadata: Field required",
        ),
    ],
)
def test_loader_refusals(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_documents(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_unknown_kind_in_a_multi_document_file_names_the_document(tmp_path: Path) -> None:
    one = (FIXTURES / "trainingrun-lora.yaml").read_text()
    path = write(tmp_path, f"{one}\n---\nkind: TrainJob\n")
    with pytest.raises(ManifestError, match=r"\(document 2\): unknown kind 'TrainJob'"):
        load_documents(path)


def test_missing_file() -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_documents("/nonexistent/run.yaml")


# ---------------------------------------------------------------- spec rules


def test_defaults() -> None:
    s = spec()
    assert s.image == "ghcr.io/kubetrain/trainer:0.1.0"
    assert s.backend == "job"
    assert s.suspend is False
    assert s.restart_policy.max_restarts == 3
    assert (s.resources.nodes, s.resources.proc_per_node) == (1, 1)
    assert s.model.token_secret_ref is None
    ref = spec(model={"name": "m", "tokenSecretRef": {"name": "hf"}}).model.token_secret_ref
    assert ref is not None and (ref.name, ref.key) == ("hf", "token")


@pytest.mark.parametrize(
    "name",
    [
        "PET_NNODES",
        "PET_ANYTHING",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "HF_TOKEN",
        "HF_HOME",
        "TORCHELASTIC_RUN_ID",
    ],
)
def test_reserved_env_names_are_refused(name: str) -> None:
    assert is_reserved_env_name(name)
    with pytest.raises(ValidationError, match=f"env sets {name}, which the operator"):
        spec(env=[{"name": name, "value": "1"}])


def test_user_env_is_accepted() -> None:
    s = spec(
        env=[
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "w", "key": "k"}}},
        ]
    )
    assert [e.name for e in s.env] == ["NCCL_DEBUG", "WANDB_API_KEY"]
    assert not is_reserved_env_name("PETS")


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"limits": {"cpu": 0.5}}, 'write fractional quantities as strings ("500m" or "0.5")'),
        ({"requests": {"memory": "64 GB"}}, "'64 GB' is not a Kubernetes quantity"),
        ({"nodes": 0}, "greater than or equal to 1"),
        ({"procPerNode": 0}, "greater than or equal to 1"),
        ({"tolerations": [{"operator": "Maybe"}]}, "'Exists' or 'Equal'"),
    ],
)
def test_resources_refusals(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        spec(resources=resources)


def test_quantities_keep_their_form() -> None:
    s = spec(resources={"limits": {"nvidia.com/gpu": 8, "memory": "64Gi", "cpu": "500m"}})
    assert s.resources.limits == {"nvidia.com/gpu": 8, "memory": "64Gi", "cpu": "500m"}


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("pvc://Bad_Claim/x", "'Bad_Claim' is not a PersistentVolumeClaim name"),
        ("pvc://claim/../etc", "'.' and '..' are not allowed"),
        ("s3:///prefix", "write s3://<bucket>/<prefix>"),
        ("", "at least 1 character"),
    ],
)
def test_bad_output_uris(output: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(output=output)


def test_s3_is_accepted_by_the_schema() -> None:
    assert spec(output="s3://bucket/runs/x").output == "s3://bucket/runs/x"


def test_run_name_must_fit_hostnames() -> None:
    with pytest.raises(ValidationError, match="must be a DNS label of at most 40 characters"):
        TrainingRun.model_validate(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": "x" * 41},
                "spec": spec().model_dump(by_alias=True),
            }
        )


def test_api_body_with_server_fields_and_status_parses() -> None:
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": "sft-tiny",
            "namespace": "ml",
            "uid": "abc",
            "generation": 2,
            "resourceVersion": "17",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kueue.x-k8s.io/queue-name": "q"},
        },
        "spec": spec().model_dump(by_alias=True, exclude_none=True),
        "status": {
            "phase": "Running",
            "observedGeneration": 2,
            "conditions": [
                {
                    "type": CONDITION_READY,
                    "status": "False",
                    "reason": "Training",
                    "message": "",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }
            ],
            "progress": {"step": 10, "totalSteps": 100, "percent": 10, "eta": "1h2m3s"},
            "kopf": {"progress": {}},
        },
    }
    run = TrainingRun.model_validate(body)
    assert run.metadata.uid == "abc" and run.metadata.generation == 2
    assert run.status is not None and run.status.progress is not None
    assert run.status.progress.percent == 10
    assert run.status.conditions[0].type == "Ready"
    dumped = run.model_dump(by_alias=True, exclude_none=True)
    assert dumped["metadata"]["resourceVersion"] == "17"
    assert "kopf" not in dumped["status"]


def test_status_bounds() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        TrainingRunStatus.model_validate({"progress": {"percent": 101}})
    with pytest.raises(ValidationError, match="'Pending', 'Running', 'Succeeded'"):
        TrainingRunStatus.model_validate({"phase": "Done"})


# ---------------------------------------------------------------- URIs and the trainer config


@pytest.mark.parametrize(
    ("uri", "may_be_hub_id", "kind"),
    [
        ("Qwen/Qwen2.5-3B", True, "hub"),
        ("gpt2", True, "hub"),
        ("Qwen/Qwen2.5-3B", False, "local"),
        ("./models/x", True, "local"),
        ("/models/x", True, "local"),
        ("~/models", True, "local"),
        ("models/qwen/final", True, "local"),
        ("pvc://models/x", True, "pvc"),
        ("s3://bucket/x", False, "s3"),
        ("data/train.jsonl", False, "local"),
    ],
)
def test_classify_uri(uri: str, may_be_hub_id: bool, kind: str) -> None:
    assert classify_uri(uri, may_be_hub_id=may_be_hub_id) == kind


def test_parse_pvc_uri() -> None:
    assert parse_pvc_uri("pvc://data/a//b/") == parse_pvc_uri("pvc://data/a/b")
    assert parse_pvc_uri("pvc://data").path == ""
    assert parse_pvc_uri("pvc://data/a/b").claim == "data"
    with pytest.raises(ValueError, match="is not a pvc:// URI"):
        parse_pvc_uri("/data")


def test_uri_refs_lists_every_storage_field() -> None:
    s = spec(
        method="dpo",
        model={"name": "pvc://m/sft", "tokenizer": "Qwen/Qwen2.5-0.5B"},
        data={"train": "pvc://d/t", "eval": "pvc://d/e"},
        dpo={"referenceModel": {"name": "pvc://m/ref"}},
    )
    assert [(r.field, r.kind) for r in uri_refs(s)] == [
        ("spec.model.name", "pvc"),
        ("spec.model.tokenizer", "hub"),
        ("spec.dpo.referenceModel.name", "pvc"),
        ("spec.data.train", "pvc"),
        ("spec.data.eval", "pvc"),
        ("spec.output", "pvc"),
    ]


def test_to_trainer_config_rewrites_uris_and_drops_operator_fields() -> None:
    s = spec(
        method="dpo",
        model={"name": "pvc://m/sft", "tokenSecretRef": {"name": "hf"}},
        data={"train": "pvc://d/t", "maxPromptLength": 64},
        dpo={"beta": 0.2, "referenceModel": {"name": "pvc://m/ref"}},
        training={"maxSteps": 5},
        resources={"nodes": 4},
    )
    seen: list[UriRef] = []

    def resolve(ref: UriRef) -> str:
        seen.append(ref)
        return ref.uri.replace("pvc://", "/local/")

    config = to_trainer_config("dpo-run", s, resolve, metrics_port=0)
    assert isinstance(config, TrainerConfig)
    assert config.model.name == "/local/m/sft"
    assert config.dpo is not None and config.dpo.reference_model.name == "/local/m/ref"
    assert config.dpo.beta == 0.2
    assert config.data.train == "/local/d/t"
    assert config.data.max_prompt_length == 64
    assert config.output_dir == "/local/outputs/run"
    assert config.training.max_steps == 5
    assert config.run_name == "dpo-run"
    assert config.metrics_port == 0
    assert {r.field for r in seen} == {
        "spec.model.name",
        "spec.dpo.referenceModel.name",
        "spec.data.train",
        "spec.output",
    }


def test_to_trainer_config_for_from_scratch_and_lora() -> None:
    (scratch,) = load_documents(FIXTURES / "trainingrun-from-scratch.yaml")
    config = to_trainer_config("s", scratch.spec, lambda ref: ref.uri)
    assert config.model.architecture is not None
    assert config.model.architecture.hidden_size == 64
    assert config.from_scratch is not None and config.from_scratch.tokenizer_vocab_size == 512
    (lora,) = load_documents(FIXTURES / "trainingrun-lora.yaml")
    config = to_trainer_config("l", lora.spec, lambda ref: ref.uri)
    assert config.lora is not None and config.lora.target_modules == "all-linear"


def test_resolver_errors_propagate() -> None:
    def refuse(ref: UriRef) -> str:
        raise ValueError(f"{ref.field}: no")

    with pytest.raises(ValueError, match=r"spec\.model\.name: no"):
        to_trainer_config("x", spec(), refuse)


def evaluate_run(**evaluate: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "eval"},
        "spec": {
            "method": "evaluate",
            "model": {"name": "pvc://models/sft"},
            "evaluate": {"suites": [{"name": "qa", "data": "pvc://d/qa.jsonl"}], **evaluate},
            "output": "pvc://models/eval",
        },
    }


@pytest.mark.parametrize(
    ("suites", "problem"),
    [
        (
            [{"name": "qa", "data": "pvc://d/a"}, {"name": "qa", "data": "pvc://d/b"}],
            "suite qa is listed more than once",
        ),
        ([{"name": "qa", "data": "pvc://d/a", "format": "text"}], "suite qa reads auto or"),
        ([{"name": "preference", "data": "pvc://d/a", "format": "messages"}], "not messages"),
        (
            [{"name": "qa", "data": "pvc://d/a", "refusalPatterns": ["no"]}],
            "apply to suite safety only",
        ),
        ([{"name": "safety", "data": "pvc://d/a", "refusalPatterns": ["("]}], "is not a regex"),
        ([{"name": "qa", "data": "ftp://host/qa.jsonl"}], "unsupported scheme ftp://"),
        ([{"name": "rouge", "data": "pvc://d/a"}], "Input should be 'perplexity'"),
        ([], "at least 1 item"),
    ],
)
def test_bad_evaluation_suites_are_refused(suites: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)):
        TrainingRun.model_validate(evaluate_run(suites=suites))


def test_an_evaluation_reads_its_suites_from_their_claims() -> None:
    run = TrainingRun.model_validate(
        evaluate_run(
            suites=[
                {"name": "qa", "data": "pvc://eval-data/qa.jsonl"},
                {"name": "safety", "data": "pvc://eval-data/safety.jsonl"},
            ],
            referenceModel={"name": "pvc://models/base"},
        )
    )
    fields = {ref.field: ref.uri for ref in uri_refs(run.spec)}
    assert fields["spec.evaluate.suites[1].data"] == "pvc://eval-data/safety.jsonl"
    assert fields["spec.evaluate.referenceModel.name"] == "pvc://models/base"
    config = to_trainer_config("eval", run.spec, lambda ref: ref.uri.replace("pvc://", "/mnt/"))
    assert config.data is None and config.evaluate is not None
    assert [s.data for s in config.evaluate.suites] == [
        "/mnt/eval-data/qa.jsonl",
        "/mnt/eval-data/safety.jsonl",
    ]
    assert config.evaluate.reference_model.name == "/mnt/models/base"
