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

from ._inspect import ModuleInfo, ModuleShapeError, inspect_module
from ._python import UNSTICK_GRACE, Captured, outcome_error
from ._sandbox import WASI, Sandbox
from .errors import SandboxOutputExceeded, SandboxTimeout
from .settings import Limits

__all__ = ["UserModule", "compile_user_module", "run_module"]

_NUMERIC = {"i32": int, "i64": int, "f32": float, "f64": float}
_INT_RANGE = {"i32": (-(2**31), 2**32 - 1), "i64": (-(2**63), 2**64 - 1)}  # signed or unsigned bits


class UserModule:
    """A compiled user module and what its binary declares (read without wasmtime's value types)."""

    __slots__ = ("info", "module")

    def __init__(self, module: Any, info: ModuleInfo) -> None:
        self.module = module
        self.info = info


def compile_user_module(runtime: Any, wasm: bytes | str, function: str | None = None) -> UserModule:
    """Compile a user's module, after refusing what the sandbox cannot run safely.

    Everything the host later touches is checked here, from the binary: the imports (WASI functions
    only), the number of memories and tables, and the type of every export the host will call. A
    ``v128`` or reference type must never reach wasmtime-py's value-type code: it aborts the host."""
    if isinstance(wasm, str):
        try:
            binary = bytes(wasmtime.wat2wasm(wasm))
        except wasmtime.WasmtimeError as exc:
            raise InvalidRequest(f"the WAT text does not parse: {exc}") from None
    else:
        binary = bytes(wasm)
    try:
        wasmtime.Module.validate(runtime.engine.engine, binary)
    except wasmtime.WasmtimeError as exc:
        raise InvalidRequest(f"not a valid WebAssembly module: {str(exc).splitlines()[0]}") from None
    try:
        info = inspect_module(binary)
    except ModuleShapeError as exc:
        raise InvalidRequest(f"the module cannot be checked before it runs: {exc}") from None
    for module_name, name, kind in info.imports:
        if module_name != WASI:
            raise InvalidRequest(f"the module imports {module_name}.{name}; only {WASI} is provided in the sandbox")
        if kind != "function":
            raise InvalidRequest(f"the module imports {module_name}.{name} as a {kind}; only {WASI} functions are "
                                 "provided in the sandbox")
    if info.memories > 1:
        raise InvalidRequest(f"the module has {info.memories} memories; a sandbox has one (memory_mb caps it)")
    max_tables = runtime.settings.max_tables
    if info.tables > max_tables:
        raise InvalidRequest(f"the module has {info.tables} tables, above the ceiling max_tables = {max_tables}")
    if function is None:
        _check_export(info, "_start", "the module exports no _start function; pass params['function'] to call "
                                      "an export", no_args=True)
    else:
        _check_export(info, function, "", no_args=False)
        if "_initialize" in info.exports:
            _check_export(info, "_initialize", "", no_args=True)
    return UserModule(runtime.user_module(binary), info)


def _check_export(info: ModuleInfo, name: str, missing: str, *, no_args: bool) -> None:
    kind, _ = info.exports.get(name, ("", -1))
    if not kind:
        if missing:
            raise InvalidRequest(missing)
        names = sorted(n for n, (k, _) in info.exports.items() if k == "function")
        raise InvalidRequest(f"the module exports no function {name!r}; it exports: {', '.join(names)}")
    if kind != "function":
        raise InvalidRequest(f"the module's export {name!r} is a {kind}, not a function; only functions are called")
    try:
        signature = info.signature(name)
    except ModuleShapeError as exc:
        raise InvalidRequest(f"the module cannot be checked before it runs: {exc}") from None
    assert signature is not None
    params, results = signature
    for what, types in (("takes", params), ("returns", results)):
        for ty in types:
            if ty not in _NUMERIC:
                raise InvalidRequest(f"export {name!r} {what} a {ty}; only i32, i64, f32 and f64 cross the "
                                     "sandbox")
    if no_args and (params or results):
        raise InvalidRequest(f"export {name!r} must take and return nothing, not ({', '.join(params)}) -> "
                             f"({', '.join(results)})")


def run_module(runtime: Any, user: UserModule, *, function: str | None, args: Sequence[Any], argv: Sequence[str],
               stdin: bytes, limits: Limits, mounts: Sequence[tuple[str, str]]) -> Any:
    info, module = user.info, user.module
    call_args: list[Any] = []
    if function is None:
        export = "_start"
    else:
        signature = info.signature(function)
        assert signature is not None  # compile_user_module checked it
        params = list(signature[0])
        if len(params) != len(args):
            raise InvalidRequest(f"{function} takes {len(params)} arguments ({', '.join(params)}), not {len(args)}")
        for kind, value in zip(params, args, strict=True):
            convert = _NUMERIC[kind]
            wrong = isinstance(value, bool) or not isinstance(value, (int, float))
            if wrong or (convert is int and not isinstance(value, int)):
                raise InvalidRequest(f"argument {value!r} does not fit a {kind}")
            if convert is int:
                low, high = _INT_RANGE[kind]
                if not low <= value <= high:
                    raise InvalidRequest(f"argument {value!r} does not fit a {kind}")
                if value > high // 2:  # unsigned spelling of a negative number: wasmtime takes signed values
                    value -= high + 1
            elif isinstance(value, int) and abs(value) > 2**1023:
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
            # blocked where no epoch reaches (a FIFO's open in a mount): wake it before answering
            sandbox.unstick(UNSTICK_GRACE)
            raise SandboxTimeout(f"the module ran past its {limits.timeout:g} s limit", limit=limits.timeout)
    finally:
        if stdin_file is not None:
            try:
                os.unlink(stdin_file.name)
            except OSError:
                pass
    captured: Captured = {"stdout": sandbox.stdout.decode("utf-8", "replace"),
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
