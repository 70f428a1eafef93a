"""The baseline of the cpp call-overhead figures: a hand-written cffi call of the bundled plugin's
``sum``, doing the minimum any caller must (describe the input, call, wrap the output, free it).
Shared by ``cpp.py`` (wall clock) and ``cpp_instructions.py`` (instruction counts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def direct_sum(lib: Any, x: np.ndarray) -> Callable[[], np.ndarray]:
    """A function that sums the float32 vector ``x`` through ``lib.ec_execute``."""
    from edgecompute_cpp._native import ffi

    name = b"sum"

    def direct() -> np.ndarray:
        buffers = ffi.new("ec_buffer[1]")
        b = buffers[0]
        b.dtype = 10
        b.ndim = 1
        b.shape[0] = x.shape[0]
        data = ffi.from_buffer(x)
        b.data = data
        result = ffi.new("ec_result*")
        flag = ffi.new("int32_t*")
        result.cancelled = flag
        if lib.ec_execute(name, buffers, 1, b"{}", result) != 0:
            raise RuntimeError(ffi.string(result.error_message))
        out = np.frombuffer(ffi.buffer(result.outputs[0].data, 8), np.float64).copy()
        lib.ec_release(result.owner)
        return out

    return direct
