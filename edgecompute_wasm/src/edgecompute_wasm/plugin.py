"""The ``edgecompute`` entry point of this distribution: registers executor ``wasm``.

Registering imports neither wasmtime nor the runtime; they load on the first request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgecompute.hookspecs import hookimpl


@hookimpl
def register_executors(register: Callable[..., Any]) -> None:
    from .executor import WasmExecutor

    register(WasmExecutor)


@hookimpl
def demo(runtime: Any, echo: Callable[[str], None]) -> None:
    """``edgecompute demo``: untrusted code in the wasm sandbox."""
    from edgecompute.errors import EdgeComputeError

    echo("   wasm: untrusted Python in CPython-for-WASI, each request in a fresh sandbox")
    echo("   (the first run compiles the runtime once, into the disk cache: seconds)")
    source = "def main(inputs):\n    return {'total': sum(inputs), 'n': len(inputs)}\n"
    try:
        response = runtime.run("wasm/python", [1, 2, 3], params={"source": source})
        echo(f"   wasm/python main([1, 2, 3]) -> {response.outputs} in {response.timings['total'] * 1e3:.1f} ms")
        for title, params in (
            ("reading /etc/passwd", {"source": "def main(x):\n    return open('/etc/passwd').read()"}),
            ("an endless loop, 0.5 s limit", {"source": "def main(x):\n    while True:\n        pass", "timeout": 0.5}),
        ):
            try:
                runtime.run("wasm/python", None, params=params)
                echo(f"   {title}: allowed?!")
            except EdgeComputeError as exc:
                echo(f"   {title}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
        wat = '(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'
        response = runtime.run("wasm/module", None, params={"wasm": wat, "function": "add", "args": [40, 2]})
        echo(f"   wasm/module add(40, 2) -> {response.outputs}")
    except EdgeComputeError as exc:
        echo(f"   wasm demo failed: {type(exc).__name__}: {exc}")
