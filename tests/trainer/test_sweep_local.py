"""`kubetrain run` of a Sweep: trials as trainer processes, the operator's plan deciding.

The tiny example sweep (examples/sweep-tiny.yaml: a grid over a learning rate that learns
and one that cannot, and three LoRA ranks; 6 trials, 2 at a time, the median pruner) runs
here on the session's tiny base model. It must find the learning rate that learns, prune
trials of the one that cannot at an early evaluation (each stops with a checkpoint, as a
suspended run does; a trial that finished before its SIGTERM landed still counts as pruned),
and write the sweep's report. The trainer's side of the pruner's
history, every evaluation in its metrics endpoint and metrics.json, is tested below too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from example_specs import EXAMPLES, REPO
from prometheus_client import generate_latest

from kubetrain.api import Sweep
from kubetrain.local.sweep import TRIAL_LOG, run_sweep_locally
from kubetrain.status import parse_trainer_metrics
from kubetrain_trainer import contract
from kubetrain_trainer.contract import METRICS_FILE, REPORT_FILE, REPORT_PLOTS_DIR
from kubetrain_trainer.metrics import PrometheusCallback, eval_history

GOOD_LR = 5e-3


def tiny_sweep(base_model: Path, output: Path) -> Sweep:
    doc = yaml.safe_load((EXAMPLES / "sweep-tiny.yaml").read_text())
    template = doc["spec"]["template"]
    template["model"]["name"] = str(base_model)
    for key in ("train", "eval"):
        template["data"][key] = str(REPO / template["data"][key])
    template["output"] = str(output)
    return Sweep.model_validate(doc)


def test_the_tiny_sweep_finds_the_learning_rate_that_learns_and_prunes(
    base_model: Path, tmp_path: Path
) -> None:
    result = run_sweep_locally(tiny_sweep(base_model, tmp_path / "sweep"))
    assert result.phase == "Succeeded", result.message
    trials = {t.name: t for t in result.trials}
    assert sorted(trials) == [f"sweep-tiny-{n}" for n in range(6)]
    assert result.best is not None
    assert result.best.parameters["training.learningRate"] == GOOD_LR
    pruned = [t for t in result.trials if t.state == "Pruned"]
    # A trial that cannot learn lags at its first evaluation (a good one may lag too).
    assert [t for t in pruned if t.parameters["training.learningRate"] != GOOD_LR], [
        (t.name, t.state, t.parameters, t.intermediate) for t in result.trials
    ]
    for t in pruned:
        assert t.pruned_at_step is not None and t.pruned_at_step < 20
        assert (tmp_path / "sweep" / t.name / TRIAL_LOG).is_file()
    complete = [t for t in result.trials if t.state == "Complete"]
    assert all(t.value is not None and t.intermediate for t in complete)
    best_dir = Path(result.best.model_uri or "")
    assert best_dir == tmp_path / "sweep" / result.best.name
    assert json.loads((best_dir / METRICS_FILE).read_text())["eval_loss"] == result.best.value
    assert result.report == tmp_path / "sweep" / REPORT_FILE
    plots = sorted(p.name for p in (tmp_path / "sweep" / REPORT_PLOTS_DIR).iterdir())
    assert "sweep-parallel-coordinates.png" in plots and "sweep-objective.png" in plots


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
