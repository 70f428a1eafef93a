"""The wasm distribution's shape (docs/wasm.md, "Package layout"): a light, lazy package, the demo
through a Runtime, and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgecompute import Config, Registry, Resources, Runtime
from edgecompute_wasm.cli import main as cli_main
from edgecompute_wasm.executor import WasmExecutor


def test_importing_the_package_loads_neither_wasmtime_nor_its_modules() -> None:
    code = ("import sys, edgecompute_wasm\n"
            "assert 'wasmtime' not in sys.modules, 'wasmtime'\n"
            "assert 'edgecompute_wasm.executor' not in sys.modules, 'executor'\n"
            "assert edgecompute_wasm.SandboxTimeout.__module__ == 'edgecompute_wasm.errors'\n"
            "assert edgecompute_wasm.WasmExecutor.__name__ == 'WasmExecutor'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_name_is_an_attribute_error() -> None:
    import edgecompute_wasm

    with pytest.raises(AttributeError, match="no attribute 'Sandbox'"):
        _ = edgecompute_wasm.Sandbox


def test_the_demo_runs_and_the_sandbox_refuses_what_it_must(cache_dir: Path) -> None:
    from edgecompute_wasm.demo import show

    lines: list[str] = []
    executor = WasmExecutor({"cache_dir": str(cache_dir), "pool_size": 1})
    with Runtime(Registry([executor]), config=Config(), capacity=Resources(cpu=1, memory_mb=1024)) as rt:
        results = show(rt, lines.append)
    assert results["python"] == {"total": 6, "n": 3}
    assert results["module"] == 42
    assert results["refused"] == {"reading /etc/passwd": "GuestError", "an endless loop, 0.5 s limit": "SandboxTimeout"}
    assert any("wasm/module add(40, 2) -> 42" in line for line in lines)


def test_cli_check_of_a_missing_folder_is_a_one_line_error(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"edgecompute-wasm: error: {tmp_path / 'nope'} is not a folder\n"
