"""Where this package keeps what it makes on first use (compiled kernels and decode steps,
converted models): one root for all of them (imports nothing of the package)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$EDGECOMPUTE_ML_CACHE``, else the user cache directory's ``edgecompute-ml``
    (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    explicit = os.environ.get("EDGECOMPUTE_ML_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgecompute-ml"
