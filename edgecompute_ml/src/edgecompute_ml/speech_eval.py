"""Measuring speech recognition: synthesised test speech (espeak-ng) and the word error rate.

Used by the demo, the pretrained-model test and ``benchmarks/ml.py``; nothing here is needed to
transcribe.
"""

from __future__ import annotations

import re
import shutil
import subprocess

__all__ = ["SENTENCES", "espeak_available", "normalize_words", "synthesize", "word_error_rate"]

# plain, clear English sentences (no numbers, whose spelling Whisper may change to digits)
SENTENCES = [
    "The weather is nice today and we are going to the park.",
    "Please open the door and turn on the lights.",
    "The children are playing in the garden.",
    "My brother lives in a small house near the river.",
    "She reads a book every evening before dinner.",
    "We have to finish this project before the end of the month.",
]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, *, words_per_minute: int = 150, voice: str = "en-us", gap_ms: int = 0) -> bytes:
    """WAV bytes (22050 Hz, 16-bit mono) of ``text`` spoken by espeak-ng; ``gap_ms`` of silence
    between sentences when ``text`` has several."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    args = [exe, "-v", voice, "-s", str(words_per_minute), "-g", "0", "--stdout"]
    if gap_ms:
        # SSML breaks give exact pauses between the sentences
        parts = re.split(r"(?<=[.!?])\s+", text.strip())
        text = "<speak>" + f'<break time="{gap_ms}ms"/>'.join(parts) + "</speak>"
        args.insert(-1, "-m")
    return subprocess.run([*args, text], capture_output=True, check=True, timeout=120).stdout


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
