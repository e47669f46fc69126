"""Evaluate: score a model on the guide's evaluation suites; nothing is trained.

Run as: kubetrain run examples/trainingrun-evaluate-tiny.yaml
  (inside a pod: python -m kubetrain_trainer --config /etc/kubetrain/config.yaml)

`model.name` is the model to score: a full model, a LoRA adapter folder (transformers loads
it onto its base) or a merged model. Each suite of the `evaluate` block reads its own data
and adds `<suite>.<metric>` values to metrics.json (scoring.py says how each is computed):
- perplexity, loss: the mean loss per token on the tokens training would learn (every token
  of text rows, the output of instruction rows, the assistant turns of chats), and its exp;
- qa, summarization, translation: the model's replies to the user turns, decoded as
  `evaluate.generation` says (greedy by default), against the reference answer;
- preference: DPO's implicit reward of chosen against rejected answers, measured against
  `evaluate.referenceModel` (for an adapter, its base with the adapter off);
- safety: which replies are refusals, by patterns or by a classifier model.
Prompts go through the tokenizer's chat template (ChatML when it has none) exactly as sft
formats them, so a model is asked the way it was taught. Rows are scored in batches of
`generation.batchSize`, on the GPU when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from kubetrain_trainer import scoring
from kubetrain_trainer.config import (
    DEFAULT_REFUSAL_PATTERNS,
    SUITE_FORMATS,
    ConfigError,
    EvalSuite,
    Evaluate,
    ModelSpec,
    TrainerConfig,
)
from kubetrain_trainer.contract import EVAL_SUITE_METRICS, eval_metric_key
from kubetrain_trainer.data import load_safety_prompts, load_split
from kubetrain_trainer.models import (
    IM_END,
    fit_embeddings,
    is_adapter_folder,
    load_model,
    load_tokenizer,
)

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that is not scored


def evaluate(cfg: TrainerConfig) -> dict[str, float]:
    """Every suite's metrics, `<suite>.<metric>` -> value, in the order the suites are listed."""
    spec = cfg.evaluate
    assert spec is not None  # TrainerConfig's rules require the block for method evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    model = load_scored_model(cfg.model, tokenizer, device)
    results: dict[str, float] = {}
    for index, suite in enumerate(spec.suites):
        field = f"evaluate.suites[{index}].data"
        scores = SUITES[suite.name](Scorer(model, tokenizer, spec, device), suite, field, cfg)
        for metric in EVAL_SUITE_METRICS[suite.name]:
            results[eval_metric_key(suite.name, metric)] = scores[metric]
        shown = ", ".join(f"{m} {scores[m]:.4g}" for m in EVAL_SUITE_METRICS[suite.name])
        log.info("suite %s on %s: %s", suite.name, suite.data, shown)
    return results


def load_scored_model(spec: ModelSpec, tokenizer, device: str) -> PreTrainedModel:
    model = load_model(spec)
    fit_embeddings(model, tokenizer)
    return model.to(device).eval()


