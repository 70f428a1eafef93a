"""Hostile requests against the ``ml`` executor (issue 15); see ``__init__.py`` for ``Case``.

The cases use the demo packages' pretrained models (all-MiniLM-L6-v2, SmolLM2-135M, torchvision's
MobileNetV2, Whisper tiny.en); a case whose model is not installed is left out.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from edgecompute.models import Request

from . import Case


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """Only a header declaring ``width`` x ``height``: what a decompression bomb opens with."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _wav(seconds: float, rate: int = 16000) -> bytes:
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


def _bad_config_folder(tmp: Path, minilm: str, **changes: Any) -> Path:
    """all-MiniLM-L6-v2 with a config.json a model author got wrong (weights linked, not copied)."""
    folder = tmp / "minilm_bad_config"
    folder.mkdir(parents=True, exist_ok=True)
    for item in Path(minilm).iterdir():
        target = folder / item.name
        if item.name != "config.json" and not target.exists():
            target.symlink_to(item)
    config = json.loads((Path(minilm) / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def cases(tmp: Path) -> list[Case]:
    from edgecompute_ml.executor import demo_model_paths

    found = demo_model_paths()
    out: list[Case] = []

    def emb(texts: Any, **params: Any) -> Request:
        return Request("ml/embeddings", texts, params={"model": "all-minilm-l6-v2", **params})

    if "mobilenet-v2" in found:
        def classify() -> Request:
            return Request("ml/image-classification", _png(64, 48), params={"model": "mobilenet-v2"})

        out += [
            # resized so that the short side is 256: 256 x 1,024,000 (2.5 GB) before the fix
            Case("ml: 96-byte 1x4000 PNG resized to 256x1024000", "ml",
                 lambda: Request("ml/image-classification", _png(1, 4000), params={"model": "mobilenet-v2"}),
                 classify, "InvalidImage"),
            Case("ml: PNG header declaring 100000x100000 pixels", "ml",
                 lambda: Request("ml/image-classification", _declared_png(100_000, 100_000),
                                 params={"model": "mobilenet-v2"}),
                 classify, "InvalidImage"),
            Case("ml: 10000 images in one request", "ml",
                 lambda: Request("ml/image-classification", [_png(8, 8)] * 10_000, params={"model": "mobilenet-v2"}),
                 classify, "InvalidRequest"),
        ]
    if "all-minilm-l6-v2" in found:
        minilm = found["all-minilm-l6-v2"]
        out += [
            Case("ml: embeddings of 100000 texts", "ml", lambda: emb(["a"] * 100_000), lambda: emb(["a b"]),
                 "InvalidRequest"),
            Case("ml: embeddings of one 50 MB text", "ml", lambda: emb("a " * 25_000_000), lambda: emb(["a b"]),
                 "InvalidRequest", memory_limit_mb=512),
            Case("ml: embeddings input with an unknown key", "ml", lambda: emb({"texts": ["a"], "path": "/etc"}),
                 lambda: emb(["a b"]), "InvalidRequest"),
            Case("ml: model config num_hidden_layers: true", "ml",
                 lambda: Request("ml/embeddings", ["a"], params={"model": "bad"}), lambda: emb(["a b"]),
                 "InvalidModelConfig",
                 config={"models": {"bad": str(_bad_config_folder(tmp, minilm, num_hidden_layers=True))}}),
        ]
    if "smollm2-135m-instruct" in found:
        def gen(inputs: Any = "Hi", **params: Any) -> Request:
            return Request("ml/text-generation", inputs,
                           params={"model": "smollm2-135m-instruct", "max_new_tokens": 4, **params})

        out += [
            Case("ml: max_new_tokens 1000000", "ml", lambda: gen(max_new_tokens=1_000_000), gen, "InvalidRequest"),
            Case("ml: temperature NaN", "ml", lambda: gen(temperature=float("nan")), gen, "InvalidRequest"),
            Case("ml: prompt of 10 M characters", "ml", lambda: gen("a" * 10_000_000), gen, "InvalidRequest"),
            Case("ml: 100000 stop strings", "ml", lambda: gen(stop=["x"] * 100_000), gen, "InvalidRequest"),
        ]
    if "whisper-tiny-en" in found:
        def speech(audio: Any = None, **params: Any) -> Request:
            return Request("ml/speech-recognition", _wav(1.0) if audio is None else audio,
                           params={"model": "whisper-tiny-en", "max_new_tokens": 8, **params})

        out += [
            # 16001 Hz shares no factor with 16 kHz: a 16000 x 16013-tap resampling kernel (2 GB)
            Case("ml: speech at 16001 Hz", "ml", lambda: speech([0.0] * 16001, sample_rate=16001), speech,
                 "AudioError"),
            Case("ml: speech longer than max_audio_seconds", "ml", lambda: speech(_wav(20.0)), speech,
                 "AudioError", config={"max_audio_seconds": 10}),
            Case("ml: speech max_new_tokens 1000000", "ml", lambda: speech(max_new_tokens=1_000_000), speech,
                 "InvalidRequest"),
        ]
    return out
