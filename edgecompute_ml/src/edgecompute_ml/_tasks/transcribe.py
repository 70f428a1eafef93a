"""Speech recognition with a Whisper model: windows, decoding and text.

Audio longer than 30 s is cut into windows at the quietest moment of the last seconds before each
30 s boundary (so that no word is split), and each window is decoded on its own. Decoding is
greedy or a beam search, starts from the start-of-transcript, language and task tokens, applies
the checkpoint's token suppression, and with ``timestamps`` follows Whisper's timestamp rules
(pairs, non-decreasing, a timestamp first) to return segments with times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from .._preprocessing.audio import SAMPLE_RATE, check_rate, log_mel, to_waveform
from ..errors import AudioError, InvalidRequest

__all__ = ["SpeechParams", "cut_windows", "decode_window", "prompt_tokens", "transcribe"]

SPEECH_KEYS = {"model", "language", "task", "beam_size", "timestamps", "max_new_tokens", "sample_rate"}
WINDOW = 30 * SAMPLE_RATE
SECONDS_PER_TIMESTAMP = 0.02


@attrs.frozen
class SpeechParams:
    language: str | None = None  # None: English for .en models, detected for multilingual ones
    task: str = "transcribe"
    beam_size: int = 1
    timestamps: bool = False
    max_new_tokens: int = 224  # openai/whisper's sample_len: half the decoder context
    sample_rate: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SpeechParams:
        task = params.get("task", "transcribe")
        if task not in ("transcribe", "translate"):
            raise InvalidRequest(f"task must be 'transcribe' or 'translate', not {task!r}")
        language = params.get("language")
        if language is not None and not isinstance(language, str):
            raise InvalidRequest(f"language must be a language code such as 'en', not {language!r}")
        beam = params.get("beam_size", 1)
        if not isinstance(beam, int) or isinstance(beam, bool) or not 1 <= beam <= 16:
            raise InvalidRequest(f"beam_size must be an integer from 1 to 16, not {beam!r}")
        ts = params.get("timestamps", False)
        if not isinstance(ts, bool):
            raise InvalidRequest(f"timestamps must be true or false, not {ts!r}")
        n = params.get("max_new_tokens", 224)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequest(f"max_new_tokens must be an integer >= 1, not {n!r}")
        rate = params.get("sample_rate")
        if rate is not None:
            check_rate(rate)
        return cls(language.lower().strip("<|>") if language else None, task, beam, ts, n, rate)


def _special(lm: Any, text: str) -> int | None:
    value = lm.tokenizer.token_to_id(text)
    return None if value is None else int(value)


def prompt_tokens(lm: Any, params: SpeechParams, language: str | None) -> list[int]:
    """The start of the decoder input: <|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]."""
    c = lm.model.config
    ids = [c.decoder_start_token_id]
    if c.is_multilingual:
        lang = _special(lm, f"<|{language}|>") if language else None
        if lang is None:
            raise InvalidRequest(f"language {language!r} is not one this model knows "
                                 f"({', '.join(k.strip('<|>') for k in sorted(c.lang_to_id)) or 'none listed'})")
        task = c.task_to_id.get(params.task, _special(lm, f"<|{params.task}|>"))
        if task is None:
            raise InvalidRequest(f"model {lm.name!r} has no <|{params.task}|> token")
        ids += [lang, int(task)]
    else:
        if language not in (None, "en"):
            raise InvalidRequest(f"model {lm.name!r} is English-only; it cannot transcribe language {language!r}")
        if params.task == "translate":
            raise InvalidRequest(f"model {lm.name!r} is English-only; it cannot translate")
    if not params.timestamps and c.no_timestamps_token_id is not None:
        ids.append(c.no_timestamps_token_id)
    return ids


def detect_language(lm: Any, cache: Any) -> str:
    """The most likely language token after <|startoftranscript|> (multilingual models)."""
    c = lm.model.config
    logits = lm.model.decode(torch.tensor([[c.decoder_start_token_id]]), cache)[0]
    ids: dict[int, str] = {int(v): k.strip("<|>") for k, v in c.lang_to_id.items()}
    if not ids:
        raise InvalidRequest(f"model {lm.name!r} lists no languages (lang_to_id); pass params={{'language': ...}}")
    index = torch.tensor(sorted(ids), device=logits.device)
    return ids[int(index[logits[index].argmax()])]


class _Rules:
    """Logit rules: suppression, and Whisper's timestamp grammar when timestamps are on."""

    def __init__(self, lm: Any, params: SpeechParams, prompt_len: int, device: torch.device) -> None:
        c = lm.model.config
        vocab = c.vocab_size
        self.prompt_len = prompt_len
        self.eot = c.eos_token_id
        self.suppress = torch.zeros(vocab, dtype=torch.bool)
        self.suppress[[t for t in c.suppress_tokens if t < vocab]] = True
        self.begin = [t for t in c.begin_suppress_tokens if t < vocab]
        self.ts_begin = c.timestamp_begin if params.timestamps else None
        if self.ts_begin is not None:
            self.suppress[c.no_timestamps_token_id] = True
            self.max_initial = c.max_initial_timestamp_index
        self.suppress = self.suppress.to(device)

    def apply(self, logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        """``logits [rows, vocab]`` with forbidden tokens at -inf, for rows that generated ``generated``."""
        logits = logits.masked_fill(self.suppress, float("-inf"))
        if not generated[0] and self.begin:
            logits[:, self.begin] = float("-inf")
        tb = self.ts_begin
        if tb is None:
            return logits
        for row, seq in enumerate(generated):
            x = logits[row]
            if not seq:  # a segment opens with a timestamp, not too late in the window
                x[:tb] = float("-inf")
                x[tb + self.max_initial + 1:] = float("-inf")
                continue
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penult_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penult_ts:  # a closed pair: text (or the end) comes next
                    x[tb:] = float("-inf")
                else:  # an opening timestamp after text: the closing one (or the end) comes next
                    x[: self.eot] = float("-inf")
            stamps = [t for t in seq if t >= tb]
            if stamps:  # times never go back; a closing timestamp may not repeat the opening one
                floor = stamps[-1] if last_ts and not penult_ts else stamps[-1] + 1
                x[tb:floor] = float("-inf")
            logprobs = torch.log_softmax(x, -1)
            if torch.logsumexp(logprobs[tb:], -1) > logprobs[:tb].max():
                x[:tb] = float("-inf")  # time is more likely than any word
        return logits


@torch.inference_mode()
def decode_window(lm: Any, mel: torch.Tensor, params: SpeechParams, *,
                  cancelled: Callable[[], bool] | None = None, max_seconds: float | None = None) -> dict[str, Any]:
    """Decode one window's features ``[n_mels, 3000]``: generated tokens, language and score."""
    model = lm.model
    c = model.config
    encoded = model.encode(mel[None])
    prompt_len_max = 4
    cache = model.new_cache(encoded, min(c.max_target_positions, prompt_len_max + params.max_new_tokens))
    language = params.language
    if c.is_multilingual and language is None:
        language = detect_language(lm, cache)
        cache.length = 0
    prompt = prompt_tokens(lm, params, language)
    limit = min(params.max_new_tokens, cache.capacity - len(prompt))
    rules = _Rules(lm, params, len(prompt), model.device)
    logits = model.decode(torch.tensor([prompt]), cache)
    if params.beam_size == 1:
        tokens: list[int] = []
        logprob = 0.0
        for _ in range(limit):
            if cancelled is not None and cancelled():
                break
            scores = torch.log_softmax(rules.apply(logits, [tokens]), -1)
            token = int(scores[0].argmax())
            logprob += float(scores[0, token])
            if token == c.eos_token_id:
                break
            tokens.append(token)
            logits = model.decode(torch.tensor([[token]]), cache)
        return {"tokens": tokens, "language": language or "en", "logprob": logprob}
    return _beam(lm, cache, logits, rules, params.beam_size, limit, language or "en", cancelled)


def _beam(lm: Any, cache: Any, logits: torch.Tensor, rules: _Rules, beam: int, limit: int, language: str,
          cancelled: Callable[[], bool] | None) -> dict[str, Any]:
    """Beam search over ``beam`` rows; finished hypotheses are ranked by mean log-probability."""
    eot = lm.model.config.eos_token_id
    alive: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(limit):
        if cancelled is not None and cancelled():
            break
        scores = torch.log_softmax(rules.apply(logits, [seq for seq, _ in alive]), -1)
        total = scores + torch.tensor([s for _, s in alive], device=scores.device)[:, None]
        values, flat = total.flatten().topk(min(2 * beam, total.numel()))
        keep: list[tuple[list[int], float]] = []
        rows: list[int] = []
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            if value == float("-inf"):
                break
            row, token = divmod(index, total.shape[1])
            seq = alive[row][0]
            if token == eot:
                finished.append((seq, value))
            else:
                keep.append(([*seq, token], value))
                rows.append(row)
            if len(keep) == beam:
                break
        if len(finished) >= beam or not keep:
            break
        if len(alive) == 1 and len(keep) > 1:
            cache.expand(len(keep))
        cache.reorder(torch.tensor(rows, device=scores.device))
        alive = keep
        if cache.length >= cache.capacity:
            break
        logits = lm.model.decode(torch.tensor([[seq[-1]] for seq, _ in alive]), cache)
    pool = finished or alive
    seq, score = max(pool, key=lambda h: h[1] / max(1, len(h[0]) + 1))
    return {"tokens": seq, "language": language, "logprob": score}


def cut_windows(wave: torch.Tensor, *, window: int = WINDOW, search: int = 5 * SAMPLE_RATE,
                frame: int = 400) -> list[tuple[int, int]]:
    """Sample ranges of at most ``window`` covering ``wave``, each cut (but the last) at the quietest
    ``frame`` in its last ``search`` samples."""
    n = int(wave.shape[-1])
    out, start = [], 0
    while n - start > window:
        lo, hi = start + window - search, start + window
        energy = wave[lo:hi].unfold(0, frame, frame // 2).pow(2).mean(1)
        # quiet over ~0.3 s, not one frame: a stop consonant inside a word is silent for a frame too
        span = min(15, int(energy.shape[0]))
        smooth = torch.nn.functional.avg_pool1d(energy[None, None], span, 1)[0, 0]
        cut = lo + (int(smooth.argmin()) + span // 2) * (frame // 2) + frame // 2
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out


def _text(lm: Any, tokens: list[int]) -> str:
    eot = lm.model.config.eos_token_id
    return str(lm.tokenizer.decode([t for t in tokens if t < eot])).strip()


def _segments(lm: Any, tokens: list[int], offset: float) -> list[dict[str, Any]]:
    tb = lm.model.config.timestamp_begin
    segments: list[dict[str, Any]] = []
    start: float | None = None
    text: list[int] = []
    for t in tokens:
        if t >= tb:
            at = offset + (t - tb) * SECONDS_PER_TIMESTAMP
            if start is None:
                start = at
            else:
                segments.append({"start": round(start, 2), "end": round(at, 2), "text": _text(lm, text)})
                start, text = None, []
        else:
            text.append(t)
    if text:  # an unclosed last segment (the window ended mid-speech)
        segments.append({"start": round(start if start is not None else offset, 2), "end": None,
                         "text": _text(lm, text)})
    return segments


def transcribe(lm: Any, audio: Any, params: SpeechParams, *,
               cancelled: Callable[[], bool] | None = None, max_seconds: float | None = None) -> dict[str, Any]:
    """Transcribe ``audio`` (WAV bytes or samples at ``params.sample_rate``) with a loaded Whisper.

    Returns ``text``, ``language``, ``windows`` (start, end, text of each 30 s window) and, with
    ``timestamps``, ``segments`` (start and end in seconds, text), plus ``timings``.
    """
    started = time.perf_counter()
    wave = to_waveform(audio, params.sample_rate, max_seconds)
    n_mels = lm.model.config.num_mel_bins
    features = time.perf_counter() - started
    windows, texts, segments, tokens = [], [], [], []
    language = params.language or "en"
    for index, (lo, hi) in enumerate(cut_windows(wave)):
        if cancelled is not None and cancelled():
            break
        t0 = time.perf_counter()
        mel = log_mel(wave[lo:hi].to(lm.model.device), n_mels)
        features += time.perf_counter() - t0
        out = decode_window(lm, mel, params if index == 0 or params.language else
                            attrs.evolve(params, language=language), cancelled=cancelled)
        language = out["language"]
        text = _text(lm, out["tokens"])
        windows.append({"start": round(lo / SAMPLE_RATE, 2), "end": round(hi / SAMPLE_RATE, 2), "text": text})
        if text:
            texts.append(text)
        tokens.extend(out["tokens"])
        if params.timestamps:
            segments.extend(_segments(lm, out["tokens"], lo / SAMPLE_RATE))
    result: dict[str, Any] = {"text": " ".join(texts), "language": language, "windows": windows,
                              "duration": round(wave.shape[-1] / SAMPLE_RATE, 3)}
    if params.timestamps:
        result["segments"] = segments
    result["timings"] = {"features": features, "transcribe": time.perf_counter() - started}
    return result


def speech_inputs(inputs: Any, params: Mapping[str, Any]) -> tuple[Any, SpeechParams]:
    """The audio and decoding parameters of an ``ml/speech-recognition`` request.

    ``inputs``: WAV bytes, an array of samples, or ``{"audio": ..., "sample_rate": N}``.
    """
    unknown = set(params) - SPEECH_KEYS
    if unknown:
        raise InvalidRequest(f"ml/speech-recognition: unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(sorted(SPEECH_KEYS))}")
    sp = SpeechParams.from_params(params)
    if isinstance(inputs, Mapping):
        if "audio" not in inputs:
            raise AudioError("ml/speech-recognition inputs as a mapping need an 'audio' entry")
        extra = set(inputs) - {"audio", "sample_rate"}
        if extra:
            raise AudioError(f"ml/speech-recognition inputs: unknown key(s) {', '.join(sorted(extra))}")
        if "sample_rate" in inputs:
            sp = SpeechParams.from_params({**params, "sample_rate": inputs["sample_rate"]})
        inputs = inputs["audio"]
    if inputs is None or isinstance(inputs, str):
        raise AudioError("ml/speech-recognition inputs must be WAV bytes or an array of samples "
                         "(with params sample_rate), not " + type(inputs).__name__)
    return inputs, sp
