"""edgecompute-ml: the ``ml`` executor (torch inference on candle-compatible model files).

Importing this package does not import torch; torch loads when the executor first runs a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .executor import MLExecutor

__version__ = "0.1.0"

__all__ = ["MLExecutor", "__version__"]


def __getattr__(name: str) -> type[MLExecutor]:  # pragma: no cover - trivial lazy import
    if name == "MLExecutor":
        from .executor import MLExecutor

        return MLExecutor
    raise AttributeError(f"module 'edgecompute_ml' has no attribute {name!r}")
