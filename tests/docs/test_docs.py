"""Every Python code block of README.md and docs/*.md runs, as written, in CI.

A block that cannot run here (it needs a server, a GPU, a model folder) says so in its fence:
```` ```python test="skip" reason="needs a running server" ````; a skip without a reason fails.
The blocks run one by one, each in a fresh module and an empty working folder, as a reader who
copies one block into a file would run it. pytest-examples finds the blocks and reads the fence's
settings; the block runs through plain ``exec`` (its own runner's traceback rewriting crashes
pytest on Python 3.11.7), compiled under the page's name and line numbers, so a failure points
at the line of the page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pytest_examples import CodeExample, find_examples

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [block for block in find_examples(*PAGES) if block.prefix.split()[0] in ("py", "python")]


def _id(block: CodeExample) -> str:
    return f"{block.path.relative_to(ROOT)}:{block.start_line}"


def test_the_pages_have_python_blocks() -> None:
    # guards the collection itself: a change of fence syntax must not silently test nothing
    assert len(BLOCKS) >= 20, [_id(block) for block in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_code_block_runs_as_written(block: CodeExample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = block.prefix_settings()
    if settings.get("test") == "skip":
        assert settings.get("reason"), f"{_id(block)}: a skipped block names why: reason=\"...\""
        pytest.skip(settings["reason"])
    # no edgecompute.toml nor EDGECOMPUTE_* of the machine: the defaults the docs describe
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("EDGECOMPUTE_")]:
        monkeypatch.delenv(name)
    code = compile("\n" * block.start_line + block.source, str(block.path), "exec")
    exec(code, {"__name__": "__main__"})
