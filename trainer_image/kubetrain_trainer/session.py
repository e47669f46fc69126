"""What every method shares around `trainer.train()`: arguments, callbacks, resume, save.

A method file builds its model, data and TRL/transformers trainer; `Session` turns the
TrainerConfig's `training` block into TrainingArguments (or a TRL config subclass), adds the
metrics, checkpoint-marker and preemption callbacks, resumes from the newest complete
checkpoint, and saves the final model once training finished (not when it was preempted).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput

from kubetrain_trainer.advice import memory_advice
from kubetrain_trainer.checkpoints import (
    CompleteMarkerCallback,
    PreemptionCallback,
    install_sigterm_handler,
    resume_checkpoint,
)
from kubetrain_trainer.config import ConfigError, TrainerConfig
from kubetrain_trainer.contract import TRAINER_STATE_FILE, TrainerMetricsFile
from kubetrain_trainer.data import LoadedData, load_data
from kubetrain_trainer.metrics import PrometheusCallback, serve_metrics
from kubetrain_trainer.preflight import ModelShape, does_not_fit_message, estimate_memory, gib
from kubetrain_trainer.progress import drop_printer_callback, progress_callbacks
from kubetrain_trainer.sharding import (
    check_resumable,
    deepspeed_arguments,
    fsdp_arguments,
    local_part,
    save_final_model,
    start_deepspeed,
)
from kubetrain_trainer.stability import StabilityCallback
from kubetrain_trainer.storage import PublishCheckpoints, RemoteOutput

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""


def sampling_strategy(cfg: TrainerConfig) -> str:
    """transformers' name for the order of training rows (see throughput.py)."""
    return "group_by_length" if cfg.data.group_by_length else "random"


def training_arguments(
    cfg: TrainerConfig, args_class: type[TrainingArguments], **method_args: Any
) -> TrainingArguments:
    """Map the `training` block onto transformers/TRL argument names (mostly one to one).

    `method_args` add the method's own fields (beta, max_length, ...) and win over these.
    """
    t = cfg.training
    arguments = dict(
        output_dir=cfg.output_dir,
        run_name=cfg.run_name,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        auto_find_batch_size=t.auto_find_batch_size,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio.
        warmup_steps=t.warmup_steps or t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=t.bf16,
        fp16=t.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        torch_compile=t.torch_compile,
        torch_compile_backend=t.torch_compile_backend,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps or t.logging_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # A NaN loss must reach the logs (and the stability check), not be averaged away.
        logging_nan_inf_filter=False,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        # Pinned memory only helps copies to a GPU (and warns without one).
        dataloader_pin_memory=t.dataloader_pin_memory and torch.cuda.is_available(),
        remove_unused_columns=t.remove_unused_columns,
        # Without a GPU, only use_cpu makes transformers set up DDP (gloo) across processes.
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        # kubetrain_trainer.progress shows progress instead of tqdm, on a terminal or not.
        disable_tqdm=True,
    )
    if t.sharding != "none" and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            f"training.sharding: {t.sharding} shards over a torchrun process group; start the "
            "trainer with python -m kubetrain_trainer.launch (as pods and `kubetrain run` do)"
        )
    if t.fsdp_cpu_offload and not torch.cuda.is_available():
        raise ConfigError(
            "training.fsdpCpuOffload moves the shards from the GPUs to host memory; without "
            "a GPU they are in host memory already (and torch's offload pins memory, which "
            "needs CUDA): remove it, or request nvidia.com/gpu in spec.resources"
        )
    adapter = cfg.method == "lora" or (cfg.dpo is not None and cfg.dpo.use_lora)
    arguments.update(fsdp_arguments(t, adapter))
    arguments.update(deepspeed_arguments(t))
    try:
        args = args_class(**{**arguments, **method_args})
    except ValueError as e:
        # transformers checks combinations we do not repeat (e.g. fp16 without a GPU).
        raise ConfigError(f"training: {e}") from e
    start_deepspeed(args)  # before the method builds its model (ZeRO-3 partitions it)
    return args


@dataclass
class FitResult:
    """What a method's training produced (the model itself is saved in the output dir)."""

    trainer: Trainer
    train_output: TrainOutput
    replica_checksums: list[float]
    merged_dir: str | None = None  # lora with merge: true


