"""Supervised fine-tuning: adapt a pretrained model to chats, instructions or text.

Run as: kubetrain run examples/trainingrun-sft-tiny.yaml
  (inside a pod: python -m kubetrain_trainer --config /etc/kubetrain/config.yaml)

Built on TRL's SFTTrainer. The loss covers only what the model should learn to write:
- messages: the assistant turns (TRL `assistant_only_loss`, ChatML when the tokenizer has
  no chat template);
- instruction: the output (rows arrive as prompt/completion pairs, TRL's completion-only loss);
- text: every token.
If the mask leaves nothing to learn (no assistant tokens survive truncation) the run fails
before training instead of reporting a meaningless loss.
"""

from __future__ import annotations

import logging

import trl
from peft import PeftConfig
from trl import SFTConfig

from kubetrain_trainer.config import ConfigError, TrainerConfig
from kubetrain_trainer.models import describe, fit_embeddings, load_model, load_tokenizer
from kubetrain_trainer.prepared import CachedPreparation
from kubetrain_trainer.session import FitResult, Session, sampling_strategy, training_arguments
from kubetrain_trainer.sharding import FsdpSupport
from kubetrain_trainer.throughput import ThroughputLevers, truncated

log = logging.getLogger(__name__)


class SFTTrainer(CachedPreparation, FsdpSupport, ThroughputLevers, trl.SFTTrainer):
    """TRL's SFTTrainer with length-grouped batches and the LM head on labelled tokens."""


def build_trainer(
    cfg: TrainerConfig, session: Session, peft_config: PeftConfig | None = None, model=None
) -> SFTTrainer:
    """The SFTTrainer for this config; lora.py passes its adapter config in."""
    data = session.load_data()
    if data.format == "preference":
        raise ConfigError(
            f"data.train: {cfg.data.train} holds preference pairs; method {cfg.method} needs "
            "text, messages or instruction rows (use method dpo for preference pairs)"
        )
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model)
    fit_embeddings(model, tokenizer)

    args = training_arguments(
        cfg,
        SFTConfig,
        # Padding-free batches are truncated here, after TRL tokenized them (TRL refuses a
        # max_length it would not enforce without packing rows into blocks).
        max_length=None if cfg.data.packing else cfg.data.max_length,
        padding_free=cfg.data.packing,
        dataset_text_field="text",
        assistant_only_loss=data.format == "messages",
        completion_only_loss=data.format == "instruction",
        train_sampling_strategy=sampling_strategy(cfg),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=session.callbacks(),
        # Tokenized once into <output>/.cache (kubetrain_trainer.prepared).
        data_fingerprint=data.fingerprint,
    )
    if cfg.data.packing:
        trainer.train_dataset = truncated(trainer.train_dataset, cfg.data.max_length)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = truncated(trainer.eval_dataset, cfg.data.max_length)
    session.rows_dropped = trainer.rows_dropped
    check_loss_mask(trainer, data.format, cfg.data.train, cfg.data.max_length)
    log.info("%s; %d training rows (%s)", describe(trainer.model), len(data.train), data.format)
    return trainer


def check_loss_mask(trainer: SFTTrainer, fmt: str, source: str, max_length: int) -> None:
    """Fail when no row has a token to learn from; warn when some rows have none.

    TRL turns the assistant/completion masks into `labels` (-100 = ignored) and truncates
    to maxLength before training, so the labels show exactly what will be learned.
    """
    if fmt not in ("messages", "instruction"):
        return
    what = "assistant" if fmt == "messages" else "output"
    labels = trainer.train_dataset["labels"]
    empty = sum(1 for row in labels if all(token == -100 for token in row))
    if empty == len(labels):
        raise ConfigError(
            f"{source}: no row has any {what} tokens left to train on after truncation to "
            f"data.maxLength={max_length}; raise maxLength or check the rows"
        )
    if empty:
        log.warning(
            "%s: %d of %d rows have no %s tokens within maxLength=%d and teach nothing",
            source,
            empty,
            len(labels),
            what,
            max_length,
        )


def train(cfg: TrainerConfig, session: Session) -> FitResult:
    trainer = build_trainer(cfg, session)
    return session.fit(trainer)
