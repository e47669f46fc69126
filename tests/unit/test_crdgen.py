"""The generated CRDs: no drift, structural, and the TrainingRun CRD judges CRs like pydantic.

(The Pipeline CRD's own checks are in test_pipeline_api.py, which reuses the API-server
stand-ins below.)

Without an API server, the CRD is exercised the way one would use it: its openAPIV3Schema
through jsonschema (OpenAPI v3.0 is Draft 4 for the keywords we emit), unknown fields the
way strict field validation reports them, and every `x-kubernetes-validations` rule
evaluated with cel-python against the node it sits on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubetrain.api import TrainingRun
from kubetrain.crdgen import CRD_KINDS, all_crds, build_crd, crd_yaml, write_crds

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
CRD = build_crd(CRD_KINDS[0])
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
CEL = celpy.Environment()
# Kubernetes' CEL has cel-go's strings extension; cel-python lacks it. The rules use these.
K8S_FUNCTIONS = {
    "substring": lambda text, start, end: celpy.celtypes.StringType(
        str(text)[int(start) : int(end)]
    ),
}


def portable(expression: str) -> str:
    """`expression` for cel-python, which lacks CEL's three-argument map macro: the same
    meaning, written `x.filter(v, p).map(v, t)` for `x.map(v, p, t)`. (The apiserver's cost
    estimate refuses filter() over stage lists in messageExpressions, so the CRDs use map.)"""
    out, i = "", 0
    while (start := expression.find(".map(", i)) >= 0:
        depth, args, current, quoted = 0, [], "", False
        j = start + len(".map(")
        while True:
            char = expression[j]
            if char == "'" and expression[j - 1] != "\\":
                quoted = not quoted
            elif quoted:
                pass
            elif char in "([":
                depth += 1
            elif char in ")]":
                if depth == 0:
                    break
                depth -= 1
            if char == "," and depth == 0 and not quoted:
                args.append(current)
                current = ""
            else:
                current += char
            j += 1
        args.append(current)
        out += expression[i:start]
        if len(args) == 3:
            var, predicate, transform = (portable(a.strip()) for a in args)
            out += f".filter({var}, {predicate}).map({var}, {transform})"
        else:
            out += ".map(" + ",".join(portable(a) for a in args) + ")"
        i = j + 1
    return out + expression[i:]


# ---------------------------------------------------------------- API-server stand-ins


def unknown_fields(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Fields the API server would prune (and kubectl's strict validation reports)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}: unknown field")
            else:
                found += unknown_fields(schema["properties"][key], value, f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(schema["additionalProperties"], value, f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            found += unknown_fields(schema["items"], value, f"{path}[{i}]")
    return found


def schema_errors(obj: Any, schema: dict[str, Any] = SCHEMA) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    return errors + unknown_fields(schema, obj)


def cel_errors(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Evaluate every CEL rule on the node it is attached to, as the API server does."""
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]), functions=K8S_FUNCTIONS)
        try:
            ok = bool(program.evaluate({"self": celpy.json_to_cel(obj)}))
        except celpy.CELEvalError as e:
            ok, rule = False, {**rule, "message": f"{rule['message']} (error: {e})"}
        if not ok:
            found.append(f"{path}{rule.get('fieldPath', '')}: {rule_message(rule, obj)}")
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return found
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = schema.get("properties", {}).get(key) or (
                schema.get("additionalProperties")
                if isinstance(schema.get("additionalProperties"), dict)
                else None
            )
            if sub is not None:
                found += cel_errors(sub, value, f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            found += cel_errors(schema["items"], value, f"{path}[{i}]")
    return found


def rule_message(rule: dict[str, Any], obj: Any) -> str:
    """A failed rule's message: messageExpression's value when it evaluates, as on the API."""
    if "messageExpression" not in rule:
        return rule["message"]
    program = CEL.program(CEL.compile(portable(rule["messageExpression"])), functions=K8S_FUNCTIONS)
    try:
        return str(program.evaluate({"self": celpy.json_to_cel(obj)}))
    except celpy.CELEvalError:
        return rule["message"]


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    """What `kubectl apply` would report: schema first, CEL on objects that pass it."""
    return schema_errors(obj) or cel_errors(SCHEMA, obj)


def pydantic_errors(obj: dict[str, Any]) -> list[str]:
    try:
        TrainingRun.model_validate(obj)
    except ValidationError as e:
        return [str(err["msg"]) for err in e.errors()]
    return []


def trainingrun(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "sft",
        "model": {"name": "Qwen/Qwen2.5-0.5B"},
        "data": {"train": "pvc://datasets/train.jsonl"},
        "output": "pvc://outputs/run",
    }
    base.update(spec)
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "run"},
        "spec": {key: value for key, value in base.items() if value is not None},  # None: drop
    }


