"""Measuring speech recognition: test sentences and the word error rate.

Used by the speech benchmarks and the pretrained-model tests (which import it as
``benchmarks.speech_eval``); the speech itself is synthesised by ``edgecompute_ml.demo.synthesize``
(espeak-ng). Nothing here ships in ``edgecompute_ml``: transcribing needs none of it.
"""

from __future__ import annotations

import re

__all__ = ["SENTENCES", "normalize_words", "word_error_rate"]

# plain, clear English sentences (no numbers, whose spelling Whisper may change to digits)
SENTENCES = [
    "The weather is nice today and we are going to the park.",
    "Please open the door and turn on the lights.",
    "The children are playing in the garden.",
    "My brother lives in a small house near the river.",
    "She reads a book every evening before dinner.",
    "We have to finish this project before the end of the month.",
]


def normalize_words(text: str) -> list[str]:
    """Lower case words without punctuation (hyphens and apostrophes split or dropped alike)."""
    text = text.lower().replace("-", " ").replace("'", "")
    return re.sub(r"[^a-z0-9 ]+", " ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on normalised words."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)
