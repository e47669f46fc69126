"""The run report from an output's files: report.html, its PNG plots, `kubetrain report`.

Each test writes a metrics.json and a trainer_state.json with known numbers, as the trainer
leaves them, and reads the numbers back out of the HTML by the metrics.json key each value
cell names (`data-metric`). tests/trainer/test_report_browser.py opens a real run's report
in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from kubetrain import cli
from kubetrain.api import TrainingRun
from kubetrain.local import LocalRun, run_pipeline_locally
from kubetrain.local import pipeline as local_pipeline
from kubetrain_trainer.contract import (
    PIPELINE_STAGES_FILE,
    REPORT_FILE,
    REPORT_PLOTS_DIR,
    TRAINER_STATE_FILE,
    TrainerMetricsFile,
)
from kubetrain_trainer.report import (
    PipelineStage,
    ReportError,
    plan_plots,
    tokens_per_second_curve,
    write_pipeline_report,
    write_run_report,
)

# What transformers logs with token counting on: training events carry the tokens seen and
# the seconds since train() began; evaluation events and the final summary carry neither.
HISTORY = [
    {"loss": 3.5, "learning_rate": 1e-3, "num_input_tokens_seen": 1000, "train_runtime": 2.0,
     "train_tokens_per_second": 500.0, "epoch": 0.33, "step": 5},
    {"loss": 3.0, "learning_rate": 8e-4, "num_input_tokens_seen": 2000, "train_runtime": 2.5,
     "train_tokens_per_second": 800.0, "epoch": 0.67, "step": 10},
    {"eval_loss": 3.1, "eval_runtime": 0.25, "num_input_tokens_seen": 2000, "step": 10},
    {"loss": 2.5, "learning_rate": 5e-4, "num_input_tokens_seen": 3000, "train_runtime": 3.5,
     "train_tokens_per_second": 857.1, "epoch": 1.0, "step": 15},
    {"train_runtime": 3.6, "train_loss": 3.0, "total_flos": 12.0, "epoch": 1.0, "step": 15},
    {"eval_loss": 2.75, "eval_runtime": 0.25, "num_input_tokens_seen": 3000, "step": 15},
]  # fmt: skip
SFT_METRICS = {
    "method": "sft",
    "global_step": 15,
    "train_loss": 2.5,
    "train_loss_mean": 3.0,
    "eval_loss": 2.75,
    "perplexity": 15.642631884188171,
    "tokens_total": 3000,
    "tokens_per_second": 833.3333,
    "runtime_seconds": 12.4,
    "train_runtime_seconds": 3.6,
}
EVALUATE_METRICS = {
    "method": "evaluate",
    "runtime_seconds": 3.0,
    "summarization.rouge1": 0.3125,
    "qa.f1": 0.75,
    "qa.exact_match": 0.5,
}


def write_output(folder: Path, metrics: dict, history: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        state = {"global_step": metrics.get("global_step"), "log_history": history}
        (folder / TRAINER_STATE_FILE).write_text(json.dumps(state))
    return folder


class ReportPage(HTMLParser):
    """What report.html shows: value cells by (stage, metrics.json key), images, links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: dict[tuple[str | None, str], str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.notes: list[str] = []
        self._open: tuple[str | None, str] | str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and a.get("data-metric"):
            self._open = (a.get("data-stage"), a["data-metric"] or "")
            self.cells[self._open] = ""
        elif tag == "p" and a.get("class") == "note":
            self._open = "note"
            self.notes.append("")
        elif tag == "img":
            self.images.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")

    def handle_data(self, data: str) -> None:
        if self._open == "note":
            self.notes[-1] += data
        elif isinstance(self._open, tuple):
            self.cells[self._open] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "p"):
            self._open = None

    def value(self, key: str, stage: str | None = None) -> str:
        return self.cells[(stage, key)]


