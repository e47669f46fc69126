"""The Sweep API: bad sweeps refused naming the field, by pydantic and by the CRD's CEL.

Every case is judged twice, by pydantic and by the generated CRD (schema and CEL rules run
with cel-python, as the API server would; the cluster tier sends the same table to the real
apiserver). A None on the CRD side is a rule CEL cannot express: it needs the template's
field types or what the method reports, which pydantic (run by the operator) checks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from test_crdgen import cel_errors, schema_errors

from kubetrain.api import Pipeline, Sweep, load_documents
from kubetrain.api.sweep import tunable_fields
from kubetrain.crdgen import CRD_KINDS, build_crd

ROOT = Path(__file__).resolve().parents[2]
CRD = build_crd(next(k for k in CRD_KINDS if k.kind == "Sweep"))
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

TEMPLATE = {
    "method": "lora",
    "model": {"name": "pvc://models/base"},
    "data": {"train": "pvc://datasets/train.jsonl", "eval": "pvc://datasets/eval.jsonl"},
    "training": {"maxSteps": 20, "evalStrategy": "steps", "evalSteps": 5},
    "output": "pvc://models/sweep",
}
LR = {"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-2, "log": True}


def sweep(*parameters: dict[str, Any], name: str = "lr", **spec: Any) -> dict[str, Any]:
    body = {
        "template": copy.deepcopy(TEMPLATE),
        "parameters": list(parameters) or [LR],
        "objective": {"metric": "eval_loss"},
        "maxTrials": 6,
        **spec,
    }
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": name},
        "spec": body,
    }


def with_template(**fields: Any) -> dict[str, Any]:
    doc = sweep()
    doc["spec"]["template"].update(fields)
    return doc


def crd_errors(obj: dict[str, Any]) -> list[str]:
    return schema_errors(obj, SCHEMA) or cel_errors(SCHEMA, obj)


def pydantic_errors(obj: dict[str, Any]) -> list[str]:
    try:
        Sweep.model_validate(obj)
    except ValidationError as e:
        return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    return []


# (id, sweep, what the CRD says or None, what pydantic says or None).
CASES: list[tuple[str, dict[str, Any], str | None, str | None]] = [
    ("log-lr", sweep(), None, None),
    (
        "unknown-path",
        sweep({"path": "training.learnignRate", "type": "float", "low": 0.1, "high": 1}),
        "path training.learnignRate is not a field a sweep can tune",
        "path training.learnignRate is not a field a sweep can tune",
    ),
    (
        "not-tunable-path",
        sweep({"path": "data.train", "type": "categorical", "choices": ["a", "b"]}),
        "path data.train is not a field a sweep can tune",
        "path data.train is not a field a sweep can tune",
    ),
    (
        "log-with-low-zero",
        sweep({**LR, "low": 0.0}),
        "log scale needs low > 0",
        "training.learningRate: log scale needs low > 0",
    ),
    (
        "float-on-an-int-field",
        sweep({"path": "lora.r", "type": "float", "low": 4, "high": 16}),
        "path lora.r is not a float field",
        "lora.r is not a float field; use type int",
    ),
    (
        "categorical-of-the-wrong-type",
        sweep({"path": "lora.r", "type": "categorical", "choices": [4, "eight"]}),
        None,
        "spec.parameters[0] (lora.r): value 'eight' does not fit the template: lora.r",
    ),
    (
        "choice-out-of-bounds",
        sweep({"path": "training.warmupRatio", "type": "float", "low": 0.0, "high": 2.0}),
        None,
        "spec.parameters[0] (training.warmupRatio): value 2.0 does not fit the template",
    ),
    (
        "low-above-high",
        sweep({**LR, "low": 0.1, "high": 0.01}),
        "type float and int need low < high",
        "training.learningRate: type float needs low < high",
    ),
    (
        "categorical-without-choices",
        sweep({"path": "lora.r", "type": "categorical"}),
        None,
        "lora.r: type categorical needs choices",
    ),
    (
        "log-and-step",
        sweep({**LR, "step": 0.001}),
        "set log or step, not both",
        "set log or step, not both",
    ),
    (
        "objective-not-reported",
        sweep(objective={"metric": "rewards_accuracy"}),
        None,
        "spec.objective.metric rewards_accuracy is not reported by method lora",
    ),
    (
        "eval-objective-without-eval-data",
        with_template(data={"train": "pvc://datasets/train.jsonl"}, training={"maxSteps": 20}),
        None,
        "spec.objective.metric eval_loss is measured on evaluation data; set template data.eval",
    ),
    ("median-pruner", sweep(pruner={"type": "median"}), None, None),
    (
        "grid-over-a-continuous-range",
        sweep(algorithm="grid"),
        None,
        "spec.algorithm grid needs a step for float parameters (training.learningRate)",
    ),
    (
        "name-too-long-for-its-trials",
        sweep(name="a" * 39),
        "every trial <sweep>-<n> fits 40 characters",
        "every trial <sweep>-<n> fits 40 characters",
    ),
]


def _pruner_without_evaluations() -> dict[str, Any]:
    doc = sweep(pruner={"type": "median"})
    doc["spec"]["template"]["training"] = {"maxSteps": 20}
    return doc


CASES.append(
    (
        "pruner-needs-evaluations",
        _pruner_without_evaluations(),
        None,
        "spec.pruner median needs evaluations during training; set template "
        "training.evalStrategy to steps",
    )
)


@pytest.mark.parametrize(
    ("doc", "crd_message", "pydantic_message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_crd_and_pydantic_judge_sweeps(
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


def test_an_evaluate_template_optimises_its_suites_and_cannot_be_pruned() -> None:
    evaluate = {
        "method": "evaluate",
        "model": {"name": "pvc://models/base"},
        "evaluate": {"suites": [{"name": "qa", "data": "pvc://datasets/qa.jsonl"}]},
        "output": "pvc://models/eval",
    }
    doc = sweep(
        {"path": "model.name", "type": "categorical", "choices": ["pvc://models/a", "org/b"]},
        objective={"metric": "qa.f1", "direction": "maximize"},
    )
    doc["spec"]["template"] = evaluate
    assert pydantic_errors(doc) == []
    doc["spec"]["pruner"] = {"type": "median"}
    assert any("reports qa.f1 only at the end" in e for e in pydantic_errors(doc))


def test_tunable_fields_are_the_templates_scalars_and_never_secrets() -> None:
    fields = tunable_fields()
    assert fields["training.learningRate"] == "float"
    assert fields["lora.r"] == "int"
    assert fields["training.lrSchedulerType"] == "choice"
    assert fields["lora.merge"] == "bool"
    for refused in ("data.train", "model.trustRemoteCode", "model.tokenSecretRef.name"):
        assert refused not in fields
    assert not [path for path in fields if path.split(".")[0] in ("resources", "env", "output")]


def test_example_sweeps_pass_pydantic_and_the_crd() -> None:
    paths = sorted((ROOT / "examples").glob("sweep*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        assert path.read_text().startswith("# Run as: ")
        (loaded,) = load_documents(path)
        assert isinstance(loaded, Sweep)
        assert crd_errors(yaml.safe_load(path.read_text())) == []


def test_sweep_crd_columns_show_trials_best_value_and_phase() -> None:
    columns = [c["name"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:5] == ["Trials", "Best", "Best Trial", "Phase", "Ready"]
    assert CRD["spec"]["names"]["categories"] == ["kubetrain"]
    assert CRD["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_a_pipeline_stage_sweeps_over_its_own_spec() -> None:
    search = {k: v for k, v in sweep()["spec"].items() if k != "template"}
    stage_spec = {k: v for k, v in TEMPLATE.items() if k != "output"}
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "p"},
        "spec": {
            "outputRoot": "pvc://models/p",
            "stages": [{"name": "tune", "spec": stage_spec, "sweep": search}],
        },
    }
    assert Pipeline.model_validate(doc).spec.stages[0].sweep is not None
    doc["spec"]["stages"][0]["sweep"]["objective"] = {"metric": "qa.f1"}
    with pytest.raises(ValidationError, match=r"stage tune: sweep\.objective\.metric qa\.f1"):
        Pipeline.model_validate(doc)
    doc["spec"]["stages"][0]["sweep"]["objective"] = {"metric": "eval_loss"}
    doc["metadata"]["name"] = "p" * 34  # <pipeline>-tune-5 is 41 characters
    with pytest.raises(ValidationError, match="stage tune: its TrainingRun"):
        Pipeline.model_validate(doc)
