"""Device, dtype and thread choices, and GPU memory accounting."""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import InvalidRequest

__all__ = ["DTYPES", "DeviceManager", "parse_dtype"]

DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32", "float16": "float16", "f16": "float16",
          "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}
_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parse_dtype(value: str) -> str:
    name = DTYPES.get(str(value).lower())
    if name is None:
        raise InvalidRequest(f"dtype {value!r} is not supported; use one of: float32, float16, bfloat16, auto")
    return name


class DeviceManager:
    """Resolves ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps") and ``dtype`` ("auto" or a
    float type), sets torch's thread count once, and reports GPU memory.

    Nothing here imports torch until a question needs it.
    """

    def __init__(self, device: str = "auto", dtype: str = "auto", threads: int | None = None) -> None:
        # the operator's values, checked by MLSettings (settings.py) before they get here
        self.requested_device = device.lower()
        self.requested_dtype = parse_dtype(dtype)
        self.threads = threads
        self._lock = threading.Lock()
        self._ready = False
        self._device: str | None = None if device == "auto" else device

    # -- cheap answers (no torch) --------------------------------------------------------------------

    @property
    def device_name(self) -> str:
        """The device models load on ("cpu", "cuda:0", "mps"); resolving "auto" imports torch."""
        if self._device is None:
            self._device = self._auto_device()
        return self._device

    @property
    def is_gpu(self) -> bool:
        return self.device_name.startswith(("cuda", "mps"))

    def dtype_name(self, override: str | None = None) -> str:
        name = parse_dtype(override) if override else self.requested_dtype
        if name != "auto":
            return name
        return "float32" if self.device_name == "cpu" else "float16"

    @staticmethod
    def element_size(dtype_name: str) -> int:
        return _SIZES[dtype_name]

    # -- torch ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Import torch and apply the thread count (once per process)."""
        if self._ready:
            return
        with self._lock:
            # checked again under the lock (another thread may have finished setup meanwhile); written as
            # "if not" because mypy keeps the narrowing of the check above and would call a return unreachable
            if not self._ready:
                import torch

                if self.threads is not None:
                    torch.set_num_threads(self.threads)
                self._ready = True

    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device_name)

    @staticmethod
    def torch_dtype(name: str) -> Any:
        import torch

        return getattr(torch, name)

    @staticmethod
    def _auto_device() -> str:
        if os.environ.get("EDGECOMPUTE_ML_DEVICE"):
            return os.environ["EDGECOMPUTE_ML_DEVICE"]
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"

    def gpu_total_mb(self) -> float | None:
        """Total memory of the GPU models load on, in MB (None on cpu; mps reports system memory)."""
        name = self.device_name
        if not name.startswith("cuda"):
            return None
        import torch

        index = int(name.partition(":")[2] or 0)
        return torch.cuda.get_device_properties(index).total_memory / 2**20

    def gpu_used_mb(self) -> float:
        name = self.device_name
        if not name.startswith("cuda"):
            return 0.0
        import torch

        return torch.cuda.memory_allocated(torch.device(name)) / 2**20

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device_name, "dtype": self.dtype_name(), "threads": self.threads}
        if self._ready:
            import torch

            out["threads"] = torch.get_num_threads()
            total = self.gpu_total_mb()
            if total is not None:
                out["gpu_total_mb"] = round(total)
                out["gpu_used_mb"] = round(self.gpu_used_mb())
        return out