def read_page(path: Path) -> ReportPage:
    return ReportPage(path.read_text())


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # a truncated or corrupt PNG raises here
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_the_report_shows_the_run_numbers_and_its_plots(tmp_path: Path):
    output = write_output(tmp_path / "sft", SFT_METRICS, HISTORY)
    path = write_run_report(output, run_name="sft-tiny")
    assert path == output / REPORT_FILE
    page = read_page(path)
    shown = {key: page.value(key) for key in SFT_METRICS}
    assert shown == {
        "method": "sft",
        "global_step": "15",
        "train_loss": "2.5",
        "train_loss_mean": "3",
        "eval_loss": "2.75",
        "perplexity": "15.64",
        "tokens_total": "3,000",
        "tokens_per_second": "833",
        "runtime_seconds": "0:00:12",
        "train_runtime_seconds": "0:00:04",
    }
    assert "<h1>sft-tiny</h1>" in path.read_text()
    assert page.notes == []  # the final history is there: nothing to warn about

    # Plots as PNG files, and the same bytes embedded: the page needs nothing beside it.
    plots = sorted(p.name for p in (output / REPORT_PLOTS_DIR).iterdir())
    assert plots == ["learning_rate.png", "loss.png", "tokens_per_second.png"]
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    files = {name: (output / REPORT_PLOTS_DIR / name).read_bytes() for name in plots}
    assert sorted(embedded) == sorted(files.values())
    for data in files.values():
        width, height = png_size(data)
        assert width > 100 and height > 100
    assert not re.search(r"(src|href)=\"(https?:)?//", path.read_text())
    assert "<script" not in path.read_text()


def test_tokens_per_second_is_measured_between_logging_steps():
    assert tokens_per_second_curve(HISTORY) == [(5, 500.0), (10, 2000.0), (15, 1000.0)]
    # A resume restarts train()'s clock: its first interval is that event's own average.
    resumed = {"loss": 2.0, "num_input_tokens_seen": 3400, "train_runtime": 0.5,
               "train_tokens_per_second": 800.0, "step": 20}  # fmt: skip
    assert tokens_per_second_curve([*HISTORY, resumed])[-1] == (20, 800.0)


def test_the_loss_plot_has_train_and_eval_lines():
    loss = plan_plots(HISTORY, TrainerMetricsFile.model_validate(SFT_METRICS))[0]
    assert loss.file_name == "loss.png"
    assert loss.lines == {
        "train loss": [(5, 3.5), (10, 3.0), (15, 2.5)],
        "eval loss": [(10, 3.1), (15, 2.75)],
    }


def test_dpo_runs_get_rewards_plots_and_rows(tmp_path: Path):
    history = [
        {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01, "step": 5},
        {"loss": 0.4, "rewards/accuracies": 0.875, "rewards/margins": 0.3, "step": 10},
        {"eval_loss": 0.45, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.25,
         "step": 10},
    ]  # fmt: skip
    metrics = {"method": "dpo", "global_step": 10, "train_loss": 0.4, "eval_loss": 0.45,
               "rewards_accuracy": 0.75, "rewards_margin": 0.25}  # fmt: skip
    output = write_output(tmp_path / "dpo", metrics, history)
    page = read_page(write_run_report(output))
    assert page.value("rewards_accuracy") == "0.75" and page.value("rewards_margin") == "0.25"
    plots = {p.file_name: p for p in plan_plots(history, TrainerMetricsFile(**metrics))}
    assert plots["rewards_accuracy.png"].lines == {"train": [(5, 0.5), (10, 0.875)],
                                                   "eval": [(10, 0.75)]}  # fmt: skip
    assert (output / REPORT_PLOTS_DIR / "rewards_margin.png").is_file()


def test_an_evaluate_run_reads_well_without_history(tmp_path: Path):
    output = write_output(tmp_path / "eval", EVALUATE_METRICS)
    page = read_page(write_run_report(output, run_name="eval-tiny"))
    assert [key for (_, key) in page.cells] == [
        "method", "runtime_seconds", "qa.exact_match", "qa.f1", "summarization.rouge1",
    ]  # fmt: skip
    assert page.value("qa.exact_match") == "0.5" and page.value("summarization.rouge1") == "0.3125"
    assert page.notes == []  # no training happened, so no history is missing
    assert [p.name for p in (output / REPORT_PLOTS_DIR).iterdir()] == ["eval_scores.png"]
    assert len(page.images) == 1 and png_size(base64.b64decode(page.images[0][22:]))[0] > 100


