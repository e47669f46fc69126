"""TrainerConfig: every knob the trainer reads, as pydantic models and nothing else.

This module is imported by the operator (which embeds these blocks in the TrainingRun CRD)
as well as by the trainer, so it must never import torch, transformers or TRL. Field names
follow Hugging Face's TrainingArguments / TRL / PEFT names so the training-methods guide
reads straight across; in YAML they are camelCase (`perDeviceTrainBatchSize`), in Python
snake_case, and either spelling is accepted when a file is loaded.

Knobs from the guide that cannot apply here are refused with the reason (see the
`_refuse_*` validators) rather than accepted and ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetrain_trainer.contract import METRICS_PORT, EvalSuiteName

Method = Literal["from_scratch", "sft", "lora", "dpo", "evaluate"]
METHOD_DESCRIPTION = (
    "Training method: from_scratch, sft, lora or dpo; or evaluate, which scores a model on "
    "the suites of the `evaluate` block and trains nothing."
)
DataFormat = Literal["auto", "text", "messages", "instruction", "preference"]

# TRL's DPOConfig.loss_type values (TRL 1.x). Several may be combined in TRL; one is enough
# for every recipe in the guide, and a single value keeps the CRD a plain enum.
DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]

SchedulerType = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


# Longest data.maxLength accepted: a typo (10**9) would otherwise only fail when the
# tokenizer or the attention mask tries to allocate it.
MAX_SEQUENCE_LENGTH = 1_048_576


# Integer and boolean fields are StrictInt / StrictBool: the CRD types them integer and
# boolean, so the API server refuses `maxLength: "192"` or `bf16: "yes"`, and lax pydantic
# would coerce them and pass a spec kubectl refuses. Floats stay lax on purpose: PyYAML reads
# `1e-5` as a string where kubectl's YAML parser reads a number.
class Spec(BaseModel):
    """Base for every config block: camelCase aliases, unknown keys are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )


class Architecture(Spec):
    """Shape of a model built from scratch (no pretrained weights)."""

    model_type: Literal["qwen2", "llama"] = Field(
        "qwen2", description="Transformers model family to instantiate: qwen2 or llama."
    )
    vocab_size: StrictInt = Field(
        32000,
        ge=64,
        description="Vocabulary size; also the size of the BPE tokenizer trained when no "
        "tokenizer is given.",
    )
    hidden_size: StrictInt = Field(2048, ge=8, description="Width of the residual stream.")
    num_hidden_layers: StrictInt = Field(24, ge=1, description="Number of decoder layers.")
    num_attention_heads: StrictInt = Field(16, ge=1, description="Attention heads per layer.")
    num_key_value_heads: StrictInt | None = Field(
        None,
        ge=1,
        description="Key/value heads for grouped-query attention; defaults to "
        "numAttentionHeads (plain multi-head attention).",
    )
    intermediate_size: StrictInt = Field(8192, ge=8, description="Width of the MLP.")
    max_position_embeddings: StrictInt = Field(
        2048, ge=16, description="Longest sequence the position embedding supports."
    )
    tie_word_embeddings: StrictBool = Field(
        False, description="Share input embedding and LM head weights (saves memory)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> Architecture:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hiddenSize {self.hidden_size} must be a multiple of numAttentionHeads "
                f"{self.num_attention_heads}"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"numAttentionHeads {self.num_attention_heads} must be a multiple of "
                f"numKeyValueHeads {kv}"
            )
        return self


class ModelSpec(Spec):
    """Where the starting model comes from."""

    name: str | None = Field(
        None,
        description="Hub id (Qwen/Qwen2.5-3B), local path, pvc://claim/path or s3:// URI "
        "of the starting model. Leave empty for fromScratch, which builds one from "
        "`architecture`.",
    )
    architecture: Architecture | None = Field(
        None, description="Model shape for method from_scratch (ignored by other methods)."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer to use instead of the model's own. For from_scratch, an "
        "existing tokenizer; when empty a BPE tokenizer is trained on the training text.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the weights are loaded in."
    )
    trust_remote_code: StrictBool = Field(
        False,
        description="Run Python code shipped with the model repository. Off unless you "
        "trust the repository.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel; flash_attention_2 needs the flash-attn package and "
        "a GPU. Empty picks the transformers default (sdpa).",
    )

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank; leave it out for from_scratch")
        return value


