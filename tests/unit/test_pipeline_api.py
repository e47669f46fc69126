"""The Pipeline API: validation that names the stage, its CRD and CEL, and stage specs.

Every invalid pipeline below is judged twice, by pydantic and by the generated CRD (schema
and CEL rules evaluated with cel-python, messageExpression included, as the API server
would), and both must refuse it naming the stage. Cycles are the one rule CEL cannot
express: the CRD lets them through and pydantic (which the operator runs) refuses them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from test_crdgen import CEL, cel_errors, portable, schema_errors, walk

from kubetrain.api import (
    MAX_STAGES,
    ManifestError,
    Pipeline,
    dependency_order,
    dependents,
    load_documents,
    stage_output_uri,
    stage_trainingrun_spec,
)
from kubetrain.crdgen import CRD_KINDS, build_crd

ROOT = Path(__file__).resolve().parents[2]
CRD = build_crd(next(k for k in CRD_KINDS if k.kind == "Pipeline"))
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def stage(name: str, method: str = "sft", depends_on: list[str] | None = None, **spec: Any):
    """A stage of a small valid pipeline; sft/lora/dpo start from model `base` by default."""
    body: dict[str, Any] = {
        "method": method,
        "data": {"train": "pvc://data/preference.jsonl" if method == "dpo" else "pvc://data/t"},
    }
    if method == "from_scratch":
        body["model"] = {"architecture": {"hiddenSize": 64, "numAttentionHeads": 4}}
    else:
        body["model"] = {"name": "base"}
    body.update(spec)
    result: dict[str, Any] = {"name": name, "spec": body}
    if depends_on is not None:
        result["dependsOn"] = depends_on
    return result


def pipeline(*stages: dict[str, Any], name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": name},
        "spec": {"outputRoot": "pvc://models/chat", "stages": list(stages), **spec},
    }


def from_stage(upstream: str, **extra: Any) -> dict[str, Any]:
    return {"fromStage": upstream, **extra}


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return schema_errors(obj, SCHEMA) or cel_errors(SCHEMA, obj)


def pydantic_errors(obj: dict[str, Any]) -> list[str]:
    try:
        Pipeline.model_validate(obj)
    except ValidationError as e:
        return [str(err["msg"]) for err in e.errors()]
    return []


SFT_DPO = pipeline(
    stage("sft"),
    stage("dpo", "dpo", ["sft"], model=from_stage("sft")),
)
LORA_MERGED = pipeline(
    stage("lora", "lora", lora={"merge": True}),
    stage("dpo", "dpo", ["lora"], model=from_stage("lora", fromStageOutput="merged")),
)


SWEEP_STAGE = {
    **stage("tune", "lora", data={"train": "pvc://data/t", "eval": "pvc://data/e"}),
    "sweep": {
        "parameters": [{"path": "lora.r", "type": "categorical", "choices": [4, 8]}],
        "objective": {"metric": "eval_loss"},
        "maxTrials": 6,
    },
}


def changed(doc: dict[str, Any], change) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


def stages_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["stages"]


# (id, pipeline, what the CRD says or None, what pydantic says or None). Each message names
# the stage; a None on one side only is the documented gap (cycles).
CASES: list[tuple[str, dict[str, Any], str | None, str | None]] = [
    ("sft-dpo", SFT_DPO, None, None),
    ("lora-merged", LORA_MERGED, None, None),
    (
        "lora-adapter",
        changed(
            LORA_MERGED,
            lambda d: stages_of(d)[1]["spec"]["model"].update(fromStageOutput="adapter"),
        ),
        None,
        None,
    ),
    (
        "dpo-lora-adapter-into-sft",
        pipeline(
            stage("dpo", "dpo", dpo={"useLora": True}, lora={"r": 4}),
            stage("sft", "sft", ["dpo"], model=from_stage("dpo", fromStageOutput="adapter")),
        ),
        None,
        None,
    ),
    (
        "diamond",
        pipeline(
            stage("base"),
            stage("left", depends_on=["base"], model=from_stage("base")),
            stage("right", depends_on=["base"], model=from_stage("base")),
            stage("join", depends_on=["left", "right"], model=from_stage("left")),
        ),
        None,
        None,
    ),
    (
        "duplicate-name",
        pipeline(stage("sft"), stage("sft", "lora")),
        "stage sft is defined more than once",
        "stage sft is defined more than once",
    ),
    (
        "unknown-dependency",
        pipeline(stage("sft"), stage("dpo", "dpo", ["sfft"], model=from_stage("sft"))),
        "stage dpo dependsOn a stage that does not exist",
        "stage dpo dependsOn sfft, which is not a stage of this pipeline",
    ),
    (
        "depends-on-itself",
        pipeline(stage("sft", depends_on=["sft"])),
        "stage sft lists itself in dependsOn",
        "stage sft lists itself in dependsOn",
    ),
    (
        "cycle",
        pipeline(
            stage("a", depends_on=["c"]), stage("b", depends_on=["a"]), stage("c", depends_on=["b"])
        ),
        None,  # CEL cannot walk a graph; the operator's pydantic check reports it
        "dependsOn forms a cycle: a needs c, c needs b, b needs a",
    ),
    (
        "from-stage-without-depends-on",
        pipeline(stage("sft"), stage("dpo", "dpo", model=from_stage("sft"))),
        "stage dpo: model.fromStage sft must also be listed in dependsOn",
        "stage dpo: model.fromStage sft must also be listed in dependsOn",
    ),
    (
        "reference-from-stage-without-depends-on",
        pipeline(
            stage("sft"),
            stage("other"),
            stage(
                "dpo",
                "dpo",
                ["sft"],
                model=from_stage("sft"),
                dpo={"referenceModel": {"fromStage": "other"}},
            ),
        ),
        "stage dpo: dpo.referenceModel.fromStage other must also be listed in dependsOn",
        "stage dpo: dpo.referenceModel.fromStage other must also be listed in dependsOn",
    ),
    (
        "name-and-from-stage",
        pipeline(stage("sft"), stage("dpo", "dpo", ["sft"], model=from_stage("sft", name="x"))),
        "set name or fromStage, not both",
        "set name or fromStage, not both",
    ),
    (
        "output-kind-without-from-stage",
        pipeline(stage("sft", model={"name": "base", "fromStageOutput": "merged"})),
        "fromStageOutput applies to the model of fromStage",
        "fromStageOutput applies to the model of fromStage",
    ),
    (
        "merged-from-sft",
        changed(
            SFT_DPO, lambda d: stages_of(d)[1]["spec"]["model"].update(fromStageOutput="merged")
        ),
        "stage dpo: model.fromStageOutput",
        "stage dpo: model.fromStageOutput merged needs stage sft to be method lora",
    ),
    (
        "merged-without-merge",
        changed(LORA_MERGED, lambda d: stages_of(d)[0]["spec"]["lora"].update(merge=False)),
        "stage dpo: model.fromStageOutput",
        "stage dpo: model.fromStageOutput merged needs stage lora",
    ),
    (
        "adapter-from-sft",
        changed(
            SFT_DPO, lambda d: stages_of(d)[1]["spec"]["model"].update(fromStageOutput="adapter")
        ),
        "stage dpo: model.fromStageOutput",
        "stage dpo: model.fromStageOutput adapter needs a fromStage that trains LoRA",
    ),
    (
        "no-output-anywhere",
        changed(SFT_DPO, lambda d: d["spec"].pop("outputRoot")),
        "stage sft has no spec.output",
        "stages sft, dpo have no spec.output",
    ),
    (
        "own-outputs-without-root",
        changed(
            SFT_DPO,
            lambda d: (
                d["spec"].pop("outputRoot"),
                [s["spec"].update(output=f"pvc://m/{s['name']}") for s in stages_of(d)],
            ),
        ),
        None,
        None,
    ),
    (
        "from-scratch-from-stage",
        pipeline(
            stage("sft"),
            stage(
                "scratch",
                "from_scratch",
                ["sft"],
                model={
                    "fromStage": "sft",
                    "architecture": {"hiddenSize": 64, "numAttentionHeads": 4},
                },
            ),
        ),
        "method from_scratch builds a new model; drop model.fromStage",
        "method from_scratch builds a new model; drop model.fromStage",
    ),
    (
        "sft-without-a-model",
        pipeline(stage("sft", model={})),
        "this method needs model.name or model.fromStage",
        "this method needs model.name or model.fromStage",
    ),
    (
        "run-name-too-long",
        pipeline(stage("a-very-long-stage-name-for-sft"), name="qwen2-5-3b-chat"),
        "stage a-very-long-stage-name-for-sft: its TrainingRun "
        "qwen2-5-3b-chat-a-very-long-stage-name-for-sft is longer than 40",
        "stage a-very-long-stage-name-for-sft: its TrainingRun "
        "qwen2-5-3b-chat-a-very-long-stage-name-for-sft is 46 characters",
    ),
    (
        "pipeline-name-not-a-label",
        pipeline(stage("sft"), name="Chat"),
        "metadata.name must be a DNS label",
        "metadata.name 'Chat' must be a DNS label",
    ),
    (
        "stage-spec-as-a-trainingrun",
        pipeline(stage("sft", lora={"r": 4})),
        "lora block given but method is not lora",
        "stage sft: spec: lora block given but method is sft",
    ),
    (
        "reserved-env-in-defaults",
        pipeline(stage("sft"), defaults={"env": [{"name": "RANK", "value": "0"}]}),
        "env may not set PET_*",
        "env sets RANK",
    ),
    (
        "reserved-env-in-a-stage",
        pipeline(stage("sft", env=[{"name": "MASTER_ADDR", "value": "x"}])),
        "env may not set PET_*",
        "env sets MASTER_ADDR",
    ),
    (
        "stage-name-not-a-label",
        pipeline(stage("SFT")),
        "does not match",
        "String should match pattern",
    ),
    ("sweep-stage", pipeline(SWEEP_STAGE, name="p" * 33), None, None),
    (
        # <pipeline>-tune fits, but its last trial <pipeline>-tune-11 does not.
        "sweep-stage-trials-too-long",
        pipeline(changed(SWEEP_STAGE, lambda s: s["sweep"].update(maxTrials=12)), name="p" * 33),
        "stage tune: its trials <pipeline>-<stage>-<n> are longer than 40 characters",
        "stage tune: its TrainingRun",
    ),
]


@pytest.mark.parametrize(
    ("doc", "crd_message", "pydantic_message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_crd_and_pydantic_judge_pipelines_alike(
    doc: dict[str, Any], crd_message: str | None, pydantic_message: str | None
) -> None:
    from_crd, from_pydantic = crd_errors(doc), pydantic_errors(doc)
    if crd_message is None:
        assert from_crd == []
    else:
        assert any(crd_message in e for e in from_crd), from_crd
    if pydantic_message is None:
        assert from_pydantic == []
    else:
        assert any(pydantic_message in e for e in from_pydantic), from_pydantic


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("pipeline*.yaml")), ids=str)
def test_example_pipelines_pass_pydantic_and_the_crd(path: Path) -> None:
    assert path.read_text().startswith("# Run as: ")
    (loaded,) = load_documents(path)
    assert isinstance(loaded, Pipeline)
    assert crd_errors(yaml.safe_load(path.read_text())) == []


def test_rules_hold_when_the_api_server_has_filled_in_defaults() -> None:
    for doc in (SFT_DPO, LORA_MERGED):
        defaulted = Pipeline.model_validate(doc).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        assert defaulted["spec"]["stages"][0]["spec"]["training"]["learningRate"] == 2e-5
        assert crd_errors(defaulted) == [] and pydantic_errors(defaulted) == []


def test_loader_names_stages_not_indexes(tmp_path: Path) -> None:
    doc = changed(SFT_DPO, lambda d: stages_of(d)[1]["spec"].update(training={"learningRate": 0}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as err:
        load_documents(path)
    assert f"{path}: Pipeline chat: spec.stages[dpo].spec.training.learningRate" in str(err.value)


def test_a_cycle_is_reported_once_with_its_path() -> None:
    doc = pipeline(stage("a", depends_on=["b"]), stage("b", depends_on=["a"]), stage("c"))
    assert pydantic_errors(doc) == [
        "Value error, dependsOn forms a cycle: a needs b, b needs a; remove one of these "
        "dependencies"
    ]


# ---------------------------------------------------------------- the CRD


def test_pipeline_crd_names_columns_and_subresource() -> None:
    assert CRD["metadata"]["name"] == "pipelines.kubetrain.dev"
    assert CRD["spec"]["names"]["kind"] == "Pipeline"
    assert CRD["spec"]["names"]["categories"] == ["kubetrain"]
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Stage", "Phase", "Progress", "Ready", "Age"]
    assert columns["Stage"]["jsonPath"] == ".status.currentStage"
    assert columns["Progress"]["jsonPath"] == ".status.progress"
    assert columns["Progress"]["type"] == "string"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert all("[-1:]" not in c["jsonPath"] for c in columns.values())


def test_pipeline_schema_is_structural_and_described() -> None:
    for path, node in walk(SCHEMA):
        assert not {"$ref", "$defs", "const", "title", "oneOf", "allOf"} & node.keys(), path
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"
    stages = SCHEMA["properties"]["spec"]["properties"]["stages"]
    assert stages["x-kubernetes-list-type"] == "map"
    assert stages["x-kubernetes-list-map-keys"] == ["name"]
    assert stages["maxItems"] == MAX_STAGES
    depends_on = stages["items"]["properties"]["dependsOn"]
    assert depends_on["x-kubernetes-list-type"] == "set"
    assert depends_on["items"]["maxLength"] == 38


def test_stage_template_leaves_pipeline_defaults_room() -> None:
    template = SCHEMA["properties"]["spec"]["properties"]["stages"]["items"]["properties"]["spec"]
    # Schema defaults would be filled in by the API server and hide the pipeline's defaults.
    for field in ("image", "resources", "env", "restartPolicy", "backend", "output"):
        assert "default" not in template["properties"][field], field
    assert "suspend" not in template["properties"]  # the pipeline's spec.suspend holds stages
    assert template["required"] == ["method"]  # data: every method but evaluate (a rule)


def test_every_cel_rule_compiles_and_its_message_expression_too() -> None:
    rules = [r for _, node in walk(SCHEMA) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) > 25
    for rule in rules:
        CEL.compile(rule["rule"])
        if "messageExpression" in rule:
            CEL.compile(portable(rule["messageExpression"]))
        # The only reasons the API server accepts in x-kubernetes-validations.
        assert rule.get("reason", "FieldValueInvalid") in {
            "FieldValueInvalid",
            "FieldValueForbidden",
            "FieldValueRequired",
            "FieldValueDuplicate",
        }, rule


# ---------------------------------------------------------------- stage specs


def parsed(doc: dict[str, Any]) -> Pipeline:
    return Pipeline.model_validate(doc)


def test_stage_spec_merges_pipeline_defaults_under_the_stage() -> None:
    doc = pipeline(
        stage("sft", image="trainer:own", env=[{"name": "B", "value": "stage"}]),
        stage("dpo", "dpo", ["sft"], model=from_stage("sft"), resources={"nodes": 2}),
        defaults={
            "image": "trainer:shared",
            "resources": {"procPerNode": 8, "limits": {"nvidia.com/gpu": "8"}},
            "env": [{"name": "A", "value": "shared"}, {"name": "B", "value": "shared"}],
            "restartPolicy": {"maxRestarts": 7},
            "backend": "jobset",
        },
    )
    spec = parsed(doc).spec
    uris = {"sft": "pvc://models/chat/sft"}
    sft = stage_trainingrun_spec(spec, "sft", uris)
    dpo = stage_trainingrun_spec(spec, "dpo", uris)
    assert sft.image == "trainer:own" and dpo.image == "trainer:shared"
    assert [(e.name, e.value) for e in sft.env] == [("A", "shared"), ("B", "stage")]
    assert [(e.name, e.value) for e in dpo.env] == [("A", "shared"), ("B", "shared")]
    assert sft.resources.proc_per_node == 8 and sft.resources.limits == {"nvidia.com/gpu": "8"}
    # A stage's resources replace the defaults whole, as a TrainingRun's would.
    assert dpo.resources.nodes == 2 and dpo.resources.proc_per_node == 1
    assert sft.restart_policy.max_restarts == dpo.restart_policy.max_restarts == 7
    assert sft.backend == dpo.backend == "jobset"


def test_stage_spec_without_defaults_is_a_plain_trainingrun_spec() -> None:
    spec = parsed(SFT_DPO).spec
    sft = stage_trainingrun_spec(spec, "sft", {})
    assert sft.image == "ghcr.io/kubetrain/trainer:0.1.0"
    assert sft.backend == "job" and sft.restart_policy.max_restarts == 3 and sft.env == []
    assert sft.output == "pvc://models/chat/sft"
    assert sft.suspend is False


def test_stage_spec_hands_models_on() -> None:
    doc = pipeline(
        stage("sft", output="pvc://other/sft-out"),
        stage("lora", "lora", ["sft"], model=from_stage("sft"), lora={"merge": True}),
        stage(
            "dpo",
            "dpo",
            ["lora", "sft"],
            model=from_stage("lora", fromStageOutput="merged"),
            dpo={"referenceModel": {"fromStage": "sft"}},
        ),
        suspend=True,
    )
    spec = parsed(doc).spec
    assert stage_output_uri(spec, "sft") == "pvc://other/sft-out"
    assert stage_output_uri(spec, "lora") == "pvc://models/chat/lora"
    uris = {"sft": "pvc://other/sft-out", "lora": "pvc://models/chat/lora/"}
    lora = stage_trainingrun_spec(spec, "lora", uris)
    assert lora.model.name == "pvc://other/sft-out"
    dpo = stage_trainingrun_spec(spec, "dpo", uris)
    assert dpo.model.name == "pvc://models/chat/lora/merged"
    assert dpo.dpo is not None and dpo.dpo.reference_model.name == "pvc://other/sft-out"
    assert dpo.output == "pvc://models/chat/dpo"
    assert dpo.suspend is True


def test_stage_spec_needs_the_upstream_model() -> None:
    with pytest.raises(ValueError, match=r"stage dpo: model\.fromStage sft has no model yet"):
        stage_trainingrun_spec(parsed(SFT_DPO).spec, "dpo", {})


def test_dependency_order_keeps_file_order_between_independent_stages() -> None:
    doc = pipeline(
        stage("join", depends_on=["right", "left"]),
        stage("right", depends_on=["base"]),
        stage("base"),
        stage("left", depends_on=["base"]),
        stage("alone"),
    )
    spec = parsed(doc).spec
    assert dependency_order(spec.stages) == ["base", "right", "left", "join", "alone"]
    assert dependents(spec, "base") == ["right", "left", "join"]
    assert dependents(spec, "left") == ["join"]
    assert dependents(spec, "alone") == []
