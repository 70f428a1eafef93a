"""What ``edgecompute demo`` shows of the cpp executor: a few bundled algorithms on a 1080p image."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["run"]


def run(runtime: Any, echo: Callable[[str], None]) -> None:
    import numpy as np

    echo("\n   cpp: native C++17 algorithms, called in-process through cffi (no copies)")
    image = np.random.default_rng(0).random((1080, 1920), dtype=np.float32)
    for algorithm, params in (("gaussian_blur", {"sigma": 2.0}), ("sobel", {}),
                              ("resize", {"width": 960, "height": 540})):
        start = time.perf_counter()
        out = runtime.run(f"cpp/{algorithm}", image, params=params).outputs
        echo(f"   cpp/{algorithm:14} 1920x1080 float32 -> {out.shape} in {(time.perf_counter() - start) * 1e3:.1f} ms")
    signal = np.sin(np.linspace(0, 200 * np.pi, 4096))
    spectrum = runtime.run("cpp/fft", signal).outputs
    peak = int(np.argmax(np.abs(spectrum[:2048])))
    echo(f"   cpp/fft            4096 samples of a 100-cycle sine: peak at bin {peak}")
