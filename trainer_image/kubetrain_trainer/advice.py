"""The guide's troubleshooting remedies, with a run's own values, for messages.

Torch-free, for both sides: the operator puts them in the condition of a run that ran out of
memory or went unstable (kubetrain.restarts), the trainer's preflight in its refusal. `run`
is a TrainerConfig or a TrainingRun spec: both have method, training, data, lora and dpo.
"""

from __future__ import annotations

from typing import Any

# The guide's remedies: sequences no longer than this, warmup of at least this many steps.
SHORTER_MAX_LENGTH = 1024
STEADY_WARMUP_STEPS = 100
STEADY_MAX_GRAD_NORM = 1.0
STEADY_WEIGHT_DECAY = 0.01


def memory_advice(spec: Any, *, host_memory_limit: str | None = None) -> str:
    """The guide's OOM remedies, each with the run's current value. `host_memory_limit` is
    given (the limit, or "" for none) when the host ran out rather than the device."""
    training = spec.training
    batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    remedies = []
    if host_memory_limit is not None:
        remedies.append(
            f"resources.limits.memory is {host_memory_limit}: raise it"
            if host_memory_limit
            else "set a larger resources.limits.memory (none is set, so a namespace default "
            "or the node applies)"
        )
        if training.dataloader_num_workers:
            remedies.append(
                f"dataloaderNumWorkers {training.dataloader_num_workers} -> fewer (each "
                "worker holds its own copy of the data)"
            )
    if batch > 1:
        remedies.append(
            f"perDeviceTrainBatchSize {batch} -> try {batch // 2} with "
            f"gradientAccumulationSteps {accumulation * 2} (the same effective batch)"
        )
    else:
        remedies.append(f"perDeviceTrainBatchSize is already 1 (accumulation {accumulation})")
    if not training.gradient_checkpointing:
        remedies.append("gradientCheckpointing is off: turn it on (less memory, ~30% slower)")
    if not (training.bf16 or training.fp16):
        remedies.append("bf16 is off: turn it on (Ampere or newer GPUs; fp16 on older ones)")
    max_length = spec.data.max_length if spec.data is not None else None
    if max_length and max_length > SHORTER_MAX_LENGTH:
        remedies.append(f"data.maxLength {max_length} -> try {SHORTER_MAX_LENGTH}")
    elif max_length:
        remedies.append(f"data.maxLength is {max_length}")
    uses_lora = spec.method == "lora" or (spec.dpo is not None and spec.dpo.use_lora)
    qlora = uses_lora and spec.lora is not None and spec.lora.load_in_4bit
    if host_memory_limit is None and training.sharding == "none" and not qlora:
        remedies.append(
            "training.sharding is none: fsdp keeps 1/N of the weights, gradients and "
            "optimizer states on each of the N processes"
        )
    elif (
        host_memory_limit is None and training.sharding == "fsdp" and not training.fsdp_cpu_offload
    ):
        remedies.append(
            "training.fsdpCpuOffload is off: it moves the shards to host memory (slower)"
        )
    if spec.method in ("sft", "dpo") and not uses_lora:
        remedies.append(
            f"method {spec.method} trains every weight: lora trains a small adapter instead "
            "(lora.loadIn4Bit: true also loads the base model in 4 bits)"
        )
    elif uses_lora and not (spec.lora is not None and spec.lora.load_in_4bit):
        remedies.append("lora.loadIn4Bit is off: QLoRA loads the base model in 4 bits")
    return "Try: " + "; ".join(remedies)


def stability_advice(spec: Any) -> str:
    """The guide's stability knobs, each with the run's current value."""
    training = spec.training
    lr = training.learning_rate
    remedies = [f"learningRate {lr:g} -> try {lr / 2:g} (or lower)"]
    if training.warmup_steps < STEADY_WARMUP_STEPS and not training.warmup_ratio:
        remedies.append(
            f"warmupSteps {training.warmup_steps} -> at least {STEADY_WARMUP_STEPS} (or "
            "warmupRatio 0.05)"
        )
    if not training.max_grad_norm or training.max_grad_norm > STEADY_MAX_GRAD_NORM:
        remedies.append(
            f"maxGradNorm {training.max_grad_norm:g} -> {STEADY_MAX_GRAD_NORM:g} (clip gradients)"
        )
    if training.weight_decay < STEADY_WEIGHT_DECAY:
        remedies.append(f"weightDecay {training.weight_decay:g} -> {STEADY_WEIGHT_DECAY:g}")
    if training.fp16:
        remedies.append("fp16 overflows easily: bf16 has fp32's range (Ampere or newer)")
    return "Try: " + "; ".join(remedies)
