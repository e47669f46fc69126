"""from_scratch on corpora larger than memory, scaled down: memory that does not grow with
the corpus, and a resumed run that continues from the right sample.

- Peak RSS: from_scratch's data preparation (check, tokenizer, tokenize and pack into the
  cache) over a generated corpus and over one 8 times larger, each in a process of its own.
  Measured on 2 busy cores: 1109 -> 1114 MiB, the data's part 165 -> 170 MiB; with the rows
  held in memory as before (Dataset.from_list, in-memory maps) the data's part went
  193 -> 239 MiB, which fails the second check.
- Resume: a run stopped at a checkpoint and resumed trains on exactly the blocks, in the
  order, an uninterrupted run does (no block repeated or skipped), across an epoch boundary.
  It trains in this process with transformers' Trainer wrapped to record each step's batch.

`make bench` (tests/bench/test_bench_large_corpus.py) runs a corpus larger than the memory
the trainer is given.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from example_specs import example, with_spec
from test_lifecycle import write_config

from kubetrain_trainer.config import load_trainer_config
from kubetrain_trainer.methods import from_scratch

pytestmark = pytest.mark.slow

WORDS = ["the", "fox", "owl", "river", "forest", "stone", "light", "night", "runs", "sleeps",
         "under", "over", "quietly", "green", "old", "small", "bright", "cold", "winter",
         "summer", "sings", "reads", "builds", "a", "an", "of", "to", "in"]  # fmt: skip


ROWS = 1_250  # the smaller corpus; the larger has 8 times as many
SLACK_KIB = 8 << 10  # allocator noise: arenas and Arrow's pool grow in steps


def write_corpus(path: Path, rows: int, seed: int = 0, words: tuple = (50, 150)) -> Path:
    """`rows` JSON lines of text, each a number of `words` (low, high) drawn from WORDS."""
    pick = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(pick.choices(WORDS, k=pick.randint(*words)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def pretraining(corpus: Path, output: Path, **training) -> Path:
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        data={"train": str(corpus), "maxLength": 32},
        model={"architecture": {**example("trainingrun-from-scratch-tiny.yaml")["spec"]["model"]
                                ["architecture"], "vocabSize": 300}},
        training={"evalStrategy": "no", "saveSteps": 10_000, "loggingSteps": 1, **training},
    )  # fmt: skip
    doc["spec"]["data"].pop("eval")
    return write_config(doc, output)


# The corpus-dependent part of from_scratch, alone in a process: read and check the rows,
# train the tokenizer, tokenize and pack into the cache. Training and the report that follow
# have a fixed peak of their own (about 1 GiB here) that would hide what the data costs.
PREPARE_DATA = """
import resource, sys
from transformers import TrainingArguments
from kubetrain_trainer.config import load_trainer_config
from kubetrain_trainer.methods.from_scratch import prepare_data
from kubetrain_trainer.session import Session, training_arguments
cfg = load_trainer_config(sys.argv[1])
session, args = Session(cfg), training_arguments(cfg, TrainingArguments)
print("imported", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
_, blocks = prepare_data(cfg, session, args)
print(len(blocks["train"]), "blocks")
"""


def start_data_preparation(config: Path) -> tuple[subprocess.Popen, Path]:
    log = config.with_name("prepare.log")
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", PREPARE_DATA, str(config)], stdout=out, stderr=out
        )
    return child, log


def data_memory_kib(child: subprocess.Popen, log_file: Path) -> tuple[int, int]:
    """(peak RSS of the data preparation, its growth past the imports), in KiB."""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    log = log_file.read_text(errors="replace")
    assert child.returncode == 0 and " blocks" in log, log[-3000:]
    imported = int(re.search(r"^imported (\d+)$", log, re.M).group(1))
    return usage.ru_maxrss, usage.ru_maxrss - imported


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """The whole peak grows under 15% (the issue's measure), and so does the part the data
    adds past the imports (about 1 GiB of libraries would hide a cost per row otherwise).
    Both corpora are prepared at once: each process's peak is its own."""
    small = write_corpus(tmp_path / "small.jsonl", rows=ROWS)
    large = write_corpus(tmp_path / "large.jsonl", rows=8 * ROWS, seed=1)
    small_child = start_data_preparation(pretraining(small, tmp_path / "small"))
    large_child = start_data_preparation(pretraining(large, tmp_path / "large"))
    small_peak, small_data = data_memory_kib(*small_child)
    large_peak, large_data = data_memory_kib(*large_child)
    print(f"peak RSS {small_peak >> 10} -> {large_peak >> 10} MiB, data's part "
          f"{small_data >> 10} -> {large_data >> 10} MiB ({ROWS} -> {8 * ROWS} rows)")  # fmt: skip
    assert large_peak < 1.15 * small_peak
    assert large_data < 1.15 * small_data + SLACK_KIB


class RecordingTrainer(from_scratch.Trainer):
    """transformers' Trainer noting the blocks each optimizer step trained on."""

    trained: list[tuple[int, ...]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        RecordingTrainer.trained.extend(tuple(row) for row in inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def train_steps(config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[int, ...]], int]:
    """The blocks trained on, in order, and how many blocks the corpus packed into."""
    from kubetrain_trainer.session import Session

    monkeypatch.setattr(from_scratch, "Trainer", RecordingTrainer)
    RecordingTrainer.trained = []
    cfg = load_trainer_config(config)
    result = from_scratch.train(cfg, Session(cfg))
    assert result.trainer.state.global_step == cfg.training.max_steps
    return RecordingTrainer.trained, len(result.trainer.train_dataset)


def test_a_resumed_run_continues_from_the_right_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", rows=40, words=(3, 8))
    batch = {"perDeviceTrainBatchSize": 4, "numTrainEpochs": 3}
    straight, blocks = train_steps(
        pretraining(corpus, tmp_path / "a", maxSteps=9, **batch), monkeypatch
    )
    per_epoch = -(-blocks // 4)  # steps per epoch, the last batch maybe partial
    assert 9 > per_epoch >= 3, f"{blocks} blocks: the run must span more than one epoch"
    assert len(set(straight[:blocks])) == blocks, "the first epoch repeated or skipped blocks"

    stop = per_epoch + 1  # a checkpoint inside the second epoch
    first, _ = train_steps(
        pretraining(corpus, tmp_path / "b", maxSteps=stop, saveSteps=stop, **batch), monkeypatch
    )
    resumed, _ = train_steps(pretraining(corpus, tmp_path / "b", maxSteps=9, **batch), monkeypatch)
    assert len(resumed) == (9 - stop) * 4, "the second run did not resume at the checkpoint"
    assert first + resumed == straight
