"""Audio for speech recognition: WAV decoding, resampling and Whisper's log-mel features, in torch.

Whisper hears 16 kHz mono; its features are an 80-bin (128 for large-v3) Slaney mel spectrogram of
a 400-point STFT every 160 samples, log10, clamped to 8 below its maximum and scaled to about
[-1, 1], as openai/whisper and transformers' ``WhisperFeatureExtractor`` compute them.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AudioError

__all__ = ["SAMPLE_RATE", "decode_wav", "log_mel", "mel_filters", "resample", "to_waveform"]

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160


MAX_SAMPLE_RATE = 768_000
# the resampling kernel has (new rate) x (old rate) / gcd^2 taps: a rate sharing no factor with
# 16 kHz (16001 Hz) would build a kernel of gigabytes. Every common rate stays far below this.
_MAX_KERNEL = 1 << 20


def check_rate(rate: int, what: str = "sample_rate") -> None:
    """Refuse sample rates the resampler cannot handle in bounded memory, before decoding."""
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{what} must be an integer from 1000 to {MAX_SAMPLE_RATE} Hz, not {rate!r}")
    g = math.gcd(rate, SAMPLE_RATE)
    orig, new = rate // g, SAMPLE_RATE // g
    taps = new * (orig + 2 * math.ceil(6 * orig / (min(orig, new) * 0.99)))
    if taps > _MAX_KERNEL:
        raise AudioError(f"{what} {rate} Hz cannot be resampled to {SAMPLE_RATE} Hz in bounded memory (a "
                         f"{taps}-tap kernel, the limit is {_MAX_KERNEL}); resample the audio to a common rate "
                         "(8000, 16000, 22050, 44100, 48000 Hz...) first")


def check_duration(samples: int, rate: int, max_seconds: float | None) -> None:
    if max_seconds is not None and samples > max_seconds * rate:
        raise AudioError(f"audio of {samples / rate:.1f} s exceeds the limit of {max_seconds:g} s per request "
                         "(executors.ml max_audio_seconds); send it in parts")


def decode_wav(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file's samples as mono float32 in [-1, 1], and its sample rate.

    Reads PCM (8, 16, 24, 32 bit), IEEE float (32, 64 bit) and WAVE_FORMAT_EXTENSIBLE of either;
    channels are averaged. The rate and the duration (``max_seconds``) are checked from the
    header, before any sample is converted.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError("audio bytes are not a WAV file (no RIFF/WAVE header)")
    pos, fmt, samples = 12, None, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8:pos + 8 + size]
        if chunk == b"fmt ":
            if len(body) < 16:
                raise AudioError("WAV fmt chunk is truncated")
            fmt = struct.unpack_from("<HHIIHH", body)
            if fmt[0] == 0xFFFE and len(body) >= 26:  # extensible: the real format opens the sub-format GUID
                fmt = (struct.unpack_from("<H", body, 24)[0], *fmt[1:])
        elif chunk == b"data":
            # espeak-ng and other streaming writers leave the data size at 0 or 0xFFFFFFFF
            samples = data[pos + 8:] if size in (0, 0xFFFFFFFF) else body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise AudioError("WAV file has no fmt or data chunk")
    tag, channels, rate, _, _, bits = fmt
    if channels < 1 or rate < 1:
        raise AudioError(f"WAV file declares {channels} channels at {rate} Hz")
    check_rate(rate, "the WAV header's sample rate")
    width = bits // 8
    if width:
        check_duration(len(samples) // (width * channels), rate, max_seconds)
    usable = len(samples) // (width * channels) * width * channels if width else 0
    raw = samples[:usable]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    elif tag == 1 and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise AudioError(f"WAV format {tag} with {bits}-bit samples is not supported "
                         "(PCM 8/16/24/32 bit or IEEE float 32/64 bit)")
    return x.reshape(-1, channels).mean(axis=1), int(rate)


def resample(x: torch.Tensor, orig: int, new: int = SAMPLE_RATE, *, width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``x`` (``[..., time]``): a Hann-windowed sinc kernel per output
    phase, applied as one strided convolution after reducing the rate ratio by its gcd."""
    if orig == new:
        return x
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    reach = math.ceil(width * orig / base)
    idx = torch.arange(-reach, reach + orig, dtype=torch.float64)[None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx) * base
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1]).to(torch.float32)
    out = F.conv1d(F.pad(flat, (reach, reach + orig)), kernel[:, None].to(torch.float32), stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * shape[-1] / orig)]
    return out.reshape(*shape[:-1], -1)


