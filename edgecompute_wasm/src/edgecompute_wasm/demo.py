"""The wasm executor's part of ``edgecompute demo`` (and ``python -m edgecompute_wasm.demo``):
untrusted Python and a WebAssembly module in the sandbox, and what the sandbox refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["run", "show"]

SOURCE = "def main(inputs):\n    return {'total': sum(inputs), 'n': len(inputs)}\n"
# what the sandbox must refuse: a host file, and a loop that would never end
REFUSED = (
    ("reading /etc/passwd", {"source": "def main(x):\n    return open('/etc/passwd').read()"}),
    ("an endless loop, 0.5 s limit", {"source": "def main(x):\n    while True:\n        pass", "timeout": 0.5}),
)
ADD_WAT = '(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'


def show(runtime: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run the demo through ``runtime`` (an edgecompute Runtime with the wasm executor); returns
    what it showed (the refusals by title: the error's type name, or None if it was allowed)."""
    from edgecompute.errors import EdgeComputeError

    results: dict[str, Any] = {}
    echo("   wasm: untrusted Python in CPython-for-WASI, each request in a fresh sandbox")
    echo("   (the first run compiles the runtime once, into the disk cache: seconds)")
    try:
        response = runtime.run("wasm/python", [1, 2, 3], params={"source": SOURCE})
        echo(f"   wasm/python main([1, 2, 3]) -> {response.outputs} in {response.timings['total'] * 1e3:.1f} ms")
        results["python"] = response.outputs
        refused: dict[str, str | None] = {}
        for title, params in REFUSED:
            try:
                runtime.run("wasm/python", None, params=params)
                echo(f"   {title}: allowed?!")
                refused[title] = None
            except EdgeComputeError as exc:
                echo(f"   {title}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
                refused[title] = type(exc).__name__
        results["refused"] = refused
        response = runtime.run("wasm/module", None, params={"wasm": ADD_WAT, "function": "add", "args": [40, 2]})
        echo(f"   wasm/module add(40, 2) -> {response.outputs}")
        results["module"] = response.outputs
    except EdgeComputeError as exc:
        echo(f"   wasm demo failed: {type(exc).__name__}: {exc}")
        results["error"] = exc
    return results


def run(echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start a Runtime with only the wasm executor and run the demo; returns what it showed."""
    from edgecompute import Config, Registry, Resources, Runtime

    from .executor import WasmExecutor

    with Runtime(Registry([WasmExecutor()]), config=Config(), capacity=Resources(cpu=2, memory_mb=2048)) as rt:
        return show(rt, echo)


if __name__ == "__main__":
    run()
