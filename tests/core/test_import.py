"""``import edgecompute`` must stay light, even with every executor installed."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "wasmtime", "cffi", "numpy", "safetensors", "transformers"]


def modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_loads_no_heavy_dependency_nor_the_scheduler() -> None:
    loaded = modules_after("import edgecompute")
    assert not loaded & set(HEAVY)
    assert "edgecompute._scheduler" not in loaded  # the scheduler and anyio come on first use
    assert "anyio" not in loaded


def test_discovering_and_listing_every_installed_executor_stays_light() -> None:
    loaded = modules_after(
        "import edgecompute\n"
        "registry = edgecompute.Registry.discover()\n"
        "names = registry.names()\n"
        "from edgecompute import Scheduler, Runtime\n"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
