"""`kubetrain run pipeline.yaml` without training: order, hand-off, reuse, reruns, failures.

A stand-in for `run_locally` records each TrainingRun it is given and leaves what the
trainer leaves (a checkpoint and metrics.json), so these tests check the runner's decisions
in milliseconds; tests/trainer/test_pipeline_local.py trains the tiny pipeline for real.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain import cli
from kubetrain.api import Pipeline, TrainingRun
from kubetrain.local import LocalRun, run_pipeline_locally
from kubetrain.local.pipeline import summary_table
from kubetrain_trainer.config import ConfigError


class FakeTrainer:
    """Plays `run_locally`: records runs, writes a checkpoint and metrics.json, or fails."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.runs: list[TrainingRun] = []
        self.fail = fail or {}

    def __call__(self, run: TrainingRun, *, metrics_port: int | None = None) -> LocalRun:
        self.runs.append(run)
        output = Path(run.spec.output)
        (output / "checkpoint-4").mkdir(parents=True, exist_ok=True)
        stage = run.metadata.labels["kubetrain.dev/stage"]
        if stage in self.fail:
            return LocalRun(run.metadata.name, self.fail[stage], output)
        metrics = {"train_loss": 1.5, "eval_loss": 1.25, "runtime_seconds": 75.0}
        if run.spec.method == "dpo":
            metrics["rewards_accuracy"] = 0.75
        (output / "metrics.json").write_text(json.dumps(metrics))
        return LocalRun(run.metadata.name, 0, output, metrics)

    @property
    def stages(self) -> list[str]:
        return [r.metadata.labels["kubetrain.dev/stage"] for r in self.runs]


def stage(name: str, depends_on: tuple[str, ...] = (), method: str = "sft") -> dict[str, Any]:
    body: dict[str, Any] = {"method": method, "data": {"train": "data/train.jsonl"}}
    body["model"] = {"fromStage": depends_on[0]} if depends_on else {"name": "./base"}
    return {"name": name, "dependsOn": list(depends_on), "spec": body}


def pipeline(root: Path, *stages: dict[str, Any], **spec: Any) -> Pipeline:
    return Pipeline.model_validate(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "local"},
            "spec": {"outputRoot": str(root / "out"), "stages": list(stages), **spec},
        }
    )


CHAIN = (stage("sft"), stage("dpo", ("sft",), "dpo"))
BRANCHES = (stage("base"), stage("left", ("base",)), stage("right", ("base",)))


def run(p: Pipeline, trainer: FakeTrainer, **kwargs: Any):
    out = io.StringIO()
    result = run_pipeline_locally(p, out=out, train=trainer, **kwargs)
    return result, out.getvalue()


