"""Unstable training stops (exit 72) within a few steps; a device out of memory exits 71.

The stability checks are pure functions of one log entry and of per-layer gradient norms,
tested as tables; then the tiny from_scratch example trains for real with a learning rate
of 1e4, which blows up at once, and must stop after `patienceSteps` logged steps with the
termination message the operator reads. A CPU never runs out of memory on its own, so the
OOM case injects torch's own OutOfMemoryError into the first training step.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from example_specs import example, with_spec

from kubetrain.api import parse_document
from kubetrain.local import run_locally
from kubetrain_trainer.contract import (
    METRICS_FILE,
    OUT_OF_MEMORY_PREFIX,
    UNSTABLE_PREFIX,
    ExitCode,
)
from kubetrain_trainer.stability import gradient_anomalies, logged_problem

INF, NAN = math.inf, math.nan
KUBETRAIN = str(Path(sys.executable).parent / "kubetrain")


@pytest.mark.parametrize(
    ("logs", "limit", "problem"),
    [
        ({"loss": 2.3, "grad_norm": 1.2}, 1e4, None),
        ({"loss": NAN, "grad_norm": 1.2}, 1e4, "loss is nan"),
        ({"loss": INF}, 1e4, "loss is inf"),
        ({"loss": 2.3, "grad_norm": NAN}, 1e4, "gradient norm is nan"),
        ({"loss": 2.3, "grad_norm": 3e5}, 1e4, "gradient norm 3e+05 exceeds gradNormLimit 10000"),
        ({"loss": 2.3, "grad_norm": 3e5}, None, None),  # the limit turned off
        ({"eval_loss": 2.0}, 1e4, None),
    ],
)
def test_one_log_entry_is_judged(logs: dict, limit: float | None, problem: str | None) -> None:
    assert logged_problem(logs, limit) == problem


def test_layer_anomalies_name_the_worst_few_of_each_kind() -> None:
    norms = [("embed.weight", 0.5), ("q.weight", NAN), ("mlp.weight", 40.0),
             ("head.weight", 12.0), ("norm.weight", 1e-10), ("lora_A", 0.0)]  # fmt: skip
    assert gradient_anomalies(norms) == {
        "non-finite": ["q.weight"],
        "large": ["mlp.weight (40)", "head.weight (12)"],
        "vanishing": ["norm.weight (1.0e-10)"],
    }
    assert gradient_anomalies([("a", 1.0), ("b", 0.0)]) == {}
    many = [(f"layer{i}", 100.0 + i) for i in range(9)]
    assert len(gradient_anomalies(many)["large"]) == 5


def train_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **training) -> tuple[int, str]:
    """The tiny from_scratch run with `training` changes: (exit code, termination message)."""
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETRAIN_TERMINATION_LOG", str(termination))
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        output=str(tmp_path / "out"),
        training={"evalStrategy": "no", "saveSteps": 1000, **training},
    )
    result = run_locally(parse_document(doc, "test"), metrics_port=0)
    return result.exit_code, termination.read_text() if termination.exists() else ""


@pytest.mark.slow
def test_a_learning_rate_of_1e4_stops_as_unstable_within_a_few_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a user meets it: `kubetrain run FILE` exits 72 and says what to change.
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETRAIN_TERMINATION_LOG", str(termination))
    training = {"learningRate": 1e4, "loggingSteps": 1, "maxSteps": 60, "warmupRatio": 0,
                "evalStrategy": "no", "saveSteps": 1000}  # fmt: skip
    doc = with_spec(
        example("trainingrun-from-scratch-tiny.yaml"),
        output=str(tmp_path / "out"),
        training=training,
    )
    spec_file = tmp_path / "unstable.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [KUBETRAIN, "run", str(spec_file), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    said = termination.read_text()
    assert done.returncode == ExitCode.TRAINING_UNSTABLE, done.stderr[-3000:]
    assert said.startswith(f"{UNSTABLE_PREFIX}: "), said
    assert "3 logged steps in a row" in said
    steps = [int(step) for step in re.findall(r"step (\d+):", said)]
    assert len(steps) == 3 and steps[-1] <= 10, said  # it stopped early, not at step 60
    assert not (tmp_path / "out" / METRICS_FILE).exists()  # no finished model is claimed
    assert "Try: learningRate 10000 -> try 5000 (or lower)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_device_out_of_memory_exits_71(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The injection must reach the trainer process: run_locally starts it as a child, which
    # imports this hook through sitecustomize on PYTHONPATH.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import transformers, torch\n"
        "def training_step(self, *args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "transformers.Trainer.training_step = training_step\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    code, said = train_tiny(tmp_path, monkeypatch, maxSteps=5)
    assert code == ExitCode.DEVICE_OUT_OF_MEMORY, said
    assert said == f"{OUT_OF_MEMORY_PREFIX}: CUDA out of memory. Tried to allocate 2.00 GiB"