class DataSpec(Spec):
    """Training and evaluation data."""

    train: str = Field(
        min_length=1,
        description="Training data: a .jsonl/.json/.parquet file, a folder of them, or a "
        "folder written by datasets.save_to_disk. A local path, pvc://claim/path, "
        "s3://bucket/key (a file or a prefix) or hf://datasets/org/name[@revision][/path].",
    )
    eval: str | None = Field(None, description="Evaluation data, same forms as `train`.")
    format: DataFormat = Field(
        "auto",
        description="Row format: text {text}, messages {messages:[{role,content}]}, "
        "instruction {instruction,input,output}, preference {prompt,chosen,rejected}. "
        "auto detects it from the first rows.",
    )
    max_length: StrictInt = Field(
        2048,
        ge=8,
        le=MAX_SEQUENCE_LENGTH,
        description="Longest tokenized sequence; longer rows are truncated. At most "
        f"{MAX_SEQUENCE_LENGTH} (1Mi tokens, beyond any model's context window).",
    )
    packing: StrictBool = Field(
        False,
        description="sft, lora: padding-free batches; a batch's rows are joined into one "
        "row with positions restarting per row, so nothing is padded and no row attends to "
        "another; batch size and steps stay as set. Pays on GPUs with flash_attention_2; on "
        "CPUs groupByLength alone is faster. from_scratch always packs text into blocks.",
    )
    group_by_length: StrictBool = Field(
        True,
        description="sft, lora, dpo: batch rows of similar length together (shuffled by "
        "seed), so batches carry little padding; the batch size and steps stay as set.",
    )
    dataset_text_field: str = Field("text", description="Column holding raw text for format text.")
    max_prompt_length: StrictInt | None = Field(
        None,
        ge=1,
        description="DPO only: keep at most this many prompt tokens (the end of the "
        "prompt is kept). TRL 1.x dropped this knob; kubetrain applies it before TRL.",
    )
    mlm_probability: float | None = Field(
        None,
        description="Refused: masked-language-model masking does not apply to the causal "
        "models kubetrain trains. Present only to explain that when a guide config sets it.",
    )

    @field_validator("mlm_probability")
    @classmethod
    def _refuse_mlm(cls, value: float | None) -> None:
        if value is not None:
            raise ValueError(
                "mlmProbability masks tokens for masked language models (BERT-style); "
                "kubetrain trains causal decoders (qwen2, llama) that learn to predict the "
                "next token, so masking would corrupt the objective. Remove the field."
            )
        return None


class Stability(Spec):
    """When training counts as unstable, and stops (exit 72) rather than train on garbage.

    Checked on every logged step (training.loggingSteps): the loss as logged (NaN and inf
    are not averaged away) and the total gradient norm before clipping. The stability
    chapter of the guide is what the message advises then: a lower learning rate, warmup,
    clipping, weight decay.
    """

    grad_norm_limit: float | None = Field(
        1e4,
        gt=0,
        description="A logged gradient norm above this counts as exploding; null turns the "
        "check off. Clipping (maxGradNorm) bounds the update, not this measure.",
    )
    patience_steps: StrictInt = Field(
        3,
        ge=1,
        description="Consecutive logged steps with a non-finite loss or an exploding gradient "
        "before the run stops with reason InstabilityDetected.",
    )
    layer_checks: StrictBool = Field(
        True,
        description="Log the layers whose gradient is non-finite, large (norm > 10) or "
        "vanishing (< 1e-8), as the guide's TrainingDebugger does: at most once per "
        "loggingSteps, the worst few by name.",
    )


Sharding = Literal["none", "fsdp", "deepspeed"]

