"""Sharded training through transformers and accelerate: `training.sharding: fsdp|deepspeed`.

With sharding none every process holds the whole model, its gradients and its optimizer
states (DDP). With fsdp, accelerate's FullyShardedDataParallelPlugin (fsdp_version 2)
applies torch's `fully_shard` to every decoder layer (the model's `_no_split_modules`, e.g.
Qwen2DecoderLayer) and to the model: each process keeps 1/world-size of every tensor and
gathers one layer's weights at a time for its forward and backward. Mixed precision follows
bf16/fp16; `fsdpCpuOffload` keeps the shards on the host; gradient checkpointing becomes
FSDP's own activation checkpointing (the Trainer's would gather each layer twice).

What this module adds around the libraries:
- `fsdp_arguments`: the TrainingArguments a Training block asks for (a pure function).
- `FsdpSupport`: accelerate turns FSDP on only for accelerators (CUDA, XPU, ...). torch's
  gloo backend has the collectives FSDP2 needs (all_gather_into_tensor,
  reduce_scatter_tensor), so on CPU the same plugin is put in place exactly as
  AcceleratorState does for a GPU: tests and CPU clusters run the production code path.
  It also keeps the ranks agreeing on the best checkpoint (loadBestModelAtEnd).
- Checkpoints are torch distributed checkpoints (DCP: `pytorch_model_fsdp_0/` and
  `optimizer_0/`, one `.distcp` file per rank holding its shards), so no rank gathers the
  model or the optimizer state to save one. DCP re-shards on load: a run resumes onto
  another world size (4 ranks to 2 after a node loss). `check_resumable` refuses a
  checkpoint written with the other sharding, with the reason.
- `save_final_model`: the finished model is consolidated once, tensor by tensor, into rank
  0's host memory and saved as a normal Hugging Face folder (`from_pretrained` reads it).

With deepspeed, transformers hands the model to DeepSpeed's ZeRO stage 3 engine: the same
partitioning of weights, gradients and optimizer states, by DeepSpeed instead of torch.
`deepspeed_arguments` writes its config; "auto" lets transformers fill in the batch sizes,
accumulation, clipping and precision from the Training block (and the buckets from the
model's hidden size), so the two cannot disagree.
The optimizer stays transformers' (training.optimizer): ZeRO-3 partitions its states.
Checkpoints are DeepSpeed's (`global_step<N>/zero_pp_rank_<r>_mp_rank_00_*_states.pt`, one
pair per rank, plus the gathered 16-bit weights as model.safetensors); DeepSpeed cannot
re-shard them onto another world size without its universal-checkpoint conversion, so
`check_resumable` refuses that with both sizes. The final model is gathered by
`save_model` (stage3_gather_16bit_weights_on_model_save) into a normal folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from kubetrain_trainer.config import ConfigError, Training

log = logging.getLogger(__name__)

# Where accelerate's save_fsdp_model / save_fsdp_optimizer put a sharded checkpoint.
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"
SHARDED_OPTIMIZER_DIR = "optimizer_0"
# DeepSpeed's save_checkpoint names the newest global_step<N> folder in this file.
DEEPSPEED_LATEST = "latest"
CHECKPOINT_LAYOUT = {
    "none": "one full copy of the model and optimizer",
    "fsdp": "torch distributed checkpoint shards",
    "deepspeed": "DeepSpeed ZeRO-3 partitions",
}


def fsdp_arguments(training: Training, adapter: bool = False) -> dict[str, Any]:
    """TrainingArguments fields for the block's sharding; {} for sharding none.

    `adapter`: the model is a PEFT adapter (lora, dpo.useLora). Its gradient checkpointing
    stays the Trainer's: FSDP's own wraps each layer in a checkpoint wrapper, whose names
    accelerate's adapter-only checkpoint filter does not match, so the sharded checkpoint
    would hold no adapter weights (seen with accelerate 1.16).
    """
    if training.sharding != "fsdp":
        return {}
    fsdp_checkpointing = training.gradient_checkpointing and not adapter
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            # Checkpoints in DCP: each rank writes its own shards, nobody gathers.
            "state_dict_type": "SHARDED_STATE_DICT",
            # One FSDP unit per decoder layer (the model's _no_split_modules) plus the root.
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": training.fsdp_reshard_after_forward,
            "cpu_offload": training.fsdp_cpu_offload,
            "activation_checkpointing": fsdp_checkpointing,
        },
        # transformers refuses both at once; FSDP's avoids a second gather per layer.
        "activation_checkpointing": training.gradient_checkpointing and adapter,
    }


def deepspeed_arguments(training: Training) -> dict[str, Any]:
    """TrainingArguments fields for sharding deepspeed (ZeRO stage 3); {} otherwise."""
    if training.sharding != "deepspeed":
        return {}
    return {
        "deepspeed": {
            # "auto": transformers copies its own arguments in (one source of truth).
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": {
                "stage": 3,
                # save_model gathers the weights into one model.safetensors: the final
                # model (and each checkpoint's copy of it) is a normal Hugging Face folder.
                "stage3_gather_16bit_weights_on_model_save": True,
                # Sized from the model's hidden size by transformers (its recommended
                # ZeRO-3 settings): tensors under 10 x hidden elements (norms, biases) stay
                # whole on every rank; everything larger is partitioned.
                "stage3_param_persistence_threshold": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "reduce_bucket_size": "auto",
            },
            # No "optimizer" block: ZeRO-3 wraps transformers' optimizer (training.optimizer)
            # and partitions its states like DeepSpeed's own.
        },
    }


def start_deepspeed(args: TrainingArguments) -> None:
    """Bring up DeepSpeed's communication before the model is built.

    transformers builds a model under ZeRO-3 partitioned from the start (deepspeed.zero.Init
    in from_pretrained / from_config), which reads the world size from DeepSpeed's comm
    layer. On GPUs accelerate starts it with the process group; on CPU (use_cpu) it starts
    only torch's gloo group, so DeepSpeed would count one process and refuse the batch
    sizes. init_distributed adopts the group that exists.

    On CPU, DeepSpeed's collectives go through gloo, never its shm op: the CPU accelerator
    JIT-compiles a shared-memory allreduce (deepspeed_shm_comm) with the system C++
    compiler on first use, a minute per fresh machine and a compiler in the image, for CPU
    runs whose speed nobody counts on. DeepSpeed keeps one dict of the ops it may build;
    marking this one unusable makes it fall back to gloo. On GPUs there is no such op.
    """
    if not args.deepspeed:
        return
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    args.device  # noqa: B018 (sets up the process group, and on GPUs DeepSpeed's comm)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """Load a model in one process while ZeRO-3 trains (lora.merge's reload on rank 0).

    transformers builds every model under deepspeed.zero.Init while a ZeRO-3 config is
    registered, and zero.Init partitions over all ranks: one rank loading alone would wait
    for the others forever. Unregistering the config for the load gives a plain model."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


class FsdpSupport:
    """Trainer mixin: what transformers' Trainer lacks for FSDP2 here.

    1. The FSDP plugin on CPU processes too. accelerate's AcceleratorState switches to
       DistributedType.FSDP only for accelerator backends and leaves a multi-CPU (gloo)
       group on DDP; this does what AcceleratorState does for GPUs (the plugin, its mixed
       precision, the distributed type) when the state came out multi-CPU. On GPUs
       accelerate has done it already and this changes nothing. It runs inside
       Trainer.__init__ (TRL's trainers read `is_fsdp_enabled` there, e.g. to shard DPO's
       reference model), hence the override of the accelerator's creation.
    2. A checkpoint folder that exists when the ranks look for it. After `save_model`
       each rank records the best checkpoint only if its folder exists; with a sharded
       state dict save_model writes nothing, so whether the folder exists yet depends on
       which rank got further, the ranks disagree, and loadBestModelAtEnd's collective
       reload waits forever. Creating the folder first gives every rank the same answer.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        wanted = self.args.fsdp_plugin_args
        if wanted is None or getattr(state, "fsdp_plugin", None) is not None:
            return
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise ConfigError(
                "training.sharding: fsdp needs a process group (torchrun); this process runs "
                f"as {state.distributed_type.value}"
            )
        plugin = FullyShardedDataParallelPlugin(**wanted)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_fsdp_enabled and output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]


def checkpoint_sharding(folder: str | Path) -> str:
    """Which sharding wrote a checkpoint folder: fsdp (DCP shards), deepspeed (a `latest`
    file naming its global_step<N> folder of ZeRO partitions) or none (one full copy)."""
    folder = Path(folder)
    if (folder / SHARDED_MODEL_DIR).is_dir():
        return "fsdp"
    if (folder / DEEPSPEED_LATEST).is_file():
        return "deepspeed"
    return "none"


def is_sharded_checkpoint(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds DCP shards (written by a sharding fsdp run)."""
    return checkpoint_sharding(folder) == "fsdp"


def checkpoint_world_size(folder: str | Path) -> int:
    """How many ranks wrote a checkpoint: each leaves its own rng_state_<rank>.pth."""
    return len(list(Path(folder).glob("rng_state_*.pth"))) or 1


def check_resumable(folder: str | Path, sharding: str, world_size: int) -> None:
    """Refuse to resume `folder` when its layout does not match `sharding`; say whether
    the world size changes (DCP re-shards a sharded checkpoint onto any world size; a
    DDP checkpoint is one full copy, which any world size reads; DeepSpeed's partitions
    are read back only by as many ranks as wrote them)."""
    written_with = checkpoint_sharding(folder)
    if written_with != sharding:
        raise ConfigError(
            f"training.sharding: {folder} was written by a sharding {written_with} run "
            f"({CHECKPOINT_LAYOUT[written_with]}), which a sharding {sharding} run cannot "
            f"resume; set sharding: {written_with} to resume it, or move the checkpoint-* "
            f"folders away (or start a new run from the last saved model with model.name) "
            f"to train with sharding: {sharding}"
        )
    written_by = checkpoint_world_size(folder)
    if written_by == world_size:
        return
    if sharding == "fsdp":
        log.info(
            "%s was written by %d ranks; re-sharding it onto %d (torch distributed checkpoint)",
            folder, written_by, world_size,
        )  # fmt: skip
    elif sharding == "deepspeed":
        raise ConfigError(
            f"training.sharding: {folder} holds DeepSpeed ZeRO-3 partitions for {written_by} "
            f"ranks and this run has {world_size}; DeepSpeed reads them back only on "
            f"{written_by} ranks (another world size needs its universal checkpoint "
            "conversion, which kubetrain does not run): set resources.nodes x procPerNode "
            f"to {written_by}, or move the checkpoint-* folders away to start over"
        )


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter) or of a ZeRO-3 parameter (its
    `ds_tensor` partition), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    if partition is None:
        return tensor
    # ZeRO-3 pads the last partitions to equal sizes (uninitialised memory): keep the
    # elements this rank really holds.
    start = partition.numel() * torch.distributed.get_rank()
    return partition.narrow(0, 0, max(0, min(partition.numel(), tensor.ds_numel - start)))


def consolidated_state_dict(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The full state dict, gathered one tensor at a time; only a rank with `keep` holds it
    (in host memory), the others take part in each gather and drop the result."""
    from torch.distributed.tensor import DTensor

    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            # A copy: on CPU the gathered tensor may share FSDP's reusable buffer.
            state[name] = value.detach().to("cpu", copy=True)
    return state


def save_final_model(trainer: Trainer, output_dir: str) -> None:
    """Save the trained model as a Hugging Face folder, whatever the sharding (under
    DeepSpeed, save_model gathers the ZeRO-3 partitions itself, see deepspeed_arguments)."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(output_dir)
        return
    state = consolidated_state_dict(trainer.model, keep=trainer.args.should_save)
    # What Trainer.save_model does for FSDP's FULL_STATE_DICT, with the gather above
    # (accelerate's get_state_dict returns tensors that alias freed buffers on CPU).
    trainer._save(output_dir, state_dict=state)
    trainer.accelerator.wait_for_everyone()
