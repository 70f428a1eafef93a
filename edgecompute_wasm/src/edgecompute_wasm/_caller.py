"""Store settings changed from inside a host call, where only the ``Caller`` is at hand.

wasmtime's C API sets a store's epoch deadline and fuel through its context, which a ``Caller``
has too; wasmtime-py exposes both only on ``Store`` (``set_epoch_deadline``, ``set_fuel``), and a
host function (the sandbox's ``clock_time_get``, ``proc_exit``...) gets a ``Caller``, not the
``Store``. So these two calls go through wasmtime-py's ``_ffi`` bindings and ``Caller._context``,
here and nowhere else: the version range in pyproject (``wasmtime>=50,<51``) pins the private
names, and tests/wasm's timeout and fuel tests fail if they move.
"""

from __future__ import annotations

from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

__all__ = ["set_epoch_deadline", "set_fuel"]


def set_epoch_deadline(caller: wasmtime.Caller, ticks: int) -> None:
    """The guest traps once the engine's epoch passes ``ticks`` more ticks (0: at the next tick).

    Compiled code keeps the deadline it read on entering a function, so the guest sees the new one
    from its next function entry (tests/wasm/test_caller.py): a CPython guest enters one every
    few bytecodes."""
    ffi.wasmtime_context_set_epoch_deadline(caller._context(), ticks)


def set_fuel(caller: wasmtime.Caller, fuel: int) -> str | None:
    """The guest traps once it has spent ``fuel`` units of fuel. Returns wasmtime's error message
    when it refused (an engine without fuel), None when set; never raises, since host functions
    must not (a Python exception in one is an abort, not a trap)."""
    err: Any = ffi.wasmtime_context_set_fuel(caller._context(), fuel)
    if not err:
        return None
    return str(wasmtime.WasmtimeError._from_ptr(err))  # which also frees it
