"""Loading a model with its dense layers in each packed form, or plain: what the BERT tests compare."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from edgecompute_ml._kernels import build
from edgecompute_ml._runtime.plan import ModelSource
from edgecompute_ml._runtime.store import inspect_model, load_model

needs_onednn = pytest.mark.skipif(not torch._C._has_mkldnn, reason="this torch has no oneDNN: no packed form")
#: the packed forms, for ``pytest.mark.parametrize("packing", PACKED)``: this package's kernel and oneDNN's
PACKED = [pytest.param("blocks", marks=needs_onednn), pytest.param("onednn", marks=needs_onednn)]


@contextmanager
def packed_as(packing: str) -> Iterator[None]:
    """Dense layers built inside pack their weights for this package's kernel (``"blocks"``), for
    oneDNN (``"onednn"``: the kernel switched off) or not at all (``"plain"``: oneDNN switched off)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = packing != "plain"
    try:
        with mock.patch.dict(os.environ, {build.LINEAR_DISABLE_ENV: "0" if packing == "onednn" else "1"}):
            yield
    finally:
        torch.backends.mkldnn.enabled = before


def load(folder: Path | str, *, packing: str) -> Any:
    """The model in ``folder``, its dense layers packed as :func:`packed_as` says."""
    with packed_as(packing):
        return load_model(inspect_model(ModelSource("m", str(folder))), "float32", "cpu")
