"""The tiny Pipeline end to end: from_scratch -> sft -> evaluate -> (gate) dpo, via the operator.

examples/pipeline-tiny.yaml, with its data on the claim `datasets`, its outputs under
pvc://models/pipeline-tiny and each stage shortened to a few steps, is created through the
real apiserver. The operator turns each stage into a TrainingRun once the stage before it
succeeded, pointing the stage's model at that stage's output; the kubelets run each
stage's pods, which train (and evaluate) for real. The evaluate stage's metrics reach the
pipeline through its run's status, where dpo's gate reads them: a gate that passes lets dpo
run, one that fails ends the pipeline with GateFailed before dpo is created.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from e2e_runs import Runs
from example_specs import EXAMPLES

from kubetrain.api import PIPELINE_PLURAL

pytestmark = pytest.mark.e2e

STAGES = ("from-scratch", "sft", "evaluate", "dpo")
TRAINED = ("from-scratch", "sft", "dpo")
# A few steps per stage: enough to train, save and evaluate once.
STEPS = {
    "from-scratch": {"maxSteps": 40, "saveSteps": 20, "evalSteps": 20},
    "sft": {"maxSteps": 20, "saveSteps": 10, "evalSteps": 10},
    "dpo": {"maxSteps": 10, "saveSteps": 5, "evalSteps": 5},
}


# Just enough steps to write each model, for a test that stops at the evaluation.
QUICK = {
    "from-scratch": {"maxSteps": 6, "saveSteps": 6, "evalSteps": 6},
    "sft": {"maxSteps": 4, "saveSteps": 4, "evalSteps": 4},
    "dpo": {"maxSteps": 2, "saveSteps": 2, "evalSteps": 2},
}


def tiny_pipeline(gate_max: float = 1e6, steps: dict = STEPS) -> dict:
    """examples/pipeline-tiny.yaml on the claims, each stage a few steps long, every suite
    a few rows, and dpo's gate at `gate_max` (a few steps leave the perplexity high)."""
    doc = yaml.safe_load((EXAMPLES / "pipeline-tiny.yaml").read_text())
    doc["spec"]["outputRoot"] = "pvc://models/pipeline-tiny"
    for stage in doc["spec"]["stages"]:
        if stage["spec"]["method"] == "evaluate":
            for suite in stage["spec"]["evaluate"]["suites"]:
                suite["data"] = f"pvc://datasets/{Path(suite['data']).name}"
                suite["maxSamples"] = 4
            continue
        data = stage["spec"]["data"]
        for key in ("train", "eval"):
            data[key] = f"pvc://datasets/{Path(data[key]).name}"
        stage["spec"]["training"].pop("numTrainEpochs", None)
        stage["spec"]["training"].update(steps[stage["name"]])
    doc["spec"]["stages"][-1]["gate"][0]["max"] = gate_max
    return doc


def test_tiny_pipeline_trains_each_stage_from_the_last(runs: Runs) -> None:
    pipeline = tiny_pipeline()
    runs.create("pipeline-tiny", pipeline["spec"], kind="Pipeline")
    status = runs.wait_phase("pipeline-tiny", "Succeeded", timeout=420, plural=PIPELINE_PLURAL)
    stages = {stage["name"]: stage for stage in status["stages"]}
    assert list(stages) == list(STAGES)
    # What `kubectl get pipelines` shows, from the CRD's printer columns.
    header, row = runs.cluster.kubectl("get", "pipelines", "-n", runs.namespace).stdout.splitlines()
    assert header.split() == ["NAME", "STAGE", "PHASE", "PROGRESS", "READY", "AGE"]
    # STAGE is empty once every stage is done.
    assert row.split()[:4] == ["pipeline-tiny", "Succeeded", "4/4", "True"], row
    for stage in STAGES:
        assert stages[stage]["phase"] == "Succeeded"
    for stage in TRAINED:
        assert stages[stage]["modelUri"] == f"pvc://models/pipeline-tiny/{stage}"
        run = runs.get(f"pipeline-tiny-{stage}")
        assert run["status"]["outputs"]["modelUri"] == stages[stage]["modelUri"]
    # Each stage started from the model the stage before it wrote; evaluate scored sft's.
    for before, after in (("from-scratch", "sft"), ("sft", "evaluate"), ("sft", "dpo")):
        run = runs.get(f"pipeline-tiny-{after}")
        assert run["spec"]["model"]["name"] == stages[before]["modelUri"]
    outputs = runs.claim("models") / "pipeline-tiny"
    for stage in TRAINED:
        summary = json.loads((outputs / stage / "metrics.json").read_text())
        assert summary["global_step"] == STEPS[stage]["maxSteps"]
    # The evaluation's metrics.json reached the cluster: the run's status (through rank 0's
    # termination message), the pipeline's stage status, and kubectl's Metric column.
    scores = json.loads((outputs / "evaluate" / "metrics.json").read_text())
    evaluated = runs.get("pipeline-tiny-evaluate")["status"]["outputs"]
    assert evaluated["metrics"]["perplexity.perplexity"] == pytest.approx(
        scores["perplexity.perplexity"], rel=1e-5
    )
    assert set(stages["evaluate"]["metrics"]) >= {"qa.exact_match", "safety.refusal_rate"}
    assert evaluated["headline"].startswith("perplexity.perplexity=")
    listed = runs.cluster.kubectl("get", "tr", "pipeline-tiny-evaluate", "-n", runs.namespace)
    header, row = listed.stdout.splitlines()
    assert "METRIC" in header.split() and "perplexity.perplexity=" in row, listed.stdout
    # The tokenizer trained from scratch is the one the later stages kept using.
    vocab = {
        stage: json.loads((outputs / stage / "tokenizer.json").read_text())["model"]["vocab"]
        for stage in TRAINED
    }
    assert vocab["from-scratch"] == vocab["sft"] == vocab["dpo"]


def test_a_failed_gate_fails_the_pipeline_before_its_stage_starts(runs: Runs) -> None:
    pipeline = tiny_pipeline(gate_max=1.0, steps=QUICK)  # no perplexity is below 1
    runs.create("pipeline-tiny", pipeline["spec"], kind="Pipeline")
    status = runs.wait_phase("pipeline-tiny", "Failed", timeout=420, plural=PIPELINE_PLURAL)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "GateFailed"
    assert "perplexity.perplexity of stage evaluate is" in ready["message"]
    assert "above the maximum 1" in ready["message"]
    stages = {stage["name"]: stage for stage in status["stages"]}
    assert [stages[s]["phase"] for s in STAGES] == ["Succeeded"] * 3 + ["Skipped"]
    assert stages["dpo"]["reason"] == "GateFailed"
    # The gated stage was never created.
    names = [run["metadata"]["name"] for run in runs.list()]
    assert "pipeline-tiny-dpo" not in names and "pipeline-tiny-evaluate" in names