def test_older_outputs_plot_the_newest_checkpoints_history(tmp_path: Path):
    output = write_output(tmp_path / "old", SFT_METRICS)
    page = read_page(write_run_report(output))
    assert page.notes and "No training log history" in page.notes[0]
    assert page.images == [] and not (output / REPORT_PLOTS_DIR).exists()

    for step, entries in ((5, HISTORY[:1]), (10, HISTORY[:3])):
        (output / f"checkpoint-{step}").mkdir()
        state = {"log_history": entries}
        (output / f"checkpoint-{step}" / TRAINER_STATE_FILE).write_text(json.dumps(state))
    page = read_page(write_run_report(output))
    assert "checkpoint-10" in page.notes[0]
    loss = plan_plots(HISTORY[:3], TrainerMetricsFile(**SFT_METRICS))[0]
    assert loss.lines["train loss"] == [(5, 3.5), (10, 3.0)]
    assert len(page.images) == 3


def test_user_names_are_escaped(tmp_path: Path):
    hostile = '<script>alert("run")</script>&'
    metrics = {**EVALUATE_METRICS, "<img src=x onerror=alert(1)>.$score$": 1.0}
    output = write_output(tmp_path / "hostile", metrics)
    text = write_run_report(output, run_name=hostile).read_text()
    assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;run&quot;)&lt;/script&gt;&amp;" in text
    assert ReportPage(text).value("<img src=x onerror=alert(1)>.$score$") == "1"
    # matplotlib would read $score$ as math; the bar's label is drawn as typed, no error.
    assert (output / REPORT_PLOTS_DIR / "eval_scores.png").is_file()