@dataclass
class Scorer:
    """The model under evaluation, and the two things suites ask of it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: Evaluate
    device: str

    def batches(self, rows: Sequence) -> Iterator[Sequence]:
        size = self.spec.generation.batch_size
        for start in range(0, len(rows), size):
            yield rows[start : start + size]

    @torch.no_grad()
    def token_logps(self, sequences: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
        """For each (ids, labels), the log-probability of every labelled token, in order.

        Labels are the ids themselves where scored and IGNORE elsewhere; sequences longer
        than evaluate.maxLength keep their end (the answer).
        """
        out: list[list[float]] = []
        pad = self.tokenizer.pad_token_id
        for batch in self.batches(sequences):
            batch = [
                (ids[-self.spec.max_length :], lab[-self.spec.max_length :]) for ids, lab in batch
            ]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (seq, lab) in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                labels[row, : len(lab)] = torch.tensor(lab)
                mask[row, : len(seq)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            # Position t predicts token t+1.
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = labels[:, 1:].to(self.device)
            scored = targets != IGNORE
            picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out += [picked[row][scored[row]].tolist() for row in range(len(batch))]
        return out

    @torch.no_grad()
    def replies(self, prompts: Sequence[list[dict[str, str]]]) -> list[str]:
        """The model's reply to each chat prompt (its turns up to the reply)."""
        generation = self.spec.generation
        set_seed(generation.seed)
        tokenizer = self.tokenizer
        stop = [tokenizer.eos_token_id]
        if IM_END in tokenizer.get_vocab():
            stop.append(tokenizer.convert_tokens_to_ids(IM_END))
        room = max(self.spec.max_length - generation.max_new_tokens, 1)
        answers: list[str] = []
        for batch in self.batches(prompts):
            encoded = [chat_prompt_ids(tokenizer, messages)[-room:] for messages in batch]
            width = max(len(ids) for ids in encoded)
            # Left padding: every prompt ends where its reply begins.
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(encoded):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            sampling = generation.temperature > 0
            output = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=generation.max_new_tokens,
                do_sample=sampling,
                temperature=generation.temperature if sampling else None,
                top_p=generation.top_p if sampling else None,
                top_k=None,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, width:]
            answers += [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new]
        return answers


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> list[int]:
    """The chat template of `messages` with the assistant's turn opened, as token ids."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


# ---------------------------------------------------------------- rows of each kind


def prompts_and_references(rows) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Chat prompts and reference answers from normalised instruction or messages rows."""
    prompts, references = [], []
    for row in rows:
        if "messages" in row:
            turns = row["messages"]
            last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
            prompts.append(turns[:last])
            references.append(turns[last]["content"])
        else:  # instruction rows arrive as conversational prompt/completion
            prompts.append(row["prompt"])
            references.append(row["completion"][0]["content"])
    return prompts, references


def learned_tokens(tokenizer: PreTrainedTokenizerBase, row) -> tuple[list[int], list[int]]:
    """(ids, labels) of one row, labelled where training would learn (see sft.py)."""
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    turns = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
    ids: list[int] = []
    labels: list[int] = []
    for index, turn in enumerate(turns):
        # A turn's tokens are what it adds to the template of the turns before it, so any
        # chat template works, not only those with generation markers. An assistant turn
        # is scored from the end of its header (the generation prompt) on.
        if turn["role"] == "assistant":
            ids = chat_prompt_ids(tokenizer, turns[:index])
            labels += [IGNORE] * (len(ids) - len(labels))
        ids = chat_ids(tokenizer, turns[: index + 1])
        added = ids[len(labels) :]
        labels += added if turn["role"] == "assistant" else [IGNORE] * len(added)
    return ids, labels


def _rows(suite: EvalSuite, field: str):
    data, found = load_split(suite.data, suite.format, field=field)
    if found not in SUITE_FORMATS[suite.name]:
        readable = " or ".join(f for f in SUITE_FORMATS[suite.name] if f != "auto")
        raise ConfigError(
            f"{field}: {suite.data} holds {found} rows; suite {suite.name} reads {readable} rows"
        )
    if suite.max_samples is not None:
        data = data.select(range(min(suite.max_samples, len(data))))
    return list(data)


# ---------------------------------------------------------------- the suites


