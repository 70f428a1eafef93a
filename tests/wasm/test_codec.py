"""The guest-to-host decoder accepts plain data only and bounds everything it reads."""

from __future__ import annotations

import marshal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompute_wasm._codec import CodecError, decode, encode

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None)
@given(plain)
def test_round_trip(value) -> None:
    assert decode(encode(value)) == value


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        decode(data)
    except CodecError:
        pass


def test_rejects_what_is_not_plain_data() -> None:
    with pytest.raises(CodecError, match="type code"):
        decode(marshal.dumps(compile("1", "x", "eval"), 2))
    with pytest.raises(CodecError, match="references"):
        decode(marshal.dumps(["shared", "shared"], 4))
    with pytest.raises(CodecError, match="bad length"):
        decode(b"[" + (2**31 - 1).to_bytes(4, "little"))
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(1) + b"N")
    with pytest.raises(CodecError, match="nested"):
        decode(b"[\x01\x00\x00\x00" * 300 + b"N")
    with pytest.raises(CodecError):
        decode(b"{" + encode([1]) + encode(2) + b"0")  # unhashable key
