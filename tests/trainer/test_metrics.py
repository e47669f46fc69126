"""Prometheus gauges, the /metrics endpoint, the progress display and metrics.json.

One tiny Qwen2 (hidden 32, 2 layers, vocab 128) trains 6 steps on CPU with eval every 3
steps; the gauges, the printed lines and the summary are checked against what the Trainer
itself logged. Rows are partly padded so the token count must skip padding.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import socket
import sys
import time
import urllib.request
from types import SimpleNamespace

import datasets
import pytest
import torch
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import check_metrics, needs_promtool
from rich.console import Console
from tiny_models import tiny_model
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as transformers_logging

from kubetrain_trainer.contract import EVAL_SUITE_METRICS, eval_metric_key
from kubetrain_trainer.metrics import (
    PrometheusCallback,
    ThroughputWindow,
    serve_metrics,
    summarize_run,
    write_metrics_json,
)
from kubetrain_trainer.progress import (
    ConsoleProgressCallback,
    TerminalProgressCallback,
    drop_printer_callback,
    format_bar_stats,
    format_progress_line,
    progress_callbacks,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 6
BATCH = 2
SEQ = 16


def tiny_rows(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token rows; row i keeps SEQ - (i % 4) real tokens and pads the rest."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(1, 128, (SEQ,), generator=gen)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - i % 4 :] = 0
        ids = ids.masked_fill(mask == 0, 0)
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return rows


def tiny_trainer(out, callbacks: list) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
    )
    return Trainer(
        model=tiny_model(SEQ),
        args=args,
        train_dataset=tiny_rows(MAX_STEPS * BATCH, seed=1),
        eval_dataset=tiny_rows(4, seed=2),
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train once with every metrics callback attached; tests read the results."""
    out = tmp_path_factory.mktemp("run")
    prometheus = PrometheusCallback(method="sft", run_name="tiny")
    console_out = io.StringIO()
    trainer = tiny_trainer(out, [ConsoleProgressCallback(stream=console_out), prometheus])
    drop_printer_callback(trainer)
    before = time.time()
    output = trainer.train()
    return SimpleNamespace(
        out=out,
        trainer=trainer,
        output=output,
        prometheus=prometheus,
        console=console_out.getvalue(),
        started_after=before,
        expected_tokens=int(
            sum(row["attention_mask"].sum() for row in tiny_rows(MAX_STEPS * BATCH, seed=1))
        ),
    )


def scrape(text: str) -> dict[str, list]:
    """Samples by sample name (a counter's family `x` serves `x_total` and `x_created`)."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str) -> float:
    (sample,) = samples[name]
    return sample.value


def last_logged(history: list[dict], key: str) -> float:
    return [entry[key] for entry in history if key in entry][-1]


def test_gauges_match_what_the_trainer_logged(run):
    samples = scrape(generate_latest(run.prometheus.registry).decode())
    history = run.trainer.state.log_history
    assert value(samples, "kubetrain_trainer_step") == MAX_STEPS
    assert value(samples, "kubetrain_trainer_total_steps") == MAX_STEPS
    assert value(samples, "kubetrain_trainer_epoch") == pytest.approx(run.trainer.state.epoch)
    assert value(samples, "kubetrain_trainer_loss") == pytest.approx(last_logged(history, "loss"))
    eval_loss = last_logged(history, "eval_loss")
    assert value(samples, "kubetrain_trainer_eval_loss") == pytest.approx(eval_loss)
    assert value(samples, "kubetrain_trainer_perplexity") == pytest.approx(math.exp(eval_loss))
    assert value(samples, "kubetrain_trainer_learning_rate") == pytest.approx(
        last_logged(history, "learning_rate")
    )
    assert value(samples, "kubetrain_trainer_grad_norm") == pytest.approx(
        last_logged(history, "grad_norm")
    )
    # Every row is seen once in 6 steps of 2; padding is not counted.
    assert run.expected_tokens < MAX_STEPS * BATCH * SEQ
    assert value(samples, "kubetrain_trainer_tokens_total") == run.expected_tokens
    assert value(samples, "kubetrain_trainer_tokens_per_second") > 0
    assert value(samples, "kubetrain_trainer_checkpoint_step") == MAX_STEPS
    assert (
        run.started_after <= value(samples, "kubetrain_trainer_start_time_seconds") <= time.time()
    )
    (info,) = samples["kubetrain_trainer_info"]
    assert info.labels == {"method": "sft", "run_name": "tiny"} and info.value == 1
    # DPO-only gauges stay away from an sft run, and there is no GPU here.
    assert "kubetrain_trainer_rewards_accuracy" not in samples
    assert "kubetrain_trainer_gpu_memory_bytes" not in samples


class ScrapeAtTrainBegin(TrainerCallback):
    """Reads the registry right after PrometheusCallback.on_train_begin ran."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.samples: dict[str, list] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.samples = scrape(generate_latest(self.registry).decode())


