"""Benchmark: what the tokenized-data cache saves a restarted attempt (issue 16).

Run as: make bench   (alone: .venv/bin/pytest -m bench -s tests/bench -k datacache)

Each row trains one step in a child process (`python -m kubetrain_trainer`) and measures the
seconds from its start to its first logged step ("step 1/1", read from its output as it
comes), twice on one output folder:
- cold: a fresh output, so the data is read, the tokenizer trained (from_scratch) and the
  corpus tokenized and packed into <output>/.cache;
- warm: the same folder after its checkpoints, model and metrics are removed, as a
  restarted attempt or a rerun finds it: the entry is read back memory-mapped.
Rows: from_scratch over a generated text corpus (KUBETRAIN_BENCH_CACHE_ROWS rows, 100k by
default, about 40 MB) and sft over generated chats (a fifth as many). It prints a table and
asserts only that both runs trained and that the warm from_scratch run read the cache; the
machine is shared, so the load average is printed with the figures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from throughput.data import chats, lexicon, write_jsonl

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.config import Architecture, dump_trainer_config
from kubetrain_trainer.models import build_model, train_bpe_tokenizer

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

ROWS = int(os.environ.get("KUBETRAIN_BENCH_CACHE_ROWS", "100000"))
ARCHITECTURE = {
    "modelType": "qwen2",
    "vocabSize": 2048,
    "hiddenSize": 64,
    "numHiddenLayers": 2,
    "numAttentionHeads": 4,
    "numKeyValueHeads": 2,
    "intermediateSize": 128,
    "maxPositionEmbeddings": 512,
}
TRAINING = {"maxSteps": 1, "perDeviceTrainBatchSize": 8, "loggingSteps": 1, "saveSteps": 1}
KEPT = (".cache", "tokenizer")  # what a restarted attempt finds besides its checkpoints


def text_corpus(path: Path, rows: int) -> Path:
    words = lexicon().split()
    pick = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(pick.choices(words, k=pick.randint(40, 120)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def base_model(folder: Path) -> Path:
    """A tiny qwen2 and a BPE tokenizer of the chats' language, for the sft row."""
    tokenizer = train_bpe_tokenizer([lexicon()] * 4, vocab_size=2048, min_frequency=1)
    model = build_model(Architecture.model_validate(ARCHITECTURE), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config(method: str, train: Path, output: Path, model: dict) -> Path:
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": f"cache-{method.replace('_', '-')}"},
        "spec": {
            "method": method,
            "model": model,
            "data": {"train": str(train), "maxLength": 256},
            "training": TRAINING,
            "output": str(output),
        },
    }
    run = parse_document(doc, "bench")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    path = output.parent / f"{output.name}.yaml"
    path.write_text(dump_trainer_config(cfg))
    return path


def time_to_first_step(config_path: Path) -> tuple[float, str]:
    """Seconds from the trainer's start to its first step line, and its whole output."""
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first_step, lines = None, []
    for line in child.stdout:
        lines.append(line)
        if first_step is None and line.startswith("step 1/"):
            first_step = time.monotonic() - started
    child.wait()
    log = "".join(lines)
    assert child.returncode == 0 and first_step is not None, log[-4000:]
    return first_step, log


def restart_in(output: Path) -> None:
    """Leave what a restarted attempt finds of a run it resumes: the cache, the tokenizer."""
    for path in output.iterdir():
        if path.name not in KEPT:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_the_cache_saves_a_restarted_attempt_the_tokenizing(tmp_path: Path) -> None:
    text = text_corpus(tmp_path / "corpus.jsonl", ROWS)
    chat_rows = write_jsonl(chats(ROWS // 5, seed=1), tmp_path / "chats.jsonl")
    model = base_model(tmp_path / "base")
    rows = [
        ("from_scratch", text, {"architecture": ARCHITECTURE}, ROWS),
        ("sft", chat_rows, {"name": str(model)}, ROWS // 5),
    ]
    table = []
    for method, data, model_spec, count in rows:
        output = tmp_path / method
        path = config(method, data, output, model_spec)
        cold, _ = time_to_first_step(path)
        restart_in(output)
        warm, log = time_to_first_step(path)
        hit = "from cache" in log
        if method == "from_scratch":
            assert hit, log[-4000:]
        table.append((method, count, data.stat().st_size / 2**20, cold, warm, hit))
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'method':<13}{'rows':>8}{'MiB':>7}{'cold s':>9}{'warm s':>9}{'saved':>8}  cache hit")
    for method, count, mib, cold, warm, hit in table:
        saved = f"{1 - warm / cold:.0%}"
        print(f"{method:<13}{count:>8}{mib:>7.1f}{cold:>9.1f}{warm:>9.1f}{saved:>8}  {hit}")