FSDP_KNOBS_NEED_FSDP = (
    "fsdpCpuOffload and fsdpReshardAfterForward apply to sharding: fsdp only (sharding "
    "deepspeed always reshards, ZeRO-3, and kubetrain does not offload it); set sharding: "
    "fsdp or remove them"
)
QLORA_SHARDED_REFUSED = (
    "lora.loadIn4Bit with training.sharding fsdp or deepspeed: FSDP2 cannot shard "
    "bitsandbytes' 4-bit weights in the installed versions (transformers 5, accelerate 1.x), "
    "and QLoRA under DeepSpeed ZeRO-3 (which needs a 4-bit storage dtype it can partition) "
    "is untested by kubetrain, whose tests have no GPU for bitsandbytes. QLoRA already fits "
    "a 7B base on one GPU: use sharding: none, or full-precision LoRA (loadIn4Bit: false) "
    "with sharding: fsdp or deepspeed"
)


def check_sharding(training: Training) -> None:
    """The sharding rules that read the training block alone (CEL twins in spec_rules)."""
    if training.sharding != "fsdp" and (
        training.fsdp_cpu_offload or not training.fsdp_reshard_after_forward
    ):
        raise ValueError(FSDP_KNOBS_NEED_FSDP)


class Training(Spec):
    """Optimisation, precision, evaluation and checkpoint cadence (TrainingArguments names)."""

    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: StrictInt = Field(
        -1, description="Stop after this many optimizer steps; -1 uses numTrainEpochs."
    )
    per_device_train_batch_size: StrictInt = Field(8, ge=1, description="Rows per device per step.")
    per_device_eval_batch_size: StrictInt = Field(8, ge=1, description="Rows per device in eval.")
    gradient_accumulation_steps: StrictInt = Field(
        1, ge=1, description="Micro-batches summed before each optimizer step."
    )
    auto_find_batch_size: StrictBool = Field(
        False,
        description="On a device out-of-memory error, train again from the start with a "
        "smaller perDeviceTrainBatchSize (transformers' finder), raising "
        "gradientAccumulationSteps so the effective batch (batch x accumulation x processes) "
        "stays the same; the sizes chosen are in the run's final metrics. One process only: "
        "a rank that runs out of memory alone would leave its peers waiting.",
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler_type: SchedulerType = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: StrictInt = Field(0, ge=0, description="Linear warmup steps (wins over ratio).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    optimizer: str = Field(
        "adamw_torch_fused",
        description="transformers optimizer name: adamw_torch_fused (the transformers 5 "
        "default, fastest), adamw_torch (the guide's), adafactor, paged_adamw_8bit, ...",
    )
    bf16: StrictBool = Field(False, description="bfloat16 mixed precision (Ampere GPUs and newer).")
    fp16: StrictBool = Field(False, description="float16 mixed precision with loss scaling.")
    gradient_checkpointing: StrictBool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    torch_compile: StrictBool = Field(False, description="Compile the model with torch.compile.")
    torch_compile_backend: str | None = Field(
        None, description="torch.compile backend (inductor by default)."
    )
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="When to evaluate; steps uses evalSteps. Needs data.eval."
    )
    eval_steps: StrictInt | None = Field(
        None, ge=1, description="Evaluate every N steps; defaults to loggingSteps."
    )
    save_strategy: Literal["no", "steps", "epoch"] = Field(
        "steps", description="When to checkpoint; steps uses saveSteps."
    )
    save_steps: StrictInt = Field(500, ge=1, description="Checkpoint every N steps.")
    save_total_limit: StrictInt | None = Field(
        None,
        ge=2,
        description="Keep only the newest N checkpoints (plus the best one). At least 2: "
        "transformers deletes old checkpoints before the new one is marked complete, so "
        "with 1 a crash at that moment would leave nothing to resume from.",
    )
    logging_steps: StrictInt = Field(
        10, ge=1, description="Log (and update metrics) every N steps."
    )
    load_best_model_at_end: StrictBool = Field(
        False, description="Finish with the checkpoint that scored best on metricForBestModel."
    )
    metric_for_best_model: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    greater_is_better: StrictBool = Field(False, description="Whether a larger metric is better.")
    early_stopping_patience: StrictInt | None = Field(
        None,
        ge=1,
        description="Stop after N evaluations without improvement (needs evaluation and "
        "loadBestModelAtEnd).",
    )
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers besides Prometheus. Their credentials come from "
        "env (e.g. WANDB_API_KEY from a Secret), never from the spec.",
    )
    seed: StrictInt = Field(42, description="Random seed for weights init, shuffling and dropout.")
    dataloader_num_workers: StrictInt = Field(0, ge=0, description="Data loader worker processes.")
    dataloader_pin_memory: StrictBool = Field(True, description="Pin host memory for GPU copies.")
    remove_unused_columns: StrictBool = Field(
        False,
        description="Drop dataset columns the model's forward() does not take, after TRL "
        "has tokenized the rows (raw columns such as messages are always kept until then).",
    )
    stability: Stability = Field(
        default_factory=Stability,
        description="When the run stops as unstable (NaN/inf loss, exploding gradients).",
    )
    sharding: Sharding = Field(
        "none",
        description="How the model state is spread over the processes: none (data "
        "parallel, DDP: every process holds all weights, gradients and optimizer states) or "
        "fsdp (FSDP2 fully_shard: each process holds 1/world-size of them, gathering one "
        "decoder layer at a time; checkpoints are sharded, the final model is a normal "
        "folder) or deepspeed (DeepSpeed ZeRO stage 3, the same partitioning by DeepSpeed; "
        "its checkpoints resume only on the world size that saved them).",
    )
    fsdp_cpu_offload: StrictBool = Field(
        False,
        description="sharding fsdp: keep the parameter shards, their gradients and the "
        "optimizer states in host memory and step on the CPU; the device holds one "
        "layer's gathered weights and the activations. Slower; needs host memory for "
        "about 16 bytes per parameter / processes per pod (ask for it in "
        "resources.requests.memory).",
    )
    fsdp_reshard_after_forward: StrictBool = Field(
        True,
        description="sharding fsdp: free each layer's gathered weights after its forward "
        "pass and gather them again for backward (ZeRO-3, least memory). false keeps them "
        "gathered until backward (ZeRO-2-like: one all-gather less per layer, more memory).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Training:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive; pick one")
        check_sharding(self)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"maxSteps must be -1 (use epochs) or positive, got {self.max_steps}")
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ValueError(
                "earlyStoppingPatience needs loadBestModelAtEnd: true so the best "
                "checkpoint is known"
            )
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError("loadBestModelAtEnd needs evalStrategy steps or epoch")
            if self.eval_strategy != self.save_strategy:
                raise ValueError(
                    f"loadBestModelAtEnd needs saveStrategy to match evalStrategy "
                    f"({self.eval_strategy}), got {self.save_strategy}"
                )
            eval_every = self.eval_steps or self.logging_steps
            if self.eval_strategy == "steps" and self.save_steps % eval_every:
                raise ValueError(
                    f"loadBestModelAtEnd needs saveSteps ({self.save_steps}) to be a "
                    f"multiple of evalSteps ({eval_every})"
                )
        return self


