"""`make demo` for real: the tiny from_scratch -> sft -> dpo pipeline trains end to end.

The shipped examples/pipeline-tiny.yaml runs through `kubetrain run` with fewer steps. The
test checks the hand-off where it happens: the TrainerConfig each stage's trainer read
(kubetrain-trainer-config.yaml in its output) names the previous stage's output as its
model, and that model is what the stage loaded. A second run reuses every finished stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from example_specs import EXAMPLES, REPO

from kubetrain import cli
from kubetrain.local.pipeline import GATE_FAILED_EXIT
from kubetrain.local.runner import CONFIG_FILE
from kubetrain_trainer.config import load_trainer_config

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """examples/pipeline-tiny.yaml with STEPS steps per stage and outputs in a temp folder."""
    doc = yaml.safe_load((EXAMPLES / "pipeline-tiny.yaml").read_text())
    root = tmp_path_factory.mktemp("pipeline")
    doc["spec"]["outputRoot"] = str(root / "outputs")
    for stage in doc["spec"]["stages"]:
        if stage["spec"]["method"] == "evaluate":
            for suite in stage["spec"]["evaluate"]["suites"]:
                suite["data"] = str(REPO / suite["data"])
                suite["maxSamples"] = 4
            continue
        data = stage["spec"]["data"]
        for key in ("train", "eval"):
            data[key] = str(REPO / data[key])
        stage["spec"]["training"].update(maxSteps=STEPS, evalSteps=STEPS, saveSteps=STEPS)
    # A few steps leave the model far from the shipped gate's perplexity; this one lets it by.
    doc["spec"]["stages"][-1]["gate"][0]["max"] = 1e6
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def stage_output(path: Path, stage: str) -> Path:
    return path.parent / "outputs" / stage


def vocabulary(model_dir: Path) -> dict[str, int]:
    return json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]


def test_the_tiny_pipeline_hands_each_model_to_the_next_stage(tiny_pipeline: Path, capsys):
    assert cli.main(["run", str(tiny_pipeline), "--metrics-port", "0"]) == 0
    scratch, sft, dpo = (stage_output(tiny_pipeline, s) for s in ("from-scratch", "sft", "dpo"))
    for output in (scratch, sft, dpo):
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["global_step"] == STEPS, output

    # The evaluate stage scored the SFT model on every suite, its base as the reference.
    evaluate = stage_output(tiny_pipeline, "evaluate")
    eval_config = load_trainer_config(evaluate / CONFIG_FILE)
    assert eval_config.model.name == str(sft)
    assert eval_config.evaluate is not None
    assert eval_config.evaluate.reference_model.name == str(scratch)
    scores = json.loads((evaluate / "metrics.json").read_text())
    for key in (
        "perplexity.perplexity", "qa.exact_match", "summarization.rouge_l", "translation.bleu",
        "preference.accuracy", "safety.refusal_rate",
    ):  # fmt: skip
        assert key in scores, key
    assert 1 < scores["perplexity.perplexity"] < 1e6

    sft_config = load_trainer_config(sft / CONFIG_FILE)
    dpo_config = load_trainer_config(dpo / CONFIG_FILE)
    assert sft_config.model.name == str(scratch)
    assert dpo_config.method == "dpo"
    assert dpo_config.model.name == str(sft)
    assert dpo_config.dpo is not None and dpo_config.dpo.reference_model.name is None
    assert dpo_config.run_name == "pipeline-tiny-dpo"

    # What DPO trained is the SFT model: the tiny shape, and the tokenizer from_scratch
    # trained on the bundled text (no hub model has this 512-token vocabulary).
    assert json.loads((dpo / "config.json").read_text())["hidden_size"] == 64
    assert vocabulary(dpo) == vocabulary(sft) == vocabulary(scratch)
    assert len(vocabulary(scratch)) == 512

    printed = capsys.readouterr().out
    table = printed[printed.index("Pipeline pipeline-tiny:") :].splitlines()
    assert table[1].split() == ["STAGE", "STATUS", "RUNTIME", "FINAL", "LOSS", "EVAL", "OUTPUT"]
    assert [line.split()[:2] for line in table[2:6]] == [
        ["from-scratch", "trained"],
        ["sft", "trained"],
        ["evaluate", "trained"],
        ["dpo", "trained"],
    ]
    assert "perplexity.perplexity=" in table[4]
    assert "rewards acc" in table[5] and str(dpo) in table[5]


def test_a_second_run_reuses_the_finished_stages(tiny_pipeline: Path, capsys):
    dpo_metrics = stage_output(tiny_pipeline, "dpo") / "metrics.json"
    if not dpo_metrics.exists():
        pytest.skip("needs the first test's finished pipeline")
    written = dpo_metrics.stat().st_mtime_ns
    assert cli.main(["run", str(tiny_pipeline), "--metrics-port", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": reused, ") == printed.count("holds its finished model") == 4
    assert "TrainingRun pipeline-tiny-" not in printed  # nothing was started
    assert dpo_metrics.stat().st_mtime_ns == written


def test_a_failed_gate_stops_the_pipeline_before_its_stage(tiny_pipeline: Path, capsys):
    if not (stage_output(tiny_pipeline, "evaluate") / "metrics.json").exists():
        pytest.skip("needs the first test's finished pipeline")
    doc = yaml.safe_load(tiny_pipeline.read_text())
    doc["spec"]["stages"][-1]["gate"][0]["max"] = 1.0  # no model has a perplexity below 1
    strict = tiny_pipeline.with_name("strict.yaml")
    strict.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["run", str(strict), "--metrics-port", "0"]) == GATE_FAILED_EXIT
    printed = capsys.readouterr().out
    # The evaluation is reused; DPO does not run, although its output holds a model.
    assert printed.count(": reused, ") == 3
    assert "stage dpo" not in printed.split("Pipeline pipeline-tiny:")[0]
    assert (
        "GateFailed: stage dpo: gate failed: perplexity.perplexity of stage evaluate is" in printed
    )
    assert "above the maximum 1" in printed
    table = printed[printed.index("Pipeline pipeline-tiny:") :].splitlines()
    assert table[5].split()[:3] == ["dpo", "not", "run"], printed
