"""Loading and building models and tokenizers for every method.

Pretrained models load through transformers' Auto classes with `trust_remote_code` off unless
the spec asks. From-scratch models are built from an architecture block, and their tokenizer
is a byte-level BPE trained on the training text with the `tokenizers` library. Tokenizers
without a chat template get ChatML, written with TRL's `{% generation %}` markers so SFT can
mask everything but the assistant's tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from kubetrain_trainer.config import Architecture, ConfigError, ModelSpec

log = logging.getLogger(__name__)

BOS_EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD = "<|pad|>"

# ChatML, as Qwen uses it. The assistant's content and its <|im_end|> sit inside the
# generation markers so the model learns to stop as well as to answer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(spec: ModelSpec) -> torch.dtype | str:
    return _DTYPES.get(spec.torch_dtype, "auto")


# PEFT's name; a folder holding it is a LoRA adapter, loaded on top of its base model.
ADAPTER_CONFIG = "adapter_config.json"
# Files that mark a folder as holding a model (a LoRA output holds only the adapter, which
# transformers loads on top of its base) or a tokenizer (config.json names its class).
MODEL_FILES = ("config.json", ADAPTER_CONFIG)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def check_local_source(source: str | None, field: str, wants: tuple[str, ...]) -> None:
    """Refuse a local path that is missing or holds none of `wants`, before transformers
    answers with a hub-id error or pages about slow tokenizers."""
    if source is None:
        return
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local and not path.exists():
        raise ConfigError(f"{field}: {source!r} does not exist; give a model folder or a hub id")
    if path.is_dir() and not any((path / name).is_file() for name in wants):
        raise ConfigError(
            f"{field}: {source!r} is a folder without {' or '.join(wants)}, so it holds no "
            "saved model; "
            "point at a folder written by save_pretrained (a finished run's output)"
        )


def is_adapter_folder(source: str | None) -> bool:
    """Whether `source` is a local folder holding a LoRA adapter (not a full model)."""
    return source is not None and (Path(source).expanduser() / ADAPTER_CONFIG).is_file()


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or spec.tokenizer), with a pad token and a chat template."""
    source = spec.tokenizer or spec.name
    field = "model.tokenizer" if spec.tokenizer else "model.name"
    check_local_source(source, field, TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    # transformers raises ValueError (not OSError) for a folder that holds no tokenizer.
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{field}: cannot load a tokenizer from {source!r} (give a hub id or a folder "
            f"written by save_pretrained): {e}"
        ) from e
    return ensure_chat_ready(tokenizer)


def ensure_chat_ready(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer the padding and chat template that TRL's trainers need."""
    if tokenizer.pad_token is None:
        # Reusing EOS as padding is the usual choice; labels are masked by attention anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = CHATML_TEMPLATE
        log.info("tokenizer has no chat template; using ChatML")
    return tokenizer


def load_model(
    spec: ModelSpec, *, quantization_config=None, field: str = "model.name"
) -> PreTrainedModel:
    """A pretrained causal LM from a hub id or a local folder; `field` names it in errors."""
    check_local_source(spec.name, field, MODEL_FILES)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name,
            revision=spec.revision,
            dtype=torch_dtype(spec),
            trust_remote_code=spec.trust_remote_code,
            attn_implementation=spec.attn_implementation,
            quantization_config=quantization_config,
        )
    # ValueError: a folder whose config.json names no causal LM, or holds no config at all.
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{field}: cannot load a model from {spec.name!r} (give a hub id or a folder "
            f"written by save_pretrained): {e}"
        ) from e
    return model


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding matrix when the tokenizer gained tokens (e.g. ChatML markers)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/Qwen style) trained on the given texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS_EOS, IM_START, IM_END, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Its bar would print blank lines into a pod's log.
        show_progress=sys.stderr.isatty(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(arch: Architecture, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised qwen2 or llama model of the given shape."""
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch.model_type]
    config = config_class(
        # The tokenizer decides the vocabulary: a trained BPE may come out smaller than asked.
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def describe(model: PreTrainedModel) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{type(model).__name__}: {total:,} parameters ({trainable:,} trainable)"
