"""Training runs several trainer test files share, each trained once per test session.

- `base_model`: the tiny from_scratch run, the starting model of sft, lora and dpo, as in
  `make demo`.
- `memorise_data`: four instruction rows of sums ("Add 6 and 19." -> "25."), a jsonl file.
- `progress_bars_restored` (every test): transformers' and datasets' progress bars as the
  session started them, whatever a trainer run in this process switched off.
- `memorised_sft`, `memorised_lora`: sft and lora runs (lora with merge: true, so
  `<dir>/merged` exists too) that learn those rows by heart, so the greedy reply to each
  instruction is exactly its output: what `kubetrain generate` and the evaluation suites
  are checked against. Read the rows from `memorise_data`: tests never import a conftest.

The memorising runs are as short as reliably works, seeded so every session trains the
same weights: 40 full-weight steps for sft, 100 for lora, whose rank-8 adapter on every
linear layer needs a higher learning rate (it cannot touch the final norm or the head, so
its replies win by a small margin where sft's win by a wide one). With 60 lora steps the
libraries of 2026-12-02 (peft 0.21, transformers 5.24, trl 1.16) left one of the four
answers wrong; 80 were enough, 100 leave a margin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally


@pytest.fixture(autouse=True)
def progress_bars_restored() -> Iterator[None]:
    """A trainer run in this process (off a terminal) turns the libraries' progress bars
    off for the whole process; every test finds them as the session started them."""
    import datasets
    from transformers.utils import logging as transformers_logging

    yield
    transformers_logging.enable_progress_bar()
    datasets.enable_progress_bars()


MEMORISE_ROWS = [
    {"instruction": "Add 6 and 19.", "output": "25."},
    {"instruction": "Add 3 and 4.", "output": "7."},
    {"instruction": "Add 12 and 30.", "output": "42."},
    {"instruction": "Add 8 and 8.", "output": "16."},
]


def _train(doc: dict, output: Path) -> dict:
    doc = with_spec(doc, output=str(output))
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    assert result.exit_code == 0, f"trainer exited {result.exit_code}"
    return result.metrics


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("from-scratch") / "model"
    metrics = _train(example("trainingrun-from-scratch-tiny.yaml"), output)
    assert metrics["global_step"] == 99
    return output


@pytest.fixture(scope="session")
def memorise_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("memorise") / "sums.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MEMORISE_ROWS))
    return path


def _memorising_run(
    example_name: str, base_model: Path, data: Path, steps: int, learning_rate: float
) -> dict:
    doc = with_spec(
        example(example_name),
        model={"name": str(base_model)},
        data={"train": str(data), "format": "instruction", "maxLength": 64},
        training={
            "maxSteps": steps,
            # Every row in every batch, at a constant rate: nothing to sample or warm up.
            "perDeviceTrainBatchSize": len(MEMORISE_ROWS),
            "learningRate": learning_rate,
            "lrSchedulerType": "constant",
            "warmupRatio": 0.0,
            "evalStrategy": "no",
            "saveSteps": steps,
            "seed": 42,
        },
    )
    del doc["spec"]["data"]["eval"]
    return doc


@pytest.fixture(scope="session")
def memorised_sft(tmp_path_factory, base_model: Path, memorise_data: Path) -> Path:
    output = tmp_path_factory.mktemp("memorised-sft") / "sft"
    doc = _memorising_run("trainingrun-sft-tiny.yaml", base_model, memorise_data, 40, 3e-3)
    _train(doc, output)
    return output


@pytest.fixture(scope="session")
def memorised_lora(tmp_path_factory, base_model: Path, memorise_data: Path) -> Path:
    output = tmp_path_factory.mktemp("memorised-lora") / "lora"
    doc = _memorising_run("trainingrun-lora-tiny.yaml", base_model, memorise_data, 100, 1e-2)
    doc = with_spec(
        doc, lora={"targetModules": "all-linear", "loraDropout": 0.0, "r": 8, "merge": True}
    )
    metrics = _train(doc, output)
    assert metrics["merged_dir"] == str(output / "merged")
    return output
