"""edgecompute_wasm._caller: the store settings a host function changes through its Caller."""

from __future__ import annotations

import pytest
import wasmtime

from edgecompute_wasm._caller import set_epoch_deadline, set_fuel

# the guest calls the host once, then loops for ever in another function: only a trap ends it.
# (Compiled code keeps the epoch deadline it read on entering a function, so a deadline lowered
# by a host call is seen from the next function entry: a CPython guest enters functions all the time.)
_WAT = """
(module
  (import "host" "arm" (func $arm))
  (func $spin (loop $again (br $again)))
  (func (export "run")
    call $arm
    call $spin))
"""


def _run(arm, fuel: bool = False) -> wasmtime.Trap:  # type: ignore[no-untyped-def]
    """Run the guest on an engine with epochs (and fuel if asked); ``arm(caller, engine)`` is the
    host function; the guest's trap is returned."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.consume_fuel = fuel
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    if fuel:
        store.set_fuel(2**62)
    store.set_epoch_deadline(2**40)
    linker = wasmtime.Linker(engine)
    linker.define_func("host", "arm", wasmtime.FuncType([], []), lambda caller: arm(caller, engine),
                       access_caller=True)
    instance = linker.instantiate(store, wasmtime.Module(engine, _WAT))
    with pytest.raises(wasmtime.Trap) as trapped:
        instance.exports(store)["run"](store)
    return trapped.value


def test_fuel_set_from_a_host_call_ends_the_loop():
    answers: list[str | None] = []
    trap = _run(lambda caller, engine: answers.append(set_fuel(caller, 10_000)), fuel=True)
    assert answers == [None]
    assert trap.trap_code == wasmtime.TrapCode.OUT_OF_FUEL


def test_an_engine_without_fuel_refuses_with_a_message_instead_of_raising():
    answers: list[str | None] = []

    def arm(caller, engine):  # type: ignore[no-untyped-def]
        answers.append(set_fuel(caller, 10_000))
        set_epoch_deadline(caller, 0)  # so the loop still ends (at the next tick, as the sandbox's ticker gives)
        engine.increment_epoch()

    _run(arm)
    assert answers and answers[0] is not None and "fuel" in answers[0].lower()


def test_a_zero_epoch_deadline_set_from_a_host_call_traps_the_guest():
    def arm(caller, engine):  # type: ignore[no-untyped-def]
        set_epoch_deadline(caller, 0)
        engine.increment_epoch()  # the sandbox's ticker thread does this every tick

    assert _run(arm).trap_code == wasmtime.TrapCode.INTERRUPT
