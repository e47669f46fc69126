"""What an ended attempt means for its run: restart (counted or not) or fail, with advice.

`retry_verdict` is `spec.restartPolicy` applied to one failed attempt, in this order:
a config or data error (78) never restarts; an exit code in `failOn` fails the run and one
in `retryOn` restarts it within `maxRestarts`; a preemption (75, torchrun's 143) or a pod
disruption (eviction, node loss) always restarts and costs no restart of the budget; running
out of memory (the kernel's OOMKilled, or the trainer's 71 for the device) restarts once,
then fails with reason OutOfMemory; training that went unstable (72) fails at once with
reason InstabilityDetected; anything else restarts within `maxRestarts`.

The advice is the guide's troubleshooting chapter with the run's own values, so the
condition says what to change: `memory_advice` for out of memory (batch size with the
accumulation that keeps the effective batch, gradient checkpointing, mixed precision,
sequence length, LoRA) and `stability_advice` for instability (learning rate, warmup,
clipping, weight decay). Pure functions, table-tested in tests/unit/test_restarts.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetrain.api import (
    REASON_CONFIG_ERROR,
    REASON_EXIT_CODE_NOT_RETRIED,
    REASON_INSTABILITY_DETECTED,
    REASON_OUT_OF_MEMORY,
    AttemptRecord,
    TrainingRunSpec,
)
from kubetrain.status import (
    CAUSE_DEVICE_OOM,
    CAUSE_OOM_KILLED,
    CAUSE_UNSTABLE,
    DISRUPTION_CAUSES,
)

MEMORY_CAUSES = frozenset({CAUSE_OOM_KILLED, CAUSE_DEVICE_OOM})
# The guide's remedies: sequences no longer than this, warmup of at least this many steps.
SHORTER_MAX_LENGTH = 1024
STEADY_WARMUP_STEPS = 100
STEADY_MAX_GRAD_NORM = 1.0
STEADY_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Verdict:
    """Restart (`counted` against maxRestarts or not), or fail with `reason` and `message`."""

    restart: bool
    counted: bool = True
    reason: str = ""
    message: str = ""


def retry_verdict(
    spec: TrainingRunSpec,
    cause: str,
    exit_code: int | None,
    message: str,
    history: Sequence[AttemptRecord] = (),
) -> Verdict:
    """The restart policy applied to one failed attempt (the module docstring's order)."""
    policy = spec.restart_policy
    if cause == REASON_CONFIG_ERROR:
        return Verdict(False, reason=REASON_CONFIG_ERROR, message=message)
    if exit_code is not None and exit_code in policy.fail_on:
        return Verdict(
            False,
            reason=REASON_EXIT_CODE_NOT_RETRIED,
            message=f"{message}; exit code {exit_code} is in restartPolicy.failOn",
        )
    if exit_code is not None and exit_code in policy.retry_on:
        return Verdict(True)
    if cause in DISRUPTION_CAUSES:
        return Verdict(True, counted=False)
    if cause in MEMORY_CAUSES:
        if any(record.cause in MEMORY_CAUSES for record in history):
            return Verdict(
                False,
                reason=REASON_OUT_OF_MEMORY,
                message=f"{message}; out of memory again after one retry. "
                f"{memory_advice(spec, host=cause == CAUSE_OOM_KILLED)}",
            )
        return Verdict(True)
    if cause == CAUSE_UNSTABLE:
        return Verdict(
            False,
            reason=REASON_INSTABILITY_DETECTED,
            message=f"{message}. {stability_advice(spec)}",
        )
    return Verdict(True)


def memory_advice(spec: TrainingRunSpec, *, host: bool) -> str:
    """The guide's OOM remedies, each with the run's current value."""
    training = spec.training
    batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    remedies = []
    if host:
        limit = spec.resources.limits.get("memory")
        remedies.append(
            f"resources.limits.memory is {limit}: raise it"
            if limit
            else "set a larger "
            "resources.limits.memory (none is set, so a namespace default or the node applies)"
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
    if spec.method in ("sft", "dpo") and not uses_lora:
        remedies.append(
            f"method {spec.method} trains every weight: lora trains a small adapter instead "
            "(lora.loadIn4Bit: true also loads the base model in 4 bits)"
        )
    elif uses_lora and not (spec.lora is not None and spec.lora.load_in_4bit):
        remedies.append("lora.loadIn4Bit is off: QLoRA loads the base model in 4 bits")
    return "Try: " + "; ".join(remedies)


def stability_advice(spec: TrainingRunSpec) -> str:
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
