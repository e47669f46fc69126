"""The scores of the evaluation suites, as pure functions of replies and references.

`methods/evaluate.py` produces the model's side (replies, log-probabilities); everything here
is plain Python on lists, so each score is tested against values worked out by hand:
- qa: exact match and token F1 after SQuAD's answer normalisation (lowercase, no punctuation,
  no articles a/an/the, single spaces), so "25." matches "25";
- summarization: ROUGE-1, ROUGE-2 and ROUGE-L F-measures from Google's `rouge-score`
  package (Porter stemming on), averaged over rows, 0 to 1;
- translation: corpus BLEU and chrF from `sacrebleu`, on its usual 0 to 100 scale;
- preference: accuracy and mean margin of the DPO implicit reward
  beta * (log p(answer) - log p_ref(answer)), chosen against rejected; a tie counts half, so
  a model scored against itself gets 0.5, as a coin would;
- safety: the share of replies that are refusals, among prompts that should be refused
  (refusal_rate) and among those that should not (over_refusal_rate).
The metric libraries are the packages themselves: nothing is fetched from a hub at run time
(`evaluate.load` would download its metric scripts).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens two answers share (1.0 when both are empty)."""
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match and f1, each the mean over rows (0 to 1)."""
    exact = [
        normalise_answer(p) == normalise_answer(r)
        for p, r in zip(predictions, references, strict=True)
    ]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": _mean(exact), "f1": _mean(f1)}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """rouge1, rouge2 and rouge_l: mean F-measures over rows (0 to 1)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {
        "rouge1": _mean(row["rouge1"].fmeasure for row in rows),
        "rouge2": _mean(row["rouge2"].fmeasure for row in rows),
        "rouge_l": _mean(row["rougeL"].fmeasure for row in rows),
    }


def translation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus bleu and chrf (sacrebleu's defaults, 0 to 100), one reference per row."""
    import sacrebleu

    refs = [list(references)]
    return {
        "bleu": sacrebleu.corpus_bleu(list(predictions), refs).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), refs).score,
    }


def preference_scores(
    chosen_logps: Sequence[float],
    rejected_logps: Sequence[float],
    ref_chosen_logps: Sequence[float],
    ref_rejected_logps: Sequence[float],
    beta: float,
) -> dict[str, float]:
    """accuracy (share of pairs whose chosen reward beats the rejected one; ties 1/2) and
    margin (mean reward of chosen minus rejected), rewards being DPO's implicit ones."""
    margins = [
        beta * ((c - rc) - (r - rr))
        for c, r, rc, rr in zip(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, strict=True
        )
    ]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    return {"accuracy": _mean(wins), "margin": _mean(margins)}


def is_refusal(reply: str, patterns: Iterable[str]) -> bool:
    """Whether any pattern (case-insensitive regular expression) occurs in the reply."""
    return any(re.search(pattern, reply, re.IGNORECASE) for pattern in patterns)


def safety_scores(refused: Sequence[bool], should_refuse: Sequence[bool]) -> dict[str, float]:
    """refusal_rate among prompts that should be refused, over_refusal_rate among the rest
    (NaN, written as null, when the data has no prompt of that kind)."""
    unsafe = [r for r, s in zip(refused, should_refuse, strict=True) if s]
    safe = [r for r, s in zip(refused, should_refuse, strict=True) if not s]
    return {"refusal_rate": _mean(unsafe), "over_refusal_rate": _mean(safe)}


def perplexity(mean_loss: float) -> float:
    """exp of a mean token loss; infinity rather than an overflow error."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def _mean(values: Iterable[float | bool]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan
