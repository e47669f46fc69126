"""Generated chats and preference pairs with long-tailed lengths, the same for every side.

A made-up language of pseudo-words drawn with Zipf's law (as words are); the assistant
answers a user turn by translating its words with a fixed dictionary (word i -> word
perm[i]), so a model learns something within one epoch (the frequent words first) and an
eval loss means something. Turn lengths are lognormal (median about 100 tokens per chat,
a tail past 1000), a fifth of the chats have two or three exchanges, some a system turn.
Deterministic by seed.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "su",
    "ta",
    "ri",
    "po",
    "ve",
    "zu",
    "ha",
    "bo",
    "de",
    "gi",
    "fa",
    "ju",
    "wo",
    "xe",
    "yi",
    "qu",
]
WORDS = 7000
ZIPF_CUMULATIVE = list(itertools.accumulate(1 / rank for rank in range(1, WORDS + 1)))


def vocabulary(rng: random.Random) -> tuple[list[str], list[int]]:
    words: set[str] = set()
    while len(words) < WORDS:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    ordered = sorted(words)
    translation = list(range(WORDS))
    rng.shuffle(translation)
    return ordered, translation


def _zipf(rng: random.Random, count: int) -> list[int]:
    return rng.choices(range(WORDS), cum_weights=ZIPF_CUMULATIVE, k=count)


def _turn_words(rng: random.Random, median_words: float) -> int:
    return max(2, min(900, round(rng.lognormvariate(0, 1.25) * median_words)))


def lexicon() -> str:
    """Every word of the language once, for training a tokenizer that knows them all."""
    return " ".join(vocabulary(random.Random(0))[0])


def chats(count: int, seed: int) -> list[dict]:
    """`count` chats of {messages}: user words, assistant translations."""
    rng = random.Random(seed)
    words, translation = vocabulary(random.Random(0))
    rows = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "Translate every word."})
        exchanges = rng.choice([1, 1, 1, 1, 2, 3])
        # About 2.2 tokens per word with an 8k BPE on this language: median ~100 tokens a chat.
        median = 25 / exchanges
        for _ in range(exchanges):
            ids = _zipf(rng, _turn_words(rng, median))
            messages.append({"role": "user", "content": " ".join(words[i] for i in ids)})
            answer = " ".join(words[translation[i]] for i in ids)
            messages.append({"role": "assistant", "content": answer})
        rows.append({"messages": messages})
    return rows


def preference_pairs(count: int, seed: int) -> list[dict]:
    """`count` pairs {prompt, chosen, rejected}: the right translation against one with a
    fifth of its words swapped for random ones."""
    rng = random.Random(seed)
    words, translation = vocabulary(random.Random(0))
    rows = []
    for _ in range(count):
        ids = _zipf(rng, _turn_words(rng, 30))
        right = [words[translation[i]] for i in ids]
        wrong = [w if rng.random() > 0.2 else words[rng.randrange(WORDS)] for w in right]
        if wrong == right:
            wrong[0] = words[(translation[ids[0]] + 1) % WORDS]
        rows.append(
            {
                "prompt": " ".join(words[i] for i in ids) + " =",
                "chosen": " " + " ".join(right),
                "rejected": " " + " ".join(wrong),
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