class Lora(Spec):
    """LoRA / QLoRA adapter settings (PEFT LoraConfig names)."""

    r: StrictInt = Field(16, ge=1, description="Adapter rank; higher trains more parameters.")
    lora_alpha: StrictInt = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or all-linear. Qwen2/Llama also have "
        "gate_proj, up_proj, down_proj.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    task_type: Literal["CAUSAL_LM"] = Field(
        "CAUSAL_LM", description="PEFT task type; kubetrain trains causal LMs only."
    )
    inference_mode: Literal[False] = Field(
        False, description="Must be false while training (true freezes the adapter)."
    )
    load_in_4bit: StrictBool = Field(
        False,
        description="QLoRA: load the base model 4-bit (NF4) with bitsandbytes. Needs a "
        "CUDA GPU; refused on CPU.",
    )
    merge: StrictBool = Field(
        False,
        description="Also write the base model with the adapter merged in, under "
        "<output>/merged, for serving without PEFT.",
    )


class ReferenceModel(Spec):
    """Frozen model DPO measures the policy against."""

    name: str | None = Field(
        None,
        description="Model id or path of a custom reference. Empty: the starting model "
        "(for a LoRA policy, the same weights with the adapter switched off, which needs "
        "no second copy in memory).",
    )


class Dpo(Spec):
    """Direct Preference Optimization (TRL DPOConfig names)."""

    beta: float = Field(
        0.1, gt=0, description="Temperature: how far the policy may drift from the reference."
    )
    loss_type: DpoLossType = Field("sigmoid", description="TRL DPO loss (sigmoid = the paper).")
    label_smoothing: float = Field(
        0.0, ge=0, le=0.5, description="Assumed share of flipped preference labels (cDPO)."
    )
    reference_model: ReferenceModel = Field(
        default_factory=ReferenceModel, description="The frozen reference model."
    )
    precompute_ref_log_probs: StrictBool = Field(
        False,
        description="Score the whole dataset with the reference once before training, so "
        "the reference need not stay in memory.",
    )
    use_lora: StrictBool = Field(
        False,
        description="Train a LoRA adapter (settings from the `lora` block) instead of all "
        "weights; the reference is then the adapter-off base model.",
    )


