"""The operator's limits on what one request may ask of the cpp executor (no numpy: read at construction)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgecompute.errors import ConfigError

__all__ = ["LIMITS", "Limits"]

_KiB, _MiB, _GiB = 1 << 10, 1 << 20, 1 << 30

#: name: (default, ceiling, what it bounds) -- the operator sets a value in [1, ceiling]
LIMITS: dict[str, tuple[int, int, str]] = {
    "max_input_bytes": (1 * _GiB, 64 * _GiB, "total bytes of one request's inputs"),
    "max_output_bytes": (256 * _MiB, 64 * _GiB, "total bytes of one call's outputs"),
    "max_scratch_bytes": (256 * _MiB, 64 * _GiB, "working memory of one bundled-algorithm call"),
    "max_work": (1 << 36, 1 << 48, "estimated multiply-adds of one bundled-algorithm call"),
    "max_fft_length": (1 << 24, 1 << 28, "fft: points per transform (the last axis)"),
    "max_inputs": (8, 64, "inputs of one request"),
}
class Limits:
    """The operator's limits, read from the ``[executors.cpp]`` table (each in [1, ceiling])."""

    __slots__ = tuple(LIMITS)

    max_input_bytes: int
    max_output_bytes: int
    max_scratch_bytes: int
    max_work: int
    max_fft_length: int
    max_inputs: int

    def __init__(self, config: Mapping[str, Any]) -> None:
        for name, (default, ceiling, _) in LIMITS.items():
            value = config.get(name, default)
            if type(value) is not int or not 1 <= value <= ceiling:
                raise ConfigError(f"[executors.cpp] {name} must be an integer from 1 to {ceiling}, not {value!r}")
            setattr(self, name, value)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LIMITS}
