"""Loading a model with oneDNN's prepacked weights or without: what the BERT tests compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from edgecompute_ml._architectures.dense import packing_available
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model, load_model

needs_onednn = pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.float32),
                                  reason="this torch has no oneDNN: only the plain path exists")


def load(folder: Path | str, *, packed: bool) -> Any:
    """The model in ``folder``, its dense layers prepacked for oneDNN (``packed``) or plain."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = packed
    try:
        return load_model(inspect_model(ModelSource("m", str(folder))), "float32", "cpu")
    finally:
        torch.backends.mkldnn.enabled = before
