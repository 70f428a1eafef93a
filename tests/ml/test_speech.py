"""Speech recognition: features, Whisper model and decoding against transformers on tiny random
models, WAV decoding and resampling, the CTranslate2 converter and the executor task."""

from __future__ import annotations

import io
import itertools
import json
import math
import struct
import wave

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from benchmarks.speech_eval import word_error_rate  # noqa: E402
from edgecompute.errors import InvalidRequest  # noqa: E402
from edgecompute_ml._formats.ctranslate2 import convert_ctranslate2_whisper, read_ctranslate2  # noqa: E402
from edgecompute_ml._preprocessing.audio import decode_wav, log_mel, mel_filters, resample, to_waveform  # noqa: E402
from edgecompute_ml._runtime.plan import ModelSource  # noqa: E402
from edgecompute_ml._runtime.store import inspect_model, load_model  # noqa: E402
from edgecompute_ml._tasks.transcribe import (  # noqa: E402
    SpeechParams,
    cut_windows,
    decode_window,
    prompt_tokens,
    transcribe,
)
from edgecompute_ml.errors import ModelError  # noqa: E402

from .conftest import scheduler_for  # noqa: E402


def _load(folder):
    return load_model(inspect_model(ModelSource("w", str(folder))), "float32", "cpu")


def _noise(seconds: float, seed: int = 0, rate: int = 16000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    return 0.1 * torch.randn(t.shape, generator=g) + 0.3 * torch.sin(2 * math.pi * 440 * t)


def _wav(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


# -- features ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "n_mels"), [(1.0, 80), (12.5, 80), (30.0, 80), (34.0, 80), (7.0, 128)])
def test_log_mel_matches_whisper_feature_extractor(seconds, n_mels):
    audio = _noise(seconds, seed=int(seconds))
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    expected = fe(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
    got = log_mel(audio, n_mels)
    assert got.shape == (n_mels, 3000)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_mel_filter_bank_is_slaney_as_transformers():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                   max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
        torch.testing.assert_close(mel_filters(n_mels), torch.from_numpy(expected.T).float(), atol=1e-6, rtol=1e-5)


# -- audio input ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-32768, 32767), min_size=2, max_size=400), st.sampled_from([1, 2]),
       st.sampled_from([8000, 16000, 22050, 44100]))
def test_wav_pcm16_decodes_to_the_samples_averaged_over_channels(values, channels, rate):
    frames = np.array(values[: len(values) // channels * channels], dtype="<i2")
    x, got_rate = decode_wav(_wav(frames, rate, channels))
    assert got_rate == rate
    expected = frames.astype(np.float32).reshape(-1, channels).mean(1) / 32768
    np.testing.assert_allclose(x, expected, atol=1e-7)


def test_wav_float32_24bit_8bit_and_extensible():
    ref = np.array([0.0, 0.5, -0.5, 0.25, -1.0], np.float32)
    body = ref.tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    data = b"RIFF" + struct.pack("<I", 4 + 24 + 8 + len(body)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", len(body)) + body
    x, rate = decode_wav(data)
    np.testing.assert_array_equal(x, ref)
    assert rate == 16000
    # 24-bit PCM: [1, -1, 2^22] as little-endian 3-byte integers
    ints = [1, -1, 2**22]
    raw = b"".join(struct.pack("<i", i)[:3] for i in ints)
    x24, _ = decode_wav(_wav(np.frombuffer(raw, np.uint8), 8000, 1, 3))
    np.testing.assert_allclose(x24, np.array(ints) / 2**23, atol=1e-9)
    x8, _ = decode_wav(_wav(np.array([128, 255, 0], np.uint8), 8000, 1, 1))
    np.testing.assert_allclose(x8, [0.0, 127 / 128, -1.0])
    # WAVE_FORMAT_EXTENSIBLE carrying PCM, and a streamed data size of 0 (as espeak-ng writes)
    ext = struct.pack("<HHIIHH", 0xFFFE, 1, 16000, 32000, 2, 16) + struct.pack("<HHI", 22, 16, 4) \
        + struct.pack("<H", 1) + b"\x00" * 14
    pcm = np.array([1000, -2000], "<i2").tobytes()
    data = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", len(ext)) + ext \
        + b"data" + struct.pack("<I", 0) + pcm
    np.testing.assert_allclose(decode_wav(data)[0], [1000 / 32768, -2000 / 32768])


@pytest.mark.parametrize("data", [b"", b"RIFX....WAVE", b"RIFF\x00\x00\x00\x00WAVEjunk",
                                  _wav(np.zeros(4, np.uint8), 8000, 1, 1)[:36]])
def test_bad_wav_is_a_clear_invalid_request(data):
    with pytest.raises(InvalidRequest, match="WAV"):
        decode_wav(data)


@pytest.mark.parametrize(("orig", "freq"), [(22050, 440.0), (44100, 3000.0), (8000, 1000.0), (48000, 5000.0)])
def test_resampling_keeps_the_tone_and_the_length(orig, freq):
    t = torch.arange(orig * 2, dtype=torch.float64) / orig
    x = torch.sin(2 * math.pi * freq * t).float()
    y = resample(x, orig, 16000)
    assert y.shape[0] == math.ceil(16000 * x.shape[0] / orig)
    t2 = torch.arange(y.shape[0], dtype=torch.float64) / 16000
    expected = torch.sin(2 * math.pi * freq * t2).float()
    middle = slice(400, -400)  # away from the zero-padded edges
    assert (y[middle] - expected[middle]).abs().max() < 0.02


def test_resampling_removes_what_16khz_cannot_hold():
    t = torch.arange(44100, dtype=torch.float64) / 44100
    y = resample(torch.sin(2 * math.pi * 12000 * t).float(), 44100, 16000)  # above the 8 kHz Nyquist
    assert y[400:-400].abs().max() < 0.02


def test_waveform_inputs_are_checked():
    with pytest.raises(InvalidRequest, match="empty"):
        to_waveform([])
    with pytest.raises(InvalidRequest, match="NaN"):
        to_waveform([0.0, float("nan")])
    with pytest.raises(InvalidRequest, match="sample_rate"):
        to_waveform([0.0, 1.0], 10)
    with pytest.raises(InvalidRequest, match="1-D"):
        to_waveform(np.zeros((2, 3, 4)))
    stereo = np.stack([np.ones(100), -np.ones(100)]).astype(np.float32)
    assert to_waveform(stereo).abs().max() == 0


# -- model and decoding against transformers --------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_whisper", "tiny_whisper_multilingual"])
def test_logits_match_transformers_full_and_through_the_cache(fixture, request):
    folder = request.getfixturevalue(fixture)
    lm = _load(folder)
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    mel = log_mel(_noise(4.0))[None]
    c = lm.model.config
    ids = torch.tensor([[c.decoder_start_token_id, c.no_timestamps_token_id, 30, 41, 52, 63]])
    with torch.no_grad():
        out = ref(input_features=mel, decoder_input_ids=ids)
        expected = out.logits[0]
        encoded = lm.model.encode(mel)
    torch.testing.assert_close(encoded, out.encoder_last_hidden_state, atol=1e-4, rtol=0)
    cache = lm.model.new_cache(encoded, 16)
    torch.testing.assert_close(lm.model.decode(ids, cache, last_only=False)[0], expected, atol=1e-4, rtol=0)
    cache = lm.model.new_cache(encoded, 16)
    steps = [lm.model.decode(ids[:, i:i + 1], cache)[0] for i in range(2)]
    rest = lm.model.decode(ids[:, 2:], cache, last_only=False)[0]  # a chunk after cached tokens
    torch.testing.assert_close(torch.cat([torch.stack(steps), rest]), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_identical_to_transformers_generate(tiny_whisper):
    lm = _load(tiny_whisper)
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_whisper, dtype=torch.float32).eval()
    for seed in range(3):
        mel = log_mel(_noise(3.0 + 5 * seed, seed=seed))
        ours = decode_window(lm, mel, SpeechParams(max_new_tokens=30))["tokens"]
        with torch.no_grad():
            theirs = ref.generate(mel[None], max_new_tokens=30)[0].tolist()
        theirs = [t for t in theirs if t not in (lm.model.config.decoder_start_token_id,
                                                 lm.model.config.no_timestamps_token_id)]
        if lm.model.config.eos_token_id in theirs:
            theirs = theirs[: theirs.index(lm.model.config.eos_token_id)]
        assert len(ours) >= 5
        assert ours == theirs[: len(ours)] and (len(ours) == 30 or len(theirs) == len(ours))


def test_multilingual_language_and_task_tokens_match_transformers(tiny_whisper_multilingual):
    folder = tiny_whisper_multilingual
    lm = _load(folder)
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    mel = log_mel(_noise(6.0, seed=5))
    c = lm.model.config
    for language, task in (("de", "transcribe"), ("fr", "translate")):
        sp = SpeechParams(language=language, task=task, max_new_tokens=20)
        assert prompt_tokens(lm, sp, language) == [c.decoder_start_token_id, c.lang_to_id[f"<|{language}|>"],
                                                   c.task_to_id[task], c.no_timestamps_token_id]
        ours = decode_window(lm, mel, sp)["tokens"]
        with torch.no_grad():
            theirs = ref.generate(mel[None], max_new_tokens=20, language=language, task=task)[0].tolist()
        theirs = [t for t in theirs if t < c.eos_token_id or t > c.no_timestamps_token_id]
        assert ours == theirs[: len(ours)] and len(ours) >= 5
    # no language given: detected from the first decoder step, as transformers does
    detected = decode_window(lm, mel, SpeechParams(max_new_tokens=5))["language"]
    with torch.no_grad():
        lang_ids = ref.detect_language(mel[None])
    assert c.lang_to_id[f"<|{detected}|>"] == int(lang_ids[0])


def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well(tiny_whisper):
    lm = _load(tiny_whisper)
    mel = log_mel(_noise(5.0, seed=3))
    greedy = decode_window(lm, mel, SpeechParams(max_new_tokens=12))
    assert decode_window(lm, mel, SpeechParams(max_new_tokens=12, beam_size=1)) == greedy
    beam = decode_window(lm, mel, SpeechParams(max_new_tokens=12, beam_size=4))
    assert len(beam["tokens"]) >= 1
    # the greedy path is one of the beam's candidates; the beam keeps the better mean log-probability
    assert beam["logprob"] / (len(beam["tokens"]) + 1) >= greedy["logprob"] / (len(greedy["tokens"]) + 1) - 1e-4


def test_timestamp_grammar(tiny_whisper):
    lm = _load(tiny_whisper)
    tb = lm.model.config.timestamp_begin
    for seed in range(3):
        out = decode_window(lm, log_mel(_noise(8.0, seed=seed)), SpeechParams(timestamps=True, max_new_tokens=40))
        tokens = out["tokens"]
        assert tokens and tokens[0] >= tb and tokens[0] - tb <= 50  # opens with an early timestamp
        stamps = [t for t in tokens if t >= tb]
        assert stamps == sorted(stamps)  # time never goes back
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
            assert not (a >= tb and b >= tb and c >= tb)  # at most a closing and an opening in a row
        assert lm.model.config.no_timestamps_token_id not in tokens


def test_windows_are_cut_in_silence():
    rate = 16000
    speech = _noise(4.0).numpy()
    gap = np.zeros(int(0.5 * rate), np.float32)
    wave_ = torch.from_numpy(np.concatenate([speech, gap] * 16))  # 72 s
    windows = cut_windows(wave_)
    assert windows[0][0] == 0 and windows[-1][1] == wave_.shape[0]
    for (a, b), (c, _) in itertools.pairwise(windows):
        assert b == c and b - a <= 30 * rate
        assert wave_[b - 200:b + 200].abs().max() == 0  # inside a pause
    assert len(windows) == 3


# -- models on disk ---------------------------------------------------------------------------------


def test_null_suppress_tokens_read_as_none(tmp_path):
    from .tiny import make_whisper

    folder = make_whisper(tmp_path / "w", null_suppress=True)
    assert json.loads((folder / "generation_config.json").read_text())["suppress_tokens"] is None
    assert inspect_model(ModelSource("w", str(folder))).config.suppress_tokens == ()


@pytest.mark.parametrize("half", [True, False])
def test_ctranslate2_model_converts_to_hf_layout(tiny_whisper, tmp_path, half, monkeypatch):
    from .tiny import write_ctranslate2_whisper

    ct2 = write_ctranslate2_whisper(tiny_whisper, tmp_path / "ct2", half=half)
    spec, variables = read_ctranslate2(ct2 / "model.bin")
    assert spec == "WhisperSpec" and variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    out = convert_ctranslate2_whisper(ct2, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert isinstance(config["suppress_tokens"], list) and config["suppress_tokens"]  # candle needs a list
    assert gen["suppress_tokens"] == config["suppress_tokens"] and gen["no_timestamps_token_id"] is not None
    mel = log_mel(_noise(3.0))[None]
    ids = torch.tensor([[config["decoder_start_token_id"], gen["no_timestamps_token_id"], 40, 50]])
    original = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_whisper, dtype=torch.float32)
    converted = transformers.WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a = original.eval()(input_features=mel, decoder_input_ids=ids).logits
        b = converted.eval()(input_features=mel, decoder_input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=0.05 if half else 1e-5, rtol=0)
    # our store converts a CTranslate2 folder on first use, into the cache, once
    monkeypatch.setenv("EDGECOMPUTE_ML_CACHE", str(tmp_path / "cache"))
    plan = inspect_model(ModelSource("w", str(ct2)))
    assert plan.family.name == "whisper" and plan.source.path.startswith(str(tmp_path / "cache"))
    made = (tmp_path / "cache").stat().st_mtime_ns, len(list((tmp_path / "cache").iterdir()))
    assert inspect_model(ModelSource("w", str(ct2))).source.path == plan.source.path
    assert ((tmp_path / "cache").stat().st_mtime_ns, len(list((tmp_path / "cache").iterdir()))) == made
    lm = load_model(plan, "float32", "cpu")
    ours = lm.model.decode(ids, lm.model.new_cache(lm.model.encode(mel), 8), last_only=False)
    torch.testing.assert_close(ours, b, atol=1e-4, rtol=0)


def test_corrupt_ctranslate2_file_is_a_model_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 6) + b"\x05\x00Whis")
    with pytest.raises(ModelError, match="truncated|corrupt"):
        read_ctranslate2(tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5))
    with pytest.raises(ModelError, match="version 5"):
        read_ctranslate2(tmp_path / "model.bin")


def test_word_error_rate():
    assert word_error_rate("The cat sat.", "the cat sat") == 0
    assert word_error_rate("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert word_error_rate("a b", "a x b y") == 1.0


# -- the executor task ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_speech_recognition_through_the_scheduler(executor_for, tiny_whisper):
    executor = executor_for(models={"whisper": str(tiny_whisper)})
    audio = _noise(3.0, seed=4)
    lm = _load(tiny_whisper)
    expected = transcribe(lm, audio.numpy(), SpeechParams(max_new_tokens=10))
    pcm = (audio.clamp(-1, 1) * 32767).round().numpy().astype("<i2")
    async with scheduler_for(executor) as s:
        floats = await s.run("ml/speech-recognition", audio.tolist(), params={"model": "whisper", "max_new_tokens": 10})
        assert floats.outputs["text"] == expected["text"] and floats.outputs["duration"] == 3.0
        assert "transcribe" in floats.timings
        # WAV bytes at 8 kHz: decoded and resampled to 16 kHz
        wav = await s.run("ml/speech-recognition", _wav(pcm[::2].copy(), 8000),
                          params={"model": "whisper", "max_new_tokens": 10})
        assert wav.outputs["duration"] == 3.0
        mapping = await s.run("ml/speech-recognition", {"audio": audio[::2].tolist(), "sample_rate": 8000},
                              params={"model": "whisper", "max_new_tokens": 10, "timestamps": True})
        assert "segments" in mapping.outputs
        for inputs, params, match in [
            ("hello", {}, "WAV bytes or an array"),
            (audio.tolist(), {"beam": 2}, "unknown parameter"),
            (audio.tolist(), {"beam_size": 0}, "beam_size"),
            (audio.tolist(), {"language": "de"}, "English-only"),
            (audio.tolist(), {"task": "summarize"}, "task"),
            (b"not a wav", {}, "WAV"),
            ({"samples": [0.0]}, {}, "audio"),
        ]:
            with pytest.raises(InvalidRequest, match=match):
                await s.run("ml/speech-recognition", inputs, params={"model": "whisper", **params})
        with pytest.raises(InvalidRequest, match="serves ml/speech-recognition"):
            await s.run("ml/embeddings", "hello", params={"model": "whisper"})


def test_executor_and_decoder_accept_the_same_parameters():
    from edgecompute_ml._tasks.transcribe import SPEECH_KEYS
    from edgecompute_ml.executor import SPEECH_KEYS as EXECUTOR_SPEECH_KEYS

    assert EXECUTOR_SPEECH_KEYS == SPEECH_KEYS


def test_int8_weights_run_close_to_float32(tiny_whisper):
    """``dtype = "int8"``: every linear weight and the token embedding int8 per row (the conv front
    end and positions stay float), the encoder's long products through a float GEMM of the
    dequantised weight, the decoder's through the packed kernel; logits within 3% (relative norm)."""
    from edgecompute_ml._formats import quant
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model

    full = _load(tiny_whisper)
    int8 = load_model(inspect_model(ModelSource("w", str(tiny_whisper), "int8")), "float32", "cpu")
    assert int8.quantization == "int8" and int8.bytes < full.bytes / 1.8  # positions (1500 x 64) stay float
    assert isinstance(int8.model.w["model.encoder.layers.0.fc1.weight"], quant.QuantizedLinear)
    mel = log_mel(_noise(4.0))[None]
    c = full.model.config
    ids = torch.tensor([[c.decoder_start_token_id, c.no_timestamps_token_id, 30, 41, 52, 63]])
    got, expected = [], []
    for lm, out in ((int8, got), (full, expected)):
        encoded = lm.model.encode(mel)
        out.append(encoded)
        cache = lm.model.new_cache(encoded, 16)
        out.append(torch.cat([lm.model.decode(ids[:, :2], cache, last_only=False)[0],
                              torch.stack([lm.model.decode(ids[:, i:i + 1], cache)[0] for i in range(2, 6)])]))
    for a, b in zip(got, expected, strict=True):
        assert float((a - b).norm() / b.norm()) < 0.03
