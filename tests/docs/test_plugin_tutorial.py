"""docs/plugins.md's tutorial, followed literally: its files make a distribution that builds,
passes ``twine check``, installs, is discovered, runs, and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_docs import ROOT, blocks

PAGE = ROOT / "docs" / "plugins.md"
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, site: Path | None = None) -> str:
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGECOMPUTE_")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tutorial's folder, written from the page, and a site folder holding its built wheel."""
    work = tmp_path_factory.mktemp("tutorial")
    files = [block for block in blocks(PAGE) if "file" in block.settings]
    assert {block.settings["file"] for block in files} >= {
        "edgecompute-shout/pyproject.toml", "edgecompute-shout/edgecompute_shout/plugin.py",
        "edgecompute-shout/edgecompute_shout/executor.py", "edgecompute-shout/tests/test_shout.py"}
    for block in files:
        target = work / block.settings["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.source + "\n", encoding="utf-8")
    # step 7, offline: hatchling comes from this environment instead of a download
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"),
          str(work / "edgecompute-shout")], cwd=work)
    built = sorted(path.name for path in (work / "dist").iterdir())
    assert built == ["edgecompute_shout-0.1.0-py3-none-any.whl", "edgecompute_shout-0.1.0.tar.gz"]
    assert "PASSED" in _run([str(BIN / "twine"), "check", *map(str, (work / "dist").iterdir())], cwd=work)
    site = work / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
          str(work / "dist" / built[0])], cwd=work)
    return work, site


def test_the_built_plugin_is_discovered_and_runs_from_the_cli(installed: tuple[Path, Path]) -> None:
    work, site = installed
    listing = _run([sys.executable, "-m", "edgecompute", "executors", "--no-health"], cwd=work, site=site)
    assert "shout" in listing
    out = _run([sys.executable, "-m", "edgecompute", "run", "shout/shout", "--input", '"hello"',
                "--param", "level=3"], cwd=work, site=site)
    assert "HELLO!!!" in out


def test_the_tutorial_blocks_and_the_plugins_own_tests_pass(installed: tuple[Path, Path]) -> None:
    work, site = installed
    tutorial = [block for block in blocks(PAGE) if block.settings.get("test") == "tutorial"]
    assert tutorial, "the page's tutorial has blocks that use the installed plugin"
    for block in tutorial:
        script = work / "block.py"
        script.write_text("\n" * (block.line - 1) + block.source + "\n", encoding="utf-8")
        assert "HELLO!!!" in _run([sys.executable, str(script)], cwd=work, site=site), block.id
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
               cwd=work / "edgecompute-shout", site=site)
    assert "1 passed" in out
