"""The decode step captured as one compiled graph (``torch.compile``, inductor's CPU backend).

A decoder's step over one token is a few hundred small torch calls whose Python and dispatch
overhead outweighs their arithmetic on a small model (docs/performance.md). Compiled, the step is
one call into generated C++ around torch's packed-weight kernels.

- **Shape-static.** The step (:meth:`LlamaModel.decode_step`) reads a KV cache of fixed capacity
  under a mask, so one graph serves every position; capacities are rounded up to a power of two
  (:func:`capacity_for`) so that a handful of graphs serve every length.
- **Cached on disk.** Inductor's FX graph cache and AOT autograd cache live in a folder the
  operator configures (``compile_cache_dir``; default ``$EDGECOMPUTE_ML_CACHE/inductor``, else
  ``~/.cache/edgecompute-ml/inductor``), never a path from a request. A second process traces the
  step again (seconds) but loads the compiled code instead of generating and compiling it.
- **Fallback.** Without a C++ compiler (inductor's ``$CXX``, else ``g++``), or when compiling
  fails, the step runs eager (``LlamaModel.forward``): logged once per capture, and serving goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .paths import cache_root

__all__ = ["CaptureSettings", "DecodeCapture", "capacity_for", "compiler_available", "default_cache_dir"]

_log = logging.getLogger("edgecompute_ml.capture")
_MIN_CAPACITY = 128
# graphs per step function dynamo keeps before it gives up on compiling: one per model and capacity
_RECOMPILE_LIMIT = 64
_CONFIGURE_LOCK = threading.Lock()
_configured: Path | None = None  # the cache folder of this process (the first capture's)


def default_cache_dir() -> Path:
    """``$EDGECOMPUTE_ML_CACHE/inductor``, else the user cache directory's ``edgecompute-ml/inductor``."""
    return cache_root() / "inductor"


@attrs.frozen
class CaptureSettings:
    """The operator's choice: capture the decode step or not, and where compiled code is kept."""

    enabled: bool = True
    cache_dir: Path = attrs.field(factory=default_cache_dir, converter=Path)


def capacity_for(length: int, limit: int) -> int:
    """The KV cache capacity a captured step uses for ``length`` positions: a power of two (at
    least 128), capped at ``limit`` (the model's maximum positions)."""
    capacity = _MIN_CAPACITY
    while capacity < length:
        capacity *= 2
    return max(length, min(capacity, limit))


def compiler_available() -> str | None:
    """The C++ compiler inductor would run, or None when there is none on this machine."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    for name in names:
        found = shutil.which(str(name))
        if found:
            return found
    return None


def _configure(cache_dir: Path) -> None:
    """Point inductor's caches at ``cache_dir`` (process-wide: the first capture's folder)."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    global _configured
    with _CONFIGURE_LOCK:
        if _configured is None:
            # inductor reads its folder from this variable each time it looks (and writes its own
            # default there once it has looked), so the operator's folder replaces whatever is there
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir.resolve())
            _configured = cache_dir
        torch._inductor.config.fx_graph_cache = True
        torch._functorch.config.enable_autograd_cache = True
        limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, limit)


class DecodeCapture:
    """A model's decode step, compiled on first use, or eager where it cannot be.

    ``step`` is the shape-static step (``decode_step``); ``eager`` runs the same token through
    the model's ordinary forward pass. :meth:`__call__` returns logits either way."""

    def __init__(self, step: Callable[..., Any], settings: CaptureSettings, name: str = "model") -> None:
        self._step = step
        self.settings = settings
        self.name = name
        self._compiled: Callable[..., Any] | None = None
        self._lock = threading.Lock()
        self.fallback: str | None = None if settings.enabled else "capture is off (compile = false)"
        self._warmed: set[tuple[Any, ...]] = set()

    @property
    def active(self) -> bool:
        """Whether steps run compiled (or will, once compiled)."""
        return self.fallback is None

    def _give_up(self, reason: str) -> None:
        self.fallback = reason
        _log.warning("ml: %s: decode step runs eager: %s", self.name, reason)

    def _compiled_step(self) -> Callable[..., Any] | None:
        if self._compiled is None and self.fallback is None:
            with self._lock:
                if self._compiled is None and self.fallback is None:
                    if compiler_available() is None:
                        self._give_up("no C++ compiler for torch.compile (set CXX, or install g++)")
                        return None
                    import torch

                    _configure(self.settings.cache_dir)
                    self._compiled = torch.compile(self._step, dynamic=False, fullgraph=True)
        return self._compiled

    def __call__(self, *args: Any) -> Any:
        """``step(*args)`` compiled; None when the caller should run its eager path instead."""
        compiled = self._compiled_step()
        if compiled is None:
            return None
        key = tuple(getattr(a[0], "shape", None) for a in args[2:4])  # the first layer's k and v
        if key in self._warmed:
            return compiled(*args)
        with self._lock:  # one compile at a time; the first call for a shape compiles
            try:
                out = compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler, header or lowering failure: serve eager
                self._give_up(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
                return None
            self._warmed.add(key)
            return out
