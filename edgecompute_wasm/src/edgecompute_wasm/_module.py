"""``wasm/module``: a user's WebAssembly module, run once in a fresh sandbox.

Either a WASI command (``_start`` with argv, stdin, stdout, stderr) or one exported function called
with numeric arguments. Only WASI preview 1 imports are provided; a module importing anything else
is refused before it runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import wasmtime

from edgecompute.errors import InvalidRequest

from ._python import outcome_error
from ._sandbox import WASI, Sandbox
from .errors import SandboxOutputExceeded, SandboxTimeout
from .settings import Limits

__all__ = ["run_module"]

_NUMERIC = {"i32": int, "i64": int, "f32": float, "f64": float}


def compile_user_module(runtime: Any, wasm: bytes | str) -> Any:
    if isinstance(wasm, str):
        try:
            wasm = wasmtime.wat2wasm(wasm)
        except wasmtime.WasmtimeError as exc:
            raise InvalidRequest(f"the WAT text does not parse: {exc}") from None
    try:
        wasmtime.Module.validate(runtime.engine.engine, bytes(wasm))
    except wasmtime.WasmtimeError as exc:
        raise InvalidRequest(f"not a valid WebAssembly module: {str(exc).splitlines()[0]}") from None
    module = runtime.user_module(bytes(wasm))
    for imp in module.imports:
        if imp.module != WASI:
            raise InvalidRequest(f"the module imports {imp.module}.{imp.name}; only {WASI} is provided in the sandbox")
    return module


def run_module(runtime: Any, module: Any, *, function: str | None, args: Sequence[Any], argv: Sequence[str],
               stdin: bytes, limits: Limits, mounts: Sequence[tuple[str, str]]) -> Any:
    exports = {e.name: e.type for e in module.exports}
    if function is None:
        if not isinstance(exports.get("_start"), wasmtime.FuncType):
            raise InvalidRequest("the module exports no _start function; pass params['function'] to call an export")
        export, call_args = "_start", []
    else:
        ty = exports.get(function)
        if not isinstance(ty, wasmtime.FuncType):
            names = sorted(n for n, t in exports.items() if isinstance(t, wasmtime.FuncType))
            raise InvalidRequest(f"the module exports no function {function!r}; it exports: {', '.join(names)}")
        params = [str(p) for p in ty.params]
        if len(params) != len(args):
            raise InvalidRequest(f"{function} takes {len(params)} arguments ({', '.join(params)}), not {len(args)}")
        call_args = []
        for kind, value in zip(params, args, strict=True):
            convert = _NUMERIC.get(kind)
            if convert is None:
                raise InvalidRequest(f"{function} takes a {kind}; only numeric arguments are supported")
            wrong = isinstance(value, bool) or not isinstance(value, (int, float))
            if wrong or (convert is int and not isinstance(value, int)):
                raise InvalidRequest(f"argument {value!r} does not fit a {kind}")
            call_args.append(convert(value))
        export = function
    sandbox = Sandbox(runtime.engine, module, argv=list(argv), mode="command" if function is None else "call",
                      mounts=mounts, memory_bytes=limits.memory_bytes, output_bytes=limits.output_bytes,
                      export=export, args=call_args)
    sandbox.give(b"", limits.timeout, limits.fuel)
    stdin_file = None
    try:
        if function is None:
            # wasmtime takes stdin from a file only: a private temporary one, gone when the run ends
            stdin_file = tempfile.NamedTemporaryFile(prefix="edgecompute-wasm-stdin-", delete=False)  # noqa: SIM115
            with stdin_file:
                stdin_file.write(stdin)
            sandbox.stdin_path = stdin_file.name
        sandbox.start()
        if not sandbox.ended.wait(limits.timeout + 2.0):
            raise SandboxTimeout(f"the module ran past its {limits.timeout:g} s limit", limit=limits.timeout)
    finally:
        if stdin_file is not None:
            try:
                os.unlink(stdin_file.name)
            except OSError:
                pass
    captured = {"stdout": sandbox.stdout.decode("utf-8", "replace"),
                "stderr": sandbox.stderr.decode("utf-8", "replace")}
    if sandbox.kill_reason == "output":
        raise SandboxOutputExceeded(f"module output passed its cap of {limits.output_bytes} bytes",
                                    limit_bytes=limits.output_bytes, **captured)
    if sandbox.kill_reason == "timeout":
        raise SandboxTimeout(f"the module ran past its {limits.timeout:g} s limit", limit=limits.timeout, **captured)
    outcome = sandbox.outcome
    if outcome is not None and outcome.kind == "exit":
        if function is None:
            return {"exit_code": outcome.exit_code, "stdout": captured["stdout"], "stderr": captured["stderr"],
                    "stdout_bytes": bytes(sandbox.stdout)}
        if outcome.exit_code == 0:
            return sandbox.result
    if outcome is not None and outcome.kind == "error" and "unknown import" in outcome.message:
        raise InvalidRequest(f"the module cannot be linked: {outcome.message}")
    raise outcome_error(sandbox, limits, captured, wasmtime)
