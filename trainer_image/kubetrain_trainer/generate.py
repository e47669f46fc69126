"""Load any model kubetrain writes and generate from it, streaming tokens to the terminal.

Run as: kubetrain generate outputs/sft-tiny --chat
        echo "Add 6 and 19." | kubetrain generate outputs/lora-tiny --chat
        kubetrain generate outputs/from-scratch-tiny "The capital of France is"

This is the guide's "load the adapter and generate" as one command. MODEL is a full model
folder (from_scratch, sft or dpo output, or a LoRA run's `merged/`) or hub id, or a LoRA
adapter folder (it holds adapter_config.json), whose base model is the one its
`base_model_name_or_path` names unless `--base` gives another; `--adapter DIR` puts an
adapter on top of MODEL instead. A single prompt is continued as raw text, as the guide's
snippet does. `--chat` reads one user turn per stdin line, keeps the conversation and renders
it with the tokenizer's chat template (ChatML when the tokenizer has none, as SFT trained
it; models.ensure_chat_ready), which is how sft and lora saw their data. Generation stops at
the end-of-text or end-of-turn token; only the new text is printed, as it is decoded.
Temperature 0 decodes greedily, so the same prompt always gets the same reply. Remote code
from a model repository never runs here.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from kubetrain_trainer.config import ConfigError, ModelSpec
from kubetrain_trainer.models import (
    ADAPTER_CONFIG,
    IM_END,
    MODEL_FILES,
    TOKENIZER_FILES,
    check_local_source,
    ensure_chat_ready,
    fit_embeddings,
    is_adapter_folder,
    load_model,
)


@dataclass(frozen=True)
class ModelSources:
    """Where the weights come from: a full model, plus the adapter to put on it, if any."""

    model: str
    adapter: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How replies are decoded: greedy at temperature 0, else sampled (seeded if asked)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens is {self.max_new_tokens}; give 1 or more")
        if self.temperature < 0:
            raise ConfigError(
                f"--temperature is {self.temperature}; give 0 (greedy) or more (sampling)"
            )


def resolve_sources(
    model: str, adapter: str | None = None, base: str | None = None
) -> ModelSources:
    """Which model and adapter MODEL, --adapter and --base name.

    A MODEL folder holding adapter_config.json is the adapter itself; its base is --base,
    else the model the adapter's own config names.
    """
    if adapter is not None:
        if base is not None:
            raise ConfigError(
                "--base and --adapter both name a base model: with --adapter, MODEL is the "
                "base; use --base only when MODEL is an adapter folder"
            )
        check_local_source(adapter, "--adapter", (ADAPTER_CONFIG,))
        return ModelSources(model=model, adapter=adapter)
    if is_adapter_folder(model):
        return ModelSources(model=base or _adapter_base(Path(model).expanduser()), adapter=model)
    if base is not None:
        raise ConfigError(
            f"--base: MODEL {model!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG}), "
            "so it has no base to replace; leave --base out"
        )
    return ModelSources(model=model)


def _adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, as its adapter_config.json records it."""
    config_path = adapter / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_path}: cannot be read as JSON ({e}); pass --base") from e
    if not base:
        raise ConfigError(
            f"{config_path} names no base_model_name_or_path; pass --base with the folder "
            "or hub id of the model the adapter was trained on"
        )
    # Training records the base as an absolute local path, which is gone once the base
    # model's folder is moved or deleted: say so instead of a hub-id error.
    if Path(base).is_absolute() and not Path(base).exists():
        raise ConfigError(
            f"{adapter}: its base model {base!r} (adapter_config.json "
            "base_model_name_or_path) does not exist; pass --base with the base model's "
            "folder or hub id"
        )
    return base