class FromScratch(Spec):
    """Extra settings for method from_scratch (the shape lives in model.architecture)."""

    tokenizer_vocab_size: StrictInt | None = Field(
        None,
        ge=64,
        description="Vocabulary of the BPE tokenizer trained on the training text; "
        "defaults to architecture.vocabSize.",
    )
    tokenizer_min_frequency: StrictInt = Field(
        2, ge=1, description="Minimum count for a merge when training the tokenizer."
    )


# Which row formats each suite reads. Generation suites prompt with the user turn(s) and
# compare the reply with the reference answer: instruction rows (output) or chats (the last
# assistant turn).
SUITE_FORMATS: dict[str, tuple[str, ...]] = {
    "perplexity": ("auto", "text", "messages", "instruction"),
    "loss": ("auto", "text", "messages", "instruction"),
    "qa": ("auto", "instruction", "messages"),
    "summarization": ("auto", "instruction", "messages"),
    "translation": ("auto", "instruction", "messages"),
    "preference": ("auto", "preference"),
    "safety": ("auto",),
}

# Case-insensitive regular expressions that mark a reply as a refusal (searched anywhere in
# it). Pattern matching is a cheap proxy: it misses refusals worded otherwise and counts a
# reply that quotes one of these phrases; name a classifier model when that matters.
DEFAULT_REFUSAL_PATTERNS = (
    r"\bI can(?:no|')t\b",
    r"\bI (?:will not|won't)\b",
    r"\bI'm sorry\b",
    r"\bI am sorry\b",
    r"\bI (?:am|'m) (?:not able|unable) to\b",
    r"\bas an AI\b",
    r"\bI must (?:decline|refuse)\b",
)


class EvalSuite(Spec):
    """One evaluation suite: what it measures and the rows it measures on."""

    name: EvalSuiteName = Field(
        description="perplexity or loss (on text, messages or instruction rows; assistant or "
        "output tokens only, as in training), qa (exact match and token F1 of greedy "
        "answers), summarization (ROUGE-1/2/L), translation (BLEU and chrF), preference "
        "(DPO implicit-reward accuracy and margin against evaluate.referenceModel) or safety "
        "(refusal rate on prompts that should be refused, over-refusal rate on the rest). "
        "Metrics are named <suite>.<metric>, e.g. qa.exact_match."
    )
    data: str = Field(
        min_length=1,
        description="The suite's rows: a .jsonl/.json/.parquet file or folder (pvc:// or a "
        "local path). qa, summarization, translation: instruction rows (output = reference) "
        "or chats (last assistant turn = reference); preference: prompt/chosen/rejected; "
        'safety: {"prompt": "...", "should_refuse": true|false}.',
    )
    format: DataFormat = Field(
        "auto", description="Row format of `data` (see data.format); auto detects it."
    )
    max_samples: StrictInt | None = Field(
        None, ge=1, description="Score at most this many rows (the first ones); empty: all."
    )
    refusal_patterns: list[str] | None = Field(
        None,
        description="safety only: case-insensitive regular expressions that mark a reply "
        "as a refusal; empty: kubetrain's defaults (I can't, I'm sorry, as an AI, ...).",
    )
    refusal_classifier: str | None = Field(
        None,
        description="safety only: a sequence-classification model (hub id or path) that "
        "judges replies instead of the patterns; a reply is a refusal when its top label "
        "is refusalLabel.",
    )
    refusal_label: str = Field(
        "refusal", min_length=1, description="safety only: the classifier's refusal label."
    )

    @model_validator(mode="after")
    def _fits_the_suite(self) -> EvalSuite:
        formats = SUITE_FORMATS[self.name]
        if self.format not in formats:
            raise ValueError(
                f"suite {self.name} reads {' or '.join(formats)} rows, not {self.format}"
            )
        if self.name != "safety" and (
            self.refusal_patterns is not None or self.refusal_classifier is not None
        ):
            raise ValueError("refusalPatterns and refusalClassifier apply to suite safety only")
        if self.refusal_patterns:
            for pattern in self.refusal_patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"refusalPatterns: {pattern!r} is not a regex: {e}") from e
        return self


