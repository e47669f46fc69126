"""How much memory one device needs for a run, estimated before any weight loads.

Both sides use it, so it imports no torch: the trainer on rank 0, once the model's config is
known and before its weights load (a run that cannot fit stops there, exit 78, with what to
change), and `kubetrain validate --preflight FILE --gpu-memory 80Gi` on a laptop.

`ModelShape` is what the estimate needs of a decoder-only transformer (from an Architecture
or a config.json). `estimate_memory(cfg, shape)` splits the need of one device, in bytes:

- weights: every parameter at its load precision (model.torchDtype; "auto" takes the
  config's, fp32 when it names none); 4-bit NF4 with lora.loadIn4Bit (about 0.56 bytes a
  parameter with its block scales); dpo without LoRA holds a second, frozen copy as its
  reference model.
- gradients: one per trainable parameter, in its precision (LoRA adapters train in fp32).
- optimizer states: AdamW keeps two moments per trainable parameter in its precision, the
  8-bit optimizers one byte each, Adafactor about one value (factored), SGD none.
- activations: what backward keeps per token and layer, about 10 x hidden + 3 x intermediate
  values (attention's inputs, projections and output; the gated MLP's three products),
  at 2 bytes under bf16/fp16 or for 16-bit weights, else 4; scores are not kept (SDPA and
  flash attention recompute them). Gradient checkpointing keeps one input per layer instead,
  plus one layer's full set. The logits come on top (batch x length x vocabulary at fp32,
  and their gradient). dpo runs each pair's chosen and rejected rows, twice the rows.

Data parallelism (training.sharding none) replicates all of it on every device: the world
size divides nothing. Sharding (fsdp, and deepspeed's ZeRO-3 alike) divides the weights,
gradients and optimizer states by the world size (the frozen LoRA base and DPO's reference
too: they are sharded alike) and
adds the full weights of the decoder layers gathered at a time (the one computing and the
one prefetched); activations stay per device. With fsdpCpuOffload the shards, gradients and
optimizer states move to host memory (`host`, per process), leaving the gathered layers
and the activations on the device. The figures tell "cannot fit" from "may fit"; they are
not a promise, and the real peak depends on kernels and fragmentation, so a device reserve
(RESERVED_BYTES) is kept apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain_trainer.config import Architecture, DataSpec, Dpo, Lora, ModelSpec, Training

GIB = 1024**3
RESERVED_BYTES = GIB  # CUDA context, the allocator's cache, kernels' workspace
NF4_BYTES = 0.5625  # 4 bits a weight plus one fp16 scale per 64 (bitsandbytes' NF4 blocks)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_OPTIMIZER_STATES = {"adafactor": 1.0, "sgd": 0.0}  # values per trainable parameter
_EIGHT_BIT = ("8bit",)  # adamw_bnb_8bit, paged_adamw_8bit, adamw_8bit: 2 one-byte moments
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

# Memory of the GPUs clusters name in the `nvidia.com/gpu.product` node label (the NVIDIA
# GPU feature discovery's values), for `kubetrain validate --preflight` without --gpu-memory.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
KNOWN_GPUS = {
    "NVIDIA-H200": 141 * 10**9,
    "NVIDIA-H100-80GB-HBM3": 80 * GIB,
    "NVIDIA-H100-PCIe": 80 * GIB,
    "NVIDIA-A100-SXM4-80GB": 80 * GIB,
    "NVIDIA-A100-SXM4-40GB": 40 * GIB,
    "NVIDIA-A100-PCIE-40GB": 40 * GIB,
    "NVIDIA-L40S": 48 * GIB,
    "NVIDIA-L4": 24 * GIB,
    "NVIDIA-A10G": 24 * GIB,
    "Tesla-T4": 16 * GIB,
    "Tesla-V100-SXM2-16GB": 16 * GIB,
}


# The config.json shapes of the guide's hub models, so that their estimates need no network
# (`kubetrain validate --preflight` on a laptop; other hub ids fetch their config.json).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {"vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                          "num_attention_heads": 14, "num_key_value_heads": 2,
                          "intermediate_size": 4864, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B": {"vocab_size": 151936, "hidden_size": 1536, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2,
                          "intermediate_size": 8960, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B": {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2,
                        "intermediate_size": 11008, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {"vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4,
                        "intermediate_size": 18944, "tie_word_embeddings": False},
}  # fmt: skip
for _name in list(KNOWN_MODELS):
    KNOWN_MODELS[_name]["torch_dtype"] = "bfloat16"
    KNOWN_MODELS[f"{_name}-Instruct"] = KNOWN_MODELS[_name]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes (Llama/Qwen/Mistral-shaped), as config.json has."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None  # the checkpoint's own precision, if it says

    @classmethod
    def of_architecture(cls, arch: Architecture) -> ModelShape:
        return cls(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
            intermediate_size=arch.intermediate_size,
            tie_word_embeddings=arch.tie_word_embeddings,
            torch_dtype="float32",
        )

    @classmethod
    def of_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a config.json (a multimodal config's text_config is the decoder's)."""
        config = config.get("text_config") or config
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(config.get("intermediate_size") or 4 * config["hidden_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its usual module name."""
        h, kv, i = self.hidden_size, self.kv_width, self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_hidden_layers * per_layer + self.hidden_size + head


def read_model_shape(folder: str | Path) -> ModelShape:
    """The shape in a model folder's config.json (save_pretrained writes it)."""
    return ModelShape.of_config(json.loads((Path(folder) / "config.json").read_text()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs, by what holds them."""

    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    shards: int = 1  # processes the states are sharded over (1: not sharded)
    host: float = 0.0  # bytes per process in host memory (fsdpCpuOffload)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, device_bytes: float) -> bool:
        return self.total <= device_bytes - RESERVED_BYTES

    def summary(self) -> str:
        share = 100 * self.trainable / self.parameters if self.parameters else 0
        return (
            f"~{gib(self.total)} per device: weights {gib(self.weights)}, gradients "
            f"{gib(self.gradients)}, optimizer states {gib(self.optimizer)}, activations "
            f"{gib(self.activations)} ({self.parameters / 1e9:.2f}B parameters, "
            f"{share:.3g}% trainable{self._sharding()})"
        )

    def _sharding(self) -> str:
        if self.shards == 1 and not self.host:
            return ""
        said = f"; states sharded over {self.shards} processes"
        if self.host:
            said += f", {gib(self.host)} of them per process in host memory"
        return said


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB / 10 else f"{value / 2**20:.0f} MiB"


def estimate_memory(
    method: str,
    model: ModelSpec,
    training: Training,
    data: DataSpec | None,
    lora: Lora | None,
    dpo: Dpo | None,
    shape: ModelShape,
    world_size: int = 1,
) -> MemoryEstimate:
    """One device's need for this run (the module docstring says how); the arguments are a
    TrainerConfig's or a TrainingRun spec's blocks of the same names, and the number of
    processes (nodes x procPerNode) that sharding divides the states by."""
    uses_lora = method == "lora" or (dpo is not None and dpo.use_lora)
    lora = lora or Lora()
    dtype = model.torch_dtype if model.torch_dtype != "auto" else shape.torch_dtype
    weight_bytes = _DTYPE_BYTES.get(dtype or "float32", 4)
    parameters = shape.parameters
    if uses_lora:
        targets = _lora_targets(lora, shape)
        trainable = shape.num_hidden_layers * sum(lora.r * (a + b) for a, b in targets)
        frozen_bytes = NF4_BYTES if lora.load_in_4bit else weight_bytes
        weights = parameters * frozen_bytes + trainable * 4
        trained_bytes = 4  # PEFT keeps adapters in fp32
    else:
        trainable = parameters
        weights = parameters * weight_bytes
        if method == "dpo":
            weights *= 2  # the frozen reference model
        trained_bytes = weight_bytes
    gradients = trainable * trained_bytes
    optimizer = trainable * _optimizer_bytes(training.optimizer, trained_bytes)
    rows = training.per_device_train_batch_size * (2 if method == "dpo" else 1)
    tokens = rows * (data.max_length if data is not None else 2048)
    value_bytes = 2 if (training.bf16 or training.fp16 or weight_bytes == 2) else 4
    per_layer = 10 * shape.hidden_size + 3 * shape.intermediate_size
    if training.gradient_checkpointing:
        kept = shape.num_hidden_layers * shape.hidden_size + per_layer
    else:
        kept = shape.num_hidden_layers * per_layer
    logits = 2 * shape.vocab_size * 4  # fp32 logits and their gradient, per token
    activations = tokens * (kept * value_bytes + logits)
    if training.sharding == "none":
        return MemoryEstimate(parameters, trainable, weights, gradients, optimizer, activations)
    shards = max(world_size, 1)
    layer = sum(a * b for a, b in shape.linear_shapes().values()) + 2 * shape.hidden_size
    gathered = 2 * layer * weight_bytes  # the layer computing and the one prefetched
    weights, gradients, optimizer = (part / shards for part in (weights, gradients, optimizer))
    host = 0.0
    if training.fsdp_cpu_offload:
        host = weights + gradients + optimizer
        weights = gradients = optimizer = 0.0
    return MemoryEstimate(
        parameters, trainable, weights + gathered, gradients, optimizer, activations, shards, host
    )


def _lora_targets(lora: Lora, shape: ModelShape) -> list[tuple[int, int]]:
    shapes = shape.linear_shapes()
    names = _ATTENTION + _MLP if lora.target_modules == "all-linear" else lora.target_modules
    return [shapes[name] for name in names if name in shapes]


def _optimizer_bytes(optimizer: str, trained_bytes: int) -> float:
    if any(mark in optimizer for mark in _EIGHT_BIT):
        return 2.0
    for name, values in _OPTIMIZER_STATES.items():
        if optimizer.startswith(name):
            return values * trained_bytes
    return 2.0 * trained_bytes  # Adam's two moments


def does_not_fit_message(estimate: MemoryEstimate, device_bytes: float, advice: str) -> str:
    """Why a run is refused before it loads: the estimate, the device, what to change."""
    return (
        f"preflight: this run needs {estimate.summary()}, more than the "
        f"{gib(device_bytes)} device can hold ({gib(RESERVED_BYTES)} kept for the CUDA "
        f"context). {advice}"
    )