# ---------------------------------------------------------------- generation


def test_committed_crds_match_the_models() -> None:
    for file_name, crd in all_crds().items():
        committed = ROOT / "crds" / file_name
        assert committed.exists(), f"{committed} missing: run python -m kubetrain.crdgen"
        assert committed.read_text() == crd_yaml(crd), (
            f"{committed} is stale: run `python -m kubetrain.crdgen` and commit the result"
        )


def test_write_crds_writes_the_same_text(tmp_path: Path) -> None:
    paths = write_crds(tmp_path / "out")
    assert [p.name for p in paths] == [
        "kubetrain.dev_trainingruns.yaml",
        "kubetrain.dev_pipelines.yaml",
        "kubetrain.dev_sweeps.yaml",
    ]
    for path in paths:
        assert path.read_text() == (ROOT / "crds" / path.name).read_text()
    assert yaml.safe_load(paths[0].read_text()) == CRD


def test_crd_names_and_subresources() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "trainingruns.kubetrain.dev"
    assert spec["group"] == "kubetrain.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["tr"]
    assert spec["names"]["categories"] == ["kubetrain"]
    assert VERSION["name"] == "v1alpha1"
    assert VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert columns["Method"]["jsonPath"] == ".spec.method"
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Step"]["jsonPath"] == ".status.progress.step"
    assert columns["Loss"]["jsonPath"] == ".status.progress.loss"
    assert columns["Progress"] == {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of the planned optimizer steps done.",
    }
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    assert all("[-1:]" not in c["jsonPath"] for c in columns.values())


# ---------------------------------------------------------------- structural schema


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        nodes += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}{{}}")
    return nodes


def test_schema_is_structural() -> None:
    forbidden = {"$ref", "$defs", "const", "title", "oneOf", "allOf", "not", "nullable"}
    for path, node in walk(SCHEMA):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf is int-or-string only"
        assert node.get("type") != "null", path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(key, True) is True, f"{path}: {key} must be a boolean (OpenAPI v3.0)"
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}


def test_every_field_is_described() -> None:
    missing = [
        path
        for path, node in walk(SCHEMA["properties"]["spec"], ".spec")
        + walk(SCHEMA["properties"]["status"], ".status")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ]
    assert missing == []


def test_defaults_satisfy_their_own_schema() -> None:
    for path, node in walk(SCHEMA):
        if "default" in node:
            assert schema_errors(node["default"], node) == [], path


def test_optional_blocks_and_unions_have_the_right_shape() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert spec["lora"]["type"] == "object" and "default" not in spec["lora"]
    gpu = spec["resources"]["properties"]["limits"]["additionalProperties"]
    assert gpu["x-kubernetes-int-or-string"] is True
    assert "pattern" in gpu
    target_modules = spec["lora"]["properties"]["targetModules"]
    assert target_modules["x-kubernetes-preserve-unknown-fields"] is True
    learning_rate = spec["training"]["properties"]["learningRate"]
    assert learning_rate["minimum"] == 0 and learning_rate["exclusiveMinimum"] is True
    assert SCHEMA["required"] == ["spec"]
    assert spec["backend"] == {
        "default": "job",
        "description": spec["backend"]["description"],
        "enum": ["job", "jobset"],
        "type": "string",
    }
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_cel_rules_compile_and_point_at_real_fields() -> None:
    rules = [
        (path, node, r)
        for path, node in walk(SCHEMA)
        for r in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) > 15
    for path, node, rule in rules:
        CEL.compile(rule["rule"])
        assert rule["message"], path
        target = node
        for part in rule.get("fieldPath", "").split(".")[1:]:
            target = target["properties"][part]


# ---------------------------------------------------------------- judging CRs


def sample_crs() -> list[Path]:
    return sorted(FIXTURES.glob("trainingrun-*.yaml")) + sorted(
        (ROOT / "examples").glob("trainingrun-*.yaml")
    )


