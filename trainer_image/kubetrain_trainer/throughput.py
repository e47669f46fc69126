"""Where kubetrain's sft, lora and dpo are faster than TRL's trainers, at the same numerics.

Two levers, both exact (the loss of every sequence is what TRL computes; a test compares
them), both on by default:

- Length-grouped batches (`data.groupByLength`). Chats have long-tailed lengths, so a
  randomly drawn batch is mostly padding: one 1000-token chat pads seven 100-token ones.
  Rows are shuffled by seed, cut into mega-batches of 50 batches, sorted by length inside
  each, cut into batches, and the batches shuffled again; so batches hold rows of similar
  length while their order stays random. The batch size, and so the number of optimizer
  steps and the learning-rate schedule, are the user's. The batch with the longest row
  goes first, so an out-of-memory shows at the first step rather than hours in.
- The LM head only where there is a label. TRL's fused head scores only labelled positions
  on GPUs (Triton) but every position, padding and prompt included, elsewhere; and a
  system/user token carries no loss. Here the head projects the labelled positions only,
  on every device, and the vocabulary-wide softmax is built once for the loss, entropy and
  token accuracy (TRL's torch fallback recomputes it in its backward). Large batches of a
  large vocabulary go through TRL's own chunked kernel on the same labelled rows, so the
  logits never take more than LOGITS_BUDGET elements.

A third mode is opt-in: padding-free batches (`data.packing`, sft/lora): TRL's collator
joins a batch's rows into one row with positions restarting per row, and transformers
builds the block-diagonal mask from them (flash attention's varlen kernel on GPUs), so no
row attends to another. TRL refuses a max_length it would not enforce there, so `truncated`
cuts the tokenized rows instead. The steps stay as configured in every mode.

TRL's trainers call the head as `model(..., labels=..., fused_lm_head=True)`; this module
replaces that forward after TRL installed it, and hands every case it does not cover
(softcapped or scaled logits, an adapted or sharded LM head, sequence parallelism) back to
TRL's.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from torch.utils.data import Sampler, SequentialSampler
from transformers import PreTrainedModel
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS
from trl.trainer.utils import FusedCausalLMOutput

# Rows per mega-batch, in batches: wide enough to find rows of similar length, narrow
# enough that the order stays random (transformers' LengthGroupedSampler uses the same).
MEGABATCH_BATCHES = 50
# Above this many logits (labelled positions x vocabulary; 64 Mi floats = 256 MiB) the
# chunked kernel keeps memory flat instead of materialising them.
LOGITS_BUDGET = 1 << 26
_CHUNK_COLUMNS = 32768


def truncated(dataset, max_length: int):
    """A tokenized dataset with every per-token column cut to `max_length` (the columns as
    long as `input_ids`: labels, assistant and completion masks)."""

    def cut(row: dict) -> dict:
        length = len(row["input_ids"])
        return {
            key: value[:max_length]
            for key, value in row.items()
            if isinstance(value, list) and len(value) == length
        }

    return dataset.map(cut, desc=f"truncating rows to data.maxLength={max_length}")


def sequence_lengths(dataset) -> list[int]:
    """Tokens per row of a TRL-tokenized dataset: input_ids for SFT, the longer of the
    prompt+chosen and prompt+rejected rows for DPO (the collator pads a pair's two rows to
    the batch's longest)."""
    columns = dataset.column_names
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    prompts, chosen, rejected = (
        dataset["prompt_ids"],
        dataset["chosen_ids"],
        dataset["rejected_ids"],
    )
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


class LengthGroupedSampler(Sampler[int]):
    """Row indices in batches of similar length, in a random order decided by seed and epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        # Trainer and accelerate call this each epoch; a resumed run replays the same order.
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * MEGABATCH_BATCHES
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            group = sorted(order[start : start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            ]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(shuffled)), key=lambda i: self.lengths[shuffled[i][0]], default=0)
        shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return shuffled

    def __iter__(self) -> Iterator[int]:
        return (index for batch in self.batches() for index in batch)


class ThroughputLevers:
    """Mixin for a TRL trainer: both levers of this module.

    Length grouping follows transformers' own switch, `train_sampling_strategy=
    "group_by_length"`, with the sampler above in place of transformers' (whose batches
    inside a mega-batch run from longest to shortest, a length curriculum). It groups per
    global batch (per-device batch x processes), so each rank's slice of a step is as even
    as the whole.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # TRL installed its fused head on these two (the policy under any PEFT wrapper).
        for model in (self.model, getattr(self, "ref_model", None)):
            if model is not None:
                labelled_positions_head(
                    model.get_base_model() if isinstance(model, PeftModel) else model
                )

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(dataset)
        args = self.args
        return LengthGroupedSampler(
            sequence_lengths(dataset),
            args.per_device_train_batch_size * max(1, args.world_size),
            args.data_seed if args.data_seed is not None else args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        # Evaluation keeps the data's order: its loss averages per-batch means, so grouping
        # would change the figure, not just its cost.
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)


def labelled_positions_head(model: PreTrainedModel) -> None:
    """Replace TRL's fused LM head on `model` (installed by its trainer) with one that
    scores only the positions whose next token has a label."""
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        fused_lm_head=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if not fused_lm_head or shift_labels is not None or not _plain_head(self):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        scores = _score(self.get_output_embeddings(), hidden[mask], targets[mask])
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero loss
        # that still runs backward on every rank, as DDP needs).
        per_token = {
            name: mask.new_zeros(mask.shape, dtype=value.dtype).masked_scatter(mask, value)
            for name, value in scores.items()
        }
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token
        )

    model.forward = types.MethodType(forward, model)


def _plain_head(model: PreTrainedModel) -> bool:
    """Whether the logits are exactly `lm_head(hidden)`: no scaling, softcapping, adapter
    on the head or sharded weight (TRL's own head handles those)."""
    if not isinstance(model, PreTrainedModel):
        return False  # e.g. DPO's reference model inside a DeepSpeed engine (ZeRO-3)
    config = model.config.get_text_config()
    scaled = any(
        getattr(config, name, None) is not None
        for name in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "lm_head_multiplier",
            "logits_scaling",
        )
    )
    head = model.get_output_embeddings()
    return (
        not scaled
        and type(head) is torch.nn.Linear
        and type(head.weight) is torch.nn.Parameter
        # A ZeRO-3 partition: only the head's own forward gathers it.
        and not hasattr(head.weight, "ds_id")
        and not getattr(config, "output_router_logits", False)
    )


def _score(
    head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every per-token field of TRL's fused head, for the labelled rows only: the target's
    log-probability (with gradient) and the metrics TRL's trainers log from it (entropy,
    top-1 hit, mean logit, log sum of squared probabilities; without gradient). Each metric
    is one pass over logits already in memory, far cheaper than the projection itself."""
    if hidden.shape[0] * head.out_features > LOGITS_BUDGET:
        fields = ChunkedLogProbFunction.apply(
            hidden,
            head.weight,
            head.bias,
            targets,
            1.0,
            _CHUNK_COLUMNS,
            None,
            1.0,
            OPTIONAL_OUTPUTS,
        )
        log_probs, *metrics = fields
        return {"log_probs": log_probs} | {
            name: value.detach() for name, value in zip(OPTIONAL_OUTPUTS, metrics, strict=True)
        }
    logits = head(hidden).float()
    log_softmax = logits.log_softmax(-1)
    scores = {"log_probs": log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
    with torch.no_grad():
        scores["entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
        scores["log_sum_sq_probs"] = torch.logsumexp(2 * log_softmax, dim=-1)
        scores["mean_logits"] = logits.mean(-1)
        # argmax returns the first maximum, so a tie with an earlier token is not a hit (as TRL).
        scores["is_top1"] = logits.argmax(-1) == targets
    return scores