def test_stages_run_in_order_each_on_the_previous_model(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    result, printed = run(pipeline(tmp_path, stage("dpo", ("sft",), "dpo"), stage("sft")), trainer)
    assert trainer.stages == ["sft", "dpo"]
    sft, dpo = trainer.runs
    assert sft.metadata.name == "local-sft"
    assert dpo.spec.model.name == str(tmp_path / "out" / "sft")
    assert dpo.spec.output == str(tmp_path / "out" / "dpo")
    assert result.exit_code == 0
    assert [(s.stage, s.status) for s in result.stages] == [("sft", "trained"), ("dpo", "trained")]
    assert "==> [1/2] stage sft (sft): TrainingRun local-sft" in printed
    assert "rewards acc 0.750" in printed and "eval loss 1.25" in printed


def test_finished_stages_are_reused_unless_rerun(tmp_path: Path) -> None:
    p = pipeline(tmp_path, *CHAIN)
    run(p, FakeTrainer())
    again = FakeTrainer()
    result, printed = run(p, again)
    assert again.stages == []
    assert [s.status for s in result.stages] == ["reused", "reused"]
    assert result.stages[1].metrics["rewards_accuracy"] == 0.75  # read from metrics.json
    assert "==> [1/2] stage sft (sft): reused, " in printed
    assert "holds its finished model (--rerun trains it again)" in printed

    rerun = FakeTrainer()
    result, printed = run(p, rerun, rerun=True)
    assert rerun.stages == ["sft", "dpo"]
    assert "--rerun, so the previous run's checkpoints were removed" in printed


def test_rerun_removes_what_would_make_the_trainer_resume(tmp_path: Path) -> None:
    p = pipeline(tmp_path, stage("sft"))
    run(p, FakeTrainer())
    output = tmp_path / "out" / "sft"
    (output / "merged").mkdir()
    (output / "model.safetensors").write_text("weights")
    seen: list[list[str]] = []

    def look_then_train(tr: TrainingRun, **kwargs: Any) -> LocalRun:
        seen.append(sorted(p.name for p in output.iterdir()))
        return FakeTrainer()(tr, **kwargs)

    run_pipeline_locally(p, rerun=True, out=io.StringIO(), train=look_then_train)
    # The checkpoint, metrics.json and merged model are gone; the model is overwritten.
    assert seen == [["model.safetensors"]]


def test_a_retrained_stage_makes_the_stages_after_it_train_again(tmp_path: Path) -> None:
    p = pipeline(tmp_path, stage("base"), *CHAIN[:1], stage("dpo", ("sft",), "dpo"))
    run(p, FakeTrainer())
    (tmp_path / "out" / "sft" / "metrics.json").unlink()  # sft never finished, say
    trainer = FakeTrainer()
    result, printed = run(p, trainer)
    assert trainer.stages == ["sft", "dpo"]
    assert [s.status for s in result.stages] == ["reused", "trained", "trained"]
    assert "sft was trained again, so the previous run's checkpoints were removed" in printed


def test_a_failed_stage_stops_the_pipeline_and_is_named(tmp_path: Path) -> None:
    trainer = FakeTrainer(fail={"left": 78})
    result, printed = run(pipeline(tmp_path, *BRANCHES), trainer)
    assert trainer.stages == ["base", "left"]
    assert result.exit_code == 78
    assert [(s.stage, s.status) for s in result.stages] == [
        ("base", "trained"),
        ("left", "failed"),
        ("right", "not run"),
    ]
    assert "==> stage left failed (exit 78)" in printed
    assert "failed (exit 78)" in printed
    assert "not run (stage left failed and the failurePolicy is stopOnFailure)" in printed


def test_continue_independent_still_runs_the_other_branch(tmp_path: Path) -> None:
    p = pipeline(
        tmp_path, *BRANCHES, stage("after-left", ("left",)), failurePolicy="continueIndependent"
    )
    trainer = FakeTrainer(fail={"left": 1})
    result, _ = run(p, trainer)
    assert trainer.stages == ["base", "left", "right"]
    assert [(s.stage, s.status, s.note) for s in result.stages] == [
        ("base", "trained", ""),
        ("left", "failed", ""),
        ("right", "trained", ""),
        ("after-left", "not run", "it needs left, which did not succeed"),
    ]
    assert result.exit_code == 1


def test_spec_suspend_holds_back_a_cluster_not_kubetrain_run(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    result, _ = run(pipeline(tmp_path, *CHAIN, suspend=True), trainer)
    assert trainer.stages == ["sft", "dpo"]
    assert result.exit_code == 0


def test_cluster_only_paths_are_refused_before_anything_trains(tmp_path: Path) -> None:
    p = pipeline(tmp_path, *CHAIN)
    p.spec.stages[1].spec.data.train = "pvc://data/preference.jsonl"
    trainer = FakeTrainer()
    with pytest.raises(ConfigError, match=r"Pipeline local: stage dpo: spec\.data\.train: pvc://"):
        run(p, trainer)
    assert trainer.stages == []


def test_summary_table_lines_up() -> None:
    from kubetrain.local import StageOutcome

    table = summary_table(
        [
            StageOutcome("from-scratch", "from_scratch", "trained", Path("/o/a"),
                         {"runtime_seconds": 16.4, "train_loss": 2.3517, "eval_loss": 2.48}),
            StageOutcome("dpo", "dpo", "failed", Path("/o/b"), exit_code=78),
        ]
    )  # fmt: skip
    assert table.splitlines() == [
        "STAGE         STATUS            RUNTIME  FINAL LOSS  EVAL            OUTPUT",
        "from-scratch  trained           16s      2.352       eval loss 2.48  /o/a",
        "dpo           failed (exit 78)  -        -           -               /o/b",
    ]


def test_cli_runs_a_pipeline_and_passes_rerun(tmp_path: Path, monkeypatch, capsys) -> None:
    p = pipeline(tmp_path, *CHAIN)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(p.model_dump(mode="json", by_alias=True, exclude_none=True)))
    trainer = FakeTrainer(fail={"dpo": 75})
    monkeypatch.setattr("kubetrain.local.pipeline.run_locally", trainer)
    assert cli.main(["run", str(path), "--metrics-port", "0"]) == 75
    captured = capsys.readouterr()
    assert "==> Pipeline local (2 stages)" in captured.out
    assert "Pipeline local: stage dpo failed (exit 75)" in captured.err

    trainer.fail.clear()
    assert cli.main(["run", str(path)]) == 0
    assert trainer.stages == ["sft", "dpo", "dpo"]  # sft was finished, so it was reused
    assert cli.main(["run", str(path), "--rerun"]) == 0
    assert trainer.stages[3:] == ["sft", "dpo"]
