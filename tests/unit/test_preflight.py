"""The preflight's memory estimate, and `kubetrain validate --preflight` on a stated GPU size.

Parameter counts are checked against the published sizes of the guide's models; the parts
of the estimate move as the knobs the guide names say they should (LoRA, 4-bit, gradient
checkpointing, bf16, batch, DPO's reference model); the command accepts a run that fits the
GPU it is told of and refuses, exit 1, one that cannot, with the run's own values to change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain.api import TrainingRunSpec
from kubetrain_trainer.preflight import (
    GIB,
    KNOWN_MODELS,
    ModelShape,
    estimate_memory,
)

KUBETRAIN = str(Path(sys.executable).parent / "kubetrain")
QWEN_3B = ModelShape.of_config(KNOWN_MODELS["Qwen/Qwen2.5-3B"])
QWEN_7B = ModelShape.of_config(KNOWN_MODELS["Qwen/Qwen2.5-7B"])
SFT: dict[str, Any] = {
    "method": "sft",
    "model": {"name": "Qwen/Qwen2.5-3B"},
    "data": {"train": "pvc://data/chats.jsonl", "maxLength": 1024},
    "training": {"perDeviceTrainBatchSize": 4, "bf16": True},
    "output": "pvc://models/out",
}


def estimate(shape: ModelShape = QWEN_3B, **changes: Any):
    spec = TrainingRunSpec.model_validate({**SFT, **changes})
    return estimate_memory(
        spec.method, spec.model, spec.training, spec.data, spec.lora, spec.dpo, shape
    )


def test_parameter_counts_match_the_published_sizes() -> None:
    assert round(QWEN_3B.parameters / 1e9, 2) == 3.09  # Qwen2.5-3B: 3.09B
    assert round(QWEN_7B.parameters / 1e9, 2) == 7.62  # Qwen2.5-7B: 7.61B (biases left out)


def test_full_fine_tuning_costs_about_16_bytes_a_parameter_in_fp32() -> None:
    fp32 = estimate(model={"name": "m", "torchDtype": "float32"})
    static = fp32.weights + fp32.gradients + fp32.optimizer
    assert static == 16 * QWEN_3B.parameters
    bf16 = estimate()  # the checkpoint's own bf16: weights, gradients and moments at 2 bytes
    assert bf16.weights + bf16.gradients + bf16.optimizer == 8 * QWEN_3B.parameters


def test_the_guides_memory_knobs_each_lower_the_estimate() -> None:
    base = estimate()
    lora = estimate(method="lora", lora={"r": 16})
    assert lora.trainable / lora.parameters < 0.01 and lora.total < base.total
    assert estimate(method="lora", lora={"loadIn4Bit": True}).weights < lora.weights / 3
    checkpointed = estimate(training={"perDeviceTrainBatchSize": 4, "bf16": True,
                                      "gradientCheckpointing": True})  # fmt: skip
    assert checkpointed.activations < base.activations
    half = estimate(training={"perDeviceTrainBatchSize": 2, "bf16": True})
    assert half.activations == pytest.approx(base.activations / 2)
    shorter = estimate(data={"train": "pvc://d/t", "maxLength": 512})
    assert shorter.activations == pytest.approx(base.activations / 2)
    dpo = estimate(method="dpo", data={"train": "pvc://d/p", "maxLength": 1024})
    assert dpo.weights == 2 * base.weights  # the frozen reference model
    assert dpo.activations == pytest.approx(2 * base.activations)  # chosen and rejected


def run_file(tmp_path: Path, **spec: Any) -> Path:
    path = tmp_path / "run.yaml"
    doc = {"apiVersion": "kubetrain.dev/v1alpha1", "kind": "TrainingRun",
           "metadata": {"name": "big"}, "spec": {**SFT, **spec}}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBETRAIN, "validate", "--preflight", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_validate_preflight_refuses_what_cannot_fit_and_accepts_what_can(tmp_path: Path) -> None:
    run = str(run_file(tmp_path))
    need = estimate().total / GIB
    fits = validate(run, "--gpu-memory", f"{int(need) + 2}Gi")
    assert fits.returncode == 0, fits.stderr
    assert f"fits a {int(need) + 2}.0 GiB GPU" in fits.stdout
    refused = validate(run, "--gpu-memory", f"{int(need) - 1}Gi")
    assert refused.returncode == 1, refused.stdout
    assert f"more than the {int(need) - 1}.0 GiB device can hold" in refused.stdout
    for remedy in ("perDeviceTrainBatchSize 4 -> try 2 with gradientAccumulationSteps 2",
                   "gradientCheckpointing is off", "method sft trains every weight"):  # fmt: skip
        assert remedy in refused.stdout, refused.stdout


def test_the_gpu_comes_from_the_node_selectors_product_label(tmp_path: Path) -> None:
    t4 = {"nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4"}}
    refused = validate(str(run_file(tmp_path, resources=t4)))
    assert refused.returncode == 1 and "16.0 GiB device" in refused.stdout
    unknown = validate(str(run_file(tmp_path, resources={})))
    assert unknown.returncode == 0 and "pass --gpu-memory to compare" in unknown.stdout
    bad = validate(str(run_file(tmp_path)), "--gpu-memory", "lots")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpu-memory:"), bad.stderr


def sharded(processes: int, shape: ModelShape = QWEN_7B, **training: Any):
    spec = TrainingRunSpec.model_validate(
        {
            **SFT,
            "training": {"perDeviceTrainBatchSize": 4, "bf16": True, **training},
            "resources": {"requests": {"memory": "1Ti"}},
        }
    )
    return estimate_memory(
        spec.method, spec.model, spec.training, spec.data, spec.lora, spec.dpo, shape, processes
    )


def test_sharding_divides_the_states_by_the_world_size() -> None:
    ddp = sharded(16)  # sharding none: 16 processes each hold everything
    assert ddp.weights + ddp.gradients + ddp.optimizer == 8 * QWEN_7B.parameters
    fsdp = sharded(16, sharding="fsdp")
    layer = sum(a * b for a, b in QWEN_7B.linear_shapes().values()) + 2 * QWEN_7B.hidden_size
    assert fsdp.weights == pytest.approx(2 * QWEN_7B.parameters / 16 + 2 * layer * 2)
    assert fsdp.gradients == ddp.gradients / 16 and fsdp.optimizer == ddp.optimizer / 16
    assert fsdp.activations == ddp.activations  # each device still runs its own batch
    assert "states sharded over 16 processes" in fsdp.summary()
    # 7B full fine-tuning: ~57 GiB of states replicated; ~4.4 GiB a GPU sharded over 16
    # (a 16th of them, plus two gathered decoder layers).
    assert (ddp.total - ddp.activations) / GIB > 55
    assert (fsdp.total - fsdp.activations) / GIB < 5
    # DeepSpeed ZeRO-3 partitions the same states over the same processes.
    assert sharded(16, sharding="deepspeed") == fsdp


def test_cpu_offload_moves_the_shards_to_host_memory() -> None:
    on_device = sharded(8, sharding="fsdp")
    offloaded = sharded(8, sharding="fsdp", fsdpCpuOffload=True)
    assert offloaded.gradients == offloaded.optimizer == 0
    assert offloaded.host == pytest.approx(
        on_device.weights - offloaded.weights + on_device.gradients + on_device.optimizer
    )
    assert offloaded.total < on_device.total
    assert "per process in host memory" in offloaded.summary()


def test_validate_preflight_refuses_offload_without_the_host_memory(tmp_path: Path) -> None:
    training = {"perDeviceTrainBatchSize": 4, "bf16": True, "sharding": "fsdp",
                "fsdpCpuOffload": True}  # fmt: skip
    small = {"nodes": 1, "procPerNode": 8, "requests": {"memory": "16Gi"}}
    refused = validate(str(run_file(tmp_path, training=training, resources=small)))
    assert refused.returncode == 1, refused.stdout
    assert "fsdpCpuOffload keeps ~" in refused.stdout and "memory 16Gi" in refused.stdout
    enough = {**small, "requests": {"memory": "512Gi"}}
    fits = validate(
        str(run_file(tmp_path, training=training, resources=enough)), "--gpu-memory", "80Gi"
    )
    assert fits.returncode == 0, fits.stdout + fits.stderr
