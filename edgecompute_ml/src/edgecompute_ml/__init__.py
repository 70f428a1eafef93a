"""edgecompute-ml: the ``ml`` executor (torch inference on candle-compatible model files).

Importing this package does not import torch; torch loads when the executor first runs a model.
The public names are :class:`MLExecutor` and, to add model families, :class:`Family`,
:func:`register_family` and :func:`register_detection_family`; everything under the
underscore-named subpackages is internal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._runtime.plan import Family
    from ._runtime.store import register_detection_family, register_family
    from .executor import MLExecutor

__version__ = "0.1.0"

__all__ = ["Family", "MLExecutor", "__version__", "register_detection_family", "register_family"]

# public name -> the module defining it, imported on first access (keeps `import edgecompute_ml` light)
_LAZY = {"MLExecutor": ".executor", "Family": "._runtime.plan", "register_family": "._runtime.store",
         "register_detection_family": "._runtime.store"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgecompute_ml' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
