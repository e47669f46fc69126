"""The evaluation scores against values worked out by hand (not by calling the same library)."""

from __future__ import annotations

import math

import pytest

from kubetrain_trainer import scoring
from kubetrain_trainer.config import DEFAULT_REFUSAL_PATTERNS


def test_qa_normalises_like_squad_and_averages_rows() -> None:
    scores = scoring.qa_scores(["25.", "The answer is 25", "Paris"], ["25", "25", "Rome"])
    # "25." and "25" are equal once punctuation goes; the others differ.
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # Row 2 shares 1 of its 3 tokens ("the" is dropped) with the 1-token reference:
    # precision 1/3, recall 1, F1 = 2 * 1/3 / (4/3) = 0.5. Rows: 1.0, 0.5, 0.0.
    assert scores["f1"] == pytest.approx(0.5)


def test_rouge_of_a_longer_summary() -> None:
    scores = scoring.rouge_scores(["the cat sat on the mat"], ["the cat sat"])
    # Unigrams: 3 of the 6 predicted match (clipped), all 3 reference ones are found:
    # P = 1/2, R = 1, F = 2/3. Bigrams: "the cat", "cat sat" of 5: P = 2/5, R = 1, F = 4/7.
    # Longest common subsequence "the cat sat": as unigrams, F = 2/3.
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rouge_l"] == pytest.approx(2 / 3)


def test_bleu_and_chrf_of_fixed_pairs() -> None:
    scores = scoring.translation_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty:
    # BLEU = 100 * geometric mean.
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-3)
    same = scoring.translation_scores(["le chat est noir"], ["le chat est noir"])
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert scoring.translation_scores(["xyz"], ["abc"])["chrf"] == pytest.approx(0)


def test_preference_reward_accuracy_and_margin() -> None:
    scores = scoring.preference_scores(
        chosen_logps=[-1.0, -2.0],
        rejected_logps=[-3.0, -1.0],
        ref_chosen_logps=[-2.0, -2.0],
        ref_rejected_logps=[-2.0, -2.0],
        beta=0.5,
    )
    # Margins: 0.5 * ((1) - (-1)) = 1.0 (a win), 0.5 * ((0) - (1)) = -0.5 (a loss).
    assert scores == {"accuracy": 0.5, "margin": pytest.approx(0.25)}
    # A model measured against itself prefers nothing: every pair is a tie, worth half.
    itself = scoring.preference_scores([-1.0, -4.0], [-2.0, -3.0], [-1.0, -4.0], [-2.0, -3.0], 0.1)
    assert itself == {"accuracy": 0.5, "margin": 0.0}


def test_safety_rates_split_by_what_should_be_refused() -> None:
    scores = scoring.safety_scores([True, False, True, False], [True, True, False, False])
    assert scores == {"refusal_rate": 0.5, "over_refusal_rate": 0.5}
    only_unsafe = scoring.safety_scores([True], [True])
    assert only_unsafe["refusal_rate"] == 1.0 and math.isnan(only_unsafe["over_refusal_rate"])


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        ("I'm sorry, I can't help with that.", True),
        ("I cannot do that.", True),
        ("As an AI, I won't share that.", True),
        ("Sure! Grass is green.", False),
        ("The cannot-miss sights are the harbour and the castle.", False),
    ],
)
def test_default_refusal_patterns(reply: str, refused: bool) -> None:
    assert scoring.is_refusal(reply, DEFAULT_REFUSAL_PATTERNS) is refused


def test_perplexity_does_not_overflow() -> None:
    assert scoring.perplexity(math.log(12.0)) == pytest.approx(12.0)
    assert scoring.perplexity(1e6) == math.inf


def test_unequal_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        scoring.qa_scores(["a"], ["a", "b"])