@pytest.mark.parametrize("path", sample_crs(), ids=lambda p: p.name)
def test_sample_crs_pass_schema_and_cel(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "TrainingRun":
            assert api_server_errors(doc) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"method": "rlhf"},
            "'rlhf' is not one of ['from_scratch', 'sft', 'lora', 'dpo', 'evaluate']",
        ),
        ({"resources": {"nodes": 0}}, "0 is less than the minimum of 1"),
        ({"training": {"learningRate": 0}}, "0 is less than or equal to the minimum of 0"),
        ({"resources": {"limits": {"cpu": "lots"}}}, "'lots' does not match"),
        ({"resources": {"limits": {"cpu": 0.5}}}, "0.5 is not valid under any"),
        ({"trainig": {}}, "spec.trainig: unknown field"),
        ({"env": [{"name": "1BAD", "value": "x"}]}, "'1BAD' does not match"),
        ({"backend": "mpi"}, "'mpi' is not one of ['job', 'jobset']"),
        ({"model": {"name": "m", "tokenSecretRef": {"key": "k"}}}, "'name' is a required"),
    ],
)
def test_schema_rejects_bad_fields(spec: dict[str, Any], message: str) -> None:
    obj = trainingrun(**spec)
    errors = schema_errors(obj)
    assert any(message in e for e in errors), errors
    assert pydantic_errors(obj), "pydantic must refuse what the CRD refuses"


def test_schema_requires_data_and_output() -> None:
    obj = trainingrun()
    del obj["spec"]["data"], obj["spec"]["output"]
    errors = schema_errors(obj)
    assert "spec: 'output' is a required property" in errors
    # data is optional in the schema (method evaluate has none); a rule requires it for the
    # training methods.
    assert any("set data.train" in e for e in cel_errors(SCHEMA, obj)), cel_errors(SCHEMA, obj)


EVALUATE = {"suites": [{"name": "qa", "data": "pvc://datasets/qa.jsonl"}]}

