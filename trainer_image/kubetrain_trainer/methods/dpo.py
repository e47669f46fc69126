"""Direct Preference Optimization: align a model with prompt/chosen/rejected pairs.

Run as: kubetrain run examples/trainingrun-dpo-tiny.yaml

Built on TRL's DPOTrainer, which minimises
    -log sigmoid(beta * [log pi(y_w|x)/ref(y_w|x) - log pi(y_l|x)/ref(y_l|x)])
(other `dpo.lossType` values swap that expression). The reference model is, in order:
`dpo.referenceModel.name` when given; the same weights with the adapter switched off when
the policy is a LoRA adapter (`dpo.useLora`, no second copy in memory); otherwise a frozen
copy of the starting model. TRL logs `rewards/accuracies` (how often the chosen answer wins)
and `rewards/margins`; both reach Prometheus and metrics.json.

TRL 1.x dropped `max_prompt_length`; `data.maxPromptLength` is applied here instead by
keeping the last N prompt tokens, which hold the question being answered.
"""

from __future__ import annotations

import logging

import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig

from kubetrain_trainer.config import ConfigError, Dpo, Lora, ModelSpec, TrainerConfig
from kubetrain_trainer.methods.lora import peft_config
from kubetrain_trainer.models import describe, fit_embeddings, load_model, load_tokenizer
from kubetrain_trainer.prepared import CachedPreparation
from kubetrain_trainer.session import FitResult, Session, sampling_strategy, training_arguments
from kubetrain_trainer.sharding import FsdpSupport
from kubetrain_trainer.throughput import ThroughputLevers

log = logging.getLogger(__name__)


class DPOTrainer(CachedPreparation, FsdpSupport, ThroughputLevers, trl.DPOTrainer):
    """TRL's DPOTrainer with length-grouped pairs and the LM head on completion tokens."""


def clip_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, limit: int) -> Dataset:
    """Keep the last `limit` tokens of every prompt."""

    def clip(row: dict) -> dict:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            row["prompt"] = tokenizer.decode(ids[-limit:])
        return row

    return dataset.map(clip, desc="clipping prompts to data.maxPromptLength")


def check_rows_left(trainer: DPOTrainer, cfg: TrainerConfig) -> None:
    """Fail before training when TRL's length handling left no pair to learn from."""
    splits = [("data.train", cfg.data.train, trainer.train_dataset)]
    if trainer.eval_dataset is not None and cfg.data.eval:
        splits.append(("data.eval", cfg.data.eval, trainer.eval_dataset))
    for field, source, rows in splits:
        if len(rows) == 0:
            raise ConfigError(
                f"{field}: {source}: no preference pair is left to train on after "
                f"data.maxLength={cfg.data.max_length}; raise maxLength (or lower "
                "data.maxPromptLength) or check the rows"
            )


def train(cfg: TrainerConfig, session: Session) -> FitResult:
    dpo = cfg.dpo or Dpo()
    data = session.load_data()
    if data.format != "preference":
        # `format: auto` may find text or chats; DPO would fail later on a missing "prompt".
        raise ConfigError(
            f"data.train: {cfg.data.train} holds {data.format} rows; method dpo needs "
            "preference pairs {prompt, chosen, rejected} (use method sft for "
            f"{data.format} data)"
        )
    tokenizer = load_tokenizer(cfg.model)
    limit = cfg.data.max_prompt_length

    model = load_model(cfg.model)
    fit_embeddings(model, tokenizer)
    reference = None
    if dpo.reference_model.name:
        reference_spec = ModelSpec(
            name=dpo.reference_model.name,
            torch_dtype=cfg.model.torch_dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        reference = load_model(reference_spec, field="dpo.referenceModel.name")
        fit_embeddings(reference, tokenizer)

    args = training_arguments(
        cfg,
        DPOConfig,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
        max_length=cfg.data.max_length,
        train_sampling_strategy=sampling_strategy(cfg),
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora or Lora()) if dpo.use_lora else None,
        callbacks=session.callbacks(),
        # Clipped and tokenized once into <output>/.cache (kubetrain_trainer.prepared).
        data_fingerprint=data.fingerprint,
        cache_settings={"max_prompt_length": limit},
        before_preparation=(lambda rows: clip_prompts(rows, tokenizer, limit)) if limit else None,
    )
    session.rows_dropped = trainer.rows_dropped
    check_rows_left(trainer, cfg)
    log.info(
        "%s; %d preference pairs, beta %.3g", describe(trainer.model), len(data.train), dpo.beta
    )
    return session.fit(trainer)
