"""`kubetrain run` of a Sweep: trials as trainer processes, the operator's plan deciding.

The tiny example sweep (examples/sweep-tiny.yaml: a grid over a learning rate that learns
and one that cannot, and three LoRA ranks; 6 trials, 2 at a time, the median pruner) runs
here through `kubetrain run` on the session's tiny base model, and as the middle stage of
examples/pipeline-sweep-tiny.yaml, whose evaluate stage must load the best trial's model. It
must find the learning rate that learns, prune trials of the one that cannot at an early
evaluation (each stops with a checkpoint, as a suspended run does; a trial that finished
before its SIGTERM landed still counts as pruned), and write the sweep's report. The
trainer's side of the pruner's history, every evaluation in its metrics endpoint and
metrics.json, is tested below too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from example_specs import EXAMPLES, REPO
from prometheus_client import generate_latest

from kubetrain.api import Pipeline
from kubetrain.cli import main
from kubetrain.local import run_pipeline_locally
from kubetrain.local.runner import CONFIG_FILE
from kubetrain.local.sweep import TRIAL_LOG
from kubetrain.status import parse_trainer_metrics
from kubetrain_trainer import contract
from kubetrain_trainer.contract import METRICS_FILE, REPORT_FILE, REPORT_PLOTS_DIR
from kubetrain_trainer.metrics import PrometheusCallback, eval_history
from kubetrain_trainer.report import read_sweep

GOOD_LR = 5e-3


def tiny_sweep_file(base_model: Path, output: Path) -> Path:
    """examples/sweep-tiny.yaml on the session's base model, writing under `output`."""
    doc = yaml.safe_load((EXAMPLES / "sweep-tiny.yaml").read_text())
    template = doc["spec"]["template"]
    template["model"]["name"] = str(base_model)
    for key in ("train", "eval"):
        template["data"][key] = str(REPO / template["data"][key])
    template["output"] = str(output)
    path = output.parent / "sweep-tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubetrain_run_of_the_tiny_sweep_finds_the_learning_rate_that_learns_and_prunes(
    base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "sweep"
    assert main(["run", str(tiny_sweep_file(base_model, folder))]) == 0
    said = capsys.readouterr().out
    assert "==> Sweep sweep-tiny Succeeded: 6/6 trials done" in said
    assert f"report: {folder / REPORT_FILE}" in said
    sweep = read_sweep(folder)
    assert sweep is not None
    trials = {t.name: t for t in sweep.trials}
    assert sorted(trials) == [f"sweep-tiny-{n}" for n in range(6)]
    assert sweep.best is not None
    best = trials[sweep.best]
    assert best.parameters["training.learningRate"] == GOOD_LR
    pruned = [t for t in sweep.trials if t.state == "Pruned"]
    # A trial that cannot learn lags at its first evaluation (a good one may lag too).
    assert [t for t in pruned if t.parameters["training.learningRate"] != GOOD_LR], [
        (t.name, t.state, t.parameters, t.intermediate) for t in sweep.trials
    ]
    for t in pruned:
        assert t.pruned_at_step is not None and t.pruned_at_step < 20
        assert (folder / t.name / TRIAL_LOG).is_file()
    complete = [t for t in sweep.trials if t.state == "Complete"]
    assert all(t.value is not None and t.intermediate for t in complete)
    # The objective as the trial's outputs.metrics carry it (6 significant digits).
    written = json.loads((folder / best.name / METRICS_FILE).read_text())["eval_loss"]
    assert written == pytest.approx(best.value, rel=1e-5)
    plots = sorted(p.name for p in (folder / REPORT_PLOTS_DIR).iterdir())
    assert "sweep-parallel-coordinates.png" in plots and "sweep-objective.png" in plots


def test_a_sweep_stage_hands_its_best_trials_model_to_the_next_stage(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "pipeline-sweep-tiny.yaml").read_text())
    doc["spec"]["outputRoot"] = str(tmp_path / "p")
    for stage in doc["spec"]["stages"]:
        spec = stage["spec"]
        for key in ("train", "eval"):
            if key in (spec.get("data") or {}):
                spec["data"][key] = str(REPO / spec["data"][key])
        for suite in (spec.get("evaluate") or {}).get("suites") or []:
            suite["data"] = str(REPO / suite["data"])
    result = run_pipeline_locally(Pipeline.model_validate(doc))
    assert result.exit_code == 0, [(s.stage, s.status, s.exit_code) for s in result.stages]
    stages = {s.stage: s for s in result.stages}
    sweep = read_sweep(tmp_path / "p" / "tune")
    assert sweep is not None and sweep.best is not None
    best_dir = tmp_path / "p" / "tune" / sweep.best
    assert stages["tune"].model_uri == str(best_dir)
    evaluated = yaml.safe_load((tmp_path / "p" / "evaluate" / CONFIG_FILE).read_text())
    assert evaluated["model"]["name"] == str(best_dir)
    assert "perplexity.perplexity" in stages["evaluate"].metrics


def test_every_evaluation_reaches_the_metrics_endpoint_and_metrics_json() -> None:
    callback = PrometheusCallback("sft", "history")
    log_history = []
    for step in range(5, 5 * (contract.MAX_EVAL_HISTORY + 3), 5):
        entry = {"eval_loss": 10.0 / step, "step": step}
        log_history.append(entry)
        callback._apply(entry, step)  # what on_log does for an evaluation
    parsed = parse_trainer_metrics(generate_latest(callback.registry).decode())
    steps = [step for step, _ in parsed.eval_history]
    assert len(steps) == contract.MAX_EVAL_HISTORY  # the newest, oldest dropped
    assert steps[-1] == 5 * (contract.MAX_EVAL_HISTORY + 2)
    last_step, last = parsed.eval_history[-1]
    assert last["eval_loss"] == 10.0 / last_step
    assert math.isclose(last["perplexity"], math.exp(10.0 / last_step))
    written = eval_history("sft", log_history)
    assert [p["step"] for p in written] == steps
    assert written[-1]["eval_loss"] == last["eval_loss"]
