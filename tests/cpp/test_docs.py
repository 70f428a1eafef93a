"""The complete plugin example in docs/cpp.md compiles, loads and does what the docs say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgecompute.errors import InvalidRequest
from edgecompute_cpp import CppExecutor

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cpp.md"


def test_the_documented_example_plugin_works(tmp_path: Path) -> None:
    blocks = re.findall(r"```cpp[^\n]*\n(.*?)```", DOCS.read_text(), flags=re.S)
    source = next(b for b in blocks if "scale.cpp" in b)
    path = tmp_path / "scale.cpp"
    path.write_text(source)
    executor = CppExecutor(plugins=[str(path)], builtin=False)
    assert [a.name for a in executor.algorithms()] == ["example.scale"]
    y = executor.call("example.scale", np.ones((2, 3), np.float32), {"factor": 3})
    np.testing.assert_array_equal(y, np.full((2, 3), 3.0, np.float32))
    clipped = executor.call("example.scale", {"x": np.array([0.5, 2.0], np.float32)}, {"factor": 3, "clip": True})
    np.testing.assert_array_equal(clipped, [1.0, 1.0])
    with pytest.raises(InvalidRequest, match="must have dtype float32, not float64"):
        executor.call("example.scale", np.ones(3))