def test_kubetrain_report_prints_the_table_and_writes_a_missing_report(tmp_path: Path, capsys):
    output = write_output(tmp_path / "sft", SFT_METRICS, HISTORY)
    assert cli.main(["report", str(output)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"final train loss\s*│\s*2\.5\b", printed)
    assert re.search(r"tokens/s\s*│\s*833\b", printed)
    assert printed.splitlines()[-1] == f"report: {output / REPORT_FILE}"
    assert (output / REPORT_FILE).is_file()


def test_kubetrain_report_shows_names_as_typed(tmp_path: Path, capsys):
    # rich would read "[bold]" as markup; a suite name is printed as it is.
    output = write_output(tmp_path / "eval", {**EVALUATE_METRICS, "[bold]qa[/bold].f1": 0.5})
    assert cli.main(["report", str(output)]) == 0
    assert "[bold]qa[/bold].f1" in capsys.readouterr().out


def test_kubetrain_report_refuses_a_folder_with_nothing_finished(tmp_path: Path, capsys):
    (tmp_path / "empty" / "checkpoint-5").mkdir(parents=True)
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds neither a finished run (metrics.json) nor a pipeline's stages" in err


def test_a_pipeline_report_links_its_stages_and_puts_them_side_by_side(tmp_path: Path):
    root = tmp_path / "outputs"
    sft = write_output(root / "sft", SFT_METRICS, HISTORY)
    dpo = write_output(root / "dpo", {"method": "dpo", "train_loss": 0.25, "rewards_accuracy": 1.0,
                                      "qa.exact_match": 0.5})  # fmt: skip
    stages = [
        PipelineStage("sft", "sft", "trained", sft, finished=True),
        PipelineStage("dpo", "dpo", "reused", dpo, finished=True),
        PipelineStage("<eval>", "evaluate", "not run", root / "eval", False, "sft failed"),
    ]
    page = read_page(write_pipeline_report(root, "tiny", stages))
    assert page.value("train_loss", "sft") == "2.5" and page.value("train_loss", "dpo") == "0.25"
    assert page.value("rewards_accuracy", "dpo") == "1"
    assert page.value("rewards_accuracy", "sft") == ""  # not a DPO stage
    assert page.value("qa.exact_match", "dpo") == "0.5"
    assert page.value("qa.exact_match", "sft") == ""
    assert page.value("status", "<eval>") == "not run (sft failed)"
    # Each finished stage links its own report, written now where an older output had none.
    assert page.links[:2] == ["sft/report.html", "dpo/report.html"]
    assert (sft / REPORT_FILE).is_file() and (dpo / REPORT_FILE).is_file()
    assert len(page.images) == 1  # sft's loss plot; dpo has no history
    listing = json.loads((root / PIPELINE_STAGES_FILE).read_text())
    outputs = [(s["name"], s["output"]) for s in listing["stages"]]
    assert outputs[:2] == [("sft", "sft"), ("dpo", "dpo")]  # relative: the folder may move


def test_kubetrain_report_on_a_pipelines_folder(tmp_path: Path, capsys):
    root = tmp_path / "outputs"
    sft = write_output(root / "sft", SFT_METRICS, HISTORY)
    dpo = write_output(root / "dpo", {"method": "dpo", "train_loss": 0.25})
    # An older pipeline output has no list of stages: its stage folders are found, in the
    # order they finished (not by name).
    os.utime(sft / "metrics.json", (1_000_000, 1_000_000))
    os.utime(dpo / "metrics.json", (2_000_000, 2_000_000))
    assert cli.main(["report", str(root)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "sft" in line)
    assert [cell.strip() for cell in header.split("┃")[2:4]] == ["sft", "dpo"]
    assert re.search(r"final train loss\s*│\s*2\.5\s*│\s*0\.25\s*│", printed)
    assert printed.splitlines()[-1] == f"report: {root / REPORT_FILE}"
    page = read_page(root / REPORT_FILE)
    assert page.value("method", "dpo") == "dpo" and page.value("status", "sft") == "finished"


class StageTrainer:
    """Plays `run_locally` for a pipeline's stages: leaves metrics.json and a log history."""

    def __call__(self, run: TrainingRun, *, metrics_port: int | None = None) -> LocalRun:
        output = write_output(Path(run.spec.output), SFT_METRICS, HISTORY)
        return LocalRun(run.metadata.name, 0, output, SFT_METRICS)


def pipeline_file(tmp_path: Path) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "local"},
        "spec": {
            "outputRoot": str(tmp_path / "out"),
            "stages": [
                {"name": "sft", "spec": {"method": "sft", "model": {"name": "./base"},
                                         "data": {"train": "data/train.jsonl"}}},
                {"name": "dpo", "dependsOn": ["sft"],
                 "spec": {"method": "dpo", "model": {"fromStage": "sft"},
                          "data": {"train": "data/pairs.jsonl"}}},
            ],
        },
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubetrain_run_writes_the_pipeline_report_and_says_where(
    tmp_path: Path, capsys, monkeypatch
):
    monkeypatch.setattr(local_pipeline, "run_locally", StageTrainer())
    assert cli.main(["run", str(pipeline_file(tmp_path))]) == 0
    report = tmp_path / "out" / REPORT_FILE
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {report}"
    page = read_page(report)
    assert page.value("status", "sft") == "trained" and page.value("eval_loss", "dpo") == "2.75"
    assert page.links[:2] == ["sft/report.html", "dpo/report.html"]


def test_a_pipeline_report_that_fails_is_a_warning(tmp_path: Path, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Path:
        raise ReportError("no matplotlib here")

    monkeypatch.setattr(local_pipeline, "write_pipeline_report", broken)
    out = io.StringIO()
    p = cli.load_documents(pipeline_file(tmp_path))[0]
    result = run_pipeline_locally(p, out=out, train=StageTrainer())
    assert result.exit_code == 0 and result.report is None
    assert "warning: the pipeline's report could not be written" in out.getvalue()