# (spec overrides, message the CRD gives or None when valid). pydantic must agree on
# accept/reject for every row: the CEL rules are the same rules written twice.
ARCH = {"hiddenSize": 64, "numAttentionHeads": 4, "numHiddenLayers": 1, "intermediateSize": 64}
CROSS_FIELD_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("sft", {}, None),
    ("lora-block-on-sft", {"lora": {"r": 4}}, "lora block given but method is not lora"),
    ("lora", {"method": "lora", "lora": {"r": 4}}, None),
    (
        "lora-with-dpo-uselora",
        {"method": "dpo", "dpo": {"useLora": True}, "lora": {}},
        None,
    ),
    (
        "lora-with-dpo-no-uselora",
        {"method": "dpo", "dpo": {}, "lora": {}},
        "lora block given but method is not lora",
    ),
    ("dpo-block-on-sft", {"dpo": {}}, "dpo block given but method is not dpo"),
    ("fromscratch-on-sft", {"fromScratch": {}}, "fromScratch block given"),
    (
        "scratch-without-architecture",
        {"method": "from_scratch", "model": {}},
        "method from_scratch needs model.architecture",
    ),
    (
        "scratch-with-name",
        {"method": "from_scratch", "model": {"name": "x", "architecture": ARCH}},
        "method from_scratch builds a new model",
    ),
    ("scratch", {"method": "from_scratch", "model": {"architecture": ARCH}}, None),
    ("sft-without-model", {"model": {}}, "this method needs model.name"),
    ("sft-blank-model", {"model": {"name": "  "}}, "this method needs model.name"),
    (
        "dpo-messages",
        {"method": "dpo", "data": {"train": "pvc://d/p", "format": "messages"}},
        "method dpo needs preference data",
    ),
    (
        "dpo-preference",
        {"method": "dpo", "data": {"train": "pvc://d/p", "format": "preference"}},
        None,
    ),
    (
        "sft-preference",
        {"data": {"train": "pvc://d/p", "format": "preference"}},
        "not preference pairs",
    ),
    (
        "prompt-length-on-sft",
        {"data": {"train": "pvc://d/p", "maxPromptLength": 8}},
        "data.maxPromptLength applies to method dpo only",
    ),
    ("mlm", {"data": {"train": "pvc://d/p", "mlmProbability": 0.15}}, "mlmProbability"),
    (
        "eval-without-data",
        {"training": {"evalStrategy": "steps"}},
        "training.evalStrategy steps or epoch needs data.eval",
    ),
    (
        "eval-with-data",
        {
            "training": {"evalStrategy": "epoch"},
            "data": {"train": "pvc://d/t", "eval": "pvc://d/e"},
        },
        None,
    ),
    ("bf16-and-fp16", {"training": {"bf16": True, "fp16": True}}, "bf16 and fp16 are exclusive"),
    ("bf16", {"training": {"bf16": True}}, None),
    ("max-steps-zero", {"training": {"maxSteps": 0}}, "maxSteps must be -1"),
    ("max-steps-neg", {"training": {"maxSteps": -2}}, "maxSteps must be -1"),
    ("max-steps", {"training": {"maxSteps": 10}}, None),
    (
        "patience-without-best",
        {"training": {"earlyStoppingPatience": 3}},
        "earlyStoppingPatience needs loadBestModelAtEnd",
    ),
    (
        "best-without-eval",
        {"training": {"loadBestModelAtEnd": True}},
        "loadBestModelAtEnd needs evalStrategy",
    ),
    (
        "best-strategies-differ",
        {
            "training": {"loadBestModelAtEnd": True, "evalStrategy": "epoch"},
            "data": {"train": "pvc://d/t", "eval": "pvc://d/e"},
        },
        "saveStrategy to match evalStrategy",
    ),
    (
        "best-steps-not-multiple",
        {
            "training": {
                "loadBestModelAtEnd": True,
                "evalStrategy": "steps",
                "evalSteps": 30,
                "saveSteps": 100,
            },
            "data": {"train": "pvc://d/t", "eval": "pvc://d/e"},
        },
        "saveSteps to be a multiple of evalSteps",
    ),
    (
        "best-steps-default-logging",
        {
            "training": {
                "loadBestModelAtEnd": True,
                "evalStrategy": "steps",
                "saveSteps": 50,
                "earlyStoppingPatience": 2,
            },
            "data": {"train": "pvc://d/t", "eval": "pvc://d/e"},
        },
        None,
    ),
    (
        "heads-do-not-divide",
        {"method": "from_scratch", "model": {"architecture": {**ARCH, "numAttentionHeads": 5}}},
        "hiddenSize must be a multiple of numAttentionHeads",
    ),
    (
        "kv-heads-do-not-divide",
        {"method": "from_scratch", "model": {"architecture": {**ARCH, "numKeyValueHeads": 3}}},
        "numAttentionHeads a multiple of numKeyValueHeads",
    ),
    (
        "default-architecture",
        {"method": "from_scratch", "model": {"architecture": {}}},
        None,
    ),
    # Method evaluate: suites instead of data, one process.
    ("evaluate", {"method": "evaluate", "data": None, "evaluate": EVALUATE}, None),
    (
        "evaluate-with-data",
        {"method": "evaluate", "evaluate": EVALUATE},
        "method evaluate reads its data from evaluate.suites[].data",
    ),
    (
        "evaluate-without-block",
        {"method": "evaluate", "data": None},
        "method evaluate needs an evaluate block",
    ),
    ("evaluate-block-on-sft", {"evaluate": EVALUATE}, "evaluate block given but method is not"),
    ("sft-without-data", {"data": None}, "this method trains on data: set data.train"),
    (
        "evaluate-two-nodes",
        {"method": "evaluate", "data": None, "evaluate": EVALUATE, "resources": {"nodes": 2}},
        "method evaluate runs in one process",
    ),
    (
        "evaluate-two-processes",
        {
            "method": "evaluate",
            "data": None,
            "evaluate": EVALUATE,
            "resources": {"procPerNode": 2},
        },
        "method evaluate runs in one process",
    ),
    (
        "evaluate-without-model",
        {"method": "evaluate", "data": None, "evaluate": EVALUATE, "model": {}},
        "this method needs model.name",
    ),
    # Sharding (issue 17): fsdp and its knobs, deepspeed; what neither runs refused with why.
    ("fsdp", {"training": {"sharding": "fsdp"}, "resources": {"nodes": 2}}, None),
    (
        "fsdp-offload-with-memory",
        {
            "training": {"sharding": "fsdp", "fsdpCpuOffload": True},
            "resources": {"procPerNode": 8, "requests": {"memory": "512Gi"}},
        },
        None,
    ),
    (
        "fsdp-offload-with-memory-limit",
        {
            "training": {"sharding": "fsdp", "fsdpCpuOffload": True},
            "resources": {"limits": {"memory": "512Gi"}},
        },
        None,
    ),
    (
        "fsdp-offload-without-memory",
        {"training": {"sharding": "fsdp", "fsdpCpuOffload": True}},
        "training.fsdpCpuOffload keeps the parameter shards",
    ),
    (
        "offload-without-fsdp",
        {"training": {"fsdpCpuOffload": True}, "resources": {"requests": {"memory": "8Gi"}}},
        "apply to sharding: fsdp only",
    ),
    (
        "keep-gathered-without-fsdp",
        {"training": {"fsdpReshardAfterForward": False}},
        "apply to sharding: fsdp only",
    ),
    (
        "fsdp-keep-gathered",
        {"training": {"sharding": "fsdp", "fsdpReshardAfterForward": False}},
        None,
    ),
    ("deepspeed", {"training": {"sharding": "deepspeed"}, "resources": {"nodes": 2}}, None),
    (
        "deepspeed-sft",
        {"method": "sft", "model": {"name": "m"}, "training": {"sharding": "deepspeed"}},
        None,
    ),
    (
        "deepspeed-lora",
        {"method": "lora", "lora": {"r": 8}, "training": {"sharding": "deepspeed"}},
        None,
    ),
    (
        "deepspeed-offload",
        {
            "training": {"sharding": "deepspeed", "fsdpCpuOffload": True},
            "resources": {"requests": {"memory": "8Gi"}},
        },
        "apply to sharding: fsdp only",
    ),
    (
        "qlora-deepspeed",
        {"method": "lora", "lora": {"loadIn4Bit": True}, "training": {"sharding": "deepspeed"}},
        "QLoRA under DeepSpeed ZeRO-3",
    ),
    ("sharding-typo", {"training": {"sharding": "zero3"}}, "'zero3' is not one of"),
    (
        "qlora-fsdp",
        {"method": "lora", "lora": {"loadIn4Bit": True}, "training": {"sharding": "fsdp"}},
        "FSDP2 cannot shard bitsandbytes' 4-bit weights",
    ),
    (
        "lora-fsdp",
        {"method": "lora", "lora": {"r": 8}, "training": {"sharding": "fsdp"}},
        None,
    ),
    ("qlora-ddp", {"method": "lora", "lora": {"loadIn4Bit": True}}, None),
    # Safety nets: the batch-size finder in one process only; exit-code lists that work.
    ("auto-batch-one-process", {"training": {"autoFindBatchSize": True}}, None),
    (
        "auto-batch-two-nodes",
        {"training": {"autoFindBatchSize": True}, "resources": {"nodes": 2}},
        "training.autoFindBatchSize works in one process",
    ),
    (
        "retry-and-fail-on-one-code",
        {"restartPolicy": {"retryOn": [3, 4], "failOn": [4]}},
        "in both retryOn and failOn",
    ),
    ("retry-on-config-error", {"restartPolicy": {"retryOn": [78]}}, "78 is a config or data error"),
    ("exit-code-lists", {"restartPolicy": {"retryOn": [72], "failOn": [3]}}, None),
    ("env-rank", {"env": [{"name": "RANK", "value": "0"}]}, "env may not set PET_*"),
    ("env-pet", {"env": [{"name": "PET_NNODES", "value": "2"}]}, "env may not set PET_*"),
    ("env-pet-other", {"env": [{"name": "PET_ANYTHING", "value": "2"}]}, "env may not set"),
    ("env-hf-token", {"env": [{"name": "HF_TOKEN", "value": "x"}]}, "use model.tokenSecretRef"),
    ("env-world", {"env": [{"name": "WORLD_SIZE", "value": "8"}]}, "env may not set"),
    ("env-master", {"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "env may not set"),
    ("env-ok", {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}, None),
    (
        "env-value-and-from",
        {"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}]},
        "set value or valueFrom, not both",
    ),
    (
        "env-two-sources",
        {
            "env": [
                {
                    "name": "A",
                    "valueFrom": {
                        "fieldRef": {"fieldPath": "metadata.name"},
                        "secretKeyRef": {"name": "s", "key": "k"},
                    },
                }
            ]
        },
        "set exactly one of secretKeyRef",
    ),
    ("env-no-source", {"env": [{"name": "A", "valueFrom": {}}]}, "set exactly one of"),
    # The API server's pod rules (requests, limits, tolerations), refused at apply time.
    *[
        (f"resources-{case_id}", {"resources": resources}, message)
        for case_id, resources, message in [
            ("gpu-request-only", {"requests": {"nvidia.com/gpu": 1}}, "needs the same value"),
            (
                "gpu-request-differs",
                {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}},
                "needs the same value",
            ),
            ("gpu-limit-only", {"limits": {"nvidia.com/gpu": 8}}, None),
            (
                "gpu-request-equals-limit",
                {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": 8}},
                None,
            ),
            ("gpu-fraction", {"limits": {"nvidia.com/gpu": "500m"}}, "whole numbers"),
            ("gpu-decimal", {"limits": {"amd.com/gpu": "0.5"}}, "whole numbers"),
            ("cpu-above-limit", {"requests": {"cpu": 4}, "limits": {"cpu": "2"}}, "is above"),
            (
                "memory-binary-above-decimal",
                {"requests": {"memory": "64Gi"}, "limits": {"memory": "64G"}},
                "is above",
            ),
            (
                "memory-below",
                {"requests": {"memory": "500Mi"}, "limits": {"memory": "1Gi"}},
                None,
            ),
            ("cpu-milli-below", {"requests": {"cpu": "500m"}, "limits": {"cpu": 1}}, None),
            ("cpu-exponent", {"requests": {"cpu": "2e3"}, "limits": {"cpu": "1k"}}, "is above"),
            ("request-without-limit", {"requests": {"cpu": 8, "memory": "64Gi"}}, None),
            ("kubernetes-io-domain", {"requests": {"example.kubernetes.io/x": 1}}, None),
            (
                "toleration-exists-value",
                {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]},
                "operator Exists matches any taint value",
            ),
            (
                "toleration-seconds-no-effect",
                {"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]},
                "tolerationSeconds applies to NoExecute taints only",
            ),
            (
                "toleration-no-key-equal",
                {"tolerations": [{"operator": "Equal", "value": "x"}]},
                "without key must use operator: Exists",
            ),
            ("toleration-match-all", {"tolerations": [{"operator": "Exists"}]}, None),
            (
                "toleration-ok",
                {
                    "tolerations": [
                        {
                            "key": "gpu",
                            "operator": "Equal",
                            "value": "true",
                            "effect": "NoExecute",
                            "tolerationSeconds": 60,
                        }
                    ]
                },
                None,
            ),
        ]
    ],
    # URI schemes: pvc://, s3://, hub ids and local paths; anything else is refused.
    ("train-ftp", {"data": {"train": "ftp://host/t.jsonl"}}, "data.train: unsupported URI"),
    ("eval-gs", {"data": {"train": "t", "eval": "gs://b/e"}}, "data.eval: unsupported URI"),
    ("model-hf", {"model": {"name": "hf://Qwen/Qwen2.5-0.5B"}}, "model.name: unsupported"),
    ("output-http", {"output": "http://host/out"}, "output: unsupported URI"),
    (
        "reference-ftp",
        {"method": "dpo", "dpo": {"referenceModel": {"name": "ftp://m"}}},
        "dpo.referenceModel.name: unsupported",
    ),
    ("train-s3", {"data": {"train": "s3://bucket/t.jsonl"}}, None),
    ("train-local", {"data": {"train": "./data/t.jsonl"}}, None),
]


@pytest.mark.parametrize(
    ("spec", "message"),
    [(spec, message) for _, spec, message in CROSS_FIELD_CASES],
    ids=[case_id for case_id, _, _ in CROSS_FIELD_CASES],
)
def test_cel_rules_and_pydantic_agree(spec: dict[str, Any], message: str | None) -> None:
    obj = trainingrun(**spec)
    crd_errors = api_server_errors(obj)
    python_errors = pydantic_errors(obj)
    if message is None:
        assert crd_errors == [], crd_errors
        assert python_errors == [], python_errors
    else:
        assert any(message in e for e in crd_errors), crd_errors
        assert python_errors, f"pydantic accepts what the CRD refuses with {message!r}"


@pytest.mark.parametrize(
    ("name", "ok"),
    [("sft-tiny", True), ("a" * 40, True), ("a" * 41, False), ("Sft", False), ("1sft", False)],
)
def test_run_names_fit_pod_hostnames(name: str, ok: bool) -> None:
    obj = trainingrun()
    obj["metadata"]["name"] = name
    crd_errors = cel_errors(SCHEMA, obj)
    assert (crd_errors == []) is ok, crd_errors
    assert (pydantic_errors(obj) == []) is ok
    if not ok:
        assert "metadata.name must be a DNS label of at most 40 characters" in crd_errors[0]


def test_rules_hold_when_the_api_server_has_filled_in_defaults() -> None:
    """The API server defaults before CEL runs; rules must judge the defaulted object alike."""
    run = TrainingRun.model_validate(trainingrun(training={"bf16": True}))
    defaulted = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert api_server_errors(defaulted) == []
    bad = copy.deepcopy(defaulted)
    bad["spec"]["training"]["fp16"] = True
    assert any("bf16 and fp16 are exclusive" in e for e in api_server_errors(bad))