@dataclass
class Session:
    """Callbacks and bookkeeping for one run of one method."""

    cfg: TrainerConfig
    prometheus: PrometheusCallback | None = None
    preemption: PreemptionCallback = field(default_factory=PreemptionCallback)
    started: float = field(default_factory=time.monotonic)
    data: LoadedData | None = None  # what load_data read, for metrics.json
    # Rows per split that truncation left nothing to learn from (set by sft and dpo).
    rows_dropped: dict[str, int] = field(default_factory=dict)
    remote_output: RemoteOutput | None = None  # an s3:// output the checkpoints go to

    def __post_init__(self) -> None:
        install_sigterm_handler()
        # Decided before any model or data loads, so the libraries' own bars obey it too.
        self.progress = progress_callbacks(sys.stderr.isatty(), self.cfg.run_name)
        if self.is_main_process:
            self.prometheus = PrometheusCallback(method=self.cfg.method, run_name=self.cfg.run_name)
            self.server = serve_metrics(self.prometheus.registry, self.cfg.metrics_port)

    @property
    def is_main_process(self) -> bool:
        # From torchrun's env, not accelerate's PartialState: creating that before
        # TrainingArguments does would leave the Trainer thinking it is not distributed.
        return int(os.environ.get("RANK", "0")) == 0

    def load_data(self) -> LoadedData:
        """Read and check cfg.data (kubetrain_trainer.data.load_data), noting what it was."""
        self.data = load_data(self.cfg.data)
        eval_rows = len(self.data.eval) if self.data.eval is not None else 0
        log.info(
            "data %s: %d train rows, %d eval rows (%s)",
            self.data.fingerprint, len(self.data.train), eval_rows, self.data.format,
        )  # fmt: skip
        return self.data

    def record_data(self, summary: TrainerMetricsFile) -> None:
        """Put the data's fingerprint and row counts into metrics.json's summary."""
        if self.data is None:
            return
        summary.data_fingerprint = self.data.fingerprint
        summary.train_rows = len(self.data.train)
        summary.eval_rows = len(self.data.eval) if self.data.eval is not None else 0
        summary.train_rows_dropped = self.rows_dropped.get("train", 0)
        summary.eval_rows_dropped = self.rows_dropped.get("eval", 0)

    def callbacks(self) -> list:
        # The marker callback runs before Prometheus so checkpoint_step never names an
        # unmarked folder.
        callbacks = [
            *self.progress,
            CompleteMarkerCallback(),
            # After the marker callback: a checkpoint is published once it is complete.
            *([PublishCheckpoints(self.remote_output)] if self.remote_output else []),
            self.preemption,
            StabilityCallback(self.cfg.training.stability),
        ]
        if self.prometheus is not None:
            callbacks.append(self.prometheus)
        if self.cfg.training.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(self.cfg.training.early_stopping_patience))
        return callbacks

    def fit(self, trainer: Trainer) -> FitResult:
        """Train (resuming if a complete checkpoint exists), save the model, evaluate.

        The final evaluation lands in trainer.state.log_history, where metrics.json reads it;
        rank 0 also saves that history as the output's trainer_state.json for the report.
        """
        drop_printer_callback(trainer)
        if trainer.args.auto_find_batch_size:
            keep_effective_batch(trainer)
        checkpoint = resume_checkpoint(self.cfg.output_dir)
        if checkpoint:
            check_resumable(checkpoint, self.cfg.training.sharding, trainer.args.world_size)
            log.info("resuming from %s", checkpoint)
        output = trainer.train(resume_from_checkpoint=checkpoint)
        if self.preemption.preempted:
            raise Preempted(f"stopped by SIGTERM at step {trainer.state.global_step}")
        save_final_model(trainer, self.cfg.output_dir)
        checksums = replica_checksums(trainer.model)
        if trainer.eval_dataset is not None:
            trainer.evaluate()
        if trainer.is_world_process_zero():
            # transformers saves its state only into checkpoints, which miss the last steps
            # and the final evaluation (and may be pruned); the report plots this copy.
            trainer.state.save_to_json(os.path.join(self.cfg.output_dir, TRAINER_STATE_FILE))
        return FitResult(trainer, output, checksums)

    def runtime(self) -> float:
        return time.monotonic() - self.started

    def tokens_at_start(self) -> int:
        """Tokens already seen by the checkpoint this run resumed from."""
        return self.prometheus.tokens_at_start if self.prometheus is not None else 0


