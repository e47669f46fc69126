"""A sweep as a pipeline stage, through the operator, with the operator killed mid-sweep.

examples/pipeline-sweep-tiny.yaml, its data on the claim `datasets` and its outputs under
pvc://models: a tiny base model, then the stage `tune`, which the operator turns into a
Sweep whose trials (TrainingRuns it owns) the kubelets train for real, then an evaluate
stage on the best trial's model. While the sweep runs, the operator is scaled to zero and
back: the study lives only in the trials, so the restarted operator rebuilds it, creates
no trial twice and ends with exactly the sweep's six trials. The grid (seed 8) starts with
the learning rate that learns, so the median pruner stops trials of the one that cannot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from e2e_runs import Operator, Runs
from example_specs import EXAMPLES
from polling import wait_for

from kubetrain.api import PIPELINE_PLURAL, SWEEP_PLURAL

pytestmark = pytest.mark.e2e

GOOD_LR = 5e-3
TRIALS = 6


def pipeline_on_claims() -> dict:
    doc = yaml.safe_load((EXAMPLES / "pipeline-sweep-tiny.yaml").read_text())
    doc["spec"]["outputRoot"] = "pvc://models/sw"
    for stage in doc["spec"]["stages"]:
        spec = stage["spec"]
        if spec["method"] == "evaluate":
            for suite in spec["evaluate"]["suites"]:
                suite["data"] = f"pvc://datasets/{Path(suite['data']).name}"
            continue
        for key in ("train", "eval"):
            spec["data"][key] = f"pvc://datasets/{Path(spec['data'][key]).name}"
    return doc


def test_a_sweep_stage_survives_an_operator_restart_and_hands_on_its_best_model(
    runs: Runs, operator: Operator
) -> None:
    runs.create("sw", pipeline_on_claims()["spec"], kind="Pipeline")
    # In the middle of the sweep: some trials exist, not all of them are done.
    wait_for(
        lambda: len((runs.status("sw-tune", SWEEP_PLURAL) if _exists(runs) else {}).get("trials")
                    or []) >= 2,
        "the sweep's first trials",
        300,
    )  # fmt: skip
    before = {r["metadata"]["name"] for r in runs.list() if r["metadata"]["name"] != "sw-base"}
    operator.scale(0)
    operator.scale(1)
    status = runs.wait_phase("sw", "Succeeded", timeout=600, plural=PIPELINE_PLURAL)

    trials = sorted(
        (r for r in runs.list() if r["metadata"].get("labels", {}).get("kubetrain.dev/sweep")),
        key=lambda r: int(r["metadata"]["labels"]["kubetrain.dev/trial"]),
    )
    names = [r["metadata"]["name"] for r in trials]
    assert names == [f"sw-tune-{n}" for n in range(TRIALS)]  # none twice, none missing
    assert before <= set(names)
    for run in trials:
        owner = run["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Sweep", "sw-tune")

    sweep = runs.status("sw-tune", SWEEP_PLURAL)
    assert sweep["phase"] == "Succeeded" and sweep["progress"] == f"{TRIALS}/{TRIALS}"
    states = [t["state"] for t in sweep["trials"]]
    assert len(states) == TRIALS and "Pruned" in states, sweep["trials"]
    best = sweep["bestTrial"]
    assert best["parameters"]["training.learningRate"] == GOOD_LR
    pruned = [t for t in sweep["trials"] if t["state"] == "Pruned"]
    for trial in pruned:  # stopped, not deleted: suspended with its checkpoints kept
        run = runs.get(trial["name"])
        assert run["spec"]["suspend"] is True
        assert run["metadata"]["annotations"]["kubetrain.dev/pruned-at-step"] == str(
            trial["prunedAtStep"]
        )

    # The evaluate stage ran on the best trial's model.
    stages = {s["name"]: s for s in status["stages"]}
    assert stages["tune"]["modelUri"] == best["modelUri"] == f"pvc://models/sw/tune/{best['name']}"
    evaluate = runs.get("sw-evaluate")
    assert evaluate["spec"]["model"]["name"] == best["modelUri"]
    assert "perplexity.perplexity" in evaluate["status"]["outputs"]["metrics"]

    # What `kubectl get sweeps` shows, from the CRD's printer columns.
    header, row = runs.cluster.kubectl("get", "sweeps", "-n", runs.namespace).stdout.splitlines()
    assert header.split()[:6] == ["NAME", "TRIALS", "BEST", "BEST", "TRIAL", "PHASE"], header
    cells = row.split()
    assert cells[0] == "sw-tune" and cells[1] == f"{TRIALS}/{TRIALS}", row
    assert cells[3] == best["name"] and cells[4] == "Succeeded", row


def _exists(runs: Runs) -> bool:
    return any(s["metadata"]["name"] == "sw-tune" for s in runs.list(SWEEP_PLURAL))
