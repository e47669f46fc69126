"""The tiny Pipeline end to end: from_scratch -> sft -> dpo through the operator.

examples/pipeline-tiny.yaml, with its data on the claim `datasets`, its outputs under
pvc://models/pipeline-tiny and each stage shortened to a few steps, is created through the
real apiserver. The operator turns each stage into a TrainingRun once the stage before it
succeeded, pointing the stage's model at that stage's output; the kubelets run each
stage's pods, which train for real.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from e2e_runs import Runs
from example_specs import EXAMPLES

from kubetrain.api import PIPELINE_PLURAL

pytestmark = pytest.mark.e2e

STAGES = ("from-scratch", "sft", "dpo")
# A few steps per stage: enough to train, save and evaluate once.
STEPS = {
    "from-scratch": {"maxSteps": 40, "saveSteps": 20, "evalSteps": 20},
    "sft": {"maxSteps": 20, "saveSteps": 10, "evalSteps": 10},
    "dpo": {"maxSteps": 10, "saveSteps": 5, "evalSteps": 5},
}


def tiny_pipeline() -> dict:
    """examples/pipeline-tiny.yaml on the claims, each stage a few steps long."""
    doc = yaml.safe_load((EXAMPLES / "pipeline-tiny.yaml").read_text())
    doc["spec"]["outputRoot"] = "pvc://models/pipeline-tiny"
    for stage in doc["spec"]["stages"]:
        data = stage["spec"]["data"]
        for key in ("train", "eval"):
            data[key] = f"pvc://datasets/{Path(data[key]).name}"
        stage["spec"]["training"].pop("numTrainEpochs", None)
        stage["spec"]["training"].update(STEPS[stage["name"]])
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
    assert row.split()[:4] == ["pipeline-tiny", "Succeeded", "3/3", "True"], row
    for stage in STAGES:
        assert stages[stage]["phase"] == "Succeeded"
        assert stages[stage]["modelUri"] == f"pvc://models/pipeline-tiny/{stage}"
        run = runs.get(f"pipeline-tiny-{stage}")
        assert run["status"]["outputs"]["modelUri"] == stages[stage]["modelUri"]
    # Each stage started from the model the stage before it wrote.
    for before, after in itertools.pairwise(STAGES):
        run = runs.get(f"pipeline-tiny-{after}")
        assert run["spec"]["model"]["name"] == stages[before]["modelUri"]
    outputs = runs.claim("models") / "pipeline-tiny"
    for stage in STAGES:
        summary = json.loads((outputs / stage / "metrics.json").read_text())
        assert summary["global_step"] == STEPS[stage]["maxSteps"]
    # The tokenizer trained from scratch is the one the later stages kept using.
    vocab = {
        stage: json.loads((outputs / stage / "tokenizer.json").read_text())["model"]["vocab"]
        for stage in STAGES
    }
    assert vocab["from-scratch"] == vocab["sft"] == vocab["dpo"]
