"""The trainer's contract with whoever runs it: metrics while running, SIGTERM, resume,
several processes, and exit codes that tell a bad config from a retriable failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from example_specs import REPO, example, with_spec

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local import run_locally
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.checkpoints import is_complete, resume_checkpoint
from kubetrain_trainer.config import dump_trainer_config
from kubetrain_trainer.contract import ExitCode

pytestmark = pytest.mark.slow

DESIGN_METRICS = [
    "kubetrain_trainer_step",
    "kubetrain_trainer_total_steps",
    "kubetrain_trainer_epoch",
    "kubetrain_trainer_loss",
    "kubetrain_trainer_eval_loss",
    "kubetrain_trainer_learning_rate",
    "kubetrain_trainer_grad_norm",
    "kubetrain_trainer_tokens_total",
    "kubetrain_trainer_tokens_per_second",
    "kubetrain_trainer_perplexity",
    "kubetrain_trainer_checkpoint_step",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(doc: dict, output: Path, metrics_port: int = 0) -> Path:
    doc = with_spec(doc, output=str(output))
    run = parse_document(doc, "test")
    cfg = to_trainer_config(
        run.metadata.name, run.spec, resolve_local_uri, metrics_port=metrics_port
    )
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.yaml"
    path.write_text(dump_trainer_config(cfg))
    return path


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


def long_pretraining(max_steps: int) -> dict:
    return with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        training={"maxSteps": max_steps, "saveSteps": 10_000, "evalSteps": 20, "loggingSteps": 5},
    )


def test_metrics_served_during_run_then_sigterm_saves_and_restart_resumes(tmp_path: Path):
    port = free_port()
    config = write_config(long_pretraining(max_steps=600), tmp_path / "out", metrics_port=port)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        metrics: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                metrics = scrape(port)
            except OSError:
                metrics = {}
            if metrics.get("kubetrain_trainer_step", 0) >= 40:
                break
            assert trainer.poll() is None, trainer.stdout.read()
            time.sleep(0.2)
        for name in DESIGN_METRICS:
            assert name in metrics, f"{name} missing from /metrics"
        assert metrics["kubetrain_trainer_total_steps"] == 600
        assert metrics["kubetrain_trainer_loss"] > 0
        assert metrics["kubetrain_trainer_tokens_total"] > 0
        trainer.send_signal(signal.SIGTERM)
        log = trainer.communicate(timeout=120)[0]
    finally:
        trainer.kill()
    assert trainer.returncode == ExitCode.PREEMPTED, log
    checkpoint = resume_checkpoint(tmp_path / "out")
    assert checkpoint is not None and is_complete(checkpoint), log
    stopped_at = int(Path(checkpoint).name.split("-")[1])
    assert stopped_at >= 40
    assert not (tmp_path / "out" / "metrics.json").exists(), "preempted run must not look finished"

    # Same config again: it picks up at the saved step and finishes the schedule.
    write_config(long_pretraining(max_steps=stopped_at + 30), tmp_path / "out")
    resumed = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoint}" in resumed.stdout + resumed.stderr
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["global_step"] == stopped_at + 30
    newest = resume_checkpoint(tmp_path / "out")
    history = json.loads((Path(newest) / "trainer_state.json").read_text())["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == sorted(steps) and steps[-1] > stopped_at and min(steps) < stopped_at


def test_two_processes_train_one_model(tmp_path: Path):
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        output=str(tmp_path / "ddp"),
        resources={"nodes": 2, "procPerNode": 1},
        training={"maxSteps": 20, "evalSteps": 10, "saveSteps": 10},
    )
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0
    checksums = result.metrics["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # Both ranks wrote their own RNG state into the checkpoint: two real workers ran.
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-20").glob("rng_state_*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]


def test_malformed_dataset_line_fails_before_training_with_file_and_line(tmp_path: Path):
    data = tmp_path / "chats.jsonl"
    good = (REPO / "examples/data/sft-messages.jsonl").read_text().splitlines()[:5]
    data.write_text("\n".join([*good[:3], '{"messages": [{"role": "user"}]}', *good[3:]]) + "\n")
    doc = with_spec(
        example("trainingrun-sft-tiny.yaml"),
        model={"name": str(tmp_path / "no-model-needed")},
        data={"train": str(data), "eval": None},
        training={"evalStrategy": "no"},
    )
    config = write_config(doc, tmp_path / "out")
    env = {**os.environ, "KUBETRAIN_TERMINATION_LOG": str(tmp_path / "termination-log")}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == ExitCode.CONFIG_ERROR, proc.stderr
    assert f"{data}:4:" in proc.stderr
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("config error:") and f"{data}:4:" in message


def test_launcher_passes_config_error_through_torchrun(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "method: sft\ndata: {train: x.jsonl}\noutputDir: out\ntraining: {learningRate: -1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain_trainer.launch", "--standalone",
         "--nproc-per-node", "2", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == ExitCode.CONFIG_ERROR, proc.stderr
    assert "training.learningRate" in proc.stderr and "greater than 0" in proc.stderr