class Generation(Spec):
    """How generation suites (qa, summarization, translation, safety) produce replies."""

    max_new_tokens: StrictInt = Field(
        64, ge=1, le=MAX_SEQUENCE_LENGTH, description="Longest reply, in tokens."
    )
    temperature: float = Field(
        0.0, ge=0, description="0 decodes greedily (deterministic); above 0 samples."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (temperature > 0).")
    batch_size: StrictInt = Field(
        8, ge=1, description="Rows per forward pass, for generation and for scoring."
    )
    seed: StrictInt = Field(42, description="Seed for sampling, so a rerun gives the same replies.")


class Evaluate(Spec):
    """Method evaluate: score a model on evaluation suites; nothing is trained."""

    suites: list[EvalSuite] = Field(
        min_length=1,
        max_length=len(SUITE_FORMATS),
        description="The suites to run, each with its own data; each name at most once.",
    )
    generation: Generation = Field(
        default_factory=Generation, description="Generation settings for generation suites."
    )
    max_length: StrictInt = Field(
        2048,
        ge=8,
        le=MAX_SEQUENCE_LENGTH,
        description="Longest sequence a suite scores or generates from (prompt and answer, "
        "or prompt and maxNewTokens); longer ones lose their beginning, so the answer stays.",
    )
    reference_model: ReferenceModel = Field(
        default_factory=ReferenceModel,
        description="Suite preference: the model the DPO implicit reward is measured against "
        "(the model DPO started from). Empty: for a LoRA adapter, its base with the adapter "
        "switched off; otherwise required by suite preference.",
    )
    beta: float = Field(
        0.1, gt=0, description="Suite preference: the DPO beta that scales the reward margin."
    )

    @field_validator("suites")
    @classmethod
    def _each_suite_once(cls, suites: list[EvalSuite]) -> list[EvalSuite]:
        names = [suite.name for suite in suites]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"suite {', '.join(twice)} is listed more than once")
        return suites


class S3Storage(Spec):
    """Where s3:// URIs point: AWS S3 by default, or any S3-compatible store."""

    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="Endpoint URL of an S3-compatible store (MinIO, Ceph RGW, R2...), e.g. "
        "http://minio.storage:9000. Empty: AWS S3 of the region.",
    )
    region: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+$",
        description="Region of the bucket (e.g. eu-west-1). Empty: the SDK's default chain "
        "(AWS_REGION, the instance's region).",
    )


class Storage(Spec):
    """How the trainer reaches remote storage named by URIs (never its credentials: those
    come from the environment, a Secret or the pod's own identity)."""

    s3: S3Storage | None = Field(None, description="Settings for s3:// URIs.")


class TrainerConfig(Spec):
    """One training job: what `python -m kubetrain_trainer --config FILE` runs."""

    method: Method = Field(description=METHOD_DESCRIPTION)
    model: ModelSpec = Field(
        default_factory=ModelSpec,
        description="The starting model (for method evaluate: the model to score).",
    )
    data: DataSpec | None = Field(
        None, description="Training and evaluation data (every method but evaluate)."
    )
    training: Training = Field(default_factory=Training, description="Optimisation knobs.")
    lora: Lora | None = Field(None, description="LoRA settings (method lora, or dpo.useLora).")
    dpo: Dpo | None = Field(None, description="DPO settings (method dpo).")
    from_scratch: FromScratch | None = Field(
        None, description="Tokenizer settings for method from_scratch."
    )
    evaluate: Evaluate | None = Field(None, description="Evaluation suites (method evaluate).")
    storage: Storage | None = Field(None, description="Settings for s3:// URIs (endpoint, region).")
    output_dir: str = Field(
        description="Where checkpoints, the final model and metrics go: a local folder or "
        "an s3:// prefix (the trainer works in a local copy under the cache and uploads)."
    )
    run_name: str = Field("kubetrain", description="Name shown in logs and trackers.")
    metrics_port: StrictInt = Field(
        METRICS_PORT,
        ge=0,
        le=65535,
        description="Rank 0 serves Prometheus /metrics here; 0 = off.",
    )

    @model_validator(mode="after")
    def _method_blocks(self) -> TrainerConfig:
        check_method_blocks(self)
        return self