def language_modelling(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    rows = _rows(suite, field)
    sequences = [learned_tokens(scorer.tokenizer, row) for row in rows]
    logps = [lp for row in scorer.token_logps(sequences) for lp in row]
    if not logps:
        raise ConfigError(f"{field}: {suite.data} has no tokens to score")
    loss = -sum(logps) / len(logps)
    return {"loss": loss, "perplexity": scoring.perplexity(loss)}


def _generation_rows(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig):
    prompts, references = prompts_and_references(_rows(suite, field))
    return scorer.replies(prompts), references


def qa(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    return scoring.qa_scores(*_generation_rows(scorer, suite, field, cfg))


def summarization(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    return scoring.rouge_scores(*_generation_rows(scorer, suite, field, cfg))


def translation(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    return scoring.translation_scores(*_generation_rows(scorer, suite, field, cfg))


def answer_logps(scorer: Scorer, rows, answer: str) -> list[float]:
    """Summed log-probability of each row's `answer` after its prompt, tokenized as TRL's
    DPOTrainer does (prompt alone, then prompt + answer + EOS; the answer starts where the
    two token lists part)."""
    tokenizer = scorer.tokenizer
    sequences = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        full = tokenizer(
            row["prompt"] + row[answer] + tokenizer.eos_token, add_special_tokens=False
        )["input_ids"]
        shared = next(
            (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
            min(len(prompt), len(full)),
        )
        sequences.append((full, [IGNORE] * shared + full[shared:]))
    return [sum(row) for row in scorer.token_logps(sequences)]


def preference(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    rows = _rows(suite, field)
    chosen, rejected = answer_logps(scorer, rows, "chosen"), answer_logps(scorer, rows, "rejected")
    spec = scorer.spec
    if spec.reference_model.name:
        reference = ModelSpec(**{**cfg.model.model_dump(), "name": spec.reference_model.name})
        ref_model = load_scored_model(reference, scorer.tokenizer, scorer.device)
        ref = Scorer(ref_model, scorer.tokenizer, spec, scorer.device)
        ref_chosen, ref_rejected = (
            answer_logps(ref, rows, "chosen"),
            answer_logps(ref, rows, "rejected"),
        )
    elif is_adapter_folder(cfg.model.name):
        # The reference DPO used for a LoRA policy: the same weights, adapter off.
        scorer.model.disable_adapters()
        try:
            ref_chosen, ref_rejected = (
                answer_logps(scorer, rows, "chosen"),
                answer_logps(scorer, rows, "rejected"),
            )
        finally:
            scorer.model.enable_adapters()
    else:
        raise ConfigError(
            "evaluate.referenceModel.name: suite preference measures the DPO reward against "
            "a reference model; name the model DPO started from (or score a LoRA adapter, "
            "whose base is its reference)"
        )
    return scoring.preference_scores(chosen, rejected, ref_chosen, ref_rejected, spec.beta)


def safety(scorer: Scorer, suite: EvalSuite, field: str, cfg: TrainerConfig) -> dict:
    rows = load_safety_prompts(suite.data, field=field)[: suite.max_samples]
    replies = scorer.replies([[{"role": "user", "content": row["prompt"]}] for row in rows])
    if suite.refusal_classifier:
        refused = classified_refusals(suite, replies)
    else:
        patterns = suite.refusal_patterns or DEFAULT_REFUSAL_PATTERNS
        refused = [scoring.is_refusal(reply, patterns) for reply in replies]
    return scoring.safety_scores(refused, [row["should_refuse"] for row in rows])


def classified_refusals(suite: EvalSuite, replies: list[str]) -> list[bool]:
    """Whether a sequence-classification model's top label for each reply is the refusal label."""
    from transformers import pipeline

    try:
        classify = pipeline(
            "text-classification", model=suite.refusal_classifier, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"refusalClassifier: cannot load a text-classification model from "
            f"{suite.refusal_classifier!r}: {e}"
        ) from e
    labels = set(classify.model.config.id2label.values())
    if suite.refusal_label not in labels:
        raise ConfigError(
            f"refusalLabel: {suite.refusal_label!r} is not a label of {suite.refusal_classifier} "
            f"(its labels: {sorted(labels)})"
        )
    return [result["label"] == suite.refusal_label for result in classify(replies, truncation=True)]


SUITES = {
    "perplexity": language_modelling,
    "loss": language_modelling,
    "qa": qa,
    "summarization": summarization,
    "translation": translation,
    "preference": preference,
    "safety": safety,
}
