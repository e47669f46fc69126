"""Benchmark: kubetrain sft, lora and dpo against TRL's trainers, side by side (issue 11).

Run as: make bench   (alone: .venv/bin/pytest -m bench -s tests/bench -k throughput;
        KUBETRAIN_BENCH_ROWS=kubetrain-sft,trl-sft-bfd picks rows; their baselines run too)

Every row is one child process training the same model (Qwen2, hidden 256, 4 layers, an 8k
byte-level BPE: about 5M parameters, so compute dominates) on the same generated chats
(lognormal lengths, median about 100 tokens, a tail past 1000, some multi-turn; see
throughput/data.py) for one epoch at batch 8 and maxLength 1024, measured the same way:
- tokens/s: non-padding tokens counted here from the data (each chat as its side tokenizes
  it, truncated to maxLength), over the trainer's train_runtime and, as a second column,
  over the child's whole wall time (model loading, tokenizing and saving included);
- steps: the trainer's optimizer steps (equal batch sizes must mean equal steps);
- eval loss (sft, lora) or rewards accuracy (dpo) from one evaluator run here on each
  side's saved model (throughput/evaluate_child.py);
- CPU ratio: the baseline's CPU seconds over this row's (whole process, from rusage), a
  check on the wall-clock ratios that a busy shared machine cannot skew much;
- peak RSS from the child's rusage;
- achieved model FLOP/s (6 x parameters x tokens, plus attention) against this machine's
  matmul peak measured here.
"Same settings" means TRL with kubetrain's precision and memory settings (fp32, no gradient
checkpointing). For context: TRL's own defaults (bf16 autocast and gradient checkpointing,
meant for GPUs), TRL's inexact `wrapped` packing (sequences attend to each other and it
takes fewer steps), TRL's `bfd` padding-free packing, kubetrain with each lever off, and
kubetrain's padding-free mode (data.packing: the block-diagonal mask's cost on a CPU).
It prints a table and asserts only that every side trained; speed is reported, not tested.
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from throughput.data import chats, lexicon, preference_pairs, write_jsonl

from kubetrain.api import parse_document, to_trainer_config
from kubetrain.local.runner import resolve_local_uri
from kubetrain_trainer.config import Architecture, dump_trainer_config
from kubetrain_trainer.models import build_model, train_bpe_tokenizer

# Twelve training runs and their evaluations take 10-20 minutes on 2 cores.
pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

HERE = Path(__file__).parent / "throughput"
BATCH, MAX_LENGTH, EPOCHS, SEED = 8, 1024, 1, 42
TRAIN_CHATS, EVAL_CHATS, TRAIN_PAIRS, EVAL_PAIRS = 480, 64, 240, 64
LEARNING_RATE = {"sft": 1e-3, "lora": 2e-3, "dpo": 2e-4}
BETA = 0.1
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
ARCHITECTURE = Architecture(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=704,
    max_position_embeddings=2048,
)
SAME_SETTINGS = {"bf16": False, "activation_checkpointing": False}
# The row each row's ratio is against: TRL with the same settings, per method.
BASELINES = {"sft": "trl-sft", "lora": "trl-lora", "dpo": "trl-dpo"}
WRAPPED = {**SAME_SETTINGS, "packing": True, "packing_strategy": "wrapped"}
BFD = {**SAME_SETTINGS, "packing": True, "packing_strategy": "bfd"}
# name, side, method, knobs: TRL config fields, or kubetrain data fields and child flags.
ROWS = [
    ("kubetrain-sft", "kubetrain", "sft", {}),
    ("trl-sft", "trl", "sft", SAME_SETTINGS),
    ("trl-sft-defaults", "trl", "sft", {}),
    ("trl-sft-wrapped", "trl", "sft", WRAPPED),
    ("trl-sft-bfd", "trl", "sft", BFD),
    ("kubetrain-sft-no-grouping", "kubetrain", "sft", {"groupByLength": False}),
    ("kubetrain-sft-no-labelled-head", "kubetrain", "sft", {"flags": ("no-labelled-head",)}),
    ("kubetrain-sft-padding-free", "kubetrain", "sft", {"packing": True}),
    ("kubetrain-lora", "kubetrain", "lora", {}),
    ("trl-lora", "trl", "lora", SAME_SETTINGS),
    ("kubetrain-dpo", "kubetrain", "dpo", {}),
    ("trl-dpo", "trl", "dpo", SAME_SETTINGS),
]


@dataclass
class Row:
    name: str
    method: str  # sft, lora, dpo
    output: Path
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    train_runtime: float = 0.0
    steps: int = 0
    quality: dict | None = None


def run_measured(command: list[str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, all threads) and peak RSS (bytes) of one
    child process; its output goes to `log`. CPU seconds hardly depend on what else runs on
    a shared machine, so their ratios check the wall-clock ones."""
    started = time.monotonic()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, f"{command} exited {code}:\n{log.read_text()[-4000:]}"
    cpu = usage.ru_utime + usage.ru_stime
    return time.monotonic() - started, cpu, usage.ru_maxrss * 1024  # KiB on Linux


