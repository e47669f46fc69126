"""Benchmark: `kubetrain run` sft against a plain TRL SFTTrainer script, side by side.

Run as: make bench   (prints a table; asserts nothing about speed)

Both train the same tiny model (the from_scratch example's output), on the same chats, for
the same number of steps with the same batch size, each in its own child process of this
one, measured the same way: tokens per second from the trainer's own count of non-padding
input tokens over its train_runtime, and peak resident memory from the child's rusage.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri, trainer_command
from kubetrain_trainer.config import dump_trainer_config

pytestmark = pytest.mark.bench

STEPS, BATCH, MAX_LENGTH = 60, 8, 192

PLAIN_TRL = textwrap.dedent(
    """
    import json, sys, time
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir, data, out, steps, batch, max_length = sys.argv[1:7]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(out, max_steps=int(steps), per_device_train_batch_size=int(batch),
                     max_length=int(max_length), assistant_only_loss=True, learning_rate=1e-3,
                     save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                     logging_steps=10)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=load_dataset("json", data_files=data, split="train"),
                         processing_class=tokenizer)
    result = trainer.train()
    json.dump({"tokens": trainer.state.num_input_tokens_seen,
               "train_runtime": result.metrics["train_runtime"]}, open(out + "/bench.json", "w"))
    """
)


def run_measured(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, child.stderr.read().decode()[-3000:]
    # ru_maxrss is in KiB on Linux.
    return time.monotonic() - started, usage.ru_maxrss * 1024


def test_bench_sft_against_plain_trl(tmp_path: Path):
    base = tmp_path / "base"
    pretrain = with_spec(example("trainingrun-from-scratch-tiny.yaml"), output=str(base))
    run = parse_document(pretrain, "bench")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    (tmp_path / "fs.yaml").write_text(dump_trainer_config(cfg))
    run_measured(trainer_command(tmp_path / "fs.yaml", 1))

    sft_doc = with_spec(
        example("trainingrun-sft-tiny.yaml"),
        model={"name": str(base)},
        data={"eval": None, "maxLength": MAX_LENGTH},
        training={"maxSteps": STEPS, "perDeviceTrainBatchSize": BATCH, "evalStrategy": "no",
                  "saveSteps": 10_000, "loggingSteps": 10},
        output=str(tmp_path / "kubetrain"),
    )  # fmt: skip
    sft = parse_document(sft_doc, "bench")
    sft_cfg = to_trainer_config(sft.metadata.name, sft.spec, resolve_local_uri, metrics_port=0)
    (tmp_path / "sft.yaml").write_text(dump_trainer_config(sft_cfg))
    ours_wall, ours_rss = run_measured(trainer_command(tmp_path / "sft.yaml", 1))
    ours = json.loads((tmp_path / "kubetrain" / "metrics.json").read_text())
    ours_tps = (ours["tokens_total"]) / ours["train_runtime_seconds"]

    plain_out = tmp_path / "plain"
    plain_out.mkdir()
    data = sft_cfg.data.train
    plain_wall, plain_rss = run_measured(
        [sys.executable, "-c", PLAIN_TRL, str(base), data, str(plain_out), str(STEPS),
         str(BATCH), str(MAX_LENGTH)]
    )  # fmt: skip
    plain = json.loads((plain_out / "bench.json").read_text())
    plain_tps = plain["tokens"] / plain["train_runtime"]

    rows = [
        ("kubetrain run (sft)", ours_tps, ours_rss, ours_wall),
        ("plain TRL SFTTrainer", plain_tps, plain_rss, plain_wall),
    ]
    print(f"\nSFT benchmark: {STEPS} steps, batch {BATCH}, maxLength {MAX_LENGTH}, CPU")
    print(f"{'':24}{'tokens/s':>12}{'peak RSS MiB':>15}{'wall s':>9}")
    for name, tps, rss, wall in rows:
        print(f"{name:24}{tps:12.0f}{rss / 2**20:15.0f}{wall:9.1f}")
    print(f"ratio kubetrain/plain: tokens/s {ours_tps / plain_tps:.2f}, "
          f"peak RSS {ours_rss / plain_rss:.2f}")  # fmt: skip
    assert ours["global_step"] == STEPS
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > 0
