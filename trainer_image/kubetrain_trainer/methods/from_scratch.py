"""From-scratch pretraining: build a new qwen2/llama model and teach it raw text.

Run as: kubetrain run examples/trainingrun-from-scratch-tiny.yaml

1. Tokenizer: `model.tokenizer` when given, else a byte-level BPE trained on the training
   text (vocabulary `fromScratch.tokenizerVocabSize`, default architecture.vocabSize). It is
   saved to <output>/tokenizer first, so a resumed run reuses the exact same vocabulary.
2. Model: random weights in the shape of `model.architecture`, seeded by training.seed.
3. Data: every document gets an end-of-text token, then the stream is cut into blocks of
   data.maxLength tokens (packing), the usual causal-LM pretraining recipe. Rank 0 does it
   once into <output>/.cache (kubetrain_trainer.datacache); every rank, later attempts and
   resumed runs read it from there.
4. Train with transformers' Trainer on next-token prediction; perplexity is exp(eval loss).
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import transformers
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

from kubetrain_trainer.config import ConfigError, FromScratch, TrainerConfig
from kubetrain_trainer.datacache import Splits, cache_key, tokenized
from kubetrain_trainer.models import build_model, describe, load_tokenizer, train_bpe_tokenizer
from kubetrain_trainer.session import FitResult, Session, training_arguments
from kubetrain_trainer.sharding import FsdpSupport

log = logging.getLogger(__name__)


class Trainer(FsdpSupport, transformers.Trainer):
    """transformers' Trainer, able to shard (training.sharding: fsdp) on CPU too."""

# pack()'s version in cache keys: bump it when pack() changes what it writes.
PACKING_RECIPE = "from_scratch-pack-1"


def prepare_tokenizer(
    cfg: TrainerConfig, texts: Dataset, args: TrainingArguments
) -> PreTrainedTokenizerBase:
    """Reuse <output>/tokenizer, load model.tokenizer, or train a BPE (rank 0 first)."""
    saved = Path(cfg.output_dir) / "tokenizer"
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model)
    options = cfg.from_scratch or FromScratch()
    vocab_size = options.tokenizer_vocab_size or cfg.model.architecture.vocab_size
    with args.main_process_first(desc="training the tokenizer"):
        if not (saved / "tokenizer_config.json").is_file():
            log.info("training a %d-token BPE tokenizer on %s", vocab_size, cfg.data.train)
            # Batches streamed from the memory-mapped rows: the corpus may exceed memory.
            stream = (text for batch in texts.iter(batch_size=1000) for text in batch["text"])
            tokenizer = train_bpe_tokenizer(
                stream, vocab_size=vocab_size, min_frequency=options.tokenizer_min_frequency
            )
            tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def pack(texts: Dataset, tokenizer: PreTrainedTokenizerBase, block: int) -> Dataset:
    """Tokenize, join documents with EOS, and cut into equal blocks (the tail is dropped)."""

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*doc, tokenizer.eos_token_id] for doc in ids]}

    def chunk(batch: dict) -> dict:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block * block
        return {"input_ids": [stream[i : i + block] for i in range(0, usable, block)]}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenizing")
    blocks = tokens.map(chunk, batched=True, desc=f"packing into {block}-token blocks")
    if len(blocks) == 0:
        raise ConfigError(
            f"data.train: fewer than data.maxLength={block} tokens of text; add data or lower "
            "maxLength"
        )
    return blocks


def prepare_data(
    cfg: TrainerConfig, session: Session, args: TrainingArguments
) -> tuple[PreTrainedTokenizerBase, Splits]:
    """The tokenizer and the packed blocks (train, eval) of steps 1 and 3."""
    data = session.load_data()
    if data.format != "text":
        raise ConfigError(
            f'data.train: from_scratch pretrains on raw text rows {{"text": ...}}, '
            f"got {data.format} rows; use method sft for chats and instructions"
        )
    tokenizer = prepare_tokenizer(cfg, data.train, args)
    block = min(cfg.data.max_length, cfg.model.architecture.max_position_embeddings)
    # Tokenized and packed once (rank 0), then read from <output>/.cache by every rank and
    # attempt until the data, the tokenizer or the block size changes.
    key = cache_key(data.fingerprint, tokenizer, recipe=PACKING_RECIPE, block=block)
    blocks = tokenized(
        cfg.output_dir,
        key,
        lambda: {
            "train": pack(data.train, tokenizer, block),
            "eval": pack(data.eval, tokenizer, block) if data.eval is not None else None,
        },
        args,
    )
    return tokenizer, blocks


def train(cfg: TrainerConfig, session: Session) -> FitResult:
    args = training_arguments(cfg, TrainingArguments)
    tokenizer, blocks = prepare_data(cfg, session, args)
    train_blocks, eval_blocks = blocks["train"], blocks["eval"]

    set_seed(cfg.training.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.architecture, tokenizer)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=session.callbacks(),
    )
    block = len(train_blocks[0]["input_ids"])
    log.info("%s; %d blocks of %d tokens", describe(model), len(train_blocks), block)
    return session.fit(trainer)