def matmul_peak_flops() -> float:
    """This machine's fp32 matmul FLOP/s with torch's threads, best of a few tries."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(8):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * 1024**3 / best


def model_flops_per_token(config, mean_length: float) -> float:
    """6 x parameters (the embedding lookup excluded, the LM head included) plus attention."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    params = layers * per_layer + h * config.vocab_size
    attention = layers * 2 * 2 * h * mean_length / 2  # causal: half of the scores
    return 6 * params + 3 * attention


def kubetrain_row(name: str, method: str, spec: dict, tmp: Path, *flags: str) -> Row:
    output = tmp / name
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {**spec, "method": method, "output": str(output)},
    }
    run = parse_document(doc, "bench")
    cfg = to_trainer_config(run.metadata.name, run.spec, resolve_local_uri, metrics_port=0)
    config = tmp / f"{name}.yaml"
    config.write_text(dump_trainer_config(cfg))
    row = Row(name, method, output)
    row.wall_seconds, row.cpu_seconds, row.peak_rss = run_measured(
        [sys.executable, str(HERE / "kubetrain_child.py"), str(config), *flags], tmp / f"{name}.log"
    )
    metrics = json.loads((output / "metrics.json").read_text())
    row.train_runtime, row.steps = metrics["train_runtime_seconds"], metrics["global_step"]
    return row


def trl_row(name: str, method: str, settings: dict, tmp: Path) -> Row:
    output = tmp / name
    output.mkdir()
    row = Row(name, method, output)
    row.wall_seconds, row.cpu_seconds, row.peak_rss = run_measured(
        [
            sys.executable,
            str(HERE / "trl_child.py"),
            json.dumps({**settings, "output": str(output)}),
        ],
        tmp / f"{name}.log",
    )
    bench = json.loads((output / "bench.json").read_text())
    row.train_runtime, row.steps = bench["train_runtime"], bench["global_step"]
    return row