def preflight(cfg: TrainerConfig) -> None:
    """Log the memory estimate; refuse (ConfigError, exit 78) a run that cannot fit its GPU.

    On rank 0 before any weights load: the shape comes from the architecture or the
    model's config.json (a hub model's is its only file fetched here). Without a GPU the
    estimate is only logged. A shape that cannot be read is no reason to refuse a run.
    """
    if cfg.method == "evaluate" or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        if cfg.model.architecture is not None:
            shape = ModelShape.of_architecture(cfg.model.architecture)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                cfg.model.name,
                revision=cfg.model.revision,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            shape = ModelShape.of_config(config.to_dict())
    except (OSError, ValueError, KeyError) as e:
        log.info("preflight: no memory estimate (the model's config cannot be read: %s)", e)
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    estimate = estimate_memory(
        cfg.method, cfg.model, cfg.training, cfg.data, cfg.lora, cfg.dpo, shape, world_size
    )
    if not torch.cuda.is_available():
        log.info("preflight: %s", estimate.summary())
        return
    device = torch.cuda.get_device_properties(0).total_memory
    if not estimate.fits(device):
        raise ConfigError(does_not_fit_message(estimate, device, memory_advice(cfg)))
    log.info("preflight: %s of the %s device", estimate.summary(), gib(device))


class NoBatchSizeFits(RuntimeError):
    """Out of device memory at every batch size that keeps the effective batch."""


def smaller_batch(current: int, offered: int, effective: int) -> int | None:
    """The batch size to try after an out-of-memory error at `current`.

    transformers' finder offers 90% of the last size it tried; the effective batch stays
    `effective` only with a size that divides it, so this takes the largest divisor of
    `effective` at most `offered` and below `current`. None when there is none (at 1).
    """
    for size in range(min(offered, current - 1), 0, -1):
        if effective % size == 0:
            return size
    return None


def keep_effective_batch(trainer: Trainer) -> None:
    """Make transformers' batch-size finder keep the effective batch: each smaller
    per-device batch comes with the accumulation that gives the same product."""
    args = trainer.args
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    update = trainer._update_auto_batch_size
    tried: list[int] = []

    def update_keeping_effective(batch_size: int) -> None:
        size = batch_size
        if tried:
            found = smaller_batch(tried[-1], batch_size, effective)
            if found is None:
                raise NoBatchSizeFits(
                    f"the device ran out of memory at every per-device batch size from "
                    f"{tried[0]} down to {tried[-1]} (training.autoFindBatchSize)"
                )
            size = found
        elif effective % size:  # resumed at a size a checkpoint kept from another effective
            size = smaller_batch(size + 1, size, effective) or 1
        tried.append(size)
        args.gradient_accumulation_steps = effective // size
        if len(tried) > 1:
            log.warning(
                "out of device memory at perDeviceTrainBatchSize %d: retrying with %d and "
                "gradientAccumulationSteps %d (the effective batch stays %d)",
                tried[-2], size, args.gradient_accumulation_steps, effective,
            )  # fmt: skip
        update(size)

    trainer._update_auto_batch_size = update_keeping_effective  # type: ignore[method-assign]


def replica_checksums(model: torch.nn.Module) -> list[float]:
    """One weight checksum per rank; data-parallel replicas must end identical.

    Cheap insurance against a silent desync (e.g. a rank that skipped a step): the values
    land in metrics.json, and a mismatch is logged as an error. Under FSDP each rank holds
    shards: their sums add up (all_reduce) to the checksum of the model every rank saves.
    """
    parameters = list(model.parameters())
    with torch.no_grad():
        local = sum(local_part(p).detach().double().sum() for p in parameters)
        local = torch.as_tensor(local, dtype=torch.float64).reshape(1).cpu()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local.item()]
    if any(local_part(p) is not p for p in parameters):
        torch.distributed.all_reduce(local)
    gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    values = [t.item() for t in gathered]
    if len(set(values)) > 1:
        log.error("replicas diverged: weight checksums per rank %s", values)
    return values


def leave_process_group() -> None:
    """Wait for every rank at a last barrier; the process then leaves without a teardown.

    destroy_process_group() can hang once a peer has gone (pytorch/pytorch#75097; seen here
    as rank 1 stuck after rank 0 finished, its torchrun then waiting out the 300 s exit
    barrier), and a gloo group left to interpreter exit can abort ("terminate called without
    an active exception"), failing a run whose model was already saved. So no rank tears the
    group down: all meet here, and `__main__` ends the process with os._exit.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