def _array_samples(audio: Any) -> int | None:
    """How many samples an array input holds, from its shape or lengths (before converting it)."""
    shape = getattr(audio, "shape", None)
    if shape is not None:
        return math.prod(int(d) for d in shape)
    if isinstance(audio, (list, tuple)):
        first = audio[0] if audio else None
        return len(audio) * (len(first) if isinstance(first, (list, tuple)) else 1)
    return None


def to_waveform(audio: Any, sample_rate: int | None = None, max_seconds: float | None = None) -> torch.Tensor:
    """Mono 16 kHz float32 samples from WAV bytes or a float array (list, numpy, torch) with its
    ``sample_rate`` (16 kHz if not given). Audio longer than ``max_seconds`` is refused before
    it is decoded or converted."""
    if isinstance(audio, (bytes, bytearray, memoryview)):
        array, rate = decode_wav(bytes(audio), max_seconds)
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"sample_rate {sample_rate} contradicts the WAV header ({rate} Hz)")
        x = torch.from_numpy(array.copy())
    else:
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        check_rate(rate)
        count = _array_samples(audio)
        if count is not None:
            # a [channels, time] array holds channels x time samples: bounding all of them is enough
            check_duration(count, rate, max_seconds)
        try:
            x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not isinstance(audio, torch.Tensor) else audio)
        except (TypeError, ValueError) as exc:
            raise AudioError(f"audio must be WAV bytes or an array of samples: {exc}") from exc
        x = x.to(torch.float32)
        if x.dim() == 2:  # [channels, time] (the shorter side is the channels)
            x = x.mean(0) if x.shape[0] <= x.shape[1] else x.mean(1)
        if x.dim() != 1:
            raise AudioError(f"audio array must be 1-D (or [channels, time]), got shape {list(x.shape)}")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1000:
        raise AudioError(f"sample_rate must be an integer >= 1000 Hz, not {rate!r}")
    if x.numel() == 0:
        raise AudioError("audio is empty")
    if not bool(torch.isfinite(x).all()):
        raise AudioError("audio has NaN or infinite samples")
    return resample(x, rate, SAMPLE_RATE)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear below 1 kHz, logarithmic above
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27) * (m - 15.0)), m * (200.0 / 3))


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-normalised triangular mel filters ``[n_mels, n_fft // 2 + 1]`` from 0 Hz to Nyquist."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2)),
                                        n_mels + 2))
    diffs = np.diff(mel_points)
    ramps = mel_points[:, None] - freqs[None, :]
    lower = -ramps[:-2] / diffs[:-1, None]
    upper = ramps[2:] / diffs[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(audio: torch.Tensor, n_mels: int = 80, *, n_samples: int | None = 480_000) -> torch.Tensor:
    """Whisper's log-mel features ``[n_mels, frames]`` of 16 kHz samples, padded (or cut) to
    ``n_samples`` first (30 s: 3000 frames) unless it is None."""
    x = audio.to(torch.float32)
    if n_samples is not None:
        x = F.pad(x, (0, n_samples - x.shape[-1])) if x.shape[-1] < n_samples else x[..., :n_samples]
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = mel_filters(n_mels).to(x.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    floor = log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0
    return (torch.maximum(log_spec, floor) + 4.0) / 4.0