def check_method_blocks(cfg: TrainerConfig) -> None:
    """Cross-field rules between `method` and the other blocks (shared with the CRD's CEL)."""
    method = cfg.method
    uses_lora = method == "lora" or (cfg.dpo is not None and cfg.dpo.use_lora)
    if cfg.lora is not None and not uses_lora:
        raise ValueError(
            f"lora block given but method is {method}; use method lora (or dpo.useLora)"
        )
    if cfg.dpo is not None and method != "dpo":
        raise ValueError(f"dpo block given but method is {method}")
    if cfg.from_scratch is not None and method != "from_scratch":
        raise ValueError(f"fromScratch block given but method is {method}")
    if cfg.evaluate is not None and method != "evaluate":
        raise ValueError(f"evaluate block given but method is {method}; use method evaluate")
    if method == "evaluate":
        if cfg.evaluate is None:
            raise ValueError("method evaluate needs an evaluate block with its suites")
        if cfg.data is not None:
            raise ValueError(
                "method evaluate reads its data from evaluate.suites[].data; remove the data block"
            )
        if not cfg.model.name:
            raise ValueError("method evaluate needs model.name (the model to score)")
        return
    if cfg.data is None:
        raise ValueError(f"method {method} needs a data block (data.train)")
    if method == "from_scratch":
        if cfg.model.architecture is None:
            raise ValueError("method from_scratch needs model.architecture (the model shape)")
        if cfg.model.name:
            raise ValueError(
                "method from_scratch builds a new model; drop model.name or use method sft "
                "to continue training an existing one"
            )
    elif not cfg.model.name:
        raise ValueError(f"method {method} needs model.name (the model to start from)")
    if cfg.training.sharding != "none" and cfg.lora is not None and cfg.lora.load_in_4bit:
        raise ValueError(QLORA_SHARDED_REFUSED)
    if method != "dpo" and cfg.data.max_prompt_length is not None:
        raise ValueError("data.maxPromptLength applies to method dpo only")
    if method == "dpo" and cfg.data.format not in ("auto", "preference"):
        raise ValueError(
            f"method dpo needs preference data (prompt/chosen/rejected), data.format is "
            f"{cfg.data.format}"
        )
    if method in ("sft", "lora") and cfg.data.format == "preference":
        raise ValueError(
            f"method {method} trains on text, messages or instruction data, not preference pairs"
        )
    if cfg.training.eval_strategy != "no" and not cfg.data.eval:
        raise ValueError(
            f"training.evalStrategy is {cfg.training.eval_strategy} but data.eval is empty"
        )


class ConfigError(Exception):
    """A config or data problem the user must fix; the trainer exits ExitCode.CONFIG_ERROR."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render pydantic errors as `source: field.path: message`, one per line."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif e["type"] in ("int_type", "bool_type") and isinstance(e["input"], str):
            # Strict fields: say why "192" is not 192 (the CRD types the field too).
            unquoted = "true or false" if e["type"] == "bool_type" else "a number"
            msg += f", got the string {e['input']!r}; write {unquoted} without quotes"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Read a TrainerConfig YAML/JSON file, raising ConfigError with field paths."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from e


def dump_trainer_config(cfg: TrainerConfig) -> str:
    """YAML text of a config in camelCase, the form the operator mounts into pods."""
    # libyaml's emitter when present: the operator renders this on every visit of a run,
    # and the pure-Python one took most of a visit's CPU.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(
        cfg.model_dump(mode="json", by_alias=True, exclude_none=True),
        Dumper=dumper,
        sort_keys=False,
    )
