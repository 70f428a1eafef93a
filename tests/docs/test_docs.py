"""Every Python code block of README.md and docs/*.md runs, as written, in CI.

A block runs as a reader who copies it into a file would run it: in a fresh interpreter, in an
empty working folder, with no ``edgecompute.toml`` nor ``EDGECOMPUTE_*`` variables of the machine.
A fenced block of any language with ``file="NAME"`` in its fence is written to ``NAME`` in that
folder for the Python blocks after it on the same page (a C++ plugin the next block compiles).

Blocks with ``test="tutorial"`` run in ``test_plugin_tutorial.py``, with the plugin the
tutorial builds installed. Blocks with ``test="server"`` talk to a gateway: the test starts
``edgecompute serve`` (HTTP and gRPC, one key in ``EDGECOMPUTE_API_KEY``) and points the block's
``127.0.0.1:8000`` and ``127.0.0.1:50051`` at it. Blocks with ``test="vision"`` find the model
folders ``my-clip`` and ``my-yolos`` a reader would have: tiny random ones the ml tests build.
A block that cannot run here says why in its fence:
```` ```python test="skip" reason="needs a running server" ````; a skip without a reason fails.

Each block runs in its own process, not through ``exec`` in pytest's: an example is free to
install signal handlers, start threads or leave them running, and none of that may reach the
tests that follow (a wasm trap needs wasmtime's signal handlers intact).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


@attrs.frozen
class Gateway:
    """An ``edgecompute serve`` of this checkout's environment, with one key for every scope."""

    http_port: int
    grpc_port: int
    key: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("gateway")
    key = secrets.token_urlsafe(32)
    entry = subprocess.run([sys.executable, "-m", "edgecompute", "keys", "hash", key], capture_output=True,
                           text=True, check=True).stdout.strip()
    gateway = Gateway(_free_port(), _free_port(), key)
    (folder / "edgecompute.toml").write_text(
        f"[server]\nport = {gateway.http_port}\ngrpc_port = {gateway.grpc_port}\naccess_log = false\n\n"
        f'[[server.keys]]\nname = "docs"\nhash = "{entry}"\nscopes = ["*"]\n', encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGECOMPUTE_")}
    log = (folder / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "edgecompute", "serve", "--config", "edgecompute.toml"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the gateway did not start:\n{(folder / 'serve.log').read_text()}"
            try:
                # liveness, not /readyz: the test environment also holds a broken plugin, down by design
                with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway was not ready in 120 s"
                time.sleep(0.2)
        yield gateway
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.id)
def test_code_block_runs_as_written(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.settings.get("test") == "skip":
        assert block.settings.get("reason"), f"{block.id}: a skipped block names why: reason=\"...\""
        pytest.skip(block.settings["reason"])
    source = block.source
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGECOMPUTE_")}
    if block.settings.get("test") == "server":
        served: Gateway = request.getfixturevalue("gateway")
        source = (source.replace("127.0.0.1:8000", f"127.0.0.1:{served.http_port}")
                  .replace("127.0.0.1:50051", f"127.0.0.1:{served.grpc_port}"))
        env["EDGECOMPUTE_API_KEY"] = served.key
    if block.settings.get("test") == "vision":
        pytest.importorskip("transformers")
        from tests.ml.tiny_vision import make_clip, make_yolos

        make_clip(tmp_path / "my-clip")
        make_yolos(tmp_path / "my-yolos")
    for earlier in ALL:
        if earlier.page == block.page and earlier.line < block.line and "file" in earlier.settings:
            (tmp_path / earlier.settings["file"]).write_text(earlier.source + "\n", encoding="utf-8")
    # blank lines first, so that a traceback names the line of the page
    script = tmp_path / "block.py"
    script.write_text("\n" * (block.line - 1) + source + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=_TIMEOUT, check=False)
    output = (done.stdout + done.stderr).replace(str(script), block.id.split(":")[0])
    assert done.returncode == 0, f"{block.id} failed:\n{output}"
