"""A host environment without torch runs ``ml`` requests through a worker in an environment that
has it. The host is ``.venv-host`` (the core and numpy only, built by ``make setup``); the worker
runs in the test environment, where edgecompute-ml, torch and the pretrained models are installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import ROOT

HOST_PYTHON = ROOT / ".venv-host" / "bin" / "python"

HOST_SCRIPT = textwrap.dedent("""
    import asyncio, importlib.metadata, importlib.util, json, sys
    from edgecompute import Placement, Registry, Resources, Scheduler

    assert importlib.util.find_spec("torch") is None, "the host must not have torch"
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "edgecompute-ml" not in installed, "the host must not have edgecompute-ml"

    async def main():
        registry = Registry.discover(placement={"ml": Placement.process(python=sys.argv[1])})
        report = {"names": registry.names(), "algorithms": sorted(registry.get("ml").report["executors"])}
        report["listed"] = sorted(name for name in registry.algorithms() if name.startswith("ml/"))
        async with Scheduler(registry, capacity=Resources(cpu=2, memory_mb=8192)) as scheduler:
            response = await scheduler.run("ml/embeddings", ["A man is eating food.", "A man eats bread.",
                                                             "The stock market fell."],
                                           params={"model": "all-minilm-l6-v2"})
            vectors = response.outputs
            dot = lambda a, b: sum(x * y for x, y in zip(a, b))
            report["shape"] = [len(vectors), len(vectors[0])]
            report["type"] = type(vectors[0][0]).__name__
            report["similar"] = dot(vectors[0], vectors[1])
            report["different"] = dot(vectors[0], vectors[2])
            report["health"] = (await registry.get("ml").health()).status.value
        await registry.aclose()
        report["torch_loaded_here"] = "torch" in sys.modules
        print(json.dumps(report))

    asyncio.run(main())
""")


@pytest.mark.slow
def test_a_host_without_torch_runs_ml_through_an_environment_that_has_it(tmp_path: Path) -> None:
    assert HOST_PYTHON.exists(), f"{HOST_PYTHON} is missing: run `make setup` (it builds the core-only host venv)"
    probe = subprocess.run([str(HOST_PYTHON), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    result = subprocess.run([str(HOST_PYTHON), "-c", HOST_SCRIPT, sys.executable], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # not the repo: its folders would import
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert "ml" in report["names"]  # listed from the worker's report: the host has no ml plugin
    # every ml task, as the worker's environment reports them (the host has no edgecompute_ml)
    from edgecompute_ml.executor import MLExecutor

    assert report["listed"] == sorted(f"ml/{a.name}" for a in MLExecutor().algorithms())
    assert "ml" in report["algorithms"]
    assert report["shape"] == [3, 384] and report["type"] == "float"
    assert report["similar"] > report["different"] + 0.2
    assert report["health"] == "ok"
    assert report["torch_loaded_here"] is False


def test_the_host_environment_really_lacks_the_executor() -> None:
    assert HOST_PYTHON.exists(), f"{HOST_PYTHON} is missing: run `make setup`"
    listing = subprocess.run([str(HOST_PYTHON), "-m", "pip", "list", "--format=json"], capture_output=True,
                             text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listing.stdout)}
    assert "edgecompute" in installed
    assert not installed & {"torch", "edgecompute-ml", "edgecompute-cpp", "transformers"}
    assert Path(sys.prefix) != HOST_PYTHON.parent.parent  # venvs share the base interpreter, not the prefix