def test_resumed_run_gauges_start_from_the_checkpoint(run, tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(run.out / "checkpoint-3", checkpoint)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    prometheus = PrometheusCallback(method="sft", run_name="tiny")
    probe = ScrapeAtTrainBegin(prometheus.registry)
    trainer = tiny_trainer(tmp_path, [prometheus, probe])
    output = trainer.train(resume_from_checkpoint=str(checkpoint))

    at_begin = probe.samples
    assert value(at_begin, "kubetrain_trainer_step") == 3
    assert value(at_begin, "kubetrain_trainer_checkpoint_step") == 3
    assert value(at_begin, "kubetrain_trainer_loss") == last_logged(saved["log_history"], "loss")
    assert value(at_begin, "kubetrain_trainer_eval_loss") == last_logged(
        saved["log_history"], "eval_loss"
    )
    assert value(at_begin, "kubetrain_trainer_tokens_total") == saved["num_input_tokens_seen"]
    assert prometheus.tokens_at_start == saved["num_input_tokens_seen"]

    # The Trainer's token count survives the resume: the whole data set, once, in total.
    tokens = trainer.state.num_input_tokens_seen
    assert tokens == run.expected_tokens
    summary = summarize_run(
        "sft", trainer.state.log_history, output, 1.0, tokens, prometheus.tokens_at_start
    )
    assert summary["tokens_per_second"] == pytest.approx(
        (tokens - saved["num_input_tokens_seen"]) / output.metrics["train_runtime"]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_serves_the_gauges(run):
    port = free_port()
    server = serve_metrics(run.prometheus.registry, port)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            samples = scrape(reply.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert value(samples, "kubetrain_trainer_step") == MAX_STEPS
    assert value(samples, "kubetrain_trainer_tokens_total") == run.expected_tokens
    # The callback's own registry: no python_gc_* or process_* from the global one.
    assert all(name.startswith("kubetrain_trainer_") for name in samples)


def test_endpoint_only_on_rank_zero_and_when_enabled(monkeypatch):
    registry = PrometheusCallback(method="sft", run_name="x").registry
    assert serve_metrics(registry, 0) is None
    monkeypatch.setenv("RANK", "1")
    assert serve_metrics(registry, free_port()) is None


def test_busy_port_warns_instead_of_failing(caplog):
    registry = PrometheusCallback(method="sft", run_name="x").registry
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        assert serve_metrics(registry, busy.getsockname()[1]) is None
    assert "cannot serve metrics" in caplog.text


def test_metrics_json_summarizes_the_run(run):
    history = run.trainer.state.log_history
    summary = summarize_run(
        "sft", history, run.output, runtime_s=12.5, tokens_total=run.expected_tokens
    )
    path = write_metrics_json(run.out, summary)
    written = json.loads(path.read_text())
    assert written == summary
    assert written["method"] == "sft"
    assert written["global_step"] == MAX_STEPS
    assert written["train_loss"] == pytest.approx(last_logged(history, "loss"))
    assert written["train_loss_mean"] == pytest.approx(run.output.training_loss)
    assert written["eval_loss"] == pytest.approx(last_logged(history, "eval_loss"))
    assert written["perplexity"] == pytest.approx(math.exp(written["eval_loss"]))
    assert written["tokens_total"] == run.expected_tokens
    assert written["tokens_per_second"] == pytest.approx(
        run.expected_tokens / run.output.metrics["train_runtime"]
    )
    assert written["runtime_seconds"] == 12.5
    assert "rewards_accuracy" not in written
    assert [p.name for p in run.out.iterdir() if p.name.startswith(".")] == []


def test_dpo_summary_prefers_eval_rewards_and_nulls_non_finite():
    history = [
        {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.1, "step": 1},
        {"eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.3},
        {"loss": 0.65, "rewards/accuracies": 1.0, "rewards/margins": 0.9, "step": 2},
    ]
    output = TrainOutput(2, float("nan"), {"train_runtime": 4.0})
    summary = summarize_run(
        "dpo", history, output, runtime_s=5.0, tokens_total=400, tokens_at_start=200
    )
    assert summary["rewards_accuracy"] == 0.75
    assert summary["rewards_margin"] == 0.3
    assert summary["tokens_per_second"] == 50.0
    assert summary["train_loss_mean"] is None
    assert "perplexity" not in summary
    no_eval = summarize_run("dpo", history[::2], output, runtime_s=5.0, tokens_total=0)
    assert no_eval["rewards_accuracy"] == 1.0 and no_eval["eval_loss"] is None


def test_dpo_gauges_prefer_eval_once_evaluated():
    callback = PrometheusCallback(method="dpo", run_name="pref")
    args = SimpleNamespace(include_num_input_tokens_seen="no")
    state = TrainerState(global_step=1, max_steps=4)
    callback.on_train_begin(args, state, None)
    callback.on_log(
        args,
        state,
        None,
        logs={"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.1, "num_tokens": 64},
    )
    samples = scrape(generate_latest(callback.registry).decode())
    assert value(samples, "kubetrain_trainer_rewards_accuracy") == 0.5
    # TRL's own token count is the fallback when the Trainer does not count tokens.
    assert value(samples, "kubetrain_trainer_tokens_total") == 64
    assert "kubetrain_trainer_perplexity" not in samples
    callback.on_log(
        args,
        state,
        None,
        logs={"eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.3},
    )
    callback.on_log(
        args, state, None, logs={"loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.9}
    )
    samples = scrape(generate_latest(callback.registry).decode())
    assert value(samples, "kubetrain_trainer_rewards_accuracy") == 0.75
    assert value(samples, "kubetrain_trainer_rewards_margin") == 0.3
    assert value(samples, "kubetrain_trainer_loss") == 0.5
    assert value(samples, "kubetrain_trainer_eval_loss") == 0.6


def test_gauges_without_a_value_are_nan_before_training():
    samples = scrape(generate_latest(PrometheusCallback("from_scratch", "r").registry).decode())
    for name in ("loss", "eval_loss", "perplexity", "checkpoint_step", "tokens_per_second"):
        assert math.isnan(value(samples, f"kubetrain_trainer_{name}"))
    assert value(samples, "kubetrain_trainer_step") == 0


def test_console_prints_one_plain_line_per_log(run):
    lines = run.console.splitlines()
    train_line = re.compile(
        r"^step (\d+)/6 epoch \d\.\d\d loss \d+\.\d{3} lr \d\.\de-\d\d tok/s \d+ eta \d:\d\d:\d\d$"
    )
    assert [int(m.group(1)) for m in map(train_line.match, lines) if m] == [2, 4, 6]
    assert sum(line.startswith("eval step ") for line in lines) == 2
    assert lines[-1].startswith("done step 6/6 train_loss ")
    assert not any(line.startswith("{") for line in lines)
    assert not any(isinstance(cb, PrinterCallback) for cb in run.trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    ("is_tty", "shows_progress", "datasets_bars"),
    [(True, TerminalProgressCallback, True), (False, ConsoleProgressCallback, False)],
)
def test_progress_policy_replaces_tqdm_everywhere(is_tty, shows_progress, datasets_bars):
    try:
        callbacks = progress_callbacks(is_tty=is_tty, run_name="tiny")
        assert [type(cb) for cb in callbacks] == [shows_progress]
        assert not transformers_logging.is_progress_bar_enabled()
        assert datasets.is_progress_bar_enabled() is datasets_bars
    finally:
        transformers_logging.enable_progress_bar()
        datasets.enable_progress_bars()


def test_a_terminal_gets_a_live_bar_and_keeps_evaluations_in_the_scrollback(tmp_path):
    """The rich display on a (forced) terminal: bar frames with step/total and the stats,
    eval and summary lines printed above it, log records routed above it, no raw dicts."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    bar = TerminalProgressCallback("tiny-run", console=console)

    class WarnAtStep4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                logging.getLogger("kubetrain_trainer").warning("a warning at step 4")

    trainer = tiny_trainer(tmp_path, [bar, WarnAtStep4()])
    drop_printer_callback(trainer)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("kubetrain_trainer").addHandler(handler)
    transformers_logging.disable_progress_bar()  # as progress_callbacks does
    try:
        trainer.train()
    finally:
        logging.getLogger("kubetrain_trainer").removeHandler(handler)
        transformers_logging.enable_progress_bar()
    assert handler.stream is sys.stderr  # given back once the bar stopped
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # cursor moves, erasing
    assert "{'loss'" not in text and "it/s" not in text
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    frame = re.compile(r"^tiny-run(?: \(evaluating\))? ━* *(\d)/6 epoch \d\.\d\d")
    steps = [int(m.group(1)) for m in map(frame.match, lines) if m]
    assert steps == sorted(steps) and steps[-1] == 6
    assert sum(line.startswith("eval step ") for line in lines) == 2
    assert sum(line.startswith("done step 6/6 train_loss ") for line in lines) == 1
    assert "a warning at step 4" in lines  # printed above the bar, on a line of its own
    # The last frame stays on screen: every figure of the run, the ETA run down to zero.
    assert re.fullmatch(
        r"tiny-run ━{30} 6/6 epoch 1\.00  loss \d+\.\d{3}  eval \d+\.\d{3}  "
        r"lr \d\.\de-\d\d  \d+ tok/s  eta 0:00:00",
        lines[-1],
    )


def test_bar_stats_leave_out_what_is_not_known_yet():
    assert format_bar_stats(None, None, None, None, None, None) == "epoch 0.00"
    assert (
        format_bar_stats(0.4, 2.3141, 2.401, 1.9e-05, 5123.4, 62.2)
        == "epoch 0.40  loss 2.314  eval 2.401  lr 1.9e-05  5123 tok/s  eta 0:01:02"
    )


def test_progress_line_format():
    logs = {"loss": 2.3141, "learning_rate": 1.9e-05, "grad_norm": 1.0}
    assert (
        format_progress_line(logs, 20, 100, 0.4, tokens_per_second=5123.4, eta_seconds=62.2)
        == "step 20/100 epoch 0.40 loss 2.314 lr 1.9e-05 tok/s 5123 eta 0:01:02"
    )
    assert (
        format_progress_line({"eval_loss": 2.21}, 20, 100, 0.4)
        == "eval step 20/100 epoch 0.40 eval_loss 2.210"
    )
    assert (
        format_progress_line({"train_runtime": 100.4, "train_loss": 2.0}, 100, 100, 1.0)
        == "done step 100/100 train_loss 2.000 runtime 0:01:40"
    )


def test_throughput_window_forgets_old_samples():
    window = ThroughputWindow(size=2)
    assert window.tokens_per_second() is None
    window.reset(0.0, 0, 0)
    window.add(1.0, 10, 100)  # slow start: 100 tok/s
    assert window.tokens_per_second() == 100
    window.add(2.0, 20, 1100)
    window.add(3.0, 30, 2100)  # the first sample has left the window
    assert window.tokens_per_second() == 1000
    assert window.steps_per_second() == 10
    assert window.eta_seconds(30, 130) == 10


@needs_promtool
@pytest.mark.parametrize("method", ["sft", "dpo", "evaluate"])
def test_every_metric_a_method_serves_passes_promtool(run, method):
    """The trained run's own endpoint (sft), a DPO one, and an evaluation with every suite."""
    callback = run.prometheus if method == "sft" else PrometheusCallback(method, run_name="r")
    if method == "evaluate":
        callback.record_evaluation(
            {eval_metric_key(suite, m): 0.5 for suite, ms in EVAL_SUITE_METRICS.items() for m in ms}
        )
    check_metrics(generate_latest(callback.registry).decode())
