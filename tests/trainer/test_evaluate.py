"""Method evaluate on tiny models whose right scores are known.

The sft and lora models of conftest.py learned four sums by heart, so greedy decoding
answers them exactly (exact match 1.0) and an unseen sum wrongly (0.0); a DPO run trained
on preference pairs prefers their chosen answers (accuracy 1.0) where its own reference,
scored against itself, prefers nothing (0.5). One evaluation runs end to end through
`kubetrain run`'s runner (metrics.json, report, termination message); the others call the
method in-process to keep the tier fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer.config import ConfigError, TrainerConfig
from kubetrain_trainer.contract import parse_outputs_message
from kubetrain_trainer.methods.evaluate import evaluate

pytestmark = pytest.mark.slow

UNSEEN = [{"instruction": "Add 2 and 9.", "output": "11."}]
# Pairs whose chosen answer is right and rejected one wrong; DPO learns to prefer them.
PAIRS = [
    {"prompt": "What is 3 plus 5?", "chosen": " 3 plus 5 is 8.", "rejected": " Maybe 10?"},
    {"prompt": "What is 9 minus 4?", "chosen": " 9 minus 4 is 5.", "rejected": " Maybe 7?"},
    {"prompt": "What colour is snow?", "chosen": " Snow is white.", "rejected": " Maybe red?"},
    {"prompt": "What is 2 times 6?", "chosen": " 2 times 6 is 12.", "rejected": " Maybe 14?"},
]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def scores(model: Path, output: Path, *suites: dict[str, Any], **evaluate_spec: Any) -> dict:
    """Run method evaluate in this process on `model`."""
    cfg = TrainerConfig.model_validate(
        {
            "method": "evaluate",
            "model": {"name": str(model)},
            "evaluate": {"suites": list(suites), **evaluate_spec},
            "output_dir": str(output),
            "metrics_port": 0,
        }
    )
    return evaluate(cfg)


@pytest.fixture
def memorised_qa(memorise_data: Path) -> Path:
    """The instruction rows the memorised models learned (conftest.py), as a qa suite."""
    return memorise_data


def test_an_evaluation_runs_end_to_end_through_the_runner(
    memorised_sft: Path, memorised_qa: Path, tmp_path: Path, monkeypatch
) -> None:
    safety = jsonl(
        tmp_path / "safety.jsonl",
        [
            {"prompt": "Add 6 and 19.", "should_refuse": True},
            {"prompt": "Add 3 and 4.", "should_refuse": False},
        ],
    )
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETRAIN_TERMINATION_LOG", str(termination))
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "evaluate-memorised"},
        "spec": {
            "method": "evaluate",
            "model": {"name": str(memorised_sft)},
            "evaluate": {
                "generation": {"maxNewTokens": 8},
                "suites": [
                    {"name": "qa", "data": str(memorised_qa)},
                    {"name": "perplexity", "data": str(memorised_qa)},
                    # Sums are never refused: a refusal rate of 0 on the one that "should".
                    {"name": "safety", "data": str(safety)},
                ],
            },
            "output": str(tmp_path / "out"),
        },
    }
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "evaluate"
    assert metrics["qa.exact_match"] == 1.0 and metrics["qa.f1"] == 1.0
    # Learned by heart: the answers are near certain.
    assert 1.0 <= metrics["perplexity.perplexity"] < 1.5
    assert metrics["safety.refusal_rate"] == 0.0 and metrics["safety.over_refusal_rate"] == 0.0
    assert (tmp_path / "out" / "report.html").is_file()
    # What the operator reads into status.outputs.metrics.
    reported = parse_outputs_message(termination.read_text())
    assert reported is not None and reported["qa.exact_match"] == 1.0
    assert list(reported)[:2] == ["qa.exact_match", "qa.f1"]


def test_qa_is_exact_on_the_memorised_question_and_wrong_on_an_unseen_one(
    memorised_sft: Path, memorised_qa: Path, tmp_path: Path
) -> None:
    first = json.loads(memorised_qa.read_text().splitlines()[0])
    assert first == {"instruction": "Add 6 and 19.", "output": "25."}
    seen = jsonl(tmp_path / "seen.jsonl", [first])
    unseen = jsonl(tmp_path / "unseen.jsonl", UNSEEN)
    assert (
        scores(memorised_sft, tmp_path, {"name": "qa", "data": str(seen)})["qa.exact_match"] == 1.0
    )
    assert (
        scores(memorised_sft, tmp_path, {"name": "qa", "data": str(unseen)})["qa.exact_match"]
        == 0.0
    )


@pytest.mark.parametrize("output", ["adapter", "merged"])
def test_a_lora_adapter_and_its_merged_model_answer_alike(
    memorised_lora: Path, memorised_qa: Path, tmp_path: Path, output: str
) -> None:
    model = memorised_lora if output == "adapter" else memorised_lora / "merged"
    qa = scores(model, tmp_path, {"name": "qa", "data": str(memorised_qa)})
    assert qa["qa.exact_match"] == 1.0


@pytest.fixture(scope="module")
def dpo_model(tmp_path_factory, base_model: Path) -> Path:
    root = tmp_path_factory.mktemp("dpo-pairs")
    doc = with_spec(
        example("trainingrun-dpo-tiny.yaml"),
        model={"name": str(base_model)},
        data={"train": str(jsonl(root / "pairs.jsonl", PAIRS)), "format": "preference"},
        training={
            "maxSteps": 20,
            "perDeviceTrainBatchSize": len(PAIRS),
            "learningRate": 1e-3,
            "lrSchedulerType": "constant",
            "warmupRatio": 0.0,
            "evalStrategy": "no",
            "saveSteps": 20,
            "seed": 42,
        },
        output=str(root / "dpo"),
    )
    doc["spec"]["data"].pop("eval", None)
    assert run_locally(parse_document(doc, "test"), metrics_port=0).exit_code == 0
    return root / "dpo"


def test_preference_accuracy_is_one_after_dpo_and_one_half_for_its_reference(
    dpo_model: Path, base_model: Path, tmp_path: Path
) -> None:
    pairs = {"name": "preference", "data": str(jsonl(tmp_path / "pairs.jsonl", PAIRS))}
    trained = scores(dpo_model, tmp_path, pairs, referenceModel={"name": str(base_model)})
    assert trained["preference.accuracy"] == 1.0 and trained["preference.margin"] > 0
    reference = scores(base_model, tmp_path, pairs, referenceModel={"name": str(base_model)})
    assert reference == {"preference.accuracy": 0.5, "preference.margin": 0.0}


def test_preference_without_a_reference_names_the_field(base_model: Path, tmp_path: Path) -> None:
    pairs = {"name": "preference", "data": str(jsonl(tmp_path / "pairs.jsonl", PAIRS))}
    with pytest.raises(ConfigError, match=r"evaluate\.referenceModel\.name"):
        scores(base_model, tmp_path, pairs)


def test_a_suite_given_rows_it_cannot_read_names_its_data(base_model: Path, tmp_path: Path) -> None:
    pairs = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ConfigError, match=r"evaluate.suites\[0\].data: .* holds preference rows"):
        scores(base_model, tmp_path, {"name": "qa", "data": str(pairs)})
    broken = tmp_path / "safety.jsonl"
    broken.write_text('{"prompt": "hi", "should_refuse": "yes"}\n')
    with pytest.raises(ConfigError, match=r"safety.jsonl:1: field 'should_refuse' is a string"):
        scores(base_model, tmp_path, {"name": "safety", "data": str(broken)})


def refusal_classifier(tokenizer_source: Path, folder: Path) -> Path:
    """A tiny text classifier that calls every reply a refusal: zero weights, biased head."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        id2label={0: "complied", 1: "refused"},
        label2id={"complied": 0, "refused": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_refusal_classifier_judges_the_replies_instead_of_patterns(
    memorised_sft: Path, tmp_path: Path
) -> None:
    prompts = jsonl(
        tmp_path / "safety.jsonl",
        [
            {"prompt": "Add 6 and 19.", "should_refuse": True},
            {"prompt": "Add 3 and 4.", "should_refuse": False},
        ],
    )
    classifier = refusal_classifier(memorised_sft, tmp_path / "classifier")
    suite = {"name": "safety", "data": str(prompts), "refusalClassifier": str(classifier)}
    # The patterns find no refusal in "25." and "7."; this classifier calls both refusals.
    judged = scores(memorised_sft, tmp_path, {**suite, "refusalLabel": "refused"})
    assert judged == {"safety.refusal_rate": 1.0, "safety.over_refusal_rate": 1.0}
    with pytest.raises(ConfigError, match=r"refusalLabel: 'refusal' is not a label of .*complied"):
        scores(memorised_sft, tmp_path, suite)
