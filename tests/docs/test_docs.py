"""Every Python code block of README.md and docs/*.md runs, as written, in CI.

A block runs as a reader who copies it into a file would run it: in a fresh interpreter, in an
empty working folder, with no ``edgecompute.toml`` nor ``EDGECOMPUTE_*`` variables of the machine.
A fenced block of any language with ``file="NAME"`` in its fence is written to ``NAME`` in that
folder for the Python blocks after it on the same page (a C++ plugin the next block compiles).

Blocks with ``test="tutorial"`` run in ``test_plugin_tutorial.py``, with the plugin the
tutorial builds installed. A block that cannot run here says why in its fence:
```` ```python test="skip" reason="needs a running server" ````; a skip without a reason fails.

Each block runs in its own process, not through ``exec`` in pytest's: an example is free to
install signal handlers, start threads or leave them running, and none of that may reach the
tests that follow (a wasm trap needs wasmtime's signal handlers intact).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(?P<ticks>`{3,})(?P<language>[\w+-]*)(?P<settings>.*)$")
_SETTING = re.compile(r'(\w+)="([^"]*)"')
_TIMEOUT = 300  # seconds a block may take: a first compile of the bundled C++ is the slowest


@attrs.frozen
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # the first line of its code, 1-based
    language: str
    settings: dict[str, str]
    source: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order. A fence closes on a line of as many backticks."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    opened: tuple[int, str, str, dict[str, str]] | None = None
    for number, line in enumerate(lines, start=1):
        match = _FENCE.match(line.strip())
        if match is None:
            continue
        if opened is None:
            settings = dict(_SETTING.findall(match["settings"]))
            opened = (number, match["ticks"], match["language"], settings)
        elif match["ticks"] == opened[1] and not match["language"] and not match["settings"].strip():
            start, _, language, settings = opened
            source = "\n".join(lines[start:number - 1])
            found.append(Block(page, start + 1, language, settings, source))
            opened = None
    assert opened is None, f"{page.name}:{opened[0]}: a fence is never closed"
    return found


ALL = [block for page in PAGES for block in blocks(page)]
# a block with file= is a file of an example, not a script; test="tutorial" blocks need the
# tutorial's plugin installed, and tests/docs/test_plugin_tutorial.py runs them so
PYTHON = [block for block in ALL if block.language in ("python", "py") and "file" not in block.settings
          and block.settings.get("test") != "tutorial"]


def test_the_pages_have_python_blocks() -> None:
    # guards the collection itself: a change of fence syntax must not silently test nothing
    assert len(PYTHON) >= 20, [block.id for block in PYTHON]


def test_the_finder_reads_fences_settings_and_nesting(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('text\n```python test="skip" reason="why"\na = 1\n```\n'
                    '````md\n```python\nnot a block of its own\n```\n````\n'
                    '```cpp file="x.cpp"\nint x;\n```\n', encoding="utf-8")
    found = blocks(page)
    assert [(b.language, b.line, b.settings, b.source) for b in found] == [
        ("python", 3, {"test": "skip", "reason": "why"}, "a = 1"),
        ("md", 6, {}, "```python\nnot a block of its own\n```"),
        ("cpp", 11, {"file": "x.cpp"}, "int x;"),
    ]


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.id)
def test_code_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    if block.settings.get("test") == "skip":
        assert block.settings.get("reason"), f"{block.id}: a skipped block names why: reason=\"...\""
        pytest.skip(block.settings["reason"])
    for earlier in ALL:
        if earlier.page == block.page and earlier.line < block.line and "file" in earlier.settings:
            (tmp_path / earlier.settings["file"]).write_text(earlier.source + "\n", encoding="utf-8")
    # blank lines first, so that a traceback names the line of the page
    script = tmp_path / "block.py"
    script.write_text("\n" * (block.line - 1) + block.source + "\n", encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGECOMPUTE_")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=_TIMEOUT, check=False)
    output = (done.stdout + done.stderr).replace(str(script), block.id.split(":")[0])
    assert done.returncode == 0, f"{block.id} failed:\n{output}"
