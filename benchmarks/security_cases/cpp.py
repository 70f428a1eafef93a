"""Hostile requests to the ``cpp`` executor (issue 15, cpp rows); see ``__init__.py`` for ``Case``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgecompute.models import Request

from . import Case


def _blur() -> Request:
    return Request("cpp/gaussian_blur", np.random.default_rng(0).random((256, 256), np.float32),
                   params={"sigma": 2})


def _huge_row() -> Request:
    # an output row of 4096 x 2^20 float32 elements: 16 GiB, 32-bit indices in the old code (SIGSEGV)
    return Request("cpp/resize", np.ones((1, 1, 4096), np.float32), params={"width": 1 << 20, "height": 1})


def _tiny_to_huge() -> Request:
    # 1 pixel to 20000 x 20000: 7.8 GB allocated from a 133-byte request in the old code
    return Request("cpp/resize", np.ones((1, 1), np.float32), params={"width": 20000, "height": 20000})


def _fir_misnamed() -> Request:
    # the old code filtered the taps with themselves
    return Request("cpp/fir_filter", {"taps": np.ones(3), "x": np.arange(16.0)})


def _typo_param() -> Request:
    return Request("cpp/gaussian_blur", np.zeros((64, 64), np.float32), params={"sigam": 5})


def _extra_input() -> Request:
    image = np.zeros((64, 64), np.float32)
    return Request("cpp/gaussian_blur", {"image": image, "mask": image})


def _nine_dims() -> Request:
    return Request("cpp/sum", np.zeros((1,) * 9, np.float32))


def _quadratic_blur() -> Request:
    # radius 100,000 over a 2000 x 2000 image: ~8e11 multiply-adds, hours of native work
    return Request("cpp/gaussian_blur", np.zeros((2000, 2000), np.float32), params={"sigma": 1000, "truncate": 100})


def _quadratic_fir() -> Request:
    # 1M samples x 1M taps: 1e12 multiply-adds
    return Request("cpp/fir_filter", {"signal": np.zeros(1 << 20, np.float32), "taps": np.zeros(1 << 20, np.float32)})


def _long_fft() -> Request:
    # 2^24 + 1 = 97 x 257 x 673 points: a Bluestein plan of 2^26 points (GBs of tables)
    return Request("cpp/fft", np.zeros((1 << 24) + 1, np.float32))


def _nan_size() -> Request:
    return Request("cpp/resize", np.zeros((4, 4), np.float32), params={"width": float("nan"), "height": 4})


def _object_array() -> Request:
    return Request("cpp/sum", np.array([object(), object()]))


def _empty_resize() -> Request:
    return Request("cpp/resize", np.zeros((0, 4), np.float32), params={"width": 4, "height": 4})


def _blur_ok(outputs: Any) -> str | None:
    return None if getattr(outputs, "shape", None) == (256, 256) else f"unexpected output {outputs!r:.80}"


def cases(tmp: Path) -> list[Case]:
    def case(name: str, attack: Any, expect: str | None = "InvalidRequest", **extra: Any) -> Case:
        return Case(name=f"cpp: {name}", executor="cpp", attack=attack, normal=_blur, expect=expect, **extra)

    return [
        case("normal blur (baseline)", _blur, None, check=_blur_ok),
        case("resize to a row of 2^32 elements (host SIGSEGV before)", _huge_row),
        case("resize 1x1 to 20000x20000 (7.8 GB before)", _tiny_to_huge),
        case("fir_filter with an unknown input name", _fir_misnamed),
        case("unknown param 'sigam'", _typo_param),
        case("a second, unknown input", _extra_input),
        case("a 9-D array (bare IndexError before)", _nine_dims),
        case("blur radius 100000 (quadratic work)", _quadratic_blur),
        case("fir_filter 1M x 1M taps (quadratic work)", _quadratic_fir),
        case("fft of 2^24 + 1 points (Bluestein tables)", _long_fft),
        case("NaN width", _nan_size),
        case("object array", _object_array),
        case("zero-size image to resize", _empty_resize),
        case("resize refused in process isolation too", _tiny_to_huge, config={"isolation": "process", "workers": 1}),
    ]
