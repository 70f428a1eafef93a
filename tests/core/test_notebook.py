"""The example notebook runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e .[dev] (CI does)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e .[dev] (CI does)")

NOTEBOOK = Path(__file__).parents[2] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_in_a_kernel() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = {}
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "execute_result":
                outputs[index] = output["data"]["text/plain"]
    assert outputs[2] == "111"  # collatz(27)
    assert outputs[3] == "(181, 1161)"
    assert outputs[4] == "118"  # collatz(97), awaited on the kernel's own loop