def evaluate(row: Row, settings: dict) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "evaluate_child.py"),
            json.dumps({**settings, "model": str(row.output)}),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_throughput_against_trl(tmp_path: Path):
    train_chats, eval_chats = chats(TRAIN_CHATS, seed=1), chats(EVAL_CHATS, seed=2)
    train_pairs, eval_pairs = (
        preference_pairs(TRAIN_PAIRS, seed=3),
        preference_pairs(EVAL_PAIRS, seed=4),
    )
    paths = {
        name: write_jsonl(rows, tmp_path / f"{name}.jsonl")
        for name, rows in [
            ("train_chats", train_chats),
            ("eval_chats", eval_chats),
            ("train_pairs", train_pairs),
            ("eval_pairs", eval_pairs),
        ]
    }

    # The starting model: random weights of the shape above, a BPE trained on the chats.
    base = tmp_path / "base"
    texts = [m["content"] for row in train_chats for m in row["messages"]]
    texts += [row[k] for row in train_pairs for k in ("prompt", "chosen", "rejected")]
    texts += [lexicon()] * 2  # min_frequency 2: every word of the language gets its merges
    tokenizer = train_bpe_tokenizer(texts, vocab_size=8000, min_frequency=2)
    torch.manual_seed(SEED)
    model = build_model(ARCHITECTURE, tokenizer)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    parameters = sum(p.numel() for p in model.parameters())

    # Non-padding tokens per epoch, counted here as each side's collator will see them.
    chat_lengths = [
        min(
            MAX_LENGTH,
            len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]),
        )
        for r in train_chats
    ]
    pair_lengths = [
        sum(
            min(MAX_LENGTH, len(tokenizer(r["prompt"] + r[k])["input_ids"]))
            for k in ("chosen", "rejected")
        )
        for r in train_pairs
    ]
    tokens = {"sft": sum(chat_lengths) * EPOCHS, "dpo": sum(pair_lengths) * EPOCHS}
    tokens["lora"] = tokens["sft"]

    training = {
        "numTrainEpochs": EPOCHS,
        "perDeviceTrainBatchSize": BATCH,
        "seed": SEED,
        "saveSteps": 1_000_000,
        "loggingSteps": 10,
        "evalStrategy": "no",
    }
    chat_data = {"train": str(paths["train_chats"]), "format": "messages", "maxLength": MAX_LENGTH}
    pair_data = {
        "train": str(paths["train_pairs"]),
        "format": "preference",
        "maxLength": MAX_LENGTH,
    }

    def spec(method: str, data: dict, **extra) -> dict:
        learning_rate = LEARNING_RATE[method]
        return {
            "model": {"name": str(base)},
            "data": data,
            "training": {**training, "learningRate": learning_rate},
            **extra,
        }

    def trl(method: str, train: Path, knobs: dict, **extra) -> dict:
        return {
            "method": "dpo" if method == "dpo" else "sft",
            "model": str(base),
            "train": str(train),
            "epochs": EPOCHS,
            "batch": BATCH,
            "learning_rate": LEARNING_RATE[method],
            "max_length": MAX_LENGTH,
            "seed": SEED,
            "beta": BETA,
            "trl": knobs,
            **extra,
        }

    lora_spec = {
        "r": LORA["r"],
        "loraAlpha": LORA["lora_alpha"],
        "loraDropout": LORA["lora_dropout"],
        "targetModules": LORA["target_modules"],
    }
    kubetrain_specs = {
        "sft": spec("sft", chat_data),
        "lora": spec("lora", chat_data, lora=lora_spec),
        "dpo": spec("dpo", pair_data, dpo={"beta": BETA}),
    }
    trl_data = {
        "sft": paths["train_chats"],
        "lora": paths["train_chats"],
        "dpo": paths["train_pairs"],
    }

    def measure(name: str, side: str, method: str, knobs: dict) -> Row:
        if side == "kubetrain":
            flags = knobs.pop("flags", ())
            spec_ = kubetrain_specs[method]
            spec_ = {**spec_, "data": {**spec_["data"], **knobs}}
            return kubetrain_row(name, method, spec_, tmp_path, *flags)
        lora = {"lora": LORA} if method == "lora" else {}
        return trl_row(name, method, trl(method, trl_data[method], knobs, **lora), tmp_path)

    wanted = os.environ.get("KUBETRAIN_BENCH_ROWS", "").split(",")
    picked = [row for row in ROWS if row[0] in wanted] or ROWS
    names = {name for name, *_ in picked} | {BASELINES[method] for _, _, method, _ in picked}
    rows = [measure(n, side, method, dict(knobs)) for n, side, method, knobs in ROWS if n in names]

    for row in rows:
        if row.method == "dpo":
            settings = {
                "kind": "pairs",
                "data": str(paths["eval_pairs"]),
                "reference": str(base),
                "beta": BETA,
            }
        else:
            settings = {"kind": "chats", "data": str(paths["eval_chats"])}
        row.quality = evaluate(row, {**settings, "tokenizer": str(base), "max_length": MAX_LENGTH})

    peak = matmul_peak_flops()
    mean_length = sum(chat_lengths) / len(chat_lengths)
    flops_per_token = model_flops_per_token(model.config, mean_length)
    print(
        f"\nThroughput benchmark: {parameters / 1e6:.1f}M-parameter qwen2; {TRAIN_CHATS} chats, "
        f"{tokens['sft']:,} tokens (mean {mean_length:.0f}); {TRAIN_PAIRS} pairs, "
        f"{tokens['dpo']:,} tokens; batch {BATCH}, maxLength {MAX_LENGTH}, {EPOCHS} epoch; "
        f"CPU matmul peak {peak / 1e9:.0f} GFLOP/s; load {os.getloadavg()[0]:.1f}"
    )
    columns = [("tok/s", 8), ("ratio", 7), ("tok/s wall", 11), ("CPU ratio", 10)]
    columns += [("steps", 6), ("eval", 13)]
    columns += [("RSS MiB", 8), ("RSS x", 6), ("GFLOP/s", 8), ("of peak", 8)]
    print(f"{'':32}" + "".join(f"{title:>{width}}" for title, width in columns))
    baseline = {m: row for row in rows for m, name in BASELINES.items() if row.name == name}
    for row in rows:
        count, against = tokens[row.method], baseline[row.method]
        rate = count / row.train_runtime
        quality = row.quality
        if "rewards_accuracy" in quality:
            figure = f"acc {quality['rewards_accuracy']:.3f}"
        else:
            figure = f"loss {quality['eval_loss']:.4f}"
        achieved = rate * flops_per_token
        cells = [
            f"{rate:8.0f}",
            f"{rate * against.train_runtime / count:7.2f}",
            f"{count / row.wall_seconds:11.0f}",
            f"{against.cpu_seconds / row.cpu_seconds:10.2f}",
            f"{row.steps:6d}",
            f"{figure:>13}",
            f"{row.peak_rss / 2**20:8.0f}",
            f"{row.peak_rss / against.peak_rss:6.2f}",
            f"{achieved / 1e9:8.1f}",
            f"{achieved / peak:8.1%}",
        ]
        print(f"{row.name:32}" + "".join(cells))
    for row in rows:
        assert row.steps > 0, row.name