def load_for_generation(
    sources: ModelSources, *, chat: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (with its adapter on, if any) in eval mode, and the tokenizer it trained with.

    The adapter folder's tokenizer comes first: sft and lora save theirs beside the weights,
    chat markers and template included. `chat` makes the tokenizer chat-ready, growing the
    embeddings for any marker it had to add, as sft does before training.
    """
    field = "MODEL" if sources.adapter is None else "base model"
    # Say what is wrong with the model folder before the tokenizer's own complaint.
    check_local_source(sources.model, field, MODEL_FILES)
    tokenizer = _load_tokenizer(sources.adapter or sources.model, sources.model, field)
    if chat:
        tokenizer = ensure_chat_ready(tokenizer)
    model = load_model(ModelSpec(name=sources.model), field=field)
    fit_embeddings(model, tokenizer)
    if sources.adapter is not None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # PEFT asks transformers a deprecated question; nothing a user can act on.
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                model = PeftModel.from_pretrained(model, sources.adapter)
        # A size mismatch (RuntimeError) or a missing weights file (ValueError) both mean
        # the adapter was not trained on this base.
        except (OSError, RuntimeError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"--adapter: cannot put {sources.adapter!r} on {sources.model!r} ({first_line}); "
                "pass the base model it was trained on (--base, or MODEL with --adapter)"
            ) from e
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def _load_tokenizer(first: str, fallback: str, field: str) -> PreTrainedTokenizerBase:
    """The tokenizer in `first` when it holds one, else the one in `fallback`."""
    source = first if _holds_tokenizer(first) else fallback
    check_local_source(source, field, TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    # transformers raises ValueError (not OSError) for a folder that holds no tokenizer.
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{field}: cannot load a tokenizer from {source!r} (give a hub id or a folder "
            f"written by save_pretrained): {e}"
        ) from e


def _holds_tokenizer(source: str) -> bool:
    path = Path(source).expanduser()
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-text and end-of-turn tokens: the model's own, the tokenizer's, ChatML's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    # A ChatML turn ends with <|im_end|>, which sft teaches but which is not the EOS token
    # of a tokenizer that got ChatML added (ours trains with <|endoftext|> as EOS).
    if IM_END in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    return sorted({i for i in ids if i is not None})


def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    sampling: Sampling,
) -> str:
    """Generate after `input_ids`, printing the new text as it comes; returns it whole."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = sampling.temperature > 0
    stops = stop_token_ids(model, tokenizer)
    input_ids = input_ids.to(model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            # Sampling keeps the model's own top_p/top_k; greedy clears them (a hub model's
            # generation_config may set them) so transformers does not warn they are unused.
            temperature=sampling.temperature if sample else None,
            top_p=model.generation_config.top_p if sample else None,
            top_k=model.generation_config.top_k if sample else None,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
            streamer=streamer,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def complete(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling
) -> str:
    """Continue `prompt` as raw text (no chat template), streaming to stdout."""
    _seed(sampling)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise ConfigError("the prompt is empty; give some text to continue")
    return generate_reply(model, tokenizer, input_ids, sampling)


def chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    user_turns: Iterable[str],
    sampling: Sampling,
) -> list[dict[str, str]]:
    """Answer each non-blank line of `user_turns`, the conversation so far in the template.

    Replies stream to stdout as they are decoded; returns the whole conversation.
    """
    _seed(sampling)
    messages: list[dict[str, str]] = []
    for line in user_turns:
        text = line.strip()
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        reply = generate_reply(model, tokenizer, encoded["input_ids"], sampling)
        messages.append({"role": "assistant", "content": reply.strip()})
    return messages


def cued_lines(stream: Iterable[str], cue: str = "> ") -> Iterator[str]:
    """The lines of `stream`, writing `cue` to stderr before each is read (for a terminal:
    stdout carries the replies only)."""
    lines = iter(stream)
    while True:
        sys.stderr.write(cue)
        sys.stderr.flush()
        line = next(lines, None)
        if line is None:
            return
        yield line


def _seed(sampling: Sampling) -> None:
    # Seeded once per command, so a whole sampled conversation replays the same way.
    if sampling.seed is not None:
        from transformers import set_seed

        set_seed(sampling.seed)
