"""training.autoFindBatchSize keeps the effective batch: a smaller batch, more accumulation.

The arithmetic is a table; then the tiny from_scratch run trains with an out-of-memory
error injected at every batch larger than 4 (a CPU never runs out on its own; torch's own
OutOfMemoryError, raised from the training step as CUDA raises it): it goes on at 4 rows
with accumulation 2, takes exactly the steps batch 8 would have, and says so in
metrics.json. With every size refused it exits 71, naming the sizes it tried.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer.contract import METRICS_FILE, OUT_OF_MEMORY_PREFIX, ExitCode
from kubetrain_trainer.session import smaller_batch


@pytest.mark.parametrize(
    ("current", "offered", "effective", "chosen"),
    [
        (8, 7, 8, 4),  # transformers offers 90%; 4 is the largest divisor of 8 below it
        (4, 6, 8, 2),  # never back up: below the last size tried
        (2, 5, 8, 1),
        (1, 4, 8, None),  # nothing below 1: out of memory for good
        (6, 5, 12, 4),  # effective 12 (6 x 2): 4 with accumulation 3
        (3, 2, 3, 1),
        (16, 14, 32, 8),
    ],
)
def test_the_next_batch_size_divides_the_effective_batch(
    current: int, offered: int, effective: int, chosen: int | None
) -> None:
    assert smaller_batch(current, offered, effective) == chosen


def train_with_memory_for(
    rows: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, Path]:
    """The tiny from_scratch run (batch 8, one epoch) on a 'device' that holds `rows` rows."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import torch, transformers\n"
        "step = transformers.Trainer.training_step\n"
        "def training_step(self, model, inputs, *args, **kwargs):\n"
        f"    if inputs['input_ids'].shape[0] > {rows}:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.00 GiB')\n"
        "    return step(self, model, inputs, *args, **kwargs)\n"
        "transformers.Trainer.training_step = training_step\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETRAIN_TERMINATION_LOG", str(termination))
    output = tmp_path / "out"
    training = {"numTrainEpochs": 1, "autoFindBatchSize": True, "evalStrategy": "no",
                "saveSteps": 1000}  # fmt: skip
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"), output=str(output), training=training
    )
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    return result.exit_code, termination.read_text() if termination.exists() else "", output


@pytest.mark.slow
def test_an_out_of_memory_batch_halves_and_accumulation_doubles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, said, output = train_with_memory_for(4, tmp_path, monkeypatch)
    assert code == ExitCode.OK, said
    summary = json.loads((output / METRICS_FILE).read_text())
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"]) == (
        4,
        2,
    )
    # 261 blocks of 128 tokens: ceil(261 / 8) = 33 steps at batch 8, and so at 4 x 2.
    assert summary["global_step"] == 33


@pytest.mark.slow
def test_out_of_memory_at_every_size_exits_71_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, said, _ = train_with_memory_for(0, tmp_path, monkeypatch)
    assert code == ExitCode.DEVICE_OUT_OF_MEMORY, said
    assert said == (
        f"{OUT_OF_MEMORY_PREFIX}: the device ran out of memory at every per-device batch size "
        "from 8 down to 1 (training.autoFindBatchSize)"
    )
